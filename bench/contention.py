"""Training steps under CPU contention: how the sparse engine and the dense-masked reference slow
down when several runs share the cores (as a sweep packs them), side by side.

Each scenario starts P worker processes at once, each with T torch threads, each timing the same
training step (forward, backward, SGD) of a VGG-like(2, 5) on CIFAR-sized batches, dense-masked
and sparse at 99% (conv -> ReLU -> BN fused, as the study runs it) alternately. Scenarios on this
machine's N cores: alone (1 x N threads), sized
(N x 1 thread: every run's threads from its CPU share), oversubscribed (N x N threads), and alone
and oversubscribed with OMP_WAIT_POLICY=passive (OpenMP workers sleep at barriers instead of
spinning: a spinning worker of one run takes the core another run's worker needs) and with
GOMP_SPINCOUNT=10000 (spin briefly, then sleep).
Reported: median step time per engine and its slowdown against the same engine alone (scenarios
interleaved over rounds, each slowdown the median of per-round ratios).

    python bench/contention.py              # ~4 min; writes bench/results/contention.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import machine_info, positive_int, writable_json, write_json  # noqa: E402

WORKER = """
import json, os, statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from sparsetrain.engine.convert import sparsify_
from sparsetrain.experiment.models import build_model
from sparsetrain.testing import random_mask, zero_pruned_
steps, batch = int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
models = {}
for engine in ("dense", "sparse"):
    torch.manual_seed(0)
    m = build_model("vgg_d2g5", 10, 3, 32)
    masks = {n: random_mask(mod.weight.shape, 0.99, g) for n, mod in m.named_modules()
             if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))}
    if engine == "sparse":
        sparsify_(m, masks, fuse=True)  # as the study runs it: conv -> ReLU -> BN fused
    else:
        zero_pruned_(m, masks)
    models[engine] = (m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), masks)
x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)

def step(engine):
    m, opt, masks = models[engine]
    loss = torch.nn.functional.cross_entropy(m(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if engine == "dense":
        for n, mk in masks.items():
            m.get_submodule(n).weight.grad.mul_(mk)
    opt.step()

times = {"dense": [], "sparse": []}
for i in range(steps + 2):
    for engine in times:
        t0 = time.perf_counter()
        step(engine)
        if i >= 2:
            times[engine].append(time.perf_counter() - t0)
print(json.dumps({e: statistics.median(t) * 1e3 for e, t in times.items()}))
"""


def run_scenario(procs: int, threads: int, steps: int, batch: int, env: dict) -> list[dict]:
    """Start `procs` workers at once; their per-engine median step times in ms."""
    ps = [subprocess.Popen([sys.executable, "-c", WORKER, str(threads), str(steps), str(batch)],
                           stdout=subprocess.PIPE, text=True, env=env) for _ in range(procs)]
    out = []
    try:
        for p in ps:
            stdout, _ = p.communicate(timeout=1800)
            if p.returncode != 0:
                raise RuntimeError(f"worker failed with exit code {p.returncode}")
            out.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:  # (a failed or stuck worker: the others stopped, not left timing on the shared cores)
        for p in ps:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=positive_int, default=12,
                    help="timed training steps per engine in each worker, after 2 untimed (default 12)")
    ap.add_argument("--batch", type=positive_int, default=64, help="batch size of each worker's step (default 64)")
    ap.add_argument("--rounds", type=positive_int, default=4,
                    help="rounds over all scenarios; times and slowdowns are medians over them (default 4)")
    ap.add_argument("--out", default=None, help="default results/contention.json; contention_partial.json for "
                    "other --steps, --batch or --rounds than the table's, so a smoke run never replaces it")
    args = ap.parse_args(argv)
    partial = any(getattr(args, k) != ap.get_default(k) for k in ("steps", "batch", "rounds"))
    default = os.path.join(HERE, "results", "contention" + ("_partial" if partial else "") + ".json")
    out = writable_json(ap, default if args.out is None else args.out)  # (before timing anything)
    # the CPUs this process may run on (taskset, cgroup cpusets), as the study's --threads 0 counts them
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    passive, short = {"OMP_WAIT_POLICY": "passive"}, {"GOMP_SPINCOUNT": "10000"}
    scenarios = [("alone", 1, n, {}), ("sized", n, 1, {}), ("oversubscribed", n, n, {}),
                 ("alone, OMP_WAIT_POLICY=passive", 1, n, passive),
                 ("oversubscribed, OMP_WAIT_POLICY=passive", n, n, passive),
                 ("alone, GOMP_SPINCOUNT=10000", 1, n, short),
                 ("oversubscribed, GOMP_SPINCOUNT=10000", n, n, short)]
    # scenarios interleaved round by round (this shared machine's speed drifts), medians over rounds
    runs = {name: [] for name, *_ in scenarios}
    for _ in range(args.rounds):
        for name, procs, threads, extra in scenarios:
            res = run_scenario(procs, threads, args.steps, args.batch, {**base, **extra})
            runs[name].append({e: statistics.median(r[e] for r in res) for e in ("dense", "sparse")})
    rows = []
    for name, procs, threads, _ in scenarios:
        med = {e: statistics.median(r[e] for r in runs[name]) for e in ("dense", "sparse")}
        # slowdown per round against the same round's "alone", then the median
        slow = {e: statistics.median(r[e] / a[e] for r, a in zip(runs[name], runs["alone"])) for e in med}
        rows.append({"scenario": name, "procs": procs, "threads": threads, "dense_ms": med["dense"],
                     "sparse_ms": med["sparse"], "dense_slowdown": slow["dense"], "sparse_slowdown": slow["sparse"]})
        r = rows[-1]
        print(f"{name:42s} {procs} x {threads} threads: dense {r['dense_ms']:8.1f} ms ({r['dense_slowdown']:.2f}x)"
              f"  sparse {r['sparse_ms']:8.1f} ms ({r['sparse_slowdown']:.2f}x)", flush=True)
    write_json(out, {"machine": machine_info(args), "model": "vgg_d2g5", "sparsity": 0.99, "batch": args.batch,
                          "steps": args.steps, "rows": rows})
    print(f"\nwritten: {out}")  # (as the other bench scripts: where the table went)
    return 0


if __name__ == "__main__":
    sys.exit(main())
