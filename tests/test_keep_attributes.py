"""What sparsify_ / densify_ keep of the plain Python attributes a user set on a layer they replace
(`layer.tag = 1`): carried over to the replacement, the same objects (dropped silently before 2026-12-06)."""
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import sparsetrain
from sparsetrain.engine.bsr import BSRLinear
from sparsetrain.engine.swap import own_keys
from sparsetrain.testing import random_mask

from conftest import dense_masked_copy


def _model():
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))


def _masks(g):
    return {"0": random_mask((4, 2, 3, 3), 0.5, generator=g), "3": random_mask((3, 36), 0.5, generator=g)}



@pytest.mark.parametrize("pruned", [False, True])
def test_a_user_s_attributes_on_a_layer_move_with_it(pruned):
    g = torch.Generator().manual_seed(0)
    model, masks = _model(), _masks(g)
    ref = dense_masked_copy(model, masks)
    if pruned:  # (torch.nn.utils.prune's `weight`, a plain attribute, is the layer's own, not a user's)
        torch_prune.identity(model[3], "weight")
    tags = {"0": ["conv", 1], "3": {"head": True}}
    for name, tag in tags.items():
        layer = model.get_submodule(name)
        layer.my_tag = tag
    sparsetrain.sparsify_(model, masks)
    assert [type(model[i]).__name__ for i in (0, 3)] == ["SparseConv2d", "SparseLinear"]
    for name, tag in tags.items():
        layer = model.get_submodule(name)
        assert layer.my_tag is tag
    x = torch.randn(2, 2, 5, 5, generator=g)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    sparsetrain.densify_(model)
    assert [type(model[i]) for i in (0, 3)] == [nn.Conv2d, nn.Linear]
    for name, tag in tags.items():
        layer = model.get_submodule(name)
        assert layer.my_tag is tag and not hasattr(layer, "weight_orig")
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_a_user_s_attribute_on_a_bsr_layer_moves_to_the_dense_one():
    model = nn.Sequential(BSRLinear.from_dense(nn.Linear(32, 16), block_size=16))
    model[0].my_tag = tag = object()
    model[0].weight.values._no_weight_decay = True
    x = torch.randn(3, 32)
    want = model(x)
    sparsetrain.densify_(model)
    assert type(model[0]) is nn.Linear and model[0].my_tag is tag and model[0].weight._no_weight_decay is True
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_an_attribute_the_replacement_has_of_its_own_is_refused_before_any_swap():
    """A user's attribute named as one of the replacement's own (`sparsity` of a sparse layer, `transposed` of
    nn.Conv2d) cannot move to it: refused by name, the model untouched."""
    g = torch.Generator().manual_seed(0)
    model, masks = _model(), _masks(g)
    model[3].sparsity = 0.5
    with pytest.raises(ValueError, match="layer '3' has an attribute 'sparsity', which its replacement, a "
                                         "SparseLinear, has as an attribute of its own: rename it first"):
        sparsetrain.sparsify_(model, masks)
    assert [type(model[i]) for i in (0, 3)] == [nn.Conv2d, nn.Linear]
    del model[3].sparsity
    sparsetrain.sparsify_(model, masks)
    model[0].transposed, model[3].transposed = False, True  # (nn.Conv2d's own; nn.Linear has none: carried)
    with pytest.raises(ValueError, match="layer '0' has an attribute 'transposed', which its replacement, a "
                                         "Conv2d, has as an attribute of its own: rename it first"):
        sparsetrain.densify_(model)
    assert [type(model[i]).__name__ for i in (0, 3)] == ["SparseConv2d", "SparseLinear"]
    del model[0].transposed
    sparsetrain.densify_(model)
    assert type(model[3]) is nn.Linear and model[3].transposed is True


def _no_decay(model):
    """A param-group builder as optimizers' recipes write it: the Parameters marked `_no_weight_decay`."""
    return [p for p in model.parameters() if getattr(p, "_no_weight_decay", False)]


