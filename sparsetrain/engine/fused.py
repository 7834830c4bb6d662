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
* backward: `bn_act_backward`, two passes (per-channel sums of the masked gradient, then the input
  gradient with the ReLU masks folded in), then the conv's own backward. Unfused: ReLU backward
  (2 reads, 1 write) then BatchNorm backward (4 reads, 1 write).
* saved for backward: x (the conv's input, as unfused), y (the BN input, as unfused), the shortcut
  (kept alive by the block's other branch anyway) and per-channel constants; the ReLU masks are
  recomputed and the normalised tensor is never stored, so the fused layer keeps no more than the
  unfused ones.

The BN and ReLU modules stay in the model, at their names, as `FusedBatchNorm2d` / `FusedReLU`:
the same parameters and buffers (state_dict, optimizer and checkpoints do not change) whose
forward passes through what the fused conv computed, so forward hooks (the activation entropy
counts ReLU outputs) still see each activation. The batch statistics are float64 sums:
var = E[y^2] - E[y]^2 (PyTorch uses Welford; equal to ~1e-6 relative for activations whose mean
is not many orders above their spread). Running statistics follow nn.BatchNorm2d exactly
(momentum, or the cumulative average when momentum is None; unbiased variance).

On CUDA tensors, under autocast or under the "triton" backend the same layer runs the unfused ops
(same results, no fusion). In a fused model fuse_ also swaps nn.MaxPool2d(2) for MaxPool2x2.
`unfuse_(model)` restores plain modules (densify_ calls it).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import backend, ops
from .nn import SparseConv2d, _set_module

__all__ = ["SparseConvBNReLU", "FusedBatchNorm2d", "FusedReLU", "MaxPool2x2", "fuse_", "unfuse_",
           "sparse_conv_bn_relu", "routed_input"]


# ============================================================================ the fused function
class _SparseConvBNReLU(torch.autograd.Function):
    """(x, values, conv bias, BN weight, BN bias, residual) -> (out, y[, x]): out = act(BN(y) (+
    residual)), y the BN's input (relu(conv) with relu_before, else conv). With `route`, x comes
    back too (a view): the gradient other branches send it is added to this layer's input gradient
    inside the conv kernel (grad_input_add), not by autograd's separate addition pass."""

    @staticmethod
    def forward(ctx, x, values, cbias, weight, bias, residual, index, geom, bn, relu_before, relu_after, route):
        crow, col, ccol, row_t, perm = index
        k, s, p = geom
        y, stats = torch.ops.sparsetrain.sparse_conv2d_stats(x, crow, col, values, ccol, row_t, perm,
                                                               k, s, p, cbias, relu_before)
        batch_stats, mean, invstd = _statistics(bn, y, stats)
        w = weight.detach().double() if weight is not None else torch.ones_like(mean)
        scale = w * invstd
        shift = (bias.detach().double() if bias is not None else 0.0) - mean * scale
        scale, shift = scale.to(y.dtype), shift.to(y.dtype)
        out = torch.ops.sparsetrain.bn_act(y, scale, shift, residual, relu_after)
        ctx.save_for_backward(x, values, y, residual, scale, shift, w, mean, invstd, *index)
        ctx.geom, ctx.flags = geom, (batch_stats, relu_before, relu_after)
        ctx.has = (cbias is not None, weight is not None, bias is not None)
        ctx.mark_non_differentiable(y)
        ctx.set_materialize_grads(False)  # (y gets no gradient: no zeros of its size)
        return (out, y, x) if route else (out, y)

    @staticmethod
    def backward(ctx, grad_out, _grad_y, grad_x=None):
        none = (None,) * 11
        if grad_out is None:  # (out unused: only the routed x's gradient, if any, flows back)
            return (grad_x if ctx.needs_input_grad[0] else None,) + none
        x, values, y, res, scale, shift, w, mean, invstd, crow, col, ccol, row_t, perm = ctx.saved_tensors
        batch_stats, relu_before, relu_after = ctx.flags
        k, s, p = ctx.geom
        need_res = res is not None and ctx.needs_input_grad[5]
        dy, dw, db, dres, dy_sum = torch.ops.sparsetrain.bn_act_backward(
            grad_out.contiguous(), y, res, scale, shift, w, mean, invstd, batch_stats, relu_after, relu_before,
            need_res and relu_after)
        if need_res and not relu_after:
            dres = grad_out
        need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        add = grad_x.contiguous() if grad_x is not None and need_x else None
        dx = dvalues = None
        if need_x and need_v:
            dx, dvalues = torch.ops.sparsetrain.sparse_conv2d_backward(dy, x, crow, col, values, ccol, row_t,
                                                                      perm, k, s, p, add)
        elif need_x:
            dx = torch.ops.sparsetrain.sparse_conv2d_grad_input(dy, ccol, row_t, perm, values,
                                                                list(x.shape[2:]), k, s, p, add)
        elif need_v:
            dvalues = torch.ops.sparsetrain.sparse_conv2d_grad_weight(dy, x, crow, col, k, s, p)
        has_cbias, has_w, has_b = ctx.has
        dcb = dy_sum.to(y.dtype) if has_cbias and ctx.needs_input_grad[2] else None
        dw = dw.to(y.dtype) if has_w and ctx.needs_input_grad[3] else None
        db = db.to(y.dtype) if has_b and ctx.needs_input_grad[4] else None
        return dx, dvalues, dcb, dw, db, (dres if need_res else None), None, None, None, None, None, None


@torch.no_grad()
def _statistics(bn: nn.BatchNorm2d, y: torch.Tensor, stats: torch.Tensor):
    """(uses batch statistics, mean, invstd) as float64 [C], updating bn's running statistics in
    training mode as nn.BatchNorm2d does."""
    batch_stats = bn.training or bn.running_mean is None
    if not batch_stats:
        return False, bn.running_mean.double(), torch.rsqrt(bn.running_var.double() + bn.eps)
    n = y.numel() // y.shape[1]
    if n <= 1 and bn.training:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(y.shape)}")
    mean = stats[0] / n
    var = (stats[1] / n - mean * mean).clamp_min(0.0)
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        bn.num_batches_tracked.add_(1)
        m = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
        bn.running_var.mul_(1 - m).add_((var * (n / (n - 1))).to(bn.running_var.dtype), alpha=m)
    return True, mean, torch.rsqrt(var + bn.eps)


def _can_fuse(x: torch.Tensor, conv: SparseConv2d) -> bool:
    return (x.device.type == "cpu" and backend.current_backend() != "triton"
            and not torch.is_autocast_enabled("cpu") and x.dtype == conv.weight.values.dtype)


def sparse_conv_bn_relu(x: torch.Tensor, conv: SparseConv2d, bn: nn.BatchNorm2d, relu_before: bool = False,
                        relu_after: bool = False, residual: torch.Tensor | None = None, route: bool = False
                        ) -> tuple[torch.Tensor, ...]:
    """(act(BN(y) (+ residual)), y) with y = conv(x) (relu(conv(x)) when relu_before): fused on the
    CPU engine, the unfused ops elsewhere. Updates bn's running statistics in training mode. With
    `route`, a third output: x as seen through this layer (the routing of routed_input)."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [batch, channels, height, width], got shape {tuple(x.shape)}")
    if not _can_fuse(x, conv) or (residual is not None and residual.dtype != x.dtype):
        y = ops.sparse_conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
        if relu_before:
            y = F.relu(y)
        out = nn.BatchNorm2d.forward(bn, y)
        if residual is not None:
            out = out + residual
        out = F.relu(out) if relu_after else out
        return (out, y, x) if route else (out, y)
    if x.shape[1] != conv.in_channels:  # (the C++ check names the same, with less context)
        raise ValueError(f"x must have {conv.in_channels} channels, got shape {tuple(x.shape)}")
    w = conv.weight
    index = (w.crow_indices, w.col_indices) + tuple(w.index()[3:6])
    geom = (list(conv.kernel_size), list(conv.stride), list(conv.padding))
    if residual is not None and residual.shape[0] != x.shape[0]:
        raise ValueError(f"residual must have the batch size of x ({x.shape[0]}), got shape {tuple(residual.shape)}")
    if not torch.is_grad_enabled() and not bn.training and bn.running_mean is not None and not relu_before:
        out, y = _folded_eval(x, conv, bn, index, geom, relu_after, residual)
        return (out, y, x) if route else (out, y)
    return _SparseConvBNReLU.apply(x, w.values, conv.bias, bn.weight, bn.bias, residual, index, geom, bn,
                                   relu_before, relu_after, route)


def _folded_eval(x, conv, bn, index, geom, relu_after, residual):
    """Inference with running statistics: BN is an affine map per output channel, folded into the
    conv (values * scale[row], bias * scale + shift), so the conv's epilogue writes the output
    (and its ReLU) in the one pass; a shortcut adds one pass (bn_act with scale 1, shift 0). Equal to
    the unfused layers up to rounding (the scale multiplies each weight instead of the sum)."""
    crow, col, ccol, row_t, perm = index
    invstd = torch.rsqrt(bn.running_var.double() + bn.eps)
    scale = invstd * (bn.weight.double() if bn.weight is not None else 1.0)
    shift = (bn.bias.double() if bn.bias is not None else 0.0) - bn.running_mean.double() * scale
    if conv.bias is not None:
        shift = shift + conv.bias.double() * scale
    values = conv.weight.values
    rows = torch.repeat_interleave(torch.arange(len(crow) - 1, device=crow.device), crow.diff())
    values = (values.double() * scale[rows]).to(values.dtype)
    shift = shift.to(values.dtype)
    y, _ = torch.ops.sparsetrain.sparse_conv2d_stats(x, crow, col, values, ccol, row_t, perm, *geom, shift,
                                                     relu_after and residual is None)
    if residual is not None:
        one = torch.ones_like(shift)
        y = torch.ops.sparsetrain.bn_act(y, one, torch.zeros_like(shift), residual, relu_after)
    return y, y


# ============================================================================ modules
class FusedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d computed by the SparseConvBNReLU before it: same parameters and buffers; its
    forward returns what that layer computed for it (hooks see the normalised activation)."""

    _pending: tuple | None = None  # (the tensor this module will be called on, its output)

    def forward(self, x):
        pending, self._pending = self._pending, None
        if pending is None or pending[0] is not x:
            raise RuntimeError("FusedBatchNorm2d was called on a tensor its fused conv did not produce; "
                               "the model's graph changed after fuse_(): call sparsetrain.unfuse_(model)")
        return pending[1]


class FusedReLU(nn.ReLU):
    """A ReLU applied by the SparseConvBNReLU before it: passes its input through (forward hooks
    still see the activation, for the entropy of Eq. 1)."""

    def forward(self, x):
        return x


class SparseConvBNReLU(SparseConv2d):
    """SparseConv2d -> [ReLU] -> BatchNorm2d -> [+ residual] -> [ReLU] as one layer (module
    docstring). Built by fuse_(); `bn` is the FusedBatchNorm2d registered at its own name in the
    model (referenced here, not owned, so state_dict keys do not change). With `residual`, it is
    called as layer(x, residual): a residual block adds its shortcut before the last ReLU. With
    `route_input` (set by fuse_ where the block declares it), each forward under autograd keeps x
    as seen through this layer for `routed_input`."""

    route_input = False
    _routed: tuple | None = None  # (the x of the last forward, x as seen through this layer)

    def __init__(self, conv: SparseConv2d, bn: FusedBatchNorm2d, relu_before: bool = False, relu_after: bool = False,
                 residual: bool = False):
        super().__init__(conv.weight, None, conv.stride, conv.padding)  # the same CSR module
        self.bias = conv.bias  # the same Parameter (passing it above would copy it)
        if not isinstance(bn, FusedBatchNorm2d):
            raise TypeError(f"bn must be a FusedBatchNorm2d, got {type(bn).__name__}")
        if bn.num_features != self.out_channels:
            raise ValueError(f"bn has {bn.num_features} features but the conv {self.out_channels} output channels")
        object.__setattr__(self, "bn", bn)  # a reference, not a submodule
        if relu_before and residual:
            raise ValueError("relu_before and residual cannot be combined (conv -> ReLU -> BN -> + residual)")
        self.relu_before, self.relu_after, self.residual = bool(relu_before), bool(relu_after), bool(residual)

    def forward(self, x, residual=None):
        if self.residual != (residual is not None):
            raise ValueError("this layer adds a residual: call it as layer(x, residual)" if self.residual else
                             "this layer was fused without a residual: call it as layer(x)")
        route = self.route_input and torch.is_grad_enabled()
        out, y, *through = sparse_conv_bn_relu(x, self, self.bn, self.relu_before, self.relu_after, residual, route)
        self._routed = (x, through[0]) if route else None
        if self.relu_before:  # the model calls conv -> relu -> bn: the relu placeholder passes y on
            self.bn._pending = (y, out)
            return y
        self.bn._pending = (out, out)
        return out

    def to_conv(self) -> SparseConv2d:
        conv = SparseConv2d(self.weight, None, self.stride, self.padding)
        conv.bias = self.bias  # the same Parameter
        return conv

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", fused: {'relu -> ' if self.relu_before else ''}bn"
                f"{' + residual' if self.residual else ''}{' -> relu' if self.relu_after else ''}")


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


