"""Block-sparse weights (BSR): the structure to choose when the GPU should use tensor cores.

`BSR` stores a weight viewed as a matrix [rows, cols] (linear: [out, in]; conv: [out, in*kh*kw])
as BS x BS blocks (BS in 16/32/64). The block is the unit of sparsity: every entry of a stored
block is trained, a pruned block is absent. Edge blocks are zero-padded when rows or cols are not
multiples of BS; the padding never reaches an output and its gradient is exactly zero.
Block masks come from the block pruning rule (`sparsetrain.prune.block_mask`, `--structure
block`); `BSRLinear` trains a layer with one.

Products: Triton (`sparsetrain.kernels.bsr_matmul`, `tl.dot` per block) on CUDA tensors, or on
CPU tensors under `use_backend("triton")` with TRITON_INTERPRET=1; otherwise (no C++ BSR engine)
the dense masked product, which is exact and differentiable in the block values.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .backend import current_backend
from .args import bias_parameter, check_bias, check_weight, refuse_fx_proxy
from .autograd import NO_FORWARD_MODE, eager, first_order, refuse_func_transforms
from .formats import WeightLike, _check_mask, _fill_dense, _resize_pattern, own_mode, transpose_index
from .index import check_index, seal_index, still_unset
from .pattern import _pattern
from .torch_prune import bias_writer, check_own_bias, current_param
from .optim_state import watch_state

__all__ = ["BSR", "BSRLinear", "bsr_linear", "BLOCK_SIZES", "check_block", "as_matrix", "blocks_view"]

BLOCK_SIZES = (16, 32, 64)


def check_block(block, name: str = "block") -> int:
    """`block` as a Python int if it is one of BLOCK_SIZES (numpy ints too: np.int64(16) was refused as
    not one of them); TypeError for a non-int (a str, a float, a bool), ValueError for another int.
    `name`: the argument's name in the caller's signature (BSR's is block_size)."""
    if isinstance(block, bool) or not isinstance(block, numbers.Integral):  # (ValueError before 2026-12-06)
        raise TypeError(f"{name} must be an int, one of {BLOCK_SIZES}, got {block!r} ({type(block).__name__})")
    if block not in BLOCK_SIZES:
        raise ValueError(f"{name} must be one of {BLOCK_SIZES}, got {block!r}")
    return int(block)


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """`weight` ([out, ...]) viewed as the matrix [out, prod(...)] the formats store."""
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise ValueError("weight must be a tensor with at least 2 dims ([out, ...])")
    return weight.reshape(weight.shape[0], math.prod(weight.shape[1:]))  # (-1 fails on 0 elements)


def blocks_view(m: torch.Tensor, bs: int) -> torch.Tensor:
    """[rows, cols] -> zero-padded [RB, CB, bs, bs] view of the blocks."""
    rows, cols = m.shape
    RB, CB = -(-rows // bs), -(-cols // bs)
    p = m.new_zeros((RB * bs, CB * bs))
    p[:rows, :cols] = m
    return p.reshape(RB, bs, CB, bs).transpose(1, 2)


class BSR(WeightLike, nn.Module):
    """Block-sparse weight of logical shape `shape`, blocks `block_size` x `block_size`.

    Buffers: crow_indices (int64 [RB+1]), col_indices (int32 [nnzb]) and the transposed block
    index (ccol_indices, row_indices_t, perm) built once per mask. Parameter: values
    [nnzb, BS, BS]. `from_dense(w, block)` and `to_dense()` round-trip exactly.
    """

    def __init__(self, crow_indices, col_indices, values, shape, block_size: int):
        super().__init__()
        self.block_size = check_block(block_size, "block_size")
        self.shape, crow, col = _pattern(crow_indices, col_indices, values, shape, self.block_size)
        self.register_buffer("crow_indices", crow)
        self.register_buffer("col_indices", col)
        self.values = nn.Parameter(values.detach().contiguous().clone(),  # (trainable unless a frozen Parameter, as CSR's)
                                   requires_grad=values.requires_grad or not isinstance(values, nn.Parameter))
        self._build_index()
        watch_state()  # (optimizer state that does not fit: refused by name)

    def _build_index(self) -> None:
        """The transposed block index (not saved: rebuilt from the pattern, as CSR's)."""
        CB = -(-math.prod(self.shape[1:]) // self.block_size)
        for name, t in zip(("ccol_indices", "row_indices_t", "perm"), transpose_index(self.crow_indices,
                                                                                       self.col_indices, CB)):
            self.register_buffer(name, t, persistent=False)
        self._index_of = (self.crow_indices, self.col_indices, self.ccol_indices)  # (the pattern: transposed())
        seal_index(self)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("ccol_indices", "row_indices_t", "perm"):  # (saved by versions that kept them)
            state_dict.pop(prefix + name, None)
        with own_mode(self.values):
            if not _resize_pattern(self, state_dict, prefix, local_metadata, error_msgs, "BSR"):
                return
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            if not still_unset(self, state_dict, prefix):
                self._build_index()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, block_size: int, mask: torch.Tensor | None = None) -> "BSR":
        """Keep the blocks where `mask` (default: weight != 0) has any True entry. An explicit mask
        must be block-structured (see `block_mask`): a block is kept whole or pruned whole."""
        bs = check_block(block_size, "block_size")
        check_weight(weight)  # (as CSR.from_dense: a list was an AttributeError)
        w = as_matrix(weight.detach())
        m = as_matrix(_check_mask(weight, mask))  # (CSR's checks: a float mask is a TypeError, as a list is)
        mb = blocks_view(m.to(torch.int32), bs).sum((2, 3))  # True entries per block
        if mask is not None:
            inside = blocks_view(torch.ones_like(m, dtype=torch.int32), bs).sum((2, 3))
            if bool(((mb != 0) & (mb != inside)).any()):
                raise ValueError("mask is not block-structured for block_size "
                                 f"{bs}: build it with sparsetrain.prune.block_mask")
        keep = mb > 0
        crow = torch.zeros(keep.shape[0] + 1, dtype=torch.int64, device=w.device)
        torch.cumsum(keep.sum(1), 0, out=crow[1:])
        idx = keep.nonzero()
        values = blocks_view(w * m, bs)[idx[:, 0], idx[:, 1]]
        trainable = weight.requires_grad if isinstance(weight, nn.Parameter) else True  # (as CSR.from_dense)
        out = cls(crow, idx[:, 1].to(torch.int32), values, weight.shape, bs)
        out.values.requires_grad_(trainable)
        return out

    def to_dense(self) -> torch.Tensor:
        """Dense weight of `self.shape` (zeros outside the stored blocks); differentiable in values."""
        check_index(self)  # (as CSR's)
        return self._scatter(self.values)

    def mask(self) -> torch.Tensor:
        """Element mask of `self.shape`: True inside the stored blocks (its index checked, as CSR's: an index changed in
        place or left by to_empty() gave a wrong mask, nnz and sparsity, or torch's size error, before 2026-12-08)."""
        check_index(self)
        with torch.no_grad():
            return self._scatter(torch.ones_like(self.values, dtype=torch.bool))

    def _scatter(self, blocks: torch.Tensor) -> torch.Tensor:
        self._swapped_checked()  # (a pattern swapped in: checked, as CSR's to_dense and mask)
        bs, cols = self.block_size, math.prod(self.shape[1:])
        RB, CB = self.crow_indices.numel() - 1, -(-cols // bs)
        brow = torch.repeat_interleave(torch.arange(RB, device=blocks.device), self.crow_indices.diff(),
                                       output_size=self.col_indices.numel())  # (known: on meta too, as CSR's)
        grid = blocks.new_zeros((RB * CB, bs, bs)).index_put((brow * CB + self.col_indices.long(),), blocks)
        dense = grid.reshape(RB, CB, bs, bs).transpose(1, 2).reshape(RB * bs, CB * bs)
        return dense[:self.shape[0], :cols].reshape(self.shape)

    @property
    def nnz_blocks(self) -> int:
        """Stored (surviving) blocks."""
        return self.col_indices.numel()

    @property
    def nnz(self) -> int:
        """Stored entries inside the logical shape (padding excluded)."""
        return int(self.mask().sum())

    @property
    def sparsity(self) -> float:
        """Fraction of the dense weight's entries pruned (a stored block's zero padding not counted as kept)."""
        n = math.prod(self.shape)
        return 1.0 - self.nnz / n if n else 0.0

    def extra_repr(self) -> str:
        return f"shape={self.shape}, block={self.block_size}, nnz_blocks={self.nnz_blocks}"


# ============================================================================ linear product
class _BSRLinearFn(torch.autograd.Function):
    """y = x W^T + b with the three Triton products (forward, dx = dy W, dW at stored blocks)."""

    @staticmethod
    def forward(x, values, bias, w):
        from sparsetrain.kernels import bsr_matmul as K
        return K.bsr_linear_forward(x, w.crow_indices, w.col_indices, values, bias, w.shape[0], in_features=w.shape[1])

    @staticmethod
    def setup_context(ctx, inputs, output):  # (separate from forward: torch.func transforms need it)
        x, values, bias, w = inputs
        # the block index as of this forward: a pattern loaded before the backward (in place into crow/col,
        # a new transposed index) fails torch's version check instead of pairing these values with another
        # index (under autocast `values` is a cast copy, which the in-place load of the layer's does not touch)
        ctx.save_for_backward(x, values, w.crow_indices, w.col_indices, *w.transposed())
        ctx.w, ctx.has_bias = w, bias is not None

    @staticmethod
    def vmap(info, in_dims, x, values, bias, w):
        """torch.func.vmap over x: its batch dimension becomes a leading one of the product's (any leading
        dimensions are batch); batched values or bias (an ensemble of weights) are refused."""
        if in_dims[1] is not None or in_dims[2] is not None:
            raise NotImplementedError("torch.func.vmap over a BSRLinear's values or bias is not supported on the "
                                      "Triton kernels (vmap over its input is)")
        return _BSRLinearFn.apply(x.movedim(in_dims[0], 0), values, bias, w), 0

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(NO_FORWARD_MODE)

    @staticmethod
    @first_order  # (no formulas for the gradient ops)
    def backward(ctx, grad_out):
        from sparsetrain.kernels import bsr_matmul as K
        x, values, crow, col, ccol, row_t, perm = ctx.saved_tensors
        w, dx, dv, db = ctx.w, None, None, None
        grad_out = grad_out.contiguous()
        if ctx.needs_input_grad[0]:
            dx = K.bsr_linear_grad_input(grad_out, ccol, row_t, perm, values, x.shape[-1], out_features=w.shape[0])
        if ctx.needs_input_grad[1]:
            if values.shape[0] != w.values.shape[0]:  # (autocast's cast copy: the version check cannot see it)
                raise RuntimeError(f"a pattern of another block count ({w.values.shape[0]}, this forward's "
                                   f"{values.shape[0]}) was loaded into the BSR weight between this forward and its "
                                   "backward: its gradient cannot reach the new values (an optimizer step broadcast "
                                   "it, silently, before 2026-12-08); run the forward again")
            dv = K.bsr_linear_grad_weight(grad_out, x, crow, col, w.block_size, in_features=w.shape[1],
                                          out_features=w.shape[0])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = grad_out.reshape(math.prod(grad_out.shape[:-1]), grad_out.shape[-1]).sum(0)  # (1-D: itself)
        return dx, dv, db, None


_interpreted = eager(lambda *args: _BSRLinearFn.apply(*args))


class _Kept(torch.autograd.Function):
    """values as they are, saved for the backward of the dense masked path: a pattern loaded into the layer between a
    forward and its backward (values resized in place) fails torch's version check there, as in the CSR layers and
    dense F.linear, where it gave a gradient of the old block count, which an optimizer step broadcast over the new
    blocks, silently (before 2026-12-08)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(values):
        return values.view_as(values)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        ctx.saved_tensors  # (the version check)
        return grad

    @staticmethod
    def jvp(ctx, tangent):
        return tangent


def _check_weight(weight) -> None:
    """TypeError, naming what `weight` is, unless it is a 2-D BSR [out, in]."""
    if not isinstance(weight, BSR) or len(weight.shape) != 2:
        raise TypeError(f"weight must be a 2-D sparsetrain BSR [out, in], got {type(weight).__name__}"
                        f"{' of shape ' + str(weight.shape) if isinstance(weight, BSR) else ''}")


def bsr_linear(x: torch.Tensor, weight: BSR, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b for a 2-D BSR weight [out, in]. Triton on CUDA tensors or when the backend is
    forced to "triton"; otherwise the dense masked product (there is no C++ BSR engine)."""
    _check_weight(weight)
    refuse_fx_proxy(x, "a BSRLinear")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    v = weight.values
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x must have last dimension in_features = {weight.shape[1]}, got shape {tuple(x.shape)}")
    if x.device != v.device or (x.dtype != v.dtype and not torch.is_autocast_enabled(x.device.type)):
        raise (ValueError if x.device != v.device else TypeError)(
            f"x must have the weight's dtype and device ({v.dtype}, {v.device}), got {x.dtype}, {x.device}")
    check_bias(bias, weight.shape[0], v)
    mode = current_backend()
    if mode == "cpu" and x.is_cuda:  # (as every op: backend.py)
        raise ValueError("bsr_linear: backend 'cpu' (the C++ engine) cannot take CUDA tensors; use_backend('auto') "
                         "or 'triton' runs the Triton kernels")
    if mode == "triton" or (mode == "auto" and x.is_cuda):
        values = weight.values
        refuse_func_transforms((x, values, bias))  # (as the CSR ops: the kernels cannot read its wrapped tensors)
        if torch.is_autocast_enabled(x.device.type):  # as autocast runs F.linear: the product in its dtype
            dt = torch.get_autocast_dtype(x.device.type)
            x, values, bias = x.to(dt), values.to(dt), None if bias is None else bias.to(dt)
        if not x.is_cuda:  # (Triton's interpreter: eager under torch.compile, as ops._call; dynamo failed inside it)
            return _interpreted(x, values, bias, weight)
        return _BSRLinearFn.apply(x, values, bias, weight)
    weight.unhooked()
    check_index(weight)  # (as the Triton path's transposed(): an EMA of the buffers moved blocks here silently)
    return F.linear(x, weight._scatter(_Kept.apply(weight.values)), bias)


class BSRLinear(nn.Module):
    """nn.Linear with a block-sparse weight: y = x W^T + b."""

    def __init__(self, weight: BSR, bias: torch.Tensor | None = None):
        super().__init__()
        _check_weight(weight)  # (it said "must be a 2-D sparsetrain.bsr.BSR", not what it got)
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        check_bias(bias, self.out_features, weight.values)
        self.bias = None if bias is None else bias_parameter(bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear, block_size: int = 32, mask: torch.Tensor | None = None) -> "BSRLinear":
        """`linear` with its weight as a BSR of block_size blocks (BSR.from_dense: the blocks `mask`, block-
        structured, keeps; None: those with a nonzero) and its bias (copies)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(BSR.from_dense(current_param(linear, "weight"), block_size, mask), current_param(linear, "bias"))

    def to_dense(self) -> nn.Linear:
        """The equivalent nn.Linear (zeros outside the stored blocks)."""
        check_own_bias(self, type(self).__name__)
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.values.device, dtype=self.weight.values.dtype)
        return _fill_dense(lin, self.weight, self.bias, self.training)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """SparseLinear.reset_parameters for blocks: nn.Linear's draws under one seed, in the kept blocks."""
        w = self.weight
        if w.values.is_meta:  # (no values to draw, as SparseLinear's; from_dense's block check read one: RuntimeError)
            return
        write_bias = bias_writer(self, "BSRLinear") if self.bias is not None else None  # (as SparseLinear's)
        check_index(w)  # (as SparseLinear's: to_empty() without a load)
        dense = nn.Linear(self.in_features, self.out_features, self.bias is not None, "meta", w.values.dtype)
        dense.to_empty(device=w.values.device).reset_parameters()  # (meta first: one draw, as nn.Linear's)
        w.values.copy_(BSR.from_dense(dense.weight, w.block_size, w.mask()).values)
        if write_bias is not None:
            write_bias(dense.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # (nn.Linear's argument name)
        return bsr_linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:  # (nn.Linear's, as SparseLinear's: print(model) showed only the BSR)
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
