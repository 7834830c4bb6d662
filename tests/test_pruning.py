"""Global magnitude pruning on dense-masked and sparse layers, the engine policy, perturbations."""
import copy
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsetrain
from sparsetrain.engine.nn import (SparseLinear, enforce_masks_, is_sparse, mask_grads_, masks_of, model_sparsity,
                                   prunable_layers)
from sparsetrain.engine.policy import apply_engine, sparse_is_faster
from sparsetrain.prune import block_prune, filter_prune, global_prune, load_weights_under_masks_, sparsity_after
from sparsetrain.testing import dense_conv2d, dense_linear, zero_pruned_


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 20), nn.ReLU(), nn.Linear(20, 5))


def _all_weights(model):
    return torch.cat([m.weight.detach().flatten() if not hasattr(m.weight, "values") else
                      m.weight.to_dense().detach().flatten() for _, m in prunable_layers(model)])


def test_schedule_global_exact_and_masks_only_shrink():
    model = _net()
    n_total = sum(m.weight.numel() for _, m in prunable_layers(model))
    bias_before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("weight") or n.startswith("2.")}
    masks, prev = {}, masks_of(model)
    for k in range(1, 8):
        masks = global_prune(model, masks, 0.2)
        cur = masks_of(model, masks)
        kept = sum(int(m.sum()) for m in cur.values())
        # exactly floor(0.2 * surviving) pruned per round
        prev_kept = sum(int(m.sum()) for m in prev.values())
        assert kept == prev_kept - int(0.2 * prev_kept)
        assert model_sparsity(model, masks) == pytest.approx(sparsity_after(k, 0.2), abs=2e-3 * k + 1 / n_total * k)
        for n in cur:
            assert not bool((cur[n] & ~prev[n]).any()), "masks only shrink"
            w = model.get_submodule(n).weight.detach()
            assert bool((w[~cur[n]] == 0).all())
        prev = cur
    # biases and BatchNorm untouched
    for n, p in model.named_parameters():
        if n in bias_before:
            assert torch.equal(p.detach(), bias_before[n])


def test_pruning_a_frozen_sparse_model_keeps_it_frozen():
    model = _net()
    apply_engine(model, {}, "sparse")
    model.requires_grad_(False)
    global_prune(model, {}, 0.5)
    assert not any(p.requires_grad for p in model.parameters())
    model.requires_grad_(True)
    global_prune(model, {}, 0.5)
    assert all(p.requires_grad for p in model.parameters())


def test_global_threshold_prunes_smallest_magnitudes():
    model = _net()
    w0 = _all_weights(model).abs()
    masks = global_prune(model, {}, 0.5)
    kept = torch.cat([masks_of(model, masks)[n].flatten() for n, _ in prunable_layers(model)])
    assert w0[~kept].max() <= w0[kept].min()


def test_layer_scope_prunes_each_layer_by_rate():
    model = _net()
    masks = global_prune(model, {}, 0.3, scope="layer")
    for n, m in prunable_layers(model):
        mk = masks[n]
        assert mk.numel() - int(mk.sum()) == int(0.3 * mk.numel())


@pytest.mark.parametrize("engine", ["dense", "sparse", "auto"])
def test_engines_agree(engine):
    ref = _net()
    model = copy.deepcopy(ref)
    masks_ref, masks = {}, {}
    for _ in range(6):
        masks_ref = global_prune(ref, masks_ref, 0.3)
        masks = global_prune(model, masks, 0.3)
        masks = apply_engine(model, masks, engine)
    x = torch.randn(3, 1, 8, 8)
    ref.eval(), model.eval()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    types = {type(m).__name__ for _, m in prunable_layers(model)}
    if engine == "dense":
        assert types == {"Conv2d", "Linear"}
    if engine == "sparse":  # the conv -> ReLU -> BN is fused into one layer (engine/fused.py)
        assert types == {"SparseConvBNReLU", "SparseLinear"} and model[0].relu_before
    if engine == "auto":  # sparsity 1 - 0.7^6 = 0.88 is past the crossovers, but these layers are tiny
        assert types == {"Conv2d", "Linear"}
    assert masks_of(model, masks).keys() == masks_of(ref, masks_ref).keys()
    for n in masks_ref:
        assert torch.equal(masks_of(model, masks)[n], masks_of(ref, masks_ref)[n])


def test_auto_engine_converts_large_sparse_layers_only():
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))
    masks = {}
    for _ in range(6):  # 88% sparse
        masks = global_prune(model, masks, 0.3)
    masks = apply_engine(model, masks, "auto")
    assert isinstance(model[0], SparseLinear) and type(model[2]) is nn.Linear
    assert set(masks) == {"2"}


def test_auto_engine_keeps_convs_the_kernels_do_not_take_dense():
    """A dilated, grouped or reflect-padded conv stays dense under "auto" (with or without an example
    batch to time on) instead of failing; "sparse" names the layer it cannot convert."""
    for kw in (dict(dilation=2), dict(groups=2), dict(padding_mode="reflect")):
        for example in (None, torch.randn(2, 16, 8, 8)):
            model = nn.Sequential(nn.Conv2d(16, 128, 3, padding=1, **kw), nn.ReLU())
            masks = global_prune(model, {}, 0.9)
            left = apply_engine(model, masks, "auto", example=example)
            assert type(model[0]) is nn.Conv2d and set(left) == {"0"}, kw
        with pytest.raises(ValueError, match=r"^0: SparseConv2d supports .*; keep this layer dense \(leave it out "
                                             r"of the masks given to sparsify_\)$"):
            apply_engine(model, masks, "sparse")


def test_rewind_restores_weights_under_mask():
    model = _net()
    snapshot = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    masks = global_prune(model, {}, 0.5)
    masks = apply_engine(model, masks, "sparse")
    load_weights_under_masks_(model, snapshot, masks)
    for n, m in prunable_layers(model):
        mk = m.weight.mask()
        torch.testing.assert_close(m.weight.to_dense().detach(), snapshot[f"{n}.weight"] * mk)
    torch.testing.assert_close(model[2].running_mean, snapshot["2.running_mean"])


def test_rewind_from_a_sparse_models_own_state_dict():
    """A sparse model's state_dict (its weights as CSR entries, <name>.weight.values ...) was refused as
    "has '0.weight.values', which the model has not" (the same model); it is read as the dense weights it
    stands for, as the densified model's state_dict (the reference) gives them."""
    model = _net()
    apply_engine(model, global_prune(model, {}, 0.5), "sparse")
    masks = {n: m.weight.mask() for n, m in prunable_layers(model)}
    sparse_state = copy.deepcopy(model.state_dict())
    assert any(k.endswith(".weight.values") for k in sparse_state)
    reference = sparsetrain.densify_(copy.deepcopy(model)).state_dict()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    load_weights_under_masks_(model, sparse_state, masks)
    for n, m in prunable_layers(model):
        torch.testing.assert_close(m.weight.to_dense().detach(), reference[f"{n}.weight"], rtol=0, atol=0)
    for k, v in model.state_dict().items():
        if k in reference:
            torch.testing.assert_close(v, reference[k], rtol=0, atol=0)


def test_rewind_of_a_dense_layer_zeroes_an_inf_under_its_mask():
    # (the source's pruned positions are set to 0, not multiplied by the mask: inf * 0 was NaN)
    model = _net()
    masks = global_prune(model, {}, 0.5)
    snapshot = copy.deepcopy(model.state_dict())
    name = next(iter(masks))
    snapshot[f"{name}.weight"][~masks[name]] = float("inf")
    load_weights_under_masks_(model, snapshot, masks)
    w = dict(prunable_layers(model))[name].weight
    assert bool((w[~masks[name]] == 0).all()) and torch.equal(w[masks[name]], snapshot[f"{name}.weight"][masks[name]])


def test_bad_arguments():
    model = _net()
    with pytest.raises(ValueError, match=r"rate must be a number in \(0, 1\)"):
        global_prune(model, {}, 1.0)
    with pytest.raises(ValueError, match="scope must be"):
        global_prune(model, {}, 0.2, scope="filterwise")
    with pytest.raises(ValueError, match="engine must be one of"):
        apply_engine(model, {}, "gpu")


def _reference_rounds(weights, masks, rate, scope, rounds):
    """Global magnitude pruning by hand (NumPy): each round sort the survivors by (|w|, layer, flat index)
    over all layers (global) or per layer and drop the first floor(rate * survivors), rate read as the
    decimal it is written as (Fraction: no float rounding of rate * n). Yields each round's masks."""
    masks = [m.copy() for m in masks]
    for _ in range(rounds):
        groups = [range(len(weights))] if scope == "global" else [[i] for i in range(len(weights))]
        for g in groups:
            keys = sorted((abs(float(weights[li].ravel()[j])), li, j) for li in g for j in np.nonzero(masks[li].ravel())[0])
            for _, li, j in keys[:math.floor(Fraction(repr(rate)) * len(keys))]:
                masks[li].ravel()[j] = False
        yield [m.copy() for m in masks]


@pytest.mark.parametrize("engine", ["dense", "sparse"])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("rate", [0.3, 0.5, 0.7])
def test_global_prune_matches_a_numpy_reference_round_by_round(engine, scope, rate):
    """Weights on a 1/8 grid (many ties, zeros among the survivors) and a layer already at 100%: every
    round's masks are the reference's, on both engines (sparse layers shrink their CSR in place)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        for _, m in prunable_layers(model):
            m.weight.copy_((m.weight * 8).round() / 8)
        model[2].weight.zero_()
    masks = {"2": torch.zeros(5, 9, dtype=torch.bool)}
    names = [n for n, _ in prunable_layers(model)]
    weights = [model.get_submodule(n).weight.detach().numpy().copy() for n in names]
    start = [masks_of(model, masks)[n].numpy().copy() for n in names]
    masks = apply_engine(model, masks, engine)
    for want in _reference_rounds(weights, start, rate, scope, rounds=6):
        masks = global_prune(model, masks, rate, scope=scope)
        got = masks_of(model, masks)
        for n, w in zip(names, want):
            assert np.array_equal(got[n].numpy(), w), n
        assert not bool(got["2"].any())
    assert sum(int(m.sum()) for m in got.values()) > 0  # (a rate under 1 never prunes the last weight)


@pytest.mark.parametrize("engine", ["dense", "sparse"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_can_prune_says_whether_a_round_removes_anything(engine, scope):
    """can_prune was True whatever survived (a model with every weight pruned included): it is now True exactly
    where a round at a rate just under 1 removes a weight (floor(rate * n) >= 1 needs n >= 2 in a group)."""
    rule = sparsetrain.prune.make_rule("unstructured", scope=scope)
    for alive in ((0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 2, 0), (3, 1, 1)):  # survivors per layer
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
        masks = {}
        for (n, m), k in zip(prunable_layers(model), alive):
            masks[n] = torch.zeros_like(m.weight, dtype=torch.bool)
            masks[n].view(-1)[:k] = True
        masks = apply_engine(model, masks, engine)
        before = sum(int(mk.sum()) for mk in masks_of(model, masks).values())
        can = rule.can_prune(model, masks)
        after = sum(int(mk.sum()) for mk in masks_of(model, global_prune(model, masks, 0.99, scope=scope)).values())
        assert can == (after < before), alive
    for name in ("unstructured", "block"):  # (block: torch's "Tensor.item() cannot be called on meta tensors")
        with pytest.raises(ValueError, match="'0'.s weight is a meta tensor"):
            sparsetrain.prune.make_rule(name).can_prune(nn.Sequential(nn.Linear(4, 4, device="meta")), {})


def test_every_rule_refuses_a_model_built_under_inference_mode_by_name():
    """A model made under torch.inference_mode() holds inference tensors, which torch lets change in place only
    inside that mode: a pruning round outside it was torch's "Inplace update to inference tensor" RuntimeError from
    its zeroing. Refused naming the layer now, before anything changes; inside inference mode the round runs."""
    with torch.inference_mode():
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    for prune in (lambda: global_prune(model, {}, 0.5), lambda: global_prune(model, {}, 0.5, scope="layer"),
                  lambda: block_prune(model, {}, 0.5, block=16), lambda: filter_prune(model, 0.5)):
        with pytest.raises(ValueError, match="layer '0'.s weight is an inference tensor .*torch.inference_mode"):
            prune()
    assert bool((model[0].weight != 0).all()) and model[0].out_channels == 8  # (nothing pruned, nothing kept)
    with torch.inference_mode():
        masks = global_prune(model, {}, 0.5)
    assert sum(int(mk.sum()) for mk in masks.values()) == (8 * 27 + 4 * 72) // 2


def test_global_prune_over_float32_and_float64_layers_is_exact():
    """One threshold over layers of two dtypes (selected in float64, compared in float64): the same
    masks as every layer in float64, where float32 values sit next to float64 ones at a tie."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4).double(), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():  # exact ties across the dtypes, and a float64 value between two float32s
        m[0].weight[0, :3] = 0.25
        m[2].weight[0, :3] = 0.25
        m[2].weight[1, 0] = float(torch.tensor(0.1, dtype=torch.float32)) + 1e-12
        m[0].weight[1, 0] = 0.1
    ref = copy.deepcopy(m).double()
    want = global_prune(ref, {}, 0.5)
    got = global_prune(m, {}, 0.5)
    assert {k: torch.equal(v, want[k]) for k, v in got.items()} == {k: True for k in want}
    sp = copy.deepcopy(m)
    sp[2] = SparseLinear.from_dense(sp[2], got["2"])  # a float64 sparse layer among float32 dense ones
    masks = global_prune(sp, {k: v for k, v in got.items() if k != "2"}, 0.3)
    ref_masks = global_prune(copy.deepcopy(m).double(), got, 0.3)
    assert torch.equal(sp[2].weight.mask(), ref_masks["2"]) and torch.equal(masks["0"], ref_masks["0"])