class MaxPool2x2(nn.MaxPool2d):
    """nn.MaxPool2d(2) (stride 2, no padding, floor) on the C++ kernel `max_pool2x2` for CPU float
    tensors: the same outputs, ties and NaN, and gradients, one pass each way with one-byte window
    positions (forward on a [128, 32, 32, 32] batch: 1.1 ms, PyTorch's CPU kernel ~14 ms). Swapped
    in by fuse_; other devices, dtypes and autocast use nn.MaxPool2d's forward."""

    def forward(self, x):
        if (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled("cpu")):
            return torch.ops.sparsetrain.max_pool2x2(x)[0]
        return super().forward(x)


def _is_pool2x2(m: nn.Module) -> bool:
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return (type(m) is nn.MaxPool2d and pair(m.kernel_size) == (2, 2) and pair(m.stride) == (2, 2)
            and pair(m.padding) == (0, 0) and pair(m.dilation) == (1, 1) and not m.ceil_mode
            and not m.return_indices)


def _rebuild_bn(bn: nn.BatchNorm2d, cls: type) -> nn.BatchNorm2d:
    """A `cls` (BatchNorm2d or FusedBatchNorm2d) holding bn's own parameter and buffer objects
    (optimizers and other references keep working)."""
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new.weight, new.bias = bn.weight, bn.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(bn, name))
    return new.train(bn.training)


