"""`sparsetrain.nn`: the sparse layers (public API; implemented in sparsetrain/engine/nn.py)."""
from .engine.nn import SPARSE_TYPES, SparseConv2d, SparseLinear, densify_, sparsify_

__all__ = ["SparseLinear", "SparseConv2d", "sparsify_", "densify_", "SPARSE_TYPES"]
