// Row moves of the phase-plane kernel: packing image rows into padded planes and writing output
// planes back, thousands of short rows (4..32 elements) per call. Plain moves are fixed-size inline
// copies (a libc call per row would cost more than the row). Stream moves write the caller's
// activation-sized outputs with non-temporal stores: those outputs (tens of MB) do not stay in
// cache anyway, and a normal store first reads each line from memory (read-for-ownership), so
// streaming halves the traffic of the writes (measured here on a 33.5 MB plane set after a cache
// flush: zero fill 2.8 -> 0.9 ms, copy 3.5 -> 2.1 ms). The writer calls stream_fence() before its
// results may be read by another thread.
#pragma once
#include <cstdint>
#include <cstring>
#include <utility>

#include "common.h"

#if defined(__x86_64__)
#include <immintrin.h>  // SSE2 streaming stores: baseline x86-64, so every clone has them
#define ST_HAVE_STREAM 1
#endif

namespace sparsetrain {

template <typename T>
ST_INLINE void fill(T* p, int64_t n, T v) {
  for (int64_t i = 0; i < n; ++i) p[i] = v;
}

// Short copies and zero fills (rows of 4..32 elements, thousands per call) as inline moves of
// fixed size: a libc call per row would cost more than the row.
ST_INLINE void copy_bytes(char* d, const char* s, int64_t n) {
  for (; n >= 64; n -= 64, d += 64, s += 64) __builtin_memcpy(d, s, 64);
  if (n & 32) { __builtin_memcpy(d, s, 32); d += 32; s += 32; }
  if (n & 16) { __builtin_memcpy(d, s, 16); d += 16; s += 16; }
  if (n & 8) { __builtin_memcpy(d, s, 8); d += 8; s += 8; }
  if (n & 4) __builtin_memcpy(d, s, 4);
}
template <typename T>
ST_INLINE void copy_n(T* d, const T* s, int64_t n) {
  copy_bytes(reinterpret_cast<char*>(d), reinterpret_cast<const char*>(s), n * int64_t(sizeof(T)));
}
ST_INLINE void zero_bytes(char* d, int64_t n) {
  static constexpr char z[64] = {};
  for (; n >= 64; n -= 64, d += 64) __builtin_memcpy(d, z, 64);
  if (n & 32) { __builtin_memcpy(d, z, 32); d += 32; }
  if (n & 16) { __builtin_memcpy(d, z, 16); d += 16; }
  if (n & 8) { __builtin_memcpy(d, z, 8); d += 8; }
  if (n & 4) __builtin_memcpy(d, z, 4);
}
template <typename T>
ST_INLINE void zero_n(T* d, int64_t n) {
  zero_bytes(reinterpret_cast<char*>(d), n * int64_t(sizeof(T)));
}

// `rows` rows of n elements from s (pitch sp) to d (pitch dp), each followed by `zeros` zeros. The
// common widths get straight-line fixed-size moves: for 8-pixel rows the generic byte copy's
// branches cost more than the row.
template <typename T, int N>
ST_INLINE void copy_rows_n(T* d, int64_t dp, const T* s, int64_t sp, int64_t rows, int64_t zeros) {
  for (int64_t u = 0; u < rows; ++u) {
    __builtin_memcpy(d + u * dp, s + u * sp, N * sizeof(T));
    if (zeros == 1) d[u * dp + N] = T(0);  // the usual gap (3x3, padding 1): no memset call
    else if (zeros) zero_n(d + u * dp + N, zeros);
  }
}
template <typename T>
ST_INLINE void copy_rows(T* d, int64_t dp, const T* s, int64_t sp, int64_t n, int64_t rows,
                         int64_t zeros) {
  switch (n) {
    case 4: return copy_rows_n<T, 4>(d, dp, s, sp, rows, zeros);
    case 8: return copy_rows_n<T, 8>(d, dp, s, sp, rows, zeros);
    case 16: return copy_rows_n<T, 16>(d, dp, s, sp, rows, zeros);
    case 32: return copy_rows_n<T, 32>(d, dp, s, sp, rows, zeros);
    default:
      for (int64_t u = 0; u < rows; ++u) {
        copy_n(d + u * dp, s + u * sp, n);
        zero_n(d + u * dp + n, zeros);
      }
  }
}


// ---- stride-2 columns: even/odd split (packing) and merge (input gradient rows)
// 2L consecutive elements <-> their L even and L odd ones by 16-byte shuffles (GCC vector
// extensions: shufps / unpcklpd in every clone), L = 16 / sizeof(T). The element loop these
// replace went through stack arrays (a store, then narrower reloads of it: stalled forwarding):
// a 32-wide row set split 1.6-1.7x faster in a standalone test, AVX2 and baseline builds alike.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define ST_HAVE_SHUFFLEVECTOR 1  // (GCC has __builtin_shufflevector from 12 on; older: the loops)
template <typename T>
struct EvenOdd {
  static constexpr int L = 16 / int(sizeof(T));
  typedef T V __attribute__((vector_size(16)));
  template <size_t... J>
  static ST_INLINE void split(T* e, T* o, const T* s, std::index_sequence<J...>) {
    V a, b;
    __builtin_memcpy(&a, s, 16);
    __builtin_memcpy(&b, s + L, 16);
    const V ev = __builtin_shufflevector(a, b, (2 * J)...);
    const V od = __builtin_shufflevector(a, b, (2 * J + 1)...);
    if (e) __builtin_memcpy(e, &ev, 16);
    if (o) __builtin_memcpy(o, &od, 16);
  }
  template <size_t... J>
  static ST_INLINE void merge(T* d, const T* e, const T* o, std::index_sequence<J...>) {
    V a, b;
    __builtin_memcpy(&a, e, 16);
    __builtin_memcpy(&b, o, 16);
    const V lo = __builtin_shufflevector(a, b, (J / 2 + (J % 2) * L)...);
    const V hi = __builtin_shufflevector(a, b, (L / 2 + J / 2 + (J % 2) * L)...);
    __builtin_memcpy(d, &lo, 16);
    __builtin_memcpy(d + L, &hi, 16);
  }
};
#endif

// e[v] = s[2v], o[v] = s[2v + 1] for v < N, each followed by `zeros` zeros; a null side is skipped.
template <typename T, int N>
ST_INLINE void split_row_n(T* e, T* o, const T* s, int64_t zeros) {
#ifndef ST_HAVE_SHUFFLEVECTOR
  T ev[N], od[N];
  for (int v = 0; v < N; ++v) ev[v] = s[2 * v], od[v] = s[2 * v + 1];
  if (e) __builtin_memcpy(e, ev, sizeof ev);
  if (o) __builtin_memcpy(o, od, sizeof od);
#else
  using P = EvenOdd<T>;
  static_assert(N % P::L == 0, "split_row_n: N must be a multiple of 16 bytes of elements");
  for (int i = 0; i < N / P::L; ++i)
    P::split(e ? e + P::L * i : nullptr, o ? o + P::L * i : nullptr, s + 2 * P::L * i,
             std::make_index_sequence<P::L>{});
#endif
  if (e) zero_n(e + N, zeros);
  if (o) zero_n(o + N, zeros);
}
template <typename T>
ST_INLINE void split_row(T* e, T* o, const T* s, int64_t n, int64_t zeros) {
  switch (n) {
    case 4: return split_row_n<T, 4>(e, o, s, zeros);
    case 8: return split_row_n<T, 8>(e, o, s, zeros);
    case 16: return split_row_n<T, 16>(e, o, s, zeros);
    default:
      if (e) {
        for (int64_t v = 0; v < n; ++v) e[v] = s[2 * v];
        zero_n(e + n, zeros);
      }
      if (o) {
        for (int64_t v = 0; v < n; ++v) o[v] = s[2 * v + 1];
        zero_n(o + n, zeros);
      }
  }
}

// d[2v] = e[v], d[2v + 1] = o[v] for v < n (the inverse of split_row).
template <typename T, int N>
ST_INLINE void merge_row_n(T* d, const T* e, const T* o) {
#ifndef ST_HAVE_SHUFFLEVECTOR
  T out[2 * N];
  for (int v = 0; v < N; ++v) out[2 * v] = e[v], out[2 * v + 1] = o[v];
  __builtin_memcpy(d, out, sizeof out);
#else
  using P = EvenOdd<T>;
  static_assert(N % P::L == 0, "merge_row_n: N must be a multiple of 16 bytes of elements");
  for (int i = 0; i < N / P::L; ++i)
    P::merge(d + 2 * P::L * i, e + P::L * i, o + P::L * i, std::make_index_sequence<P::L>{});
#endif
}
template <typename T>
ST_INLINE void merge_row(T* d, const T* e, const T* o, int64_t n) {
  switch (n) {
    case 4: return merge_row_n<T, 4>(d, e, o);
    case 8: return merge_row_n<T, 8>(d, e, o);
    case 16: return merge_row_n<T, 16>(d, e, o);
    default:
      for (int64_t v = 0; v < n; ++v) d[2 * v] = e[v], d[2 * v + 1] = o[v];
  }
}

// ---- non-temporal (streaming) writes of output planes
// 16-byte streaming stores need 16-byte aligned rows of whole 16-byte chunks; other rows (odd
// widths, fp64 rows of odd length) take the plain moves, which are equally correct.
template <typename T>
ST_INLINE bool streamable(const T* d, int64_t dp, int64_t n) {
#ifdef ST_HAVE_STREAM
  return reinterpret_cast<uintptr_t>(d) % 16 == 0 && (n * int64_t(sizeof(T))) % 16 == 0 &&
         (dp * int64_t(sizeof(T))) % 16 == 0;
#else
  (void)d, (void)dp, (void)n;
  return false;
#endif
}

#ifdef ST_HAVE_STREAM
// K 16-byte chunks of each of `rows` rows, unrolled (the row widths of the maps: no per-chunk loop).
template <int64_t K>
ST_INLINE void stream_rows_k(char* d, int64_t dpb, const char* s, int64_t spb, int64_t rows) {
  for (int64_t u = 0; u < rows; ++u, d += dpb, s += spb)
    for (int64_t k = 0; k < K; ++k)
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + 16 * k), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 16 * k)));
}
#endif

