// SparseConv2d on CPU for strided 1x1 convs without padding (the ResNets' downsample convs): the
// input pixels the conv reads, x[c, oy*sh, ox*sw], are gathered per tile (a group of samples, or a
// band of output rows of one sample when a sample is too large) into xs[c][0:n] (n = the tile's
// positions, sample-major; channels some nonzero reads only), so every nonzero w[o, c] is one
// contiguous axpy over the tile:
//     y[o][p]   = b[o] + sum_c w[o, c] * xs[c][p]
//     dxs[c][p] = sum_o w[o, c] * dy[o][p];   dx[c] = dxs at (oy*sh, ox*sw), zeros elsewhere
//     dw[o, c]  = sum_p dy[o][p] * xs[c][p]
// The phase-plane kernel splits x into sh*sw planes (a stride-2 1x1 conv reads one of the four) and
// merges dx back from them; here the unread pixels are never packed and dx's zero rows and columns
// are streamed straight out, so the traffic is x's read rows (twice: y and dW), y, dy and dx once.
// Parallel like the other kernels (run_tasks): tasks = tiles x chunks of channels.
#include "bn_act.h"
#include "rows.h"
#include "sparse_conv2d.h"

namespace sparsetrain {
namespace {

// Packed xs (or dy) of one tile at most this size, next to the output staging in L2.
constexpr int64_t kTileBytes = 128 * 1024;

// Per-call operands, shared read-only by all tasks.
template <typename T>
struct PArgs {
  const ConvGeom* g;
  int64_t bt, rb, nb;   // samples per tile; output rows per band, bands per sample (bt = 1 if nb > 1)
  int64_t ld, nv;       // packed row pitch (elements), vectors per register block (ld: a multiple)
  const T *x, *dy, *bias, *vals;
  const int64_t *crow, *ccol;
  const int32_t* col;
  const int64_t* ucol;  // input channels some nonzero reads, ascending (xs's rows)
  const int64_t* urow;  // output channels with nonzeros, ascending (dy's packed rows)
  int64_t nuc, nuo;
  const int64_t* xoff;  // per CSR nonzero: its channel's row in xs * ld
  const int64_t* doff;  // per CSC entry: its output channel's row in the packed dy * ld
  const int64_t* orow;  // per output channel: its row in the packed dy * ld (-1: no nonzeros)
  const T* dval;        // per CSC entry: its value
  T *y, *dx;
  bool relu;
  double* stats;        // [tiles][O][2], or nullptr
  const T* dx_add;      // added to dx (its layout), or nullptr
  StateCounts* counts;
  const BnPack<T>* bn;  // backward: dy is the BatchNorm's input gradient of dy = g (BnPack), or nullptr
  double* bn_part;      // with bn->dsum: [tiles][O] partial sums of dy
};

// out[0:ld] = init + sum_k w[k] * base[off[k] + 0:ld], in blocks of NV vectors held in registers
// (ld a multiple of NV vectors).
template <typename T, int VB, int NV>
ST_INLINE void band_axpy(T* __restrict out, const T* base, const int64_t* off, const T* w, int64_t n,
                         int64_t ld, T init) {
  using V = typename SimdVec<T, VB>::V;
  using U = typename SimdVec<T, VB>::U;
  constexpr int64_t NQ = NV * VB / int64_t(sizeof(T));
  for (int64_t q = 0; q < ld; q += NQ) {
    V acc[NV];
    for (int u = 0; u < NV; ++u) acc[u] = V{} + init;
    for (int64_t k = 0; k < n; ++k) {
      const T v = w[k];
      const U* s = reinterpret_cast<const U*>(base + off[k] + q);
      for (int u = 0; u < NV; ++u) acc[u] += v * s[u];
    }
    for (int u = 0; u < NV; ++u) reinterpret_cast<V*>(out + q)[u] = acc[u];
  }
}

// sum_i a[i] * b[i] over ld elements (a multiple of one vector), two chains.
template <typename T, int VB>
ST_INLINE T band_dot(const T* a, const T* b, int64_t ld) {
  using V = typename SimdVec<T, VB>::V;
  constexpr int64_t L = VB / int64_t(sizeof(T));
  V s0 = V{}, s1 = V{};
  int64_t i = 0;
  for (; i + 2 * L <= ld; i += 2 * L)
    s0 += *reinterpret_cast<const V*>(a + i) * *reinterpret_cast<const V*>(b + i),
        s1 += *reinterpret_cast<const V*>(a + i + L) * *reinterpret_cast<const V*>(b + i + L);
  if (i < ld) s0 += *reinterpret_cast<const V*>(a + i) * *reinterpret_cast<const V*>(b + i);
  return hsum<T, VB>(s0 + s1);
}

// A tile: samples [b0, b0 + tb), output rows [oy0, oy1) of each, m positions per sample, n in all.
struct Tile {
  int64_t b0, tb, oy0, oy1, m, n;
};
template <typename T>
ST_INLINE Tile tile_of(const PArgs<T>& A, int64_t tile) {
  const ConvGeom& g = *A.g;
  const int64_t b0 = tile / A.nb * A.bt, oy0 = tile % A.nb * A.rb, oy1 = std::min(g.OH, oy0 + A.rb);
  const int64_t tb = std::min(A.bt, g.B - b0), m = (oy1 - oy0) * g.OW;
  return {b0, tb, oy0, oy1, m, tb * m};
}

// xs[s][0:ld] = the tile's read pixels of input channel ucol[s], zeros past n.
template <typename T>
ST_INLINE void pack_xs(const PArgs<T>& A, const Tile& t, T* xs) {
  const ConvGeom& g = *A.g;
  const int64_t OW = g.OW, W = g.W, sh = g.sh, sw = g.sw, plane = g.H * W;
  for (int64_t s = 0; s < A.nuc; ++s) {
    T* d = xs + s * A.ld;
    for (int64_t b = 0; b < t.tb; ++b) {
      const T* src = A.x + ((t.b0 + b) * g.C + A.ucol[s]) * plane;
      for (int64_t oy = t.oy0; oy < t.oy1; ++oy, d += OW) {
        const T* r = src + oy * sh * W;
        prefetch_ahead_n(r, W);
        if (sw == 1) copy_n(d, r, OW);
        else if (sw == 2 && 2 * OW <= W) split_row<T>(d, nullptr, r, OW, 0);  // (reads 2 * OW pixels)
        else
          for (int64_t ox = 0; ox < OW; ++ox) d[ox] = r[ox * sw];
      }
    }
    zero_n(d, xs + s * A.ld + A.ld - d);
  }
}

// The packed dy of a tile of whole planes computed from the BatchNorm's output gradient g
// (sparse_conv2d_bn_backward, as the phase-plane kernel's pack_dy_tile_bn): dy never written. The
// first channel chunk of the tile (`first`) also does every other plane, for the residual's gradient
// (streamed out) and the bias sums (this tile's [O] partials).
template <typename T, int VB>
ST_INLINE void pack_dy_bn(const PArgs<T>& A, const Tile& t, int64_t tile, T* dys, bool first) {
  const ConvGeom& g = *A.g;
  const BnPack<T>& G = *A.bn;
  const int64_t O = g.O, ohw = g.OH * g.OW;
  double* dsum = first && A.bn_part ? A.bn_part + tile * O : nullptr;
  const bool wg = first && G.gout, all = wg || dsum;
  T* tmp = scratch<T>(size_t(ohw), 4);
  T* gtmp = wg ? scratch<T>(size_t(ohw), 5) : nullptr;
  for (int64_t b = 0; b < t.tb; ++b)
    for (int64_t o = 0; o < O; ++o) {
      if (A.orow[o] < 0 && !all) continue;
      const int64_t off = ((t.b0 + b) * O + o) * ohw;
      T* d = A.orow[o] < 0 ? tmp : dys + A.orow[o] + b * t.m;
      const T s = bn_dy_plane_for<T, VB>(G.relu_after, G.relu_before, G.res != nullptr, wg, A.dy + off, G.y + off,
                                         G.res ? G.res + off : nullptr, ohw, G.scale[o], G.shift[o], G.mean[o],
                                         G.ka[o], G.kb[o], G.kc[o], d, gtmp);
      if (wg) stream_rows(G.gout + off, ohw, gtmp, 0, ohw, 1);
      if (dsum) dsum[o] += s;
    }
  if (wg) stream_fence();
}

template <typename T, int VB, int NV>
ST_INLINE void pw_fwd_impl(const PArgs<T>& A, int64_t tile, int64_t o0, int64_t o1, bool pack) {
  const ConvGeom& g = *A.g;
  const Tile t = tile_of(A, tile);
  T* xs = scratch<T>(size_t(std::max<int64_t>(A.nuc, 1)) * A.ld, 0);
  T* out = scratch<T>(size_t(A.ld), 2);
  if (pack) pack_xs(A, t, xs);
  int32_t* cnt = A.counts ? A.counts->mine() : nullptr;
  const int64_t ohw = g.OH * g.OW, p0 = t.oy0 * g.OW;
  for (int64_t o = o0; o < o1; ++o) {
    const int64_t k0 = A.crow[o];
    band_axpy<T, VB, NV>(out, xs, A.xoff + k0, A.vals + k0, A.crow[o + 1] - k0, A.ld, A.bias ? A.bias[o] : T(0));
    plane_epilogue<T, VB>(out, t.m, t.m, t.tb, A.relu, A.stats ? A.stats + (tile * g.O + o) * 2 : nullptr);
    if (cnt)
      for (int64_t b = 0; b < t.tb; ++b) count_positive(cnt + o * ohw + p0, out + b * t.m, 0, t.m, 1);
    stream_rows(A.y + (t.b0 * g.O + o) * ohw + p0, g.O * ohw, out, t.m, t.m, t.tb);
  }
  stream_fence();
}

// Backward of one tile: its dx rows for input channels [c0, c1) (with the rows below the last
// one read), dvalues partial sums for rows [o0, o1).
template <typename T, int VB, int NV>
ST_INLINE void pw_bwd_impl(const PArgs<T>& A, int64_t tile, int64_t c0, int64_t c1, int64_t o0, int64_t o1,
                           bool pack, T* part) {
  const ConvGeom& g = *A.g;
  const Tile t = tile_of(A, tile);
  const int64_t ld = A.ld, ohw = g.OH * g.OW, p0 = t.oy0 * g.OW, H = g.H, W = g.W, OW = g.OW;
  T* xs = part ? scratch<T>(size_t(std::max<int64_t>(A.nuc, 1)) * ld, 0) : nullptr;
  T* dys = scratch<T>(size_t(std::max<int64_t>(A.nuo, 1)) * ld, 1);
  if (pack) {
    if (A.bn) pack_dy_bn<T, VB>(A, t, tile, dys, c0 == 0 && o0 == 0);
    else
      for (int64_t s = 0; s < A.nuo; ++s) {
        T* d = dys + s * ld;
        for (int64_t b = 0; b < t.tb; ++b, d += t.m) {
          const T* src = A.dy + ((t.b0 + b) * g.O + A.urow[s]) * ohw + p0;
          prefetch_ahead_n(src, t.m);
          copy_n(d, src, t.m);
        }
      }
    for (int64_t s = 0; s < A.nuo; ++s) zero_n(dys + s * ld + t.n, ld - t.n);
    if (part) pack_xs(A, t, xs);
  }
  if (A.dx) {
    // rows [oy0 * sh, oy1 * sh) of each dx plane: the tile's read rows and the unread ones below
    // each (OH * sh >= H), built in `stage` and streamed out as one contiguous run per plane
    const int64_t iy0 = t.oy0 * g.sh, iy1 = std::min(H, t.oy1 * g.sh), run = (iy1 - iy0) * W;
    T* acc = scratch<T>(size_t(ld), 2);
    T* stage = scratch<T>(size_t(run + 2 * OW), 3);  // (merge_row may write one past a row)
    T* zeros = scratch<T>(size_t(OW), 4);            // (merge_row's odd columns)
    zero_n(zeros, OW);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k0 = A.ccol[c], nk = A.ccol[c + 1] - k0;
      if (nk) band_axpy<T, VB, NV>(acc, dys, A.doff + k0, A.dval + k0, nk, ld, T(0));
      for (int64_t b = 0; b < t.tb; ++b) {
        const int64_t at = ((t.b0 + b) * g.C + c) * H * W + iy0 * W;
        const T* add = A.dx_add ? A.dx_add + at : nullptr;
        if (nk == 0) {  // no weights read this channel: zeros (+ dx_add)
          if (add) stream_rows(A.dx + at, 0, add, 0, run, 1);
          else stream_fill(A.dx + at, run, T(0));
          continue;
        }
        zero_n(stage, run);
        for (int64_t oy = t.oy0; oy < t.oy1; ++oy) {
          T* r = stage + (oy * g.sh - iy0) * W;
          const T* v = acc + b * t.m + (oy - t.oy0) * OW;
          if (g.sw == 1) copy_n(r, v, OW);
          else if (g.sw == 2) merge_row<T>(r, v, zeros, OW);  // (2 * OW <= W + 1: a zero past the row)
          else
            for (int64_t ox = 0; ox < OW; ++ox) r[ox * g.sw] = v[ox];
        }
        if (add)
#pragma omp simd
          for (int64_t i = 0; i < run; ++i) stage[i] += add[i];
        stream_rows(A.dx + at, 0, stage, 0, run, 1);
      }
    }
    stream_fence();
  }
  if (part)
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t k0 = A.crow[o], k1 = A.crow[o + 1];
      if (k0 == k1) continue;
      const T* gy = dys + A.orow[o];
      for (int64_t k = k0; k < k1; ++k) part[k] += band_dot<T, VB>(gy, xs + A.xoff[k], ld);
    }
}

