// SparseConv2d on CPU for small maps (at most 16 output pixels: ResNet-18 layer4, VGG stages 4-5):
// batch-innermost layout. A tile of bt samples is packed as xt[c][iy][ix][0:bt], so a nonzero
// w[o, c, i, j] adds to output pixel (oy, ox) one contiguous axpy over the batch:
//     yt[o][oy][ox][:] += w * xt[c][oy*sh + i - ph][ox*sw + j - pw][:]     (taps inside the map)
// Zero padding is neither stored nor multiplied: a pixel visits only the taps that land inside the
// map (the phase-plane kernel's zero gaps cost 56 % extra work at 4x4 and 125 % at 2x2), so the
// work is exactly nnz * batch * (valid pixel-tap pairs). Nonzeros are grouped by tap per row (per
// input channel for dx, which the CSC index already is), so a pixel walks its valid tap groups.
//   input gradient:  dxt[c][iy][ix][:] = sum over (o, tap) reaching (iy, ix) of w * dyt[o][oy][ox][:]
//   weight gradient: dw[o, c, i, j] = sum over output pixels of <dyt[o][oy][ox][:], xt[c][iy][ix][:]>
// Parallel like the phase-plane kernel: tasks = (batch tile, chunk of output channels for the
// forward and weight gradient, of input channels for the input gradient), no two writers.
#include "sparse_conv2d.h"
#include "transpose.h"

namespace sparsetrain {
namespace {

// The batch tile: at most kSmallTileVectors 64-byte vectors of samples per pixel (64 fp32), the packed x
// or dy tile at most kSmallTileBytes. The per-pixel loops are bound by their branches (a row's tap groups,
// ~5 nonzeros each at 99 %, end at random; groups of equal length ran 29 % faster at 32 samples), so
// more samples per nonzero pay off even past the L2 (1 MB on Zen 5): ResNet-18 layer4 at 99 % (batch
// 128), 32 -> 64 samples: forward 1.19 -> 0.94 ms (0.64 -> 0.37 ms at 99.9 %), the layer's convs in
// the fused step ~25 -> ~21 ms. 128 samples (a 4 MB tile, two half-width walks) were slower again.
constexpr int64_t kSmallTileBytes = 2 << 20;
constexpr int64_t kSmallTileVectors = 4;
// Measured on the ResNet-18 and VGG shapes: at 8x8 maps the phase planes (27 % zero-gap work)
// are as fast or faster at 99 % and 99.9 %, so only maps of <= 16 output pixels come here.
constexpr int64_t kMaxPixels = 16;

// Per pixel p, the taps [ptr[p], ptr[p + 1]) that connect it to the other side inside the map:
// tap t = i*kw + j and the element offset of the pixel on the other side in its packed map.
struct TapList {
  std::vector<int64_t> ptr, tap, off;
};

// Output pixel -> taps whose input pixel is inside: off = (iy*W + ix) * bt.
TapList fwd_taps(const ConvGeom& g, int64_t bt) {
  TapList L;
  L.ptr.push_back(0);
  for (int64_t oy = 0; oy < g.OH; ++oy)
    for (int64_t ox = 0; ox < g.OW; ++ox) {
      for (int64_t i = 0; i < g.kh; ++i)
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t iy = oy * g.sh + i - g.ph, ix = ox * g.sw + j - g.pw;
          if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.W) continue;
          L.tap.push_back(i * g.kw + j);
          L.off.push_back((iy * g.W + ix) * bt);
        }
      L.ptr.push_back(int64_t(L.tap.size()));
    }
  return L;
}

// Input pixel -> taps (and output pixel) that read it: off = (oy*OW + ox) * bt.
TapList bwd_taps(const ConvGeom& g, int64_t bt) {
  TapList L;
  L.ptr.push_back(0);
  for (int64_t iy = 0; iy < g.H; ++iy)
    for (int64_t ix = 0; ix < g.W; ++ix) {
      for (int64_t i = 0; i < g.kh; ++i)
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t ry = iy + g.ph - i, rx = ix + g.pw - j;  // = oy*sh, ox*sw
          if (ry < 0 || rx < 0 || ry % g.sh || rx % g.sw) continue;
          const int64_t oy = ry / g.sh, ox = rx / g.sw;
          if (oy >= g.OH || ox >= g.OW) continue;
          L.tap.push_back(i * g.kw + j);
          L.off.push_back((oy * g.OW + ox) * bt);
        }
      L.ptr.push_back(int64_t(L.tap.size()));
    }
  return L;
}

