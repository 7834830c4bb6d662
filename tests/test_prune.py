"""magnitude_threshold and csr_prune against a sort-based NumPy/PyTorch reference."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from sparsetrain.engine import ops
from sparsetrain.engine.formats import CSR
from sparsetrain.testing import random_mask


def _reference_prune_sets(tensors, masks, fraction):
    """Sort survivors by (|w|, tensor position, flat index); the first floor(f*n) are pruned."""
    keys = []
    for ti, (t, m) in enumerate(zip(tensors, masks)):
        a = np.abs(t.detach().numpy().ravel()).astype(np.float64)
        mm = np.ones_like(a, dtype=bool) if m is None else m.numpy().ravel()
        for j in np.nonzero(mm)[0]:
            keys.append((a[j], ti, j))
    keys.sort()
    k = math.floor(fraction * len(keys))
    return {(ti, j) for _, ti, j in keys[:k]}, (keys[k - 1][0] if k else 0.0)


def _apply(tensors, masks, thr, ties):
    pruned, used = set(), 0
    for ti, (t, m) in enumerate(zip(tensors, masks)):
        a = t.detach().abs().double().numpy().ravel()
        mm = np.ones_like(a, dtype=bool) if m is None else m.numpy().ravel()
        for j in np.nonzero(mm)[0]:
            if a[j] < thr or (a[j] == thr and used < ties):
                used += a[j] == thr
                pruned.add((ti, j))
    return pruned


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_global_threshold_exact_count(fraction, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(7, 5, generator=g, dtype=dtype), torch.randn(13, generator=g, dtype=dtype),
               torch.randn(3, 2, 2, generator=g, dtype=dtype)]
    masks = [random_mask((7, 5), 0.4, generator=g), None, random_mask((3, 2, 2), 0.5, generator=g)]
    thr, ties = ops.magnitude_threshold(tensors, fraction, masks)
    ref_set, ref_thr = _reference_prune_sets(tensors, masks, fraction)
    assert thr == pytest.approx(ref_thr, rel=0, abs=0)
    assert _apply(tensors, masks, thr, ties) == ref_set


def test_a_fraction_just_under_one_never_prunes_everything():
    """floor(fraction * n) <= n - 1 for a fraction under 1; the float allowance (1 + 1e-12) made 1 - 1e-13
    prune all 10 weights of a layer (and global_prune then kept none)."""
    from sparsetrain.prune import global_prune
    from sparsetrain.prune.base import count_of
    t = [torch.arange(1.0, 11.0)]
    for fraction, k in ((1 - 1e-13, 9), (0.999, 9), (1.0, 10), (0.7, 7)):
        thr, ties = ops.magnitude_threshold(t, fraction)
        assert len(_apply(t, [None], thr, ties)) == k == count_of(fraction, 10)
    masks = global_prune(torch.nn.Sequential(torch.nn.Linear(10, 1)), {}, 1 - 1e-13)
    assert int(masks["0"].sum()) == 1
    assert count_of(0.5, 0) == 0


def test_ties_are_broken_by_list_then_flat_order():
    # ten equal magnitudes (signs differ) across two tensors, prune 30%: the first three in order
    tensors = [torch.tensor([1.0, -1.0, 1.0, 1.0]), torch.tensor([-1.0, 1.0, 1.0, 1.0, 1.0, 1.0])]
    thr, ties = ops.magnitude_threshold(tensors, 0.3)
    assert (thr, ties) == (1.0, 3)
    assert _apply(tensors, [None, None], thr, ties) == {(0, 0), (0, 1), (0, 2)}
    # and with smaller values below the tie
    tensors = [torch.tensor([0.5, 2.0, 2.0]), torch.tensor([2.0, 0.1])]
    thr, ties = ops.magnitude_threshold(tensors, 0.6)  # k = 3: 0.1, 0.5 and the first 2.0
    assert (thr, ties) == (2.0, 1)


def test_empty_inputs():
    assert ops.magnitude_threshold([], 0.5) == (0.0, 0)
    assert ops.magnitude_threshold([torch.empty(0)], 0.5) == (0.0, 0)
    assert ops.magnitude_threshold([torch.ones(3)], 0.5, [torch.zeros(3, dtype=torch.bool)]) == (0.0, 0)


def test_threshold_bad_inputs():
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        ops.magnitude_threshold([torch.ones(3)], 1.5)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        ops.magnitude_threshold([torch.ones(3)], float("nan"))
    for huge, shown in ((10**400, "inf"), (-10**400, "-inf"), (Fraction(10**400), "inf")):  # (OverflowError before)
        with pytest.raises(ValueError, match=rf"^fraction must be in \[0, 1\], got {shown}$"):
            ops.magnitude_threshold([torch.ones(3)], huge)
    for empty in ([], ()):  # (an empty list returned (0.0, 0) before the fraction was checked)
        for bad, shown in ((1.5, "1.5"), (float("nan"), "nan"), (-10**400, "-inf")):
            with pytest.raises(ValueError, match=rf"^fraction must be in \[0, 1\], got {shown}$"):
                ops.magnitude_threshold(empty, bad)
        assert ops.magnitude_threshold(empty, 0.5) == (0.0, 0) and ops.magnitude_threshold(empty, 1, []) == (0.0, 0)
    with pytest.raises(TypeError, match="masks must have dtype Bool"):
        ops.magnitude_threshold([torch.ones(3)], 0.5, [torch.ones(3)])
    with pytest.raises(ValueError, match=r"masks\[0\] must have the shape"):
        ops.magnitude_threshold([torch.ones(3)], 0.5, [torch.ones(4, dtype=torch.bool)])
    with pytest.raises(TypeError, match="tensors must all have one dtype"):
        ops.magnitude_threshold([torch.ones(3), torch.ones(3, dtype=torch.float64)], 0.5)
    with pytest.raises(TypeError, match="tensors must be float32 or float64"):
        ops.magnitude_threshold([torch.ones(3, dtype=torch.int64)], 0.5)
    with pytest.raises(TypeError, match="fraction must be a float"):
        ops.magnitude_threshold([torch.ones(3)], "0.5")


def test_global_threshold_large_is_exact():
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(300, 784, generator=g), torch.randn(100, 300, generator=g), torch.randn(10, 100, generator=g)]
    thr, ties = ops.magnitude_threshold(ts, 0.2)
    allv = torch.cat([t.abs().flatten() for t in ts])
    k = int(0.2 * allv.numel())
    assert thr == float(allv.sort().values[k - 1])
    assert int((allv < thr).sum()) + ties == k


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_csr_prune_matches_dense_reference(sparsity):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(9, 11, generator=g)
    w[2, :4] = 0.25  # ties
    w[3, :] = 0.25
    mask = random_mask((9, 11), sparsity, generator=g, empty_rows=1)
    csr = CSR.from_dense(w, mask)
    thr, ties = ops.magnitude_threshold([csr.values], 0.3)
    crow, col, vals, keep = ops.csr_prune(csr.crow_indices, csr.col_indices, csr.values, thr, ties)
    pruned = CSR(crow, col, vals, csr.shape)
    # reference: the same decisions on the dense masked weight in flat (row-major) order
    ref_set = _apply([csr.values], [None], thr, ties)
    kept_pos = sorted(set(range(csr.nnz)) - {j for _, j in ref_set})
    assert keep.tolist() == kept_pos
    assert pruned.nnz == csr.nnz - math.floor(0.3 * csr.nnz)
    new_mask = pruned.mask()
    assert not bool((new_mask & ~mask).any()), "masks only shrink"
    torch.testing.assert_close(pruned.to_dense(), w * new_mask)


def test_csr_prune_empty_and_errors():
    csr = CSR.from_dense(torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.bool))
    crow, col, vals, keep = ops.csr_prune(csr.crow_indices, csr.col_indices, csr.values, 0.5, 0)
    assert crow.tolist() == [0, 0, 0, 0] and col.numel() == vals.numel() == keep.numel() == 0
    csr = CSR.from_dense(torch.ones(2, 2))
    with pytest.raises(ValueError, match="threshold must not be NaN"):
        ops.csr_prune(csr.crow_indices, csr.col_indices, csr.values, float("nan"), 0)
    with pytest.raises(ValueError, match="max_ties must be >= 0"):
        ops.csr_prune(csr.crow_indices, csr.col_indices, csr.values, 0.5, -1)
    with pytest.raises(ValueError, match="values must have nnz"):
        ops.csr_prune(csr.crow_indices, csr.col_indices, torch.ones(3), 0.5, 0)


def test_prune_op_wrappers_refuse_what_is_no_tensor_by_name():
    """None, lists, a bare tensor, a str threshold or a float tie budget: an AttributeError, the dispatcher's
    schema error, or a silent float()/int() conversion before; relu_count_ also took a 2-D counts."""
    csr = CSR.from_dense(torch.tensor([[1.0, 2.0], [0.0, 2.0]]))
    crow, col, vals = csr.crow_indices, csr.col_indices, csr.values.detach()
    for bad, match in ((None, "tensors must be a list of tensors, got NoneType"),
                       (torch.ones(3), "tensors must be a list of tensors, got Tensor"),
                       ([[1.0, 2.0]], r"tensors\[0\] must be a torch.Tensor, got list"),
                       ([None], r"tensors\[0\] must be a torch.Tensor, got NoneType")):
        with pytest.raises(TypeError, match=match):
            ops.magnitude_threshold(bad, 0.5)
    with pytest.raises(TypeError, match=r"masks\[0\] must be a torch.Tensor or None, got list"):
        ops.magnitude_threshold([torch.ones(3)], 0.5, [[True, True, True]])
    with pytest.raises(TypeError, match="masks must be a list of tensors, got Tensor"):
        ops.magnitude_threshold([torch.ones(3)], 0.5, torch.ones(3, dtype=torch.bool))
    for args, match in (((None, col, vals, 1.5), "crow must be a torch.Tensor, got NoneType"),
                        ((crow, crow.tolist(), vals, 1.5), "col must be a torch.Tensor, got list"),
                        ((crow, col, vals.tolist(), 1.5), "values must be a torch.Tensor, got list"),
                        ((crow, col, vals, "1.5"), "threshold must be a number, got str"),
                        ((crow, col, vals, None), "threshold must be a number, got NoneType"),
                        ((crow, col, vals, 2.0, 1.7), "max_ties must be an int, got float"),
                        ((crow, col, vals, 2.0, True), "max_ties must be an int, got bool")):
        with pytest.raises(TypeError, match=match):
            ops.csr_prune(*args)
    for counts, pre, match in ((None, torch.randn(3, 4), "counts must be a torch.Tensor, got NoneType"),
                               ([0, 0, 0, 0], torch.randn(3, 4), "counts must be a torch.Tensor, got list"),
                               (torch.zeros(4, dtype=torch.int64), None, "pre must be a torch.Tensor, got NoneType")):
        with pytest.raises(TypeError, match=match):
            ops.relu_count_(counts, pre)
    counts = torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"counts must be 1-D \[neurons\].*got shape \(2, 2\)"):
        ops.relu_count_(counts, torch.randn(3, 2, 2))
    assert not bool(counts.any())  # refused before anything was counted
    # what they take: numpy numbers, a tuple or generator of tensors; the same answers as a sorted reference
    t = [torch.tensor([0.5, 2.0, 2.0]), torch.tensor([2.0, 0.1])]
    assert ops.magnitude_threshold(tuple(t), np.float32(0.6)) == ops.magnitude_threshold(iter(t), 0.6) == (2.0, 1)
    _, _, kept, keep = ops.csr_prune(crow, col, vals, np.float64(2.0), np.int64(1))
    assert keep.tolist() == [2] and kept.tolist() == [2.0]  # 1.0 < 2.0 and the first tie (row 0's 2.0) go


def test_csr_prune_refuses_meta_tensors_and_takes_any_tie_budget():
    """csr_prune on meta tensors raised torch's "data-dependent shape" RuntimeError (one meta among CPU ones:
    the fake's device error), refused now by name as magnitude_threshold does; a tie budget of 2**63 or more
    failed the schema's int64 ("Expected a value of type 'int' ... found type 'int'"): any budget >= the ties
    prunes them all, compared with the sorted reference."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(5, 6, generator=g)
    w[1, :3] = 0.5  # ties at the threshold
    csr = CSR.from_dense(w, random_mask((5, 6), 0.3, generator=g))
    args = [csr.crow_indices, csr.col_indices, csr.values.detach()]
    for i in (None, 0, 1, 2):
        bad = [t.to("meta") if i is None or j == i else t for j, t in enumerate(args)]
        with pytest.raises(ValueError, match=r"csr_prune runs on CPU tensors \(move them with .cpu\(\)\), got"):
            ops.csr_prune(*bad, 0.5, 0)
    ties = int((csr.values == 0.5).sum())
    assert ties >= 2  # (a budget one short keeps one tie more: the budget counts)
    ref_set = _apply([csr.values.detach()], [None], 0.5, ties)
    expected = sorted(set(range(csr.nnz)) - {j for _, j in ref_set})
    assert ops.csr_prune(*args, 0.5, ties - 1)[3].numel() == len(expected) + 1
    for budget in (ties, 2**62, 2**63, 2**80, np.uint64(2**64 - 1)):
        assert ops.csr_prune(*args, 0.5, budget)[3].tolist() == expected, budget


