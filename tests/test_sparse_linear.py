"""SparseLinear and the sparse_linear ops against the dense masked reference (F.linear)."""
import copy
import io
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

from conftest import Doubled, assert_step_refused, assert_steps_as_dense_masked, masked_mlp
import sparsetrain

from sparsetrain.engine.formats import CSR
from sparsetrain.nn import SparseConv2d, SparseLinear
from sparsetrain.testing import assert_layer_matches, dense_conv2d, dense_linear, random_mask, zero_pruned_

SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]
# (batch shape, in, out): 1 feature, primes, batch 1, 3-D input, batch that is not a tile multiple
SHAPES = [((1,), 1, 1), ((7,), 13, 5), ((1,), 31, 17), ((3, 5), 11, 7), ((70,), 29, 3), ((130,), 17, 23)]


def _check(batch, fin, fout, sparsity, bias, empty_rows=0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(fin, fout, bias=bias).to(dtype)
    mask = random_mask((fout, fin), sparsity, generator=g, empty_rows=min(empty_rows, fout))
    layer = SparseLinear.from_dense(lin, mask)
    x = torch.randn(*batch, fin, generator=g, dtype=dtype, requires_grad=True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    assert_layer_matches(layer, lin, mask, dense_linear, x, g, tol)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("batch,fin,fout", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_dense_masked(batch, fin, fout, sparsity, bias):
    _check(batch, fin, fout, sparsity, bias)


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_empty_rows(sparsity):
    _check((9,), 19, 11, sparsity, True, empty_rows=4)


def test_large_batch_tiles_and_threads():
    # batch >= 64 * threads takes the wide-tile path; several tiles plus a ragged tail
    _check((64 * torch.get_num_threads() * 2 + 5,), 37, 41, 0.7, True)


@pytest.mark.parametrize("fin", [32, 48, 40])
def test_streamed_input_gradient_rows(fin):
    # dx rows of whole 64-byte lines (32 and 48 features) are written with streaming stores, others
    # (40 features: 160-byte rows) with plain stores. Batch 150: several batch tiles and a ragged
    # last tile whose rows past a multiple of 8 take the scalar tail.
    _check((150,), fin, 9, 0.7, True)


def test_float64():
    _check((6,), 13, 9, 0.6, True, dtype=torch.float64)


def _few_columns_check(batch, fin, fout, cols, dtype=torch.float32, seed=5):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(fin, fout).to(dtype)
    mask = torch.zeros(fout, fin, dtype=torch.bool)
    for j, k in enumerate(cols):  # every listed column read by one row or two, one row left empty
        mask[j % max(fout - 1, 1), k] = True
        if j % 3 == 0:
            mask[(j + 1) % max(fout - 1, 1), k] = True
    layer = SparseLinear.from_dense(lin, mask)
    x = torch.randn(*batch, fin, generator=g, dtype=dtype, requires_grad=True)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    assert_layer_matches(layer, lin, mask, dense_linear, x, g, tol)
    unread = torch.ones(fin, dtype=torch.bool)
    unread[list(cols)] = False
    assert (x.grad[..., unread] == 0).all()


@pytest.mark.parametrize("used", [1, 2, 9, 40, 41])
@pytest.mark.parametrize("batch", [(1,), (130,)])
def test_few_read_input_columns(used, batch):
    # Nonzeros reading at most a quarter of the inputs (a classifier at high sparsity: VGG-like's
    # 25088 -> 10 at 99% reads ~10%): the tiles gather only those columns, dx is zeros elsewhere.
    # 163 inputs: 40 columns are compacted, 41 (> 163 / 4) take the whole-tile transposes; the
    # first and last columns and a run of adjacent ones; batch 130: two tiles and a ragged one.
    cols = sorted({0, 162, *range(1, 4), *range(20, 163, 163 // used)})[:used]
    _few_columns_check(batch, 163, 7, cols)


def test_few_read_input_columns_wide_and_float64():
    # a wide layer with few outputs (chunks of the dx rows, a streamed row tail) and the fp64 path
    _few_columns_check((70,), 4099, 10, list(range(5, 4099, 97)))
    _few_columns_check((9,), 61, 3, [0, 7, 8, 60], dtype=torch.float64)
    g = torch.Generator().manual_seed(8)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 3] = mask[1, 3] = mask[1, 15] = True
    w = CSR.from_dense(torch.randn(2, 16, dtype=torch.float64, generator=g), mask)
    x = torch.randn(3, 16, dtype=torch.float64, generator=g, requires_grad=True)

    def f(x, values):
        return torch.ops.sparsetrain.sparse_linear(x, w.crow_indices, w.col_indices, values, *w.csc(), None)

    assert torch.autograd.gradcheck(f, (x, w.values.detach().clone().requires_grad_()))


def test_identity_at_zero_sparsity():
    torch.manual_seed(1)
    lin = nn.Linear(23, 19)
    layer = SparseLinear.from_dense(lin, torch.ones(19, 23, dtype=torch.bool))
    x = torch.randn(8, 23)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = lin(x1), layer(x2)
    torch.testing.assert_close(y1, y2)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(lin.weight.grad.flatten(), layer.weight.values.grad)
    torch.testing.assert_close(lin.bias.grad, layer.bias.grad)


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(3)
    mask = random_mask((5, 7), 0.5, generator=g, empty_rows=1)
    w = CSR.from_dense(torch.randn(5, 7, dtype=torch.float64, generator=g), mask)
    x = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)

    def f(x, values, b):
        return torch.ops.sparsetrain.sparse_linear(x, w.crow_indices, w.col_indices, values, *w.csc(), b)

    assert torch.autograd.gradcheck(f, (x, w.values.detach().clone().requires_grad_(), b))


def _op_args(dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(4)
    mask = random_mask((6, 9), 0.6, generator=g)
    w = CSR.from_dense(torch.randn(6, 9, dtype=dtype, generator=g), mask)
    x = torch.randn(4, 9, dtype=dtype, generator=g)
    return w, x, (torch.randn(6, dtype=dtype, generator=g) if bias else None)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_sparse_linear(bias):
    w, x, b = _op_args(bias=bias)
    args = (x.requires_grad_(), w.crow_indices, w.col_indices, w.values.detach().requires_grad_(), *w.csc(), b)
    torch.library.opcheck(torch.ops.sparsetrain.sparse_linear.default, args)


def test_opcheck_grad_ops():
    w, x, _ = _op_args()
    gy = torch.randn(4, 6)
    torch.library.opcheck(torch.ops.sparsetrain.sparse_linear_grad_input.default,
                          (gy, w.crow_indices, w.col_indices, w.values.detach(), *w.csc()))
    torch.library.opcheck(torch.ops.sparsetrain.sparse_linear_grad_weight.default,
                          (gy, x, w.crow_indices, w.col_indices))


def test_torch_compile():
    w, x, b = _op_args()
    layer = SparseLinear(w, b)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    torch.testing.assert_close(compiled(x), F.linear(x, w.to_dense(), b))  # (and both the dense reference)


_THREADS_SCRIPT = """
import os, torch
from sparsetrain.engine.formats import CSR
from sparsetrain.engine.nn import SparseLinear
from sparsetrain.testing import random_mask

def tasks():  # OS threads of this process: the OpenMP pool shows up here once it starts
    return len(os.listdir("/proc/self/task"))

torch.set_num_threads(1)  # before any parallel region: no pool yet
g = torch.Generator().manual_seed(0)
layer = SparseLinear(CSR.from_dense(torch.randn(256, 512, generator=g), random_mask((256, 512), 0.9, g)))
x = torch.randn(512, 512, generator=g, requires_grad=True)
before = tasks()
layer(x).sum().backward()  # forward, input and weight gradients: every parallel loop of the op
one = tasks()
torch.set_num_threads(2)
layer(x).sum().backward()
print(before, one, tasks())
"""


def test_respects_set_num_threads():
    """With torch.set_num_threads(1) the ops start no worker thread (at::parallel_for runs inline);
    with 2 they use the pool. Counted as OS threads of a fresh process (/proc/self/task)."""
    out = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    before, one, two = map(int, out.stdout.split())
    assert one == before, f"one thread asked, but the ops started {one - before} more"
    assert two > one, "two threads asked, but the ops never used a second one"


_EMPTY_SCRIPT = """
import torch
from sparsetrain.nn import SparseLinear
from sparsetrain.testing import dense_linear, reference_grads
lin = torch.nn.Linear(784, 300)
mask = torch.zeros(300, 784, dtype=torch.bool)
layer = SparseLinear.from_dense(lin, mask)
x = torch.randn(128, 784, requires_grad=True)
gy = torch.randn(128, 300)
for _ in range(3):
    y = layer(x)
    y.backward(gy)
ry, rdx, _, rdb = reference_grads(dense_linear, x.detach(), lin.weight, mask, lin.bias, gy)
torch.testing.assert_close(y, ry)
torch.testing.assert_close(x.grad / 3, rdx)
torch.testing.assert_close(layer.bias.grad / 3, rdb)
print("ok")
"""


def test_fully_pruned_layer_in_a_fresh_process():
    """nnz = 0 is the bias (or zeros), forward and backward. In a fresh process: the forward once
    wrote a full-width input tile into a zero-length scratch buffer (heap corruption), which earlier
    tests hid by having grown that buffer already."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_CHECK_": "3", "MALLOC_PERTURB_": "165"}
    debug = "/usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0"  # (glibc >= 2.34 checks the heap only with it)
    if os.path.exists(debug):
        env["LD_PRELOAD"] = debug
    out = subprocess.run([sys.executable, "-c", _EMPTY_SCRIPT], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-2000:])


_UNPICKLED_SCRIPT = """
import io, sys, torch
saved = torch.load(io.BytesIO(sys.stdin.buffer.read()), weights_only=False)
model = saved["model"]  # (a whole sparse model: no CSR is built in this process)
opt = torch.optim.Adam(model.parameters(), lr=0.1)
opt.load_state_dict(saved["opt"])  # (state of the same layers with another nnz)
model(torch.randn(4, 16)).sum().backward()
try:
    opt.step()
except ValueError as e:
    print(e)
"""


def test_optimizer_state_check_in_a_fresh_process_that_unpickles_the_model():
    """The optimizer state check was registered when a CSR/BSR was built (__init__); a fresh process that
    torch.loads a whole sparse model builds none, so an optimizer's state of another nnz reached its step
    unchecked (torch's bare size error there). It is registered on unpickling too: the named ValueError."""
    from sparsetrain.engine.bsr import BSRLinear
    model = nn.Sequential(SparseLinear.from_dense(nn.Linear(16, 32), random_mask((32, 16), 0.5)),
                          BSRLinear.from_dense(nn.Linear(32, 16), 16))
    src = SparseLinear.from_dense(nn.Linear(16, 32), random_mask((32, 16), 0.9))
    opt = torch.optim.Adam([src.bias, src.weight.values, *model[1].parameters()], lr=0.1)
    (src(torch.randn(4, 16)).sum() + model[1](torch.randn(4, 32)).sum()).backward()
    opt.step()
    buf = io.BytesIO()
    torch.save({"model": model, "opt": opt.state_dict()}, buf)
    out = subprocess.run([sys.executable, "-c", _UNPICKLED_SCRIPT], input=buf.getvalue(), capture_output=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert re.search(r"Adam state 'exp_avg' of param_groups\[0\]\['params'\]\[1\] has shape \(51,\), the parameter "
                     r"\(256,\)", out.stdout.decode()), out.stdout.decode()



def test_a_whole_model_pickled_before_the_recorded_index_loads_and_runs():
    """CSR/BSR record the pattern their transposed index was built for (`_index_of`, since 2026-12-06); a whole
    model torch.saved before has none, and its forward raised AttributeError after torch.load. Unpickling
    rebuilds the index; the loaded layers give the saved ones' outputs."""
    from sparsetrain.engine.bsr import BSRLinear
    model = nn.Sequential(SparseLinear.from_dense(nn.Linear(12, 32), random_mask((32, 12), 0.5)),
                          BSRLinear.from_dense(nn.Linear(32, 16), 16))
    x = torch.randn(3, 12)
    y, index = model(x), [layer.weight.transposed() for layer in model]
    for layer in model:
        del layer.weight.__dict__["_index_of"]  # (as an older version pickled it)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), y)
    for layer, expect in zip(loaded, index):
        assert layer.weight._index_of[0] is layer.weight.crow_indices
        assert all(torch.equal(a, b) for a, b in zip(layer.weight.transposed(), expect))

_POOL_SCRIPT = r"""
import copy, io
import torch
from torch import nn
from sparsetrain.engine import ops
from sparsetrain.nn import SparseLinear
from sparsetrain.testing import random_mask
torch.manual_seed(0)
layer = SparseLinear.from_dense(nn.Linear(8, 4096), random_mask((4096, 8), 0.5))
x = torch.randn(600, 8)
MiB = 1 << 20
with torch.no_grad():
    for b in range(64, 128):  # 64 sizes from 1 MiB, each once
        layer(x[:b])
    many = ops.pool_bytes()
    for _ in range(1100):  # then one size only: the others go idle and are freed
        layer(x[:64])
    steady = ops.pool_bytes()
    for _ in range(5):  # Python storage objects and copies of an output do not strand its memory
        z = layer(x[:64])
        z.untyped_storage()
        copy.deepcopy(z)
        torch.save(z, io.BytesIO())
        del z
    touched = ops.pool_bytes()
    y = layer(x[:64])
    freed = ops.empty_pool()
    kept = ops.pool_bytes()  # y's buffer: referenced
    cow = torch.equal(torch._lazy_clone(y), y)  # (a plain DataPtr: copy-on-write clones take it)
    w = layer(x[:64])  # a free 1 MiB block beside y's
    del w
    before = ops.pool_bytes()
    big = layer(x[:580])  # 9.1 MiB: the huge-page path
    ref = big.clone()
    big.resize_(600, 4096)  # an ordinary tensor: resizable
    same = torch.equal(big[:580], ref) and cow and ops.pool_bytes() >= before  # (one that cannot fit evicts nothing)
    del big
    layer(x[:580])
    z = layer(x[:64])
    z.untyped_storage()
    del z
    print(many // MiB, steady // MiB, touched // MiB, freed // MiB, kept // MiB, same, ops.pool_bytes(),
          ops.empty_pool() > 0)
"""


@pytest.mark.parametrize("limit", ["", "3", "0", "1.5", "+3"])
def test_output_pool_gives_memory_back_and_stays_bounded(limit):
    """Pooled outputs: a size not reused within 1024 pooled calls is freed; SPARSETRAIN_POOL_MB caps
    what the pool holds (0: no pool; not a whole number: a clear error); empty_pool frees what no
    tensor references, also after Python made a storage object or a copy of it; a pooled output
    resizes like any tensor (the huge-page one too)."""
    env = dict(os.environ, SPARSETRAIN_POOL_MB=limit)
    out = subprocess.run([sys.executable, "-c", _POOL_SCRIPT], capture_output=True, text=True, env=env)
    if limit in ("1.5", "+3"):
        assert out.returncode != 0 and "ValueError: SPARSETRAIN_POOL_MB must be a whole number of MiB from 0 (the " \
            "output pool off) to 2^40" in out.stderr
        return
    assert out.returncode == 0, out.stderr[-2000:]
    many, steady, touched, freed, kept, same, last, emptied = out.stdout.split()
    assert same == "True"
    if limit == "0":
        assert (many, steady, touched, freed, kept, last, emptied) == ("0", "0", "0", "0", "0", "0", "False")
    elif limit == "3":
        assert int(many) <= 3 and (steady, touched, kept, emptied) == ("1", "1", "1", "True") and int(last) <= 3 << 20
    else:  # 64 sizes of 1 to 2 MiB held, then the one in use
        assert int(many) >= 64 and (steady, touched, freed, kept, emptied) == ("1", "1", "0", "1", "True")


_TRIM_SCRIPT = r"""
import torch
from torch import nn
from sparsetrain.engine import ops
from sparsetrain.nn import SparseLinear
from sparsetrain.testing import random_mask
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 >> 20
layer = SparseLinear.from_dense(nn.Linear(8, 4096), random_mask((4096, 8), 0.5))
x = torch.randn(200, 8)
start = rss_mib()
with torch.no_grad():
    for b in range(64, 184):  # 120 sizes of 1 to 3 MiB, each once: the pool keeps them all
        layer(x[:b])
held = ops.pool_bytes() >> 20
freed = ops.empty_pool() >> 20
print(held, freed, ops.pool_bytes(), rss_mib() - start)
"""


def test_empty_pool_hands_the_memory_back_to_the_system():
    """empty_pool's memory leaves the process (glibc kept ~80 of these 230 MiB in its heap)."""
    out = subprocess.run([sys.executable, "-c", _TRIM_SCRIPT], capture_output=True, text=True,
                         env=dict(os.environ, SPARSETRAIN_POOL_MB="2048"))
    assert out.returncode == 0, out.stderr[-2000:]
    held, freed, left, rss_growth = map(int, out.stdout.split())
    assert held == freed >= 200 and left == 0
    assert rss_growth < 30, rss_growth  # MiB still resident after empty_pool


# aligned_alloc from 1 MiB sleeps 50 ms, so the pool's lock (held while it allocates a block) is
# nearly always held by the worker thread below when the main thread forks
_SLOW_ALLOC = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <time.h>
void* aligned_alloc(size_t a, size_t n) {
  static void* (*real)(size_t, size_t);
  if (!real) real = (void* (*)(size_t, size_t))dlsym(RTLD_NEXT, "aligned_alloc");
  if (n >= (1u << 20)) { struct timespec ts = {0, 50 * 1000 * 1000}; nanosleep(&ts, 0); }
  return real(a, n);
}
"""
_FORK_SCRIPT = r"""
import os, signal, threading, time
import torch
from torch import nn
from sparsetrain.engine import ops
from sparsetrain.nn import SparseLinear
from sparsetrain.testing import random_mask
torch.set_num_threads(1)  # (a child forked after an OpenMP parallel region hangs in OpenMP's own state)
layer = SparseLinear.from_dense(nn.Linear(8, 4096), random_mask((4096, 8), 0.5))
x = torch.randn(700, 8)
with torch.no_grad():
    inherited = layer(x[:100])
stop = False
def worker():  # a new output size each call: a new block allocated under the pool's lock
    i = 0
    while not stop:
        with torch.no_grad():
            layer(x[64 + i % 600:])
        i += 1
thread = threading.Thread(target=worker)
thread.start()
time.sleep(0.2)
hung = 0
for _ in range(6):
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)  # a child stuck on the lock dies of SIGALRM
        del inherited  # its block goes back to the (copied) pool
        with torch.no_grad():
            layer(x[:99])
        ops.pool_bytes()
        os._exit(0)
    hung += os.WIFSIGNALED(os.waitpid(pid, 0)[1])
    time.sleep(0.03)
stop = True
thread.join()  # (exiting with the thread inside an op aborts the interpreter's teardown)
print(hung)
"""


def test_a_process_forked_while_another_thread_allocates_an_output_does_not_hang(tmp_path):
    """The pool's lock is held across fork() (pthread_atfork): a child forked while a thread of the
    parent held it (allocating a block) got it locked for good and hung at its first pooled output."""
    shim = tmp_path / "slow_alloc.so"
    (tmp_path / "slow_alloc.c").write_text(_SLOW_ALLOC)
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(shim), str(tmp_path / "slow_alloc.c"), "-ldl"], check=True)
    env = dict(os.environ, LD_PRELOAD=str(shim), SPARSETRAIN_HUGEPAGES="0")
    out = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0"]  # children that hung (6 forks)


# ---------------------------------------------------------------------------- module API
def test_module_api_and_state_dict_roundtrip(tmp_path):
    torch.manual_seed(5)
    lin = nn.Linear(10, 4)
    mask = random_mask((4, 10), 0.7)
    layer = SparseLinear.from_dense(lin, mask)
    assert layer.nnz == int(mask.sum())
    assert layer.sparsity == pytest.approx(0.7)
    assert "nnz=12" in repr(layer) and "sparsity=0.7000" in repr(layer)
    back = layer.to_dense()
    torch.testing.assert_close(back.weight, lin.weight * mask)
    torch.testing.assert_close(back.bias, lin.bias)
    torch.save(layer.state_dict(), tmp_path / "l.pt")
    other = SparseLinear.from_dense(nn.Linear(10, 4), torch.ones(4, 10, dtype=torch.bool))  # different nnz
    other.load_state_dict(torch.load(tmp_path / "l.pt", weights_only=True))
    x = torch.randn(3, 10)
    torch.testing.assert_close(other(x), layer(x))
    torch.testing.assert_close(other(x), dense_linear(x, lin.weight, mask, lin.bias))  # (the reference, not itself)
    assert other.nnz == layer.nnz
    torch.testing.assert_close(layer(input=x), back(input=x))  # nn.Linear's keyword


def test_loading_another_nnz_keeps_the_parameter_an_optimizer_holds():
    # the usual resume: model, optimizer, then both state_dicts, from a checkpoint pruned further
    torch.manual_seed(1)
    saved_layer = SparseLinear.from_dense(nn.Linear(10, 4), random_mask((4, 10), 0.5))
    saved_opt = torch.optim.SGD(saved_layer.parameters(), lr=0.1, momentum=0.9)
    saved_layer(torch.randn(3, 10)).sum().backward()
    saved_opt.step()
    layer = SparseLinear.from_dense(nn.Linear(10, 4), torch.ones(4, 10, dtype=torch.bool))
    values = layer.weight.values
    values.grad = torch.ones_like(values)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer.load_state_dict(saved_layer.state_dict())
    opt.load_state_dict(copy.deepcopy(saved_opt.state_dict()))  # (as from a file: its own buffers)
    assert layer.weight.values is values and values.shape == (saved_layer.nnz,) and values.grad is None
    for m in (layer, saved_layer):
        m.zero_grad()
        m(torch.ones(2, 10)).sum().backward()
    opt.step()
    saved_opt.step()
    torch.testing.assert_close(values, saved_layer.weight.values)  # trained on, momentum restored
    # a part of a pattern is refused, named, the layer untouched
    part = {k: v for k, v in saved_layer.state_dict().items() if k != "weight.col_indices"}
    other = SparseLinear.from_dense(nn.Linear(10, 4), torch.ones(4, 10, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"the CSR at weight needs all of .*weight.col_indices"):
        other.load_state_dict(part, strict=False)
    assert other.nnz == 40 and other.weight.col_indices.numel() == 40


def _optimizer(make: str, impl: str, params):
    """SGD with momentum or Adam, lr 0.1, on the plain, foreach or fused=True implementation."""
    kw = {"plain": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    return (torch.optim.SGD(params, lr=0.1, momentum=0.9, **kw) if make == "sgd"
            else torch.optim.Adam(params, lr=0.1, **kw))


@pytest.mark.parametrize("make", ["sgd", "adam"])
@pytest.mark.parametrize("impl", ["plain", "foreach", "fused"])
@pytest.mark.parametrize("grow", [True, False])
def test_a_step_on_state_of_the_old_nnz_is_refused_by_name(make, impl, grow):
    """After load_state_dict resized the values without the optimizer's state restored, the state
    it holds has the old nnz: every step refuses it (the fused=True CPU kernels do not check sizes:
    they corrupted memory when the values grew and used other weights' moments when they shrank).
    Restoring that state or a fresh optimizer trains on."""
    torch.manual_seed(3)
    sparse, dense = (SparseLinear.from_dense(nn.Linear(16, 8), random_mask((8, 16), s)) for s in (0.9, 0.2))
    layer, saved = (sparse, dense) if grow else (dense, sparse)
    opt = _optimizer(make, impl, layer.parameters())
    x = torch.randn(3, 16)
    layer(x).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in opt.state[layer.weight.values].items()}
    layer.load_state_dict(saved.state_dict())
    layer.zero_grad()
    layer(x).sum().backward()
    state = "momentum_buffer" if make == "sgd" else "exp_avg"
    with pytest.raises(ValueError, match=rf"{type(opt).__name__} state '{state}' of a sparse weight's values "
                       rf"has shape \({before[state].numel()},\), the values now \({saved.nnz},\)"):
        opt.step()
    torch.testing.assert_close(layer.weight.values, saved.weight.values)  # untouched
    for k, v in before.items():
        assert torch.equal(opt.state[layer.weight.values][k], v)
    opt.state.clear()  # (as a fresh optimizer): trains on
    opt.step()
    assert not torch.equal(layer.weight.values, saved.weight.values)


def test_state_of_another_shape_by_design_is_not_refused_after_a_resize():
    """Only state of the values' former shapes is refused: LBFGS's flat vectors over all parameters
    (and Adafactor's factored moments of BSR blocks) differ from a parameter's shape by design."""
    torch.manual_seed(4)
    layer = SparseLinear.from_dense(nn.Linear(16, 8), random_mask((8, 16), 0.9))
    layer.load_state_dict(SparseLinear.from_dense(nn.Linear(16, 8), random_mask((8, 16), 0.2)).state_dict())
    x = torch.randn(5, 16)
    opt = torch.optim.LBFGS([layer.weight.values, layer.bias], max_iter=3)  # (its state: on the first)
    for _ in range(3):
        opt.zero_grad()
        opt.step(lambda: (opt.zero_grad(), layer(x).square().sum().backward(), layer(x).square().sum())[2])
    assert opt.state[layer.weight.values]["d"].shape == (layer.nnz + 8,)
    bsr = sparsetrain.BSRLinear.from_dense(nn.Linear(32, 32), block_size=16)
    diagonal = torch.block_diag(torch.ones(16, 16), torch.ones(16, 16)).bool()  # (2 of the 4 blocks)
    bsr.load_state_dict(sparsetrain.BSRLinear.from_dense(nn.Linear(32, 32), 16, diagonal).state_dict())
    ada = torch.optim.Adafactor(bsr.parameters())
    for _ in range(3):
        ada.zero_grad()
        bsr(torch.randn(4, 32)).sum().backward()
        ada.step()
    assert ada.state[bsr.weight.values]["row_var"].shape != bsr.weight.values.shape


def test_a_load_of_another_nnz_while_the_last_graph_is_alive_trains_on():
    """The last step's graph still referenced (its loss): the backward after a load of another nnz
    failed with "returned an invalid gradient ... expected shape compatible with [old nnz]"."""
    torch.manual_seed(6)
    layer, src = (SparseLinear.from_dense(nn.Linear(16, 8), random_mask((8, 16), s)) for s in (0.9, 0.2))
    loss = layer(torch.randn(3, 16)).sum()
    loss.backward()
    layer.load_state_dict(src.state_dict())
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.values.grad.shape == (src.nnz,)
    # d sum(y) / dW[i, j] = sum_b x[b, j], at the kept positions in CSR (row-major) order
    torch.testing.assert_close(layer.weight.values.grad, x.detach().sum(0).expand(8, 16)[src.weight.mask()])


@pytest.mark.parametrize("kind", ["csr", "bsr"])
def test_a_load_under_inference_mode_leaves_the_layer_trainable(kind):
    """load_state_dict of another nnz under torch.inference_mode(): the resized values and the index
    buffers were inference tensors, which autograd refused to save in the next training forward (a dense
    layer loaded so trains on)."""
    torch.manual_seed(5)
    if kind == "csr":
        layer, src = (SparseLinear.from_dense(nn.Linear(16, 8), random_mask((8, 16), s)) for s in (0.9, 0.2))
    else:
        layer = sparsetrain.BSRLinear.from_dense(nn.Linear(32, 32), block_size=16)
        src = sparsetrain.BSRLinear.from_dense(nn.Linear(32, 32), 16,
                                              torch.block_diag(torch.ones(16, 16), torch.ones(16, 16)).bool())
    with torch.inference_mode():
        layer.load_state_dict(src.state_dict())
    assert not any(t.is_inference() for t in (*layer.parameters(), *layer.buffers()))
    x = torch.randn(3, layer.weight.shape[1])
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.to_dense(), src.weight.to_dense(), rtol=0, atol=0)
    assert layer.weight.values.grad is not None


def test_a_layer_built_under_inference_mode_loads_and_prunes_there():
    """Its tensors are inference tensors: a load of another nnz and a prune stay in inference mode
    (leaving it for a trainable layer's sake made copy_ into them fail)."""
    torch.manual_seed(7)
    with torch.inference_mode():
        layer = SparseLinear.from_dense(nn.Linear(8, 4), random_mask((4, 8), 0.5))
        src = SparseLinear.from_dense(nn.Linear(8, 4), random_mask((4, 8), 0.2))
        layer.load_state_dict(src.state_dict())
        assert torch.equal(layer.weight.to_dense(), src.weight.to_dense())
        keep = torch.arange(layer.nnz) % 2 == 0
        layer.weight.shrink_(keep)
        assert layer.nnz == int(keep.sum()) and layer(torch.randn(2, 8)).shape == (2, 4)


@pytest.mark.parametrize("fuse", [False, True])
def test_sparsify_and_densify_under_inference_mode_leave_the_model_trainable(fuse):
    """Model surgery is often done under torch.inference_mode(): the sparse layers' values and bias
    (sparsify_), the dense layers' weights (densify_) became inference tensors, which the next
    backward refused (sparse) or left without a gradient, silently (dense)."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64, 5)).double()
    masks = {"0": random_mask((4, 3, 3, 3), 0.5), "4": random_mask((5, 64), 0.7)}
    ref = copy.deepcopy(model)
    zero_pruned_(ref, masks)
    x, y = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randint(0, 5, (6,))

    def step(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        for name, mk in masks.items():
            if isinstance(m.get_submodule(name).weight, torch.Tensor):
                m.get_submodule(name).weight.grad.mul_(mk)
        opt.step()

    with torch.inference_mode():
        sparsetrain.sparsify_(model, masks, fuse=fuse)
    assert not any(t.is_inference() for t in model.parameters())
    step(model), step(ref)
    torch.testing.assert_close(model[4].weight.to_dense(), ref[4].weight)
    with torch.inference_mode():
        sparsetrain.densify_(model)
    assert type(model[0]) is nn.Conv2d and not any(t.is_inference() for t in model.parameters())
    step(model), step(ref)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b)


def test_assign_load_takes_int64_indices_and_fills_a_meta_layer():
    """load_state_dict(assign=True) puts the saved tensors in the buffers as they are: indices of
    other integer dtypes (a torch.sparse_csr tensor's are int64) are converted first, strided views
    made contiguous, and a layer moved to the meta device (build, .to("meta"), load with assign)
    comes back whole."""
    torch.manual_seed(2)
    src = SparseLinear.from_dense(nn.Linear(12, 5), random_mask((5, 12), 0.5))
    sd = src.state_dict()
    sd["weight.col_indices"], sd["weight.crow_indices"] = sd["weight.col_indices"].long(), sd["weight.crow_indices"].int()
    x = torch.randn(3, 12)
    for dst in (SparseLinear.from_dense(nn.Linear(12, 5), random_mask((5, 12), 0.8)),
                SparseLinear.from_dense(nn.Linear(12, 5), random_mask((5, 12), 0.8)).to("meta")):
        dst.load_state_dict(sd, assign=True)
        assert dst.weight.col_indices.dtype == torch.int32 and dst.weight.crow_indices.dtype == torch.int64
        assert torch.equal(dst(x), src(x))
    assert sd["weight.col_indices"].dtype == torch.int64  # (the caller's dict is left as it was)
    for key in ("weight.values", "weight.col_indices", "weight.crow_indices"):  # strided views: made contiguous
        strided = dict(src.state_dict())
        strided[key] = torch.stack([strided[key], strided[key].flip(0)], 1)[:, 0]
        assert not strided[key].is_contiguous()
        dst = SparseLinear.from_dense(nn.Linear(12, 5), random_mask((5, 12), 0.8))
        dst.load_state_dict(strided, assign=True)
        assert torch.equal(dst(x), src(x)), key


def test_meta_device_construction_and_load_then_to_empty():
    """A CSR/BSR layer built under `torch.device("meta")` from its parts, or moved there, takes a state_dict
    (of any nnz: a no-op for the values, as for nn.Linear, the pattern's shapes resized) and, after
    to_empty + load_state_dict, equals the dense masked reference. Before 2026-12-06 both raised torch's
    RuntimeError from inside (`.item()` on meta tensors, no meta kernel for the transposed index)."""
    from sparsetrain.engine.bsr import BSR, BSRLinear
    torch.manual_seed(3)
    dense, mask = nn.Linear(32, 16), random_mask((16, 32), 0.6)
    src = SparseLinear.from_dense(dense, mask)
    bsrc = BSRLinear.from_dense(nn.Linear(32, 16), 16)
    x = torch.randn(4, 32)
    with torch.device("meta"):
        layer = SparseLinear(CSR(torch.tensor([0, 1] + [2] * 15), torch.tensor([0, 5]), torch.randn(2), (16, 32)),
                             torch.zeros(16))
        blayer = BSRLinear(BSR(torch.tensor([0, 1]), torch.tensor([1]), torch.randn(1, 16, 16), (16, 32), 16),
                           torch.zeros(16))
    assert layer.weight.values.is_meta and layer.weight.perm.shape == (2,) and blayer.weight.nnz_blocks == 1
    moved = SparseLinear.from_dense(nn.Linear(32, 16), random_mask((16, 32), 0.9)).to("meta")
    for dst, source in ((layer, src), (moved, src), (blayer, bsrc)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (torch: copying into a meta parameter is a no-op)
            dst.load_state_dict(source.state_dict())
        assert dst.weight.values.is_meta and dst.weight.values.shape == source.weight.values.shape
        assert dst.weight.perm.shape == source.weight.perm.shape
        dst = dst.to_empty(device="cpu")
        dst.load_state_dict(source.state_dict())
        assert torch.equal(dst(x), source(x))
    torch.testing.assert_close(layer(x), dense_linear(x, dense.weight, mask, dense.bias))
    dst = SparseLinear.from_dense(nn.Linear(32, 16), random_mask((16, 32), 0.9))  # a meta state into a layer with values
    y = dst(x)
    for source in (layer.to("meta"), moved.to("meta")):
        with pytest.raises(RuntimeError, match="the CSR at weight: the checkpoint's pattern is on the meta device"):
            dst.load_state_dict(source.state_dict())
        assert torch.equal(dst(x), y)  # (untouched: it was resized to the meta pattern with garbage indices)
    with pytest.raises(ValueError, match="must have shape"):  # (the shapes are still checked on meta)
        CSR(torch.tensor([0, 1], device="meta"), torch.tensor([0], device="meta"), torch.ones(1, device="meta"), (3, 4))


@pytest.mark.parametrize("fuse", [False, True])
def test_to_empty_without_a_load_is_refused_saying_to_load_and_a_load_restores_the_layers(fuse):
    """to_empty() leaves the index buffers uninitialised memory (from the meta device or from values): a forward, a
    layer's to_dense() or reset_parameters() and densify_ then failed inside (the kernels' "crow_indices[0] must be
    0", torch's "allocated size does not match required size"). Each is refused with a ValueError saying to load a
    state_dict, also after another
    move, a deepcopy or a load without the layers' keys (strict=True: torch's missing keys, not "repeats can not be
    negative" from inside); state_dict() still works (the dict to load into), and a load gives the source's outputs
    (SparseLinear, SparseConv2d, BSRLinear; fused too), equal to the dense masked reference."""
    from sparsetrain.engine.bsr import BSRLinear
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 16),
                          nn.ReLU(), nn.Linear(16, 32))
    masks = {"0": random_mask((4, 2, 3, 3), 0.5), "4": random_mask((16, 64), 0.5)}
    src = copy.deepcopy(dense)
    sparsetrain.sparsify_(src, masks, fuse=fuse)
    src[6] = BSRLinear.from_dense(dense[6], 16)
    src.eval(), dense.eval()
    x = torch.randn(3, 2, 4, 4)
    zero_pruned_(dense, masks)
    ref = dense(x)  # (the BSRLinear keeps every block of the dense layer's)
    y = src(x)
    for start in ("cpu", "meta"):
        model = copy.deepcopy(src).to(start).to_empty(device="cpu")
        for m in (model, copy.deepcopy(model).float(), copy.deepcopy(model)):
            with pytest.raises(ValueError, match=r"to_empty\(\) leaves the sparse index uninitialised.*load a state_dict"):
                m(x)
            for layer in (m[4], m[6]) + ((m[0],) if not fuse else ()):
                for call in (layer.to_dense, layer.reset_parameters, layer.weight.to_dense):
                    with pytest.raises(ValueError, match="load a state_dict"):
                        call()
            with pytest.raises(ValueError, match="layer .*load a state_dict"):
                sparsetrain.densify_(m)
        with pytest.raises(RuntimeError, match="Missing key"):  # (not "repeats can not be negative" from inside)
            model.load_state_dict({})
        model.load_state_dict({}, strict=False)  # (nothing for the layers: still refused by name)
        with pytest.raises(ValueError, match="load a state_dict"):
            model(x)
        state = model.state_dict()  # (what to load into: torch.distributed.checkpoint's load takes one)
        assert state.keys() == src.state_dict().keys()
        model.load_state_dict(src.state_dict())
        assert torch.equal(model(x), y)
    torch.testing.assert_close(y, ref)


def test_to_empty_after_a_pattern_assigned_by_hand_is_refused_saying_to_load():
    """A CSR layer whose crow_indices/col_indices were assigned (a new pattern by hand), then to_empty(): the move
    transposed the uninitialised memory (torch's "repeats can not be negative" from inside to_empty) before
    2026-12-06. Now its forward is refused saying to load a state_dict, and a load gives the dense masked reference;
    a pattern assigned after to_empty(), then a move (.double()), is the layer's (not refused as uninitialised)."""
    torch.manual_seed(0)
    dense, m1, m2 = nn.Linear(12, 5), random_mask((5, 12), 0.5), random_mask((5, 12), 0.5)
    src, other = SparseLinear.from_dense(dense, m2), SparseLinear.from_dense(nn.Linear(12, 5), m1)
    x = torch.randn(3, 12)
    layer = SparseLinear.from_dense(nn.Linear(12, 5), m1)
    layer.weight.crow_indices = src.weight.crow_indices.clone()  # (another pattern, of another nnz)
    layer.weight.col_indices = src.weight.col_indices.clone()
    layer.weight.values = nn.Parameter(torch.randn(src.weight.nnz))
    layer.to_empty(device="cpu")
    with pytest.raises(ValueError, match=r"to_empty\(\) leaves the sparse index uninitialised.*load a state_dict"):
        layer(x)
    layer.load_state_dict(src.state_dict())
    torch.testing.assert_close(layer(x), dense_linear(x, dense.weight, m2, dense.bias))
    empty = copy.deepcopy(other).to_empty(device="cpu")  # (UNSET, then a pattern assigned by hand)
    with torch.no_grad():
        empty.weight.crow_indices = src.weight.crow_indices.clone()
        empty.weight.col_indices = src.weight.col_indices.clone()
        empty.weight.values = nn.Parameter(src.weight.values.detach().clone())
        empty.bias.copy_(dense.bias)
    empty.double()
    torch.testing.assert_close(empty(x.double()), dense_linear(x.double(), dense.weight.double(), m2,
                                                                dense.bias.double()))


def test_to_empty_of_a_deepcopy_or_a_loaded_whole_model_is_refused_saying_to_load():
    """copy.deepcopy and torch.load(whole model) give the index buffers version counters of 0, which the seal did not
    hold: to_empty() took them for an index changed in place and sealed its garbage, so the forward failed inside
    the kernels ("crow_indices[0] must be 0") or ran on it. The sum decides now: refused saying to load a state_dict
    (SparseLinear, SparseConv2d, BSRLinear); a move of a copy still runs, and a load gives the dense masked
    reference."""
    from sparsetrain.engine.bsr import BSRLinear
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 32))
    masks = {"0": random_mask((4, 2, 3, 3), 0.5), "2": random_mask((16, 64), 0.5)}
    src = copy.deepcopy(dense)
    sparsetrain.sparsify_(src, masks)
    src[4] = BSRLinear.from_dense(dense[4], 16)
    zero_pruned_(dense, masks)
    x = torch.randn(3, 2, 4, 4)
    ref = dense(x)
    buf = io.BytesIO()
    torch.save(src, buf)
    buf.seek(0)
    for model in (copy.deepcopy(src), torch.load(buf, weights_only=False)):
        torch.testing.assert_close(copy.deepcopy(model).double()(x.double()), ref.double())
        model.to_empty(device="cpu")
        for layer, inp in ((model, x), (model[0], x), (model[2], torch.randn(3, 64)), (model[4], torch.randn(3, 16))):
            with pytest.raises(ValueError, match=r"to_empty\(\) leaves the sparse index uninitialised.*load a state_dict"):
                layer(inp)
        model.load_state_dict(src.state_dict())
        torch.testing.assert_close(model(x), ref)


def test_a_csr_state_into_a_bsr_layer_and_other_block_sizes_are_refused_saying_so():
    """A CSR's state into a BSRLinear, a BSR's into a SparseLinear, or a BSR of other blocks: refused naming what the
    checkpoint holds and what the layer is, its weight untouched (before 2026-12-06 the index checks' messages,
    "crow_indices must have shape [33]" or "col_indices must lie in [0, 2)")."""
    from sparsetrain.engine.bsr import BSRLinear
    b16, b32 = BSRLinear.from_dense(nn.Linear(64, 32), 16), BSRLinear.from_dense(nn.Linear(64, 32), 32)
    csr = SparseLinear.from_dense(nn.Linear(64, 32), random_mask((32, 64), 0.5))
    cases = ((b16, csr, "holds a BSR of 16x16 blocks there, the layer a CSR"),
             (csr, b16, "holds a CSR there, the layer a BSR of 16x16 blocks"),
             (b16, b32, "holds a BSR of 16x16 blocks there, the layer a BSR of 32x32 blocks"))
    for src, dst, msg in cases:
        w = dst.weight.to_dense()
        for sd in (src.state_dict(), dict(src.state_dict())):  # (with and without the saved logical shape)
            with pytest.raises(RuntimeError, match=msg):
                dst.load_state_dict(sd)
        assert torch.equal(dst.weight.to_dense(), w)  # (the weight untouched; the bias loads, as nn.Linear's would)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_index_buffers_cast_to_a_float_dtype_are_refused_naming_the_cast(dtype):
    """DistributedDataParallel's mixed_precision (torch.nn.parallel.distributed._MixedPrecision) casts every buffer to
    its buffer_dtype (`buf.data = buf.to(dtype)`, torch's _cast_buffers; on CPU before its construction fails for
    want of an accelerator stream, leaving the model cast): before 2026-12-06 the ops' "crow_indices must have dtype
    Long, got Half" or the seal's "changed in place" (blaming an EMA) refused it. Each is a TypeError naming the cast
    and buffer_dtype, for SparseLinear, SparseConv2d and BSRLinear; the model uncast equals the dense masked
    reference."""
    from torch.nn.parallel.distributed import _MixedPrecision, _cast_buffers
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(3, 4, 3), nn.Linear(4 * 4 * 4, 2500)
    cmask, lmask = random_mask((4, 3, 3, 3), 0.5), random_mask((2500, 64), 0.9)
    model = nn.Sequential(SparseConv2d.from_dense(conv, cmask), nn.Flatten(), SparseLinear.from_dense(lin, lmask),
                          sparsetrain.BSRLinear.from_dense(nn.Linear(2500, 16), block_size=16))
    x = torch.randn(2, 3, 6, 6)
    h = dense_linear(dense_conv2d(x, conv.weight, cmask, conv.bias).flatten(1), lin.weight, lmask, lin.bias)
    torch.testing.assert_close(model(x), F.linear(h, model[3].weight.to_dense(), model[3].bias), rtol=1e-4, atol=1e-4)
    _cast_buffers(_MixedPrecision(buffer_dtype=dtype), model)
    for layer, inp in ((model[0], x), (model[2], torch.randn(2, 64)), (model[3], torch.randn(2, 2500))):
        with pytest.raises(TypeError, match=f"index buffers .* were cast to {dtype}.*buffer_dtype"):
            layer(inp)


def test_module_type_casts_the_values_not_the_index():
    """model.type(torch.float64) casts every tensor of a module, its buffers too: before 2026-12-06 the CSR's and
    BSR's index buffers (crow/col/ccol/row_t/perm) became float64 and every forward was refused. They keep their
    integer dtype; the values are cast, and the model equals the dense masked reference in float64."""
    torch.manual_seed(3)
    conv, lin = nn.Conv2d(3, 4, 3), nn.Linear(36, 32)
    cmask, lmask = random_mask((4, 3, 3, 3), 0.5), random_mask((32, 36), 0.6)
    model = nn.Sequential(SparseConv2d.from_dense(conv, cmask), nn.Flatten(), SparseLinear.from_dense(lin, lmask),
                          sparsetrain.BSRLinear.from_dense(nn.Linear(32, 32), block_size=16))
    model.type(torch.float64)
    for name, b in model.named_buffers():
        assert b.dtype in (torch.int32, torch.int64), (name, b.dtype)
    for p in model.parameters():
        assert p.dtype == torch.float64
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    c = torch.flatten(dense_conv2d(x, conv.weight.double(), cmask, conv.bias.double()), 1)
    h = dense_linear(c, lin.weight.double(), lmask, lin.bias.double())
    bsr = model[3]
    ref = F.linear(h, bsr.weight.to_dense(), bsr.bias)
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)


def test_loading_keeps_the_layer_its_parameter_dtype_and_flags(tmp_path):
    """load_state_dict copies into the values Parameter when nnz is unchanged (an optimizer built
    before keeps stepping it), casts to the layer's dtype (a float32 checkpoint into a float64
    model), refuses a pattern that does not fit the layer without touching it (named, as a dense
    size mismatch); requires_grad flags survive from_dense, to_dense, sparsify_ and densify_."""
    torch.manual_seed(0)
    lin = nn.Linear(10, 4).double()
    mask = random_mask((4, 10), 0.5)
    layer = SparseLinear.from_dense(lin, mask)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    saved = SparseLinear.from_dense(nn.Linear(10, 4), mask).state_dict()  # float32, same pattern
    values = layer.weight.values
    layer.load_state_dict(saved)
    assert layer.weight.values is values and values.dtype == torch.float64
    torch.testing.assert_close(values, saved["weight.values"].double())
    layer(torch.randn(2, 10, dtype=torch.float64)).sum().backward()
    before = values.detach().clone()
    opt.step()
    assert not torch.equal(values, before)  # the optimizer's Parameter is the layer's
    wrong = SparseLinear.from_dense(nn.Linear(12, 4), random_mask((4, 12), 0.5)).state_dict()
    kept = [t.clone() for t in layer.weight.index()]
    with pytest.raises(RuntimeError, match=r"size mismatch for the CSR at weight: copying a weight of shape "
                                           r"\(4, 12\) from checkpoint, the shape in current model is \(4, 10\)"):
        layer.load_state_dict(wrong)
    with pytest.raises(RuntimeError, match=r"CSR pattern at weight does not fit its shape \(4, 10\)"):
        layer.load_state_dict(dict(wrong))  # (without the saved shape: the pattern's own check)
    assert all(torch.equal(a, b) for a, b in zip(layer.weight.index(), kept))  # the weight untouched
    frozen = nn.Sequential(nn.Linear(10, 4))
    frozen.requires_grad_(False)
    sparsetrain.sparsify_(frozen, {"0": mask})
    assert not frozen[0].weight.values.requires_grad and not frozen[0].bias.requires_grad
    sparsetrain.densify_(frozen)
    assert not frozen[0].weight.requires_grad and not frozen[0].bias.requires_grad
    with pytest.raises(ValueError, match="cannot name the model itself"):
        sparsetrain.sparsify_(nn.Linear(10, 4), {"": mask})
    with pytest.raises(ValueError, match="for one SparseLinear use .to_dense"):
        sparsetrain.densify_(SparseLinear.from_dense(nn.Linear(10, 4), mask))


@pytest.mark.parametrize("fin, fout", [(0, 3), (4, 0)])
def test_no_inputs_or_no_outputs(fin, fout):
    """Layers of zero in or out features, as nn.Linear: the bias (or an empty output), a zero or
    empty dx (the input gradient of no outputs corrupted the heap; reshape({-1, 0}) refused)."""
    lin = nn.Linear(fin, fout)
    layer = SparseLinear.from_dense(lin, torch.ones(fout, fin, dtype=torch.bool))
    x = torch.randn(5, fin, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, lin(x))
    out.sum().backward()
    assert x.grad.shape == x.shape and not x.grad.any() and layer.weight.values.grad.shape == (0,)
    with pytest.raises(ValueError, match="same leading \\(batch\\) dimensions"):
        torch.ops.sparsetrain.sparse_linear_grad_weight(torch.randn(2, 3, 7), torch.randn(3, 2, 13),
                                                        *CSR.from_dense(torch.ones(7, 13)).index()[:2])


def test_from_dense_default_mask_is_nonzero():
    w = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, -3.0]])
    csr = CSR.from_dense(w)
    assert csr.nnz == 3
    assert torch.equal(csr.to_dense(), w)
    assert torch.equal(csr.mask(), w != 0)


@pytest.mark.parametrize("kind", ["linear", "conv", "bsr"])
@pytest.mark.parametrize("swap", ["functional_call", "assigned"])
@pytest.mark.parametrize("bad", ["duplicate", "out of range"])
def test_a_pattern_swapped_in_is_checked_as_the_constructor_checks_it(kind, swap, bad):
    """A pattern that reaches a layer by torch.func.functional_call's state or an assigned col_indices is refused
    with the constructor's message: before 2026-12-07 a column repeated in a row ran, the product summing both
    entries while to_dense() (so densify_) kept one, silently; one out of range raised the op's error after a
    torch resize warning from the transposition. Nothing is warned; to_dense() refuses the assigned one too."""
    from torch.func import functional_call
    from sparsetrain.engine.bsr import BSRLinear
    torch.manual_seed(0)
    if kind == "bsr":  # (2 block rows of 16x16 blocks over 3 block columns: blocks (0, 0), (0, 1), (1, 2))
        layer, x = BSRLinear.from_dense(nn.Linear(48, 32), 16, torch.tensor(
            [[1, 1, 0], [0, 0, 1]], dtype=torch.bool).repeat_interleave(16, 0).repeat_interleave(16, 1)), torch.randn(3, 48)
        cols = {"duplicate": [0, 0, 2], "out of range": [0, 1, 3]}[bad]
    else:
        dense = nn.Linear(4, 2) if kind == "linear" else nn.Conv2d(1, 2, 2)
        mask = torch.tensor([[True, True, False, False], [False, False, True, False]]).reshape(dense.weight.shape)
        layer = (SparseLinear if kind == "linear" else SparseConv2d).from_dense(dense, mask)
        x = torch.randn(3, 4) if kind == "linear" else torch.randn(3, 1, 2, 2)
        cols = {"duplicate": [1, 1, 2], "out of range": [0, 1, 4]}[bad]
    col = torch.tensor(cols, dtype=torch.int32)
    want = "col_indices must be strictly increasing within each" if bad == "duplicate" else r"col_indices must lie in \[0, [34]\)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the resize warning before the error: refused too)
        with pytest.raises(ValueError, match=f"weight's pattern swapped in .*: {want}"):
            if swap == "functional_call":
                functional_call(layer, {**layer.state_dict(), "weight.col_indices": col}, (x,))
            else:
                layer.weight.col_indices = col
                layer(x)
        if swap == "assigned":
            with pytest.raises(ValueError, match=want):
                layer.weight.to_dense()
        else:  # (the layer's own pattern, after the call: the same output as before it)
            torch.testing.assert_close(layer(x), F.linear(x.reshape(3, -1), layer.weight.to_dense().reshape(
                layer.weight.shape[0], -1), layer.bias).reshape(layer(x).shape))


def test_csr_validation_errors():
    crow = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="col_indices must lie in"):
        CSR(crow, torch.tensor([0, 5], dtype=torch.int32), torch.ones(2), (2, 3))
    with pytest.raises(ValueError, match="crow_indices must start at 0 and end at nnz"):
        CSR(torch.tensor([0, 1, 3]), torch.tensor([0, 1], dtype=torch.int32), torch.ones(2), (2, 3))
    with pytest.raises(ValueError, match="strictly increasing"):
        CSR(torch.tensor([0, 2, 2]), torch.tensor([1, 1], dtype=torch.int32), torch.ones(2), (2, 3))
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        CSR.from_dense(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask shape"):
        CSR.from_dense(torch.ones(2, 3), torch.ones(3, 2, dtype=torch.bool))
    meta = dict(device="meta")
    for w, m in ((torch.ones(2, 3, **meta), None), (torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool, **meta))):
        with pytest.raises(ValueError, match="is a meta tensor"):  # (was torch's "Cannot copy out of meta tensor")
            CSR.from_dense(w, m)


def test_non_finite_weights_are_reported_not_rejected():
    w = torch.tensor([[float("nan"), 1.0], [float("inf"), 2.0]])
    csr = CSR.from_dense(w, torch.ones(2, 2, dtype=torch.bool))
    assert csr.check_finite() == {"nan": 1, "inf": 1}


# ---------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    w, x, b = _op_args()
    layer = SparseLinear(w, b)
    # the input width must equal in_features (nn.Linear's rule), also when the extra or missing
    # columns are pruned away: checked by the wrapper (ValueError) and by the op itself
    with pytest.raises(ValueError, match="x must have last dimension in_features = 9"):
        layer(torch.randn(4, 8))
    with pytest.raises(ValueError, match="x must have last dimension in_features = 9"):
        layer(torch.randn(4, 12))
    narrow = SparseLinear(CSR.from_dense(torch.ones(3, 20), torch.arange(20).expand(3, 20) < 16))
    with pytest.raises(ValueError, match="in_features = 20"):
        narrow(torch.randn(2, 16))  # columns 16..19 are all pruned: still the wrong width
    with pytest.raises(ValueError, match="x must have last dimension 9, got 12"):
        torch.ops.sparsetrain.sparse_linear(torch.randn(4, 12), *w.index(), b)
    with pytest.raises(ValueError, match="grad_out must have last dimension 6"):
        torch.ops.sparsetrain.sparse_linear_grad_input(torch.randn(4, 5), w.crow_indices, w.col_indices,
                                                       w.values, *w.csc())
    with pytest.raises(TypeError, match="x must have the dtype of values"):
        layer(torch.randn(4, 9, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must have the dtype of values"):
        layer(torch.randint(0, 3, (4, 9)))
    op = torch.ops.sparsetrain.sparse_linear
    bad_col = w.col_indices.clone()
    bad_col[0] = 1000
    csc = w.csc()
    with pytest.raises(ValueError, match="col_indices has entries outside"):
        op(x, w.crow_indices, bad_col, w.values, *csc, b)
    bad_col[0] = -1
    with pytest.raises(ValueError, match="col_indices has entries outside"):
        op(x, w.crow_indices, bad_col, w.values, *csc, b)
    with pytest.raises(TypeError, match="col_indices must have dtype Int"):
        op(x, w.crow_indices, w.col_indices.long(), w.values, *csc, b)
    with pytest.raises(TypeError, match="crow_indices must have dtype Long"):
        op(x, w.crow_indices.int(), w.col_indices, w.values, *csc, b)
    with pytest.raises(ValueError, match="bias must have shape"):
        op(x, w.crow_indices, w.col_indices, w.values, *csc, torch.ones(3))
    with pytest.raises(ValueError, match="values must be contiguous"):
        v2 = torch.randn(2 * w.nnz)[::2]
        op(x, w.crow_indices, w.col_indices, v2, *csc, b)
    with pytest.raises(ValueError, match="perm must have nnz"):
        op(x, w.crow_indices, w.col_indices, w.values, csc[0], csc[1], csc[2][:-1], b)
    with pytest.raises(TypeError, match="ccol_indices must have dtype Long"):
        op(x, w.crow_indices, w.col_indices, w.values, csc[0].int(), csc[1], csc[2], b)
    # (a 2-D one was refused as "must have nnz = 8 entries, got 8"; a strided one was accepted)
    with pytest.raises(ValueError, match="row_indices_t must be 1-D, got 2-D"):
        op(x, w.crow_indices, w.col_indices, w.values, csc[0], csc[1][None], csc[2], b)
    with pytest.raises(ValueError, match="perm must be contiguous"):
        op(x, w.crow_indices, w.col_indices, w.values, csc[0], csc[1], torch.stack([csc[2], csc[2]], 1)[:, 0], b)
    # non-contiguous activations are accepted (made contiguous), not misread
    xt = torch.randn(9, 4).t()
    torch.testing.assert_close(layer(xt), layer(xt.contiguous()))
    torch.testing.assert_close(layer(xt), F.linear(xt, w.to_dense(), b))
    with pytest.raises(TypeError, match="weight must be a sparsetrain.CSR"):
        SparseLinear(torch.ones(2, 2))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        SparseLinear.from_dense(nn.Conv2d(1, 1, 1))


# ---------------------------------------------------------------------------- sparsify_ / densify_
def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


def test_sparsify_densify_roundtrip_and_errors():
    torch.manual_seed(6)
    model = _mlp()
    masks = {"1": random_mask((300, 784), 0.9), "5": random_mask((10, 100), 0.5)}
    x = torch.randn(4, 1, 28, 28)
    ref_w = model[1].weight.detach() * masks["1"]
    sparsetrain.sparsify_(model, masks)
    assert isinstance(model[1], SparseLinear) and isinstance(model[5], SparseLinear)
    assert isinstance(model[3], nn.Linear)
    y = model(x)
    sparsetrain.densify_(model)
    assert type(model[1]) is nn.Linear
    torch.testing.assert_close(model[1].weight, ref_w)
    torch.testing.assert_close(model(x), y)
    with pytest.raises(KeyError, match="unknown module 'nope'"):
        sparsetrain.sparsify_(model, {"nope": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"masks\['3'\] must be a bool tensor of shape \(100, 300\)"):
        sparsetrain.sparsify_(model, {"3": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="only"):
        sparsetrain.sparsify_(model, {"2": torch.ones(1, dtype=torch.bool)})


@pytest.mark.parametrize("fuse", [False, True])
def test_dense_state_dict_loads_a_sparse_checkpoint_into_the_dense_model(tmp_path, fuse):
    """A sparse model's checkpoint (CSR conv and linear, fused or not; a BSRLinear) loads into the plain
    dense model through dense_state_dict: every entry equals the dense model with the masks applied
    (before 2026-12-06 there was no way but rebuilding the sparse model, and load_state_dict named
    missing and unexpected keys only)."""
    from sparsetrain.engine.bsr import BSRLinear

    torch.manual_seed(8)
    make = lambda: nn.Sequential(nn.Conv2d(3, 7, 3, padding=1), nn.BatchNorm2d(7), nn.ReLU(), nn.Flatten(),  # noqa: E731
                                 nn.Linear(7 * 5 * 5, 13), nn.Linear(13, 32))
    model, ref = make(), make()
    ref.load_state_dict(model.state_dict())
    masks = {"0": random_mask((7, 3, 3, 3), 0.9), "4": random_mask((13, 175), 0.7)}
    sparsetrain.sparsify_(model, masks, fuse=fuse)
    model[5] = BSRLinear.from_dense(model[5], 16, mask=torch.zeros(32, 13, dtype=torch.bool).index_fill_(0, torch.arange(16), True))
    zero_pruned_(ref, masks)
    with torch.no_grad():
        ref[5].weight[16:].zero_()  # (the BSRLinear's pruned block rows)
    torch.save(model.state_dict(), tmp_path / "sparse.pt")
    sd = torch.load(tmp_path / "sparse.pt", weights_only=True)
    dense = make()
    with pytest.raises(RuntimeError, match="Unexpected key"):  # (what PyTorch says of the sparse keys)
        dense.load_state_dict(sd)
    dense.load_state_dict(sparsetrain.dense_state_dict(sd))
    for k, v in ref.state_dict().items():
        assert torch.equal(dense.state_dict()[k], v), k
    with pytest.raises(ValueError, match=r"state_dict\['0.weight.values'\]: no logical shape"):
        sparsetrain.dense_state_dict(dict(sd))  # (a plain dict: no metadata)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        sparsetrain.dense_state_dict([1, 2])



def test_dense_state_dict_names_the_layer_of_a_corrupt_sparse_entry():
    """A checkpoint's CSR/BSR entries that do not make a weight (an index out of range, integer values, a block of
    another size, a list) are refused naming the layer; before 2026-12-06 the CSR check's message named no layer,
    and a list raised AttributeError ("'list' object has no attribute 'dim'")."""
    from sparsetrain.engine.bsr import BSRLinear
    model = nn.Sequential(SparseLinear.from_dense(nn.Linear(12, 5), random_mask((5, 12), 0.5)),
                          BSRLinear.from_dense(nn.Linear(32, 16), 16))
    bad = {"0.weight.col_indices": lambda t: t + 12, "0.weight.values": lambda t: t.long(),
           "1.weight.values": lambda t: t[:, :8, :8]}
    for key, change in bad.items():
        sd = model.state_dict()
        sd[key] = change(sd[key])
        with pytest.raises((TypeError, ValueError), match=rf"sparse weight '{key[0]}.weight' \(shape"):
            sparsetrain.dense_state_dict(sd)
    sd = model.state_dict()
    sd["0.weight.values"] = sd["0.weight.values"].tolist()
    with pytest.raises(TypeError, match=r"state_dict\['0.weight.values'\].*must be tensors, got list"):
        sparsetrain.dense_state_dict(sd)

def _pruned_with_torch(seed=7, bias=False):
    """A conv + linear model pruned with torch.nn.utils.prune (weights 80%; with `bias` the linear's
    bias too), then one SGD step: weight_orig moved, `.weight` stale until the next forward."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 7 * 7, 11))
    prune.global_unstructured([(model[0], "weight"), (model[3], "weight")], prune.L1Unstructured, amount=0.8)
    if bias:
        prune.random_unstructured(model[3], "bias", amount=0.3)
    x = torch.randn(2, 3, 7, 7)
    model(x).square().sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    return model, x


def test_layers_pruned_with_torch_nn_utils_prune_convert_with_their_current_weights():
    """from_dense and sparsify_ take a layer pruned with torch.nn.utils.prune as orig * mask computed
    now (its `.weight` attribute is stale after an optimizer step, and was used until 2026-12-04),
    keep only what both masks keep (masks only shrink), drop prune's hooks (they would recompute
    `weight` on the sparse layer), and masks=None converts every such layer with its own mask. A
    pruned bias is refused (the sparse layers' bias is dense: its pruned entries would train again),
    the model untouched; prune.remove(layer, "bias") first accepts that."""
    ref, x = _pruned_with_torch()
    want = ref(x)  # (the forward recomputes weight from weight_orig: the reference)
    model, _ = _pruned_with_torch()
    stale = model[3].weight.detach().clone()
    assert not torch.equal(stale, ref[3].weight)
    layer = SparseLinear.from_dense(model[3])
    torch.testing.assert_close(layer.to_dense().weight, ref[3].weight)
    torch.testing.assert_close(layer.bias, ref[3].bias)
    assert layer.nnz == int(model[3].weight_mask.sum()) and layer.weight.values.requires_grad
    more = random_mask(tuple(model[3].weight.shape), 0.5)
    both = SparseLinear.from_dense(model[3], more)
    torch.testing.assert_close(both.to_dense().weight, ref[3].weight * more)
    assert both.nnz == int((more & (model[3].weight_mask != 0)).sum())
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        SparseLinear.from_dense(model[3], more.float())
    sparsetrain.sparsify_(model)
    assert [type(model[i]).__name__ for i in (0, 3)] == ["SparseConv2d", "SparseLinear"]
    assert not model[0]._forward_pre_hooks and not model[3]._forward_pre_hooks
    torch.testing.assert_close(model(x), want)
    model(x).sum().backward()
    assert model[0].weight.values.grad is not None and model[3].bias.grad is not None
    named, _ = _pruned_with_torch()
    sparsetrain.sparsify_(named, {"3": more})  # (one layer named: the conv stays pruned by torch)
    torch.testing.assert_close(named[3].to_dense().weight, ref[3].weight * more)
    assert isinstance(named[0], nn.Conv2d) and named[0]._forward_pre_hooks
    with pytest.raises(ValueError, match="masks=None converts the layers whose weight was pruned with "
                       r"torch.nn.utils.prune, and this model has none: pass masks"):
        sparsetrain.sparsify_(nn.Sequential(nn.Linear(3, 3)))
    only_bias = nn.Sequential(nn.Linear(3, 3))
    prune.l1_unstructured(only_bias[0], "bias", 0.5)
    with pytest.raises(ValueError, match=r"this model has none \(only the bias of \['0'\]: a sparse layer's bias is dense\)"):
        sparsetrain.sparsify_(only_bias)
    pb, x = _pruned_with_torch(bias=True)
    for convert in (lambda: sparsetrain.sparsify_(pb), lambda: SparseLinear.from_dense(pb[3]),
                    lambda: sparsetrain.BSRLinear.from_dense(pb[3], block_size=16)):
        with pytest.raises(ValueError, match="bias is pruned with torch.nn.utils.prune.*prune.remove"):
            convert()
    assert isinstance(pb[0], nn.Conv2d) and pb[0]._forward_pre_hooks  # (untouched: refused before any change)
    want = pb(x)
    prune.remove(pb[3], "bias")
    sparsetrain.sparsify_(pb)
    torch.testing.assert_close(pb(x), want)
    # BSRLinear.from_dense takes the current weight too (its mask: the blocks holding a nonzero)
    lin = nn.Linear(32, 32)
    prune.ln_structured(lin, "weight", amount=0.5, n=1, dim=0)
    lin(torch.randn(2, 32)).sum().backward()
    torch.optim.SGD(lin.parameters(), lr=0.5).step()
    bsr = sparsetrain.BSRLinear.from_dense(lin, block_size=16)
    torch.testing.assert_close(bsr.to_dense().weight, lin.weight_orig * lin.weight_mask)


def test_layers_under_two_names_and_tied_weights():
    class Twice(nn.Module):  # one layer, two names (called twice): both names get the sparse layer
        def __init__(self):
            super().__init__()
            self.a, self.c = nn.Linear(6, 6), nn.Linear(6, 6)
            self.b = self.a

        def forward(self, x):
            return self.b(F.relu(self.a(x)))

    torch.manual_seed(2)
    model = Twice()
    ref = copy.deepcopy(model)
    mask = random_mask((6, 6), 0.5)
    zero_pruned_(ref, {"a": mask})
    sparsetrain.sparsify_(model, {"b": mask})
    assert isinstance(model.a, SparseLinear) and model.b is model.a
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), ref(x))
    sparsetrain.densify_(model)
    assert type(model.a) is nn.Linear and model.b is model.a
    with pytest.raises(ValueError, match="name the same layer with different masks"):
        sparsetrain.sparsify_(model, {"a": mask, "b": ~mask})
    assert type(model.a) is nn.Linear
    shared = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    shared[1].weight = shared[0].weight  # tied: two CSRs would untie them
    with pytest.raises(ValueError, match="'0' shares its weight with '1'"):
        sparsetrain.sparsify_(shared, {"0": random_mask((4, 4), 0.5)})
    assert type(shared[0]) is nn.Linear
    biased = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    biased[1].bias = biased[0].bias  # tied bias: the sparse layer's copy untied it silently
    with pytest.raises(ValueError, match="'1' shares its bias with '0': tied biases cannot be sparsified"):
        sparsetrain.sparsify_(biased, {"1": random_mask((4, 4), 0.5)})
    assert type(biased[1]) is nn.Linear
    normed = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match=r"'0' is a ParametrizedLinear.*its weight is computed.*remove it first "
                                        r"\(parametrize.remove_parametrizations\(module, 'weight'\)\)"):
        sparsetrain.sparsify_(normed, {"0": random_mask((4, 4), 0.5)})
    # a parametrized bias alone: the advice named the weight, whose removal raised (not parametrized)
    clamped = nn.Sequential(nn.Linear(4, 4))
    nn.utils.parametrize.register_parametrization(clamped[0], "bias", nn.Hardtanh())
    with pytest.raises(TypeError, match=r"its bias is computed by a parametrization .*remove_parametrizations"
                                        r"\(module, 'bias'\)\)$"):
        sparsetrain.sparsify_(clamped, {"0": random_mask((4, 4), 0.5)})
    assert nn.utils.parametrize.is_parametrized(clamped[0], "bias") and type(clamped[0]).__name__ == "ParametrizedLinear"


def test_hooks_of_a_layer_under_two_names_move_with_it():
    """sparsify_ and densify_ move a replaced layer's hooks to its replacement; at a layer's second
    name the move put the first move's emptied registries on the replacement: hooks silently lost."""
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = self.a

        def forward(self, x):
            return self.a(x)

    model, seen = Aliased(), []
    ref, mask, x = copy.deepcopy(model), random_mask((3, 4), 0.5), torch.randn(2, 4)
    zero_pruned_(ref, {"a": mask})
    handle = model.a.register_forward_hook(lambda mod, i, o: seen.append((type(mod).__name__, o)))
    model.a.register_forward_pre_hook(lambda mod, i: (i[0] * 2,))
    sparsetrain.sparsify_(model, {"a": mask})
    assert model.b is model.a
    y = model(x)
    torch.testing.assert_close(y, ref(2 * x))  # (the pre-hook doubled the input)
    assert [n for n, _ in seen] == ["SparseLinear"] and seen[0][1] is y
    sparsetrain.densify_(model)
    torch.testing.assert_close(model(x), ref(2 * x))
    assert [n for n, _ in seen] == ["SparseLinear", "Linear"]
    handle.remove()  # (the handles still remove them)
    model(x)
    assert len(seen) == 2


def test_computed_weights_and_transformer_blocks_are_refused():
    """A weight_norm/spectral_norm layer's weight is recomputed by a hook (the sparse layer got the
    hook, not the weight, and failed at its first forward); nn.TransformerEncoderLayer's eval-mode
    fast path reads its linears' weights as dense tensors (AttributeError in eval)."""
    for wrap in (torch.nn.utils.weight_norm, torch.nn.utils.spectral_norm):
        with warnings.catch_warnings():  # (weight_norm's deprecation: the legacy form is what is tested)
            warnings.simplefilter("ignore", FutureWarning)
            model = nn.Sequential(wrap(nn.Linear(4, 4)))
        with pytest.raises(TypeError, match="'0''s weight is computed by a reparametrization"):
            sparsetrain.sparsify_(model, {"0": random_mask((4, 4), 0.5)})
        assert type(model[0]) is nn.Linear
    block = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16))
    with pytest.raises(TypeError, match="'0.linear1' is inside a TransformerEncoderLayer"):
        sparsetrain.sparsify_(block, {"0.linear1": random_mask((16, 8), 0.5)})
    assert type(block[0].linear1) is nn.Linear


def test_second_order_and_forward_mode_gradients_raise():
    # the gradient ops have no formulas: an error, not a silently zero second derivative or tangent
    layer = SparseLinear.from_dense(nn.Linear(5, 3).double(), random_mask((3, 5), 0.4))
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    g, = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()
    # where autograd runs only the nodes on the way to chosen inputs (jvp/hvp/hessian, allow_unused,
    # backward(inputs=), a layer before this one): the error node hung off the graph there and was
    # skipped, the second-order terms through the layer silently zero
    dense = nn.Linear(5, 5).double()
    net = nn.Sequential(dense, nn.Tanh(), layer)
    values, xd = layer.weight.values, x.detach()

    def penalty(model):
        xi = xd.clone().requires_grad_()
        gx, = torch.autograd.grad(torch.tanh(model(xi)).sum(), xi, create_graph=True)
        return gx.square().sum()
    f = lambda z: torch.tanh(layer(z)).sum()  # noqa: E731
    for second in (lambda: torch.autograd.functional.jvp(layer, xd, torch.ones_like(xd)),
                   lambda: torch.autograd.functional.hvp(f, xd, torch.ones_like(xd)),
                   lambda: torch.autograd.functional.hessian(f, xd[:1]),
                   lambda: torch.autograd.grad(penalty(layer), values, allow_unused=True),
                   lambda: penalty(layer).backward(inputs=[values]),
                   lambda: torch.autograd.grad(penalty(net), dense.weight)):
        with pytest.raises(RuntimeError, match="differentiate twice"):
            second()
    # ... but a second derivative that needs none through the layer is still computed: the gradient
    # for the layer's input, W^T dy, does not depend on that input (record_inputs), so with dy constant
    # (a loss linear in the output) a Hessian or penalty with respect to what lies before it is exact
    ref_net = nn.Sequential(copy.deepcopy(dense), nn.Tanh(), nn.Linear(5, 3).double())
    with torch.no_grad():
        ref_net[2].weight.copy_(layer.weight.to_dense())
        ref_net[2].bias.copy_(layer.bias)
    f_of = lambda m: lambda z: m(z).sum()  # noqa: E731
    torch.testing.assert_close(torch.autograd.functional.hessian(f_of(net), xd),
                               torch.autograd.functional.hessian(f_of(ref_net), xd))

    def penalty_grad(model):
        xi = xd.clone().requires_grad_()
        gx, = torch.autograd.grad(model(xi).sum(), xi, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), model[0].weight)[0]
    torch.testing.assert_close(penalty_grad(net), penalty_grad(ref_net))
    # the weight gradient does depend on the input: differentiating it (meta-learning) is refused
    gw, = torch.autograd.grad(net(xd).sum(), values, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(gw.square().sum(), dense.weight, allow_unused=True)
    # the same tensor as the input and the values (f(v) = |v|^2 + b), and saved-tensor hooks that unpack
    # new objects: the links are recorded by position, not by an id() a freed tensor's may reuse
    square = SparseLinear.from_dense(nn.Linear(4, 1).double(), torch.ones(1, 4, dtype=torch.bool))
    v = square.weight.values
    gv, = torch.autograd.grad(square(v).sum(), v, create_graph=True)
    torch.testing.assert_close(gv, 2 * v.detach())
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(gv[0], v, allow_unused=True)
    for _ in range(20):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            xi = (xd * 1.0).requires_grad_()
            gx, = torch.autograd.grad(layer(xi).sum(), xi, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            torch.autograd.grad(gx.square().sum(), values, allow_unused=True)
    # inside a non-reentrant checkpoint the saved tensors unpack once: create_graph=True is refused there
    with pytest.raises(RuntimeError, match="inside torch.utils.checkpoint"):
        torch.autograd.grad(torch.utils.checkpoint.checkpoint(net, xd, use_reentrant=False).sum(), values,
                            create_graph=True)
    gx, = torch.autograd.grad(torch.tanh(layer(x)).sum(), x, create_graph=True)  # first order: as before
    torch.testing.assert_close(gx, (1 - torch.tanh(layer(x)) ** 2) @ (layer.weight.to_dense()))
    for transform in (lambda: torch.func.jvp(layer, (x.detach(),), (torch.ones_like(x),)),
                      lambda: torch.func.jacfwd(layer)(x.detach())):
        with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
            transform()
    ref = F.linear(x.detach(), layer.weight.to_dense(), layer.bias)  # vmap still works
    torch.testing.assert_close(torch.func.vmap(layer)(x.detach()), ref)


def test_one_dimensional_input_with_bias():
    torch.manual_seed(3)
    lin = nn.Linear(6, 4)
    mask = random_mask((4, 6), 0.5)
    layer = SparseLinear.from_dense(lin, mask)
    x = torch.randn(6, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    out, ref = layer(x), dense_linear(xr, lin.weight, mask, lin.bias)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.bias.grad, lin.bias.grad)
    torch.testing.assert_close(layer.weight.values.grad, lin.weight.grad[mask])


def test_mlp_training_follows_dense_masked_trajectory():
    """784-300-100-10 MLP, 50 SGD steps, same init and batches: sparse == dense masked."""
    torch.manual_seed(7)
    dense = _mlp()
    masks = {n: random_mask(m.weight.shape, 0.8) for n, m in dense.named_modules() if isinstance(m, nn.Linear)}
    zero_pruned_(dense, masks)
    sparse = sparsetrain.sparsify_(_copy(dense), masks)
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.05, momentum=0.9)
    opt_s = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(8)
    for _ in range(50):
        x = torch.randn(32, 1, 28, 28, generator=g)
        t = torch.randint(0, 10, (32,), generator=g)
        for model, opt in ((dense, opt_d), (sparse, opt_s)):
            opt.zero_grad()
            F.cross_entropy(model(x), t).backward()
            if model is dense:  # the dense-masked reference: pruned weights get no update
                for n, m in masks.items():
                    model.get_submodule(n).weight.grad.mul_(m)
            opt.step()
    for n, m in masks.items():
        torch.testing.assert_close(sparse.get_submodule(n).weight.to_dense(), dense.get_submodule(n).weight,
                                   rtol=1e-4, atol=1e-5)
    x = torch.randn(16, 1, 28, 28, generator=g)
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-5)


def _copy(model):
    import copy
    return copy.deepcopy(model)


def test_output_allows_inplace_ops_and_matches():
    # nn.ReLU(inplace=True) after a sparse layer (LeNet, ResNet): the op's output must not be a view
    w, x, b = _op_args()
    layer = SparseLinear(w, b)
    xr = x.clone().requires_grad_(True)
    y = torch.relu_(layer(xr))
    y.sum().backward()
    ref_x = x.clone().requires_grad_(True)
    ref = torch.relu(F.linear(ref_x, w.to_dense().detach(), b))
    ref.sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(xr.grad, ref_x.grad)


def test_nan_semantics_pruned_weights_are_absent():
    """README: a NaN input under an all-pruned column leaves the sparse output finite (the dense
    masked reference gives NaN: 0 x NaN); through a kept weight NaN propagates as in dense math."""
    w = torch.randn(4, 6)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 2] = False  # column 2 fully pruned
    mask[1:, 4] = False  # column 4 kept in row 0 only
    layer = SparseLinear(CSR.from_dense(w, mask))
    x = torch.randn(3, 6)
    x[0, 2] = float("nan")
    y = layer(x)
    assert torch.isfinite(y).all() and torch.isnan(dense_linear(x, w, mask)[0]).all()
    x[1, 4] = float("inf")
    y = layer(x)
    assert torch.isinf(y[1, 0]) and torch.isfinite(y[1, 1:]).all()


@pytest.mark.parametrize("make", ["sgd", "adam"])
@pytest.mark.parametrize("impl", ["plain", "foreach", "fused"])
def test_a_dense_models_optimizer_state_in_the_sparse_models_optimizer_is_refused_by_name(make, impl):
    """sparsify_ reorders a model's parameters (a layer's bias now before its values) and changes their
    shapes, so a dense model's optimizer state, loaded by position, lands on the wrong parameters:
    the fused=True CPU kernels wrote past the smaller tensors (glibc aborted the process). Every step
    refuses it, naming the optimizer, the state, its position and both shapes; the model untouched.
    State saved with the sparse model trains on."""
    torch.manual_seed(5)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    x = torch.randn(2, 3, 8, 8)
    dense_opt = _optimizer(make, impl, dense.parameters())
    dense(x).sum().backward()
    dense_opt.step()
    model = copy.deepcopy(dense)
    sparsetrain.sparsify_(model, {"0": random_mask((8, 3, 3, 3), 0.9), "3": random_mask((4, 288), 0.9)})
    assert [p.shape for p in model.parameters()][:2] == [(8,), (model[0].nnz,)]  # (the bias first now)
    opt = _optimizer(make, impl, model.parameters())
    opt.load_state_dict(copy.deepcopy(dense_opt.state_dict()))
    model(x).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]  # (the step below moves them, the refused one not)
    state = "momentum_buffer" if make == "sgd" else "exp_avg"
    assert_step_refused(opt, model.parameters(),
                        rf"{type(opt).__name__} state '{state}' of param_groups\[0\]\['params'\]\[0\] "
                        r"has shape \(8, 3, 3, 3\), the parameter \(8,\): .*build the optimizer after sparsify_")
    sparse_opt = _optimizer(make, impl, model.parameters())  # state saved with the sparse model fits
    sparse_opt.step()
    opt.load_state_dict(copy.deepcopy(sparse_opt.state_dict()))
    opt.step()
    assert not torch.equal(next(model.parameters()), before[0])


@pytest.mark.parametrize("make", ["sgd", "adam"])
@pytest.mark.parametrize("impl", ["plain", "foreach", "fused"])
def test_an_optimizer_built_before_sparsify_or_densify_is_refused_by_name(make, impl):
    """An optimizer built before sparsify_ holds the dense layers' weight and bias, which the model no
    longer uses: its steps changed nothing there, silently (the sparse layers never trained). Its step
    is refused, naming the parameter, the layer and sparsify_, the model untouched; one built after
    steps as the dense masked model's (gradient masked, mask applied after the step). Likewise after
    densify_. A replaced layer another model still runs (it has a gradient) trains on."""
    dense, mask, model, x = masked_mlp(6)
    early = _optimizer(make, impl, model.parameters())
    sparsetrain.sparsify_(model, {"0": mask})
    model(x).sum().backward()
    assert_step_refused(early, model.parameters(),
                        rf"{type(early).__name__} param_groups\[0\]\['params'\]\[0\] is the weight "
                        r"of layer '0', which sparsify_ replaced, and has no gradient: .*build the optimizer after sparsify_")
    opt, ref = _optimizer(make, impl, model.parameters()), _optimizer(make, impl, dense.parameters())
    for _ in range(2):
        opt.zero_grad(), ref.zero_grad()
        model(x).sum().backward(), dense(x).sum().backward()
        dense[0].weight.grad.mul_(mask)
        opt.step(), ref.step()
        zero_pruned_(dense, {"0": mask})
    torch.testing.assert_close(model[0].weight.to_dense(), dense[0].weight)
    torch.testing.assert_close(model[0].bias, dense[0].bias)
    sparsetrain.densify_(model)
    opt.zero_grad()
    model(x).sum().backward()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] is the bias of layer '0', which "
                       r"densify_ replaced, and has no gradient: .*build the optimizer after densify_"):
        opt.step()
    shared = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))  # (a layer another model still runs)
    other, other_opt = nn.Sequential(shared[0]), _optimizer(make, impl, shared.parameters())
    sparsetrain.sparsify_(shared, {"0": random_mask((6, 6), 0.5)})
    other(x).sum().backward()
    w = other[0].weight.detach().clone()
    other_opt.step()  # (its gradient: trained, not refused)
    assert not torch.equal(other[0].weight, w)