// Per-call operands, shared read-only by all tasks.
template <typename T>
struct SArgs {
  const ConvGeom* g;
  int64_t bt, K;
  const TapList *ft, *bt_taps;
  const T *x, *dy, *bias;
  const int64_t* crow;
  const int64_t* tptr;  // [O][K + 1]: row o's nonzeros grouped by tap (absolute positions)
  const int64_t* eoff;  // per grouped entry: c * H*W * bt
  const T* eval;        // per grouped entry: its value (forward)
  const int64_t* epos;  // per grouped entry: its CSR position (weight gradient)
  const int64_t* ccol;  // CSC: entries of (c, tap) at [ccol[c*K + t], ccol[c*K + t + 1])
  const int64_t* doff;  // per CSC entry: o * OH*OW * bt
  const T* dval;        // per CSC entry: its value
  T *y, *dx;
  bool relu;      // forward epilogue: ReLU on y
  double* stats;  // forward epilogue: [tiles][O][2] sums and sums of squares of y, or nullptr
  const T* dx_add;  // backward: added to dx (its layout), or nullptr
  StateCounts* counts;  // forward: positive outputs per neuron, or nullptr
};

// out[0:NV vectors] = init + sum over the pixel's valid tap groups of w[e] * base[off[e] + tap
// offset]. NS interleaved accumulator sets keep NS*NV >= 8 independent FMA chains; a pixel wider
// than kMaxAcc vectors (AVX2 or baseline clones, 128 samples) goes in halves of the batch.
template <typename T, int VB, int NV>
ST_INLINE void pixel_axpy(T* __restrict out, const T* base, const TapList& tl, int64_t p,
                          const int64_t* gptr, const int64_t* off, const T* w, T init) {
  using V = typename SimdVec<T, VB>::V;
  using U = typename SimdVec<T, VB>::U;
  if constexpr (NV > kMaxAcc) {
    constexpr int64_t H = NV / 2 * VB / sizeof(T);
    pixel_axpy<T, VB, NV / 2>(out, base, tl, p, gptr, off, w, init);
    pixel_axpy<T, VB, NV / 2>(out + H, base + H, tl, p, gptr, off, w, init);
    return;
  }
  constexpr int NS = NV >= kMaxAcc ? 1 : kMaxAcc / NV;
  V a[NS][NV];
  for (int s = 0; s < NS; ++s)
    for (int u = 0; u < NV; ++u) a[s][u] = V{} + (s == 0 ? init : T(0));
  for (int64_t q = tl.ptr[p]; q < tl.ptr[p + 1]; ++q) {
    const T* b = base + tl.off[q];
    const int64_t t = tl.tap[q];
    int64_t e = gptr[t];
    const int64_t e1 = gptr[t + 1];
    for (; e + NS <= e1; e += NS)
      for (int s = 0; s < NS; ++s) {
        const T v = w[e + s];
        const U* x = reinterpret_cast<const U*>(b + off[e + s]);
        for (int u = 0; u < NV; ++u) a[s][u] += v * x[u];
      }
    for (; e < e1; ++e) {
      const T v = w[e];
      const U* x = reinterpret_cast<const U*>(b + off[e]);
      for (int u = 0; u < NV; ++u) a[0][u] += v * x[u];
    }
  }
  for (int s = 1; s < NS; ++s)
    for (int u = 0; u < NV; ++u) a[0][u] += a[s][u];
  for (int u = 0; u < NV; ++u) reinterpret_cast<V*>(out)[u] = a[0][u];
}

