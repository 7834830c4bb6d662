"""Filter pruning (`--structure filter`): whole filters by their l1 norm, removed physically.

Filter pruning (DSD² Appendix G, "structured l1-pruning"): every round each conv layer loses
floor(rate * n) of its n remaining filters (output channels), those with the smallest l1 norm
sum|W[c]| of the filter's weights (ties: lower index first); hidden linear layers lose neurons
(rows) the same way. The ranking is per layer, as the paper's Table 13 counts filters per
convolutional block (512 -> 256 -> ... -> 32 at rate 0.5 for VGG-like δ=1, γ=9) and as
torch.nn.utils.prune.ln_structured(n=1, dim=0) does; `--scope` does not apply. Channels are
removed physically: the conv's out_channels, the BatchNorm after it, and the next layer's
in_channels (after a Flatten, the next linear's C*H*W input features of those channels) all
shrink, so training, FLOPs and memory follow the smaller shapes. At least one filter per layer
and all outputs of the last layer (the classes) are kept; at least one filter per layer with more
than one is removed, so the loop always progresses. A removed channel's bias and BatchNorm shift
no longer reach the next layer (as in every channel-pruning scheme): the smaller model equals the
masked one with those zeroed too, not torch.nn.utils.prune.ln_structured's, which keeps them.
Only sequential models: a residual addition ties the channel counts of the layers it joins.

The model remembers which original channels survive in `model.kept_channels` ({layer name: int64
original indices}); a checkpoint stores it, and loading rebuilds the full model and keeps the same
channels (`keep_channels_`), so weights_only loading still works.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..engine.nn import check_model, is_sparse, model_sparsity
from ..engine.optim_state import retire_replaced
from ..engine.swap import carry_parameter_attributes
from .base import PruningRule, check_finite, check_rate, check_tensor_mask, count_of, register, valued_masks

__all__ = ["filter_prune", "keep_channels_", "filter_groups", "fit_state", "FilterRule"]

SEQUENTIAL_ONLY = ("--structure filter supports sequential models (vgg_like, lenet300); residual "
                   "connections tie channel counts")
# modules a channel passes through unchanged (per channel or per position)
_PASS = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Identity, nn.Dropout)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class _Group:
    """A prunable layer, the BatchNorms on its channels and the layer consuming them."""
    name: str
    layer: nn.Module
    bns: list
    nxt: nn.Module
    spatial: int  # input features of `nxt` per channel (H*W after a Flatten, else 1)


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules in forward order of a (nested) nn.Sequential; anything else is refused."""
    check_model(model)  # (None, a state_dict: a TypeError, as the other rules; a ValueError "got NoneType" before)
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"{SEQUENTIAL_ONLY}; got {type(model).__name__}")
    out = []

    def walk(prefix: str, seq: nn.Sequential):
        for n, m in seq.named_children():
            if isinstance(m, nn.Sequential):
                walk(f"{prefix}{n}.", m)
            elif is_sparse(m):
                raise ValueError(f"--structure filter needs dense layers; {prefix}{n!r} is {type(m).__name__}")
            elif type(m) in (nn.Conv2d, nn.Linear, nn.Flatten) or isinstance(m, _PASS + _BN):
                out.append((f"{prefix}{n}", m))
            else:
                raise ValueError(f"{SEQUENTIAL_ONLY}; {type(m).__name__} at {prefix}{n!r} is not supported")
    walk("", model)
    return out


