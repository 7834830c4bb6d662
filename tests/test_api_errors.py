"""Bad input to the public Python API: a ValueError/TypeError/KeyError naming the argument, never a
silently ignored key, a broadcast mask, a wrong number or an error from deep inside torch."""
import copy
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsetrain
from sparsetrain.engine import ops
from sparsetrain.engine.bsr import BSR, BSRLinear
from sparsetrain.engine.formats import CSR
from sparsetrain.engine.nn import enforce_masks_, mask_grads_, masks_of, model_sparsity
from sparsetrain.engine.policy import apply_engine, sparse_is_faster
from sparsetrain.experiment.early_stop import algorithm2_stop
from sparsetrain.experiment.entropy import activation_entropy
from sparsetrain.nn import SparseConv2d, SparseLinear
from sparsetrain.prune import block_prune, global_prune, load_weights_under_masks_, make_rule, sparsity_after
from sparsetrain.testing import dense_conv2d, dense_linear, mask_weight_, model_masks, random_mask, zero_pruned_


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def test_sparsify_refuses_a_mask_of_another_type_with_a_type_error():
    """sparsify_ with a numpy-array or list mask raised ValueError ("must be a bool tensor"), as for a
    wrong shape; a wrong type is a TypeError now (as masks_of's), a wrong shape still a ValueError, and
    the model is left as it was."""
    m = _mlp()
    mask = random_mask((6, 8), 0.5)
    for bad, got in ((mask.numpy(), "ndarray"), (mask.tolist(), "list")):
        with pytest.raises(TypeError, match=rf"masks\['0'\] must be a bool tensor of shape \(6, 8\), got {got}$"):
            sparsetrain.sparsify_(m, {"0": bad})
    with pytest.raises(ValueError, match=r"masks\['0'\] must be a bool tensor of shape \(6, 8\), got \(8,\)"):
        sparsetrain.sparsify_(m, {"0": torch.ones(8, dtype=torch.bool)})
    assert type(m[0]) is nn.Linear
    ref = m[0].weight.detach() * mask
    sparsetrain.sparsify_(m, {"0": mask})
    torch.testing.assert_close(m[0].to_dense().weight, ref)


def test_mask_dicts_must_name_prunable_layers_with_bool_masks_of_their_shape():
    m = _mlp()
    half = {"0": random_mask((6, 8), 0.5)}
    assert model_sparsity(m, half) == pytest.approx(24 / 66)
    assert model_sparsity(m, half, original=100) == pytest.approx(1 - 42 / 100)
    for bad in (-5, 2, 6.5, True):  # (fewer than the surviving weights: sparsity below 0 or above 1)
        with pytest.raises(ValueError, match=r"original must be an int >= the 42 surviving weights"):
            model_sparsity(m, half, original=bad)
    for fn in (lambda k: model_sparsity(m, k), lambda k: masks_of(m, k), lambda k: global_prune(m, k, 0.5),
               lambda k: apply_engine(m, k, "dense"), lambda k: load_weights_under_masks_(m, m.state_dict(), k)):
        with pytest.raises(KeyError, match=r"'0.weight'.*a layer's name, not its weight's: '0'"):
            fn({"0.weight": half["0"]})
        with pytest.raises(KeyError, match="'fc1', which is not a prunable layer"):
            fn({"fc1": half["0"]})
        for bad in (half["0"].float(), half["0"].tolist()):  # (ValueError before 2026-12-06)
            with pytest.raises(TypeError, match=r"masks\['0'\] must be a bool tensor of shape \(6, 8\), got"):
                fn({"0": bad})
        with pytest.raises(ValueError, match=r"masks\['0'\] must be a bool tensor of shape \(6, 8\)"):
            fn({"0": torch.ones(8, dtype=torch.bool)})  # (would broadcast)
        with pytest.raises(TypeError, match="masks must be a dict"):
            fn([half["0"]])
    for fn in (enforce_masks_, mask_grads_):  # the per-step helpers: each mask against its layer
        with pytest.raises(ValueError, match=r"masks\['0'\] must be a bool tensor"):
            fn(m, {"0": torch.ones(8, dtype=torch.bool)})
        with pytest.raises(TypeError, match=r"masks\['0'\] must be a bool tensor of shape \(6, 8\), got torch.float32"):
            fn(m, {"0": half["0"].float()})
    for prune in (block_prune, global_prune):  # (global_prune returned {}: "nothing left to prune")
        with pytest.raises(ValueError, match="no prunable layer"):
            prune(nn.Sequential(nn.ReLU()), {}, 0.5)
    with pytest.raises(ValueError, match=r"source_state\['0.weight'\] has shape \(6, 9\)"):
        load_weights_under_masks_(m, {**m.state_dict(), "0.weight": torch.zeros(6, 9)}, {})
    with pytest.raises(ValueError, match=r"source_state has no '0.weight'"):  # (was a raw KeyError)
        load_weights_under_masks_(m, {k: v for k, v in m.state_dict().items() if k != "0.weight"}, {})
    with pytest.raises(ValueError, match="mask must be a bool tensor of the weight's shape"):
        mask_weight_(nn.Linear(8, 6), torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty_rows must be an int in"):
        random_mask((4, 4), 0.0, empty_rows=-1)


def test_load_weights_under_masks_refuses_what_it_skipped():
    """A bias or BatchNorm entry of another shape, a missing one, or one the model has not was skipped
    silently (the rewind kept the current values); each is refused before anything is written. A
    filter-pruned model takes fit_state's cut of a full-size state, as the study's rewind does."""
    from sparsetrain.experiment.models import build_model
    from sparsetrain.prune import filter_prune, fit_state
    m = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    src = {k: v + 1 for k, v in m.state_dict().items()}
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cases = [({**src, "0.bias": torch.zeros(5)}, r"source_state\['0.bias'\] has shape \(5,\), the model's \(6,\)"),
             ({k: v for k, v in src.items() if k != "1.running_var"}, r"source_state has no '1.running_var'"),
             ({**src, "1.extra": torch.zeros(1)}, r"source_state has '1.extra', which the model has not"),
             ({**src, "2.bias": 0.0}, r"source_state\['2.bias'\] has shape float")]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            load_weights_under_masks_(m, bad, {})
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), k  # (nothing written, the weights before the bad entry neither)
    with pytest.raises(TypeError, match="source_state must be a state_dict .*, got list"):
        load_weights_under_masks_(m, list(src.items()), {})
    load_weights_under_masks_(m, src, {})
    for k, v in m.state_dict().items():
        assert torch.equal(v, src[k]), k
    arch = dict(name="vgg_d1g1", num_classes=10, in_channels=3, image_size=16)
    torch.manual_seed(0)
    full = build_model(**arch).state_dict()
    model = build_model(**arch)
    filter_prune(model, 0.5)
    with pytest.raises(ValueError, match=r"source_state\['block1_1.conv.weight'\] has shape \(2, 3, 3, 3\), "
                                         r"the model's \(1, 3, 3, 3\)"):
        load_weights_under_masks_(model, full, {})
    cut = fit_state(model, full, lambda: build_model(**arch))
    load_weights_under_masks_(model, cut, {})
    for k, v in model.state_dict().items():
        assert torch.equal(v, cut[k]), k


