"""Sparse-vs-dense throughput of sparsetrain's kernels, side by side in one process.

    python bench/kernels.py            # full tables (linear, conv, fused conv+BN+ReLU, GPU section when CUDA exists)
    python bench/kernels.py --quick    # a couple of minutes: a smoke run (results/kernels_quick.json)

Each case times forward + backward (dx and dW), the sides interleaved round by round (see
common.interleaved_times): times are per-side medians, ratios the median over rounds of the
per-round ratio (common.paired_ratio), against the dense masked layer (F.linear / F.conv2d on
w * mask) and against torch.sparse, plus useful GFLOP/s (2 * nnz * batch per product, 3
products). Results also go to bench/results/kernels.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import types
import warnings

import torch
import torch.nn.functional as F

from common import (HERE, check_against_dense, interleaved_times, leaf_per_side, machine_info, nonnegative_int,
                    paired_ratio, print_table, timing_of, writable_json, write_json)
from sparsetrain.testing import dense_linear, dense_linear_replicated, random_mask

from sparsetrain.engine.formats import CSR
from sparsetrain.engine.replicated import sparse_linear_replicated
from sparsetrain.nn import SparseLinear

# torch.sparse's CSR is "beta" and warns on every construction: the baseline is used as documented
warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")

# (in, out, batch): VGG/ResNet classifier-sized and LeNet layers, as the issue lists them, and
# VGG-like(5, 5)'s classifier (7*7*512 -> 10: at 99% its nonzeros read ~10% of the inputs)
LINEAR_CASES = [(4608, 512, 2048), (784, 300, 128), (512, 10, 128), (3072, 768, 902), (25088, 10, 128)]
QUICK_LINEAR_CASES = [(4608, 512, 2048), (784, 300, 128)]
# (channels, repeat, out, batch): VGG-like(5, 5)'s head on 32x32 images (512 channels at 1x1, 7x7 pool)
REPLICATED_CASE = (512, 49, 10, 128)


# ============================================================================ linear
def _dense_step(x, w, mask, b, gy):
    w.grad = x.grad = b.grad = None
    F.linear(x, w * mask, b).backward(gy)


def _sparse_step(layer, x, gy):
    layer.weight.values.grad = x.grad = layer.bias.grad = None
    layer(x).backward(gy)


class _TorchSparseLinear(torch.autograd.Function):
    """torch.sparse baseline: sparse.mm forward and input grad, sampled_addmm weight grad."""

    @staticmethod
    def forward(ctx, x, values, w_csr, wt_csr, perm_t):
        ctx.save_for_backward(x, values)
        ctx.w_csr, ctx.wt_csr, ctx.perm_t = w_csr, wt_csr, perm_t
        w = torch.sparse_csr_tensor(w_csr.crow_indices(), w_csr.col_indices(), values, w_csr.shape)
        return torch.sparse.mm(w, x.t()).t()

    @staticmethod
    def backward(ctx, gy):
        x, values = ctx.saved_tensors
        wt = torch.sparse_csr_tensor(ctx.wt_csr.crow_indices(), ctx.wt_csr.col_indices(), values[ctx.perm_t],
                                     ctx.wt_csr.shape)
        dx = torch.sparse.mm(wt, gy.t()).t()
        dw = torch.sparse.sampled_addmm(ctx.w_csr, gy.t().contiguous(), x, beta=0.0)
        return dx, dw.values(), None, None, None


class TorchSparseLinear(torch.nn.Module):
    """The torch.sparse baseline's step as a layer (check_against_dense: output, dx, dW at the nonzeros
    in CSR order, db)."""

    def __init__(self, vals, bias, ws, wt, perm):
        super().__init__()
        self.weight, self.bias, self.mats = types.SimpleNamespace(values=vals), bias, (ws, wt, perm)

    def forward(self, x):
        return _TorchSparseLinear.apply(x, self.weight.values, *self.mats) + self.bias


def _torch_sparse_setup(csr: CSR):
    w = torch.sparse_csr_tensor(csr.crow_indices, csr.col_indices.long(), csr.values.detach(), csr.shape)
    ccol, row_t, perm = csr.csc()
    wt = torch.sparse_csr_tensor(ccol, row_t.long(), csr.values.detach()[perm], (csr.shape[1], csr.shape[0]))
    return w, wt, perm


def bench_linear(cases, sparsities, reps):
    rows = []
    g = torch.Generator().manual_seed(0)
    for fin, fout, batch in cases:
        w = torch.randn(fout, fin, generator=g, requires_grad=True)
        b = torch.randn(fout, generator=g, requires_grad=True)
        x = torch.randn(batch, fin, generator=g, requires_grad=True)
        gy = torch.randn(batch, fout, generator=g)
        for s in sparsities:
            mask = random_mask((fout, fin), s, generator=g)
            layer = SparseLinear(CSR.from_dense(w.detach(), mask), b.detach().clone().requires_grad_())
            ws, wt, perm = _torch_sparse_setup(layer.weight)
            vals = layer.weight.values.detach().clone().requires_grad_(True)
            bt = b.detach().clone().requires_grad_()  # (each side computes dx, dW and db)

            check_against_dense(layer, x, gy, dense_linear, w, mask, b)
            # (the baseline too: a wrong one would give a wrong "vs torch.sparse")
            check_against_dense(TorchSparseLinear(vals, bt, ws, wt, perm), x, gy, dense_linear, w, mask, b)
            xs = leaf_per_side(x, ("masked", "ours", "torch.sparse"))

            def ts_step(x=xs["torch.sparse"]):
                x.grad = vals.grad = bt.grad = None
                (_TorchSparseLinear.apply(x, vals, ws, wt, perm) + bt).backward(gy)

            t = interleaved_times({"masked": lambda: _dense_step(xs["masked"], w, mask, b, gy),
                                   "ours": lambda: _sparse_step(layer, xs["ours"], gy),
                                   "torch.sparse": ts_step}, reps=reps)
            masked_ms, sparse_ms, ts_ms = (statistics.median(t[k]) for k in ("masked", "ours", "torch.sparse"))
            nnz = layer.nnz
            rows.append({
                "op": "sparse_linear", "shape": f"{fin}->{fout} b{batch}", "sparsity": s, "nnz": nnz,
                "dense_ms": masked_ms, "sparse_ms": sparse_ms, "torch_sparse_ms": ts_ms,
                "speedup": paired_ratio(t["masked"], t["ours"]), **timing_of(t),
                "vs_torch_sparse": paired_ratio(t["torch.sparse"], t["ours"]),
                "gflops_useful": 6 * nnz * batch / sparse_ms / 1e6, "dense_gflops": 6 * fin * fout * batch / masked_ms / 1e6,  # (this row's dense side)
                "bytes_ratio": layer.weight.nbytes() / (fin * fout * 4),  # stored: values + CSR index
                # in memory: + the transposed index the kernels build (row_indices_t int32, perm int64
                # per nonzero; ccol_indices int64 per input column)
                "resident_bytes_ratio": sum(t.numel() * t.element_size() for t in (
                    *layer.weight.parameters(), *layer.weight.buffers())) / (fin * fout * 4),
            })
    return rows


class SparseLinearReplicated(torch.nn.Module):
    """sparse_linear_replicated on a SparseLinear's weight and bias, as a layer (check_against_dense)."""

    def __init__(self, layer: SparseLinear, repeat: int):
        super().__init__()
        self.weight, self.bias, self.repeat = layer.weight, layer.bias, repeat

    def forward(self, x):
        return sparse_linear_replicated(x, self.weight, self.bias, self.repeat)


