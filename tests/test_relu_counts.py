"""ReLU-state counting inside the kernels that apply a fused layer's ReLU (`relu_counts` of
sparse_conv2d_stats and bn_act; FusedReLU.count_states; the activation entropy of Eq. 1): per
output neuron, the samples whose activation is > 0, against the count taken from the written
output ((out > 0).sum over the batch) and against the entropy counted by hooks alone."""
import copy

import pytest
import torch
from torch import nn

import sparsetrain
from sparsetrain.engine.fused import FusedReLU, sparse_conv_bn_relu
from sparsetrain.experiment import entropy as entropy_mod
from sparsetrain.experiment.entropy import activation_entropy
from sparsetrain.experiment.models import resnet18, vgg_like
from sparsetrain.testing import model_masks, random_mask


def _count(out: torch.Tensor) -> torch.Tensor:
    """The reference: per neuron, the samples with out > 0."""
    return (out.reshape(out.shape[0], -1) > 0).sum(0).to(torch.int64)


# (C, O, batch, hw, k, stride, pad): phase-plane maps (odd, stride 2, 1x1, batch 1, one pixel), the
# small-map kernel (<= 16 output pixels, batch >= one vector; 24 samples: a tile and a partial one)
# and the strided 1x1 kernel (1x1 stride 2 without padding)
GEOMS = [(3, 5, 2, (9, 7), 3, 1, 1), (4, 7, 1, (5, 5), 1, 2, 0), (1, 1, 3, (1, 1), 1, 1, 0),
         (5, 3, 24, (4, 4), 3, 1, 1), (6, 9, 17, (3, 3), 3, 2, 1), (11, 6, 2, (8, 8), 3, 2, 1),
         (6, 5, 17, (7, 9), 1, 2, 0), (1200, 8, 2, (33, 17), 1, 2, 0)]  # strided 1x1: sample tiles, bands


@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: f"{g[0]}-{g[1]}-b{g[2]}-{g[3]}-k{g[4]}s{g[5]}")
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_stats_counts_its_positive_outputs(geom, sparsity, dtype):
    cin, cout, b, hw, k, s, p = geom
    g = torch.Generator().manual_seed(cin * 7 + cout)
    w = torch.randn(cout, cin, k, k, generator=g, dtype=dtype)
    mask = random_mask(w.shape, sparsity, generator=g, empty_rows=1 if cout > 2 else 0)
    bias = torch.randn(cout, generator=g, dtype=dtype)  # empty rows: bias fill, positive or not
    x = torch.randn(b, cin, *hw, generator=g, dtype=dtype)
    csr = sparsetrain.CSR.from_dense(w, mask)
    for relu in (True, False):
        base = torch.randint(0, 5, (1,), generator=g).item()
        y0, _ = torch.ops.sparsetrain.sparse_conv2d_stats(x, *csr.index(), [k, k], [s, s], [p, p], bias, relu)
        counts = torch.full((y0[0].numel(),), base, dtype=torch.int64)
        y, _ = torch.ops.sparsetrain.sparse_conv2d_stats(x, *csr.index(), [k, k], [s, s], [p, p], bias, relu,
                                                         None, None, None, False, counts)
        torch.testing.assert_close(y, y0, rtol=0, atol=0)  # counting changes no output
        torch.testing.assert_close(counts, _count(y) + base, rtol=0, atol=0)  # added to


@pytest.mark.parametrize("shape", [(3, 4, 9, 8), (5, 6, 2, 3), (1, 1, 1, 1), (2, 3, 0, 4)])
@pytest.mark.parametrize("residual", [False, True])
def test_bn_act_counts_its_positive_outputs(shape, residual):
    """Planes of >= 64 pixels and sample rows (smaller maps)."""
    g = torch.Generator().manual_seed(3)
    c = shape[1]
    y = torch.randn(shape, generator=g)
    scale, shift = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    mean = torch.randn(c, generator=g, dtype=torch.float64)
    r = torch.randn(shape, generator=g) if residual else None
    for relu in (True, False):
        counts = torch.ones(c * shape[2] * shape[3], dtype=torch.int64)
        out = torch.ops.sparsetrain.bn_act(y, mean, scale, shift, r, relu, counts)
        torch.testing.assert_close(out, torch.ops.sparsetrain.bn_act(y, mean, scale, shift, r, relu), rtol=0, atol=0)
        torch.testing.assert_close(counts, _count(out) + 1, rtol=0, atol=0)


