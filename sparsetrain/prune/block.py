"""Block pruning (`--structure block`): whole BS x BS tiles by their Frobenius norm per sqrt(area).

A weight viewed as [out, in*kh*kw] is cut into BS x BS tiles (BS in 16/32/64; edge tiles partial);
each round `rate` (floor, at least one) of the surviving tiles with the smallest score are pruned,
score = ||tile||_F / sqrt(elements in the tile) (the tile's RMS weight: a partial edge tile competes
by its weights' size, not by having fewer of them; full tiles rank as by their norm),
with one threshold over all layers (`scope="global"`) or per layer; ties go to earlier layers and
lower tile indices. Each layer keeps at least its top-scoring tile (the first of equal top scores,
so of a layer of equal tiles tile 0 stays); masks only shrink. Such masks are what the engine's
BSR format stores (the Triton tensor-core kernels); the study trains them as dense masked layers
on every device (there is no C++ BSR engine, and the study does not build `BSRLinear`s), so the
rule `needs_dense`.
`block_mask(weight, block, sparsity)` builds a one-shot block mask for a BSR layer.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..engine.args import check_weight
from ..engine.bsr import as_matrix, blocks_view, check_block
from ..engine.nn import check_masks, check_untied, is_sparse, masks_of, model_sparsity, prunable_layers
from .base import (PruningRule, check_finite, check_rate, check_scope, check_sparsity, check_tensor_mask, count_of,
                   register, valued_masks)

__all__ = ["block_mask", "block_prune", "BlockRule"]


def block_mask(weight: torch.Tensor, block: int, sparsity: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of `weight`'s shape that prunes round(sparsity * n_blocks) whole blocks (Python's round:
    a half goes to the even count; the iterative rules floor instead), those with
    the smallest score (module docstring) of (weight * mask) (ties: lower block index first). Blocks already
    fully pruned by `mask` go first, and the result is within `mask`: masks only shrink across
    rounds (asking for less sparsity than `mask` has keeps `mask`)."""
    bs = check_block(block)
    sparsity = check_sparsity(sparsity)
    check_weight(weight, mask)
    if mask is not None and not isinstance(mask, torch.Tensor):  # (mask.shape: an AttributeError before)
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    w = weight.detach()
    if mask is not None:
        if mask.dtype != torch.bool:  # (a TypeError, as check_masks: a ValueError, as for a wrong shape, before)
            raise TypeError(f"mask must be a bool tensor of shape {tuple(weight.shape)}, got dtype {mask.dtype}")
        if mask.shape != weight.shape:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
        w = w.masked_fill(~mask, 0)  # (not w * mask: an inf under a pruned position would be NaN)
    if bool(torch.isnan(w).any()):  # (a NaN under a pruned position is a pruned weight: refused before 2026-12-06)
        raise ValueError("weight has NaN entries where mask keeps: a NaN has no norm to rank its block by")
    if bool(torch.isinf(w).any()):  # (ranked above every block and kept before 2026-12-06)
        raise ValueError("weight has inf entries where mask keeps (a diverged model): they cannot be ranked by norm")
    norms = _scores(as_matrix(w), bs)  # [RB, CB]
    if mask is not None:  # pruned blocks rank below every live one (a live block of zeros included)
        dead = blocks_view(as_matrix(mask).to(torch.int32), bs).sum((2, 3)) == 0
        norms = torch.where(dead, norms.new_tensor(-1.0), norms)
    k = int(round(sparsity * norms.numel()))
    order = torch.argsort(norms.flatten(), stable=True)
    keep = torch.ones(norms.numel(), dtype=torch.bool, device=w.device)
    keep[order[:k]] = False
    rows, cols = as_matrix(w).shape
    full = keep.reshape(norms.shape).repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    full = full[:rows, :cols].reshape(weight.shape)
    return full if mask is None else full & mask


def _scores(m: torch.Tensor, bs: int) -> torch.Tensor:
    """[RB, CB] score per tile of the matrix m: Frobenius norm / sqrt(the tile's element count)
    (bs*bs inside, fewer on the bottom and right edges). In float64 whatever m's dtype: a float32 sum of
    squares rounded 1 + 2^-26 to 1, tying a larger tile with a smaller one (the lower index was pruned),
    and overflowed to inf above |w| ~ 1.8e19 (every fp32/bf16 square fits a float64, exactly)."""
    rows, cols = m.shape
    norms = blocks_view(m.double(), bs).square().sum((2, 3)).sqrt()
    h = (rows - torch.arange(norms.shape[0], device=m.device) * bs).clamp(max=bs)
    w = (cols - torch.arange(norms.shape[1], device=m.device) * bs).clamp(max=bs)
    return norms / (h[:, None] * w[None, :]).to(norms.dtype).sqrt()


def _block_stats(w: torch.Tensor, mask: torch.Tensor, bs: int):
    """(score, alive) per block, flattened in row-major block order."""
    norms = _scores(as_matrix(w.masked_fill(~mask, 0)), bs)
    alive = blocks_view(as_matrix(mask).to(torch.int32), bs).sum((2, 3)) > 0
    return norms.flatten(), alive.flatten(), norms.shape