@pytest.mark.parametrize("make", ["sgd", "adam"])
@pytest.mark.parametrize("impl", ["plain", "foreach", "fused"])
def test_another_pattern_of_the_same_nnz_drops_the_gradient_and_refuses_the_old_state(make, impl):
    """load_state_dict of another pattern with the same nnz keeps the values' shape: the gradient of the
    old positions is dropped (it was added to the next one's), and the state an optimizer holds for them
    (momentum of other weights) is refused by name; restored state, or a fresh optimizer, trains on.
    Loading the same pattern keeps the gradient, as nn.Linear's load does."""
    torch.manual_seed(6)
    layer, saved = (SparseLinear.from_dense(nn.Linear(12, 6), random_mask((6, 12), 0.5)) for _ in range(2))
    saved_dict = saved.state_dict()
    saved_dict["weight.values"] = saved_dict["weight.values"][:layer.nnz]  # (same nnz: trim the pattern)
    crow = saved_dict["weight.crow_indices"].clone()
    crow[1:] = crow[1:].clamp(max=layer.nnz)
    saved_dict["weight.crow_indices"], saved_dict["weight.col_indices"] = crow, saved_dict["weight.col_indices"][:layer.nnz]
    saved.load_state_dict(saved_dict)
    assert saved.nnz == layer.nnz and not torch.equal(saved.weight.col_indices, layer.weight.col_indices)
    x = torch.randn(3, 12)
    opt, saved_opt = _optimizer(make, impl, layer.parameters()), _optimizer(make, impl, saved.parameters())
    for m, o in ((layer, opt), (saved, saved_opt)):
        m(x).sum().backward()
        o.step()
    values = layer.weight.values
    layer.load_state_dict(layer.state_dict())  # the same pattern: the gradient stays
    assert values.grad is not None
    opt.step()  # (and the state fits)
    layer.load_state_dict(saved.state_dict())
    assert layer.weight.values is values and values.grad is None
    layer(x).sum().backward()
    state = "momentum_buffer" if make == "sgd" else "exp_avg"
    with pytest.raises(ValueError, match=rf"{type(opt).__name__} state '{state}' of a sparse weight's values belongs "
                       "to its former pattern: .*same nnz"):
        opt.step()
    torch.testing.assert_close(values, saved.weight.values)  # untouched
    opt.load_state_dict(copy.deepcopy(saved_opt.state_dict()))  # the state saved with that pattern
    saved.zero_grad()
    saved(x).sum().backward()
    opt.step()
    saved_opt.step()
    torch.testing.assert_close(values, saved.weight.values)
    fresh = _optimizer(make, impl, layer.parameters())  # (a new optimizer holds no state of the old pattern)
    fresh.step()


