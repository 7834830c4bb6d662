"""What sparsify_ / densify_ / fuse_ keep of the hooks a user registered on a layer they replace:
forward, forward-pre and full backward hooks move with it (same order, the user's handles still
remove them); state_dict hooks, which read the layer's entries by key, are refused by the swaps
that change those keys (sparsify_, densify_) and move with fuse_/unfuse_, which keep them."""
import copy

import pytest
import torch
from torch import nn

import sparsetrain
from sparsetrain.engine.convert import unconvertible
from sparsetrain.testing import random_mask

from conftest import dense_masked_copy


class Net(nn.Module):
    """conv -> BN -> ReLU -> linear: the conv fuses with its BN under fuse=True."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(self.relu(self.bn(self.conv(x))).flatten(1))


def _masks(g):
    return {"conv": random_mask((4, 2, 3, 3), 0.5, generator=g), "fc": random_mask((3, 100), 0.5, generator=g)}



def _register(layer, kind, log):
    """One hook of `kind` on `layer`, each logging (its tag, its module's type, what it saw) to `log`."""
    tag = lambda t, *seen: log.append((t, type(seen[0]).__name__, seen[1:]))  # noqa: E731
    if kind == "forward":
        return [layer.register_forward_hook(lambda m, i, o: tag("f1", m, o.detach().clone())),
                layer.register_forward_hook(lambda m, i, o: tag("f2", m))]
    if kind == "forward_pre":
        return [layer.register_forward_pre_hook(lambda m, i: (tag("p1", m, i[0].clone()), (i[0] * 2,))[1]),
                layer.register_forward_pre_hook(lambda m, i: tag("p2", m))]
    return [layer.register_full_backward_hook(lambda m, gi, go: tag("b1", m, go[0].clone())),
            layer.register_full_backward_hook(lambda m, gi, go: tag("b2", m))]


@pytest.mark.parametrize("layer", ["conv", "fc"])
@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
@pytest.mark.parametrize("fuse", [False, True])
def test_forward_and_backward_hooks_move_with_the_layer(layer, kind, fuse):
    """sparsify_ (fused or not) then densify_: the hooks fire on the replacement, in their order, seeing what
    they see on the dense masked model, and the user's handles still remove them."""
    g = torch.Generator().manual_seed(0)
    model, masks = Net(), _masks(g)
    ref, x = dense_masked_copy(model, masks), torch.randn(2, 2, 5, 5, generator=g).requires_grad_()
    ref_log, log = [], []
    _register(ref.get_submodule(layer), kind, ref_log)
    handles = _register(model.get_submodule(layer), kind, log)
    ref(x).sum().backward()
    sparsetrain.sparsify_(model, masks, fuse=fuse)
    assert type(model.get_submodule(layer)).__name__ in ("SparseConv2d", "SparseLinear")  # (a hooked conv stays unfused)
    y = model(x)
    y.sum().backward()
    assert [t for t, _, _ in log] == [t for t, _, _ in ref_log]  # same hooks, same order
    assert {n for _, n, _ in log} == {type(model.get_submodule(layer)).__name__}
    for (_, _, seen), (_, _, want) in zip(log, ref_log):
        for a, b in zip(seen, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    log.clear()
    sparsetrain.densify_(model)
    model(x).sum().backward()
    assert [t for t, _, _ in log] == [t for t, _, _ in ref_log]
    assert {n for _, n, _ in log} == {type(ref.get_submodule(layer)).__name__}
    for h in handles:  # (the handles the user holds)
        h.remove()
    log.clear()
    model(x).sum().backward()
    assert log == []


STATE_DICT_HOOKS = {  # kind -> registers one on a module, logging its calls
    "state_dict_pre": lambda m, log: m.register_state_dict_pre_hook(lambda mod, prefix, keep: log.append(mod)),
    "state_dict_post": lambda m, log: m._register_state_dict_hook(lambda mod, sd, prefix, meta: log.append(mod)),
    "load_pre": lambda m, log: m.register_load_state_dict_pre_hook(lambda mod, *a: log.append(mod)),
    "load_pre_private": lambda m, log: m._register_load_state_dict_pre_hook(lambda *a: log.append(None)),
    "load_post": lambda m, log: m.register_load_state_dict_post_hook(lambda mod, keys: log.append(mod)),
}


@pytest.mark.parametrize("layer", ["conv", "fc"])
@pytest.mark.parametrize("kind", sorted(STATE_DICT_HOOKS))
@pytest.mark.parametrize("fuse", [False, True])
def test_state_dict_hooks_are_refused_by_sparsify(layer, kind, fuse):
    """A state_dict hook reads the dense layer's keys (`weight`), which the sparse layer has not: refused by
    name, the model untouched (it was dropped silently, never firing again); apply_engine's auto keeps it dense."""
    g = torch.Generator().manual_seed(0)
    model, masks, log = Net(), _masks(g), []
    handle = STATE_DICT_HOOKS[kind](model.get_submodule(layer), log)
    assert layer in unconvertible(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=f"layer '{layer}' has a state_dict hook .*register it on the new layer "
                                        "after sparsify_"):
        sparsetrain.sparsify_(model, masks, fuse=fuse)
    assert type(model.conv) is nn.Conv2d and type(model.fc) is nn.Linear
    model.load_state_dict(before)  # (the hook still fires where it was registered)
    assert log
    handle.remove()
    assert layer not in unconvertible(model)
    sparsetrain.sparsify_(model, masks, fuse=fuse)  # (removed: converts)
    assert type(model.fc).__name__ == "SparseLinear"


def _densify_refused(model, handle, match: str) -> None:
    """densify_ of the fused Net refused (TypeError matching `match`) before any swap, then the hook removed."""
    with pytest.raises(TypeError, match=match):
        sparsetrain.densify_(model)
    assert type(model.conv).__name__ == "SparseConvBNReLU" and type(model.fc).__name__ == "SparseLinear"
    handle.remove()


@pytest.mark.parametrize("where", ["conv", "fc", "conv.weight", "fc.weight"])
@pytest.mark.parametrize("kind", sorted(STATE_DICT_HOOKS))
def test_state_dict_hooks_are_refused_by_densify(where, kind):
    """Registered on a sparse layer or its CSR (`weight.values` keys), densify_ refuses it by name, before any swap."""
    g = torch.Generator().manual_seed(0)
    model = sparsetrain.sparsify_(Net(), _masks(g), fuse=True)
    log = []
    _densify_refused(model, STATE_DICT_HOOKS[kind](model.get_submodule(where), log),
                     f"layer '{where}' has a state_dict hook .*after densify_")
    sparsetrain.densify_(model)
    assert type(model.conv) is nn.Conv2d and type(model.fc) is nn.Linear


@pytest.mark.parametrize("kind", sorted(STATE_DICT_HOOKS))
def test_state_dict_hooks_move_with_fuse_and_unfuse(kind):
    """fuse_'s and unfuse_'s replacements keep the keys (a BN's placeholder has the BN's): a state_dict hook on
    the BN moves with it, called with the module now at its name (it was dropped silently), its handle working."""
    g = torch.Generator().manual_seed(0)
    model = sparsetrain.sparsify_(Net(), _masks(g))
    log = []
    handle = STATE_DICT_HOOKS[kind](model.bn, log)
    sd = model.state_dict()
    for step in (sparsetrain.fuse_, sparsetrain.unfuse_):
        step(model)
        log.clear()
        model.load_state_dict(model.state_dict())
        assert log and all(m is None or m is model.bn for m in log)
        assert type(model.bn).__name__ == ("FusedBatchNorm2d" if step is sparsetrain.fuse_ else "BatchNorm2d")
    assert model.state_dict().keys() == sd.keys()
    handle.remove()
    log.clear()
    model.load_state_dict(model.state_dict())
    assert log == []


GRAD_HOOKS = {  # kind -> registers one on a parameter, logging its calls
    "register_hook": lambda p, log: p.register_hook(lambda g: log.append(g.shape)),
    "register_post_accumulate_grad_hook": lambda p, log: p.register_post_accumulate_grad_hook(
        lambda t: log.append(t.grad.shape)),
}


@pytest.mark.parametrize("layer", ["conv", "fc"])
@pytest.mark.parametrize("param", ["weight", "bias"])
@pytest.mark.parametrize("kind", sorted(GRAD_HOOKS))
@pytest.mark.parametrize("fuse", [False, True])
def test_gradient_hooks_on_a_layer_s_parameters_are_refused_by_sparsify(layer, param, kind, fuse):
    """A gradient hook on a dense layer's weight or bias sits on a tensor the sparse layer has not (its bias is a
    new Parameter, its weight's gradient the values', nnz long): it silently never fired again; now refused by name,
    the model untouched and the hook still firing; removed, the layer converts."""
    g = torch.Generator().manual_seed(0)
    model, masks, log = Net(), _masks(g), []
    handle = GRAD_HOOKS[kind](getattr(model.get_submodule(layer), param), log)
    assert layer in unconvertible(model)
    with pytest.raises(TypeError, match=f"layer '{layer}' has a gradient hook on its {param} \\({kind}\\).*register "
                                        "it on the new layer after sparsify_"):
        sparsetrain.sparsify_(model, masks, fuse=fuse)
    assert type(model.conv) is nn.Conv2d and type(model.fc) is nn.Linear
    model(torch.randn(2, 2, 5, 5)).sum().backward()
    assert log == [getattr(model.get_submodule(layer), param).shape]
    handle.remove()
    sparsetrain.sparsify_(model, masks, fuse=fuse)
    assert type(model.fc).__name__ == "SparseLinear"


@pytest.mark.parametrize("param", ["weight.values", "bias"])
@pytest.mark.parametrize("kind", sorted(GRAD_HOOKS))
def test_gradient_hooks_on_a_sparse_layer_s_parameters_are_refused_by_densify(param, kind):
    """The dense layer's weight and bias are new tensors: a hook on the sparse layer's values or bias is refused."""
    g = torch.Generator().manual_seed(0)
    model, log = sparsetrain.sparsify_(Net(), _masks(g), fuse=True), []
    for layer in ("conv", "fc"):
        _densify_refused(model, GRAD_HOOKS[kind](model.get_submodule(layer).get_parameter(param), log),
                         f"layer '{layer}' has a gradient hook on its {param} .*after densify_")
    sparsetrain.densify_(model)
    assert type(model.conv) is nn.Conv2d and type(model.fc) is nn.Linear


class Pooled(nn.Module):
    """conv -> BN -> ReLU -> adaptive pool -> flatten -> linear: fuse_ swaps every one of them."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.pool, self.flat, self.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.relu(self.bn(self.conv(x))))))


def _add_extras(model, g):
    """A parameter, a buffer, a non-persistent buffer and a submodule on each of conv, bn, pool and fc."""
    added = {}
    for layer in ("conv", "bn", "pool", "fc"):
        m = model.get_submodule(layer)
        m.register_parameter("gate", nn.Parameter(torch.randn(3, generator=g)))
        m.register_buffer("scale", torch.randn(2, generator=g))
        m.register_buffer("scratch", torch.zeros(1), persistent=False)
        m.add_module("extra", nn.Linear(2, 2))
        added[layer] = (m.gate, m.scale, m.scratch, m.extra)
    return added


def _extra_keys(model):
    return {k for k in model.state_dict() if k.rsplit(".", 1)[-1] in ("gate", "scale") or ".extra." in k}


@pytest.mark.parametrize("when", ["before sparsify_", "after fuse_"])
def test_a_user_s_parameters_buffers_and_submodules_on_a_layer_move_with_it(when):
    """A parameter, buffer or submodule a user registered on a layer sparsify_, densify_ or unfuse_ replaces was
    dropped silently (gone from model.parameters(), so from an optimizer built after, and from the state_dict);
    they move to the replacement, the same objects under the same names, an optimizer built before still stepping
    them. fuse_ leaves a module holding such extras unfused, as one with a hook."""
    g = torch.Generator().manual_seed(0)
    model = Pooled()
    masks = {"conv": random_mask((4, 2, 3, 3), 0.5, generator=g), "fc": random_mask((3, 4), 0.5, generator=g)}
    if when == "before sparsify_":
        added = _add_extras(model, g)
        steps = (("sparsify_", ("SparseConv2d", "SparseLinear")), ("fuse_", ("SparseConv2d", "SparseLinear")),
                 ("densify_", ("Conv2d", "Linear")))
    else:
        sparsetrain.sparsify_(model, masks, fuse=True)
        added = _add_extras(model, g)
        steps = (("unfuse_", ("SparseConv2d", "SparseLinear")), ("densify_", ("Conv2d", "Linear")))
    gates = [a[0] for a in added.values()]
    opt = torch.optim.SGD(gates, lr=1.0)
    keys = _extra_keys(model)
    x = torch.randn(2, 2, 5, 5, generator=g)
    for step, types in steps:
        if step == "sparsify_":
            sparsetrain.sparsify_(model, masks, fuse=True)  # (the fuse_ step: fused nothing)
        else:
            assert getattr(sparsetrain, step)(model) in (None, model, [])
        assert (type(model.conv).__name__, type(model.fc).__name__) == types
        assert type(model.bn) is nn.BatchNorm2d and type(model.pool) is nn.AdaptiveAvgPool2d
        for layer, (gate, scale, scratch, extra) in added.items():
            m = model.get_submodule(layer)
            assert m.gate is gate and m.scale is scale and m.scratch is scratch and m.extra is extra
        assert _extra_keys(model) == keys
        assert all(any(p is q for q in model.parameters()) for p in gates)
        before = [p.detach().clone() for p in gates]
        opt.zero_grad()
        (model(x).sum() + sum(p.sum() for p in gates)).backward()
        opt.step()  # (not refused: the same Parameters, still in the model)
        for p, b in zip(gates, before):
            torch.testing.assert_close(p, b - 1.0)


def test_an_extra_the_replacement_has_as_an_attribute_is_refused_before_any_swap():
    """A buffer named as an attribute of the sparse layer cannot move to it: refused by name, the model untouched."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[1].register_buffer("nnz", torch.zeros(1))
    with pytest.raises(ValueError, match="layer '1' holds 'nnz' \\(buffer\\), which its replacement, a SparseLinear, "
                                         "has as an attribute of its own: rename it first"):
        sparsetrain.sparsify_(model, {"0": random_mask((3, 4), 0.5), "1": random_mask((2, 3), 0.5)})
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Linear


@pytest.mark.parametrize("how", ["spectral_norm", "parametrizations.weight_norm"])
def test_the_load_hook_a_removed_reparametrization_leaves_is_not_a_user_s(how):
    """remove_spectral_norm leaves its load pre-hook on the layer (torch misses it, wrapped), which asks every
    load_state_dict for `weight_orig`; parametrizations.weight_norm's checkpoint compat hook stays after
    remove_parametrizations: torch's leftovers, not a user's hooks, so sparsify_ converts the layer and the
    converted model loads its own state_dict (the leftover is dropped with the dense layer)."""
    g = torch.Generator().manual_seed(0)
    model, masks = Net(), _masks(g)
    for layer in ("conv", "fc"):
        m = model.get_submodule(layer)
        if how == "spectral_norm":
            torch.nn.utils.spectral_norm(m)
            torch.nn.utils.remove_spectral_norm(m)
        else:
            torch.nn.utils.parametrizations.weight_norm(m)
            torch.nn.utils.parametrize.remove_parametrizations(m, "weight")
        assert m._load_state_dict_pre_hooks  # (torch's leftover)
    assert not {"conv", "fc"} & unconvertible(model)
    ref = dense_masked_copy(model, masks)
    sparsetrain.sparsify_(model, masks, fuse=True)
    model.load_state_dict(model.state_dict())
    x = torch.randn(2, 2, 5, 5, generator=g)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_an_extra_the_dense_layer_has_as_an_attribute_is_refused_by_densify_before_any_swap():
    """nn.Conv2d has attributes a SparseConv2d has not (`transposed`): a buffer of that name is refused by name,
    before any layer is swapped (the layer before it too)."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3))
    sparsetrain.sparsify_(model, {"0": random_mask((4, 2, 3, 3), 0.5), "1": random_mask((4, 4, 3, 3), 0.5)})
    model[1].register_buffer("transposed", torch.zeros(1))
    with pytest.raises(ValueError, match="layer '1' holds 'transposed' \\(buffer\\), which its replacement, a "
                                         "Conv2d, has as an attribute of its own: rename it first"):
        sparsetrain.densify_(model)
    assert [type(m).__name__ for m in model] == ["SparseConv2d", "SparseConv2d"]