def test_load_weights_under_masks_refuses_another_mask_for_a_sparse_layer():
    """A sparse layer's mask is its stored pattern: another one (a regrown all-True mask) was ignored
    silently, the source written under the pattern; refused by name before anything is written, as
    global_prune and masks_of refuse it. The pattern's own mask loads under it (dense reference: source * mask)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    src = {k: v + 1 for k, v in m.state_dict().items()}
    masks = global_prune(m, {}, 0.5)
    sparsetrain.sparsify_(m, {"0": masks["0"]})
    before = {k: v.clone() for k, v in m.state_dict().items()}
    regrown = {**masks, "0": torch.ones_like(masks["0"])}
    with pytest.raises(ValueError, match=r"masks\['0'\] differs from the pattern sparse layer '0' stores"):
        load_weights_under_masks_(m, src, regrown)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k  # (nothing written)
    load_weights_under_masks_(m, src, masks)
    torch.testing.assert_close(m[0].to_dense().weight, src["0.weight"] * masks["0"])
    torch.testing.assert_close(m[2].weight, src["2.weight"] * masks["2"])


def test_numbers_and_ranges():
    m = _mlp()
    kept = global_prune(m, {}, np.float32(0.5))  # numpy floats are numbers
    assert sum(int(k.sum()) for k in kept.values()) == 33
    for bad in (1.5, 0, float("nan")):
        with pytest.raises(ValueError, match="rate must be a number in"):
            global_prune(_mlp(), {}, bad)
    # (non-numbers were a ValueError before 2026-12-05)
    for bad, name in ((True, "bool"), ("0.5", "str"), (torch.tensor(0.5), "Tensor")):
        with pytest.raises(TypeError, match=f"rate must be a number in \\(0, 1\\), got {name} "):
            global_prune(_mlp(), {}, bad)
    rows = [{"round": k, "val_acc": a, "entropy_mean": e} for k, (a, e) in enumerate([(0.8, 1.0), (0.8, 0.5)])]
    assert algorithm2_stop(rows, t_e=np.float32(0.8), t_a=np.float32(0.8)) == algorithm2_stop(rows)
    assert ops.magnitude_threshold([torch.arange(1.0, 5.0)], np.float32(0.5)) == ops.magnitude_threshold(
        [torch.arange(1.0, 5.0)], 0.5)
    for name, kw in (("t_e", {"t_e": 80}), ("t_a", {"t_a": float("nan")}), ("t_e", {"t_e": -1})):
        with pytest.raises(ValueError, match=f"{name} must be a fraction"):
            algorithm2_stop(rows, **kw)
    with pytest.raises(ValueError, match="reps must be an int >= 1"):
        sparse_is_faster(nn.Linear(4, 4), torch.ones(4, 4, dtype=torch.bool), (2, 4), reps=0)
    assert sparsity_after(2, 0.5) == 0.75 and sparsity_after(np.int64(0), np.float32(0.5)) == 0.0
    # (a wrong type is a TypeError, as rate's: 1.5 or True rounds were a ValueError before 2026-12-06)
    for rounds, rate, name, cls in ((-1, 0.5, "rounds", ValueError), (1.5, 0.5, "rounds", TypeError),
                                    (True, 0.5, "rounds", TypeError), ("2", 0.5, "rounds", TypeError),
                                    (3, 1.5, "rate", ValueError), (3, "0.5", "rate", TypeError)):
        with pytest.raises(cls, match=f"{name} must be"):
            sparsity_after(rounds, rate)


def test_make_rule_refuses_an_option_no_rule_takes():
    assert make_rule("filter", scope="global", block=16).can_prune(_mlp(), {})  # (others' options: ignored)
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'scpoe'; the rules take: .*scope"):
        make_rule("unstructured", scpoe="layer")


def test_next_sparsity_checks_rate_and_sparsity():
    """The unstructured and block rules' prediction 1 - (1 - sparsity)(1 - rate) took any rate (1.5 predicted a
    sparsity of 1.5, a str raised the arithmetic's TypeError) and any sparsity."""
    for name in ("unstructured", "block"):
        rule = make_rule(name)
        for rate, sparsity in ((0.2, 0.0), (0.5, 0.5), (np.float32(0.25), 1.0)):
            if name == "unstructured":  # (block: the next round's actual sparsity, test_structured's wall test)
                assert rule.next_sparsity(_mlp(), {}, rate, sparsity, 64) == pytest.approx(
                    1 - (1 - float(sparsity)) * (1 - float(rate)))
        for rate, cls in ((1.5, ValueError), (0, ValueError), ("0.5", TypeError), (None, TypeError)):
            with pytest.raises(cls, match="rate must be a number in"):
                rule.next_sparsity(_mlp(), {}, rate, 0.0, 64)
        # (a wrong type is a TypeError, as rate's: "0", None and True were a ValueError before 2026-12-06)
        for sparsity, cls in ((-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError), ("0", TypeError),
                              (None, TypeError), (True, TypeError)):
            with pytest.raises(cls, match=r"sparsity must be a number in \[0, 1\]"):
                rule.next_sparsity(_mlp(), {}, 0.5, sparsity, 64)
    from sparsetrain.prune import block_mask
    for sparsity, cls in ((1.5, ValueError), ("0.5", TypeError), (None, TypeError), (False, TypeError)):
        with pytest.raises(cls, match=r"sparsity must be a number in \[0, 1\]"):
            block_mask(torch.randn(32, 32), 16, sparsity)
    assert torch.equal(block_mask(torch.randn(32, 32), 16, np.float32(0.0)), torch.ones(32, 32, dtype=torch.bool))


