// Shared by the three CPU kernels of sparse_conv2d: the phase-plane kernel (sparse_conv2d_phase.cpp,
// any map size), the batch-innermost kernel for small maps (sparse_conv2d_small.cpp) and the strided
// 1x1 kernel (sparse_conv2d_pointwise.cpp).
#pragma once
#include "common.h"
#include "unpool.h"

#include <type_traits>

namespace sparsetrain {

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

// Both kernels' parallel driver. Tasks = (batch tile, chunk of channels): one chunk per tile when
// the tiles feed every thread, else enough chunks for all threads. The forward splits output
// channels: fwd(tile, o0, o1, pack); the backward splits input channels (dx) and output channels
// (dvalues) alike: bwd(tile, c0, c1, o0, o1, pack, part), part = this thread's dvalues partial sums
// (nullptr without dvalues). No two tasks write the same output; pack is false when the previous
// task of this thread already packed the same tile. The partial sums are reduced in a fixed order.
template <typename T, typename Fwd, typename Bwd>
void run_tasks(int64_t tiles, int64_t C, int64_t O, bool forward, int64_t nnz, T* dvals,
               const Fwd& fwd, const Bwd& bwd) {
  const int64_t nth = at::get_num_threads();
  const int64_t channels = forward ? O : std::max(C, O);
  const int64_t nch = tiles >= nth ? 1 : std::max<int64_t>(1, std::min(channels, (nth + tiles - 1) / tiles));
  std::vector<T> partial(!forward && dvals ? size_t(nth) * nnz : 0, T(0));
  at::parallel_for(0, tiles * nch, 1, [&](int64_t begin, int64_t end) {
    T* part = partial.empty() ? nullptr : partial.data() + size_t(at::get_thread_num()) * nnz;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task / nch, ch = task % nch;
      const bool pack = task == begin || ch == 0;
      if (forward) fwd(tile, O * ch / nch, O * (ch + 1) / nch, pack);
      else bwd(tile, C * ch / nch, C * (ch + 1) / nch, O * ch / nch, O * (ch + 1) / nch, pack, part);
    }
  });
  if (!partial.empty()) reduce_partials(partial.data(), nth, nnz, dvals);
}

// st[0] += sum y, st[1] += sum y^2 over n outputs, from a = sum (y - k) and b = sum (y - k)^2 taken
// in T (k: shift_origin of the outputs): the float sums are of deviations, so an activation whose
// mean is far above its spread keeps its variance (sums of raw y^2 in float lose it from mean/std
// ~ 1000 on; the conversion is exact enough in double).
ST_INLINE void add_shifted_sums(double* st, double a, double b, double k, int64_t n) {
  st[0] += a + double(n) * k;
  st[1] += b + 2.0 * k * a + double(n) * k * k;
}

// The deviations' origin for add_shifted_sums: the median of a plane's outputs at a quarter, half
// and three quarters of its rows and columns. The variance comes out as b/n - (a/n)^2, which
// cancels by ((mean - k) / std)^2: the first output alone (a corner, where zero padding or a scaled
// border row makes it atypical) lay 13 std from the mean in EfficientNet-B0 at 99%
// (features.2.0.block.3, maps of four values), its BN scale then 1e-5 off; three interior probes'
// median is typical unless two are not (outputs (1, 1) and (2, 2) were not enough: a 3x3 conv's
// (1, 1) still reads the border row).
template <typename T>
ST_INLINE T shift_origin(T p, T q, T r) {  // (the median of three)
  return std::max(std::min(p, q), std::min(std::max(p, q), r));
}

