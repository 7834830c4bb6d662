"""Magnitude pruning on dense-masked and sparse layers (paper Algorithm 1's Prune and Perturb).

A model's prunable layers are its conv and linear layers (weights only: never biases or
BatchNorm). Each is either dense (`nn.Conv2d`/`nn.Linear`, with a bool mask kept here) or sparse
(`SparseConv2d`/`SparseLinear`, whose CSR *is* the mask). Pruning computes one exact global
threshold with the C++ `magnitude_threshold` op (ties broken by layer order, then flat index) and
shrinks every mask: masks only shrink.

Engine policy (`engine`): "dense" keeps dense masked layers (the reference), "sparse" makes every
layer sparse, "auto" makes a layer sparse once its sparsity reaches the crossover measured by
bench/kernels.py on CPU (SPARSE_FROM), where the C++ kernels beat dense masked GEMMs, provided
the layer is not tiny (SPARSE_MIN_WEIGHTS).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import ops
from .formats import CSR
from .nn import SPARSE_TYPES, SparseLinear

__all__ = ["prunable_layers", "masks_of", "global_prune", "apply_engine", "sparsity_after",
           "enforce_masks_", "mask_grads_", "model_sparsity", "ENGINES", "SPARSE_FROM"]

ENGINES = ("auto", "dense", "sparse")
# layer sparsity from which the sparse kernels win on CPU (bench/kernels.py crossovers, README), and
# the weight count below which a layer stays dense (a 512->10 classifier costs ~0.1 ms either way,
# and the op's fixed overhead loses to a tiny dense GEMM)
SPARSE_FROM = {"linear": 0.7, "conv": 0.8}
SPARSE_MIN_WEIGHTS = 16384


def _is_sparse(m: nn.Module) -> bool:
    return type(m) in SPARSE_TYPES.values()


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every conv/linear layer, dense or sparse, in module order."""
    return [(n, m) for n, m in model.named_modules() if type(m) in SPARSE_TYPES or _is_sparse(m)]


def _weight_and_mask(m: nn.Module, masks: dict, name: str):
    if _is_sparse(m):
        return m.weight.values.detach(), None
    return m.weight.detach(), masks.get(name)


def masks_of(model: nn.Module, masks: dict | None = None) -> dict[str, torch.Tensor]:
    """Bool mask of every prunable layer: from the CSR for sparse layers, else from `masks`
    (all-True when a dense layer has none yet)."""
    masks = masks or {}
    out = {}
    for n, m in prunable_layers(model):
        if _is_sparse(m):
            out[n] = m.weight.mask()
        else:
            out[n] = masks.get(n, torch.ones_like(m.weight, dtype=torch.bool))
    return out


def sparsity_after(rounds: int, rate: float) -> float:
    """Target sparsity after k rounds pruning `rate` of the remaining weights: 1 - (1 - rate)^k."""
    return 1.0 - (1.0 - rate) ** rounds


def model_sparsity(model: nn.Module, masks: dict | None = None) -> float:
    """Fraction of pruned weights over all prunable layers."""
    total = kept = 0
    for n, mk in masks_of(model, masks).items():
        total += mk.numel()
        kept += int(mk.sum())
    return 1.0 - kept / total if total else 0.0


def _prune_dense_mask(w: torch.Tensor, mask: torch.Tensor | None, thr: float, ties: int):
    """New mask: drop |w| < thr and the first `ties` surviving |w| == thr (flat order)."""
    a = w.abs()
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


def global_prune(model: nn.Module, masks: dict, rate: float, *, scope: str = "global") -> dict:
    """Prune `rate` of the surviving weights (global: one threshold over all layers; layer: the
    same fraction in every layer). Dense layers get a shrunken mask in the returned dict; sparse
    layers are re-packed in place (smaller CSR). Weights under pruned positions are zeroed."""
    if not (0.0 < rate < 1.0):
        raise ValueError(f"rate must be in (0, 1), got {rate}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    layers = prunable_layers(model)
    groups = [layers] if scope == "global" else [[l] for l in layers]
    new_masks = dict(masks)
    for group in groups:
        pairs = [_weight_and_mask(m, masks, n) for n, m in group]
        thr, ties = ops.magnitude_threshold([w for w, _ in pairs], rate, [mk for _, mk in pairs])
        for name, m in group:
            if _is_sparse(m):
                ties -= _prune_sparse_(m, thr, ties)
            else:
                keep, used = _prune_dense_mask(m.weight.detach(), masks.get(name), thr, ties)
                ties -= used
                new_masks[name] = keep
                with torch.no_grad():
                    m.weight.mul_(keep)
    return new_masks


def _prune_sparse_(m: nn.Module, thr: float, ties: int) -> int:
    """Re-pack the layer's CSR under the threshold; returns the ties it consumed."""
    w = m.weight
    vals = w.values.detach()
    crow, col, new_vals, keep = ops.csr_prune(w.crow_indices, w.col_indices, vals, thr, ties)
    used = int((vals.abs() == thr).sum()) - int((new_vals.abs() == thr).sum())
    m.weight = CSR(crow, col, new_vals.requires_grad_(True), w.shape, validate=False)
    if len(w.shape) == 4:
        m.weight.csc()  # conv input gradients read the transposed index: build it once, now
    return used


def apply_engine(model: nn.Module, masks: dict, engine: str) -> dict:
    """Convert layers per the engine policy. Returns the masks still needed by dense layers."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    to_sparse = {}
    for name, m in prunable_layers(model):
        if _is_sparse(m) or engine == "dense":
            continue
        mk = masks.get(name, torch.ones_like(m.weight, dtype=torch.bool))
        kind = "linear" if isinstance(m, nn.Linear) else "conv"
        sp = 1.0 - int(mk.sum()) / mk.numel()
        if engine == "sparse" or (sp >= SPARSE_FROM[kind] and mk.numel() >= SPARSE_MIN_WEIGHTS):
            to_sparse[name] = mk
    if to_sparse:
        from .nn import sparsify_
        sparsify_(model, to_sparse)
    return {n: mk for n, mk in masks.items() if n not in to_sparse and not _is_sparse(model.get_submodule(n))}


def mask_grads_(model: nn.Module, masks: dict) -> None:
    """Dense masked training: pruned weights get no gradient (so no momentum, no decay)."""
    for name, mk in masks.items():
        m = model.get_submodule(name)
        if m.weight.grad is not None:
            m.weight.grad.mul_(mk)


@torch.no_grad()
def enforce_masks_(model: nn.Module, masks: dict) -> None:
    for name, mk in masks.items():
        model.get_submodule(name).weight.mul_(mk)


@torch.no_grad()
def load_weights_under_masks_(model: nn.Module, source_state: dict, masks: dict) -> None:
    """Perturbation helper (rewind / reinit): take each prunable layer's dense weights from
    `source_state` (a dense model's state_dict) under the current pattern; other tensors
    (biases, BatchNorm) are taken from the source too."""
    for name, m in prunable_layers(model):
        w = source_state[f"{name}.weight"]
        if _is_sparse(m):
            m.weight.values.copy_(w.reshape(w.shape[0], -1)[m.weight.row_indices(), m.weight.col_indices.long()])
        else:
            m.weight.copy_(w * masks.get(name, torch.ones_like(w, dtype=torch.bool)))
    own = model.state_dict()
    for k, v in source_state.items():
        layer = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and any(layer == n for n, _ in prunable_layers(model)):
            continue
        if k in own and own[k].shape == v.shape:
            own[k].copy_(v)