def test_sparse_ops_refuse_a_bias_that_is_no_tensor_by_name():
    """A list bias reached the dispatcher, whose RuntimeError ("Expected a value of type 'Optional[Tensor]'")
    is no argument error; a tensor bias is checked by the kernels as before."""
    w, wc = CSR.from_dense(torch.randn(3, 4)), CSR.from_dense(torch.randn(2, 3, 3, 3))
    x, xc = torch.randn(5, 4), torch.randn(1, 3, 6, 6)
    for call in (lambda b: ops.sparse_linear(x, w, b), lambda b: ops.sparse_conv2d(xc, wc, b),
                 lambda b: ops.sparse_conv2d(xc[0], wc, b)):
        for bad, kind in (([0.0, 0.0, 0.0], "list"), (np.zeros(3, dtype=np.float32), "ndarray"), (0.0, "float")):
            with pytest.raises(TypeError, match=f"bias must be a torch.Tensor or None, got {kind}"):
                call(bad)
    b = torch.randn(3)
    torch.testing.assert_close(ops.sparse_linear(x, w, b), F.linear(x, w.to_dense(), b))
    bc = torch.randn(2)
    torch.testing.assert_close(ops.sparse_conv2d(xc, wc, bc), F.conv2d(xc, wc.to_dense(), bc), rtol=1e-5, atol=1e-5)


def test_filter_pruning_refuses_a_model_that_is_no_module_as_the_other_rules_do():
    """filter_prune, filter_groups, keep_channels_ and the filter rule raised ValueError ("supports sequential
    models ... got NoneType") for None or a state_dict; a Module that is not sequential stays a ValueError."""
    from sparsetrain.prune import filter_groups, filter_prune, keep_channels_
    for bad in (None, _mlp().state_dict(), torch.ones(3)):
        for call in (lambda: filter_prune(bad, 0.5), lambda: filter_groups(bad), lambda: keep_channels_(bad, {}),
                     lambda: make_rule("filter").can_prune(bad, {}), lambda: global_prune(bad, {}, 0.5)):
            with pytest.raises(TypeError, match=f"model must be an nn.Module, got {type(bad).__name__}"):
                call()
    with pytest.raises(ValueError, match="supports sequential models"):
        filter_prune(nn.Linear(3, 3), 0.5)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    assert filter_prune(model, 0.5) == {"0": 3} and model[0].out_features == model[2].in_features == 3


def test_make_rule_refuses_a_name_that_is_no_str_by_name():
    """A list or dict name raised "unhashable type: 'list'" (naming nothing), None read as an unknown rule."""
    for bad, kind in ((["unstructured"], "list"), ({}, "dict"), (None, "NoneType"), (b"filter", "bytes")):
        with pytest.raises(TypeError, match=f"name must be a str, one of: .*unstructured.*; got {kind} "):
            make_rule(bad)
    with pytest.raises(ValueError, match="unknown pruning rule 'unstructred'"):
        make_rule("unstructred")
    assert type(make_rule("unstructured")).__name__ == "MagnitudeRule"