def test_opcheck_prune_ops():
    g = torch.Generator().manual_seed(3)
    csr = CSR.from_dense(torch.randn(5, 6, generator=g), random_mask((5, 6), 0.3, generator=g))
    torch.library.opcheck(torch.ops.sparsetrain.magnitude_threshold.default,
                          ([csr.values.detach(), torch.randn(4, generator=g)], [None, None], 0.4))
    torch.library.opcheck(torch.ops.sparsetrain.csr_prune.default,
                          (csr.crow_indices, csr.col_indices, csr.values.detach(), 0.5, 1))


# ---------------------------------------------------------------------------- relu_count_
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 5, 6), (1, 1), (0, 3), (9, 2, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_count_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g, dtype=dtype)
    if x.numel():
        x.view(-1)[0] = 0.0  # zero is not positive
    n = 1
    for s in shape[1:]:
        n *= s
    counts = torch.full((n,), 3, dtype=torch.int64)
    ops.relu_count_(counts, x)
    ref = 3 + (x > 0).reshape(shape[0], n).sum(0)
    assert torch.equal(counts, ref)
    ops.relu_count_(counts, x)  # accumulates
    assert torch.equal(counts, 2 * ref - 3)


def test_relu_count_errors_and_opcheck():
    with pytest.raises(ValueError, match="counts must have one entry per neuron"):
        ops.relu_count_(torch.zeros(5, dtype=torch.int64), torch.randn(2, 4))
    with pytest.raises(TypeError, match="counts must have dtype Long"):
        ops.relu_count_(torch.zeros(4, dtype=torch.int32), torch.randn(2, 4))
    with pytest.raises(ValueError, match="pre must be"):
        ops.relu_count_(torch.zeros(4, dtype=torch.int64), torch.randn(4))
    with pytest.raises(TypeError, match="pre must be float32 or float64"):
        ops.relu_count_(torch.zeros(4, dtype=torch.int64), torch.ones(2, 4, dtype=torch.int64))
    torch.library.opcheck(torch.ops.sparsetrain.relu_count_.default,
                          (torch.zeros(12, dtype=torch.int64), torch.randn(3, 3, 4)))
