"""Triton kernels (kernels/ = sparsetrain.kernels) against the dense masked references.

Triton decides at `@triton.jit` time (first import of sparsetrain.kernels.*) whether a kernel is
compiled or interpreted (TRITON_INTERPRET=1): setting the variable inside a shared pytest process
is fragile (an earlier import wins) and would turn the GPU tests into interpreter runs. So the
interpreter checks (@interp) run in ONE fresh subprocess with TRITON_INTERPRET=1 started by a
module fixture, each still its own test item (failing with the subprocess's traceback). Backend
switch and BSR format tests run in-process; `cuda` tests run compiled kernels on a GPU.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback

import pytest
import torch

from sparsetrain.testing import bn_stats, dense_conv2d, dense_linear, random_mask, reference_grads, tf32

CASES = {}


def interp(fn):
    CASES[fn.__name__] = fn
    return fn


@contextlib.contextmanager
def count_calls(module, names):
    """Record, in order, which of `module`'s functions `names` were called inside the block."""
    calls, orig = [], {n: getattr(module, n) for n in names}
    for n, f in orig.items():
        setattr(module, n, (lambda f, n: lambda *a, **k: (calls.append(n), f(*a, **k))[1])(f, n))
    try:
        yield calls
    finally:
        for n, f in orig.items():
            setattr(module, n, f)


def assert_close_all(pairs, dtype=torch.float32, device="cpu"):
    """(got, expected) pairs; fp32 sums on a GPU run in another order than the reference's."""
    t = 1e-10 if dtype == torch.float64 else 1e-4 if device == "cpu" else 2e-3
    for got, ref in pairs:
        torch.testing.assert_close(got, ref, rtol=t, atol=t)


# ============================================================================ shared checks
def check_linear(batch, fin, fout, sparsity, bias, empty_rows=0, dtype=torch.float32, seed=0, device="cpu"):
    """SparseLinear forward/backward (whatever backend is active) vs F.linear(x, w * mask)."""
    from sparsetrain.nn import SparseLinear
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(fin, fout, bias=bias).to(dtype)
    mask = random_mask((fout, fin), sparsity, generator=g, empty_rows=min(empty_rows, fout))
    layer = SparseLinear.from_dense(lin, mask).to(device)
    x = torch.randn(*batch, fin, generator=g, dtype=dtype).to(device).requires_grad_(True)
    (y := layer(x)).backward(gy := torch.randn(y.shape, generator=g, dtype=dtype).to(device))
    lin.to(device)
    ry, rdx, rdw, rdb = reference_grads(dense_linear, x, lin.weight, mask.to(device), lin.bias, gy)
    assert_close_all([(y, ry), (x.grad, rdx), (layer.weight.values.grad, rdw[mask.to(device)])]
                     + ([(layer.bias.grad, rdb)] if bias else []), dtype, device)


def check_bsr(batch, fin, fout, block, sparsity, bias, seed=0, device="cpu"):
    """bsr_linear (Triton on CUDA or under use_backend('triton')) vs the dense masked linear."""
    from sparsetrain.engine.bsr import BSR
    from sparsetrain.engine.bsr import bsr_linear
    from sparsetrain.prune import block_mask
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(fout, fin, generator=g).to(device)
    b = torch.randn(fout, generator=g).to(device) if bias else None
    mask = block_mask(w, block, sparsity)
    W = BSR.from_dense(w, block, mask)
    x = torch.randn(*batch, fin, generator=g).to(device).requires_grad_(True)
    bb = b.clone().requires_grad_(True) if bias else None
    (y := bsr_linear(x, W, bb)).backward(gy := torch.randn(y.shape, generator=g).to(device))
    ry, rdx, rdw, rdb = reference_grads(dense_linear, x, w, mask, b, gy)
    assert_close_all([(y, ry), (x.grad, rdx), (W.values.grad, BSR.from_dense(rdw, block, mask).values)]
                     + ([(bb.grad, rdb)] if bias else []), device=device)


def check_conv(batch, cin, cout, hw, k, stride, padding, sparsity, bias, empty_rows=0, split=None,
               dtype=torch.float32, seed=0, device="cpu"):
    """The three Triton conv products vs F.conv2d(x, w * mask) (output, dx, dw at the nonzeros)."""
    from sparsetrain.engine.formats import CSR, transpose_index
    from sparsetrain.kernels import sparse_conv2d as K
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, k, k, generator=g, dtype=dtype)
    mask = random_mask(w.shape, sparsity, generator=g, empty_rows=empty_rows)
    b = torch.randn(cout, generator=g, dtype=dtype).to(device) if bias else None
    w, mask, x = w.to(device), mask.to(device), torch.randn(batch, cin, *hw, generator=g, dtype=dtype).to(device)
    csr = CSR.from_dense(w, mask).to(device)
    crow, col, vals = csr.crow_indices, csr.col_indices, csr.values.detach()
    ccol, row_t, perm = transpose_index(crow, col, cin * k * k)
    geo = ((k, k), (stride, stride), (padding, padding))
    y = K.sparse_conv2d(x, crow, col, vals, ccol, row_t, perm, *geo, b)
    gy = torch.randn(y.shape, generator=g, dtype=dtype).to(device)
    ry, rdx, rdw, _ = reference_grads(dense_conv2d, x, w, mask, b, gy, stride=stride, padding=padding)
    dx = K.sparse_conv2d_grad_input(gy, ccol, row_t, perm, vals, hw, *geo)
    dw = K.conv2d_grad_weight(gy, x, crow, col, *geo, split=split)
    assert_close_all([(y, ry), (dx, rdx), (dw, rdw[mask])], dtype, device)


# ============================================================================ interpreter cases
@interp
def linear_shapes_and_sparsities():
    import sparsetrain
    with sparsetrain.use_backend("triton"):
        check_linear((7,), 13, 5, 0.5, True)
        check_linear((3, 5), 11, 7, 0.9, False)      # 3-D input
        check_linear((1,), 1, 1, 0.0, True)          # one feature, batch 1
        check_linear((70,), 29, 3, 0.0, False)       # batch not a multiple of BLOCK_B
        check_linear((4,), 6, 5, 1.0, True)          # fully pruned: only the bias survives
        check_linear((9,), 19, 11, 0.5, True, empty_rows=4)
        check_linear((5,), 7, 6, 0.5, True, dtype=torch.float64)


@interp
def linear_routes_every_product_to_triton():
    """Under use_backend('triton') forward, dx and dW all run the Triton kernels, and the
    backward does so even when called after the `with` block."""
    import sparsetrain
    import sparsetrain.kernels.sparse_linear as K
    from sparsetrain.nn import SparseLinear
    names = ["sparse_linear", "sparse_linear_grad_input", "sparse_linear_grad_weight"]
    with count_calls(K, names) as calls:
        layer, x = SparseLinear.from_dense(torch.nn.Linear(6, 4)), torch.randn(3, 6, requires_grad=True)
        with sparsetrain.use_backend("triton"):
            y = layer(x)
        y.sum().backward()  # outside the `with`: still Triton
    assert calls == names, calls
    assert sparsetrain.current_backend() == "auto"


@interp
def compiled_under_the_triton_backend_runs_the_interpreter_eagerly():
    """torch.compile of sparse layers under use_backend('triton') on CPU tensors: the Triton calls
    run eagerly (graph breaks; dynamo failed inside Triton's launch), outputs and gradients those of
    the eager run, on the Triton kernels."""
    import sparsetrain
    import sparsetrain.kernels.sparse_linear as K
    from sparsetrain.nn import SparseConv2d, SparseLinear
    torch.manual_seed(2)
    model = torch.nn.Sequential(SparseConv2d.from_dense(torch.nn.Conv2d(2, 3, 3), random_mask((3, 2, 3, 3), 0.5)),
                                torch.nn.Flatten(), SparseLinear.from_dense(torch.nn.Linear(12, 4), random_mask((4, 12), 0.5)))
    x = torch.randn(2, 2, 4, 4)
    with sparsetrain.use_backend("triton"):
        want = model(x)
        grads = torch.autograd.grad(want.square().sum(), list(model.parameters()))
        with count_calls(K, ["sparse_linear"]) as calls:
            got = torch.compile(model, backend="aot_eager")(x)
        assert calls == ["sparse_linear"], calls
        got_grads = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    assert_close_all([(got, want), *zip(got_grads, grads)])


@interp
def compiled_bsr_under_the_triton_backend_runs_the_interpreter_eagerly():
    """torch.compile of a BSRLinear under use_backend('triton') on CPU tensors raised dynamo's
    InternalTorchDynamoError ("AttributeError: __triton_builtin__", inside Triton's interpreter): its
    Triton Function runs eagerly now, output and gradients (x, values, bias) the dense masked linear's."""
    import sparsetrain
    import sparsetrain.kernels.bsr_matmul as K
    from sparsetrain.engine.bsr import BSR, BSRLinear
    from sparsetrain.prune import block_mask
    torch.manual_seed(4)
    lin = torch.nn.Linear(40, 20)
    mask = block_mask(lin.weight, 16, 0.5)
    layer = BSRLinear.from_dense(lin, 16, mask)
    x = torch.randn(3, 40, requires_grad=True)
    torch._dynamo.reset()
    with sparsetrain.use_backend("triton"), count_calls(K, ["bsr_linear_forward"]) as calls:
        y = torch.compile(layer, backend="aot_eager")(x)
    assert calls == ["bsr_linear_forward"], calls
    y.backward(gy := torch.randn(y.shape))
    ry, rdx, rdw, rdb = reference_grads(dense_linear, x, lin.weight, mask, lin.bias, gy)
    assert_close_all([(y, ry), (x.grad, rdx), (layer.weight.values.grad, BSR.from_dense(rdw, 16, mask).values),
                      (layer.bias.grad, rdb)])


@interp
def bsr_torch_func_transforms_on_the_triton_kernels():
    """A BSRLinear on the Triton kernels (old-style autograd.Function) failed every torch.func transform with
    PyTorch's "it must override the setup_context staticmethod": vmap over its input runs now (the Triton
    forward, the batch as leading dimensions; gradients through it too), and grad/jacrev, jvp and vmap over
    its values are refused with a NotImplementedError saying so, as for the CSR layers."""
    import sparsetrain
    import sparsetrain.kernels.bsr_matmul as K
    from sparsetrain.engine.bsr import BSR, BSRLinear
    from sparsetrain.prune import block_mask
    torch.manual_seed(5)
    lin = torch.nn.Linear(40, 20)
    mask = block_mask(lin.weight, 16, 0.5)
    layer = BSRLinear.from_dense(lin, 16, mask)
    x = torch.randn(3, 2, 40, requires_grad=True)
    with sparsetrain.use_backend("triton"), count_calls(K, ["bsr_linear_forward"]) as calls:
        y = torch.func.vmap(layer, in_dims=1)(x)  # (batch on dim 1: moved to the front)
        assert calls == ["bsr_linear_forward"], calls
        y.backward(gy := torch.randn(y.shape))
        ry, rdx, rdw, rdb = reference_grads(dense_linear, x.transpose(0, 1), lin.weight, mask, lin.bias, gy)
        assert_close_all([(y, ry), (x.grad.transpose(0, 1), rdx),
                          (layer.weight.values.grad, BSR.from_dense(rdw, 16, mask).values), (layer.bias.grad, rdb)])
        x0 = x[0].detach()
        params = {"weight.values": layer.weight.values.detach().expand(2, -1, -1, -1), "bias": layer.bias.detach()}
        for transform, match in (
                (lambda: torch.func.grad(lambda t: layer(t).sum())(x0), "do not support torch.func.grad, vjp, jacrev"),
                (lambda: torch.func.jacrev(layer)(x0[0]), "do not support torch.func.grad, vjp, jacrev"),
                (lambda: torch.func.grad(lambda t: torch.func.vmap(layer)(t).sum())(x0), "torch.func.grad"),
                (lambda: torch.func.jvp(layer, (x0,), (torch.ones_like(x0),)), "no forward-mode derivative"),
                (lambda: torch.func.vmap(lambda v: torch.func.functional_call(
                    layer, {**params, "weight.values": v}, (x0,)))(params["weight.values"]), "over a BSRLinear's values")):
            try:
                transform()
            except NotImplementedError as e:
                assert match in str(e), e
            else:
                raise AssertionError(f"not refused: {match}")


@interp
def linear_skewed_rows_and_split_batch():
    """One dense row among empty/short ones (row sorting), a batch wider than one tile, and the
    SDDMM with the batch split over programs (atomic accumulation)."""
    from sparsetrain.engine.formats import CSR
    import sparsetrain.kernels.sparse_linear as K
    g = torch.Generator().manual_seed(1)
    w, mask = torch.randn(9, 40, generator=g), torch.zeros(9, 40, dtype=torch.bool)
    mask[4], mask[7, ::7], mask[0, 3] = True, True, True
    c = CSR.from_dense(w, mask)
    crow, col, v = c.crow_indices, c.col_indices, c.values.detach()
    x, gy = torch.randn(67, 40, generator=g), torch.randn(67, 9, generator=g)
    ry, rdx, rdw, _ = reference_grads(dense_linear, x, w, mask, None, gy)
    assert_close_all([(K.sparse_linear(x, crow, col, v, *c.csc(), None), ry),
                      (K.sparse_linear_grad_input(gy, crow, col, v, *c.csc()), rdx)]
                     + [(K.csr_sddmm(crow, col, gy.t().contiguous(), x.t().contiguous(), split=split),
                         rdw[mask]) for split in (1, 3)])
    empty = K.sparse_linear(torch.randn(0, 40), c.crow_indices, c.col_indices, c.values.detach(), *c.csc(), None)
    assert empty.shape == (0, 9)