# ============================================================================ fuse_ / unfuse_
class _Tracer(fx.Tracer):
    """torch.nn's modules, the engine's layers and every module without submodules (which holds no
    pattern, and may branch on shapes) are leaves: the graph shows their call sites."""

    def is_leaf_module(self, m, qualname):
        return (type(m).__module__.startswith("sparsetrain.engine.") or next(m.children(), None) is None
                or super().is_leaf_module(m, qualname))


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _module_call(node: fx.Node | None, modules: dict, calls: dict, kind) -> fx.Node | None:
    """`node` when it calls a `kind` module that the graph calls only there."""
    if node is None or node.op != "call_module" or calls.get(node.target, 0) != 1:
        return None
    return node if isinstance(modules[node.target], kind) else None


def _residual_relu(bn: fx.Node, model: nn.Module, conv_name: str, modules: dict, calls: dict) -> fx.Node | None:
    """The ReLU call after `bn + shortcut` when the conv's parent block declares that it passes the
    shortcut to a fused conv: `fused_residual = {conv: (bn, relu)}` (child names), as
    sparsetrain.experiment's ResNet blocks do."""
    parent_name, _, child = conv_name.rpartition(".")
    declared = getattr(model.get_submodule(parent_name) if parent_name else model, "fused_residual", {})
    add = _only_user(bn)
    if child not in declared or add is None or add.op != "call_function" or add.target not in (operator.add, torch.add):
        return None
    relu = _module_call(_only_user(add), modules, calls, nn.ReLU)
    prefix = parent_name + "." if parent_name else ""
    if relu is None or (prefix + declared[child][0], prefix + declared[child][1]) != (bn.target, relu.target):
        return None
    return relu


