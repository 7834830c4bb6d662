"""`python -m sparsetrain.experiment DATASET --eps 0.2 ...`: the DSD2 study, reproducible and resumable.

Per seed: (1) the teacher (= vanilla) run: train dense, then prune -> perturb -> retrain -> evaluate
until the wall (Algorithm 1); (2) a vanilla run of the student when it differs from the model;
(3) for each teacher choice, the student pruned the same way under the distillation loss (Eq. 2).
Every round logs accuracy, entropy (Eq. 1) and FLOPs; state is saved atomically after every
epoch, so a killed run continues from its last completed epoch with the same result.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
import time

import torch
from tqdm import tqdm

from . import data as D
from . import report
from .checkpoint import atomic_save, load_model, model_payload, restore_model, safe_load, save_model
from .config import Config, config_from_args
from .entropy import activation_entropy
from .flops import forward_flops, training_flops
from .models import build_model
from .pruning import apply_engine, global_prune, load_weights_under_masks_, model_sparsity, prunable_layers
from .structured import block_prune, can_prune, filter_prune, fit_state, structured_sparsity, weight_count
from .train import evaluate, make_optimizer, train_epoch

# config keys that do not change results (may differ between a run and its resume)
_NON_RESULT_KEYS = ("out", "threads", "data_dir", "no_download")


# ============================================================================ run directory
def run_dir_of(cfg: Config) -> str:
    return os.path.join(cfg.out, f"{cfg.dataset}-eps{cfg.eps:g}-{cfg.profile}")


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__),
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def prepare_run_dir(cfg: Config) -> str:
    """Create the run directory with its resolved config.json; refuse a directory holding a run
    with different result-affecting settings."""
    rd = run_dir_of(cfg)
    os.makedirs(rd, exist_ok=True)
    path = os.path.join(rd, "config.json")
    resolved = {**dataclasses.asdict(cfg), "student": cfg.resolved_student()}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = sorted(k for k in resolved if k not in _NON_RESULT_KEYS
                      and json.loads(json.dumps(resolved[k])) != old.get(k))
        if diff:
            raise SystemExit(f"error: {rd} holds a run with different settings ({', '.join(diff)}); "
                             f"choose another --out or remove it")
    import torchvision
    _write_json(path, {**resolved, "git_commit": _git_commit(),
                       "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                                    "python": sys.version.split()[0]}})
    return rd


def _write_metrics(path: str, rows: list[dict]) -> None:
    keys = list(rows[0].keys())
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


# ============================================================================ one phase
def _arch(cfg: Config, name: str, splits) -> dict:
    return dict(name=name, num_classes=splits.num_classes, in_channels=splits.in_channels,
                image_size=splits.image_size[0])


def _reached_wall(cfg: Config, sparsity: float) -> bool:
    return sparsity >= cfg.wall - 1e-9


def run_phase(cfg: Config, splits, seed: int, phase: str, arch_name: str, pdir: str, teacher=None,
              teacher_cost: int = 0) -> str:
    """Algorithm 1 for one model (CE, or Eq. 2 with `teacher`), resumable. Returns pdir."""
    os.makedirs(os.path.join(pdir, "ckpt"), exist_ok=True)
    if os.path.exists(os.path.join(pdir, "best.json")):
        return pdir  # finished earlier
    state_path = os.path.join(pdir, "state.pt")
    arch = _arch(cfg, arch_name, splits)
    shape = (splits.in_channels, *splits.image_size)
    n_train = len(splits.train)
    resumed = os.path.exists(state_path)
    if resumed:  # continue after the last completed epoch
        st = safe_load(state_path)
        model, masks = restore_model(st["model"])
        rnd, epoch, rows, rewind, it = st["round"], st["epoch"], st["rows"], st["rewind"], [st["iteration"]]
        torch.set_rng_state(st["rng"])
    else:
        torch.manual_seed(seed)
        model, masks, rnd, epoch, rows, rewind, it = build_model(**arch), {}, 0, 0, [], None, [0]
        if cfg.perturb == "rewind" and cfg.rewind_iter == 0:
            rewind = {k: v.clone() for k, v in model.state_dict().items()}
    opt, sched = make_optimizer(model, cfg)
    if resumed:
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
    t_fwd = forward_flops(teacher, shape)["total"] if teacher is not None else 0
    # filter pruning shrinks the layers: sparsity counts against the unpruned model's weights
    n_orig = None
    if cfg.structure == "filter":
        with torch.random.fork_rng(devices=[]):  # leave the global RNG as a resume finds it
            n_orig = weight_count(build_model(**arch))

    def on_step():
        it[0] += 1
        nonlocal rewind
        if cfg.perturb == "rewind" and rnd == 0 and rewind is None and it[0] == cfg.rewind_iter:
            rewind = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def save_state():
        atomic_save({"format": "sparsetrain-ckpt-v1", "model": model_payload(model, masks, arch),
                     "opt": opt.state_dict(), "sched": sched.state_dict(), "round": rnd, "epoch": epoch,
                     "rows": rows, "rewind": rewind, "iteration": it[0], "rng": torch.get_rng_state()},
                    state_path)

    while True:
        sparsity = model_sparsity(model, masks) if n_orig is None else structured_sparsity(model, masks, n_orig)
        t0 = time.perf_counter()
        bar = tqdm(range(epoch, cfg.epochs), desc=f"seed {seed} {phase} round {rnd} ({sparsity:.2%})",
                   leave=False, initial=epoch, total=cfg.epochs, dynamic_ncols=True, disable=None)
        for epoch in bar:
            tr = train_epoch(model, splits.train, opt, cfg, epoch=epoch + 1000 * rnd, seed=seed, masks=masks,
                             teacher=teacher, on_step=on_step)
            sched.step()
            bar.set_postfix(loss=f"{tr['loss']:.3f}", acc=f"{tr['acc']:.3f}")
            epoch += 1
            save_state()
        train_s = time.perf_counter() - t0  # (after a resume: the epochs run since)
        # ---- evaluate (Alg. 1 line 21), entropy (Eq. 1), FLOPs
        trm, va, te = evaluate(model, splits.train), evaluate(model, splits.val), evaluate(model, splits.test)
        ent = activation_entropy(model, D.iterate(splits.train, 512))
        fwd = forward_flops(model, shape, masks)["total"]
        round_flops = training_flops(fwd, n_train, cfg.epochs)
        row = {"seed": seed, "phase": phase, "round": rnd, "sparsity": sparsity, "epochs": cfg.epochs,
               "train_loss": trm["loss"], "train_acc": trm["acc"], "val_loss": va["loss"], "val_acc": va["acc"],
               "test_loss": te["loss"], "test_acc": te["acc"], "entropy_mean": ent["mean"], "fwd_flops": fwd,
               "round_flops": round_flops, "cum_flops": round_flops + (rows[-1]["cum_flops"] if rows else 0),
               "teacher_flops": t_fwd * n_train * cfg.epochs, "teacher_cost": teacher_cost,
               "wall_s": time.perf_counter() - t0, "sec_per_epoch": train_s / max(cfg.epochs, 1),
               "sparse_layers": sum(1 for _, m in prunable_layers(model) if type(m).__name__.startswith("Sparse")),
               "is_best": 0, **{f"entropy/{k}": v for k, v in ent["per_layer"].items()}}
        rows.append(row)
        save_model(os.path.join(pdir, "ckpt", f"round_{rnd:02d}.pt"), model, masks, arch, round=rnd,
                   val_acc=va["acc"])
        tqdm.write(f"[{phase} seed {seed}] round {rnd:2d} sparsity {sparsity:7.3%}  train {trm['acc']:.3f}  "
                   f"val {va['acc']:.3f}  test {te['acc']:.3f}  entropy {ent['mean']:.3f}  "
                   f"{row['wall_s']:.0f}s ({row['sparse_layers']} sparse layers)")
        _write_metrics(os.path.join(pdir, "metrics.csv"), rows)
        # ---- stop? (wall, nothing left to prune (structured), or Algorithm 2 when asked)
        stop = _reached_wall(cfg, sparsity) or not can_prune(model, masks, cfg.structure, cfg.block) or (
            cfg.early_stop == "entropy" and report.algorithm2_stop(rows, cfg.t_e, cfg.t_a) is not None)
        if stop:
            break
        # ---- next round: prune (global magnitude, or structured), perturb, engine, fresh optimizer
        rnd, epoch = rnd + 1, 0
        if cfg.structure == "filter":  # channels removed: dense, smaller layers, no masks
            filter_prune(model, cfg.rate)
            masks = {}
        elif cfg.structure == "block":
            masks = block_prune(model, masks, cfg.rate, cfg.block, scope=cfg.scope)
        else:
            masks = global_prune(model, masks, cfg.rate, scope=cfg.scope)
        _perturb(cfg, model, masks, arch, seed, rnd, rewind)
        # structured runs keep dense layers: the CSR engine would not exploit the structure, and
        # the BSR kernels are Triton (GPU tensors); this loop trains on CPU
        masks = apply_engine(model, masks, cfg.engine if cfg.structure == "unstructured" else "dense")
        opt, sched = make_optimizer(model, cfg)
        save_state()
    _finish(pdir, rows)
    return pdir


def _perturb(cfg, model, masks, arch, seed, rnd, rewind):
    if cfg.perturb == "rewind":
        if rewind is None:
            raise RuntimeError(f"--perturb rewind: the dense training ran fewer than --rewind-iter="
                               f"{cfg.rewind_iter} iterations; lower --rewind-iter")
        load_weights_under_masks_(model, fit_state(model, rewind, arch), masks)
    elif cfg.perturb == "reinit":
        g = torch.random.get_rng_state()
        torch.manual_seed(seed * 1000 + rnd)
        fresh = build_model(**arch).state_dict()
        torch.random.set_rng_state(g)
        load_weights_under_masks_(model, fit_state(model, fresh, arch), masks)


def _finish(pdir: str, rows: list[dict]) -> None:
    """Mark the best-validation round (first of ties), write best.json last (= phase done)."""
    best = max(range(len(rows)), key=lambda i: (rows[i]["val_acc"], -i))
    for i, r in enumerate(rows):
        r["is_best"] = int(i == best)
    _write_metrics(os.path.join(pdir, "metrics.csv"), rows)
    b = rows[best]
    _write_json(os.path.join(pdir, "best.json"),
                {"round": b["round"], "val_acc": b["val_acc"], "test_acc": b["test_acc"],
                 "sparsity": b["sparsity"], "path": f"ckpt/round_{b['round']:02d}.pt"})
    state = os.path.join(pdir, "state.pt")
    if os.path.exists(state):
        os.remove(state)


# ============================================================================ the study
def _teacher(choice: str, teacher_dir: str):
    """(teacher model in eval mode, FLOPs it cost) for --teachers best | dense | PATH."""
    if choice in ("best", "dense"):
        rows = report.read_metrics(os.path.join(teacher_dir, "metrics.csv"))
        with open(os.path.join(teacher_dir, "best.json")) as f:
            best = json.load(f)
        rnd = best["round"] if choice == "best" else 0
        path = os.path.join(teacher_dir, "ckpt", f"round_{rnd:02d}.pt")
        cost = int(rows[rnd]["cum_flops"])
    else:
        path, cost = choice, 0
    model, _, _ = load_model(path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, cost


def _teacher_tag(choice: str) -> str:
    return choice if choice in ("best", "dense") else "path-" + os.path.splitext(os.path.basename(choice))[0]


def run_study(cfg: Config) -> str:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rd = prepare_run_dir(cfg)
    student = cfg.resolved_student()
    for seed in cfg.seeds:
        splits = D.load_dataset(cfg.dataset, cfg.data_dir, eps=cfg.eps, noise=cfg.noise,
                                val_fraction=cfg.val_fraction, clean_val=cfg.clean_val, seed=seed,
                                subset=cfg.subset or None, label_file=cfg.label_file or None,
                                download=not cfg.no_download)
        sd = os.path.join(rd, f"seed{seed}")
        os.makedirs(sd, exist_ok=True)
        _write_json(os.path.join(sd, "noise.json"), {"flipped": splits.flipped.tolist(), **splits.summary()})
        tdir = run_phase(cfg, splits, seed, "teacher", cfg.model, os.path.join(sd, "teacher"))
        if student != cfg.model:
            run_phase(cfg, splits, seed, "vanilla", student, os.path.join(sd, "vanilla"))
        for choice in cfg.teachers:
            teacher, cost = _teacher(choice, tdir)
            tag = _teacher_tag(choice)
            run_phase(cfg, splits, seed, f"distill-{tag}", student, os.path.join(sd, f"distill-{tag}"),
                      teacher=teacher, teacher_cost=cost)
    return report.write_report(rd)


def main(argv=None) -> int:
    cfg, args = config_from_args(argv)
    if args.report_only:
        print(report.write_report(run_dir_of(cfg)))
        return 0
    try:
        summary = run_study(cfg)
    except D.DatasetNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nresults: {os.path.dirname(summary)}\nsummary: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
