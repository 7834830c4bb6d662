"""Benchmark helpers: interleaved timing after warm-up, other processes' load while timing, machine/version
info, atomic JSON output."""
from __future__ import annotations

import argparse
import glob
import os
import platform
import statistics
import time

import torch

from sparsetrain.experiment.devices import git_commit
from sparsetrain.experiment.files import write_json  # noqa: F401  (for the bench scripts)

HERE = os.path.dirname(os.path.abspath(__file__))


def median_ms(fn, *, warmup: int = 2, reps: int = 7, max_seconds: float = 20.0) -> float:
    """Median wall time of fn() in ms, after `warmup` calls; stops early past max_seconds."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > max_seconds and len(times) >= 3:
            break
    return statistics.median(times)


def interleaved_times(fns: dict, *, warmup: int = 2, reps: int = 7, max_seconds: float = 60.0,
                      warm: bool = False) -> dict:
    """Wall times in ms of each fn in `fns` (name -> callable), one per round, the calls interleaved
    round by round (a, b, c, a, b, c, ...), so a slow minute on a shared machine slows every side
    alike. Cold (default): each timed call starts with the caches the previous side left. warm=True:
    each timed call follows an untimed call of the same side (its inputs and buffers in cache, as
    when a layer's input was just produced in a training step). Stops early past max_seconds
    (with >= 3 rounds: a row's `rounds`, rounds_of(times), says how many ran). Returns name -> list
    of per-round times (all lists the same length)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = Times({name: [] for name in fns})
    start, before = time.perf_counter(), cpu_snapshot()
    for rnd in range(1, reps + 1):
        for name, fn in fns.items():
            if warm:
                fn()
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > max_seconds and rnd >= 3:
            break
    times.others_cores = others_cores(before, cpu_snapshot())
    warn_if_busy(times.others_cores, "the rounds of the line below")
    return times


class Times(dict):
    """interleaved_times' name -> per-round times, with `others_cores` (others_cores over the timed rounds)."""
    others_cores: float | None = None


# ---------------------------------------------------------------- other processes on the machine
# A benchmark shares the machine with whatever else runs: on these 2-core machines one other busy
# process halves a run's speed, and with libgomp's spinning barriers a 2-thread step at batch 1 ran
# 40-100x slower (2026-12-07). Each timed section records how many cores other processes kept busy.
BUSY_CORES = 0.25  # above this, a section's times are flagged (a tenth of a 2-core machine, and some)


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall seconds, the machine's busy CPU-seconds from /proc/stat, this process's CPU-seconds with
    its reaped children's), or None where /proc/stat cannot be read (not Linux): others_cores' operands."""
    try:
        with open("/proc/stat") as f:  # cpu  user nice system idle iowait irq softirq steal ... (in ticks)
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    t = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


MIN_SECONDS = 1.0  # both CPU counts tick at 1/SC_CLK_TCK s (10 ms): over a shorter interval, noise


def others_cores(before, after) -> float | None:
    """Cores other processes kept busy between two cpu_snapshot()s, on average: the machine's busy
    CPU-seconds less this process's, per wall second (>= 0, to 0.01); None without both snapshots or
    over less than MIN_SECONDS (a quick case: too short to tell)."""
    if before is None or after is None or after[0] - before[0] < MIN_SECONDS:
        return None
    return round(max(0.0, (after[1] - before[1] - (after[2] - before[2])) / (after[0] - before[0])), 2)


def warn_if_busy(cores: float | None, what: str) -> None:
    """A line on stdout where other processes kept more than BUSY_CORES cores busy during `what`."""
    if cores is not None and cores > BUSY_CORES:
        print(f"  warning: other processes kept {cores:.2f} cores busy during {what}: those times are not this "
              f"machine's alone (rerun on a quiet machine)", flush=True)


def rounds_of(times: dict) -> int:
    """How many rounds interleaved_times ran (reps, or fewer where max_seconds cut it short)."""
    return len(next(iter(times.values()), []))


def timing_of(times: Times) -> dict:
    """What a row records of how interleaved_times timed it: its `rounds` (rounds_of) and `others_cores`."""
    return {"rounds": rounds_of(times), "others_cores": times.others_cores}


def leaf_per_side(x: torch.Tensor, names) -> dict:
    """name -> its own leaf copy of x (requires_grad). Each side's step starts with `x.grad = None`:
    on a shared x that frees the gradient the *other* side's previous step allocated, charging that
    allocator's cost to the wrong side (on the AVX2 EPYC, freeing the dense side's malloc'd 8 MB dx
    took ~1.6 ms in one process state and next to nothing in another; a pooled one ~0.02 ms). With
    one leaf per side every step frees only what its own previous step left, as in a training loop."""
    return {name: x.detach().clone().requires_grad_() for name in names}


def interleaved_median_ms(fns: dict, **kw) -> dict:
    """Median of interleaved_times per side."""
    return {name: statistics.median(t) for name, t in interleaved_times(fns, **kw).items()}


def paired_ratio(num: list, den: list) -> float:
    """Median over rounds of num[r] / den[r]: both sides' times of one round come from the same
    seconds of the machine, so a slow phase that hits one round cancels out of its ratio (the ratio
    of the two medians can pair a fast round of one side with a slow round of the other)."""
    return statistics.median(a / b for a, b in zip(num, den))


def positive_int(text: str) -> int:
    """argparse type: an int in [1, 2^31) (steps, threads: torch takes a C int)."""
    v = int(text)
    if not 1 <= v < 2**31:
        raise argparse.ArgumentTypeError(f"must be in [1, 2^31), got {v}")
    return v


def nonnegative_int(text: str) -> int:
    """argparse type: an int in [0, 2^31)."""
    v = int(text)
    if not 0 <= v < 2**31:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^31), got {v}")
    return v


def writable_json(parser, path: str) -> str:
    """--out: a JSON file path (not empty, not a folder, not a device such as /dev/null) whose folder exists or can be made and
    takes a file, checked before any timing (parser.error otherwise)."""
    if not path:
        parser.error("--out is empty: give a JSON file path (or leave the flag out for the default)")
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        parser.error(f"--out {path}: is a folder; give a JSON file path")
    if os.path.exists(path) and not os.path.isfile(path):  # (the atomic rename would replace /dev/null itself)
        parser.error(f"--out {path}: is not a regular file (a device, pipe or socket); give a JSON file path")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        parser.error(f"--out {path}: cannot write there ({e.strerror or e})")
    return path


def refuse_empty(parser, **flags) -> None:
    """parser.error for a flag given as "" or blanks (`--sparsities ''`, `--only ''`): an empty value is a
    mistake, not "the default" (the keyword is the flag's name: sparsities="" -> --sparsities)."""
    for name, value in flags.items():
        if value is not None and not value.strip():
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} is empty: give a value, or leave the flag out for the default")


def parse_sparsities(parser, text: str) -> list[float]:
    """--sparsities "0,0.9,0.99": each a fraction in [0, 1] (parser.error otherwise)."""
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        parser.error(f"--sparsities {text}: expected comma-separated numbers in [0, 1]")
    bad = [v for v in vals if not 0.0 <= v <= 1.0]
    if bad:
        parser.error(f"--sparsities {text}: each must be in [0, 1], got {bad}")
    return vals


def _cpu_details() -> dict:
    """What tells these VMs' CPUs apart (their model name is often just "AMD EPYC"): family, model,
    stepping, the ISA extensions the kernels care about, cache sizes, the CPUs this process may use."""
    out: dict = {"cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = (p.strip() for p in line.partition(":"))
                if key == "model name":
                    out["cpu"] = val
                elif key in ("cpu family", "model", "stepping"):
                    out[key.replace(" ", "_")] = val
                elif key == "flags":
                    out["isa"] = sorted(set(val.split()) & {"avx2", "avx512f", "avx512_bf16", "amx_tile", "fma"})
                    break
    except OSError:
        pass
    caches = {}
    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            level, kind, size = (open(os.path.join(d, n)).read().strip() for n in ("level", "type", "size"))
        except OSError:
            continue
        caches[f"L{level}{'d' if kind == 'Data' else 'i' if kind == 'Instruction' else ''}"] = size
    out["caches"] = caches
    out["usable_cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return out


def _extension_build() -> dict | None:
    """The `_C` extension the run loaded: its file, build time, and whether a csrc/ source is newer
    (the commit above names the Python tree; a stale build would time older kernels)."""
    import importlib.util
    spec = importlib.util.find_spec("sparsetrain._C")
    if spec is None or not spec.origin:
        return None
    built = os.path.getmtime(spec.origin)
    sources = glob.glob(os.path.join(HERE, "..", "csrc", "**", "*.*"), recursive=True)
    return {"file": os.path.basename(spec.origin),
            "built": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(built)),
            "older_than_sources": any(os.path.getmtime(f) > built for f in sources)}


def machine_info(args: argparse.Namespace | None = None) -> dict:
    """What a result ran on and with: CPU, versions, commit, the extension's build and, given the
    script's parsed `args`, its settings (quick, reps, steps ...)."""
    try:  # the register width our CPU kernels run with (64 AVX-512, 32 AVX2, 16 baseline)
        from sparsetrain.engine.ops import simd_bytes
        simd = simd_bytes()
    except Exception:  # the extension is not built
        simd = None
    info = {**_cpu_details(), "simd_bytes": simd, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "commit": git_commit(short=True),  # (`-dirty` with uncommitted changes: an A/B of a local edit)
            "date": time.strftime("%Y-%m-%d"), "extension": _extension_build()}
    if args is not None:
        info["settings"] = {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
                            for k, v in vars(args).items()}
    if torch.cuda.is_available():  # (what a GPU table ran on)
        try:
            import triton
            version = triton.__version__
        except ImportError:
            version = None
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, triton=version)
    return info


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec). Missing values print as '-'."""
    heads = [h for _, h, _ in columns]
    cells = [[("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    print("  ".join(h.rjust(w) for h, w in zip(heads, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def check_against_dense(layer, x, gy, ref_fn, weight, mask, bias=None, **kw) -> None:
    """One untimed forward + backward of the sparse `layer` against the dense masked reference
    (sparsetrain.testing's, as the tests): output, dx, dW at the nonzeros, db. A wrong kernel stops
    the benchmark instead of being reported with a speedup. fp32 tolerances: sums in another order,
    atol also 1e-4 of the largest reference value: a conv's dW sums batch * OH * OW products (131072
    at ResNet-18's layer1, batch 128: ~1e-5 of its largest value apart, over the fixed 1e-3)."""
    from sparsetrain.testing import reference_grads
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(gy)
    ry, rdx, rdw, rdb = reference_grads(ref_fn, x, weight, mask, bias, gy, **kw)
    got = [y, x.grad, layer.weight.values.grad] + ([layer.bias.grad] if bias is not None else [])
    for what, a, b in zip(("output", "dx", "dW", "db"), got, (ry, rdx, rdw[mask], rdb)):
        scale = float(b.abs().max()) if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3 + 1e-4 * scale,
                                   msg=lambda m, what=what: f"{type(layer).__name__} {what} differs "
                                                            f"from the dense masked reference: {m}")
    layer.zero_grad(set_to_none=True)