// d[u * dp + 0:n] = s[u * sp + 0:n] for u < rows, streaming when the rows allow it.
template <typename T>
ST_INLINE void stream_rows(T* d, int64_t dp, const T* s, int64_t sp, int64_t n, int64_t rows) {
#ifdef ST_HAVE_STREAM
  if (streamable(d, dp, n)) {
    const int64_t chunks = n * int64_t(sizeof(T)) / 16;
    char* db = reinterpret_cast<char*>(d);
    const char* sb = reinterpret_cast<const char*>(s);
    const int64_t dpb = dp * int64_t(sizeof(T)), spb = sp * int64_t(sizeof(T));
    switch (chunks) {
      case 1: return stream_rows_k<1>(db, dpb, sb, spb, rows);
      case 2: return stream_rows_k<2>(db, dpb, sb, spb, rows);
      case 4: return stream_rows_k<4>(db, dpb, sb, spb, rows);
      case 8: return stream_rows_k<8>(db, dpb, sb, spb, rows);
      default: break;
    }
    for (int64_t u = 0; u < rows; ++u) {
      char* dr = reinterpret_cast<char*>(d + u * dp);
      const char* sr = reinterpret_cast<const char*>(s + u * sp);
      for (int64_t k = 0; k < chunks; ++k)
        _mm_stream_si128(reinterpret_cast<__m128i*>(dr + 16 * k),
                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(sr + 16 * k)));
    }
    return;
  }
#endif
  copy_rows(d, dp, s, sp, n, rows, 0);
}

// d[0:n] = v: plain stores up to the first 16-byte boundary and after the last, streaming between.
template <typename T>
ST_INLINE void stream_fill(T* d, int64_t n, T v) {
#ifdef ST_HAVE_STREAM
  constexpr int64_t per = 16 / sizeof(T);
  int64_t i = 0;
  if (reinterpret_cast<uintptr_t>(d) % sizeof(T) == 0) {
    for (; i < n && reinterpret_cast<uintptr_t>(d + i) % 16; ++i) d[i] = v;
    alignas(16) T pat[per];
    for (int64_t t = 0; t < per; ++t) pat[t] = v;
    const __m128i p = _mm_load_si128(reinterpret_cast<const __m128i*>(pat));
    for (; i + per <= n; i += per) _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), p);
  }
  for (; i < n; ++i) d[i] = v;
#else
  fill(d, n, v);
#endif
}

// Orders this thread's streaming stores before anything it does next (a task's end).
ST_INLINE void stream_fence() {
#ifdef ST_HAVE_STREAM
  _mm_sfence();
#endif
}

}  // namespace sparsetrain
