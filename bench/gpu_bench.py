"""GPU section of the kernel benchmark (called from bench/kernels.py): `run(quick) -> list[dict]`.

Per shape and sparsity (0.9 / 0.99 / 0.999), forward and forward+backward of y = x W^T:
  dense_fp32       F.linear on the masked dense weight, cuBLAS, TF32 off
  dense_tf32       the same with TF32 tensor cores (the realistic dense baseline on A100/H100)
  csr_triton       ours: SparseLinear, unstructured CSR, Triton (sparsetrain.kernels.sparse_linear)
  bsr{16,32,64}    ours: BSRLinear, whole blocks pruned by norm (same sparsity), Triton tl.dot, TF32
  torch_csr        torch.sparse CSR: W @ x^T + b forward, W^T @ dy^T for dx, sampled_addmm for dW, db
  torch_bsr_triton torch.sparse._triton_ops.bsr_dense_mm (+ its sampled_addmm), where available
and a few ResNet-18 conv shapes: ours (SparseConv2d, direct sparse conv, Triton) vs cuDNN fp32 / TF32.
Every method computes the same things (output; dx, dW and db in forward+backward), ours and the
dense ones through autograd, and each is checked once against the fp32 dense masked reference of
its own pattern before it is timed (a wrong kernel stops the section). Timed with
triton.testing.do_bench (median, ms; CUDA events, L2 flushed between runs). Rows record `weights`,
the weights a method multiplies per sample (its pattern's nonzeros, numel for the dense rows), and
`useful_gflops` = 2 * weights * batch (* 3 for forward+backward) / time. On a machine without CUDA
it prints that it was skipped and returns [].
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from sparsetrain.testing import dense_conv2d, dense_linear, tf32

LINEAR_SHAPES = [(4608, 512, 2048), (3072, 768, 902), (784, 300, 128)]  # (in, out, batch)
CONV_SHAPES = [(64, 64, 32, 3, 1), (256, 256, 8, 3, 1), (128, 256, 16, 3, 2)]  # (cin, cout, hw, k, stride)
SPARSITIES = [0.9, 0.99, 0.999]
DEVICE = "cuda"


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


@dataclass
class _Method:
    """One timed method of a case. `weights`: what it multiplies per sample (its pattern's nonzeros,
    numel for the dense ones). `outputs`: () -> (y, dx, _grad_stats of dW and db) of one step, in
    F.linear / F.conv2d layout, checked against the fp32 dense reference of `pattern` before timing. `tf32`: whether TF32 is on,
    or why the method is unavailable (a str; fwd and step None)."""
    fwd: Callable | None
    step: Callable | None
    weights: int
    tf32: bool | str
    outputs: Callable | None = None
    pattern: torch.Tensor | None = None


def _grad_stats(pairs) -> torch.Tensor:
    """[<g, p>, |g|^2, |p|^2] in fp64 over a method's (gradient, parameter) pairs (dW and db): the same
    numbers whatever holds the weight (CSR values, BSR blocks, a dense weight whose gradient is 0 off
    the pattern), so every method's dW and db are checked against the dense reference's."""
    s = torch.zeros(3, dtype=torch.float64)
    for g, p in pairs:
        g, p = g.detach().double().cpu(), p.detach().double().cpu()
        s += torch.stack([(g * p).sum(), (g * g).sum(), (p * p).sum()])
    return s


def _autograd(fn, x, gy, params, weights, tf32, pattern) -> _Method:
    """A method run through autograd (a module or a function of x): every such row pays autograd's
    bookkeeping and computes every gradient its layer has (bias included)."""
    def outputs():
        for p in params:
            p.grad = None
        xl = x.detach().clone().requires_grad_(True)
        y = fn(xl)
        y.backward(gy)
        return y.detach(), xl.grad, _grad_stats((p.grad, p) for p in params)
    return _Method(lambda: fn(x), _fwd_bwd(fn, x, gy, params), weights, tf32, outputs, pattern)


class _SparseFormat(NamedTuple):
    """A torch.sparse layout and its products."""
    convert: Callable  # dense -> sparse
    mm: Callable  # (sparse, dense) -> dense
    sampled_addmm: Callable  # (sparse pattern, a, b) -> a @ b at the pattern


def _torch_sparse(lin, pattern, fmt, x, gy, tf32) -> _Method:
    """torch.sparse doing our kernels' work: y = W x^T + b, dx = W^T dy^T, dW at the pattern, db =
    dy summed over the batch; W^T and dW's pattern made here, outside the timing; no autograd
    (torch.sparse.mm's backward would form a dense dW)."""
    wd = lin.weight.detach() * pattern
    w_s, wt_s, pat = fmt.convert(wd), fmt.convert(wd.t().contiguous()), fmt.convert(pattern.float())
    xt, gyt, bias = x.detach().t().contiguous(), gy.t().contiguous(), lin.bias.detach()[:, None]

    def fwd():
        return fmt.mm(w_s, xt) + bias

    def step():
        fwd()
        fmt.mm(wt_s, gyt)
        fmt.sampled_addmm(pat, gyt, x.detach())
        gy.sum(0)
    def outputs():
        dw = fmt.sampled_addmm(pat, gyt, x.detach()).to_dense()
        return fwd().t(), fmt.mm(wt_s, gyt).t(), _grad_stats([(dw, wd), (gy.sum(0), lin.bias)])
    return _Method(fwd, step, int(pattern.sum()), tf32, outputs, pattern)


def _linear_methods(fin, fout, batch, sparsity, quick):
    """({name: _Method}, reference: pattern -> (y, dx) in fp32) for one case."""
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
    w, b = (p.detach().clone().requires_grad_(True) for p in (lin.weight, lin.bias))

    def dense(pattern):  # the dense masked layer: the mask in every step
        return lambda t: dense_linear(t, w, pattern, b)
    out = {name: _autograd(dense(mask), x, gy, [w, b], fin * fout, tf32, mask)
           for name, tf32 in (("dense_fp32", False), ("dense_tf32", True))}
    sl = SparseLinear.from_dense(lin, mask)
    out["csr_triton"] = _autograd(sl, x, gy, list(sl.parameters()), sl.nnz, False, mask)
    for bs in ((32,) if quick else (16, 32, 64)):
        bm = block_mask(lin.weight, bs, sparsity)
        bl = BSRLinear.from_dense(lin, bs, bm)
        out[f"bsr{bs}_triton"] = _autograd(bl, x, gy, list(bl.parameters()), int(bm.sum()), True, bm)
    out["torch_csr"] = _torch_sparse(lin, mask, _SparseFormat(
        torch.Tensor.to_sparse_csr, torch.sparse.mm, lambda p, a, c: torch.sparse.sampled_addmm(p, a, c, beta=0.0)),
        x, gy, False)  # (cuSPARSE)
    try:  # torch's own Triton BSR kernels (torch.sparse._triton_ops), block 32
        from torch.sparse._triton_ops import bsr_dense_mm, sampled_addmm
        bm = block_mask(lin.weight, 32, sparsity)
        out["torch_bsr_triton"] = _torch_sparse(lin, bm, _SparseFormat(
            lambda t: t.to_sparse_bsr(32), bsr_dense_mm, lambda p, a, c: sampled_addmm(p, a, c, beta=0.0)), x, gy, True)
        out["torch_bsr_triton"].fwd()  # raises here when unsupported (shape not a block multiple, ...)
    except Exception as e:  # noqa: BLE001  (optional column)
        out["torch_bsr_triton"] = _Method(None, None, 0, f"unavailable: {type(e).__name__}: {str(e)[:80]}")
    return out, lambda pattern: _autograd(dense(pattern), x, gy, [w, b], 0, False, pattern).outputs()


def _conv_methods(cin, cout, hw, k, stride, sparsity, batch):
    """({name: _Method}, reference, output pixels per batch) for one conv case."""
    from sparsetrain.testing import random_mask
    from sparsetrain.nn import SparseConv2d
    dev = DEVICE
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, k, stride, k // 2, bias=False).to(dev)
    mask = random_mask(conv.weight.shape, sparsity, generator=g).to(dev)
    x = torch.randn(batch, cin, hw, hw, device=dev, requires_grad=True)
    sc = SparseConv2d.from_dense(conv, mask)
    y = sc(x)
    gy = torch.randn_like(y)
    wd = conv.weight.detach().clone().requires_grad_(True)

    def dense(pattern):  # the dense masked conv, as on CPU
        return lambda t: dense_conv2d(t, wd, pattern, None, stride, k // 2)
    out = {"csr_triton": _autograd(sc, x, gy, list(sc.parameters()), sc.nnz, False, mask)}
    for name, tf32 in (("cudnn_fp32", False), ("cudnn_tf32", True)):
        out[name] = _autograd(dense(mask), x, gy, [wd], wd.numel(), tf32, mask)
    return (out, lambda pattern: _autograd(dense(pattern), x, gy, [wd], 0, False, pattern).outputs(),
            y.shape[2] * y.shape[3] * batch)


def _check(name, method, reference) -> None:
    """One step of `method` against the dense masked reference of its pattern, computed in fp32;
    TF32 products (10-bit mantissas) get a looser tolerance, relative to the largest value."""
    with tf32(False):
        ref = reference(method.pattern)
    with tf32(bool(method.tf32)):
        got = method.outputs()
    tol = 1e-2 if method.tf32 else 1e-4
    for what, a, b in zip(("output", "dx"), got, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()),
                                   msg=lambda m, what=what: f"GPU bench: {name} {what} differs from the dense "
                                                            f"masked reference: {m}")
    # dW and db: <g, w> to tol * |g| |w| (Cauchy-Schwarz: a dW at the wrong nonzeros moves it by about
    # |g| |w| / sqrt(n)), |g|^2 to tol; |w|^2 is the reference's full weight's (the bound's scale only)
    (gw, gg, _), (rgw, rgg, rww) = got[2], ref[2]
    for what, a, b, atol in (("<dW, W> + <db, b>", gw, rgw, tol * float((rgg * rww).sqrt())),
                             ("|dW|^2 + |db|^2", gg, rgg, tol * float(rgg))):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=lambda m, what=what: (
            f"GPU bench: {name} dW, db differ from the dense masked reference ({what}): {m}"))


