"""`sparsetrain.nn`: the sparse layers (public API; implemented in sparsetrain/engine/nn.py,
fused.py and convert.py)."""
from .engine.fuse import fuse_, unfuse_
from .engine.fused import FusedBatchNorm2d, FusedReLU, SparseConvBNReLU
from .engine.convert import densify_, sparsify_
from .engine.nn import SPARSE_TYPES, SparseConv2d, SparseLinear

__all__ = ["SparseLinear", "SparseConv2d", "SparseConvBNReLU", "FusedBatchNorm2d", "FusedReLU", "sparsify_",
           "densify_", "fuse_", "unfuse_", "SPARSE_TYPES"]
