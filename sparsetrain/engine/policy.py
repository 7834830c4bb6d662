"""When a layer runs on the sparse kernels: the engine policy of a pruned model.

"dense" keeps dense masked layers (the reference), "sparse" makes every prunable layer sparse,
"auto" makes a layer sparse once its sparsity reaches the crossover measured by bench/kernels.py
on CPU (SPARSE_FROM), where the C++ kernels beat a dense masked GEMM, provided the layer is not
tiny (SPARSE_MIN_WEIGHTS). A layer never goes back to dense: its CSR is its mask. Sparse convs
followed by a BatchNorm are fused with it (engine/fused.py).
"""
from __future__ import annotations

import torch
from torch import nn

from .convert import sparsify_
from .fused import fuse_
from .nn import SparseConv2d, is_sparse, prunable_layers

__all__ = ["ENGINES", "SPARSE_FROM", "SPARSE_MIN_WEIGHTS", "apply_engine"]

ENGINES = ("auto", "dense", "sparse")
# layer sparsity from which the sparse kernels win on CPU (bench/kernels.py crossovers, README), and
# the weight count below which a layer stays dense (a 512->10 classifier costs ~0.1 ms either way,
# and the op's fixed overhead loses to a tiny dense GEMM)
SPARSE_FROM = {"linear": 0.7, "conv": 0.8}
SPARSE_MIN_WEIGHTS = 16384


def apply_engine(model: nn.Module, masks: dict, engine: str, fuse: bool = True) -> dict:
    """Convert layers per the engine policy; with `fuse`, then fuse every sparse conv -> [ReLU] ->
    BatchNorm -> [ReLU] not fused yet (engine/fused.py; skipped for a model torch.fx cannot
    trace). Returns the masks still needed by dense layers."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    to_sparse = {}
    for name, m in prunable_layers(model):
        if is_sparse(m) or engine == "dense":
            continue
        mk = masks.get(name, torch.ones_like(m.weight, dtype=torch.bool))
        kind = "linear" if isinstance(m, nn.Linear) else "conv"
        sp = 1.0 - int(mk.sum()) / mk.numel()
        if engine == "sparse" or (sp >= SPARSE_FROM[kind] and mk.numel() >= SPARSE_MIN_WEIGHTS):
            to_sparse[name] = mk
    if to_sparse:
        sparsify_(model, to_sparse)
    if fuse and any(type(m) is SparseConv2d for m in model.modules()):
        fuse_(model, strict=False)  # (a model fx cannot trace stays unfused: same results)
    return {n: mk for n, mk in masks.items() if n not in to_sparse and not is_sparse(model.get_submodule(n))}
