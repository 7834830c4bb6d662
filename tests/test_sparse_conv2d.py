"""SparseConv2d and the sparse_conv2d ops against the dense masked reference (F.conv2d)."""
import copy
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsetrain
from sparsetrain.engine import ops
from sparsetrain.engine.formats import CSR
from sparsetrain.nn import SparseConv2d, SparseLinear
from sparsetrain.testing import assert_layer_matches, dense_conv2d, dense_linear, random_mask, zero_pruned_

SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]
# kernel x stride x padding x spatial (1x1, 5x7), where the padded input holds the kernel
GEOMETRIES = [(k, s, p, hw) for k in (1, 3, 7) for s in (1, 2) for p in (0, 1, 3) for hw in ((1, 1), (5, 7))
              if hw[0] + 2 * p >= k and hw[1] + 2 * p >= k]
# (in_channels, out_channels, batch, bias): every odd channel count, batch 1 and 4, bias on/off
CHANNELS = [(1, 3, 1, True), (3, 7, 4, False), (7, 1, 4, True), (7, 7, 1, False)]


def _check(cin, cout, batch, hw, k, s, p, sparsity, bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=bias).to(dtype)
    mask = random_mask(conv.weight.shape, sparsity, generator=g)
    layer = SparseConv2d.from_dense(conv, mask)
    x = torch.randn(*([] if batch is None else [batch]), cin, *hw, generator=g, dtype=dtype, requires_grad=True)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    assert_layer_matches(layer, conv, mask, dense_conv2d, x, g, tol, stride=s, padding=p)


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("k,s,p,hw", GEOMETRIES)
def test_matches_dense_masked(k, s, p, hw, sparsity):
    for i, (cin, cout, batch, bias) in enumerate(CHANNELS):
        _check(cin, cout, batch, hw, k, s, p, sparsity, bias, seed=i)


@pytest.mark.parametrize("k,s,p,sparsity", [(3, 1, 1, 0.5), (3, 2, 1, 0.9), (1, 2, 0, 0.0), (3, 1, 0, 1.0)])
def test_unbatched_input_as_nn_conv2d(k, s, p, sparsity):
    """A [channels, height, width] input (batch None), as nn.Conv2d and F.conv2d take it: the output
    and every gradient against F.conv2d's on the same unbatched input."""
    _check(5, 3, None, (7, 6), k, s, p, sparsity, True)


@pytest.mark.parametrize("k,s,p", [((1, 3), (1, 2), (0, 1)), ((3, 1), (2, 1), (2, 0)), (5, 3, 2)])
def test_rectangular_kernels_strides_paddings(k, s, p):
    _check(5, 6, 3, (11, 8), k, s, p, 0.6, True)


@pytest.mark.parametrize("k,s,hw", [(3, 4096, (10, 10)), (1, (7, 3), (5, 5)), ((2, 3), (9, 100), (4, 4))])
def test_strides_past_the_last_kernel_position(k, s, hw):
    # one output row/column: the kernels clamp the stride there (phase planes would number sh * sw)
    _check(3, 4, 2, hw, k, s, 0, 0.5, True)


def test_padding_far_past_the_kernel_is_refused_not_an_abort():
    """Stride and padding 4096 on a 5x5 input (F.conv2d: a 3x3 output): the phase planes would
    number 4096^2, 1.8 GB a sample, and the per-thread scratch's bad_alloc in the parallel region
    aborted the process; refused by name (the layer and the op). A large but servable padding
    still matches the reference."""
    x = torch.randn(1, 3, 5, 5)
    for s, p in ((4096, 4096), (1024, 1024)):
        layer = SparseConv2d.from_dense(nn.Conv2d(3, 4, 3, stride=s, padding=p))
        with pytest.raises(ValueError, match=r"padding \({0}, {0}\) on a \(5, 5\) input: .* a padding this "
                           r"far past the kernel is not supported".format(p)):
            layer(x)
        with pytest.raises(ValueError, match="a padding this far past the kernel"):
            ops.sparse_conv2d(x, layer.weight, None, s, p)
    _check(3, 4, 1, (5, 5), 3, 256, 256, 0.5, True)


def test_many_tiles_chunks_and_threads():
    # large enough for several batch tiles (and a ragged last tile), and batch 1 with many
    # channels, where threads split the channels instead of the tiles; its rows (~260 nonzeros
    # over 96 channels) take the channel-blocked forward, in two channel blocks
    _check(24, 40, 37, (12, 10), 3, 2, 1, 0.8, True)
    _check(96, 64, 1, (9, 9), 3, 1, 1, 0.7, False)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _check(16, 8, 5, (6, 6), 3, 1, 1, 0.5, True)
    finally:
        torch.set_num_threads(n)


# Output planes are written with streaming stores where rows are 16-byte multiples (widths 4, 8,
# 12, 16, 32 in fp32, even widths in fp64; rows of 1, 2, 4 or 8 such chunks unrolled: widths 4, 8, 16, 32
# in fp32, 2, 4, 8, 16 in fp64, the rest a loop; empty rows' bias fill streams any plane between
# scalar head and tail), plain moves elsewhere; stride-2 inputs of even width are split into
# even/odd-column phases row by row (fixed widths 4, 8, 16 and a generic one), and their input
# gradient merged back. Sparsity 0.97 (8 of 270 weights) leaves rows and channels empty.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hw", [(8, 8), (9, 16), (5, 32), (7, 12), (7, 6), (6, 10)])
@pytest.mark.parametrize("k,s,p", [(3, 1, 1), (3, 2, 1), (1, 2, 0)])
def test_streamed_planes_and_stride2_rows(k, s, p, hw, dtype):
    for i, sparsity in enumerate((0.6, 0.97)):
        _check(5, 6, 3, hw, k, s, p, sparsity, True, dtype=dtype, seed=i)


# The batch-innermost kernel for small maps (<= 16 output pixels, batch >= 16): tiles of 16, 32,
# 64 and 128 samples, ragged last tiles, every border case of the valid-tap lists.
# (in, out, batch, spatial, kernel, stride, padding, sparsity, bias)
SMALL_MAPS = [
    (8, 6, 20, (4, 4), 3, 1, 1, 0.5, True),                  # 16-sample tiles, ragged 2nd
    (5, 7, 16, (2, 2), 3, 1, 1, 0.0, False),                 # 2x2: every pixel a corner
    (9, 4, 33, (1, 1), 3, 1, 1, 0.3, True),                  # 1x1: the centre tap only
    (6, 5, 40, (7, 7), 3, 2, 1, 0.6, False),                 # stride 2 -> 4x4
    (4, 3, 24, (5, 5), 3, 1, 0, 0.5, True),                  # no padding -> 3x3
    (3, 4, 70, (3, 5), (1, 3), (2, 1), (0, 1), 0.4, True),   # rectangular; 64-sample tiles
    (5, 5, 130, (4, 4), 3, 1, 1, 0.99, True),                # 64-sample tiles, ragged
    (5, 5, 18, (4, 4), 3, 1, 1, 1.0, True),                  # no nonzero: bias only
    (64, 32, 128, (2, 2), 3, 1, 1, 0.9, False),
    (7, 3, 19, (4, 3), 5, 1, 2, 0.5, True),                  # 5x5 kernel
    (130, 6, 40, (8, 8), 3, 2, 1, 0.9, True),                # 33 KB per sample: 32-sample tiles
    (300, 6, 40, (8, 8), 3, 2, 1, 0.9, True),                # 77 KB per sample: 16-sample tiles, ragged
]


def _small_tile(cin, cout, batch, hw, k, s, p, dtype=torch.float32):
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)
    return torch.ops.sparsetrain.sparse_conv2d_small_tile([batch, cin, *hw], cout, pair(k), pair(s),
                                                          pair(p), dtype)


@pytest.mark.parametrize("case", SMALL_MAPS, ids=lambda c: f"{c[0]}-{c[1]}-b{c[2]}-{c[3]}-k{c[4]}s{c[5]}p{c[6]}-{c[7]}")
def test_small_map_kernel_matches_dense_masked(case):
    cin, cout, batch, hw, k, s, p, sparsity, bias = case
    assert _small_tile(cin, cout, batch, hw, k, s, p) in (16, 32, 64)  # the small-map kernel serves it
    _check(*case)


