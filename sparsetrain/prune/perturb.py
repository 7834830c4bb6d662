"""Perturbations after a pruning round (the paper's Algorithm 1 `Perturb`, Fig. 3).

"none" keeps the surviving weights (the paper's default: only the optimizer and LR schedule
restart); "rewind" puts back the weights of an early iteration of the dense training; "reinit"
draws fresh initial weights. Either way only the surviving positions are written, so masks (and
sparse patterns) do not change, and the other tensors (biases, BatchNorm) come from the source.
Where the source is (model, state), which iteration to rewind to and how to seed a re-init is
the caller's business (the study's loop).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..engine.convert import dense_state_dict
from ..engine.nn import check_masks, check_pattern, is_sparse, prunable_layers

__all__ = ["PERTURBATIONS", "load_weights_under_masks_"]

PERTURBATIONS = ("none", "rewind", "reinit")


@torch.no_grad()
def load_weights_under_masks_(model: nn.Module, source_state: Mapping, masks: dict) -> None:
    """Take each prunable layer's dense weights from `source_state` (a state_dict of a model of the same
    shapes, dense or sparse, read as dense_state_dict gives it; a filter-pruned model's is cut to its
    channels by fit_state first) under the current pattern; other tensors (biases, BatchNorm) too. A
    missing, unexpected or differently shaped entry is refused before anything is written (one was skipped
    silently), and so is a mask for a sparse layer other than the pattern it stores (its pattern was used,
    the mask ignored)."""
    if not isinstance(source_state, Mapping):
        raise TypeError(f"source_state must be a state_dict (a Mapping of name -> tensor), got "
                        f"{type(source_state).__name__}")
    # (a sparse model's own state_dict, its CSR/BSR weights as <name>.values, ...: "has '0.weight.values', which the
    # model has not" before 2026-12-07; read as the dense weights they stand for)
    source_state = dense_state_dict(source_state)
    masks = check_masks(model, masks)
    layers = prunable_layers(model)
    for name, m in layers:  # (as global_prune: another mask for a sparse layer, a regrown one, was ignored silently)
        if is_sparse(m):
            check_pattern(name, m.weight.mask(), masks)
    own = model.state_dict()
    weights = {f"{name}.weight": m for name, m in layers}
    # a sparse layer's state holds its CSR (weight.values, ...): the source's dense weight replaces them
    rest = {k: v for k, v in own.items() if not any(k == w or k.startswith(w + ".") for w in weights)}
    for k, v in source_state.items():
        if k not in weights and k not in rest:
            raise ValueError(f"source_state has {k!r}, which the model has not: give a state_dict of a model "
                             "with the same layers")
    for k, target in [(k, tuple(m.weight.shape)) for k, m in weights.items()] + [(k, tuple(v.shape))
                                                                               for k, v in rest.items()]:
        if k not in source_state:
            raise ValueError(f"source_state has no {k!r}: give a state_dict of a model with the same layers "
                             f"(got {len(source_state)} keys)")
        v = source_state[k]
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != target:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"source_state[{k!r}] has shape {got}, the model's {target} (a filter-pruned "
                             "model takes fit_state's cut of a full-size state)")
    for name, m in layers:
        w = source_state[f"{name}.weight"].to(m.weight.device)  # (a CPU source for a model on a GPU)
        if is_sparse(m):
            m.weight.values.copy_(w.reshape(w.shape[0], -1)[m.weight.row_indices(), m.weight.col_indices.long()])
        else:
            m.weight.copy_(w.masked_fill(~masks[name], 0) if name in masks else w)  # (not w * mask: inf * 0)
    for k, v in rest.items():
        v.copy_(source_state[k])
