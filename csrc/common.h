// Shared helpers for the sparsetrain CPU kernels: argument checks and SIMD multiversioning.
#pragma once
// Include what is used (not ATen/ATen.h, which pulls every operator's declaration into each file):
// the Tensor type, the dtype dispatch macros, parallel_for and the two factory ops.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>


#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

// Hot loops are compiled for AVX-512, AVX2 and the baseline ISA; the loader picks one clone at
// start-up (GCC function multiversioning), so a portable build still vectorises with FMA.
// NATIVE=1 (-march=native) makes this unnecessary but harmless.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SPARSETRAIN_NO_CLONES)
#define ST_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ST_MULTIVERSION
#endif
#define ST_INLINE __attribute__((always_inline)) inline
// GCC 12 compiles a call into a target_clones function (through its ifunc dispatcher) as one that
// cannot throw, so an exception leaving a clone (a failed scratch allocation) ends in std::terminate
// in the worker thread instead of reaching Python. So every ST_MULTIVERSION function's body is a
// function-try-block ending in ST_CLONE_CATCH, which parks the exception in a thread-local slot, and
// every call goes through ST_CLONE_CALL, which rethrows it in the (uncloned) caller; at::parallel_for
// then carries it to the calling thread as usual.
#define ST_CLONE_CATCH \
  catch (...) { ::sparsetrain::clone_exception() = std::current_exception(); }
#define ST_CLONE_CALL(...)                  \
  do {                                      \
    __VA_ARGS__;                            \
    ::sparsetrain::rethrow_clone_exception(); \
  } while (0)

namespace sparsetrain {
inline std::exception_ptr& clone_exception() {
  static thread_local std::exception_ptr e;
  return e;
}
inline void rethrow_clone_exception() {
  if (std::exception_ptr e = std::exchange(clone_exception(), nullptr)) std::rethrow_exception(e);
}

// Register width in bytes of the clone that runs: 64 (AVX-512), 32 (AVX2) or 16 (baseline), the
// same test the clones' resolver makes. Hot loops are templates over it (SimdVec<T, VB>) and the
// multiversioned task functions switch on it once (ST_SWITCH_VB): GCC lowers a vector type wider
// than the clone's registers through the stack (measured on a Zen 3, 64-byte vectors in the AVX2
// clone: every FMA a load and a store, convs 4-7x slower).
// SPARSETRAIN_VEC_BYTES=16|32 narrows it (tests run the narrower instantiations on a wider CPU;
// other values are ignored).
inline int detect_vec_bytes() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SPARSETRAIN_NO_CLONES)
  __builtin_cpu_init();
  const int hw = __builtin_cpu_supports("x86-64-v4") ? 64 : __builtin_cpu_supports("x86-64-v3") ? 32 : 16;
#elif defined(__AVX512F__)
  const int hw = 64;
#elif defined(__AVX2__)
  const int hw = 32;
#else
  const int hw = 16;
#endif
  const char* env = std::getenv("SPARSETRAIN_VEC_BYTES");  // exactly "16" or "32"; anything else ignored
  const int want = !env ? 0 : std::strcmp(env, "16") == 0 ? 16 : std::strcmp(env, "32") == 0 ? 32 : 0;
  return want && want < hw ? want : hw;
}
inline const int kVecBytes = detect_vec_bytes();

// VB-byte GCC vectors; U: unaligned access.
template <typename T, int VB>
struct SimdVec {
  typedef T V __attribute__((vector_size(VB)));
  typedef T U __attribute__((vector_size(VB), aligned(sizeof(T))));
};

// Sum of the lanes of one VB-byte vector.
template <typename T, int VB>
ST_INLINE T hsum(typename SimdVec<T, VB>::V v) {
  T s = 0;
  for (size_t t = 0; t < VB / sizeof(T); ++t) s += v[t];
  return s;
}

// Kernels keep at most this many accumulator vectors (of the 16 AVX2/baseline registers) and cut
// wider blocks into passes.
constexpr int kMaxAcc = 8;
}  // namespace sparsetrain

// Calls EXPR with constexpr int VB bound to kVecBytes.
#define ST_SWITCH_VB(EXPR)                               \
  do {                                                   \
    switch (::sparsetrain::kVecBytes) {                  \
      case 64: { constexpr int VB = 64; EXPR; break; }   \
      case 32: { constexpr int VB = 32; EXPR; break; }   \
      default: { constexpr int VB = 16; EXPR; break; }   \
    }                                                    \
  } while (0)

namespace sparsetrain {

// Clear, argument-named checks: every bad input raises a Python exception, never a crash.
inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor (the C++ engine), got device ", t.device());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dt, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dt, name, " must have dtype ", dt, ", got ", t.scalar_type());
}

