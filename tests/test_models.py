"""sparsetrain.models: the paper's Table 3 parameter counts, Table 2 structure, forward shapes."""
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from sparsetrain.experiment.models import (build_model, count_parameters, lenet_300_100, resnet18, resnet50,
                                vgg_like)

# Paper Table 3 (CIFAR-10: 3 channels, 10 classes): (model, kwargs, value, unit).
TABLE3 = [
    ("resnet18", {}, 11.1, 1e6), ("resnet50", {}, 23.5, 1e6),
    ("vgg_like", dict(delta=1, gamma=5), 26.0, 1e3), ("vgg_like", dict(delta=1, gamma=6), 70.3, 1e3),
    ("vgg_like", dict(delta=1, gamma=7), 214.4, 1e3), ("vgg_like", dict(delta=1, gamma=8), 723.7, 1e3),
    ("vgg_like", dict(delta=1, gamma=9), 2.6, 1e6), ("vgg_like", dict(delta=2, gamma=5), 97.3, 1e3),
    ("vgg_like", dict(delta=3, gamma=5), 350.6, 1e3), ("vgg_like", dict(delta=4, gamma=5), 1.3, 1e6),
    ("vgg_like", dict(delta=5, gamma=5), 4.9, 1e6),
]
EXACT = {"resnet18": 11_173_962, "resnet50": 23_520_842, (1, 5): 25_962, (1, 6): 70_346,
         (1, 7): 214_410, (1, 8): 723_722, (1, 9): 2_627_082, (2, 5): 97_322, (3, 5): 350_634,
         (4, 5): 1_299_626, (5, 5): 4_967_082}


@pytest.mark.parametrize("name,kw,value,unit", TABLE3)
def test_table3_parameter_counts(name, kw, value, unit):
    """All parameters (incl. biases and BatchNorm affine) with a 10-class head. The paper prints
    one decimal, sometimes rounded (26.0 K, 1.3 M) and sometimes truncated (4.9 M for 4.967 M,
    11.1 M for 11.17 M): the count must match one of the two."""
    n = count_parameters(build_model(name, 10, 3, 32, **kw))
    assert n == EXACT[name if not kw else (kw["delta"], kw["gamma"])]
    x = n / unit
    assert value in (round(x, 1), math.floor(x * 10) / 10), (name, kw, n)


def test_resnet50_table_value_is_not_the_imagenet_head():
    import torchvision
    n = count_parameters(resnet50(1000, small_input=False))
    with torch.device("meta"):  # (torchvision's own ResNet-50, its count without allocating it)
        want = sum(p.numel() for p in torchvision.models.resnet50().parameters())
    assert n == want and round(n / 1e6, 1) == 25.6


@pytest.mark.parametrize("small", [False, True])
def test_resnet18_is_torchvision_s_with_the_cifar_stem(small):
    """Our ResNet-18 takes torchvision's state_dict key for key (strict) and computes what torchvision's
    computes with it; small_input swaps only the stem: conv1 3x3 stride 1 pad 1, no max-pool (was: only
    the output shape was checked)."""
    import torchvision
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=7)
    if small:
        tv.conv1, tv.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    for bn in (m for m in tv.modules() if isinstance(m, nn.BatchNorm2d)):  # (statistics that are not 0/1)
        bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 2.0)
    ours = resnet18(7, small_input=small)
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), tv.eval()(x))


@pytest.mark.parametrize("name,kw", [("resnet18", {}), ("resnet50", {}), ("vgg_like", dict(delta=2, gamma=3)),
                                     ("vgg_like", dict(delta=5, gamma=2)), ("lenet300", {})])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_forward_shapes_and_one_call_per_relu(name, kw, shape):
    model = build_model(name, 7, shape[0], shape[1:], **kw).eval()
    calls = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(lambda mod, i, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    assert calls and set(calls.values()) == {1}  # every ReLU module is one activation site


def test_resnet18_cifar_stem_and_relu_sites():
    m = resnet18(10)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and isinstance(m.maxpool, nn.Identity)
    assert sum(isinstance(x, nn.ReLU) for x in m.modules()) == 1 + 8 * 2
    assert sum(isinstance(x, nn.ReLU) for x in resnet50(10).modules()) == 1 + 16 * 3
    big = build_model("resnet18", 10, 3, 224)
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)


