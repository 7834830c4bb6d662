"""A SparseConvBNReLU built directly owns its BatchNorm (a submodule: parameters, state_dict, copies), against
the unfused SparseConv2d -> BatchNorm2d -> ReLU it stands for; one built by fuse_ references the model's BN
(the fused model's state_dict keys unchanged)."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import sparsetrain
from sparsetrain.engine.fused import FusedBatchNorm2d, SparseConvBNReLU
from sparsetrain.engine.nn import SparseConv2d
from sparsetrain.testing import dense_conv2d, model_masks, random_mask

TOL = dict(rtol=1e-9, atol=1e-9)
CONFIGS = [dict(relu_after=True), dict(relu_before=True), dict(relu_after=True, residual=True), dict()]


def _pair(seed=0, **flags):
    """(the unfused reference: a SparseConv2d, an nn.BatchNorm2d; the layer built directly from copies of them)."""
    torch.manual_seed(seed)
    dense = nn.Conv2d(5, 7, 3, padding=1, bias=True).double()
    mask = random_mask(dense.weight.shape, 0.5, generator=torch.Generator().manual_seed(seed + 7), empty_rows=1)
    conv = SparseConv2d.from_dense(dense, mask)
    bn = nn.BatchNorm2d(7).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    fbn = FusedBatchNorm2d(7).double()
    fbn.load_state_dict(bn.state_dict())
    return (conv, bn), SparseConvBNReLU(copy.deepcopy(conv), fbn, **flags)


def _ref(conv, bn, x, r=None, relu_before=False, relu_after=False, residual=False):
    y = conv(x)
    out = bn(F.relu(y) if relu_before else y) + (r if residual else 0)
    return F.relu(out) if relu_after else out


def _call(layer, x, r):
    return layer(x, r) if layer.residual else layer(x)


@pytest.mark.parametrize("flags", CONFIGS)
def test_an_optimizer_over_the_layers_parameters_trains_its_bn_as_unfused(flags):
    """SGD over layer.parameters() alone: before 2026-12-07 they left the BN out (held by reference), so its weight
    and bias never moved; now they step as the unfused SparseConv2d -> BatchNorm2d -> ReLU's do, with the same
    outputs and running statistics, in training and eval mode."""
    (conv, bn), layer = _pair(**flags)
    assert layer.owns_bn and layer.bn in list(layer.children())
    start = layer.bn.weight.detach().clone(), layer.bn.bias.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD([*conv.parameters(), *bn.parameters()], lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, r = torch.randn(4, 5, 6, 6, generator=g, dtype=torch.float64), torch.randn(4, 7, 6, 6, generator=g,
                                                                                    dtype=torch.float64)
        out, ref = _call(layer, x, r), _ref(conv, bn, x, r, **flags)
        torch.testing.assert_close(out, ref, **TOL)
        for o, v in ((opt, out), (opt_ref, ref)):
            o.zero_grad()
            v.square().mean().backward()  # (a mean: summed, the BN weights grew to 1e4 in three steps)
            o.step()
    assert not torch.equal(layer.bn.weight, start[0]) and not torch.equal(layer.bn.bias, start[1])
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer.bn, name), getattr(bn, name), **TOL)
    torch.testing.assert_close(layer.weight.values, conv.weight.values, **TOL)
    layer.eval(), bn.eval()
    assert not layer.bn.training
    x, r = torch.randn(2, 5, 6, 6, dtype=torch.float64), torch.randn(2, 7, 6, 6, dtype=torch.float64)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(_call(layer, x, r), _ref(conv, bn, x, r, **flags), **TOL)


def test_the_layers_state_dict_holds_its_bn_and_round_trips():
    """state_dict() has the BN's entries (before: the layer's CSR alone), and loads into a fresh layer, which then
    computes the same in training and eval mode; torch.save of the layer keeps the BN too."""
    (conv, bn), layer = _pair(relu_after=True)
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()
    opt.step()
    sd = layer.state_dict()
    assert {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= set(sd)
    _, fresh = _pair(seed=3, relu_after=True)
    assert not torch.equal(fresh.bn.running_mean, layer.bn.running_mean)
    fresh.load_state_dict(sd)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (fresh, loaded):
        assert other.owns_bn
        for k, v in layer.state_dict().items():
            torch.testing.assert_close(other.state_dict()[k], v, rtol=0, atol=0)
    saved = copy.deepcopy(layer)
    for other in (fresh, loaded):  # (each against a copy of the layer as saved: training updates the statistics)
        layer = copy.deepcopy(saved)
        for training in (True, False):
            layer.train(training), other.train(training)
            torch.testing.assert_close(other(x), layer(x), **TOL)
            torch.testing.assert_close(other.bn.running_var, layer.bn.running_var, **TOL)


def test_a_deep_copy_owns_an_independent_bn():
    (conv, bn), layer = _pair(relu_after=True)
    twin = copy.deepcopy(layer)
    assert twin.owns_bn and twin.bn is not layer.bn and "bn.weight" in twin.state_dict()
    before = {k: v.clone() for k, v in layer.bn.state_dict().items()}
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    twin(torch.randn(4, 5, 6, 6, dtype=torch.float64)).sum().backward()
    opt.step()
    assert not torch.equal(twin.bn.weight, layer.bn.weight)
    for k, v in layer.bn.state_dict().items():  # (the original's BN: no step, no statistics update)
        assert torch.equal(v, before[k]), k
    twin.float()
    assert twin.bn.weight.dtype == torch.float32 and layer.bn.weight.dtype == torch.float64


def test_a_model_holding_the_layer_has_its_bn_once_and_trains_it():
    (conv, bn), layer = _pair(relu_after=True)
    model = nn.Sequential(layer, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(7, 3).double())
    params = list(model.parameters())
    assert sum(p is layer.bn.weight for p in params) == 1 and sum(p is layer.bn.bias for p in params) == 1
    assert len({id(p) for p in params}) == len(params)
    assert "0.bn.weight" in model.state_dict()
    start = layer.bn.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 5, 6, 6, dtype=torch.float64)).square().sum().backward()
    opt.step()
    assert not torch.equal(layer.bn.weight, start)
    model.eval()
    assert not layer.bn.training


def test_calling_an_owned_bn_yourself_is_refused_and_owns_bn_false_keeps_the_reference():
    """The layer applies an owned BN itself: the old `bn(layer(x))` (a reference's use) is told so. owns_bn=False
    (what fuse_ builds) keeps the reference: parameters() and state_dict() without it, `bn(layer(x))` as before."""
    (conv, bn), layer = _pair(relu_after=True)
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="built directly, which applies it itself"):
        layer.bn(layer(x))
    with pytest.raises(TypeError, match="owns_bn must be True or False, got 'no'"):
        SparseConvBNReLU(layer.to_conv(), layer.bn, owns_bn="no")
    fbn = copy.deepcopy(layer.bn)
    ref = SparseConvBNReLU(layer.to_conv(), fbn, relu_after=True, owns_bn=False)
    assert not ref.owns_bn and not [k for k in ref.state_dict() if k.startswith("bn")]
    assert not {id(p) for p in fbn.parameters()} & {id(p) for p in ref.parameters()}
    torch.testing.assert_close(fbn(ref(x)), _ref(conv, bn, x, relu_after=True), **TOL)


def test_an_owning_layer_takes_a_plain_batchnorm2d_and_shares_its_tensors():
    """SparseConvBNReLU(conv, nn.BatchNorm2d(...)) builds its FusedBatchNorm2d on the BN's own parameter and buffer
    objects (an optimizer made before keeps working) and computes as the unfused layers; a BN of another kind (a
    subclass may compute otherwise), or a plain one for a layer that does not own it (the model calls that module),
    is a TypeError naming what is expected."""
    (conv, bn), _ = _pair(relu_after=True)
    plain = copy.deepcopy(bn)
    layer = SparseConvBNReLU(copy.deepcopy(conv), plain, relu_after=True)
    assert type(layer.bn) is FusedBatchNorm2d and layer.bn.weight is plain.weight
    assert layer.bn.running_mean is plain.running_mean and layer.bn.num_batches_tracked is plain.num_batches_tracked
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)  # (made on the plain BN's parameters, before or after)
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64)
    out = layer(x)
    torch.testing.assert_close(out, _ref(conv, bn, x, relu_after=True), **TOL)
    out.square().mean().backward()
    opt.step()
    assert plain.weight.grad is not None and not torch.equal(plain.weight, bn.weight)

    class MyBN(nn.BatchNorm2d):
        pass
    with pytest.raises(TypeError, match="bn must be a FusedBatchNorm2d or an nn.BatchNorm2d, got MyBN"):
        SparseConvBNReLU(copy.deepcopy(conv), MyBN(7).double())
    with pytest.raises(TypeError, match="bn must be a FusedBatchNorm2d, got BatchNorm2d"):
        SparseConvBNReLU(copy.deepcopy(conv), nn.BatchNorm2d(7).double(), owns_bn=False)


def test_unfuse_and_densify_refuse_a_layer_whose_bn_the_model_does_not_call():
    """unfuse_ put back the conv of a layer built directly and dropped its BN (the model's forward then skipped the
    BN, silently); densify_ calls it. Both refuse it now, naming the layer, before any swap; fuse_ accepts such a
    model and fuses the rest, leaving the owned layer unlinked."""
    (conv, bn), layer = _pair(relu_after=True)
    conv2 = SparseConv2d.from_dense(nn.Conv2d(7, 4, 3, padding=1).double())
    model = nn.Sequential(layer, conv2, nn.BatchNorm2d(4).double(), nn.ReLU())
    ref = nn.Sequential(conv, bn, nn.ReLU(), copy.deepcopy(conv2), copy.deepcopy(model[2]), nn.ReLU())
    for fn, what in ((sparsetrain.unfuse_, "unfuse_"), (sparsetrain.densify_, "densify_")):
        with pytest.raises(ValueError, match=f"layer '0' is a SparseConvBNReLU built directly, whose BatchNorm the "
                                             f"model does not call \\(it owns its bn\\): {what} would put back"):
            fn(model)
        assert model[0] is layer and model[1] is conv2
    assert sparsetrain.fuse_(model) == ["1"]
    assert model[0].feeds is None and model[0].owns_bn and not model[1].owns_bn
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(model(x), ref(x), **TOL)
    lone = nn.Sequential(SparseConvBNReLU(layer.to_conv(), copy.deepcopy(layer.bn), owns_bn=False))
    with pytest.raises(ValueError, match="its bn is no module of the model"):
        sparsetrain.unfuse_(lone)


def test_fuse_keeps_the_models_state_dict_keys_and_references_its_bns():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    masks = model_masks(model, 0.9, seed=1)
    plain = copy.deepcopy(model)
    sparsetrain.sparsify_(plain, masks)
    fused = sparsetrain.sparsify_(model, masks, fuse=True)
    layers = [m for m in fused.modules() if isinstance(m, SparseConvBNReLU)]
    assert layers and not any(m.owns_bn for m in layers)
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert fused.layer1[0].conv1.bn is fused.layer1[0].bn1


def test_the_readme_example_runs_and_matches_the_unfused_layers():
    """README's "Fused conv → BatchNorm → ReLU" example, as printed: its layer computes relu(bn(conv(x))) with the
    mask applied and its optimizer holds the conv's nonzeros and the BN's weight and bias."""
    import os
    import re
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme[readme.index("### Fused conv → BatchNorm → ReLU"):]
    code = re.search(r"^```python\n(.*?)^```", section, flags=re.S | re.M).group(1)
    torch.manual_seed(0)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    layer, opt, out = ns["layer"], ns["opt"], ns["out"]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(layer.weight.values), id(layer.bn.weight), id(layer.bn.bias)}
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)  # (the example's draws, in its order)
    mask = sparsetrain.testing.random_mask(conv.weight.shape, 0.99)
    x = torch.randn(8, 64, 32, 32)
    ref = F.relu(F.batch_norm(dense_conv2d(x, conv.weight, mask, padding=1), None, None, torch.ones(64),
                              torch.zeros(64), training=True))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flags", CONFIGS)
def test_hooks_on_an_owned_bn_run_and_see_its_real_tensors(flags):
    """A forward hook, a forward pre-hook that changes the input and a full backward hook on layer.bn run as on the
    unfused BatchNorm2d, with the same tensors, outputs, gradients and running statistics (before 2026-12-07 none of
    them ran: the fused op applied the BN without calling it); removed, the layer is fused again, equal still."""
    (conv, bn), layer = _pair(**flags)
    seen = {"layer": [], "ref": []}
    for m, key in ((layer.bn, "layer"), (bn, "ref")):
        m.register_forward_pre_hook(lambda mod, i: (i[0] * 2,))
        m.register_forward_hook(lambda mod, i, o, key=key: seen[key].append(("fwd", i[0].detach(), o.detach())))
        m.register_full_backward_hook(lambda mod, gi, go, key=key: seen[key].append(("bwd", go[0], gi[0])))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 6, 6, generator=g, dtype=torch.float64)
    r = torch.randn(3, 7, 6, 6, generator=g, dtype=torch.float64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    out, ref = _call(layer, xs[0], r), _ref(conv, bn, xs[1], r, **flags)
    torch.testing.assert_close(out, ref, **TOL)
    gy = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(gy), ref.backward(gy)
    assert [s[0] for s in seen["layer"]] == ["fwd", "bwd"]
    for (_, *a), (_, *b) in zip(seen["layer"], seen["ref"]):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, **TOL)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, **TOL)
    for p, q in ((layer.bn.weight, bn.weight), (layer.bn.bias, bn.bias), (layer.weight.values, conv.weight.values)):
        torch.testing.assert_close(p.grad, q.grad, **TOL)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(layer.bn, name), getattr(bn, name), **TOL)
    layer.bn._forward_pre_hooks.clear(), layer.bn._forward_hooks.clear(), layer.bn._backward_hooks.clear()
    bn._forward_pre_hooks.clear(), bn._forward_hooks.clear(), bn._backward_hooks.clear()
    count = len(seen["layer"])
    torch.testing.assert_close(_call(layer, x, r), _ref(conv, bn, x, r, **flags), **TOL)
    assert len(seen["layer"]) == count and layer.bn._plain is None