@interp
def bsr_blocks_16_32_64_odd_sizes():
    import sparsetrain
    with sparsetrain.use_backend("triton"):
        check_bsr((5,), 50, 37, 16, 0.5, True)       # neither dim a multiple of 16
        check_bsr((2, 3), 70, 40, 32, 0.3, False)    # 3-D input
        check_bsr((3,), 65, 70, 64, 0.5, True)
        check_bsr((4,), 20, 20, 16, 1.0, True)       # fully pruned
        check_bsr((33,), 48, 64, 16, 0.75, False)    # several batch tiles, empty block rows


@interp
def bsr_linear_under_the_fp32_precision_api():
    """TF32 allowed through PyTorch's fp32_precision API (after which reading the legacy allow_tf32
    raises): the BSR product runs (it read allow_tf32 and raised) and matches the dense masked linear,
    the interpreter computing in fp32; the flag restored after."""
    import sparsetrain
    from sparsetrain.engine.bsr import BSRLinear
    from sparsetrain.prune import block_mask
    lin = torch.nn.Linear(32, 16)
    mask = block_mask(lin.weight, 16, 0.5)
    layer, x = BSRLinear.from_dense(lin, 16, mask), torch.randn(4, 32)
    with tf32(True), sparsetrain.use_backend("triton"):
        y = layer(x)
    assert_close_all([(y, dense_linear(x, lin.weight, mask, lin.bias))])


@interp
def bsr_split_batch_weight_grad():
    from sparsetrain.engine.bsr import BSR
    from sparsetrain.prune import block_mask
    import sparsetrain.kernels.bsr_matmul as K
    g = torch.Generator().manual_seed(2)
    w, x, gy = torch.randn(40, 36, generator=g), torch.randn(70, 36, generator=g), torch.randn(70, 40, generator=g)
    mask = block_mask(w, 16, 0.4)
    W = BSR.from_dense(w, 16, mask)
    assert_close_all((K.bsr_linear_grad_weight(gy, x, W.crow_indices, W.col_indices, 16, split=split),
                      BSR.from_dense(gy.t() @ x, 16, mask).values) for split in (1, 2, 3))


@interp
def conv_kernels_strides_paddings():
    check_conv(2, 3, 5, (5, 7), 3, 1, 1, 0.5, True)
    check_conv(1, 3, 4, (6, 5), 3, 2, 1, 0.0, False)            # stride 2, odd sizes
    check_conv(2, 7, 3, (5, 7), 1, 2, 0, 0.5, True)             # 1x1 stride-2 downsample
    check_conv(1, 2, 3, (9, 8), 7, 2, 3, 0.8, True)             # 7x7 stem-like
    check_conv(1, 1, 1, (1, 1), 3, 1, 1, 0.0, True)             # 1x1 image
    check_conv(2, 3, 4, (4, 5), 3, 2, 0, 0.5, False, split=3)   # split pixel range (atomics)


@interp
def conv_kernels_pruned_and_fp64():
    check_conv(1, 3, 3, (4, 4), 3, 1, 0, 1.0, True)             # fully pruned
    check_conv(2, 3, 6, (5, 5), 3, 1, 1, 0.5, True, empty_rows=3)
    check_conv(1, 3, 2, (5, 6), 3, 2, 1, 0.5, True, dtype=torch.float64)


@contextlib.contextmanager
def _forced(kernel, config):
    """Launch `kernel` in autotune `config` inside the block: the interpreter otherwise runs only the
    largest (kernels/_utils.autotune), and a block size that mis-masks an edge tile would show on a GPU only."""
    saved, kernel._st_default = kernel._st_default, config
    try:
        yield
    finally:
        kernel._st_default = saved


def check_conv_stats(relu, in_relu, seed=0):
    """sparse_conv2d_stats (a deferred BN on x, a bias, the ReLU or not, its states counted either way) vs the
    dense masked conv of act((x - mean) scale + shift): y, sum y and sum y^2 per channel, the samples with y > 0."""
    from sparsetrain.engine.formats import CSR
    from sparsetrain.kernels import sparse_conv2d as K
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(3, 2, 3, 3, generator=g), torch.randn(3, generator=g)
    mask = random_mask(w.shape, 0.3, generator=g, empty_rows=1)
    x, scale, shift = torch.randn(2, 2, 7, 5, generator=g), torch.rand(2, generator=g) + 0.5, torch.randn(2, generator=g)
    mean = torch.randn(2, generator=g, dtype=torch.float64)
    xa = (x - mean.float()[:, None, None]) * scale[:, None, None] + shift[:, None, None]
    ry = dense_conv2d(xa.clamp_min(0) if in_relu else xa, w, mask, b, stride=2, padding=1)
    ry = ry.clamp_min(0) if relu else ry
    counts = torch.full((ry[0].numel(),), 5, dtype=torch.int64)
    y, stats = K.sparse_conv2d_stats(x, *(t.detach() for t in CSR.from_dense(w, mask).index()), (3, 3), (2, 2),
                                     (1, 1), b, relu, mean, scale, shift, in_relu, counts)
    ref_stats = bn_stats(ry)
    assert_close_all([(y, ry), (stats, ref_stats)])
    assert torch.equal(counts, 5 + (ry > 0).sum(0).flatten())


@interp
def every_autotune_config_on_edge_tiles():
    """Each kernel in each of its autotune configs, on sizes that leave a partial tile in every block
    dimension (batch 37 and 33 rows against blocks of 32..256, 1 to 9 nonzeros per row against BLOCK_P);
    the conv forward also with its fused layer's epilogue (statistics, ReLU counts, a deferred BN)."""
    import sparsetrain.kernels.bsr_matmul as KB
    import sparsetrain.kernels.sparse_conv2d as KC
    import sparsetrain.kernels.sparse_linear as KL
    for cfg in range(len(KL._SPMM_CONFIGS)):
        with _forced(KL._csr_spmm_kernel, KL._SPMM_CONFIGS[cfg]), \
                _forced(KL._csr_sddmm_kernel, KL._SDDMM_CONFIGS[cfg % len(KL._SDDMM_CONFIGS)]):
            import sparsetrain
            with sparsetrain.use_backend("triton"):
                check_linear((37,), 9, 7, 0.4, True, empty_rows=1, seed=cfg)
    for i, cfg in enumerate(KC._CONFIGS):  # (stride 2 and a bias, or padding 2 and the pixels split in two)
        with _forced(KC._conv_fwd_kernel, cfg), _forced(KC._conv_dgrad_kernel, cfg), \
                _forced(KC._conv_wgrad_kernel, cfg):
            check_conv(1, 2, 3, (7, 5), 3, 2 - i % 2, 1 + i % 2, 0.3, i % 2 == 0, empty_rows=1, split=1 + i % 2)
            check_conv_stats(relu=i % 2 == 0, in_relu=i % 3 == 0, seed=i)
    for cfg in range(len(KB._MM_CONFIGS)):
        with _forced(KB._bsr_mm_kernel, KB._MM_CONFIGS[cfg]), \
                _forced(KB._bsr_sddmm_kernel, KB._SDDMM_CONFIGS[cfg % len(KB._SDDMM_CONFIGS)]):
            import sparsetrain
            with sparsetrain.use_backend("triton"):
                check_bsr((33,), 37, 20, 16, 0.5, True)


@interp
def layers_built_under_inference_mode():
    """A model built (or loaded) under torch.inference_mode has inference index tensors, which keep no version
    counter: the per-mask caches read it ("Inference tensors do not track version counter", a RuntimeError on
    the Triton backend only, before 2026-12-06); they compute per call for such tensors now."""
    import sparsetrain
    from sparsetrain.nn import SparseConv2d, SparseLinear
    g = torch.Generator().manual_seed(7)
    lin, conv = torch.nn.Linear(6, 4), torch.nn.Conv2d(2, 3, 3, padding=1)
    ml, mc = random_mask((4, 6), 0.5, generator=g), random_mask((3, 2, 3, 3), 0.5, generator=g)
    x, xc = torch.randn(2, 6, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    with torch.inference_mode(), sparsetrain.use_backend("triton"):
        sl, sc = SparseLinear.from_dense(lin, ml), SparseConv2d.from_dense(conv, mc)
        for _ in range(2):  # (the second call: nothing stale from the first)
            assert_close_all([(sl(x), dense_linear(x, lin.weight, ml, lin.bias)),
                              (sc(xc), dense_conv2d(xc, conv.weight, mc, conv.bias, padding=1))])


@interp
def weight_gradient_split_checked():
    """The weight gradients' `split` keyword (conv2d_grad_weight, csr_sddmm, bsr_linear_grad_weight): 0 or a
    negative launched no program and returned uninitialised memory or zeros, silently, before 2026-12-06; now a
    ValueError (a non-int a TypeError), and a numpy int computes the dense masked gradient."""
    import numpy as np
    from sparsetrain.engine.bsr import BSR
    from sparsetrain.engine.formats import CSR
    from sparsetrain.kernels import bsr_matmul as KB, sparse_conv2d as KC, sparse_linear as KL
    g = torch.Generator().manual_seed(8)
    wc, mc = torch.randn(3, 2, 3, 3, generator=g), random_mask((3, 2, 3, 3), 0.4, generator=g)
    x, gy = torch.randn(2, 2, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    wl, ml = torch.randn(4, 6, generator=g), random_mask((4, 6), 0.4, generator=g)
    xl, gl = torch.randn(5, 6, generator=g), torch.randn(5, 4, generator=g)
    wb = BSR.from_dense(torch.randn(20, 18, generator=g), 16)
    xb, gb = torch.randn(3, 18, generator=g), torch.randn(3, 20, generator=g)
    c, lin = CSR.from_dense(wc, mc), CSR.from_dense(wl, ml)
    rdw = reference_grads(dense_conv2d, x, wc, mc, None, gy, padding=1)[2]
    calls = [(lambda s: KC.conv2d_grad_weight(gy, x, c.crow_indices, c.col_indices, (3, 3), (1, 1), (1, 1), split=s),
              rdw[mc]),
             (lambda s: KL.csr_sddmm(lin.crow_indices, lin.col_indices, gl.t().contiguous(), xl.t().contiguous(),
                                     split=s), (gl.t() @ xl)[ml]),
             (lambda s: KB.bsr_linear_grad_weight(gb, xb, wb.crow_indices, wb.col_indices, 16, split=s),
              BSR.from_dense(gb.t() @ xb, 16).values)]
    for call, ref in calls:
        assert_close_all([(call(np.int64(2)), ref)])
        for bad, err in ((0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)):
            with pytest.raises(err, match=r"split must be an int >= 1 or None, got"):
                call(bad)


@interp
def conv_grad_input_one_index_as_two_kernel_sizes():
    """One transposed index read as a 3x3 conv of C channels, then as a 1x1 conv of 9C: the input
    gradient's channel order was cached per index only, so the second call ran 9C programs over the
    first's C-entry order (reads past it: a segfault under the interpreter, garbage on a GPU)."""
    from sparsetrain.engine.formats import CSR, transpose_index
    from sparsetrain.kernels import sparse_conv2d as K
    g = torch.Generator().manual_seed(6)
    w = torch.randn(4, 2, 3, 3, generator=g)
    mask = random_mask(w.shape, 0.4, generator=g)
    csr = CSR.from_dense(w, mask)
    ccol, row_t, perm = transpose_index(csr.crow_indices, csr.col_indices, 18)
    vals, gy = csr.values.detach(), torch.randn(1, 4, 4, 5, generator=g)
    for wk, k, pad in ((w, 3, 1), (w.reshape(4, 18, 1, 1), 1, 0)):
        x = torch.randn(1, wk.shape[1], 4, 5, generator=g)
        _, rdx, _, _ = reference_grads(dense_conv2d, x, wk, mask.reshape(wk.shape), None, gy, stride=1, padding=pad)
        dx = K.sparse_conv2d_grad_input(gy, ccol, row_t, perm, vals, (4, 5), (k, k), (1, 1), (pad, pad))
        assert_close_all([(dx, rdx)])


@interp
def conv_grad_input_add():
    """The schemas' grad_input_add (a gradient of x from another branch): dx + it, checked."""
    from sparsetrain.engine.formats import CSR
    from sparsetrain.kernels import sparse_conv2d as K
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, 3, 3, 3, generator=g)
    mask = random_mask(w.shape, 0.5, generator=g)
    csr, x = CSR.from_dense(w, mask), torch.randn(2, 3, 5, 6, generator=g)
    gy, add = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 3, 5, 6, generator=g)
    geo = ((3, 3), (2, 2), (1, 1))
    _, rdx, _, _ = reference_grads(dense_conv2d, x, w, mask, None, gy, stride=2, padding=1)
    crow, col, vals, ccol, row_t, perm = (t.detach() for t in csr.index())
    dx, _ = K.sparse_conv2d_backward(gy, x, crow, col, vals, ccol, row_t, perm, *geo, add)
    dx1 = K.sparse_conv2d_grad_input(gy, ccol, row_t, perm, vals, (5, 6), *geo, add)
    assert_close_all([(dx, rdx + add), (dx1, rdx + add)])
    with pytest.raises(ValueError, match="grad_input_add must have"):
        K.sparse_conv2d_grad_input(gy, ccol, row_t, perm, vals, (5, 6), *geo, add[:, :2])


