"""Every Triton kernel compiles for real GPUs, without one: `triton.compile` runs the whole compiler
(Triton IR -> LLVM -> PTX -> cubin with the ptxas inside the triton wheel) for sm_80 (A100) and
sm_90 (H100), in every autotune config, for every dtype the kernel accepts and every constexpr
combination its launches use; each kernel's shared memory must fit the architecture's per-block
limit. (The interpreter tests check what the kernels compute; this checks that they compile.)
"""
import itertools
import math
import os
from concurrent.futures import ProcessPoolExecutor

import pytest

triton = pytest.importorskip("triton")

# per-block shared memory limits (opt-in maximum), bytes
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
T = "T"  # stands for the value (and accumulation) dtype in the pointer maps below
A = "A"  # stands for the activation dtype (that of T, or bf16/fp16 under mixed precision)


def _specs():
    """(module, kernel, {arg: pointer element type (or T, A)}, dtypes, [constexpr dicts used by launches]);
    a dtype "bf16+fp32" = bf16 activations with fp32 values (mixed precision)."""
    csr = ["fp32", "fp64", "bf16+fp32", "fp16+fp32"]  # sparse_linear / sparse_conv2d (kernels/_utils.check_activation)
    bsr = ["fp32", "fp16", "bf16"]  # bsr_matmul.BSR_DTYPES
    both = [False, True]
    return [
        ("sparse_linear", "_csr_spmm_kernel",
         dict(ptr="i64", idx="i32", vals=T, perm="i64", order="i32", xt=A, yt=A, bias=T), csr,
         [dict(HAS_PERM=p, HAS_BIAS=b) for p, b in itertools.product(both, both)]),
        ("sparse_linear", "_csr_sddmm_kernel",
         dict(ptr="i64", idx="i32", order="i32", dyt=A, xt=A, out=T), csr, [{}]),
        ("bsr_matmul", "_bsr_mm_kernel",
         dict(a=T, ptr="i64", idx="i32", perm="i64", vals=T, order="i32", c=T, bias=T), bsr,
         # bsr_linear_forward (W^T blocks, no perm, a bias or not), then bsr_linear_grad_input (W blocks read
         # through perm, no bias): the quick run compiles the forward with a bias at BS 64
         [dict(TRANS_W=True, HAS_PERM=False, HAS_BIAS=b, BS=bs) for b in both for bs in (16, 32, 64)]
         + [dict(TRANS_W=False, HAS_PERM=True, HAS_BIAS=False, BS=bs) for bs in (16, 32, 64)]),
        # (half precision split over the batch accumulates into an fp32 out: "fp16+fp32")
        ("bsr_matmul", "_bsr_sddmm_kernel", dict(dy=A, x=A, brow="i32", idx="i32", out=T),
         bsr + ["fp16+fp32", "bf16+fp32"], [dict(BS=bs) for bs in (16, 32, 64)]),
        ("sparse_conv2d", "_conv_fwd_kernel",
         dict(x=A, ptr="i64", idx="i32", vals=T, order="i32", bias=T, y=A, stats="fp64", in_mean="fp64", in_scale=A,
              in_shift=A, counts="i64"), csr,
         # every option first (the one the quick run compiles), then the plain conv (a bias or not) and
         # every sparse_conv2d_stats launch (batch statistics always; a conv bias or not; the ReLU or not;
         # its states counted or not, with or without it, as the C++ op; the input a deferred BN's y, with
         # its ReLU or not, or not). (A list written by hand missed the commonest deferred case until
         # 2026-12-05, counting without the ReLU until 2026-12-06: checked against the launches below.)
         [dict(HAS_BIAS=True, RELU=True, STATS=True, IN_ACT=True, IN_RELU=True, COUNTS=True)]
         + [dict(HAS_BIAS=b, RELU=False, STATS=False, IN_ACT=False, IN_RELU=False, COUNTS=False) for b in both]
         + [dict(HAS_BIAS=b, RELU=r, STATS=True, IN_ACT=ia, IN_RELU=ir, COUNTS=c)
            for b, r, c in itertools.product(both, both, both)
            for ia, ir in ((False, False), (True, False), (True, True))]),
        ("sparse_conv2d", "_conv_dgrad_kernel",
         dict(dy=A, cptr="i64", rows="i32", perm="i64", vals=T, order="i32", dx=A), csr, [{}]),
        ("sparse_conv2d", "_conv_wgrad_kernel",
         dict(dy=A, x=A, ptr="i64", idx="i32", order="i32", out=T), csr, [{}]),
        ("bn_act", "_bn_act_kernel", dict(y=T, mean="fp64", scale=T, shift=T, res=T, out=T, counts="i64"), ["fp32", "fp64"],
         # (the states, y > 0, are counted with or without the ReLU, as the C++ op)
         [dict(HAS_RES=True, RELU=True, COUNTS=True)] + [dict(HAS_RES=r, RELU=lu, COUNTS=c)
                                                          for r, lu, c in itertools.product(both, both, both)]),
    ]


