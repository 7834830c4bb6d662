"""Triton kernels, shipped as `sparsetrain.kernels` (nothing is imported here: triton loads only
when a kernel module is used).

sparse_linear  CSR SpMM forward, transposed SpMM input gradient, SDDMM weight gradient
bsr_matmul     block-sparse (BSR 16/32/64) products with tl.dot on the stored blocks
sparse_conv2d  direct (implicit-GEMM) sparse convolution: forward (with the fused layer's epilogue:
               ReLU, BatchNorm sums, ReLU counts, a deferred BN on the input), input and weight gradients
bn_act         the fused conv -> BatchNorm -> ReLU layer's other ops (engine/fused.py on a GPU)

Registered as the ops' CUDA kernels by sparsetrain/engine/ops.py's table; on CPU tensors they run under
TRITON_INTERPRET=1 with `sparsetrain.use_backend("triton")`.
"""