def check_conv_op(device="cpu", shape=(2, 3, 7, 6), cout=4, k=3, stride=2, padding=1, sparsity=0.5):
    """engine.ops.sparse_conv2d (the op + its autograd row) vs F.conv2d: output, all grads."""
    from sparsetrain.engine import ops
    from sparsetrain.engine.formats import CSR
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(cout, shape[1], k, k, generator=g), torch.randn(cout, generator=g)
    mask = random_mask(w.shape, sparsity, generator=g, empty_rows=1)
    w, b, mask = w.to(device), b.to(device).requires_grad_(True), mask.to(device)
    csr, x = CSR.from_dense(w, mask), torch.randn(shape, generator=g).to(device).requires_grad_(True)
    (y := ops.sparse_conv2d(x, csr, b, stride=stride, padding=padding)).backward(gy := torch.randn_like(y))
    ry, rdx, rdw, rdb = reference_grads(dense_conv2d, x, w, mask, b, gy, stride=stride, padding=padding)
    assert_close_all([(y, ry), (x.grad, rdx), (csr.values.grad, rdw[mask]), (b.grad, rdb)], device=device)


@interp
def conv_op_autograd_routes_to_triton():
    """Forced to Triton, the conv op and its autograd formula run only Triton kernels."""
    import sparsetrain
    import sparsetrain.kernels.sparse_conv2d as K
    names = ["conv2d_forward", "conv2d_grad_input", "conv2d_grad_weight"]
    with count_calls(K, names) as calls, sparsetrain.use_backend("triton"):
        check_conv_op()
    assert sorted(set(calls)) == names, calls


@interp
def shapes_checked_against_the_weight():
    """A wrong input width or channel count is refused by the Triton kernels as by the C++ ones
    (never a silent read of pruned or missing columns)."""
    import sparsetrain.kernels.sparse_conv2d as KC
    import sparsetrain.kernels.sparse_linear as KL
    from sparsetrain.engine.formats import CSR
    w = CSR.from_dense(torch.randn(3, 20), torch.arange(20).expand(3, 20) < 16)  # columns 16..19 pruned
    v = w.values.detach()
    for width in (16, 25):
        for call in (lambda: KL.sparse_linear(torch.randn(2, width), *w.index()[:2], v, *w.csc(), None),
                     lambda: KL.sparse_linear_grad_input(torch.randn(2, 4), *w.index()[:2], v, *w.csc())):
            try:
                call()
            except ValueError as e:
                assert "last dimension" in str(e), e
            else:
                raise AssertionError("a wrong width was accepted")
    c = CSR.from_dense(torch.randn(4, 3, 3, 3), torch.rand(4, 3, 3, 3) < 0.5)
    geo = ([3, 3], [1, 1], [1, 1])
    for call, what in ((lambda x: KC.sparse_conv2d(x, *c.index()[:2], c.values.detach(), *c.csc(), *geo), "x has"),
                       (lambda x: KC.sparse_conv2d_backward(torch.randn(1, 4, 5, 5), x, *c.index()[:2],
                                                            c.values.detach(), *c.csc(), *geo), "x has"),
                       (lambda x: KC.sparse_conv2d_grad_weight(torch.randn(1, 4, 5, 5), x, *c.index()[:2], *geo),
                        "x has")):
        try:
            call(torch.randn(1, 2, 5, 5))  # 2 channels, the weight has 3
        except ValueError as e:
            assert what in str(e), e
        else:
            raise AssertionError("a wrong channel count was accepted")


@interp
def bsr_backward_uses_the_index_of_its_forward():
    """Loading another pattern with as many blocks into the layer between forward and backward: without
    autocast the saved values' version check refuses it; under autocast the saved values are a cast
    copy, and the backward paired them with the newly loaded index (a silently wrong dx and dW,
    2026-12-06). The backward now uses the index of its forward: the gradient of the forward that ran,
    as a dense layer under autocast gives (F.linear saves its cast weight too)."""
    import sparsetrain
    from sparsetrain.engine.bsr import BSR, BSRLinear
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 32, generator=g)
    keep_a = torch.zeros(2, 2, dtype=torch.bool)
    keep_a[0, 0] = keep_a[1, 1] = True
    masks = [keep.repeat_interleave(16, 0).repeat_interleave(16, 1) for keep in (keep_a, ~keep_a)]
    layer, other = (BSRLinear(BSR.from_dense(w, 16, m), None) for m in masks)
    x = torch.randn(4, 32, generator=g)
    state = {k: v.clone() for k, v in layer.state_dict().items()}

    def step(dtype, load):  # (x.grad, values.grad) of one forward/backward, `other` loaded in between
        layer.load_state_dict(state)
        layer.weight.values.grad, xi = None, x.clone().requires_grad_(True)
        amp = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
        with sparsetrain.use_backend("triton"), amp:
            out = layer(xi)
        if load:
            layer.load_state_dict(other.state_dict())  # (as many blocks: values copied in place)
        (out.float() * torch.arange(32.0)).sum().backward()
        return xi.grad, layer.weight.values.grad

    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        step(None, True)
    for got, ref in zip(step(torch.float16, True), step(torch.float16, False)):
        torch.testing.assert_close(got, ref)
    keep_c = torch.ones(2, 2, dtype=torch.bool)  # (another block count: a gradient of 2 blocks for 4 was broadcast
    other = BSRLinear(BSR.from_dense(w, 16, keep_c.repeat_interleave(16, 0).repeat_interleave(16, 1)), None)
    with pytest.raises(RuntimeError, match=r"another block count \(4, this forward's 2\)"):  # by the step, 2026-12-08)
        step(torch.float16, True)


