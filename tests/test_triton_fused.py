"""The fused conv -> BatchNorm -> ReLU layer on the Triton backend (kernels/bn_act.py and the
statistics epilogue of kernels/sparse_conv2d.py) against the C++ ops it mirrors, on the same CPU
tensors under Triton's interpreter: each op and flag, then fused models stepped on both engines.
The cases run in one TRITON_INTERPRET=1 subprocess (test_triton_kernels.py says why)."""
from __future__ import annotations

import copy
import itertools
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import sparsetrain.engine.ops  # noqa: F401  (registers the ops and loads their C++ kernels)
from sparsetrain.testing import bn_stats, model_masks, random_mask
from test_bn_scale_shift import bad_calls, refuses_untouched
from test_triton_kernels import count_calls, interpreter_suite, refused_alike, run_cases

CASES = {}
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def interp(fn):
    CASES[fn.__name__] = fn
    return fn


def _close(got, ref, dtype, what):
    torch.testing.assert_close(got, ref, **TOL.get(dtype, {}), msg=lambda m: f"{what}: {m}")


def _conv_case(B, C, O, hw, k, s, p, dtype, sparsity=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(O, C, k, k, generator=g, dtype=dtype)
    csr = sparsetrain.CSR.from_dense(w, random_mask(w.shape, sparsity, generator=g, empty_rows=1 if O > 2 else 0))
    x = torch.randn(B, C, *hw, generator=g, dtype=dtype)
    return g, [t.detach() for t in csr.index()], x, ([k, k], [s, s], [p, p])


# (batch, C, O, hw, k, stride, pad): odd maps, stride 2, 1x1, batch 1, a 1x1 image
GEOMS = [(2, 3, 5, (5, 7), 3, 1, 1), (1, 4, 3, (6, 5), 3, 2, 1), (2, 5, 4, (4, 4), 1, 2, 0), (3, 2, 2, (1, 1), 3, 1, 1)]


@interp
def conv_stats_matches_the_cpu_op():
    import sparsetrain.kernels.sparse_conv2d as KC
    op = torch.ops.sparsetrain.sparse_conv2d_stats
    for geom, dtype in itertools.product(GEOMS, (torch.float32, torch.float64)):
        g, idx, x, geo = _conv_case(*geom, dtype)
        C, O = geom[1], geom[2]
        bias = torch.randn(O, generator=g, dtype=dtype)
        x[0, 0, 0, 0] = 0.0  # (an exact zero: the ReLU counts' boundary)
        for relu, in_act, with_bias in itertools.product((False, True), (None, True), (False, True)):
            act = (torch.randn(C, generator=g, dtype=torch.float64), torch.rand(C, generator=g, dtype=dtype) + 0.5,
                   torch.randn(C, generator=g, dtype=dtype), relu) if in_act else (None, None, None, False)
            b = bias if with_bias else None
            y, st = op(x, *idx, *geo, b, relu, *act)
            yt, stt = KC.sparse_conv2d_stats(x, *idx, *geo, b, relu, *act)
            _close(yt, y, dtype, f"y {geom} relu={relu} in_act={in_act}")
            _close(stt, st, torch.float64 if dtype == torch.float64 else dtype, f"stats {geom}")
            if relu:
                n = y[0].numel()
                counts, ct = torch.full((n,), 3, dtype=torch.int64), torch.full((n,), 3, dtype=torch.int64)
                op(x, *idx, *geo, b, relu, *act, counts)
                KC.sparse_conv2d_stats(x, *idx, *geo, b, relu, *act, ct)
                assert torch.equal(ct, counts), (geom, relu, in_act)
    g, idx, x, geo = _conv_case(*GEOMS[0], torch.float32)
    m3 = torch.zeros(3, dtype=torch.float64)
    for bad, msg, error in (((m3, torch.ones(3), None), "given together", ValueError),
                            ((None, torch.ones(3), torch.ones(3)), "given together", ValueError),
                            ((m3, torch.ones(2), torch.ones(2)), "in_scale must have", ValueError),
                            ((m3.float(), torch.ones(3), torch.ones(3)), "in_mean must have dtype", TypeError)):
        with pytest.raises(error, match=msg):
            KC.sparse_conv2d_stats(x, *idx, *geo, None, True, *bad)
    with pytest.raises(ValueError, match="relu_counts must be int64"):
        KC.sparse_conv2d_stats(x, *idx, *geo, None, True, None, None, None, False, torch.zeros(4, dtype=torch.int64))
    for shape in ((180,), (3, 5, 6)):  # (with a deferred BN: an IndexError, and "in_mean must have shape", before)
        for stats in (KC.sparse_conv2d_stats, torch.ops.sparsetrain.sparse_conv2d_stats):
            with pytest.raises(ValueError, match="x must be 4-D"):
                stats(torch.zeros(shape), *idx, *geo, None, True, m3, torch.ones(3), torch.ones(3))


@interp
def conv_stats_of_a_float64_channel_far_from_zero_are_centred():
    """fp64 channels whose mean is up to 1e8x their spread: the centred sum (y - mean)^2 from the epilogue's sum y^2
    cancelled (Triton's kept it: 551.0 for 551.39 at a bias of 1e7, 384 at 1e8, outputs 100x off); summed again
    about the mean (centre_stats) it is the C++ op's and bn_stats' own. The empty row's channel: 0, as in C++."""
    import sparsetrain.kernels.sparse_conv2d as KC
    op = torch.ops.sparsetrain.sparse_conv2d_stats
    g, idx, x, geo = _conv_case(2, 3, 5, (6, 6), 3, 1, 1, torch.float64)  # (row 0 empty)
    for bias, relu in itertools.product((1e2, 1e4, 1e6, 1e7, 1e8), (False, True)):
        b = torch.full((5,), bias, dtype=torch.float64)
        b[1] = -bias  # (relu: a channel of zeros, a constant channel)
        y, st = op(x, *idx, *geo, b, relu)
        yt, stt = KC.sparse_conv2d_stats(x, *idx, *geo, b, relu)
        torch.testing.assert_close(yt, y, rtol=1e-13, atol=0)
        ref = bn_stats(y)
        tol = dict(rtol=1e-9, atol=max(1e-9, 1e-13 * bias))  # (y's own rounding, ~ulp(bias) each)
        torch.testing.assert_close(stt, st, **tol)
        torch.testing.assert_close(stt[1, 1:], ref[1, 1:], **tol)
        assert stt[1, 0] == 0 and st[1, 0] == 0, (bias, relu)


@interp
def autotune_resets_only_scratch_arguments():
    """On a GPU, triton.autotune zeroes the conv forward's `stats` and `counts` between its timing
    runs: whatever the launch binds to them must be scratch (fresh sums, or y, which the chosen
    config's run writes), never the weight's values, x or a caller's tensor."""
    import sparsetrain.kernels.sparse_conv2d as KC
    g, idx, x, geo = _conv_case(*GEOMS[0], torch.float32)
    seen, real = [], KC.launch

    def record(kernel, grid, *args, **meta):
        if kernel is KC._conv_fwd_kernel:
            names = kernel.arg_names if hasattr(kernel, "arg_names") else kernel.fn.arg_names
            seen.append({n: a for n, a in zip(names, args) if n in ("stats", "counts")} | {"y": args[6]})
        return real(kernel, grid, *args, **meta)

    KC.launch = record
    try:
        KC.sparse_conv2d(x, *idx, *geo, None)
        KC.sparse_conv2d_stats(x, *idx, *geo, None, True, None, None, None, False, torch.zeros(5 * 35, dtype=torch.int64))
    finally:
        KC.launch = real
    assert len(seen) == 2
    for call in seen:
        for name in ("stats", "counts"):
            t = call[name]
            assert all(t is not u for u in (x, *idx)), name
            assert t is call["y"] or t.dtype in (torch.float64, torch.int64), name


@interp
def bn_ops_match_the_cpu_ops():
    import sparsetrain.kernels.bn_act as KB
    ops = torch.ops.sparsetrain
    for shape, dtype in itertools.product([(2, 3, 5, 7), (1, 1, 1, 1), (4, 6, 2, 2), (3, 5, 0, 4)],
                                          (torch.float32, torch.float64)):
        g = torch.Generator().manual_seed(1)
        c = shape[1]
        y, r, go = (torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))
        scale, shift = torch.rand(c, generator=g, dtype=dtype) + 0.5, torch.randn(c, generator=g, dtype=dtype)
        w, invstd = torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.rand(c, generator=g, dtype=torch.float64)
        mean = torch.randn(c, generator=g, dtype=torch.float64) * 0.1
        for res, relu in itertools.product((None, r), (False, True)):
            counts, ct = (torch.zeros(y[0].numel(), dtype=torch.int64) for _ in range(2))
            _close(KB.bn_act(y, mean, scale, shift, res, relu, ct), ops.bn_act(y, mean, scale, shift, res, relu, counts),
                   dtype, f"bn_act {shape}")
            assert torch.equal(ct, counts)
        for (relu_after, relu_before, residual, grad_res), batch_stats in itertools.product(
                [(True, False, False, False), (False, False, False, False), (False, True, False, False),
                 (True, False, True, True), (True, False, True, False)], (True, False)):
            args = (go, y, r if residual else None, scale, shift, w, mean, invstd, batch_stats, relu_after,
                    relu_before, grad_res)
            for got, ref, what in zip(KB.bn_act_backward(*args), ops.bn_act_backward(*args),
                                      ("dy", "dweight", "dbias", "dres", "dsum")):
                _close(got, ref, dtype, f"bn_act_backward {what} {shape}")
        # bn_scale_shift: batch statistics with the running update (momentum, cumulative), eval
        stats = bn_stats(y)
        n = y.numel() // c
        for momentum, batch_stats in ((0.1, True), (None, True), (0.1, False)):
            if batch_stats and n < 2:
                continue
            bufs = [(torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5, torch.tensor(3)) for _ in "ab"]
            bufs[1] = tuple(t.clone() for t in bufs[0])
            outs = [f(stats, n, scale, shift, *b, momentum, 1e-5, batch_stats, dtype)
                    for f, b in zip((KB.bn_scale_shift, ops.bn_scale_shift), bufs)]
            for got, ref in zip(outs[0] + bufs[0], outs[1] + bufs[1]):
                _close(got, ref, dtype, f"bn_scale_shift {shape} {momentum} {batch_stats}")
    # every refusal of the C++ op, with its class and message, before any buffer is written
    args, cases = bad_calls()
    refuses_untouched(KB.bn_scale_shift, args, cases)


