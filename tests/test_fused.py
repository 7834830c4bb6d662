"""Sparse conv -> [ReLU] -> BatchNorm -> [+ residual] -> [ReLU] fused (engine/fused.py; ops
sparse_conv2d_stats, bn_act, bn_act_backward) against the same layers unfused: dense masked
F.conv2d + nn.BatchNorm2d + ReLU, outputs, every gradient and the running statistics."""
import copy
import inspect
import io
import itertools
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import sparsetrain
from sparsetrain.engine import ops
from sparsetrain.engine import fused as fused_mod
from sparsetrain.engine.fuse import fuse_, unfuse_
from sparsetrain.engine.nn import SparseConv2d
from sparsetrain.engine.fused import (FusedBatchNorm2d, FusedReLU, MaxPool2x2, SparseConvBNReLU, routed_input,
                                      sparse_conv_bn_relu)
from sparsetrain.experiment.entropy import activation_entropy
from sparsetrain.experiment.models import resnet18, vgg_like
from sparsetrain.prune import global_prune
from sparsetrain.testing import bn_stats, dense_conv2d, model_masks, random_mask, zero_pruned_

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-4, atol=2e-4)}


# ============================================================================ the ops
# (C, O, batch, hw, k, stride, pad): phase-plane kernel maps, the small-map kernel (<= 16 output
# pixels, batch >= one vector), 1x1, stride 2, batch 1, one channel, rows of >= 50 nonzeros (blocked),
# the strided 1x1 kernel (1x1 stride 2 without padding)
GEOMS = [(3, 5, 2, (9, 7), 3, 1, 1), (4, 7, 1, (5, 5), 1, 2, 0), (1, 1, 3, (1, 1), 1, 1, 0),
         (5, 3, 16, (4, 4), 3, 1, 1), (6, 9, 32, (3, 3), 3, 2, 1), (11, 6, 2, (8, 8), 3, 2, 1),
         (8, 4, 2, (6, 6), 3, 1, 1),
         (6, 5, 17, (7, 9), 1, 2, 0), (1200, 8, 2, (33, 17), 1, 2, 0)]  # strided 1x1: sample tiles, bands


@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("relu", [False, True])
def test_conv_stats_matches_conv_and_sums(geom, sparsity, relu):
    cin, cout, b, hw, k, s, p = geom
    g = torch.Generator().manual_seed(cin * 31 + cout)
    w = torch.randn(cout, cin, k, k, generator=g)
    mask = random_mask(w.shape, sparsity, generator=g, empty_rows=1 if cout > 2 else 0)
    bias = torch.randn(cout, generator=g)  # negative biases: ReLU'd bias fill of empty rows
    x = torch.randn(b, cin, *hw, generator=g)
    csr = sparsetrain.CSR.from_dense(w, mask)
    y, stats = torch.ops.sparsetrain.sparse_conv2d_stats(x, *csr.index(), [k, k], [s, s], [p, p], bias, relu)
    ref = dense_conv2d(x, w, mask, bias, stride=s, padding=p)
    if relu:
        ref = F.relu(ref)
    # fp32 tolerance: geom8 sums 1200 channels per output (~1e-4 apart from oneDNN's order on AVX-512)
    torch.testing.assert_close(y, ref, **TOL[torch.float32])
    assert stats.dtype == torch.float64 and stats.shape == (2, cout)
    torch.testing.assert_close(stats[0], ref.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats[1], bn_stats(ref)[1], rtol=1e-5, atol=1e-4)


def _bn_inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    y = torch.randn(shape, generator=g, dtype=dtype)
    scale, shift = torch.rand(c, generator=g, dtype=dtype) + 0.5, torch.randn(c, generator=g, dtype=dtype)
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    mean = torch.randn(c, generator=g, dtype=torch.float64) * 0.1
    invstd = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    return g, y, scale, shift, w, mean, invstd


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 1, 1), (4, 6, 2, 2), (3, 5, 0, 4)])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_bn_act_forward(shape, relu, residual):
    g, y, scale, shift, _, mean, _ = _bn_inputs(shape)
    r = torch.randn(shape, generator=g) if residual else None
    out = torch.ops.sparsetrain.bn_act(y, mean, scale, shift, r, relu)
    ref = (y - mean.float()[:, None, None]) * scale[:, None, None] + shift[:, None, None] + (r if residual else 0)
    torch.testing.assert_close(out, F.relu(ref) if relu else ref)
    y2 = y.clone()
    if y2.numel():
        y2.view(-1)[0] = float("nan")  # NaN propagates, as through torch.relu
        assert torch.ops.sparsetrain.bn_act(y2, mean, scale, shift, r, relu).view(-1)[0].isnan()


@pytest.mark.parametrize("hw", [8, 3])  # the plane path and the row path (maps under 64 pixels)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bn_act_is_exact_on_a_constant_channel(hw, dtype):
    """A channel whose values all equal its mean (a conv row without nonzeros outputs its bias) maps to
    exactly the BN's bias: the map is centred, (y - mean) scale + shift. The uncentred y scale + (bias -
    mean scale) rounds to bias +- |mean scale| 2^-24 (4e-3 on these 16 channels in float32; all 16 off),
    scale ~ 1/sqrt(eps) on a zero variance, which a later BN on a channel made of such values scaled up
    by 1/sqrt(eps) again (VGG-like at 99%: features 1.6% off at initialisation)."""
    g = torch.Generator().manual_seed(0)
    C = 16
    const = (torch.randn(C, generator=g) * 100).to(dtype)
    if dtype == torch.float64:  # (10 fractional bits: float64 sums of them, hence the means, are exact,
        const = (const * 1024).round() / 1024  # as the float64 sums of float32 values always are)
    y = const[None, :, None, None].repeat(2, 1, hw, hw)
    y[:, 0] = torch.randn(2, hw, hw, generator=g, dtype=dtype)  # and one channel that varies
    stats = bn_stats(y)
    weight, bias = torch.rand(C, generator=g, dtype=dtype) + 0.5, torch.randn(C, generator=g, dtype=dtype)
    mean, invstd, _, scale, shift = torch.ops.sparsetrain.bn_scale_shift(stats, 2 * hw * hw, weight, bias, None, None,
                                                                         None, 0.1, 1e-5, True, dtype)
    assert torch.equal(shift, bias)
    for relu in (False, True):
        out = torch.ops.sparsetrain.bn_act(y, mean, scale, shift, None, relu)
        want = bias.clamp_min(0) if relu else bias
        assert torch.equal(out[:, 1:], want[1:, None, None].expand_as(out[:, 1:]))
        x0 = (y[:, 0].double() - mean[0]) * invstd[0] * weight[0].double() + bias[0].double()
        torch.testing.assert_close(out[:, 0], (x0.clamp_min(0) if relu else x0).to(dtype))
        pooled, _ = torch.ops.sparsetrain.max_pool2x2(y, mean, scale, shift, relu)
        assert torch.equal(pooled, torch.ops.sparsetrain.max_pool2x2(out)[0])