def test_vgg_like_follows_table2():
    m = vgg_like(3, 4, num_classes=10)
    blocks = [b for n, b in m.named_children() if n.startswith("block")]
    assert len(blocks) == 6
    for i, b in enumerate(blocks):
        assert [type(x) for x in b] == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d]
        conv = b[0]
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
        assert conv.out_channels == 2 ** (4 + i // 2)
    assert sum(isinstance(x, nn.MaxPool2d) for x in m) == 3
    assert isinstance(m.avgpool, nn.AdaptiveAvgPool2d) and m.classifier.in_features == 7 * 7 * 64
    # delta=5 on 28x28: the last stage's pool would shrink 1x1 to 0x0 and is left out
    assert sum(isinstance(x, nn.MaxPool2d) for x in vgg_like(5, 2, 10, 1, 28)) == 4
    assert sum(isinstance(x, nn.MaxPool2d) for x in vgg_like(5, 2, 10, 3, 32)) == 5


def test_lenet_300_100():
    m = lenet_300_100()
    assert [x.out_features for x in m if isinstance(x, nn.Linear)] == [300, 100, 10]
    assert count_parameters(m) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10


def test_build_model_short_names_and_errors():
    assert count_parameters(build_model("vgg_d1g5", 10)) == 25_962
    assert count_parameters(build_model("VGG-like", 10, delta=1, gamma=5)) == 25_962
    with pytest.raises(ValueError, match="unknown model 'alexnet'; known: resnet18, resnet50, vgg_like, lenet300"):
        build_model("alexnet", 10)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        build_model("resnet18", 10, delta=3)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        build_model("resnet18", 0)
    with pytest.raises(ValueError, match="delta must be an int >= 1"):
        vgg_like(0, 5)
    with pytest.raises(ValueError, match="image_size"):
        build_model("lenet300", 10, 1, (28,))


def test_vgg_like_pool_of_one_pixel_maps_is_the_adaptive_pool():
    from sparsetrain.engine.replicated import BroadcastAvgPool2d
    for shape in [(3, 8, 1, 1), (2, 4, 3, 5), (2, 4, 7, 7), (1, 2, 9, 9)]:
        x = torch.randn(shape, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        ours, ref = BroadcastAvgPool2d(7)(x), nn.AdaptiveAvgPool2d(7)(x2)
        assert torch.equal(ours, ref) and ours.is_contiguous()
        g = torch.randn_like(ref)
        ours.backward(g)
        ref.backward(g)
        torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("name", ["resnet18", "vgg_d2g2", "lenet300"])
def test_dropout_before_the_classifier(name):
    """Appendix D's dropout layer: right before the classifier (its input is what the Dropout saw),
    the same parameters and state_dict keys as the model without it, equal in eval mode."""
    torch.manual_seed(0)
    plain = build_model(name, 10, 1, 28)
    torch.manual_seed(0)
    dropped = build_model(name, 10, 1, 28, dropout=0.5)
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    (drop,) = [m for m in dropped.modules() if isinstance(m, nn.Dropout)]
    assert drop.p == 0.5
    head = dict(dropped.named_modules())[{"resnet18": "fc", "vgg_d2g2": "classifier", "lenet300": "fc3"}[name]]
    seen = {}
    drop.register_forward_hook(lambda m, i, o: seen.setdefault("drop", o))
    head.register_forward_pre_hook(lambda m, i: seen.setdefault("head", i[0]))
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(dropped.eval()(x), plain.eval()(x))
    seen.clear()
    dropped.train()(x)
    assert torch.equal(seen["drop"].flatten(1), seen["head"]) and (seen["drop"] == 0).float().mean() > 0.3
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="dropout must be a number in"):
            build_model(name, 10, 1, 28, dropout=bad)


def test_dropout_takes_any_real_number():
    """dropout=np.float32(0.5) was refused ("must be a number") while np.float64(0.5) passed; any real
    number in [0, 1) is taken now, as a float (nn.Dropout's p), a bool still refused."""
    builders = (lambda p: build_model("resnet18", 10, 1, 28, dropout=p), lambda p: build_model("vgg_d2g2", 10, 1, 28, dropout=p),
                lambda p: build_model("lenet300", 10, 1, 28, dropout=p), lambda p: vgg_like(1, 2, dropout=p),
                lambda p: lenet_300_100(dropout=p))
    for build in builders:
        for p in (np.float32(0.25), np.float64(0.25), np.int64(0), 0.25):
            drops = [m.p for m in build(p).modules() if isinstance(m, nn.Dropout)]
            assert drops == ([] if p == 0 else [0.25]) and all(type(d) is float for d in drops), (p, drops)
        for bad in (np.float32(1.0), np.bool_(True), np.float32("nan")):
            with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\)"):
                build(bad)


def test_vgg_like_too_wide_is_refused_before_building(monkeypatch):
    """delta + gamma >= 15 (a last stage of 2^14+ channels, over 2^31 weights) was refused for the
    short name only: build_model("vgg_like", delta=.., gamma=..) and vgg_like() started allocating
    tens of GB. Now every path raises before the first layer is built."""
    from sparsetrain.experiment import models

    def no_layer(*a, **k):
        raise AssertionError("a layer was built before the size check")
    monkeypatch.setattr(models.nn, "Conv2d", no_layer)
    for call in (lambda: vgg_like(8, 8), lambda: build_model("vgg_like", 10, delta=1, gamma=14),
                 lambda: build_model("vgg_d7g8", 10)):
        with pytest.raises(ValueError, match=r"delta \+ gamma <= 14"):
            call()
    monkeypatch.undo()
    assert vgg_like(1, 5).block1_1.conv.out_channels == 32  # (below the bound: built as before)