def fuse_(model: nn.Module, strict: bool = True) -> list[str]:
    """Fuse, in place, every SparseConv2d -> [ReLU] -> BatchNorm2d -> [ReLU] of `model` (module
    docstring; BatchNorm2d with affine or not, running statistics or not). A ReLU module called at
    more than one site (torchvision's residual blocks) stays unfused: conv -> BN is fused alone.
    conv -> BN -> + shortcut -> ReLU is fused where the block declares it passes the shortcut
    (`fused_residual`, see _residual_relu); a block that passes its input on through
    `routed_input(self.<conv>, x)` declares `fused_route_input = "<conv>"` (child name) and that
    fused layer routes it. In a model with fused layers, every nn.MaxPool2d(2) becomes a
    MaxPool2x2 (the same pooling on a one-pass kernel). Returns the qualified names of the fused
    convs. The model must be traceable by torch.fx: ValueError otherwise, or nothing fused when not
    `strict`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 (fx raises many kinds)
        if not strict:
            return []
        raise ValueError(f"fuse_ needs a model torch.fx can trace ({type(e).__name__}: {e}); build "
                         "SparseConvBNReLU layers by hand for this model") from e
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused = []
    for node in list(graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) is not SparseConv2d or calls[node.target] != 1:
            continue
        relu_before = _module_call(_only_user(node), modules, calls, nn.ReLU)
        bn = _module_call(_only_user(relu_before or node), modules, calls, nn.BatchNorm2d)
        if bn is None or type(modules[bn.target]) is not nn.BatchNorm2d:
            continue
        relu_after = residual = None
        if relu_before is None:
            relu_after = residual = _residual_relu(bn, model, node.target, modules, calls)
            if residual is None:
                relu_after = _module_call(_only_user(bn), modules, calls, nn.ReLU)
        fbn = _rebuild_bn(modules[bn.target], FusedBatchNorm2d)
        _set_module(model, bn.target, fbn)
        for r in (relu_before, relu_after):
            if r is not None:
                _set_module(model, r.target, FusedReLU(inplace=getattr(modules[r.target], "inplace", False)))
        layer = SparseConvBNReLU(modules[node.target], fbn, relu_before is not None, relu_after is not None,
                                 residual is not None)
        parent_name, _, child = node.target.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer.route_input = getattr(parent, "fused_route_input", None) == child
        _set_module(model, node.target, layer)
        fused.append(node.target)
    for name, m in list(model.named_modules()):
        if fused and _is_pool2x2(m):
            _set_module(model, name, MaxPool2x2(2))
    return fused


def unfuse_(model: nn.Module) -> nn.Module:
    """Undo fuse_(): plain SparseConv2d, BatchNorm2d and ReLU modules, same parameters."""
    for name, m in list(model.named_modules()):
        if isinstance(m, SparseConvBNReLU):
            _set_module(model, name, m.to_conv())
        elif isinstance(m, FusedBatchNorm2d):
            _set_module(model, name, _rebuild_bn(m, nn.BatchNorm2d))
        elif isinstance(m, FusedReLU):
            _set_module(model, name, nn.ReLU(inplace=m.inplace))
        elif isinstance(m, MaxPool2x2):
            _set_module(model, name, nn.MaxPool2d(2))
    return model
