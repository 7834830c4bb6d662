"""SparseConv2d forward+backward vs dense masked F.conv2d (and SparseProp when installed).

    python bench/conv_bench.py [--quick] [--warm] [--batch 32]   # standalone; bench/kernels.py calls run()

Cases: the conv layers of CIFAR ResNet-18 (3x3 at every width, the stride-2 3x3 convs and the 1x1
stride-2 downsample convs) and of VGG-like(delta=5, gamma=5), batch 128. One step = forward, then
backward producing dx and the weight gradient (dense: full dW; ours: dW at the nonzeros only).
Dense, ours and SparseProp run side by side in one process, their steps interleaved round by
round after warm-up, so the ratios compare the same minutes of a shared machine (times: medians;
ratios: the median of the per-round ratios). By default each timed step starts with the caches the
previous side left; --warm times each side's second consecutive step of the round instead (its
input and buffers in cache, as in a training step where the layer's input was just produced).
useful GFLOP/s = 3 products * 2 * nnz * batch * OH * OW / time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (HERE, check_against_dense, interleaved_times, leaf_per_side, machine_info,  # noqa: E402
                    paired_ratio, parse_sparsities, positive_int, print_table, refuse_empty, timing_of, writable_json,
                    write_json)
from sparsetrain.testing import dense_conv2d, random_mask  # noqa: E402

from sparsetrain.nn import SparseConv2d  # noqa: E402

BATCH = 128
# (name, in, out, size, kernel, stride, padding, bias)
RESNET18 = [
    ("r18 layer1 3x3", 64, 64, 32, 3, 1, 1, False),
    ("r18 layer2 3x3", 128, 128, 16, 3, 1, 1, False),
    ("r18 layer3 3x3", 256, 256, 8, 3, 1, 1, False),
    ("r18 layer4 3x3", 512, 512, 4, 3, 1, 1, False),
    ("r18 layer2.0 3x3/2", 64, 128, 32, 3, 2, 1, False),
    ("r18 layer3.0 3x3/2", 128, 256, 16, 3, 2, 1, False),
    ("r18 layer4.0 3x3/2", 256, 512, 8, 3, 2, 1, False),
    ("r18 layer2.0 down 1x1/2", 64, 128, 32, 1, 2, 0, False),
    ("r18 layer3.0 down 1x1/2", 128, 256, 16, 1, 2, 0, False),
    ("r18 layer4.0 down 1x1/2", 256, 512, 8, 1, 2, 0, False),
]
VGG_D5G5 = [(f"vgg d5g5 stage{s}", 2 ** (4 + s), 2 ** (4 + s), 32 >> (s - 1), 3, 1, 1, True) for s in range(1, 6)]
QUICK = [RESNET18[0], RESNET18[2]]

COLUMNS = [("op", "layer", ""), ("shape", "shape", ""), ("sparsity", "sparsity", ".3f"),
           ("dense_ms", "dense ms", ".2f"), ("sparse_ms", "ours ms", ".2f"), ("speedup", "vs dense", ".2f"),
           ("sparseprop_ms", "SparseProp ms", ".2f"), ("vs_sparseprop", "vs SparseProp", ".2f"),
           ("gflops_useful", "GFLOP/s ours", ".1f"), ("dense_gflops", "GFLOP/s dense", ".1f")]


def _sparseprop():
    try:
        from sparseprop.modules.conv2d import SparseConv2d as SPConv2d
        return SPConv2d
    except Exception:  # optional benchmark-only dependency (pip install sparseprop)
        return None


def _step(module_or_fn, x, gy, params):
    for p in params:
        p.grad = None
    x.grad = None
    module_or_fn(x).backward(gy)


def run(quick: bool = False, sparsities=(0.5, 0.9, 0.99, 0.999), reps: int | None = None,
        cases=None, sparseprop: bool = True, warm: bool = False, batch: int = BATCH, save=None) -> list[dict]:
    """One row per (case, sparsity): keys op, shape, sparsity, dense_ms, sparse_ms, speedup,
    sparseprop_ms (None when SparseProp is absent), vs_sparseprop, gflops_useful, dense_gflops.
    `save(rows)` after each row (what a run stopped midway keeps)."""
    cases = cases if cases is not None else (QUICK if quick else RESNET18 + VGG_D5G5)
    reps = reps or (3 if quick else 7)
    SP = _sparseprop() if sparseprop else None
    if sparseprop and SP is None:
        print("# note: SparseProp is not installed (pip install sparseprop): its column is left empty")
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, cin, cout, size, k, s, p, bias in cases:
        conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=bias)
        x = torch.randn(batch, cin, size, size, generator=g).requires_grad_()
        oh = (size + 2 * p - k) // s + 1
        gy = torch.randn(batch, cout, oh, oh, generator=g)
        shape = f"{cin}->{cout} k{k} s{s} @{size}x{size} b{batch}"
        for sp in sparsities:
            mask = random_mask(conv.weight.shape, sp, generator=g)
            w = conv.weight.detach().clone().requires_grad_()
            b = conv.bias.detach().clone().requires_grad_() if bias else None

            def dense(x, w=w, b=b, mask=mask):
                return F.conv2d(x, w * mask, b, s, p)

            layer = SparseConv2d.from_dense(conv, mask)
            check_against_dense(layer, x, gy, dense_conv2d, conv.weight, mask, conv.bias if bias else None,
                                stride=s, padding=p)
            xs = leaf_per_side(x, ("dense", "ours"))
            steps = {"dense": lambda: _step(dense, xs["dense"], gy, [w] + ([b] if bias else [])),
                     "ours": lambda layer=layer: _step(layer, xs["ours"], gy, list(layer.parameters()))}
            steps.update(_sparseprop_steps(SP, conv, mask, x, gy) if SP is not None else {})
            t = interleaved_times(steps, reps=reps, warm=warm)
            dense_ms, sparse_ms = statistics.median(t["dense"]), statistics.median(t["ours"])
            spk = min((k for k in t if k.startswith("sparseprop")), key=lambda k: statistics.median(t[k]),
                      default=None)  # SparseProp's faster layout
            sp_ms = statistics.median(t[spk]) if spk else None
            nnz = int(mask.sum())
            flops = 3 * 2 * nnz * batch * oh * oh
            dense_flops = 3 * 2 * mask.numel() * batch * oh * oh
            rows.append(dict(op=name, shape=shape, sparsity=sp, dense_ms=dense_ms, sparse_ms=sparse_ms,
                             speedup=paired_ratio(t["dense"], t["ours"]), sparseprop_ms=sp_ms,
                             vs_sparseprop=paired_ratio(t[spk], t["ours"]) if spk else None,
                             gflops_useful=flops / sparse_ms / 1e6, dense_gflops=dense_flops / dense_ms / 1e6,
                             **timing_of(t)))
            print(f"  {name:26s} {sp:.3f}: dense {dense_ms:8.2f} ms  ours {sparse_ms:7.2f} ms  "
                  f"x{rows[-1]['speedup']:6.2f}" + (f"  SparseProp {sp_ms:8.2f} ms" if sp_ms else ""), flush=True)
            if save is not None:
                save(rows)
    return rows


def _sparseprop_steps(SP, conv, mask, x, gy) -> dict:
    """SparseProp's SparseConv2d in both of its layouts (vectorizing over OC or over N): the table
    keeps the faster one."""
    dense = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      bias=conv.bias is not None)
    with torch.no_grad():
        dense.weight.copy_(conv.weight * mask)
        if conv.bias is not None:
            dense.bias.copy_(conv.bias)
    steps = {}
    leaves = leaf_per_side(x, (False, True))  # each layout frees only its own dx
    for over_on in (False, True):
        xl = leaves[over_on]
        try:
            m = SP.from_dense(dense, vectorizing_over_on=over_on)
            _step(m, xl, gy, list(m.parameters()))  # a layout SparseProp does not support fails here
            with torch.no_grad():  # (a baseline computing something else would give a wrong ratio)
                torch.testing.assert_close(m(xl), dense(xl), rtol=1e-4, atol=1e-3)
        except Exception as e:
            print(f"  # SparseProp (over_on={over_on}) failed: {type(e).__name__}: {e}")
            continue
        steps[f"sparseprop_{over_on}"] = lambda m=m, xl=xl: _step(m, xl, gy, list(m.parameters()))
    return steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="two cases (r18 layer1 and layer3 3x3), sparsities 0.9,0.99, 3 rounds (smoke run)")
    p.add_argument("--sparsities", default=None, help="comma-separated, default 0.5,0.9,0.99,0.999")
    p.add_argument("--only", default=None, help="substring of the case names to run (e.g. 'r18 layer')")
    p.add_argument("--no-sparseprop", action="store_true", help="leave SparseProp's column out even when installed")
    p.add_argument("--warm", action="store_true",
                   help="time each side's second consecutive call in each round (inputs in cache)")
    p.add_argument("--batch", type=positive_int, default=BATCH,
                   help=f"batch size (default {BATCH}; 8 and 32: fine-tuning sizes)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="default results/conv.json (conv_warm.json with --warm; "
                   "_b<batch> appended for another --batch; _quick for --quick, _partial for --only, --sparsities, "
                   "--threads or --no-sparseprop, so a smoke or partial run never replaces a table; "
                   "OUT.inprogress.json after each row until the run ends)")
    args = p.parse_args(argv)
    refuse_empty(p, sparsities=args.sparsities, only=args.only)  # ('' is not "the default": never the full table)
    sps = parse_sparsities(p, args.sparsities) if args.sparsities is not None else \
        ([0.9, 0.99] if args.quick else [0.5, 0.9, 0.99, 0.999])
    cases = None
    if args.only is not None:
        cases = [c for c in RESNET18 + VGG_D5G5 if args.only in c[0]]
        if not cases:
            p.error(f"--only {args.only!r} matches no case; names: {', '.join(c[0] for c in RESNET18 + VGG_D5G5)}")
    # (anything but the table's own settings gets its own name: a smoke run never replaces the table)
    partial = args.only is not None or args.sparsities is not None or args.threads or args.no_sparseprop
    stem = (("conv_warm" if args.warm else "conv") + ("" if args.batch == BATCH else f"_b{args.batch}")
            + ("_quick" if args.quick else "") + ("_partial" if partial and not args.quick else ""))
    out = writable_json(p, os.path.join(HERE, "results", stem + ".json") if args.out is None else args.out)
    progress = out.removesuffix(".json") + ".inprogress.json"  # (all checked before timing)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(args)
    print(f"# SparseConv2d fwd+bwd: {info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
          f"commit {info['commit']}, {info['date']}")

    def result(rows):
        return {"machine": info, "timing": "warm" if args.warm else "cold", "conv": rows}

    rows = run(args.quick, sps, cases=cases, sparseprop=not args.no_sparseprop, warm=args.warm, batch=args.batch,
               save=lambda rows: write_json(progress, result(rows)))
    print_table(rows, COLUMNS)
    write_json(out, result(rows))
    if os.path.exists(progress):
        os.remove(progress)
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