def test_fused_vgg_at_99_percent_is_as_close_to_float64_as_pytorch():
    """VGG-like(5, 5) at 99% (its first conv: ~9 nonzeros for 32 rows, so constant channels feed chains of
    near-constant ones, each BN scaling their rounding up by up to 1/sqrt(eps)): the fused float32 model's
    features at initialisation against the dense masked float64 model's. With the uncentred BN map they
    were 9.3e-3 off (PyTorch's own float32 layers: 8.7e-4); centred, 1.5e-5."""
    torch.manual_seed(0)
    model = vgg_like(5, 5, 10, 3)
    masks = model_masks(model, 0.99, seed=1)
    dense = copy.deepcopy(model).double()
    zero_pruned_(dense, masks)
    sparsetrain.sparsify_(model, masks, fuse=True)
    assert sum(isinstance(m, SparseConvBNReLU) for m in model.modules()) == 10
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(123))
    feats = []
    for m in (model, dense):
        m.classifier.register_forward_hook(lambda mod, inp, out: feats.append(inp[0].detach().double()))
        m.train()(x.to(next(m.parameters()).dtype))
    torch.testing.assert_close(feats[0], feats[1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("hw", [9, 12, 16, 28, 7, 4])
@pytest.mark.parametrize("residual", [False, True])
def test_backward_relu_masks_are_the_forward_s_at_zero(hw, residual):
    """Pre-activations within a few rounding steps of 0 ((y - mean)*scale + shift rounded decides
    the sign): every backward pass recomputing the ReLU's mask gives a gradient exactly where the
    forward's output is positive, on plane sizes that end in a lone vector (9x9, 12x12 and 28x28
    with 64-byte vectors: a multiply-then-add there once disagreed with the forward's fused one)."""
    g = torch.Generator().manual_seed(hw)
    C = 16
    scale, shift = torch.rand(C, generator=g) + 0.05, -torch.rand(C, generator=g)
    mean = torch.randn(C, generator=g, dtype=torch.float64)
    base = (mean.float() - shift / scale).view(1, -1, 1, 1).expand(8, C, hw, hw)
    y = (base * (1 + torch.randint(-6, 7, base.shape, generator=g).float() * 2**-23)).contiguous()
    r = (torch.randint(-2, 3, y.shape, generator=g).float() * 2**-24) if residual else None
    out = torch.ops.sparsetrain.bn_act(y, mean, scale, shift, r, True)
    one = torch.ones(C, dtype=torch.float64)
    for batch_stats in (False, True):
        bn = (y, r, scale, shift, one, mean, one, batch_stats, True, False)
        dy, *_, dres, _ = torch.ops.sparsetrain.bn_act_backward(torch.ones_like(y), *bn, residual)
        if residual:
            assert torch.equal(dres != 0, out > 0)
        if not batch_stats:  # (eval: dy = g masked, times w * invstd = 1)
            assert torch.equal(dy != 0, out > 0)
    # the fused conv backward: a 1x1 identity conv, so dx is the dy it computes as it packs it
    idx = [t.detach() for t in sparsetrain.CSR.from_dense(torch.eye(C).view(C, C, 1, 1)).index()]
    x = torch.randn(y.shape, generator=g)
    for need_v in (True, False):
        dx, _, _, _, dres, _, _ = torch.ops.sparsetrain.sparse_conv2d_bn_backward(
            torch.ones_like(y), x, *idx, [1, 1], [1, 1], [0, 0], None, y, r, scale, shift, one, mean, one,
            False, True, False, residual, True, need_v, None, None, None, False, False)
        assert torch.equal(dx != 0, out > 0)
        if residual:
            assert torch.equal(dres != 0, out > 0)


def test_bn_act_checks_its_arguments():
    _, y, scale, shift, w, mean, invstd = _bn_inputs((2, 3, 4, 4))
    with pytest.raises(ValueError, match="scale must have shape \\[3\\]"):
        torch.ops.sparsetrain.bn_act(y, mean, scale[:2], shift, None, True)
    with pytest.raises(ValueError, match="residual must have the shape of y"):
        torch.ops.sparsetrain.bn_act(y, mean, scale, shift, y[:1], True)
    with pytest.raises(TypeError, match="mean must have dtype Double"):
        torch.ops.sparsetrain.bn_act_backward(y, y, None, scale, shift, w, mean.float(), invstd, True, True, False, False)
    with pytest.raises(TypeError, match="mean must have dtype Double"):
        torch.ops.sparsetrain.bn_act(y, mean.float(), scale, shift, None, True)
    with pytest.raises(ValueError, match="mean must have shape \\[3\\]"):
        torch.ops.sparsetrain.bn_act(y, mean[:1], scale, shift, None, True)
    with pytest.raises(ValueError, match="y must be \\[batch, channels"):
        torch.ops.sparsetrain.bn_act(y.view(-1), mean, scale, shift, None, True)


def test_ops_opcheck():
    _, y, scale, shift, w, mean, invstd = _bn_inputs((2, 3, 4, 5))
    r = torch.randn_like(y)
    torch.library.opcheck(torch.ops.sparsetrain.bn_act.default, (y, mean, scale, shift, r, True))
    torch.library.opcheck(torch.ops.sparsetrain.bn_act_backward.default,
                          (torch.randn_like(y), y, r, scale, shift, w, mean, invstd, True, True, False, True))
    g = torch.Generator().manual_seed(1)
    wt = torch.randn(4, 3, 3, 3, generator=g)
    csr = sparsetrain.CSR.from_dense(wt, random_mask(wt.shape, 0.5, generator=g))
    x = torch.randn(2, 3, 6, 5, generator=g)
    torch.library.opcheck(torch.ops.sparsetrain.sparse_conv2d_stats.default,
                          (x, *[t.detach() for t in csr.index()], [3, 3], [1, 1], [1, 1], None, True))


# (C, O, batch, hw, k, stride, pad): phase-plane kernel (dy computed while packed), with one tile and
# two channel chunks (batch 1), strided, the strided 1x1 kernel (dy computed as packed: one tile, two
# tiles of 9 and 8 samples; dy written first: bands of rows), the small-map kernel (dy written first); empty rows
# (maps of >= 64 pixels: a residual's gradient written by the BN's first pass, 81: unaligned planes)
CONV_BN = [(3, 5, 2, (9, 7), 3, 1, 1), (4, 6, 1, (8, 8), 3, 1, 1), (3, 5, 3, (9, 9), 3, 1, 1),
           (5, 4, 3, (9, 8), 3, 2, 1), (6, 7, 2, (8, 6), 1, 2, 0), (6, 5, 20, (4, 4), 3, 1, 1),
           (6, 7, 17, (16, 12), 1, 2, 0), (1200, 8, 2, (33, 17), 1, 2, 0)]
# (relu_after, relu_before, residual, grad_residual): the patterns fuse_ builds
BN_FLAGS = [(True, False, False, False), (False, False, False, False), (False, True, False, False),
            (True, False, True, True), (True, False, True, False)]


@pytest.mark.parametrize("geom", CONV_BN, ids=lambda g: f"{g[0]}-{g[1]}-b{g[2]}-{g[3]}-k{g[4]}s{g[5]}")
@pytest.mark.parametrize("flags", BN_FLAGS, ids=lambda f: "ra{}-rb{}-res{}-gres{}".format(*map(int, f)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_bn_backward_matches_its_two_ops(geom, flags, dtype):
    """sparse_conv2d_bn_backward (the BN's input gradient computed while the conv packs it) equals
    bn_act_backward followed by sparse_conv2d_backward (that gradient written out)."""
    C, O, B, hw, k, st, pad = geom
    relu_after, relu_before, residual, grad_res = flags
    g = torch.Generator().manual_seed(11)
    wt = torch.randn(O, C, k, k, generator=g, dtype=dtype)
    mask = random_mask(wt.shape, 0.6, generator=g, empty_rows=1)
    csr = sparsetrain.CSR.from_dense(wt, mask)
    idx = [t.detach() for t in csr.index()]
    x = torch.randn(B, C, *hw, generator=g, dtype=dtype)
    geo = ([k, k], [st, st], [pad, pad])
    y = torch.ops.sparsetrain.sparse_conv2d(x, *idx, *geo, None)
    if relu_before:
        y = y.clamp_min(0)
    _, _, scale, shift, w, mean, invstd = _bn_inputs(tuple(y.shape), dtype=dtype, seed=3)
    gout = torch.randn(y.shape, generator=g, dtype=dtype)
    res = torch.randn(y.shape, generator=g, dtype=dtype) if residual else None
    add = torch.randn(x.shape, generator=g, dtype=dtype)
    tol = TOL[dtype]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # batch 1: one tile in two channel chunks
    try:
        for batch_stats in (True, False):
            bn = (y, res, scale, shift, w, mean, invstd, batch_stats, relu_after, relu_before)
            dy, dw, db, dres, dsum = torch.ops.sparsetrain.bn_act_backward(gout, *bn, grad_res)
            dx, dv = torch.ops.sparsetrain.sparse_conv2d_backward(dy, x, *idx, *geo, add)
            # grad_bias=False (no conv bias): no sum dy, and dy computed only for the channels some
            # nonzero reads (empty_rows=1 leaves one unread) unless the residual's gradient needs all
            for (need_x, need_v), grad_bias in itertools.product(
                    ((True, True), (True, False), (False, True), (False, False)), (True, False)):
                got = torch.ops.sparsetrain.sparse_conv2d_bn_backward(
                    gout, x, *idx, *geo, add if need_x else None, *bn, grad_res, need_x, need_v, None, None, None,
                    False, grad_bias)
                assert got[0].numel() == (dx.numel() if need_x else 0)
                assert got[1].numel() == (dv.numel() if need_v else 0)
                if need_x:
                    torch.testing.assert_close(got[0], dx, **tol)
                if need_v:
                    torch.testing.assert_close(got[1], dv, **tol)
                for a, b in zip(got[2:5], (dw, db, dres)):
                    torch.testing.assert_close(a, b, **tol)
                if grad_bias:
                    torch.testing.assert_close(got[5], dsum, **tol)
                else:
                    assert got[5].numel() == 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("geom", [(4, 6, 2, (9, 9), 3, 1, 1), (5, 3, 3, (8, 8), 1, 1, 0), (6, 5, 3, (4, 4), 3, 1, 1),
                                  (5, 4, 3, (9, 8), 3, 2, 1), (6, 5, 3, (9, 8), 1, 2, 0)],
                         ids=lambda g: f"{g[3]}-k{g[4]}s{g[5]}")
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_bn_backward_hands_the_deferred_bn_its_sums(geom, relu, dtype):
    """With in_sums, the conv reading a deferred BN's y returns that BN's first-pass sums of dx
    (sum g, sum g (x - mean), g = dx masked by its ReLU): from the phase kernel's dx planes (stride
    1), else a pass over dx (small maps, stride 2, the strided 1x1 kernel); `sums` given back replaces a
    BN's own pass."""
    C, O, B, hw, k, st, pad = geom
    g = torch.Generator().manual_seed(5)
    wt = torch.randn(O, C, k, k, generator=g, dtype=dtype)
    mask = random_mask(wt.shape, 0.6, generator=g, empty_rows=1)
    mask[:, 0] = False  # an input channel no nonzero reads: its dx is 0 or grad_input_add
    idx = [t.detach() for t in sparsetrain.CSR.from_dense(wt, mask).index()]
    geo = ([k, k], [st, st], [pad, pad])
    x = torch.randn(B, C, *hw, generator=g, dtype=dtype)  # the deferred BN's input
    a, b = torch.rand(C, generator=g, dtype=dtype) + 0.5, torch.randn(C, generator=g, dtype=dtype)
    in_mean = torch.randn(C, generator=g, dtype=torch.float64)
    act = (x - in_mean.to(dtype)[:, None, None]) * a[:, None, None] + b[:, None, None]
    y = torch.ops.sparsetrain.sparse_conv2d(act.clamp_min(0) if relu else act, *idx, *geo, None)
    _, _, scale, shift, w, mean, invstd = _bn_inputs(tuple(y.shape), dtype=dtype, seed=3)
    gout = torch.randn(y.shape, generator=g, dtype=dtype)
    bn = (y, None, scale, shift, w, mean, invstd, True, True, False, False)
    m = (act > 0).to(dtype) if relu else torch.ones_like(x)
    for add in (None, torch.randn(x.shape, generator=g, dtype=dtype)):
        got = torch.ops.sparsetrain.sparse_conv2d_bn_backward(gout, x, *idx, *geo, add, *bn, True, True, in_mean, a,
                                                              b, relu, False, True)
        dx = got[0].double()
        ref = torch.stack([(dx * m).sum((0, 2, 3)), (dx * m * (x.double() - in_mean[:, None, None])).sum((0, 2, 3))], 1)
        torch.testing.assert_close(got[6], ref, **TOL[dtype])
        plain = torch.ops.sparsetrain.sparse_conv2d_bn_backward(gout, x, *idx, *geo, add, *bn, True, True, in_mean,
                                                                a, b, relu, False)
        assert plain[6].numel() == 0
        for u, v in zip(plain[:6], got[:6]):
            torch.testing.assert_close(u, v, **TOL[dtype])
    # this BN's own sums given (as its conv's successor hands them): the same gradients
    pre = (y.double() - mean[:, None, None]) * scale.double()[:, None, None] + shift.double()[:, None, None]
    gm = gout.double() * (pre > 0)
    own = torch.stack([gm.sum((0, 2, 3)), (gm * (y.double() - mean[:, None, None])).sum((0, 2, 3))], 1)
    args = (gout, x, *idx, *geo, None, *bn, True, True, in_mean, a, b, relu, False)
    base, given = (torch.ops.sparsetrain.sparse_conv2d_bn_backward(*args, False, s) for s in (None, own))
    for u, v in zip(base[:6], given[:6]):
        torch.testing.assert_close(u, v, **TOL[dtype])


@pytest.mark.parametrize("geom", [(3, 5, 2, (16, 16), 3, 1, 1), (4, 6, 1, (17, 19), 3, 1, 1), (3, 4, 2, (32, 16), 1, 1, 0),
                                  (3, 5, 2, (8, 8), 3, 1, 1), (5, 3, 16, (4, 4), 3, 1, 1), (4, 6, 2, (32, 32), 1, 2, 0)],
                         ids=lambda g: f"{g[3]}-b{g[2]}-k{g[4]}s{g[5]}")
@pytest.mark.parametrize("relu_after", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sparsity", [0.5, 1.0])
def test_conv_bn_backward_unpools_a_pooled_gradient(geom, relu_after, dtype, sparsity):
    """With pool_indices, grad_out is the gradient of the BN output's 2x2 max-pool: the op equals
    itself given that gradient unpooled (max_pool2x2_backward), bit for bit: on maps of >= 256
    pixels both passes unpool it per plane (fixed-width rows, or odd sides whose last row and column
    get 0); smaller maps (8x8; 4x4 on the small-map kernel) and the BN-only path get it written out
    first."""
    C, O, B, hw, k, st, pad = geom
    g = torch.Generator().manual_seed(9)
    wt = torch.randn(O, C, k, k, generator=g, dtype=dtype)
    mask = random_mask(wt.shape, sparsity, generator=g, empty_rows=1)  # (1.0: no nonzeros, the conv's empty path)
    idx = [t.detach() for t in sparsetrain.CSR.from_dense(wt, mask).index()]
    geo = ([k, k], [st, st], [pad, pad])
    x = torch.randn(B, C, *hw, generator=g, dtype=dtype)
    y = torch.ops.sparsetrain.sparse_conv2d(x, *idx, *geo, None).clamp_min(0)
    _, _, scale, shift, w, mean, invstd = _bn_inputs(tuple(y.shape), dtype=dtype, seed=4)
    pooled, pidx = torch.ops.sparsetrain.max_pool2x2(y, mean, scale, shift, relu_after)
    gp = torch.randn(pooled.shape, generator=g, dtype=dtype)
    full = torch.ops.sparsetrain.max_pool2x2_backward(gp, pidx, list(y.shape[2:]))
    add = torch.randn(x.shape, generator=g, dtype=dtype)
    for batch_stats, (need_x, need_v) in itertools.product((True, False), ((True, True), (False, True), (False, False))):
        args = (x, *idx, *geo, add if need_x else None, y, None, scale, shift, w, mean, invstd, batch_stats,
                relu_after, True, False, need_x, need_v, None, None, None, False, True)
        want = torch.ops.sparsetrain.sparse_conv2d_bn_backward(full, *args)
        got = torch.ops.sparsetrain.sparse_conv2d_bn_backward(gp, *args, False, None, pidx)
        for u, v in zip(got, want):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    bad = pidx.clone()
    bad.view(-1)[-1] = 4  # not a window position: refused on every path (given sums too), never a dropped gradient
    args = (x, *idx, *geo, None, y, None, scale, shift, w, mean, invstd, True, relu_after, True, False, True, True)
    sums = torch.zeros(y.shape[1], 2, dtype=torch.float64)
    for given in (None, sums):
        with pytest.raises(ValueError, match=r"window positions \(0 to 3\)"):
            torch.ops.sparsetrain.sparse_conv2d_bn_backward(gp, *args, None, None, None, False, True, False, given, bad)


def test_conv_bn_backward_opcheck_and_errors():
    _, y, scale, shift, w, mean, invstd = _bn_inputs((2, 4, 6, 5))
    g = torch.Generator().manual_seed(1)
    wt = torch.randn(4, 3, 3, 3, generator=g)
    idx = [t.detach() for t in sparsetrain.CSR.from_dense(wt, random_mask(wt.shape, 0.5, generator=g)).index()]
    x, r = torch.randn(2, 3, 6, 5, generator=g), torch.randn_like(y)
    args = (torch.randn_like(y), x, *idx, [3, 3], [1, 1], [1, 1], torch.randn_like(x), y, r, scale, shift, w, mean,
            invstd, True, True, False, True, True, True)
    torch.library.opcheck(torch.ops.sparsetrain.sparse_conv2d_bn_backward.default, args)
    torch.library.opcheck(torch.ops.sparsetrain.sparse_conv2d_bn_backward.default,
                          args + (None, None, None, False, False))
    a, b, m3 = torch.rand(3) + 0.5, torch.randn(3), torch.randn(3, dtype=torch.float64)
    sums = torch.randn(4, 2, dtype=torch.float64)
    torch.library.opcheck(torch.ops.sparsetrain.sparse_conv2d_bn_backward.default,
                          args + (m3, a, b, True, False, True, sums))
    with pytest.raises(ValueError, match="in_sums needs in_mean, in_scale and in_shift"):
        torch.ops.sparsetrain.sparse_conv2d_bn_backward(*args, None, None, None, False, False, True)
    with pytest.raises(ValueError, match="in_mean, in_scale and in_shift must be given together"):
        torch.ops.sparsetrain.sparse_conv2d_bn_backward(*args, None, a, b, False)
    with pytest.raises(TypeError, match="in_mean must have dtype Double"):
        torch.ops.sparsetrain.sparse_conv2d_bn_backward(*args, m3.float(), a, b, False)
    with pytest.raises(ValueError, match="sums must be float64"):
        torch.ops.sparsetrain.sparse_conv2d_bn_backward(*args, None, None, None, False, False, False, sums[:3])
    with pytest.raises(ValueError, match="relu_before and a residual do not combine"):
        torch.ops.sparsetrain.sparse_conv2d_bn_backward(*args[:19], True, True, True, True, True, True)
    with pytest.raises(ValueError, match="residual must have the shape of y"):
        torch.ops.sparsetrain.sparse_conv2d_bn_backward(*args[:13], r[:1], *args[14:])
    with pytest.raises(ValueError, match="grad_residual needs a residual and relu_after"):
        torch.ops.sparsetrain.sparse_conv2d_bn_backward(*args[:13], None, *args[14:])
    # a pooled layer's gradient: [2, 4, 3, 2] with its window positions
    gp, pidx = torch.randn(2, 4, 3, 2, generator=g), torch.randint(0, 4, (2, 4, 3, 2), generator=g, dtype=torch.uint8)
    plain = (gp, *args[1:13], None, *args[14:19], True, False, True, False, True, True)  # (relu_before, no residual)
    torch.library.opcheck(torch.ops.sparsetrain.sparse_conv2d_bn_backward.default,
                          plain + (None, None, None, False, True, False, None, pidx))
    with pytest.raises(ValueError, match="pool_indices and a residual do not combine"):
        torch.ops.sparsetrain.sparse_conv2d_bn_backward(*args, None, None, None, False, True, False, None, pidx)
    with pytest.raises(TypeError, match="pool_indices must have dtype"):
        torch.ops.sparsetrain.sparse_conv2d_bn_backward(*plain, None, None, None, False, True, False, None, pidx.long())
    with pytest.raises(ValueError, match="pool_indices must have grad_out's shape"):
        torch.ops.sparsetrain.sparse_conv2d_bn_backward(*plain, None, None, None, False, True, False, None, pidx[:1])
    with pytest.raises(ValueError, match=r"grad_out must have the shape of y .* pooled 2x2"):
        torch.ops.sparsetrain.sparse_conv2d_bn_backward(args[0], *plain[1:], None, None, None, False, True, False, None, pidx)
    # y (and its pooled gradient) of another size than the conv's output: refused, never read past it
    small = (gp[:, :, :2], *plain[1:12], torch.randn(2, 4, 4, 4, generator=g), *plain[13:])
    with pytest.raises(ValueError, match=r"y must have the conv's output shape \[2, 4, 6, 5\], got \[2, 4, 4, 4\]"):
        torch.ops.sparsetrain.sparse_conv2d_bn_backward(*small, None, None, None, False, True, False, None, pidx[:, :, :2])


# ============================================================================ the fused layer
def _block(order: str, cin=5, cout=7, k=3, s=1, p=1, bias=False, dtype=torch.float64, seed=0, **bn_kw):
    """(unfused reference with a dense masked conv, fused sparse copy, mask) for an nn.Sequential
    conv -> ... in `order` ("bn", "bn_relu", "relu_bn")."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=bias)
    bn = nn.BatchNorm2d(cout, **bn_kw)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    if bn.track_running_stats:
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    layers = {"bn": [("conv", conv), ("bn", bn)], "bn_relu": [("conv", conv), ("bn", bn), ("relu", nn.ReLU())],
              "relu_bn": [("conv", conv), ("relu", nn.ReLU()), ("bn", bn)]}[order]
    ref = nn.Sequential(OrderedDict(layers)).to(dtype)
    return ref, conv


def _fused_pair(order, sparsity, dtype=torch.float64, **kw):
    ref, conv = _block(order, dtype=dtype, **kw)
    mask = random_mask(conv.weight.shape, sparsity, generator=torch.Generator().manual_seed(7), empty_rows=1)
    zero_pruned_(ref, {"conv": mask})  # (ref.conv is conv)
    fused = copy.deepcopy(ref)
    sparsetrain.sparsify_(fused, {"conv": mask}, fuse=True)
    assert isinstance(fused.conv, SparseConvBNReLU) and isinstance(fused.bn, FusedBatchNorm2d)
    return ref, fused, mask


def test_a_fused_bn_cast_by_module_type_says_what_to_use_instead():
    """Module.type(torch.DoubleTensor) casts every buffer, BN's int64 num_batches_tracked too: nn.BatchNorm2d trains
    on, the fused op needs the int64 counter; its TypeError names .type() and what keeps the counter."""
    ref, fused, mask = _fused_pair("bn_relu", 0.5, dtype=torch.float32)
    fused.type(torch.DoubleTensor)
    with pytest.raises(TypeError, match=r"num_batches_tracked .* torch.float64 .*Module.type\(\) casts it: "
                                        r"\.double\(\) or \.to\(dtype\) keep it"):
        fused(torch.randn(2, 5, 6, 6, dtype=torch.float64))
    fused.bn.num_batches_tracked = fused.bn.num_batches_tracked.long()  # (as .double() leaves it)
    fused(torch.randn(2, 5, 6, 6, dtype=torch.float64))


def _compare(ref, fused, mask, x, dtype, steps=2, tol=None):
    """Forward and backward `steps` times in the current mode; outputs, grads, running stats."""
    tol = tol or TOL[dtype]
    for i in range(steps):
        xr = x.clone().requires_grad_()
        xf = x.clone().requires_grad_()
        out_r, out_f = ref(xr), fused(xf)
        torch.testing.assert_close(out_f, out_r, **tol)
        gout = torch.randn_like(out_r)
        (out_r * gout).sum().backward()
        (out_f * gout).sum().backward()
        torch.testing.assert_close(xf.grad, xr.grad, **tol)
        torch.testing.assert_close(fused.conv.weight.values.grad, ref.conv.weight.grad[mask], **tol)
        for name in ("weight", "bias"):
            pr, pf = getattr(ref.bn, name), getattr(fused.bn, name)
            if pr is not None:
                torch.testing.assert_close(pf.grad, pr.grad, **tol)
        if ref.conv.bias is not None:
            torch.testing.assert_close(fused.conv.bias.grad, ref.conv.bias.grad, **tol)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            br, bf = getattr(ref.bn, name), getattr(fused.bn, name)
            if br is not None:
                torch.testing.assert_close(bf, br, **tol)
        for m in (ref, fused):
            m.zero_grad(set_to_none=True)


@pytest.mark.parametrize("order", ["bn", "bn_relu", "relu_bn"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("hw", [(9, 8), (3, 2)])  # BN passes by planes, and by sample rows (maps < 64 pixels)
def test_fused_matches_unfused(order, sparsity, training, hw):
    ref, fused, mask = _fused_pair(order, sparsity, bias=order == "relu_bn")
    ref.train(training), fused.train(training)
    x = torch.randn(3, 5, *hw, dtype=torch.float64)
    _compare(ref, fused, mask, x, torch.float64)


@pytest.mark.parametrize("geom", [dict(k=1, s=2, p=0), dict(k=3, s=2, p=1), dict(cin=1, cout=2, k=3, s=1, p=0)])
@pytest.mark.parametrize("bn_kw", [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
                                   dict(eps=1e-2, momentum=0.3)])
def test_fused_float32_geometries_and_batchnorm_options(geom, bn_kw):
    ref, fused, mask = _fused_pair("bn_relu", 0.7, dtype=torch.float32, **geom, **bn_kw)
    x = torch.randn(4, geom.get("cin", 5), 8, 8)
    for training in (True, False):
        ref.train(training), fused.train(training)
        _compare(ref, fused, mask, x, torch.float32, steps=3)


def test_batch_one_and_small_maps():
    ref, fused, mask = _fused_pair("bn_relu", 0.5, dtype=torch.float32, cin=6, cout=9)
    _compare(ref, fused, mask, torch.randn(32, 6, 3, 3), torch.float32)  # the small-map kernel
    _compare(ref, fused, mask, torch.randn(1, 6, 5, 3), torch.float32)  # batch 1
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 6, 1, 1))


def test_a_lone_fused_layers_train_eval_and_to_reach_its_batchnorm():
    """A SparseConvBNReLU built directly with owns_bn=False holds its BN by reference, not as a submodule:
    layer.eval() left the BN training (batch statistics, running stats updated: a wrong answer), layer.double()
    left it float32. Now both reach it, as the same Sequential's would; in a fused model the BN keeps its own mode
    (frozen). (Built directly by default, the layer owns its BN: tests/test_fused_layer.py.)"""
    ref, fused, _ = _fused_pair("bn_relu", 0.5, dtype=torch.float32)
    bn = FusedBatchNorm2d(7)
    bn.load_state_dict(ref.bn.state_dict())
    layer = SparseConvBNReLU(fused.conv.to_conv(), bn, relu_after=True, owns_bn=False).double()
    ref.double()
    assert all(t.dtype == torch.float64 for t in (bn.weight, bn.running_mean, bn.running_var))
    x = torch.randn(3, 5, 6, 6, dtype=torch.float64)
    for training in (False, True, False):
        ref.train(training), layer.train(training)
        assert bn.training is training
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                torch.testing.assert_close(bn(layer(x)), ref(x), **TOL[torch.float64])
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(getattr(bn, name), getattr(ref.bn, name), **TOL[torch.float64])
    ref, _ = _block("bn_relu")
    ref.bn.eval()  # a frozen BN in a training model: fuse_ and the fused conv's train() leave it frozen
    fused = copy.deepcopy(ref)
    sparsetrain.sparsify_(fused, {"conv": torch.ones_like(ref.conv.weight, dtype=torch.bool)}, fuse=True)
    fused.conv.train()
    assert isinstance(fused.conv, SparseConvBNReLU) and fused.conv.training and not fused.bn.training
    torch.testing.assert_close(fused(x), ref(x), **TOL[torch.float64])


def test_a_lone_fused_layers_batchnorm_is_trained_and_saved_beside_it():
    """A SparseConvBNReLU built with owns_bn=False holds its BN by reference (as a fused model's, whose BN is its
    own module, at its name): layer.parameters() and state_dict() leave the BN out, as its docstring and the
    README say; an optimizer over the layer's and the BN's parameters steps as the dense masked conv -> BN -> ReLU
    does, and the two state_dicts restore it."""
    ref, fused, mask = _fused_pair("bn_relu", 0.5)
    bn = FusedBatchNorm2d(7).double()
    bn.load_state_dict(ref.bn.state_dict())
    layer = SparseConvBNReLU(fused.conv.to_conv(), bn, relu_after=True, owns_bn=False)
    assert not {id(p) for p in bn.parameters()} & {id(p) for p in layer.parameters()}
    assert not [k for k in layer.state_dict() if k.startswith("bn")]
    unstepped = copy.deepcopy(fused.conv).to_conv()  # (layer shares fused.conv's CSR and bias: stepped with it)
    opt = torch.optim.SGD([*layer.parameters(), *bn.parameters()], lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64)
    for _ in range(2):
        for o, out in ((opt, bn(layer(x))), (opt_ref, ref(x))):
            o.zero_grad()
            out.square().sum().backward()
        ref.conv.weight.grad.mul_(mask)
        opt.step(), opt_ref.step()
    torch.testing.assert_close(bn.weight, ref.bn.weight, **TOL[torch.float64])
    torch.testing.assert_close(bn(layer(x)), ref(x), **TOL[torch.float64])
    bn2 = FusedBatchNorm2d(7).double()
    bn2.load_state_dict(bn.state_dict())
    again = SparseConvBNReLU(unstepped, bn2, relu_after=True, owns_bn=False)
    assert not torch.equal(again.weight.values, layer.weight.values)
    again.load_state_dict(layer.state_dict())
    torch.testing.assert_close(bn2(again(x)), ref(x), **TOL[torch.float64])


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_inputs_float64(training):
    """gradcheck w.r.t. the input and the residual (conv -> BN -> + residual -> ReLU)."""
    _, fused, _ = _fused_pair("bn_relu", 0.4, cin=2, cout=3)
    fused.train(training)
    x = torch.randn(2, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    f = lambda x, r: sparse_conv_bn_relu(x, fused.conv, fused.bn, relu_after=True, residual=r)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, r), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_parameters_float64(training):
    """gradcheck w.r.t. the conv values and the BN affine parameters, through a functional call."""
    _, fused, _ = _fused_pair("relu_bn", 0.4, cin=2, cout=3, bias=True)
    fused.train(training)
    x = torch.randn(2, 2, 4, 3, dtype=torch.float64)
    names = ["conv.weight.values", "conv.bias", "bn.weight", "bn.bias"]
    params = dict(fused.named_parameters())
    start = tuple(params[n].detach().clone().requires_grad_() for n in names)

    def f(*values):
        return torch.func.functional_call(fused, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(f, start, eps=1e-6, atol=1e-6)


def test_residual_and_call_errors():
    _, fused, _ = _fused_pair("bn_relu", 0.5)
    with pytest.raises(ValueError, match="without a residual"):
        fused.conv(torch.randn(2, 5, 4, 4, dtype=torch.float64), torch.randn(2, 7, 4, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="its fused conv did not produce"):
        fused.bn(torch.randn(2, 7, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="must be 4-D"):
        fused.conv(torch.randn(5, 4, 4, dtype=torch.float64))


def test_batchnorm_argument_checks_as_pytorch():
    """F.batch_norm's checks: eps > 0 with batch statistics, eps >= 0 otherwise (the folded eval too),
    more than one value per channel with batch statistics (training, or eval without running
    statistics); an empty training batch behaves as in nn.BatchNorm2d (an empty output, the running
    statistics kept, num_batches_tracked counted; it was refused)."""
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    ref, fused, _ = _fused_pair("bn_relu", 0.5, eps=0.0)
    for m in (ref, fused):
        with pytest.raises(ValueError, match="eps must be positive during training, but got 0.0"):
            m(x)
        m.bn.eps = -1e-3
        m.eval()
        for grad in (True, False):  # (without autograd: the BN folded into the conv)
            with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="eps must be non-negative"):
                m(x)
    ref, fused, _ = _fused_pair("bn", 0.5, track_running_stats=False)
    for m in (ref.eval(), fused.eval()):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            m(torch.randn(1, 5, 1, 1, dtype=torch.float64))
    for pattern in ("bn", "bn_relu", "relu_bn"):
        ref, fused, _ = _fused_pair(pattern, 0.5)
        outs = []
        for m in (ref, fused):
            x0 = torch.randn(0, 5, 4, 4, dtype=torch.float64, requires_grad=True)
            out = m(x0)
            out.sum().backward()
            outs.append((out.shape, x0.grad.shape, m.bn.running_mean.clone(), m.bn.running_var.clone(),
                         int(m.bn.num_batches_tracked), m.bn.weight.grad))
        assert outs[0][:2] == outs[1][:2] and outs[1][4] == 1
        for a, b in zip(outs[0][2:], outs[1][2:]):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_a_batchnorm_tensor_of_the_wrong_size_dtype_or_device_is_named(training, grad):
    """bn_scale_shift's C++ checks named neither the BN nor its attribute ("running_var must be a 1-D floating CPU
    tensor of 7 channels", "weight ..." for a bad bias), the folded eval raised torch's "The size of tensor a (8)
    must match ...": now a ValueError/TypeError naming bn.<tensor> before anything runs (running stats kept)."""
    f64 = torch.float64
    cases = [("weight", nn.Parameter(torch.ones(8, dtype=f64)), ValueError),
             ("bias", nn.Parameter(torch.zeros(7, 1, dtype=f64)), ValueError),
             ("bias", nn.Parameter(torch.zeros(7, dtype=f64, device="meta")), ValueError),
             ("running_var", torch.ones(8, dtype=f64), ValueError),
             ("running_mean", torch.zeros(7, dtype=torch.int64), TypeError)]
    if training:  # (read only to be updated: an eval BN takes mixed dtypes, as the C++ op does)
        cases += [("running_var", torch.ones(7), TypeError), ("running_var", torch.ones(14, dtype=f64)[::2], ValueError),
                  ("num_batches_tracked", torch.tensor(0.0), TypeError)]
    x = torch.randn(2, 5, 4, 4, dtype=f64)
    for name, bad, error in cases:
        ref, fused, _ = _fused_pair("bn_relu", 0.5)
        fused.train(training)
        setattr(fused.bn, name, bad)
        kept = {k: v.clone() for k, v in fused.bn.state_dict().items() if k.split(".")[-1] != name}
        with torch.set_grad_enabled(grad), pytest.raises(error, match=rf"^bn\.(running_mean and bn\.)?{name} \(FusedBatchNorm2d\) must"):
            fused(x)
        for k, v in fused.bn.state_dict().items():  # (as the unfused BN's: nothing ran)
            if k in kept:
                torch.testing.assert_close(v, kept[k])
                torch.testing.assert_close(v, ref.bn.state_dict()[k])


@pytest.mark.parametrize("k, hw, b", [(1, (16, 16), 2), (1, (32, 32), 2), (3, (12, 12), 2), (3, (4, 4), 16),
                                       (1, (8, 8), 32)])
def test_batch_statistics_of_maps_whose_first_output_is_atypical(k, hw, b):
    """Maps of a few values a channel whose corner is far from the rest (the first row and column scaled, as
    EfficientNet-B0's at 99%): the epilogue's float sums are of deviations from an origin, and the variance,
    b/n - (a/n)^2 of them, cancels by ((mean - origin) / std)^2; the corner as origin put the variance ~1e-4
    off (BN scale 1e-5 off). The origin is the median of three interior outputs (shift_origin): the variance to
    ~1e-6 of float64's, on every kernel path (phase planes, the small-map kernel, the strided 1x1 bands)."""
    g = torch.Generator().manual_seed(3)
    C, O = 24, 12
    x = (torch.randn(b, C, 1, 1, generator=g) + 1).expand(b, C, *hw).contiguous()
    x[:, :, 0] *= 8.0
    x[:, :, :, 0] *= 4.0
    wt = torch.randn(O, C, k, k, generator=g)
    mask = random_mask(wt.shape, 0.8, generator=g)
    idx = sparsetrain.CSR.from_dense(wt, mask).index()
    pad = k // 2
    for relu in (False, True):
        y, stats = torch.ops.sparsetrain.sparse_conv2d_stats(x, *idx, [k, k], [1, 1], [pad, pad], None, relu)
        ref = dense_conv2d(x.double(), wt.double(), mask, padding=pad)
        ref = ref.clamp_min(0) if relu else ref
        n = ref[:, 0].numel()
        mean, var = stats[0] / n, stats[1] / n
        want = ref.var((0, 2, 3), unbiased=False)
        live = want > 1e-6 * ref.abs().amax((0, 2, 3)) ** 2  # (channels with a variance to measure)
        assert live.sum() >= O // 2
        torch.testing.assert_close(mean, ref.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(var[live], want[live], rtol=2e-6, atol=0)


def test_batch_statistics_of_an_activation_far_from_zero():
    """float32 activations whose mean is ~3000x their spread (a conv bias of 1000): the kernels' float
    partial sums are of deviations from a sample output, so the variance survives (sums of raw y^2
    in float lost it: the normalised outputs were off by ~0.1, and by ~400 at a bias of 1e4)."""
    for hw in ((8, 8), (3, 3)):  # the phase planes, and the small-map kernel
        ref, fused, _ = _fused_pair("bn", 0.5, dtype=torch.float32)
        for m in (ref, fused):
            m.conv.bias = nn.Parameter(torch.full((7,), 1000.0))
        fused.conv.bias = ref.conv.bias
        x = torch.randn(8, 5, *hw, generator=torch.Generator().manual_seed(2))
        out_r, out_f = ref(x), fused(x)
        live = out_r.std((0, 2, 3)) > 0.1  # (not the empty row's constant channel: var 0, the affine
        # form's shift -mean * w / sqrt(eps) ~ 3e5 is beyond float rounding there)
        assert live.sum() == 6
        torch.testing.assert_close(out_f[:, live], out_r[:, live], rtol=0, atol=5e-3)  # (y's own rounding)
        torch.testing.assert_close(fused.bn.running_var, ref.bn.running_var, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("bias", [1e2, 1e4, 1e6, 1e7])
@pytest.mark.parametrize("order, hw", [("bn", (8, 8)), ("relu_bn", (3, 3))])  # the phase planes, the small-map kernel
def test_float64_batch_statistics_of_an_activation_far_from_zero(bias, order, hw):
    """float64 activations whose mean is up to ~2e7x their spread keep nn.BatchNorm2d's float64 precision:
    the variance was E[y^2] - mean^2 in double, off by ~(mean/std)^2 1e-16 (4e-9 of the output at a conv
    bias of 1e3, 6e-4 at 1e6, 33x at 1e7); the centred sums (summed again about the mean for such
    channels, centre_stats) are not. What is left is y's own rounding (the kernel adds the products to
    the bias, ~ulp(bias) each: ~2e-14 bias of the outputs, ~1e-13 bias of the weight gradients, sums of
    512 products). The empty row's channel (act(bias) throughout) has variance 0, as BatchNorm's."""
    ref, fused, mask = _fused_pair(order, 0.5)
    for m in (ref, fused):
        m.conv.bias = nn.Parameter(torch.full((7,), bias, dtype=torch.float64))
    fused.conv.bias = ref.conv.bias
    x = torch.randn(8, 5, *hw, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _compare(ref, fused, mask, x, torch.float64, tol=dict(rtol=1e-9, atol=max(1e-9, 1e-13 * bias)))


def test_a_hook_added_to_a_fused_bn_that_returns_another_tensor_is_refused_by_the_relu_after_it():
    """conv -> BN -> ReLU fused: the BN placeholder returns the activation after the ReLU, so a forward
    hook added to it afterwards that returns another tensor was applied after the ReLU, silently (the
    output went below 0). The ReLU refuses what its layer did not hand it, naming the hook; a hook that
    only observes, or returns a view of the same elements, passes; the unfused order conv -> ReLU ->
    BN keeps the hook's tensor, as unfused."""
    ref, conv = _block("bn_relu")
    mask = random_mask(conv.weight.shape, 0.5, generator=torch.Generator().manual_seed(8))
    zero_pruned_(ref, {"conv": mask})  # (ref.conv is conv)
    model = copy.deepcopy(ref)
    sparsetrain.sparsify_(model, {"conv": mask}, fuse=True)
    assert isinstance(model.relu, FusedReLU)
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    handle = model.bn.register_forward_hook(lambda m, i, o: o - 0.5)
    with pytest.raises(RuntimeError, match="FusedReLU was called on a tensor its fused conv did not hand it: a "
                       r"hook added after fuse_\(\) changed it \(a forward pre-hook on this ReLU, or a forward hook "
                       "on the module before it"):
        model(x)
    handle.remove()
    for hook in (lambda m, i, o: None, lambda m, i, o: o.view_as(o)):
        handle = model.bn.register_forward_hook(hook)
        torch.testing.assert_close(model(x), ref(x), **TOL[torch.float64])
        handle.remove()
    ref_vgg, conv_vgg = _block("relu_bn")
    fused_vgg = copy.deepcopy(ref_vgg)
    sparsetrain.sparsify_(fused_vgg, {"conv": torch.ones_like(conv_vgg.weight, dtype=torch.bool)}, fuse=True)
    for m in (ref_vgg, fused_vgg):
        m.bn.register_forward_hook(lambda m, i, o: o - 0.5)
    torch.testing.assert_close(fused_vgg(x), ref_vgg(x), **TOL[torch.float64])


def test_hooks_registered_before_fuse_keep_firing():
    """fuse_ (and sparsify_) move a replaced module's hooks to the module at its name: a forward hook
    on the ReLU sees the same activation as unfused; a conv or BN with a hook, or a ReLU with a full
    backward hook, stays unfused (the fused layer's placeholders pass its tensors on); a full
    backward hook added to a fused BN or ReLU afterwards is refused by name."""
    ref, conv = _block("bn_relu")
    mask = random_mask(conv.weight.shape, 0.5, generator=torch.Generator().manual_seed(7))
    zero_pruned_(ref, {"conv": mask})  # (ref.conv is conv)
    seen = {}
    model = copy.deepcopy(ref)
    for m in (ref, model):
        m.relu.register_forward_hook(lambda mod, i, o, k=m is ref: seen.update({k: o.clone()}))
    conv_seen = []
    handles = [model.conv.register_forward_hook(lambda mod, i, o: conv_seen.append(type(mod).__name__)),
               model.bn.register_forward_pre_hook(lambda mod, i: None),
               model.relu.register_full_backward_hook(lambda *a: None)]
    sparsetrain.sparsify_(model, {"conv": mask})
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    model(x)
    assert conv_seen == ["SparseConv2d"]  # sparsify_ kept the conv's hook
    for h in handles:  # each watched module keeps the layer unfused; the handles still remove the hooks
        assert fuse_(model) == [] and type(model.conv).__name__ == "SparseConv2d"
        h.remove()
    assert fuse_(model) == ["conv"] and isinstance(model.relu, FusedReLU)
    ref(x), model(x)
    torch.testing.assert_close(seen[False], seen[True], **TOL[torch.float64])
    for name in ("bn", "relu"):
        handle = getattr(model, name).register_full_backward_hook(lambda *a: None)
        with pytest.raises(RuntimeError, match="full backward hook on a fused Fused"):
            model(x)
        handle.remove()
    model(x).sum().backward()


def test_a_pre_hook_on_the_relu_after_keeps_it_out_and_hooks_added_later_are_named():
    """A forward pre-hook on the ReLU after the BN, registered before fuse_, may change its input:
    conv -> BN is fused alone and the real ReLU runs the hook (before, every forward was refused).
    A pre-hook added afterwards that changes a placeholder's input is refused with a message naming
    pre-hooks."""
    ref, conv = _block("bn_relu")
    mask = random_mask(conv.weight.shape, 0.5, generator=torch.Generator().manual_seed(7))
    zero_pruned_(ref, {"conv": mask})  # (ref.conv is conv)
    ref.relu.register_forward_pre_hook(lambda mod, i: (i[0] - 0.5,))
    model = copy.deepcopy(ref)
    sparsetrain.sparsify_(model, {"conv": mask}, fuse=True)
    assert type(model.conv).__name__ == "SparseConvBNReLU" and not model.conv.relu_after
    assert type(model.relu) is nn.ReLU
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), ref(x), **TOL[torch.float64])
    model, _ = _block("bn_relu")
    sparsetrain.sparsify_(model, {"conv": mask}, fuse=True)
    for name in ("bn", "relu"):
        handle = getattr(model, name).register_forward_pre_hook(lambda mod, i: (i[0] + 1,))
        with pytest.raises(RuntimeError, match=f"a forward pre-hook on this {'BN' if name == 'bn' else 'ReLU'}"):
            model(x)
        handle.remove()
        model(x)  # (the refusal is not taken for a skipped module)


# ============================================================================ models
class _Res(nn.Module):
    """A residual CNN small enough for 30 steps: stem conv-bn-relu, a block with the shortcut
    passed to the fused conv, conv -> relu -> bn (VGG order), pool, linear."""

    fused_residual = {"conv2": ("bn2", "relu2")}
    fused_route_input = "conv1"

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0, self.relu0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv3, self.relu3, self.bn3 = nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU(), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.relu0(self.bn0(self.conv0(x)))
        out = self.conv1(x)
        x = routed_input(self.conv1, x)  # the shortcut's gradient joins conv1's input gradient in its kernel
        out = self.relu1(self.bn1(out))
        if getattr(self.conv2, "residual", False):
            x = self.relu2(self.bn2(self.conv2(out, x)))
        else:
            x = self.relu2(self.bn2(self.conv2(out)) + x)
        x = self.bn3(self.relu3(self.conv3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_thirty_steps_follow_the_unfused_trajectory():
    torch.manual_seed(0)
    base = _Res().double()
    masks = model_masks(base, 0.6)
    unfused, fused = copy.deepcopy(base), copy.deepcopy(base)
    sparsetrain.sparsify_(unfused, masks)
    sparsetrain.sparsify_(fused, masks, fuse=True)
    kinds = {n: type(m).__name__ for n, m in fused.named_modules()}
    assert kinds["conv2"] == "SparseConvBNReLU" and fused.conv2.residual and fused.conv3.relu_before
    assert fused.conv1.route_input and not (fused.conv0.route_input or fused.conv2.route_input)
    assert [kinds[n] for n in ("bn0", "relu0", "relu2", "relu3", "bn3")] == \
        ["FusedBatchNorm2d", "FusedReLU", "FusedReLU", "FusedReLU", "FusedBatchNorm2d"]
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) for m in (unfused, fused)]
    g = torch.Generator().manual_seed(1)
    for step in range(30):
        x = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
        t = torch.randint(0, 5, (6,), generator=g)
        losses = []
        for m, opt in zip((unfused, fused), opts):
            opt.zero_grad()
            loss = F.cross_entropy(m(x), t)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-9, abs=1e-9), step
    for (n, a), b in zip(unfused.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-8, msg=n)
    unfused.eval(), fused.eval()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fused(x), unfused(x), rtol=1e-9, atol=1e-9)
    # the entropy of Eq. 1 sees the same activations through the FusedReLU placeholders
    e_f, e_u = activation_entropy(fused, [x]), activation_entropy(unfused, [x])
    assert e_f["per_layer"] == pytest.approx(e_u["per_layer"]) and set(e_f["per_layer"]) == set(e_u["per_layer"])


def test_deferred_batchnorm_links_and_equal_steps(monkeypatch):
    """conv1 -> bn1 -> relu1 -> conv2: conv1 hands on y and conv2 applies bn1 + relu1 while packing
    (the activation is never written), and hands bn1's backward sums back; the step equals the one
    with the activation written (its forward bit for bit)."""
    torch.manual_seed(0)
    model = _Res().double()
    sparsetrain.sparsify_(model, model_masks(model, 0.6), fuse=True)
    assert model.conv1.feeds is model.conv2 and model.conv0.feeds is None and model.conv2.feeds is None
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, SparseConvBNReLU):
            object.__setattr__(m, "feeds", None)  # the activation written out
    x, t = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,))
    calls = []
    for m in (model, ref):
        with torch.profiler.profile() as prof:
            F.cross_entropy(m(x), t).backward()
        calls.append(sum(e.name == "sparsetrain::bn_act" for e in prof.events()))
    assert calls == [3, 4]  # bn1's activation is not written: conv2 packs bn1 + relu1 of conv1's y
    # conv2's backward hands bn1 its first-pass sums (from dx's planes; summed in another order)
    handed = []
    op = torch.ops.sparsetrain.sparse_conv2d_bn_backward
    monkeypatch.setattr(torch.ops.sparsetrain, "sparse_conv2d_bn_backward",
                        lambda *a: handed.append((a[-3], a[-2] is not None)) or op(*a))  # in_sums, sums
    for m in (model, ref):
        for p in m.parameters():
            p.grad = None
        F.cross_entropy(m(x), t).backward()
    assert handed.count((True, False)) == 1 and handed.count((False, True)) == 1  # conv2 -> conv1, in the model only
    for (n, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12, msg=n)
    for (n, a), b in zip(ref.named_buffers(), model.buffers()):
        assert torch.equal(a, b), n


def test_deferred_batchnorm_steps_aside_for_hooks_and_graph_changes(monkeypatch):
    torch.manual_seed(0)
    model = _Res().double()
    sparsetrain.sparsify_(model, model_masks(model, 0.6), fuse=True)
    seen = []
    h = model.relu1.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model(x).sum().backward()
    h.remove()
    assert len(seen) == 1 and (seen[0] >= 0).all()  # the activation itself, not conv1's y
    model.conv1(torch.randn(2, 8, 8, 8, dtype=torch.float64))  # conv1 defers into conv2 ...
    with pytest.raises(RuntimeError, match="did not hand it"):
        model.conv2(torch.randn(2, 8, 8, 8, dtype=torch.float64), torch.randn(2, 8, 8, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="did not call this FusedBatchNorm2d"):
        model.conv1(torch.randn(2, 8, 8, 8, dtype=torch.float64))  # bn1 was skipped last time: told once
    model.conv1(torch.randn(2, 8, 8, 8, dtype=torch.float64))  # a forward interrupted after relu1 ...
    model.relu1(model.bn1(model.bn1._pending[0]))
    with torch.no_grad():
        model.eval()(x)  # ... then one that does not defer: conv1 drops the stale hand-over
    model.train()
    # a deferred BN reaching a conv that cannot fuse: applied there, its gradient passed straight through
    y = torch.randn(2, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    m, a, b = torch.randn(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64) + 0.5, torch.randn(8, dtype=torch.float64)
    r = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    model.conv2._deferred = (y, {"act": (m, a, b, True)})
    monkeypatch.setattr(fused_mod, "_can_fuse", lambda *args: False)
    out = model.conv2(y, r)
    act = (y.detach() - m[:, None, None]) * a[:, None, None] + b[:, None, None]
    ref = sparse_conv_bn_relu(F.relu(act).requires_grad_(), model.conv2,
                              model.conv2.bn, relu_after=True, residual=r)[0]
    torch.testing.assert_close(out, ref)
    assert torch.autograd.grad(out.sum(), y)[0].shape == y.shape


class _Skips(nn.Module):
    """conv -> BN -> ReLU -> 2x2 max-pool, the ReLU and the pool behind flags."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU()
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(6, 4)
        self.act = self.pooled = True

    def forward(self, x):
        x = self.bn(self.conv(x))
        x = self.relu(x) if self.act else x
        x = self.pool(x) if self.pooled else x
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("flag, name", [("act", "FusedReLU"), ("pooled", "MaxPool2x2")])
def test_a_skipped_relu_or_pool_is_told_on_the_next_forward(flag, name):
    """fuse_ fixes the graph: a forward that skips the fused ReLU (applied anyway) or the pool the BN
    pass pooled into (the next layer got the BN's input) is refused by the next forward, once."""
    torch.manual_seed(0)
    model = _Skips().double()
    sparsetrain.sparsify_(model, model_masks(model, 0.5), fuse=True)
    assert model.conv.pools is model.pool and isinstance(model.relu, FusedReLU)
    ref = sparsetrain.unfuse_(copy.deepcopy(model))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model(x)
    setattr(model, flag, False)
    model(x)  # (not detected in the forward that skips)
    with pytest.raises(RuntimeError, match=f"did not call this {name} after its fused conv"):
        model(x)
    setattr(model, flag, True)
    torch.testing.assert_close(model(x), ref(x))  # told once: the hand-overs were dropped (batch statistics)


@pytest.mark.parametrize("where", ["bn", "conv"])
def test_a_hook_that_raises_between_the_fused_modules_is_not_taken_for_a_skip(where):
    """A NaN guard on the fused BN (or conv) raises on a bad batch and the loop goes on: the next
    forward runs (a hand-over left after a module with a hook is not a skip), equal to the unfused model."""
    torch.manual_seed(0)
    model = _Skips().double()
    sparsetrain.sparsify_(model, model_masks(model, 0.5), fuse=True)
    ref = sparsetrain.unfuse_(copy.deepcopy(model))

    def guard(m, i, out):
        if not torch.isfinite(out).all():
            raise FloatingPointError("non-finite activation")
    for m in (model, ref):
        getattr(m, where).register_forward_hook(guard)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        model(bad)
    torch.testing.assert_close(model(x), ref(x))


def test_routed_input_hands_on_x_once():
    torch.manual_seed(0)
    model = _Res().double()
    sparsetrain.sparsify_(model, model_masks(model, 0.5), fuse=True)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    model.conv1(x)
    through = routed_input(model.conv1, x)
    assert through is not x and "SparseConvBNReLU" in type(through.grad_fn).__name__
    torch.testing.assert_close(through, x, rtol=0, atol=0)
    assert routed_input(model.conv1, x) is x  # handed on once
    model.bn1._pending = model.relu1._pending = None  # (conv1 called alone: its hand-overs dropped)
    model.conv1(x)
    assert routed_input(model.conv1, x.detach()) is not x  # another tensor than the layer saw: itself
    assert routed_input(model.conv0, x) is x and routed_input(nn.Conv2d(8, 8, 3), x) is x  # not routing
    model.bn1._pending = model.relu1._pending = None
    with torch.no_grad():
        model.conv1(x)
    assert routed_input(model.conv1, x) is x  # no autograd: nothing to route


@pytest.mark.parametrize("batch", [2, 16])  # 16: layer4's 2x2 maps on the small-map kernel (fp64 vectors of 8)
def test_study_resnet_routes_its_shortcuts(batch):
    """The study's ResNet-18: x's gradient from each shortcut (identity or strided 1x1 conv) is
    added inside the fused conv1's kernel, never by a separate add over an activation."""
    torch.manual_seed(0)
    base = resnet18(10, 3).double()
    masks = model_masks(base, 0.8)
    unfused, fused = copy.deepcopy(base), copy.deepcopy(base)
    sparsetrain.sparsify_(unfused, masks)
    sparsetrain.sparsify_(fused, masks, fuse=True)
    assert sorted(n for n, m in fused.named_modules() if getattr(m, "route_input", False)) == \
        [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]
    x = torch.randn(batch, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 10, (batch,))
    grads = []
    for m in (unfused, fused):
        with torch.profiler.profile(record_shapes=True) as prof:
            loss = F.cross_entropy(m(x), t)
            grads.append(torch.autograd.grad(loss, [x, *m.parameters()]))
        adds = [e for e in prof.events() if e.name == "aten::add" and e.input_shapes and len(e.input_shapes[0]) == 4]
        assert bool(adds) == (m is unfused)  # fused: no activation-sized add, forward (residual) or backward (x)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **TOL[torch.float64])


def test_torchvision_resnet18_pattern_and_round_trip():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double()  # (batch-2 BN at 1x1 maps: fp32 is ill-conditioned)
    ref = copy.deepcopy(model)
    masks = model_masks(model, 0.9)
    sparsetrain.sparsify_(model, masks, fuse=True)
    convs = [n for n, m in model.named_modules() if isinstance(m, SparseConvBNReLU)]
    # every conv feeds a BN; a torchvision block calls its one self.relu at two sites: fused after
    # bn1 (a real ReLU after `out += identity`), so each block's conv1 defers bn1 + relu into conv2
    blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert len(convs) == 20 and [n for n in convs if model.get_submodule(n).relu_after] == \
        ["conv1"] + [b + ".conv1" for b in blocks]
    assert "layer2.0.downsample.0" in convs and isinstance(model.layer2[0].downsample[1], FusedBatchNorm2d)
    assert [n for n, m in model.named_modules() if isinstance(m, FusedReLU)] == ["relu"] + [b + ".relu" for b in blocks]
    assert {n: m.feeds for n, m in model.named_modules() if getattr(m, "feeds", None)} == \
        {b + ".conv1": model.get_submodule(b + ".conv2") for b in blocks}
    sparsetrain.densify_(ref)  # (no-op: dense) ; the reference is the dense masked model
    zero_pruned_(ref, masks)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for training in (True, False):
        model.train(training), ref.train(training)
        torch.testing.assert_close(model(x), ref(x), rtol=1e-8, atol=1e-8)
    # Eq. 1 at each site of a block's relu: counted by the fused kernel after bn1, from the output after the add
    e_f, e_r = activation_entropy(model, [x]), activation_entropy(ref, [x])
    assert e_f["per_layer"] == pytest.approx(e_r["per_layer"]) and "layer1.0.relu#1" in e_f["per_layer"]
    unfuse_(model)
    assert not any(isinstance(m, (SparseConvBNReLU, FusedBatchNorm2d)) for m in model.modules())
    torch.testing.assert_close(model(x), ref(x), rtol=1e-8, atol=1e-8)
    sparsetrain.sparsify_(model, {}, fuse=True)
    sparsetrain.densify_(model)  # unfuses, then densifies
    assert type(model.conv1) is nn.Conv2d and type(model.bn1) is nn.BatchNorm2d
    torch.testing.assert_close(model(x), ref(x), rtol=1e-8, atol=1e-8)


class _Shared(nn.Module):
    """One ReLU module at three sites: after bn1, after bn2 + x (a real ReLU) and after bn3 (as
    torchvision's Bottleneck); `act` off skips the first."""

    def __init__(self, inplace: bool):
        super().__init__()
        for i in (1, 2, 3):
            setattr(self, f"conv{i}", nn.Conv2d(4, 4, 3, padding=1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(4))
        self.relu, self.fc, self.act = nn.ReLU(inplace=inplace), nn.Linear(4, 3), True

    def forward(self, x):
        out = self.bn1(self.conv1(x))
        out = self.relu(out) if self.act else out
        out = self.bn2(self.conv2(out))
        out += x
        out = self.relu(out)
        out = self.relu(self.bn3(self.conv3(out)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _shared_pair(inplace=True, hook=None):
    torch.manual_seed(0)
    ref = _Shared(inplace).double()
    if hook is not None:
        hook(ref.relu)
    masks = model_masks(ref, 0.5)
    model = copy.deepcopy(ref)
    sparsetrain.sparsify_(model, masks, fuse=True)
    zero_pruned_(ref, masks)
    return model, ref, masks


@pytest.mark.parametrize("inplace", [True, False])
def test_a_relu_module_shared_by_a_batchnorm_site_and_an_add_site(inplace):
    """A ReLU module called at several sites is fused where it alone reads a fusable BN (conv1's,
    conv3's) and applies a real ReLU where it reads the add, in place as built: outputs, every
    gradient, running statistics and SGD steps are the dense masked model's, train and eval;
    its forward hook sees the same three activations."""
    model, ref, masks = _shared_pair(inplace)
    assert {n: (m.relu_after, m.feeds) for n, m in model.named_modules() if isinstance(m, SparseConvBNReLU)} == \
        {"conv1": (True, model.conv2), "conv2": (False, None), "conv3": (True, None)}
    assert isinstance(model.relu, FusedReLU) and model.relu.inplace is inplace
    seen = {}
    for m in (ref, model):
        m.relu.register_forward_hook(lambda mod, i, o, k=m is ref: seen.setdefault(k, []).append(o.clone()))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ref, model)]
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
        grads = []
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            xi = x.clone().requires_grad_()
            y = m(xi)
            y.square().sum().backward()
            grads.append((y, xi.grad, {n: p.grad for n, p in m.named_parameters()}))
            opt.step()
        zero_pruned_(ref, masks)  # (the dense reference's masked-out weights stepped too: zeroed again)
        (y_ref, gx_ref, g_ref), (y, gx, g_model) = grads
        torch.testing.assert_close(y, y_ref, **TOL[torch.float64])
        torch.testing.assert_close(gx, gx_ref, **TOL[torch.float64])
        for n, grad in g_model.items():
            layer = n.removesuffix(".weight.values")
            torch.testing.assert_close(grad, g_ref[n] if layer == n else g_ref[layer + ".weight"][masks[layer]],
                                       **TOL[torch.float64], msg=n)
    assert len(seen[True]) == len(seen[False]) == 12
    for a, b in zip(seen[True], seen[False]):
        torch.testing.assert_close(b, a, **TOL[torch.float64])
    for k, v in ref.state_dict().items():  # (the running statistics, and the stepped weights)
        got = model.state_dict()[k + ".values" if k.endswith("weight") and k[:-7] in masks else k]
        torch.testing.assert_close(got, v[masks[k[:-7]]] if got.shape != v.shape else v, **TOL[torch.float64], msg=k)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    ref.eval(), model.eval()
    torch.testing.assert_close(model(x), ref(x), **TOL[torch.float64])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), **TOL[torch.float64])
    sparsetrain.unfuse_(model)
    assert type(model.relu) is nn.ReLU and model.relu.inplace is inplace


def test_a_checkpoint_segment_starting_at_a_shared_relu_s_fused_site_is_refused():
    """Its recompute has no hand-over: the shared FusedReLU applies the ReLU there and saves its output,
    which the first pass did not; torch.utils.checkpoint refuses the mismatch (no silent gradient)."""
    from torch.utils.checkpoint import CheckpointError, checkpoint
    model, _, _ = _shared_pair(inplace=False)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    out = model.bn1(model.conv1(x))
    out = checkpoint(lambda t: model.bn2(model.conv2(model.relu(t))), out, use_reentrant=False)
    with pytest.raises(CheckpointError, match="Recomputed values for the following tensors have different metadata"):
        out.sum().backward()


def test_a_shared_relu_fused_round_by_round_links_as_fused_at_once():
    """Layers made sparse in different fuse_ calls (--engine auto's rounds): a later call fuses the
    shared FusedReLU an earlier one made at its other sites too (it held fuse_'s own attributes, taken
    for a user's: that conv stayed unfused), so the model equals the one fused at once."""
    torch.manual_seed(0)
    base = _Shared(True).double()
    masks = model_masks(base, 0.5)
    once, rounds = copy.deepcopy(base), copy.deepcopy(base)
    sparsetrain.sparsify_(once, masks, fuse=True)
    for part in (["conv3", "conv2"], ["conv1", "fc"]):
        sparsetrain.sparsify_(rounds, {n: masks[n] for n in part}, fuse=True)

    def links(m):
        return {n: (type(mod).__name__, getattr(mod, "relu_after", None), type(getattr(mod, "feeds", None)).__name__)
                for n, mod in m.named_modules()}
    assert links(rounds) == links(once) and rounds.conv3.relu_after and rounds.conv1.feeds is rounds.conv2
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(rounds(x), once(x), rtol=0, atol=0)


def test_a_shared_relu_is_fused_only_where_it_is_safe():
    """A pre-hook on the shared ReLU keeps it a real ReLU (conv -> BN fused alone), a full backward
    hook keeps its convs unfused, as for a ReLU called once; a forward that skips a fused site hands
    the next site the other tensor: refused by name, each time, and then runs as before. A ReLU
    called between a conv and its site stays a real ReLU; one called before its first fused site is
    fused. A hook raising at the second fused site's BN (a NaN guard) is not taken for a skip by the
    first site's conv; one raising before a real site's call is told there, once."""
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    model, ref, _ = _shared_pair(hook=lambda r: r.register_forward_pre_hook(lambda m, i: None))
    assert type(model.relu) is nn.ReLU and not any(m.relu_after for m in model.modules() if hasattr(m, "relu_after"))
    torch.testing.assert_close(model(x), ref(x), **TOL[torch.float64])
    model, ref, _ = _shared_pair(hook=lambda r: r.register_full_backward_hook(lambda *a: None))
    assert type(model.relu) is nn.ReLU and type(model.conv1) is SparseConv2d and type(model.conv2) is SparseConvBNReLU
    model, ref, _ = _shared_pair()
    model(x)
    model.act = ref.act = False
    for _ in range(2):  # (each such forward: conv1's activation has the ReLU applied)
        with pytest.raises(RuntimeError, match="FusedReLU was called on a tensor its fused conv did not hand it"):
            model(x)
    model.act = ref.act = True
    torch.testing.assert_close(model(x), ref(x), **TOL[torch.float64])

    def guard(m, i, out):
        if not torch.isfinite(out).all():
            raise FloatingPointError("non-finite activation")
    for m in (model, ref):
        m.bn3.register_forward_hook(guard)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        model(bad)
    torch.testing.assert_close(model(x), ref(x), **TOL[torch.float64])

    class Early(_Shared):  # a real site first
        def forward(self, x):
            return self.relu(self.bn1(self.conv1(self.relu(x - 0.5))))

    class Between(_Shared):  # the ReLU's other site between conv1 and its site
        def forward(self, x):
            y = self.bn1(self.conv1(x))
            z = self.relu(x - 0.5)
            return self.relu(y) + z
    for cls in (Between, Early):
        torch.manual_seed(0)
        m = cls(True).double()
        masks = model_masks(m, 0.5)
        r = copy.deepcopy(m)
        sparsetrain.sparsify_(m, masks, fuse=True)
        assert type(m.conv1) is SparseConvBNReLU and m.conv1.relu_after is (cls is Early)
        assert type(m.relu) is (FusedReLU if cls is Early else nn.ReLU)
        zero_pruned_(r, {"conv1": masks["conv1"]})
        torch.testing.assert_close(m(x), r(x), **TOL[torch.float64])
    m.bn1.register_forward_hook(guard)  # (Early's) a NaN guard stops a forward after conv1: the real site told
    with pytest.raises(FloatingPointError):
        m(bad)
    with pytest.raises(RuntimeError, match=r"the last forward stopped at an error between a fused conv and its site "
                                           r"\(told once: run again\)"):
        m(x)
    torch.testing.assert_close(m(x), r(x), **TOL[torch.float64])


@pytest.mark.parametrize("make", [
    lambda: torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25),  # depthwise convs, ReLU6
    lambda: torchvision.models.DenseNet(8, (2, 2), 16, num_classes=10),  # BN -> ReLU -> conv, concatenations
    lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10),  # depthwise conv -> BN, channel shuffles
], ids=["mobilenet_v2", "densenet", "shufflenet_v2"])
def test_torchvision_patterns_fused_where_they_apply(make):
    """torchvision models whose patterns fuse_ must partly leave alone: a depthwise conv (which the
    sparse kernels do not take) stays a dense nn.Conv2d with its BN, a ReLU6 is not a ReLU (conv -> BN
    fused alone), a BN -> ReLU with no conv before it stays as built. What is fused gives the dense
    masked model's outputs, input, weight and BN gradients and running statistics in training and
    eval; densify_ gives back that dense model."""
    from sparsetrain.engine.convert import unconvertible
    torch.manual_seed(0)
    model = make().double()
    dense = unconvertible(model)
    masks = {n: mk for n, mk in model_masks(model, 0.9).items() if n not in dense}
    ref = copy.deepcopy(model)
    zero_pruned_(ref, masks)
    sparsetrain.sparsify_(model, masks, fuse=True)
    fused = {n: m for n, m in model.named_modules() if isinstance(m, SparseConvBNReLU)}
    assert all(type(model.get_submodule(n)) is nn.Conv2d and model.get_submodule(n).groups > 1 for n in dense)
    assert fused and (bool(dense) == (not isinstance(model, torchvision.models.DenseNet)))
    if any(isinstance(m, nn.ReLU6) for m in ref.modules()):  # (mobilenet_v2's only activation)
        assert not any(m.relu_after or m.relu_before for m in fused.values())
    # the BNs of no fused conv (after a depthwise conv, before a conv: DenseNet's norm1) stay as built
    assert sum(isinstance(m, FusedBatchNorm2d) for m in model.modules()) == len(fused)
    assert sum(type(m) is nn.BatchNorm2d for m in model.modules()) == \
        sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules()) - len(fused) > 0
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    TOL64 = dict(rtol=1e-7, atol=1e-7)  # (fp64 sums in other orders, on the gradients of a squared output)
    for training in (True, False, True):
        model.train(training), ref.train(training)
        got = []
        for m in (ref, model):
            xi = x.clone().requires_grad_()
            torch.manual_seed(1)  # (the classifiers' dropout draws alike)
            y = m(xi)
            names, params = zip(*m.named_parameters())
            gx, *gp = torch.autograd.grad(y.square().sum(), [xi, *params])
            got.append((y, gx, dict(zip(names, gp))))
        (y_ref, gx_ref, g_ref), (y, gx, g) = got
        torch.testing.assert_close(y, y_ref, **TOL64)
        torch.testing.assert_close(gx, gx_ref, **TOL64)
        for name, grad in g.items():  # a sparse layer's: its stored values', the mask's entries in row-major order
            layer = name.removesuffix(".weight.values")
            want = g_ref[name] if layer == name else g_ref[layer + ".weight"][masks[layer]]
            torch.testing.assert_close(grad, want, **TOL64)
        assert len(g) == len(g_ref)
    state = model.state_dict()
    for k, v in ref.state_dict().items():  # the BNs' running statistics (and every dense parameter)
        if k in state:
            torch.testing.assert_close(state[k], v, **TOL64)
    sparsetrain.densify_(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    assert model.state_dict().keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, **TOL64)


