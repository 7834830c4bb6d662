"""A compressed (CSR, or BSR's block) pattern's checks, which formats.py's CSR and bsr.py's BSR run
where a pattern is built from its parts (_pattern: the constructor arguments; _validate: the index;
its transposed index: index.py)."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

__all__: list[str] = []  # (the checks are the engine's own)


def _validate(crow, col, values, rows, cols, block: int = 0):
    """A compressed pattern [rows, cols] (block: of blocks, values [nnz, block, block]); the dtypes
    were checked by _pattern."""
    if crow.dim() != 1 or crow.numel() != rows + 1:
        raise ValueError(f"crow_indices must have shape [{rows + 1}], got {tuple(crow.shape)}")
    want = (col.numel(), block, block) if block else (col.numel(),)
    if col.dim() != 1 or values.shape != want:
        raise ValueError(f"col_indices must be 1-D and values of shape [nnz{', block, block' if block else ''}] = "
                         f"{list(want)}, got {tuple(col.shape)} and {tuple(values.shape)}")
    if crow.is_meta:  # (shapes only, nothing to read: the meta device, `with torch.device("meta")`)
        return
    if int(crow[0]) != 0 or int(crow[-1]) != col.numel():
        raise ValueError(f"crow_indices must start at 0 and end at nnz={col.numel()}, got "
                         f"{int(crow[0])}..{int(crow[-1])}")
    if bool((crow.diff() < 0).any()):
        raise ValueError("crow_indices must be non-decreasing")
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= cols):
        raise ValueError(f"col_indices must lie in [0, {cols}), got range "
                         f"[{int(col.min())}, {int(col.max())}]")
    if not _sorted_rows(crow, col, rows, cols):  # (a duplicate block: to_dense keeps one, a product sums both)
        raise ValueError(f"col_indices must be strictly increasing within each {'block ' if block else ''}row "
                         "(sorted, no duplicates)")


def _sorted_rows(crow, col, rows, cols) -> bool:
    """Within each row of a compressed index, the column ids strictly increase (no duplicates)."""
    if col.numel() < 2:
        return True
    rows_of = torch.repeat_interleave(torch.arange(rows, device=crow.device), crow.diff())
    return not bool(((rows_of * cols + col.long()).diff() <= 0).any())


def _pattern(crow_indices, col_indices, values, shape, block: int = 0, validate: bool = True):
    """A CSR's (block: a BSR's of block x block blocks) constructor arguments checked: (shape as a
    tuple, crow int64, col int32)."""
    if not isinstance(shape, Sequence) or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
                                                  for s in shape):
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or min(shape) < 0:
        raise ValueError(f"shape must have >= 2 non-negative dims, got {shape}")
    if not all(isinstance(t, torch.Tensor) for t in (crow_indices, col_indices, values)):
        raise TypeError("crow_indices, col_indices and values must be torch.Tensors")
    for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices)):
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if not values.is_floating_point():
        raise TypeError(f"values must be a floating-point tensor, got {values.dtype}")
    if not crow_indices.device == col_indices.device == values.device:
        raise ValueError(f"crow_indices, col_indices and values must be on one device, got {crow_indices.device}, "
                         f"{col_indices.device}, {values.device}")
    rows, cols = shape[0], math.prod(shape[1:])
    if block:
        rows, cols = -(-rows // block), -(-cols // block)
    if cols >= 2**31:  # (from_dense's int32 cast wrapped the columns: a corrupt container)
        raise ValueError(f"the weight has {cols} columns{' of blocks' if block else ''}: the int32 column index holds < 2^31")
    meta = col_indices.is_meta  # (no values to check: shapes only, as _validate)
    if validate and col_indices.numel() and not meta and int(col_indices.max()) >= cols:  # (before int32 wraps it)
        raise ValueError(f"col_indices must lie in [0, {cols}), got max {int(col_indices.max())}")
    crow = crow_indices.to(torch.int64).contiguous()
    col = col_indices.to(torch.int32).contiguous()
    if validate:
        _validate(crow, col, values, rows, cols, block)
    return shape, crow, col