def _jobs(full: bool):
    """(module, kernel, pointers, dtype, constexprs, config index, arch) to compile: every accepted
    dtype x both architectures, for each kernel's autotune config and constexpr combination of the
    most shared memory (the largest blocks; BS 64, bias; for _bsr_mm_kernel one per TRANS_W, the
    forward's and grad_input's, which differ in shared memory) or, `full`, every autotune config, every
    combination its launches use and both fp32 precisions of tl.dot (ieee, tf32)."""
    import importlib
    jobs = []
    for module, name, ptrs, dtypes, combos in _specs():
        combos = list({tuple(sorted(c.items())): c for c in combos}.values())  # (each once, in order)
        tuner = getattr(importlib.import_module(f"sparsetrain.kernels.{module}"), name)
        if not full:
            paths = {c.get("TRANS_W") for c in combos}
            combos = [max((c for c in combos if c.get("TRANS_W") == t),
                          key=lambda c: (c.get("BS", 0), c.get("HAS_BIAS", False))) for t in sorted(paths, key=str)]
        configs = list(enumerate(tuner.configs))
        if not full:  # the config of the largest blocks (and stages): the most shared memory
            configs = [max(configs, key=lambda c: (math.prod(v for v in c[1].kwargs.values() if isinstance(v, int)),
                                                   c[1].num_stages))]
        for dtype, combo, (ci, _), cap in itertools.product(dtypes, combos, configs, SHARED_LIMIT):
            dot = "PRECISION" in tuner.fn.arg_names
            precisions = (["ieee", "tf32"] if full else ["ieee"]) if dot and dtype == "fp32" else ["tf32"] if dot else [None]
            for prec in precisions:
                extra = {**combo, **({"PRECISION": prec} if prec else {})}
                jobs.append((module, name, ptrs, dtype, extra, ci, cap))
    return jobs


def _compile(job):
    """Compile one job in this (worker) process; returns (job id, shared bytes, error or None)."""
    import importlib

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    module, name, ptrs, dtype, extra, ci, cap = job
    tuner = getattr(importlib.import_module(f"sparsetrain.kernels.{module}"), name)
    fn, cfg = tuner.fn, tuner.configs[ci]
    constexprs = {**cfg.kwargs, **extra}
    act, val = dtype.split("+") if "+" in dtype else (dtype, dtype)
    sig = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg in ptrs:
            sig[arg] = "*" + {T: val, A: act}.get(ptrs[arg], ptrs[arg])
        else:
            sig[arg] = "i32"
    missing = [a for a, t in sig.items() if t == "constexpr" and a not in constexprs]
    if missing:
        return job, 0, f"constexprs not given: {missing}"
    try:
        k = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", cap, 32),
                           options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        if not k.asm.get("cubin"):
            return job, 0, "no cubin produced"
        return job, int(k.metadata.shared), None
    except Exception as e:  # report every failing combination, not just the first
        return job, 0, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"


def _compile_all(full: bool):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("run without TRITON_INTERPRET=1: the interpreter replaces the compiler")
    import multiprocessing
    with ProcessPoolExecutor(max_workers=max(2, os.cpu_count() or 1),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile, _jobs(full), chunksize=8))


@pytest.fixture(scope="module")
def compiled():
    return _compile_all(full=False)


def _check_all_compiled(results, at_least):
    failures = [(job[:2] + job[3:], err) for job, _, err in results if err]
    assert not failures, f"{len(failures)} of {len(results)} compilations failed, e.g. {failures[:5]}"
    kernels = {(j[0], j[1]) for j, _, _ in results}
    assert len(kernels) == 8 and len(results) >= at_least  # every kernel, config, dtype, arch


def test_every_kernel_and_dtype_compiles_for_sm80_and_sm90(compiled):
    _check_all_compiled(compiled, 30)


@pytest.mark.slow
def test_every_config_and_constexpr_combination_compiles():
    """`make test-slow`: every autotune config and every flag combination the launches use (~1000
    compilations, minutes on a cold Triton cache)."""
    results = _compile_all(full=True)
    _check_all_compiled(results, 600)
    assert all(shared <= SHARED_LIMIT[job[6]] for job, shared, err in results if not err)


def test_shared_memory_fits_each_architecture(compiled):
    over = [(job[1], job[3], job[4], job[5], job[6], shared) for job, shared, err in compiled
            if not err and shared > SHARED_LIMIT[job[6]]]
    assert not over, f"kernels over the per-block shared memory limit: {over[:5]}"
    assert max(shared for _, shared, _ in compiled) > 0  # the metadata is read, not all zero


