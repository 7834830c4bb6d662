// Every sparsetrain op's schema, declared once. Implementations: csrc/cpu/*.cpp (CPU, C++),
// kernels/*.py (CUDA, Triton, registered from Python). Fake (meta) impls and autograd formulas are
// registered once, in sparsetrain/engine/ops.py (one table row per op).
#include <Python.h>
#include <torch/library.h>

#include "common.h"

// Importing sparsetrain._C loads this library and registers the ops. Its functions: simd_bytes(),
// the register width the CPU kernels run with (64 AVX-512, 32 AVX2, 16 baseline; common.h), for
// tests and benchmark records; pool_bytes() and empty_pool(), the output pool's memory (common.h).
extern "C" {
static PyObject* simd_bytes(PyObject*, PyObject*) { return PyLong_FromLong(sparsetrain::kVecBytes); }
static PyObject* pool_bytes(PyObject*, PyObject*) { return PyLong_FromSize_t(sparsetrain::output_pool_bytes()); }
static PyObject* empty_pool(PyObject*, PyObject*) { return PyLong_FromSize_t(sparsetrain::empty_output_pool()); }

PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"simd_bytes", simd_bytes, METH_NOARGS, "register width (bytes) of the CPU kernels"},
      {"pool_bytes", pool_bytes, METH_NOARGS,
       "memory (bytes) the output pool's buffers occupy: the big outputs of the CPU kernels, kept for reuse"},
      {"empty_pool", empty_pool, METH_NOARGS,
       "free every buffer of the output pool that no tensor references; returns the bytes given back"},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&def);
}
}