def test_entropy_wants_an_iterable_of_batches():
    m = _mlp()
    x = torch.randn(8, 8)
    assert activation_entropy(m, [x])["samples"] == 8
    with pytest.raises(TypeError, match="wrap one batch as"):
        activation_entropy(m, x)
    with pytest.raises(ValueError, match=r"each batch must be \[batch, ...\]"):
        activation_entropy(m, [x[0], x[1]])


def test_layer_and_format_constructors():
    w = CSR.from_dense(torch.randn(6, 8))
    with pytest.raises(TypeError, match="bias must have the weight's dtype and device"):
        SparseLinear(w, torch.zeros(6, dtype=torch.float64))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        SparseLinear(w, [0.0] * 6)
    with pytest.raises(ValueError, match="stride must be >= 1 and padding >= 0"):
        SparseConv2d(CSR.from_dense(torch.randn(2, 3, 3, 3)), stride=0)
    with pytest.raises(ValueError, match="stride must be >= 1 and padding >= 0"):
        SparseConv2d(CSR.from_dense(torch.randn(2, 3, 3, 3)), padding=-2)
    for weight in (torch.randn(6, 8), None):
        with pytest.raises(TypeError, match="weight must be a sparsetrain.CSR"):
            ops.sparse_linear(torch.randn(2, 8), weight)
        with pytest.raises(TypeError, match="weight must be a sparsetrain.CSR"):
            ops.sparse_conv2d(torch.randn(2, 8, 5, 5), weight)
    with pytest.raises(ValueError, match=r"col_indices must lie in \[0, 10\)"):  # (not wrapped to 3 by int32)
        CSR(torch.tensor([0, 1]), torch.tensor([2**32 + 3]), torch.ones(1), (1, 10))
    lin = SparseLinear.from_dense(nn.Linear(8, 6))
    sd = {k: (v.float() if "indices" in k else v) for k, v in lin.state_dict().items()}
    with pytest.raises(RuntimeError, match="crow_indices must be int32 or int64"):
        lin.load_state_dict(sd)
    with pytest.raises(ValueError, match="magnitude_threshold runs on CPU tensors"):
        ops.magnitude_threshold([torch.ones(4, device="meta")], 0.5)
    with pytest.raises(ValueError, match="magnitude_threshold runs on CPU tensors and masks"):
        ops.magnitude_threshold([torch.ones(4)], 0.5, [torch.ones(4, dtype=torch.bool, device="meta")])
    # one meta tensor among CPU ones reaches an op's fake, not its C++ checks: refused there
    y, s, m = torch.randn(2, 3, 4, 4), torch.rand(3), torch.zeros(3, dtype=torch.float64)
    for name, args in (("bn_act", (y, m, s.to("meta"), s, None, True)),
                       ("relu_count_", (torch.zeros(48, dtype=torch.int64), y.to("meta"))),
                       ("max_pool2x2", (y, m, s.to("meta"), s, True))):
        with pytest.raises(ValueError, match=rf"sparsetrain::{name}: the tensor arguments must be on one device"):
            getattr(torch.ops.sparsetrain, name)(*args)
    assert torch.ops.sparsetrain.bn_act(y.to("meta"), m.to("meta"), s.to("meta"), s.to("meta"), None,
                                        True).device.type == "meta"
    # block-sparse: duplicate blocks and 1-D shapes refused; bias checked; frozen stays frozen
    blocks = torch.ones(2, 16, 16)
    with pytest.raises(ValueError, match="strictly increasing within each block row"):
        BSR(torch.tensor([0, 2]), torch.tensor([0, 0]), blocks, (16, 32), 16)
    with pytest.raises(ValueError, match="shape must have >= 2 non-negative dims"):
        BSR(torch.tensor([0, 1]), torch.tensor([0]), blocks[:1], (16,), 16)
    for shape in ((2.9, 3), (2, True), "23", 6):  # (int() made (2.9, 3) a [2, 3] weight)
        with pytest.raises(TypeError, match=r"shape must be a sequence of ints, got"):
            CSR(torch.tensor([0, 1, 1]), torch.tensor([0]), torch.ones(1), shape)
    assert CSR(torch.tensor([0, 1, 1]), torch.tensor([0]), torch.ones(1), torch.Size([2, 3])).shape == (2, 3)
    csr = CSR.from_dense(torch.arange(1.0, 7.0).reshape(2, 3))
    for keep in (torch.ones(5, dtype=torch.bool), torch.ones(6), [True] * 6):
        with pytest.raises(ValueError, match=r"keep must be a bool tensor of shape \[nnz\] = \[6\], got"):
            csr.shrink_(keep)
    csr.shrink_(torch.tensor([True, False, False, True, True, False]))  # (pruning in place)
    assert torch.equal(csr.to_dense(), torch.tensor([[1.0, 0, 0], [4, 5, 0]])) and csr.nnz == 3
    assert torch.equal(csr.csc()[0], torch.tensor([0, 2, 3, 3]))  # (the transposed index rebuilt)
    with pytest.raises(ValueError, match=r"bias must have shape \(32,\)"):
        BSRLinear(BSR.from_dense(torch.randn(32, 32), 16), torch.zeros(5))
    frozen = nn.Linear(32, 32).requires_grad_(False)
    b = BSRLinear.from_dense(frozen, 16)
    assert not b.weight.values.requires_grad and not b.bias.requires_grad
    assert BSRLinear.from_dense(nn.Linear(32, 32), 16).weight.values.requires_grad
    # values given as a frozen Parameter stay frozen (they became trainable), a trainable one trains
    for fmt, args in ((CSR, (torch.tensor([0, 1]), torch.tensor([0]), (1, 4))),
                      (BSR, (torch.tensor([0, 1]), torch.tensor([0]), (16, 16), 16))):
        for trainable in (False, True):
            v = nn.Parameter(torch.ones(1, 16, 16) if fmt is BSR else torch.ones(1), requires_grad=trainable)
            assert fmt(args[0], args[1], v, *args[2:]).values.requires_grad == trainable
    # plain tensors' values train, as nn.Parameter(tensor) (before 2026-12-06 they were copied frozen: a layer
    # built from them never trained its weights, silently); the gradient is the dense masked reference's
    crow, col, vals = torch.tensor([0, 1, 3]), torch.tensor([2, 0, 3]), torch.tensor([1.0, 2.0, 3.0])
    layer = SparseLinear(CSR(crow, col, vals, (2, 4)))
    blayer = BSRLinear(BSR(torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1, 16, 16), (16, 16), 16))
    assert layer.weight.values.requires_grad and blayer.weight.values.requires_grad
    x = torch.randn(3, 4)
    w = torch.tensor([[0, 0, 1.0, 0], [2, 0, 0, 3]], requires_grad=True)
    layer(x).square().sum().backward()
    torch.nn.functional.linear(x, w).square().sum().backward()
    assert torch.equal(layer.weight.values.grad, w.grad[w.detach() != 0])
    blayer(torch.randn(2, 16)).sum().backward()
    assert blayer.weight.values.grad is not None
    assert isinstance(sparsetrain.CSR, type)