def test_state_of_a_pattern_whose_nnz_comes_back_after_another_load_is_refused():
    """P1, then a pattern of another nnz, then P2 of P1's nnz at other positions: the momentum an
    optimizer held for P1 has the values' shape again, but belongs to other weights (it was
    stepped onto P2's before); refused by name like a direct load of P2."""
    def layer(rows):
        mask = torch.zeros(2, 4, dtype=torch.bool)
        for r, c in rows:
            mask[r, c] = True
        return SparseLinear.from_dense(nn.Linear(4, 2, bias=False), mask)
    torch.manual_seed(8)
    lay = layer([(0, 0), (0, 1)])
    opt = torch.optim.SGD(lay.parameters(), lr=0.1, momentum=0.9)
    lay(torch.randn(3, 4)).sum().backward()
    opt.step()
    lay.load_state_dict(layer([(0, 0), (0, 1), (0, 2)]).state_dict())
    lay.load_state_dict(layer([(1, 2), (1, 3)]).state_dict())
    assert opt.state[lay.weight.values]["momentum_buffer"].shape == lay.weight.values.shape == (2,)
    lay(torch.randn(3, 4)).sum().backward()
    before = lay.weight.values.detach().clone()
    with pytest.raises(ValueError, match="SGD state 'momentum_buffer' of a sparse weight's values belongs to its "
                                         "former pattern"):
        opt.step()
    assert torch.equal(lay.weight.values, before)