def test_relu_counts_errors_and_opcheck():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 3, 3, 3, generator=g)
    csr = sparsetrain.CSR.from_dense(w, random_mask(w.shape, 0.5, generator=g))
    idx = [t.detach() for t in csr.index()]
    x = torch.randn(2, 3, 6, 5, generator=g)
    geo = ([3, 3], [1, 1], [1, 1])
    n = 4 * 6 * 5
    for bad, msg in ((torch.zeros(n, dtype=torch.int32), "relu_counts must have dtype int64"),
                     (torch.zeros(n + 1, dtype=torch.int64), "one entry per output neuron \\(120"),
                     (torch.zeros(2 * n, dtype=torch.int64)[::2], "relu_counts must be contiguous")):
        error = TypeError if "dtype" in msg else ValueError
        with pytest.raises(error, match=msg):
            torch.ops.sparsetrain.sparse_conv2d_stats(x, *idx, *geo, None, True, None, None, None, False, bad)
        with pytest.raises(error, match=msg.replace("output neuron \\(120", "output neuron \\(90")):
            torch.ops.sparsetrain.bn_act(x, torch.zeros(3, dtype=torch.float64), torch.ones(3), torch.zeros(3), None, True,
                                         bad if bad.numel() != n + 1 else torch.zeros(91, dtype=torch.int64))
    torch.library.opcheck(torch.ops.sparsetrain.sparse_conv2d_stats.default,
                          (x, *idx, *geo, None, True, None, None, None, False, torch.zeros(n, dtype=torch.int64)))
    torch.library.opcheck(torch.ops.sparsetrain.bn_act.default,
                          (x, torch.zeros(3, dtype=torch.float64), torch.ones(3), torch.zeros(3), None, True,
                           torch.zeros(90, dtype=torch.int64)))
    for hw in ((6, 5), (2, 2)):  # an empty batch still has C * H * W neurons (planes, and sample rows)
        counts = torch.zeros(3 * hw[0] * hw[1], dtype=torch.int64)
        out = torch.ops.sparsetrain.bn_act(torch.randn(0, 3, *hw), torch.zeros(3, dtype=torch.float64), torch.ones(3),
                                           torch.zeros(3), None, True, counts)
        assert out.shape == (0, 3, *hw) and not counts.any()


# ============================================================================ layers and the entropy
def _entropy_by_hooks(model, batches):
    """activation_entropy with the fused layers' counting left off (every ReLU counted by its hook)."""
    saved = entropy_mod._counting.__enter__
    entropy_mod._counting.__enter__ = lambda self: None
    try:
        return activation_entropy(model, batches)
    finally:
        entropy_mod._counting.__enter__ = saved


@pytest.mark.parametrize("make", [lambda: resnet18(10), lambda: vgg_like(2, 2, image_size=16)],
                         ids=["resnet", "vgg_relu_bn"])
