"""One full training step (forward, backward, SGD update) of CIFAR ResNet-18 and VGG-like(5, 5),
batch 128 (--batch: another) at 32x32: every conv and linear layer sparse (sparsetrain, sparsify_) vs the same
model dense-masked (weight * mask in every forward through a parametrization), per sparsity.

    python bench/train_step.py            # ResNet-18 and VGG-like d5g5, sparsity 0/0.9/0.99/0.999
    python bench/train_step.py --quick    # ResNet-18 at 0.99 only, 2 timed steps
    python bench/train_step.py --models resnet18 --sparsities 0.99 --batch 8   # a small batch (fixed costs)

Dense and sparse steps alternate (a busy machine slows both alike). Reports the median step time,
the peak resident memory of the process during a step (VmHWM, reset before each step; it includes
the three models, optimizer state, activations and the engine's output-buffer pool) and, from one profiled step, where the time goes (sparse conv/linear ops,
dense conv/linear, BatchNorm, ReLU/pooling, optimizer, other). JSON: bench/results/train_step.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (HERE, cpu_snapshot, machine_info, others_cores, paired_ratio, parse_sparsities,  # noqa: E402
                    positive_int, print_table, refuse_empty, warn_if_busy, writable_json, write_json)
from sparsetrain.testing import mask_weight_, model_masks  # noqa: E402

import sparsetrain  # noqa: E402
from sparsetrain.experiment.models import resnet18, vgg_like  # noqa: E402

BATCH = 128
# dense masked (parametrization), sparse layers (sparsify_), sparse with conv -> BN -> ReLU fused
ENGINES = ("dense", "sparse", "fused")
MODELS = {"resnet18": lambda: resnet18(10, 3), "vgg_d5g5": lambda: vgg_like(5, 5, 10, 3)}


def build(name: str, sparsity: float, engine: str, seed: int = 0):
    """The model with every conv/linear weight masked at `sparsity` (random, per layer)."""
    torch.manual_seed(seed)
    model = MODELS[name]()
    masks = model_masks(model, sparsity, seed=seed + 1)
    if engine in ("sparse", "fused"):
        sparsetrain.sparsify_(model, masks, fuse=engine == "fused")
    else:
        for n, mask in masks.items():
            mask_weight_(model.get_submodule(n), mask)
    return model


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel refuses (no /proc/self/clear_refs, a
    container that makes it read-only): VmHWM is then the process's peak since it started, not a step's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# first match wins: our BN/ReLU/pool kernels before the other sparsetrain:: ops
_CATEGORIES = [("fused bn/relu/pool", ("bn_act", "bn_scale_shift", "max_pool2x2", "relu_count")),
               ("sparse conv/linear", ("sparsetrain",)),
               # the fused layer's autograd Function itself (its Python, the saved tensors), not a conv
               ("fused layer python", ("_SparseConvBNReLU",)),
               ("dense conv/linear", ("conv", "addmm", "aten::mm", "linear", "mkldnn")),
               ("batchnorm", ("batch_norm", "batchnorm")),  # (autograd's NativeBatchNormBackward0)
               ("relu/pool/add", ("relu", "threshold", "clamp_min", "pool", "aten::add")),
               ("optimizer", ("sgd", "_foreach", "optimizer")),
               ("mask multiply", ("aten::mul",))]


def _breakdown(step) -> dict:
    """Self CPU time of one step's ops, grouped by category (ms); every op run inside the optimizer's
    step (SGD's per-tensor adds and multiplies on CPU) counts as the optimizer's."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    out = {c: 0.0 for c, _ in _CATEGORIES}
    out["other"] = 0.0

    def in_optimizer(ev) -> bool:
        while ev is not None:
            if ev.name.startswith("Optimizer.step"):
                return True
            ev = ev.cpu_parent
        return False
    for ev in prof.events():
        out["optimizer" if in_optimizer(ev) else _category(ev.name)] += ev.self_cpu_time_total / 1e3
    return {k: round(v, 1) for k, v in out.items()}


def _category(name: str) -> str:
    name = name.lower()
    return next((cat for cat, keys in _CATEGORIES if any(k.lower() in name for k in keys)), "other")


def step_peak_mb(name: str, sparsity: float, engine: str, steps: int = 2, batch: int = BATCH) -> float:
    """Peak resident memory (MB) of a process holding only this model, during `steps` training
    steps after a warm-up one (the in-process peaks above share the process with the other models
    and the engine's buffer pool, whose contents depend on which step ran before). The child runs
    on this process's torch thread count (`--threads`; per-thread buffers are part of the peak)."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import torch; torch.set_num_threads({torch.get_num_threads()}); "
            f"import train_step as T; print(T._own_peak({name!r}, {sparsity!r}, {engine!r}, {steps}, {batch}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:  # (its traceback: check=True's error gave the exit status alone, stderr captured away)
        raise RuntimeError(f"--isolated-peaks: the child measuring {name} at {sparsity} ({engine}) failed with exit "
                           f"code {out.returncode}:\n{out.stderr[-3000:]}")
    peak = float(out.stdout.strip().splitlines()[-1])
    return None if peak != peak else peak  # (NaN: the child could not reset VmHWM)


def _mb(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def _trainer(model: nn.Module, x: torch.Tensor, t: torch.Tensor):
    """One SGD training step of `model` on (x, t), as a function returning the step's loss."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def _check_losses(name: str, sparsity: float, losses: dict, cuda: bool, reference=None) -> None:
    """The sparse and fused models' losses of the warm-up step (forward) and of the first timed one
    (after the warm-up's backward and update) against the dense masked model's: a wrong kernel stops
    the benchmark instead of being reported with a speedup. Same weights and masks, sums in another
    order (cuDNN may use TF32 on a GPU: looser there). Where the first timed losses part by more, an
    engine passes if it is as close to the float64 dense model's as 3x the float32 dense model is
    (reference(): those two float64 losses, computed only then): VGG-like at 99% at small batches,
    whose chains of near-constant BN channels make some BN-bias gradients rounding-dominated in every
    float32 engine, PyTorch's dense layers included (README, known limits)."""
    tol = dict(rtol=1e-2, atol=1e-3) if cuda else dict(rtol=1e-3, atol=1e-4)
    ref64 = None
    for engine in ENGINES[1:]:
        for i, (when, a, b) in enumerate(zip(("warm-up", "first timed"), losses[engine], losses["dense"])):
            a, b = a.cpu().double(), b.cpu().double()
            if i == 1 and reference is not None and not torch.allclose(a, b, **tol):
                ref64 = reference() if ref64 is None else ref64
                r = ref64[1]
                if abs(a - r) <= 3 * abs(b - r) + tol["atol"] + tol["rtol"] * abs(r):
                    continue
                raise AssertionError(f"{name} at {sparsity}: the {engine} model's first timed loss {a:.6f} is "
                                     f"{abs(a - r):.2e} from the float64 dense model's {r:.6f}, more than 3x the "
                                     f"float32 dense model's {b:.6f} ({abs(b - r):.2e})")
            torch.testing.assert_close(a, b, **tol, msg=lambda m, engine=engine, when=when: (
                f"{name} at {sparsity}: the {engine} model's {when} loss differs from the dense masked one's: {m}"))


def _float64_losses(name: str, sparsity: float, x: torch.Tensor, t: torch.Tensor) -> list:
    """The dense masked model's warm-up and first step losses in float64 (_check_losses' reference)."""
    step = _trainer(build(name, sparsity, "dense").to(x.device, torch.float64).train(), x.double(), t)
    return [step().cpu().double() for _ in range(2)]


def _own_peak(name: str, sparsity: float, engine: str, steps: int, batch: int = BATCH) -> float:
    g = torch.Generator().manual_seed(123)
    x, t = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    step = _trainer(build(name, sparsity, engine).train(), x, t)
    reset = True
    for i in range(steps + 1):
        if i == 1:
            reset = _reset_peak()  # after the warm-up step
        step()
    return _vm("VmHWM") / 2**20 if reset else float("nan")


def run(models, sparsities, steps: int, profile: bool = True, device="cpu", isolated_peaks: bool = False,
        save=None, batch: int = BATCH) -> list[dict]:
    """On a CUDA device the sparse layers run the Triton kernels, the dense ones cuDNN; steps are
    synchronised, peaks are the CUDA allocator's, and the CPU-time breakdown is skipped. save(rows)
    after each configuration (an interrupted run keeps what it measured)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    profile = profile and not cuda
    rows = []
    g = torch.Generator().manual_seed(123)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    t = torch.randint(0, 10, (batch,), generator=g).to(device)
    for name in models:
        for sp in sparsities:
            row = {"model": name, "sparsity": sp}
            steps_of = {}
            times, peaks = {e: [] for e in ENGINES}, {e: 0 for e in ENGINES}
            losses = {e: [] for e in ENGINES}  # (the warm-up's and the first timed step's: _check_losses)
            for engine in ENGINES:
                model = build(name, sp, engine).to(device).train()
                step = _trainer(model, x, t)
                losses[engine].append(step())  # warm-up (builds cached indices, buffers)
                steps_of[engine] = step
                row[f"{engine}_param_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
            # dense and sparse steps alternate, so a busy machine slows both alike
            before = cpu_snapshot()
            for _ in range(steps):
                for engine, step in steps_of.items():
                    if cuda:
                        torch.cuda.synchronize(device)
                        torch.cuda.reset_peak_memory_stats(device)
                    reset = cuda or _reset_peak()
                    t0 = time.perf_counter()
                    loss = step()
                    if cuda:
                        torch.cuda.synchronize(device)
                    times[engine].append((time.perf_counter() - t0) * 1e3)
                    if len(losses[engine]) < 2:
                        losses[engine].append(loss)
                    peak = torch.cuda.max_memory_allocated(device) if cuda else _vm("VmHWM")
                    # (None: unmeasured, printed "-", never the process's peak since start as a step's)
                    peaks[engine] = max(peaks[engine], peak) if reset and peaks[engine] is not None else None
            row["others_cores"] = others_cores(before, cpu_snapshot())  # (other processes' load: common.py)
            _check_losses(name, sp, losses, cuda, lambda: _float64_losses(name, sp, x, t))
            for engine, step in steps_of.items():
                row[f"{engine}_ms"] = statistics.median(times[engine])
                row[f"{engine}_peak_mb"] = None if peaks[engine] is None else peaks[engine] / 2**20
                if profile:
                    row[f"{engine}_breakdown_ms"] = _breakdown(step)
            del steps_of
            if isolated_peaks and not cuda:
                for engine in ENGINES:
                    row[f"{engine}_own_peak_mb"] = step_peak_mb(name, sp, engine, batch=batch)
                print("      peak RSS, one model per process: " +
                      " / ".join(f"{e} {_mb(row[f'{e}_own_peak_mb'])} MB" for e in ENGINES), flush=True)
            # the median of the per-round ratios (each round's steps ran in the same seconds of the machine)
            row["speedup"] = paired_ratio(times["dense"], times["sparse"])
            row["fused_speedup"] = paired_ratio(times["dense"], times["fused"])
            rows.append(row)
            if save is not None:
                save(rows)
            print(f"  {name:9s} {sp:.3f}: dense {row['dense_ms']:8.1f} ms  sparse {row['sparse_ms']:8.1f} ms "
                  f"x{row['speedup']:.2f}  fused {row['fused_ms']:8.1f} ms x{row['fused_speedup']:.2f}  " +
                  ("peak CUDA allocated " if cuda else "peak RSS ") +
                  " / ".join(_mb(row[f"{e}_peak_mb"]) for e in ENGINES) + " MB", flush=True)
            warn_if_busy(row["others_cores"], "the timed steps of the line above")
            if profile:
                for engine in ENGINES:
                    print(f"      {engine:6s} breakdown ms: {row[f'{engine}_breakdown_ms']}", flush=True)
    return rows


COLUMNS = [("model", "model", ""), ("sparsity", "sparsity", ".3f"), ("dense_ms", "dense ms", ".1f"),
           ("sparse_ms", "sparse ms", ".1f"), ("speedup", "speedup", ".2f"),
           ("fused_ms", "fused ms", ".1f"), ("fused_speedup", "fused speedup", ".2f"),
           ("dense_peak_mb", "dense peak MB", ".0f"), ("sparse_peak_mb", "sparse peak MB", ".0f"),
           ("fused_peak_mb", "fused peak MB", ".0f"), ("dense_own_peak_mb", "dense own peak MB", ".0f"),
           ("sparse_own_peak_mb", "sparse own peak MB", ".0f"),
           ("fused_own_peak_mb", "fused own peak MB", ".0f"),
           ("dense_param_mb", "dense params MB", ".1f"), ("sparse_param_mb", "sparse params MB", ".2f")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="ResNet-18 at 0.99, 2 timed steps")
    p.add_argument("--models", default=None, help=f"comma-separated from {list(MODELS)}")
    p.add_argument("--sparsities", default=None, help="comma-separated, default 0,0.9,0.99,0.999")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (median)")
    p.add_argument("--no-profile", action="store_true", help="skip the per-category time breakdown")
    p.add_argument("--isolated-peaks", action="store_true",
                   help="also measure each engine's peak memory in a process of its own")
    p.add_argument("--device", default="cpu",
                   help="cpu, or cuda[:N]: the same comparison on a GPU (sparse layers on the Triton kernels)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/train_step.json for the full CPU "
                   "table, measured with --isolated-peaks; _cuda for a GPU, _partial for --quick, a subset, --steps, --threads, "
                   "--no-profile or, on the CPU, without --isolated-peaks, so none "
                   "replaces it; written when "
                   "the run ends, OUT.inprogress.json after each configuration until then)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--batch", type=positive_int, default=BATCH,
                   help=f"batch size (default {BATCH}; 1 and 8: where per-call fixed costs show; _b<batch> is appended "
                   "to the default --out)")
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():  # (cuda:1 on one GPU)
        p.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0 ...)")
    if device.type == "cuda" and args.isolated_peaks:  # (the CUDA allocator's peak is reset per step already)
        p.error("--isolated-peaks is for the CPU (each engine's RSS peak in its own process); on a GPU every "
                "configuration's peak is the CUDA allocator's, measured in-process")
    refuse_empty(p, models=args.models, sparsities=args.sparsities)
    models = args.models.split(",") if args.models else (["resnet18"] if args.quick else list(MODELS))
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"--models {args.models}: unknown {unknown}; known: {', '.join(MODELS)}")
    sps = parse_sparsities(p, args.sparsities) if args.sparsities else \
        ([0.99] if args.quick else [0.0, 0.9, 0.99, 0.999])
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    steps = args.steps or (2 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    # (anything but the table's own settings writes _partial: a smoke run never replaces the table)
    # (the CPU table is measured with --isolated-peaks: a run without them lacks its *_own_peak_mb columns)
    partial = (args.quick or args.models or args.sparsities or args.steps is not None or args.no_profile or args.threads
               or (device.type == "cpu" and not args.isolated_peaks))
    stem = ("train_step" + ("" if args.batch == BATCH else f"_b{args.batch}") + ("_cuda" if device.type == "cuda" else "")
            + ("_partial" if partial else ""))
    out = writable_json(p, os.path.join(HERE, "results", stem + ".json") if args.out is None else args.out)
    progress = out.removesuffix(".json") + ".inprogress.json"  # (what a run stopped midway keeps)
    info = machine_info(args)
    print(f"# training step, batch {args.batch}, 32x32: {info['cpu']}, {info['threads']} threads, "
          f"torch {info['torch']}, commit {info['commit']}, {info['date']}")
    rows = run(models, sps, steps, profile=not args.no_profile, device=args.device,
               isolated_peaks=args.isolated_peaks, batch=args.batch,  # (each finished configuration written at once)
               save=lambda rows: write_json(progress, {"machine": info, "batch": args.batch, "device": args.device,
                                                       "train_step": rows}))
    write_json(out, {"machine": info, "batch": args.batch, "device": args.device, "train_step": rows})
    os.remove(progress)
    print_table(rows, COLUMNS)
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