def filter_groups(model: nn.Module) -> list[_Group]:
    """The prunable layers (every conv/linear but the last) with what their channels feed."""
    leaves = _leaves(model)
    weighted = [i for i, (_, m) in enumerate(leaves) if type(m) in (nn.Conv2d, nn.Linear)]
    groups = []
    for i, j in zip(weighted, weighted[1:]):
        name, layer = leaves[i]
        c = layer.weight.shape[0]
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise ValueError(f"layer {name!r}: grouped convolutions are not supported by --structure filter")
        bns, flat = [], False
        for n, m in leaves[i + 1:j]:
            if isinstance(m, _BN):
                if m.num_features != c:
                    raise ValueError(f"BatchNorm {n!r} has {m.num_features} features, expected {c}")
                bns.append(m)
            elif isinstance(m, nn.Flatten):
                if m.start_dim != 1 or m.end_dim != -1:
                    raise ValueError(f"Flatten {n!r}: only Flatten(1) is supported")
                flat = True
        nname, nxt = leaves[j]
        fan_in = nxt.in_channels if isinstance(nxt, nn.Conv2d) else nxt.in_features
        if isinstance(nxt, nn.Conv2d) and nxt.groups != 1:
            raise ValueError(f"layer {nname!r}: grouped convolutions are not supported by --structure filter")
        # Flatten(1) of [C, H, W] puts channel c at features c*H*W ... (c+1)*H*W - 1
        spatial = fan_in // c if (flat or fan_in == c) and fan_in % c == 0 else 0
        if spatial < 1:
            raise ValueError(f"layer {nname!r} takes {fan_in} inputs, not a multiple of {name!r}'s {c} channels")
        # a Linear's features are its input's last dim, a conv's channels dim 1: Flatten(1) of a
        # Linear's [T, F] interleaves them (t*F + c), and a Linear after a conv reads its width
        if isinstance(layer, nn.Linear) and (isinstance(nxt, nn.Conv2d) or spatial > 1):
            raise ValueError(f"layer {nname!r} takes {fan_in} inputs from Linear {name!r}'s {c} features "
                             f"{'through a Flatten ' if flat else ''}(a Linear applied to a 3-D or 4-D input?): "
                             "--structure filter cannot locate its features there")
        if isinstance(layer, nn.Conv2d) and isinstance(nxt, nn.Linear) and not flat:
            raise ValueError(f"Linear {nname!r} follows conv {name!r} without a Flatten: it reads the conv's last "
                             "(width) dimension, not its channels; --structure filter needs a Flatten between")
        groups.append(_Group(name, layer, bns, nxt, spatial))
    return groups


def _take(module: nn.Module, attr: str, idx: torch.Tensor, dim: int) -> None:
    t = getattr(module, attr)
    if t is None:
        return
    new = t.detach().index_select(dim, idx.to(t.device)).clone()  # (idx on the CPU: kept_channels)
    new = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    carry_parameter_attributes(((t, new),))  # (`p._no_weight_decay = True`: dropped silently before 2026-12-06)
    setattr(module, attr, new)


@torch.no_grad()
def keep_channels_(model: nn.Module, keep: dict) -> nn.Module:
    """Physically keep only the output channels `keep[name]` (indices into the layer's current
    channels) of each named layer of `filter_groups(model)`; shrinks its BatchNorms and the next
    layer's inputs. Updates `model.kept_channels` (original indices). Returns the model."""
    if not isinstance(keep, dict):
        raise TypeError(f"keep must be a dict of layer name -> channel indices, got {type(keep).__name__}")
    groups = {g.name: g for g in filter_groups(model)}
    unknown = sorted(set(keep) - set(groups))
    if unknown:
        raise ValueError(f"keep names layers whose channels cannot be removed: {unknown}; "
                         f"prunable: {sorted(groups)}")
    kept = dict(getattr(model, "kept_channels", {}))
    before = {n: dict(m.named_parameters(recurse=False)) for n, m in model.named_modules()}  # (replaced by
    # smaller ones: an optimizer holding these is refused)
    for name, idx in keep.items():
        g = groups[name]
        n = g.layer.weight.shape[0]
        try:  # (a bool mask or float positions would be read as indices 0/1 or truncated: refused)
            idx = torch.as_tensor(idx)
        except (TypeError, ValueError, RuntimeError):
            idx = None
        if idx is None or idx.numel() and (idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex()):
            raise TypeError(f"keep[{name!r}] must hold integer channel indices, got "
                            f"{idx.dtype if idx is not None else type(keep[name]).__name__}")
        idx = idx.long().flatten()
        if idx.numel() < 1 or int(idx.min()) < 0 or int(idx.max()) >= n or idx.unique().numel() != idx.numel():
            raise ValueError(f"keep[{name!r}] must hold 1 to {n} distinct indices in [0, {n})")
        idx = idx.sort().values
        _take(g.layer, "weight", idx, 0)
        _take(g.layer, "bias", idx, 0)
        if isinstance(g.layer, nn.Conv2d):
            g.layer.out_channels = idx.numel()
        else:
            g.layer.out_features = idx.numel()
        for bn in g.bns:
            for attr in ("weight", "bias", "running_mean", "running_var"):
                _take(bn, attr, idx, 0)
            bn.num_features = idx.numel()
        cols = (idx[:, None] * g.spatial + torch.arange(g.spatial)).flatten()
        _take(g.nxt, "weight", cols, 1)
        if isinstance(g.nxt, nn.Conv2d):
            g.nxt.in_channels = idx.numel()
        else:
            g.nxt.in_features = cols.numel()
        kept[name] = kept.get(name, torch.arange(n))[idx]
    model.kept_channels = kept
    retire_replaced(model, before, "filter pruning (keep_channels_)")
    return model