@interp
def edge_cases_refused_or_computed_as_the_cpp_ops():
    """Non-contiguous index tensors are refused (the kernels read ptr + i); bn_act on an empty
    batch and SparseLinear with 0 in- or out-features compute what the C++ ops do; a direct call
    with x narrower than the weight's columns, or grad_out with fewer channels than its rows, is
    refused (never an out-of-bounds read); BSRLinear runs under autocast in its dtype."""
    import sparsetrain
    import sparsetrain.kernels.bn_act as KB
    import sparsetrain.kernels.sparse_conv2d as KC
    import sparsetrain.kernels.sparse_linear as KL
    from sparsetrain.engine.bsr import BSR, BSRLinear
    from sparsetrain.engine.formats import CSR
    from sparsetrain.nn import SparseLinear
    from sparsetrain.prune import block_mask
    g = torch.Generator().manual_seed(6)
    w = CSR.from_dense(torch.randn(3, 20, generator=g), torch.rand(3, 20, generator=g) < 0.5)
    crow, col, ccol, row_t, perm, v = (*w.index()[:2], *w.csc(), w.values.detach())
    x = torch.randn(4, 20, generator=g)
    for bad in ("crow", "col", "perm", "row_t"):
        args = dict(crow=crow, col=col, perm=perm, row_t=row_t)
        t = args[bad]
        args[bad] = torch.stack([t, t], 1).flatten()[::2]  # the same values, stride 2
        assert not args[bad].is_contiguous() and torch.equal(args[bad], t)
        with pytest.raises(ValueError, match=f"{ {'crow': 'crow_indices', 'col': 'col_indices', 'row_t': 'row_indices_t'}.get(bad, bad)} must be contiguous"):
            KL.sparse_linear(x, args["crow"], args["col"], v, ccol, args["row_t"], args["perm"], None)
    y = torch.randn(0, 3, 4, 4, generator=g)
    s, b, m = torch.rand(3, generator=g), torch.randn(3, generator=g), torch.randn(3, generator=g, dtype=torch.float64)
    assert KB.bn_act(y, m, s, b, None, True).shape == torch.ops.sparsetrain.bn_act(y, m, s, b, None, True).shape \
        == (0, 3, 4, 4)
    for fin, fout in ((0, 3), (4, 0)):
        outs = {}
        for backend in ("cpu", "triton"):
            torch.manual_seed(0)
            layer = SparseLinear.from_dense(torch.nn.Linear(fin, fout))
            xi = torch.randn(5, fin, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
            with sparsetrain.use_backend(backend):
                out = layer(xi)
                out.sum().backward()
            outs[backend] = (out, xi.grad, layer.weight.values.grad, layer.bias.grad)
        for got, ref in zip(outs["triton"], outs["cpu"]):
            torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="fewer than the weight's column indices"):
        KL.sparse_linear_grad_weight(torch.randn(4, 3), torch.randn(4, 5), crow, col)
    c = CSR.from_dense(torch.randn(4, 3, 3, 3, generator=g))
    with pytest.raises(ValueError, match="grad_out has 2 channels"):
        KC.sparse_conv2d_grad_input(torch.randn(1, 2, 5, 5), *c.csc(), c.values.detach(), (5, 5), [3, 3], [1, 1], [1, 1])
    lin = torch.nn.Linear(32, 48)
    mask = block_mask(lin.weight, 16, 0.5)
    layer = BSRLinear(BSR.from_dense(lin.weight, 16, mask), lin.bias)
    xb = torch.randn(6, 32, generator=g).requires_grad_(True)
    with sparsetrain.use_backend("triton"), torch.autocast("cpu", dtype=torch.float16):
        out = layer(xb)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    ref = torch.nn.functional.linear(xb.detach().half().float(), (lin.weight * mask).half().float(), lin.bias.half().float())
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    assert layer.weight.values.grad.dtype == torch.float32 and xb.grad.dtype == torch.float32
    # bf16 (CPU autocast's default): the interpreter's tl.dot multiplied bf16's raw bits (off by 4e10)
    layer.weight.values.grad = xb.grad = None
    with sparsetrain.use_backend("triton"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(xb)
    assert out.dtype == torch.bfloat16
    (out.float() * torch.arange(48.0)).sum().backward()
    xr, wr = xb.detach().bfloat16().float().requires_grad_(True), (lin.weight * mask).detach().bfloat16().float().requires_grad_(True)
    ref = torch.nn.functional.linear(xr, wr, lin.bias.bfloat16().float())
    (ref * torch.arange(48.0)).sum().backward()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(xb.grad, xr.grad, rtol=2e-2, atol=0.5)
    torch.testing.assert_close(layer.weight.values.grad, BSR.from_dense(wr.grad, 16, mask).values, rtol=2e-2, atol=0.5)


@interp
def bsr_linear_bias_1d_input_empty_features_and_a_loaded_pattern():
    """bsr_linear on the Triton kernels: a bias of another shape is refused (the kernel would read
    past it); a 1-D input with a bias, 0 in- or out-features and a layer whose pattern came from a
    state_dict of another block count (the transposed index rebuilt) match the dense masked linear."""
    import sparsetrain
    from sparsetrain.engine.bsr import BSR, BSRLinear, bsr_linear
    from sparsetrain.prune import block_mask
    g = torch.Generator().manual_seed(7)
    lin = torch.nn.Linear(24, 20)
    mask = block_mask(lin.weight, 16, 0.5)
    W = BSR.from_dense(lin.weight, 16, mask)
    with sparsetrain.use_backend("triton"):
        for bad in (torch.zeros(1), torch.zeros(5), torch.zeros(2, 20)):
            with pytest.raises(ValueError, match=r"bias must have shape \(20,\)"):
                bsr_linear(torch.randn(3, 24), W, bad)
    x = torch.randn(24, generator=g)
    check = [(lin, mask, x)]
    for fin, fout in ((0, 20), (24, 0)):
        empty = torch.nn.Linear(fin, fout)
        check.append((empty, torch.ones(fout, fin, dtype=torch.bool), torch.randn(3, fin, generator=g)))
    other = torch.nn.Linear(24, 20)  # a pattern of another block count, loaded into `layer`
    omask = block_mask(other.weight, 16, 0.25)
    layer = BSRLinear(BSR.from_dense(lin.weight, 16, mask), lin.bias)
    layer.load_state_dict(BSRLinear.from_dense(other, 16, omask).state_dict())
    assert layer.weight.nnz_blocks == BSR.from_dense(other.weight, 16, omask).nnz_blocks != W.nnz_blocks
    for dense, m, xi in check + [(other, omask, torch.randn(4, 24, generator=g))]:
        module = layer if dense is other else BSRLinear.from_dense(dense, 16, m)
        xi = xi.requires_grad_(True)
        with sparsetrain.use_backend("triton"):
            (y := module(xi)).backward(gy := torch.randn(y.shape, generator=g))
        ry, rdx, rdw, rdb = reference_grads(dense_linear, xi, dense.weight, m, dense.bias, gy)
        rdv = BSR.from_dense(rdw, 16, m).values
        assert_close_all([(y, ry), (xi.grad, rdx), (module.weight.values.grad, rdv), (module.bias.grad, rdb)])


@interp
def bsr_functional_call_with_another_pattern_of_as_many_blocks():
    """torch.func.functional_call(layer, other.state_dict(), x) on the Triton kernels: the state swaps
    crow/col/values in, not the transposed block index (derived, not in the state) from which dx is
    computed: dx was the layer's own pattern's, silently (200 off). It is built anew for the swapped
    pattern, and again for the layer's own after; output, dx and the values' gradient vs the dense
    masked linear."""
    import sparsetrain
    from sparsetrain.engine.bsr import BSR, BSRLinear
    g = torch.Generator().manual_seed(3)
    dense, other = torch.nn.Linear(40, 20), torch.nn.Linear(40, 20)
    m1, m2 = torch.zeros(20, 40, dtype=torch.bool), torch.zeros(20, 40, dtype=torch.bool)
    m1[:16, :16] = m1[16:, 32:] = True
    m2[:16, 16:32] = m2[16:, :16] = True
    a, b = BSRLinear.from_dense(dense, 16, m1), BSRLinear.from_dense(other, 16, m2)
    assert a.weight.nnz_blocks == b.weight.nnz_blocks
    for state, ref, mask in ((b.state_dict(), other, m2), (None, dense, m1), (b.state_dict(), other, m2)):
        x = torch.randn(3, 40, generator=g, requires_grad=True)
        a.zero_grad()
        with sparsetrain.use_backend("triton"):
            y = torch.func.functional_call(a, state, (x,)) if state is not None else a(x)
        y.backward(gy := torch.randn(y.shape, generator=g))
        ry, rdx, rdw, rdb = reference_grads(dense_linear, x, ref.weight, mask, ref.bias, gy)
        pairs = [(y, ry), (x.grad, rdx)]
        if state is None:
            pairs.append((a.weight.values.grad, BSR.from_dense(rdw, 16, mask).values))
        assert_close_all(pairs)


def refused_alike(cpp, triton_fn, args, match, error=ValueError):
    """The C++ op (`cpp`; None where there is none) and its Triton wrapper refuse `args` with the same
    message (`match`) and the same class (`error`), before any kernel reads out of bounds."""
    if cpp is not None:
        with pytest.raises(error, match=match):
            cpp(*args)
    with pytest.raises(error, match=match):
        triton_fn(*args)


@interp
def index_tensors_inconsistent_with_nnz_refused_as_the_cpp_ops():
    """values, perm or a compressed index that disagree with nnz (crow[-1] != col.numel(), crow[0] != 0, a
    decreasing crow, perm out of [0, nnz)) are refused by the Triton conv and linear wrappers with the C++
    ops' messages (on a GPU each would be an out-of-bounds read or write)."""
    import sparsetrain.engine.ops  # noqa: F401  (registers the C++ ops)
    import sparsetrain.kernels.sparse_conv2d as KC
    import sparsetrain.kernels.sparse_linear as KL
    from sparsetrain.engine.formats import CSR
    ops = torch.ops.sparsetrain
    g = torch.Generator().manual_seed(8)
    W = CSR.from_dense(torch.randn(4, 3, 3, 3, generator=g), random_mask((4, 3, 3, 3), 0.5, generator=g))
    crow, col, v, ccol, rt, perm = (t.detach() for t in W.index())
    nnz = col.numel()
    x, gy = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    geo = ([3, 3], [1, 1], [1, 1])

    def edit(t, i, value):
        t = t.clone()
        t[i] = value
        return t
    crow_end, ccol_end = edit(crow, -1, nnz + 5), edit(ccol, -1, nnz - 1)
    for bad, msg in ((crow_end, rf"crow_indices\[-1\] \({nnz + 5}\) must equal col_indices.numel\(\) \({nnz}\)"),
                     (edit(crow, 0, 1), r"crow_indices\[0\] must be 0, got 1"),
                     (edit(crow, 1, int(crow[2]) + 1), r"crow_indices must be non-decreasing \(row 1\)")):
        refused_alike(ops.sparse_conv2d, KC.sparse_conv2d, (x, bad, col, v, ccol, rt, perm, *geo, None), msg)
        refused_alike(ops.sparse_conv2d_grad_weight, KC.sparse_conv2d_grad_weight, (gy, x, bad, col, *geo), msg)
    short = rf"values must have nnz = {nnz} entries, got 3"
    refused_alike(ops.sparse_conv2d, KC.sparse_conv2d, (x, crow, col, v[:3], ccol, rt, perm, *geo, None), short)
    for args, msg in (((gy, ccol, rt, perm, v[:3]), short),
                      ((gy, ccol, rt, perm[:3], v), rf"perm must have nnz = {nnz} entries, got 3"),
                      ((gy, ccol, rt, edit(perm, 0, nnz), v), rf"perm has entries outside \[0, {nnz}\)"),
                      ((gy, ccol_end, rt, perm, v), r"ccol_indices\[-1\] \(\d+\) must equal row_indices_t.numel\(\)")):
        refused_alike(ops.sparse_conv2d_grad_input, KC.sparse_conv2d_grad_input, (*args, [5, 5], *geo), msg)
    refused_alike(ops.sparse_conv2d_backward, KC.sparse_conv2d_backward,
                  (gy, x, crow, col, v, ccol, rt, edit(perm, 0, nnz), *geo), rf"perm has entries outside \[0, {nnz}\)")
    # a transposed index that is not the CSR's (a duplicate in perm read one weight twice and another never,
    # another row in row_indices_t: a silently wrong dx on the Triton ops before 2026-12-06)
    dup, other_row = edit(perm, 1, int(perm[0])), edit(rt, 0, (int(rt[0]) + 1) % 4)
    refused_alike(ops.sparse_conv2d_grad_input, KC.sparse_conv2d_grad_input, (gy, ccol, rt, dup, v, [5, 5], *geo),
                  r"perm must be a permutation of \[0, nnz\)")
    for bad_rt, bad_perm in ((rt, dup), (other_row, perm)):
        refused_alike(ops.sparse_conv2d_backward, KC.sparse_conv2d_backward, (gy, x, crow, col, v, ccol, bad_rt,
                      bad_perm, *geo), "ccol_indices, row_indices_t and perm must be the transposed index of crow_ind")
    # (before it reads crow with perm; named by the function that checks, "sparse_conv2d backward" in every
    # caller's error before 2026-12-06, sparse_linear_grad_input's too)
    with pytest.raises(ValueError, match="^sparse_conv2d_grad_input: all tensors must be on one device"):
        KC.sparse_conv2d_backward(gy, x, crow.to("meta"), col, v, ccol, rt, perm, *geo)
    # negative entries (read before the tensor they index): the C++ ops' range check, ours by sign
    either = r"{} has (entries outside \[0, \d+\)|negative entries \(the smallest is -1\))"
    refused_alike(ops.sparse_conv2d, KC.sparse_conv2d, (x, crow, edit(col, 0, -1), v, ccol, rt, perm, *geo, None),
                  either.format("col_indices"))
    for args, name in (((gy, ccol, rt, edit(perm, 0, -1), v), "perm"), ((gy, ccol, edit(rt, 0, -1), perm, v),
                                                                         "row_indices_t")):
        refused_alike(ops.sparse_conv2d_grad_input, KC.sparse_conv2d_grad_input, (*args, [5, 5], *geo),
                      either.format(name))
    L = CSR.from_dense(torch.randn(3, 5, generator=g), random_mask((3, 5), 0.4, generator=g))
    lcrow, lcol, lv, lccol, lrt, lperm = (t.detach() for t in L.index())
    n = lcol.numel()
    lend = edit(lcrow, -1, n + 3)
    msg = rf"crow_indices\[-1\] \({n + 3}\) must equal col_indices.numel\(\) \({n}\)"
    xl, gl = torch.randn(2, 5, generator=g), torch.randn(2, 3, generator=g)
    refused_alike(ops.sparse_linear, KL.sparse_linear, (xl, lend, lcol, lv, lccol, lrt, lperm, None), msg)
    refused_alike(ops.sparse_linear_grad_input, KL.sparse_linear_grad_input, (gl, lend, lcol, lv, lccol, lrt, lperm), msg)
    refused_alike(ops.sparse_linear_grad_weight, KL.sparse_linear_grad_weight, (gl, xl, lend, lcol), msg)
    refused_alike(ops.sparse_linear, KL.sparse_linear, (xl, lcrow, lcol, lv[:1], lccol, lrt, lperm, None),
                  rf"values must have nnz = {n} entries, got 1")
    # the transposed index the Triton grad_input reads (the C++ kernel needs only its shape)
    refused_alike(None, KL.sparse_linear_grad_input, (gl, lcrow, lcol, lv, lccol, lrt, edit(lperm, 0, n)),
                  rf"perm has entries outside \[0, {n}\)")
    refused_alike(None, KL.sparse_linear_grad_input, (gl, lcrow, lcol, lv, edit(lccol, -1, n + 1), lrt, lperm),
                  r"ccol_indices\[-1\] \(\d+\) must equal row_indices_t.numel\(\)")
    # perm not a permutation (a duplicate: one weight read twice, another never; a silently wrong dx before)
    refused_alike(None, KL.sparse_linear_grad_input, (gl, lcrow, lcol, lv, lccol, lrt, edit(lperm, 1, int(lperm[0]))),
                  "ccol_indices, row_indices_t and perm must be the transposed index of crow_ind")
    refused_alike(None, lambda *a: KL.csr_spmm(*a[:3], a[4], perm=a[3]),
                  (lccol, lrt, lv, edit(lperm, 1, int(lperm[0])), gl.t().contiguous()),
                  r"perm must be a permutation of \[0, nnz\)")
    refused_alike(None, lambda *a: KL.csr_spmm(*a), (lend, lcol, lv, xl.t().contiguous()),
                  r"ptr\[-1\] \(\d+\) must equal idx.numel\(\)")
    refused_alike(None, lambda *a: KL.csr_spmm(*a), (lcrow, lcol, lv[:1], xl.t().contiguous()),
                  rf"vals must have nnz = {n} entries, got 1")


@interp
def conv_geometry_of_2_31_refused_as_the_cpp_ops():
    """A kernel_size, stride or padding entry of 2^31 or more, a kernel of more than 2^24 taps and an input
    spatial size of 2^31 (an empty batch) are refused by every Triton conv function with the C++ ops' messages
    (before 2026-12-06 the Triton ones ran such a stride, tried to allocate 640 GB for such a padding, returned
    an output of 2^31 rows for the empty batch, or refused with another check's message)."""
    import sparsetrain.engine.ops  # noqa: F401  (registers the C++ ops)
    import sparsetrain.kernels.sparse_conv2d as KC
    from sparsetrain.engine.formats import CSR
    ops = torch.ops.sparsetrain
    g = torch.Generator().manual_seed(9)
    W = CSR.from_dense(torch.randn(4, 3, 3, 3, generator=g), random_mask((4, 3, 3, 3), 0.5, generator=g))
    crow, col, v, ccol, rt, perm = (t.detach() for t in W.index())
    x, gy, big = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g), 2**31

    def refused(x, gy, geo, input_size, msg):
        refused_alike(ops.sparse_conv2d, KC.sparse_conv2d, (x, crow, col, v, ccol, rt, perm, *geo, None), msg)
        refused_alike(ops.sparse_conv2d_stats, KC.sparse_conv2d_stats, (x, crow, col, v, ccol, rt, perm, *geo, None,
                                                                       False), msg)
        refused_alike(ops.sparse_conv2d_grad_weight, KC.sparse_conv2d_grad_weight, (gy, x, crow, col, *geo), msg)
        refused_alike(ops.sparse_conv2d_grad_input, KC.sparse_conv2d_grad_input,
                      (gy, ccol, rt, perm, v, input_size, *geo), msg)
        refused_alike(ops.sparse_conv2d_backward, KC.sparse_conv2d_backward, (gy, x, crow, col, v, ccol, rt, perm,
                                                                             *geo), msg)
    for geo in (([3, 3], [big, 1], [1, 1]), ([3, 3], [1, 1], [1, big]), ([big, 3], [1, 1], [1, 1]),
                ([3, 3], [1, 2**40], [1, 1])):
        shown = re.escape(", ".join(str(list(a)) for a in geo))
        refused(x, gy, geo, [5, 5], rf"^kernel_size, stride and padding must be < 2\^31, got {shown}$")
    refused(x, gy, ([2**13, 2**12], [1, 1], [0, 0]), [5, 5], r"^kernel_size must have at most 2\^24 taps, got \[8192, 4096\]$")
    geo = ([3, 3], [1, 1], [1, 1])
    refused(torch.empty(0, 3, big, 5), torch.empty(0, 4, big, 5), geo, [big, 5],
            rf"^input spatial size must be < 2\^31, got \({big}, 5\)$")
    refused(torch.empty(0, 3, 5, big), torch.empty(0, 4, 5, big), geo, [5, big],
            rf"^input spatial size must be < 2\^31, got \(5, {big}\)$")