def test_nan_weights_are_refused_by_every_rule_on_both_engines():
    for engine in ("dense", "sparse"):
        model = _net()
        masks = apply_engine(model, global_prune(model, {}, 0.2), engine)
        w = model[0].weight.values if engine == "sparse" else model[0].weight
        with torch.no_grad():
            w.view(-1)[3] = float("nan")
        with pytest.raises(ValueError, match="layer '0' has NaN weights"):
            global_prune(model, masks, 0.2)
    from sparsetrain.prune import block_prune, filter_prune
    for rule in (lambda m: filter_prune(m, 0.5), lambda m: block_prune(m, {}, 0.5, 16)):
        model = _net()
        with torch.no_grad():
            model[4].weight[2, 5] = float("nan")
        with pytest.raises(ValueError, match="layer '4' has NaN weights"):
            rule(model)


def test_nan_under_a_pruned_position_is_a_pruned_weight_as_inf_is():
    """A NaN under an already-pruned position of a dense masked layer was refused ("has NaN weights"), where an
    inf there is taken (a pruned weight, set to 0 by the round): taken alike now by global_prune (both scopes),
    block_prune, block_mask and every rule's compute_mask, with the masks of the same weights holding 0 there;
    a NaN the mask keeps is still refused, by layer name."""
    from sparsetrain.prune import block_mask, block_prune, make_rule
    rounds = (lambda m, mk: global_prune(m, mk, 0.3), lambda m, mk: global_prune(m, mk, 0.3, scope="layer"),
              lambda m, mk: block_prune(m, mk, 0.5, 16))
    for prune in rounds:
        model = _net()
        masks = prune(model, {})
        ref = copy.deepcopy(model)
        pruned = (~masks["4"]).flatten().nonzero()[0]
        with torch.no_grad():
            model[4].weight.view(-1)[pruned] = float("nan")
        got, want = prune(model, masks), prune(ref, masks)
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert torch.equal(model[4].weight, ref[4].weight)  # (the NaN zeroed: a pruned weight)
        kept = masks["4"].flatten().nonzero()[0]
        with torch.no_grad():
            model[4].weight.view(-1)[kept] = float("nan")
        with pytest.raises(ValueError, match="layer '4' has NaN weights"):
            prune(model, got)
    w, mk = torch.randn(32, 32), torch.ones(32, 32, dtype=torch.bool)
    w[3, 4], mk[3, 4] = float("nan"), False
    assert torch.equal(block_mask(w, 16, 0.5, mk), block_mask(w.masked_fill(~mk, 0), 16, 0.5, mk))
    with pytest.raises(ValueError, match="weight has NaN entries where mask keeps"):
        block_mask(w, 16, 0.5)
    for name in ("unstructured", "block", "filter"):
        rule = make_rule(name, block=16)
        assert torch.equal(rule.compute_mask(w, mk, 0.5), rule.compute_mask(w.masked_fill(~mk, 0), mk, 0.5))
        with pytest.raises(ValueError, match="t has NaN entries where default_mask keeps"):
            rule.compute_mask(w, None, 0.5)


