"""sparsetrain: sparse training for PyTorch with real sparse weights and kernels.

The public API (names load lazily, so importing sparsetrain never builds or loads the extension
until a sparse layer or op is used):

    sparsetrain.CSR, BSR                         sparse weight containers (engine/formats.py, bsr.py)
    sparsetrain.SparseLinear, SparseConv2d       layers (engine/nn.py; also sparsetrain.nn.*)
    sparsetrain.BSRLinear
    sparsetrain.sparsify_, densify_              swap layers of any model in place
    sparsetrain.dense_state_dict                 a sparse checkpoint for the dense model
    sparsetrain.SparseConvBNReLU, fuse_, unfuse_ sparse conv + BatchNorm (+ ReLU) as one layer
    sparsetrain.use_backend                      force the C++ or Triton kernels
    sparsetrain.global_prune, make_rule          pruning rules (prune/)

Packages: sparsetrain.engine (formats, ops, layers, policy), sparsetrain.prune (pruning rules),
sparsetrain.experiment (the DSD2 study), sparsetrain.kernels (Triton), sparsetrain.testing (the
dense references tests and benchmarks share).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "CSR": "sparsetrain.engine.formats",
    "BSR": "sparsetrain.engine.bsr",
    "BSRLinear": "sparsetrain.engine.bsr",
    "SparseLinear": "sparsetrain.engine.nn",
    "SparseConv2d": "sparsetrain.engine.nn",
    "sparsify_": "sparsetrain.engine.convert",
    "densify_": "sparsetrain.engine.convert",
    "dense_state_dict": "sparsetrain.engine.convert",
    "SparseConvBNReLU": "sparsetrain.engine.fused",
    "fuse_": "sparsetrain.engine.fuse",
    "unfuse_": "sparsetrain.engine.fuse",
    "use_backend": "sparsetrain.engine.backend",
    "current_backend": "sparsetrain.engine.backend",
    "global_prune": "sparsetrain.prune",
    "make_rule": "sparsetrain.prune",
}
_SUBMODULES = ("engine", "prune", "experiment", "kernels", "nn", "testing")

__all__ = [*_LAZY, *_SUBMODULES]


def __dir__():
    return sorted(set(globals()) | set(__all__))  # (the lazy names too: tab completion, dir())


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"sparsetrain.{name}")
    raise AttributeError(f"module 'sparsetrain' has no attribute {name!r}")
