"""The fused conv -> [ReLU] -> BatchNorm -> [+ residual] -> [ReLU] layer's autograd Function
(engine/fused.py's docstring: what each pass computes), its options (_Opts) and the BatchNorm's
statistics from the conv epilogue's sums (_statistics)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import ops
from .autograd import first_order
from .placeholders import _check_bn


class _Opts(NamedTuple):
    """How one fused call connects to its neighbours. route: x comes back too (routed_input).
    defer: a dict that receives (mean, scale, shift, relu) under "act" when the BN's output is
    deferred (the call returns y as its output; the next fused conv applies the BN while packing).
    in_act: that tuple of the previous layer's deferred BN: x holds that layer's y. link: that
    layer's defer dict (its "act" given): this layer's backward leaves there that BN's first-pass sums,
    computed from dx inside the conv kernel, with dx ("sums"), which that layer's backward then uses
    if its grad_out is that dx. counts: int64 [neurons] of the ReLU's output that the kernel applying
    the ReLU adds its positive outputs to. pool: the output 2x2-max-pooled in the BN's pass."""
    route: bool = False
    defer: dict | None = None
    in_act: tuple | None = None
    counts: torch.Tensor | None = None
    pool: bool = False
    link: dict | None = None


class _SparseConvBNReLU(torch.autograd.Function):
    """(x, values, conv bias, BN weight, BN bias, residual) -> (out, y[, x]): out = act(BN(y) (+
    residual)), y the BN's input (relu(conv) with relu_before, else conv). With opts.route, x comes
    back too (a view): the gradient other branches send it is added to this layer's input gradient
    inside the conv kernel (grad_input_add), not by autograd's separate addition pass. With
    opts.defer the outputs are (y[, x]): y stands for out, whose gradient it receives (only the
    next fused conv reads it, applying the BN itself: _link in fuse.py). With opts.pool, out is the
    activation 2x2-max-pooled (its window positions saved: the backward unpools the gradient)."""

    @staticmethod
    def forward(ctx, x, values, cbias, weight, bias, residual, index, geom, bn, relu_before, relu_after, opts):
        crow, col, ccol, row_t, perm = index
        k, s, p = geom
        in_act = opts.in_act or (None, None, None, False)
        y, stats = ops._call("sparse_conv2d_stats", x, crow, col, values, ccol, row_t, perm, k, s, p, cbias,
                             relu_before, *in_act, opts.counts if relu_before else None)
        batch_stats, (mean, invstd, w, scale, shift) = _statistics(bn, y, stats)
        out = idx = None
        if opts.defer is None:
            if opts.pool and not (relu_after and opts.counts is not None):  # the activation is never written
                out, idx = torch.ops.sparsetrain.max_pool2x2(y, mean, scale, shift, relu_after)
            else:
                out = ops._call("bn_act", y, mean, scale, shift, residual, relu_after,
                                opts.counts if relu_after else None)
                if opts.pool:
                    out, idx = torch.ops.sparsetrain.max_pool2x2(out)
        ctx.save_for_backward(x, values, y, residual, scale, shift, w, mean, invstd, *index, idx)
        ctx.links = (cbias, weight, bias)  # (read through scale/shift: first_order links them)
        ctx.geom, ctx.flags, ctx.opts = geom, (batch_stats, relu_before, relu_after), opts
        ctx.has = (cbias is not None, weight is not None, bias is not None)
        ctx.set_materialize_grads(False)  # (y gets no gradient: no zeros of its size)
        if opts.defer is not None:  # the normalised activation is never written
            opts.defer["act"] = (mean, scale, shift, relu_after)
            return (y, x) if opts.route else y
        ctx.mark_non_differentiable(y)
        return (out, y, x) if opts.route else (out, y)

    @staticmethod
    @first_order  # (no formulas for the gradient ops)
    def backward(ctx, *grads):
        opts = ctx.opts
        grad_out = grads[0]
        grad_x = grads[-1] if opts.route else None
        none = (None,) * 12
        if grad_out is None:  # (out unused: only the routed x's gradient, if any, flows back)
            return (grad_x if ctx.needs_input_grad[0] else None,) + none[1:]
        x, values, y, res, scale, shift, w, mean, invstd, crow, col, ccol, row_t, perm, idx = ctx.saved_tensors
        batch_stats, relu_before, relu_after = ctx.flags
        k, s, p = ctx.geom
        need_res = res is not None and ctx.needs_input_grad[5]
        need_x, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        add = grad_x.contiguous() if grad_x is not None and need_x else None
        has_cbias, has_w, has_b = ctx.has
        need_cb = has_cbias and ctx.needs_input_grad[2]  # (without it, dy only where a nonzero reads it)
        handed = opts.defer.pop("sums", None) if opts.defer is not None else None  # (_Opts.link)
        sums = handed[0] if handed is not None and handed[1] is grads[0] else None
        link = opts.link if need_x and opts.link is not None and "act" in opts.link else None
        # the BN's sums (or those handed over), then the conv backward computing dy as it packs it
        dx, dvalues, dw, db, dres, dy_sum, in_sums = ops._call(
            "sparse_conv2d_bn_backward", grad_out.contiguous(), x, crow, col, values, ccol, row_t, perm, k, s, p,
            add, y, res, scale, shift, w, mean, invstd, batch_stats, relu_after, relu_before, need_res and relu_after,
            need_x, need_v, *(opts.in_act or (None, None, None, False)), need_cb, link is not None, sums,
            idx)  # (pool: grad_out is the pooled output's, unpooled by the op as it reads it)
        if link is not None:
            link["sums"] = (in_sums, dx)
        dx, dvalues, dres = (dx if need_x else None), (dvalues if need_v else None), (
            grad_out if need_res and not relu_after else dres)
        dcb = dy_sum if need_cb else None  # (float64 [C]: autograd casts each to its input's dtype, in C++)
        dw = dw if has_w and ctx.needs_input_grad[3] else None
        db = db if has_b and ctx.needs_input_grad[4] else None
        return (dx, dvalues, dcb, dw, db, (dres if need_res else None)) + none[:6]


@torch.no_grad()
def _statistics(bn: nn.BatchNorm2d, y: torch.Tensor, stats: torch.Tensor):
    """(uses batch statistics, (mean, invstd, weight as float64 [C]; scale = weight invstd, shift = bias in
    y's dtype: the kernels apply (y - mean) scale + shift)),
    bn's running statistics updated in training mode as nn.BatchNorm2d does (bn_scale_shift)."""
    batch_stats = bn.training or bn.running_mean is None
    n = y.numel() // y.shape[1]
    update = bn.training and bn.track_running_stats and bn.running_mean is not None
    _check_bn(bn, batch_stats, n, y.shape, y.device, update)
    running = (bn.running_mean, bn.running_var, bn.num_batches_tracked) if update or not batch_stats else (None,) * 3
    return batch_stats, ops._call("bn_scale_shift", stats, n, bn.weight, bn.bias, *running, bn.momentum, bn.eps,
                                  batch_stats, y.dtype)