@interp
def csr_spmm_and_sddmm_refuse_bad_operands_by_name():
    """The public csr_spmm / csr_sddmm check their own operands (dtype, device, shape, ptr length, xt's rows
    against idx) with an error naming the argument (before 2026-12-06 they read out of bounds or gave a wrong
    answer, silently), and with good ones (a non-contiguous xt too) compute the dense products."""
    import sparsetrain.kernels.sparse_linear as KL
    from sparsetrain.engine.formats import CSR
    g = torch.Generator().manual_seed(5)
    mask = random_mask((4, 6), 0.5, generator=g)
    w = torch.randn(4, 6, generator=g) * mask
    W = CSR.from_dense(w, mask)
    ptr, idx, v = W.crow_indices, W.col_indices, W.values.detach()
    xt, dyt = torch.randn(6, 3, generator=g), torch.randn(4, 3, generator=g)
    for call, err, msg in (
            (lambda: KL.csr_spmm(ptr.int(), idx, v, xt), TypeError, "ptr must have dtype Long"),
            (lambda: KL.csr_spmm(ptr, idx.long(), v, xt), TypeError, "idx must have dtype Int"),
            (lambda: KL.csr_spmm(ptr, idx, v.int(), xt), TypeError, "vals must have dtype in"),
            (lambda: KL.csr_spmm(ptr, idx, v, xt.double()), TypeError,  # (its argument: "values" before 2026-12-06)
             r"^xt must have the dtype of vals \(torch.float32\) or bfloat16/float16"),
            (lambda: KL.csr_spmm(ptr, idx, v, xt[:5]), ValueError, r"idx has entries outside \[0, 5\)"),
            (lambda: KL.csr_spmm(ptr, idx, v, xt[:, 0]), ValueError, "xt must be 2-D"),
            (lambda: KL.csr_spmm(ptr, idx, v.reshape(1, -1), xt), ValueError, "vals must be 1-D"),
            (lambda: KL.csr_spmm(ptr[:-1], idx, v, xt), ValueError, r"ptr\[-1\] \(\d+\) must equal idx.numel"),
            (lambda: KL.csr_spmm(ptr, idx, v, xt.to("meta")), ValueError, "all tensors must be on one device"),
            (lambda: KL.csr_spmm(ptr, idx, v, xt, bias=torch.zeros(3)), ValueError, r"bias must have shape \[4\]"),
            (lambda: KL.csr_spmm(ptr, idx, v, xt, perm=torch.arange(v.numel()).int()), TypeError,
             "perm must have dtype Long"),
            (lambda: KL.csr_spmm(ptr, idx, v, xt.tolist()), TypeError, "xt must be a torch.Tensor"),
            (lambda: KL.csr_sddmm(ptr, idx, dyt, xt.double()), TypeError, "dyt must have the dtype of xt"),
            (lambda: KL.csr_sddmm(ptr, idx, dyt[:3], xt), ValueError, r"dyt must have shape \[rows, B\] = \[4, 3\]"),
            (lambda: KL.csr_sddmm(ptr, idx, dyt, xt[:, :2]), ValueError, r"dyt must have shape \[rows, B\] = \[4, 2\]"),
            (lambda: KL.csr_sddmm(ptr, idx, dyt, xt[:5]), ValueError, r"idx has entries outside \[0, 5\)"),
            (lambda: KL.csr_sddmm(ptr, idx.long(), dyt, xt), TypeError, "idx must have dtype Int"),
            (lambda: KL.csr_sddmm(ptr, idx, dyt.int(), xt.int()), TypeError, "xt must have dtype in")):
        with pytest.raises(err, match=msg):
            call()
    wide = torch.randn(3, 6, generator=g)  # xt = wide.t(): not contiguous
    torch.testing.assert_close(KL.csr_spmm(ptr, idx, v, wide.t()), w @ wide.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(KL.csr_sddmm(ptr, idx, dyt, wide.t()), (dyt @ wide)[mask], rtol=1e-5, atol=1e-5)


@interp
def tensor_arguments_that_are_no_tensors_refused_by_name():
    """Called directly, the ops' Triton functions refuse None for a tensor the schema requires, and a list
    for any tensor, with a TypeError naming the parameter (an AttributeError from inside, "'NoneType' object
    has no attribute 'dtype'", before 2026-12-06); with tensors they compute what the C++ ops and the dense
    masked references do."""
    import torch.nn.functional as F
    import sparsetrain.engine.ops  # noqa: F401  (registers the C++ ops)
    import sparsetrain.kernels.bn_act as KB
    import sparsetrain.kernels.sparse_conv2d as KC
    import sparsetrain.kernels.sparse_linear as KL
    from sparsetrain.engine.formats import CSR
    ops = torch.ops.sparsetrain
    g = torch.Generator().manual_seed(9)
    wc, mc = torch.randn(4, 3, 3, 3, generator=g), random_mask((4, 3, 3, 3), 0.5, generator=g)
    wl, ml = torch.randn(4, 6, generator=g), random_mask((4, 6), 0.5, generator=g)
    idx = [t.detach() for t in CSR.from_dense(wc, mc).index()]
    lidx = [t.detach() for t in CSR.from_dense(wl, ml).index()]
    x, gy, xl, gl = (torch.randn(*s, generator=g) for s in ((2, 3, 5, 5), (2, 4, 5, 5), (2, 6), (2, 4)))
    b, geo = torch.randn(4, generator=g), ([3, 3], [1, 1], [1, 1])
    y, stats = ops.sparse_conv2d_stats(x, *idx, *geo, None, False)
    bn = (torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g))
    mean, invstd, w, scale, shift = ops.bn_scale_shift(stats, 50, *bn, torch.zeros(4), torch.ones(4),
                                                       torch.zeros((), dtype=torch.int64), 0.1, 1e-5, True, y.dtype)
    bn_args = (y, None, scale, shift, w, mean, invstd, True, True, False, False)
    lin_ref = reference_grads(dense_linear, xl, wl, ml, b, gl)  # (y, dx, dW, db)
    conv_ref = reference_grads(dense_conv2d, x, wc, mc, b, gy, padding=1)
    calls = [  # (name, Triton function, arguments, the dense reference of the first output or None)
        ("sparse_linear", KL.sparse_linear, [xl, *lidx, b], lin_ref[0]),
        ("sparse_linear_grad_input", KL.sparse_linear_grad_input, [gl, *lidx], lin_ref[1]),
        ("sparse_linear_grad_weight", KL.sparse_linear_grad_weight, [gl, xl, *lidx[:2]], lin_ref[2][ml]),
        ("sparse_conv2d", KC.sparse_conv2d, [x, *idx, *geo, b], conv_ref[0]),
        ("sparse_conv2d_stats", KC.sparse_conv2d_stats, [x, *idx, *geo, None, False], dense_conv2d(x, wc, mc, padding=1)),
        ("sparse_conv2d_grad_input", KC.sparse_conv2d_grad_input, [gy, *idx[3:6], idx[2], [5, 5], *geo], conv_ref[1]),
        ("sparse_conv2d_grad_weight", KC.sparse_conv2d_grad_weight, [gy, x, *idx[:2], *geo], conv_ref[2][mc]),
        ("sparse_conv2d_backward", KC.sparse_conv2d_backward, [gy, x, *idx, *geo], conv_ref[1]),
        ("bn_act", KB.bn_act, [y, mean, scale, shift, None, True],
         F.relu((y - mean.float()[:, None, None]) * scale[:, None, None] + shift[:, None, None])),
        ("bn_scale_shift", KB.bn_scale_shift, [stats, 50, *bn, None, None, None, None, 1e-5, True, y.dtype], None),
        ("bn_act_backward", KB.bn_act_backward, [gy, *bn_args], None),
        ("sparse_conv2d_bn_backward", KB.sparse_conv2d_bn_backward, [gy, x, *idx, *geo, None, *bn_args, True, True],
         None)]
    for name, fn, args, ref in calls:
        got, cpp = fn(*args), getattr(ops, name)(*args)
        for t, c in zip(got if isinstance(got, tuple) else (got,), cpp if isinstance(cpp, tuple) else (cpp,)):
            torch.testing.assert_close(t, c, rtol=1e-4, atol=1e-4)
        if ref is not None:
            torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, ref, rtol=1e-4, atol=1e-4)
        for i, arg in enumerate(getattr(ops, name).default._schema.arguments[:len(args)]):  # (optional tensors: "?")
            kind = str(arg.type)
            if kind in ("Tensor", "Optional[Tensor]"):
                for bad in [[0.0] * 4] + ([None] if kind == "Tensor" else []):
                    with pytest.raises(TypeError, match=rf"^{name}: {arg.name} must be a torch.Tensor( or None)?, got "
                                                        rf"{type(bad).__name__}$"):
                        fn(*args[:i], bad, *args[i + 1:])


@interp
def conv_geometry_arguments_refused_as_the_cpp_op():
    """kernel_size, stride or padding of one entry (was a bare IndexError), or out of range (was a
    ZeroDivisionError for a 0 kernel), and an input_size of 3 entries: the C++ op's messages."""
    import sparsetrain.engine.ops  # noqa: F401
    import sparsetrain.kernels.sparse_conv2d as KC
    from sparsetrain.engine.formats import CSR
    ops = torch.ops.sparsetrain
    W = CSR.from_dense(torch.randn(4, 3, 3, 3))
    crow, col, v, ccol, rt, perm = (t.detach() for t in W.index())
    x, gy = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
    two = "kernel_size, stride and padding must each have 2 entries"
    for geo, msg in ((([3], [1, 1], [1, 1]), two), (([3, 3], [1], [1, 1]), two), (([3, 3], [1, 1], 1), two),
                     (([0, 3], [1, 1], [1, 1]), r"kernel_size must be >= 1, got \[0, 3\]"),
                     (([3, 3], [1, 0], [1, 1]), r"stride must be >= 1, got \[1, 0\]"),
                     (([3, 3], [1, 1], [-1, 1]), r"padding must be >= 0, got \[-1, 1\]")):
        if isinstance(geo[2], int):  # (the C++ schema takes an int as [int, int]: Triton only)
            refused_alike(None, KC.sparse_conv2d, (x, crow, col, v, ccol, rt, perm, *geo, None), msg)
            continue
        refused_alike(ops.sparse_conv2d, KC.sparse_conv2d, (x, crow, col, v, ccol, rt, perm, *geo, None), msg)
        refused_alike(ops.sparse_conv2d_stats, KC.sparse_conv2d_stats,
                      (x, crow, col, v, ccol, rt, perm, *geo, None, True), msg)
        refused_alike(ops.sparse_conv2d_grad_input, KC.sparse_conv2d_grad_input, (gy, ccol, rt, perm, v, [5, 5], *geo),
                      msg)
        refused_alike(ops.sparse_conv2d_grad_weight, KC.sparse_conv2d_grad_weight, (gy, x, crow, col, *geo), msg)
        refused_alike(ops.sparse_conv2d_backward, KC.sparse_conv2d_backward,
                      (gy, x, crow, col, v, ccol, rt, perm, *geo), msg)
    refused_alike(ops.sparse_conv2d_grad_input, KC.sparse_conv2d_grad_input,
                  (gy, ccol, rt, perm, v, [5, 5, 5], [3, 3], [1, 1], [1, 1]), "input_size must have 2 entries")
    # a non-integer entry (the C++ schema refuses it as not int[]): int() truncated it, a stride of 1.5 ran as 1
    for geo, msg in ((([3, 3], [1.5, 1.5], [1, 1]), r"stride must hold ints, got \[1.5, 1.5\]"),
                     (([3, 3], [1, 1], [0.5, 1]), r"padding must hold ints, got \[0.5, 1\]"),
                     (([2.5, 3], [1, 1], [1, 1]), r"kernel_size must hold ints, got \[2.5, 3\]"),
                     # a bool is no int (True ran as 1 before 2026-12-06), as engine.args.is_int
                     (([3, 3], [True, True], [1, 1]), r"stride must hold ints, got \[True, True\]"),
                     (([3, 3], [1, 1], [False, 1]), r"padding must hold ints, got \[False, 1\]")):
        for call in (lambda: KC.sparse_conv2d(x, crow, col, v, ccol, rt, perm, *geo, None),
                     lambda: KC.sparse_conv2d_stats(x, crow, col, v, ccol, rt, perm, *geo, None, True),
                     lambda: KC.sparse_conv2d_grad_input(gy, ccol, rt, perm, v, [5, 5], *geo),
                     lambda: KC.sparse_conv2d_grad_weight(gy, x, crow, col, *geo),
                     lambda: KC.sparse_conv2d_backward(gy, x, crow, col, v, ccol, rt, perm, *geo)):
            with pytest.raises(TypeError, match=msg):
                call()
    with pytest.raises(TypeError, match=r"input_size must hold ints, got \[5.5, 5\]"):
        KC.sparse_conv2d_grad_input(gy, ccol, rt, perm, v, [5.5, 5], [3, 3], [1, 1], [1, 1])
    with pytest.raises(TypeError, match=r"input_size must hold ints, got \[True, 5\]"):
        KC.sparse_conv2d_grad_input(gy, ccol, rt, perm, v, [True, 5], [3, 3], [1, 1], [1, 1])
    import numpy as np  # numpy ints are ints: the same conv
    torch.testing.assert_close(KC.sparse_conv2d(x, crow, col, v, ccol, rt, perm, [3, 3], [np.int64(1)] * 2, [1, 1], None),
                               KC.sparse_conv2d(x, crow, col, v, ccol, rt, perm, [3, 3], [1, 1], [1, 1], None))


