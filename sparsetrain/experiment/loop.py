"""Algorithm 1 for one model (one "phase" of the study), resumable, as short stages.

    state = start(...)                         # fresh, or the last completed epoch from state.pt
    loop:
        train_round(...)                       # the round's epochs; state saved after each
        row = measure(...)                     # evaluate (Alg. 1 line 21), entropy (Eq. 1), FLOPs
        if should_stop(...): break          # the wall, nothing left to prune, Algorithm 2 (students)
        next_round(...)                        # prune -> perturb -> engine -> fresh optimizer
    finish(...)                                # best round marked, best.json written last (= done)

The loss is cross-entropy, or Eq. 2 when a teacher is given. The run's schedule (epochs, LR, ...)
is its role's (config.Hyper: Table 4 for its model). The phase directory holds metrics.csv (one row
per round), ckpt/round_XX.pt and, while running, state.pt.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..engine.nn import is_sparse, model_sparsity, prunable_layers, weight_count
from ..engine.policy import apply_engine
from ..prune import PruningRule, fit_state, load_weights_under_masks_, make_rule
from . import data as D
from . import distributed as dist
from .checkpoint import FORMAT, atomic_save, model_payload, restore_model, safe_load, save_model
from .devices import resolve_amp
from .early_stop import algorithm2_stop, reference_known
from .entropy import activation_entropy
from .files import CorruptFile, RemoveFailed, WriteFailed, make_folder, remove_file, write_csv, write_json
from .flops import forward_flops, paper_macs, paper_round_flops, training_flops
from .integrity import RESTART, verify_phase, where_of
from .metrics import best_index
from .models import build_model, one_spelling
from .train import evaluate, make_optimizer, steps_per_epoch, train_epoch


class PhaseError(Exception):
    """A phase cannot go on (the CLI prints it on one line): training diverged, or the settings do
    not fit the data (a --rewind-iter past the dense run's iterations)."""

__all__ = ["run_phase", "arch_of", "Costs"]


@dataclass
class PhaseState:
    """Everything a killed phase needs to continue exactly where it stopped."""
    model: torch.nn.Module
    masks: dict
    rnd: int = 0
    epoch: int = 0
    rows: list = None
    rewind: dict | None = None
    iteration: int = 0
    train_s: float = 0.0  # seconds of training in the current round so far (across resumes)
    opt: object = None
    sched: object = None
    amp: object = None     # the autocast dtype (--amp on this device), None: fp32
    scaler: object = None  # GradScaler for --amp fp16 (its scale carries across epochs and resumes)


def arch_of(name: str, splits, dropout: float = 0.0) -> dict:
    """build_model arguments of model `name` for a dataset's splits (dropout only where > 0: the
    checkpoints of models without one stay as they were)."""
    h, w = splits.image_size  # (an int for square images, as runs have always recorded it)
    return dict(name=name, num_classes=splits.num_classes, in_channels=splits.in_channels,
                image_size=h if h == w else (h, w), **({"dropout": dropout} if dropout else {}))


# ============================================================================ stages
def start(cfg, hp, arch: dict, seed: int, state_path: str, device) -> PhaseState:
    """A fresh phase (seeded model, round 0), or the saved state of an interrupted one (saved on
    any device: checkpoints load on the CPU, then move to `device`)."""
    if os.path.exists(state_path):
        try:
            st = safe_load(state_path)
        except CorruptFile as e:
            raise CorruptFile(f"{e}; {RESTART}") from None
        saved = st["model"].get("arch") if isinstance(st.get("model"), dict) else None
        spelled = lambda a: {**a, "name": one_spelling(a.get("name"))} if isinstance(a, dict) else a  # noqa: E731
        if spelled(saved) != spelled(arch):  # (a state.pt copied from another run or phase: it resumed another
            # model's training; the name in one spelling: a run found under another spelling of its model resumes)
            raise CorruptFile(f"{state_path} is the state of another model ({saved!r}), not this phase's ({arch!r}); "
                              f"{RESTART}")
        here = where_of(state_path)
        if st.get("where", here) != here:  # (a state of before 2026-12-06 names none)
            raise CorruptFile(f"{state_path} is the state of {st['where']}, not of this phase ({here}): copied from "
                              f"another run, seed or phase; {RESTART}")
        model, masks = restore_model(st["model"], state_path)
        model, masks = model.to(device), {n: m.to(device) for n, m in masks.items()}
        s = PhaseState(model, masks, st["round"], st["epoch"], st["rows"], st["rewind"], st["iteration"],
                       st.get("train_s", 0.0))
        s.opt, s.sched = make_optimizer(model, hp)
        s.opt.load_state_dict(st["opt"])
        s.sched.load_state_dict(st["sched"])
        _set_amp(s, cfg, device, st.get("scaler"))
        torch.set_rng_state(st["rng"])
        return s
    torch.manual_seed(seed)
    s = PhaseState(build_model(**arch).to(device), {}, rows=[])
    if cfg.perturb == "rewind" and hp.rewind_iter == 0:
        s.rewind = {k: v.clone() for k, v in s.model.state_dict().items()}
    s.opt, s.sched = make_optimizer(s.model, hp)
    _set_amp(s, cfg, device)
    return s


def _set_amp(s: PhaseState, cfg, device, scaler_state=None) -> None:
    """--amp on this device: the autocast dtype, and for fp16 a GradScaler (restored on resume)."""
    s.amp = resolve_amp(cfg.amp, torch.device(device))
    s.scaler = torch.amp.GradScaler(torch.device(device).type) if s.amp == torch.float16 else None
    if s.scaler is not None and scaler_state:
        s.scaler.load_state_dict(scaler_state)


def save(s: PhaseState, arch: dict, state_path: str) -> None:
    """Rank 0 writes (every rank holds the same state); its WriteFailed (disk full) stops every rank."""
    dist.on_main(lambda: atomic_save(
        {"format": FORMAT, "where": where_of(state_path), "model": model_payload(s.model, s.masks, arch),
         "opt": s.opt.state_dict(),
         "sched": s.sched.state_dict(), "round": s.rnd, "epoch": s.epoch, "rows": s.rows,
         "rewind": s.rewind, "iteration": s.iteration, "train_s": s.train_s,
         "scaler": s.scaler.state_dict() if s.scaler is not None else None,
         "rng": torch.get_rng_state()}, state_path), (WriteFailed,))


def train_round(cfg, hp, s: PhaseState, splits, seed: int, teacher, arch: dict, state_path: str,
                label: str, role: str = "student") -> None:
    """The round's remaining epochs; the state is saved after each one. `role`: whose --ROLE-lr a
    diverged run is told to lower."""
    def on_step():  # the rewind snapshot: the weights after iteration --rewind-iter of the dense run
        s.iteration += 1
        if cfg.perturb == "rewind" and s.rnd == 0 and s.rewind is None and s.iteration == hp.rewind_iter:
            s.rewind = dist.averaged_state(s.model)  # (mid-epoch: the ranks' BN statistics differ until synced)

    bar = tqdm(range(s.epoch, hp.epochs), desc=label, leave=False, initial=s.epoch, total=hp.epochs,
               dynamic_ncols=True, disable=None if dist.is_main() else True)
    forward = dist.wrap(s.model)  # DDP under torchrun, rebuilt every round: the parameters change size
    for epoch in bar:
        t0 = time.perf_counter()
        tr = train_epoch(s.model, splits.train, s.opt, hp.batch_size, epoch=epoch + 1000 * s.rnd, seed=seed,
                         masks=s.masks, teacher=teacher, alpha=cfg.alpha, tau=cfg.tau, on_step=on_step,
                         forward=forward, amp=s.amp, scaler=s.scaler, l1=cfg.l1, policy=cfg.augment)
        dist.sync_bn_stats_(s.model)  # (before the check: a rank's own overflow reaches every rank's mean)
        # (NaN weights prune nothing: the rounds would never reach the wall; an overflowed weight or
        # BatchNorm statistic with a finite loss made every later evaluation chance-level, silently)
        bad = None if math.isfinite(tr["loss"]) else f"mean loss {tr['loss']}"
        bad = bad or next((f"{k} not finite" for k, t in s.model.state_dict().items()
                           if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
        if bad:
            raise PhaseError(f"{label}: training diverged ({bad} in epoch {epoch + 1}); lower the "
                             f"learning rate (--{role}-lr, or --lr for both roles) and start again")
        s.sched.step()
        s.epoch, s.train_s = epoch + 1, s.train_s + time.perf_counter() - t0
        bar.set_postfix(loss=f"{tr['loss']:.3f}", acc=f"{tr['acc']:.3f}")
        save(s, arch, state_path)


def measure(hp, s: PhaseState, splits, seed: int, phase: str, sparsity: float, cost: "Costs", t0: float) -> dict:
    """One metrics row: accuracies and losses, entropy (Eq. 1), FLOPs (exact, and the paper's
    convention: flops.paper_round_flops), timing."""
    shape = (splits.in_channels, *splits.image_size)
    # samples trained per epoch: a final batch of one sample is skipped (BatchNorm), not trained, not charged
    n_train = min(len(splits.train), steps_per_epoch(len(splits.train), hp.batch_size) * hp.batch_size)
    trm, va, te = (evaluate(s.model, sp, amp=s.amp, distributed=True) for sp in (splits.train, splits.val, splits.test))
    batches = D.iterate(splits.train, 512)
    if dist.world() > 1:  # every rank counts its rows; Eq. 1 takes the counts summed over ranks
        batches = (xb[dist.rows(xb.shape[0])] for xb, _ in batches)
    ent = activation_entropy(s.model, batches, reduce=dist.all_sum if dist.world() > 1 else None)
    fwd = forward_flops(s.model, shape, s.masks)["total"]
    round_flops = training_flops(fwd, n_train, hp.epochs)
    prev = s.rows[-1] if s.rows else {}
    return {"seed": seed, "phase": phase, "round": s.rnd, "sparsity": sparsity, "epochs": hp.epochs,
            "train_loss": trm["loss"], "train_acc": trm["acc"], "val_loss": va["loss"], "val_acc": va["acc"],
            "test_loss": te["loss"], "test_acc": te["acc"], "entropy_mean": ent["mean"], "fwd_flops": fwd,
            "round_flops": round_flops, "cum_flops": round_flops + prev.get("cum_flops", 0),
            "paper_round_flops": cost.paper_round, "paper_cum_flops": cost.paper_round + prev.get("paper_cum_flops", 0),
            "teacher_flops": cost.teacher_fwd * n_train * hp.epochs, "teacher_cost": cost.teacher_cost,
            "teacher_paper_flops": cost.teacher_paper_round, "teacher_paper_cost": cost.teacher_paper_cost,
            "wall_s": time.perf_counter() - t0, "sec_per_epoch": s.train_s / max(hp.epochs, 1),
            "sparse_layers": sum(1 for _, m in prunable_layers(s.model) if is_sparse(m)),
            "is_best": 0, **{f"entropy/{k}": v for k, v in ent["per_layer"].items()}}


def should_stop(cfg, role: str, rule: PruningRule, s: PhaseState, sparsity: float, original: int) -> str:
    """Why the phase ends here ("" = it goes on; best.json records it for the report's `†`): Algorithm 1's
    wall (line 6: a round is trained only while its target sparsity, 1 - (1 - current)(1 - rate), is below
    the wall; filter and block pruning's actual next sparsity: rule.next_sparsity), nothing left to prune,
    or, for the students only (the teacher is a full run), the --early-stop rule."""
    if not rule.can_prune(s.model, s.masks):
        return "nothing to prune"
    if rule.next_sparsity(s.model, s.masks, cfg.rate, sparsity, original) >= cfg.wall - 1e-9:
        return "wall"
    return "early stop" if (role == "student" and cfg.early_stop != "none" and algorithm2_stop(
        s.rows, cfg.t_e, cfg.t_a, cfg.early_stop, cfg.stop_falls) is not None) else ""


def stop_unrunnable(cfg, role: str, rows) -> str:
    """Why this student's --early-stop rule cannot run ("" = it can, or none applies): round 0's (the
    dense model's) entropy is NaN, Algorithm 2's reference eta_0, so the run can only go to the wall."""
    if role != "student" or cfg.early_stop == "none" or not rows or reference_known(rows):
        return ""
    return f"--early-stop {cfg.early_stop} cannot run: round 0's (the dense model's) entropy is NaN"


def next_round(cfg, hp, rule: PruningRule, s: PhaseState, arch: dict, seed: int, splits) -> None:
    """Prune, perturb, put layers on the engine the policy says (--engine auto: timed on a
    training batch of this rank's size, rank 0 deciding), restart the optimizer and schedule."""
    s.rnd, s.epoch, s.train_s = s.rnd + 1, 0, 0.0
    s.masks = rule.prune(s.model, s.masks, cfg.rate)
    dist.check_masks_agree(s.model, s.masks)
    perturb_(cfg, hp, s, arch, seed)
    engine = "dense" if rule.needs_dense else cfg.engine
    example = None
    if engine == "auto":
        n = min(hp.batch_size, len(splits.train))
        # (the rows this rank trains on: dist.shard's, the whole batch under 2 rows a rank; dist.rows gave
        # rank 0 of 3 an empty example at --batch-size 2, a traceback, and others a share it never trains)
        example = next(D.iterate(splits.train, n))[0][dist.shard(n)[0]]
    dev_type = next(s.model.parameters()).device.type
    with torch.autocast(dev_type, dtype=s.amp, enabled=s.amp is not None):  # (auto times the layers as they train)
        s.masks = apply_engine(s.model, s.masks, engine, example=example, agree=dist.from_main)
    s.opt, s.sched = make_optimizer(s.model, hp)


def perturb_(cfg, hp, s: PhaseState, arch: dict, seed: int) -> None:
    """--perturb: none, rewind (to the snapshot of iteration --rewind-iter) or reinit (fresh
    weights seeded by (seed, round), leaving the global RNG untouched)."""
    if cfg.perturb == "none":
        return
    if cfg.perturb == "rewind":
        if s.rewind is None:
            raise PhaseError(f"--perturb rewind: the dense training ran fewer than --rewind-iter="
                             f"{hp.rewind_iter} iterations; lower --rewind-iter")
        source = s.rewind
    else:
        with torch.random.fork_rng(devices=[]):
            # (a stream of its own: seed * 1000 + round was seed 1's initial model for seed 0's round 1;
            # the CPU generator only: torch.manual_seed also reseeded the CUDA ones, which fork_rng(devices=[])
            # does not restore)
            torch.random.default_generator.manual_seed(D.seeded(seed, 7, s.rnd).initial_seed())
            source = build_model(**arch).state_dict()
    source = fit_state(s.model, source, _unseeded(lambda: build_model(**arch)))  # (moved to each layer's device there)
    load_weights_under_masks_(s.model, source, s.masks)


def paper_images(splits) -> int:
    """The training images of the paper's FLOPs count: the whole training file (its code trains on
    our validation share too), but an official validation split (Flowers-102's), which the paper's
    code never trains on, is not part of it."""
    return len(splits.train) + (0 if splits.official_val else len(splits.val))


def _unseeded(build):
    """build() with the global CPU RNG as it was before (a model's initialisation draws from it)."""
    def call():
        with torch.random.fork_rng(devices=[]):
            return build()
    return call


def finish(pdir: str, rows: list[dict], stop: str | None = None) -> None:
    """Mark the best-validation round (first of ties; the report's rule, metrics.best_index: a NaN
    validation accuracy never wins, round 0 where none is finite), write best.json last (= phase done),
    with why the phase ended (`stop`: should_stop's reason)."""
    b = best_index(rows)
    best = 0 if b is None else b
    for i, r in enumerate(rows):
        r["is_best"] = int(i == best)

    def write():  # (rank 0's; its WriteFailed stops every rank)
        write_csv(os.path.join(pdir, "metrics.csv"), rows, checksum=True, where=where_of(os.path.join(pdir, "state.pt")))
        b = rows[best]
        write_json(os.path.join(pdir, "best.json"),
                   {"round": b["round"], "val_acc": b["val_acc"], "test_acc": b["test_acc"],
                    "sparsity": b["sparsity"], "path": f"ckpt/round_{b['round']:02d}.pt",
                    "where": where_of(os.path.join(pdir, "state.pt")), "stop": stop}, checksum=True)  # (integrity._check_finished)
        drop_resume_state(pdir)
    dist.on_main(write, (WriteFailed,))


def drop_resume_state(pdir: str) -> None:
    """Remove a finished phase's resume state and its checksum (done with once best.json exists)."""
    for path in ("state.pt", "state.pt.sha256"):
        remove_file(os.path.join(pdir, path), RemoveFailed)  # (WriteFailed's "free space" misled: none is needed)


# ============================================================================ one phase
def _resumed_round(state_path: str):
    """The round `state_path` resumes (None: no state, or one `start` refuses)."""
    try:
        return safe_load(state_path).get("round")
    except (OSError, ValueError):  # (CorruptFile, a foreign file: start says why)
        return None


@dataclass
class Costs:
    """FLOPs a phase charges besides its own exact count (flops.py has both conventions)."""
    paper_round: int = 0          # one round in the paper's convention (flops.paper_round_flops)
    teacher_fwd: int = 0          # exact forward FLOPs per sample of the teacher (KD inference)
    teacher_cost: int = 0         # exact FLOPs spent obtaining the teacher
    teacher_paper_round: int = 0  # the teacher's KD inference per round, paper convention
    teacher_paper_cost: int = 0   # the teacher's cost, paper convention


def run_phase(cfg, role: str, splits, seed: int, phase: str, arch_name: str, pdir: str, teacher=None,
              teacher_cost: tuple = (0, 0), teacher_arch: dict | None = None) -> str:
    """Algorithm 1 for one model (CE, or Eq. 2 with `teacher`), resumable. `role`: whose schedule
    and stop rules apply ("teacher" or "student"); `teacher_cost`: (exact, paper convention) FLOPs
    spent obtaining the teacher; `teacher_arch`: its build_model arguments (its dense cost in the
    paper's convention: a filter-pruned teacher has lost channels). Returns pdir."""
    make_folder(os.path.join(pdir, "ckpt"))
    done = os.path.exists(os.path.join(pdir, "best.json"))
    resumed = lambda: _resumed_round(os.path.join(pdir, "state.pt"))  # noqa: E731 (asked for a damaged round only)

    def check():  # (rank 0's; its errors raised on every rank: a failed removal there alone left the others a traceback)
        if done:
            drop_resume_state(pdir)  # (what a kill inside finish, after best.json, left: never read again)
        verify_phase(pdir, resumed)  # (may finish an interrupted checkpoint write)
    dist.on_main(check, (CorruptFile, WriteFailed))
    if done:
        return pdir  # finished earlier
    state_path = os.path.join(pdir, "state.pt")
    hp, arch = cfg.hyper(role), arch_of(arch_name, splits, cfg.dropout)
    rule = make_rule(cfg.structure, scope=cfg.scope, block=cfg.block)
    iters = hp.epochs * steps_per_epoch(len(splits.train), hp.batch_size)  # (round 0: every rank steps each global batch)
    if cfg.perturb == "rewind" and hp.rewind_iter > iters:
        raise PhaseError(f"--perturb rewind: --rewind-iter={hp.rewind_iter} is past the {iters} iterations of the "
                         f"dense training ({phase}); lower it")
    s = start(cfg, hp, arch, seed, state_path, splits.train.x.device)
    shape, n_images = (splits.in_channels, *splits.image_size), paper_images(splits)
    with torch.random.fork_rng(devices=[]):  # sparsity counts against the unpruned model's weights
        dense = build_model(**arch)
        dense_teacher = build_model(**teacher_arch) if teacher is not None and teacher_arch else teacher
    n_orig = weight_count(dense)
    cost = Costs(paper_round_flops(dense, shape, n_images, hp.epochs))
    if teacher is not None:
        cost.teacher_fwd = forward_flops(teacher, shape)["total"]
        cost.teacher_cost, cost.teacher_paper_cost = teacher_cost
        cost.teacher_paper_round = paper_macs(dense_teacher, shape) * n_images * hp.epochs
    note = ""  # (stop_unrunnable's, once known)
    while True:
        sparsity = model_sparsity(s.model, s.masks, n_orig)
        t0 = time.perf_counter() - s.train_s  # (a resumed round: its epochs trained before the kill count too)
        train_round(cfg, hp, s, splits, seed, teacher, arch, state_path,
                    f"seed {seed} {phase} round {s.rnd} ({sparsity:.2%})", role)
        row = measure(hp, s, splits, seed, phase, sparsity, cost, t0)
        s.rows.append(row)

        def record():  # (rank 0's; its WriteFailed stops every rank, not rank 0 alone)
            save_model(os.path.join(pdir, "ckpt", f"round_{s.rnd:02d}.pt"), s.model, s.masks, arch,
                       round=s.rnd, val_acc=row["val_acc"], where=where_of(state_path))  # (teachers.check_round)
            tqdm.write(f"[{phase} seed {seed}] round {s.rnd:2d} sparsity {sparsity:7.3%}  train "  # (accuracies in %)
                       f"{row['train_acc']:6.2%}  val {row['val_acc']:6.2%}  test {row['test_acc']:6.2%}  entropy "
                       f"{row['entropy_mean']:.3f}  {row['wall_s']:.0f}s ({row['sparse_layers']} sparse layers)")
            metrics = os.path.join(pdir, "metrics.csv")
            # (a kill inside finish left the finished rows' record: it would call these rows corrupt)
            remove_file(metrics + ".sha256", RemoveFailed)
            write_csv(metrics, s.rows)
        dist.on_main(record, (WriteFailed,))
        if not note and (note := stop_unrunnable(cfg, role, s.rows)) and dist.is_main():  # (once, at round 0)
            tqdm.write(f"[{phase} seed {seed}] {note}: the run goes on to the wall")
        stop = should_stop(cfg, role, rule, s, sparsity, n_orig)
        if stop:
            break
        next_round(cfg, hp, rule, s, arch, seed, splits)
        if model_sparsity(s.model, s.masks, n_orig) <= sparsity:  # (this rule at this rate prunes nothing more)
            if dist.is_main():  # (the round's line is rank 0's too: once, not once per rank)
                tqdm.write(f"[{phase} seed {seed}] round {s.rnd} would prune nothing more: the phase ends")
            stop = "nothing to prune"
            break
        save(s, arch, state_path)
    finish(pdir, s.rows, f"{stop}; {note}" if note else stop)  # (best.json says why the rule never stopped it)
    dist.barrier()  # the phase's files exist before any rank reads them (the teacher's, for students)
    return pdir
