"""The shared references themselves (sparsetrain/testing.py), against hand formulas: every kernel test
trusts them, so a reference that forgot the mask, or a random_mask with another count of zeros or no
empty rows, would let those tests pass on what they were meant to catch."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetrain.nn import SparseLinear
from sparsetrain.testing import (assert_layer_matches, dense_conv2d, dense_linear, dense_linear_replicated,
                                 mask_weight_, model_masks, random_mask, reference_grads)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (4, 3, 3, 3), (5, 1, 1, 1)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.99, 1.0])
def test_random_mask_prunes_exactly_the_asked_count_and_the_empty_rows(shape, sparsity):
    n = torch.Size(shape).numel()
    g = torch.Generator().manual_seed(3)
    m = random_mask(shape, sparsity, generator=g)
    assert m.dtype == torch.bool and m.shape == shape
    assert int((~m).sum()) == int(round(sparsity * n))  # (the docstring's count, by hand)
    assert torch.equal(m, random_mask(shape, sparsity, generator=torch.Generator().manual_seed(3)))  # (seeded)
    e = random_mask(shape, sparsity, generator=torch.Generator().manual_seed(3), empty_rows=1)
    assert not e[0].any() and torch.equal(e[1:], m[1:])  # (row 0 pruned on top of the same draw)
    if 0 < int(round(sparsity * n)) < n:  # (a random draw: another seed, another pattern)
        assert any(not torch.equal(m, random_mask(shape, sparsity, generator=torch.Generator().manual_seed(s)))
                   for s in range(4, 9))


def test_dense_references_apply_the_mask_by_hand():
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, dtype=torch.float64, generator=g) for s in ((3, 5), (4, 5), (4,)))
    m = random_mask((4, 5), 0.5, generator=g)
    hand = torch.tensor([[sum(float(x[i, k] * w[o, k]) for k in range(5) if m[o, k]) + float(b[o]) for o in range(4)]
                         for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(dense_linear(x, w, m, b), hand, rtol=1e-12, atol=1e-12)
    # the replicated head: each input feature repeated r times, then the masked linear
    r, mr = 3, random_mask((4, 6), 0.5, generator=g)
    xr, wr = (torch.randn(s, dtype=torch.float64, generator=g) for s in ((2, 2), (4, 6)))
    hand = torch.tensor([[sum(float(xr[i, k // r] * wr[o, k]) for k in range(6) if mr[o, k]) for o in range(4)]
                         for i in range(2)], dtype=torch.float64)
    torch.testing.assert_close(dense_linear_replicated(xr, wr, mr, repeat=r), hand, rtol=1e-12, atol=1e-12)
    # the conv at stride 2, padding 1, summed over the unpruned taps by hand
    xc, wc, bc = (torch.randn(s, dtype=torch.float64, generator=g) for s in ((1, 2, 5, 4), (3, 2, 3, 3), (3,)))
    mc = random_mask((3, 2, 3, 3), 0.6, generator=g)
    xp = F.pad(xc, (1, 1, 1, 1))
    y = dense_conv2d(xc, wc, mc, bc, stride=2, padding=1)
    assert y.shape == (1, 3, 3, 2)
    for o in range(3):
        for i in range(3):
            for j in range(2):
                want = float(bc[o]) + sum(float(xp[0, c, 2 * i + u, 2 * j + v] * wc[o, c, u, v]) for c in range(2)
                                          for u in range(3) for v in range(3) if mc[o, c, u, v])
                assert abs(float(y[0, o, i, j]) - want) < 1e-12


def test_reference_grads_are_the_masked_layer_gradients_by_hand():
    g = torch.Generator().manual_seed(1)
    x, w, b, gy = (torch.randn(s, dtype=torch.float64, generator=g) for s in ((3, 5), (4, 5), (4,), (3, 4)))
    m = random_mask((4, 5), 0.5, generator=g)
    y, dx, dw, db = reference_grads(dense_linear, x, w, m, b, gy)
    torch.testing.assert_close(y, x @ (w * m).T + b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, gy @ (w * m), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, (gy.T @ x) * m, rtol=1e-12, atol=1e-12)  # (zero at the pruned positions)
    torch.testing.assert_close(db, gy.sum(0), rtol=1e-12, atol=1e-12)
    assert x.grad is None and w.grad is None  # (on copies: the caller's tensors untouched)


def test_assert_layer_matches_fails_on_a_wrong_layer():
    """The comparison helper of the kernel tests must fail when the layer is wrong, not only pass when right."""
    torch.manual_seed(2)
    lin = nn.Linear(6, 4).double()
    m = random_mask((4, 6), 0.5, generator=torch.Generator().manual_seed(2))
    tol = dict(rtol=1e-10, atol=1e-10)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert_layer_matches(SparseLinear.from_dense(lin, m), lin, m, dense_linear, x, torch.Generator().manual_seed(0),
                         tol)
    wrong = SparseLinear.from_dense(lin, m)
    with torch.no_grad():
        wrong.bias[0] += 1e-6  # (one output column off by 1e-6)
    with pytest.raises(AssertionError):
        assert_layer_matches(wrong, lin, m, dense_linear, x.detach().requires_grad_(), torch.Generator().manual_seed(0),
                             tol)
    with pytest.raises(AssertionError):  # (the full mask is not the mask: the pruned weights count in the reference)
        assert_layer_matches(SparseLinear.from_dense(lin, m), lin, torch.ones_like(m), dense_linear,
                             x.detach().requires_grad_(), torch.Generator().manual_seed(0), tol)


def test_mask_weight_and_model_masks():
    torch.manual_seed(4)
    lin = nn.Linear(5, 3).double()
    w, m = lin.weight.detach().clone(), random_mask((3, 5), 0.6, generator=torch.Generator().manual_seed(4))
    mask_weight_(lin, m)
    x = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(lin(x), dense_linear(x, w, m, lin.bias), rtol=1e-12, atol=1e-12)
    lin(x).sum().backward()
    grad = lin.parametrizations.weight.original.grad
    assert not grad[~m].any() and grad[m].ne(0).all()  # (pruned weights get no gradient; x is dense)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4))
    masks = model_masks(model, 0.5, seed=7)
    assert sorted(masks) == ["0", "3"] and [masks[k].shape for k in ("0", "3")] == [(3, 2, 3, 3), (4, 12)]
    g = torch.Generator().manual_seed(7)  # (drawn in module order from one generator seeded `seed`)
    assert all(torch.equal(masks[k], random_mask(s, 0.5, generator=g))
               for k, s in (("0", (3, 2, 3, 3)), ("3", (4, 12))))


def test_zero_pruned_zeroes_the_masked_weights_in_place_and_is_exported():
    # the dense masked reference model the tests and bench scripts build: each named layer's weight * mask,
    # in place under no_grad (weights that require grad), biases and unnamed layers untouched
    import sparsetrain.testing as testing
    assert "zero_pruned_" in testing.__all__  # (used by the tests and the benchmarks: `import *` brought it not)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4), nn.Linear(4, 2))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    masks = model_masks(model, 0.5, seed=2)
    del masks["4"]
    weight = model[0].weight
    assert testing.zero_pruned_(model, masks) is model and model[0].weight is weight  # (in place)
    for k, v in model.state_dict().items():
        name = k.rsplit(".", 1)[0]
        want = torch.where(masks[name], before[k], 0.0) if k.endswith("weight") and name in masks else before[k]
        assert torch.equal(v, want), k
    assert model[0].weight.requires_grad and model[0].weight.grad is None
