// Shared by the two CPU strategies of sparse_conv2d: the phase-plane kernel (sparse_conv2d.cpp,
// any map size) and the batch-innermost kernel for small maps (sparse_conv2d_small.cpp).
#pragma once
#include "common.h"

namespace sparsetrain {

// 64-byte GCC vectors (one zmm; two ymm or four xmm in the other clones); U: unaligned access.
template <typename T> struct Vec;
template <> struct Vec<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef float U __attribute__((vector_size(64), aligned(4)));
};
template <> struct Vec<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef double U __attribute__((vector_size(64), aligned(8)));
};

template <typename T>
ST_INLINE T hsum(typename Vec<T>::V v) {
  T s = 0;
  for (size_t t = 0; t < 64 / sizeof(T); ++t) s += v[t];
  return s;
}

// dvals[p] = sum over threads t of partial[t * nnz + p], in a fixed order (deterministic).
template <typename T>
void reduce_partials(const T* partial, int64_t nth, int64_t nnz, T* dvals) {
  at::parallel_for(0, nnz, 1 << 12, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) {
      T s = 0;
      for (int64_t t = 0; t < nth; ++t) s += partial[size_t(t) * nnz + p];
      dvals[p] = s;
    }
  });
}

// Geometry of one call: x [B, C, H, W], weight [O, C, kh, kw], output [B, O, OH, OW].
struct ConvGeom {
  int64_t B, C, H, W, O, kh, kw, sh, sw, ph, pw, OH, OW;
};

// Batch tile (elements: 1, 2, 4 or 8 vectors) of the small-map kernel, or 0 where it does not
// apply: output maps of at most 16 pixels, a batch of at least one vector, a packed tile in L2.
int64_t small_conv_tile(const ConvGeom& g, size_t elem);

// The three products of the small-map kernel (same contract as the phase-plane run_conv): y when
// y is given (x, crow, col, vals, bias), else dx when dx is given (dy, ccol, row_t, perm, vals)
// and dvalues when dvals is given (dy, x, crow, col).
template <typename T>
void small_conv(const ConvGeom& g, int64_t bt, const T* x, const T* dy, const T* bias,
                const int64_t* crow, const int32_t* col, const T* vals, const int64_t* ccol,
                const int32_t* row_t, const int64_t* perm, int64_t nnz, T* y, T* dx, T* dvals);

}  // namespace sparsetrain