def test_study_models_fuse_their_patterns():
    r = resnet18(10, 3)
    sparsetrain.sparsify_(r, model_masks(r, 0.9), fuse=True)
    fused = {n: m for n, m in r.named_modules() if isinstance(m, SparseConvBNReLU)}
    assert len(fused) == 20
    assert fused["layer1.0.conv1"].relu_after and not fused["layer1.0.conv1"].residual
    assert fused["layer1.0.conv2"].residual and fused["layer1.0.conv2"].relu_after
    assert not fused["layer2.0.downsample.0"].relu_after  # the shortcut's conv -> BN
    # each block's bn1 + relu1 deferred into its conv2 (the only reader of that activation)
    assert {n: m.feeds for n, m in fused.items() if m.feeds is not None} == \
        {f"layer{i}.{j}.conv1": fused[f"layer{i}.{j}.conv2"] for i in range(1, 5) for j in range(2)}
    v = vgg_like(2, 3, 10, 3)
    sparsetrain.sparsify_(v, model_masks(v, 0.9), fuse=True)
    assert all(m.relu_before and not m.relu_after for m in v.modules() if isinstance(m, SparseConvBNReLU))
    assert sum(isinstance(m, SparseConvBNReLU) for m in v.modules()) == 4
    vf = {n: m for n, m in v.named_modules() if isinstance(m, SparseConvBNReLU)}
    assert {n: m.feeds for n, m in vf.items() if m.feeds is not None} == \
        {f"block{i}_1.conv": vf[f"block{i}_2.conv"] for i in (1, 2)}  # (not across the pools)


