"""Triton kernels for SparseConv2d: direct (implicit-GEMM) convolution over a CSR weight.

W [O, C, kh, kw] is CSR [O, C*kh*kw] (column c*kh*kw + i*kw + j). Nothing like im2col is ever
materialised: each program gathers the shifted input (or output-gradient) pixels its nonzeros
need straight from the NCHW tensors, so the products read and write the activations and the
sparse weight only.

* forward     y[b, o, p] = sum_{nz (c,i,j) of row o} w * x[b, c, p*s - pad + (i, j)]  (+ bias[o])
              program = (tile of BLOCK_S output pixels over (b, oh, ow), output channel o).
              sparse_conv2d_stats (a fused conv -> BN layer): the epilogue also applies a ReLU, adds
              the tile's sum y and sum y^2 to the channel's float64 statistics and counts y > 0 per
              neuron (atomics); x may be read through a deferred BN, act(scale[c] x + shift[c]).
* grad input  dx[b, c, q] = sum_{taps (i,j)} sum_{o} w[o,c,i,j] * dy[b, o, (q + pad - (i,j)) / s]
              organised by input channel through the transposed (CSC) index, so no two
              programs write the same pixel (no atomics); a tap contributes only where
              q + pad - (i,j) is a non-negative multiple of the stride (stride 2 included).
* grad weight dw[p] = sum_{b, pixels} dy[b, o, .] * x[b, c, shifted]  at the nonzeros only;
              program = (output channel o, slice of the pixels), atomics when sliced.

Channels run in an order sorted by nonzero count (computed once per mask, longest first), so a
skewed mask does not leave one program with all the work. Dilation 1, groups 1, fp32/fp64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (FLOAT_DTYPES, HALF_DTYPES, acc_dtype, autotune, cached, centre_stats, channel_vector,
                     check_activation, check_compressed, check_conv_args, check_counts, check_device, check_float,
                     check_index, check_ints, check_perm, check_split, check_transposed, check_values,
                     conv_args as _args, conv_geometry as _geometry, density_key, dtype_name, flag_args, launch,
                     max_index, num_sms, pow2_bucket, row_order, tensor_args)

__all__ = ["conv2d_forward", "conv2d_grad_input", "conv2d_grad_weight", "sparse_conv2d", "sparse_conv2d_stats",
           "sparse_conv2d_grad_input", "sparse_conv2d_grad_weight", "sparse_conv2d_backward"]

_CONFIGS = [
    triton.Config({"BLOCK_P": 8, "BLOCK_S": 64}, num_warps=2),
    triton.Config({"BLOCK_P": 16, "BLOCK_S": 64}, num_warps=4),
    triton.Config({"BLOCK_P": 8, "BLOCK_S": 128}, num_warps=4),
    triton.Config({"BLOCK_P": 4, "BLOCK_S": 256}, num_warps=4),
    triton.Config({"BLOCK_P": 16, "BLOCK_S": 256}, num_warps=8),
]


# (stats and counts are fresh zeros the kernel adds to: zeroed between autotuning runs)
@autotune(_CONFIGS, key=["O", "S_KEY", "DENSITY_KEY", "KHW", "SH"], reset_to_zero=["stats", "counts"])
@triton.jit
def _conv_fwd_kernel(x, ptr, idx, vals, order, bias, y, stats, in_mean, in_scale, in_shift, counts,
                     C, H, W, O, OH, OW, KH, KW, SH, SW, PH, PW,
                     S, S_KEY, DENSITY_KEY, KHW, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, STATS: tl.constexpr,
                     IN_ACT: tl.constexpr, IN_RELU: tl.constexpr, COUNTS: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
    # one grid axis, pixel tiles then channels (CUDA's second stops at 65535 programs: channels there failed)
    pid, tiles = tl.program_id(0).to(tl.int64), tl.cdiv(S, BLOCK_S)
    o = tl.load(order + pid // tiles).to(tl.int64)
    offs = (pid % tiles) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = offs < S
    b = offs // (OH * OW)
    rem = offs % (OH * OW)
    oh = rem // OW
    ow = rem % OW
    start = tl.load(ptr + o)
    end = tl.load(ptr + o + 1)
    acc = tl.zeros([BLOCK_S], dtype=vals.dtype.element_ty)  # (fp32 for bf16/fp16 activations)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pmask = offs_p < end
        k = tl.load(idx + offs_p, mask=pmask, other=0).to(tl.int64)
        v = tl.load(vals + offs_p, mask=pmask, other=0.0)
        c = k // (KH * KW)
        i = (k // KW) % KH
        j = k % KW
        ih = oh[None, :] * SH - PH + i[:, None]
        iw = ow[None, :] * SW - PW + j[:, None]
        ok = pmask[:, None] & smask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        tile = tl.load(x + ((b[None, :] * C + c[:, None]) * H + ih) * W + iw, mask=ok, other=0.0).to(v.dtype)
        if IN_ACT:  # x is the previous layer's BN input: read act((x - mean[c]) scale[c] + shift[c]); padding 0
            mu = tl.load(in_mean + c, mask=pmask, other=0.0).to(v.dtype)  # (centred: bn_act.h's bn_pre)
            a = tl.load(in_scale + c, mask=pmask, other=0.0).to(v.dtype)
            sh = tl.load(in_shift + c, mask=pmask, other=0.0).to(v.dtype)
            tile = (tile - mu[:, None]) * a[:, None] + sh[:, None]
            if IN_RELU:
                tile = tl.where(tile < 0, 0.0, tile)
            tile = tl.where(ok, tile, 0.0)
        acc += tl.sum(v[:, None] * tile, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias + o)
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)  # (NaN stays NaN, as through torch.relu)
    if STATS:  # the BatchNorm's batch statistics while the tile is in registers: sum y, sum y^2 (float64)
        a64 = tl.where(smask, acc, 0.0).to(tl.float64)
        tl.atomic_add(stats + o, tl.sum(a64, axis=0))
        tl.atomic_add(stats + O + o, tl.sum(a64 * a64, axis=0))
    if COUNTS:  # the entropy's ReLU states: per output neuron (o, pixel), the samples with y > 0
        tl.atomic_add(counts + o * (OH * OW) + rem, (acc > 0).to(tl.int64), mask=smask)
    tl.store(y + (b * O + o) * (OH * OW) + rem, acc.to(y.dtype.element_ty), mask=smask)


@autotune(_CONFIGS, key=["C", "S_KEY", "DENSITY_KEY", "KHW", "SH"])
@triton.jit
def _conv_dgrad_kernel(dy, cptr, rows, perm, vals, order, dx, C, H, W, O, OH, OW, KH, KW, SH, SW, PH, PW,
                       S, S_KEY, DENSITY_KEY, KHW, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
    pid, tiles = tl.program_id(0).to(tl.int64), tl.cdiv(S, BLOCK_S)  # (one grid axis, as the forward's)
    c = tl.load(order + pid // tiles).to(tl.int64)
    offs = (pid % tiles) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = offs < S
    b = offs // (H * W)
    rem = offs % (H * W)
    ih = rem // W
    iw = rem % W
    acc = tl.zeros([BLOCK_S], dtype=vals.dtype.element_ty)
    for t in range(0, KH * KW):  # one tap (i, j) = one CSC column: its shift is shared
        i = t // KW
        j = t % KW
        hn = ih + PH - i
        wn = iw + PW - j
        oh = hn // SH
        ow = wn // SW
        ok = smask & (hn >= 0) & (wn >= 0) & (hn % SH == 0) & (wn % SW == 0) & (oh < OH) & (ow < OW)
        start = tl.load(cptr + c * KHW + t)
        end = tl.load(cptr + c * KHW + t + 1)
        for p0 in range(start, end, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            pmask = offs_p < end
            o = tl.load(rows + offs_p, mask=pmask, other=0).to(tl.int64)
            q = tl.load(perm + offs_p, mask=pmask, other=0)
            v = tl.load(vals + q, mask=pmask, other=0.0)
            tile = tl.load(dy + ((b[None, :] * O + o[:, None]) * OH + oh[None, :]) * OW + ow[None, :],
                           mask=pmask[:, None] & ok[None, :], other=0.0)
            acc += tl.sum(v[:, None] * tile.to(v.dtype), axis=0)
    tl.store(dx + (b * C + c) * (H * W) + rem, acc.to(dx.dtype.element_ty), mask=smask)


@autotune(_CONFIGS, key=["O", "S_KEY", "DENSITY_KEY", "KHW", "SH", "SPLIT"], reset_to_zero=["out"])
@triton.jit
def _conv_wgrad_kernel(dy, x, ptr, idx, order, out, C, H, W, O, OH, OW, KH, KW, SH, SW, PH, PW,
                       S, S_KEY, DENSITY_KEY, KHW, SPLIT, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
    o = tl.load(order + tl.program_id(0)).to(tl.int64)
    chunk = tl.cdiv(tl.cdiv(S, SPLIT), BLOCK_S) * BLOCK_S
    s_lo = tl.program_id(1).to(tl.int64) * chunk
    s_hi = tl.minimum(s_lo + chunk, S)
    start = tl.load(ptr + o)
    end = tl.load(ptr + o + 1)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pmask = offs_p < end
        k = tl.load(idx + offs_p, mask=pmask, other=0).to(tl.int64)
        c = k // (KH * KW)
        i = (k // KW) % KH
        j = k % KW
        acc = tl.zeros([BLOCK_P], dtype=out.dtype.element_ty)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs = s0 + tl.arange(0, BLOCK_S)
            smask = offs < s_hi
            b = offs // (OH * OW)
            rem = offs % (OH * OW)
            oh = rem // OW
            ow = rem % OW
            g = tl.load(dy + (b * O + o) * (OH * OW) + rem, mask=smask, other=0.0).to(out.dtype.element_ty)
            ih = oh[None, :] * SH - PH + i[:, None]
            iw = ow[None, :] * SW - PW + j[:, None]
            ok = pmask[:, None] & smask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            tile = tl.load(x + ((b[None, :] * C + c[:, None]) * H + ih) * W + iw, mask=ok, other=0.0)
            acc += tl.sum(tile.to(out.dtype.element_ty) * g[None, :], axis=1)
        if SPLIT > 1:
            tl.atomic_add(out + offs_p, acc, mask=pmask)
        else:
            tl.store(out + offs_p, acc, mask=pmask)


# ============================================================================ host side
def _check_x(x, name, values=None):
    if values is not None:
        check_activation(x, name, values)
    else:
        check_float(x, name, FLOAT_DTYPES + HALF_DTYPES)
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D NCHW, got shape {tuple(x.shape)}")


def conv2d_forward(x, crow, col, values, kernel_size, stride, padding, bias=None, *, relu=False, stats=None,
                   in_act=None, counts=None):
    """y [B, O, OH, OW] = conv2d(x, W) (+ bias) for the CSR weight (crow, col, values); relu: relu(y).
    stats (float64 [2, O], zeros): sum y and sum y^2 per channel are added to it; in_act (scale [C],
    shift [C], relu): the conv reads act(scale[c] x + shift[c]); counts (int64 [O * OH * OW], zeros):
    per output neuron, the samples with y > 0 are added to it (sparse_conv2d_stats's epilogue)."""
    check_device(x, crow, col, values, bias, name="sparse_conv2d")  # (the kernel reads bias)
    check_conv_args(kernel_size, stride, padding)
    check_index(crow, "crow_indices", torch.int64)
    check_index(col, "col_indices", torch.int32)
    check_compressed(crow, col, "crow_indices", "col_indices")
    check_values(values, col.numel())
    _check_x(x, "x", values)
    _check_cols(x, col, kernel_size)
    O = crow.numel() - 1
    g = _geometry(x.shape, O, kernel_size, stride, padding)
    if bias is not None:
        check_float(bias, "bias", like=values)
        if bias.shape != (O,):
            raise ValueError(f"bias must have shape [{O}], got {tuple(bias.shape)}")
    B = x.shape[0]
    y = torch.empty((B, O, g["OH"], g["OW"]), dtype=x.dtype, device=x.device)
    S = B * g["OH"] * g["OW"]
    if S == 0 or O == 0:
        return y
    grid = lambda m: (triton.cdiv(S, m["BLOCK_S"]) * O,)  # noqa: E731  (2^31 - 1: fewer than y's elements)
    in_mean, in_scale, in_shift, in_relu = in_act or (None, None, None, False)
    # unused pointers: stats and counts (zeroed between autotuning runs) stand in as y, which the
    # chosen config's run writes anyway, never as the weight's values
    launch(_conv_fwd_kernel, grid, x.contiguous(), crow, col, values.contiguous(), row_order(crow),
           bias.contiguous() if bias is not None else values, y, y if stats is None else stats,
           *(values if t is None else t for t in (in_mean, in_scale, in_shift)),
           y if counts is None else counts, *_args(g), S, pow2_bucket(S),
           density_key(col.numel(), O), g["KH"] * g["KW"], HAS_BIAS=bias is not None, RELU=bool(relu),
           STATS=stats is not None, IN_ACT=in_act is not None, IN_RELU=bool(in_relu), COUNTS=counts is not None)
    return y


def conv2d_grad_input(grad_out, ccol, row_t, perm, values, input_size, kernel_size, stride, padding, csr=()):
    """dx [B, C, H, W] (input_size = (H, W)) by input channel through the CSC index; csr: (crow, col), whose
    transposed index it must be (without: perm a permutation)."""
    check_device(grad_out, ccol, row_t, perm, values, name="sparse_conv2d_grad_input")
    check_conv_args(kernel_size, stride, padding)
    check_index(ccol, "ccol_indices", torch.int64)
    check_index(row_t, "row_indices_t", torch.int32)
    check_index(perm, "perm", torch.int64)
    check_compressed(ccol, row_t, "ccol_indices", "row_indices_t")
    nnz = row_t.numel()  # (the C++ op's order: values, then perm, against the transposed index's nnz)
    check_values(values, nnz)
    check_perm(perm, nnz)
    _check_x(grad_out, "grad_out", values)
    B, O = grad_out.shape[:2]
    if max_index(row_t, "row_indices_t") >= O:
        raise ValueError(f"grad_out has {O} channels, fewer than the weight's output rows (row_indices_t)")
    check_transposed(ccol, row_t, perm, *csr, name="sparse_conv2d_grad_input")  # (the C++ op's order: after ranges)
    KH, KW = (int(v) for v in kernel_size)
    cols = ccol.numel() - 1
    if cols % (KH * KW):
        raise ValueError(f"the weight has {cols} columns, not a multiple of kh*kw = {KH * KW}")
    C = cols // (KH * KW)
    if not hasattr(input_size, "__len__") or len(input_size) != 2:
        raise ValueError(f"input_size must have 2 entries, got {input_size}")
    check_ints(input_size, "input_size")
    H, W = (int(v) for v in input_size)
    g = _geometry((B, C, H, W), O, kernel_size, stride, padding)
    if (g["OH"], g["OW"]) != tuple(grad_out.shape[2:]):
        raise ValueError(f"grad_out spatial size {tuple(grad_out.shape[2:])} does not match input {H}x{W}")
    dx = torch.empty((B, C, H, W), dtype=grad_out.dtype, device=grad_out.device)
    S = B * H * W
    if S == 0 or C == 0:
        return dx
    # (per tap count too: one index read as a 3x3 conv and as a 1x1 one groups its columns otherwise)
    order = cached(f"channel_order{KH * KW}", ccol, lambda: row_order(ccol[::KH * KW].contiguous()))
    grid = lambda m: (triton.cdiv(S, m["BLOCK_S"]) * C,)  # noqa: E731
    launch(_conv_dgrad_kernel, grid, grad_out.contiguous(), ccol, row_t, perm, values.contiguous(), order, dx,
           *_args(g), S, pow2_bucket(S), density_key(row_t.numel(), C), KH * KW)
    return dx


def conv2d_grad_weight(grad_out, x, crow, col, kernel_size, stride, padding, *, split: int | None = None):
    """dvalues [nnz]: the weight gradient at the nonzeros only."""
    check_device(grad_out, x, crow, col, name="sparse_conv2d_grad_weight")
    check_conv_args(kernel_size, stride, padding)
    check_index(crow, "crow_indices", torch.int64)
    check_index(col, "col_indices", torch.int32)
    check_compressed(crow, col, "crow_indices", "col_indices")  # (the kernel writes dvalues[p], p < crow[-1])
    _check_x(x, "x")
    _check_cols(x, col, kernel_size)
    if grad_out.dtype != x.dtype:
        raise TypeError(f"grad_out must have the dtype of x ({x.dtype}), got {grad_out.dtype}")
    _check_x(grad_out, "grad_out")
    O, nnz = crow.numel() - 1, col.numel()
    g = _geometry(x.shape, O, kernel_size, stride, padding)
    B = x.shape[0]
    if tuple(grad_out.shape) != (B, O, g["OH"], g["OW"]):
        raise ValueError(f"grad_out must have shape {(B, O, g['OH'], g['OW'])}, got {tuple(grad_out.shape)}")
    S, split = B * g["OH"] * g["OW"], check_split(split)
    nonempty = cached("nonempty_rows", crow, lambda: int((crow.diff() > 0).sum()))
    if split is None:
        split = max(1, min(triton.cdiv(S, 1024), triton.cdiv(4 * num_sms(x.device), max(nonempty, 1))))
    out = (torch.zeros if split > 1 else torch.empty)(nnz, dtype=acc_dtype(x.dtype), device=x.device)
    if nnz == 0 or S == 0:
        return out.zero_()
    launch(_conv_wgrad_kernel, lambda m: (nonempty, split), grad_out.contiguous(), x.contiguous(), crow, col,
           row_order(crow)[:nonempty], out, *_args(g), S, pow2_bucket(S), density_key(nnz, O),
           g["KH"] * g["KW"], split)
    return out


# ============================================================================ op signatures
# Argument order of the `sparsetrain::sparse_conv2d*` schemas in csrc/sparsetrain.cpp.
def _check_channels(t, name: str, ccol, kernel_size) -> None:
    """The weight's geometry (the transposed index has C*kh*kw columns) fixes the input channels."""
    c = (ccol.numel() - 1) // (int(kernel_size[0]) * int(kernel_size[1]))
    if t.dim() == 4 and t.shape[1] != c:
        raise ValueError(f"{name} has {t.shape[1]} channels but the weight expects {c}")


def _check_cols(x, col, kernel_size) -> None:
    """Without the transposed index: every column index must address a channel of x."""
    if x.dim() == 4 and max_index(col, "col_indices") >= x.shape[1] * int(kernel_size[0]) * int(kernel_size[1]):
        raise ValueError(f"x has {x.shape[1]} channels, fewer than the weight's column indices address")


@tensor_args("x crow_indices col_indices values ccol_indices row_indices_t perm bias?")
def sparse_conv2d(x, crow_indices, col_indices, values, ccol_indices, row_indices_t, perm,
                  kernel_size, stride, padding, bias=None):
    check_conv_args(kernel_size, stride, padding)
    _check_channels(x, "x", ccol_indices, kernel_size)
    _check_cols(x, col_indices, kernel_size)
    return conv2d_forward(x, crow_indices, col_indices, values, kernel_size, stride, padding, bias)


def deferred_bn(x, in_mean, in_scale, in_shift, in_relu):
    """(mean float64, scale, shift of x's dtype, relu) of a BatchNorm deferred into an op's input, checked as
    the C++ ops' check_in_act, or None without one."""
    if not (in_mean is None) == (in_scale is None) == (in_shift is None):
        raise ValueError("in_mean, in_scale and in_shift must be given together (the deferred BatchNorm)")
    if in_scale is None:
        return None
    _check_x(x, "x")  # (4-D before its channels are read: a 1-D x was an IndexError, a 3-D one "in_mean must have")
    c = x.shape[1]
    return (channel_vector(in_mean, "in_mean", c, x, torch.float64), channel_vector(in_scale, "in_scale", c, x),
            channel_vector(in_shift, "in_shift", c, x), in_relu)


@tensor_args("x crow_indices col_indices values ccol_indices row_indices_t perm bias? in_mean? in_scale? in_shift? "
              "relu_counts?")
@flag_args("relu in_relu")
def sparse_conv2d_stats(x, crow_indices, col_indices, values, ccol_indices, row_indices_t, perm,
                        kernel_size, stride, padding, bias, relu, in_mean=None, in_scale=None, in_shift=None,
                        in_relu=False, relu_counts=None):
    """(y, stats float64 [2, O]): the conv (relu'd with `relu`) and its per-channel sum y and centred sum
    (y - mean)^2, from sum y^2 taken in the epilogue (an ill-conditioned fp64 channel summed again: centre_stats);
    with in_mean/in_scale/in_shift the conv reads act((x - in_mean) in_scale + in_shift) (a deferred
    BatchNorm); relu_counts (int64, one per output neuron) += the samples with y > 0."""
    check_conv_args(kernel_size, stride, padding)
    _check_channels(x, "x", ccol_indices, kernel_size)
    _check_cols(x, col_indices, kernel_size)
    if x.dtype != values.dtype:  # (the fused layers run without autocast)
        raise TypeError(f"x must have the dtype of values ({values.dtype}), got {x.dtype}")
    in_act = deferred_bn(x, in_mean, in_scale, in_shift, in_relu)
    O = crow_indices.numel() - 1
    stats = torch.zeros((2, O), dtype=torch.float64, device=x.device)
    counts = None
    if relu_counts is not None:
        g = _geometry(x.shape, O, kernel_size, stride, padding)
        check_counts(relu_counts, O * g["OH"] * g["OW"], "output neuron")
        check_device(x, relu_counts, name="sparse_conv2d_stats")  # (the kernel adds into a copy on its device)
        counts = torch.zeros_like(relu_counts)
    y = conv2d_forward(x, crow_indices, col_indices, values, kernel_size, stride, padding, bias, relu=relu,
                       stats=stats, in_act=in_act, counts=counts)
    if counts is not None:
        relu_counts.add_(counts)
    return y, centre_stats(y, crow_indices, stats)


def _plus(dx, grad_input_add):
    """dx + grad_input_add (the schemas' optional gradient of x from another branch; the C++ kernel
    adds it in its epilogue, here one elementwise pass after the kernel)."""
    if grad_input_add is None:
        return dx
    if grad_input_add.dtype != dx.dtype:
        raise TypeError(f"grad_input_add must have dtype {dtype_name(dx.dtype)}, got "
                        f"{dtype_name(grad_input_add.dtype)}")
    if grad_input_add.shape != dx.shape:
        raise ValueError(f"grad_input_add must have the input's shape {list(dx.shape)}, got "
                         f"{list(grad_input_add.shape)}")
    check_device(dx, grad_input_add, name="sparse_conv2d grad_input_add")
    return dx.add_(grad_input_add)


@tensor_args("grad_out ccol_indices row_indices_t perm values grad_input_add?")
def sparse_conv2d_grad_input(grad_out, ccol_indices, row_indices_t, perm, values, input_size,
                             kernel_size, stride, padding, grad_input_add=None):
    return _plus(conv2d_grad_input(grad_out, ccol_indices, row_indices_t, perm, values, input_size,
                                   kernel_size, stride, padding), grad_input_add)


@tensor_args("grad_out x crow_indices col_indices")
def sparse_conv2d_grad_weight(grad_out, x, crow_indices, col_indices, kernel_size, stride, padding):
    check_conv_args(kernel_size, stride, padding)
    _check_cols(x, col_indices, kernel_size)
    return conv2d_grad_weight(grad_out, x, crow_indices, col_indices, kernel_size, stride, padding)


@tensor_args("grad_out x crow_indices col_indices values ccol_indices row_indices_t perm grad_input_add?")
def sparse_conv2d_backward(grad_out, x, crow_indices, col_indices, values, ccol_indices, row_indices_t,
                           perm, kernel_size, stride, padding, grad_input_add=None):
    check_conv_args(kernel_size, stride, padding)
    _check_channels(x, "x", ccol_indices, kernel_size)
    _check_cols(x, col_indices, kernel_size)
    dx = _plus(conv2d_grad_input(grad_out, ccol_indices, row_indices_t, perm, values, x.shape[2:],
                                 kernel_size, stride, padding, (crow_indices, col_indices)), grad_input_add)
    dw = conv2d_grad_weight(grad_out, x, crow_indices, col_indices, kernel_size, stride, padding)
    return dx, dw