# The strided 1x1 kernel (kernel 1x1, no padding, a stride above 1: the ResNets' downsample convs):
# tiles of whole samples (a ragged last one), bands of rows of one sample (a sample over its 128 KB
# tile: 1200 channels), odd sizes (the stride-2 expansion's last column past the row), strides
# (1, 2), (2, 1), 3 and past the map, batch 1, 0 and 100 %. Rows, columns and channels none reads.
POINTWISE = [
    (6, 5, 17, (8, 8), 1, 2, 0, 0.2, True),                  # the downsample: 9- and 8-sample tiles
    (5, 7, 3, (7, 9), 1, 2, 0, 0.5, False),                  # odd sizes: 4x5 output
    (4, 6, 5, (9, 8), 1, (1, 2), 0, 0.0, True),              # every row read
    (4, 6, 5, (9, 8), 1, (2, 1), 0, 0.7, True),              # every column read
    (3, 5, 2, (10, 11), 1, 3, 0, 0.5, True),
    (3, 4, 1, (3, 3), 1, 2, 0, 0.5, True),                   # batch 1: 2x2 output
    (2, 3, 4, (5, 5), 1, 7, 0, 0.3, True),                   # stride past the map: one pixel
    (1200, 8, 2, (33, 17), 1, 2, 0, 0.9, True),              # bands of 3 rows, a ragged last band
    (1200, 8, 3, (6, 6), 1, 2, 0, 0.9, False),               # one sample per tile
    (8, 8, 4, (6, 6), 1, 2, 0, 1.0, True),                   # no nonzero: bias only, dx zeros
]


@pytest.mark.parametrize("case", POINTWISE, ids=lambda c: f"{c[0]}-{c[1]}-b{c[2]}-{c[3]}-s{c[5]}-{c[7]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strided_1x1_kernel_matches_dense_masked(case, dtype):
    cin, cout, batch, hw, k, s, p, sparsity, bias = case
    assert _small_tile(cin, cout, batch, hw, k, s, p, dtype) == -1  # the strided 1x1 kernel serves it
    _check(*case, dtype=dtype)


def test_strided_1x1_kernel_one_thread_and_empty_rows():
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _check(6, 5, 17, (8, 8), 1, 2, 0, 0.5, True)
    finally:
        torch.set_num_threads(n)
    g = torch.Generator().manual_seed(5)  # rows and columns with no nonzero (empty_rows), and the
    conv = nn.Conv2d(9, 11, 1, stride=2, bias=True)  # backward's two products on their own
    mask = random_mask(conv.weight.shape, 0.6, generator=g, empty_rows=3)
    mask[:, 2] = False
    layer = SparseConv2d.from_dense(conv, mask)
    x = torch.randn(5, 9, 7, 6, generator=g, requires_grad=True)
    assert_layer_matches(layer, conv, mask, dense_conv2d, x, g, dict(rtol=1e-4, atol=1e-4), stride=2, padding=0)
    gy = torch.randn(5, 11, 4, 3, generator=g)
    idx = layer.weight.index()
    crow, col, values, ccol, row_t, perm = idx
    dx = torch.ops.sparsetrain.sparse_conv2d_grad_input(gy, ccol, row_t, perm, values, [7, 6], [1, 1], [2, 2], [0, 0])
    dv = torch.ops.sparsetrain.sparse_conv2d_grad_weight(gy, x.detach(), crow, col, [1, 1], [2, 2], [0, 0])
    dx2, dv2 = torch.ops.sparsetrain.sparse_conv2d_backward(gy, x.detach(), *idx, [1, 1], [2, 2], [0, 0])
    torch.testing.assert_close(dx, dx2, rtol=0, atol=0)
    torch.testing.assert_close(dv, dv2, rtol=0, atol=0)
    assert (dx[:, 2] == 0).all() and (dx[:, :, 1::2] == 0).all() and (dx[:, :, :, 1::2] == 0).all()


def test_small_map_kernel_float64_and_one_thread():
    assert _small_tile(6, 5, 20, (4, 4), 3, 2, 1, torch.float64) == 16
    _check(6, 5, 20, (4, 4), 3, 2, 1, 0.5, True, dtype=torch.float64)
    _check(6, 5, 20, (4, 4), 3, 1, 1, 0.5, True, dtype=torch.float64)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _check(8, 6, 40, (4, 4), 3, 1, 1, 0.7, True)
    finally:
        torch.set_num_threads(n)


# (in, out, batch, map, k, s, p, sparsity): phase planes (sparse rows; channel-blocked rows; stride 2),
# the small-map kernel, the strided 1x1 kernel; and the linear layer (batch, in, out, sparsity): tile
# widths 16 and 64, few read columns
THREAD_CONVS = [(5, 7, 3, (9, 9), 3, 1, 1, 0.5), (70, 64, 9, (6, 6), 3, 1, 1, 0.1), (3, 4, 5, (13, 13), 3, 2, 1, 0.9),
                (6, 8, 40, (4, 4), 3, 1, 1, 0.6), (6, 5, 17, (8, 8), 1, 2, 0, 0.2)]
THREAD_LINEARS = [(3, 7, 5, 0.5), (200, 300, 40, 0.9), (130, 1000, 10, 0.99)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_do_not_depend_on_the_thread_count(dtype):
    """y, dx and the ReLU counts are summed in one fixed order whatever the split over threads: bitwise
    equal at 1 and 2 threads. The reductions split over threads (dvalues, the BN statistics) are bitwise
    equal from run to run at one thread count (no race in the per-thread scratch or partial sums)."""
    g = torch.Generator().manual_seed(3)
    o = torch.ops.sparsetrain
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    n = torch.get_num_threads()

    def at(threads, fn):
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(n)

    assert [_small_tile(*c[:7], dtype) for c in THREAD_CONVS] == [0, 0, 0, 32, -1]  # (the kernels named above)
    for cin, cout, batch, hw, k, s, p, sparsity in THREAD_CONVS:
        w = torch.randn(cout, cin, k, k, generator=g, dtype=dtype)
        mask = random_mask(w.shape, sparsity, generator=g)
        idx = [t.detach() for t in CSR.from_dense(w, mask).index()]
        x = torch.randn(batch, cin, *hw, generator=g, dtype=dtype)
        b = torch.randn(cout, generator=g, dtype=dtype)
        geo = ([k, k], [s, s], [p, p])
        ref = torch.relu(dense_conv2d(x, w, mask, b, s, p))
        dy = torch.randn(ref.shape, generator=g, dtype=dtype)

        def fwd():
            counts = torch.zeros(ref[0].numel(), dtype=torch.int64)
            y, stats = o.sparse_conv2d_stats(x, *idx, *geo, b, True, relu_counts=counts)
            return y, counts, stats

        def bwd():
            return o.sparse_conv2d_backward(dy, x, *idx, *geo)

        (y1, c1, _), (y2, c2, st2), (_, _, st3) = at(1, fwd), at(2, fwd), at(2, fwd)
        (dx1, _), (dx2, dv2), (_, dv3) = at(1, bwd), at(2, bwd), at(2, bwd)
        torch.testing.assert_close(y2, ref, **tol)
        assert torch.equal(c2, (ref > 0).sum(0).flatten())
        for u, v in ((y1, y2), (c1, c2), (dx1, dx2), (st2, st3), (dv2, dv3)):
            assert torch.equal(u, v)
    for batch, fin, fout, sparsity in THREAD_LINEARS:
        w = torch.randn(fout, fin, generator=g, dtype=dtype)
        mask = random_mask(w.shape, sparsity, generator=g)
        idx = [t.detach() for t in CSR.from_dense(w, mask).index()]
        x = torch.randn(batch, fin, generator=g, dtype=dtype)
        dy = torch.randn(batch, fout, generator=g, dtype=dtype)
        fwd = lambda: o.sparse_linear(x, *idx, None)
        gi = lambda: o.sparse_linear_grad_input(dy, *idx)
        gw = lambda: o.sparse_linear_grad_weight(dy, x, idx[0], idx[1])
        torch.testing.assert_close(at(2, fwd), dense_linear(x, w, mask), **tol)
        assert torch.equal(at(1, fwd), at(2, fwd)) and torch.equal(at(1, gi), at(2, gi))
        assert torch.equal(at(2, gw), at(2, gw))


def test_the_cpu_ops_run_alike_under_deterministic_algorithms():
    """The C++ ops are deterministic at a given thread count, so torch.use_deterministic_algorithms(True) lets
    them run (as PyTorch's CPU reductions) and changes nothing: a fused conv -> BN -> ReLU and a sparse
    linear give bitwise the same output and gradients with it on as off, and the dense masked model's."""
    g = torch.Generator().manual_seed(5)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5))
    masks = {n: random_mask(m.weight.shape, 0.7, generator=g) for n, m in dense.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))}
    zero_pruned_(dense, masks)
    model = sparsetrain.sparsify_(copy.deepcopy(dense), masks, fuse=True)
    assert type(model[0]).__name__ == "SparseConvBNReLU"
    x = torch.randn(4, 3, 6, 6, generator=g)

    def step(m):
        m = copy.deepcopy(m)
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.square().sum().backward()
        return [y.detach(), xi.grad, m[0].bias.grad, m[1].running_mean, m[1].running_var, m[-1].bias.grad]

    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        on = step(model)
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    off = step(model)
    assert all(torch.equal(a, b) for a, b in zip(on, off))
    for a, b in zip(on, step(dense)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_kernel_choice():
    # small maps with a batch of >= 16 take the batch-innermost kernel, the rest the phase planes
    assert _small_tile(512, 512, 128, (4, 4), 3, 1, 1) == 64     # ResNet-18 layer4: 2 MB tiles
    assert _small_tile(512, 512, 128, (2, 2), 3, 1, 1) == 64     # VGG stage 5: at most 4 vectors
    assert _small_tile(256, 512, 128, (8, 8), 3, 2, 1) == 32     # layer4.0 stride 2: 8x8 -> 4x4
    assert _small_tile(130, 6, 40, (8, 8), 3, 2, 1) == 32
    assert _small_tile(300, 6, 40, (8, 8), 3, 2, 1) == 16
    assert _small_tile(5, 5, 130, (4, 4), 3, 1, 1, torch.float64) == 32  # 4 vectors of 8 doubles
    assert _small_tile(64, 64, 128, (32, 32), 3, 1, 1) == 0      # layer1: 1024 output pixels
    assert _small_tile(512, 512, 8, (4, 4), 3, 1, 1) == 0        # batch below one vector
    assert _small_tile(256, 512, 128, (8, 8), 1, 2, 0) == -1     # layer4.0's downsample: strided 1x1
    assert _small_tile(64, 128, 8, (32, 32), 1, 2, 0) == -1
    assert _small_tile(64, 64, 32, (8, 8), 1, 1, 0) == 0         # 1x1 stride 1: phase planes
    assert _small_tile(64, 64, 32, (8, 8), 1, 2, 1) == 0         # padded 1x1: phase planes
    # the grid above: phase planes, but the strided 1x1 kernel for 1x1 stride 2 without padding (on a
    # 1x1 map the stride is clamped to 1: one output pixel)
    assert all(_small_tile(cin, cout, b, hw, k, s, p) == (-1 if (k, s, p) == (1, 2, 0) and hw != (1, 1) else 0)
               for k, s, p, hw in GEOMETRIES for cin, cout, b, _ in CHANNELS)
    with pytest.raises(ValueError, match="input_size must be"):
        torch.ops.sparsetrain.sparse_conv2d_small_tile([4, 3, 5], 2, [3, 3], [1, 1], [1, 1], torch.float32)
    # (a geometry query: no per-row table, so a huge input_size answers at once; bad sizes named)
    assert _small_tile(64, 64, 32, (2**30, 5), 3, 1, 1) == 0
    with pytest.raises(ValueError, match=r"input spatial size must be < 2\^31, got \(1099511627776, 5\)"):
        _small_tile(64, 64, 32, (2**40, 5), 3, 1, 1)
    with pytest.raises(ValueError, match=r"input spatial size must be >= 0, got \(-1, 5\)"):
        _small_tile(64, 64, 32, (-1, 5), 3, 1, 2)
    with pytest.raises(ValueError, match="kernel_size must have at most 2\\^24 taps"):
        _small_tile(64, 64, 32, (2**40, 2**40), 2**30, 1, 1)


def test_float64():
    _check(3, 5, 2, (5, 7), 3, 2, 1, 0.5, True, dtype=torch.float64)


def test_identity_at_zero_sparsity():
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1)
    layer = SparseConv2d.from_dense(conv, torch.ones_like(conv.weight, dtype=torch.bool))
    x = torch.randn(4, 5, 9, 8)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = conv(x1), layer(x2)
    torch.testing.assert_close(y1, y2)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(conv.weight.grad.flatten(), layer.weight.values.grad)
    torch.testing.assert_close(conv.bias.grad, layer.bias.grad)


