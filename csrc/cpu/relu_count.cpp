// ReLU-state counting for the activation entropy (paper Eq. 1): per neuron, how many samples had a
// positive pre-activation. relu(x) > 0 iff x > 0, so pre- or post-activations give the same count.
#include "common.h"

namespace sparsetrain {
namespace {

// counts[n] += #{b : pre[b, n] > 0} for n in [n0, n1), n over the flattened non-batch dims. The
// loop sits in a multiversioned function called inside the parallel lambda (a lambda does not
// inherit a clone's ISA: wrapping the parallel_for would run it as baseline SSE2 code).
template <typename T>
ST_INLINE void relu_count_range(int64_t* counts, const T* x, int64_t B, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t b = 0; b < B; ++b) {
    const T* xr = x + b * N;
#pragma omp simd
    for (int64_t n = n0; n < n1; ++n) counts[n] += xr[n] > T(0);
  }
}
#define ST_RELU_COUNT(T)                                                                           \
  ST_MULTIVERSION void relu_count_rows(int64_t* counts, const T* x, int64_t B, int64_t N, int64_t n0, \
                                       int64_t n1) try {                                           \
    relu_count_range<T>(counts, x, B, N, n0, n1);                                                  \
  } ST_CLONE_CATCH
ST_RELU_COUNT(float)
ST_RELU_COUNT(double)
#undef ST_RELU_COUNT

template <typename T>
void relu_count_impl(int64_t* counts, const T* x, int64_t B, int64_t N) {
  at::parallel_for(0, N, 2048, [&](int64_t n0, int64_t n1) { ST_CLONE_CALL(relu_count_rows(counts, x, B, N, n0, n1)); });
}

void relu_count_(at::Tensor& counts, const at::Tensor& pre) {
  check_cpu(counts, "counts");
  check_cpu(pre, "pre");
  check_dtype(counts, at::kLong, "counts");
  check_float(pre, "pre");
  TORCH_CHECK_VALUE(counts.is_contiguous(), "counts must be contiguous");
  TORCH_CHECK_VALUE(pre.dim() >= 2, "pre must be [batch, neurons...] (>= 2-D), got ", pre.dim(), "-D");
  const int64_t B = pre.size(0);
  int64_t N = 1;
  for (int64_t d = 1; d < pre.dim(); ++d) N *= pre.size(d);
  TORCH_CHECK_VALUE(counts.numel() == N,
                    "counts must have one entry per neuron (", N, " = prod of pre.shape[1:]), got ",
                    counts.numel());
  if (B == 0) return;
  const at::Tensor xc = pre.contiguous();
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "relu_count_", [&] {
    relu_count_impl<scalar_t>(counts.data_ptr<int64_t>(), xc.data_ptr<scalar_t>(), B, N);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsetrain, CPU, m) { m.impl("relu_count_", &relu_count_); }

}  // namespace sparsetrain
