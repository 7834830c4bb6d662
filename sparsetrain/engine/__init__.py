"""The engine: sparse formats (CSR, BSR), the sparsetrain ops (one table row per op), sparse layers
and model conversion, and the policy of when a layer goes sparse. It knows nothing of pruning
rules or the DSD2 study.

Modules, bottom up: backend (kernel mode), hooks (a measurement pass in eval mode) -> formats (CSR)
-> bsr (BSR, BSRLinear) -> ops (the op table; loads the C++ extension) -> nn (layers, masks)
-> placeholders (the BN, ReLU and pool modules a fused model keeps at their names) -> fused (sparse
conv + BatchNorm + ReLU as one layer) -> replicated (a sparse classifier on a replicated 1x1 map)
-> fuse (fuse_/unfuse_: the fx pattern rewrite) -> convert (sparsify_/densify_) -> policy.
"""
