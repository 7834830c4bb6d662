"""Durable names for the study's files (atomic_write, make_folder): engine/durable.py's fsync_dir and
make_dirs, which the engine's decision cache shares (the engine imports nothing of the study)."""
from __future__ import annotations

from ..engine.durable import _NO_DIR_FSYNC, fsync_dir, make_dirs  # noqa: F401

__all__ = ["fsync_dir", "make_dirs"]
