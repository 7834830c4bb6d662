"""Sparse conv -> BatchNorm -> ReLU, fused (SparseConvBNReLU: sparse_conv2d_stats + bn_act) vs the
same sparse conv with nn.BatchNorm2d and nn.ReLU after it, vs the dense masked conv with them;
forward + backward in training mode, batch 128, ResNet-18's 3x3 stride-1 layer shapes; and a stage
end of VGG-like's, the BatchNorm's output max-pooled: PyTorch's affine map (one addcmul pass) +
max_pool2d, bn_act then max_pool2x2, and max_pool2x2 pooling the BN's output from its input
(in_mean/in_scale/in_shift; forward). Part of `python bench/kernels.py` (section "fused"); the whole-step
effect is bench/train_step.py's.

    python bench/fused_bench.py [--quick] [--threads N] [--out PATH]   # = bench/kernels.py --only fused
"""
from __future__ import annotations

import argparse
import copy
import statistics
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from common import interleaved_times, leaf_per_side, nonnegative_int, paired_ratio, timing_of
from sparsetrain.engine.convert import sparsify_
from sparsetrain.testing import mask_weight_, random_mask

# (channels, map side): the four 3x3 stride-1 stages of the CIFAR ResNet-18
CASES = [(64, 32), (128, 16), (256, 8), (512, 4)]
# (channels, map side) before each pool of VGG-like(5, 5)
POOL_CASES = [(32, 32), (64, 16), (128, 8), (256, 4), (512, 2)]
BATCH = 128


def _block(c: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(c, c, 3, padding=1, bias=False), bn=nn.BatchNorm2d(c),
                                     relu=nn.ReLU(inplace=True)))


def _step(model, x, gy):
    x.grad = None
    model.zero_grad(set_to_none=True)
    model(x).backward(gy)


def _check(what: str, got, ref) -> None:
    """One untimed result against its reference before timing (fp32: sums in another order; a
    BatchNorm's output is O(1)): a wrong kernel stops the benchmark instead of being timed. The
    parameters' gradients (dW at the nonzeros, the BatchNorm's dgamma, dbeta) sum batch * H * W
    products: atol also 1e-4 of the largest reference value, as common.check_against_dense."""
    for i, (name, a, b) in enumerate(zip(("output", "dx", "dW", "dgamma", "dbeta"), got, ref)):
        atol = 1e-3 + (1e-4 * float(b.abs().max()) if i >= 2 and b.numel() else 0.0)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=atol,
                                   msg=lambda m, name=name: f"{what} {name} differs from its reference: {m}")


def _once(model, x, gy):
    """(output, dx, then its parameters' gradients: a sparse block's dW at the nonzeros, the
    BatchNorm's dgamma, dbeta) of one training step of model on a fresh leaf."""
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    y.backward(gy)
    grads = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return (y.detach(), x.grad, *grads)


def _reference(dense, x, gy, y, mask=None):
    """The dense masked block's (output, dx) to check a sparse block's output y against, given the
    mask (mask_weight_'s) also its dW at the nonzeros (the CSR values' order), dgamma, dbeta. dx goes
    through y's own ReLU pattern: where BN's output is within rounding of 0, the sparse and dense sums
    fall on either side of it (a few of 8M values at 64x32x32 b128), and each such flip moves the
    gradient of a whole 3x3xC patch of dx. The output is checked against the plain ReLU, so a
    pattern that differs anywhere else still fails."""
    x = x.detach().clone().requires_grad_(True)
    z = dense.bn(dense.conv(x))
    (z * (y > 0)).backward(gy)
    grads = () if mask is None else (dense.conv.parametrizations.weight.original.grad[mask],
                                     dense.bn.weight.grad, dense.bn.bias.grad)
    dense.zero_grad(set_to_none=True)
    return (torch.relu(z).detach(), x.grad, *grads)