def test_inf_weights_the_mask_keeps_are_refused_by_every_rule_on_both_engines():
    """An inf weight (a diverged model) was ranked as the largest and kept by every rule (its layer's output inf
    or NaN from then on), where NaN was refused; it is refused alike now, by layer name, the model untouched."""
    from sparsetrain.prune import block_mask, block_prune, filter_prune
    for engine in ("dense", "sparse"):
        for sign in (1, -1):
            model = _net()
            masks = apply_engine(model, global_prune(model, {}, 0.2), engine)
            w = model[0].weight.values if engine == "sparse" else model[0].weight
            live = 0 if engine == "sparse" else int(masks["0"].flatten().nonzero()[0])
            with torch.no_grad():
                w.view(-1)[live] = sign * float("inf")
            before = copy.deepcopy(model.state_dict())
            with pytest.raises(ValueError, match="layer '0' has inf weights"):
                global_prune(model, masks, 0.2)
            assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for rule in (lambda m: filter_prune(m, 0.5), lambda m: block_prune(m, {}, 0.5, 16)):
        model = _net()
        with torch.no_grad():
            model[4].weight[2, 5] = float("inf")
        with pytest.raises(ValueError, match="layer '4' has inf weights"):
            rule(model)
    w, mk = torch.randn(32, 32), torch.ones(32, 32, dtype=torch.bool)
    w[3, 4], mk[3, 4] = float("-inf"), False  # under a pruned position: a pruned weight, taken
    assert torch.equal(block_mask(w, 16, 0.5, mk), block_mask(w.masked_fill(~mk, 0), 16, 0.5, mk))
    with pytest.raises(ValueError, match="weight has inf entries where mask keeps"):
        block_mask(w, 16, 0.5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CPU runs above cover the rules")
def test_pruning_on_cuda_gives_the_cpu_masks():
    """The selection ops are CPU C++: a GPU model's weights are ranked on CPU copies."""
    from sparsetrain.prune import filter_prune
    for engine in ("dense", "sparse"):
        cpu = _net()
        gpu = copy.deepcopy(cpu).cuda()
        mc, mg = apply_engine(cpu, {}, engine), apply_engine(gpu, {}, engine)
        for _ in range(3):
            mc, mg = global_prune(cpu, mc, 0.3), global_prune(gpu, mg, 0.3)
        for (n, a), (_, b) in zip(masks_of(cpu, mc).items(), masks_of(gpu, mg).items()):
            assert torch.equal(a, b.cpu()), (engine, n)
    cpu = _net()
    gpu = copy.deepcopy(cpu).cuda()
    assert filter_prune(cpu, 0.5) == filter_prune(gpu, 0.5)
    assert all(torch.equal(cpu.kept_channels[k], gpu.kept_channels[k]) for k in cpu.kept_channels)


def test_reinit_draws_from_a_stream_of_its_own():
    """--perturb reinit: round r of seed s is not any seed's initial model (seed * 1000 + round was
    seed 1's initial model for seed 0's round 1), and differs between rounds and seeds."""
    from types import SimpleNamespace
    from sparsetrain.experiment.loop import perturb_
    from sparsetrain.experiment.models import build_model
    arch = dict(name="lenet300", in_channels=1, image_size=28, num_classes=10)
    inits = []
    for seed in range(3):
        torch.manual_seed(seed)
        inits.append(build_model(**arch).state_dict()["fc1.weight"])
    drawn = {}
    for seed, rnd in ((0, 1), (0, 2), (1, 1)):
        torch.manual_seed(seed)
        m = build_model(**arch)
        s = SimpleNamespace(model=m, masks={}, rnd=rnd)
        before, seeded = torch.get_rng_state(), []
        with pytest.MonkeyPatch.context() as mp:  # (torch.manual_seed reseeded the CUDA generators too)
            mp.setattr(torch.cuda, "manual_seed_all", lambda *a: seeded.append(a))
            perturb_(SimpleNamespace(perturb="reinit"), SimpleNamespace(), s, arch, seed=seed)
        assert torch.equal(torch.get_rng_state(), before) and seeded == []
        drawn[seed, rnd] = m.state_dict()["fc1.weight"]
        assert not any(torch.equal(drawn[seed, rnd], w) for w in inits)
    assert not torch.equal(drawn[0, 1], drawn[0, 2]) and not torch.equal(drawn[0, 1], drawn[1, 1])
    # a filter-pruned model: fit_state builds an unpruned one to map the channels, outside the global RNG too
    from sparsetrain.prune import filter_prune
    arch = dict(name="vgg_d1g1", num_classes=10, in_channels=3, image_size=32)
    m = build_model(**arch)
    filter_prune(m, 0.5)
    before = torch.get_rng_state()
    perturb_(SimpleNamespace(perturb="reinit"), SimpleNamespace(), SimpleNamespace(model=m, masks={}, rnd=1), arch, 0)
    assert torch.equal(torch.get_rng_state(), before)


def _wide_net():
    torch.manual_seed(0)  # layers past SPARSE_MIN_WEIGHTS, so --engine auto times them
    return nn.Sequential(nn.Conv2d(16, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.Flatten(),
                         nn.Linear(128 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 5))


def test_auto_engine_decides_by_measurement(monkeypatch, tmp_path):
    from sparsetrain.engine import policy
    from sparsetrain.engine.nn import is_sparse
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(policy, "_DECISIONS", {})
    timed = []

    def fake_seconds(layer, x, step):  # sparse wins for the conv, loses for the linears
        timed.append((type(layer).__name__, tuple(x.shape), x.requires_grad))
        conv = isinstance(layer, nn.Conv2d) or type(layer).__name__ == "SparseConv2d"
        return (1.0 if conv else 3.0) if is_sparse(layer) else 2.0

    monkeypatch.setattr(policy, "_step_seconds", fake_seconds)
    example = torch.randn(3, 16, 4, 4)
    model = _wide_net()
    masks = apply_engine(model, global_prune(model, {}, 0.9, scope="layer"), "auto", example=example)
    assert type(model[0]).__name__ == "SparseConvBNReLU" and type(model[4]) is nn.Linear
    assert set(masks) == {"4", "6"}  # the dense layers keep their masks
    # each big layer timed dense and sparse at its input shape, a warm-up and 3 steps each, alternating; the 64 x 5
    # classifier is not timed; the first conv reads the batch itself: no input gradient, as in training
    assert sorted(timed) == sorted(4 * [("Conv2d", (3, 16, 4, 4), False), ("SparseConv2d", (3, 16, 4, 4), False),
                                        ("Linear", (3, 2048), True), ("SparseLinear", (3, 2048), True)])
    assert [t[0] for t in timed[:6]] in (["Conv2d", "SparseConv2d"] * 3, ["Linear", "SparseLinear"] * 3)
    # the same layers at the same sparsity: decided from the cache, in memory and on disk
    monkeypatch.setattr(policy, "_DECISIONS", {})
    again = _wide_net()
    apply_engine(again, global_prune(again, {}, 0.9, scope="layer"), "auto", example=example)
    assert len(timed) == 16 and is_sparse(again[0]) and (tmp_path / "engine_auto.json").exists()
    # another process's decision made meanwhile (a run in parallel) wins over measuring again here,
    # though this process holds other decisions in memory
    cache = json.loads((tmp_path / "engine_auto.json").read_text())
    (tmp_path / "engine_auto.json").write_text(json.dumps({k: (not v) for k, v in cache.items()}))
    monkeypatch.setattr(policy, "_DECISIONS", {"another layer": True})
    other = _wide_net()
    apply_engine(other, global_prune(other, {}, 0.9, scope="layer"), "auto", example=example)
    assert len(timed) == 16 and not is_sparse(other[0]) and is_sparse(other[4])
    (tmp_path / "engine_auto.json").write_text(json.dumps(cache))
    monkeypatch.setattr(policy, "_DECISIONS", {})
    # under DDP every rank takes rank 0's decisions (agree)
    agreed = _wide_net()
    apply_engine(agreed, global_prune(agreed, {}, 0.9, scope="layer"), "auto", example=example,
                 agree=lambda faster: {n: True for n in faster})
    assert is_sparse(agreed[0]) and is_sparse(agreed[4]) and not is_sparse(agreed[6])
    # below MEASURE_FROM nothing is timed and everything stays dense
    low = _wide_net()
    apply_engine(low, global_prune(low, {}, 0.3, scope="layer"), "auto", example=example)
    assert len(timed) == 16 and not any(is_sparse(m) for m in low.modules())
    # a cache holding valid JSON of another kind is as a corrupt one: measured again, written afresh
    for kind in ("[]", '"x"'):
        (tmp_path / "engine_auto.json").write_text(kind)
        monkeypatch.setattr(policy, "_DECISIONS", {})
        fresh = _wide_net()
        apply_engine(fresh, global_prune(fresh, {}, 0.9, scope="layer"), "auto", example=example)
        assert is_sparse(fresh[0]) and sorted(json.loads((tmp_path / "engine_auto.json").read_text()).values()) == \
            [False, True]
    assert len(timed) == 48  # (two layers, both sides, 3 steps and a warm-up, thrice)


def test_auto_engine_real_timing_keeps_the_function(monkeypatch, tmp_path):
    from sparsetrain.engine import policy
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(policy, "_DECISIONS", {})
    model = _wide_net()
    ref = copy.deepcopy(model)
    masks_ref = global_prune(ref, {}, 0.99, scope="layer")
    masks = apply_engine(model, global_prune(model, {}, 0.99, scope="layer"), "auto", example=torch.randn(8, 16, 4, 4))
    assert len(policy._DECISIONS) == 2 and all(isinstance(v, bool) for v in policy._DECISIONS.values())
    zero_pruned_(ref, masks_ref)
    x = torch.randn(4, 16, 4, 4)
    ref.eval(), model.eval()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    assert set(masks) <= set(masks_ref)


def _optimizer(make: str, params):
    return (torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3) if make == "sgd"
            else torch.optim.Adam(params, lr=1e-2))


@pytest.mark.parametrize("make", ["sgd", "adam"])
def test_an_optimizer_trains_on_through_pruning_as_on_the_dense_masked_model(make):
    """global_prune shrinks a sparse layer in place (CSR.shrink_): the optimizer built after sparsify_
    keeps training the same values Parameters, the surviving weights keeping their momentum (Adam's
    moments), so the sparse model follows the dense masked one (gradients masked, weights masked
    again after each step) through two prunings, one between a backward and its step (the gradient
    shrinks too). (Before, pruning put in new Parameters that the optimizer never stepped.) The
    steps' graphs stay alive (a training loop's `loss` variable): the first backward after a prune
    failed with "returned an invalid gradient" (autograd's cached accumulator of the old nnz)."""
    ref = _net()
    model = copy.deepcopy(ref)
    masks_ref = global_prune(ref, {}, 0.5)
    sparsetrain.sparsify_(model, global_prune(model, {}, 0.5))
    opt_ref, opt = _optimizer(make, ref.parameters()), _optimizer(make, model.parameters())
    values = [m.weight.values for _, m in prunable_layers(model)]
    torch.manual_seed(3)
    x, t = torch.randn(16, 1, 8, 8), torch.randint(0, 5, (16,))
    alive = []  # (every step's loss, its graph with it)
    for it in range(9):
        for m, o in ((ref, opt_ref), (model, opt)):
            o.zero_grad()
            alive.append(F.cross_entropy(m(x), t))
            alive[-1].backward()
        if it in (3, 6):
            masks_ref = global_prune(ref, masks_ref, 0.4)
            global_prune(model, {}, 0.4)
        mask_grads_(ref, masks_ref)
        opt_ref.step()
        opt.step()
        enforce_masks_(ref, masks_ref)
    assert all(m.weight.values is v for (_, m), v in zip(prunable_layers(model), values))
    for n, m in prunable_layers(model):
        assert torch.equal(m.weight.mask(), masks_ref[n])
        torch.testing.assert_close(m.weight.to_dense(), ref.get_submodule(n).weight, rtol=1e-4, atol=1e-5)


def test_any_per_element_state_shrinks_and_pruning_under_inference_mode_trains_on():
    """Every state tensor of the values' shape shrinks with them, whatever its key: Adafactor's
    `variance` of the 1-D values was refused after a prune (blaming loaded state). Pruning under
    torch.inference_mode() leaves the model trainable (its values and optimizer state became inference
    tensors: the next backward failed), as a dense masked model pruned so does."""
    model = _net()
    sparsetrain.sparsify_(model, global_prune(model, {}, 0.5))
    ada = torch.optim.Adafactor(model.parameters())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 1, 8, 8)
    for opt in (ada, sgd):
        model.zero_grad()
        model(x).sum().backward()
        opt.step()
    values = [m.weight.values for _, m in prunable_layers(model)]
    before = [(ada.state[v]["variance"].clone(), sgd.state[v]["momentum_buffer"].clone(), m.weight.mask())
              for v, (_, m) in zip(values, prunable_layers(model))]
    with torch.inference_mode():
        global_prune(model, {}, 0.5)
    for v, (_, m), (var, mom, old_mask) in zip(values, prunable_layers(model), before):
        assert not v.is_inference() and not m.weight.col_indices.is_inference()
        keep = m.weight.mask()[old_mask]  # (the surviving entries, in the old CSR order)
        assert torch.equal(ada.state[v]["variance"], var[keep]) and torch.equal(sgd.state[v]["momentum_buffer"], mom[keep])
        assert not ada.state[v]["variance"].is_inference()
    for opt in (ada, sgd):
        model.zero_grad()
        model(x).sum().backward()
        opt.step()