def test_an_integer_weight_is_refused_by_name():
    for convert in (lambda w: CSR.from_dense(w), lambda w: BSR.from_dense(w, 16)):
        with pytest.raises(TypeError, match="weight must be a floating-point torch.Tensor, got torch.int64"):
            convert(torch.ones(32, 32, dtype=torch.int64))
        with pytest.raises(TypeError, match="weight must be a floating-point torch.Tensor, got list"):
            convert([[1.0] * 32] * 32)  # (BSR's: an AttributeError before 2026-12-08)


def test_a_model_that_is_no_module_is_refused_by_name():
    # (a tensor or a state_dict passed for the model raised "'Tensor' object has no attribute
    # 'named_modules'" from deep inside; fuse_ alone said what it wants)
    from sparsetrain.engine.convert import unconvertible
    from sparsetrain.engine.nn import check_untied, prunable_layers, weight_count
    calls = (sparsetrain.sparsify_, sparsetrain.densify_, sparsetrain.fuse_, sparsetrain.unfuse_, prunable_layers,
             masks_of, model_sparsity, weight_count, check_untied, unconvertible,
             lambda m: sparsetrain.sparsify_(m, {"0": torch.ones(6, 8, dtype=torch.bool)}),
             lambda m: global_prune(m, {}, 0.5), lambda m: block_prune(m, {}, 0.5),
             lambda m: apply_engine(m, {}, "auto"), lambda m: load_weights_under_masks_(m, {}, {}),
             lambda m: mask_grads_(m, {}), lambda m: enforce_masks_(m, {}), lambda m: model_masks(m, 0.5))
    for bad in (torch.zeros(6, 8), _mlp().state_dict(), None):
        for fn in calls:
            with pytest.raises(TypeError, match=f"model must be an nn.Module, got {type(bad).__name__}"):
                fn(bad)
    m = _mlp()  # (a module still passes)
    assert [n for n, _ in prunable_layers(m)] == ["0", "2"] and not unconvertible(m)
    masks = model_masks(m, 0.5)  # (testing.model_masks too: an AttributeError from inside before 2026-12-06)
    assert list(masks) == ["0", "2"] and all(k.dtype == torch.bool and k.shape == m.get_submodule(n).weight.shape
                                             and int((~k).sum()) == round(0.5 * k.numel()) for n, k in masks.items())