def test_builders_refuse_what_build_model_refuses():
    """vgg_like() and lenet_300_100() took dropout=1.0 (or True) and built a model whose classifier
    sees only zeros in training (its output the same for every image), and a str dropout failed
    inside nn.Dropout's comparison; lenet's in_features took True as 1. They now refuse these as
    build_model does, and a valid p still gives the layer build_model gives."""
    for build in (lambda p: vgg_like(1, 2, dropout=p), lambda p: lenet_300_100(dropout=p)):
        for bad in (1.0, True, -0.1, "0.5"):
            with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\)"):
                build(bad)
        (drop,) = [m for m in build(0.5).modules() if isinstance(m, nn.Dropout)]
        assert drop.p == 0.5
    with pytest.raises(ValueError, match="in_features must be a positive int, got True"):
        lenet_300_100(in_features=True)
    torch.manual_seed(0)
    m = vgg_like(1, 2, dropout=0.5).train()
    out = m(torch.randn(4, 3, 8, 8))
    assert not torch.allclose(out[0], out[1])  # (the classifier sees the images)


def test_short_vgg_name_and_conflicting_depth_width_are_refused():
    """build_model("vgg_d5g5", delta=2) built VGG-like(2, 5) under the name of VGG-like(5, 5) (the
    name is what runs and checkpoints identify a model by); a clash is now a ValueError, and the
    same values given twice still build the named model."""
    with pytest.raises(ValueError, match=r"build_model\('vgg_d5g5'\) names .*'delta': 5.* but got \{'delta': 2\}"):
        build_model("vgg_d5g5", 10, delta=2)
    with pytest.raises(ValueError, match=r"but got \{'gamma': 3\}"):
        build_model("vgg_d1g5", 10, delta=1, gamma=3)
    assert count_parameters(build_model("vgg_d1g5", 10, delta=1, gamma=5)) == EXACT[(1, 5)]


def test_resnets_refuse_a_small_input_that_is_not_a_bool():
    """small_input="False" (a string from a config file) was truthy: the CIFAR stem (3x3 stride 1, no
    max-pool) on an ImageNet-sized model without a word; True/False build the two stems."""
    for build in (resnet18, resnet50):
        for bad in ("False", 0, None):
            with pytest.raises(TypeError, match=rf"^small_input must be True or False, got {re.escape(repr(bad))}$"):
                build(10, small_input=bad)
        assert [build(10, small_input=s).conv1.kernel_size for s in (True, False)] == [(3, 3), (7, 7)]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "1"])
def test_lenet_in_channels_is_checked_by_its_name(bad):
    """build_model("lenet300", in_channels=...) never checked in_channels: True built a 784-input
    LeNet (as 1 channel), and 0, -1 or 2.5 failed on the product, "in_features must be a positive int,
    got -784", an argument the caller never gave. Now it is refused as for the other models."""
    with pytest.raises(ValueError, match=rf"^in_channels must be a positive int, got {re.escape(repr(bad))}$"):
        build_model("lenet300", 10, bad, 28)
    assert build_model("lenet300", 10, 2, 28).fc1.in_features == 2 * 28 * 28  # (a valid count: C*H*W inputs)


@pytest.mark.parametrize("name", ["lenet300", "vgg_d1g1", "resnet18"])
@pytest.mark.parametrize("bad", [(28, True), (False, 28), [28, 28.0], 0, (0, 28), (28, 28, 3)])
def test_image_size_takes_ints_only_and_is_named_as_given(name, bad):
    """image_size=(28, True) built a model for 28x1 images (True taken as 1: a LeNet of 28 inputs); a
    bad size is refused, and the message shows the value the caller gave (0 was shown as "(0, 0)")."""
    with pytest.raises(ValueError, match=rf"^image_size must be a positive int or \(height, width\), "
                                         rf"got {re.escape(repr(bad))}$"):
        build_model(name, 10, 1, bad)
    assert build_model("lenet300", 10, 1, [28, 14]).fc1.in_features == 28 * 14  # (a list of two ints: as before)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg_d2g3", "lenet300"])