// pv[e - e0] += sum_u g[u] * base[off[e] + tap offset + u] over the pixel's valid tap groups.
template <typename T, int VB, int NV>
ST_INLINE void pixel_dot(const T* g, const T* base, const TapList& tl, int64_t p,
                         const int64_t* gptr, const int64_t* off, int64_t e0,
                         typename SimdVec<T, VB>::V* __restrict pv) {
  using V = typename SimdVec<T, VB>::V;
  using U = typename SimdVec<T, VB>::U;
  if constexpr (NV > kMaxAcc) {
    constexpr int64_t H = NV / 2 * VB / sizeof(T);
    pixel_dot<T, VB, NV / 2>(g, base, tl, p, gptr, off, e0, pv);
    pixel_dot<T, VB, NV / 2>(g + H, base + H, tl, p, gptr, off, e0, pv);
    return;
  }
  V gv[NV];
  for (int u = 0; u < NV; ++u) gv[u] = reinterpret_cast<const V*>(g)[u];
  for (int64_t q = tl.ptr[p]; q < tl.ptr[p + 1]; ++q) {
    const T* b = base + tl.off[q];
    const int64_t t = tl.tap[q];
    for (int64_t e = gptr[t]; e < gptr[t + 1]; ++e) {
      const U* x = reinterpret_cast<const U*>(b + off[e]);
      V s = gv[0] * x[0];
      for (int u = 1; u < NV; ++u) s += gv[u] * x[u];
      pv[e - e0] += s;
    }
  }
}

template <typename T, int VB, int NV>
ST_INLINE void small_fwd_impl(const SArgs<T>& A, int64_t tile, int64_t o0, int64_t o1, bool pack) {
  const ConvGeom& g = *A.g;
  const int64_t bt = A.bt, hw = g.H * g.W, ohw = g.OH * g.OW;
  const int64_t b0 = tile * bt, tb = std::min(bt, g.B - b0);
  T* xt = scratch<T>(size_t(g.C) * hw * bt, 0);
  T* ob = scratch<T>(size_t(o1 - o0) * ohw * bt, 2);  // yt[o - o0][p][0:bt]
  int32_t* cnt = A.counts ? A.counts->mine() : nullptr;
  if (pack) transpose_tile<T>(A.x + b0 * g.C * hw, g.C * hw, tb, bt, xt);
  for (int64_t o = o0; o < o1; ++o) {  // an empty row's groups are empty: its pixels get the bias
    const T init = A.bias ? A.bias[o] : T(0);
    const int64_t* gp = A.tptr + o * (A.K + 1);
    for (int64_t p = 0; p < ohw; ++p)
      pixel_axpy<T, VB, NV>(ob + ((o - o0) * ohw + p) * bt, xt, *A.ft, p, gp, A.eoff, A.eval, init);
    if (A.relu || A.stats)  // the epilogue on the tb real samples of each pixel, still in cache
      plane_epilogue<T, VB>(ob + (o - o0) * ohw * bt, bt, tb, ohw, A.relu,
                            A.stats ? A.stats + (tile * g.O + o) * 2 : nullptr);
    if (cnt)  // neuron (o, p): its tb samples are one row of the staging tile
      for (int64_t p = 0; p < ohw; ++p) {
        const T* v = ob + ((o - o0) * ohw + p) * bt;
        int32_t c = 0;
        for (int64_t b = 0; b < tb; ++b) c += v[b] > T(0) ? 1 : 0;
        cnt[o * ohw + p] += c;
      }
  }
  untranspose_tile<T>(ob, (o1 - o0) * ohw, tb, bt, A.y + (b0 * g.O + o0) * ohw, g.O * ohw, true);
}