def bench_linear_replicated(sparsities, reps, case=None):
    """VGG-like(5, 5)'s head on its 1x1 map, forward + backward from x [N, C, 1, 1]: the 7x7
    broadcast flattened into a 25088-wide layer (dense masked, and SparseLinear), against
    sparse_linear_replicated on the [N, C] map (what fuse_ runs there)."""
    channels, repeat, fout, batch = case or REPLICATED_CASE
    side = int(repeat ** 0.5)
    if side * side != repeat:
        raise ValueError(f"case: repeat must be a square (the pool's h * w), got {repeat}")
    rows = []
    g = torch.Generator().manual_seed(0)
    fin = channels * repeat
    w = torch.randn(fout, fin, generator=g, requires_grad=True)
    b = torch.randn(fout, generator=g, requires_grad=True)
    x = torch.randn(batch, channels, 1, 1, generator=g, requires_grad=True)
    gy = torch.randn(batch, fout, generator=g)
    spread = lambda x: x.expand(batch, channels, side, side).flatten(1)  # noqa: E731 (the study's pool + flatten)
    for s in sparsities:
        mask = random_mask((fout, fin), s, generator=g)
        layer = SparseLinear(CSR.from_dense(w.detach(), mask), b.detach().clone().requires_grad_())
        # (both sparse sides against the dense masked reference before timing, as every linear case)
        check_against_dense(layer, spread(x.detach()), gy, dense_linear, w, mask, b)
        check_against_dense(SparseLinearReplicated(layer, repeat), x.detach().flatten(1), gy, dense_linear_replicated,
                            w, mask, b, repeat=repeat)
        xs = leaf_per_side(x, ("masked", "sparse", "replicated"))

        def step(x, param, f):  # (each side frees the gradients it made: common.leaf_per_side)
            x.grad = param.grad = b.grad = layer.bias.grad = None  # (each side computes db too)
            f(x).backward(gy)

        vals = layer.weight.values
        t = interleaved_times({"masked": lambda: step(xs["masked"], w, lambda x: F.linear(spread(x), w * mask, b)),
                               "sparse": lambda: step(xs["sparse"], vals, lambda x: layer(spread(x))),
                               "replicated": lambda: step(xs["replicated"], vals, lambda x: sparse_linear_replicated(
                                   x.flatten(1), layer.weight, layer.bias, repeat))}, reps=reps)
        rows.append({"op": "sparse_linear_replicated", "shape": f"{channels}x{repeat}->{fout} b{batch}",
                     "sparsity": s, "dense_ms": statistics.median(t["masked"]),
                     "sparse_ms": statistics.median(t["sparse"]), "replicated_ms": statistics.median(t["replicated"]),
                     "speedup": paired_ratio(t["masked"], t["replicated"]),
                     "vs_sparse": paired_ratio(t["sparse"], t["replicated"]), **timing_of(t)})
    return rows


