"""Typed wrappers over `torch.ops.sparsetrain.*`: fake (meta) impls for torch.compile and the
autograd formula of each op, registered once here. Schemas live in csrc/sparsetrain.cpp, CPU
kernels in csrc/cpu/.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the extension: registers schemas and CPU kernels)

__all__ = ["sparse_linear", "magnitude_threshold", "csr_prune", "relu_count_"]

_ops = torch.ops.sparsetrain


# ============================================================================ fake impls
@torch.library.register_fake("sparsetrain::sparse_linear")
def _(x, crow, col, values, bias):
    return x.new_empty((*x.shape[:-1], crow.shape[0] - 1))


@torch.library.register_fake("sparsetrain::sparse_linear_grad_input")
def _(grad_out, crow, col, values, in_features):
    return grad_out.new_empty((*grad_out.shape[:-1], in_features))


@torch.library.register_fake("sparsetrain::sparse_linear_grad_weight")
def _(grad_out, x, crow, col):
    return x.new_empty(col.shape)


@torch.library.register_fake("sparsetrain::magnitude_threshold")
def _(tensors, masks, fraction):
    return torch.empty((), dtype=torch.float64), torch.empty((), dtype=torch.int64)


@torch.library.register_fake("sparsetrain::csr_prune")
def _(crow, col, values, threshold, max_ties):
    nnz = torch.library.get_ctx().new_dynamic_size()
    return crow.new_empty(crow.shape), col.new_empty(nnz), values.new_empty(nnz), crow.new_empty(nnz)


@torch.library.register_fake("sparsetrain::relu_count_")
def _(counts, pre):
    return None


# ============================================================================ autograd
# d/dx (x W^T + b) = dy W ;  d/dW = dy^T x sampled at the nonzeros ;  d/db = sum of dy.
def _sparse_linear_setup(ctx, inputs, output):
    x, crow, col, values, bias = inputs
    ctx.save_for_backward(x, crow, col, values)
    ctx.has_bias = bias is not None


def _sparse_linear_backward(ctx, grad_out):
    x, crow, col, values = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    dx = dvalues = dbias = None
    if ctx.needs_input_grad[0]:
        dx = _ops.sparse_linear_grad_input(grad_out, crow, col, values, x.shape[-1])
    if ctx.needs_input_grad[3]:
        dvalues = _ops.sparse_linear_grad_weight(grad_out, x, crow, col)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        dbias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return dx, None, None, dvalues, dbias


torch.library.register_autograd("sparsetrain::sparse_linear", _sparse_linear_backward,
                                setup_context=_sparse_linear_setup)


# ============================================================================ wrappers
def sparse_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b for a CSR weight `weight` (sparsetrain.formats.CSR) of shape [out, in]."""
    return _ops.sparse_linear(x, weight.crow_indices, weight.col_indices, weight.values, bias)


def magnitude_threshold(tensors, fraction: float, masks=None):
    """Exact global magnitude selection. Among the surviving entries (mask True, or all entries
    when the mask is None) sorted by (|w|, list position, flat index), the first
    k = floor(fraction * n_surviving) are to be pruned: all |w| < threshold and the first `ties`
    entries with |w| == threshold. Returns (threshold: float, ties: int)."""
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool):
        raise TypeError(f"fraction must be a float, got {type(fraction).__name__}")
    tensors = list(tensors)
    masks = [None] * len(tensors) if masks is None else list(masks)
    if len(masks) != len(tensors):
        raise ValueError(f"masks must have one entry per tensor ({len(tensors)}), got {len(masks)}")
    if not tensors:  # nothing to dispatch on: nothing to prune
        return 0.0, 0
    thr, ties = _ops.magnitude_threshold([t.detach() for t in tensors], masks, float(fraction))
    return float(thr), int(ties)


def csr_prune(crow, col, values, threshold: float, max_ties: int = 0):
    """Drop CSR entries with |v| < threshold and the first `max_ties` with |v| == threshold.
    Returns (crow, col, values, keep) where keep indexes the kept entries of the old values."""
    return _ops.csr_prune(crow, col, values.detach(), float(threshold), int(max_ties))


def relu_count_(counts: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """counts[n] += number of samples b with pre[b, n] > 0 (n over the flattened non-batch dims)."""
    _ops.relu_count_(counts, pre.detach())
    return counts


# ============================================================================ backend hook
# Triton kernels for CUDA tensors, and `sparsetrain.use_backend(...)`: see sparsetrain/backend.py.
# Every `_ops.<name>` call above resolves through `backend.impl(name)` (the torch.ops op unless
# the backend is forced to "triton"), so the autograd formulas stay one per op.
from . import backend  # noqa: E402

_ops = backend.OpsRouter()