// Backward of one tile: dx for input channels [c0, c1), dvalues partial sums for rows [o0, o1).
template <typename T, int VB, int NV>
ST_INLINE void small_bwd_impl(const SArgs<T>& A, int64_t tile, int64_t c0, int64_t c1, int64_t o0,
                              int64_t o1, bool pack, T* part) {
  using V = typename SimdVec<T, VB>::V;
  const ConvGeom& g = *A.g;
  const int64_t bt = A.bt, hw = g.H * g.W, ohw = g.OH * g.OW, K = A.K;
  const int64_t b0 = tile * bt, tb = std::min(bt, g.B - b0);
  T* xt = scratch<T>(part ? size_t(g.C) * hw * bt : 1, 0);
  T* dyt = scratch<T>(size_t(g.O) * ohw * bt, 1);
  T* db = scratch<T>(size_t(c1 - c0) * hw * bt, 2);  // dxt[c - c0][p][0:bt]
  if (pack) {
    transpose_tile<T>(A.dy + b0 * g.O * ohw, g.O * ohw, tb, bt, dyt);
    if (part) transpose_tile<T>(A.x + b0 * g.C * hw, g.C * hw, tb, bt, xt);
  }
  if (A.dx) {  // an input channel without nonzeros has empty groups: zeros
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t p = 0; p < hw; ++p)
        pixel_axpy<T, VB, NV>(db + ((c - c0) * hw + p) * bt, dyt, *A.bt_taps, p, A.ccol + c * K, A.doff,
                          A.dval, T(0));
    if (A.dx_add) {  // its tile transposed like db's, then added while db is in cache
      const int64_t n = (c1 - c0) * hw * bt;
      T* at = scratch<T>(size_t(n), 4);
      transpose_tile<T>(A.dx_add + (b0 * g.C + c0) * hw, (c1 - c0) * hw, tb, bt, at, g.C * hw);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) db[i] += at[i];
    }
    untranspose_tile<T>(db, (c1 - c0) * hw, tb, bt, A.dx + (b0 * g.C + c0) * hw, g.C * hw, true);
  }
  if (part)
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t e0 = A.crow[o], n = A.crow[o + 1] - e0;
      if (n == 0) continue;
      V* pv = reinterpret_cast<V*>(scratch<T>(size_t(n) * (VB / sizeof(T)), 3));
      for (int64_t k = 0; k < n; ++k) pv[k] = V{};
      const int64_t* gp = A.tptr + o * (K + 1);
      for (int64_t p = 0; p < ohw; ++p)
        pixel_dot<T, VB, NV>(dyt + (o * ohw + p) * bt, xt, *A.ft, p, gp, A.eoff, e0, pv);
      for (int64_t k = 0; k < n; ++k) part[A.epos[e0 + k]] += hsum<T, VB>(pv[k]);
    }
}

// Hot loops in multiversioned functions (a lambda does not inherit the clones' target ISA, and
// GCC clones plain functions only); the register width and the tile's bytes per pixel (bt * elem:
// 64-256) pick the instantiation, NV = bytes / VB vectors per pixel.
#define ST_SMALL_SWITCH(T, CALL)                                    \
  ST_SWITCH_VB(switch (A.bt * int64_t(sizeof(T))) {                \
    case 256: { constexpr int NV = 256 / VB; CALL; break; }        \
    case 128: { constexpr int NV = 128 / VB; CALL; break; }        \
    default: { constexpr int NV = 64 / VB; CALL; break; }          \
  })
#define ST_SMALL_TASKS(T)                                                                        \
  ST_MULTIVERSION void small_fwd_task(const SArgs<T>& A, int64_t tile, int64_t o0, int64_t o1,   \
                                      bool pack) try {                                           \
    ST_SMALL_SWITCH(T, (small_fwd_impl<T, VB, NV>(A, tile, o0, o1, pack)));                      \
  } ST_CLONE_CATCH                                                                               \
  ST_MULTIVERSION void small_bwd_task(const SArgs<T>& A, int64_t tile, int64_t c0, int64_t c1,   \
                                      int64_t o0, int64_t o1, bool pack, T* part) try {          \
    ST_SMALL_SWITCH(T, (small_bwd_impl<T, VB, NV>(A, tile, c0, c1, o0, o1, pack, part)));        \
  } ST_CLONE_CATCH
ST_SMALL_TASKS(float)
ST_SMALL_TASKS(double)
#undef ST_SMALL_TASKS
#undef ST_SMALL_SWITCH


}  // namespace

int64_t small_conv_tile(const ConvGeom& g, size_t elem) {
  const int64_t lanes = 64 / int64_t(elem);
  if (g.OH * g.OW > kMaxPixels || g.B < lanes) return 0;  // below a vector of samples: lanes idle
  const int64_t per = std::max(g.C * g.H * g.W, g.O * g.OH * g.OW) * int64_t(elem);
  for (int64_t nv = kSmallTileVectors; nv >= 1; nv /= 2) {
    const int64_t bt = nv * lanes;
    if (per * bt <= kSmallTileBytes && (bt <= g.B || nv == 1)) return bt;
  }
  return 0;
}