def test_meta_masks_and_weights_are_refused_by_name():
    # a meta mask (a shape without values) was a silent no-op in enforce_masks_/mask_grads_ (masked_fill_
    # with it changed nothing) and torch's error from inside elsewhere; a meta layer's weights could
    # not be ranked or counted ("Tensor.item() cannot be called on meta tensors")
    m = _mlp()
    x = torch.randn(4, 8)
    m(x).sum().backward()
    w, g = m[0].weight.detach().clone(), m[0].weight.grad.clone()
    meta = {"0": torch.zeros(6, 8, dtype=torch.bool, device="meta")}
    for fn in (enforce_masks_, mask_grads_, masks_of, model_sparsity, lambda m_, k: global_prune(m_, k, 0.5),
               lambda m_, k: block_prune(m_, k, 0.5, 16), lambda m_, k: apply_engine(m_, k, "dense"),
               lambda m_, k: load_weights_under_masks_(m_, m_.state_dict(), k)):
        with pytest.raises(ValueError, match="layer '0': its mask is a meta tensor: pass a mask holding its values"):
            fn(m, meta)
    assert torch.equal(m[0].weight.detach(), w) and torch.equal(m[0].weight.grad, g)  # (untouched)
    enforce_masks_(m, {"0": torch.zeros(6, 8, dtype=torch.bool)})  # (the real mask still zeroes)
    assert not m[0].weight.detach().any()
    with torch.device("meta"):
        on_meta = _mlp()
    for fn in (lambda: global_prune(on_meta, {}, 0.5), lambda: block_prune(on_meta, {}, 0.5, 16),
               lambda: make_rule("filter").prune(on_meta, {}, 0.5)):
        with pytest.raises(ValueError, match="layer '0''s weight is a meta tensor .*materialize the layer first"):
            fn()
    with pytest.raises(ValueError, match="layer '0''s weight is a meta tensor .*nothing to count"):
        model_sparsity(on_meta)
    assert model_sparsity(_mlp()) == 0.0


