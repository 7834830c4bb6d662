"""A sparse weight's index: its transposed form (CSC), and the guard against the index buffers being
changed in place behind the weight's back.

Every buffer of a module is fair game to code written for dense models: an EMA that averages the
buffers too (`torch.optim.swa_utils.AveragedModel(..., use_buffers=True)`, torchvision's EMA) writes
`decay·a + (1 − decay)·b`, a float, into each integer index buffer, truncated: 288 · 0.9 + 288 · 0.1 is
287.99999999999997, stored as 287. The pattern then changes silently (a column moved) or the op's checks
fail far from the cause. So the weight seals its index where it builds or moves it (a position-weighted
sum of the five buffers, and their version counters); at each forward a changed version counter makes
the sum be recomputed (O(nnz), only then), and a different sum is refused by name.
"""
from __future__ import annotations

import torch

__all__ = ["transpose_index", "seal_index", "check_index", "index_state", "seal_moved", "still_unset", "UNSET"]

_BUFFERS = ("crow_indices", "col_indices", "ccol_indices", "row_indices_t", "perm")
# the seal of an index a move did not keep (to_empty(): uninitialised memory) until a load builds it (a str:
# deepcopy and pickle keep it)
UNSET = "unset"


def transpose_index(crow: torch.Tensor, col: torch.Tensor, n_cols: int):
    """CSC of a CSR pattern: (ccol int64 [n_cols+1], row_t int32 [nnz], perm int64 [nnz]),
    where perm[j] is the position in `values` of the j-th CSC entry (stable: rows ascending). On the
    meta device, tensors of those shapes (no values to sort: a layer built or loaded there)."""
    n_rows = crow.numel() - 1
    if crow.is_meta or col.is_meta:  # (torch.bincount has no meta kernel: a RuntimeError from inside before)
        nnz, meta = col.numel(), dict(device="meta")
        return (torch.empty(n_cols + 1, dtype=torch.int64, **meta), torch.empty(nnz, dtype=torch.int32, **meta),
                torch.empty(nnz, dtype=torch.int64, **meta))
    rows = torch.repeat_interleave(torch.arange(n_rows, device=crow.device), crow.diff())
    perm = torch.argsort(col.long() * max(n_rows, 1) + rows, stable=True)
    counts = torch.bincount(col.long(), minlength=n_cols)
    ccol = torch.zeros(n_cols + 1, dtype=torch.int64, device=crow.device)
    torch.cumsum(counts, 0, out=ccol[1:])
    return ccol, rows[perm].to(torch.int32), perm


def _versions(tensors) -> tuple | None:
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:  # (inference tensors have no version counter, and cannot be changed outside it)
        return None


def _checksum(tensors) -> int:
    """Σ over the buffers of Σᵢ (i + 1)·tᵢ: any one entry changed changes it (a truncation lowers it)."""
    total = 0
    for t in tensors:
        flat = t.detach().reshape(-1).to(torch.int64)
        total += int((flat * torch.arange(1, flat.numel() + 1, device=flat.device)).sum())
    return total


def seal_index(w) -> None:
    """Records `w`'s index buffers (a CSR or BSR: after building, loading or moving them)."""
    tensors = tuple(getattr(w, n) for n in _BUFFERS)
    if any(type(t) is not torch.Tensor or t.is_meta for t in tensors) or torch.compiler.is_compiling():
        w._index_seal = None  # (fake, meta or traced tensors: no values to sum)
        return
    with torch.no_grad():
        w._index_seal = (tensors, _checksum(tensors), _versions(tensors))


def index_state(w):
    """`w`'s index before a move, for seal_moved: UNSET, "meta", or the sum its seal holds where the seal is
    of these buffers (the same tensors; summed again where their versions moved on), ("changed", that sum) where
    they were changed in place since (an EMA), else None (not this seal's buffers)."""
    seal = w.__dict__.get("_index_seal")
    tensors = tuple(map(w._buffers.get, _BUFFERS))
    if isinstance(seal, str) or any(t is not None and t.is_meta for t in tensors):
        return UNSET if isinstance(seal, str) else "meta"
    if seal is None or any(a is not b for a, b in zip(seal[0], tensors)):
        return None
    if _versions(tensors) != seal[2]:  # (a deepcopy's or torch.load's start at 0: to_empty() then kept the garbage)
        with torch.no_grad():
            return seal[1] if _checksum(tensors) == seal[1] else ("changed", seal[1])
    return seal[1]