@pytest.mark.parametrize("make", ["sgd", "adam"])
def test_state_of_a_former_pattern_stays_refused_after_a_prune(make):
    """A load of another pattern of the same nnz, then a prune (global_prune shrinks the CSR, and the
    state of the optimizers that stepped it alike) before the next step: the shrunk momentum was a new
    tensor, so the old positions' momentum stepped the new ones silently; refused by name now, the
    values untouched, and a fresh optimizer steps as on a layer that never had that state."""
    from sparsetrain.prune import global_prune
    torch.manual_seed(9)
    m1 = random_mask((8, 8), 0.5)
    m2 = m1.flatten()[torch.randperm(64)].reshape(8, 8)
    model = nn.Sequential(SparseLinear.from_dense(nn.Linear(8, 8), m1))
    other = nn.Sequential(SparseLinear.from_dense(nn.Linear(8, 8), m2))
    opt = _optimizer(make, "plain", model.parameters())
    x = torch.randn(3, 8)
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    model.load_state_dict(other.state_dict())
    global_prune(model, {}, 0.5)
    assert model[0].nnz < int(m2.sum())
    ref = copy.deepcopy(model)
    model(x).sum().backward()
    before = model[0].weight.values.detach().clone()
    state = "momentum_buffer" if make == "sgd" else "exp_avg"
    with pytest.raises(ValueError, match=rf"{type(opt).__name__} state '{state}' of a sparse weight's values belongs "
                       "to its former pattern"):
        opt.step()
    assert torch.equal(model[0].weight.values, before)
    fresh, ref_opt = _optimizer(make, "plain", model.parameters()), _optimizer(make, "plain", ref.parameters())
    ref(x).sum().backward()
    fresh.step()
    ref_opt.step()
    torch.testing.assert_close(model[0].weight.values, ref[0].weight.values)
    assert not torch.equal(model[0].weight.values, before)