@pytest.mark.parametrize("conv", [False, True])
def test_pruning_between_a_forward_and_its_backward_is_autograds_inplace_error(conv):
    """The values a pending graph saved were resized in place without a version bump: the backward
    failed in the kernels' size check ("values must have nnz = ..."); now autograd's own in-place error."""
    torch.manual_seed(0)
    m = (nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)) if conv
         else nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 5)))
    sparsetrain.sparsify_(m, global_prune(m, {}, 0.5))
    y = m(torch.randn(3, 3, 8, 8) if conv else torch.randn(3, 30)).sum()
    global_prune(m, {}, 0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_state_loaded_and_not_stepped_yet_is_refused_after_pruning():
    """Pruning shrinks the state of the optimizers that stepped the values; state loaded into another
    optimizer that has not stepped yet keeps the old size: its step is refused, saying why."""
    model = _net()
    sparsetrain.sparsify_(model, global_prune(model, {}, 0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 1, 8, 8)
    model(x).sum().backward()
    opt.step()
    loaded = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    global_prune(model, {}, 0.5)
    model.zero_grad()
    model(x).sum().backward()
    with pytest.raises(ValueError, match=r"SGD state 'momentum_buffer' of a sparse weight's values has shape .*: "
                                         r"pruning removed some of its weights"):
        loaded.step()
    opt.step()  # (its state shrank with the values)



def test_many_prunings_keep_a_bounded_record_and_old_state_is_still_refused():
    """Each prune records the values' former shape (a step with state of it is refused, saying why); a
    study prunes every round, so the record kept only the latest shapes must not grow per round (it did:
    one entry per prune, for the life of the layer). State older than the record is still refused by
    torch.optim's per-element check."""
    from sparsetrain.engine import optim_state
    layer = SparseLinear.from_dense(nn.Linear(20, 10))
    values = layer.weight.values
    opt = torch.optim.SGD([values], lr=0.1, momentum=0.9)
    values.grad = torch.ones_like(values)
    opt.step()
    old = torch.optim.SGD([values], lr=0.1, momentum=0.9)
    old.load_state_dict(copy.deepcopy(opt.state_dict()))  # (loaded, never stepped: keeps the first size)
    rounds = 3 * optim_state._FORMER
    for _ in range(rounds):
        keep = torch.ones(layer.weight.nnz, dtype=torch.bool)
        keep[0] = False
        layer.weight.shrink_(keep)
    first = 20 * 10
    assert values.numel() == first - rounds
    assert len(optim_state._resized[values]) == optim_state._FORMER  # (was `rounds`: one entry per prune)
    values.grad = torch.ones_like(values)
    with pytest.raises(ValueError, match=r"SGD state 'momentum_buffer' of param_groups\[0\]\['params'\]\[0\] "
                                         rf"has shape \({first},\), the parameter \({first - rounds},\)"):
        old.step()
    recent = torch.optim.SGD([values], lr=0.1, momentum=0.9)
    recent.load_state_dict({"state": {0: {"momentum_buffer": torch.zeros(values.numel() + 1)}},
                            "param_groups": opt.state_dict()["param_groups"]})
    with pytest.raises(ValueError, match="pruning removed some of its weights"):
        recent.step()
    opt.step()  # (stepped before: its state shrank with the values)
    assert opt.state[values]["momentum_buffer"].shape == values.shape


def _live_tensors():
    """The number of live tensors once collecting frees nothing more. One gc.collect() left a cycle of
    tensors whose C++ TensorImpl another piece of garbage still held (PyTorch keeps such a tensor's Python
    object alive from C++): after a failed torch.compile of torch.func.jvp (test_sparse_linear's refused
    jvp), its FakeTensors (FakeTensorMode -> ShapeEnv.tracked_fakes -> the FakeTensors) outlived the first
    pass inside jvp's TensorWrappers and were freed by the next one, so the first count was 4 too high."""
    import gc
    for _ in range(10):  # (each pass frees the holders the last one left; bounded against a __del__ loop)
        if not gc.collect():
            break
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


def test_live_tensor_count_frees_garbage_held_from_cpp():
    """_live_tensors (the count below) frees a garbage tensor whose impl another garbage tensor holds in
    C++ (its .grad): one gc.collect() left it, a count one too high after an earlier test's garbage."""
    before = _live_tensors()
    held, holder = torch.zeros(3), torch.zeros(3, requires_grad=True)
    held.cycle, holder.grad = held, held  # (held in a cycle of its own; holder keeps its impl in C++)
    box = [holder]
    box.append(box)
    del held, holder, box
    assert _live_tensors() == before


def test_many_rounds_hold_no_more_memory_than_a_few():
    """A long run's rounds (sparsify_, steps, a prune, a load of another nnz, densify_, new optimizers)
    leave the live tensors and the engine's per-process records as they were after the first rounds:
    nothing grows per round (README: Memory over many rounds)."""
    from sparsetrain.engine import optim_state
    model, other, x = _net(), _net(), torch.randn(4, 1, 8, 8)
    sparsetrain.sparsify_(other, global_prune(other, {}, 0.7))
    counts = []
    for r in range(24):
        sparsetrain.sparsify_(model, global_prune(model, {}, 0.5))
        for step in range(3):
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            model(x).square().mean().backward()
            opt.step()
            if step == 0:
                global_prune(model, {}, 0.3)
            elif step == 1:
                model.load_state_dict(other.state_dict())
        sparsetrain.densify_(model)
        model.zero_grad(set_to_none=True)
        del opt
        if r in (3, 23):
            counts.append((_live_tensors(),
                           *map(len, (optim_state._resized, optim_state._stale, optim_state._retired,
                                      optim_state._optimizers))))
    assert counts[0] == counts[1], counts

def test_global_prune_hands_back_a_named_sparse_layers_new_mask():
    """A sparse layer named in the masks given gets its new mask in the returned dict, not the one
    given: training the densified model under the returned masks keeps the pruned weights at zero."""
    model = _net()
    masks = global_prune(model, {}, 0.5)
    sparsetrain.sparsify_(model, masks)
    again = global_prune(model, masks, 0.5)
    now = masks_of(model)
    for n in masks:
        assert torch.equal(again[n], now[n]) and int(again[n].sum()) < int(masks[n].sum())
    sparsetrain.densify_(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(4, 1, 8, 8)).square().sum().backward()
    mask_grads_(model, again)
    opt.step()
    for n in masks:
        assert bool((model.get_submodule(n).weight[~now[n]] == 0).all())


def test_mask_helpers_zero_nan_and_inf_at_pruned_positions():
    """mask_grads_/enforce_masks_ zero what is pruned whatever it holds (they multiplied by the mask:
    NaN * 0 = NaN stayed in a pruned gradient and inf * 0 = NaN in a pruned weight); NaN where the mask
    keeps stays, for the caller's own checks to see."""
    model = nn.Sequential(nn.Linear(4, 3))
    mask = torch.tensor([[True, False, True, False]] * 3)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].weight[0, 1] = float("inf")
    model[0].weight.grad = torch.ones(3, 4)
    model[0].weight.grad[1, 3] = float("nan")
    model[0].weight.grad[2, 0] = float("nan")  # kept
    enforce_masks_(model, {"0": mask})
    mask_grads_(model, {"0": mask})
    w, g = model[0].weight.detach(), model[0].weight.grad
    assert torch.equal(w, mask.float())
    assert torch.equal(g[~mask], torch.zeros(6)) and bool(g[2, 0].isnan())
    assert torch.equal(g[mask].nan_to_num(7.0), torch.tensor([1.0, 1, 1, 1, 7, 1]))


def test_mask_helpers_skip_sparse_layers_the_masks_name():
    """global_prune's masks name the sparse layers of a partly sparsified model: mask_grads_ and
    enforce_masks_ raised a bare AttributeError ('CSR' object has no attribute 'grad') on them. A sparse
    layer's pattern is its mask: skipped (its values untouched), the dense layers masked as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    sparsetrain.sparsify_(model, {"0": torch.ones(8, 8, dtype=torch.bool)})
    masks = global_prune(model, {"0": torch.ones(8, 8, dtype=torch.bool)}, 0.5)
    assert set(masks) == {"0", "2"}
    model(torch.randn(3, 8)).square().sum().backward()
    values, grad = model[0].weight.values.detach().clone(), model[0].weight.values.grad.clone()
    with torch.no_grad():
        model[2].weight.fill_(1.0)
    mask_grads_(model, masks)
    enforce_masks_(model, masks)
    assert torch.equal(model[0].weight.values, values) and torch.equal(model[0].weight.values.grad, grad)
    assert torch.equal(model[2].weight, masks["2"].float())
    assert torch.equal(model[2].weight.grad[~masks["2"]], torch.zeros(int((~masks["2"]).sum())))
    with pytest.raises(ValueError, match=r"masks\['0'\] must be a bool tensor of shape \(8, 8\)"):
        enforce_masks_(model, {"0": torch.ones(8, 9, dtype=torch.bool)})


@pytest.mark.parametrize("fn", [mask_grads_, enforce_masks_])
@pytest.mark.parametrize("key, message", [("0.weight", r"names '0.weight', .*a layer's name, not its weight's: '0'"),
                                          ("x", r"names 'x', which is not a prunable layer"),
                                          ("1", r"names '1', which is not a prunable layer")])
def test_mask_helpers_name_a_key_that_is_no_layer(fn, key, message):
    """As every masks-taking function (check_masks): a bare AttributeError from get_submodule before."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    with pytest.raises(KeyError, match=message):
        fn(model, {key: torch.ones(3, 4, dtype=torch.bool)})


def test_model_masks_takes_the_layers_sparsify_takes():
    """sparsetrain.testing.model_masks: exactly nn.Conv2d / nn.Linear (a subclass, or
    MultiheadAttention's out_proj, got a mask sparsify_ and global_prune then refused)."""
    from sparsetrain.testing import model_masks

    class MyLinear(nn.Linear):
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.own, self.attn, self.fc = nn.Conv2d(2, 4, 3), MyLinear(4, 4), nn.MultiheadAttention(4, 1), \
                nn.Linear(4, 3)

    model = Net()
    masks = model_masks(model, 0.5)
    assert list(masks) == ["conv", "fc"]
    sparsetrain.sparsify_(model, masks)
    assert global_prune(model, masks, 0.2).keys() == masks.keys()


def test_a_mask_that_differs_from_a_sparse_layers_pattern_is_refused():
    """global_prune and masks_of used a sparse layer's stored pattern whatever mask was given for it:
    a stale mask (or one for another model) is refused by name; the layer's own pattern is taken."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    masks = {"0": torch.rand(5, 6) > 0.3, "2": torch.rand(3, 5) > 0.3}
    sparsetrain.sparsify_(model, masks)
    stale = dict(masks, **{"0": masks["0"].clone()})
    i, j = torch.nonzero(masks["0"])[0].tolist()
    stale["0"][i, j] = False  # (one kept weight dropped: the mask of an earlier round's other model)
    for fn in (lambda m: global_prune(model, m, 0.2), lambda m: masks_of(model, m)):
        with pytest.raises(ValueError, match=r"masks\['0'\] differs from the pattern sparse layer '0' stores"):
            fn(stale)
    assert torch.equal(masks_of(model, masks)["0"], masks["0"])
    new = global_prune(model, masks, 0.2)
    assert torch.equal(masks_of(model, new)["2"], new["2"]) and int(new["0"].sum()) < int(masks["0"].sum())


def test_layers_pruned_with_torch_prune_are_refused_by_the_mask_functions():
    """A layer under torch.nn.utils.prune has weight = orig * mask as of the last forward (stale after
    a step, recomputed by its hook): model_sparsity read 0.0, global_prune ranked the stale weights,
    mask_grads_/enforce_masks_ acted on the recomputed one. Each refuses it, naming the layer; after
    sparsify_ (which takes prune's mask) or prune.remove they work."""
    from torch.nn.utils import prune as torch_prune

    def pruned():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
        torch_prune.l1_unstructured(net[0], "weight", amount=0.5)
        return net
    model = pruned()
    kept = model[0].weight_mask.bool().clone()
    mask = {"0": kept}
    for fn in (lambda: model_sparsity(model), lambda: global_prune(model, {}, 0.2), lambda: masks_of(model),
               lambda: mask_grads_(model, mask), lambda: enforce_masks_(model, mask)):
        with pytest.raises(TypeError, match="layer '0' is pruned with torch.nn.utils.prune: sparsify_ the model"):
            fn()
    other = pruned()
    torch_prune.remove(other[0], "weight")
    assert model_sparsity(other, mask) == pytest.approx(15 / 45)  # (a dense layer: its mask given)
    sparsetrain.sparsify_(model, {"0": None})
    assert torch.equal(masks_of(model)["0"], kept) and model_sparsity(model) == pytest.approx(15 / 45)


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm", "parametrizations.weight_norm",
                                  "parametrizations.spectral_norm"])
def test_layers_whose_weight_a_legacy_norm_hook_recomputes_are_refused(norm):
    """Legacy weight_norm/spectral_norm recompute .weight from weight_g/weight_v (weight_orig) before
    each forward: global_prune "pruned" it and the next forward regrew every weight. Every masks
    function refuses the model, naming the layer, as sparsify_ does. The parametrize-based norms make
    the layer a ParametrizedLinear, which the exact-type match skipped: pruned nothing there and counted
    without it in model_sparsity, silently (before 2026-12-06); refused alike."""
    import warnings
    from sparsetrain.prune import block_prune
    torch.manual_seed(0)
    new = norm.startswith("parametrizations.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (weight_norm's deprecation)
        norm_fn = getattr(nn.utils.parametrizations, norm.split(".")[1]) if new else getattr(nn.utils, norm)
        model = nn.Sequential(norm_fn(nn.Linear(8, 8)), nn.Linear(8, 2))
    mask = {"0": torch.ones(8, 8, dtype=torch.bool)}
    for fn in (lambda: global_prune(model, {}, 0.5), lambda: block_prune(model, {}, 0.5, 16),
               lambda: model_sparsity(model), lambda: masks_of(model), lambda: mask_grads_(model, mask),
               lambda: enforce_masks_(model, mask), lambda: apply_engine(model, {}, "auto"),
               lambda: load_weights_under_masks_(model, model.state_dict(), {})):
        with pytest.raises(TypeError, match="layer '0'.s weight is computed by a reparametrization"):
            fn()
    if new:
        nn.utils.parametrize.remove_parametrizations(model[0], "weight")
    else:
        getattr(nn.utils, "remove_" + norm)(model[0])
    masks = global_prune(model, {}, 0.5)
    model(torch.randn(1, 8))
    assert int((model[0].weight == 0).sum()) == int((~masks["0"]).sum()) > 0  # (pruned weights stay 0)


def test_a_layer_whose_bias_alone_is_parametrized_is_pruned_as_the_plain_layer():
    """A Linear/Conv2d with only its bias parametrized is a Parametrized<Linear/Conv2d>, which the exact-type
    match skipped: global_prune said "no prunable layer" for a model of such layers (and left them out of the
    ranking and of model_sparsity beside others). Its weight is a Parameter of its own: pruned dense masked
    as the plain layer (the reference: the same model unparametrized); auto keeps it dense, sparsify_ refuses."""
    from sparsetrain.prune import block_prune
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(2, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 16))
    for prune in (lambda m: global_prune(m, {}, 0.5), lambda m: global_prune(m, {}, 0.3, scope="layer"),
                  lambda m: block_prune(m, {}, 0.5, 16)):
        ref, model = copy.deepcopy(plain), copy.deepcopy(plain)
        for i in (0, 3):
            nn.utils.parametrize.register_parametrization(model[i], "bias", nn.Hardtanh())
        want, got = prune(ref), prune(model)
        assert set(got) == {"0", "3"} and all(torch.equal(got[n], want[n]) for n in want)
        for i in (0, 3):
            assert torch.equal(model[i].weight, ref[i].weight) and (model[i].weight[~got[str(i)]] == 0).all()
        assert model_sparsity(model, got) == model_sparsity(ref, want) > 0
        x = torch.randn(3, 2, 4, 4)
        model(x).sum().backward()
        mask_grads_(model, got)
        assert not model[3].weight.grad[~got["3"]].any() and model[3].weight.grad[got["3"]].any()
    assert apply_engine(model, {"3": got["3"]}, "auto").keys() == {"3"}  # (dense masked, as it is)
    assert type(model[3]).__name__ == "ParametrizedLinear"
    with pytest.raises(TypeError, match=r"its bias is computed by a parametrization"):
        sparsetrain.sparsify_(model, got)


