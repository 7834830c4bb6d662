"""Which kernels run a sparsetrain op: the backend mode (`use_backend`), and nothing else.

One op, one schema (csrc/sparsetrain.cpp), one autograd formula (sparsetrain/engine/ops.py's
table); only the device kernels differ:

* "auto" (default): the dispatcher decides by device: CPU tensors run the C++ kernels, CUDA
  tensors the Triton kernels (registered as each op's CUDA kernel by engine/ops.py).
* "triton": Triton for every tensor; CPU tensors run Triton's interpreter (TRITON_INTERPRET=1),
  which is how the Triton kernels are tested without a GPU.
* "cpu": the C++ engine only; CUDA tensors raise.

`use_backend(mode)` sets the mode process-wide (a plain call) and, used as a context manager,
restores the previous mode on exit. The mode is global rather than thread-local because autograd
runs CUDA backward passes on its own threads. This module imports nothing of the engine: ops.py
reads the mode.
"""
from __future__ import annotations

__all__ = ["use_backend", "current_backend", "MODES"]

MODES = ("auto", "cpu", "triton")
_mode = "auto"


class use_backend:
    """Force the kernels: `use_backend("triton")` (process-wide) or `with use_backend("cpu"): ...`
    (restored on exit). Modes: "auto", "cpu", "triton"."""

    def __init__(self, mode: str):
        global _mode
        if mode not in MODES:
            raise ValueError(f"backend must be one of {MODES}, got {mode!r}")
        self.mode, self._prev = mode, _mode
        _mode = mode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _mode
        _mode = self._prev
        return False

    def __repr__(self):
        return f"use_backend({self.mode!r})"


def current_backend() -> str:
    """The kernels' mode now: "auto", "cpu" or "triton" (see use_backend)."""
    return _mode


def cpu_engine(x) -> bool:
    """The C++ kernels take tensor x (a CPU tensor, not under "triton"): only they pool in a fused
    BN's pass (max_pool2x2 has no Triton kernel)."""
    return x.device.type == "cpu" and _mode != "triton"
