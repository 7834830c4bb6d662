"""A sparse conv with the BatchNorm (and ReLU) that follows it, as one layer.

At 99% sparsity the sparse convs of a ResNet-18 step cost less than the dense BatchNorm and ReLU
passes around them. `fuse_(model)` finds, in the model's torch.fx graph, every `SparseConv2d`
whose output feeds only a `BatchNorm2d`, in the patterns

    conv -> BN            conv -> BN -> ReLU        conv -> ReLU -> BN   (VGG-like's order)
    conv -> BN -> + shortcut -> ReLU                 (a residual block that declares it, fuse_)

and swaps the conv for a `SparseConvBNReLU` that runs them together (CPU, C++):

* inference (eval mode, no autograd): BN's affine map folded into the conv's values and bias, the
  ReLU in its epilogue: one pass.
* forward: the conv kernel's epilogue applies the ReLU before the BN (if any) and sums y and y^2
  per channel while each output tile is still in cache (`sparse_conv2d_stats`): the batch
  statistics cost no pass over y; then one pass `bn_act` writes act(scale * y + shift).
  Unfused: statistics (1 read), normalisation (1 read, 1 write), ReLU (1 read, 1 write).
* backward: `sparse_conv2d_bn_backward`: one pass of per-channel sums of the masked gradient
  (a block's last conv writes the shortcut's gradient in it; a deferred pair's first layer gets these
  sums from the second conv's kernel: _Opts.link), then the conv's own backward, which computes the
  BatchNorm's input gradient (ReLU masks folded in) plane by plane as it packs it: never written
  (maps of <= 16 output pixels, on the small-map kernel, get it written first: `bn_act_backward`'s
  second pass). Unfused: ReLU backward (2 reads, 1 write), BatchNorm backward (4 reads, 1 write).
* saved for backward: x (the conv's input, as unfused), y (the BN input, as unfused), the shortcut
  (kept alive by the block's other branch anyway) and per-channel constants; the ReLU masks are
  recomputed and the normalised tensor is never stored, so the fused layer keeps no more than the
  unfused ones.

The BN and ReLU modules stay in the model, at their names, as `FusedBatchNorm2d` / `FusedReLU`: the
same parameters and buffers (state_dict, optimizer and checkpoints do not change) whose forward passes
through what the fused conv computed, so forward hooks (the activation entropy counts ReLU outputs)
still see each activation. A FusedReLU with `count_states` set has its layer count, per neuron, the
samples with a positive activation inside the kernel that applies the ReLU (the conv epilogue or
`bn_act`: `relu_counts`), for Eq. 1's entropy without another read (`FusedReLU.pop_state_counts`).
The batch statistics are float64 sums of per-plane float partial sums of deviations from one of the
plane's outputs (exact in the origin's shift), var = the centred sum (y - mean)^2 / n, taken as
sum y^2 - (sum y)^2 / n in float64 and, in float64 models, summed again about the mean from y for a
channel where that cancels (mean/std past ~10: centre_stats); PyTorch uses Welford. Equal
to ~1e-6 relative in float32, also for activations whose mean is thousands of times their spread, and
to float64's rounding of y in float64. Running statistics follow nn.BatchNorm2d exactly (momentum, or
the cumulative average when momentum is None; unbiased variance).

On CUDA tensors (and CPU ones under the "triton" backend) the same ops run on Triton (kernels/bn_act.py,
the conv's statistics epilogue in kernels/sparse_conv2d.py; the backward writes dy before the conv
backward reads it); pooling in the BN's pass stays on the CPU engine. Under autocast the layer runs
the unfused ops. fuse_ and unfuse_ (engine/fuse.py) rewrite a model with these layers (and swap
nn.MaxPool2d(2) for MaxPool2x2); `unfuse_(model)` restores plain modules (densify_ calls it).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import backend, ops
from .args import check_flag
from .fused_autograd import _Opts, _SparseConvBNReLU
from .nn import SparseConv2d
from .placeholders import (FusedBatchNorm2d, FusedReLU, HandOff, MaxPool2x2, _check_bn, _check_taken,
                           _count_positive, _hands_on, _rebuild_bn, _refuse_unsupported, _watched, eager)
from .torch_prune import check_own_bias

__all__ = ["SparseConvBNReLU", "FusedBatchNorm2d", "FusedReLU", "MaxPool2x2", "sparse_conv_bn_relu",
           "routed_input"]


# ============================================================================ the fused function
def _can_fuse(x: torch.Tensor, conv: SparseConv2d) -> bool:
    """The fused ops take x: the C++ engine (CPU tensors) or the Triton kernels (CUDA tensors, and CPU
    ones under the "triton" backend); not under autocast."""
    return (x.device.type in ("cpu", "cuda") and not torch.is_autocast_enabled(x.device.type)
            and x.dtype == conv.weight.values.dtype)


def sparse_conv_bn_relu(x: torch.Tensor, conv: SparseConv2d, bn: nn.BatchNorm2d, relu_before: bool = False,
                        relu_after: bool = False, residual: torch.Tensor | None = None, route: bool = False,
                        *, defer: dict | None = None, in_act: tuple | None = None,
                        relu_counts: torch.Tensor | None = None, pool: bool = False,
                        link: dict | None = None, unfused: bool = False) -> tuple[torch.Tensor, ...]:
    """(act(BN(y) (+ residual)), y) with y = conv(x) (relu(conv(x)) when relu_before): fused on the
    C++ engine and on Triton, the unfused ops under autocast. Updates bn's running statistics in
    training mode. With `route`, a third output: x as seen through this layer (routed_input). `defer`,
    `in_act`, `link`: _Opts (the BN deferred into the next fused conv); with `defer`, (y, y[, x]) come
    back and defer["act"] holds the BN for the next conv (its `in_act`; that dict is its `link`).
    `relu_counts` (int64, one entry per neuron of the ReLU's output, a layer with a ReLU): the samples
    whose activation is positive are added to it, by the kernel that applies the ReLU (no deferral
    then). `pool`: the first output is the activation 2x2-max-pooled (stride 2, as nn.MaxPool2d(2)),
    in the BN's pass on the CPU engine (the activation is never written); no residual, no `defer`.
    `unfused`: the unfused ops (y differentiable: a hook on the ReLU of conv -> ReLU -> BN reads it; an
    empty batch: nn.BatchNorm2d's semantics)."""
    opt = (torch.Tensor, type(None))
    for name, v, kind in (("x", x, torch.Tensor), ("conv", conv, SparseConv2d), ("bn", bn, nn.BatchNorm2d),
                          ("residual", residual, opt), ("relu_counts", relu_counts, opt)):
        if not isinstance(v, kind):  # (an AttributeError deep inside before)
            raise TypeError(f"{name} must be a {getattr(kind, '__name__', 'Tensor or None')}, got {type(v).__name__}")
    for v, name in ((relu_before, "relu_before"), (relu_after, "relu_after"), (route, "route"), (pool, "pool")):
        check_flag(v, name)  # ("False" was truthy: a ReLU applied, or a schema error from C++)
    for t in ("weight", "bias"):  # (parametrized: recomputed where read, fine; a pre-hook runs after this call)
        if t not in bn._parameters and getattr(bn, t, None) is not None and not parametrize.is_parametrized(bn, t):
            raise TypeError(f"bn's {t} is recomputed by a forward pre-hook (torch.nn.utils.prune, a legacy weight_norm) "
                            "that runs after the fused conv has read it (stale after a step; an autograd error): "
                            f"remove it (torch.nn.utils.prune.remove(bn, {t!r})), or apply it before fuse_ (then "
                            "that layer stays unfused)")
    if bn.num_features != conv.out_channels:  # (as SparseConvBNReLU; the C++ check named the BN's "weight")
        raise ValueError(f"bn has {bn.num_features} features but the conv {conv.out_channels} output channels")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [batch, channels, height, width], got shape {tuple(x.shape)}")
    if pool and (residual is not None or defer is not None):
        raise ValueError("pool cannot be combined with a residual or a deferred BatchNorm")
    if relu_before and residual is not None:  # (as SparseConvBNReLU; the backward op refused it, after the forward)
        raise ValueError("relu_before and residual cannot be combined (conv -> ReLU -> BN -> + residual)")
    if relu_counts is not None:
        if not (relu_before or relu_after):
            raise ValueError("relu_counts needs a layer with a ReLU (relu_before or relu_after)")
        if (bad := TypeError if relu_counts.dtype != torch.int64 else ValueError if relu_counts.dim() != 1 else None):
            raise bad(f"relu_counts must be a 1-D int64 tensor, got {relu_counts.dtype} {tuple(relu_counts.shape)}")
        defer = None
    fusable = not unfused and _can_fuse(x, conv) and (residual is None or residual.dtype == x.dtype) and (
        not pool or backend.cpu_engine(x))
    if in_act is not None and (not fusable or not torch.is_grad_enabled()):
        # x holds the previous layer's y: apply its BN here; its gradient passes straight through
        # (the previous layer's backward expects the gradient of its output)
        m, a, b, relu = in_act  # (centred, as the kernels: csrc/cpu/bn_act.h's bn_pre)
        act = (x - m.to(x.dtype)[:, None, None]) * a[:, None, None] + b[:, None, None]
        act = F.relu(act) if relu else act
        x, in_act = x + (act - x).detach(), None
    if not fusable:
        y = ops.sparse_conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
        if relu_before:
            y = F.relu(y)
        out = bn(y) if getattr(bn, "_plain", None) else nn.BatchNorm2d.forward(bn, y)  # (_plain: its hooks run)
        if residual is not None:
            out = out + residual
        out = F.relu(out) if relu_after else out
        if relu_counts is not None:
            _count_positive(relu_counts, y if relu_before else out)
        out = F.max_pool2d(out, 2) if pool else out
        return (out, y, x) if route else (out, y)
    if x.shape[1] != conv.in_channels:  # (the C++ check names the same, with less context)
        raise ValueError(f"x must have {conv.in_channels} channels, got shape {tuple(x.shape)}")
    w = conv.weight
    index = (w.crow_indices, w.col_indices) + tuple(w.index()[3:6])
    # (through ops.pair as SparseConv2d's forward: a stride or padding reassigned on the layer, (True, 1), ran as 1)
    geom = (list(conv.kernel_size), ops.pair(conv.stride, "stride"), ops.pair(conv.padding, "padding"))
    if residual is not None and residual.shape[0] != x.shape[0]:
        raise ValueError(f"residual must have the batch size of x ({x.shape[0]}), got shape {tuple(residual.shape)}")
    if not torch.is_grad_enabled() and not bn.training and bn.running_mean is not None and not relu_before:
        out, y = _folded_eval(x, conv, bn, index, geom, relu_after, residual, relu_counts)
        out = torch.ops.sparsetrain.max_pool2x2(out)[0] if pool else out
        return (out, y, x) if route else (out, y)
    opts = _Opts(route, defer if torch.is_grad_enabled() and residual is None else None, in_act, relu_counts, pool,
                 link if in_act is not None else None)
    outs = _SparseConvBNReLU.apply(x, w.values, conv.bias, bn.weight, bn.bias, residual, index, geom, bn,
                                   relu_before, relu_after, opts)
    if opts.defer is not None:  # (y stands for out)
        y, *through = outs if route else (outs,)
        return (y, y, *through)
    return outs


def _folded_eval(x, conv, bn, index, geom, relu_after, residual, counts=None):
    """Inference with running statistics: BN is an affine map per output channel, folded into the
    conv (values * scale[row], bias * scale + shift), so the conv's epilogue writes the output
    (and its ReLU) in the one pass; a shortcut adds one pass (bn_act with scale 1, shift 0). Equal to
    the unfused layers up to rounding (the scale multiplies each weight instead of the sum)."""
    crow, col, ccol, row_t, perm = index
    _check_bn(bn, False, device=x.device)
    invstd = torch.rsqrt(bn.running_var.double() + bn.eps)
    scale = invstd * (bn.weight.double() if bn.weight is not None else 1.0)
    shift = (bn.bias.double() if bn.bias is not None else 0.0) - bn.running_mean.double() * scale
    if conv.bias is not None:
        shift = shift + conv.bias.double() * scale
    values = conv.weight.values
    rows = torch.repeat_interleave(torch.arange(len(crow) - 1, device=crow.device), crow.diff())
    values = (values.double() * scale[rows]).to(values.dtype)
    shift = shift.to(values.dtype)
    in_epilogue = relu_after and residual is None
    y, _ = ops._call("sparse_conv2d_stats", x, crow, col, values, ccol, row_t, perm, *geom, shift, in_epilogue,
                     None, None, None, False, counts if in_epilogue else None)
    if residual is not None:  # (mean 0, scale 1, shift 0: the residual added, the ReLU applied)
        zero = torch.zeros_like(shift)
        y = ops._call("bn_act", y, zero.double(), torch.ones_like(shift), zero, residual, relu_after,
                      counts if relu_after else None)
    return y, y


# ============================================================================ modules
class SparseConvBNReLU(HandOff, SparseConv2d):
    """SparseConv2d -> [ReLU] -> BatchNorm2d -> [+ residual] -> [ReLU] as one layer (module
    docstring). Built directly, the layer owns `bn` (a FusedBatchNorm2d, or an nn.BatchNorm2d rebuilt as one
    on its own tensors) as a submodule: `parameters()`, `state_dict()`, `train()`, `.to()` and copies include
    it, and its call returns act(BN(...)) itself. Built by fuse_()
    (`owns_bn=False`), `bn` is the FusedBatchNorm2d registered at its own name in the model, which calls
    it on this layer's output (referenced here, not owned, so the model's state_dict keys do not change).
    With `residual`, it is called as layer(x, residual): a residual block adds its shortcut before the last ReLU. With
    `route_input` (set by fuse_ where the block declares it), each forward under autograd keeps x
    as seen through this layer for `routed_input`. With `feeds` (set by fuse_ where this layer's
    activation goes only to that fused layer's conv), training forwards defer the BN (+ ReLU) into
    that conv's input packing: this layer hands on its BN input y in the activation's place, never
    writing the activation (saved for backward: y, once, not y and the activation). Not while a hook
    watches this layer's BN or ReLU or the next conv, nor without autograd. With `pools` (set by fuse_
    where a MaxPool2x2 alone reads the activation), the BN's pass writes only the pooled output (one-byte
    window positions kept for backward), which that pool returns; not while hooks watch the BN, ReLU
    or pool. Neither under saved-tensor hooks (torch.utils.checkpoint): the model's forward must run
    whole (a part of it, model[:k], returns y at a deferred or pooled link; unfuse_ first)."""

    route_input = False
    _transient = ("_routed", "_deferred")
    _routed: tuple | None = None  # (the x of the last forward, x as seen through this layer)
    feeds: "SparseConvBNReLU | None" = None  # the fused layer that alone reads this one's activation
    pools: "MaxPool2x2 | None" = None  # the 2x2 pool that alone reads it (pooled in the BN's pass)
    _placeholders: tuple = ()  # this layer's FusedBatchNorm2d / FusedReLU modules (hook checks)
    _deferred: tuple | None = None  # (y of the layer before, its defer dict: _Opts) for the next call

    def __init__(self, conv: SparseConv2d, bn: FusedBatchNorm2d, relu_before: bool = False, relu_after: bool = False,
                 residual: bool = False, *, owns_bn: bool = True):
        if not isinstance(conv, SparseConv2d):  # (an AttributeError, or the CSR check on nn.Conv2d's weight)
            raise TypeError(f"conv must be a SparseConv2d, got {type(conv).__name__}")
        for v, name in ((relu_before, "relu_before"), (relu_after, "relu_after"), (residual, "residual"),
                        (owns_bn, "owns_bn")):
            check_flag(v, name)  # (bool("no") was True)
        super().__init__(conv.weight, None, conv.stride, conv.padding)  # the same CSR module
        self.bias = conv.bias  # the same Parameter (passing it above would copy it)
        if owns_bn and type(bn) is nn.BatchNorm2d:  # (its parameter and buffer objects, shared)
            bn = _rebuild_bn(bn, FusedBatchNorm2d)
        if not isinstance(bn, FusedBatchNorm2d):
            raise TypeError(f"bn must be a FusedBatchNorm2d{' or an nn.BatchNorm2d' if owns_bn else ''}, got "
                            f"{type(bn).__name__}")
        if bn.num_features != self.out_channels:
            raise ValueError(f"bn has {bn.num_features} features but the conv {self.out_channels} output channels")
        # owned: a submodule (before 2026-12-07 a reference here too: an optimizer over parameters() never trained
        # it, state_dict() left it out); else a reference (fuse_: the BN stays at its own name in the model)
        if owns_bn:
            self.bn = bn
        else:
            object.__setattr__(self, "bn", bn)
        if relu_before and residual:
            raise ValueError("relu_before and residual cannot be combined (conv -> ReLU -> BN -> + residual)")
        self.relu_before, self.relu_after, self.residual = bool(relu_before), bool(relu_after), bool(residual)

    @eager  # (module state and identity checks: eager under torch.compile)
    def forward(self, input, residual=None):  # (nn.Conv2d's argument name: layer(input=x) works)
        x = input
        if self.residual != (residual is not None):
            raise ValueError("this layer adds a residual: call it as layer(x, residual)" if self.residual else
                             "this layer was fused without a residual: call it as layer(x)")
        owned = self.owns_bn  # (no module of the model calls an owned BN: nothing handed to it, nothing to check)
        _check_taken(*(() if owned else self._placeholders or (self.bn,)), self.pools, hooked=_watched(self), layer=self)
        _refuse_unsupported(self, x)
        if not isinstance(x, torch.Tensor):  # (as SparseConv2d; an AttributeError from _defers or numel() before)
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if owned and _watched(self.bn):  # (its hooks never ran before 2026-12-07: the fused op applies the BN)
            return self._owned_unfused(x, residual)
        pending, self._deferred = self._deferred, None
        if pending is not None and pending[0] is not x:
            raise RuntimeError("a SparseConvBNReLU was called on a tensor the fused layer before it did not hand "
                               "it; the model's graph changed after fuse_(): call sparsetrain.unfuse_(model)")
        route = self.route_input and torch.is_grad_enabled()
        defer = {} if self._defers(x) else None
        relu, counts = next((m for m in self._placeholders if isinstance(m, FusedReLU)), None), None
        if relu is not None and relu.count_states and x.dim() == 4:
            counts = torch.zeros(self.out_channels * math.prod(self._out_hw(x)), dtype=torch.int64, device=x.device)
            defer = None
        pool = defer is None and self._pools(x)
        unfused = x.numel() == 0 or self.relu_before and _watched(*self._placeholders)
        out, y, *through = sparse_conv_bn_relu(x, self, self.bn, self.relu_before, self.relu_after, residual, route,
                                               defer=defer, in_act=pending[1]["act"] if pending else None,
                                               relu_counts=counts, pool=pool, link=pending[1] if pending else None,
                                               unfused=unfused)
        if relu is not None:
            relu._state_counts = counts
        if self.pools is not None:  # (a stale hand-over is dropped too)
            self.pools._pending = (y, out) if pool else None
        if self.feeds is not None:  # (a stale hand-over from an interrupted forward is dropped too)
            self.feeds._deferred = (out, defer) if defer else None  # (empty: could not defer)
        self._routed = (x, through[0]) if route else None
        if owned:  # (no placeholders, pool or link: fuse_ builds none for it)
            return out
        # pool: out is pooled, the BN (and ReLU) placeholders pass y on to the pool, which returns out;
        # relu_before: the model calls conv -> relu -> bn, the relu placeholder passes y on
        self.bn._pending = (y, y) if pool else (y, out) if self.relu_before else (out, out)
        handed = y if pool or self.relu_before else out  # (what the ReLU placeholder is called on, either order)
        if relu is not None:
            relu._pending = (handed, self)  # (a ReLU shared by fused layers: _check_taken reads who handed it)
        return handed

    def _owned_unfused(self, x, residual):
        """The unfused ops, calling the owned BN as a module: a hook on it sees its real input and output (a
        pre-hook may change the input, a full backward hook gets its gradients), as in SparseConv2d -> BatchNorm2d
        -> ReLU."""
        self.bn._plain = True  # (FusedBatchNorm2d.forward: nn.BatchNorm2d's)
        try:
            return sparse_conv_bn_relu(x, self, self.bn, self.relu_before, self.relu_after, residual, unfused=True)[0]
        finally:
            self.bn._plain = None

    @property
    def owns_bn(self) -> bool:
        """Whether `bn` is this layer's submodule (built directly) or a reference to the model's (fuse_)."""
        return "bn" in self._modules

    def train(self, mode: bool = True) -> "SparseConvBNReLU":
        """nn.Module.train (an owned `bn` with it); a layer built with `owns_bn=False` outside fuse_ passes it on
        to its `bn`, held by reference (its eval() left the BN in training mode: batch statistics, running stats
        updated). In a fused model the BN keeps its own mode, as unfused (a frozen BN stays frozen)."""
        super().train(mode)
        if not self._placeholders and not self.owns_bn:
            self.bn.train(mode)
        return self

    def _apply(self, fn, recurse=True):  # (.to(), .double(), .cuda(): as train(), a lone referenced bn too)
        super()._apply(fn, recurse)
        if recurse and not self._placeholders and not self.owns_bn:
            self.bn._apply(fn, recurse)
        return self

    def _out_hw(self, x: torch.Tensor) -> tuple[int, int]:
        return tuple((x.shape[2 + i] + 2 * self.padding[i] - self.kernel_size[i]) // self.stride[i] + 1
                     for i in range(2))

    def _pools(self, x: torch.Tensor) -> bool:
        if (self.pools is None or self.residual or x.dim() != 4 or not _can_fuse(x, self) or not backend.cpu_engine(x)
                or not _hands_on()):
            return False
        return min(self._out_hw(x)) >= 2 and not _watched(self, *self._placeholders, self.pools)

    def _defers(self, x: torch.Tensor) -> bool:
        if (self.feeds is None or not torch.is_grad_enabled() or self.residual or not _can_fuse(x, self)
                or not _can_fuse(x, self.feeds) or not _hands_on()):
            return False
        return not _watched(self, *self._placeholders, self.feeds)  # (a hook here or on the next conv would see y)

    def to_conv(self) -> SparseConv2d:
        """The plain SparseConv2d of this layer (the same weight and bias; what unfuse_ puts back)."""
        check_own_bias(self, type(self).__name__)  # (a computed bias: torch's TypeError assigning it below)
        conv = SparseConv2d(self.weight, None, self.stride, self.padding)
        conv.bias = self.bias  # the same Parameter
        return conv

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", fused: {'relu -> ' if self.relu_before else ''}bn"
                f"{' + residual' if self.residual else ''}{' -> relu' if self.relu_after else ''}")


@eager
def routed_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x, as seen through `layer`'s forward just called on it, for a block's other branches that
    read x (the shortcut): when `layer` is a SparseConvBNReLU with route_input, the gradient those
    branches send to x joins the layer's own input gradient inside its conv kernel (one pass, where
    autograd would sum the two in a separate pass over a fresh activation-sized tensor). Any other
    layer, or no autograd: x itself. Call it right after layer(x); it hands its view on once."""
    pending = getattr(layer, "_routed", None)
    if pending is None:
        return x
    layer._routed = None
    return pending[1] if pending[0] is x else x