def seal_moved(w, before) -> None:
    """seal_index after a move (`before`: index_state(w) then): an index whose entries the move did not keep
    (to_empty(): from the meta device, or another sum) is UNSET, refused by check_index until a load."""
    seal_index(w)
    seal = w._index_seal
    if seal is not None and isinstance(before, tuple):  # (changed in place before: refused still, by the sum built;
        w._index_seal = (seal[0], before[1], ())  # resealed, an EMA's truncated index ran silently after .to())
    elif seal is not None and (before in (UNSET, "meta") or (isinstance(before, int) and seal[1] != before)):
        w._index_seal = UNSET


def still_unset(w, state_dict, prefix: str) -> bool:
    """An UNSET index (to_empty()) that a load brought no pattern for (strict=False without the layer's keys): left
    UNSET, not transposed (its garbage failed inside, "repeats can not be negative", before strict's missing keys)."""
    return isinstance(w.__dict__.get("_index_seal"), str) and prefix + "crow_indices" not in state_dict


def check_index(w, saving: bool = False) -> None:
    """ValueError when `w`'s index buffers were changed in place since `seal_index` (buffers swapped
    for other tensors, as torch.func.functional_call does, are not this guard's: transposed() rebuilds),
    or are uninitialised (to_empty() without a load; `saving`: passed, state_dict() of a module to load into)."""
    seal = w.__dict__.get("_index_seal")
    if isinstance(seal, str):
        if saving:
            return
        raise ValueError(
            f"the {type(w).__name__} weight's index (crow_indices, col_indices) is uninitialised memory: to_empty() "
            "leaves the sparse index uninitialised, and only a load gives a sparse layer its pattern; load a "
            "state_dict (module.load_state_dict(...)) after to_empty() before running, re-initialising or "
            "densifying the layer")
    if seal is None or torch.compiler.is_compiling():
        return
    tensors = tuple(map(w._buffers.get, _BUFFERS))  # (per forward: the registry itself, not __getattr__)
    cast = next((t.dtype for t in tensors if t is not None and (t.is_floating_point() or t.is_complex())), None)
    if cast is not None:  # (`buf.data = buf.to(dtype)`: a float64 cast kept the seal's sum; the ops said less)
        raise TypeError(
            f"the {type(w).__name__} weight's index buffers ({', '.join(_BUFFERS)}) were cast to {cast}: code that "
            "casts every buffer of a model (DistributedDataParallel's mixed_precision with a buffer_dtype, a .data "
            "assignment) rounds the indices; leave buffer_dtype None, or name these buffers in DistributedDataParallel"
            "._set_params_and_buffers_to_ignore_for_model")
    if any(a is not b for a, b in zip(seal[0], tensors)):
        return
    versions = _versions(tensors)
    if versions is None or versions == seal[2]:
        return
    with torch.no_grad():
        if _checksum(tensors) != seal[1]:
            raise ValueError(
                f"the {type(w).__name__} weight's index buffers ({', '.join(_BUFFERS)}) were changed in place "
                "since it built them, so its sparsity pattern is no longer its own: code that averages a model's "
                "buffers (torch.optim.swa_utils.AveragedModel(..., use_buffers=True), an EMA) writes float "
                "arithmetic into them, truncated; average only floating-point tensors (an avg_fn returning the "
                "model's tensor for integer ones), or use_buffers=False and update_bn; a DistributedDataParallel "
                "built over ranks whose patterns differ broadcast rank 0's into them (give every rank the same masks "
                "or checkpoint)")
    w._index_seal = (seal[0], seal[1], versions)  # (rewritten with the same entries: an SWA of one pattern)