def test_other_patterns_are_left_alone():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
            self.bn, self.relu = nn.BatchNorm2d(4), nn.ReLU()
            self.bn_twice = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.a(x)
            z = self.bn(y) + y  # the conv's output has two users
            w = self.relu(self.b(z))  # conv -> ReLU without a BN
            return self.bn_twice(self.c(w)) + self.bn_twice(w)  # a BN called twice

    m = Odd()
    sparsetrain.sparsify_(m, model_masks(m, 0.5))
    assert fuse_(m) == []
    assert all(type(mod) in (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, Odd) or type(mod).__name__ in ("SparseConv2d", "CSR")
               for mod in m.modules())

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # data-dependent control flow

    u = Untraceable()
    with pytest.raises(ValueError, match="torch.fx can trace"):
        sparsetrain.sparsify_(u, model_masks(u, 0.5), fuse=True)
    assert type(u.conv) is nn.Conv2d  # refused before any layer was swapped
    sparsetrain.sparsify_(u, model_masks(u, 0.5))
    with pytest.raises(ValueError, match="torch.fx can trace"):
        fuse_(u)
    assert fuse_(u, strict=False) == []


@pytest.mark.parametrize("default", [nn.ReLU(), F.relu])
def test_a_forward_default_fx_cannot_keep_is_named_with_what_to_do(default):
    """torch.fx keeps every forward argument's default in the graph, and cannot keep a module or a function:
    fuse_'s refusal only quoted fx ("argument of type: <class ...ReLU>"); it now names the argument and says to
    make it an attribute of the model, which then fuses and matches the unfused model."""
    class Defaulted(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x, act=default):
            return act(self.bn(self.conv(x)))

    class Attribute(Defaulted):
        def __init__(self):
            super().__init__()
            self.act = default

        def forward(self, x):
            return self.act(self.bn(self.conv(x)))

    m = Defaulted()
    with pytest.raises(ValueError, match=f"its forward's argument 'act' defaults to a {type(default).__name__}, "
                                         r"which torch.fx cannot keep as a default; make it an attribute of the "
                                         r"model \(self.act = ...\)"):
        sparsetrain.sparsify_(m, model_masks(m, 0.5), fuse=True)
    assert type(m.conv) is nn.Conv2d  # refused before any layer was swapped
    a = Attribute()
    masks = model_masks(a, 0.5)
    ref = copy.deepcopy(a)
    zero_pruned_(ref, {"conv": masks["conv"]})
    sparsetrain.sparsify_(a, masks, fuse=True)
    assert isinstance(a.conv, SparseConvBNReLU)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(a(x), ref(x), rtol=1e-5, atol=1e-5)