def _op_args(dtype=torch.float32, bias=True, seed=2):
    g = torch.Generator().manual_seed(seed)
    w = CSR.from_dense(torch.randn(4, 3, 3, 3, dtype=dtype, generator=g), random_mask((4, 3, 3, 3), 0.6, generator=g))
    x = torch.randn(2, 3, 5, 4, dtype=dtype, generator=g)
    return w, x, (torch.randn(4, dtype=dtype, generator=g) if bias else None)


def test_gradcheck_fp64():
    w, x, b = _op_args(torch.float64)
    x.requires_grad_()
    b.requires_grad_()

    def f(x, values, b):
        return torch.ops.sparsetrain.sparse_conv2d(x, w.crow_indices, w.col_indices, values, w.ccol_indices,
                                                   w.row_indices_t, w.perm, [3, 3], [2, 1], [1, 1], b)

    v = w.values.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, v, b))
    # x without grad: the weight-gradient-only path
    assert torch.autograd.gradcheck(lambda v: f(x.detach(), v, None), (v,))


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_sparse_conv2d(bias):
    w, x, b = _op_args(bias=bias)
    args = (x.requires_grad_(), w.crow_indices, w.col_indices, w.values.detach().requires_grad_(),
            w.ccol_indices, w.row_indices_t, w.perm, [3, 3], [2, 1], [1, 1], b)
    torch.library.opcheck(torch.ops.sparsetrain.sparse_conv2d.default, args)


def test_opcheck_grad_ops():
    w, x, _ = _op_args()
    gy = torch.randn(2, 4, 3, 4)
    st = ([3, 3], [2, 1], [1, 1])
    o = torch.ops.sparsetrain
    torch.library.opcheck(o.sparse_conv2d_grad_input.default,
                          (gy, w.ccol_indices, w.row_indices_t, w.perm, w.values.detach(), [5, 4], *st))
    torch.library.opcheck(o.sparse_conv2d_grad_weight.default, (gy, x, w.crow_indices, w.col_indices, *st))
    torch.library.opcheck(o.sparse_conv2d_backward.default,
                          (gy, x, w.crow_indices, w.col_indices, w.values.detach(), w.ccol_indices,
                           w.row_indices_t, w.perm, *st))