def test_tied_weights_are_refused_by_the_ranking_functions():
    """Two layers sharing one weight tensor: global_prune/block_prune ranked it twice (the count pruned
    was not exact) and model_sparsity counted it twice. Refused naming both layers, as sparsify_ does."""
    from sparsetrain.prune import block_prune
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    w = a.weight.detach().clone()
    for fn in (lambda: global_prune(model, {}, 0.5), lambda: block_prune(model, {}, 0.5, 16),
               lambda: model_sparsity(model)):
        with pytest.raises(ValueError, match="'0' shares its weight with '2': tied weights cannot be pruned"):
            fn()
    assert torch.equal(a.weight, w)  # (untouched)
    b.weight = nn.Parameter(w.clone())  # untied: ranked once each
    assert int((~global_prune(model, {}, 0.5)["0"]).sum()) + int((b.weight == 0).sum()) == 16


# ---- half precision, overflowed weights, autocast ------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_global_prune_of_a_half_precision_model(dtype, scope):
    # (the C++ selection takes fp32/fp64: half weights are ranked exactly in float64, as mixed dtypes are)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 10)).to(dtype)
    ref = [lin.weight.double().abs().flatten() for lin in m]
    masks = global_prune(m, {}, 0.3, scope=scope)
    pruned = [int((~masks[n]).sum()) for n in ("0", "1")]
    assert pruned == ([180, 60] if scope == "layer" else pruned) and sum(pruned) == 240
    for i, lin in enumerate(m):
        assert bool((lin.weight[~masks[str(i)]] == 0).all())
        if scope == "layer":  # the smallest |w| go: every pruned magnitude <= every kept one
            assert ref[i][~masks[str(i)].flatten()].max() <= ref[i][masks[str(i)].flatten()].min()
    if scope == "global":
        every = torch.cat(ref)
        gone = torch.cat([~masks[n].flatten() for n in ("0", "1")])
        assert every[gone].max() <= every[~gone].min()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_global_prune_of_a_half_precision_model_with_a_sparse_layer(dtype, scope):
    """An fp16/bf16 sparse layer: csr_prune refused its values (fp32/fp64 only) after the dense layer
    before it was already pruned. Selected in float32 now (exact), the pattern is the fp32 model's."""
    torch.manual_seed(0)
    half = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 10)).to(dtype)
    ref = copy.deepcopy(half).float()  # the same magnitudes in float32
    for m in (half, ref):
        sparsetrain.sparsify_(m, {"2": torch.rand(10, 20, generator=torch.Generator().manual_seed(1)) > 0.2})
    assert half[2].weight.values.dtype == dtype
    got, want = global_prune(half, {}, 0.3, scope=scope), global_prune(ref, {}, 0.3, scope=scope)
    assert torch.equal(got["0"], want["0"]) and torch.equal(masks_of(half)["2"], masks_of(ref)["2"])
    assert torch.equal(half[0].weight.float(), ref[0].weight) and torch.equal(half[2].weight.values.float(),
                                                                               ref[2].weight.values)


def test_global_prune_selects_every_layer_before_changing_any(monkeypatch):
    """A layer whose selection fails leaves the model as it was (it was left half pruned)."""
    from sparsetrain.engine import ops

    def refuse(*args):
        raise TypeError("refused")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    sparsetrain.sparsify_(model, {"2": torch.ones(2, 8, dtype=torch.bool)})
    before = copy.deepcopy(model.state_dict())
    monkeypatch.setattr(ops, "csr_prune", refuse)
    with pytest.raises(TypeError, match="refused"):
        global_prune(model, {}, 0.5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_pruned_inf_weights_become_zero_not_nan():
    # (zeroing by mul_(mask) made inf * 0 = NaN: the next round refused the model, the forward gave NaN)
    from sparsetrain.prune import block_prune
    # (an inf the mask keeps is refused since 2026-12-06: test_inf_weights_are_refused_...; one under a pruned
    # position, not zeroed yet, is a pruned weight)
    m = nn.Sequential(nn.Linear(2, 3))
    pre = torch.tensor([[True, False], [True, True], [False, True]])
    with torch.no_grad():
        m[0].weight[~pre] = float("inf")
    masks = global_prune(m, {"0": pre}, 0.5)
    assert int((~masks["0"]).sum()) == 4 and bool((m[0].weight[~masks["0"]] == 0).all())
    m = nn.Sequential(nn.Linear(32, 32))
    mk = torch.ones(32, 32, dtype=torch.bool)
    mk[0, 0] = False
    with torch.no_grad():
        m[0].weight[:16, :16] *= 0.01  # the smallest block by its live weights
        m[0].weight[0, 0] = float("inf")  # under a pruned position, not zeroed yet
    new = block_prune(m, {"0": mk}, 0.5, 16)
    assert not bool(m[0].weight.isnan().any()) and bool((m[0].weight[~new["0"]] == 0).all())
    assert not bool(new["0"][:16, :16].any())  # its norm was NaN, ranked above every other: never pruned


def test_auto_engine_decision_is_keyed_by_autocast(monkeypatch, tmp_path):
    # (a bf16 dense GEMM is another speed: an fp32 decision is not reused under autocast)
    from sparsetrain.engine import policy
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(policy, "_DECISIONS", {})
    calls = []
    monkeypatch.setattr(policy, "_step_seconds",
                        lambda layer, x, step: calls.append(torch.is_autocast_enabled("cpu")) or 1.0)
    layer, mask = nn.Linear(64, 64), torch.rand(64, 64) > 0.9
    policy.sparse_is_faster(layer, mask, (8, 64), reps=1)
    policy.sparse_is_faster(layer, mask, (8, 64), reps=1)  # cached
    with torch.autocast("cpu", dtype=torch.bfloat16):
        policy.sparse_is_faster(layer, mask, (8, 64), reps=1)
    assert calls == [False] * 4 + [True] * 4  # (a warm-up and a timed step, dense and sparse, each time measured)


def test_auto_engine_decision_is_keyed_by_the_kernels_it_timed(monkeypatch, tmp_path):
    """A decision timed on Triton's CPU interpreter (use_backend("triton"): dense, it is slow) was
    taken for the C++ engine, and cached on disk for later runs too."""
    from sparsetrain.engine import policy
    from sparsetrain.engine.backend import use_backend
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(policy, "_DECISIONS", {})
    kinds = []

    def seconds(layer, x, step):  # sparse wins on the C++ kernels, loses on the interpreter
        sparse = type(layer).__name__.startswith("Sparse")
        kinds.append(sparse)
        return (0.5 if sparse else 1.0) if policy.current_backend() != "triton" else (2.0 if sparse else 1.0)
    monkeypatch.setattr(policy, "_step_seconds", seconds)
    layer, mask = nn.Linear(64, 64), torch.rand(64, 64) > 0.9
    with use_backend("triton"):
        assert policy.sparse_is_faster(layer, mask, (8, 64), reps=1) is False
    assert policy.sparse_is_faster(layer, mask, (8, 64), reps=1) is True  # timed again, for the C++ kernels
    assert len(kinds) == 8


def test_auto_engine_probe_runs_under_no_grad_without_the_layers_hooks(monkeypatch, tmp_path):
    """The probe (timing a layer's forward and backward) failed with autograd's "element 0 of tensors
    does not require grad" under no_grad / inference_mode (model surgery is often done there), and
    fed the user's forward hooks its random input (it deep-copied the layer, hooks and all)."""
    from sparsetrain.engine import policy
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    for mode in (torch.no_grad, torch.inference_mode):
        monkeypatch.setattr(policy, "_DECISIONS", {})
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(160, 150), nn.ReLU(), nn.Linear(150, 4))
        seen = []
        model[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
        masks = {"0": torch.rand(150, 160) > 0.95}
        before, example = model[0].weight.detach().clone(), torch.randn(3, 160)
        rng = torch.get_rng_state()
        with mode():
            apply_engine(model, masks, "auto", fuse=False, example=example)
        assert seen == [torch.Size([3, 160])], seen  # the example's own pass only
        assert torch.equal(torch.get_rng_state(), rng)  # (the probe's randomness is its own)
        assert len(policy._DECISIONS) == 1
        got = model[0].weight.to_dense() if is_sparse(model[0]) else model[0].weight.detach()
        assert torch.equal(got, before * masks["0"] if is_sparse(model[0]) else before)
    with pytest.raises(TypeError, match="layer must be a dense Linear or Conv2d, got Conv1d"):
        policy.sparse_is_faster(nn.Conv1d(4, 4, 3), torch.ones(4, 4, 3, dtype=torch.bool), (2, 4, 8))
    with pytest.raises(ValueError, match="input_shape must be a sequence of positive ints, got 4"):
        policy.sparse_is_faster(nn.Linear(4, 4), torch.ones(4, 4, dtype=torch.bool), 4)


def test_auto_keeps_every_layer_sparsify_refuses_dense():
    """engine "auto" converts what can be converted and keeps the rest dense: it kept dilated and
    grouped convs dense but handed a Transformer layer's linears and tied linears to sparsify_, which
    refused the whole model. "sparse" still says why."""
    from sparsetrain.engine.convert import unconvertible
    from sparsetrain.engine.policy import apply_engine

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(32, 256)
            self.enc = nn.TransformerEncoderLayer(256, 4, 512, batch_first=True)
            self.big = nn.Linear(256, 256)
            self.a, self.b = nn.Linear(256, 256), nn.Linear(256, 256)
            self.b.weight = self.a.weight
            self.head = nn.Linear(256, 10)

        def forward(self, x):
            return self.head(self.b(self.a(self.big(self.enc(self.inp(x)))))).mean(1)
    torch.manual_seed(0)
    m = M()
    x = torch.randn(2, 5, 32)
    m.b.weight = nn.Parameter(m.a.weight.detach().clone())  # (global_prune refuses tied weights: untied here)
    masks = global_prune(m, {}, 0.9)
    m.b.weight, masks["b"] = m.a.weight, masks["a"]
    assert {"enc.linear1", "enc.linear2", "a", "b", "big"} <= set(masks)
    assert unconvertible(m) == {"enc.linear1", "enc.linear2", "a", "b"}  # (out_proj is a Linear subclass: no candidate)
    m.eval()  # (the encoder's dropout)
    want = m(x)
    rest = apply_engine(m, masks, "auto", fuse=False)
    assert type(m.big).__name__ == "SparseLinear" and type(m.enc.linear1) is nn.Linear and type(m.a) is nn.Linear
    assert {"enc.linear1", "enc.linear2", "a", "b"} <= set(rest) and "big" not in rest
    torch.testing.assert_close(m(x), want)
    with pytest.raises(TypeError, match="inside a TransformerEncoderLayer"):
        apply_engine(m, rest, "sparse", fuse=False)


@pytest.mark.parametrize("clash", ["attribute", "buffer"])
def test_auto_keeps_a_layer_holding_a_name_of_the_sparse_layer_s_own_dense(clash):
    """A user's `layer.sparsity = 0.9` (or a buffer `nnz`) is a name the sparse layer has as its own: sparsify_
    refuses it, but unconvertible did not name it, so "auto" raised sparsify_'s error (with an example batch,
    only where the timing picked sparse: a crash that depended on the machine). Kept dense now, untouched."""
    from sparsetrain.engine.convert import unconvertible
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128))
    if clash == "attribute":
        m[0].sparsity = 0.9
    else:
        m[0].register_buffer("nnz", torch.tensor(3))
    masks = global_prune(m, {}, 0.9)
    assert unconvertible(m) == {"0"}
    rest = apply_engine(m, masks, "auto", fuse=False)
    assert type(m[0]) is nn.Linear and type(m[2]).__name__ == "SparseLinear" and set(rest) == {"0"}
    assert (m[0].sparsity == 0.9) if clash == "attribute" else int(m[0].nnz) == 3
    with pytest.raises(ValueError, match="rename it first"):
        apply_engine(m, rest, "sparse", fuse=False)