def run(quick: bool, sparsities, reps: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for c, hw in CASES[:2] if quick else CASES:
        x = torch.randn(BATCH, c, hw, hw, generator=g, requires_grad=True)
        gy = torch.randn(BATCH, c, hw, hw, generator=g)
        for s in sparsities:
            torch.manual_seed(0)
            dense = _block(c)
            mask = random_mask(dense.conv.weight.shape, s, generator=g)
            unfused, fused = copy.deepcopy(dense), copy.deepcopy(dense)
            sparsify_(unfused, {"conv": mask})
            sparsify_(fused, {"conv": mask}, fuse=True)
            mask_weight_(dense.conv, mask)  # (dense masked: weight * mask in every step)
            for what, block in (("the unfused sparse block", unfused), ("the fused sparse block", fused)):
                got = _once(block, x, gy)
                _check(what, got, _reference(dense, x, gy, got[0], mask))
            xs = leaf_per_side(x, ("dense", "unfused", "fused"))
            t = interleaved_times({"dense": lambda: _step(dense, xs["dense"], gy),
                                   "unfused": lambda: _step(unfused, xs["unfused"], gy),
                                   "fused": lambda: _step(fused, xs["fused"], gy)}, reps=reps)
            rows.append({"op": "sparse_conv_bn_relu", "shape": f"{c}x{hw}x{hw} b{BATCH}", "sparsity": s,
                         **{f"{k}_ms": statistics.median(v) for k, v in t.items()},
                         "fused_vs_unfused": paired_ratio(t["unfused"], t["fused"]),
                         "fused_vs_dense": paired_ratio(t["dense"], t["fused"]), **timing_of(t)})
    return rows


def run_pool(quick: bool, reps: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(1)
    ops = torch.ops.sparsetrain
    for c, hw in POOL_CASES[:2] if quick else POOL_CASES:
        y = torch.randn(BATCH, c, hw, hw, generator=g)
        sc, sh = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
        mu = torch.randn(c, generator=g, dtype=torch.float64)
        b = sh - mu.float() * sc  # (the uncentred shift)
        # PyTorch's best: the affine map in one pass (addcmul; `y * sc + b` makes two), then max_pool2d
        def torch_pool(y=y, sc=sc, b=b):
            return F.max_pool2d(torch.addcmul(b[:, None, None], y, sc[:, None, None]), 2)
        ref = torch_pool()
        _check("bn_act then max_pool2x2", ops.max_pool2x2(ops.bn_act(y, mu, sc, sh, None, False))[:1], (ref,))
        _check("max_pool2x2(in_mean, in_scale, in_shift)", ops.max_pool2x2(y, mu, sc, sh, False)[:1], (ref,))
        t = interleaved_times({
            "torch": torch_pool,
            "separate": lambda: ops.max_pool2x2(ops.bn_act(y, mu, sc, sh, None, False)),
            "fused": lambda: ops.max_pool2x2(y, mu, sc, sh, False)}, reps=reps)
        rows.append({"op": "max_pool2x2(in_scale)", "shape": f"{c}x{hw}x{hw} b{BATCH}",
                     **{f"{k}_ms": statistics.median(v) for k, v in t.items()},
                     "fused_vs_separate": paired_ratio(t["separate"], t["fused"]),
                     "fused_vs_torch": paired_ratio(t["torch"], t["fused"]), **timing_of(t)})
    return rows


POOL_COLUMNS = [("shape", "shape", ""), ("torch_ms", "addcmul+max_pool2d ms", ".2f"),
                ("separate_ms", "bn_act+max_pool2x2 ms", ".2f"), ("fused_ms", "max_pool2x2(y, BN) ms", ".2f"),
                ("fused_vs_separate", "vs separate", ".2f"), ("fused_vs_torch", "vs torch", ".2f")]
COLUMNS = [("shape", "shape", ""), ("sparsity", "sparsity", ".3f"), ("dense_ms", "dense+BN+ReLU ms", ".1f"),
           ("unfused_ms", "sparse+BN+ReLU ms", ".1f"), ("fused_ms", "fused ms", ".1f"),
           ("fused_vs_unfused", "fused vs unfused", ".2f"), ("fused_vs_dense", "fused vs dense", ".2f")]


def main(argv=None):
    """Standalone: kernels.py's fused section with the same flags (run directly, this file once ran
    nothing and exited 0 whatever its arguments)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two shapes, 3 rounds (smoke run)")
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", help="JSON path (default results/kernels_fused.json, _quick for --quick, "
                                 "_partial for --threads, as kernels.py --only fused)")
    args = p.parse_args(argv)
    import kernels
    kernels.main(["--only", "fused", *(["--quick"] if args.quick else []), "--threads", str(args.threads),
                  *(["--out", args.out] if args.out is not None else [])])


if __name__ == "__main__":
    main()
