"""A sparse linear layer reading a replicated map, without the replicas.

VGG's head, AdaptiveAvgPool2d((7, 7)) -> Flatten -> Linear(C * 49, classes), on a map that reached
1x1 (VGG-like(5, 5), and torchvision's VGG, on 32x32 images): the pool copies each channel into all
49 positions (every output window holds the one input: the average of one value is that value) and
the linear reads all C * 49 copies. With x the [N, C] map and W the [out, C * r] weight (r = 49):

    y[n, o] = sum_c x[n, c] * W'[o, c] + b[o],    W'[o, c] = sum_{j < r} W[o, c * r + j]

`sparse_linear_replicated` builds W' from the nonzeros (O(nnz), differentiable in the values) and
runs a [N, C] x [C, out] product: forward, dx = dy W' and dW' = dy^T x, gathered at each nonzero
as dvalues[k] = dW'[row_k, col_k // r], cost microseconds. The unfused head on VGG-like(5, 5) at
99% and batch 128 spends ~3 ms of a ~35 ms step there: the flatten's copy of the broadcast (12.8
MB), three 25088-wide sparse products and the broadcast's backward sum. Rounding: each channel's r
weights are summed before the product, so results equal the unfused head's up to float rounding.

fuse_ (engine/fuse.py) swaps a model's `AdaptiveAvgPool2d -> nn.Flatten(1) -> SparseLinear` (each
module called once, each output read only by the next) for the three modules below. Each returns
what the module it replaces returns (the pool a fresh contiguous tensor, the flatten its view), so
any other reader of them (a feature extractor calling part of the model, a hook, an in-place op)
sees the real tensors; only the linear, called on the very tensor the flatten just returned, reads
the [N, C] map instead (not under autocast, whose policy is SparseLinear's: fp32 products). On maps
larger than 1x1, or while a hook watches one of the three modules, they compute exactly as the
modules they replace. A model that flattens with the function torch.flatten (torchvision's VGG)
keeps its linear (fx gives no module to swap for the flatten) but gets the pool, whose broadcast
spares PyTorch's adaptive pooling kernels.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from .args import check_bias, check_like
from .formats import CSR
from .index import check_index
from .nn import SparseLinear
from .placeholders import HandOff, _refuse_tracing, _watched, eager

__all__ = ["sparse_linear_replicated", "broadcast_pool", "BroadcastAvgPool2d", "FusedAdaptiveAvgPool2d", "FusedFlatten",
           "FusedSparseLinear"]


def sparse_linear_replicated(x: torch.Tensor, weight: CSR, bias: torch.Tensor | None = None,
                             repeat: int = 1) -> torch.Tensor:
    """sparse_linear(x.repeat_interleave(repeat, dim=-1), weight, bias) without building the
    repeated input: y = x W'^T + b, W'[o, c] = sum_{j < repeat} W[o, c * repeat + j] (module
    docstring). Any device and float dtype; gradients for x, the values and the bias."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, CSR) or len(weight.shape) != 2:
        raise TypeError(f"weight must be a 2-D sparsetrain.CSR [out, in], got {type(weight).__name__}")
    if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")
    n_out, n_in = weight.shape
    if x.dim() < 1 or x.shape[-1] * repeat != n_in:
        raise ValueError(f"x must have last dimension in_features / repeat = {n_in} / {repeat}, "
                         f"got shape {tuple(x.shape)}")
    # (as sparse_linear: F.linear's "expected m1 and m2 to have the same dtype" came from inside before)
    check_bias(bias, n_out, weight.values)
    check_like(x, "x", weight.values)
    check_index(weight)  # (as sparse_linear's transposed(): an EMA of the buffers moved weights here silently)
    c = x.shape[-1]
    where = weight.row_indices() * c + weight.col_indices.long().div(repeat, rounding_mode="floor")
    folded = weight.values.new_zeros(n_out * c).index_add(0, where, weight.values).view(n_out, c)
    return F.linear(x, folded, bias)


def _index(v) -> int:
    """v as an int (numpy's too, as PyTorch takes them), or -1 for what is not one (bool, float, str)."""
    try:
        return -1 if isinstance(v, bool) else operator.index(v)
    except TypeError:
        return -1