@pytest.mark.parametrize("engine", ["auto", "dense", "sparse"])
def test_a_mask_pruning_a_sparse_layer_further_is_refused_by_apply_engine(engine):
    """apply_engine skipped a sparse layer whatever its mask: one pruning it further (a mask of the next round, not
    applied by global_prune) was dropped silently, the layer keeping its nonzeros. Refused by name now, as
    masks_of refuses it; its own pattern passes."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 256))
    first = torch.rand(256, 256) > 0.5
    sparsetrain.sparsify_(m, {"0": first})
    with pytest.raises(ValueError, match=r"masks\['0'\] differs from the pattern sparse layer '0' stores"):
        apply_engine(m, {"0": first & (torch.rand(256, 256) > 0.5)}, engine)
    assert m[0].nnz == int(first.sum()) and apply_engine(m, {"0": first}, engine) == {}


def test_auto_engine_remeasures_past_a_cache_file_too_deeply_nested_to_parse(monkeypatch, tmp_path):
    """json.load raises RecursionError on a deeply nested file (damage): it escaped --engine auto as a traceback,
    where any other unreadable cache file is measured again. Measured, and the file written anew; and
    sparse_is_faster's input_grad must be True or False ("no" timed the input-gradient case)."""
    from sparsetrain.engine import policy
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(policy, "_DECISIONS", {})
    monkeypatch.setattr(policy, "_step_seconds", lambda layer, x, step: 1.0 if is_sparse(layer) else 2.0)
    (tmp_path / "engine_auto.json").write_text("[" * 100000)
    layer, mask = nn.Linear(64, 64), torch.rand(64, 64) > 0.9
    assert policy.sparse_is_faster(layer, mask, (8, 64), reps=1) is True
    assert list(json.loads((tmp_path / "engine_auto.json").read_text()).values()) == [True]
    for bad in ("no", None, 1):
        with pytest.raises(TypeError, match="input_grad must be True or False"):
            policy.sparse_is_faster(layer, mask, (8, 64), input_grad=bad)


def test_auto_keeps_a_layer_whose_bias_torch_prune_pruned_dense():
    """sparsify_ refuses a layer whose bias torch.nn.utils.prune pruned, whatever its mask (the sparse
    layer's bias is dense); unconvertible did not name it, so "auto" handed it to sparsify_, which
    raised for the whole model."""
    from sparsetrain.engine.convert import unconvertible
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128))
    masks = global_prune(m, {}, 0.9)
    ref = copy.deepcopy(m)
    torch.nn.utils.prune.l1_unstructured(m[2], "bias", 0.5)
    assert unconvertible(m) == {"2"}
    with torch.no_grad():
        zero_pruned_(ref, masks)
        ref[2].bias.mul_(m[2].bias_mask)
    rest = apply_engine(m, masks, "auto", fuse=False)
    assert type(m[0]).__name__ == "SparseLinear" and type(m[2]) is nn.Linear and set(rest) == {"2"}
    enforce_masks_(m, rest)
    x = torch.randn(3, 128)
    torch.testing.assert_close(m(x), ref(x))
    with pytest.raises(ValueError, match="2: the layer's bias is pruned with torch.nn.utils.prune"):
        apply_engine(m, rest, "sparse", fuse=False)


def test_auto_engine_probe_times_a_training_step():
    """The probe's step is the study's: gradients set to None, forward, backward, a momentum SGD step;
    a dense masked layer's gradient masked before the step and its weight after it (it timed forward
    and backward alone, leaving out the dense layer's masking and its optimizer's whole-weight step)."""
    from sparsetrain.engine import policy
    torch.manual_seed(0)
    dense, mask = nn.Linear(12, 10), torch.rand(10, 12) > 0.6
    sparse = sparsetrain.nn.SparseLinear.from_dense(dense, mask)
    x = torch.randn(5, 12)
    w0, v0 = dense.weight.detach().clone(), sparse.weight.values.detach().clone()
    step = policy._trainer(dense, x, mask)
    step()
    assert bool((dense.weight[~mask] == 0).all()) and not torch.equal(dense.weight[mask], w0[mask])
    assert bool((dense.weight.grad[~mask] == 0).all())
    grad = dense.weight.grad.clone()
    step()  # (set to None, then computed afresh: ones^T x again, not twice it, accumulated)
    assert torch.equal(dense.weight.grad, grad)
    policy._trainer(sparse, x, None)()
    assert sparse.weight.values.grad is not None and not torch.equal(sparse.weight.values.detach(), v0)


@pytest.mark.parametrize("engine", ["auto", "sparse"])
def test_apply_engine_refuses_meta_tensors_and_an_empty_example_by_name(engine):
    """A meta layer, mask or example (no values to count, time or keep) is refused naming it, as
    sparsify_ does (it was torch's 'unknown device type for autocast' or '.item() on meta tensors'),
    and so is an empty example."""
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(200, 200))
    real, mask = nn.Sequential(nn.Linear(200, 200)), torch.rand(200, 200) > 0.9
    with pytest.raises(ValueError, match="layer '0': its weight is a meta tensor .*materialize the layer first"):
        apply_engine(meta, {"0": mask}, engine)
    with pytest.raises(ValueError, match="layer '0': its mask is a meta tensor: pass a mask holding its values"):
        apply_engine(real, {"0": mask.to("meta")}, engine)
    with pytest.raises(ValueError, match="example is a meta tensor .*: pass a batch of the model's input"):
        apply_engine(real, {"0": mask}, engine, example=torch.randn(2, 200, device="meta"))
    # (an empty example: the probe's error named input_shape, an argument the caller never passed)
    with pytest.raises(ValueError, match=r"^example is empty, shape \(0, 200\): pass a batch of the model's input$"):
        apply_engine(real, {"0": mask}, engine, example=torch.randn(0, 200))
    if engine == "auto":  # (sparse_is_faster itself, on a meta layer: autocast's 'unknown device type' before)
        with pytest.raises(ValueError, match="^layer's weight is a meta tensor .*materialize the layer first"):
            sparse_is_faster(meta[0], mask, (2, 200))
    assert type(real[0]) is nn.Linear  # (nothing converted)


def test_auto_engine_decision_is_keyed_by_the_cpu_kernels_build_and_width(monkeypatch, tmp_path):
    """A decision timed on other C++ kernels (a rebuilt extension, SPARSETRAIN_VEC_BYTES=16: another
    speed) or another CPU generation ("AMD EPYC" alone names several) is timed again."""
    from sparsetrain.engine import policy
    from sparsetrain.engine.extension import _C
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(policy, "_DECISIONS", {})
    calls = []
    monkeypatch.setattr(policy, "_step_seconds", lambda layer, x, step: calls.append(1) or 1.0)
    layer, mask = nn.Linear(64, 64), torch.rand(64, 64) > 0.9
    machine = policy._machine()
    assert f"simd {_C.simd_bytes()}" in machine and "kernels " in machine and "torch " in machine
    assert policy._machine(False) == machine.split("|kernels ")[0]  # (Triton's decisions: no C++ build)
    policy.sparse_is_faster(layer, mask, (8, 64), reps=1)
    for other in (machine.replace(f"simd {_C.simd_bytes()}", "simd 16"), machine.replace("kernels ", "kernels 1")):
        monkeypatch.setattr(policy, "_machine", lambda cpp=True, other=other: other)
        n = len(calls)
        policy.sparse_is_faster(layer, mask, (8, 64), reps=1)
        assert len(calls) == n + 4  # (timed again: a warm-up and a step, dense and sparse)


def test_auto_engine_cache_ignores_non_bool_entries_and_leaves_no_temp_file(monkeypatch, tmp_path):
    """bool(v) read the cache's "false" as True (sparse); a failed write (disk full) left its
    .engine_auto.* temporary file behind."""
    import errno
    import os
    from sparsetrain.engine import policy
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(policy, "_DECISIONS", {})
    (tmp_path / "engine_auto.json").write_text(json.dumps({"a": "false", "b": False, "c": True, "d": 1}))
    with pytest.warns(UserWarning, match=r"ignoring 2 entries that are not true/false \(e.g. 'a'\): measured again"):
        policy._load_decisions()
    assert policy._DECISIONS == {"b": False, "c": True}

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(policy.os, "replace", full)
    monkeypatch.setattr(policy, "_UNWRITABLE", set(), raising=False)
    with pytest.warns(UserWarning, match="No space left on device"):
        policy._save_decision("e", True)  # (the decision stays in memory: no error)
    assert sorted(os.listdir(tmp_path)) == ["engine_auto.json"]


def test_auto_engine_cache_removes_a_killed_writer_s_temporary_file(monkeypatch, tmp_path):
    """A process killed while it wrote the decision cache left its .engine_auto.* temporary file in the cache
    folder for good (one more per kill: nothing removed them). A write now removes those whose writer died,
    told by the writer's lock (engine/writer_lock.py, as for a run's files): a living writer's stays, a
    killed one's goes, and so do the older unlocked names (`.engine_auto.<random>`) no living writer holds."""
    import os
    import signal
    import subprocess
    import sys
    from sparsetrain.engine import policy
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    stuck = ("import json, time\nfrom sparsetrain.engine import policy\n"
             "def dump(obj, f, **k):\n    f.write('{\"hal'); f.flush(); print('writing', flush=True); time.sleep(120)\n"
             "policy.json.dump = dump\npolicy._save_decision('x', True)")
    writer = subprocess.Popen([sys.executable, "-c", stuck], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "SPARSETRAIN_CACHE_DIR": str(tmp_path)})
    try:
        assert writer.stdout.readline() == "writing\n"
        (its,) = [n for n in os.listdir(tmp_path) if n.startswith(f".engine_auto.{writer.pid}.")]
        (tmp_path / ".engine_auto.k3j4h5g6").write_text("{")  # (an older writer's, killed: no lock, no pid)
        (tmp_path / "notes.txt").write_text("mine")
        policy._save_decision("a", True)
        assert sorted(os.listdir(tmp_path)) == sorted([its, "engine_auto.json", "notes.txt"])  # (a living writer's stays)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    policy._save_decision("b", False)
    assert sorted(os.listdir(tmp_path)) == ["engine_auto.json", "notes.txt"]
    assert json.loads((tmp_path / "engine_auto.json").read_text()) == {"a": True, "b": False}