@pytest.mark.parametrize("kind", ["linear", "conv", "bsr"])
def test_a_sparse_weight_answers_what_code_for_a_dense_weight_reads(kind):
    """layer.weight.dtype / .device / .requires_grad are the values', and the freezing idiom
    `layer.weight.requires_grad = False` freezes them (it left a plain attribute before: the layer
    trained on); SparseConv2d carries nn.Conv2d's dilation, groups and padding_mode (the only values
    it supports), as tools that count FLOPs read them."""
    torch.manual_seed(7)
    if kind == "linear":
        layer, x = SparseLinear.from_dense(nn.Linear(32, 16).double(), random_mask((16, 32), 0.5)), torch.randn(3, 32)
    elif kind == "conv":
        layer, x = SparseConv2d.from_dense(nn.Conv2d(3, 4, 3).double(), random_mask((4, 3, 3, 3), 0.5)), torch.randn(2, 3, 6, 6)
        dense = nn.Conv2d(3, 4, 3)
        assert (layer.dilation, layer.groups, layer.padding_mode) == (dense.dilation, dense.groups, dense.padding_mode)
    else:
        layer, x = sparsetrain.BSRLinear.from_dense(nn.Linear(32, 32).double(), block_size=16), torch.randn(3, 32)
    w = layer.weight
    assert (w.dtype, w.device, w.requires_grad) == (torch.float64, torch.device("cpu"), True)
    out = layer(x.to(w.dtype))  # (the usual cast to a layer's dtype)
    assert out.dtype == torch.float64
    w.requires_grad = False
    assert not w.values.requires_grad and "requires_grad" not in w.__dict__
    before = w.values.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x.double()).sum().backward()
    opt.step()
    assert w.values.grad is None and torch.equal(w.values, before)  # frozen
    w.requires_grad = True
    assert w.values.requires_grad


