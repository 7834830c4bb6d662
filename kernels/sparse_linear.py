"""Triton kernels for SparseLinear with an unstructured CSR weight W [N, K] (N = out features).

Same signatures as the `sparsetrain::sparse_linear*` op schemas (csrc/sparsetrain.cpp):

* `sparse_linear`:             y = x W^T + b          row-split CSR SpMM
* `sparse_linear_grad_input`:  dx = dy W              the same SpMM over the transposed (CSC)
                                                      index the schema carries (built once per
                                                      pattern by the CSR), values read through `perm`
* `sparse_linear_grad_weight`: dW[p] = <dy[:, row p], x[:, col p]>   SDDMM at the nonzeros only

Layout: activations are used batch-minor (x^T [K, B], y^T [N, B]), so the nonzero w[n, k] of a
row turns into a contiguous, vectorised load of x^T[k, b0:b0+BLOCK_B]. A program takes ROWS
sparse rows (from a length-sorted order computed once per mask: one launch for every row, the
longest rows first, similar lengths together) and BLOCK_B batch columns, and consumes BLOCK_P
nonzeros per step as a [BLOCK_P, BLOCK_B] gathered tile. No tensor cores here: an unstructured
row has no dense tile for `tl.dot`; block-sparse weights (kernels/bsr_matmul.py) do.
Autotuning (GPU only) is keyed on the output rows, the batch bucket and the mean row length.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import (FLOAT_DTYPES, HALF_DTYPES, acc_dtype, autotune, cached, check_activation, check_compressed,
                     check_device, check_float, check_index, check_nnz, check_perm, check_split, check_transposed,
                     density_key, launch, max_index, num_sms, pow2_bucket, row_order, tensor_args)

__all__ = ["sparse_linear", "sparse_linear_grad_input", "sparse_linear_grad_weight", "csr_spmm", "csr_sddmm"]

_SPMM_CONFIGS = [
    triton.Config({"ROWS": 1, "BLOCK_P": 16, "BLOCK_B": 32}, num_warps=2),
    triton.Config({"ROWS": 1, "BLOCK_P": 8, "BLOCK_B": 64}, num_warps=2),
    triton.Config({"ROWS": 1, "BLOCK_P": 16, "BLOCK_B": 128}, num_warps=4),
    triton.Config({"ROWS": 2, "BLOCK_P": 8, "BLOCK_B": 128}, num_warps=4),
    triton.Config({"ROWS": 4, "BLOCK_P": 4, "BLOCK_B": 128}, num_warps=4),
    triton.Config({"ROWS": 1, "BLOCK_P": 32, "BLOCK_B": 256}, num_warps=8),
    triton.Config({"ROWS": 4, "BLOCK_P": 4, "BLOCK_B": 256}, num_warps=4),
]


@autotune(_SPMM_CONFIGS, key=["N", "B_KEY", "DENSITY_KEY"])
@triton.jit
def _csr_spmm_kernel(ptr, idx, vals, perm, order, xt, yt, bias, N, B, B_KEY, DENSITY_KEY,
                     HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
    """yt[n, b] = sum_p vals[p] * xt[idx[p], b] (+ bias[n]) over p in [ptr[n], ptr[n+1]). One grid
    axis (CUDA's second and third stop at 65535): program = row block + blocks * batch tile, the
    row blocks of one batch tile next to each other (they share its columns of xt in L2)."""
    blocks = tl.cdiv(N, ROWS)
    pid_r = tl.program_id(0) % blocks
    offs_b = (tl.program_id(0) // blocks) * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = offs_b < B
    for r in tl.static_range(ROWS):
        i = pid_r * ROWS + r
        live = i < N
        n = tl.load(order + i, mask=live, other=0).to(tl.int64)
        start = tl.load(ptr + n)
        end = tl.where(live, tl.load(ptr + n + 1), start)
        acc = tl.zeros([BLOCK_B], dtype=vals.dtype.element_ty)  # (fp32 for bf16/fp16 activations)
        for p0 in range(start, end, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            pmask = offs_p < end
            cols = tl.load(idx + offs_p, mask=pmask, other=0).to(tl.int64)
            if HAS_PERM:
                q = tl.load(perm + offs_p, mask=pmask, other=0)
                v = tl.load(vals + q, mask=pmask, other=0.0)
            else:
                v = tl.load(vals + offs_p, mask=pmask, other=0.0)
            tile = tl.load(xt + cols[:, None] * B + offs_b[None, :],
                           mask=pmask[:, None] & bmask[None, :], other=0.0)
            acc += tl.sum(v[:, None] * tile.to(v.dtype), axis=0)
        if HAS_BIAS:
            acc += tl.load(bias + n)
        tl.store(yt + n * B + offs_b, acc.to(yt.dtype.element_ty), mask=bmask & live)


_SDDMM_CONFIGS = [
    triton.Config({"BLOCK_P": 16, "BLOCK_B": 32}, num_warps=2),
    triton.Config({"BLOCK_P": 8, "BLOCK_B": 128}, num_warps=4),
    triton.Config({"BLOCK_P": 16, "BLOCK_B": 128}, num_warps=4),
    triton.Config({"BLOCK_P": 32, "BLOCK_B": 64}, num_warps=4),
    triton.Config({"BLOCK_P": 4, "BLOCK_B": 256}, num_warps=4),
]


@autotune(_SDDMM_CONFIGS, key=["N", "B_KEY", "DENSITY_KEY", "SPLIT"], reset_to_zero=["out"])
@triton.jit
def _csr_sddmm_kernel(ptr, idx, order, dyt, xt, out, N, B, B_KEY, DENSITY_KEY, SPLIT,
                      BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
    """out[p] = sum_b dyt[n, b] * xt[idx[p], b] for the nonzeros p of row n = order[pid(0)];
    the batch is cut into SPLIT slices (pid(1)), accumulated atomically when SPLIT > 1."""
    n = tl.load(order + tl.program_id(0)).to(tl.int64)
    s = tl.program_id(1)
    start = tl.load(ptr + n)
    end = tl.load(ptr + n + 1)
    chunk = tl.cdiv(tl.cdiv(B, SPLIT), BLOCK_B) * BLOCK_B
    b_lo = s * chunk
    b_hi = tl.minimum(b_lo + chunk, B)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pmask = offs_p < end
        cols = tl.load(idx + offs_p, mask=pmask, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_P], dtype=out.dtype.element_ty)
        for b0 in range(b_lo, b_hi, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            bmask = offs_b < b_hi
            g = tl.load(dyt + n * B + offs_b, mask=bmask, other=0.0).to(out.dtype.element_ty)
            tile = tl.load(xt + cols[:, None] * B + offs_b[None, :],
                           mask=pmask[:, None] & bmask[None, :], other=0.0)
            acc += tl.sum(tile.to(out.dtype.element_ty) * g[None, :], axis=1)
        if SPLIT > 1:
            tl.atomic_add(out + offs_p, acc, mask=pmask)
        else:
            tl.store(out + offs_p, acc, mask=pmask)


# ============================================================================ host side
def _feature_major_out(yt: torch.Tensor, lead: tuple) -> torch.Tensor:
    """yt [F, B] -> a fresh [*lead, F] tensor (its own storage, not a view: autograd lets a caller
    modify it in place, e.g. ReLU(inplace=True), as it does the C++ kernels' outputs). F or B may be 0."""
    out = yt.new_empty((*lead, yt.shape[0]))
    out.view(math.prod(lead), yt.shape[0]).copy_(yt.t())
    return out


def _batch_major(t: torch.Tensor, features: int) -> torch.Tensor:
    """[..., F] -> contiguous [F, B] (one transpose pass; the kernels then load B contiguously)."""
    return t.reshape(math.prod(t.shape[:-1]), features).t().contiguous()


def _check_operands(name: str, ptr, idx, xt, others) -> None:
    """csr_spmm's / csr_sddmm's own arguments, as the wrappers check theirs (both are public): tensors on one
    device, ptr int64 / idx int32 1-D contiguous, xt 2-D [cols, B] with a row for every entry of idx (the
    kernels read xt[idx[p], b] unchecked: another dtype, shape or too few rows read out of bounds, silently)."""
    for arg, t in (("ptr", ptr), ("idx", idx), ("xt", xt), *others):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    check_device(ptr, idx, xt, *(t for _, t in others), name=name)
    check_index(ptr, "ptr", torch.int64)
    check_index(idx, "idx", torch.int32)
    check_compressed(ptr, idx, "ptr", "idx")  # (the wrappers checked it by name; cached: no second read)
    if xt.dim() != 2:
        raise ValueError(f"{name}: xt must be 2-D [cols, B], got shape {tuple(xt.shape)}")
    if max_index(idx, "idx") >= xt.shape[0]:
        raise ValueError(f"{name}: idx has entries outside [0, {xt.shape[0]}) (xt's rows)")


def csr_spmm(ptr, idx, vals, xt, *, perm=None, bias=None):
    """yt [rows, B] = A xt for A in compressed rows (ptr, idx, vals[perm] or vals), xt [cols, B]."""
    _check_operands("csr_spmm", ptr, idx, xt, (("vals", vals), ("perm", perm), ("bias", bias)))
    check_float(vals, "vals")
    if vals.dim() != 1:
        raise ValueError(f"csr_spmm: vals must be 1-D, got shape {tuple(vals.shape)}")
    check_activation(xt, "xt", vals, "vals")
    check_nnz(vals, "vals", idx.numel())
    if perm is not None:  # (vals[perm[p]] is read: a duplicate read one value twice, silently; once per mask)
        check_index(perm, "perm", torch.int64)
        check_perm(perm, idx.numel())
        check_transposed(ptr, idx, perm)
    rows = ptr.numel() - 1
    if bias is not None:
        check_float(bias, "bias", like=vals)
        if bias.shape != (rows,):
            raise ValueError(f"csr_spmm: bias must have shape [{rows}], got {tuple(bias.shape)}")
        bias = bias.contiguous()
    # (read at flat offsets; no copy when already contiguous)
    return _spmm(ptr, idx, vals.contiguous(), xt.contiguous(), perm, bias)


def _spmm(ptr, idx, vals, xt, perm, bias):
    """csr_spmm's launch on operands checked (by csr_spmm, or by the wrappers, which check their own:
    not twice a call) and contiguous."""
    rows, B = ptr.numel() - 1, xt.shape[1]
    yt = torch.empty((rows, B), dtype=xt.dtype, device=xt.device)
    if rows == 0 or B == 0:
        return yt
    order = row_order(ptr)
    grid = lambda m: (triton.cdiv(rows, m["ROWS"]) * triton.cdiv(B, m["BLOCK_B"]),)  # noqa: E731
    launch(_csr_spmm_kernel, grid, ptr, idx, vals, perm if perm is not None else ptr, order, xt, yt,
           bias if bias is not None else vals, rows, B, pow2_bucket(B), density_key(idx.numel(), rows),
           HAS_PERM=perm is not None, HAS_BIAS=bias is not None)
    return yt


def _check_csc(ccol, row_t, perm, nnz: int, name: str) -> int:
    """The transposed index of the schema; returns in_features (= its column count)."""
    check_index(ccol, "ccol_indices", torch.int64)
    check_index(row_t, "row_indices_t", torch.int32)
    check_index(perm, "perm", torch.int64)
    if ccol.numel() < 1 or row_t.numel() != nnz or perm.numel() != nnz:
        raise ValueError(f"{name}: the transposed index must have ccol_indices [in_features + 1] and "
                         f"row_indices_t, perm of nnz = {nnz} entries, got {ccol.numel()}, {row_t.numel()}, "
                         f"{perm.numel()}")
    check_compressed(ccol, row_t, "ccol_indices", "row_indices_t")
    check_perm(perm, nnz)  # (grad_input reads values[perm[j]])
    return ccol.numel() - 1


@tensor_args("x crow_indices col_indices values ccol_indices row_indices_t perm bias?")
def sparse_linear(x, crow_indices, col_indices, values, ccol_indices, row_indices_t, perm, bias=None):
    """y = x W^T + b, W = CSR (crow_indices, col_indices, values) of shape [N, K = in_features]."""
    check_device(x, crow_indices, col_indices, values, ccol_indices, row_indices_t, perm, bias,
                 name="sparse_linear")  # (the kernel reads bias; the transposed index is checked: read here)
    _check_csr(crow_indices, col_indices, values, "sparse_linear")
    N = crow_indices.numel() - 1
    K = _check_csc(ccol_indices, row_indices_t, perm, col_indices.numel(), "sparse_linear")
    check_activation(x, "x", values)
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have last dimension in_features = {K}, got shape {tuple(x.shape)}")
    if max_index(col_indices, "col_indices") >= K:  # (a CSR that disagrees with its transposed index)
        raise ValueError(f"col_indices has entries outside [0, {K})")
    if bias is not None:
        check_float(bias, "bias", like=values)
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape [{N}], got {tuple(bias.shape)}")
    yt = _spmm(crow_indices, col_indices, values.contiguous(), _batch_major(x, K), None,
               None if bias is None else bias.contiguous())
    return _feature_major_out(yt, tuple(x.shape[:-1]))


@tensor_args("grad_out crow_indices col_indices values ccol_indices row_indices_t perm")
def sparse_linear_grad_input(grad_out, crow_indices, col_indices, values, ccol_indices, row_indices_t, perm):
    """dx = dy W: the same row-split SpMM over W^T, i.e. over the transposed (CSC) index (row k of
    W^T holds values[perm[j]] at rows row_t[j])."""
    check_device(grad_out, crow_indices, col_indices, values, ccol_indices, row_indices_t, perm,
                 name="sparse_linear_grad_input")
    _check_csr(crow_indices, col_indices, values, "sparse_linear_grad_input")
    _check_csc(ccol_indices, row_indices_t, perm, col_indices.numel(), "sparse_linear_grad_input")
    # (the CSR's own: a duplicate in perm read one weight twice, silently; checked once per mask)
    check_transposed(ccol_indices, row_indices_t, perm, crow_indices, col_indices, name="sparse_linear_grad_input")
    check_activation(grad_out, "grad_out", values)
    N = crow_indices.numel() - 1
    if grad_out.dim() < 1 or grad_out.shape[-1] != N:
        raise ValueError(f"grad_out must have last dimension {N}, got shape {tuple(grad_out.shape)}")
    if max_index(row_indices_t, "row_indices_t") >= N:
        raise ValueError(f"row_indices_t has entries outside [0, {N})")
    dxt = _spmm(ccol_indices, row_indices_t, values.contiguous(), _batch_major(grad_out, N), perm, None)
    return _feature_major_out(dxt, tuple(grad_out.shape[:-1]))


def _check_csr(crow, col, values, name):
    check_index(crow, "crow_indices", torch.int64)
    check_index(col, "col_indices", torch.int32)
    check_compressed(crow, col, "crow_indices", "col_indices")
    check_float(values, "values")
    if values.dim() != 1:
        raise ValueError(f"{name}: values must be 1-D, got shape {tuple(values.shape)}")
    check_nnz(values, "values", col.numel())


@tensor_args("grad_out x crow_indices col_indices")
def sparse_linear_grad_weight(grad_out, x, crow_indices, col_indices):
    """dvalues[p] = sum_b grad_out[b, row(p)] * x[b, col(p)]: only the nonzeros, never dy^T x (fp32
    for bf16/fp16 activations: the gradient of the fp32 values)."""
    check_device(grad_out, x, crow_indices, col_indices, name="sparse_linear_grad_weight")
    check_float(x, "x", FLOAT_DTYPES + HALF_DTYPES)
    check_float(grad_out, "grad_out", FLOAT_DTYPES + HALF_DTYPES, like=x, like_name="x")
    check_index(crow_indices, "crow_indices", torch.int64)
    check_index(col_indices, "col_indices", torch.int32)
    check_compressed(crow_indices, col_indices, "crow_indices", "col_indices")  # (dvalues[p] is written, p < crow[-1])
    if x.dim() < 1 or grad_out.dim() < 1:
        raise ValueError(f"x and grad_out must have at least 1 dimension, got shapes {tuple(x.shape)}, "
                         f"{tuple(grad_out.shape)}")
    N, K = crow_indices.numel() - 1, x.shape[-1]
    if grad_out.shape[-1] != N or grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"grad_out {tuple(grad_out.shape)} does not match x {tuple(x.shape)} and {N} rows")
    if max_index(col_indices, "col_indices") >= K:
        raise ValueError(f"x has {K} features, fewer than the weight's column indices address")
    nnz, B = col_indices.numel(), math.prod(x.shape[:-1])
    if nnz == 0 or B == 0:
        return torch.zeros(nnz, dtype=acc_dtype(x.dtype), device=x.device)
    return _sddmm(crow_indices, col_indices, _batch_major(grad_out, N), _batch_major(x, K), None)


def csr_sddmm(ptr, idx, dyt, xt, *, split: int | None = None):
    """out[p] = <dyt[row p], xt[idx p]> for the nonzeros of (ptr, idx); dyt [rows, B], xt [cols, B].
    `split` cuts the batch over programs (atomic accumulation); by default only when the
    non-empty rows alone cannot fill the GPU."""
    _check_operands("csr_sddmm", ptr, idx, xt, (("dyt", dyt),))
    check_float(xt, "xt", FLOAT_DTYPES + HALF_DTYPES)
    check_float(dyt, "dyt", FLOAT_DTYPES + HALF_DTYPES, like=xt, like_name="xt")
    if dyt.shape != (ptr.numel() - 1, xt.shape[1]):
        raise ValueError(f"csr_sddmm: dyt must have shape [rows, B] = [{ptr.numel() - 1}, {xt.shape[1]}], got "
                         f"{tuple(dyt.shape)}")
    return _sddmm(ptr, idx, dyt.contiguous(), xt.contiguous(), check_split(split))  # (read at flat offsets)


def _sddmm(ptr, idx, dyt, xt, split):
    """csr_sddmm's launch on operands checked (by csr_sddmm, or by sparse_linear_grad_weight) and contiguous."""
    rows, nnz, B = ptr.numel() - 1, idx.numel(), xt.shape[1]
    nonempty = cached("nonempty_rows", ptr, lambda: int((ptr.diff() > 0).sum()))
    if split is None:
        split = max(1, min(triton.cdiv(B, 256), triton.cdiv(4 * num_sms(xt.device), max(nonempty, 1))))
    out = (torch.zeros if split > 1 else torch.empty)(nnz, dtype=acc_dtype(xt.dtype), device=xt.device)
    if nonempty == 0 or B == 0:
        return out.zero_()
    order = row_order(ptr)[:nonempty]  # empty rows (sorted last) need no program
    launch(_csr_sddmm_kernel, lambda m: (nonempty, split), ptr, idx, order, dyt, xt, out,
           rows, B, pow2_bucket(B), density_key(nnz, rows), split)
    return out