TORCH_LIBRARY(sparsetrain, m) {
  // ---- linear: W is CSR [out, in] (crow int64 [out+1], col int32 [nnz], values [nnz]).
  // Every op of a pattern also takes its transposed (CSC) index (ccol int64 [in+1], row_t int32
  // [nnz], perm int64 [nnz]: values[perm[j]] is the j-th CSC entry), built once per pattern by the
  // CSR container: a backend that gathers by input column reads it, and in_features = ccol - 1.
  m.def(
      "sparse_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, "
      "Tensor ccol_indices, Tensor row_indices_t, Tensor perm, Tensor? bias) -> Tensor");
  m.def(
      "sparse_linear_grad_input(Tensor grad_out, Tensor crow_indices, Tensor col_indices, "
      "Tensor values, Tensor ccol_indices, Tensor row_indices_t, Tensor perm) -> Tensor");
  m.def(
      "sparse_linear_grad_weight(Tensor grad_out, Tensor x, Tensor crow_indices, "
      "Tensor col_indices) -> Tensor");
  // ---- pruning: exact global magnitude selection and CSR re-pack
  m.def("magnitude_threshold(Tensor[] tensors, Tensor?[] masks, float fraction) -> (Tensor, Tensor)");
  m.def(
      "csr_prune(Tensor crow_indices, Tensor col_indices, Tensor values, float threshold, "
      "int max_ties) -> (Tensor, Tensor, Tensor, Tensor)");
  // ---- entropy (Eq. 1): per-neuron count of positive pre-activations, accumulated in place
  m.def("relu_count_(Tensor(a!) counts, Tensor pre) -> ()");
  // ---- conv2d: W [O, C, kh, kw] is CSR [O, C*kh*kw] (column c*kh*kw + i*kw + j) plus its CSC
  // transpose, as for linear. Direct convolution, NCHW; dilation 1, groups 1.
  m.def(
      "sparse_conv2d(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, "
      "Tensor ccol_indices, Tensor row_indices_t, Tensor perm, int[2] kernel_size, int[2] stride, "
      "int[2] padding, Tensor? bias) -> Tensor");
  // the forward with a BatchNorm epilogue (engine/fused.py): y (relu(y) when relu) and stats
  // [2, O] float64, per channel the sum of the output and its centred sum of squares, sum (y - mean)^2;
  // with in_mean (float64), in_scale and in_shift x is the previous layer's BatchNorm input and the conv reads
  // act((x - in_mean) * in_scale + in_shift);
  // relu_counts (int64 [O * OH * OW]) += per output neuron, the samples with y > 0 (relu_count_'s
  // count, taken in the epilogue)
  m.def(
      "sparse_conv2d_stats(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, "
      "Tensor ccol_indices, Tensor row_indices_t, Tensor perm, int[2] kernel_size, int[2] stride, "
      "int[2] padding, Tensor? bias, bool relu, Tensor? in_mean=None, Tensor? in_scale=None, "
      "Tensor? in_shift=None, bool in_relu=False, Tensor(a!)? relu_counts=None) -> (Tensor, Tensor)");
  // the input gradient (+ grad_input_add, a gradient of x from another branch, added in the
  // kernel's epilogue: no extra pass)
  m.def(
      "sparse_conv2d_grad_input(Tensor grad_out, Tensor ccol_indices, Tensor row_indices_t, "
      "Tensor perm, Tensor values, int[2] input_size, int[2] kernel_size, int[2] stride, "
      "int[2] padding, Tensor? grad_input_add=None) -> Tensor");
  m.def(
      "sparse_conv2d_grad_weight(Tensor grad_out, Tensor x, Tensor crow_indices, "
      "Tensor col_indices, int[2] kernel_size, int[2] stride, int[2] padding) -> Tensor");
  m.def(
      "sparse_conv2d_backward(Tensor grad_out, Tensor x, Tensor crow_indices, Tensor col_indices, "
      "Tensor values, Tensor ccol_indices, Tensor row_indices_t, Tensor perm, int[2] kernel_size, "
      "int[2] stride, int[2] padding, Tensor? grad_input_add=None) -> (Tensor, Tensor)");
  // ---- the backward of sparse conv -> BatchNorm (-> + residual) (-> ReLU) in one op: the BN's sums,
  // then the conv backward computing dy while it packs it (engine/fused.py); returns (dx or empty,
  // dvalues or empty, BN dweight [C] f64, BN dbias [C] f64, grad_residual or empty, sum dy [C] f64
  // (a conv bias's gradient) or empty without grad_bias, and with in_sums (a deferred BatchNorm
  // given) that BatchNorm's backward sums [C_in, 2] f64 of dx, else empty; `sums`: this
  // BatchNorm's own sums, given by the conv after it (bn_sums), in place of its first pass;
  // `pool_indices`: grad_out is the gradient of the BN output's 2x2 max-pool, unpooled as it is read)
  m.def(
      "sparse_conv2d_bn_backward(Tensor grad_out, Tensor x, Tensor crow_indices, Tensor col_indices, "
      "Tensor values, Tensor ccol_indices, Tensor row_indices_t, Tensor perm, int[2] kernel_size, "
      "int[2] stride, int[2] padding, Tensor? grad_input_add, Tensor y, Tensor? residual, Tensor scale, "
      "Tensor shift, Tensor weight, Tensor mean, Tensor invstd, bool batch_stats, bool relu_after, "
      "bool relu_before, bool grad_residual, bool grad_input, bool grad_values, Tensor? in_mean=None, "
      "Tensor? in_scale=None, Tensor? in_shift=None, bool in_relu=False, bool grad_bias=True, bool in_sums=False, "
      "Tensor? sums=None, Tensor? pool_indices=None) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ---- a BatchNorm's elementwise passes behind a sparse conv (csrc/cpu/bn_act.cpp; the statistics
  // come from sparse_conv2d_stats): out = act((y - mean[c]) * scale[c] + shift[c] (+ residual)), and its
  // gradient (grad_y, grad_weight [C] f64, grad_bias [C] f64, grad_residual or empty, and
  // sum grad_y [C] f64 for a conv bias; the ReLU
  // after is recomputed from y, mean, scale and shift); weight, mean and invstd are float64 [C]
  m.def("bn_act(Tensor y, Tensor mean, Tensor scale, Tensor shift, Tensor? residual, bool relu, "
        "Tensor(a!)? relu_counts=None) -> Tensor");
  m.def(
      "bn_act_backward(Tensor grad_out, Tensor y, Tensor? residual, Tensor scale, Tensor shift, Tensor weight, "
      "Tensor mean, Tensor invstd, bool batch_stats, bool relu_after, bool relu_before, "
      "bool grad_residual) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // the BatchNorm's per-channel constants from those statistics (csrc/cpu/bn_scale_shift.cpp):
  // (mean f64, invstd f64, weight f64, scale = weight * invstd and shift = bias in dtype: the
  // centred map (y - mean) * scale + shift every kernel applies), running buffers updated in place
  // with batch statistics (nn.BatchNorm2d's momentum or cumulative average)
  m.def("bn_scale_shift(Tensor stats, int count, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, float eps, bool batch_stats, "
        "ScalarType dtype) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // ---- 2x2 stride-2 max-pooling with one-byte window positions (csrc/cpu/max_pool2x2.cpp)
  // with in_mean/in_scale/in_shift, x is a fused layer's BatchNorm input y and the op pools
  // act((y - in_mean[c]) * in_scale[c] + in_shift[c]) (in_relu: ReLU), bn_act's output, never written
  m.def("max_pool2x2(Tensor x, Tensor? in_mean=None, Tensor? in_scale=None, Tensor? in_shift=None, "
        "bool in_relu=False) -> (Tensor, Tensor)");
  m.def("max_pool2x2_backward(Tensor grad_out, Tensor indices, int[2] input_size) -> Tensor");
  // which CPU kernel serves a geometry: the batch tile of the small-map (batch-innermost) kernel,
  // 0 for the phase-plane kernel, -1 for the strided 1x1 kernel. For tests and benchmarks; the ops
  // pick it themselves.
  m.def("sparse_conv2d_small_tile(int[] input_size, int out_channels, int[] kernel_size, int[] stride, "
        "int[] padding, ScalarType dtype) -> int");
}

