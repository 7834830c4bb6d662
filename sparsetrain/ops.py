"""Typed wrappers over `torch.ops.sparsetrain.*`: fake (meta) impls for torch.compile and the
autograd formula of each op, registered once here. Schemas live in csrc/sparsetrain.cpp, CPU
kernels in csrc/cpu/.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the extension: registers schemas and CPU kernels)

__all__ = ["sparse_linear", "sparse_conv2d", "magnitude_threshold", "csr_prune", "relu_count_"]

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


# ============================================================================ conv2d
# SparseConv2d: W [O, C, kh, kw] as CSR [O, C*kh*kw] (sparsetrain.formats.CSR of a 4-D weight).
# Kernels: csrc/cpu/sparse_conv2d.cpp (direct convolution, no im2col).
#   y = conv(x, W) + b ;  dx = conv_transpose(dy, W) ;  dW[o,c,i,j] = <dy[:, o], shift_ij(x[:, c])>
#   at the nonzeros only ;  db = sum of dy over (batch, height, width).
def _conv_out(size, k, s, p):
    return (size + 2 * p - k) // s + 1


@torch.library.register_fake("sparsetrain::sparse_conv2d")
def _(x, crow, col, values, ccol, row_t, perm, kernel_size, stride, padding, bias):
    torch._check(x.dim() == 4, lambda: "x must be 4-D [batch, channels, height, width]")
    kh, kw = kernel_size
    oh = _conv_out(x.shape[2], kh, stride[0], padding[0])
    ow = _conv_out(x.shape[3], kw, stride[1], padding[1])
    return x.new_empty((x.shape[0], crow.shape[0] - 1, oh, ow))


@torch.library.register_fake("sparsetrain::sparse_conv2d_grad_input")
def _(grad_out, ccol, row_t, perm, values, input_size, kernel_size, stride, padding):
    c = (ccol.shape[0] - 1) // (kernel_size[0] * kernel_size[1])
    return grad_out.new_empty((grad_out.shape[0], c, input_size[0], input_size[1]))


@torch.library.register_fake("sparsetrain::sparse_conv2d_grad_weight")
def _(grad_out, x, crow, col, kernel_size, stride, padding):
    return x.new_empty(col.shape)


@torch.library.register_fake("sparsetrain::sparse_conv2d_backward")
def _(grad_out, x, crow, col, values, ccol, row_t, perm, kernel_size, stride, padding):
    return x.new_empty(x.shape), x.new_empty(col.shape)


def _sparse_conv2d_setup(ctx, inputs, output):
    x, crow, col, values, ccol, row_t, perm, kernel_size, stride, padding, bias = inputs
    ctx.save_for_backward(x, crow, col, values, ccol, row_t, perm)
    ctx.conv = (list(kernel_size), list(stride), list(padding))
    ctx.has_bias = bias is not None


def _sparse_conv2d_backward(ctx, grad_out):
    x, crow, col, values, ccol, row_t, perm = ctx.saved_tensors
    k, s, p = ctx.conv
    grad_out = grad_out.contiguous()
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    dx = dvalues = dbias = None
    if need_x and need_w:  # one pass: dy is packed once for both products
        dx, dvalues = _ops.sparse_conv2d_backward(grad_out, x, crow, col, values, ccol, row_t, perm, k, s, p)
    elif need_x:
        dx = _ops.sparse_conv2d_grad_input(grad_out, ccol, row_t, perm, values, list(x.shape[2:]), k, s, p)
    elif need_w:
        dvalues = _ops.sparse_conv2d_grad_weight(grad_out, x, crow, col, k, s, p)
    if ctx.has_bias and ctx.needs_input_grad[10]:
        dbias = grad_out.sum((0, 2, 3))
    return dx, None, None, dvalues, None, None, None, None, None, None, dbias


torch.library.register_autograd("sparsetrain::sparse_conv2d", _sparse_conv2d_backward,
                                setup_context=_sparse_conv2d_setup)


def _pair(v, name: str):
    if isinstance(v, int) and not isinstance(v, bool):
        return [v, v]
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(a, int) and not isinstance(a, bool) for a in v):
        return [int(v[0]), int(v[1])]
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def conv2d_padding(padding, kernel_size, stride):
    """Resolve nn.Conv2d-style padding (int, pair, 'valid', 'same') to a symmetric [ph, pw]."""
    if padding == "valid":
        return [0, 0]
    if padding == "same":
        if list(stride) != [1, 1] or any(k % 2 == 0 for k in kernel_size):
            raise ValueError("padding='same' is supported for stride 1 and odd kernel sizes only, "
                             f"got kernel_size={tuple(kernel_size)}, stride={tuple(stride)}")
        return [(k - 1) // 2 for k in kernel_size]
    return _pair(padding, "padding")


def sparse_conv2d(x: torch.Tensor, weight, bias: torch.Tensor | None = None, stride=1, padding=0,
                  dilation=1, groups: int = 1) -> torch.Tensor:
    """F.conv2d(x, W, bias, stride, padding) for a CSR weight of shape [out, in, kh, kw].

    NCHW float32/float64 on CPU; zero padding; dilation 1 and groups 1 only (ValueError otherwise).
    """
    if len(weight.shape) != 4:
        raise ValueError(f"weight must be a 4-D CSR [out, in, kh, kw], got shape {weight.shape}")
    if _pair(dilation, "dilation") != [1, 1]:
        raise ValueError(f"sparse_conv2d supports dilation 1 only, got {dilation!r}")
    if groups != 1:
        raise ValueError(f"sparse_conv2d supports groups=1 only, got {groups!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [batch, channels, height, width], got shape {tuple(x.shape)}")
    if x.device != weight.values.device:
        raise ValueError(f"x is on {x.device} but the weight is on {weight.values.device}")
    k = list(weight.shape[2:])
    s = _pair(stride, "stride")
    p = conv2d_padding(padding, k, s)
    w = weight
    return _ops.sparse_conv2d(x, w.crow_indices, w.col_indices, w.values, w.ccol_indices,
                              w.row_indices_t, w.perm, k, s, p, bias)