def test_sparsify_takes_the_masks_global_prune_returns_after_a_first_sparsify():
    """global_prune's masks name every prunable layer, the sparse ones with their stored pattern: a
    second sparsify_ with them converts the dense ones and leaves the sparse ones (it refused them);
    another mask for a sparse layer is refused (its CSR is its mask), before anything converts."""
    from sparsetrain.prune import global_prune
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3), nn.Linear(3, 2))
    x = torch.randn(4, 6)
    masks = global_prune(model, {}, 0.5)
    sparsetrain.sparsify_(model, {"0": masks["0"]})
    first = model[0]
    masks = global_prune(model, masks, 0.5)
    assert set(masks) == {"0", "2", "3"} and torch.equal(masks["0"], first.weight.mask())
    ref = copy.deepcopy(model)
    bad = {**masks, "0": ~masks["0"]}
    for wrong, got in ((bad, "other entries"), ({"3": masks["3"], "0": masks["0"][:, :3]}, "shape (6, 3)"),
                       ({"0": None}, "NoneType")):
        with pytest.raises(ValueError, match=rf"masks\['0'\] names a layer that is sparse already \(SparseLinear\) "
                                             rf"with another mask than its stored pattern \(got {re.escape(got)}\)"):
            sparsetrain.sparsify_(model, wrong)
        assert isinstance(model[3], nn.Linear) and type(model[2]) is nn.Linear  # (nothing converted)
    sparsetrain.sparsify_(model, masks)
    assert model[0] is first and all(isinstance(model[i], SparseLinear) for i in (0, 2, 3))
    torch.testing.assert_close(model(x), ref(x), rtol=1e-6, atol=1e-6)