# (in, out, batch, map, k, s, p, sparsity): both kernels (the small-map one from 16 samples on 4x4
# maps), strides 1 and 2, 1x1, an input channel no nonzero reads (0.97: channel 1 masked), 0 and 100 %
GRAD_INPUT_ADD = [(3, 5, 1, (5, 7), 3, 1, 1, 0.5), (4, 6, 3, (9, 8), 3, 2, 1, 0.9), (5, 3, 2, (7, 7), 1, 2, 0, 0.0),
                  (3, 8, 2, (6, 6), 3, 1, 1, 0.97), (3, 4, 2, (5, 5), 3, 1, 1, 1.0),
                  (8, 6, 20, (4, 4), 3, 1, 1, 0.5), (6, 5, 40, (7, 7), 3, 2, 1, 0.6), (6, 5, 17, (8, 8), 1, 2, 0, 0.2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", GRAD_INPUT_ADD, ids=lambda c: f"{c[0]}-{c[1]}-b{c[2]}-{c[3]}-k{c[4]}s{c[5]}-{c[7]}")
def test_grad_input_add(case, dtype):
    """dx = conv_transpose(dy) + grad_input_add, added inside the kernel, in both backward ops."""
    cin, cout, batch, hw, k, s, p, sparsity = case
    g = torch.Generator().manual_seed(7)
    w = torch.randn(cout, cin, k, k, generator=g, dtype=dtype)
    mask = random_mask(w.shape, sparsity, generator=g)
    if sparsity == 0.97:
        mask[:, 1] = False
    csr = CSR.from_dense(w, mask)
    x = torch.randn(batch, cin, *hw, generator=g, dtype=dtype, requires_grad=True)
    y = F.conv2d(x, csr.to_dense(), stride=s, padding=p)
    gy, add = torch.randn(y.shape, generator=g, dtype=dtype), torch.randn(x.shape, generator=g, dtype=dtype)
    (want,) = torch.autograd.grad(y, x, gy)
    want = want + add
    o, geo = torch.ops.sparsetrain, ([k, k], [s, s], [p, p])
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    dx = o.sparse_conv2d_grad_input(gy, csr.ccol_indices, csr.row_indices_t, csr.perm, csr.values, list(hw), *geo, add)
    torch.testing.assert_close(dx, want, **tol)
    dx, dv = o.sparse_conv2d_backward(gy, x.detach(), csr.crow_indices, csr.col_indices, csr.values, csr.ccol_indices,
                                      csr.row_indices_t, csr.perm, *geo, add)
    torch.testing.assert_close(dx, want, **tol)
    dv0 = o.sparse_conv2d_grad_weight(gy, x.detach(), csr.crow_indices, csr.col_indices, *geo)
    torch.testing.assert_close(dv, dv0, **tol)  # the weight gradient is not touched
    assert add.data_ptr() != dx.data_ptr()
    big = torch.randn(x.shape, generator=g, dtype=dtype)  # a non-contiguous add
    nc = big.transpose(2, 3).contiguous().transpose(2, 3)
    dx = o.sparse_conv2d_grad_input(gy, csr.ccol_indices, csr.row_indices_t, csr.perm, csr.values, list(hw), *geo, nc)
    torch.testing.assert_close(dx, want - add + big, **tol)


def test_grad_input_add_errors_and_opcheck():
    w, x, _ = _op_args()
    gy = torch.randn(2, 4, 3, 4)
    st = ([3, 3], [2, 1], [1, 1])
    o = torch.ops.sparsetrain
    idx = (w.ccol_indices, w.row_indices_t, w.perm, w.values.detach(), [5, 4], *st)
    with pytest.raises(ValueError, match=r"grad_input_add must have the input's shape \[2, 3, 5, 4\]"):
        o.sparse_conv2d_grad_input(gy, *idx, torch.zeros(2, 3, 4, 5))
    with pytest.raises(TypeError, match="grad_input_add must have dtype Float"):
        o.sparse_conv2d_grad_input(gy, *idx, torch.zeros(2, 3, 5, 4, dtype=torch.float64))
    torch.library.opcheck(o.sparse_conv2d_grad_input.default, (gy, *idx, torch.randn(2, 3, 5, 4)))
    torch.library.opcheck(o.sparse_conv2d_backward.default,
                          (gy, x, w.crow_indices, w.col_indices, w.values.detach(), w.ccol_indices,
                           w.row_indices_t, w.perm, *st, torch.randn(2, 3, 5, 4)))
    with pytest.raises(TypeError, match=r"values must have the dtype of x \(Double\), got Float"):
        o.sparse_conv2d_backward(gy.double(), x.double(), w.crow_indices, w.col_indices, w.values.detach(),
                                 w.ccol_indices, w.row_indices_t, w.perm, *st)


def test_opcheck_small_map_kernel():
    g = torch.Generator().manual_seed(3)
    w = CSR.from_dense(torch.randn(4, 3, 3, 3, generator=g), random_mask((4, 3, 3, 3), 0.5, generator=g))
    x = torch.randn(16, 3, 4, 4, generator=g)
    gy = torch.randn(16, 4, 4, 4, generator=g)
    st = ([3, 3], [1, 1], [1, 1])
    assert _small_tile(3, 4, 16, (4, 4), 3, 1, 1) == 16
    o = torch.ops.sparsetrain
    torch.library.opcheck(o.sparse_conv2d.default, (x.requires_grad_(), w.crow_indices, w.col_indices,
                          w.values.detach().requires_grad_(), w.ccol_indices, w.row_indices_t, w.perm, *st, None))
    torch.library.opcheck(o.sparse_conv2d_backward.default,
                          (gy, x.detach(), w.crow_indices, w.col_indices, w.values.detach(), w.ccol_indices,
                           w.row_indices_t, w.perm, *st))


def test_torch_compile():
    w, x, b = _op_args()
    layer = SparseConv2d(w, b, stride=(2, 1), padding=1)
    w.csc()  # the cached transposed index is built eagerly (its construction does not trace)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    torch.testing.assert_close(compiled(x), F.conv2d(x, w.to_dense(), b, stride=(2, 1), padding=1))  # (the reference)


def test_outputs_never_alias_live_tensors():
    # large outputs come from a pool of buffers; a buffer is reused only once nothing references it
    torch.manual_seed(9)
    layer = SparseConv2d.from_dense(nn.Conv2d(16, 16, 3, padding=1), random_mask((16, 16, 3, 3), 0.5))
    x = torch.randn(8, 16, 48, 48)  # 1.2 MB outputs: pooled
    with torch.no_grad():
        y1 = layer(x)
        ref = y1.clone()
        y2 = layer(x)
        assert y1.data_ptr() != y2.data_ptr()
        y2.add_(1.0)
        torch.testing.assert_close(y1, ref)
        view = y1[:, :2]  # a view keeps the storage referenced
        del y1, y2
        y3 = layer(x)
        assert y3.data_ptr() != view.data_ptr()
        torch.testing.assert_close(view, ref[:, :2])


def test_large_outputs_on_huge_pages_and_off():
    """Pooled outputs of >= 8 MiB are 2 MiB-aligned blocks advised as transparent huge pages (unless
    SPARSETRAIN_HUGEPAGES=0): same values either way, freed and reused like the others."""
    import subprocess
    import sys
    code = ("import torch, sparsetrain; from torch import nn; from sparsetrain.nn import SparseConv2d;"
            "from sparsetrain.testing import random_mask; torch.manual_seed(3);"
            "l = SparseConv2d.from_dense(nn.Conv2d(8, 32, 3, padding=1), random_mask((32, 8, 3, 3), 0.5));"
            "x = torch.randn(32, 8, 48, 48); y = l(x); y.sum().backward();"  # y: 9 MiB
            "print(y.data_ptr() % (2 << 20) == 0, float(y.double().sum()), float(l.weight.values.grad.double().sum()))")
    # the three fresh processes side by side (one after the other: ~1.5 s of starting torch each; the
    # study CLI's GOMP_SPINCOUNT, unless set: OpenMP workers spinning on the cores the others need)
    procs = {env: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={"GOMP_SPINCOUNT": "10000", **os.environ, "SPARSETRAIN_HUGEPAGES": env})
             for env in ("1", "0", "off")}
    done = {env: (p, *p.communicate(timeout=120)) for env, p in procs.items()}
    outs = {}
    for env in ("1", "0"):
        proc, stdout, stderr = done[env]
        assert proc.returncode == 0, stderr[-2000:]
        outs[env] = stdout.split()
    if sys.platform.startswith("linux"):
        assert outs["1"][0] == "True"
    assert outs["1"][1:] == outs["0"][1:]
    # exactly 0 or 1 (empty: the default); "off" left them on silently: now the first pooled output says so
    proc, _, stderr = done["off"]
    assert proc.returncode != 0 and "ValueError: SPARSETRAIN_HUGEPAGES must be 0 (pooled outputs on 4 KiB pages) or 1" in stderr


# ---------------------------------------------------------------------------- module API
def test_module_api_and_state_dict_roundtrip(tmp_path):
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    mask = random_mask(conv.weight.shape, 0.75)
    layer = SparseConv2d.from_dense(conv, mask)
    assert layer.nnz == int(mask.sum()) == 27
    assert layer.sparsity == pytest.approx(0.75)
    assert (layer.kernel_size, layer.stride, layer.padding) == ((3, 3), (2, 2), (1, 1))
    assert "nnz=27" in repr(layer) and "sparsity=0.7500" in repr(layer) and "stride=(2, 2)" in repr(layer)
    back = layer.to_dense()
    assert isinstance(back, nn.Conv2d) and back.stride == (2, 2) and back.padding == (1, 1)
    torch.testing.assert_close(back.weight, conv.weight * mask)
    torch.testing.assert_close(back.bias, conv.bias)
    torch.save(layer.state_dict(), tmp_path / "c.pt")
    other = SparseConv2d.from_dense(nn.Conv2d(3, 4, 3, stride=2, padding=1))  # different nnz
    other.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    x = torch.randn(2, 3, 7, 6)
    torch.testing.assert_close(other(x), layer(x))
    torch.testing.assert_close(other(x), dense_conv2d(x, conv.weight, mask, conv.bias, stride=2, padding=1))
    torch.testing.assert_close(layer(input=x), back(input=x))  # nn.Conv2d's keyword
    assert other.nnz == layer.nnz
    nb = SparseConv2d.from_dense(nn.Conv2d(3, 4, 1, bias=False, padding="same"))
    assert nb.bias is None and nb.padding == (0, 0) and nb.to_dense().bias is None


def test_a_saved_weight_of_another_shape_is_refused_like_a_dense_size_mismatch(tmp_path):
    """The saved pattern fits any weight of the same [rows, cols] view: the logical shape saved in the
    state_dict's metadata (kept by torch.save) refuses a (3, 1) kernel's state in a (1, 3) kernel's
    layer, and a linear's in a conv's, as nn.Conv2d refuses them, the layer untouched; a state_dict
    without the metadata (saved before it, or rebuilt as a plain dict) loads as before."""
    torch.manual_seed(9)
    tall = SparseConv2d.from_dense(nn.Conv2d(3, 4, (3, 1)), random_mask((4, 3, 3, 1), 0.5))
    wide = SparseConv2d.from_dense(nn.Conv2d(3, 4, (1, 3)), random_mask((4, 3, 1, 3), 0.5))
    linear = SparseLinear.from_dense(nn.Linear(9, 4), random_mask((4, 9), 0.5))
    torch.save(tall.state_dict(), tmp_path / "tall.pt")
    before = wide.weight.to_dense().clone()
    for saved, shape in ((torch.load(tmp_path / "tall.pt", weights_only=True), r"\(4, 3, 3, 1\)"),
                         (linear.state_dict(), r"\(4, 9\)")):
        with pytest.raises(RuntimeError, match=rf"size mismatch for the CSR at weight: copying a weight of shape "
                                               rf"{shape} from checkpoint, the shape in current model is \(4, 3, 1, 3\)"):
            wide.load_state_dict(saved)
        assert torch.equal(wide.weight.to_dense(), before)
    with pytest.raises(RuntimeError, match=r"size mismatch for weight"):  # (nn.Conv2d's own check, for comparison)
        nn.Conv2d(3, 4, (1, 3)).load_state_dict(nn.Conv2d(3, 4, (3, 1)).state_dict())
    wide.load_state_dict(dict(tall.state_dict()))  # (no metadata: the [4, 9] view is all there is to check)
    assert torch.equal(wide.weight.values, tall.weight.values)
    twin = SparseConv2d.from_dense(nn.Conv2d(3, 4, (3, 1)))
    twin.load_state_dict(torch.load(tmp_path / "tall.pt", weights_only=True))
    x = torch.randn(2, 3, 5, 6)
    torch.testing.assert_close(twin(x), tall(x))
    torch.testing.assert_close(twin(x), F.conv2d(x, tall.weight.to_dense(), tall.bias))  # (the dense reference)


# ---------------------------------------------------------------------------- bad input
def test_no_input_channels_is_the_bias():
    """A conv of zero input channels: the output is the bias (an empty sum; PyTorch's CPU conv
    returns an empty [B, 0, H, W] there), dx empty, dvalues empty (the plan divided by the channel
    count: SIGFPE)."""
    conv = nn.Conv2d(0, 4, 3, padding=1)
    layer = SparseConv2d.from_dense(conv, torch.ones_like(conv.weight, dtype=torch.bool))
    for b in (2, 32):  # the phase planes, and the small-map kernel's batch tile
        x = torch.randn(b, 0, 5, 5, requires_grad=True)
        out = layer(x)
        torch.testing.assert_close(out, conv.bias.detach().view(1, 4, 1, 1).expand(b, 4, 5, 5))
        out.sum().backward()
        assert x.grad.shape == x.shape and layer.bias.grad.shape == (4,)


def test_bad_inputs_raise_clear_errors():
    w, x, b = _op_args()
    layer = SparseConv2d(w, b, padding=1)
    with pytest.raises(ValueError, match="x has 2 channels but the weight expects 3"):
        layer(torch.randn(2, 2, 5, 5))
    for shape in ((3, 5), (1, 2, 3, 5, 5)):
        with pytest.raises(ValueError, match=r"x must be 4-D \[batch, channels, height, width\] or 3-D unbatched"):
            layer(torch.randn(shape))
    op = torch.ops.sparsetrain.sparse_conv2d
    args = (w.crow_indices, w.col_indices, w.values, w.ccol_indices, w.row_indices_t, w.perm, [3, 3], [1, 1], [1, 1], b)
    with pytest.raises(ValueError, match="x must be 4-D"):
        op(torch.randn(3, 5, 5), *args)
    with pytest.raises(TypeError, match=r"x must have the dtype of values \(Float\)"):
        layer(x.double())
    # (an integer tensor gets no autocast hint: that is for half-precision activations)
    with pytest.raises(TypeError, match=r"x must be float32 or float64, got Long$"):
        layer(torch.randint(0, 3, (2, 3, 5, 4)))
    with pytest.raises(ValueError, match="x is on meta but the weight is on cpu"):
        layer(x.to("meta"))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        SparseConv2d(w, b)(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="bias must have shape"):
        op(x, *args[:-1], torch.ones(3))
    bad_col = w.col_indices.clone()
    bad_col[0] = 1000
    with pytest.raises(ValueError, match="col_indices has entries outside"):
        op(x, w.crow_indices, bad_col, *args[2:])
    with pytest.raises(ValueError, match="stride must be >= 1"):
        op(x, *args[:7], [0, 1], [1, 1], b)
    for k, st in (([2**32, 2**32], [1, 1]), ([3, 3], [2**32, 2**32])):  # (their products overflowed int64)
        with pytest.raises(ValueError, match="must be < 2\\^31"):
            op(x, *args[:6], k, st, [1, 1], b)
    # a CSC that is not the CSR's transpose, or a perm that is not a permutation: refused, not used
    gy = torch.randn(2, 4, 5, 4)
    other = CSR.from_dense(w.to_dense().flip(1))  # another pattern, the same nnz
    twice = w.perm.clone()
    twice[1] = twice[0]
    bwd = torch.ops.sparsetrain.sparse_conv2d_backward
    for csc in (other.index()[3:6], (w.ccol_indices, w.row_indices_t, twice)):
        with pytest.raises(ValueError, match="transposed index of crow_indices"):
            bwd(gy, x, w.crow_indices, w.col_indices, w.values, *csc, [3, 3], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="perm must be a permutation"):
        torch.ops.sparsetrain.sparse_conv2d_grad_input(gy, w.ccol_indices, w.row_indices_t, twice, w.values,
                                                       [5, 4], [3, 3], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="grad_out has 4 channels but the weight expects 5"):
        torch.ops.sparsetrain.sparse_conv2d_grad_weight(gy, x, torch.zeros(6, dtype=torch.long),
                                                        torch.zeros(0, dtype=torch.int32), [3, 3], [1, 1], [1, 1])
    with pytest.raises(ValueError, match="grad_out must have spatial size"):
        torch.ops.sparsetrain.sparse_conv2d_grad_weight(gy[:, :, :3], x, w.crow_indices, w.col_indices,
                                                        [3, 3], [1, 1], [1, 1])
    # an input_size far too large for grad_out is refused at once (its row table took ~17 GB and a
    # minute before the size check ran); a negative one names the size (was an overflow in numel)
    gi = torch.ops.sparsetrain.sparse_conv2d_grad_input
    for size, msg in (([2**40, 4], r"input_size \[1099511627776, 4\] does not fit grad_out's spatial size \(5, 4\)"),
                      ([5, 2**62], "does not fit grad_out's spatial size"), ([-1, 4], "does not fit"),
                      ([6, 4], "grad_out must have spatial size")):
        with pytest.raises(ValueError, match=msg):
            gi(gy, w.ccol_indices, w.row_indices_t, w.perm, w.values, size, [3, 3], [1, 1], [2, 1])
    # an empty tensor costs nothing at any size: an empty batch or no input channel with a huge map or
    # kernel ran loops over its rows or taps for minutes (and gigabytes) before any output existed
    y = op(torch.empty(0, 3, 2**30, 4), *args)
    assert y.shape == (0, 4, 2**30, 4)
    dx = gi(torch.empty(0, 4, 2**30, 4), w.ccol_indices, w.row_indices_t, w.perm, w.values, [2**30, 4], [3, 3],
            [1, 1], [1, 1])
    assert dx.shape == (0, 3, 2**30, 4)
    with pytest.raises(ValueError, match=r"input spatial size must be < 2\^31, got \(1099511627776, 4\)"):
        op(torch.empty(0, 3, 2**40, 4), *args)
    none = (torch.zeros(5, dtype=torch.long), torch.zeros(0, dtype=torch.int32), torch.zeros(0),
            torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"kernel_size must have at most 2\^24 taps, got \[30000, 30000\]"):
        op(torch.empty(1, 0, 30000, 30000), *none, [30000, 30000], [1, 1], [0, 0], None)
    with pytest.raises(ValueError, match="dilation 1 only"):
        SparseConv2d.from_dense(nn.Conv2d(3, 4, 3, dilation=2))
    with pytest.raises(ValueError, match="groups=1 only"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode='zeros' only"):
        SparseConv2d.from_dense(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="groups=1 only"):
        ops.sparse_conv2d(x, w, b, groups=3)
    for groups in (1.0, True, "1", None):  # (1.0 and True == 1 ran before 2026-12-06; F.conv2d refuses them too)
        with pytest.raises(TypeError):
            F.conv2d(x, w.to_dense(), b, groups=groups)
        with pytest.raises(TypeError, match="groups must be an int, got"):
            ops.sparse_conv2d(x, w, b, groups=groups)
    torch.testing.assert_close(ops.sparse_conv2d(x, w, b, groups=np.int64(1)), F.conv2d(x, w.to_dense(), b))
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        SparseConv2d.from_dense(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="weight must be 4-D"):
        SparseConv2d(CSR.from_dense(torch.ones(3, 3)))
    # channels_last / non-contiguous input is accepted (made contiguous), not misread
    xc = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(xc), layer(x))
    torch.testing.assert_close(layer(xc), F.conv2d(x, w.to_dense(), b, padding=1))


def test_raw_ops_refuse_inconsistent_arguments_naming_the_wrong_one():
    """Called directly, the ops refuse what they cannot use and the message names the argument (or
    the size it was checked against): a CSC that is not the CSR's transpose was used by the fused
    backward when only dx was wanted (a silently wrong dx), and several messages named another index."""
    S = torch.ops.sparsetrain
    torch.manual_seed(0)
    w = CSR.from_dense(torch.randn(4, 3, 3, 3), random_mask((4, 3, 3, 3), 0.5))
    crow, col, vals, ccol, rowt, perm = (t.detach() for t in w.index())
    x, g = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8)
    geo = ([3, 3], [1, 1], [1, 1])
    y = S.sparse_conv2d(x, crow, col, vals, ccol, rowt, perm, *geo, None)
    f64 = torch.ones(4, dtype=torch.float64)
    bn = (y, None, torch.ones(4), torch.zeros(4), f64, 0 * f64, f64, True, False, False, False)

    def bn_backward(rt=rowt, pm=perm, geo=geo, grad_input=True, grad_values=False, **kw):
        return S.sparse_conv2d_bn_backward(g, x, crow, col, vals, ccol, rt, pm, *geo, None, *bn, grad_input,
                                           grad_values, **kw)
    for rt, pm in ((rowt.flip(0), perm), (rowt, perm.flip(0))):
        with pytest.raises(ValueError, match="transposed index of crow_indices"):
            bn_backward(rt, pm)  # (dx only: checked against the CSR all the same)
    torch.testing.assert_close(bn_backward()[0], bn_backward(grad_values=True)[0])  # (the consistent index)
    with pytest.raises(ValueError, match=r"stride must be >= 1"):  # (no conv gradient: checked too)
        bn_backward(geo=([3, 3], [0, 0], [1, 1]), grad_input=False)
    with pytest.raises(ValueError, match="pool_indices must hold max_pool2x2's window positions"):
        S.sparse_conv2d_bn_backward(g[:, :, :4, :4], x, crow, col, vals, ccol, rowt, perm, *geo, None, *bn, True,
                                    False, pool_indices=torch.full((2, 4, 4, 4), 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"row_indices_t has entries outside \[0, 3\) \(grad_out's channels\)"):
        S.sparse_conv2d_grad_input(g[:, :3], ccol, rowt, perm, vals, [8, 8], *geo)
    with pytest.raises(ValueError, match=r"col_indices has entries outside \[0, 18\) \(x's channels \* kh \* kw\)"):
        S.sparse_conv2d_grad_weight(g, x[:, :2], crow, col, *geo)
    with pytest.raises(ValueError, match=r"ccol_indices must have in_channels \* kh \* kw \+ 1 entries, got 27"):
        S.sparse_conv2d(x, crow, col, vals, ccol[:-1], rowt, perm, *geo, None)
    with pytest.raises(TypeError, match=r"x must have the dtype of values \(Double\), got Float"):
        S.sparse_conv2d(x, crow, col, vals.double(), ccol, rowt, perm, *geo, None)
    with pytest.raises(TypeError, match=r"grad_out must have the dtype of values \(Double\), got Float"):
        S.sparse_conv2d_grad_input(g, ccol, rowt, perm, vals.double(), [8, 8], *geo)
    with pytest.raises(ValueError, match="input_size's batch and channels must be >= 0"):
        S.sparse_conv2d_small_tile([-4, 3, 4, 4], 4, *geo, torch.float32)
    lw = CSR.from_dense(torch.randn(5, 6), random_mask((5, 6), 0.5))
    with pytest.raises(ValueError, match=r"col_indices has entries outside \[0, 2\) \(x's last dimension"):
        S.sparse_linear_grad_weight(torch.randn(3, 5), torch.randn(3, 2), lw.crow_indices, lw.col_indices)


@pytest.mark.parametrize("bad", [-1, -2**31, 45, 2**31 - 1])
def test_index_range_checks_find_one_bad_entry_anywhere(bad):
    """The CSR's, the CSC's and perm's range checks (one vectorized pass each) find a single entry out of range
    (negative, the bound itself, int32's extremes) at the first, a middle and the last position of an index long
    enough for the vector loop and its remainder (37 nonzeros), and pass the consistent index."""
    S = torch.ops.sparsetrain
    torch.manual_seed(0)
    w = CSR.from_dense(torch.randn(5, 5, 3, 3), random_mask((5, 5, 3, 3), 0.8))
    crow, col, vals, ccol, rowt, perm = (t.detach() for t in w.index())
    nnz = col.numel()
    assert nnz >= 33 and nnz % 8, nnz  # (the vector loop and a remainder)
    x, g = torch.randn(2, 5, 6, 6), torch.randn(2, 5, 6, 6)
    geo = ([3, 3], [1, 1], [1, 1])
    torch.testing.assert_close(S.sparse_conv2d(x, crow, col, vals, ccol, rowt, perm, *geo, None),
                               F.conv2d(x, w.to_dense(), padding=1))

    def edit(t, i, v):
        t = t.clone()
        t[i] = v
        return t
    for i in (0, nnz // 2, nnz - 1):
        with pytest.raises(ValueError, match=r"col_indices has entries outside \[0, 45\)"):
            S.sparse_conv2d(x, crow, edit(col, i, bad), vals, ccol, rowt, perm, *geo, None)
        with pytest.raises(ValueError, match=r"row_indices_t has entries outside \[0, 5\)"):
            S.sparse_conv2d_grad_input(g, ccol, edit(rowt, i, min(bad, 2**31 - 1) if bad >= 0 else bad), perm, vals,
                                       [6, 6], *geo)
        with pytest.raises(ValueError, match=rf"perm has entries outside \[0, {nnz}\)"):
            S.sparse_conv2d_grad_input(g, ccol, rowt, edit(perm, i, bad if bad < 0 else nnz + bad - 45), vals,
                                       [6, 6], *geo)


# ---------------------------------------------------------------------------- sparsify_ / densify_ / training
def _cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10))


