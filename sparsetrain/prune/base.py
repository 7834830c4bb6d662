"""The pruning-rule interface and its registry.

A rule turns scores into masks, one round at a time: each round removes `rate` of what survives,
chosen by the lowest scores (|w| per weight, l1 norm per filter, Frobenius norm per block), and
masks only shrink. Dense layers carry a bool mask in the `masks` dict ({layer name: mask}); sparse
layers (engine CSR) are their own mask and are re-packed in place.

    rule = make_rule("unstructured", scope="global")
    masks = rule.prune(model, masks, rate=0.2)      # new masks of the dense layers
    rule.can_prune(model, masks)                     # can another round remove anything?
    rule.compute_mask(weight, mask, 0.2)             # one tensor's next mask, as torch's prune methods
    rule.needs_dense                                 # must layers stay dense masked?

Adding a rule: a subclass in its own module under sparsetrain/prune/ decorated with `@register`,
imported in sparsetrain/prune/__init__.py; the experiment's `--structure` choices come from RULES.
"""
from __future__ import annotations

import inspect
import math
import numbers

import torch
from torch import nn

from ..engine.args import MATERIALIZE, check_bool_mask, check_weight
from ..engine.index import check_index
from ..engine.nn import stored_weight, valued_masks  # (valued_masks: re-exported)

__all__ = ["PruningRule", "RULES", "register", "make_rule", "check_rate", "check_scope", "SCOPES", "count_of", "check_finite",
           "check_sparsity", "check_tensor_mask", "valued_masks"]

SCOPES = ("global", "layer")
RULES: dict[str, type["PruningRule"]] = {}


def check_rate(rate) -> float:
    """`rate` as a float if it is a real number in (0, 1): TypeError for another type, ValueError outside."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):  # (a str, a tensor: the wrong type)
        raise TypeError(f"rate must be a number in (0, 1), got {type(rate).__name__} {rate!r}")
    if not 0.0 < float(rate) < 1.0:
        raise ValueError(f"rate must be a number in (0, 1), got {rate!r}")  # (numpy floats too)
    return float(rate)


def check_sparsity(sparsity) -> float:
    """`sparsity` as a float if it is a real number in [0, 1]: TypeError for another type (a str, a bool, None:
    a ValueError before 2026-12-06), ValueError outside (NaN too)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"sparsity must be a number in [0, 1], got {type(sparsity).__name__} {sparsity!r}")
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")  # (numpy floats too)
    return float(sparsity)


def count_of(rate: float, n: int) -> int:
    """floor(rate * n), as the C++ magnitude_threshold counts: the 1e-12 allowance keeps a product that
    float rounding puts just under an integer (0.7 * 90 = 62.99999...) at that integer, and a rate
    under 1 never counts all n (the allowance took 1 - 1e-13 there)."""
    return min(n if rate >= 1 else max(n - 1, 0), math.floor(rate * n * (1 + 1e-12)))


def check_finite(layers, masks: dict | None = None) -> None:
    """Refuse NaN weights that `masks` keep (a diverged run): they have no magnitude or norm to rank by; ±inf ones
    that `masks` keep (an overflowed, diverged weight: before 2026-12-06 ranked as the largest and kept, its layer's
    output inf or NaN from then on); a NaN or inf under a pruned position is a pruned weight, set to 0 by the round
    (a NaN there was refused before 2026-12-06); and meta ones (none at all: torch's error from inside,
    "Tensor.item() cannot be called on meta tensors", before); and a sparse layer's index that to_empty() left
    uninitialised (the selection failed inside on it before); and, outside inference mode, inference tensors (a
    model built under torch.inference_mode(): the round's in-place zeroing was torch's "Inplace update to inference
    tensor" RuntimeError, before 2026-12-08)."""
    for name, m in layers:
        if stored_weight(m).is_meta:
            raise ValueError(f"layer {name!r}'s weight is a meta tensor (a shape without values): {MATERIALIZE}")
        if stored_weight(m).is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError(f"layer {name!r}'s weight is an inference tensor (the model was built under "
                             "torch.inference_mode()): pruning changes weights in place, which torch allows only "
                             "inside inference mode; build the model outside it, or load its state_dict into one "
                             "built outside")
        if not isinstance(m.weight, torch.Tensor):  # (to_empty() without a load: its garbage index failed inside)
            try:
                check_index(m.weight)
            except ValueError as e:
                raise ValueError(f"layer {name!r}: {e}") from None
        w = stored_weight(m).detach()
        mk = (masks or {}).get(name) if isinstance(m.weight, torch.Tensor) else None  # (CSR values: all live)
        live = (lambda t: t) if mk is None else (lambda t: t & mk.to(w.device))  # (the kept positions' only)
        if bool(live(torch.isnan(w)).any()):
            raise ValueError(f"layer {name!r} has NaN weights: they cannot be ranked by magnitude")
        if bool(live(torch.isinf(w)).any()):
            raise ValueError(f"layer {name!r} has inf weights (a diverged model): they cannot be ranked by magnitude; "
                             "train again with a lower learning rate")


