// SparseLinear on CPU: y = x W^T + b with W in CSR, its input gradient dx = dy W (a scatter of
// each nonzero into a thread-private, L2-resident tile: no transposed index to store, no races)
// and the weight gradient sampled at the nonzeros only (SDDMM).
//
// Layout: the batch is cut into tiles of TB rows; a tile of x is transposed once into a
// thread-local [K, TB] buffer (K * TB * 4 bytes: 1.2 MB for K = 4608, TB = 64: in L2 or L3,
// so every nonzero w[n, k] becomes an axpy of TB contiguous floats: acc[0:TB] += w * xt[k, 0:TB],
// with the accumulator in vector registers. Work = nnz * B FMAs, traffic = x and y once each.
// A layer that reads few of its inputs (a classifier: 10 rows at 99% read ~10% of VGG-like's
// 25088 inputs) gathers only those columns into its tiles (Cols).
#include "common.h"
#include "rows.h"
#include "transpose.h"

#include <cstring>

namespace sparsetrain {
namespace {

// ---- the input columns some nonzero reads, when they are few
// The tiles hold U rows: the K input columns, or (cols non-null) only the used ones, ascending,
// with idx each nonzero's row in the tile. Compacted when at most a quarter of the columns are
// read: past that the whole-tile transposes are cheaper than gathers (a gather moves one element
// per load and store, the 8x8 register transposes eight).
struct Cols {
  std::vector<int64_t> used;
  std::vector<int32_t> slots;
  const int64_t* cols = nullptr;
  int64_t U;
  const int32_t* idx;
  Cols(const int64_t* ptr, const int32_t* col, int64_t N, int64_t K) : U(K), idx(col) {
    const int64_t nnz = ptr[N];
    std::vector<int32_t> slot(size_t(K), 0);
    for (int64_t p = 0; p < nnz; ++p) slot[col[p]] = 1;
    int64_t n = 0;
    for (int64_t k = 0; k < K; ++k) n += slot[k];
    if (n == 0 || 4 * n > K) return;  // (no weights: the full-width tile; an empty `used` is no column list)
    used.reserve(size_t(n));
    for (int64_t k = 0; k < K; ++k)
      if (slot[k]) slot[k] = int32_t(used.size()), used.push_back(k);
    slots.resize(size_t(nnz));
    for (int64_t p = 0; p < nnz; ++p) slots[p] = slot[col[p]];
    cols = used.data(), U = n, idx = slots.data();
  }
  Cols(const Cols&) = delete;
};

// xt[s * TB + t] = x[t * ldx + cols[s]] for s < U, t < tb, zeros for t >= tb (transpose_tile's
// layout over the used columns only). Blocks of 64 slots: their tile rows (16 KB at TB = 64) take
// the strided stores in L1 while the samples' rows are walked once each.
template <typename T>
ST_INLINE void gather_tile(const T* x, int64_t ldx, int64_t tb, int64_t TB, const int64_t* cols, int64_t U,
                           T* xt) {
  for (int64_t s0 = 0; s0 < U; s0 += 64) {
    const int64_t s1 = std::min(U, s0 + 64);
    for (int64_t t = 0; t < tb; ++t) {
      const T* xr = x + t * ldx;
      for (int64_t s = s0; s < s1; ++s) xt[s * TB + t] = xr[cols[s]];
    }
    for (int64_t s = s0; s < s1; ++s) std::fill(xt + s * TB + tb, xt + (s + 1) * TB, T(0));
  }
}

// dx[t * K + k] for t < tb and every k: dxt[s * TB + t] at k = cols[s], zeros elsewhere. Each row
// is built in L1 chunks and streamed out (dx is activation-sized; most of it zeros here).
template <typename T>
ST_INLINE void scatter_rows(const T* dxt, int64_t TB, int64_t tb, const int64_t* cols, int64_t U, int64_t K,
                            T* dx) {
  constexpr int64_t CH = 1024;
  alignas(64) T buf[CH];
  for (int64_t t = 0; t < tb; ++t) {
    int64_t s = 0;
    for (int64_t k0 = 0; k0 < K; k0 += CH) {
      const int64_t n = std::min(CH, K - k0);
      std::fill(buf, buf + n, T(0));
      for (; s < U && cols[s] < k0 + n; ++s) buf[cols[s] - k0] = dxt[s * TB + t];
      stream_rows(dx + t * K + k0, 0, buf, 0, n, 1);
    }
  }
  stream_fence();
}

// yt[(n - n0) * TB + h + t] = (Xtile A^T + bias)[h + t, n] for n in [n0, n1), t < CW: the batch
// columns [h, h + CW) of the tile, A in compressed rows (ptr, idx, vals); whole vectors.
template <typename T, int VB, int TB, int CW>
ST_INLINE void spmm_chunk(const T* xt, const int64_t* ptr, const int32_t* idx, const T* vals,
                          const T* bias, int64_t n0, int64_t n1, int h, T* yt) {
  // The CW accumulators as NV VB-byte vectors in named registers: an array would be spilled to the
  // stack and every nonzero would round-trip through memory (measured 3x slower).
  typedef typename SimdVec<T, VB>::V V;
  constexpr int L = VB / sizeof(T), NV = CW / L;
  static_assert(NV >= 1 && NV <= kMaxAcc && CW % L == 0, "chunk width must be 1-8 vectors");
  for (int64_t n = n0; n < n1; ++n) {
    const T b = bias ? bias[n] : T(0);
    V a0 = V{} + b, a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t p = ptr[n]; p < ptr[n + 1]; ++p) {
      const T v = vals[p];
      const T* xr = xt + int64_t(idx[p]) * TB + h;
      V t;
#define ST_ACC(i)                                \
  if constexpr (NV > i) {                        \
    std::memcpy(&t, xr + i * L, sizeof(V));      \
    a##i += v * t;                               \
  }
      ST_ACC(0) ST_ACC(1) ST_ACC(2) ST_ACC(3) ST_ACC(4) ST_ACC(5) ST_ACC(6) ST_ACC(7)
#undef ST_ACC
    }
    const V parts[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
    std::memcpy(yt + (n - n0) * TB + h, parts, sizeof(T) * CW);
  }
}

// The whole tile in chunks of at most kMaxAcc register vectors (one chunk on AVX-512 fp32).
template <typename T, int VB, int TB>
ST_INLINE void spmm_tile(const T* xt, const int64_t* ptr, const int32_t* idx, const T* vals,
                         const T* bias, int64_t n0, int64_t n1, T* yt) {
  constexpr int CW = std::min<int>(TB, kMaxAcc * VB / sizeof(T));
  for (int h = 0; h < TB; h += CW) spmm_chunk<T, VB, TB, CW>(xt, ptr, idx, vals, bias, n0, n1, h, yt);
}

// ---- per-tile work, multiversioned. at::parallel_for runs its lambda as a separate function, so
// the SIMD clones must sit inside the lambda, not around parallel_for.
template <typename T, int VB, int TB>
ST_INLINE void fwd_tile_impl(const T* x, int64_t tb, int64_t K, bool load, T* xt, T* yt,
                             const int64_t* ptr, const int32_t* idx, const T* vals, const T* bias,
                             int64_t n0, int64_t n1, int64_t N, T* y, const int64_t* cols, int64_t U) {
  if (load && cols) gather_tile<T>(x, K, tb, TB, cols, U, xt);
  else if (load) transpose_tile<T>(x, K, tb, TB, xt);
  spmm_tile<T, VB, TB>(xt, ptr, idx, vals, bias, n0, n1, yt);
  untranspose_tile<T>(yt, n1 - n0, tb, TB, y + n0, N);
}

// dx tile: dxt[col(p), :] += v(p) * dyt[row(p), :] in a thread-private [K, TB] tile ([U, TB] over
// the used columns cols), transposed out.
template <typename T, int TB>
ST_INLINE void dgrad_tile_impl(const T* dy, int64_t tb, int64_t N, T* dyt, T* dxt, const int64_t* ptr,
                               const int32_t* idx, const T* vals, int64_t K, T* dx, const int64_t* cols,
                               int64_t U) {
  transpose_tile<T>(dy, N, tb, TB, dyt);
  std::fill(dxt, dxt + (cols ? U : K) * TB, T(0));
  for (int64_t n = 0; n < N; ++n) {
    const T* dr = dyt + n * TB;
    for (int64_t p = ptr[n]; p < ptr[n + 1]; ++p) {
      const T v = vals[p];
      T* xr = dxt + int64_t(idx[p]) * TB;
#pragma omp simd
      for (int t = 0; t < TB; ++t) xr[t] += v * dr[t];
    }
  }
  if (cols) scatter_rows<T>(dxt, TB, tb, cols, U, K, dx);
  else untranspose_tile<T>(dxt, K, tb, TB, dx, K, /*stream=*/true);
}

// dW partial: part[p] += <dyt[row(p), :], xt[col(p), :]> over one batch tile.
template <typename T, int TB>
ST_INLINE void wgrad_tile_impl(const T* dy, const T* x, int64_t tb, int64_t N, int64_t K, T* dyt,
                               T* xt, const int64_t* ptr, const int32_t* idx, T* part, const int64_t* cols,
                               int64_t U) {
  if (cols) gather_tile<T>(x, K, tb, TB, cols, U, xt);
  else transpose_tile<T>(x, K, tb, TB, xt);
  transpose_tile<T>(dy, N, tb, TB, dyt);
  for (int64_t n = 0; n < N; ++n) {
    const T* dr = dyt + n * TB;
    for (int64_t p = ptr[n]; p < ptr[n + 1]; ++p) {
      const T* xr = xt + int64_t(idx[p]) * TB;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int t = 0; t < TB; ++t) s += dr[t] * xr[t];
      part[p] += s;
    }
  }
}

#define ST_TB(CALL) \
  if (TB == 64) { constexpr int TBc = 64; CALL; } else { constexpr int TBc = 16; CALL; }
#define ST_DEFINE_TILES(T)                                                                          \
  ST_MULTIVERSION void fwd_tile(const T* x, int64_t tb, int64_t K, bool load, T* xt, T* yt,         \
                                const int64_t* ptr, const int32_t* idx, const T* vals,              \
                                const T* bias, int64_t n0, int64_t n1, int64_t N, T* y, int TB,     \
                                const int64_t* cols, int64_t U) try {                               \
    ST_SWITCH_VB(ST_TB((fwd_tile_impl<T, VB, TBc>(x, tb, K, load, xt, yt, ptr, idx, vals, bias,   \
                                                  n0, n1, N, y, cols, U))));                        \
  } ST_CLONE_CATCH                                                                                  \
  ST_MULTIVERSION void dgrad_tile(const T* dy, int64_t tb, int64_t N, T* dyt, T* dxt,               \
                                  const int64_t* ptr, const int32_t* idx, const T* vals, int64_t K, \
                                  T* dx, int TB, const int64_t* cols, int64_t U) try {              \
    ST_TB((dgrad_tile_impl<T, TBc>(dy, tb, N, dyt, dxt, ptr, idx, vals, K, dx, cols, U)))           \
  } ST_CLONE_CATCH                                                                                  \
  ST_MULTIVERSION void wgrad_tile(const T* dy, const T* x, int64_t tb, int64_t N, int64_t K,        \
                                  T* dyt, T* xt, const int64_t* ptr, const int32_t* idx, T* part,   \
                                  int TB, const int64_t* cols, int64_t U) try {                     \
    ST_TB((wgrad_tile_impl<T, TBc>(dy, x, tb, N, K, dyt, xt, ptr, idx, part, cols, U)))             \
  } ST_CLONE_CATCH
ST_DEFINE_TILES(float)
ST_DEFINE_TILES(double)
#undef ST_DEFINE_TILES
#undef ST_TB

// Tile width: 64 batch rows (4 zmm accumulators) when there are enough rows for every thread.
inline int tile_width(int64_t B) { return B >= 64 * at::get_num_threads() ? 64 : 16; }

// ---- drivers
template <typename T>
void spmm(const T* x, int64_t B, int64_t K, const int64_t* ptr, const int32_t* idx, const T* vals,
          const T* bias, int64_t N, T* y) {
  const int TB = tile_width(B);
  const int64_t nbt = (B + TB - 1) / TB;
  const int64_t nthreads = at::get_num_threads();
  // Split the output dimension too when there are fewer batch tiles than threads.
  const int64_t nchunks = nbt >= nthreads ? 1 : std::min<int64_t>(N, (nthreads + nbt - 1) / nbt);
  const Cols tc(ptr, idx, N, K);
  at::parallel_for(0, nbt * nchunks, 1, [&](int64_t begin, int64_t end) {
    T* xt = scratch<T>(size_t(tc.U) * TB, 0);
    T* yt = scratch<T>(size_t(N) * TB, 1);
    int64_t loaded = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bt = task / nchunks, c = task % nchunks;
      const int64_t b0 = bt * TB, tb = std::min<int64_t>(TB, B - b0);
      const int64_t n0 = N * c / nchunks, n1 = N * (c + 1) / nchunks;
      ST_CLONE_CALL(fwd_tile(x + b0 * K, tb, K, bt != loaded, xt, yt, ptr, tc.idx, vals, bias, n0, n1, N, y + b0 * N, TB,
                             tc.cols, tc.U));
      loaded = bt;
    }
  });
}