def test_block_mask_refuses_a_mask_that_is_no_tensor_and_meta_tensors():
    from sparsetrain.prune import block_mask
    w = torch.randn(40, 40)
    with pytest.raises(TypeError, match="mask must be a bool torch.Tensor or None, got list"):
        block_mask(w, 16, 0.5, [[True] * 40] * 40)  # (AttributeError: 'list' object has no attribute 'shape')
    with pytest.raises(ValueError, match="mask is a meta tensor"):  # (torch's device error)
        block_mask(w, 16, 0.5, torch.ones(40, 40, dtype=torch.bool, device="meta"))
    # another dtype is a TypeError, as in check_masks (a ValueError, as for a wrong shape, before 2026-12-06)
    with pytest.raises(TypeError, match=r"mask must be a bool tensor of shape \(40, 40\), got dtype torch.float32"):
        block_mask(w, 16, 0.5, torch.ones(40, 40))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(40, 40\), got \(1, 40, 40\)"):
        block_mask(w, 16, 0.5, torch.ones(1, 40, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match="weight is a meta tensor"):  # (torch's .item() error)
        block_mask(w.to("meta"), 16, 0.5)
    ref = block_mask(w, 16, 0.5)  # against the tiles' RMS ranked by hand: the 4 lowest of 9 go
    rms = torch.stack([w[i:i + 16, j:j + 16].pow(2).mean().sqrt() for i in (0, 16, 32) for j in (0, 16, 32)])
    gone = set(torch.argsort(rms)[:4].tolist())
    for b in range(9):
        i, j = 16 * (b // 3), 16 * (b % 3)
        assert bool(ref[i:i + 16, j:j + 16].any()) == (b not in gone)


def test_the_public_api_is_documented():
    # every public class, function, method and property of the user-facing modules says what it does
    # (CSR/SparseLinear/SparseConv2d/BSRLinear.from_dense, nnz, sparsity and the rules' prune had none);
    # an override of a documented base method (forward, extra_repr) inherits its docstring
    import importlib
    import inspect
    missing = []
    for mod_name in ("sparsetrain.nn", "sparsetrain.engine.nn", "sparsetrain.engine.formats", "sparsetrain.engine.bsr",
                     "sparsetrain.engine.convert", "sparsetrain.prune", "sparsetrain.prune.base"):
        mod = importlib.import_module(mod_name)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if not getattr(obj, "__module__", "").startswith("sparsetrain"):
                continue  # (constants, dicts)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj):
                missing.append(f"{mod_name}.{name}")
            if inspect.isclass(obj):
                for attr, member in inspect.getmembers(obj):
                    fn = member.fget if isinstance(member, property) else member
                    if attr.startswith("_") or attr in ("dtype", "device", "requires_grad") or not callable(fn) or \
                            not getattr(fn, "__module__", "").startswith("sparsetrain"):  # (those: the values' own, as
                        # WeightLike's docstring says)
                        continue
                    if not inspect.getdoc(getattr(obj, attr) if not isinstance(member, property) else fn):
                        missing.append(f"{mod_name}.{name}.{attr}")
    assert not missing, missing


def test_a_state_dict_entry_that_is_no_tensor_is_reported_as_a_dense_layer_does():
    # (a list in a CSR's entries raised AttributeError "'list' object has no attribute 'to'" from inside
    # load_state_dict; nn.Linear reports such an entry in load_state_dict's error list)
    sl = SparseLinear.from_dense(nn.Linear(8, 6), torch.rand(6, 8) > 0.5)
    before = {k: v.clone() for k, v in sl.state_dict().items()}
    for key in ("weight.values", "weight.crow_indices", "weight.col_indices"):
        for strict in (True, False):
            with pytest.raises(RuntimeError, match="the CSR pattern at weight .*must be torch.Tensors"):
                sl.load_state_dict({**before, key: [1.0] * 8}, strict=strict)
            assert all(torch.equal(v, before[k]) for k, v in sl.state_dict().items())  # (untouched)
    x = torch.randn(3, 8)
    ref = nn.functional.linear(x, sl.weight.to_dense(), sl.bias)
    torch.testing.assert_close(sl(x), ref)
    bl = BSRLinear.from_dense(nn.Linear(40, 40), 16)
    with pytest.raises(RuntimeError, match="the BSR pattern at weight .*must be torch.Tensors"):
        bl.load_state_dict({**bl.state_dict(), "weight.values": [1.0]})


def test_register_takes_a_pruning_rule_class():
    from sparsetrain.prune import RULES, PruningRule, register
    for bad in (int, make_rule("unstructured"), "unstructured"):  # (AttributeError: no attribute 'name')
        with pytest.raises(TypeError, match="register takes a PruningRule subclass"):
            register(bad)

    class Nameless(PruningRule):
        pass

    with pytest.raises(ValueError, match="needs a new, non-empty name"):
        register(Nameless)

    class Keep(PruningRule):
        name = "keep_everything_test"

    try:
        assert register(Keep) is Keep and type(make_rule("keep_everything_test")) is Keep
    finally:
        RULES.pop("keep_everything_test", None)


def test_bsr_from_dense_refuses_meta_tensors_as_csr_does():
    # (torch's "register_meta function for torch.nonzero()" NotImplementedError or "Cannot copy out of
    # meta tensor" from inside; CSR.from_dense named them)
    from sparsetrain.prune import block_mask
    w = torch.randn(40, 40)
    m = block_mask(w, 16, 0.5)
    for fn in (lambda: BSR.from_dense(w.to("meta"), 16), lambda: CSR.from_dense(w.to("meta")),
               lambda: BSRLinear.from_dense(nn.Linear(40, 40, device="meta"), 16)):
        # (the advice said "then initialize or load it": only a load gives a sparse layer its index)
        with pytest.raises(ValueError, match="weight is a meta tensor .*materialize the layer first .*then load its "
                                             "state_dict; .*a sparse one's index comes only from a load"):
            fn()
    for fn in (lambda: BSR.from_dense(w, 16, m.to("meta")), lambda: CSR.from_dense(w, m.to("meta"))):
        with pytest.raises(ValueError, match="mask is a meta tensor .*pass a mask holding its values"):
            fn()
    assert torch.equal(BSR.from_dense(w, 16, m).to_dense(), w * m)  # (a real mask still converts)
    # a mask of another type or dtype is a TypeError and a misshapen one a ValueError, as CSR.from_dense's (BSR's
    # were all "must be a bool tensor" ValueErrors before 2026-12-06)
    for fn in (BSR.from_dense, lambda w, bs, mask: CSR.from_dense(w, mask)):
        with pytest.raises(TypeError, match="mask must have dtype torch.bool, got torch.float32"):
            fn(w, 16, m.float())
        with pytest.raises(TypeError, match="mask must be a torch.Tensor or None, got list"):
            fn(w, 16, m.tolist())
        with pytest.raises(ValueError, match=r"mask shape \(1, 40, 40\) must equal weight shape \(40, 40\)"):
            fn(w, 16, m[None])


def test_fuse_refuses_a_lone_engine_layer_as_densify_and_unfuse_do():
    # (fx traced the layer's own forward: "weight must be a sparsetrain.CSR (...), got CSR", or "this
    # layer was fused without a residual", then "build SparseConvBNReLU layers by hand")
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    ref = copy.deepcopy(net).eval()
    sparsetrain.sparsify_(net, {"0": torch.ones(8, 3, 3, 3, dtype=torch.bool)}, fuse=True)
    lone = (SparseConv2d.from_dense(nn.Conv2d(3, 4, 3)), SparseLinear.from_dense(nn.Linear(4, 2)), net[0])
    for layer in lone:
        with pytest.raises(ValueError, match=f"fuse_ fuses layers inside a model; a lone {type(layer).__name__}"):
            sparsetrain.fuse_(layer)
        assert sparsetrain.fuse_(layer, strict=False) == []  # (not strict: nothing fused)
    assert sparsetrain.fuse_(net) == []  # (a model fused already: nothing more) and it still computes the same
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(net.eval()(x), ref(x))


def test_block_sizes_may_be_numpy_ints():
    # (np.int64(16) was refused: "block must be one of (16, 32, 64), got np.int64(16)")
    from sparsetrain.prune import block_mask
    torch.manual_seed(0)
    w = torch.randn(40, 40)
    assert torch.equal(block_mask(w, np.int64(16), 0.5), block_mask(w, 16, 0.5))
    m = block_mask(w, 16, 0.5)
    b = BSR.from_dense(w, np.int32(16), m)
    assert type(b.block_size) is int and torch.equal(b.to_dense(), w * m)
    rule = make_rule("block", block=np.int64(32))
    assert type(rule.block) is int and rule.block == 32
    lin = nn.Linear(40, 40)
    layer = BSRLinear.from_dense(lin, np.int64(16), m)
    x = torch.randn(3, 40)
    torch.testing.assert_close(layer(x), dense_linear(x, lin.weight, m, lin.bias))
    with pytest.raises(ValueError, match="block must be one of"):
        block_mask(w, np.int64(8), 0.5)
    # a wrong type is a TypeError naming the argument (project style; a ValueError before 2026-12-06), as the
    # caller spells it: BSR's and BSRLinear's is block_size (since 2026-12-06; they said "block")
    b = BSR.from_dense(w, 16, m)
    for bad in (16.0, True, "32", None):
        for arg, call in (("block", lambda: block_mask(w, bad, 0.5)), ("block_size", lambda: BSR.from_dense(w, bad, m)),
                          ("block", lambda: make_rule("block", block=bad)),
                          ("block_size", lambda: BSRLinear.from_dense(lin, bad, m)),
                          ("block_size", lambda: BSR(b.crow_indices, b.col_indices, b.values, b.shape, bad))):
            with pytest.raises(TypeError, match=rf"^{arg} must be an int, one of \(16, 32, 64\), got "):
                call()
    for call in (lambda: BSR.from_dense(w, 8), lambda: BSRLinear.from_dense(lin, np.int64(48), m),
                 lambda: BSR(b.crow_indices, b.col_indices, b.values, b.shape, 128)):
        with pytest.raises(ValueError, match=r"^block_size must be one of \(16, 32, 64\), got "):
            call()


def test_fuse_switches_must_be_bools():
    """sparsify_(fuse=...), apply_engine(fuse=...) and fuse_(strict=...) took any value: fuse="no" (truthy)
    fused, strict=0 left an untraceable model unfused without a word. Each is a TypeError naming it;
    True/False (numpy's too) work as before: the fused model gives the unfused model's output."""
    from sparsetrain.engine.fuse import fuse_
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    masks = {"0": random_mask((8, 3, 3, 3), 0.5)}
    x = torch.randn(2, 3, 6, 6)
    for bad in ("no", 0, None):
        with pytest.raises(TypeError, match=rf"^fuse must be True or False, got {re.escape(repr(bad))}$"):
            sparsetrain.sparsify_(copy.deepcopy(base), masks, fuse=bad)
        with pytest.raises(TypeError, match=rf"^fuse must be True or False, got {re.escape(repr(bad))}$"):
            apply_engine(copy.deepcopy(base), masks, "sparse", fuse=bad)
        with pytest.raises(TypeError, match=rf"^strict must be True or False, got {re.escape(repr(bad))}$"):
            fuse_(sparsetrain.sparsify_(copy.deepcopy(base), masks), strict=bad)
    ref = F.relu(base[1](dense_conv2d(x, base[0].weight, masks["0"], base[0].bias, padding=1)))
    for fuse in (True, np.bool_(True), False):
        model = sparsetrain.sparsify_(copy.deepcopy(base), masks, fuse=fuse)
        assert (type(model[0]).__name__ == "SparseConvBNReLU") == bool(fuse)
        torch.testing.assert_close(model(x), ref)


def test_a_weight_of_2_to_the_31_columns_is_refused():
    """The column index is int32: from_dense cast the columns of a weight of 2^31 or more (in_features, or
    in_channels * kh * kw) without a check, wrapping them (a corrupt container the ops refused later).
    The constructor, which from_dense calls, refuses such a shape by its columns (empty rows here: a
    weight that size does not fit this machine), before any buffer is made."""
    crow, col, values = torch.zeros(2, dtype=torch.int64), torch.zeros(0, dtype=torch.int32), torch.zeros(0)
    for shape in ((1, 2**31), (1, 2**16, 2**15), (1, 2**20, 46, 46)):
        with pytest.raises(ValueError, match=rf"^the weight has {math.prod(shape[1:])} columns: the int32 column "
                                             r"index holds < 2\^31$"):
            CSR(crow, col, values, shape)
    assert CSR(crow, col, values, (1, 2**20)).to_dense().shape == (1, 2**20)


def test_fx_symbolic_trace_of_a_sparse_layer_is_refused_clearly():
    """torch.fx.symbolic_trace of a model with sparse layers ran their forward on proxies, refused as
    "weight must be a sparsetrain.CSR (...), got CSR" (its values a Proxy) or, for BSRLinear, "x must be a
    torch.Tensor, got Proxy": a TypeError now says fx cannot trace into them and names the Tracer that
    keeps them as leaves, whose GraphModule matches the dense masked model (output and dx)."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 32),
                          nn.Linear(32, 4))
    masks = {"0": random_mask((3, 2, 3, 3), 0.5), "3": random_mask((32, 48), 0.5)}
    block = torch.zeros(4, 32, dtype=torch.bool)
    block[:, :16] = True
    zero_pruned_(dense, {**masks, "4": block})  # (the dense masked reference)
    model = copy.deepcopy(dense)
    sparsetrain.sparsify_(model, masks)
    model[4] = BSRLinear.from_dense(dense[4], 16, block)
    for layer, what in ((model, "a sparse layer"), (model[3], "a sparse layer"), (model[4], "a BSRLinear")):
        with pytest.raises(TypeError, match=f"torch.fx.symbolic_trace cannot trace into {what}: trace the model "
                                            r"with a torch.fx.Tracer whose is_leaf_module"):
            torch.fx.symbolic_trace(layer)

    class Leaves(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return type(m).__module__.startswith("sparsetrain.") or super().is_leaf_module(m, qualname)

    traced = torch.fx.GraphModule(model, Leaves().trace(model))
    x = torch.randn(2, 2, 4, 4, requires_grad=True)
    y, ref = traced(x), dense(x)
    torch.testing.assert_close(y, ref)
    g = torch.randn(y.shape)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])
