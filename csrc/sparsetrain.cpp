// Every sparsetrain op's schema, declared once. Implementations: csrc/cpu/*.cpp (CPU, C++),
// kernels/*.py (CUDA, Triton, registered from Python). Fake (meta) impls and autograd formulas are
// registered once, in sparsetrain/ops.py.
#include <Python.h>
#include <torch/library.h>

// Importing sparsetrain._C loads this library and registers the ops.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
}

TORCH_LIBRARY(sparsetrain, m) {
  // ---- linear: W is CSR [out, in] (crow int64, col int32, values), its transpose is given as
  // CSC (ccol int64 [in+1], row_t int32, perm int64: position of each CSC entry in values).
  m.def(
      "sparse_linear(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, "
      "Tensor ccol_indices, Tensor row_indices_t, Tensor perm, Tensor? bias) -> Tensor");
  m.def(
      "sparse_linear_grad_input(Tensor grad_out, Tensor ccol_indices, Tensor row_indices_t, "
      "Tensor perm, Tensor values) -> Tensor");
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
}