def test_readme_states_the_slow_run_s_compilation_count():
    """README's "make test-slow compiles ... N compilations" is this file's full job list (it said ~1100 after
    the combinations grew to 1672)."""
    import re
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    stated = re.search(r"combinations no launch uses; ~?(\d+) compilations", readme)
    assert stated and int(stated.group(1)) == len(_jobs(full=True)), stated and stated.group(0)


def test_spec_lists_exactly_the_constexpr_combinations_the_ops_launch(monkeypatch):
    """Every op's Triton function (and csr_spmm, exported) called with each option it takes, its launches
    recorded (not run): the (kernel, constexprs) set is _specs()'s, both ways. The hand list missed
    sparse_conv2d_stats and bn_act counting the ReLU states without the ReLU (the C++ ops count y > 0
    either way) until 2026-12-06, so those launches were never compiled here."""
    import importlib
    import torch
    from sparsetrain.engine.bsr import BSR
    from sparsetrain.engine.formats import CSR
    monkeypatch.setattr(importlib.import_module("sparsetrain.kernels._utils"), "INTERPRET", True)  # (CPU tensors)
    mods = {m: importlib.import_module(f"sparsetrain.kernels.{m}")
            for m in ("sparse_linear", "bsr_matmul", "sparse_conv2d", "bn_act")}
    launched = set()

    def record(module):
        def fake_launch(kernel, grid, *args, **meta):
            name = next(n for n, v in vars(mods[module]).items() if v is kernel)
            meta = {k: v for k, v in meta.items() if k != "PRECISION"}  # (per dtype: _jobs adds it)
            launched.add((module, name, tuple(sorted(meta.items()))))
        return fake_launch
    for m, mod in mods.items():
        monkeypatch.setattr(mod, "launch", record(m))
    both = (False, True)
    L, M, C, BA = (mods[m] for m in ("sparse_linear", "bsr_matmul", "sparse_conv2d", "bn_act"))
    w = CSR.from_dense(torch.randn(3, 4))
    crow, col, vals, ccol, row_t, perm = (t.detach() for t in w.index())
    for bias in (None, torch.randn(3)):
        L.sparse_linear(torch.randn(2, 4), crow, col, vals, ccol, row_t, perm, bias)
    L.sparse_linear_grad_input(torch.randn(2, 3), crow, col, vals, ccol, row_t, perm)
    L.csr_spmm(ccol, row_t, vals, torch.randn(3, 2), perm=perm, bias=torch.randn(4))  # (exported: both options)
    L.sparse_linear_grad_weight(torch.randn(2, 3), torch.randn(2, 4), crow, col)
    for bs in (16, 32, 64):
        b = BSR.from_dense(torch.randn(bs, bs), bs)
        v = b.values.detach()
        for bias in (None, torch.randn(bs)):
            M.bsr_linear_forward(torch.randn(2, bs), b.crow_indices, b.col_indices, v, bias, bs)
        M.bsr_linear_grad_input(torch.randn(2, bs), b.ccol_indices, b.row_indices_t, b.perm, v, bs)
        M.bsr_linear_grad_weight(torch.randn(2, bs), torch.randn(2, bs), b.crow_indices, b.col_indices, bs)
    wc = CSR.from_dense(torch.randn(2, 2, 3, 3))
    crow, col, vals, ccol, row_t, perm = (t.detach() for t in wc.index())
    x, geo = torch.randn(1, 2, 4, 4), ((3, 3), (1, 1), (1, 1))
    for bias in (None, torch.randn(2)):
        C.sparse_conv2d(x, crow, col, vals, ccol, row_t, perm, *geo, bias)
        for relu, counts, (ia, ir) in itertools.product(both, both, ((False, False), (True, False), (True, True))):
            act = (torch.randn(2, dtype=torch.float64), torch.randn(2), torch.randn(2)) if ia else (None, None, None)
            C.sparse_conv2d_stats(x, crow, col, vals, ccol, row_t, perm, *geo, bias, relu, *act, ir,
                                  torch.zeros(32, dtype=torch.int64) if counts else None)
    C.sparse_conv2d_backward(torch.randn(1, 2, 4, 4), x, crow, col, vals, ccol, row_t, perm, *geo)
    for res, relu, counts in itertools.product(both, both, both):
        BA.bn_act(x, torch.randn(2, dtype=torch.float64), torch.randn(2), torch.randn(2), x.clone() if res else None, relu,
                  torch.zeros(32, dtype=torch.int64) if counts else None)
    spec = {(m, k, tuple(sorted(c.items()))) for m, k, _, _, combos in _specs() for c in combos}
    assert launched - spec == set(), "launched, never compiled here"
    assert spec - launched == set(), "compiled here, never launched"
