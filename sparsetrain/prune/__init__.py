"""Pruning rules: they know the engine (layers, CSR, masks), not the study.

`make_rule(name, **options)` gives a `PruningRule` by name; `RULES` lists them:
unstructured (magnitude, global or per layer), filter (l1, removes channels), block (tiles by
norm). `perturb` holds what happens to the surviving weights after a round.
"""
from .base import RULES, SCOPES, PruningRule, make_rule, register
from .block import BlockRule, block_mask, block_prune
from .filter import FilterRule, filter_groups, filter_prune, fit_state, keep_channels_
from .magnitude import MagnitudeRule, global_prune, sparsity_after
from .perturb import PERTURBATIONS, load_weights_under_masks_

__all__ = ["RULES", "SCOPES", "PruningRule", "make_rule", "register", "MagnitudeRule", "FilterRule", "BlockRule",
           "global_prune", "sparsity_after", "filter_prune", "filter_groups", "keep_channels_", "fit_state",
           "block_mask", "block_prune", "PERTURBATIONS", "load_weights_under_masks_"]
