"""GPU section of the kernel benchmark (called from bench/kernels.py): `run(quick) -> list[dict]`.

Per shape and sparsity (0.9 / 0.99 / 0.999), forward and forward+backward of y = x W^T:
  dense_fp32       F.linear on the masked dense weight, cuBLAS, TF32 off
  dense_tf32       the same with TF32 tensor cores (the realistic dense baseline on A100/H100)
  csr_triton       ours: SparseLinear, unstructured CSR, Triton (sparsetrain.kernels.sparse_linear)
  bsr{16,32,64}    ours: BSRLinear, whole blocks pruned by norm (same sparsity), Triton tl.dot, TF32
  torch_csr        torch.sparse CSR: W @ x^T forward, W^T @ dy^T for dx, sampled_addmm for dW
  torch_bsr_triton torch.sparse._triton_ops.bsr_dense_mm (+ its sampled_addmm), where available
and a few ResNet-18 conv shapes: ours (direct sparse conv, Triton) vs cuDNN fp32 / TF32.
Timed with triton.testing.do_bench (median, ms; CUDA events, L2 flushed between runs). Rows
record `useful_gflops` = 2 * nnz * batch (* 3 for forward+backward) / time, the dense rows
2 * numel * batch. On a machine without CUDA it prints that it was skipped and returns [].
"""
from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F


LINEAR_SHAPES = [(4608, 512, 2048), (3072, 768, 902), (784, 300, 128)]  # (in, out, batch)
CONV_SHAPES = [(64, 64, 32, 3, 1), (256, 256, 8, 3, 1), (128, 256, 16, 3, 2)]  # (cin, cout, hw, k, stride)
SPARSITIES = [0.9, 0.99, 0.999]
DEVICE = "cuda"


@contextlib.contextmanager
def _tf32(on: bool):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _time(fn, quick):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                   return_mode="median")


def _fwd_bwd(module_or_fn, x, gy, params):
    def step():
        for p in params:
            p.grad = None
        x.grad = None
        module_or_fn(x).backward(gy)
    return step


def _linear_methods(fin, fout, batch, sparsity, quick):
    """{name: (forward fn, forward+backward fn, nnz, tf32)} for one case."""
    from sparsetrain.testing import random_mask
    from sparsetrain.engine.bsr import BSRLinear
    from sparsetrain.prune import block_mask
    from sparsetrain.nn import SparseLinear
    dev = DEVICE
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(fin, fout).to(dev)
    mask = random_mask((fout, fin), sparsity, generator=g).to(dev)
    x = torch.randn(batch, fin, device=dev, requires_grad=True)
    gy = torch.randn(batch, fout, device=dev)
    out = {}

    w = lin.weight.detach().clone().requires_grad_(True)
    dense = lambda t: F.linear(t, w * mask, lin.bias)  # noqa: E731  (dense masked: the mask in every step)
    for name, tf32 in (("dense_fp32", False), ("dense_tf32", True)):
        out[name] = (lambda: dense(x), _fwd_bwd(dense, x, gy, [w]), fin * fout, tf32)

    sl = SparseLinear.from_dense(lin, mask)
    out["csr_triton"] = (lambda: sl(x), _fwd_bwd(sl, x, gy, list(sl.parameters())), sl.nnz, False)

    for bs in ((32,) if quick else (16, 32, 64)):
        bl = BSRLinear.from_dense(lin, bs, block_mask(lin.weight, bs, sparsity))
        nnz = int(bl.weight.mask().sum())
        out[f"bsr{bs}_triton"] = (lambda bl=bl: bl(x), _fwd_bwd(bl, x, gy, list(bl.parameters())), nnz, True)

    # torch.sparse CSR (cuSPARSE): the index work (W^T, dW pattern) done once, outside the timing
    wd = (lin.weight.detach() * mask)
    w_csr, wt_csr = wd.to_sparse_csr(), wd.t().contiguous().to_sparse_csr()
    pattern = mask.float().to_sparse_csr()
    xt, gyt = x.detach().t().contiguous(), gy.t().contiguous()

    def tcsr_fwd():
        return torch.sparse.mm(w_csr, xt)

    def tcsr_step():
        tcsr_fwd()
        torch.sparse.mm(wt_csr, gyt)
        torch.sparse.sampled_addmm(pattern, gyt, x.detach(), beta=0.0)
    out["torch_csr"] = (tcsr_fwd, tcsr_step, int(mask.sum()), False)

    try:  # torch's own Triton BSR kernels (torch.sparse._triton_ops), block 32
        from torch.sparse._triton_ops import bsr_dense_mm, sampled_addmm
        bm = block_mask(lin.weight, 32, sparsity)
        wb = (lin.weight.detach() * bm)
        w_bsr, wt_bsr = wb.to_sparse_bsr(32), wb.t().contiguous().to_sparse_bsr(32)
        pat_bsr = bm.float().to_sparse_bsr(32)
        bsr_dense_mm(w_bsr, xt)  # raises here when unsupported (shape not a block multiple, ...)

        def tbsr_step():
            bsr_dense_mm(w_bsr, xt)
            bsr_dense_mm(wt_bsr, gyt)
            sampled_addmm(pat_bsr, gyt, x.detach(), beta=0.0)
        out["torch_bsr_triton"] = (lambda: bsr_dense_mm(w_bsr, xt), tbsr_step, int(bm.sum()), True)
    except Exception as e:  # noqa: BLE001  (optional column)
        out["torch_bsr_triton"] = (None, None, 0, f"unavailable: {type(e).__name__}: {str(e)[:80]}")
    return out