def test_auto_engine_measures_a_layer_called_with_its_input_by_keyword(monkeypatch, tmp_path):
    """The example pass read each measured layer's input as its first positional argument: a model
    calling self.fc(input=x) (nn.Linear's argument name) failed with IndexError."""
    from sparsetrain.engine import policy
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(policy, "_DECISIONS", {})
    timed = []
    monkeypatch.setattr(policy, "_step_seconds",
                        lambda layer, x, step: timed.append(tuple(x.shape)) or (1.0 if is_sparse(layer) else 2.0))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(160, 150), nn.Linear(150, 4)

        def forward(self, x):
            return self.head(input=self.fc(input=x).relu())
    torch.manual_seed(0)
    model = M()
    ref = copy.deepcopy(model)
    mask = torch.rand(150, 160) > 0.9
    zero_pruned_(ref, {"fc": mask})
    rest = apply_engine(model, {"fc": mask}, "auto", fuse=False, example=torch.randn(3, 160))
    assert is_sparse(model.fc) and rest == {} and timed == [(3, 160)] * 8  # (warm-up and 3 steps each)
    x = torch.randn(5, 160)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_auto_engine_example_pass_is_one_eval_forward_that_the_models_hooks_see(monkeypatch, tmp_path):
    """The example batch goes through the model once, in eval mode (running statistics untouched, the
    training mode restored after), as the README says: the model's own forward hooks see that one pass;
    the timing runs hook-free copies, which they never see."""
    from sparsetrain.engine import policy
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(policy, "_DECISIONS", {})
    monkeypatch.setattr(policy, "_step_seconds", lambda layer, x, step: 1.0 if is_sparse(layer) else 2.0)
    model = nn.Sequential(nn.Linear(160, 150), nn.BatchNorm1d(150), nn.ReLU(), nn.Linear(150, 4)).train()
    seen = []
    model[0].register_forward_hook(lambda m, args, out: seen.append((tuple(args[0].shape), model[1].training)))
    stats = copy.deepcopy(model[1].state_dict())
    apply_engine(model, {"0": torch.rand(150, 160) > 0.9}, "auto", example=torch.randn(3, 160))
    assert is_sparse(model[0]) and seen == [((3, 160), False)]  # (once, in eval mode, the probe's steps unseen)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, stats[k]), k


def test_apply_engine_refuses_a_non_tensor_example_and_agree_results_that_are_not_bools(monkeypatch, tmp_path):
    """A non-tensor example failed with AttributeError ('tuple' object has no attribute 'is_inference')
    in the example pass; an `agree` returning "false" for a layer made it sparse (a truthy string),
    one returning a list failed with AttributeError."""
    from sparsetrain.engine import policy
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(policy, "_DECISIONS", {})
    monkeypatch.setattr(policy, "_step_seconds", lambda layer, x, step: 1.0 if is_sparse(layer) else 2.0)
    torch.manual_seed(0)
    model, mask = nn.Sequential(nn.Linear(200, 200)), torch.rand(200, 200) > 0.9
    for example in ((torch.randn(3, 200),), [[1.0] * 200]):
        with pytest.raises(TypeError, match=r"^example must be a torch.Tensor \(a batch of the model's input\) or "
                                            rf"None, got {type(example).__name__}$"):
            apply_engine(model, {"0": mask}, "auto", example=example)
    with pytest.raises(TypeError, match="^agree must be a callable"):
        apply_engine(model, {"0": mask}, "auto", example=torch.randn(3, 200), agree={"0": False})
    for agree, got in ((lambda faster: {n: "false" for n in faster}, "'0': 'false'"),
                       (lambda faster: list(faster), "list")):
        with pytest.raises(TypeError, match=rf"^agree must return a dict {{layer name: bool}}, got {got}$"):
            apply_engine(model, {"0": mask}, "auto", example=torch.randn(3, 200), agree=agree)
    assert type(model[0]) is nn.Linear  # (nothing converted)
    rest = apply_engine(model, {"0": mask}, "auto", example=torch.randn(3, 200), agree=lambda f: {n: False for n in f})
    assert type(model[0]) is nn.Linear and set(rest) == {"0"}  # (rank 0 said dense, though sparse won here)


def test_sparse_is_faster_checks_the_mask_and_the_input_shape_against_the_layer(monkeypatch, tmp_path):
    """The mask was not checked: None or a list failed with AttributeError, and one of another shape
    with as many nonzeros as a cached decision's took that decision without a word; an input_shape
    that does not fit the layer failed inside torch's GEMM ("mat1 and mat2 shapes cannot be multiplied")."""
    from sparsetrain.engine import policy
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(policy, "_DECISIONS", {})
    calls = []
    monkeypatch.setattr(policy, "_step_seconds", lambda layer, x, step: calls.append(1) or 1.0)
    layer, mask = nn.Linear(64, 64), torch.rand(64, 64) > 0.9
    policy.sparse_is_faster(layer, mask, (8, 64), reps=1)
    assert len(calls) == 4
    other = torch.zeros(32, 128, dtype=torch.bool)
    other.view(-1)[:int(mask.sum())] = True  # (as many nonzeros: the same cache key before)
    for bad, got, err in ((None, "NoneType", TypeError), (mask.tolist(), "list", TypeError),  # (a wrong type: a
                          (mask.float(), r"torch.float32 \(64, 64\)", TypeError),  # ValueError before 2026-12-06)
                          (other, r"torch.bool \(32, 128\)", ValueError)):
        with pytest.raises(err, match=rf"^mask must be a bool tensor of the layer's weight shape \(64, 64\), "
                                      rf"got {got}$"):
            policy.sparse_is_faster(layer, bad, (8, 64), reps=1)
    with pytest.raises(ValueError, match=r"^input_shape must be \[\.\.\., 64\] \(in_features\) for this layer, "
                                         r"got \(8, 32\)$"):
        policy.sparse_is_faster(layer, mask, (8, 32), reps=1)
    conv, cmask = nn.Conv2d(4, 8, 3), torch.rand(8, 4, 3, 3) > 0.5
    for shape in ((2, 3, 8, 8), (2, 1, 4, 8, 8), (8, 8)):
        with pytest.raises(ValueError, match=r"^input_shape must be \[N, 4, H, W\] or \[4, H, W\] \(in_channels\)"):
            policy.sparse_is_faster(conv, cmask, shape, reps=1)
    # (a map smaller than the kernel, with its padding: torch's RuntimeError from the probe's forward before)
    for c, shape, msg in ((conv, (2, 4, 2, 8), r"\(2, 4, 2, 8\) is smaller than this layer's kernel \(3, 3\) with its "
                           r"padding \(0, 0\)"),
                          (nn.Conv2d(4, 8, (1, 5), padding=(0, 1)), (4, 1, 2), r"\(4, 1, 2\) is smaller than this "
                           r"layer's kernel \(1, 5\) with its padding \(0, 1\)")):
        with pytest.raises(ValueError, match=rf"^input_shape {msg}: each of H and W plus twice the padding must be"):
            policy.sparse_is_faster(c, c.weight.detach() != 0, shape, reps=1)
    assert len(calls) == 4  # (nothing timed for a refused call)

    def timed(sparse_s, dense_s):  # (the decision is the faster side's: 'in (True, False)' before, any answer passed)
        monkeypatch.setattr(policy, "_step_seconds",
                            lambda layer, x, step: calls.append(1) or (sparse_s if is_sparse(layer) else dense_s))
    timed(1.0, 2.0)
    assert policy.sparse_is_faster(conv, cmask, (4, 8, 8), reps=1) is True and len(calls) == 8
    timed(2.0, 1.0)  # (another input shape: timed anew)
    assert policy.sparse_is_faster(conv, cmask, (2, 4, 8, 8), reps=1) is False and len(calls) == 12