// Hot loops in multiversioned functions (a lambda does not inherit the clones' target ISA).
#define ST_PW_SWITCH(CALL)                           \
  ST_SWITCH_VB(switch (A.nv) {                       \
    case 8: { constexpr int NV = 8; CALL; break; }   \
    case 4: { constexpr int NV = 4; CALL; break; }   \
    case 2: { constexpr int NV = 2; CALL; break; }   \
    default: { constexpr int NV = 1; CALL; break; }  \
  })
#define ST_PW_TASKS(T)                                                                                   \
  ST_MULTIVERSION void pw_fwd_task(const PArgs<T>& A, int64_t tile, int64_t o0, int64_t o1, bool pack) try { \
    ST_PW_SWITCH((pw_fwd_impl<T, VB, NV>(A, tile, o0, o1, pack)));                                       \
  } ST_CLONE_CATCH                                                                                       \
  ST_MULTIVERSION void pw_bwd_task(const PArgs<T>& A, int64_t tile, int64_t c0, int64_t c1, int64_t o0, \
                                   int64_t o1, bool pack, T* part) try {                                 \
    ST_PW_SWITCH((pw_bwd_impl<T, VB, NV>(A, tile, c0, c1, o0, o1, pack, part)));                         \
  } ST_CLONE_CATCH