def _measure(rows, base, methods, reference, spatial, quick):
    times = {}
    for name, m in methods.items():
        if m.outputs is not None:
            _check(name, m, reference)
        for phase, fn, mult in (("fwd", m.fwd, 1), ("fwd+bwd", m.step, 3)):
            row = dict(base, method=name, phase=phase, weights=m.weights)
            if fn is None:
                row.update(ms=None, note=m.tf32)
            else:
                try:
                    with tf32(bool(m.tf32)):
                        ms = _time(fn, quick)
                    row.update(ms=round(ms, 4), useful_gflops=round(2 * m.weights * spatial * mult / ms / 1e6, 1))
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
            _measure(case, base, *_linear_methods(fin, fout, batch, sp, quick), batch, quick)
            rows += case
    for cin, cout, hw, k, stride in (CONV_SHAPES[:1] if quick else CONV_SHAPES):
        for sp in SPARSITIES:
            base = dict(section="gpu", kind="conv2d", shape=f"{cin}->{cout}@{hw}x{hw} k{k} s{stride}",
                        batch=128, sparsity=sp, device=device)
            case = []
            _measure(case, base, *_conv_methods(cin, cout, hw, k, stride, sp, 128), quick)
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
    ap.add_argument("--quick", action="store_true", help="a smoke run: the first linear and conv shapes only, BSR "
                    "block 32 only, shorter do_bench warm-up and repeats")
    run(quick=ap.parse_args(argv).quick)


if __name__ == "__main__":
    main()