def test_apply_engine_fuses_and_state_dicts_load_across():
    from sparsetrain.engine.policy import apply_engine
    torch.manual_seed(0)
    m = _Res()
    plain = copy.deepcopy(m)
    apply_engine(m, model_masks(m, 0.95), "sparse")
    assert isinstance(m.conv2, SparseConvBNReLU) and m.conv2.residual
    sparsetrain.sparsify_(plain, model_masks(plain, 0.95))
    plain.load_state_dict(m.state_dict())  # fused -> unfused
    m2 = copy.deepcopy(m)  # a deep copy keeps each fused conv pointing at its own model's BN
    assert m2.conv0.bn is m2.bn0 and m2.conv0.bn is not m.bn0
    x = torch.randn(2, 3, 8, 8)
    m.eval(), plain.eval(), m2.eval()
    torch.testing.assert_close(m(x), plain(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m2(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, hw", [(lambda: vgg_like(2, 2, 5, 3, image_size=8), 8), (_Res, 8)])
def test_threads_running_one_fused_model_each_get_their_own_result(make, hw):
    """Four threads run one fused model at once (deferred BN links, pooling, a routed shortcut): each
    thread's output and gradients are those of the model run alone, no error (the hand-overs are
    kept per thread; before, a thread's deferred BN could be taken by another's next conv: errors,
    and wrong outputs without one)."""
    import sys
    import threading
    torch.manual_seed(0)
    model = make().double()
    sparsetrain.sparsify_(model, model_masks(model, 0.6), fuse=True)
    params = [p for p in model.parameters() if p.requires_grad]
    xs = [torch.randn(4, 3, hw, hw, dtype=torch.float64) for _ in range(4)]

    def run(x):
        out = model(x)
        return out.detach(), torch.autograd.grad(out.square().sum(), params)

    refs = [run(x) for x in xs]
    failures = []

    def work(i):
        for _ in range(60):
            try:
                out, grads = run(xs[i])
                if not (torch.allclose(out, refs[i][0], rtol=1e-12, atol=1e-12) and all(
                        torch.allclose(g, r, rtol=1e-10, atol=1e-12) for g, r in zip(grads, refs[i][1]))):
                    failures.append((i, "a different result"))
            except Exception as e:  # (a check's refusal is a ValueError since the C++ ops raise it)
                failures.append((i, str(e)[:120]))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # (switch threads often: between the hand-over and its taker)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == [], failures[:3]


def test_copies_leave_out_a_stopped_forward_s_hand_overs():
    """A forward stopped between two blocks (an exception, Ctrl-C) leaves a hand-over (the deferred
    y, part of the graph) on the next fused layer: deepcopy and pickle of the model leave it out, as
    the copies of a model at rest, and the copy trains as the original does."""
    from sparsetrain.engine.placeholders import HandOff
    torch.manual_seed(0)
    m = vgg_like(2, 3, image_size=16)
    sparsetrain.sparsify_(m, model_masks(m, 0.8), fuse=True)
    x, t = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    at_rest = len(pickle.dumps(m))
    m.train()
    m.block1_1(x)  # (the first block only: its BN is deferred into block1_2's conv)

    def handed(model):
        return [n for n, mod in model.named_modules() if isinstance(mod, HandOff)
                for a in mod._transient if getattr(mod, a) is not None]

    assert handed(m) == ["block1_2.conv"]
    saved = io.BytesIO()
    torch.save(m, saved)
    saved.seek(0)
    copies = [copy.deepcopy(m), pickle.loads(pickle.dumps(m)), torch.load(saved, weights_only=False)]
    assert len(pickle.dumps(m)) == at_rest and all(handed(c) == [] for c in copies)
    for c in [m, *copies]:
        F.cross_entropy(c(x), t).backward()
    for c in copies:
        for (n, a), b in zip(m.named_parameters(), c.parameters()):
            assert torch.equal(a.grad, b.grad), n


@pytest.mark.parametrize("name", ["vgg_d2g3", "resnet18"])
def test_layers_fused_round_by_round_link_as_fused_at_once(name, monkeypatch):
    """--engine auto makes layers sparse in different rounds (one fuse_ call each); a resume rebuilds
    the model with one call (restore_model): the same modules, links (feeds, pools, the head) and
    bitwise the same step, so a resumed run equals the uninterrupted one."""
    from sparsetrain.engine import policy
    from sparsetrain.engine.nn import is_sparse, prunable_layers
    from sparsetrain.experiment.checkpoint import model_payload, restore_model
    from sparsetrain.experiment.models import build_model
    monkeypatch.setattr(policy, "SPARSE_MIN_WEIGHTS", 0)  # (auto's fixed rule: by sparsity alone)
    arch = dict(name=name, num_classes=10, in_channels=3, image_size=16)
    torch.manual_seed(0)
    model = build_model(**arch)
    pruned = model_masks(model, 0.9)
    layers = [n for n, _ in prunable_layers(model)]
    for part in (layers[-1:], layers[::2], layers):  # the head alone (no conv), then half the convs, then all
        dense = {n: pruned[n] if n in part else torch.ones_like(pruned[n]) for n, m in prunable_layers(model)
                 if not is_sparse(m)}
        policy.apply_engine(model, dense, "auto")
        assert all(is_sparse(model.get_submodule(n)) for n in part)
    restored, _ = restore_model(model_payload(model, {}, arch))

    def links(m):
        names = {id(mod): n for n, mod in m.named_modules()}
        return {n: (type(mod).__name__, names.get(id(getattr(mod, "feeds", None))), names.get(id(getattr(mod, "pools", None))),
                    names.get(id(getattr(mod, "linear", None)))) for n, mod in m.named_modules()}

    assert links(model) == links(restored)
    assert any(getattr(m, "feeds", None) is not None for m in model.modules())
    x, t = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    for m in (model, restored):
        F.cross_entropy(m(x), t).backward()
    for (n, a), b in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(a.grad, b.grad), n


def test_fallback_under_the_triton_backend_matches(monkeypatch):
    """Where the fused kernels do not run (here forced through the fallback), the layer runs the
    unfused ops: same results."""
    from sparsetrain.engine import fused as fused_mod
    ref, fused, mask = _fused_pair("bn_relu", 0.5)
    monkeypatch.setattr(fused_mod, "_can_fuse", lambda x, conv: False)
    _compare(ref, fused, mask, torch.randn(3, 5, 6, 6, dtype=torch.float64), torch.float64)
    assert ops.OPS["bn_act"].fake is not None


@pytest.mark.parametrize("order", ["bn", "bn_relu", "relu_bn"])
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 1.0])
def test_inference_folds_the_batchnorm(order, sparsity):
    """Eval mode without autograd: BN folded into the conv's values and bias (one pass); same
    outputs as the unfused layers, and the parameters are left untouched."""
    ref, fused, _ = _fused_pair(order, sparsity, bias=True)
    ref.eval(), fused.eval()
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    x = torch.randn(3, 5, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x), **TOL[torch.float64])
    assert all(torch.equal(before[k], v) for k, v in fused.state_dict().items())


