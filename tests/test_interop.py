"""A sparse model inside other PyTorch machinery (parametrize, prune, weight_norm, DDP, Module.compile,
parameters_to_vector): equal to the dense masked model, or refused naming what is not supported."""
import copy

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn
from torch.nn.utils import parametrize

import sparsetrain
from sparsetrain.engine.bsr import BSRLinear
from sparsetrain.prune import global_prune


class _Double(nn.Module):
    def forward(self, t):
        return 2 * t


def _reparametrize_bias(layer, how):
    if how == "parametrize":
        parametrize.register_parametrization(layer, "bias", _Double())
        return layer.parametrizations.bias.original
    if how == "prune":
        torch_prune.l1_unstructured(layer, "bias", amount=0.5)
        return layer.bias_orig
    torch.nn.utils.weight_norm(layer, name="bias", dim=0)
    return layer.bias_g


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated")
@pytest.mark.parametrize("how", ["parametrize", "prune", "weight_norm"])
@pytest.mark.parametrize("kind", ["linear", "bsr"])
def test_a_sparse_layer_whose_bias_is_reparametrized_is_not_densified_silently(how, kind):
    """The bias is computed (`<bias>_orig * mask` as of the last forward, weight_norm's g·v/|v|, or a
    parametrization): to_dense() copied the last forward's value (stale after a step) into a plain
    Parameter, dropping the reparametrization, and densify_ moved prune's and weight_norm's hooks onto a
    dense layer without their parameters (its next forward: AttributeError 'bias_mask')."""
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))
    masks = global_prune(model, {}, 0.5)
    if kind == "bsr":
        model[0] = BSRLinear.from_dense(model[0], 16)
        sparsetrain.sparsify_(model, {"2": masks["2"]})
    else:
        sparsetrain.sparsify_(model, masks)
    x = torch.randn(4, 64)
    source = _reparametrize_bias(model[0], how)
    model(x)
    with torch.no_grad():  # (a step after the last forward)
        source.add_(1.0)
    want = model(x)  # (the layer as it computes now)
    with pytest.raises(TypeError, match=r"BSRLinear|SparseLinear") as e:
        model[0].to_dense()
    assert "bias is computed by" in str(e.value) and "remove it first" in str(e.value)
    before = list(model)
    with pytest.raises(TypeError, match=r"layer '0''s bias is computed by") as e:
        sparsetrain.densify_(model)
    assert list(model) == before  # (nothing swapped: the other sparse layer neither)
    torch.testing.assert_close(model(x), want)
    if how == "parametrize":  # (the advice works: then it densifies, the bias as it is)
        parametrize.remove_parametrizations(model[0], "bias")
    elif how == "prune":
        torch_prune.remove(model[0], "bias")
    else:
        torch.nn.utils.remove_weight_norm(model[0], "bias")
    sparsetrain.densify_(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    torch.testing.assert_close(model(x), want)


def test_unfuse_of_a_fused_layer_whose_bias_is_parametrized_is_refused_untouched():
    """A parametrization registered on a fused conv's bias after fuse_ trains as the unfused layer's (checked
    here); unfuse_ raised torch's "cannot assign 'torch.FloatTensor' as parameter 'bias'" from inside
    to_conv, after swapping the fused layers before it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3))
    masks = global_prune(model, {}, 0.5)
    ref = copy.deepcopy(model)
    sparsetrain.sparsify_(ref, masks)
    sparsetrain.sparsify_(model, masks, fuse=True)
    for m in (model, ref):
        parametrize.register_parametrization(m[3], "bias", _Double())
    x = torch.randn(2, 2, 4, 4)
    out, want = model(x), ref(x)
    torch.testing.assert_close(out, want)
    out.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(model[3].parametrizations.bias.original.grad, ref[3].parametrizations.bias.original.grad)
    before = list(model)
    for convert in (sparsetrain.unfuse_, sparsetrain.densify_):
        with pytest.raises(TypeError, match=r"layer '3''s bias is computed by a parametrization.*"
                                            r"remove_parametrizations\(layer, 'bias'\)"):
            convert(model)
        assert list(model) == before  # (the fused layer '0' before it too)
    parametrize.remove_parametrizations(model[3], "bias")
    parametrize.remove_parametrizations(ref[3], "bias")
    sparsetrain.unfuse_(model)
    assert type(model[0]) is type(model[3]) is sparsetrain.SparseConv2d
    model.eval(), ref.eval()
    torch.testing.assert_close(model(x), ref(x))


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated")
@pytest.mark.parametrize("how", ["prune", "weight_norm"])
def test_fuse_keeps_a_head_whose_bias_is_reparametrized_as_it_is(how):
    """pool -> flatten -> SparseLinear whose bias torch's prune or weight_norm computes: fuse_ raised torch's
    "cannot assign 'torch.FloatTensor' as parameter 'bias'" building the FusedSparseLinear, the convs
    before already fused. The head now stays as it is (its hooks recompute the bias) and the rest fuses."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d((7, 7)),
                          nn.Flatten(1), nn.Linear(3 * 49, 4))
    sparsetrain.sparsify_(model, global_prune(model, {}, 0.5))
    ref = copy.deepcopy(model)
    sources = [_reparametrize_bias(m[5], how) for m in (model, ref)]
    assert sparsetrain.fuse_(model) == ["0"]
    assert type(model[0]) is sparsetrain.SparseConvBNReLU and type(model[5]) is sparsetrain.SparseLinear
    x = torch.randn(4, 2, 3, 3)  # (3x3: no channel constant over the batch, where fused and unfused BN part)
    for _ in range(2):
        out, want = model(x), ref(x)
        torch.testing.assert_close(out, want)
        out.square().sum().backward()
        want.square().sum().backward()
        torch.testing.assert_close(sources[0].grad, sources[1].grad)
        for i in (0, 5):
            torch.testing.assert_close(model[i].weight.values.grad, ref[i].weight.values.grad)
        with torch.no_grad():
            for m in (model, ref):
                for p in m.parameters():
                    p -= 0.1 * p.grad
                m.zero_grad()
