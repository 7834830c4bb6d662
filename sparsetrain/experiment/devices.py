"""Where a run computes: --device (auto | cpu | cuda | cuda:N) and --amp (its autocast dtype there)."""
from __future__ import annotations

import re

__all__ = ["resolve_device", "resolve_amp"]


def resolve_device(spec: str):
    """--device as a torch.device: auto -> cuda when available, else cpu. ValueError for a device
    this machine does not have."""
    import torch
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", spec or ""):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
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