def test_inference_with_a_shortcut():
    torch.manual_seed(0)
    base = _Res().double().eval()
    masks = model_masks(base, 0.8)
    unfused, fused = copy.deepcopy(base), copy.deepcopy(base)
    sparsetrain.sparsify_(unfused, masks)
    sparsetrain.sparsify_(fused, masks, fuse=True)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), unfused(x), rtol=1e-9, atol=1e-9)


# ============================================================================ torch.compile
def _res_in_play(m):  # the deferred BN and the routed shortcut
    return m.conv1.feeds is m.conv2 and m.conv1.route_input


def _vgg_in_play(m):  # the stage ends' pooling inside the BN pass (MaxPool2x2 placeholders)
    return isinstance(m.pool1, MaxPool2x2) and m.block1_2.conv.pools is m.pool1


def _head_in_play(m):  # the classifier head on the replicated 1x1 map (engine/replicated.py)
    from sparsetrain.engine.replicated import FusedSparseLinear
    return isinstance(m.classifier, FusedSparseLinear) and m.avgpool.flatten is m.flatten


@pytest.mark.parametrize("make, in_play, hw", [(_Res, _res_in_play, 8),
                                               (lambda: vgg_like(2, 2, 5, 3, image_size=8), _vgg_in_play, 8),
                                               (lambda: vgg_like(5, 1, 5, 3), _head_in_play, 32)])
