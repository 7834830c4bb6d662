"""Typed wrappers of the CPU-only pruning and entropy ops (`sparsetrain::magnitude_threshold`, `csr_prune`,
`relu_count_`): their rows (fakes) are in ops.py, which re-exports these; the C++ kernels are in csrc/cpu/.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

from .args import is_int
from .extension import _C  # noqa: F401  (the C++ extension: registers the schemas and CPU kernels)

__all__ = ["magnitude_threshold", "csr_prune", "relu_count_"]


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):  # (None or a list: an AttributeError or the dispatcher's schema error)
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _tensor_list(items, name: str, none_ok: bool = False) -> list:
    """`items` (a list, tuple or other iterable of tensors, or of tensors and None where `none_ok`) as a list;
    TypeError otherwise (a bare tensor was split into its rows, None and a list of lists raised AttributeError)."""
    if isinstance(items, torch.Tensor) or not isinstance(items, Iterable):
        raise TypeError(f"{name} must be a list of tensors, got {type(items).__name__}")
    items = list(items)
    for i, t in enumerate(items):
        if not (isinstance(t, torch.Tensor) or none_ok and t is None):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor{' or None' if none_ok else ''}, got {type(t).__name__}")
    return items


def magnitude_threshold(tensors, fraction: float, masks=None):
    """Exact global magnitude selection. Among the surviving entries (mask True, or all when the mask is
    None) sorted by (|w|, list position, flat index), the first k = floor(fraction * n_surviving) are to
    be pruned: all |w| < threshold and the first `ties` with |w| == threshold. Returns (threshold, ties)."""
    if not isinstance(fraction, numbers.Real) or isinstance(fraction, bool):  # (numpy floats too)
        raise TypeError(f"fraction must be a float, got {type(fraction).__name__}")
    tensors = _tensor_list(tensors, "tensors")
    masks = [None] * len(tensors) if masks is None else _tensor_list(masks, "masks", none_ok=True)
    if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tensors + masks):  # (a meta fake: garbage)
        raise ValueError("magnitude_threshold runs on CPU tensors and masks (move them with .cpu())")
    if len(masks) != len(tensors):
        raise ValueError(f"masks must have one entry per tensor ({len(tensors)}), got {len(masks)}")
    try:
        value = float(fraction)
    except OverflowError:  # (an int past float's range, 10**400: the op's range error below, not float()'s)
        value = math.inf if fraction > 0 else -math.inf
    if not tensors:  # nothing to dispatch on: an empty placeholder, so that the op still checks `fraction`
        tensors, masks = [torch.empty(0)], [None]  # (its (0.0, 0); 1.5 was returned as (0.0, 0) too)
    thr, ties = torch.ops.sparsetrain.magnitude_threshold([t.detach() for t in tensors], masks, value)
    return float(thr), int(ties)


def csr_prune(crow, col, values, threshold: float, max_ties: int = 0):
    """Drop CSR entries with |v| < threshold and the first `max_ties` with |v| == threshold: (crow, col,
    values, keep), keep the kept entries' positions among the old values."""
    for name, t in (("crow", crow), ("col", col), ("values", values)):
        _check_tensor(t, name)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):  # (a str was parsed by float())
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__} {threshold!r}")
    if not is_int(max_ties):  # (1.7 was truncated to 1)
        raise TypeError(f"max_ties must be an int, got {type(max_ties).__name__} {max_ties!r}")
    if any(t.device.type != "cpu" for t in (crow, col, values)):  # (meta: torch's "data-dependent shape" error)
        raise ValueError(f"csr_prune runs on CPU tensors (move them with .cpu()), got "
                         f"{sorted({str(t.device) for t in (crow, col, values)})}")
    # (any budget >= nnz means all ties: 2**63 and more failed the schema's int64 as "Expected a value of type
    # 'int' ... but instead found type 'int'")
    ties = min(int(max_ties), 2**63 - 1)
    return torch.ops.sparsetrain.csr_prune(crow, col, values.detach(), float(threshold), ties)


def relu_count_(counts: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """counts[n] += number of samples b with pre[b, n] > 0 (n over the flattened non-batch dims)."""
    _check_tensor(counts, "counts")
    _check_tensor(pre, "pre")
    if counts.dim() != 1:  # (a [2, 2] counts was filled as if flat: not the [neurons] the result is read as)
        raise ValueError(f"counts must be 1-D [neurons] (prod of pre.shape[1:] entries), got shape {tuple(counts.shape)}")
    torch.ops.sparsetrain.relu_count_(counts, pre.detach())
    return counts
