"""A compressed (CSR, or BSR's block) pattern's checks, which formats.py's CSR and bsr.py's BSR run
where a pattern is built from its parts (its transposed index: index.py)."""
from __future__ import annotations

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