def test_torch_compile_runs_the_fused_layers_eagerly(make, in_play, hw):
    """The fused layers hand tensors on through module state (deferred BN, routed shortcut,
    placeholders, pooling, the classifier head) and check them by identity: under torch.compile they run eagerly
    (placeholders.eager, torch.compiler.disable applied lazily: one graph break each) and the steps
    equal the uncompiled model's bit for bit (aot_eager: the glue between them is traced, not re-rounded)."""
    torch.manual_seed(0)
    model = make().double()
    sparsetrain.sparsify_(model, model_masks(model, 0.6), fuse=True)
    ref = copy.deepcopy(model)
    assert in_play(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(6, 3, hw, hw, generator=g, dtype=torch.float64)
        t = torch.randint(0, 5, (6,), generator=g)
        losses = []
        for m in (ref, compiled):
            for p in m.parameters():
                p.grad = None
            loss = F.cross_entropy(m(x), t)
            loss.backward()
            losses.append(loss.item())
        assert losses[1] == losses[0], step
        for (n, a), b in zip(ref.named_parameters(), model.parameters()):
            assert torch.equal(a.grad, b.grad), (step, n)
    for (n, a), b in zip(ref.named_buffers(), model.buffers()):
        assert torch.equal(a, b), n
    ref.eval(), model.eval()
    with torch.no_grad():  # inference: the BN folded into the conv, also eager under compile
        assert torch.equal(compiled(x), ref(x))


@pytest.mark.parametrize("make, in_play, hw", [(_Res, _res_in_play, 8),
                                               (lambda: vgg_like(2, 2, 5, 3, image_size=8), _vgg_in_play, 8),
                                               (lambda: vgg_like(5, 1, 5, 3), _head_in_play, 32)])
def test_fx_and_jit_tracing_of_a_fused_model_is_refused_clearly(make, in_play, hw):
    """torch.fx.symbolic_trace failed on the fused layers' control flow ("symbolically traced variables
    cannot be used as inputs to control flow"), torch.jit.trace inside the fused Function with
    "unordered_map::at" (in the fused head: "repeat must be an int >= 1, got tensor(49)"): each now says
    what is unsupported and what to do. The Tracer it names (sparsetrain's modules as leaves) gives a
    GraphModule whose step equals the model's (losses, gradients), and the unfused model jit-traces."""
    torch.manual_seed(0)
    model = make().double()
    masks = model_masks(model, 0.6)
    head_only = make is not _Res and in_play is _head_in_play
    sparsetrain.sparsify_(model, {"classifier": masks["classifier"]} if head_only else masks, fuse=True)
    assert in_play(model)
    x = torch.randn(4, 3, hw, hw, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"torch.fx.symbolic_trace cannot trace into a fused \w+: trace the model "
                                        r"with a torch.fx.Tracer whose is_leaf_module"):
        torch.fx.symbolic_trace(model)
    with pytest.raises(RuntimeError, match=r"torch.jit.trace cannot trace a fused \w+: trace the unfused model"):
        torch.jit.trace(model, (x,), check_trace=False)

    class Leaves(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return type(m).__module__.startswith("sparsetrain.") or super().is_leaf_module(m, qualname)

    ref = copy.deepcopy(model)
    traced = torch.fx.GraphModule(model, Leaves().trace(model))
    t = torch.randint(0, 5, (4,))
    losses = [F.cross_entropy(m(x), t) for m in (ref, traced)]
    for loss in losses:
        loss.backward()
    assert losses[1].item() == losses[0].item()
    for (n, a), b in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(a.grad, b.grad), n
    unfuse_(ref)
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.trace(ref, (x,), check_trace=False)(x), model.eval()(x))


def _chain():  # conv-bn-relu x2 -> pool -> conv-bn-relu: a deferred link and a pooled one
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()).double()
    masks = model_masks(seq, 0.5)
    ref = copy.deepcopy(seq)
    zero_pruned_(ref, masks)
    sparsetrain.sparsify_(seq, masks, fuse=True)
    assert seq[0].feeds is seq[3] and seq[3].pools is seq[6]  # both hand-offs in play
    return seq, ref, masks


@pytest.mark.parametrize("layer", [0, 3])
def test_a_forward_hook_on_a_fused_conv_sees_the_activation_with_its_gradient(layer):
    """A forward hook added after fuse_ to a conv that hands its BN on (feeds) or pools in the BN's
    pass sees the activation, and a penalty on it has the unfused gradient (it saw the BN input y,
    whose gradient was taken as the activation's, or no gradient at all); a full backward hook on a
    fused conv is refused as on its BN and ReLU (it never fired, or failed on a false message)."""
    seq, ref, masks = _chain()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    grads = []
    for m, at in ((seq, layer), (ref, layer + 2)):  # (the unfused model's activation: its ReLU's output)
        seen = []
        handle = m[at].register_forward_hook(lambda mod, i, o: seen.append(o))
        (m(x).sum() + 0.01 * seen[0].square().sum()).backward()
        handle.remove()
        grads.append((seen[0].detach(), m[layer].weight.values.grad if m is seq else m[layer].weight.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads[0][1], grads[1][1][masks[str(layer)]], rtol=1e-9, atol=1e-9)
    seq[layer].register_full_backward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match="full backward hook on a fused SparseConvBNReLU"):
        seq(x)


def test_a_hook_on_the_relu_before_a_fused_batchnorm_gets_a_differentiable_activation():
    """conv -> ReLU -> BN (VGG-like's order) fused: the ReLU's output a hook reads is differentiable
    (a penalty on it was silently dropped: the fused layer's y was marked non-differentiable)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 2)).double()
    mask = random_mask((4, 3, 3, 3), 0.5)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    grads = []
    for fuse in (False, True):
        m = copy.deepcopy(base)
        sparsetrain.sparsify_(m, {"0": mask}, fuse=fuse)
        acts = []
        m[1].register_forward_hook(lambda mod, i, o: acts.append(o))
        (m(x).sum() + 0.1 * acts[0].abs().sum()).backward()
        assert acts[0].requires_grad
        grads.append(m[0].weight.values.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("segments", [2, 3, 5])
def test_checkpointed_segments_match_the_unfused_model(segments):
    """torch.utils.checkpoint (use_reentrant=False) cuts the chain anywhere, also between a layer and
    the one it hands its BN to: under saved-tensor hooks the layers write their activations."""
    from torch.utils.checkpoint import checkpoint_sequential
    seq, ref, masks = _chain()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    outs = []
    for m in (seq, ref):
        xi = x.clone().requires_grad_()
        out = checkpoint_sequential(m, segments, xi, use_reentrant=False)
        out.square().sum().backward()
        outs.append((out, xi.grad))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    for name, mask in masks.items():
        torch.testing.assert_close(seq.get_submodule(name).weight.values.grad,
                                   ref.get_submodule(name).weight.grad[mask.bool()], rtol=1e-10, atol=1e-10)
    # the running statistics: a checkpointed segment's recompute updates its BatchNorms again (PyTorch's
    # too); with 5 segments conv 7 (whose fused layer updates BN 8) and BN 8 fall in different ones
    for name, b in ref.named_buffers():
        if segments != 5 or not name.startswith("8."):
            torch.testing.assert_close(seq.get_buffer(name), b, rtol=1e-12, atol=0)


def test_checkpoint_segments_cut_at_every_pair_of_points_match_the_unfused_model():
    """torch.utils.checkpoint(use_reentrant=False) with segments starting at any module, also between a
    fused conv and its BN, ReLU or pool: a segment starting at the BN recomputes it with nothing handed
    (before 2026-12-07 a RuntimeError blaming a hook; conv -> ReLU -> BN then a CheckpointError), where the
    first pass had passed the conv's output through (or, after a ReLU, returned the conv's BN(x), saving
    nothing, its output requiring grad where that y did not: a pool after it then saved nothing, a
    CheckpointError). Output, input and parameter gradients and running statistics against the unfused model
    cut the same way, over pooled layers of both orders, a conv -> ReLU -> BN deferring into the next conv, and
    a plain one."""
    import itertools

    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4),
                         nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16, 2)).double()
    masks = model_masks(base, 0.5, 0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for cuts in itertools.combinations(range(1, len(base)), 2):
        got = []
        for fuse in (False, True):
            m = copy.deepcopy(base)
            sparsetrain.sparsify_(m, masks, fuse=fuse)
            if fuse:  # (the links the cuts fall between)
                assert m[0].pools is not None and m[4].relu_before and m[4].pools is not None
                assert m[8].relu_before and m[8].feeds is m[11]
            xi = x.clone().requires_grad_()
            h, bounds = xi, [0, *cuts, len(base)]
            for a, b in zip(bounds, bounds[1:]):
                h = checkpoint(lambda t, a=a, b=b: m[a:b](t), h, use_reentrant=False)
            h.square().sum().backward()
            got.append([h, xi.grad, *(p.grad for p in m.parameters()), *m.buffers()])
        torch.testing.assert_close(got[1], got[0], rtol=1e-10, atol=1e-12, msg=lambda e, cuts=cuts: f"cut at {cuts}: {e}")


@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("segments", [0, 2, 3, 4, 5])
def test_reentrant_checkpointing_is_refused_never_silently_wrong(segments, pool):
    """torch.utils.checkpoint(use_reentrant=True) runs its segments first without autograd, handing
    their values across the borders, then reruns each alone inside backward: a fused model raises,
    in the forward (a hand-over made without autograd, taken with it) or in the recompute (0: the
    whole model as one checkpoint). Before, gradients were silently lost: no x.grad, no weight grad."""
    from torch.utils.checkpoint import checkpoint, checkpoint_sequential
    if pool:
        seq = _chain()[0]
    else:  # three conv-bn-relu blocks: two deferred links, no pool
        seq = nn.Sequential(*[m for c in (3, 6, 6) for m in (nn.Conv2d(c, 6, 3, padding=1, bias=False),
                                                                nn.BatchNorm2d(6), nn.ReLU())]).double()
        sparsetrain.sparsify_(seq, model_masks(seq, 0.5), fuse=True)
        assert seq[0].feeds is seq[3] and seq[3].feeds is seq[6]
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        if segments:
            out = checkpoint_sequential(seq, segments, x, use_reentrant=True)
        else:
            out = checkpoint(seq, x, use_reentrant=True)
        out.square().sum().backward()


def test_a_pool_no_fused_layer_feeds_takes_reentrant_checkpointing():
    """A MaxPool2x2 no fused layer pools into (swapped in by fuse_ after an unfused conv, or used
    alone) recomputes under torch.utils.checkpoint(use_reentrant=True) with nn.MaxPool2d's gradient."""
    from torch.utils.checkpoint import checkpoint
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    grads = []
    for pool in (MaxPool2x2(2), nn.MaxPool2d(2)):
        xi = x.clone().requires_grad_()
        checkpoint(lambda t: pool(t.sin()), xi, use_reentrant=True).square().sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_a_forward_that_skips_a_fused_batchnorm_is_refused():
    class Flag(nn.Module):  # fx traces the branch taken at fuse_ time
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.use_bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), True

        def forward(self, x):
            y = self.conv(x)
            return F.relu(self.bn(y) if self.use_bn else y)

    m = Flag()
    sparsetrain.sparsify_(m, model_masks(m, 0.5), fuse=True)
    x = torch.randn(2, 3, 6, 6)
    m(x)
    m.use_bn = False
    m(x)  # (the skipped BN is seen by the next call)
    with pytest.raises(RuntimeError, match="unfuse_"):
        m(x)
    sparsetrain.unfuse_(m)
    ref = F.relu(F.conv2d(x, m.conv.weight.to_dense()))
    torch.testing.assert_close(m(x), ref)


class _OptionalArg(nn.Module):
    """forward(x, extra=None): `extra is None` is False for fx's Proxy, so the trace followed the other
    branch (the pool) and linked the fused conv to it; traced at the default instead, a call passing
    `extra` would take an untraced branch."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu, self.pool = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)

    def forward(self, x, extra=None):
        y = self.relu(self.bn(self.conv(x)))
        if extra is None:
            return y
        return self.pool(y) + extra


class _FeatureFlag(nn.Module):
    """forward(x, features=False): returns the BN's output when asked (a flag fx's Proxy cannot test)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x, features=False):
        y = self.bn(self.conv(x))
        return y if features else self.relu(y)


@pytest.mark.parametrize("make, extra", [(_OptionalArg, torch.randn(2, 4, 4, 4)), (_FeatureFlag, True)])
def test_a_forward_branching_on_a_defaulted_argument_is_not_fused(make, extra):
    """The graph is traced with proxies and at the defaults; where the two differ (or the proxy trace
    fails) the model is refused (strict) or left unfused: `extra is None` traced the pool branch and
    the default call's first forward returned the BN's input (off by ~2); tracing at the defaults alone
    fused the flag model, whose `features=True` call then returned the ReLU's output."""
    torch.manual_seed(0)
    dense = make()
    fused = copy.deepcopy(dense)
    masks = model_masks(fused, 0.0)
    with pytest.raises(ValueError, match="torch.fx can trace"):
        sparsetrain.sparsify_(copy.deepcopy(fused), masks, fuse=True)
    sparsetrain.sparsify_(fused, masks)
    assert sparsetrain.engine.fuse.fuse_(fused, strict=False) == []
    x = torch.randn(2, 3, 8, 8)
    for args in ((x,), (x, extra), (x,)):
        torch.testing.assert_close(fused(*args), dense(*args), rtol=1e-5, atol=1e-5)