// The forward epilogue (engine/fused.py: BatchNorm after a sparse conv): on n outputs still in
// cache, the ReLU in place when `relu` (NaN stays NaN), then their sum and sum of squares added to
// st[0] and st[1] (float sums of deviations from shift_origin over at most one row or pixel tile,
// accumulated in double: add_shifted_sums).
template <typename T>
ST_INLINE void conv_epilogue(T* v, int64_t n, bool relu, double* st) {
  if (relu)
    for (int64_t i = 0; i < n; ++i) v[i] = v[i] < T(0) ? T(0) : v[i];
  if (!st || n == 0) return;
  const T k = shift_origin(v[n / 4], v[n / 2], v[3 * n / 4]);
  T a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = 0; i < n; ++i) {
    const T d = v[i] - k;
    a += d;
    b += d * d;
  }
  add_shifted_sums(st, a, b, k, n);
}

// conv_epilogue on `rows` rows of n outputs at pitch `pitch` (one sample's plane in a staging
// buffer): W-byte vectors along the rows, the sums kept in vector partials over the whole plane
// (lanes of at most rows * n / lanes float terms, as many as one row's sum before), then added to
// st in double. Per-row calls cost more than the arithmetic for the 8..32-pixel rows of ResNet maps.
template <typename T, int W, bool RELU, bool STATS>
ST_INLINE void epilogue_rows(T* src, int64_t pitch, int64_t nv, int64_t rows, double* st) {
  using V = typename SimdVec<T, W>::V;
  using U = typename SimdVec<T, W>::U;
  constexpr int64_t L = W / sizeof(T);
  V a = V{}, b = V{}, a2 = V{}, b2 = V{};
  const int64_t n = nv * L;  // (the deviations' origin, read before the ReLU pass: shift_origin)
  auto probe = [&](int64_t q) __attribute__((always_inline)) { return src[rows * q / 4 * pitch + n * q / 4]; };
  T k = rows && nv ? shift_origin(probe(1), probe(2), probe(3)) : T(0);
  if constexpr (RELU) k = k < T(0) ? T(0) : k;
  const V kv = V{} + k;
  for (int64_t r = 0; r < rows; ++r) {
    U* p = reinterpret_cast<U*>(src + r * pitch);
    int64_t j = 0;
    for (; j + 2 <= nv; j += 2) {  // two chains per sum
      V v0 = p[j], v1 = p[j + 1];
      if constexpr (RELU) {
        v0 = v0 < V{} ? V{} : v0;  // NaN stays NaN (as torch.relu)
        v1 = v1 < V{} ? V{} : v1;
        p[j] = v0, p[j + 1] = v1;
      }
      if constexpr (STATS) v0 -= kv, v1 -= kv, a += v0, b += v0 * v0, a2 += v1, b2 += v1 * v1;
    }
    if (j < nv) {
      V v = p[j];
      if constexpr (RELU) {
        v = v < V{} ? V{} : v;
        p[j] = v;
      }
      if constexpr (STATS) v -= kv, a += v, b += v * v;
    }
  }
  if constexpr (STATS) {
    a += a2, b += b2;
    double s1 = 0, s2 = 0;
    for (int64_t t = 0; t < L; ++t) s1 += a[t], s2 += b[t];
    add_shifted_sums(st, s1, s2, k, rows * n);
  }
}

// The plane epilogue at the widest of VB-, 32- and 16-byte vectors that tiles a row (else per row).
template <typename T, int VB>
ST_INLINE void plane_epilogue(T* src, int64_t pitch, int64_t n, int64_t rows, bool relu, double* st) {
  const int64_t bytes = n * int64_t(sizeof(T));
  // (always_inline: a lambda does not inherit the calling clone's instruction set, and once GCC kept
  // this one out of line, grown by shift_origin's probes, it ran as scalar SSE: the stats epilogue 1.5-4x
  // slower, VGG-like's step at 99% 23 -> 28 ms)
  auto run = [&](auto w) __attribute__((always_inline)) {
    constexpr int Wb = decltype(w)::value;
    const int64_t nv = bytes / Wb;
    if (relu && st) epilogue_rows<T, Wb, true, true>(src, pitch, nv, rows, st);
    else if (relu) epilogue_rows<T, Wb, true, false>(src, pitch, nv, rows, st);
    else epilogue_rows<T, Wb, false, true>(src, pitch, nv, rows, st);
  };
  if (!relu && !st) return;
  if (bytes % VB == 0) return run(std::integral_constant<int, VB>{});
  if constexpr (VB > 32) if (bytes % 32 == 0) return run(std::integral_constant<int, 32>{});
  if (bytes % 16 == 0) return run(std::integral_constant<int, 16>{});
  for (int64_t r = 0; r < rows; ++r) conv_epilogue(src + r * pitch, n, relu, st);
}