REPLICATED_COLUMNS = [("shape", "shape", ""), ("sparsity", "sparsity", ".3f"), ("dense_ms", "dense ms", ".2f"),
                      ("sparse_ms", "SparseLinear ms", ".2f"), ("replicated_ms", "replicated ms", ".3f"),
                      ("speedup", "vs dense", ".1f"), ("vs_sparse", "vs SparseLinear", ".1f")]


LINEAR_COLUMNS = [("shape", "shape", ""), ("sparsity", "sparsity", ".3f"), ("dense_ms", "dense ms", ".2f"),
                  ("sparse_ms", "ours ms", ".2f"), ("torch_sparse_ms", "torch.sparse ms", ".2f"),
                  ("speedup", "vs dense", ".2f"), ("vs_torch_sparse", "vs torch.sparse", ".2f"),
                  ("gflops_useful", "GFLOP/s ours", ".1f"), ("dense_gflops", "GFLOP/s dense", ".1f"),
                  ("bytes_ratio", "bytes/dense", ".4f")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few cases and repetitions (smoke run, ~2 min)")
    p.add_argument("--only", choices=["linear", "conv", "fused", "gpu"], help="run one section")
    p.add_argument("--out", help="JSON output path (default results/kernels.json, or kernels_<section>.json, _quick appended for --quick, "
                                 "_partial for --threads, with --only, so a one-section or smoke run leaves the tables alone)")
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads for both sides (0: torch's default)")
    args = p.parse_args(argv)
    if args.only == "gpu" and not torch.cuda.is_available():  # (a full run notes the GPU section skipped)
        p.error("--only gpu: the GPU section needs a CUDA device, and none is available here")
    if args.out is None:
        # (another thread count than the table's torch default is not the table: conv_bench.py likewise)
        stem = ("kernels" + (f"_{args.only}" if args.only else "") + ("_quick" if args.quick else "")
                + ("_partial" if args.threads and not args.quick else ""))
        args.out = os.path.join(HERE, "results", stem + ".json")
    writable_json(p, args.out)  # (before timing anything)
    progress = args.out.removesuffix(".json") + ".inprogress.json"  # (what a run stopped midway keeps)
    if args.threads:
        torch.set_num_threads(args.threads)
    sparsities = [0.9, 0.99] if args.quick else [0.5, 0.9, 0.99, 0.999]
    reps = 3 if args.quick else 7
    info = machine_info(args)
    print(f"# sparsetrain kernels: {info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
          f"commit {info['commit']}, {info['date']}")
    results = {"machine": info, "linear": [], "linear_replicated": [], "conv": [], "fused": [], "pool": [], "gpu": []}
    if args.only in (None, "linear"):
        print("\n## SparseLinear forward+backward (fp32) vs dense masked F.linear and torch.sparse")
        results["linear"] = bench_linear(QUICK_LINEAR_CASES if args.quick else LINEAR_CASES, sparsities, reps)
        print_table(results["linear"], LINEAR_COLUMNS)
        print("\n## VGG head on a 1x1 map (7x7 broadcast -> flatten -> linear), forward+backward: "
              "sparse_linear_replicated vs the 25088-wide layers")
        results["linear_replicated"] = bench_linear_replicated(sparsities, reps)
        print_table(results["linear_replicated"], REPLICATED_COLUMNS)
        write_json(progress, results)
    if args.only in (None, "conv"):
        import conv_bench
        print("\n## SparseConv2d forward+backward (fp32, batch 128) vs dense masked F.conv2d and SparseProp")
        results["conv"] = conv_bench.run(quick=args.quick, sparsities=sparsities, reps=reps)
        print_table(results["conv"], conv_bench.COLUMNS)
        write_json(progress, results)
    if args.only in (None, "fused"):
        import fused_bench
        print("\n## sparse conv -> BN -> ReLU fused (SparseConvBNReLU) vs unfused vs dense masked, forward+backward")
        results["fused"] = fused_bench.run(quick=args.quick, sparsities=sparsities, reps=reps)
        print_table(results["fused"], fused_bench.COLUMNS)
        print("\n## a BatchNorm's output max-pooled 2x2, forward: pooled from its input y (max_pool2x2 with in_mean/in_scale/in_shift)")
        results["pool"] = fused_bench.run_pool(quick=args.quick, reps=reps)
        print_table(results["pool"], fused_bench.POOL_COLUMNS)
        write_json(progress, results)
    if args.only in (None, "gpu"):
        import gpu_bench
        print("\n## GPU (Triton)")
        results["gpu"] = gpu_bench.run(args.quick)
    write_json(args.out, results)
    if os.path.exists(progress):
        os.remove(progress)
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