def test_sparsify_densify_conv():
    torch.manual_seed(6)
    model = _cnn()
    masks = {"0": random_mask((8, 3, 3, 3), 0.5), "2": random_mask((16, 8, 3, 3), 0.9), "8": random_mask((10, 16), 0.5)}
    x = torch.randn(2, 3, 9, 9)
    ref = model[2].weight.detach() * masks["2"]
    sparsetrain.sparsify_(model, masks)
    assert isinstance(model[0], SparseConv2d) and isinstance(model[2], SparseConv2d)
    assert isinstance(model[4], nn.Conv2d) and isinstance(model[8], sparsetrain.SparseLinear)
    y = model(x)
    sparsetrain.densify_(model)
    assert type(model[2]) is nn.Conv2d and model[2].stride == (2, 2)
    torch.testing.assert_close(model[2].weight, ref)
    torch.testing.assert_close(model(x), y)
    with pytest.raises(ValueError, match=r"masks\['4'\] must be a bool tensor of shape \(16, 16, 1, 1\)"):
        sparsetrain.sparsify_(model, {"4": torch.ones(16, 16, dtype=torch.bool)})


def test_cnn_training_follows_dense_masked_trajectory():
    """Small CNN, 30 SGD steps, same init and batches: SparseConv2d == dense masked conv."""
    torch.manual_seed(7)
    dense = _cnn()
    masks = {n: random_mask(m.weight.shape, 0.7) for n, m in dense.named_modules() if isinstance(m, nn.Conv2d)}
    zero_pruned_(dense, masks)
    sparse = sparsetrain.sparsify_(copy.deepcopy(dense), masks)
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.05, momentum=0.9)
    opt_s = torch.optim.SGD(sparse.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(8)
    for _ in range(30):
        x = torch.randn(16, 3, 12, 12, generator=g)
        t = torch.randint(0, 10, (16,), generator=g)
        losses = []
        for model, opt in ((dense, opt_d), (sparse, opt_s)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), t)
            loss.backward()
            if model is dense:  # the dense-masked reference: pruned weights get no update
                for n, m in masks.items():
                    model.get_submodule(n).weight.grad.mul_(m)
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)
    for n, m in masks.items():
        torch.testing.assert_close(sparse.get_submodule(n).weight.to_dense(), dense.get_submodule(n).weight,
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sparse.get_submodule(n).bias, dense.get_submodule(n).bias, rtol=1e-4, atol=1e-5)