// dx = dy W: parallel over batch tiles, each owns its rows of dx (no races, no transposed index).
template <typename T>
void spmm_t(const T* dy, int64_t B, int64_t N, const int64_t* ptr, const int32_t* idx, const T* vals,
            int64_t K, T* dx) {
  const int TB = tile_width(B);
  const int64_t nbt = (B + TB - 1) / TB;
  const Cols tc(ptr, idx, N, K);
  at::parallel_for(0, nbt, 1, [&](int64_t begin, int64_t end) {
    T* dyt = scratch<T>(size_t(N) * TB, 0);
    T* dxt = scratch<T>(size_t(tc.U) * TB, 1);
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b0 = bt * TB, tb = std::min<int64_t>(TB, B - b0);
      ST_CLONE_CALL(dgrad_tile(dy + b0 * N, tb, N, dyt, dxt, ptr, tc.idx, vals, K, dx + b0 * K, TB, tc.cols, tc.U));
    }
  });
}

// dvals[p] = sum_b dy[b, row(p)] * x[b, col(p)]: per-thread partial sums over batch tiles, then a
// fixed-order reduction (deterministic for a given thread count).
template <typename T>
void sddmm(const T* dy, const T* x, int64_t B, int64_t N, int64_t K, const int64_t* ptr,
           const int32_t* idx, T* out) {
  const int TB = tile_width(B);
  const int64_t nnz = ptr[N];
  const int64_t nbt = (B + TB - 1) / TB;
  const int64_t nthreads = at::get_num_threads();
  std::vector<T> partial(size_t(nthreads) * nnz, T(0));
  const Cols tc(ptr, idx, N, K);
  at::parallel_for(0, nbt, 1, [&](int64_t begin, int64_t end) {
    T* part = partial.data() + size_t(at::get_thread_num()) * nnz;
    T* xt = scratch<T>(size_t(tc.U) * TB, 0);
    T* dyt = scratch<T>(size_t(N) * TB, 1);
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b0 = bt * TB, tb = std::min<int64_t>(TB, B - b0);
      ST_CLONE_CALL(wgrad_tile(dy + b0 * N, x + b0 * K, tb, N, K, dyt, xt, ptr, tc.idx, part, TB, tc.cols, tc.U));
    }
  });
  at::parallel_for(0, nnz, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      T s = 0;
      for (int64_t th = 0; th < nthreads; ++th) s += partial[size_t(th) * nnz + p];
      out[p] = s;
    }
  });
}