def block_prune(model: nn.Module, masks: dict, rate: float, block: int = 32, *, scope: str = "global") -> dict:
    """One round of block pruning (module docstring): returns the shrunken masks of every prunable
    layer (dense layers only) and zeroes the weights under pruned blocks."""
    bs = check_block(block)
    rate = check_rate(rate)
    check_scope(scope)
    masks = check_masks(model, masks)
    check_untied(model)  # (as sparsify_: a shared tensor would be ranked twice)
    layers = prunable_layers(model)
    if not layers:
        raise ValueError("model has no prunable layer (nn.Conv2d / nn.Linear)")
    check_finite(layers, masks)
    if any(is_sparse(m) for _, m in layers):
        raise ValueError("--structure block needs dense masked layers (engine dense)")
    cur = masks_of(model, masks)
    stats = {n: _block_stats(m.weight.detach(), cur[n], bs) for n, m in layers}
    new_masks = dict(masks)
    for group in ([layers] if scope == "global" else [[l] for l in layers]):
        for (n, m), keep in zip(group, _select_blocks([stats[n] for n, _ in group], rate)):
            new_masks[n] = cur[n] & _expand(keep, stats[n][2], m.weight, bs).to(cur[n].device)
            with torch.no_grad():
                m.weight.masked_fill_(~new_masks[n], 0)  # (not mul_: an inf pruned would become NaN)
    return new_masks


def _select_blocks(stats: list, rate: float) -> list[torch.Tensor]:
    """One round over a group of layers (their _block_stats, in layer order): the blocks each keeps (flat bool)."""
    cand, n_alive = [], 0
    for li, (norms, alive, _) in enumerate(stats):
        n_alive += int(alive.sum())
        ok = alive.clone()
        if bool(alive.any()):  # the layer's top-scoring surviving block is never a candidate
            ok[torch.where(alive, norms, norms.new_tensor(-1.0)).argmax()] = False
        idx = ok.nonzero().flatten()
        cand.append((norms[idx], torch.full_like(idx, li), idx))
    norms = torch.cat([c[0] for c in cand])
    k = min(max(1, count_of(rate, n_alive)), norms.numel())
    # stable sort over (layer order, block index) order: ties go to earlier layers / blocks
    pick = torch.argsort(norms, stable=True)[:k]
    which, blk = torch.cat([c[1] for c in cand])[pick], torch.cat([c[2] for c in cand])[pick]
    out = []
    for li, (_, alive, _) in enumerate(stats):
        keep = alive.clone()
        keep[blk[which == li]] = False
        out.append(keep)
    return out


def _expand(keep: torch.Tensor, shape, weight: torch.Tensor, bs: int) -> torch.Tensor:
    """The flat per-block `keep` ([RB, CB] `shape`) as an element mask of `weight`'s shape."""
    rows, cols = as_matrix(weight).shape
    full = keep.reshape(shape).repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:rows, :cols]
    return full.reshape(weight.shape)


@register
class BlockRule(PruningRule):
    """`--structure block`: whole tiles by norm per sqrt(area) (module docstring)."""

    name = "block"
    needs_dense = True  # the study trains block masks dense (BSRLinear is standalone API)

    def __init__(self, scope: str = "global", block: int = 32):
        self.scope, self.block = check_scope(scope), check_block(block)

    def prune(self, model, masks, rate):
        return block_prune(model, masks, rate, self.block, scope=self.scope)

    def compute_mask(self, t, default_mask, rate):
        """PruningRule.compute_mask: floor(rate * surviving tiles), at least one, never the top one, of t's tiles
        of smallest norm per sqrt(area) (t viewed as [out, in*kh*kw]), as block_prune selects a layer's."""
        rate, mask = check_rate(rate), check_tensor_mask(t, default_mask)
        if t.dim() < 2:
            raise ValueError(f"t must be a weight with at least 2 dims ([out, ...]), got shape {tuple(t.shape)}")
        w = t.detach()
        stats = _block_stats(w, mask, self.block)
        return mask & _expand(_select_blocks([stats], rate)[0], stats[2], w, self.block)

    def next_sparsity(self, model, masks, rate, sparsity, original):
        # a round prunes floor(rate * tiles), at least one, never a layer's top tile, and tiles differ in size
        # (partial edge tiles): not 1 - (1 - sparsity)(1 - rate) (LeNet-300-100 at --block 32: 18.4% for 20%),
        # which the wall took before 2026-12-06; the next round's counts, on a copy (as the filter rule)
        super().next_sparsity(model, masks, rate, sparsity, original)  # (the arguments' checks)
        trial = copy.deepcopy(model)
        return model_sparsity(trial, block_prune(trial, masks, rate, self.block, scope=self.scope), original)

    def can_prune(self, model, masks):
        cur = valued_masks(model, masks)
        return any(int(_block_stats(m.weight.detach(), cur[n], self.block)[1].sum()) > 1
                   for n, m in prunable_layers(model))