@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_sparsify_refuses_a_float_mask_under_any_name(scale):
    """A layer's first name refused a float mask (from_dense's dtype check); its second name (a layer
    registered twice) and a layer sparse already compared the mask as .bool() only, so 0.5 or 2 passed:
    now a TypeError naming masks[name], before anything converts; the bool masks convert as before."""
    from sparsetrain.prune import global_prune

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = self.a

        def forward(self, x):
            return self.b(F.relu(self.a(x)))

    model, mask = Twice(), random_mask((6, 6), 0.5)
    ref = copy.deepcopy(model)
    for masks in ({"a": mask, "b": mask.float() * scale}, {"b": mask, "a": mask.float() * scale}):
        name = next(n for n, m in masks.items() if m.dtype != torch.bool)
        with pytest.raises(TypeError, match=rf"masks\['{name}'\] must be a bool tensor, got dtype torch.float32"):
            sparsetrain.sparsify_(model, masks)
        assert type(model.a) is nn.Linear and model.b is model.a  # (nothing converted)
    sparsetrain.sparsify_(model, {"a": mask, "b": mask.clone()})
    zero_pruned_(ref, {"a": mask})
    x = torch.randn(3, 6)
    torch.testing.assert_close(model(x), ref(x))
    seq = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    masks = global_prune(seq, {}, 0.5)
    sparsetrain.sparsify_(seq, {"0": masks["0"]})
    with pytest.raises(TypeError, match=r"masks\['0'\] must be a bool tensor, got dtype torch.float32"):
        sparsetrain.sparsify_(seq, {**masks, "0": masks["0"].float() * scale})
    assert type(seq[2]) is nn.Linear  # (nothing converted)
    dense = copy.deepcopy(seq[2])
    sparsetrain.sparsify_(seq, masks)
    torch.testing.assert_close(seq[2].to_dense().weight, dense.weight * masks["2"])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_forward_mode_ad_is_refused_also_frozen_and_compiled(kind):
    """No forward-mode formula: torch.autograd.forward_ad on a frozen layer (no input requiring grad, so
    PyTorch's own "implement the jvp function" check never ran) returned no tangent, as did
    torch.func.jvp under torch.compile (a zero tangent where W t was due), silently; both raise
    NotImplementedError now. Tangents of the values or bias alone likewise; a layer without one computes as before."""
    import torch.autograd.forward_ad as fwAD
    torch.manual_seed(0)
    if kind == "linear":
        dense, x = nn.Linear(6, 4), torch.randn(2, 6)
        layer = SparseLinear.from_dense(dense, random_mask((4, 6), 0.5))
    else:
        dense, x = nn.Conv2d(2, 3, 3, padding=1), torch.randn(2, 2, 4, 4)
        layer = SparseConv2d.from_dense(dense, random_mask((3, 2, 3, 3), 0.5))
    layer.requires_grad_(False)
    t, v = torch.randn_like(x), layer.weight.values
    duals = [lambda: {}, lambda: {"weight.values": fwAD.make_dual(v, torch.ones_like(v))},
             lambda: {"bias": fwAD.make_dual(layer.bias, torch.ones_like(layer.bias))}]
    for i, state in enumerate(duals):
        with fwAD.dual_level(), pytest.raises(NotImplementedError, match="no forward-mode derivative"):
            torch.func.functional_call(layer, state(), (fwAD.make_dual(x, t) if i == 0 else x,))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, t: torch.func.jvp(layer, (x,), (t,)), backend="aot_eager")
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        compiled(x, t)
    torch._dynamo.reset()  # (the failed compile's state made a later fullgraph compile "trace a generator")
    with fwAD.dual_level():  # no tangent among its inputs: the output as before
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight.to_dense(), layer.bias) if kind == "linear"
                                   else F.conv2d(x, layer.weight.to_dense(), layer.bias, padding=1))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_torch_func_reverse_transforms_are_refused_clearly(kind):
    """torch.func.grad/vjp/jacrev through a sparse layer failed in torch.library's generated autograd
    with PyTorch's "it must override the setup_context staticmethod" (asking the caller for an
    autograd.Function method it does not own): a NotImplementedError now names the transforms and the
    alternatives, whichever input is differentiated, under vmap too. A layer whose inputs the
    transform does not track (a constant input) still computes, and so does torch.func.vmap."""
    torch.manual_seed(0)
    if kind == "linear":
        dense, x = nn.Linear(6, 4), torch.randn(2, 6)
        layer = SparseLinear.from_dense(dense, random_mask((4, 6), 0.5))
        ref = lambda t: F.linear(t, layer.weight.to_dense(), layer.bias)  # noqa: E731
    else:
        dense, x = nn.Conv2d(2, 3, 3, padding=1), torch.randn(2, 2, 4, 4)
        layer = SparseConv2d.from_dense(dense, random_mask((3, 2, 3, 3), 0.5))
        ref = lambda t: F.conv2d(t, layer.weight.to_dense(), layer.bias, padding=1)  # noqa: E731
    params = {"weight.values": layer.weight.values.detach(), "bias": layer.bias.detach()}
    refused = [lambda: torch.func.grad(lambda t: layer(t).sum())(x), lambda: torch.func.jacrev(layer)(x),
               lambda: torch.func.vjp(layer, x),
               lambda: torch.func.vmap(torch.func.grad(lambda t: layer(t).sum()))(x.unsqueeze(1)),
               lambda: torch.func.grad(lambda t: torch.func.vmap(layer)(t.unsqueeze(1)).sum())(x),
               lambda: torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).sum())(params)]
    for transform in refused:
        with pytest.raises(NotImplementedError, match="sparse layers do not support torch.func.grad, vjp, jacrev"):
            transform()
    s = torch.randn(ref(x).shape)  # (a constant input: only s is differentiated)
    torch.testing.assert_close(torch.func.grad(lambda t: (t * layer(x)).sum())(s), ref(x).detach())
    torch.testing.assert_close(torch.func.vmap(layer)(x.unsqueeze(1)).squeeze(1), ref(x))


def test_plain_tensor_bias_trains():
    """A bias given as a plain tensor trains, as nn.Parameter(tensor) and the CSR's values from a plain
    tensor do (it was copied frozen: one SGD step left it as it was, the dense reference's moved); a
    Parameter's requires_grad carries over. SparseLinear, SparseConv2d and BSRLinear."""
    from sparsetrain.engine.bsr import BSR, BSRLinear
    w, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    mask = random_mask((4, 6), 0.5)
    conv_w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    layers = [(SparseLinear(CSR.from_dense(w, mask), b), torch.randn(3, 6, dtype=torch.float64),
               lambda x, bb: dense_linear(x, w, mask, bb)),
              (SparseConv2d(CSR.from_dense(conv_w), b), torch.randn(2, 2, 5, 5, dtype=torch.float64),
               lambda x, bb: F.conv2d(x, conv_w, bb)),
              (BSRLinear(BSR.from_dense(w, 16), b), torch.randn(3, 6, dtype=torch.float64),
               lambda x, bb: F.linear(x, w, bb))]
    for layer, x, ref in layers:
        assert layer.bias.requires_grad and layer.bias is not b
        ref_b = b.clone().requires_grad_(True)
        layer(x).square().sum().backward()
        ref(x, ref_b).square().sum().backward()
        torch.testing.assert_close(layer.bias.grad, ref_b.grad)
        frozen = type(layer)(layer.weight, nn.Parameter(b.clone(), requires_grad=False))
        assert not frozen.bias.requires_grad  # (a frozen layer's Parameter stays frozen)


def test_bsr_linear_repr_has_nn_linear_fields():
    """print(model) shows a BSRLinear's in/out features and bias as nn.Linear's (and SparseLinear's) repr does (it
    showed only the BSR child, bias not at all)."""
    from sparsetrain.engine.bsr import BSRLinear
    for bias in (True, False):
        lin = nn.Linear(40, 17, bias=bias)
        for layer in (BSRLinear.from_dense(lin, 16), SparseLinear.from_dense(lin)):
            assert layer.extra_repr().startswith(lin.extra_repr()), (layer.extra_repr(), lin.extra_repr())


def test_bsr_linear_refuses_a_weight_naming_what_it_got():
    """BSRLinear(weight) refuses anything but a 2-D BSR naming what it was given, as bsr_linear does (it said only
    "must be a 2-D sparsetrain.bsr.BSR": a CSR or a 3-D BSR passed for it went unnamed)."""
    from sparsetrain.engine.bsr import BSR, BSRLinear
    with pytest.raises(TypeError, match=r"weight must be a 2-D sparsetrain BSR \[out, in\], got CSR$"):
        BSRLinear(CSR.from_dense(torch.randn(4, 6)))
    with pytest.raises(TypeError, match=r"got BSR of shape \(32, 2, 16\)$"):
        BSRLinear(BSR.from_dense(torch.randn(32, 2, 16), 16))
    with pytest.raises(TypeError, match=r"got Parameter$"):
        BSRLinear(nn.Linear(6, 4).weight)
    layer = BSRLinear(BSR.from_dense(torch.randn(32, 32), 16))  # (a 2-D BSR: taken, its product the dense one's)
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight.to_dense()))


@pytest.mark.parametrize("kind", ["linear", "conv", "bsr"])
def test_reset_parameters_draws_the_dense_layer_s_init_at_the_kept_positions(kind):
    """A sparse layer had no reset_parameters (model.apply(m.reset_parameters()) code skipped it): it
    re-draws as nn.Linear / nn.Conv2d's does, under one seed the dense layer's draws at the kept
    positions; the pattern and the Parameters (an optimizer's) stay."""
    from sparsetrain.engine.bsr import BSR, BSRLinear
    from sparsetrain.prune import block_mask
    dense = {"linear": lambda: nn.Linear(37, 11), "conv": lambda: nn.Conv2d(5, 7, 3, stride=2),
             "bsr": lambda: nn.Linear(48, 32)}[kind]
    src = dense()
    if kind == "bsr":
        layer = BSRLinear(BSR.from_dense(src.weight, 16, block_mask(src.weight, 16, 0.5)), src.bias)
    else:
        layer = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}[type(src)].from_dense(src, random_mask(src.weight.shape, 0.7, empty_rows=1))
    values, bias, mask = layer.weight.values, layer.bias, layer.weight.mask()
    torch.manual_seed(5)
    ref = dense()
    torch.manual_seed(5)
    layer.reset_parameters()
    assert layer.weight.values is values and layer.bias is bias and torch.equal(layer.weight.mask(), mask)
    assert torch.equal(layer.weight.to_dense(), ref.weight.detach() * mask) and torch.equal(bias, ref.bias)
    assert values.requires_grad and not torch.equal(layer.weight.to_dense(), src.weight.detach() * mask)


@pytest.mark.parametrize("kind", ["linear", "conv", "bsr"])
def test_reset_parameters_sets_a_parametrized_bias_through_right_inverse_or_refuses_it(kind):
    """reset_parameters copied the bias drawn into the tensor a parametrization (or prune, weight_norm) computes,
    lost at the next access: the bias stayed as it was, silently. Now it goes through the parametrization's
    right_inverse (the bias computed is the dense layer's draw, the original the same Parameter); a bias it cannot
    be set in is refused by name before anything is drawn."""
    from sparsetrain.engine.bsr import BSR, BSRLinear
    from sparsetrain.prune import block_mask
    dense = {"linear": lambda: nn.Linear(37, 11), "conv": lambda: nn.Conv2d(5, 7, 3, stride=2),
             "bsr": lambda: nn.Linear(48, 32)}[kind]

    def sparse():
        src = dense()
        if kind == "bsr":
            return BSRLinear(BSR.from_dense(src.weight, 16, block_mask(src.weight, 16, 0.5)), src.bias)
        return {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}[type(src)].from_dense(src, random_mask(src.weight.shape, 0.7))

    layer = sparse()
    nn.utils.parametrize.register_parametrization(layer, "bias", Doubled())
    original, mask = layer.parametrizations.bias.original, layer.weight.mask()
    torch.manual_seed(5)
    ref = dense()
    torch.manual_seed(5)
    layer.reset_parameters()
    assert layer.parametrizations.bias.original is original
    torch.testing.assert_close(layer.bias, ref.bias.detach())
    assert torch.equal(layer.weight.to_dense(), ref.weight.detach() * mask)
    refusals = [(lambda m: nn.utils.parametrize.register_parametrization(m, "bias", nn.Tanh()),
                 r"reset_parameters: its bias is computed by a parametrization \(Tanh\) without a right_inverse"),
                (lambda m: prune.l1_unstructured(m, "bias", amount=0.5),
                 r"reset_parameters: the layer's bias is computed by torch.nn.utils.prune.*prune.remove\(layer, 'bias'\)")]
    for reparametrize, match in refusals:
        layer = sparse()
        reparametrize(layer)
        values = layer.weight.values.detach().clone()
        with pytest.raises(TypeError, match=match):
            layer.reset_parameters()
        assert torch.equal(layer.weight.values, values)  # (refused before the weights were drawn)