@interp
def bsr_wrappers_check_values_index_widths_and_block_size():
    """The BSR wrappers refuse values with another block count than the index, a compressed index whose
    last entry is not its nnzb, perm out of range, an activation narrower than the blocks the index
    addresses, an out_features/in_features the block rows/columns do not make, and a block_size that is
    not the blocks' (each read out of bounds, or silently dropped columns, before)."""
    import sparsetrain.kernels.bsr_matmul as K
    from sparsetrain.engine.bsr import BSR
    from sparsetrain.prune import block_mask
    g = torch.Generator().manual_seed(9)
    w = torch.randn(40, 36, generator=g)
    W = BSR.from_dense(w, 16, block_mask(w, 16, 0.0))  # every block: col_indices addresses block column 2
    crow, col, vals = W.crow_indices, W.col_indices, W.values.detach()
    ccol, rt, perm = W.ccol_indices, W.row_indices_t, W.perm
    x, gy = torch.randn(3, 36, generator=g), torch.randn(3, 40, generator=g)
    nnzb = col.numel()
    end = crow.clone()
    end[-1] += 2
    pbad = perm.clone()
    pbad[0] = nnzb
    pdup = perm.clone()  # (a duplicate: one block read twice, another never; a silently wrong dx before)
    pdup[1] = pdup[0]
    for call, msg in (
            (lambda: K.bsr_linear_forward(x, crow, col, vals[:1], None, 40), rf"values must have nnz = {nnzb} blocks, got 1"),
            (lambda: K.bsr_linear_forward(x, end, col, vals, None, 40),
             rf"crow_indices\[-1\] \({nnzb + 2}\) must equal col_indices.numel\(\) \({nnzb}\)"),
            (lambda: K.bsr_linear_forward(x[:, :20].contiguous(), crow, col, vals, None, 40), "x has 20 features, fewer"),
            (lambda: K.bsr_linear_forward(x[:, :34].contiguous(), crow, col, vals, None, 40, in_features=36),
             "x must have last dimension in_features = 36"),
            (lambda: K.bsr_linear_forward(x, crow, col, vals, None, 70), r"crow_indices has 3 block rows, but 70 features"),
            (lambda: K.bsr_linear_grad_input(gy, ccol, rt, perm, vals[:1], 36), rf"values must have nnz = {nnzb} blocks"),
            (lambda: K.bsr_linear_grad_input(gy, ccol, rt, perm[:2], vals, 36), rf"perm must have nnz = {nnzb} entries"),
            (lambda: K.bsr_linear_grad_input(gy, ccol, rt, pbad, vals, 36), rf"perm has entries outside \[0, {nnzb}\)"),
            (lambda: K.bsr_linear_grad_input(gy, ccol, rt, pdup, vals, 36), r"perm must be a permutation of \[0, nnz\)"),
            (lambda: K.bsr_linear_grad_input(gy[:, :30].contiguous(), ccol, rt, perm, vals, 36), "grad_out has 30 features"),
            (lambda: K.bsr_linear_grad_input(gy, ccol, rt, perm, vals, 60), r"ccol_indices has 3 block columns, but 60"),
            (lambda: K.bsr_linear_grad_weight(gy, x, crow, col, 32), r"crow_indices has 3 block rows, but 40 features in "
                                                                      r"blocks of 32 make 2"),
            (lambda: K.bsr_linear_grad_weight(gy, x, end, col, 16), r"crow_indices\[-1\] \(\d+\) must equal"),
            (lambda: K.bsr_linear_grad_weight(gy, x[:, :20].contiguous(), crow, col, 16), "x has 20 features, fewer"),
            (lambda: K.bsr_linear_grad_weight(gy, x, crow, col, 8), "block_size must be 16, 32 or 64, got 8"),
            (lambda: K.bsr_linear_grad_weight(gy.reshape(1, 3, 40), x.reshape(3, 1, 36), crow, col, 16),
             r"grad_out \(1, 3, 40\) and x \(3, 1, 36\) differ in batch"),
            (lambda: K.bsr_linear_grad_weight(gy[:1], x[0], crow, col, 16), r"grad_out \(1, 40\) and x \(36,\) differ"),
            # widths inside the last block row/column: exact when given (zeros read, or the padding's gradient)
            (lambda: K.bsr_linear_grad_input(gy[:, :34].contiguous(), ccol, rt, perm, vals, 36, out_features=40),
             r"grad_out must have last dimension out_features = 40, got shape \(3, 34\)"),
            (lambda: K.bsr_linear_grad_weight(gy, x[:, :34].contiguous(), crow, col, 16, in_features=36),
             r"x must have last dimension in_features = 36, got shape \(3, 34\)"),
            (lambda: K.bsr_linear_grad_weight(torch.randn(3, 44), x, crow, col, 16, in_features=36, out_features=40),
             r"grad_out must have last dimension out_features = 40, got shape \(3, 44\)"),
            (lambda: K.bsr_linear_forward(x, crow[:1], col[:0], vals[:0], None, -1), "out_features must be a non-negative"
                                                                                   " int, got -1")):
        with pytest.raises(ValueError, match=msg):
            call()
    for call, msg in ((lambda: K.bsr_linear_forward(x, crow, col, vals, None, 40.0), "out_features must be a non-negative "
                                                                                     "int, got 40.0"),
                      (lambda: K.bsr_linear_grad_input(gy, ccol, rt, perm, vals, 36.0), "in_features must be a"),
                      (lambda: K.bsr_linear_forward(x, crow, col, vals, None, 40, in_features=36.0), "in_features must"),
                      (lambda: K.bsr_linear_grad_weight(gy, x, crow, col, 16, out_features="40"), "out_features must"),
                      # (a float or bool block size: a ValueError before 2026-12-06, BSR's check_block a TypeError)
                      (lambda: K.bsr_linear_grad_weight(gy, x, crow, col, 16.0), "block_size must be 16, 32 or 64, got 16.0"),
                      (lambda: K.bsr_linear_grad_weight(gy, x, crow, col, True), "block_size must be 16, 32 or 64, got True")):
        with pytest.raises(TypeError, match=msg):  # (a float width failed inside torch.empty)
            call()
    import numpy as np  # a numpy int block size is the int (it reached Triton as BS and failed there)
    torch.testing.assert_close(K.bsr_linear_grad_weight(gy, x, crow, col, np.int64(16)),
                               BSR.from_dense(gy.t() @ x, 16, W.mask()).values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(K.bsr_linear_grad_weight(gy, x, crow, col, 16, in_features=36, out_features=40),
                               BSR.from_dense(gy.t() @ x, 16, W.mask()).values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(K.bsr_linear_grad_input(gy, ccol, rt, perm, vals, 36, out_features=40), gy @ w,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(K.bsr_linear_forward(x, crow, col, vals, None, 40, in_features=36), x @ w.t(),
                               rtol=1e-4, atol=1e-4)


def check_amp(layer, dense, mask, ref_fn, x, dtype, **kw):
    """`layer` (fp32 values) under torch.autocast(dtype) on the Triton kernels: the output has the
    autocast dtype, the gradients of the fp32 values and input are fp32 and match the dense masked
    reference run in fp32 on the dtype-rounded input and output gradient (bf16 keeps 8 bits: the
    output and dx carry one rounding, rtol 1e-2; dW accumulates exact bf16 products in fp32)."""
    import sparsetrain
    x = x.requires_grad_(True)
    with sparsetrain.use_backend("triton"), torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype, y.dtype
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    with sparsetrain.use_backend("triton"):
        y.backward(gy)
    assert layer.weight.values.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ry, rdx, rdw, rdb = reference_grads(ref_fn, x.detach().to(dtype).float(), dense.weight, mask, dense.bias,
                                        gy.float(), **kw)
    for got, ref, rtol in ((y.float(), ry, 1e-2), (x.grad, rdx, 1e-2), (layer.weight.values.grad, rdw[mask], 1e-4)):
        scale = float(ref.abs().max().clamp_min(1e-3)) if ref.numel() else 1.0  # (100% sparse: no values)
        torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * scale)
    if dense.bias is not None:
        torch.testing.assert_close(layer.bias.grad, rdb, rtol=1e-4, atol=1e-3)


@interp
def mixed_precision_bf16_fp16_through_the_layers():
    """--amp on the Triton kernels: bf16/fp16 activations, fp32 values and accumulation."""
    from sparsetrain.nn import SparseConv2d, SparseLinear
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float16):
        for fin, fout, batch, sparsity, bias in ((37, 11, (5,), 0.9, True), (1, 3, (1,), 0.0, False),
                                                 (64, 16, (2, 3), 1.0, True)):
            lin = torch.nn.Linear(fin, fout, bias=bias)
            mask = random_mask((fout, fin), sparsity, generator=g)
            check_amp(SparseLinear.from_dense(lin, mask), lin, mask, dense_linear,
                      torch.randn(*batch, fin, generator=g), dtype)
        for cin, cout, hw, k, stride, pad, sparsity in ((3, 5, (7, 6), 3, 1, 1, 0.5), (4, 3, (5, 5), 1, 2, 0, 0.8),
                                                        (2, 2, (1, 1), 3, 1, 1, 0.0)):
            conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad)
            mask = random_mask(conv.weight.shape, sparsity, generator=g)
            check_amp(SparseConv2d.from_dense(conv, mask), conv, mask, dense_conv2d,
                      torch.randn(2, cin, *hw, generator=g), dtype, stride=stride, padding=pad)


# ============================================================================ in-process: backend switch
def test_use_backend_plain_call_and_context_manager():
    import sparsetrain
    from sparsetrain.engine.backend import current_backend
    assert current_backend() == "auto"
    with sparsetrain.use_backend("cpu"):
        with sparsetrain.use_backend("triton"):
            assert current_backend() == "triton"
        assert current_backend() == "cpu"
    with pytest.raises(KeyError), sparsetrain.use_backend("triton"):
        raise KeyError("restored on error too")
    assert current_backend() == "auto"
    sparsetrain.use_backend("cpu")  # plain call: stays set
    mode, _ = current_backend(), sparsetrain.use_backend("auto")
    assert mode == "cpu"
    with pytest.raises(ValueError, match="backend must be one of"):
        sparsetrain.use_backend("gpu")
    assert current_backend() == "auto"


def test_op_table_registration():
    """Every schema has its row; rows with a Triton function registered it as the CUDA kernel and
    name a function that exists with the schema's arguments; forward rows carry autograd."""
    import importlib.util

    from sparsetrain.engine import ops
    schemas = {op.name.split("::")[1] for op in torch._C._jit_get_all_schemas() if op.name.startswith("sparsetrain::")}
    assert schemas == set(ops.OPS), schemas ^ set(ops.OPS)
    for name, op in ops.OPS.items():
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(op.qualname, "CUDA")
        assert has_cuda == (op.triton is not None), name
        if op.triton:
            module, fn = op.triton.split(".")
            with open(importlib.util.find_spec(f"sparsetrain.kernels.{module}").origin) as f:
                assert f"\ndef {fn}(" in f.read(), op.triton  # (read, not imported: see the module docstring)
        assert (op.backward is not None) == (name in ("sparse_linear", "sparse_conv2d", "max_pool2x2")), name


def test_triton_on_cpu_tensors_needs_the_interpreter():
    import sparsetrain
    from sparsetrain.kernels import _utils
    from sparsetrain.nn import SparseLinear
    expect = contextlib.nullcontext() if _utils.INTERPRET else pytest.raises(ValueError, match="TRITON_INTERPRET=1")
    with sparsetrain.use_backend("triton"), expect:  # (if this process interprets, it simply runs)
        SparseLinear.from_dense(torch.nn.Linear(5, 3))(torch.randn(2, 5))


