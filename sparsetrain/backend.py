"""Which kernels run a sparsetrain op: the C++ engine (CPU) or Triton (`sparsetrain.kernels`).

Design: one op, one schema (csrc/sparsetrain.cpp), one autograd formula (sparsetrain/ops.py);
only the device kernels differ.

* CUDA tensors: every op that has a Triton kernel gets it registered for the CUDA dispatch key
  here (`torch.library.register_kernel(..., "cuda", fn)`), so `torch.ops.sparsetrain.*` and the
  autograd formula registered in ops.py run Triton on a GPU with no Python-side branching.
  Kernel modules import lazily, on the first CUDA call: importing sparsetrain never needs triton.
* CPU tensors: the dispatcher picks the C++ kernels. `use_backend("triton")` reroutes them to the
  Triton kernels (which run on CPU tensors through Triton's interpreter, TRITON_INTERPRET=1; that
  is how the kernels are tested without a GPU). ops.py obtains every forward and gradient product
  through `impl(name)` (ops.py's `_ops` is an `OpsRouter`: `_ops.<name>` is `impl(name)`): the
  `torch.ops` op normally; under "triton" a function that sends CPU tensors to the Triton kernel.
  A forward op then goes through a generic `torch.autograd.Function` built from the *same*
  setup/backward functions ops.py registers for the op (`_<op>_setup` / `_<op>_backward`); its
  backward re-enters "triton", so the gradients run Triton even when `.backward()` is called
  after the `with` block. (sparsetrain.bsr has no C++ engine: it asks `current_backend()`.)

Modes: "auto" (default: CPU -> C++, CUDA -> Triton), "triton" (Triton for every tensor), "cpu"
(the C++ engine only; CUDA tensors raise). `use_backend(mode)` sets the mode process-wide (a
plain call) and, used as a context manager, restores the previous mode on exit. The mode is
global rather than thread-local because autograd runs CUDA backward passes on its own threads.
"""
from __future__ import annotations

import functools
import importlib

import torch

from . import _C  # noqa: F401  (the op schemas must exist before CUDA kernels are registered)

__all__ = ["use_backend", "current_backend", "impl", "triton_kernel", "OpsRouter", "MODES"]

MODES = ("auto", "cpu", "triton")
_mode = "auto"

# op name -> (module under sparsetrain.kernels, function); signatures follow the op schemas.
_KERNELS = {
    "sparse_linear": ("sparse_linear", "sparse_linear"),
    "sparse_linear_grad_input": ("sparse_linear", "sparse_linear_grad_input"),
    "sparse_linear_grad_weight": ("sparse_linear", "sparse_linear_grad_weight"),
    "sparse_conv2d": ("sparse_conv2d", "sparse_conv2d"),
    "sparse_conv2d_grad_input": ("sparse_conv2d", "sparse_conv2d_grad_input"),
    "sparse_conv2d_grad_weight": ("sparse_conv2d", "sparse_conv2d_grad_weight"),
    "sparse_conv2d_backward": ("sparse_conv2d", "sparse_conv2d_backward"),
}
# ops whose autograd formula lives in ops.py as _<op>_setup / _<op>_backward
_FORWARD_OPS = ("sparse_linear", "sparse_conv2d")


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
    return _mode


def triton_kernel(name: str):
    """The Triton implementation of op `name` (imports sparsetrain.kernels.<module> on first use)."""
    if name not in _KERNELS:
        raise KeyError(f"no Triton kernel for sparsetrain::{name}; known: {sorted(_KERNELS)}")
    module, fn = _KERNELS[name]
    try:
        mod = importlib.import_module(f"sparsetrain.kernels.{module}")
    except ImportError as e:
        raise RuntimeError(f"the Triton backend for sparsetrain::{name} needs triton ({e})") from e
    return getattr(mod, fn)


def impl(name: str):
    """The callable ops.py uses for op `name`: the torch.ops op, or under "triton" (for ops that
    have a Triton kernel) the router that sends CPU tensors to the Triton kernel; CUDA tensors
    keep the registered op, whose CUDA kernel is the Triton one."""
    op = getattr(torch.ops.sparsetrain, name)
    return _forced(name) if _mode == "triton" and name in _KERNELS else op


class OpsRouter:
    """Stands in for `torch.ops.sparsetrain` inside ops.py: `router.<name>` is `impl(name)`."""

    def __getattr__(self, name: str):
        return impl(name)


@functools.lru_cache(maxsize=None)
def _forced(name: str):
    op = getattr(torch.ops.sparsetrain, name)

    def run(*args):
        if any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
            return op(*args)  # the CUDA kernel registered below is Triton already
        if name in _FORWARD_OPS:
            return _autograd_function(name).apply(*args)
        return triton_kernel(name)(*args)

    run.__name__ = f"triton_{name}"
    return run


@functools.lru_cache(maxsize=None)
def _autograd_function(name: str):
    """torch.autograd.Function running the Triton forward of `name` with the autograd formula
    registered for the op in ops.py (same setup_context and backward functions)."""
    from . import ops
    try:
        setup, backward = getattr(ops, f"_{name}_setup"), getattr(ops, f"_{name}_backward")
    except AttributeError as e:
        raise RuntimeError(f"ops.py must define _{name}_setup and _{name}_backward (the autograd "
                           f"formula registered for sparsetrain::{name})") from e

    def forward(*args):
        return triton_kernel(name)(*args)

    def setup_context(ctx, inputs, output):
        setup(ctx, inputs, output)

    def backward_(ctx, *grads):
        with use_backend("triton"):
            return backward(ctx, *grads)

    return type(f"Triton_{name}", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward_)})


# ============================================================================ CUDA registration
def _cuda_kernel(name: str):
    def run(*args):
        if _mode == "cpu":
            raise RuntimeError(f"sparsetrain::{name}: backend 'cpu' (the C++ engine) cannot take CUDA "
                               "tensors; use_backend('auto') or 'triton' runs the Triton kernels")
        return triton_kernel(name)(*args)
    run.__name__ = f"cuda_{name}"
    return run


def _register_cuda_kernels():
    for name in _KERNELS:
        if hasattr(torch.ops.sparsetrain, name):  # ops of an older build may be missing
            torch.library.register_kernel(f"sparsetrain::{name}", "cuda", _cuda_kernel(name))


_register_cuda_kernels()