void check_values(const at::Tensor& values, const at::Tensor& ref_idx, const char* name) {
  check_cpu(values, name);
  check_float(values, name);
  check_1d_contig(values, name);
  TORCH_CHECK_VALUE(values.numel() == ref_idx.numel(), name, " must have nnz = ", ref_idx.numel(),
                    " entries, got ", values.numel());
}

void check_activation(const at::Tensor& t, const at::Tensor& values, int64_t features,
                      const char* name) {
  check_cpu(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == values.scalar_type(), name, " must have the dtype of values (",
                   values.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() >= 1, name, " must have at least 1 dimension");
  TORCH_CHECK_VALUE(t.size(-1) == features, name, " must have last dimension ", features, ", got ",
                    t.size(-1), " (shape ", t.sizes(), ")");
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = last;
  return s;
}

// The transposed index (CSC) the schemas carry: its size fixes in_features (the CPU kernels
// scatter into thread-private tiles and need only its shape; the Triton kernels read it).
int64_t check_csc(const at::Tensor& ccol, const at::Tensor& row_t, const at::Tensor& perm,
                  int64_t nnz) {
  check_cpu(ccol, "ccol_indices");
  check_dtype(ccol, at::kLong, "ccol_indices");
  TORCH_CHECK_VALUE(ccol.dim() == 1 && ccol.numel() >= 1, "ccol_indices must be 1-D [in_features + 1], got ",
                    ccol.sizes());
  check_1d_contig(ccol, "ccol_indices");
  for (const auto& [t, name, dt] :
       {std::tuple(&row_t, "row_indices_t", at::kInt), std::tuple(&perm, "perm", at::kLong)}) {
    check_cpu(*t, name);
    check_dtype(*t, dt, name);
    check_1d_contig(*t, name);
    TORCH_CHECK_VALUE(t->numel() == nnz, name, " must have nnz = ", nnz, " entries, got ", t->numel());
  }
  return ccol.numel() - 1;
}