inline void check_float(const at::Tensor& t, const char* name) {
  // The hint is for model.half()/.bfloat16() on a sparse model (values cast down) and for a half
  // activation outside autocast: under torch.autocast the sparse ops take fp32 weights as they are.
  // (Integer or bool tensors get no hint: they are not activations.)
  const bool half = t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
                   " must be float32 or float64, got ", t.scalar_type(),
                   half ? " (the CPU kernels compute in fp32/fp64: for half-precision activations keep the model"
                          " in float32 and run it under torch.autocast)" : "");
}

inline void check_1d_contig(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1, name, " must be 1-D, got ", t.dim(), "-D");
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// ---- index range checks
// Every entry of v[0:n) in [0, bound), as one unsigned comparison per entry (a negative entry is >= 2^31
// or 2^63 as unsigned), in a loop the AVX2 path vectorizes: the plain loop ran at ~1 cycle an entry, and a
// conv layer's call checks its CSR and CSC indices (~10 % of a batch-1 call at ResNet-18's layer4, 23593
// nonzeros; 4-8x faster vectorized, measured on the Zen 5 EPYC).
template <typename U>
ST_INLINE bool below(const U* v, int64_t n, U lim) {
  U bad = 0;
  for (int64_t k = 0; k < n; ++k) bad |= U(v[k] >= lim);
  return !bad;
}
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// The CPU has AVX2 (the hand-written AVX2 paths: transpose.h's blocks, the range checks below).
inline bool have_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}
template <typename U>  // (below's loop inlined here, compiled for AVX2)
__attribute__((target("avx2"), noinline)) inline bool below_avx2(const U* v, int64_t n, U lim) {
  return below(v, n, lim);
}
#endif
template <typename I>
inline bool all_in_range(const I* v, int64_t n, int64_t bound) {
  using U = std::make_unsigned_t<I>;
  if (bound <= 0) return n == 0;
  // (an int32 index below a bound past its range: every non-negative entry is)
  const U lim = U(std::min<uint64_t>(uint64_t(bound), uint64_t(std::numeric_limits<I>::max()) + 1));
  const U* u = reinterpret_cast<const U*>(v);
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  if (have_avx2()) return below_avx2(u, n, lim);
#endif
  return below(u, n, lim);
}

// Validates a compressed index (CSR: ptr over rows, idx = column ids; or CSC, transposed) for a
// [rows, cols] matrix. O(rows + nnz): negligible next to the O(nnz * batch) products. `bound`: where
// cols comes from, for the message (another argument may be the one that is wrong).
inline void check_compressed(const at::Tensor& ptr, const at::Tensor& idx, int64_t cols,
                             const char* ptr_name, const char* idx_name, const char* bound = "") {
  check_cpu(ptr, ptr_name);
  check_cpu(idx, idx_name);
  check_dtype(ptr, at::kLong, ptr_name);
  check_dtype(idx, at::kInt, idx_name);
  check_1d_contig(ptr, ptr_name);
  check_1d_contig(idx, idx_name);
  TORCH_CHECK_VALUE(ptr.numel() >= 1, ptr_name, " must have rows + 1 >= 1 entries");
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t rows = ptr.numel() - 1;
  TORCH_CHECK_VALUE(p[0] == 0, ptr_name, "[0] must be 0, got ", p[0]);
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK_VALUE(p[r + 1] >= p[r], ptr_name, " must be non-decreasing (row ", r, ")");
  TORCH_CHECK_VALUE(p[rows] == idx.numel(), ptr_name, "[-1] (", p[rows], ") must equal ", idx_name,
                    ".numel() (", idx.numel(), ")");
  const int32_t* c = idx.data_ptr<int32_t>();
  const int64_t nnz = idx.numel();
  TORCH_CHECK_VALUE(all_in_range(c, nnz, cols), idx_name, " has entries outside [0, ", cols, ")", bound);
}

// ReLU-state counts of a forward's output (relu_counts of sparse_conv2d_stats and bn_act; the
// activation entropy of Eq. 1, as relu_count_ computes it from the written output): per neuron n
// the samples whose output is > 0, counted while the output is in cache. Tasks of different batch
// tiles share neurons, so each thread adds to its own int32 row of `part` [threads][neurons], and
// the rows are added to the caller's int64 counts after the parallel loop.
struct StateCounts {
  int64_t* counts = nullptr;  // [neurons], added to; nullptr: no counting
  int64_t neurons = 0;
  std::vector<int32_t> part;
  StateCounts(int64_t* c, int64_t n) : counts(c), neurons(n) {
    if (c) part.assign(size_t(at::get_num_threads()) * n, 0);
  }
  int32_t* mine() { return counts ? part.data() + size_t(at::get_thread_num()) * neurons : nullptr; }
  void finish() {
    if (!counts) return;
    const int64_t nth = int64_t(part.size()) / std::max<int64_t>(neurons, 1);
    for (int64_t t = 0; t < nth; ++t)
      for (int64_t i = 0; i < neurons; ++i) counts[i] += part[t * neurons + i];
  }
};

