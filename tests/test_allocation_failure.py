"""A failed allocation inside the CPU kernels raises MemoryError in Python; it does not abort the
process. The kernels' hot loops are GCC target_clones functions, and GCC 12 compiles a call into one
as non-throwing, so a std::bad_alloc from their per-thread scratch buffers once ended in
std::terminate (SIGABRT). SPARSETRAIN_TEST_SCRATCH_LIMIT=0 makes every scratch allocation fail the
way a real one would; each kernel family, forward and backward, is run in a fresh process with it."""
import json
import os
import subprocess
import sys

import pytest

from sparsetrain.engine.ops import simd_bytes

SCRIPT = r"""
import json, torch, sparsetrain
from torch import nn
from sparsetrain.engine import ops
from sparsetrain.engine.fuse import fuse_
from sparsetrain.testing import random_mask
torch.manual_seed(0)
got = {}
def attempt(name, fn):
    try:
        fn()
        got[name] = "no error"
    except Exception as e:
        got[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
def conv(cin, cout, b, hw, k, s, p):
    w = torch.randn(cout, cin, k, k)
    x = torch.randn(b, cin, hw, hw, requires_grad=True)
    csr = sparsetrain.CSR.from_dense(w, random_mask(w.shape, 0.5))
    return lambda: ops.sparse_conv2d(x, csr, None, s, p).sum().backward()
attempt("phase-plane conv", conv(3, 5, 2, 9, 3, 1, 1))
attempt("small-map conv", conv(5, 3, 16, 4, 3, 1, 1))
attempt("strided 1x1 conv", conv(6, 5, 17, 7, 1, 2, 0))
w, x = torch.randn(7, 9), torch.randn(5, 9, requires_grad=True)
csr = sparsetrain.CSR.from_dense(w, random_mask(w.shape, 0.5))
attempt("linear", lambda: ops.sparse_linear(x, csr).sum().backward())
net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
sparsetrain.sparsify_(net, {n: random_mask(m.weight.shape, 0.5) for n, m in net.named_modules()
                            if isinstance(m, nn.Conv2d)})
fuse_(net)
attempt("fused conv-BN-ReLU-pool", lambda: net(torch.randn(4, 3, 8, 8)).sum().backward())
print(json.dumps(got))
"""


@pytest.fixture(scope="module")
def runs():
    """{limit: the fresh process running SCRIPT with it}, the three started at once (one after the
    other they took ~10 s, most of it starting torch; GOMP_SPINCOUNT, the study CLI's default unless
    set: side by side, OpenMP workers spinning at barriers took the cores the others needed)."""
    env = {"GOMP_SPINCOUNT": "10000", **os.environ, "OMP_NUM_THREADS": "2"}
    procs = {limit: subprocess.Popen([sys.executable, "-c", SCRIPT], env={**env, "SPARSETRAIN_TEST_SCRATCH_LIMIT": limit},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for limit in ("0", "junk", "")}
    yield procs
    for proc in procs.values():  # (one its test did not wait for, a session stopped early by -x: ended)
        if proc.returncode is None:
            proc.kill()
            proc.communicate()


def _run(runs, limit):
    proc = runs[limit]
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"rc {proc.returncode} (-6: aborted)\n{stdout[-2000:]}{stderr[-3000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


def test_failed_scratch_allocation_raises_memory_error_and_the_process_lives(runs):
    assert simd_bytes() in (16, 32, 64)  # the extension is built (the subprocess imports the same one)
    got = _run(runs, "0")
    assert len(got) == 5
    for name, outcome in got.items():
        assert outcome == "MemoryError: std::bad_alloc", (name, outcome)


@pytest.mark.parametrize("limit", ["junk", ""])
def test_a_limit_that_is_not_decimal_digits_is_ignored(limit, runs):
    got = _run(runs, limit)  # (strtoull alone reads "junk" as 0: every kernel would fail)
    assert len(got) == 5 and set(got.values()) == {"no error"}, got