def test_an_ema_of_the_buffers_that_rewrites_the_index_is_refused_and_one_of_floats_matches_dense():
    """AveragedModel(..., use_buffers=True) averages every buffer, the CSR's integer index too: an EMA
    (torchvision's form, decay·a + (1 − decay)·b) writes floats into it, truncated (288 · 0.9 + 288 · 0.1 is
    stored as 287), so the averaged model's pattern changed silently or its op failed on a mismatch naming
    no cause. Its forward is refused by name, also after a move (.cpu(), a deepcopy's .float(): resealed before
    2026-12-06, it ran on the truncated index silently). An avg_fn that averages only floating-point tensors, and the
    SWA of one pattern (integer arithmetic, exact), give the dense masked model's average, moved too."""
    from torch.optim.swa_utils import AveragedModel
    torch.manual_seed(7)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 10))
    masks = {"0": random_mask((8, 3, 3, 3), 0.5), "4": random_mask((10, 288), 0.5)}
    zero_pruned_(dense, masks)
    model = copy.deepcopy(dense)
    sparsetrain.sparsify_(model, masks)
    ema = lambda a, b, n: 0.9 * a + 0.1 * b  # noqa: E731 (torchvision's ExponentialMovingAverage)
    floats_only = lambda a, b, n: ema(a, b, n) if a.is_floating_point() else b  # noqa: E731
    averages = {k: [AveragedModel(m, avg_fn=fn, use_buffers=True) for m in (dense, model)]
                for k, fn in (("ema", ema), ("floats", floats_only), ("swa", None))}
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (dense, model)]
    for _ in range(3):
        x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 10, (4,))
        for m, opt in zip((dense, model), opts):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            if m is dense:
                for n, mk in masks.items():
                    m.get_submodule(n).weight.grad.mul_(mk)
            opt.step()
            if m is dense:
                zero_pruned_(m, masks)
        for pair in averages.values():
            for avg, m in zip(pair, (dense, model)):
                avg.update_parameters(m)
    x = torch.randn(4, 3, 6, 6)
    bad = averages["ema"][1].eval()
    assert any(not torch.equal(a, b) for a, b in zip(bad.module.buffers(), model.buffers()) if not a.is_floating_point())
    with pytest.raises(ValueError, match=r"CSR weight's index buffers .* were changed in place .*use_buffers=True"):
        bad(x)
    with pytest.raises(ValueError, match=r"CSR weight's index buffers .* were changed in place"):
        bad.state_dict()  # (saved, the truncated pattern would load elsewhere as if it were the layer's)
    for moved in (bad.cpu(), copy.deepcopy(bad).float()):  # (a move resealed it before 2026-12-06: it ran silently)
        with pytest.raises(ValueError, match=r"CSR weight's index buffers .* were changed in place"):
            moved(x)
    for k in ("floats", "swa"):
        ref, avg = (a.eval() for a in averages[k])
        torch.testing.assert_close(avg(x), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(copy.deepcopy(avg).double()(x.double()), ref.double()(x.double()))  # (moved)


def test_an_ema_that_rewrites_a_bsr_index_is_refused_on_the_dense_masked_path_too():
    """A BSRLinear on the CPU (no Triton: the dense masked product of to_dense()) read its block index without
    the seal's check, so an EMA of the buffers (AveragedModel(use_buffers=True), truncating 0.9·a + 0.1·b)
    moved blocks silently. Its forward is refused by name, as the CSR's; an EMA of the floats only gives the
    dense masked layer's average."""
    from torch.optim.swa_utils import AveragedModel
    from sparsetrain.engine.bsr import BSRLinear
    from sparsetrain.prune import block_mask
    torch.manual_seed(3)
    dense = nn.Linear(128, 64)
    mask = block_mask(dense.weight.detach(), 16, 0.5)
    with torch.no_grad():
        dense.weight.mul_(mask)
    layer = BSRLinear.from_dense(dense, 16, mask)
    ema = lambda a, b, n: 0.9 * a + 0.1 * b  # noqa: E731
    floats_only = lambda a, b, n: ema(a, b, n) if a.is_floating_point() else b  # noqa: E731
    bad, good, ref = (AveragedModel(m, avg_fn=fn, use_buffers=True)
                      for m, fn in ((layer, ema), (layer, floats_only), (dense, ema)))
    for m, opt in ((layer, torch.optim.SGD(layer.parameters(), lr=0.1)), (dense, torch.optim.SGD(dense.parameters(), lr=0.1))):
        for step in range(2):
            opt.zero_grad()
            m(torch.randn(4, 128, generator=torch.Generator().manual_seed(step))).pow(2).sum().backward()
            if m is dense:
                m.weight.grad.mul_(mask)
            opt.step()
            for avg in ((bad, good) if m is layer else (ref,)):
                avg.update_parameters(m)
    x = torch.randn(4, 128)
    assert any(not torch.equal(a, b) for a, b in zip(bad.module.buffers(), layer.buffers()) if not a.is_floating_point())
    with pytest.raises(ValueError, match=r"BSR weight's index buffers .* were changed in place"):
        bad(x)
    torch.testing.assert_close(good(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("by", ["sparsify_", "densify_"])
def test_an_optimizer_built_before_the_swap_is_refused_after_zero_grad_that_keeps_the_gradients(by):
    """zero_grad(set_to_none=False) keeps each gradient as zeros, so the replaced layers' Parameters, which
    an optimizer built before sparsify_/densify_ still steps, never had a None gradient and its steps trained
    nothing, silently. Their gradients are dropped at the swap: the step is refused by name; one built after
    trains as the dense masked model."""
    dense, mask, model, x = masked_mlp(8)
    if by == "densify_":
        sparsetrain.sparsify_(model, {"0": mask})
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        early.zero_grad(set_to_none=False)
        model(x).sum().backward()
        early.step()
    sparsetrain.densify_(model) if by == "densify_" else sparsetrain.sparsify_(model, {"0": mask})
    early.zero_grad(set_to_none=False)
    model(x).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]  # (the step below moves them, the refused one not)
    assert_step_refused(early, model.parameters(),
                        rf"is the \w+ of layer '0', which {by} replaced, and has no gradient")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad(set_to_none=False)
    model(x).sum().backward()
    opt.step()
    assert not torch.equal(next(model.parameters()), before[0])


def test_an_optimizer_built_before_sparsify_of_frozen_layers_trains_the_rest():
    """Sparsifying a frozen backbone (requires_grad=False) while an optimizer built before holds all of the
    model's parameters: the frozen dense weights were never stepped (no gradient), before the swap or
    after, so nothing is lost, yet the step was refused as if the sparse layers went untrained. It trains
    the head as the dense masked model's optimizer does; a trainable layer swapped is still refused."""
    torch.manual_seed(9)
    dense = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    mask = random_mask((5, 6), 0.5)
    zero_pruned_(dense, {"0": mask})
    dense[0].requires_grad_(False)
    model, x = copy.deepcopy(dense), torch.randn(4, 6)
    opt, ref = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, dense))
    sparsetrain.sparsify_(model, {"0": mask})
    assert not model[0].weight.requires_grad
    for _ in range(2):
        for m, o in ((model, opt), (dense, ref)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    torch.testing.assert_close(model[2].weight, dense[2].weight)
    torch.testing.assert_close(model[0].weight.to_dense(), dense[0].weight)
    torch.testing.assert_close(model(x), dense(x))
    trainable = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    early = torch.optim.SGD(trainable.parameters(), lr=0.1)
    sparsetrain.sparsify_(trainable, {"0": mask})
    trainable(x).sum().backward()
    with pytest.raises(ValueError, match=r"is the weight of layer '0', which sparsify_ replaced, and has no gradient"):
        early.step()


@pytest.mark.parametrize("by", ["sparsify_", "densify_"])
def test_an_optimizer_built_before_the_swap_of_a_frozen_layer_is_refused_once_it_is_unfrozen(by):
    """A layer frozen (requires_grad=False) when sparsify_/densify_ replaced it, unfrozen after, while an
    optimizer built before holds all of the model's parameters: that optimizer holds only the old frozen
    tensors, so its steps trained the rest and silently never the unfrozen layer. Its step is refused by
    name, the model untouched; one built after the unfreezing trains as the dense masked model's."""
    dense, mask, model, x = masked_mlp(10)
    if by == "densify_":
        sparsetrain.sparsify_(model, {"0": mask})
    model[0].requires_grad_(False)
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsetrain.densify_(model) if by == "densify_" else sparsetrain.sparsify_(model, {"0": mask})
    model[0].requires_grad_(True)
    model(x).pow(2).sum().backward()
    assert_step_refused(early, model.parameters(),
                        rf"SGD param_groups\[0\]\['params'\]\[0\] is the \S+ of layer '0', which {by} "
                        r"replaced while frozen \(requires_grad=False\); its replacement requires grad now, and this "
                        r"optimizer does not hold it.*build the optimizer after")
    opt, ref = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, dense))
    dense(x).pow(2).sum().backward()
    assert_steps_as_dense_masked(opt, ref, model, dense, mask, x, by)


def test_a_step_over_a_replaced_layer_another_model_runs_without_a_backward_yet_does_nothing():
    """An optimizer holding a layer that sparsify_ replaced in one model and another model still runs: a
    step before any backward (no gradient anywhere) was refused as if the layer were untrained, where plain
    PyTorch steps nothing. It passes, changing nothing; after the other model's backward it trains that
    layer as the same optimizer over an untouched copy does."""
    torch.manual_seed(11)
    shared = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    other, x = nn.Sequential(shared[0]), torch.randn(4, 6)
    ref = copy.deepcopy(other)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (other, ref))
    sparsetrain.sparsify_(shared, {"0": random_mask((6, 6), 0.5)})
    before = [p.detach().clone() for p in other.parameters()]
    opt.step()  # (no gradient: nothing to do, as in plain PyTorch)
    assert all(torch.equal(p, b) for p, b in zip(other.parameters(), before))
    for _ in range(2):
        for m, o in ((other, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    torch.testing.assert_close(other(x), ref(x))
    assert not torch.equal(other[0].weight, before[0])


def test_an_optimizer_built_before_sparsify_given_the_new_layer_s_parameters_trains_it():
    """An optimizer built before sparsify_ that is then given the sparse layer's Parameters
    (add_param_group) trains the model: its step was refused for the old tensors it still holds (no
    gradient reaches them; a step skips them). It steps as the dense masked model's optimizer."""
    dense, mask, model, x = masked_mlp(13)
    early, ref = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, dense))
    sparsetrain.sparsify_(model, {"0": mask})
    early.add_param_group({"params": list(model[0].parameters())})
    for _ in range(2):
        for m, o in ((model, early), (dense, ref)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
        dense[0].weight.grad.mul_(mask)
        early.step(), ref.step()
    torch.testing.assert_close(model[0].weight.to_dense(), dense[0].weight)
    torch.testing.assert_close(model(x), dense(x))


def test_a_gradient_another_model_computed_before_the_swap_is_dropped_and_its_step_refused_saying_so():
    """The swap drops the replaced layers' gradients (zero_grad(set_to_none=False) kept an old optimizer's
    as zeros): another model that still runs the layer and ran its backward before the swap, stepping
    after, loses that gradient. A gradient there cannot be told from the swapped model's own, so its
    step is refused, saying the swap dropped it, the model untouched; after its backward again it trains
    as the same optimizer over an untouched copy does."""
    torch.manual_seed(12)
    shared = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    other, x = nn.Sequential(shared[0]), torch.randn(4, 6)
    ref = copy.deepcopy(other)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (other, ref))
    other(x).pow(2).sum().backward()
    sparsetrain.sparsify_(shared, {"0": random_mask((6, 6), 0.5)})
    assert other[0].weight.grad is None
    assert_step_refused(opt, other.parameters(),
                        r"is the weight of layer '0', which sparsify_ replaced, and has no gradient: "
                        r".*\(sparsify_ dropped the gradient it held: a model that still runs that layer needs its "
                        r"backward again after sparsify_, or its step before\)")
    for m, o in ((other, opt), (ref, ref_opt)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    torch.testing.assert_close(other(x), ref(x))
    opt.zero_grad()
    opt.step()  # (a gradient came since the swap: none lost, and no gradient now is a no-op)
    torch.testing.assert_close(other(x), ref(x))


@pytest.mark.parametrize("kind", ["linear", "conv", "bsr"])
def test_reset_parameters_and_mask_on_the_meta_device(kind):
    """A model moved to meta (model.apply(reset_parameters) over it, as deferred-init code does): the CSR
    layers' reset_parameters drew nothing there, BSRLinear's raised torch's RuntimeError from inside ('cannot
    repeat_interleave a meta tensor without output_size'), as did its weight's mask(). All take it, the mask
    a meta tensor of the weight's shape; to_empty and a load then give the source's outputs (the dense
    masked layer's)."""
    from sparsetrain.engine.bsr import BSR, BSRLinear
    from sparsetrain.prune import block_mask
    src = {"linear": lambda: nn.Linear(37, 11), "conv": lambda: nn.Conv2d(5, 7, 3), "bsr": lambda: nn.Linear(48, 32)}[kind]()
    if kind == "bsr":
        mask = block_mask(src.weight, 16, 0.5)
        layer = BSRLinear(BSR.from_dense(src.weight, 16, mask), src.bias)
    else:
        mask = random_mask(src.weight.shape, 0.7)
        layer = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}[type(src)].from_dense(src, mask)
    meta = copy.deepcopy(layer).to("meta")
    meta.reset_parameters()
    m = meta.weight.mask()
    assert m.is_meta and m.shape == src.weight.shape and m.dtype == torch.bool
    meta.to_empty(device="cpu")
    meta.load_state_dict(layer.state_dict())
    x = torch.randn(3, 37) if kind == "linear" else torch.randn(3, 48) if kind == "bsr" else torch.randn(2, 5, 6, 6)
    with torch.no_grad():
        src.weight.mul_(mask)
    torch.testing.assert_close(meta(x), src(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fuse", [False, True])
def test_densify_of_a_model_whose_index_an_ema_rewrote_is_refused_untouched(fuse):
    """The averaged model of AveragedModel(use_buffers=True) refused its forward, but densify_ (the README's
    way to export) and a layer's to_dense() read the truncated index as it was: a dense model with weights
    moved to other positions, silently. densify_ is refused naming the layer before any layer is swapped,
    to_dense() as the forward is; an EMA of the floats only densifies to the dense masked model's average."""
    from torch.optim.swa_utils import AveragedModel
    from sparsetrain.engine.bsr import BSRLinear
    from sparsetrain.prune import block_mask
    torch.manual_seed(10)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 64), nn.ReLU(), nn.Linear(64, 32))
    masks = {"0": random_mask((8, 3, 3, 3), 0.5), "4": random_mask((64, 288), 0.5)}
    bmask = block_mask(dense[6].weight.detach(), 16, 0.5)
    zero_pruned_(dense, {**masks, "6": bmask})
    model = copy.deepcopy(dense)
    sparsetrain.sparsify_(model, masks, fuse=fuse)
    model[6] = BSRLinear.from_dense(model[6], 16, bmask)
    ema = lambda a, b, n: 0.9 * a + 0.1 * b  # noqa: E731
    floats_only = lambda a, b, n: ema(a, b, n) if a.is_floating_point() else b  # noqa: E731
    bad, good, ref = (AveragedModel(m, avg_fn=fn, use_buffers=True)
                      for m, fn in ((model, ema), (model, floats_only), (dense, ema)))
    for avg, m in ((bad, model), (good, model), (ref, dense)):
        avg.update_parameters(m)
        avg.update_parameters(m)
    types = [type(m) for m in bad.module]
    with pytest.raises(ValueError, match=r"^layer '0': the CSR weight's index buffers .* were changed in place"):
        sparsetrain.densify_(bad.module)
    assert [type(m) for m in bad.module] == types  # (nothing swapped, nothing unfused)
    with pytest.raises(ValueError, match=r"BSR weight's index buffers .* were changed in place"):
        bad.module[6].to_dense()
    sparsetrain.densify_(good.module)
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(good.module.eval()(x), ref.module.eval()(x), rtol=1e-5, atol=1e-5)