def check_tensor_mask(t, default_mask) -> torch.Tensor:
    """compute_mask's arguments: `t` a floating-point tensor with values, `default_mask` None or a bool tensor
    of t's shape (TypeError for another type or dtype, ValueError for another shape), no NaN or ±inf where
    `default_mask` keeps (as check_finite). Returns the mask (all-True for None) on t's device."""
    check_weight(t, default_mask)
    if default_mask is None:
        default_mask = torch.ones_like(t, dtype=torch.bool)
    check_bool_mask(default_mask, t.shape, f"default_mask must be None or a bool tensor of t's shape {tuple(t.shape)}")
    default_mask = default_mask.to(t.device)
    w = t.detach()
    if bool((torch.isnan(w) & default_mask).any()):  # (anywhere before 2026-12-06: a pruned weight is not ranked)
        raise ValueError("t has NaN entries where default_mask keeps: they cannot be ranked by magnitude")
    if bool((torch.isinf(w) & default_mask).any()):
        raise ValueError("t has inf entries where default_mask keeps (a diverged model): they cannot be ranked")
    return default_mask


def check_scope(scope) -> str:
    """`scope` if it is one of SCOPES, else ValueError."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return scope


class PruningRule:
    """One round of pruning: `prune` (scores -> smaller masks) and `can_prune`.

    needs_dense: the rule's structure is not what the CSR engine exploits (or it changes layer
    shapes), so its layers stay dense masked layers whatever the engine policy says."""

    name: str = ""
    needs_dense: bool = False

    def prune(self, model: nn.Module, masks: dict, rate: float) -> dict:
        """One round: remove `rate` of what survives; returns the masks ({layer name: bool mask}) dense
        layers need (sparse layers shrink in place)."""
        raise NotImplementedError

    def can_prune(self, model: nn.Module, masks: dict) -> bool:
        """Whether another round can remove anything."""
        raise NotImplementedError

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor | None, rate: float) -> torch.Tensor:
        """The bool mask one round of this rule gives the single weight tensor `t` ([out, ...], scored as the
        rule scores a layer's weights) that `default_mask` (a bool tensor of t's shape, None: all kept) keeps
        now: within `default_mask` (masks only shrink), the weights under it unchanged (torch.nn.utils.prune's
        BasePruningMethod.compute_mask(t, default_mask), the amount given as `rate`). One tensor is one layer:
        `scope` does not apply."""
        raise NotImplementedError

    def next_sparsity(self, model: nn.Module, masks: dict, rate: float, sparsity: float, original: int) -> float:
        """The sparsity after one more round, from `sparsity` now (against `original` weights):
        1 - (1 - sparsity)(1 - rate) for a rule that prunes `rate` of the surviving weights."""
        rate = check_rate(rate)  # (1.5 gave a "sparsity" of 1.5, a str a TypeError from the arithmetic)
        return 1.0 - (1.0 - check_sparsity(sparsity)) * (1.0 - rate)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"


def register(cls: type[PruningRule]) -> type[PruningRule]:
    """Class decorator: make the rule available by its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, PruningRule)):  # (int: AttributeError 'name' before)
        raise TypeError(f"register takes a PruningRule subclass, got {cls!r}")
    if not cls.name or cls.name in RULES:
        raise ValueError(f"a pruning rule needs a new, non-empty name, got {cls.name!r}")
    RULES[cls.name] = cls
    return cls


def make_rule(name: str, **options) -> PruningRule:
    """The registered rule `name`, built with the options it takes (options only other rules take
    are ignored, so one call site can pass scope and block to every rule; an option no rule takes,
    a misspelling, is refused)."""
    if not isinstance(name, str):  # (a list: "unhashable type: 'list'" from the lookup before)
        raise TypeError(f"name must be a str, one of: {', '.join(RULES)}; got {type(name).__name__} {name!r}")
    if name not in RULES:
        raise ValueError(f"unknown pruning rule {name!r}; known: {', '.join(RULES)}")
    known = {k for rule in RULES.values() for k in inspect.signature(rule).parameters}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"make_rule got unknown option(s) {', '.join(map(repr, unknown))}; "
                        f"the rules take: {', '.join(sorted(known))}")
    cls = RULES[name]
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted})