def broadcast_pool(x: torch.Tensor, output_size) -> torch.Tensor | None:
    """adaptive_avg_pool2d(x, output_size) as a broadcast when x is a 4-D [N, C, 1, 1] map (each
    output window holds the one input, the average of one value is that value), copied into a fresh
    contiguous tensor like PyTorch's output (a reader may view it or write it in place); the
    backward sums the output gradients, in another order than PyTorch's kernel. Else None, and for
    a (1, 1) output too (PyTorch's pool is a copy there already)."""
    size = tuple(output_size) if isinstance(output_size, (tuple, list)) else (output_size,) * 2
    # (checked as adaptive_avg_pool2d does: a negative size, or -1, was the broadcast's "keep this size")
    if len(size) != 2 or not all(v is None or _index(v) >= 0 for v in size):
        raise ValueError(f"output_size must be an int >= 0 or a pair of them (None: the input's size), got {output_size!r}")
    size = tuple(1 if v is None else _index(v) for v in size)
    if x.dim() != 4 or x.shape[-2:] != (1, 1) or size == (1, 1):
        return None
    return x.expand(*x.shape[:2], *size).contiguous()


class BroadcastAvgPool2d(nn.AdaptiveAvgPool2d):
    """nn.AdaptiveAvgPool2d whose 1x1-input case is broadcast_pool (VGG-like(5, 5) and torchvision's
    VGG on 32x32 images reach their 7x7 pool with 1x1 maps): the same values, ~14x faster forward
    and backward than PyTorch's CPU kernel (~11 ms each way on a [128, 512, 1, 1] batch). fuse_
    treats it as nn.AdaptiveAvgPool2d."""

    def forward(self, input):  # (the replaced module's argument name: module(input=x) works)
        x = input
        out = broadcast_pool(x, self.output_size)
        return super().forward(x) if out is None else out


# ============================================================================ the fused head
class FusedAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """The model's adaptive average pool (`original`, an nn.AdaptiveAvgPool2d or BroadcastAvgPool2d,
    restored by unfuse_). On a 4-D [N, C, 1, 1] input it returns broadcast_pool's copy and hands its
    input to the FusedFlatten after it, if any; any other input goes to adaptive_avg_pool2d."""

    flatten: "FusedFlatten | None" = None  # the FusedFlatten that alone reads this pool's output

    def __init__(self, original: nn.AdaptiveAvgPool2d):
        super().__init__(original.output_size)
        object.__setattr__(self, "original", original)  # a reference, not a submodule

    @eager  # (module state and identity checks: eager under torch.compile)
    def forward(self, input):  # (the replaced module's argument name: module(input=x) works)
        x = input
        _refuse_tracing(self, x)
        out = broadcast_pool(x, self.output_size)
        hand = out is not None and self.flatten is not None and not _watched(self, self.flatten, self.flatten.linear)
        out = F.adaptive_avg_pool2d(x, self.output_size) if out is None else out
        if self.flatten is not None:  # (a stale hand-over from an interrupted forward is dropped too)
            self.flatten._pending = (out, x) if hand else None
        return out


class FusedFlatten(HandOff, nn.Flatten):
    """nn.Flatten(1) between a FusedAdaptiveAvgPool2d and the FusedSparseLinear it alone feeds: it
    returns flatten's output; when the pool handed it a broadcast 1x1 map, it also hands the [N, C]
    map to the linear, which reads that map if it is then called on this very output."""

    _pending: tuple | None = None  # (the pool's output, the pool's input [N, C, 1, 1])
    linear: "FusedSparseLinear | None" = None

    def __init__(self):
        super().__init__(1, -1)

    @eager
    def forward(self, input):  # (the replaced module's argument name: module(input=x) works)
        x = input
        pending, self._pending = self._pending, None
        out = super().forward(x)
        if self.linear is not None:
            hand = pending is not None and pending[0] is x
            # (src: a view of the pool's input, so autograd skips the broadcast)
            self.linear._pending = (out, pending[1].flatten(1), x.shape[2] * x.shape[3]) if hand else None
        return out


class FusedSparseLinear(HandOff, SparseLinear):
    """A SparseLinear (the same CSR and bias objects) that, called on the output its FusedFlatten
    just returned for a replicated map, computes sparse_linear_replicated on the [N, C] map instead
    (not under autocast: there it runs as SparseLinear, fp32 products)."""

    _pending: tuple | None = None  # (the flatten's output, the [N, C] map, the replication r)

    def __init__(self, linear: SparseLinear):
        super().__init__(linear.weight, None)
        self.bias = linear.bias  # the same Parameter (passing it above would copy it)

    @eager
    def forward(self, input):  # (the replaced module's argument name: module(input=x) works)
        x = input
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is x and not (  # (is_autocast_enabled refuses "meta")
                x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)):
            return sparse_linear_replicated(pending[1], self.weight, self.bias, pending[2])
        return super().forward(x)

    def to_linear(self) -> SparseLinear:
        linear = SparseLinear(self.weight, None)
        linear.bias = self.bias
        return linear