def _conv_methods(cin, cout, hw, k, stride, sparsity, batch):
    from sparsetrain.testing import random_mask
    from sparsetrain.engine.formats import CSR, transpose_index
    from sparsetrain.kernels import sparse_conv2d as K
    dev, pad = DEVICE, k // 2
    g = torch.Generator().manual_seed(0)
    w = torch.randn(cout, cin, k, k, generator=g).to(dev)
    mask = random_mask(w.shape, sparsity, generator=g).to(dev)
    x = torch.randn(batch, cin, hw, hw, device=dev)
    csr = CSR.from_dense(w, mask)
    crow, col, vals = csr.crow_indices, csr.col_indices, csr.values.detach()
    ccol, row_t, perm = transpose_index(crow, col, cin * k * k)
    geo = ((k, k), (stride, stride), (pad, pad))
    y = K.conv2d_forward(x, crow, col, vals, *geo)
    gy = torch.randn_like(y)

    def ours_step():
        K.conv2d_forward(x, crow, col, vals, *geo)
        K.conv2d_grad_input(gy, ccol, row_t, perm, vals, (hw, hw), *geo)
        K.conv2d_grad_weight(gy, x, crow, col, *geo)
    wd = w.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    dense = lambda t: F.conv2d(t, wd * mask, None, stride, pad)  # noqa: E731  (dense masked, as on CPU)
    out = {"csr_triton": (lambda: K.conv2d_forward(x, crow, col, vals, *geo), ours_step, csr.nnz, False)}
    for name, tf32 in (("cudnn_fp32", False), ("cudnn_tf32", True)):
        out[name] = (lambda: dense(xr), _fwd_bwd(dense, xr, gy, [wd]), w.numel(), tf32)
    return out, y.shape[2] * y.shape[3] * batch


def _measure(rows, base, methods, spatial, quick):
    times = {}
    for name, (fwd, step, nnz, tf32) in methods.items():
        for phase, fn, mult in (("fwd", fwd, 1), ("fwd+bwd", step, 3)):
            row = dict(base, method=name, phase=phase, nnz=nnz)
            if fn is None:
                row.update(ms=None, note=tf32)
            else:
                try:
                    with _tf32(bool(tf32)):
                        ms = _time(fn, quick)
                    row.update(ms=round(ms, 4), useful_gflops=round(2 * nnz * spatial * mult / ms / 1e6, 1))
                    times[(name, phase)] = ms
                except Exception as e:  # noqa: BLE001  (report, keep benchmarking the rest)
                    row.update(ms=None, note=f"failed: {type(e).__name__}: {str(e)[:80]}")
            rows.append(row)
    dense = "dense_tf32" if ("dense_tf32", "fwd") in times else "cudnn_tf32"
    for row in rows:  # rows of this one case
        ref = times.get((dense, row["phase"]))
        if row.get("ms") and ref:
            row["speedup_vs_tf32_dense"] = round(ref / row["ms"], 2)


def run(quick: bool) -> list[dict]:
    if not torch.cuda.is_available():
        print("GPU section skipped: no CUDA device")
        return []
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    rows: list[dict] = []
    shapes = LINEAR_SHAPES[:1] if quick else LINEAR_SHAPES
    for fin, fout, batch in shapes:
        for sp in SPARSITIES:
            base = dict(section="gpu", kind="linear", shape=f"{fin}->{fout}", batch=batch, sparsity=sp, device=device)
            case = []
            _measure(case, base, _linear_methods(fin, fout, batch, sp, quick), batch, quick)
            rows += case
    for cin, cout, hw, k, stride in (CONV_SHAPES[:1] if quick else CONV_SHAPES):
        for sp in SPARSITIES:
            base = dict(section="gpu", kind="conv2d", shape=f"{cin}->{cout}@{hw}x{hw} k{k} s{stride}",
                        batch=128, sparsity=sp, device=device)
            methods, spatial = _conv_methods(cin, cout, hw, k, stride, sp, 128)
            case = []
            _measure(case, base, methods, spatial, quick)
            rows += case
    _print(rows)
    return rows


def _print(rows):
    print(f"\nGPU kernels ({rows[0]['device']}), median ms via triton.testing.do_bench")
    print(f"{'kind':7} {'shape':28} {'batch':>5} {'sparsity':>8} {'method':18} {'phase':8} {'ms':>9} "
          f"{'GFLOP/s':>9} {'vs TF32':>7}")
    for r in rows:
        ms = f"{r['ms']:.4f}" if r.get("ms") else "-"
        print(f"{r['kind']:7} {r['shape']:28} {r['batch']:>5} {r['sparsity']:>8} {r['method']:18} {r['phase']:8} "
              f"{ms:>9} {r.get('useful_gflops', '-')!s:>9} {r.get('speedup_vs_tf32_dense', '-')!s:>7}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer timing repeats (a smoke run)")
    run(quick=ap.parse_args(argv).quick)


if __name__ == "__main__":
    main()