def test_the_fake_kernels_refuse_what_the_cpu_kernels_refuse():
    """torch.export and FakeTensor trace the fakes: inputs the C++ kernels refuse (a conv of other
    channels or a map under its kernel, a 1x1 map pooled 2x2, a linear gradient of another width) were
    given a shape, so an exported program failed only when run."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    torch.manual_seed(0)
    conv = SparseConv2d.from_dense(nn.Conv2d(3, 4, 3), torch.rand(4, 3, 3, 3) > 0.5).eval()
    lin = SparseLinear.from_dense(nn.Linear(6, 5), torch.rand(5, 6) > 0.5)
    with pytest.raises(ValueError, match="x has 2 channels but the weight expects 3"):
        conv(torch.randn(1, 2, 6, 6))  # (the C++ kernel's refusal)
    with pytest.raises(Exception, match=r"does not fit a 3x3 kernel over 27 columns"):
        torch.export.export(conv, (torch.randn(1, 2, 6, 6),))
    w = conv.weight
    cases = [(lambda: torch.ops.sparsetrain.sparse_conv2d(torch.randn(1, 3, 2, 6), *w.index(), [3, 3], [1, 1],
                                                          [0, 0], None), "does not fit a 3x3 kernel"),
             (lambda: torch.ops.sparsetrain.max_pool2x2(torch.randn(1, 2, 1, 1)), r"must be 4-D, >= 2x2"),
             (lambda: torch.ops.sparsetrain.sparse_linear_grad_input(torch.randn(2, 4), *lin.weight.index()),
              "grad_out's last dimension must be 5, got 4")]
    for call, message in cases:
        with pytest.raises(ValueError):
            call()  # (the real kernel)
        with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(Exception, match=message):
            call()
    with FakeTensorMode(allow_non_fake_inputs=True):  # (what fits still traces)
        assert conv(torch.randn(2, 3, 6, 6)).shape == (2, 4, 4, 4)


def test_numpy_int_hyperparameters_convert_as_nn_conv2d_takes_them():
    # nn.Conv2d keeps np.int64 kernel_size/stride/padding as given (configs read with numpy); from_dense
    # refused such a conv ("stride must be an int or a pair of ints, got (np.int64(2), np.int64(2))")
    import numpy as np
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, np.int64(3), stride=np.int64(2), padding=(np.int64(1), np.int32(0)))
    mask = random_mask(conv.weight.shape, 0.5)
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    model = nn.Sequential(conv)
    sparsetrain.sparsify_(model, {"0": mask})
    layer = model[0]
    assert layer.stride == (2, 2) and layer.padding == (1, 0) and all(type(v) is int for v in layer.stride + layer.padding)
    x = torch.randn(2, 3, 8, 9)
    torch.testing.assert_close(layer(x), dense_conv2d(x, weight, mask, bias, stride=2, padding=(1, 0)))
    assert SparseConv2d(layer.weight, None, stride=np.int64(3)).stride == (3, 3)
    for bad in (True, 2.0, (np.int64(1), True)):  # (still refused: a bool, a float)
        with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
            SparseConv2d(layer.weight, None, stride=bad)


def test_padding_and_stride_of_another_kind_are_refused_by_name():
    """ops.sparse_conv2d and SparseConv2d: a numpy array as padding raised numpy's "The truth value of an
    array with more than one element is ambiguous" (compared with 'valid'), an unknown padding string was
    a TypeError asking for ints (F.conv2d: "Invalid padding string"); bools and floats stay refused by name
    (the C++ schema's int[] takes True as 1). What is taken matches F.conv2d on the masked weight."""
    torch.manual_seed(0)
    weight, mask = torch.randn(4, 3, 3, 3), random_mask((4, 3, 3, 3), 0.5)
    w, x = CSR.from_dense(weight, mask), torch.randn(2, 3, 7, 7)
    for padding in (np.array([1, 1]), np.array(1), torch.tensor([1, 1])):
        with pytest.raises(TypeError, match=r"padding must be an int or a pair of ints, got"):
            ops.sparse_conv2d(x, w, padding=padding)
        with pytest.raises(TypeError, match=r"padding must be an int or a pair of ints, got"):
            SparseConv2d(w, padding=padding)
    for padding in ("SAME", "full", ""):
        with pytest.raises(ValueError, match=rf"padding must be an int, a pair of ints, 'valid' or 'same', got "
                                             rf"'{padding}'"):
            ops.sparse_conv2d(x, w, padding=padding)
        with pytest.raises(ValueError, match="padding must be an int, a pair of ints, 'valid' or 'same'"):
            SparseConv2d(w, padding=padding)
    for name, bad in (("stride", [True, 1]), ("stride", 2.0), ("padding", (1, False)), ("padding", 1.0)):
        with pytest.raises(TypeError, match=rf"{name} must be an int or a pair of ints, got"):
            ops.sparse_conv2d(x, w, **{name: bad})
    for stride, padding in ((1, "same"), (2, "valid"), ((2, 1), (np.int64(1), 0))):
        torch.testing.assert_close(ops.sparse_conv2d(x, w, stride=stride, padding=padding),
                                   dense_conv2d(x, weight, mask, stride=stride, padding=padding
                                                if isinstance(padding, str) else tuple(int(p) for p in padding)))


def test_a_stride_or_padding_past_int64_is_refused_by_name():
    """ops.sparse_conv2d and SparseConv2d: a stride or padding of 2**63 or more (or below -2**63) reached the op's
    int[] and failed there as "Expected a value of type 'List[int]' ... found type 'list'"; now a ValueError
    naming it. Within int64 the op's own limit (< 2^31) answers as before; a valid stride matches F.conv2d."""
    torch.manual_seed(0)
    weight, mask = torch.randn(4, 3, 3, 3), random_mask((4, 3, 3, 3), 0.5)
    w, x = CSR.from_dense(weight, mask), torch.randn(2, 3, 7, 7)
    for name, bad in (("stride", 2**63), ("stride", (1, 2**70)), ("padding", 2**64), ("padding", (-2**63 - 1, 0))):
        with pytest.raises(ValueError, match=rf"{name} must be in int64's range \[-2\^63, 2\^63\), got"):
            ops.sparse_conv2d(x, w, **{name: bad})
        with pytest.raises(ValueError, match=rf"{name} must be in int64's range"):
            SparseConv2d(w, **{name: bad})
    with pytest.raises(ValueError, match=r"kernel_size, stride and padding must be < 2\^31"):
        ops.sparse_conv2d(x, w, stride=(1, 2**63 - 1))
    torch.testing.assert_close(ops.sparse_conv2d(x, w, stride=(2, 9)), dense_conv2d(x, weight, mask, stride=(2, 9)))


def test_one_int_sequences_as_nn_conv2d_takes_them():
    """nn.Conv2d(3, 4, 3, stride=(2,), padding=[1]) keeps stride (2,) and padding (1,), which F.conv2d reads for
    both dims: sparsify_ refused such a conv ("stride must be an int or a pair of ints, got (2,)") and
    ops.sparse_conv2d such arguments; both are taken now, against the dense masked conv, forward and gradients.
    An empty or 3-entry sequence stays a TypeError naming it."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=(2,), padding=[1])
    mask, dense = random_mask(conv.weight.shape, 0.5), copy.deepcopy(conv)
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    model = nn.Sequential(conv)
    sparsetrain.sparsify_(model, {"0": mask})
    assert model[0].stride == (2, 2) and model[0].padding == (1, 1)
    x = torch.randn(2, 3, 7, 6)
    assert_layer_matches(model[0], dense, mask, dense_conv2d, x.clone().requires_grad_(True),
                         torch.Generator().manual_seed(1), {}, stride=2, padding=1)
    w = CSR.from_dense(weight, mask)
    torch.testing.assert_close(ops.sparse_conv2d(x, w, bias, stride=[2], padding=(np.int64(1),)),
                               dense_conv2d(x, weight, mask, bias, stride=(2,), padding=[1]))
    for name, bad in (("stride", ()), ("stride", (1, 1, 1)), ("padding", [])):
        with pytest.raises(TypeError, match=rf"{name} must be an int or a pair of ints, got"):
            ops.sparse_conv2d(x, w, **{name: bad})


@pytest.mark.parametrize("frozen", [True, False])
def test_functional_call_with_another_pattern_of_as_many_nonzeros(frozen):
    """torch.func.functional_call(layer, other.state_dict(), x): the state swaps crow/col/values in, not
    the transposed index (derived, not in the state), from which dx is computed: another pattern of as
    many nonzeros gave that pattern's output and the layer's own pattern's dx, silently (frozen weights;
    2.0 off). The index is built anew for the swapped pattern, and again for the layer's own after; all
    compared with F.conv2d on the masked weights, output, dx and (trained) the values' gradient."""
    from torch.func import functional_call
    torch.manual_seed(0)
    dense, other = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
    m1, m2 = random_mask(dense.weight.shape, 0.7), random_mask(dense.weight.shape, 0.7)
    assert int(m1.sum()) == int(m2.sum()) and not torch.equal(m1, m2)
    a, b = SparseConv2d.from_dense(dense, m1), SparseConv2d.from_dense(other, m2)
    a.requires_grad_(not frozen)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    g = torch.randn(2, 6, 5, 5)
    for layer, state, ref_w, ref_b, mask in ((a, b.state_dict(), other.weight, other.bias, m2),
                                             (a, None, dense.weight, dense.bias, m1)):
        y = functional_call(layer, state, (x,)) if state is not None else layer(x)
        w = ref_w.detach().clone().requires_grad_(True)
        ref = dense_conv2d(x, w, mask, ref_b, padding=1)
        torch.testing.assert_close(y, ref)
        dx, dref = torch.autograd.grad(y, x, g), torch.autograd.grad(ref, (x, w), g)
        torch.testing.assert_close(dx[0], dref[0])
        if not frozen and state is None:
            (dv,) = torch.autograd.grad(layer(x), layer.weight.values, g)
            torch.testing.assert_close(dv, dref[1][mask])