@pytest.mark.parametrize("pruned", [False, True])
def test_a_user_s_attributes_on_a_layer_s_parameters_move_to_the_new_parameters(pruned):
    """`p._no_weight_decay = True` on a layer's weight or bias was dropped with the old Parameter: a param-group
    builder reading it put the new ones in the decayed group, silently. Stepped as the dense masked reference."""
    g = torch.Generator().manual_seed(0)
    model, masks = _model(), _masks(g)
    ref = dense_masked_copy(model, masks)
    if pruned:  # (prune's weight_orig is the Parameter the user marked)
        torch_prune.identity(model[3], "weight")
    for layer, r in ((model[i], ref[i]) for i in (0, 3)):
        for m in (layer, r):
            (m.weight_orig if pruned and m is model[3] else m.weight)._no_weight_decay = True
            m.bias._no_weight_decay = "bias"
    sparsetrain.sparsify_(model, masks)
    for i in (0, 3):
        assert model[i].weight.values._no_weight_decay is True and model[i].bias._no_weight_decay == "bias"
    assert {id(p) for p in _no_decay(model)} == {id(p) for p in model.parameters()}
    x = torch.randn(2, 2, 5, 5, generator=g)

    def step(m):  # (decay only where not marked: here, nothing)
        opt = torch.optim.SGD([{"params": _no_decay(m), "weight_decay": 0.0},
                               {"params": [p for p in m.parameters() if p not in set(_no_decay(m))],
                                "weight_decay": 0.5}], lr=0.1)
        opt.zero_grad()
        m(x).square().sum().backward()
        for name, mk in masks.items():  # (dense masked training: the reference, and the model once densified)
            if isinstance(m.get_submodule(name).weight, torch.Tensor):
                m.get_submodule(name).weight.grad.mul_(mk)
        opt.step()
    step(model), step(ref)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    sparsetrain.densify_(model)
    for i in (0, 3):
        assert model[i].weight._no_weight_decay is True and model[i].bias._no_weight_decay == "bias"
    step(model), step(ref)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("on", ["0", "1", "2"])