// stats [2, O] (row 0 sums, row 1 sums of squares) = the per-tile partials [tiles][O][2] summed in
// tile order (deterministic).
inline void reduce_stats(const std::vector<double>& part, int64_t tiles, int64_t O, double* stats) {
  for (int64_t o = 0; o < O; ++o) {
    double s1 = 0, s2 = 0;
    for (int64_t t = 0; t < tiles; ++t) {
      s1 += part[(t * O + o) * 2];
      s2 += part[(t * O + o) * 2 + 1];
    }
    stats[o] = s1;
    stats[O + o] = s2;
  }
}

// Geometry of one call: x [B, C, H, W], weight [O, C, kh, kw], output [B, O, OH, OW].
struct ConvGeom {
  int64_t B, C, H, W, O, kh, kw, sh, sw, ph, pw, OH, OW;
};

// The BatchNorm input-gradient pass (bn_act.h) applied while the phase-plane backward packs its dy
// tiles (sparse_conv2d_bn_backward): the op's grad_out is the BatchNorm's output gradient g and each
// packed plane is bn_dy_plane(g, y, res); dy is never written. g masked by the ReLU after goes to
// gout for a residual and the planes' sums are added to dsum [O] (the conv bias's gradient, via
// per-tile partials), both by the first channel chunk of each tile only.
template <typename T>
struct BnPack {
  const T *y, *res, *scale, *shift;       // y, res like g; scale, shift [O]
  std::vector<T> mean, ka, kb, kc;        // [O]
  bool relu_after, relu_before;
  T* gout;                                // [B, O, OH, OW] or nullptr
  double* dsum;                           // [O], added to, or nullptr
  const Unpool* up = nullptr;             // g is a pooled layer's gradient (Unpool), or nullptr
};

// A BatchNorm (+ ReLU) of the layer before, deferred into this conv's input packing
// (engine/fused.py): the conv reads y and packs act((y - mean[c]) scale[c] + shift[c]) (bn_act.h's
// act_plane, so the values are bn_act's bit for bit); that activation is never written. Stride 1 on
// the phase-plane kernel; the op entry points apply it first (bn_apply) elsewhere.
// With part (the backward, dx wanted): that BatchNorm's first backward pass is done here, from
// each dx plane while it is in L2 with the y plane just packed: part [tiles][C][2] += sum g and
// sum g (y - mean), g = dx masked by act's ReLU (the sums bn_grad_coefficients takes as `sums`).
template <typename T>
struct XAct {
  const T *mean, *scale, *shift;  // [C]
  bool relu;
  double* part = nullptr;
};

// ---- the phase-plane kernel (sparse_conv2d_phase.cpp)
// Zero padding is not stored per sample: a phase plane holds only real pixels followed by zero
// columns/rows, and a tap reaching left of (above) the plane reads the previous row's (sample's)
// trailing zeros. So every shift may be negative, and the plane is as small as the shifts allow:
// 5x5 instead of 6x6 for a 4x4 input and a 3x3 kernel with padding 1 (25 positions instead of 36).
struct Plan : ConvGeom {
  int64_t PH, PW, frame, nph;  // phase plane (real pixels + zero gap), its size, phases
  int64_t bt, nbt;             // samples per tile, tiles
  int64_t S, L, LX;            // segment stride (multiple of QB); positions computed for y/dw
                               // and for dx (multiples of QB/2: the last block may be half)
  int64_t XF, F, xs, ys;       // front slacks of packed x and dy, packed channel strides
  int64_t cb, ncb;             // input channels per L1 block of the forward, blocks
  bool blocked;                // rows of >= 50 nonzeros: channel-blocked forward, larger tiles
  std::vector<int64_t> tap_in, tap_ph;    // per tap: shift inside the phase plane, phase index
  std::vector<uint8_t> used_ph;           // phases some tap reads
  std::vector<int64_t> row_off, col_off;  // dx unpack: input row iy / column ix < sw -> offset
};

