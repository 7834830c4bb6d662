// Batch-tile transposes shared by the kernels that keep the batch innermost (SparseLinear,
// the small-map SparseConv2d): [tb, K] rows of the caller's tensor <-> a [K, TB] tile.
#pragma once
#include "common.h"

#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sparsetrain {

// xt[k * TB + t] = x[t * ldx + k], zero-padded for t >= tb; and its inverse. Float tiles go through
// an 8x8 AVX2 register transpose when the CPU has AVX2 (24 shuffles per 64 elements instead of one
// scalar strided store each); the tails and other CPUs take a loop blocked over k so the
// TB-strided accesses stay in L1.
constexpr int64_t kKB = 16;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ST_HAVE_AVX2_PATH 1
// out[i][j] = src[j * ls + i] for one 8x8 block, in registers
__attribute__((target("avx2"), always_inline)) inline void tr8x8_regs(const float* src, int64_t ls, __m256 out[8]) {
  const __m256 r0 = _mm256_loadu_ps(src + 0 * ls), r1 = _mm256_loadu_ps(src + 1 * ls);
  const __m256 r2 = _mm256_loadu_ps(src + 2 * ls), r3 = _mm256_loadu_ps(src + 3 * ls);
  const __m256 r4 = _mm256_loadu_ps(src + 4 * ls), r5 = _mm256_loadu_ps(src + 5 * ls);
  const __m256 r6 = _mm256_loadu_ps(src + 6 * ls), r7 = _mm256_loadu_ps(src + 7 * ls);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  out[0] = _mm256_permute2f128_ps(u0, u4, 0x20), out[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  out[2] = _mm256_permute2f128_ps(u2, u6, 0x20), out[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  out[4] = _mm256_permute2f128_ps(u0, u4, 0x31), out[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  out[6] = _mm256_permute2f128_ps(u2, u6, 0x31), out[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// dst[i * ld + j] = src[j * ls + i] for one 8x8 block
__attribute__((target("avx2"), always_inline)) inline void tr8x8(const float* src, int64_t ls, float* dst,
                                                                 int64_t ld) {
  __m256 r[8];
  tr8x8_regs(src, ls, r);
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + i * ld, r[i]);
}

// Both block transposes walk the long axis (a sample's K elements) in strips of kTrCols columns,
// all rows of a strip before the next: the strip's side in the [K, TB] tile (kTrCols rows of TB
// elements, 16 KB at TB = 64) is read or written whole while it is in L1, where a full pass of
// 8 rows along K left each line of the tile written (read) a quarter or an eighth at a time, once
// per pass. Small-map kernel of the VGG-like(5, 5) fused step at 99%, AVX-512 Xeon (in-process
// interleaved A/B): the transpose in 5.8%, then the streaming one in 2.4% less step time.
constexpr int64_t kTrCols = 64;

// The full 8x8 blocks of src [rows8, cols8] (leading dim ls) into dst [cols8, rows8] (leading dim ld).
inline __attribute__((target("avx2"), noinline)) void transpose_blocks_avx2(const float* src, int64_t ls,
                                                                     float* dst, int64_t ld,
                                                                     int64_t rows8, int64_t cols8) {
  for (int64_t cs = 0; cs < cols8; cs += kTrCols)
    for (int64_t r0 = 0; r0 < rows8; r0 += 8)
      for (int64_t c0 = cs; c0 < std::min(cols8, cs + kTrCols); c0 += 8)
        tr8x8(src + r0 * ls + c0, ls, dst + c0 * ld + r0, ld);
}

// Like transpose_blocks_avx2 for dst [rows8, cols16] (cols16 a multiple of 16, every dst row
// 64-byte aligned), written with streaming stores: dst rows outer, so each 8x16 block writes one
// whole 64-byte line per row (two adjacent 32-byte stores), never a partial line. For
// activation-sized outputs that would not stay in cache (a normal store reads each line first).
inline __attribute__((target("avx2"), noinline)) void transpose_blocks_stream_avx2(
    const float* src, int64_t ls, float* dst, int64_t ld, int64_t cols16, int64_t rows8) {
  static_assert(kTrCols % 16 == 0, "strips of whole 16-column blocks");
  for (int64_t cs = 0; cs < cols16; cs += kTrCols)
    for (int64_t r0 = 0; r0 < rows8; r0 += 8)
      for (int64_t c0 = cs; c0 < std::min(cols16, cs + kTrCols); c0 += 16) {
        __m256 a[8], b[8];
        tr8x8_regs(src + c0 * ls + r0, ls, a);
        tr8x8_regs(src + (c0 + 8) * ls + r0, ls, b);
        for (int i = 0; i < 8; ++i) {
          _mm256_stream_ps(dst + (r0 + i) * ld + c0, a[i]);
          _mm256_stream_ps(dst + (r0 + i) * ld + c0 + 8, b[i]);
        }
      }
  _mm_sfence();
}

#endif

// (ldx: x's row pitch, >= K; K by default)
template <typename T>
ST_INLINE void transpose_tile(const T* x, int64_t K, int64_t tb, int64_t TB, T* xt, int64_t ldx = -1) {
  if (ldx < 0) ldx = K;
  int64_t t8 = 0, k8 = 0;  // rows t < t8 have their columns k < k8 done by the vector path
#ifdef ST_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<T, float>) {
    if (have_avx2()) {
      t8 = tb & ~int64_t(7), k8 = K & ~int64_t(7);
      transpose_blocks_avx2(x, ldx, xt, TB, t8, k8);
    }
  }
#endif
  for (int64_t k0 = 0; k0 < K; k0 += kKB) {
    const int64_t k1 = std::min(K, k0 + kKB);
    for (int64_t t = 0; t < tb; ++t) {
      const T* xr = x + t * ldx;
      for (int64_t k = std::max(k0, t < t8 ? k8 : 0); k < k1; ++k) xt[k * TB + t] = xr[k];
    }
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t t = tb; t < TB; ++t) xt[k * TB + t] = T(0);
  }
}

// x[t * ldx + k] = xt[k * TB + t] for t < tb, k < K (ldx: x's row pitch, >= K). stream: the rows
// of x are an activation-sized output; rows of whole 64-byte lines are then written with streaming
// stores (the vector path; the tail rows past a multiple of 8 and other CPUs take plain stores).
template <typename T>
ST_INLINE void untranspose_tile(const T* xt, int64_t K, int64_t tb, int64_t TB, T* x,
                                 int64_t ldx, bool stream = false) {
  int64_t t8 = 0, k8 = 0;
#ifdef ST_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<T, float>) {
    if (have_avx2()) {
      t8 = tb & ~int64_t(7), k8 = K & ~int64_t(7);
      if (stream && reinterpret_cast<uintptr_t>(x) % 64 == 0 && (ldx * sizeof(T)) % 64 == 0) {
        k8 = K & ~int64_t(15);
        transpose_blocks_stream_avx2(xt, TB, x, ldx, k8, t8);
      } else {
        transpose_blocks_avx2(xt, TB, x, ldx, k8, t8);
      }
    }
  }
#endif
  for (int64_t k0 = 0; k0 < K; k0 += kKB) {
    const int64_t k1 = std::min(K, k0 + kKB);
    for (int64_t t = 0; t < tb; ++t) {
      T* xr = x + t * ldx;
      for (int64_t k = std::max(k0, t < t8 ? k8 : 0); k < k1; ++k) xr[k] = xt[k * TB + t];
    }
  }
}

}  // namespace sparsetrain