@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])
def test_entropy_counted_in_the_kernels_equals_hooks(make, sparsity):
    """Every pattern: conv-BN-ReLU folded in eval (epilogue), the residual's ReLU (bn_act), VGG's
    conv-ReLU-BN (the conv epilogue's ReLU); and the counts really come from the kernels."""
    torch.manual_seed(0)
    model = make()
    sparsetrain.sparsify_(model, model_masks(model, sparsity, seed=1), fuse=True)
    relus = [m for m in model.modules() if isinstance(m, FusedReLU)]
    assert relus
    x = torch.randn(20, 3, 16, 16)
    batches = [x, x[:3], x[:1]]
    got, ref = activation_entropy(model, batches), _entropy_by_hooks(model, batches)
    assert got == ref
    taken = []
    for m in relus:  # the layers hand counts on while count_states is set, once per call
        m.register_forward_hook(lambda mod, i, o: taken.append(mod.pop_state_counts()))
        m.count_states = True
    model.eval()
    with torch.no_grad():
        model(x)
    assert len(taken) == len(relus) and all(t is not None for t in taken)
    for m in relus:
        assert m.pop_state_counts() is None  # taken once
    for m in relus:
        m.count_states = False
    assert not any(m.count_states or m._state_counts is not None
                   for m in model.modules() if isinstance(m, FusedReLU))


def test_entropy_counts_what_a_hook_on_the_fused_relu_returns():
    """A user's forward hook on a fused ReLU that returns another tensor: the entropy counts that
    tensor, as on the unfused model (the kernel's counts are of the activation before the hook)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 4))
    model[2].register_forward_hook(lambda mod, i, out: out - 0.5)
    masks = model_masks(model, 0.5, seed=1)
    fused, unfused = copy.deepcopy(model), copy.deepcopy(model)
    sparsetrain.sparsify_(fused, masks, fuse=True)
    sparsetrain.sparsify_(unfused, masks)
    assert isinstance(fused[2], FusedReLU)
    x = [torch.randn(16, 3, 8, 8)]
    assert activation_entropy(fused, x) == activation_entropy(unfused, x)
    relu = fused[2]
    relu.count_states = True
    with torch.no_grad():
        out = fused.eval()[:3](x[0])
    assert relu.pop_state_counts(out) is None and relu._state_counts is None  # another tensor: dropped
    with torch.no_grad():
        act = relu.forward(fused[1](fused[0](x[0])))  # (its forward alone: the hook not run)
    assert torch.equal(relu.pop_state_counts(act), _count(act))


def test_counting_on_every_path_of_the_layer(monkeypatch):
    """The layer counts wherever it computes its ReLU: folded inference, the training-mode forward
    (bn_act after batch statistics, or the conv epilogue's ReLU before the BN), with and without
    autograd, and the unfused ops where the fused kernels do not run: the counts of its output."""
    from sparsetrain.engine import fused as fused_mod
    g = torch.Generator().manual_seed(2)
    conv = sparsetrain.nn.SparseConv2d.from_dense(nn.Conv2d(3, 4, 3, padding=1),
                                                  random_mask((4, 3, 3, 3), 0.5, generator=g))
    bn = nn.BatchNorm2d(4)
    x = torch.randn(5, 3, 7, 6, generator=g)
    for relu_before in (False, True):
        for training in (False, True):
            for grad in (False, True):
                for fallback in (False, True):
                    if fallback:
                        monkeypatch.setattr(fused_mod, "_can_fuse", lambda x, conv: False)
                    bn.train(training)
                    counts = torch.zeros(4 * 7 * 6, dtype=torch.int64)
                    with torch.set_grad_enabled(grad):
                        out, y = sparse_conv_bn_relu(x, conv, bn, relu_before, not relu_before, relu_counts=counts,
                                                     defer={})
                    torch.testing.assert_close(counts, _count(y if relu_before else out), rtol=0, atol=0)
                    monkeypatch.undo()
    with pytest.raises(ValueError, match="relu_counts needs a layer with a ReLU"):
        sparse_conv_bn_relu(x, conv, bn, relu_counts=torch.zeros(168, dtype=torch.int64))
    with pytest.raises(TypeError, match="relu_counts must be a 1-D int64 tensor"):
        sparse_conv_bn_relu(x, conv, bn, relu_after=True, relu_counts=torch.zeros(168))
    with pytest.raises(ValueError, match="relu_counts must be a 1-D int64 tensor"):
        sparse_conv_bn_relu(x, conv, bn, relu_after=True, relu_counts=torch.zeros(2, 84, dtype=torch.int64))