ST_PW_TASKS(float)
ST_PW_TASKS(double)
#undef ST_PW_TASKS
#undef ST_PW_SWITCH

}  // namespace

int64_t pointwise_conv_rows(const ConvGeom& g, size_t elem) {
  if (g.kh != 1 || g.kw != 1 || g.ph || g.pw || (g.sh == 1 && g.sw == 1)) return 0;
  const int64_t per_row = std::max<int64_t>(std::max(g.C, g.O) * g.OW * int64_t(elem), 1);
  return std::clamp<int64_t>(kTileBytes / per_row, 1, std::max<int64_t>(g.OH, 1));
}

template <typename T>
void pointwise_conv(const ConvGeom& g, int64_t rb, const T* x, const T* dy, const T* bias, const int64_t* crow,
                    const int32_t* col, const T* vals, const int64_t* ccol, const int32_t* row_t,
                    const int64_t* perm, int64_t nnz, T* y, T* dx, T* dvals, bool relu, double* stats,
                    const T* dx_add, int64_t* relu_counts, const BnPack<T>* bn) {
  // whole samples per tile while one fits kTileBytes (rb = OH), at most the batch split over the
  // threads; else one sample's band of rb rows
  const int64_t nth = at::get_num_threads(), nb = (g.OH + rb - 1) / rb;
  const int64_t per_sample = std::max<int64_t>(std::max(g.C, g.O) * g.OH * g.OW * int64_t(sizeof(T)), 1);
  const int64_t bt = nb > 1 ? 1 : std::clamp<int64_t>(std::min(kTileBytes / per_sample, (g.B + nth - 1) / nth), 1,
                                                      std::max<int64_t>(g.B, 1));
  // register block: the widest of 8, 4, 2, 1 vectors a tile's positions fill; rows padded to it
  const int64_t lanes = kVecBytes / int64_t(sizeof(T)), nmax = bt * rb * g.OW;
  const int64_t nvec = (nmax + lanes - 1) / lanes;
  const int64_t nv = nvec >= 8 ? 8 : nvec >= 4 ? 4 : nvec >= 2 ? 2 : 1;
  const int64_t ld = (nmax + nv * lanes - 1) / (nv * lanes) * (nv * lanes);
  // the packed rows: input channels some nonzero reads, output channels with nonzeros
  std::vector<int64_t> cslot(g.C, -1), orow(g.O, -1), ucol, urow, xoff, doff;
  std::vector<T> dval;
  if (crow) {
    for (int64_t k = 0; k < nnz; ++k) cslot[col[k]] = 0;
    for (int64_t o = 0; o < g.O; ++o)
      if (crow[o + 1] > crow[o]) orow[o] = 0;
  } else {
    for (int64_t k = 0; k < nnz; ++k) orow[row_t[k]] = 0;
  }
  for (int64_t c = 0; c < g.C; ++c)
    if (cslot[c] == 0) cslot[c] = int64_t(ucol.size()) * ld, ucol.push_back(c);
  for (int64_t o = 0; o < g.O; ++o)
    if (orow[o] == 0) orow[o] = int64_t(urow.size()) * ld, urow.push_back(o);
  if (crow) {
    xoff.resize(nnz);
    for (int64_t k = 0; k < nnz; ++k) xoff[k] = cslot[col[k]];
  }
  if (dx) {
    doff.resize(nnz);
    dval.resize(nnz);
    for (int64_t k = 0; k < nnz; ++k) doff[k] = orow[row_t[k]], dval[k] = vals[perm[k]];
  }
  const int64_t tiles = (g.B + bt - 1) / bt * nb;
  PArgs<T> A{&g, bt, rb, nb, ld, nv, x, dy, bias, vals, crow, ccol, col, ucol.data(), urow.data(),
             int64_t(ucol.size()), int64_t(urow.size()), xoff.data(), doff.data(), orow.data(), dval.data(),
             y, dx, relu, nullptr, dx_add, nullptr, bn, nullptr};
  TORCH_CHECK(!bn || (nb == 1 && !bn->up), "the strided 1x1 kernel computes a BatchNorm's dy on whole planes only");
  StateCounts counts(y ? relu_counts : nullptr, g.O * g.OH * g.OW);
  if (counts.counts) A.counts = &counts;
  std::vector<double> bn_part(bn && bn->dsum ? size_t(tiles) * g.O : 0, 0.0);
  if (!bn_part.empty()) A.bn_part = bn_part.data();
  std::vector<double> part(y && stats ? size_t(tiles) * g.O * 2 : 0, 0.0);
  A.stats = part.empty() ? nullptr : part.data();
  run_tasks<T>(
      tiles, g.C, g.O, y != nullptr, nnz, dvals,
      [&](int64_t tile, int64_t o0, int64_t o1, bool pack) { ST_CLONE_CALL(pw_fwd_task(A, tile, o0, o1, pack)); },
      [&](int64_t tile, int64_t c0, int64_t c1, int64_t o0, int64_t o1, bool pack, T* part) {
        ST_CLONE_CALL(pw_bwd_task(A, tile, c0, c1, o0, o1, pack, part));
      });
  if (!part.empty()) reduce_stats(part, tiles, g.O, stats);
  counts.finish();
  if (!bn_part.empty())  // added to the caller's [O] in tile order (deterministic)
    for (int64_t t = 0; t < tiles; ++t)
      for (int64_t o = 0; o < g.O; ++o) bn->dsum[o] += bn_part[t * g.O + o];
}

#define ST_PW_INSTANTIATE(T)                                                                                    \
  template void pointwise_conv<T>(const ConvGeom&, int64_t, const T*, const T*, const T*, const int64_t*,      \
                                  const int32_t*, const T*, const int64_t*, const int32_t*, const int64_t*,     \
                                  int64_t, T*, T*, T*, bool, double*, const T*, int64_t*, const BnPack<T>*);
ST_PW_INSTANTIATE(float)
ST_PW_INSTANTIATE(double)
#undef ST_PW_INSTANTIATE

}  // namespace sparsetrain