// t [..., n] as [rows, n] with rows the product of the leading dimensions (reshape({-1, n}) cannot
// infer it when n is 0: a layer of no inputs or no outputs).
at::Tensor rows2d(const at::Tensor& t, int64_t n) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return t.reshape({rows, n}).contiguous();
}

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                         const at::Tensor& values, const at::Tensor& ccol, const at::Tensor& row_t,
                         const at::Tensor& perm, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dimension");
  const int64_t N = crow.numel() - 1, K = check_csc(ccol, row_t, perm, col.numel());
  check_compressed(crow, col, K, "crow_indices", "col_indices", " (ccol_indices' entries - 1: in_features)");
  check_values(values, col, "values");
  check_activation(x, values, K, "x");  // x's last dimension must be the layer's in_features
  if (bias) {
    check_cpu(*bias, "bias");
    TORCH_CHECK_TYPE(bias->scalar_type() == values.scalar_type(), "bias must have the dtype of values");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == N, "bias must have shape [", N, "], got ",
                      bias->sizes());
  }
  const at::Tensor xc = rows2d(x, K);
  const int64_t B = xc.size(0);
  at::Tensor y = pooled_empty(out_shape(x, N), x.options());  // every element is written once
  at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  if (B > 0 && N > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_linear", [&] {
      spmm(xc.data_ptr<scalar_t>(), B, K, crow.data_ptr<int64_t>(), col.data_ptr<int32_t>(),
           values.data_ptr<scalar_t>(), bias ? bc.data_ptr<scalar_t>() : nullptr, N,
           y.data_ptr<scalar_t>());
    });
  }
  return y;  // (not a view: autograd allows in-place ops such as ReLU(inplace) on it)
}

