"""Typed wrappers of the CPU-only pruning and entropy ops (`sparsetrain::magnitude_threshold`, `csr_prune`,
`relu_count_`): their rows (fakes) are in ops.py, which re-exports these; the C++ kernels are in csrc/cpu/.
"""
from __future__ import annotations

import numbers

import torch

from .extension import _C  # noqa: F401  (the C++ extension: registers the schemas and CPU kernels)

__all__ = ["magnitude_threshold", "csr_prune", "relu_count_"]


def magnitude_threshold(tensors, fraction: float, masks=None):
    """Exact global magnitude selection. Among the surviving entries (mask True, or all when the mask is
    None) sorted by (|w|, list position, flat index), the first k = floor(fraction * n_surviving) are to
    be pruned: all |w| < threshold and the first `ties` with |w| == threshold. Returns (threshold, ties)."""
    if not isinstance(fraction, numbers.Real) or isinstance(fraction, bool):  # (numpy floats too)
        raise TypeError(f"fraction must be a float, got {type(fraction).__name__}")
    tensors = list(tensors)
    masks = [None] * len(tensors) if masks is None else list(masks)
    if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tensors + masks):  # (a meta fake: garbage)
        raise ValueError("magnitude_threshold runs on CPU tensors and masks (move them with .cpu())")
    if len(masks) != len(tensors):
        raise ValueError(f"masks must have one entry per tensor ({len(tensors)}), got {len(masks)}")
    if not tensors:  # nothing to dispatch on: nothing to prune
        return 0.0, 0
    thr, ties = torch.ops.sparsetrain.magnitude_threshold([t.detach() for t in tensors], masks, float(fraction))
    return float(thr), int(ties)


def csr_prune(crow, col, values, threshold: float, max_ties: int = 0):
    """Drop CSR entries with |v| < threshold and the first `max_ties` with |v| == threshold: (crow, col,
    values, keep), keep the kept entries' positions among the old values."""
    return torch.ops.sparsetrain.csr_prune(crow, col, values.detach(), float(threshold), int(max_ties))


def relu_count_(counts: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """counts[n] += number of samples b with pre[b, n] > 0 (n over the flattened non-batch dims)."""
    torch.ops.sparsetrain.relu_count_(counts, pre.detach())
    return counts