def test_auto_engine_cache_dir_expands_a_tilde_and_an_unwritable_one_is_told_once(monkeypatch, tmp_path):
    """SPARSETRAIN_CACHE_DIR="~/cache" (no shell to expand it: a .env file, Ray's env_vars) made a folder
    named "~" in the working directory, one cache per cwd; an unwritable cache kept decisions per
    process without a word (runs in parallel or resumed could decide differently). A "~user" naming no
    home folder is refused by name."""
    import warnings
    from sparsetrain.engine import policy
    monkeypatch.setattr(policy, "_step_seconds", lambda layer, x, step: 1.0 if is_sparse(layer) else 2.0)
    monkeypatch.setattr(policy, "_UNWRITABLE", set(), raising=False)
    layer, mask = nn.Linear(64, 64), torch.rand(64, 64) > 0.9
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", "~/cache")
    monkeypatch.setattr(policy, "_DECISIONS", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert policy.sparse_is_faster(layer, mask, (8, 64), reps=1) is True
    assert list(json.loads((home / "cache" / "engine_auto.json").read_text()).values()) == [True]
    assert list(cwd.iterdir()) == []
    # (a user with no home folder: expanduser leaves it, and a folder "~nouser" was made in the cwd)
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", "~nosuchuser-sparsetrain/cache")
    monkeypatch.setattr(policy, "_DECISIONS", {})
    with pytest.raises(ValueError, match=r"^SPARSETRAIN_CACHE_DIR must be a folder, got '~nosuchuser-sparsetrain/"
                                         r"cache': '~' names no home folder here$"):
        policy.sparse_is_faster(layer, mask, (8, 64), reps=1)
    assert list(cwd.iterdir()) == []
    (tmp_path / "afile").write_text("")  # (a file where the cache folder should be: nothing can be written there)
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    for other in (mask, ~mask):  # (two decisions to write: told once)
        monkeypatch.setattr(policy, "_DECISIONS", {})
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert policy.sparse_is_faster(layer, other, (8, 64), reps=1) is True
        assert [str(w.message) for w in seen if "decision cache" in str(w.message)] == (
            [] if other is not mask else [f"cannot write the engine's decision cache {tmp_path / 'afile' / 'cache'}"
                                          f"/engine_auto.json ([Errno 20] Not a directory: "
                                          f"'{tmp_path / 'afile' / 'cache'}'): --engine auto's decisions stay in "
                                          f"this process (runs in parallel, or resumed, may decide differently); "
                                          f"set SPARSETRAIN_CACHE_DIR to a writable folder"])


def test_auto_engine_times_frozen_layers_as_training_runs_them(monkeypatch, tmp_path):
    """A frozen pruned layer (requires_grad False: a fine-tuned model's backbone) failed the probe with
    autograd's "element 0 of tensors does not require grad" (the first layer: no gradient to compute
    at all) or an AttributeError on its missing weight gradient; training runs its forward (and the
    input's gradient) alone, so the probe does, and the decision is keyed apart from a trained layer's."""
    from sparsetrain.engine import policy
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(policy, "_DECISIONS", {})
    timed = []

    def seconds(layer, x, step):  # (the real step runs: sparse wins)
        step()
        timed.append(type(layer).__name__)
        return 1.0 if is_sparse(layer) else 2.0
    monkeypatch.setattr(policy, "_step_seconds", seconds)
    for frozen in ("0", "2"):  # (the first layer: no gradient at all; the second: its input's only)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(160, 150), nn.ReLU(), nn.Linear(150, 140))
        model.get_submodule(frozen).requires_grad_(False)
        masks = {"0": torch.rand(150, 160) > 0.9, "2": torch.rand(140, 150) > 0.9}
        ref = copy.deepcopy(model)
        zero_pruned_(ref, masks)
        rest = apply_engine(model, masks, "auto", fuse=False, example=torch.randn(3, 160))
        assert rest == {} and is_sparse(model[0]) and is_sparse(model[2])
        assert not model.get_submodule(frozen).weight.requires_grad
        x = torch.randn(5, 160)
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    assert sum(k.endswith("'frozen')") for k in policy._DECISIONS) == 2 and len(policy._DECISIONS) == 4


def test_auto_engine_on_a_filesystem_that_cannot_lock_still_decides(monkeypatch, tmp_path):
    """The decision cache's lock on a filesystem that cannot lock (flock's ENOLCK: NFS without lockd) was an
    OSError traceback at the first measured layer (only "held by another process" was handled). It is
    decided without the lock now, as where fcntl is missing, with no warning, and cached as before."""
    import errno
    import fcntl
    import os
    import warnings
    from sparsetrain.engine import policy
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(policy, "_DECISIONS", {})
    monkeypatch.setattr(policy, "_step_seconds", lambda layer, x, step: 1.0 if is_sparse(layer) else 2.0)
    real = fcntl.flock

    def cannot_lock(fd, op):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == "engine_auto.json.lock":
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", cannot_lock)
    layer, mask = nn.Linear(64, 64), torch.rand(64, 64) > 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert policy.sparse_is_faster(layer, mask, (8, 64), reps=1) is True
    assert list(json.loads((tmp_path / "engine_auto.json").read_text()).values()) == [True]


def test_auto_engine_waits_for_a_held_cache_lock_only_so_long(monkeypatch, tmp_path):
    """The decision cache's lock was taken with a blocking flock: a run holding it stopped (Ctrl-Z, a
    debugger) or hung kept every other run of the machine waiting at its first layer for good. It waits
    LOCK_WAIT_S, then measures the layer alone and says so, once: the next layers, while it stays held, do not wait
    (each waited as long again before 2026-12-07); a lock freed in time is taken as before."""
    import fcntl
    import threading
    import warnings
    from sparsetrain.engine import policy
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(policy, "_DECISIONS", {})
    monkeypatch.setattr(policy, "_step_seconds", lambda layer, x, step: 1.0 if is_sparse(layer) else 2.0)
    monkeypatch.setattr(policy, "LOCK_WAIT_S", 0.3)
    layer, mask = nn.Linear(64, 64), torch.rand(64, 64) > 0.9
    holder = open(tmp_path / "engine_auto.json.lock", "a")  # (another open file: flock refuses it as another process's)
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
    monkeypatch.setattr(policy, "_WAITED", {})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert policy.sparse_is_faster(layer, mask, (8, 64), reps=1) is True
        sleeps, sleep = [], policy.time.sleep
        monkeypatch.setattr(policy.time, "sleep", lambda t: (sleeps.append(t), sleep(t)))
        assert policy.sparse_is_faster(layer, mask.flip(0), (8, 64), reps=1) is True  # (another layer: measured)
        assert sleeps == []  # (no wait: it stays held)
    assert [str(w.message) for w in seen] == [f"{tmp_path / 'engine_auto.json.lock'} stayed locked by another process "
                                              "for 0.3 s: the layers are measured without it while it stays so (runs "
                                              "in parallel may decide differently)"]
    monkeypatch.setattr(policy, "_DECISIONS", {})
    monkeypatch.setattr(policy, "LOCK_WAIT_S", 30.0)
    threading.Timer(0.2, lambda: fcntl.flock(holder.fileno(), fcntl.LOCK_UN)).start()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert policy.sparse_is_faster(layer, ~mask, (8, 64), reps=1) is True
    assert sorted(json.loads((tmp_path / "engine_auto.json").read_text()).values()) == [True, True]
    holder.close()


@pytest.mark.parametrize("with_example", [False, True])
def test_auto_engine_keeps_a_half_precision_cpu_model_dense(monkeypatch, tmp_path, with_example):
    """A bf16 model on CPU under --engine auto had its 99%-sparse layers converted (by the thresholds, or
    the probe failed inside its first timing), and the C++ kernels, fp32/fp64 only, refused its first
    forward ("values must be float32 or float64"); auto keeps such layers dense (their masks returned
    to apply as dense layers'), and converts the same model in float32."""
    from sparsetrain.engine import policy
    monkeypatch.setenv("SPARSETRAIN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(policy, "_DECISIONS", {})
    monkeypatch.setattr(policy, "_step_seconds", lambda layer, x, step: 1.0 if is_sparse(layer) else 2.0)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 8 * 8, 256))
    masks = {"0": torch.rand(64, 32, 3, 3) > 0.99, "3": torch.rand(256, 4096) > 0.99}
    x = torch.randn(4, 32, 8, 8)
    for dtype, sparse in ((torch.bfloat16, False), (torch.float32, True)):
        model = copy.deepcopy(base).to(dtype)
        left = apply_engine(model, masks, "auto", example=x.to(dtype) if with_example else None)
        assert [is_sparse(model[i]) for i in (0, 3)] == [sparse, sparse]
        assert sorted(left) == ([] if sparse else ["0", "3"])
        with torch.no_grad():
            zero_pruned_(model, left)
            ref = dense_linear(F.relu(dense_conv2d(x, base[0].weight, masks["0"], base[0].bias, padding=1)).flatten(1),
                               base[3].weight, masks["3"], base[3].bias)
            torch.testing.assert_close(model(x.to(dtype)).float(), ref, **({} if sparse else dict(atol=0.1, rtol=0.05)))


def test_compute_mask_is_the_mask_a_round_gives_one_layer():
    """rule.compute_mask(t, default_mask, rate), as torch.nn.utils.prune's BasePruningMethod.compute_mask: the
    mask global_prune / block_prune (one layer, or scope="layer") and filter_prune give that layer's weight,
    within default_mask (masks only shrink), the tensor unchanged; the rules had no such per-tensor method."""
    from sparsetrain.prune import block_prune, filter_prune, make_rule
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 36), nn.ReLU(), nn.Linear(36, 20).double(), nn.ReLU(), nn.Linear(20, 5))
    with torch.no_grad():
        model[0].weight[:, :6] = 0.5  # exact ties
    masks = global_prune(copy.deepcopy(model), {}, 0.3, scope="layer")
    for name, prune, rate in (("unstructured", lambda m, mk, r: global_prune(m, mk, r, scope="layer"), 0.3),
                              ("block", lambda m, mk, r: block_prune(m, mk, r, 16, scope="layer"), 0.4)):
        rule, ref = make_rule(name, block=16), copy.deepcopy(model)
        want = prune(ref, masks, rate)
        for n, m in prunable_layers(model):
            w = m.weight.detach().clone()
            got = rule.compute_mask(m.weight, masks[n], rate)
            assert got.dtype == torch.bool and torch.equal(got, want[n]), (name, n)
            assert not bool((got & ~masks[n]).any()) and torch.equal(m.weight, w)
            assert torch.equal(rule.compute_mask(w, None, rate),  # (None: all kept)
                               rule.compute_mask(w, torch.ones_like(w, dtype=torch.bool), rate))
    one = nn.Sequential(nn.Linear(40, 36))
    assert torch.equal(make_rule("unstructured").compute_mask(one[0].weight, None, 0.5),
                       global_prune(copy.deepcopy(one), {}, 0.5)["0"])
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    trial = copy.deepcopy(conv)
    filter_prune(trial, 0.5)
    got = make_rule("filter").compute_mask(conv[0].weight, None, 0.5)
    rows = got.reshape(8, -1)
    assert bool((rows.all(1) | ~rows.any(1)).all())  # whole filters
    assert torch.equal(rows.all(1).nonzero().flatten(), trial.kept_channels["0"])
    again = make_rule("filter").compute_mask(conv[0].weight, got, 0.5)  # 4 filters left: 2 more go
    assert int(again.reshape(8, -1).all(1).sum()) == 2 and not bool((again & ~got).any())


def test_compute_mask_refuses_bad_arguments_by_name():
    from sparsetrain.prune import make_rule
    w = torch.randn(32, 32)
    for name in ("unstructured", "block", "filter"):
        rule = make_rule(name, block=16)
        for bad, cls, match in ((torch.ones(32, 32), TypeError, "default_mask must be None or a bool tensor"),
                                (torch.ones(32, 31, dtype=torch.bool), ValueError, "default_mask must be"),
                                ([[True]], TypeError, "default_mask must be")):
            with pytest.raises(cls, match=match):
                rule.compute_mask(w, bad, 0.5)
        with pytest.raises(TypeError, match="weight must be a floating-point"):
            rule.compute_mask(w.long(), None, 0.5)
        with pytest.raises(TypeError, match="rate must be a number"):
            rule.compute_mask(w, None, "0.5")
        with pytest.raises(ValueError, match="rate must be a number"):
            rule.compute_mask(w, None, 1.0)
        bad = w.clone()
        bad[1, 2] = float("inf")
        with pytest.raises(ValueError, match="t has inf entries where default_mask keeps"):
            rule.compute_mask(bad, None, 0.5)
        mk = torch.ones(32, 32, dtype=torch.bool)
        mk[1, 2] = False  # an inf under a pruned position: a pruned weight
        assert torch.equal(rule.compute_mask(bad, mk, 0.5), rule.compute_mask(bad.masked_fill(~mk, 0), mk, 0.5))
        bad[1, 2] = float("nan")
        with pytest.raises(ValueError, match="t has NaN entries where default_mask keeps"):
            rule.compute_mask(bad, None, 0.5)
    for name in ("block", "filter"):
        with pytest.raises(ValueError, match="t must be a weight with"):
            make_rule(name, block=16).compute_mask(torch.randn(0) if name == "filter" else torch.randn(8), None, 0.5)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_pruning_a_layer_to_empty_left_unloaded_is_refused_saying_to_load(scope):
    """to_empty() leaves a sparse layer's index uninitialised: shrink_ failed inside on it (an IndexError), global_prune
    in the C++ selection ("crow_indices[0] must be 0", or a mask of garbage), masks_of / model_sparsity / can_prune drew
    a mask of garbage. Each is refused with a ValueError saying to load a state_dict (global_prune naming the layer),
    the layer untouched; after a load, global_prune's masks and outputs equal the source's (the dense masked
    reference)."""
    from sparsetrain.testing import dense_linear, random_mask
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    masks = {"0": random_mask((6, 8), 0.5), "2": random_mask((4, 6), 0.5)}
    src = copy.deepcopy(dense)
    sparsetrain.sparsify_(src, masks)
    model = copy.deepcopy(src).to_empty(device="cpu")
    load = "load a state_dict"
    keep = torch.ones(model[0].weight.nnz, dtype=torch.bool)
    keep[0] = False
    with pytest.raises(ValueError, match=load):
        model[0].weight.shrink_(keep)
    with pytest.raises(ValueError, match=f"layer '0': .*{load}"):
        global_prune(model, {}, 0.5, scope=scope)
    for call in (lambda: global_prune(model, masks, 0.5, scope=scope), lambda: masks_of(model),
                 lambda: model_sparsity(model), lambda: sparsetrain.prune.make_rule("unstructured").can_prune(model, {})):
        with pytest.raises(ValueError, match=load):
            call()
    assert model[0].weight.nnz == keep.numel()  # (untouched)
    model.load_state_dict(src.state_dict())
    got, want = global_prune(model, {}, 0.5, scope=scope), global_prune(src, {}, 0.5, scope=scope)
    assert got.keys() == want.keys() and all(torch.equal(masks_of(model)[n], masks_of(src)[n]) for n in want)
    x = torch.randn(3, 8)
    pruned = masks_of(src)
    ref = dense_linear(torch.relu(dense_linear(x, dense[0].weight, pruned["0"], dense[0].bias)), dense[2].weight,
                       pruned["2"], dense[2].bias)
    torch.testing.assert_close(model(x), ref)