at::Tensor sparse_linear_grad_input(const at::Tensor& grad_out, const at::Tensor& crow,
                                    const at::Tensor& col, const at::Tensor& values,
                                    const at::Tensor& ccol, const at::Tensor& row_t,
                                    const at::Tensor& perm) {
  TORCH_CHECK_VALUE(grad_out.dim() >= 1, "grad_out must have at least 1 dimension");
  const int64_t N = crow.numel() - 1, K = check_csc(ccol, row_t, perm, col.numel());
  check_compressed(crow, col, K, "crow_indices", "col_indices", " (ccol_indices' entries - 1: in_features)");
  check_values(values, col, "values");
  check_activation(grad_out, values, N, "grad_out");
  const at::Tensor g = rows2d(grad_out, N);
  const int64_t B = g.size(0);
  at::Tensor dx = pooled_empty(out_shape(grad_out, K), grad_out.options());  // written once
  if (B > 0 && K > 0) {
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sparse_linear_grad_input", [&] {
      spmm_t(g.data_ptr<scalar_t>(), B, N, crow.data_ptr<int64_t>(), col.data_ptr<int32_t>(),
             values.data_ptr<scalar_t>(), K, dx.data_ptr<scalar_t>());
    });
  }
  return dx;
}

at::Tensor sparse_linear_grad_weight(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& crow, const at::Tensor& col) {
  const int64_t N = crow.numel() - 1;
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dimension");
  const int64_t K = x.size(-1);
  check_compressed(crow, col, K, "crow_indices", "col_indices", " (x's last dimension: in_features)");
  check_cpu(x, "x");
  check_float(x, "x");
  check_activation(grad_out, x, N, "grad_out");
  TORCH_CHECK_VALUE(grad_out.dim() == x.dim() && grad_out.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
                    "grad_out and x must have the same leading (batch) dimensions, got ",
                    grad_out.sizes(), " and ", x.sizes());
  const at::Tensor g = rows2d(grad_out, N);
  const at::Tensor xc = rows2d(x, K);
  const int64_t B = xc.size(0);
  at::Tensor out = at::zeros({col.numel()}, x.options());
  if (B > 0 && col.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_linear_grad_weight", [&] {
      sddmm(g.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), B, N, K, crow.data_ptr<int64_t>(),
            col.data_ptr<int32_t>(), out.data_ptr<scalar_t>());
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsetrain, CPU, m) {
  m.impl("sparse_linear", &sparse_linear);
  m.impl("sparse_linear_grad_input", &sparse_linear_grad_input);
  m.impl("sparse_linear_grad_weight", &sparse_linear_grad_weight);
}

}  // namespace sparsetrain