// c[r * n + i] += (v[r * pitch + i] > 0) over `rows` rows of n values (NaN: not positive).
template <typename T>
ST_INLINE void count_positive(int32_t* __restrict c, const T* v, int64_t pitch, int64_t n, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* vr = v + r * pitch;
    int32_t* cr = c + r * n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) cr[i] += vr[i] > T(0) ? 1 : 0;
  }
}

// relu_counts of sparse_conv2d_stats / bn_act: int64 [neurons] on the CPU, contiguous (added to).
inline int64_t* check_state_counts(const at::Tensor& c, int64_t neurons) {
  check_cpu(c, "relu_counts");
  TORCH_CHECK_TYPE(c.scalar_type() == at::kLong, "relu_counts must have dtype int64, got ", c.scalar_type());
  TORCH_CHECK_VALUE(c.is_contiguous(), "relu_counts must be contiguous");
  TORCH_CHECK_VALUE(c.numel() == neurons, "relu_counts must have one entry per output neuron (", neurons,
                    " = channels * height * width), got ", c.numel());
  return c.data_ptr<int64_t>();
}

// Reads of activation planes ahead of use. The hardware's stream prefetcher stops at 4 KB pages and
// a 32x32 fp32 plane is one page, so a loop over (sample, channel) planes waited on DRAM at every
// plane start: loads at ~22 GB/s of the 55 a 2-thread read reaches. Requesting the line kAheadBytes
// further on (the next planes: consecutive planes are adjacent in memory) keeps those streams going:
// the fused conv backward at 64x32x32 10.9 -> 9.1 ms, ResNet-18's fused step at 99% -7% (AVX-512
// Xeon, in-process A/B; 1, 2 and 4 KB within 2% of each other). Prefetches never fault, so the
// lines past a tensor's end cost nothing but a request.
constexpr int64_t kAheadBytes = 2048;
ST_INLINE void prefetch_ahead(const void* p) { __builtin_prefetch(static_cast<const char*>(p) + kAheadBytes); }
// prefetch_ahead for every 64-byte line of n elements at p (a row or a plane, before its loop).
template <typename T>
ST_INLINE void prefetch_ahead_n(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p) + kAheadBytes;
  for (int64_t u = 0; u < n * int64_t(sizeof(T)); u += 64) __builtin_prefetch(c + u);
}

// Thread-local scratch that survives between calls: no page-fault zero fill per call. Slots 0..6
// (the kernels' packed x, dy, output staging, partial sums, BN planes, the residual's gradient, an
// unpooled gradient plane).
// SPARSETRAIN_TEST_SCRATCH_LIMIT=<bytes> makes a larger buffer fail as a real allocation failure
// would (std::bad_alloc): the tests check such a failure raises instead of aborting the process.
inline size_t scratch_limit() {
  static const size_t limit = [] {
    const char* env = std::getenv("SPARSETRAIN_TEST_SCRATCH_LIMIT");  // decimal digits; anything else ignored
    char* end = nullptr;
    const unsigned long long v = env && *env >= '0' && *env <= '9' ? std::strtoull(env, &end, 10) : 0;
    return end && *end == '\0' ? size_t(v) : SIZE_MAX;
  }();
  return limit;
}
template <typename T>
T* scratch(size_t n, int slot) {
  thread_local std::vector<double> bufs[7];
  auto& b = bufs[slot];
  if (n > (SIZE_MAX - 64 * sizeof(double)) / sizeof(T)) throw std::bad_alloc();  // (n * sizeof(T) would wrap)
  const size_t words = (n * sizeof(T) + sizeof(double) - 1) / sizeof(double) + 8;
  if (b.size() < words) {
    if (words * sizeof(double) > scratch_limit()) throw std::bad_alloc();
    b.resize(words);
  }
  // 64-byte align inside the buffer
  uintptr_t a = reinterpret_cast<uintptr_t>(b.data());
  a = (a + 63) & ~uintptr_t(63);
  return reinterpret_cast<T*>(a);
}

// at::parallel_for grain of a loop over [batch * channels] planes of `plane` elements: chunks of
// ~16K elements, so small maps are not split into one task per plane.
inline int64_t plane_grain(int64_t plane) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(plane, 1)); }

}  // namespace sparsetrain

#include "output_pool.h"  // pooled_empty: the big outputs' memory
