"""Block-sparse (BSR) products with `tl.dot` on the nonzero blocks: where GPU tensor cores pay off.

W [N, K] is stored as BS x BS blocks (BS in 16/32/64; the edges are zero-padded when N or K is
not a multiple of BS): `crow` int64 [N/BS+1], `col` int32 [nnzb], `values` [nnzb, BS, BS], and
the transposed block index (`ccol`, `row_t`, `perm`) built once per mask (sparsetrain/bsr.py).

* `bsr_linear_forward`:     y  = x W^T + b     block row r:  y[:, r] += x[:, c] @ W_rc^T
* `bsr_linear_grad_input`:  dx = dy W          block col c:  dx[:, c] += dy[:, r] @ W_rc
* `bsr_linear_grad_weight`: dW_rc = dy[:, r]^T @ x[:, c]     only the stored blocks

Activations stay in their natural [B, features] layout (a BLOCK_M x BS tile is a coalesced 2-D
load). fp32 inputs use TF32 tensor cores only when PyTorch's fp32 CUDA matmuls may (its own rule:
`torch.backends.cuda.matmul.fp32_precision = "tf32"`, the legacy `allow_tf32`, or
`set_float32_matmul_precision("high")`); fp16/bf16 accumulate in fp32.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import (INTERPRET, autotune, cached, check_compressed, check_device, check_float, check_index, check_nnz,
                     check_perm, check_split, check_transposed, density_key, is_int, launch, max_index, num_sms,
                     pow2_bucket, row_order)

__all__ = ["bsr_linear_forward", "bsr_linear_grad_input", "bsr_linear_grad_weight", "block_rows"]

BSR_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_MM_CONFIGS = [
    triton.Config({"BLOCK_M": 32}, num_warps=2),
    triton.Config({"BLOCK_M": 64}, num_warps=4),
    triton.Config({"BLOCK_M": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 256}, num_warps=8, num_stages=3),
]


@autotune(_MM_CONFIGS, key=["NROWS", "M_KEY", "DENSITY_KEY", "BS"])
@triton.jit
def _bsr_mm_kernel(a, ptr, idx, perm, vals, order, c, bias, M, KD, ND, NROWS, M_KEY, DENSITY_KEY,
                   TRANS_W: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                   PRECISION: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr):
    """c[m, r*BS:(r+1)*BS] = sum_j a[m, idx[j]*BS:...] @ (W_j^T if TRANS_W else W_j) (+ bias),
    a [M, KD] and c [M, ND] row-major; block rows r = order[pid % NROWS] (most blocks first), row
    tiles pid // NROWS (one grid axis: CUDA's second and third stop at 65535)."""
    pid = tl.program_id(0).to(tl.int64)
    r = tl.load(order + pid % NROWS).to(tl.int64)
    offs_m = (pid // NROWS) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_s = tl.arange(0, BS)
    mmask = offs_m < M
    start = tl.load(ptr + r)
    end = tl.load(ptr + r + 1)
    acc = tl.zeros([BLOCK_M, BS], dtype=tl.float32)
    for j in range(start, end):
        kb = tl.load(idx + j).to(tl.int64)
        if HAS_PERM:
            q = tl.load(perm + j)
        else:
            q = j  # int64: the loop runs over int64 bounds from ptr
        offs_k = kb * BS + offs_s
        at = tl.load(a + offs_m[:, None] * KD + offs_k[None, :],
                     mask=mmask[:, None] & (offs_k[None, :] < KD), other=0.0)
        w = tl.load(vals + q * BS * BS + offs_s[:, None] * BS + offs_s[None, :])
        if TRANS_W:  # w^T[k, n] = W[n, k]
            w = tl.trans(w)
        acc += tl.dot(at, w, input_precision=PRECISION)
    offs_n = r * BS + offs_s
    if HAS_BIAS:
        acc += tl.load(bias + offs_n, mask=offs_n < ND, other=0.0).to(tl.float32)[None, :]
    tl.store(c + offs_m[:, None] * ND + offs_n[None, :], acc.to(c.dtype.element_ty),
             mask=mmask[:, None] & (offs_n[None, :] < ND))


_SDDMM_CONFIGS = [
    triton.Config({"BLOCK_M": 32}, num_warps=2),
    triton.Config({"BLOCK_M": 64}, num_warps=4),
    triton.Config({"BLOCK_M": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=3),
]


# (keyed on the block rows and the density bucket, as the other kernels: the exact block count re-tuned
# every pruning round)
@autotune(_SDDMM_CONFIGS, key=["NROWS", "M_KEY", "DENSITY_KEY", "BS", "SPLIT"], reset_to_zero=["out"])
@triton.jit
def _bsr_sddmm_kernel(dy, x, brow, idx, out, M, N, K, NROWS, M_KEY, DENSITY_KEY, SPLIT,
                      PRECISION: tl.constexpr, BS: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[j] = dy[:, r*BS:...]^T @ x[:, c*BS:...] for block j = (brow[j], idx[j]); the batch is
    cut into SPLIT slices (pid(1)) accumulated atomically when SPLIT > 1."""
    j = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    r = tl.load(brow + j).to(tl.int64)
    kb = tl.load(idx + j).to(tl.int64)
    offs_s = tl.arange(0, BS)
    offs_n = r * BS + offs_s
    offs_k = kb * BS + offs_s
    chunk = tl.cdiv(tl.cdiv(M, SPLIT), BLOCK_M) * BLOCK_M
    m_lo = s * chunk
    m_hi = tl.minimum(m_lo + chunk, M)
    acc = tl.zeros([BS, BS], dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mmask = offs_m < m_hi
        g = tl.load(dy + offs_m[:, None] * N + offs_n[None, :],
                    mask=mmask[:, None] & (offs_n[None, :] < N), other=0.0)  # [BLOCK_M, BS]
        xt = tl.load(x + offs_m[:, None] * K + offs_k[None, :],
                     mask=mmask[:, None] & (offs_k[None, :] < K), other=0.0)  # [BLOCK_M, BS]
        acc += tl.dot(tl.trans(g), xt, input_precision=PRECISION)
    ptrs = out + j * BS * BS + offs_s[:, None] * BS + offs_s[None, :]
    if SPLIT > 1:
        tl.atomic_add(ptrs, acc)
    else:
        tl.store(ptrs, acc.to(out.dtype.element_ty))


# ============================================================================ host side
def _precision(dtype: torch.dtype) -> str:
    """fp32: exact ("ieee") unless PyTorch allows TF32 matmuls; fp16/bf16: Triton's default."""
    return "tf32" if dtype != torch.float32 or _tf32_matmuls() else "ieee"


def _tf32_matmuls() -> bool:
    """Whether PyTorch's fp32 CUDA matmuls may use TF32: its fp32_precision setting ("none": the
    backends-wide one), which also reflects the legacy allow_tf32 and set_float32_matmul_precision;
    reading allow_tf32 itself raises once the new API has been used."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # (a torch before the fp32_precision API)
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def _check(values, tensors, name, index=()):
    """`index`: the block index tensors, which the kernels read on the values' device too."""
    check_device(values, *(t for t, _ in tensors), *index, name=name)
    check_float(values, "values", BSR_DTYPES)
    if values.dim() != 3 or values.shape[1] != values.shape[2] or values.shape[1] not in (16, 32, 64):
        raise ValueError(f"{name}: values must be [nnzb, BS, BS] with BS in 16/32/64, got {tuple(values.shape)}")
    for t, arg in tensors:
        check_float(t, arg, BSR_DTYPES, like=values)
        if t.dim() < 1:
            raise ValueError(f"{name}: {arg} must have at least 1 dimension")


# _interpreted_bf16: Triton's interpreter (3.8) keeps bf16 as its raw 16 bits and tl.dot multiplies
# those as integers (a result off by 1e10); on CPU the bf16 operands go in as fp32, which is what a
# GPU's tl.dot computes too (a product of two bf16 is exact in fp32, accumulated in fp32).
def _blocks(n: int, bs: int) -> int:
    return -(-n // bs)


def _check_block_count(ptr, ptr_name: str, what: str, features: int, bs: int) -> None:
    """The compressed index has one entry per block row (column) of a `features`-wide side in blocks of
    `bs`: a block size or a width that is not the weight's is refused (the kernel would mask or drop
    the rest, a silent wrong answer)."""
    have, need = ptr.numel() - 1, _blocks(features, bs)
    if have != need:
        raise ValueError(f"{ptr_name} has {have} block {what}s, but {features} features in blocks of {bs} make {need}")


def _check_width(t, arg: str, idx, idx_name: str, bs: int) -> None:
    """Every block index in `idx` must address a block of t's last dimension (largest entry read once per
    mask: max_index)."""
    k = t.shape[-1]
    if max_index(idx, idx_name) >= _blocks(k, bs):
        raise ValueError(f"{arg} has {k} features, fewer than the weight's {idx_name} address (block "
                         f"{max_index(idx, idx_name)} of {bs})")


def _check_features(features, name: str) -> None:
    """A width argument: a non-negative int (37.0 failed inside torch.empty, -1 made a negative size)."""
    integer = is_int(features)
    if not integer or features < 0:
        raise (ValueError if integer else TypeError)(
            f"{name} must be a non-negative int, got {features!r}")


def _check_exact(t, arg: str, features_name: str, features: int | None) -> None:
    """t's last dimension is `features` when that is given (the weight's exact width)."""
    if features is not None:
        _check_features(features, features_name)
    if features is not None and t.shape[-1] != features:
        raise ValueError(f"{arg} must have last dimension {features_name} = {features}, got shape {tuple(t.shape)}")


def _mm(a2, ptr, idx, vals, out_features, *, perm=None, bias=None, trans_w):
    """One program per block row (all rows, in length-sorted order: empty rows write zeros/bias)."""
    if INTERPRET and a2.dtype == torch.bfloat16:  # (_interpreted_bf16)
        return _mm(a2.float(), ptr, idx, vals.float(), out_features, perm=perm,
                   bias=None if bias is None else bias.float(), trans_w=trans_w).to(torch.bfloat16)
    M, KD = a2.shape
    BS, rows = vals.shape[1], ptr.numel() - 1
    if rows * BS < out_features:
        raise ValueError(f"block index covers {rows * BS} outputs, need {out_features}")
    c = torch.empty((M, out_features), dtype=a2.dtype, device=a2.device)
    if M == 0 or out_features == 0:
        return c
    grid = lambda m: (rows * triton.cdiv(M, m["BLOCK_M"]),)  # noqa: E731
    launch(_bsr_mm_kernel, grid, a2, ptr, idx, perm if perm is not None else ptr, vals, row_order(ptr), c,
           bias if bias is not None else vals, M, KD, out_features, rows, pow2_bucket(M),
           density_key(idx.numel(), rows), TRANS_W=trans_w, HAS_PERM=perm is not None,
           HAS_BIAS=bias is not None, PRECISION=_precision(a2.dtype), BS=BS)
    return c


def bsr_linear_forward(x, crow, col, values, bias, out_features: int, *, in_features: int | None = None):
    """y [..., N] = x W^T + b for the BSR weight (crow, col, values [nnzb, BS, BS]). The block index does not
    fix the weight's width to the column (its last column block may be padding): x's width is checked against
    the blocks `col` addresses, and against `in_features` exactly when it is given."""
    tensors = [(x, "x")] + ([(bias, "bias")] if bias is not None else [])
    _check(values, tensors, "bsr_linear_forward", (crow, col))
    check_index(crow, "crow_indices", torch.int64)
    check_index(col, "col_indices", torch.int32)
    check_compressed(crow, col, "crow_indices", "col_indices")
    check_nnz(values, "values", col.numel(), "blocks")
    BS = values.shape[1]
    _check_features(out_features, "out_features")
    _check_block_count(crow, "crow_indices", "row", out_features, BS)
    _check_exact(x, "x", "in_features", in_features)
    _check_width(x, "x", col, "col_indices", BS)
    if bias is not None and bias.shape != (out_features,):  # (the kernel reads out_features of it)
        raise ValueError(f"bsr_linear_forward: bias must have shape ({out_features},), got "
                         f"{tuple(bias.shape)}")
    K = x.shape[-1]
    y = _mm(x.reshape(math.prod(x.shape[:-1]), K).contiguous(), crow, col, values.contiguous(), out_features,
            bias=None if bias is None else bias.contiguous(), trans_w=True)
    return y.reshape(*x.shape[:-1], out_features).clone() if x.dim() != 2 else y  # (not a view)


def bsr_linear_grad_input(grad_out, ccol, row_t, perm, values, in_features: int, *, out_features: int | None = None):
    """dx [..., K] = dy W through the transposed block index (block j of column c: values[perm[j]]). grad_out's
    width is checked against the blocks `row_t` addresses, and against `out_features` exactly when it is given
    (a narrower grad_out inside the last block row read zeros there: a wrong dx)."""
    _check(values, [(grad_out, "grad_out")], "bsr_linear_grad_input", (ccol, row_t, perm))
    check_index(ccol, "ccol_indices", torch.int64)
    check_index(row_t, "row_indices_t", torch.int32)
    check_index(perm, "perm", torch.int64)
    check_compressed(ccol, row_t, "ccol_indices", "row_indices_t")
    nnzb = row_t.numel()
    check_nnz(values, "values", nnzb, "blocks")
    check_perm(perm, nnzb)
    check_transposed(ccol, row_t, perm)  # (a duplicate read one block twice, silently; once per mask)
    BS = values.shape[1]
    _check_features(in_features, "in_features")
    _check_block_count(ccol, "ccol_indices", "column", in_features, BS)
    _check_exact(grad_out, "grad_out", "out_features", out_features)
    _check_width(grad_out, "grad_out", row_t, "row_indices_t", BS)
    N = grad_out.shape[-1]
    dx = _mm(grad_out.reshape(math.prod(grad_out.shape[:-1]), N).contiguous(), ccol, row_t, values.contiguous(),
             in_features, perm=perm, trans_w=False)
    return dx.reshape(*grad_out.shape[:-1], in_features).clone() if grad_out.dim() != 2 else dx


def bsr_linear_grad_weight(grad_out, x, crow, col, block_size: int, *, split: int | None = None,
                           in_features: int | None = None, out_features: int | None = None):
    """dvalues [nnzb, BS, BS]: dW restricted to the stored blocks, dy[:, r]^T x[:, c] per block. x's and
    grad_out's widths are checked exactly against `in_features` / `out_features` when they are given (else
    against the blocks the index addresses: a wider one gave the padding a gradient, a narrower one zeros)."""
    check_device(x, grad_out, crow, col, name="bsr_linear_grad_weight")
    check_float(x, "x", BSR_DTYPES)
    check_float(grad_out, "grad_out", BSR_DTYPES, like=x, like_name="x")
    if not is_int(block_size) or block_size not in (16, 32, 64):  # (16.0 failed in torch.zeros)
        # (TypeError for a non-int, as BSR's check_block: 16.0 and True were ValueErrors before 2026-12-06)
        raise (ValueError if is_int(block_size) else TypeError)(f"block_size must be 16, 32 or 64, got {block_size!r}")
    block_size, split = int(block_size), check_split(split)  # (a numpy int: Triton refused it as BS, a constexpr)
    check_index(crow, "crow_indices", torch.int64)
    check_index(col, "col_indices", torch.int32)
    check_compressed(crow, col, "crow_indices", "col_indices")  # (block j of out is written, j < crow[-1])
    if x.dim() < 1 or grad_out.dim() < 1:
        raise ValueError(f"x and grad_out must have at least 1 dimension, got shapes {tuple(x.shape)}, "
                         f"{tuple(grad_out.shape)}")
    _check_exact(x, "x", "in_features", in_features)
    _check_exact(grad_out, "grad_out", "out_features", out_features)
    _check_block_count(crow, "crow_indices", "row", grad_out.shape[-1], block_size)
    _check_width(x, "x", col, "col_indices", block_size)
    if INTERPRET and x.dtype == torch.bfloat16:  # (_interpreted_bf16)
        return bsr_linear_grad_weight(grad_out.float(), x.float(), crow, col, block_size, split=split).to(x.dtype)
    N, K = grad_out.shape[-1], x.shape[-1]
    # (math.prod, not -1: a reshape of 0 elements cannot infer it)
    dy2 = grad_out.reshape(math.prod(grad_out.shape[:-1]), N).contiguous()
    x2 = x.reshape(math.prod(x.shape[:-1]), K).contiguous()
    M, nnzb, BS = x2.shape[0], col.numel(), block_size
    if grad_out.shape[:-1] != x.shape[:-1]:  # (not just as many rows: [2, 3] against [3, 2] paired other rows)
        raise ValueError(f"grad_out {tuple(grad_out.shape)} and x {tuple(x.shape)} differ in batch")
    if nnzb == 0 or M == 0:
        return torch.zeros((nnzb, BS, BS), dtype=x.dtype, device=x.device)
    if split is None:  # cut the batch when the blocks alone cannot fill the GPU
        split = max(1, min(triton.cdiv(M, 512), triton.cdiv(4 * num_sms(x.device), nnzb)))
    exact = split == 1 or x.dtype == torch.float32  # atomics accumulate in fp32
    out = (torch.empty if split == 1 else torch.zeros)(
        (nnzb, BS, BS), dtype=x.dtype if exact else torch.float32, device=x.device)
    brow = block_rows(crow)
    rows = crow.numel() - 1
    launch(_bsr_sddmm_kernel, lambda m: (nnzb, split), dy2, x2, brow, col, out, M, N, K, rows,
           pow2_bucket(M), density_key(nnzb, rows), split, PRECISION=_precision(x.dtype), BS=BS)
    return out if exact else out.to(x.dtype)


def block_rows(crow: torch.Tensor) -> torch.Tensor:
    """Block-row index of every stored block (int32), computed once per mask."""
    def make():
        rows = torch.arange(crow.numel() - 1, device=crow.device, dtype=torch.int32)
        return torch.repeat_interleave(rows, crow.diff())
    return cached("block_rows", crow, make)