@interp
def conv_bn_backward_matches_the_cpu_op():
    import sparsetrain.kernels.bn_act as KB
    op = torch.ops.sparsetrain.sparse_conv2d_bn_backward
    flags = [(True, False, False, False), (False, True, False, False), (True, False, True, True),
             (True, False, True, False)]
    for geom, dtype, (relu_after, relu_before, residual, grad_res) in itertools.product(
            GEOMS[:3], (torch.float32, torch.float64), flags):
        g, idx, x, geo = _conv_case(*geom, dtype)
        C = geom[1]
        y = torch.ops.sparsetrain.sparse_conv2d(x, *idx, *geo, None)
        y = y.clamp_min(0) if relu_before else y
        c = y.shape[1]
        go, res = torch.randn(y.shape, generator=g, dtype=dtype), torch.randn(y.shape, generator=g, dtype=dtype)
        scale, shift = torch.rand(c, generator=g, dtype=dtype) + 0.5, torch.randn(c, generator=g, dtype=dtype)
        w, invstd = torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.rand(c, generator=g, dtype=torch.float64)
        mean = torch.randn(c, generator=g, dtype=torch.float64) * 0.1
        add = torch.randn(x.shape, generator=g, dtype=dtype)
        in_mean = torch.randn(C, generator=g, dtype=torch.float64) * 0.1
        act = (in_mean, torch.rand(C, generator=g, dtype=dtype) + 0.5, torch.randn(C, generator=g, dtype=dtype), True)
        sums = torch.randn(c, 2, generator=g, dtype=torch.float64)
        # each product and deferral; the other options alternate (grad_bias, handed-over sums, batch statistics)
        for i, ((need_x, need_v), deferred) in enumerate(itertools.product(((True, True), (True, False), (False, True)),
                                                                           (False, True))):
            grad_bias, given, batch_stats = i % 2 == 0, (None, sums)[i // 2 % 2], i % 3 != 2
            a = act if deferred else (None, None, None, False)
            args = (go, x, *idx, *geo, add if need_x else None, y, res if residual else None, scale, shift, w, mean,
                    invstd, batch_stats, relu_after, relu_before, grad_res, need_x, need_v, *a, grad_bias, deferred,
                    given)
            for j, (got, ref) in enumerate(zip(KB.sparse_conv2d_bn_backward(*args), op(*args))):
                _close(got, ref, dtype, f"output {j} of {geom} {relu_after, relu_before, residual, grad_res} "
                                        f"x={need_x} v={need_v} bias={grad_bias} deferred={deferred}")
    g, idx, x, geo = _conv_case(*GEOMS[0], torch.float32)
    y = torch.ops.sparsetrain.sparse_conv2d(x, *idx, *geo, None)
    one, d1 = torch.ones(y.shape[1]), torch.ones(y.shape[1], dtype=torch.float64)
    base = (y, x, *idx, *geo, None, y, None, one, one, d1, d1, d1, True, True, False, False, True, True)
    with pytest.raises(ValueError, match="pool_indices"):
        KB.sparse_conv2d_bn_backward(*base, None, None, None, False, True, False, None, torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="in_sums needs in_mean, in_scale and in_shift"):
        KB.sparse_conv2d_bn_backward(*base, None, None, None, False, True, True)


@interp
def bn_backward_arguments_refused_as_the_cpp_ops():
    """Per-channel vectors of another length or dtype, a residual of another batch and a grad_out of another
    dtype than y are refused by the Triton BatchNorm backward ops with the C++ ops' messages (the torch ops
    inside would broadcast a 1-entry vector or another batch, a silent wrong answer); so are the fused conv
    backward's sums, in_mean and flag combinations the C++ op refuses."""
    import sparsetrain.kernels.bn_act as KB
    ops = torch.ops.sparsetrain
    g = torch.Generator().manual_seed(3)
    y, go = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    d = lambda n, v=1.0: torch.full((n,), v, dtype=torch.float64)  # noqa: E731
    ok = dict(res=None, scale=torch.ones(3) * 2, shift=torch.zeros(3), weight=d(3), mean=d(3, 0.0), invstd=d(3))
    cases = [(dict(scale=torch.ones(1), shift=torch.zeros(1)), r"scale must have shape \[3\] \(one per channel\), got \[1\]", ValueError),
             (dict(shift=torch.zeros(4)), r"shift must have shape \[3\] \(one per channel\), got \[4\]", ValueError),
             (dict(weight=d(1)), r"weight must have shape \[3\] \(one per channel\), got \[1\]", ValueError),
             (dict(mean=d(1)), r"mean must have shape \[3\]", ValueError),
             (dict(invstd=d(1)), r"invstd must have shape \[3\]", ValueError),
             (dict(mean=torch.zeros(3)), "mean must have dtype", TypeError),
             (dict(scale=torch.ones(3, dtype=torch.float64)), "scale must have dtype", TypeError),
             (dict(res=torch.randn(1, 3, 4, 4, generator=g)),
              r"residual must have the shape of y \[2, 3, 4, 4\], got \[1, 3, 4, 4\]", ValueError)]
    for kw, msg, err in cases:
        a = {**ok, **kw}
        refused_alike(ops.bn_act_backward, KB.bn_act_backward,
                      (go, y, a["res"], a["scale"], a["shift"], a["weight"], a["mean"], a["invstd"], True, True, False,
                       a["res"] is not None), msg, err)
    base = (y, None, ok["scale"], ok["shift"], ok["weight"], ok["mean"], ok["invstd"], True, True, False, False)
    refused_alike(ops.bn_act_backward, KB.bn_act_backward, (go.double(), *base), "grad_out must have dtype", TypeError)
    refused_alike(ops.bn_act_backward, KB.bn_act_backward, (go[:1], *base), r"grad_out must have the shape of y")
    refused_alike(ops.bn_act, KB.bn_act, (y, ok["mean"], ok["scale"], ok["shift"], y[:1].clone(), True),
                  r"residual must have the shape of y \[2, 3, 4, 4\]")
    refused_alike(ops.bn_act, KB.bn_act, (y, ok["mean"], ok["scale"][:1], ok["shift"], None, True),
                  r"scale must have shape \[3\]")
    refused_alike(ops.bn_act, KB.bn_act, (y, ok["mean"].float(), ok["scale"], ok["shift"], None, True),
                  "mean must have dtype", TypeError)
    # the fused conv backward: the same checks, and its own arguments
    gc, idx, x, geo = _conv_case(*GEOMS[0], torch.float32)
    yc = torch.ops.sparsetrain.sparse_conv2d(x, *idx, *geo, None)
    c = yc.shape[1]
    gyc, r = torch.randn(yc.shape, generator=g), torch.randn(yc.shape, generator=g)
    one, d1, z1 = torch.ones(c), d(c), d(c, 0.0)

    def bn_backward(grad_out=gyc, res=r, scale=one, shift=one, weight=d1, mean=z1, relu_before=False, grad_res=True,
                    tail=()):
        return (grad_out, x, *idx, *geo, None, yc, res, scale, shift, weight, mean, d1, True, True, relu_before,
                grad_res, True, True, *tail)
    a, b, m3 = torch.ones(x.shape[1]), torch.zeros(x.shape[1]), d(x.shape[1], 0.0)
    for args, msg, err in ((bn_backward(res=r[:1].clone()), r"residual must have the shape of y \[2, 5, 5, 7\], got "
                                                            r"\[1, 5, 5, 7\]", ValueError),
                           (bn_backward(scale=one[:1]), rf"scale must have shape \[{c}\] \(one per channel\), got \[1\]",
                            ValueError),
                           (bn_backward(weight=d(1)), rf"weight must have shape \[{c}\]", ValueError),
                           (bn_backward(mean=d(1)), rf"mean must have shape \[{c}\]", ValueError),
                           (bn_backward(grad_out=gyc.double()), "grad_out must have dtype", TypeError),
                           (bn_backward(relu_before=True, grad_res=False), "relu_before and a residual do not combine",
                            ValueError),
                           (bn_backward(res=None), "grad_residual needs a residual and relu_after", ValueError),
                           (bn_backward(tail=(None, None, None, False, False, False, d(c)[:, None].repeat(1, 2)[:3])),
                            "sums must be float64", ValueError),
                           (bn_backward(tail=(m3[:1], a, b, True, False, True)), r"in_mean must have shape \[", ValueError),
                           (bn_backward(tail=(m3, None, b, True)), "in_mean, in_scale and in_shift must be given together",
                            ValueError)):
        refused_alike(ops.sparse_conv2d_bn_backward, KB.sparse_conv2d_bn_backward, args, msg, err)
    # a transposed index that is not the CSR's (a duplicate in perm), with dW or for dx only (checked as the C++
    # op since 2026-12-06: the dx-only call checked none of it, the other not against the CSR)
    dup = idx[5].clone()
    dup[1] = dup[0]
    for grad_values in (True, False):
        args = list(bn_backward())
        args[7], args[-1] = dup, grad_values
        refused_alike(ops.sparse_conv2d_bn_backward, KB.sparse_conv2d_bn_backward, args,
                      "ccol_indices, row_indices_t and perm must be the transposed index of crow_indices")


@interp
def flag_arguments_refused_unless_bool():
    """Every bool of the ops' schemas (found in the C++ schema), given 2, "no" or a tensor, is refused by the Triton
    function with the TypeError the ops' Python callers raise (engine.args.check_flag, same wording): the schema's
    bool takes an int or a tensor as given, and the Triton functions took all three as True (a ReLU applied, a
    gradient computed) before 2026-12-06. numpy's bool is taken, with the C++ op's result."""
    import inspect
    import re
    import numpy as np
    import sparsetrain.kernels.bn_act as KB
    import sparsetrain.kernels.sparse_conv2d as KC
    from sparsetrain.engine.args import check_flag
    ops = torch.ops.sparsetrain
    _, idx, x, geo = _conv_case(*GEOMS[0], torch.float64)
    y = ops.sparse_conv2d(x, *idx, *geo, None)
    c, cin, y64 = y.shape[1], x.shape[1], y.double()
    one, zero = torch.ones(c, dtype=y.dtype), torch.zeros(c, dtype=y.dtype)
    stats = torch.stack([y64.sum((0, 2, 3)), (y64 * y64).sum((0, 2, 3))])
    z64, zin = torch.zeros(c, dtype=torch.float64), torch.zeros(cin, dtype=torch.float64)
    calls = [(KB.bn_act, (y, z64, one, zero, None, True)),
             (KB.bn_scale_shift, (stats, y.numel() // c, None, None, None, None, None, 0.1, 1e-5, True, y.dtype)),
             (KB.bn_act_backward, (y, y, None, one, zero, one, zero, one, True, True, False, False)),
             (KC.sparse_conv2d_stats, (x, *idx, *geo, None, True, zin, torch.ones(cin, dtype=x.dtype),
                                       torch.zeros(cin, dtype=x.dtype), True)),
             (KB.sparse_conv2d_bn_backward, (y, x, *idx, *geo, None, y, None, one, zero, one, zero, one, True, True,
                                             False, False, True, True, None, None, None, False, False, False))]
    for fn, args in calls:
        params = list(inspect.signature(fn).parameters)
        flags = [a.name for a in getattr(ops, fn.__name__).default._schema.arguments if str(a.type) == "bool"]
        assert flags and all(isinstance(args[params.index(f)], bool) for f in flags), (fn.__name__, flags)
        for name in flags:
            i = params.index(name)
            for bad in (2, "no", torch.tensor(True)):
                with pytest.raises(TypeError) as want:
                    check_flag(bad, name)
                with pytest.raises(TypeError, match=f"^{re.escape(str(want.value))}$"):
                    fn(*args[:i], bad, *args[i + 1:])
        got = fn(*(np.bool_(a) if isinstance(a, bool) else a for a in args))
        ref = getattr(ops, fn.__name__)(*args)
        for k, (a, b) in enumerate(zip(got, ref) if isinstance(ref, tuple) else [(got, ref)]):
            _close(a, b, torch.float64, f"{fn.__name__} output {k}")


class _Res(torch.nn.Module):
    """stem conv -> BN -> ReLU, one of the study's residual blocks, a linear head."""

    def __init__(self):
        super().__init__()
        from sparsetrain.experiment.models import resnet18
        self.c0, self.b0, self.r0 = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False), torch.nn.BatchNorm2d(6), torch.nn.ReLU()
        self.blk = type(resnet18(5, 3).layer1[0])(6, 6)
        self.fc = torch.nn.Linear(6 * 36, 5)

    def forward(self, x):
        return self.fc(self.blk(self.r0(self.b0(self.c0(x)))).flatten(1))


@interp
def fused_models_step_alike_on_both_engines():
    """The study's VGG-like (conv -> ReLU -> BN, deferred pairs) and a residual block (conv -> BN ->
    + shortcut -> ReLU, routed shortcut): fused models trained 3 SGD steps under use_backend("triton")
    follow the C++ engine's steps (losses, gradients, running statistics), their fused layers run
    on the Triton kernels; an eval forward and the entropy's in-kernel ReLU counts agree too."""
    import sparsetrain
    import sparsetrain.kernels.bn_act as KB
    import sparsetrain.kernels.sparse_conv2d as KC
    from sparsetrain.engine.fused import FusedReLU
    from sparsetrain.experiment.models import vgg_like
    names = ["sparse_conv2d_stats", "bn_scale_shift", "bn_act", "sparse_conv2d_bn_backward"]
    torch.manual_seed(0)
    for make, hw in ((lambda: vgg_like(2, 1, 5, 3, image_size=8), 8), (_Res, 6)):
        cpu = make().double()
        sparsetrain.sparsify_(cpu, model_masks(cpu, 0.6), fuse=True)
        tri = copy.deepcopy(cpu)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (cpu, tri)]
        g = torch.Generator().manual_seed(1)
        for step in range(3):
            x, t = torch.randn(4, 3, hw, hw, generator=g, dtype=torch.float64), torch.randint(0, 5, (4,), generator=g)
            losses = []
            for m, opt, backend in ((cpu, opts[0], "cpu"), (tri, opts[1], "triton")):
                opt.zero_grad()
                with count_calls(KB, names[1:]) as kb, count_calls(KC, names[:1]) as kc, sparsetrain.use_backend(backend):
                    loss = F.cross_entropy(m(x), t)
                    loss.backward()
                assert (set(kb + kc) == set(names)) == (backend == "triton"), (backend, kb, kc)
                opt.step()
                losses.append(loss.item())
            assert abs(losses[0] - losses[1]) < 1e-9, (step, losses)
            for (n, a), b in zip(cpu.named_parameters(), tri.parameters()):
                _close(b, a, torch.float64, f"step {step} {n}")
            for (n, a), b in zip(cpu.named_buffers(), tri.buffers()):
                _close(b, a, torch.float64 if a.is_floating_point() else None, f"step {step} {n}")
        for m in (cpu, tri):
            m.eval()
            for r in m.modules():
                if isinstance(r, FusedReLU):
                    r.count_states = True
        x = torch.randn(3, 3, hw, hw, generator=g, dtype=torch.float64)
        with torch.no_grad():
            ref = cpu(x)
            counts_ref = [r.pop_state_counts() for r in cpu.modules() if isinstance(r, FusedReLU)]
            with sparsetrain.use_backend("triton"):
                out = tri(x)
            counts = [r.pop_state_counts() for r in tri.modules() if isinstance(r, FusedReLU)]
        _close(out, ref, torch.float64, "eval")
        assert any(c is not None for c in counts_ref)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(counts, counts_ref))


interp_results, test_triton_interpreter = interpreter_suite(CASES, os.path.abspath(__file__))


if __name__ == "__main__":
    run_cases(CASES, sys.argv[1])
