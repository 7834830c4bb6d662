"""Perturbations after a pruning round (the paper's Algorithm 1 `Perturb`, Fig. 3).

"none" keeps the surviving weights (the paper's default: only the optimizer and LR schedule
restart); "rewind" puts back the weights of an early iteration of the dense training; "reinit"
draws fresh initial weights. Either way only the surviving positions are written, so masks (and
sparse patterns) do not change, and the other tensors (biases, BatchNorm) come from the source.
Where the source is (model, state), which iteration to rewind to and how to seed a re-init is
the caller's business (the study's loop).
"""
from __future__ import annotations

import torch
from torch import nn

from ..engine.nn import check_masks, is_sparse, prunable_layers

__all__ = ["PERTURBATIONS", "load_weights_under_masks_"]

PERTURBATIONS = ("none", "rewind", "reinit")


@torch.no_grad()
def load_weights_under_masks_(model: nn.Module, source_state: dict, masks: dict) -> None:
    """Take each prunable layer's dense weights from `source_state` (a state_dict of a model of
    the same shapes) under the current pattern; other tensors (biases, BatchNorm) too."""
    masks = check_masks(model, masks)
    layers = prunable_layers(model)
    for name, m in layers:
        if f"{name}.weight" not in source_state:
            raise ValueError(f"source_state has no {name + '.weight'!r}: give a state_dict of a model with the "
                             f"same prunable layers (got {len(source_state)} keys)")
        w = source_state[f"{name}.weight"].to(m.weight.device)  # (a CPU source for a model on a GPU)
        if tuple(w.shape) != tuple(m.weight.shape):
            raise ValueError(f"source_state[{name + '.weight'!r}] has shape {tuple(w.shape)}, the layer "
                             f"{tuple(m.weight.shape)}")
        if is_sparse(m):
            m.weight.values.copy_(w.reshape(w.shape[0], -1)[m.weight.row_indices(), m.weight.col_indices.long()])
        else:
            m.weight.copy_(w.masked_fill(~masks[name], 0) if name in masks else w)  # (not w * mask: inf * 0)
    names = {n for n, _ in layers}
    own = model.state_dict()
    for k, v in source_state.items():
        if k.endswith(".weight") and k.rsplit(".", 1)[0] in names:
            continue
        if k in own and own[k].shape == v.shape:
            own[k].copy_(v)
