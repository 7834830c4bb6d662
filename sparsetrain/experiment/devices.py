"""Where a run computes: --device (auto | cpu | cuda | cuda:N) and --amp (its autocast dtype there); what
config.json records of it (the git commit, versions) and what a resume changed."""
from __future__ import annotations

import os
import re
import subprocess

__all__ = ["AMPS", "check_spelling", "resolve_device", "resolve_amp", "describe_device", "changed_since",
           "version_line", "git_commit", "threads_for"]


AMPS = ("auto", "bf16", "fp16", "off")  # (--amp's choices)


def _check_device(spec) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", spec if isinstance(spec, str) else ""):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")


def check_spelling(spec: str, amp: str) -> None:
    """--device and --amp for a run on another machine (a sweep's runs, --print-config), where whether they can run
    is that machine's business: ValueError for either spelt wrong, and for --amp bf16/fp16 on the CPU (nowhere)."""
    _check_device(spec)
    if amp not in AMPS:
        raise ValueError(f"--amp must be one of {', '.join(AMPS)}, got {amp!r}")
    if spec == "cpu":
        import torch
        resolve_amp(amp, torch.device("cpu"))  # (bf16/fp16 run on no CPU: its error)


def resolve_device(spec: str):
    """--device as a torch.device: auto -> cuda when available, else cpu. ValueError for a device
    this machine does not have."""
    import torch
    _check_device(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {spec}: no CUDA device is available here; use --device cpu or auto")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {spec}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return dev


def resolve_amp(spec: str, device):
    """--amp as the autocast dtype (None: off) on `device`; ValueError where it cannot run."""
    import torch
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if spec == "off":
        return None
    if device.type != "cuda":
        raise ValueError(f"--amp {spec} needs a CUDA device (the CPU kernels compute in fp32); use --amp off or auto")
    if spec == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("--amp bf16: this GPU has no bfloat16 support; use --amp fp16")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[spec]


def describe_device(device, amp_spec: str) -> str:
    """What --device (or the torch.device a process computes on) and --amp resolve to here, for a run's
    config.json (`auto` alone does not say whether a run trained on a GPU in bf16 or on the CPU in
    fp32): e.g. "cpu, fp32" or "cuda:0 NVIDIA H100 80GB HBM3, bf16 autocast"."""
    import torch
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    amp = resolve_amp(amp_spec, dev)
    where = "cpu"
    if dev.type == "cuda":  # (torchrun: each rank's set_device already made its GPU the current one)
        index = torch.cuda.current_device() if dev.index is None else dev.index
        where = f"cuda:{index} {torch.cuda.get_device_name(index)}"
    precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[amp]
    return f"{where}, {precision}"


def changed_since(before: dict, now: dict) -> list[str]:
    """What a run records of where it computes (config.json's git_commit, versions, torch_threads, world_size,
    ran_on) that differs in `now` from `before`, each as "name now (was then)", versions one by one; a record
    `before` lacks is no difference, nor one it holds as "unknown" (what a resume writes for a record its run
    lacked; a git_commit "unknown", an installed package's, is one)."""
    out = []
    for k, v in now.items():
        was = before.get(k, v)
        was = v if was == "unknown" and k != "git_commit" else was
        if isinstance(v, dict) and isinstance(was, dict):
            out += [f"{n} {v[n]} (was {was[n]})" for n in v if was.get(n, v[n]) != v[n]]
        elif was != v:
            out.append(f"{k} {v} (was {was})")
    return out


def version_line() -> str:
    """What the CLIs' --version print: sparsetrain's version and the libraries' a run records in
    config.json (torchvision's from its metadata: not imported for this)."""
    import importlib.metadata
    import sys

    import torch

    from .. import __version__
    try:
        tv = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        tv = "not installed"
    return f"sparsetrain {__version__} (torch {torch.__version__}, torchvision {tv}, Python {sys.version.split()[0]})"


GIT_TIMEOUT_S = 30  # a git blocked on a lock or a hung network filesystem: "unknown", not a hung run


def git_commit(short: bool = False) -> str:
    """The commit of the sparsetrain checkout this code runs from, `<commit>-dirty` when its tracked
    files hold uncommitted changes (as `git describe --dirty`: the commit alone does not name the code
    that ran); "unknown" outside git, and for an installed package (a virtualenv inside another
    project's repository would give that one's)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        top, head = subprocess.check_output(["git", "rev-parse", "--show-toplevel", *(["--short"] if short else []),
                                             "HEAD"], cwd=package, stderr=subprocess.DEVNULL, text=True,
                                            timeout=GIT_TIMEOUT_S).splitlines()
        if os.path.realpath(top) != os.path.realpath(os.path.dirname(package)):
            return "unknown"
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"], cwd=top,
                                        stderr=subprocess.DEVNULL, text=True, timeout=GIT_TIMEOUT_S).strip()
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def threads_for(cfg) -> int:
    """--threads, or this run's CPU share: OMP_NUM_THREADS when set (Ray sets it to a task's CPUs),
    else the CPUs this process may run on (taskset, cgroup cpusets), not every core of the machine."""
    if cfg.threads:
        return cfg.threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