class _ScaledOutput(nn.Module):
    """forward(x, scale=1.0, size=(2, 2)): defaults it does not branch on."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x, scale=1.0, size=(2, 2)):
        return F.adaptive_avg_pool2d(self.relu(self.bn(self.conv(x))), size) * scale


def test_a_forward_with_defaults_it_does_not_branch_on_is_fused():
    """Traced at its defaults, fx adds a check `arg == default` (for torch._assert) per argument that is
    not None: the two traces differed by those checks alone, so such a model was refused as taking
    another path at its defaults."""
    torch.manual_seed(0)
    dense = _ScaledOutput()
    fused = copy.deepcopy(dense)
    sparsetrain.sparsify_(fused, model_masks(fused, 0.5), fuse=True)
    assert type(fused.conv) is SparseConvBNReLU
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        ref.conv.weight.copy_(fused.conv.weight.to_dense())
    x = torch.randn(2, 3, 8, 8)
    for args in ((x,), (x, 2.0), (x, 0.5, (1, 3))):
        torch.testing.assert_close(fused(*args), ref(*args), rtol=1e-5, atol=1e-5)


def test_relu_subclasses_and_prehooked_readers_are_not_fused_over():
    class Clamp(nn.ReLU):  # a ReLU subclass computes something else: not a ReLU to fuse
        def forward(self, x):
            return x.clamp(0, 0.5)

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), Clamp())
    ref = copy.deepcopy(seq)
    masks = model_masks(seq, 0.0)
    sparsetrain.sparsify_(seq, masks, fuse=True)
    assert type(seq[2]) is Clamp and type(seq[0]) is SparseConvBNReLU and not seq[0].relu_after
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(seq(x), ref(x))
    sparsetrain.densify_(seq)
    assert type(seq[2]) is Clamp
    # a pre-hook added after fuse_ on the conv a layer defers its BN into sees the activation, not y
    chain, ref, _ = _chain()
    seen = []
    chain[3].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    chain(x).sum().backward()
    torch.testing.assert_close(seen[0], ref[:3](x))


@pytest.mark.parametrize("fuse", [False, True])
def test_second_order_and_forward_mode_gradients_raise(fuse):
    """The gradient ops have no formulas: create_graph=True must not give silently wrong (zero)
    second derivatives, nor torch.func.jvp a zero tangent."""
    seq, _, masks = _chain()
    if not fuse:
        sparsetrain.unfuse_(seq)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    # a loss quadratic in the output, and one linear in it (a gradient penalty on critic(x).sum(): the
    # incoming gradient does not require grad, where once_differentiable returned plain zeros' worth)
    for loss in (lambda y: y.square().sum(), lambda y: y.sum()):
        g, = torch.autograd.grad(loss(seq(x)), x, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            g.square().sum().backward()
        g, = torch.autograd.grad(loss(seq(x)), x, create_graph=True)  # (to chosen inputs: was silently None)
        with pytest.raises(RuntimeError, match="differentiate twice"):
            torch.autograd.grad(g.square().sum(), list(seq.parameters()), allow_unused=True)
    # the BN's weight, read through scale/shift, under a critic linear in the layer's output (was None)
    one = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU()).double()
    sparsetrain.sparsify_(one, model_masks(one, 0.5), fuse=True)
    xi, c = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    g, = torch.autograd.grad((one(xi) * c).sum(), xi, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(g.square().sum(), one[1].weight, allow_unused=True)
    lin = sparsetrain.nn.SparseLinear.from_dense(nn.Linear(4, 1))
    xl = torch.randn(3, 4, requires_grad=True)
    g, = torch.autograd.grad(lin(xl).sum(), xl, create_graph=True)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match="differentiate twice through a sparsetrain sparse layer"):
        g.norm().backward()
    with pytest.raises(NotImplementedError, match="cannot run a fused" if fuse else "forward-mode"):
        torch.func.jvp(seq.eval(), (x.detach(),), (torch.ones_like(x),))


@pytest.mark.parametrize("train", [True, False])
def test_torch_func_transforms_over_a_fused_model_are_refused_clearly(train):
    """vmap, grad, jacrev, jvp over a fused model failed with PyTorch's "it must override the
    setup_context staticmethod" (the fused Function's; the caller owns no such method): a
    NotImplementedError now says to unfuse_ first, after which vmap runs and matches the model."""
    seq, _, _ = _chain()
    seq.train(train)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for transform in (lambda: torch.func.vmap(seq)(x.unsqueeze(1)), lambda: torch.func.grad(lambda t: seq(t).sum())(x),
                      lambda: torch.func.jacrev(seq)(x[:1]), lambda: torch.func.jvp(seq, (x,), (torch.ones_like(x),))):
        with pytest.raises(NotImplementedError, match=r"torch.func transforms \(vmap, grad, jacrev, jvp\) cannot run "
                                                      r"a fused SparseConvBNReLU: call sparsetrain.unfuse_\(model\)"):
            transform()
    ref = copy.deepcopy(seq).eval()
    sparsetrain.unfuse_(seq)
    seq.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.func.vmap(seq)(x.unsqueeze(1)).squeeze(1), ref(x))


def test_modules_under_two_names_and_a_replacing_hook_on_the_relu_before_the_bn_stay_unfused():
    """fx names a module's calls by its first name: a conv, BN or pool also registered under another
    name (self.alias = self.conv) is left unfused (fused at one name, the other name's module ran
    unfused and the BN refused its input, or a pool pooled y); a forward hook on the ReLU of conv ->
    ReLU -> BN may return another tensor, which the BN must then normalise: that pattern stays
    unfused too. Both match the dense masked model."""
    class TwoNames(nn.Module):
        def __init__(self, aliased: str):
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
            self.pool, self.conv2, self.bn2 = nn.MaxPool2d(2), nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.alias = getattr(self, aliased)

        def forward(self, x):
            names = {m: n for n, m in self.named_children() if n != "alias"}
            call = lambda name: self.alias if names[getattr(self, name)] == self.aliased else getattr(self, name)  # noqa: E731
            return call("bn2")(call("conv2")(call("pool")(call("relu")(call("bn")(call("conv")(x))))))

    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for aliased in ("conv", "bn", "pool", "conv2"):
        torch.manual_seed(0)
        m = TwoNames(aliased).double()
        m.aliased = aliased
        ref = copy.deepcopy(m)
        masks = {n: random_mask(getattr(m, n).weight.shape, 0.5) for n in ("conv", "conv2")}
        zero_pruned_(ref, masks)
        sparsetrain.sparsify_(m, masks, fuse=True)
        assert m.alias is getattr(m, aliased), aliased
        torch.testing.assert_close(m(x), ref(x), rtol=1e-9, atol=1e-9)
        sparsetrain.unfuse_(m)
        assert m.alias is getattr(m, aliased) and type(m.pool) is nn.MaxPool2d, aliased
        torch.testing.assert_close(m(x), ref(x), rtol=1e-9, atol=1e-9)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8)).double()
    base[1].register_forward_hook(lambda mod, i, o: o.clamp(max=0.5))
    m, mask = copy.deepcopy(base), random_mask((8, 3, 3, 3), 0.5)
    zero_pruned_(base, {"0": mask})
    sparsetrain.sparsify_(m, {"0": mask}, fuse=True)
    assert type(m[0]) is sparsetrain.nn.SparseConv2d and type(m[2]) is nn.BatchNorm2d
    torch.testing.assert_close(m(x), base(x), rtol=1e-9, atol=1e-9)


def test_unfuse_and_densify_refuse_a_lone_layer():
    """A fused or sparse layer passed as the model cannot replace itself in place (unfuse_ once
    registered its plain conv as a child named '' of the fused layer)."""
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    sparsetrain.sparsify_(seq, model_masks(seq, 0.5), fuse=True)
    with pytest.raises(ValueError, match="for one SparseConvBNReLU use .to_conv()"):
        sparsetrain.unfuse_(seq[0])
    with pytest.raises(ValueError, match="for one SparseConvBNReLU use .to_dense()"):
        sparsetrain.densify_(seq[0])
    assert "" not in dict(seq[0].named_children())


class _KeywordCalls(nn.Module):
    """Every module called by keyword, as nn.Conv2d, BatchNorm2d, ReLU, MaxPool2d and AdaptiveAvgPool2d allow."""
    def __init__(self):
        super().__init__()
        self.c, self.b, self.r = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.c2, self.b2, self.r2, self.p = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x):
        x = self.r(input=self.b(input=self.c(input=x)))
        x = self.p(input=self.r2(self.b2(self.c2(x))))
        return self.fc(input=torch.flatten(self.pool(input=x), 1))


def test_fused_modules_take_the_input_keyword():
    # (fuse_ swaps every nn.MaxPool2d(2) too: self.pool(input=x) raised TypeError on a layer never fused)
    torch.manual_seed(0)
    ref = _KeywordCalls().double()
    masks = global_prune(ref, {}, 0.8, scope="layer")
    sp = copy.deepcopy(ref)
    sparsetrain.sparsify_(sp, masks, fuse=True)
    assert isinstance(sp.c2, SparseConvBNReLU) and isinstance(sp.p, MaxPool2x2)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for train in (True, False):
        ref.train(train), sp.train(train)
        xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, ys = ref(xr), sp(xs)
        torch.testing.assert_close(ys, yr, rtol=1e-10, atol=1e-12)
        yr.square().sum().backward(), ys.square().sum().backward()
        torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-9, atol=1e-11)
    for mod in (FusedBatchNorm2d, FusedReLU, MaxPool2x2, SparseConvBNReLU):  # the replaced modules' argument name
        assert "input" in inspect.signature(mod.forward).parameters, mod


def test_a_batchnorm_of_another_width_than_the_conv_is_left_unfused():
    """conv(4 channels) -> BN(5): fuse_ raised after swapping in the BN and ReLU placeholders, leaving a
    half-fused model whose forward blamed hooks; now the pair stays as built (PyTorch's own error)."""
    m = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3, bias=False), bn=nn.BatchNorm2d(5), relu=nn.ReLU()))
    ref = copy.deepcopy(m)
    sparsetrain.sparsify_(m, model_masks(m, 0.5), fuse=True)
    assert type(m.bn) is nn.BatchNorm2d and type(m.relu) is nn.ReLU and type(m.conv).__name__ == "SparseConv2d"
    x = torch.randn(2, 3, 6, 6)
    for model in (ref, m):
        with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 5"):
            model(x)


def test_sparse_conv_bn_relu_refuses_relu_before_with_a_residual_before_the_forward():
    """SparseConvBNReLU refuses conv -> ReLU -> BN -> + residual; the function ran that forward (updating
    the running statistics) and its backward raised from the C++ op. Now refused up front, untouched."""
    _, fused, _ = _fused_pair("bn", 0.5)
    x, r = torch.randn(2, 5, 4, 4, dtype=torch.float64), torch.randn(2, 7, 4, 4, dtype=torch.float64)
    before = fused.bn.running_mean.clone()
    with pytest.raises(ValueError, match="relu_before and residual cannot be combined"):
        sparse_conv_bn_relu(x.requires_grad_(), fused.conv, fused.bn, relu_before=True, residual=r)
    assert torch.equal(fused.bn.running_mean, before) and int(fused.bn.num_batches_tracked) == 0


def test_sparse_conv_bn_relu_names_an_argument_of_the_wrong_type():
    """A dense conv, bn=None or a NumPy x raised AttributeErrors from inside (no attribute 'dtype', 'weight',
    'dim'); now a TypeError naming the argument."""
    ref, fused, _ = _fused_pair("bn", 0.5)
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    for args, name in (((x, ref.conv, fused.bn), "conv must be a SparseConv2d, got Conv2d"),
                       ((x, fused.conv, None), "bn must be a BatchNorm2d, got NoneType"),
                       ((x.numpy(), fused.conv, fused.bn), "x must be a Tensor, got ndarray")):
        with pytest.raises(TypeError, match=name):
            sparse_conv_bn_relu(*args)
    torch.testing.assert_close(sparse_conv_bn_relu(x, fused.conv, fused.bn)[0], ref(x), **TOL[torch.float64])


def test_a_fused_model_called_on_a_non_tensor_names_it_as_the_unfused_one_does():
    """A list, None or a float given to a fused model (a linked pair, with and without autograd) raised a bare
    AttributeError from inside SparseConvBNReLU.forward ('list' object has no attribute 'device' / 'numel');
    now the unfused sparse model's TypeError."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    masks = model_masks(base, 0.5, 0)
    for fuse in (False, True):
        m = copy.deepcopy(base)
        sparsetrain.sparsify_(m, masks, fuse=fuse)
        assert fuse is False or m[0].feeds is m[3]
        for arg, grad in (([[1.0]], True), (None, True), (3.0, True), ([[1.0]], False)):
            with torch.set_grad_enabled(grad), pytest.raises(TypeError, match=f"x must be a torch.Tensor, got "
                                                                               f"{type(arg).__name__}"):
                m(arg)
        m(torch.randn(2, 3, 5, 5))  # (and the next forward runs)


def test_fused_flags_and_optional_tensors_of_the_wrong_type_are_named():
    """relu_after="False" (truthy) was applied by SparseConvBNReLU, a ReLU the user turned off, and a C++
    schema error in the function; route/pool/relu_before took any truthy value; a residual or relu_counts
    that is no tensor, or a conv that is no SparseConv2d, raised AttributeErrors; a BN of another width
    named the BN's "weight" from C++. Now a TypeError / ValueError naming the argument, and a numpy bool works."""
    import numpy as np
    ref, fused, _ = _fused_pair("bn", 0.5)
    x, bn = torch.randn(2, 5, 4, 4, dtype=torch.float64), nn.BatchNorm2d(7).double()
    for kw, msg in ((dict(relu_after="False"), "relu_after must be True or False, got 'False'"),
                    (dict(relu_before=None), "relu_before must be True or False, got None"),
                    (dict(route="yes"), "route must be True or False"), (dict(pool=1), "pool must be True or False"),
                    (dict(residual=[0.0]), "residual must be a Tensor or None, got list"),
                    (dict(relu_after=True, relu_counts=[0]), "relu_counts must be a Tensor or None, got list")):
        with pytest.raises(TypeError, match=msg):
            sparse_conv_bn_relu(x, fused.conv, bn, **kw)
    with pytest.raises(ValueError, match="bn has 6 features but the conv 7 output channels"):
        sparse_conv_bn_relu(x, fused.conv, nn.BatchNorm2d(6).double())
    for kw, msg in ((dict(relu_after="no"), "relu_after must be True or False, got 'no'"),
                    (dict(residual=0.5), "residual must be True or False, got 0.5")):
        with pytest.raises(TypeError, match=msg):
            SparseConvBNReLU(fused.conv.to_conv(), fused.bn, **kw)
    for conv in (ref.conv, None):
        with pytest.raises(TypeError, match=f"conv must be a SparseConv2d, got {type(conv).__name__}"):
            SparseConvBNReLU(conv, fused.bn)
    out = sparse_conv_bn_relu(x, fused.conv, copy.deepcopy(ref.bn), relu_after=np.True_)[0]
    torch.testing.assert_close(out, F.relu(ref(x)), **TOL[torch.float64])
    assert SparseConvBNReLU(fused.conv.to_conv(), fused.bn, relu_after=np.False_).relu_after is False


def test_max_pool2x2_imported_alone_runs_in_a_fresh_interpreter():
    """MaxPool2x2 from engine/placeholders.py alone (the module a pickled model names): its forward raised
    AttributeError (no op sparsetrain.max_pool2x2) until something imported engine/ops.py."""
    import subprocess
    import sys
    code = ("import torch, torch.nn.functional as F\n"
            "from sparsetrain.engine.placeholders import MaxPool2x2\n"
            "x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)\n"
            "y = MaxPool2x2(2)(x)\n"
            "g = torch.autograd.grad(y.sum(), x)[0]\n"
            "ref = F.max_pool2d(x, 2)\n"
            "assert torch.equal(y, ref) and torch.equal(g, torch.autograd.grad(ref.sum(), x)[0])\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("kw", [dict(kernel_size=3), dict(kernel_size=2, stride=1), dict(kernel_size=2, padding=1),
                                dict(kernel_size=2, ceil_mode=True), dict(kernel_size=2, dilation=2),
                                dict(kernel_size=2, return_indices=True)])
def test_max_pool2x2_refuses_settings_its_kernel_ignores(kw):
    """MaxPool2x2(3), (2, stride=1), ... took the settings and pooled 2x2 anyway (7x7 -> 3x3 where
    nn.MaxPool2d gives 2x2, 6x6, ...): now a ValueError; nn.MaxPool2d(2)'s spellings still build."""
    with pytest.raises(ValueError, match="MaxPool2x2 is nn.MaxPool2d\\(2\\) only"):
        MaxPool2x2(**kw)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    for ok in (dict(kernel_size=2), dict(kernel_size=(2, 2), stride=(2, 2), padding=0, dilation=1)):
        assert torch.equal(MaxPool2x2(**ok)(x), nn.MaxPool2d(**ok)(x))


@pytest.mark.parametrize("attr,value,err", [("stride", (True, 1), TypeError), ("padding", (1.0, 1), TypeError),
                                            ("stride", (0, 1), ValueError)])
def test_a_fused_layer_s_reassigned_geometry_is_checked_as_a_sparse_conv_s(attr, value, err):
    """A stride or padding reassigned on a fused layer went to the ops unchecked: (True, 1) ran as stride 1
    (a plain SparseConv2d refuses it in every forward), (1.0, 1) failed in the op's schema; each is now the
    argument's own error, as the plain layer's."""
    _, fused, mask = _fused_pair("bn_relu", 0.5)
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    plain = SparseConv2d.from_dense(nn.Conv2d(5, 7, 3, padding=1).double(), mask)
    for layer in (plain, fused.conv):
        setattr(layer, attr, value)
        with pytest.raises(err, match=attr):
            (fused if layer is fused.conv else layer)(x)