# ============================================================================ in-process: BSR format
@pytest.mark.parametrize("shape,block", [((37, 50), 16), ((40, 70), 32), ((70, 65), 64), ((8, 3, 3, 3), 16)])
def test_bsr_round_trip_and_block_mask(shape, block):
    from sparsetrain.engine.bsr import BSR
    from sparsetrain.prune import block_mask
    g = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=g)
    W = BSR.from_dense(w, block, m := block_mask(w, block, 0.5))
    assert torch.equal(W.to_dense(), w * m) and torch.equal(W.mask(), m)
    assert W.nnz == int(m.sum()) and W.values.shape[1:] == (block, block)
    nblocks = -(-shape[0] // block) * -(-w[0].numel() // block)
    assert W.nnz_blocks == nblocks - round(0.5 * nblocks)
    dense = BSR.from_dense(w, block)  # mask None: every block with a nonzero
    assert torch.equal(dense.to_dense(), w) and dense.nnz_blocks == nblocks


def test_block_mask_prunes_smallest_norms_and_only_shrinks():
    from sparsetrain.prune import block_mask
    w = torch.ones(32, 48)
    for i in range(2):
        for j in range(3):
            w[16 * i:16 * (i + 1), 16 * j:16 * (j + 1)] *= 1 + 3 * i + j  # block norms all distinct
    m = block_mask(w, 16, 0.5)
    assert torch.equal(m[:16].all(), torch.tensor(False)) and bool(m[16:].all())
    assert bool(block_mask(w, 16, 0.0).all()) and not bool(block_mask(w, 16, 1.0).any())
    assert torch.equal(block_mask(w * 0 + 100, 16, 0.5, mask=m), m)  # already-pruned blocks go first


def test_bsr_tf32_follows_every_pytorch_switch():
    """The BSR kernels use TF32 for fp32 exactly when PyTorch's fp32 CUDA matmuls may: the matmul
    fp32_precision, the backends-wide one when it is "none", set_float32_matmul_precision."""
    from sparsetrain.kernels.bsr_matmul import _precision
    matmul, saved = torch.backends.cuda.matmul, (torch.backends.cuda.matmul.fp32_precision, torch.backends.fp32_precision)
    try:
        for precision, overall, expected in (("tf32", "none", "tf32"), ("ieee", "tf32", "ieee"), ("none", "tf32", "tf32"),
                                             ("none", "ieee", "ieee"), ("none", "none", "ieee")):
            matmul.fp32_precision, torch.backends.fp32_precision = precision, overall
            assert _precision(torch.float32) == expected, (precision, overall)
            assert _precision(torch.bfloat16) == _precision(torch.float16) == "tf32"  # (Triton's default for halves)
        matmul.fp32_precision = torch.backends.fp32_precision = "none"
        torch.set_float32_matmul_precision("high")
        assert _precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert _precision(torch.float32) == "ieee"
    finally:
        matmul.fp32_precision, torch.backends.fp32_precision = saved


def test_bsr_grad_weight_autotune_key_buckets_the_block_count(monkeypatch):
    """The BSR weight-gradient kernel's autotune key (what triton.autotune would key on, from the args the
    launch passes) is the same for two masks of one layer in the same density bucket: it keyed on the exact
    block count before, a fresh autotune every pruning round on a GPU. A denser bucket or batch re-keys."""
    import sparsetrain.kernels.bsr_matmul as KB
    from sparsetrain.kernels import _utils
    tuner = KB._bsr_sddmm_kernel  # (compiled mode in this process: the triton.autotune Autotuner)
    keys = []

    def record(kernel, grid, *args, **meta):
        named = {**dict(zip(tuner.fn.arg_names, args)), **meta}
        keys.append(tuple(named[k] for k in tuner.keys))

    monkeypatch.setattr(KB, "launch", record)
    monkeypatch.setattr(_utils, "INTERPRET", True)  # (CPU tensors; launches recorded, not run)

    def grad_weight(per_row, batch=64, rows=8, bs=16):
        crow = torch.arange(rows + 1, dtype=torch.int64) * per_row
        col = torch.arange(per_row, dtype=torch.int32).repeat(rows)
        x, gy = torch.randn(batch, rows * bs), torch.randn(batch, rows * bs)
        KB.bsr_linear_grad_weight(gy, x, crow, col, bs, split=1)

    for per_row, batch in ((5, 64), (6, 64), (7, 64), (2, 64), (6, 300)):
        grad_weight(per_row, batch)
    assert keys[0] == keys[1] == keys[2]  # 40, 48, 56 of 64 blocks: one tuning
    assert keys[3] != keys[0] and keys[4] != keys[1]  # (16 blocks; a batch of 300)


def test_conv_grids_fit_cuda_s_grid_limits_with_many_channels(monkeypatch):
    """The conv forward and input gradient put channels on CUDA grid axis 1 (65,535 programs at most): 70,000
    output (input) channels failed at launch on a GPU. Every config's grid, from the launches recorded (not run),
    keeps axes 1 and 2 within 65,535 and axis 0 within 2^31 - 1, and still has a program per tile and channel."""
    import sparsetrain.kernels.sparse_conv2d as KC
    from sparsetrain.engine.formats import CSR
    from sparsetrain.kernels import _utils
    grids = []
    monkeypatch.setattr(_utils, "INTERPRET", True)  # (CPU tensors; launches recorded, not run)
    monkeypatch.setattr(KC, "launch", lambda kernel, grid, *args, **meta: grids.append((kernel, grid, args)))
    n, geo = 70_000, ((1, 1), (1, 1), (0, 0))
    for shape in ((n, 1, 1, 1), (1, n, 1, 1)):  # (the forward's many outputs, the input gradient's many inputs)
        w = CSR.from_dense(torch.randn(shape))
        crow, col, vals, ccol, row_t, perm = (t.detach() for t in w.index())
        x = torch.randn(2, shape[1], 3, 3)
        if shape[0] == n:
            KC.conv2d_forward(x, crow, col, vals, *geo)
        else:
            KC.conv2d_grad_input(torch.randn(2, 1, 3, 3), ccol, row_t, perm, vals, (3, 3), *geo)
    assert [g[0] for g in grids] == [KC._conv_fwd_kernel, KC._conv_dgrad_kernel]
    for kernel, grid, args in grids:
        for cfg in kernel.configs:
            dims = grid(cfg.kwargs)
            assert dims[0] <= 2**31 - 1 and all(d <= 65_535 for d in dims[1:]), (kernel.fn.__name__, dims)
            assert math.prod(dims) == -(-2 * 9 // cfg.kwargs["BLOCK_S"]) * n, (kernel.fn.__name__, dims)


def test_weight_gradient_split_fits_cuda_s_second_grid_axis(monkeypatch):
    """The weight gradients' `split` slices are CUDA grid axis 1 (65,535 programs at most): a split of 65,536
    passed the check and failed at launch on a GPU; it is refused naming the limit, 65,535 still launches."""
    from sparsetrain.engine.bsr import BSR
    from sparsetrain.engine.formats import CSR
    from sparsetrain.kernels import _utils, bsr_matmul as KB, sparse_conv2d as KC, sparse_linear as KL
    grids = []
    monkeypatch.setattr(_utils, "INTERPRET", True)  # (CPU tensors; launches recorded, not run)
    for mod in (KB, KC, KL):
        monkeypatch.setattr(mod, "launch", lambda kernel, grid, *args, **meta: grids.append(grid({})))
    c, lin, wb = CSR.from_dense(torch.randn(3, 2, 3, 3)), CSR.from_dense(torch.randn(4, 6)), BSR.from_dense(
        torch.randn(20, 18), 16)
    calls = [lambda s: KC.conv2d_grad_weight(torch.randn(2, 3, 4, 5), torch.randn(2, 2, 4, 5), c.crow_indices,
                                             c.col_indices, (3, 3), (1, 1), (1, 1), split=s),
             lambda s: KL.csr_sddmm(lin.crow_indices, lin.col_indices, torch.randn(4, 5), torch.randn(6, 5), split=s),
             lambda s: KB.bsr_linear_grad_weight(torch.randn(3, 20), torch.randn(3, 18), wb.crow_indices,
                                                 wb.col_indices, 16, split=s)]
    for call in calls:
        with pytest.raises(ValueError, match=r"split must be at most 65535 \(CUDA's second grid axis\), got 65536"):
            call(65_536)
        call(65_535)
        assert grids.pop()[1] == 65_535 and not grids


def test_launch_runs_on_the_device_of_its_cuda_tensors(monkeypatch):
    """Triton launches on the current CUDA device: `launch` makes it the device of the first CUDA
    tensor argument (tensors on cuda:1 while cuda:0 is current), and leaves CPU launches alone."""
    from sparsetrain.kernels import _utils
    entered = []

    class Device:  # stands in for torch.cuda.device (no GPU here)
        def __init__(self, dev):
            self.dev = dev

        def __enter__(self):
            entered.append(self.dev)

        def __exit__(self, *exc):
            entered.append("exit")

    class OnCuda1(torch.Tensor):
        is_cuda = True
        device = torch.device("cuda", 1)

    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append((list(entered), meta))

    monkeypatch.setattr(torch.cuda, "device", Device)
    x = torch.Tensor._make_subclass(OnCuda1, torch.zeros(2))
    _utils.launch(Kernel(), (1,), 3, x, BLOCK=4)
    assert launched == [([torch.device("cuda", 1)], {"BLOCK": 4})] and entered[-1] == "exit"
    _utils.launch(Kernel(), (1,), torch.zeros(2), 3)
    assert len(entered) == 2 and launched[-1] == ([torch.device("cuda", 1), "exit"], {})  # (no device switch)
    # under torch.use_deterministic_algorithms, as PyTorch's nondeterministic CUDA ops: an error (warn_only:
    # a warning); the interpreter's CPU launches (one fixed tiling, atomics in program order) go on
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="sparsetrain's Triton .* does not have a deterministic implementation"):
            _utils.launch(Kernel(), (1,), x)
        _utils.launch(Kernel(), (1,), torch.zeros(2))
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
            _utils.launch(Kernel(), (1,), x)
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    assert len(launched) == 4


def test_bsr_errors():
    from sparsetrain.engine.bsr import BSR
    from sparsetrain.prune import block_mask
    w = torch.randn(32, 32)
    with pytest.raises(ValueError, match="block-structured"):
        BSR.from_dense(w, 16, torch.rand(32, 32) > 0.5)
    with pytest.raises(ValueError, match="block_size must be one of"):
        BSR.from_dense(w, 8)
    with pytest.raises(ValueError, match="sparsity"):
        block_mask(w, 16, 1.5)


def test_bsr_wrappers_refuse_an_index_on_another_device():
    """The BSR wrappers check the block index's device with the activations' (the CSR and conv wrappers
    did): a meta index failed inside torch when its bounds were read, and on a GPU a CPU index reached
    the kernel."""
    import sparsetrain.kernels.bsr_matmul as K
    from sparsetrain.engine.bsr import BSR
    from sparsetrain.prune import block_mask
    w = torch.randn(37, 40)
    W = BSR.from_dense(w, 16, block_mask(w, 16, 0.3))
    crow, col, v = W.crow_indices, W.col_indices, W.values.detach()
    ccol, rt, perm = W.ccol_indices, W.row_indices_t, W.perm
    x, gy, meta = torch.randn(6, 40), torch.randn(6, 37), (lambda t: t.to("meta"))
    for name, call in (("bsr_linear_forward", lambda: K.bsr_linear_forward(x, meta(crow), col, v, None, 37)),
                       ("bsr_linear_forward", lambda: K.bsr_linear_forward(x, crow, meta(col), v, None, 37)),
                       ("bsr_linear_grad_input", lambda: K.bsr_linear_grad_input(gy, meta(ccol), rt, perm, v, 40)),
                       ("bsr_linear_grad_input", lambda: K.bsr_linear_grad_input(gy, ccol, meta(rt), perm, v, 40)),
                       ("bsr_linear_grad_input", lambda: K.bsr_linear_grad_input(gy, ccol, rt, meta(perm), v, 40)),
                       ("bsr_linear_grad_weight", lambda: K.bsr_linear_grad_weight(gy, x, meta(crow), col, 16)),
                       ("bsr_linear_grad_weight", lambda: K.bsr_linear_grad_weight(gy, x, crow, meta(col), 16))):
        with pytest.raises(ValueError, match=f"{name}: all tensors must be on one device, got cpu and meta"):
            call()


def test_a_transposed_index_on_another_device_is_named_by_its_caller():
    """check_transposed's device error said "sparse_conv2d backward" whoever called it (sparse_linear_grad_input
    too); it names the caller given (the interpreter cases check the index itself and the public callers)."""
    from sparsetrain.engine.formats import CSR
    from sparsetrain.kernels._utils import check_transposed
    w = torch.randn(5, 6)
    c = CSR.from_dense(w, random_mask(w.shape, 0.5))
    for name in ("sparse_linear_grad_input", "sparse_conv2d_grad_input"):
        with pytest.raises(ValueError, match=f"^{name}: all tensors must be on one device, got cpu and meta"):
            check_transposed(c.ccol_indices, c.row_indices_t, c.perm, c.crow_indices.to("meta"), c.col_indices,
                             name=name)


def test_triton_wrappers_refuse_a_bias_or_relu_counts_on_another_device():
    """The CSR linear and conv wrappers check the device of the bias the kernel reads and of the relu_counts
    it adds into (a meta one failed inside torch, and on a GPU a CPU or other-GPU one reached the kernel), and
    sparse_linear that of the transposed index it reads the bounds of (a meta one failed inside torch)."""
    import sparsetrain.kernels.sparse_conv2d as KC
    import sparsetrain.kernels.sparse_linear as KL
    from sparsetrain.engine.formats import CSR
    g = torch.Generator().manual_seed(3)
    w, wc = torch.randn(7, 9, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    c = CSR.from_dense(w, random_mask(w.shape, 0.5, generator=g))
    cc = CSR.from_dense(wc, random_mask(wc.shape, 0.5, generator=g))
    idx = (c.crow_indices, c.col_indices, c.values.detach(), c.ccol_indices, c.row_indices_t, c.perm)
    cidx = (cc.crow_indices, cc.col_indices, cc.values.detach(), cc.ccol_indices, cc.row_indices_t, cc.perm)
    x, xc, geo = torch.randn(3, 9, generator=g), torch.randn(1, 2, 5, 5, generator=g), ([3, 3], [1, 1], [1, 1])
    meta = torch.zeros(4, device="meta")
    for name, call in (("sparse_linear", lambda: KL.sparse_linear(x, *idx, torch.zeros(7, device="meta"))),
                       *(("sparse_linear", lambda i=i: KL.sparse_linear(x, *idx[:i], idx[i].to("meta"), *idx[i + 1:]))
                         for i in (3, 4, 5)),  # (the transposed index, whose bounds it reads)
                       ("sparse_conv2d", lambda: KC.sparse_conv2d(xc, *cidx, *geo, meta)),
                       ("sparse_conv2d", lambda: KC.sparse_conv2d_stats(xc, *cidx, *geo, meta, False)),
                       ("sparse_conv2d_stats", lambda: KC.sparse_conv2d_stats(
                           xc, *cidx, *geo, None, True, relu_counts=torch.zeros(100, dtype=torch.int64, device="meta")))):
        with pytest.raises(ValueError, match=f"{name}: all tensors must be on one device, got cpu and meta"):
            call()


def test_triton_bn_scale_shift_refuses_a_count_or_eps_of_another_type():
    """kernels.bn_act.bn_scale_shift (called directly, or under use_backend("triton") with the BN's attributes as
    they are) took count=True as 1 and 2.5 as a divisor, silently, where the op's schema wants an int; a str
    eps or momentum failed inside a comparison or `1 - m`. Each is a TypeError naming it, before any buffer
    is written; a numpy int count is the same count (compared with the C++ op)."""
    import numpy as np
    import sparsetrain.engine.ops  # noqa: F401  (registers the C++ op)
    import sparsetrain.kernels.bn_act as KB
    from test_bn_scale_shift import bad_calls, refuses_untouched
    args, _ = bad_calls()
    cases = [({1: True}, r"count must be an int \(values per channel\), got True", TypeError),
             ({1: 32.0}, r"count must be an int \(values per channel\), got 32.0", TypeError),
             ({8: "1e-5"}, "eps must be a float, got '1e-5'", TypeError),
             ({8: None}, "eps must be a float, got None", TypeError),
             ({7: "0.1"}, "momentum must be a float or None, got '0.1'", TypeError),
             ({7: True}, "momentum must be a float or None, got True", TypeError)]
    refuses_untouched(KB.bn_scale_shift, args, cases)
    bufs = [tuple(t.clone() for t in args[4:7]) for _ in "ab"]
    got = KB.bn_scale_shift(args[0], np.int64(args[1]), *args[2:4], *bufs[0], *args[7:])
    ref = torch.ops.sparsetrain.bn_scale_shift(*args[:4], *bufs[1], *args[7:])
    for g, r in zip(got + bufs[0], ref + bufs[1]):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


def test_bsr_arguments_refused_with_their_names():
    import numpy as np
    from sparsetrain.engine.bsr import BSR, BSRLinear, bsr_linear
    from sparsetrain.prune import block_mask
    blocks = torch.ones(1, 16, 16)
    with pytest.raises(TypeError, match="crow_indices must be int32 or int64"):
        BSR(torch.tensor([0.0, 1.0]), torch.tensor([0]), blocks, (16, 16), 16)
    with pytest.raises(TypeError, match="col_indices must be int32 or int64"):
        BSR(torch.tensor([0, 1]), torch.tensor([0.9]), blocks, (16, 16), 16)
    with pytest.raises(TypeError, match="must be torch.Tensors"):
        BSR([0, 1], [0], blocks, (16, 16), 16)
    with pytest.raises(ValueError, match="non-negative dims"):
        BSR(torch.tensor([0, 0]), torch.tensor([], dtype=torch.int64), blocks[:0], (-5, 24), 16)
    with pytest.raises(ValueError, match="on one device"):
        BSR(torch.tensor([0, 1]), torch.tensor([0]), blocks.to("meta"), (16, 16), 16)
    with pytest.raises(ValueError, match=r"values of shape \[nnz, block, block\]"):
        BSR(torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1, 16, 8), (16, 16), 16)
    lin = torch.nn.Linear(40, 24)
    W = BSR.from_dense(lin.weight, 16, block_mask(lin.weight, 16, 0.5))
    with pytest.raises(TypeError, match="bias must have the weight's dtype"):
        BSRLinear(W, torch.zeros(24, dtype=torch.float64))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        BSRLinear.from_dense(torch.nn.Conv2d(3, 3, 3), 16)
    with pytest.raises(TypeError, match="weight must be a floating-point"):
        BSR.from_dense(torch.ones(16, 16, dtype=torch.int64), 16)
    x = torch.randn(3, 40)
    for bad, err, msg in ((x.double(), TypeError, "x must have the weight's dtype"),
                          (torch.tensor(1.0), ValueError, "x must have last dimension in_features = 40"),
                          ([1.0] * 40, TypeError, "x must be a torch.Tensor")):
        with pytest.raises(err, match=msg):
            bsr_linear(bad, W)
    with pytest.raises(TypeError, match="weight must be a 2-D sparsetrain BSR"):
        bsr_linear(x, lin.weight)
    for bad in (torch.zeros(1), torch.zeros(2, 24)):
        with pytest.raises(ValueError, match=r"bias must have shape \(24,\)"):
            bsr_linear(x, W, bad)
    with pytest.raises(ValueError, match="NaN"):
        block_mask(torch.full((16, 16), float("nan")), 16, 0.5)
    assert torch.equal(block_mask(lin.weight, 16, np.float32(0.5)), block_mask(lin.weight, 16, 0.5))
    for shape in ((0, 24), (24, 0)):  # layers without features: no blocks
        assert BSR.from_dense(torch.randn(shape), 16).nnz_blocks == 0
        assert block_mask(torch.randn(shape), 16, 0.5).shape == shape


def test_bsr_state_dict_resizes_checks_and_rebuilds_the_transposed_index():
    from sparsetrain.engine.bsr import BSR, BSRLinear
    from sparsetrain.engine.formats import transpose_index
    from sparsetrain.prune import block_mask
    torch.manual_seed(0)
    a, b = torch.nn.Linear(48, 40), torch.nn.Linear(48, 40)
    layer = BSRLinear.from_dense(a, 16, block_mask(a.weight, 16, 0.5))
    src = BSRLinear.from_dense(b, 16, block_mask(b.weight, 16, 0.25))
    values = layer.weight.values
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    sd = src.state_dict()
    assert not any(k.endswith(("ccol_indices", "row_indices_t", "perm")) for k in sd)  # (rebuilt, not saved)
    layer.load_state_dict({**sd, "weight.perm": torch.zeros(3)})  # (older checkpoints saved it: ignored)
    assert layer.weight.values is values and values.shape == src.weight.values.shape  # resized in place
    assert torch.equal(layer.weight.to_dense(), src.weight.to_dense())
    for got, want in zip((layer.weight.ccol_indices, layer.weight.row_indices_t, layer.weight.perm),
                         transpose_index(src.weight.crow_indices, src.weight.col_indices, 3)):
        assert torch.equal(got, want)
    layer(torch.randn(2, 48)).sum().backward()
    opt.step()  # the optimizer still holds the layer's values
    assert not torch.equal(layer.weight.to_dense(), src.weight.to_dense())
    bad = dict(sd, **{"weight.col_indices": torch.full_like(sd["weight.col_indices"], 3)})
    with pytest.raises(RuntimeError, match=r"BSR pattern at weight does not fit.*col_indices must lie in \[0, 3\)"):
        layer.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="BSR at weight needs all of"):
        layer.load_state_dict({k: v for k, v in sd.items() if k != "weight.values"}, strict=False)
    assert isinstance(layer.weight, BSR)