def filter_prune(model: nn.Module, rate: float) -> dict[str, int]:
    """One round of per-layer l1 filter pruning (module docstring). Returns {layer: removed}."""
    rate = check_rate(rate)
    groups = filter_groups(model)
    check_finite([(g.name, g.layer) for g in groups])
    keep, removed = {}, {}
    for g in groups:
        w = g.layer.weight.detach()
        n = w.shape[0]
        k = min(n - 1, max(1, count_of(rate, n)))  # floor like global_prune; >= 1 to progress, keep >= 1
        if k < 1:
            continue
        l1 = w.double().abs().reshape(n, -1).sum(1)  # (float64: a bf16 sum rounded 100.25 and 100.125 both to 100)
        keep[g.name] = torch.argsort(l1, stable=True)[k:].cpu()
        removed[g.name] = k
    keep_channels_(model, keep)
    return removed


def fit_state(model: nn.Module, state: dict, build_full) -> dict:
    """A full-size state_dict (rewind snapshot, fresh init) cut to `model`'s kept channels;
    `build_full()` makes an unpruned model of the same architecture (called only when needed)."""
    kept = getattr(model, "kept_channels", None)
    if not kept:
        return state
    full = build_full()
    full.load_state_dict(state)
    return keep_channels_(full, kept).state_dict()


def _check_no_pruned_masks(model: nn.Module, masks: dict) -> None:
    """The rule changes shapes and returns no masks: masks that prune weights (an unstructured round before)
    would be dropped and their weights train again (they were, silently), so they are refused."""
    filter_groups(model)  # (a model the rule cannot take: its own error first)
    pruned = [n for n, mk in valued_masks(model, masks).items() if not bool(mk.all())]
    if pruned:
        raise ValueError(f"--structure filter removes channels and keeps no masks, but masks prune weights of layer "
                         f"{pruned[0]!r}: they would train again; filter-prune a model without masks")


@register
class FilterRule(PruningRule):
    """`--structure filter`: per-layer l1 filter pruning that removes channels (module docstring)."""

    name = "filter"
    needs_dense = True  # layers shrink; the CSR engine would add nothing

    def prune(self, model, masks, rate):
        _check_no_pruned_masks(model, masks)
        filter_prune(model, rate)
        return {}  # channels are gone: the smaller dense layers need no masks

    def compute_mask(self, t, default_mask, rate):
        """PruningRule.compute_mask: whole filters (rows along dim 0) of smallest l1 norm of t's kept weights, as
        filter_prune ranks a layer's: floor(rate * n) of the n filters `default_mask` keeps any of, at least one
        and never all (ties: lower index first); a mask, where filter_prune removes them (which layers to prune,
        not the classifier, is the caller's)."""
        rate, mask = check_rate(rate), check_tensor_mask(t, default_mask)
        if t.dim() < 1 or t.shape[0] == 0:
            raise ValueError(f"t must be a weight with filters along dim 0, got shape {tuple(t.shape)}")
        rows = mask.reshape(t.shape[0], -1)
        alive = rows.any(1).nonzero().flatten()
        n = alive.numel()
        k = min(n - 1, max(1, count_of(rate, n)))  # as filter_prune
        if k < 1:
            return mask.clone()
        l1 = t.detach().masked_fill(~mask, 0).double().abs().reshape(t.shape[0], -1).sum(1)[alive]
        drop = alive[torch.argsort(l1, stable=True)[:k]]
        keep = torch.ones(t.shape[0], dtype=torch.bool, device=mask.device)
        keep[drop] = False
        return mask & keep.reshape(-1, *([1] * (t.dim() - 1)))

    def next_sparsity(self, model, masks, rate, sparsity, original):
        # removing rate of a layer's filters also removes that share of the next layer's inputs
        # (~1 - (1 - rate)^2 of a middle layer's weights): the next round's counts, on a copy
        _check_no_pruned_masks(model, masks)
        trial = copy.deepcopy(model)
        filter_prune(trial, rate)
        return model_sparsity(trial, {}, original)

    def can_prune(self, model, masks):
        return any(g.layer.weight.shape[0] > 1 for g in filter_groups(model))
