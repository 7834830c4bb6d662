"""The fused conv -> BatchNorm -> ReLU layer's ops on the Triton backend (engine/fused.py): the same
schemas as the C++ ones (csrc/cpu/bn_act.cpp, bn_scale_shift.cpp, sparse_conv2d.cpp), so the fused
layers keep their structure on a GPU.

* bn_act            one pass out = act((y - mean[c]) scale[c] + shift[c] (+ residual)) (+ the ReLU
                    states per neuron): a Triton kernel. Centred as the C++ kernels (bn_act.h's bn_pre).
* bn_scale_shift    the BN's constants from the conv epilogue's sums (sparse_conv2d_stats, a Triton
                    kernel in kernels/sparse_conv2d.py) and the running-statistics update: [C]-sized
                    torch ops.
* bn_act_backward, sparse_conv2d_bn_backward   the BatchNorm's two-pass gradient in torch ops (with
                    g the gradient masked by the ReLU after, N values per channel, x^ = (y - mean) invstd:
                    dbias = sum g, dweight = sum g x^, dy = w invstd (g - dbias / N - x^ dweight / N) with
                    batch statistics, w invstd g without), then the Triton conv backward on dy. The C++
                    op computes dy inside the conv's packing; here it is written out.

Deferred BatchNorms (in_mean/in_scale/in_shift/in_relu, in_sums, sums) are supported; a layer pooled in its
BN's pass (pool_indices) is not: the fused layers pool that way on the CPU engine only.
"""
from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl

from ._utils import (autotune, channel_vector, check_counts, check_device, check_float, dtype_name, flag_args, is_int,
                     launch, tensor_args)
from .sparse_conv2d import _plus, conv2d_grad_input, conv2d_grad_weight, deferred_bn, sparse_conv2d_backward

__all__ = ["bn_act", "bn_act_backward", "bn_scale_shift", "sparse_conv2d_bn_backward"]