// nnz picks the forward's loop order and the tile size (rows of >= 50 nonzeros: "blocked").
// offsets: build row_off (O(H); only the geometry queries skip it).
Plan make_plan(int64_t B, int64_t C, int64_t H, int64_t W, int64_t O, at::IntArrayRef k,
               at::IntArrayRef st, at::IntArrayRef pad, size_t elem, int64_t nnz, bool offsets = true);

// y when y is given (x, crow, col, vals, bias), else dx when dx is given (dy, ccol, row_t, perm,
// vals) and dvalues when dvals is given (dy, x, crow, col). With y, the epilogue (conv_epilogue):
// relu(y) when `relu`, its per-channel sums and sums of squares in stats [2, O] when given, and
// the positive outputs counted per neuron into relu_counts [O * OH * OW] when given (StateCounts).
// With dx and dx_add ([B, C, H, W], like dx): dx = conv_transpose(dy) + dx_add, the addition done
// on each tile while it is in cache (a gradient from another branch that reads x: no extra pass).
template <typename T>
void run_conv(const Plan& P, const T* x, const T* dy, const T* bias, const int64_t* crow,
              const int32_t* col, const T* vals, const int64_t* ccol, const int32_t* row_t,
              const int64_t* perm, int64_t nnz, T* y, T* dx, T* dvals, bool relu = false,
              double* stats = nullptr, const T* dx_add = nullptr, const BnPack<T>* bn = nullptr,
              const XAct<T>* xact = nullptr, int64_t* relu_counts = nullptr);

// ---- the small-map kernel (sparse_conv2d_small.cpp)
// Batch tile (elements: 1, 2 or 4 64-byte vectors) of the small-map kernel, or 0 where it does not
// apply: output maps of at most 16 pixels, a batch of at least one vector, a packed tile of <= 2 MB.
int64_t small_conv_tile(const ConvGeom& g, size_t elem);

// The three products of the small-map kernel, with run_conv's contract.
template <typename T>
void small_conv(const ConvGeom& g, int64_t bt, const T* x, const T* dy, const T* bias,
                const int64_t* crow, const int32_t* col, const T* vals, const int64_t* ccol,
                const int32_t* row_t, const int64_t* perm, int64_t nnz, T* y, T* dx, T* dvals,
                bool relu = false, double* stats = nullptr, const T* dx_add = nullptr,
                int64_t* relu_counts = nullptr);

// ---- the strided 1x1 kernel (sparse_conv2d_pointwise.cpp)
// Output rows per band of the strided 1x1 kernel, or 0 where it does not apply (kernel 1x1, no
// padding, a stride above 1 once make_plan has clamped a stride past the map to it).
int64_t pointwise_conv_rows(const ConvGeom& g, size_t elem);

// The three products of the strided 1x1 kernel, with run_conv's contract (no XAct; a BnPack only
// where one band is the whole map, rb >= OH, and without pooling).
template <typename T>
void pointwise_conv(const ConvGeom& g, int64_t rb, const T* x, const T* dy, const T* bias, const int64_t* crow,
                    const int32_t* col, const T* vals, const int64_t* ccol, const int32_t* row_t,
                    const int64_t* perm, int64_t nnz, T* y, T* dx, T* dvals, bool relu = false,
                    double* stats = nullptr, const T* dx_add = nullptr, int64_t* relu_counts = nullptr,
                    const BnPack<T>* bn = nullptr);

}  // namespace sparsetrain