@pytest.mark.parametrize("swap", ["functional_call", "assigned"])
def test_a_move_after_another_pattern_was_swapped_in_keeps_each_pattern_its_transposed_index(swap):
    """After functional_call(layer, other.state_dict(), x) the layer's transposed index is the other pattern's (built
    for it in the call) until its next forward rebuilds its own; after crow/col are assigned, the old pattern's. A
    move (.to(), .float()) recorded it as the moved pattern's, so the next forward refused it from inside the
    kernels (conv) and csc() returned another pattern's index, silently. The move builds it anew: the layer's
    output, dx and csc() are those of the pattern now in crow/col (F.conv2d on the masked weights)."""
    from torch.func import functional_call
    from sparsetrain.engine.index import transpose_index
    torch.manual_seed(0)
    dense, other = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
    m1, m2 = random_mask(dense.weight.shape, 0.7), random_mask(dense.weight.shape, 0.7)
    assert int(m1.sum()) == int(m2.sum()) and not torch.equal(m1, m2)
    a, b = SparseConv2d.from_dense(dense, m1), SparseConv2d.from_dense(other, m2)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    if swap == "functional_call":
        functional_call(a, b.state_dict(), (x,))
        ref_w, ref_b, mask = dense.weight, dense.bias, m1
    else:
        with torch.no_grad():
            a.weight.crow_indices, a.weight.col_indices = b.weight.crow_indices.clone(), b.weight.col_indices.clone()
            a.weight.values.copy_(b.weight.values)
            a.bias.copy_(b.bias)
        ref_w, ref_b, mask = other.weight, other.bias, m2
    a.float()  # (a move: the same dtype and device)
    w = a.weight
    for got, want in zip(w.csc(), transpose_index(w.crow_indices, w.col_indices, 4 * 3 * 3)):
        assert torch.equal(got, want)
    g = torch.randn(2, 6, 5, 5)
    y, ref = a(x), dense_conv2d(x, ref_w.detach(), mask, ref_b.detach(), padding=1)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_phase_planes_whose_size_overflows_int64_are_refused_not_a_crash():
    """make_plan's per-sample size of the phase planes, channels * stride_h * stride_w * plane * bytes,
    overflowed int64: 262657 channels, stride 8192 and padding 990 * 8192 on a 1x1 input wrapped it to 1,
    the "padding this far past the kernel" check passed, and the forward packed x into a scratch buffer
    sized by the (also wrapped) C * xs: a segfault (the input gradient: std::bad_alloc). An output of
    more than 2^63 elements (padding 2^31 - 1) was torch's "cannot allocate 18446744039349813252 bytes".
    Each is refused with a ValueError, in a subprocess (a crash must not take the suite down); a
    1-channel conv with the same stride and a small padding still equals F.conv2d there."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import torch, torch.nn.functional as F, sparsetrain.engine.ops
        from sparsetrain.engine.formats import CSR
        o = torch.ops.sparsetrain
        def run(call):
            try:
                call()
                return "no error"
            except ValueError as e:
                return "refused: " + ("padding this far past the kernel" in str(e)) * "planes" + (
                    "more than 2^63" in str(e)) * "output"
        C, s, m = 262657, 8192, 990
        w = torch.zeros(1, C, 1, 1)
        w[0, 5, 0, 0] = 1.5
        crow, col, values, ccol, row_t, perm = [t.detach() for t in CSR.from_dense(w).index()]
        x, geo = torch.randn(1, C, 1, 1), ([1, 1], [s, s], [m * s, m * s])
        print(run(lambda: o.sparse_conv2d(x, crow, col, values, ccol, row_t, perm, *geo, None)))
        print(run(lambda: o.sparse_conv2d_stats(x, crow, col, values, ccol, row_t, perm, *geo, None, True)))
        print(run(lambda: o.sparse_conv2d_grad_input(torch.zeros(1, 1, 1981, 1981), ccol, row_t, perm, values,
                                                     [1, 1], *geo)))
        w1 = torch.ones(1, 1, 1, 1)
        idx = [t.detach() for t in CSR.from_dense(w1).index()]
        x1 = torch.randn(1, 1, 1, 1)
        print(run(lambda: o.sparse_conv2d(x1, *idx, [1, 1], [1, 1], [2**31 - 1, 2**31 - 1], None)))
        y = o.sparse_conv2d(x1, *idx, [1, 1], [s, s], [3, 3], None)
        print(torch.equal(y, F.conv2d(x1, w1, stride=s, padding=3)))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    lines = r.stdout.split("\n")
    assert lines[:3] == ["refused: planes"] * 3 and lines[3].startswith("refused: ") and lines[4] == "True", r.stdout


def test_conv_attributes_the_kernels_do_not_take_cannot_be_set():
    """dilation, groups and padding_mode (nn.Conv2d's, read by tools) are the only values the kernels
    take: setting another was kept and silently ignored (the forward stayed dilation 1); refused now,
    the layer and its output unchanged; the same value is a no-op, fused layers too."""
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = sparsetrain.SparseConv2d.from_dense(conv, random_mask(conv.weight.shape, 0.5))
    x = torch.randn(2, 3, 9, 9)
    before = layer(x)
    for name, bad in (("dilation", 2), ("dilation", (1, 2)), ("groups", 3), ("groups", True), ("padding_mode", "reflect")):
        with pytest.raises(ValueError, match=f"supports {name}=.* only, got {re.escape(repr(bad))}$"):
            setattr(layer, name, bad)
    with pytest.raises(TypeError, match="dilation must be an int or a pair of ints"):
        layer.dilation = "2"
    for name, same in (("dilation", 1), ("dilation", [1, 1]), ("groups", 1), ("padding_mode", "zeros")):
        setattr(layer, name, same)
    assert (layer.dilation, layer.groups, layer.padding_mode) == ((1, 1), 1, "zeros")
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight.to_dense(), layer.bias, 1, 1))
    assert torch.equal(layer(x), before)
    model = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU())
    sparsetrain.sparsify_(model, {"0": random_mask(conv.weight.shape, 0.5)}, fuse=True)
    with pytest.raises(ValueError, match="supports dilation="):
        model[0].dilation = 2