def test_bsr_linear_cpu_fallback_and_module():
    import sparsetrain
    from sparsetrain.engine.bsr import BSRLinear
    from sparsetrain.prune import block_mask
    with sparsetrain.use_backend("cpu"):
        check_bsr((6,), 40, 24, 16, 0.5, True)
    lin, x = torch.nn.Linear(40, 24), torch.randn(3, 40)
    layer = BSRLinear.from_dense(lin, 16, m := block_mask(lin.weight, 16, 0.5))
    torch.testing.assert_close(layer(x), dense_linear(x, lin.weight, m, lin.bias))
    torch.testing.assert_close(layer.to_dense().weight, lin.weight * m)
    model = torch.nn.Sequential(layer.eval())  # densify_ takes block-sparse layers back too
    sparsetrain.densify_(model)
    assert type(model[0]) is torch.nn.Linear and not model[0].training
    torch.testing.assert_close(model[0](x), dense_linear(x, lin.weight, m, lin.bias))


# ============================================================================ real GPU
_skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the Triton kernels are "
                           "checked under TRITON_INTERPRET=1 above instead")


def cuda(f):
    return pytest.mark.cuda(_skip(f))


@pytest.fixture
def no_tf32():
    """True-fp32 references (cuDNN convs default to TF32); our BSR kernels follow the same flag."""
    with tf32(False):
        yield


@cuda
@pytest.mark.parametrize("batch,fin,fout,sparsity", [((2048,), 4608, 512, 0.9), ((2048,), 4608, 512, 0.99),
                                                     ((128,), 784, 300, 0.9), ((902,), 3072, 768, 0.999)])
def test_cuda_sparse_linear(batch, fin, fout, sparsity, no_tf32):
    check_linear(batch, fin, fout, sparsity, True, empty_rows=3, device="cuda")


@cuda
@pytest.mark.parametrize("block", [16, 32, 64])
def test_cuda_bsr_linear(block, no_tf32):
    check_bsr((512,), 1000, 1030, block, 0.9, True, device="cuda")


@cuda
@pytest.mark.parametrize("cin,cout,hw,k,stride,pad,sparsity", [(64, 64, (32, 32), 3, 1, 1, 0.9),
                                                              (64, 128, (32, 32), 3, 2, 1, 0.99),
                                                              (128, 256, (16, 16), 1, 2, 0, 0.9)])
def test_cuda_sparse_conv2d(cin, cout, hw, k, stride, pad, sparsity, no_tf32):
    check_conv(8, cin, cout, hw, k, stride, pad, sparsity, True, device="cuda")


@cuda
def test_cpu_backend_refuses_cuda_tensors():
    import sparsetrain
    from sparsetrain.engine.bsr import BSRLinear
    from sparsetrain.nn import SparseLinear
    lin = torch.nn.Linear(32, 16)
    for layer in (SparseLinear.from_dense(lin).cuda(), BSRLinear.from_dense(lin, 16).cuda()):
        with sparsetrain.use_backend("cpu"), pytest.raises(ValueError, match="backend 'cpu'.*cannot take CUDA"):
            layer(torch.randn(2, 32, device="cuda"))


@cuda
def test_cuda_sparse_conv2d_op_autograd(no_tf32):
    check_conv_op("cuda", shape=(8, 64, 32, 32), cout=128, stride=2, sparsity=0.9)


@cuda
def test_cuda_backend_cpu_refuses_cuda_tensors():
    import sparsetrain
    from sparsetrain.nn import SparseLinear
    with sparsetrain.use_backend("cpu"), pytest.raises(ValueError, match="backend 'cpu'"):
        SparseLinear.from_dense(torch.nn.Linear(8, 4)).cuda()(torch.randn(2, 8, device="cuda"))


# ============================================================================ the subprocess
_STARTED = {}  # {test file: (its interpreter subprocess, its folder)} started and not yet waited for


def _start(test_file: str) -> None:
    tmp = tempfile.mkdtemp()
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    with open(os.path.join(tmp, "stdout"), "w") as out, open(os.path.join(tmp, "stderr"), "w") as err:
        proc = subprocess.Popen([sys.executable, test_file, os.path.join(tmp, "results.json")], env=env,
                                stdout=out, stderr=err)
    _STARTED[test_file] = proc, tmp


def _end_started() -> None:  # (a session stopped before it waited for one, -x: none left running)
    while _STARTED:
        proc, tmp = _STARTED.popitem()[1]
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def interpreter_results(test_file: str, session=None) -> dict:
    """Run `test_file`'s @interp cases in one fresh TRITON_INTERPRET=1 subprocess (its __main__
    calls run_cases): {case: "ok" or the traceback}. The first file asked starts every selected
    file's at once (`session`'s items): each runs the interpreter on one core for 15-30 s, side by
    side on 2 cores (one after the other, test_triton_fused.py's then this file's, ~45 s)."""
    test_file = os.path.realpath(test_file)
    if test_file not in _STARTED:
        files = {os.path.realpath(str(item.path)) for item in getattr(session, "items", ())
                 if "interp_results" in getattr(item, "fixturenames", ())} | {test_file}
        for f in sorted(files - set(_STARTED)):
            _start(f)
        if session is not None:
            session.config.add_cleanup(_end_started)
    proc, tmp = _STARTED.pop(test_file)
    try:
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out = os.path.join(tmp, "results.json")
        if not os.path.exists(out):
            said = [open(os.path.join(tmp, s)).read() for s in ("stdout", "stderr")]
            pytest.fail(f"interpreter subprocess died (rc {proc.returncode}):\n{said[0]}\n{said[1]}")
        with open(out) as f:
            return json.load(f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def interpreter_suite(cases: dict, test_file: str):
    """(module fixture, test) for a test file's @interp `cases`: one subprocess runs them all, each
    case is its own test item (failing with the subprocess's traceback)."""
    @pytest.fixture(scope="module")
    def interp_results(request):
        return interpreter_results(test_file, request.session)

    @pytest.mark.parametrize("case", sorted(cases))
    def test_triton_interpreter(case, interp_results):
        result = interp_results.get(case, "not run")
        if result != "ok":
            pytest.fail(f"{case} under TRITON_INTERPRET=1:\n{result}")

    return interp_results, test_triton_interpreter


interp_results, test_triton_interpreter = interpreter_suite(CASES, os.path.abspath(__file__))


def run_cases(cases: dict, out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.manual_seed(0)
    results = {}
    for name, fn in cases.items():  # report every case, not just the first failure
        try:
            results[name] = fn() or "ok"
        except Exception:
            results[name] = traceback.format_exc()
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    run_cases(CASES, sys.argv[1])


# ============================================================================ Triton in the loop
_LOOP = r"""
import json, sys
import sparsetrain
from sparsetrain.experiment import study
with sparsetrain.use_backend(sys.argv[1]):
    rc = study.main(json.loads(sys.argv[2]))
print("RC", rc)
"""


@pytest.mark.slow
def test_study_rounds_on_the_triton_kernels(tmp_path):
    """A tiny study (train, prune, entropy, evaluation, distillation) with every sparse product on
    the Triton kernels (interpreter, CPU tensors) follows the same study on the C++ kernels.
    `make test-slow`: the interpreter runs LeNet-300-100's dense first round program by program
    (minutes). It found the Triton linear output being a view (in-place ReLU failed)."""
    from sparsetrain.testing import write_mnist
    write_mnist(tmp_path / "data" / "mnist", gz=False, n_train=20, n_test=8)
    base = ["mnist", "--data-dir", str(tmp_path / "data"), "--profile", "quick", "--subset", "0", "--epochs", "1",
            "--rate", "0.5", "--wall", "0.8", "--batch-size", "32", "--threads", "1", "--engine", "sparse",
            "--teachers", "dense", "--student", "lenet300"]
    rows = {}
    for backend in ("cpu", "triton"):
        out = tmp_path / backend
        env = {**os.environ, "TRITON_INTERPRET": "1" if backend == "triton" else "0"}
        res = subprocess.run([sys.executable, "-c", _LOOP, backend, json.dumps(base + ["--out", str(out)])],
                             env=env, capture_output=True, text=True, timeout=300)
        assert "RC 0" in res.stdout, res.stderr[-3000:]
        rd = next(out.iterdir())
        import csv
        with open(rd / "seed0" / "distill-dense" / "metrics.csv") as f:
            rows[backend] = list(csv.DictReader(f))
    assert len(rows["cpu"]) == len(rows["triton"]) == 3  # rounds 0..2: 0, 50, 75% (87.5% passes the wall)
    for a, b in zip(rows["cpu"], rows["triton"]):
        assert int(b["sparse_layers"]) == int(a["sparse_layers"]) and float(a["sparsity"]) == float(b["sparsity"])
        for key in ("train_loss", "val_loss", "entropy_mean"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-3, abs=1e-4), key