template <typename T>
void small_conv(const ConvGeom& g, int64_t bt, const T* x, const T* dy, const T* bias,
                const int64_t* crow, const int32_t* col, const T* vals, const int64_t* ccol,
                const int32_t* row_t, const int64_t* perm, int64_t nnz, T* y, T* dx, T* dvals,
                bool relu, double* stats, const T* dx_add, int64_t* relu_counts) {
  const int64_t K = g.kh * g.kw, hw = g.H * g.W, ohw = g.OH * g.OW;
  const TapList ft = fwd_taps(g, bt), btl = bwd_taps(g, bt);
  std::vector<int64_t> tptr, eoff, epos, doff;
  std::vector<T> eval, dval;
  if (crow) {  // row o's nonzeros grouped by tap (a counting sort inside the row)
    tptr.assign(g.O * (K + 1), 0);
    eoff.resize(nnz);
    epos.resize(nnz);
    if (y) eval.resize(nnz);
    // per column c*K + t: its tap and x offset, looked up per nonzero (no division per nonzero)
    std::vector<int32_t> ctap(size_t(g.C * K));
    std::vector<int64_t> cx(size_t(g.C * K));
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t t = 0; t < K; ++t) ctap[c * K + t] = int32_t(t), cx[c * K + t] = c * hw * bt;
    at::parallel_for(0, g.O, 64, [&](int64_t ob, int64_t oe) {
      std::vector<int64_t> fill(K);  // next free slot per tap group
      for (int64_t o = ob; o < oe; ++o) {
        int64_t* gp = tptr.data() + o * (K + 1);
        for (int64_t p = crow[o]; p < crow[o + 1]; ++p) ++gp[ctap[col[p]] + 1];
        gp[0] = crow[o];
        for (int64_t t = 0; t < K; ++t) gp[t + 1] += gp[t];
        std::copy(gp, gp + K, fill.begin());
        for (int64_t p = crow[o]; p < crow[o + 1]; ++p) {
          const int64_t e = fill[ctap[col[p]]]++;
          eoff[e] = cx[col[p]];
          epos[e] = p;
          if (y) eval[e] = vals[p];
        }
      }
    });
  }
  if (dx) {  // CSC entries are already grouped by (input channel, tap)
    doff.resize(nnz);
    dval.resize(nnz);
    at::parallel_for(0, nnz, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        doff[k] = int64_t(row_t[k]) * ohw * bt;
        dval[k] = vals[perm[k]];
      }
    });
  }
  SArgs<T> A{&g, bt, K, &ft, &btl, x, dy, bias, crow, tptr.data(), eoff.data(), eval.data(),
                   epos.data(), ccol, doff.data(), dval.data(), y, dx, relu, nullptr, dx_add, nullptr};
  StateCounts counts(y ? relu_counts : nullptr, g.O * ohw);
  if (counts.counts) A.counts = &counts;
  const int64_t tiles = (g.B + bt - 1) / bt;
  std::vector<double> part(y && stats ? size_t(tiles) * g.O * 2 : 0, 0.0);
  A.stats = part.empty() ? nullptr : part.data();
  run_tasks<T>(
      tiles, g.C, g.O, y != nullptr, nnz, dvals,
      [&](int64_t tile, int64_t o0, int64_t o1, bool pack) { ST_CLONE_CALL(small_fwd_task(A, tile, o0, o1, pack)); },
      [&](int64_t tile, int64_t c0, int64_t c1, int64_t o0, int64_t o1, bool pack, T* part) {
        ST_CLONE_CALL(small_bwd_task(A, tile, c0, c1, o0, o1, pack, part));
      });
  if (!part.empty()) reduce_stats(part, tiles, g.O, stats);
  counts.finish();
}

template void small_conv<float>(const ConvGeom&, int64_t, const float*, const float*, const float*,
                                const int64_t*, const int32_t*, const float*, const int64_t*,
                                const int32_t*, const int64_t*, int64_t, float*, float*, float*, bool,
                                double*, const float*, int64_t*);
template void small_conv<double>(const ConvGeom&, int64_t, const double*, const double*,
                                 const double*, const int64_t*, const int32_t*, const double*,
                                 const int64_t*, const int32_t*, const int64_t*, int64_t, double*,
                                 double*, double*, bool, double*, const double*, int64_t*);

}  // namespace sparsetrain