@autotune([triton.Config({"BLOCK": 1024}, num_warps=4)], key=[])  # (one config: a memory-bound pass)
@triton.jit
def _bn_act_kernel(y, mean, scale, shift, res, out, counts, C, HW, N, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                   COUNTS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    c = (offs // HW) % C
    v = tl.load(y + offs, mask=m, other=0.0)
    v = (v - tl.load(mean + c, mask=m, other=0.0).to(v.dtype)) * tl.load(scale + c, mask=m, other=0.0) + \
        tl.load(shift + c, mask=m, other=0.0)
    if HAS_RES:
        v += tl.load(res + offs, mask=m, other=0.0)
    if RELU:
        v = tl.where(v < 0, 0.0, v)  # (NaN stays NaN, as through torch.relu)
    if COUNTS:  # neuron = (c, pixel) = offs modulo C * HW
        tl.atomic_add(counts + offs % (C * HW), (v > 0).to(tl.int64), mask=m)
    tl.store(out + offs, v, mask=m)


def _check_act(y, name: str = "y") -> None:
    check_float(y, name)
    if y.dim() < 2:
        raise ValueError(f"{name} must be [batch, channels, ...] (>= 2-D), got shape {list(y.shape)}")


def _check_like(t, y, name: str) -> None:
    """t has y's shape and dtype (the C++ ops' check_like and wording): never broadcast."""
    if t.shape != y.shape:
        raise ValueError(f"{name} must have the shape of y {list(y.shape)}, got {list(t.shape)}")
    if t.dtype != y.dtype:
        raise TypeError(f"{name} must have dtype {y.dtype}, got {t.dtype}")


def _check_bn_grad(grad_out, y, residual, scale, shift, weight, mean, invstd) -> None:
    """The BatchNorm backward's arguments, as the C++ ops' check_bn_grad: y [B, C, ...]; grad_out and the
    residual of y's shape and dtype; scale, shift [C] of y's dtype; weight, mean, invstd [C] float64.
    (The torch ops below would broadcast a 1-entry vector or another batch silently.)"""
    _check_act(y)
    _check_like(grad_out, y, "grad_out")
    C = y.shape[1]
    for t, name in ((scale, "scale"), (shift, "shift")):
        channel_vector(t, name, C, y)
    for t, name in ((weight, "weight"), (mean, "mean"), (invstd, "invstd")):
        channel_vector(t, name, C, y, torch.float64)
    if residual is not None:
        _check_like(residual, y, "residual")


def _per_channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, *([1] * (like.dim() - 2)))


@tensor_args("y mean scale shift residual? relu_counts?")
@flag_args("relu")
def bn_act(y, mean, scale, shift, residual, relu, relu_counts=None):
    """act((y - mean[c]) scale[c] + shift[c] (+ residual)), mean float64; relu_counts (int64 [C * H * W])
    += the samples with a positive output per neuron."""
    check_device(y, mean, scale, shift, residual, relu_counts, name="bn_act")
    _check_act(y)
    C = y.shape[1]
    mean = channel_vector(mean, "mean", C, y, torch.float64)
    scale, shift = channel_vector(scale, "scale", C, y), channel_vector(shift, "shift", C, y)
    if residual is not None:
        _check_like(residual, y, "residual")
    hw = math.prod(y.shape[2:])  # (per neuron plane; y may have an empty batch)
    counts = None
    if relu_counts is not None:
        check_counts(relu_counts, C * hw)
        counts = torch.zeros_like(relu_counts)
    yc = y.contiguous()
    out = torch.empty_like(yc)
    n = yc.numel()
    if n:
        launch(_bn_act_kernel, lambda m: (triton.cdiv(n, m["BLOCK"]),), yc, mean, scale, shift,
               residual.contiguous() if residual is not None else yc, out, counts if counts is not None else out,
               C, hw, n, HAS_RES=residual is not None, RELU=bool(relu), COUNTS=counts is not None)
    if counts is not None:
        relu_counts.add_(counts)
    return out


def _check_scale_shift(stats, count, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                       batch_stats, dtype) -> None:
    """The C++ op's checks, classes and wording (bn_scale_shift.cpp), every one before the first write:
    a refused call leaves the running buffers as they were."""
    if stats.dtype != torch.float64 or stats.dim() != 2 or stats.shape[0] != 2:
        raise (TypeError if stats.dtype != torch.float64 else ValueError)(
            f"stats must be a float64 tensor [2, C] (sum y, sum y^2), got {list(stats.shape)} "
            f"{dtype_name(stats.dtype)}")
    C = stats.shape[1]
    given = {"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var,
             "num_batches_tracked": num_batches_tracked}
    for name, t in list(given.items())[:4]:
        if t is not None and (not t.is_floating_point() or t.dim() != 1 or t.shape[0] != C):
            raise (TypeError if not t.is_floating_point() else ValueError)(
                f"{name} must be a 1-D floating tensor of {C} channels, got {list(t.shape)} {dtype_name(t.dtype)}")
    for name, t in given.items():
        if t is not None and t.device != stats.device:
            raise ValueError(f"bn_scale_shift: all tensors must be on one device, got {stats.device} and {t.device} "
                             f"({name})")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    if not batch_stats and running_mean is None:
        raise ValueError("running_mean and running_var are needed without batch_stats")
    # (the schema's int and floats, which this function, called directly or under use_backend("triton"), gets as
    # given: a count of True divided the sums by 1, 2.5 by 2.5, silently; a str eps failed inside a comparison)
    if not is_int(count):
        raise TypeError(f"count must be an int (values per channel), got {count!r}")
    for name, v in (("momentum", momentum), ("eps", eps)):
        if not (isinstance(v, numbers.Real) and not isinstance(v, bool) or name == "momentum" and v is None):
            raise TypeError(f"{name} must be a float{' or None' if name == 'momentum' else ''}, got {v!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    update = batch_stats and running_mean is not None
    if batch_stats and count < (2 if update else 1):
        raise ValueError(f"count must be >= {2 if update else 1} values per channel with batch statistics"
                         f"{' and a running update' if update else ''}, got {count}")
    if not update:
        return
    if not (running_mean.is_contiguous() and running_var.is_contiguous()):
        raise ValueError("running_mean and running_var must be contiguous")
    if momentum is None and num_batches_tracked is None:
        raise ValueError("num_batches_tracked is needed when momentum is None (the cumulative average)")
    if running_mean.dtype not in (torch.float32, torch.float64) or running_var.dtype != running_mean.dtype:
        raise TypeError(f"running_mean and running_var must both be float32 or both float64, got "
                        f"{dtype_name(running_mean.dtype)} and {dtype_name(running_var.dtype)}")
    nbt = num_batches_tracked
    if nbt is not None and (nbt.dtype != torch.int64 or nbt.numel() != 1):
        raise (TypeError if nbt.dtype != torch.int64 else ValueError)(
            f"num_batches_tracked must be a one-element int64 tensor (nn.BatchNorm2d's), got shape "
            f"{list(num_batches_tracked.shape)} {dtype_name(num_batches_tracked.dtype)}")
    if running_mean is running_var:
        raise ValueError("running_mean and running_var must be two tensors, got the same one twice")
    a, b = (t.data_ptr() for t in (running_mean, running_var))  # (both contiguous: byte ranges)
    na, nb = (t.numel() * t.element_size() for t in (running_mean, running_var))
    if a < b + nb and b < a + na:
        raise ValueError("running_mean and running_var must not share memory (views of one buffer would overwrite "
                         "each other), got overlapping tensors")


@tensor_args("stats weight? bias? running_mean? running_var? num_batches_tracked?")
@flag_args("batch_stats")
def bn_scale_shift(stats, count, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                   batch_stats, dtype):
    """(mean, invstd, weight as float64 [C]; scale = weight invstd, shift = bias in `dtype`, for the
    centred (y - mean) scale + shift) and the running update, as the C++ op (csrc/cpu/bn_scale_shift.cpp)."""
    _check_scale_shift(stats, count, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                       batch_stats, dtype)
    C = stats.shape[1]
    with torch.no_grad():
        if batch_stats:
            mean = stats[0] / count
            var = (stats[1] / count).clamp_min(0.0)  # (stats[1]: the centred sum (y - mean)^2)
        else:
            mean, var = running_mean.double(), running_var.double()
        invstd = torch.rsqrt(var + eps)
        w = weight.detach().double() if weight is not None else stats.new_ones(C)
        scale = w * invstd
        shift = bias.detach().double() if bias is not None else torch.zeros_like(scale)
        if batch_stats and running_mean is not None:
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            m = momentum if momentum is not None else 1.0 / float(num_batches_tracked)
            running_mean.mul_(1 - m).add_(mean.to(running_mean.dtype), alpha=m)
            running_var.mul_(1 - m).add_((var * (count / (count - 1))).to(running_var.dtype), alpha=m)
    return mean, invstd, w, scale.to(dtype), shift.to(dtype)


def _bn_grad(grad_out, y, residual, scale, shift, weight, mean, invstd, batch_stats, relu_after, relu_before,
             sums=None):
    """(dy, dweight, dbias, g masked by the ReLU after): the BatchNorm's two passes, written out."""
    ch = lambda t: _per_channel(t, y)  # noqa: E731
    g = grad_out
    if relu_after:
        pre = (y - ch(mean.to(y.dtype))) * ch(scale) + ch(shift) + (residual if residual is not None else 0)
        g = torch.where(pre > 0, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device))
    dims = [0] + list(range(2, y.dim()))
    if sums is not None:  # [C, 2] = sum g, sum g (y - mean), from the conv that produced grad_out
        db, s1 = sums[:, 0], sums[:, 1]
    else:
        g64 = g.double()
        db, s1 = g64.sum(dims), (g64 * (y.double() - ch(mean))).sum(dims)
    dw = s1 * invstd
    n = y.numel() // max(y.shape[1], 1)
    k = weight * invstd  # dy = k (g - db / N - x^ dw / N)
    if batch_stats and n:
        dy = ch(k) * (g.double() - ch(db / n) - (y.double() - ch(mean)) * ch(invstd * dw / n))
    else:
        dy = ch(k) * g.double()
    dy = dy.to(y.dtype)
    if relu_before:
        dy = torch.where(y > 0, dy, torch.zeros((), dtype=dy.dtype, device=dy.device))
    return dy, dw, db.clone(), g


@tensor_args("grad_out y residual? scale shift weight mean invstd")
@flag_args("batch_stats relu_after relu_before grad_residual")
def bn_act_backward(grad_out, y, residual, scale, shift, weight, mean, invstd, batch_stats, relu_after, relu_before,
                    grad_residual):
    """(dy, dweight, dbias, the residual's gradient or empty, sum dy [C] f64), as the C++ op."""
    check_device(grad_out, y, residual, scale, shift, weight, mean, invstd, name="bn_act_backward")
    _check_bn_grad(grad_out, y, residual, scale, shift, weight, mean, invstd)
    dy, dw, db, g = _bn_grad(grad_out, y, residual, scale, shift, weight, mean, invstd, batch_stats, relu_after,
                             relu_before)
    dres = g.contiguous() if grad_residual else y.new_empty(0)
    return dy, dw, db, dres, dy.double().sum([0] + list(range(2, y.dim())))


@tensor_args("grad_out x crow_indices col_indices values ccol_indices row_indices_t perm grad_input_add? y residual? "
              "scale shift weight mean invstd in_mean? in_scale? in_shift? sums? pool_indices?")
@flag_args("batch_stats relu_after relu_before grad_residual grad_input grad_values in_relu grad_bias in_sums")
def sparse_conv2d_bn_backward(grad_out, x, crow_indices, col_indices, values, ccol_indices, row_indices_t, perm,
                              kernel_size, stride, padding, grad_input_add, y, residual, scale, shift, weight, mean,
                              invstd, batch_stats, relu_after, relu_before, grad_residual, grad_input, grad_values,
                              in_mean=None, in_scale=None, in_shift=None, in_relu=False, grad_bias=True,
                              in_sums=False, sums=None, pool_indices=None):
    """(dx or empty, dvalues or empty, BN dweight, BN dbias, the residual's gradient or empty, sum dy
    or empty, the deferred BN's sums [C_in, 2] of dx or empty), as the C++ op (csrc/sparsetrain.cpp)."""
    if pool_indices is not None:
        raise ValueError("pool_indices: the Triton backend does not pool in the BatchNorm's pass (the fused layers "
                         "do so on the CPU engine only)")
    check_device(grad_out, x, y, residual, scale, shift, weight, mean, invstd, in_scale, in_shift, in_mean, sums,
                 name="sparse_conv2d_bn_backward")
    _check_bn_grad(grad_out, y, residual, scale, shift, weight, mean, invstd)
    if relu_before and residual is not None:
        raise ValueError("relu_before and a residual do not combine (conv -> ReLU -> BN -> + residual)")
    if grad_residual and (residual is None or not relu_after):
        raise ValueError("grad_residual needs a residual and relu_after (without the ReLU after, the residual's "
                         "gradient is grad_out itself)")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [batch, channels, height, width], got shape {list(x.shape)}")
    in_act = deferred_bn(x, in_mean, in_scale, in_shift, in_relu)
    if in_sums and in_act is None:
        raise ValueError("in_sums needs in_mean, in_scale and in_shift (the deferred BatchNorm whose sums it asks "
                         "for)")
    C = y.shape[1]
    if sums is not None and (sums.dtype != torch.float64 or sums.shape != (C, 2)):
        raise (TypeError if sums.dtype != torch.float64 else ValueError)(
            f"sums must be float64 [{C}, 2] (per channel sum g, sum g (y - mean)), got {dtype_name(sums.dtype)} "
            f"{list(sums.shape)}")
    dy, dw, db, g = _bn_grad(grad_out, y, residual, scale, shift, weight, mean, invstd, batch_stats, relu_after,
                             relu_before, sums)
    empty = y.new_empty(0)
    dres = g.contiguous() if grad_residual else empty
    dsum = dy.double().sum([0, 2, 3]) if grad_bias else mean.new_empty(0)
    dx, dv, xsums = empty, values.new_empty(0), mean.new_empty(0)
    xa = x
    if in_act is not None:  # x is the previous layer's BN input: the conv read its activation
        m, a, b, _ = in_act
        xa = (x - _per_channel(m.to(x.dtype), x)) * _per_channel(a, x) + _per_channel(b, x)
        xa = xa.clamp_min(0) if in_relu else xa
    dy = dy.contiguous()
    if grad_input and grad_values:
        dx, dv = sparse_conv2d_backward(dy, xa, crow_indices, col_indices, values, ccol_indices, row_indices_t, perm,
                                        kernel_size, stride, padding, grad_input_add)
    elif grad_input:  # (the transposed index checked against the CSR, as by the C++ op)
        dx = _plus(conv2d_grad_input(dy, ccol_indices, row_indices_t, perm, values, list(x.shape[2:]), kernel_size,
                                     stride, padding, (crow_indices, col_indices)), grad_input_add)
    elif grad_values:
        dv = conv2d_grad_weight(dy, xa, crow_indices, col_indices, kernel_size, stride, padding)
    if in_sums and grad_input:  # the deferred BN's first-pass sums, over dx masked by its ReLU
        gx = torch.where(xa > 0, dx, torch.zeros((), dtype=dx.dtype, device=dx.device)) if in_relu else dx
        gx = gx.double()
        xsums = torch.stack([gx.sum((0, 2, 3)), (gx * (x.double() - _per_channel(in_mean, x))).sum((0, 2, 3))], 1)
    return dx, dv, dw, db, dres, dsum, xsums
