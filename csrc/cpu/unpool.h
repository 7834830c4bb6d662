// The gradient of a 2x2 stride-2 max-pool at its input (max_pool2x2.cpp's backward), plane by
// plane: each output's gradient goes to its window's max position (the one byte the forward kept:
// 0..3, row-major), the other three positions and the rows/columns past 2 * (H / 2) get 0. Shared
// with the fused BatchNorm backward, which unpools a pooled layer's gradient plane by plane into L1
// as it reads it (Unpool) instead of reading the written-out input gradient.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "common.h"

namespace sparsetrain {

// Input-gradient rows r0, r1 of 8 outputs (16 columns each): per window position a select of
// the output's gradient, then the even/odd columns interleaved, as explicit vector operations (the
// compiler kept a per-column loop of this scalar: 4x slower on a 32x32 map).
template <typename T>
ST_INLINE void unpool_row8(const T* g, const uint8_t* k, T* r0, T* r1) {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef T V __attribute__((vector_size(8 * sizeof(T))));
  typedef I K __attribute__((vector_size(8 * sizeof(T))));
  V v;
  __builtin_memcpy(&v, g, sizeof v);
  const K kk = {k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]};
  const V z = {};
  const V e0 = kk == 0 ? v : z, o0 = kk == 1 ? v : z, e1 = kk == 2 ? v : z, o1 = kk == 3 ? v : z;
#if defined(__clang__)
#define ST_LO(u, v) __builtin_shufflevector(u, v, 0, 8, 1, 9, 2, 10, 3, 11)
#define ST_HI(u, v) __builtin_shufflevector(u, v, 4, 12, 5, 13, 6, 14, 7, 15)
#else
  const K lo = {0, 8, 1, 9, 2, 10, 3, 11}, hi = {4, 12, 5, 13, 6, 14, 7, 15};
#define ST_LO(u, v) __builtin_shuffle(u, v, lo)
#define ST_HI(u, v) __builtin_shuffle(u, v, hi)
#endif
  const V a = ST_LO(e0, o0), b = ST_HI(e0, o0), c = ST_LO(e1, o1), d = ST_HI(e1, o1);
#undef ST_LO
#undef ST_HI
  __builtin_memcpy(r0, &a, sizeof a);
  __builtin_memcpy(r0 + 8, &b, sizeof b);
  __builtin_memcpy(r1, &c, sizeof c);
  __builtin_memcpy(r1 + 8, &d, sizeof d);
}

// One output's window (the tails and maps under 8 columns).
template <typename T>
ST_INLINE void unpool_one(T v, int k, T* r0, T* r1) {
  r0[0] = k == 0 ? v : T(0);
  r0[1] = k == 1 ? v : T(0);
  r1[0] = k == 2 ? v : T(0);
  r1[1] = k == 3 ? v : T(0);
}

template <typename T>
ST_INLINE void unpool_plane(const T* g, const uint8_t* idx, int64_t H, int64_t W, int64_t OH, int64_t OW, T* dx) {
  for (int64_t i = 0; i < OH; ++i) {
    T* r0 = dx + 2 * i * W;
    T* r1 = r0 + W;
    const T* gi = g + i * OW;
    const uint8_t* ki = idx + i * OW;
    int64_t j = 0;
    for (; j + 8 <= OW; j += 8) unpool_row8(gi + j, ki + j, r0 + 2 * j, r1 + 2 * j);
    for (; j < OW; ++j) unpool_one(gi[j], ki[j], r0 + 2 * j, r1 + 2 * j);
    if (W % 2) r0[W - 1] = r1[W - 1] = T(0);
  }
  if (H % 2) std::fill(dx + (H - 1) * W, dx + H * W, T(0));
}

// The fixed-width row width N for an even map of OW output columns, or 0.
inline int pair_width(int64_t H, int64_t W) {
  if (H % 2 || W % 2) return 0;
  const int64_t ow = W / 2;
  return ow == 1 || ow == 2 || ow == 4 || ow == 8 || ow == 16 ? int(ow) : 0;
}
#define ST_PAIRS_SWITCH(N, CALL)                       \
  switch (N) {                                         \
    case 1: { constexpr int NN = 1; CALL; break; }     \
    case 2: { constexpr int NN = 2; CALL; break; }     \
    case 4: { constexpr int NN = 4; CALL; break; }     \
    case 8: { constexpr int NN = 8; CALL; break; }     \
    default: { constexpr int NN = 16; CALL; break; }   \
  }

template <typename T, int N>
ST_INLINE void unpool_pairs_n(const T* g, const uint8_t* idx, int64_t q0, int64_t q1, T* dx) {
  for (int64_t q = q0; q < q1; ++q) {
    T* r0 = dx + q * 4 * N;
    T* r1 = r0 + 2 * N;
    const T* gi = g + q * N;
    const uint8_t* ki = idx + q * N;
    if constexpr (N >= 8) {
      for (int j = 0; j < N; j += 8) unpool_row8(gi + j, ki + j, r0 + 2 * j, r1 + 2 * j);
    } else {
      for (int t = 0; t < 2 * N; ++t) {  // by input column (fully unrolled: vector selects)
        const T v = gi[t >> 1];
        const int k = ki[t >> 1], u = t & 1;
        r0[t] = k == u ? v : T(0);
        r1[t] = k == 2 + u ? v : T(0);
      }
    }
  }
}

// Whether k[0:n] are window positions (0..3): one of 4 or more sets a higher bit of their OR.
inline bool window_positions(const uint8_t* k, int64_t n) {
  uint8_t any = 0;
#pragma omp simd reduction(| : any)
  for (int64_t i = 0; i < n; ++i) any |= k[i];
  return any <= 3;
}

// A pooled layer's gradient as its BatchNorm backward reads it: g holds [planes][H / 2][W / 2]
// gradients of the pooled output and idx their window positions; plane(g, p, buf) unpools plane p
// of the H x W input gradient into buf (L1) and returns it. With `bad`, each plane's positions are
// checked as they are read (L1-hot bytes) and *bad set on one above 3: the caller raises after the
// pass (the unpooled plane gives such a window no gradient).
struct Unpool {
  const uint8_t* idx;
  int64_t H, W;
  std::atomic<bool>* bad = nullptr;
  template <typename T>
  ST_INLINE const T* plane(const T* g, int64_t p, T* buf) const {  // (inlined: the caller's SIMD clone)
    const int64_t OH = H / 2, OW = W / 2;
    const uint8_t* k = idx + p * OH * OW;
    if (const int n = pair_width(H, W)) {
      ST_PAIRS_SWITCH(n, (unpool_pairs_n<T, NN>(g + p * OH * OW, k, 0, OH, buf)));
    } else {
      unpool_plane(g + p * OH * OW, k, H, W, OH, OW, buf);
    }
    if (bad && !window_positions(k, OH * OW)) bad->store(true, std::memory_order_relaxed);
    return buf;
  }
};

// The whole input gradient, written out (max_pool2x2.cpp: the op), for the paths that read it whole;
// `name`: the indices' argument name in the messages.
at::Tensor max_pool2x2_backward(const at::Tensor& grad_out, const at::Tensor& indices, at::IntArrayRef input_size,
                                const char* name = "indices");

}  // namespace sparsetrain
