"""sparsetrain: sparse training for PyTorch with real sparse weights and kernels.

Heavy pieces (the C++ extension) load lazily, so `sparsetrain.data` or `sparsetrain.models` import
without it.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "sparsify_": "sparsetrain.nn",
    "densify_": "sparsetrain.nn",
    "SparseLinear": "sparsetrain.nn",
    "SparseConv2d": "sparsetrain.nn",
    "CSR": "sparsetrain.formats",
    "use_backend": "sparsetrain.backend",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("nn", "ops", "formats", "pruning", "data", "models", "kernels"):
        return importlib.import_module(f"sparsetrain.{name}")
    raise AttributeError(f"module 'sparsetrain' has no attribute {name!r}")
