"""Unstructured magnitude pruning (the paper's Algorithm 1 `Prune`): the weights of smallest |w|.

Over all conv and linear weights of a model (never biases or BatchNorm), dense masked or sparse.
One exact threshold (the C++ `magnitude_threshold` op: radix select, ties broken by layer order,
then flat index) over all layers (`scope="global"`, the paper's) or one per layer ("layer"); each
round prunes floor(rate * surviving) weights, so round k has sparsity 1 - (1 - rate)^k up to that
floor (`sparsity_after` gives the unfloored value; 7 weights at rate 0.2 reach 1/7, 2/7, 3/7, 3/7, ...).
Dense layers get a smaller mask; sparse layers shrink in place (`csr_prune` selects, `CSR.shrink_`).
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from ..engine import ops
from ..engine.nn import check_masks, check_pattern, check_untied, is_sparse, prunable_layers, stored_weight
from .base import PruningRule, check_finite, check_rate, check_scope, check_tensor_mask, register, valued_masks

__all__ = ["global_prune", "sparsity_after", "MagnitudeRule"]


def sparsity_after(rounds: int, rate: float) -> float:
    """Target sparsity after k rounds pruning `rate` of the remaining weights: 1 - (1 - rate)^k. `rounds`: an
    int >= 0 (TypeError for another type, as `rate`; ValueError below 0)."""
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral):  # (a ValueError before 2026-12-06)
        raise TypeError(f"rounds must be an int >= 0, got {type(rounds).__name__} {rounds!r}")
    if rounds < 0:
        raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
    return 1.0 - (1.0 - check_rate(rate)) ** int(rounds)


def _weight_and_mask(m: nn.Module, masks: dict, name: str):
    return stored_weight(m).detach(), (None if is_sparse(m) else masks.get(name))


def _prune_dense_mask(w: torch.Tensor, mask: torch.Tensor | None, thr: float, ties: int):
    """New mask: drop |w| < thr and the first `ties` surviving |w| == thr (flat order). Compared in
    float64, as the selection made it (a threshold from a float64 layer is no float32 number)."""
    a = w.abs().double()
    keep = (a > thr) | torch.isnan(a) if mask is None else mask & ((a > thr) | torch.isnan(a))
    at = (a == thr) if mask is None else mask & (a == thr)
    if ties:
        idx = at.flatten().nonzero().flatten()
        keep_at = at.flatten().clone()
        keep_at[idx[:ties]] = False
        keep = keep | keep_at.reshape(at.shape)
        used = min(ties, idx.numel())
    else:
        keep = keep | at
        used = 0
    return keep, used


def _select_sparse(m: nn.Module, thr: float, ties: int):
    """The CSR entries to keep under the threshold (bool [nnz], for CSR.shrink_) and the ties consumed.
    (The C++ selection runs on the CPU: a layer on another device is selected there; fp16/bf16
    values in float32, exact: the op compares |v| in float64 and refuses half precision.)"""
    w = m.weight
    vals = w.values.detach().cpu()
    vals = vals if vals.dtype in (torch.float32, torch.float64) else vals.float()
    _, _, new_vals, keep = ops.csr_prune(w.crow_indices.cpu(), w.col_indices.cpu(), vals, thr, ties)
    used = int((vals.abs().double() == thr).sum()) - int((new_vals.abs().double() == thr).sum())
    mask = torch.zeros(w.nnz, dtype=torch.bool)
    mask[keep] = True
    return mask, used


def global_prune(model: nn.Module, masks: dict, rate: float, *, scope: str = "global") -> dict:
    """Prune `rate` of the surviving weights (global: one threshold over all layers; layer: the
    same fraction in every layer). Dense layers get a shrunken mask in the returned dict; sparse
    layers shrink in place (CSR.shrink_: an optimizer holding their values trains on, its momentum
    shrunk alike), and a sparse layer `masks` names gets its new mask there too (not the one given,
    which would let pruned weights back after densify_). Weights under pruned positions are zeroed."""
    rate = check_rate(rate)
    check_scope(scope)
    masks = check_masks(model, masks)
    check_untied(model)  # (as sparsify_: a shared tensor would be ranked twice)
    layers = prunable_layers(model)
    if not layers:  # (as block_prune: an empty result would read as "nothing left to prune")
        raise ValueError("model has no prunable layer (nn.Conv2d / nn.Linear)")
    for n, m in layers:
        if is_sparse(m) and n in masks:
            check_pattern(n, m.weight.mask(), masks)
    check_finite(layers, masks)
    groups = [layers] if scope == "global" else [[l] for l in layers]
    selected = []  # (name, layer, dense mask or CSR keep) of every layer: all chosen before any changes,
    # so a layer the selection refuses leaves the model as it was, never half pruned
    for group in groups:
        pairs = [_weight_and_mask(m, masks, n) for n, m in group]
        # the selection (C++, CPU) on CPU copies when the model is elsewhere (a GPU); layers of
        # several dtypes in float64 (exact: every float32 is a float64, in the same order)
        # (half-precision layers: the C++ selection takes fp32/fp64 only; every fp16/bf16 is an fp32)
        mixed = len({w.dtype for w, _ in pairs}) > 1 or any(w.dtype not in (torch.float32, torch.float64)
                                                            for w, _ in pairs)
        thr, ties = ops.magnitude_threshold([w.cpu().double() if mixed else w.cpu() for w, _ in pairs], rate,
                                            [None if mk is None else mk.cpu() for _, mk in pairs])
        for name, m in group:
            if is_sparse(m):
                keep, used = _select_sparse(m, thr, ties)
            else:
                keep, used = _prune_dense_mask(m.weight.detach(), masks.get(name), thr, ties)
            ties -= used
            selected.append((name, m, keep))
    new_masks = dict(masks)
    for name, m, keep in selected:
        if is_sparse(m):
            m.weight.shrink_(keep)  # (the same values Parameter: an optimizer holding it trains on)
            if name in masks:
                new_masks[name] = m.weight.mask()
        else:
            new_masks[name] = keep
            with torch.no_grad():
                m.weight.masked_fill_(~keep, 0)  # (not mul_: an inf pruned would become NaN)
    return new_masks


@register
class MagnitudeRule(PruningRule):
    """`--structure unstructured`: single weights by |w| (global or per-layer threshold)."""

    name = "unstructured"
    needs_dense = False

    def __init__(self, scope: str = "global"):
        self.scope = check_scope(scope)

    def prune(self, model, masks, rate):
        return global_prune(model, masks, rate, scope=self.scope)

    def compute_mask(self, t, default_mask, rate):
        """PruningRule.compute_mask: floor(rate * kept) of the kept weights of smallest |t| (ties: flat order),
        the selection global_prune makes for a layer of weight `t`."""
        rate, mask = check_rate(rate), check_tensor_mask(t, default_mask)
        w = t.detach()
        sel = w.cpu() if w.dtype in (torch.float32, torch.float64) else w.cpu().double()  # (as global_prune)
        thr, ties = ops.magnitude_threshold([sel], rate, [mask.cpu()])
        return _prune_dense_mask(w, mask, thr, ties)[0]

    def can_prune(self, model, masks):
        # a round prunes floor(rate * n) < n of a group's n survivors (rate < 1): something only where n >= 2
        # (True before, even with every weight pruned)
        kept = [int(mk.sum()) for mk in valued_masks(model, masks).values()]
        return sum(kept) >= 2 if self.scope == "global" else any(k >= 2 for k in kept)