def test_what_is_prunable_follows_appendix_b1(name):
    """Paper B.1: every conv and linear weight is prunable, whatever the model (the first conv and
    the classifier included); neither biases nor BatchNorm parameters are. One global magnitude
    round (the study's unstructured rule) gives every such layer a mask and leaves the rest as it was."""
    from sparsetrain.engine.nn import prunable_layers, weight_count
    from sparsetrain.prune import global_prune
    model = build_model(name, 10, 3, 32)
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [n for n, _ in prunable_layers(model)] == convs
    assert convs[0] == {"lenet300": "fc1"}.get(name, "conv1" if name.startswith("resnet") else "block1_1.conv")
    assert convs[-1] == {"resnet18": "fc", "resnet50": "fc", "lenet300": "fc3"}.get(name, "classifier")
    weights = {f"{n}.weight" for n in convs}
    assert weight_count(model) == sum(p.numel() for n, p in model.named_parameters() if n in weights)
    assert weight_count(model) < count_parameters(model)  # (biases and BatchNorm affine are not counted)
    if name == "resnet50":
        return  # (the round below on 23.5 M weights takes seconds; resnet18 has the same layer kinds)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = global_prune(model, {}, 0.5)
    assert list(masks) == convs
    after = dict(model.named_parameters())
    for n in before:
        if n in weights:
            mask = masks[n[:-len(".weight")]]
            assert torch.equal(after[n][~mask], torch.zeros_like(after[n][~mask]))
            assert torch.equal(after[n][mask], before[n][mask])
        else:
            assert torch.equal(after[n], before[n]), n  # biases, BatchNorm weight and bias: never pruned
    kept = sum(int(mk.sum()) for mk in masks.values())
    assert kept == weight_count(model) - int(0.5 * weight_count(model))
    assert all(0 < int(masks[n].sum()) < masks[n].numel() for n in (convs[0], convs[-1]))


@pytest.mark.parametrize("name", ["resnet18", "vgg_d2g3", "lenet300"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("fuse", [False, True])
def test_sparsify_densify_round_trip_gives_the_dense_masked_model(name, sparsity, fuse):
    """Every study model, random masks on all its conv/linear layers: sparsify_ (fused or not) then
    densify_ is the dense model with the mask applied, bit for bit: same modules at the same names,
    same state_dict (pruned weights 0, biases, BN parameters and statistics untouched), all trainable."""
    import copy
    import sparsetrain
    from sparsetrain.engine.nn import is_sparse
    from sparsetrain.testing import model_masks, zero_pruned_
    model = build_model(name, 10, 3, 16).eval()
    masks = model_masks(model, sparsity)
    ref = copy.deepcopy(model)
    zero_pruned_(ref, masks)
    sparsetrain.sparsify_(model, masks, fuse=fuse)
    assert all(is_sparse(model.get_submodule(n)) for n in masks)
    sparsetrain.densify_(model)
    assert [(n, type(m), m.training) for n, m in model.named_modules()] == \
        [(n, type(m), m.training) for n, m in ref.named_modules()]
    state, want = model.state_dict(), ref.state_dict()
    assert list(state) == list(want) and all(torch.equal(state[k], want[k]) for k in want)
    assert all(p.requires_grad for p in model.parameters())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), ref(x))


def test_numpy_integers_build_the_same_model():
    """num_classes = labels.max() + 1 on a numpy array is an np.int64: build_model refused it with
    "num_classes must be a positive int, got np.int64(10)" (torch's layers take numpy integers; the
    checks took only Python ints). Numpy integers now build the model the Python ints build; a bool,
    a float or a bad value is still refused by name."""
    import numpy as np
    for name, kw in [("resnet18", {}), ("vgg_like", dict(delta=np.int64(2), gamma=np.int32(3))), ("lenet300", {})]:
        got = build_model(name, np.int64(7), np.int64(1), np.int64(28), **kw)
        want = build_model(name, 7, 1, 28, **{k: int(v) for k, v in kw.items()})
        assert [(n, p.shape) for n, p in got.named_parameters()] == [(n, p.shape) for n, p in want.named_parameters()]
        assert got(torch.randn(2, 1, 28, 28)).shape == (2, 7)
        sizes = [v for m in got.modules() for v in vars(m).values() if isinstance(v, (np.integer, tuple))]
        assert not any(isinstance(v, np.integer) or isinstance(v, tuple) and any(isinstance(e, np.integer) for e in v)
                       for v in sizes)  # (the layers hold Python ints, as built from ints)
    assert lenet_300_100(np.int64(5), in_features=np.int64(12)).fc1.in_features == 12
    for bad, arg in ((np.int64(0), "num_classes"), (np.bool_(True), "num_classes"), (np.float64(10.0), "num_classes")):
        with pytest.raises(ValueError, match=rf"^{arg} must be a positive int, got {re.escape(repr(bad))}$"):
            build_model("resnet18", bad)
    with pytest.raises(ValueError, match=r"^delta must be an int >= 1, got np\.int64\(0\)$"):
        vgg_like(np.int64(0), 5)