def test_fuse_leaves_a_module_with_a_user_s_attribute_unfused(on):
    """fuse_ (and sparsify_(fuse=True)) dropped a user's attribute on the conv, BN or ReLU it fuses; such a
    module is left unfused, as one with a user's buffer, its attribute kept through densify_ too."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    masks = {"0": random_mask((4, 2, 3, 3), 0.5, generator=g)}
    ref = dense_masked_copy(model, masks)
    model.get_submodule(on).my_tag = tag = ["kept"]
    sparsetrain.sparsify_(model, masks, fuse=True)
    assert type(model[0]).__name__ == "SparseConv2d" and model.get_submodule(on).my_tag is tag
    x = torch.randn(3, 2, 5, 5, generator=g)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    sparsetrain.densify_(model)
    assert type(model[0]) is nn.Conv2d and model.get_submodule(on).my_tag is tag
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    untagged = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())  # (without one: fused)
    sparsetrain.sparsify_(untagged, masks, fuse=True)
    assert type(untagged[0]).__name__ == "SparseConvBNReLU"


def test_keep_channels_carries_the_attributes_set_on_the_parameters_it_shrinks():
    """keep_channels_ (filter_prune's shrink) built the smaller layers' Parameters without the attributes set on
    the old ones (`p._no_weight_decay = True`): a param-group builder then decayed them, silently. Stepped as the
    dense reference with the same channels sliced out by hand."""
    from sparsetrain.prune import keep_channels_
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    keep = torch.tensor([0, 2, 3])
    ref = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 3))
    with torch.no_grad():
        for i in (0, 1):
            for attr in ("weight", "bias"):
                getattr(ref[i], attr).copy_(getattr(model[i], attr)[keep])
        ref[4].weight.copy_(model[4].weight.view(3, 4, 9)[:, keep].reshape(3, 27))
        ref[4].bias.copy_(model[4].bias)
    for m in (model, ref):
        for i in (0, 1, 4):
            m[i].weight._no_weight_decay = True
        m[0].bias._no_weight_decay = "bias"
    keep_channels_(model, {"0": keep})
    assert model[0].weight.shape == (3, 2, 3, 3) and model[4].weight.shape == (3, 27)
    for m in (model, ref):
        assert {id(p) for p in _no_decay(m)} == {id(p) for p in (m[0].weight, m[0].bias, m[1].weight, m[4].weight)}
        assert m[0].bias._no_weight_decay == "bias"
    x = torch.randn(2, 2, 5, 5, generator=g)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)

    def step(m):  # (decay only where not marked: BN's bias, the head's bias)
        opt = torch.optim.SGD([{"params": _no_decay(m), "weight_decay": 0.0},
                               {"params": [p for p in m.parameters() if p not in set(_no_decay(m))],
                                "weight_decay": 0.5}], lr=0.1)
        m(x).square().sum().backward()
        opt.step()
    step(model), step(ref)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def _fusable():
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


@pytest.mark.parametrize("then", ["unfuse_", "densify_"])
def test_a_user_s_attributes_set_on_fused_layers_move_to_the_plain_ones(then):
    """unfuse_ (and densify_, which unfuses first) built the plain modules without the attributes a user set on the
    fused ones after fuse_ (`layer.tag = 1`), dropping them silently; fuse_'s own (feeds, pools, route_input, the
    hand-off slot...) are not carried."""
    g = torch.Generator().manual_seed(0)
    model = _fusable()
    masks = {"0": random_mask((4, 2, 3, 3), 0.5, generator=g), "6": random_mask((3, 4), 0.5, generator=g)}
    ref = dense_masked_copy(model, masks)
    sparsetrain.sparsify_(model, masks, fuse=True)
    assert [type(m).__name__ for m in model] == ["SparseConvBNReLU", "FusedBatchNorm2d", "FusedReLU", "MaxPool2x2",
                                                 "FusedAdaptiveAvgPool2d", "FusedFlatten", "FusedSparseLinear"]
    x = torch.randn(2, 2, 8, 8, generator=g)
    model(x).sum().backward()  # (a forward sets fuse_'s per-thread hand-off slots)
    tags = [[i] for i in range(len(model))]
    for m, tag in zip(model, tags):
        m.my_tag = tag
    getattr(sparsetrain, then)(model)
    plain = [nn.Conv2d if then == "densify_" else sparsetrain.SparseConv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
             nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear if then == "densify_" else sparsetrain.SparseLinear]
    assert [type(m) for m in model] == plain
    for m, tag in zip(model, tags):
        assert m.my_tag is tag
        assert set(m.__dict__) - own_keys(m) == {"my_tag"}  # (nothing of fuse_'s)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_an_attribute_of_a_fused_layer_the_dense_one_has_of_its_own_is_refused_before_any_swap():
    """densify_ of a fused model unfuses first: a user's attribute on the fused conv named as one of nn.Conv2d's own
    is refused by name before anything is swapped (it would have been after unfuse_), then carried once renamed."""
    g = torch.Generator().manual_seed(0)
    model = _fusable()
    masks = {"0": random_mask((4, 2, 3, 3), 0.5, generator=g)}
    ref = dense_masked_copy(model, masks)
    sparsetrain.sparsify_(model, masks, fuse=True)
    model[0].transposed = tag = ["mine"]  # (nn.Conv2d's own, not SparseConv2d's)
    with pytest.raises(ValueError, match="layer '0' has an attribute 'transposed', which its replacement, a "
                                         "Conv2d, has as an attribute of its own: rename it first"):
        sparsetrain.densify_(model)
    assert [type(m).__name__ for m in model[:2]] == ["SparseConvBNReLU", "FusedBatchNorm2d"]
    model[0].my_transposed = model[0].__dict__.pop("transposed")
    sparsetrain.densify_(model)
    assert type(model[0]) is nn.Conv2d and model[0].my_transposed is tag and model[0].transposed is False
    x = torch.randn(2, 2, 8, 8, generator=g)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
