// The phase-plane kernel's hot loops, per-tile tasks and run_conv, as templates over the element type:
// included by sparse_conv2d_phase.cpp (float, and the plan) and sparse_conv2d_phase_f64.cpp (double),
// so the two instantiations compile in parallel and a change to one recompiles one.
// Each includer defines the tasks for its type with ST_DEFINE_TASKS(T) and instantiates run_conv<T>.
#pragma once
#include <cstring>

#include "sparse_conv2d_pack.h"

namespace sparsetrain {
namespace {

// Mean nonzeros per row from which the channel-blocked forward pays (measured on the ResNet-18
// shapes: ~10 % faster at 90 % sparsity, 58-460 per row; 5-20 % slower at 99 % and 99.9 %).
constexpr int64_t kBlockedRow = 50;
// Packed x (or dy) tile, meant to stay in L2 next to the output staging: 768 KB for dense rows
// (90 %), 512 KB for sparse rows (99 %, 99.9 %: 3-14 % faster than 768 KB where it was measured,
// a 2 MB-L2 core). Fixed sizes, not derived from the running CPU's caches (README, known limits).
constexpr int64_t kTileBytesDense = 768 * 1024, kTileBytesSparse = 512 * 1024;
constexpr int64_t kRowBuf = 256;  // stride-2 input gradient rows up to this width are streamed

}  // namespace

namespace {

// Per-call operands, shared read-only by all tasks.
template <typename T>
struct Args {
  const Plan* P;
  const T *x, *dy, *vals, *bias;
  const int64_t* crow;     // CSR rows
  const int64_t* seg;      // [O][ncb + 1]: first nonzero of row o in channel block j
  const int64_t* xoff;     // per nonzero: c*xs + phase*S + shift
  const int64_t* dptr;     // [C*nph + 1]: CSC entries of channel c, phase ph (dx order)
  const int64_t* doff;     // per dx entry: o*ys + F - shift
  const T* dval;           // per dx entry: its value
  const uint8_t *used_c, *used_o;
  T *y, *dx;
  bool relu;      // forward epilogue: ReLU on y
  double* stats;  // forward epilogue: [tiles][O][2] sums and sums of squares of y, or nullptr
  const T* dx_add;  // backward: added to dx (its layout), or nullptr
  const BnPack<T>* bn;  // backward: dy is the BatchNorm's input gradient of dy = g (BnPack), or nullptr
  const XAct<T>* xact;  // x is y of a deferred BatchNorm (XAct), or nullptr
  double* bn_part;      // with bn->dsum: [tiles][O] partial sums of dy
  StateCounts* counts;  // forward: positive outputs per neuron, or nullptr
};

// The operands of a nonzero are QB scattered positions (another channel, another shift): a few
// cache lines from L2 each, so they are requested kPrefetch nonzeros ahead.
constexpr int64_t kPrefetch = 6;
template <typename T, int64_t NQ>
ST_INLINE void prefetch_block(const T* p) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t u = 0; u <= NQ * int64_t(sizeof(T)); u += 64) __builtin_prefetch(c + u);
}

// out[0:NV vectors] = (accumulate ? out : init) + sum_k w[k] * base[off[k] + 0:NV vectors], the
// accumulators in registers.
template <typename T, int VB, int NV>
ST_INLINE void axpy_pass(T* __restrict out, const T* base, const int64_t* off, const T* w,
                         int64_t n, T init, bool accumulate) {
  using V = typename SimdVec<T, VB>::V;
  using U = typename SimdVec<T, VB>::U;
  constexpr int64_t NQ = NV * VB / sizeof(T);
  V acc[NV];
  if (accumulate)
    for (int u = 0; u < NV; ++u) acc[u] = reinterpret_cast<const V*>(out)[u];
  else
    for (int u = 0; u < NV; ++u) acc[u] = V{} + init;
  for (int64_t k = 0; k < n; ++k) {
    const T v = w[k];
    const U* s = reinterpret_cast<const U*>(base + off[k]);
    if (k + kPrefetch < n) prefetch_block<T, NQ>(base + off[k + kPrefetch]);
    for (int u = 0; u < NV; ++u) acc[u] += v * s[u];
  }
  for (int u = 0; u < NV; ++u) reinterpret_cast<U*>(out)[u] = acc[u];
}

// pv[k] (one vector of partial sums per nonzero) += g[0:NV vectors] * base[off[k] + 0:NV vectors]
// for k < n, the block of g in registers; the caller reduces pv[k] to a scalar once per tile.
template <typename T, int VB, int NV>
ST_INLINE void dot_pass(const T* g, const T* base, const int64_t* off, int64_t n,
                        typename SimdVec<T, VB>::V* __restrict pv) {
  using V = typename SimdVec<T, VB>::V;
  using U = typename SimdVec<T, VB>::U;
  constexpr int64_t NQ = NV * VB / sizeof(T);
  V gv[NV];
  for (int u = 0; u < NV; ++u) gv[u] = reinterpret_cast<const U*>(g)[u];
  for (int64_t k = 0; k < n; ++k) {
    const U* s = reinterpret_cast<const U*>(base + off[k]);
    if (k + kPrefetch < n) prefetch_block<T, NQ>(base + off[k + kPrefetch]);
    V a0 = gv[0] * s[0], a1 = V{};
    for (int u = 1; u < NV; ++u) {  // two independent chains
      if (u & 1) a1 += gv[u] * s[u];
      else a0 += gv[u] * s[u];
    }
    pv[k] += a0 + a1;
  }
}

// One block of NQ positions: one pass while its vectors fit kMaxAcc registers, else halves, each
// re-walking the nonzeros (the second finds their operands' lines in L1).
template <typename T, int VB, int64_t NQ = QB>
ST_INLINE void axpy_block(T* out, const T* base, const int64_t* off, const T* w, int64_t n, T init,
                          bool accumulate = false) {
  constexpr int NV = NQ * sizeof(T) / VB;
  if constexpr (NV > kMaxAcc) {
    axpy_block<T, VB, NQ / 2>(out, base, off, w, n, init, accumulate);
    axpy_block<T, VB, NQ / 2>(out + NQ / 2, base + NQ / 2, off, w, n, init, accumulate);
  } else {
    axpy_pass<T, VB, NV>(out, base, off, w, n, init, accumulate);
  }
}

template <typename T, int VB, int64_t NQ = QB>
ST_INLINE void dot_block(const T* g, const T* base, const int64_t* off, int64_t n,
                         typename SimdVec<T, VB>::V* pv) {
  constexpr int NV = NQ * sizeof(T) / VB;
  if constexpr (NV > kMaxAcc) {
    dot_block<T, VB, NQ / 2>(g, base, off, n, pv);
    dot_block<T, VB, NQ / 2>(g + NQ / 2, base + NQ / 2, off, n, pv);
  } else {
    dot_pass<T, VB, NV>(g, base, off, n, pv);
  }
}

// The forward's epilogue of output channel o of one tile, its tb sample planes at pitch frame in
// src: the ReLU and BatchNorm sums (plane_epilogue), the positive counts, then y streamed out.
template <typename T, int VB>
ST_INLINE void fwd_finish(const Args<T>& A, int64_t tile, int64_t o, T* src, int32_t* cnt) {
  const Plan& P = *A.P;
  const int64_t b0 = tile * P.bt, tb = std::min(P.bt, P.B - b0), plane = P.OH * P.OW;
  double* st = A.stats ? A.stats + (tile * P.O + o) * 2 : nullptr;
  if (A.crow[o + 1] == A.crow[o]) {
    T init = A.bias ? A.bias[o] : T(0);
    conv_epilogue(&init, 1, A.relu, nullptr);
    for (int64_t b = 0; b < tb; ++b) stream_fill(A.y + ((b0 + b) * P.O + o) * plane, plane, init);
    if (st) st[0] = double(init) * tb * plane, st[1] = double(init) * init * tb * plane;
    if (cnt && init > T(0))
      for (int64_t i = 0; i < plane; ++i) cnt[o * plane + i] += int32_t(tb);
    return;
  }
  const int64_t O = P.O, OH = P.OH, OW = P.OW, PW = P.PW, frame = P.frame;
  const bool epi = A.relu || st;
  for (int64_t b = 0; b < tb; ++b) {
    T* yo = A.y + ((b0 + b) * O + o) * plane;
    if (epi) plane_epilogue<T, VB>(src + b * frame, PW, OW, OH, A.relu, st);
    if (cnt) count_positive(cnt + o * plane, src + b * frame, PW, OW, OH);
    stream_rows(yo, OW, src + b * frame, PW, OW, OH);
  }
}

// Forward of one tile for output channels [o0, o1). Sparse rows: one output channel at a time over
// all positions, into one row of staging (L1) that its epilogue reads and streams out right away
// (before, a staging row per channel, 64 x 4.6 KB for a 64-channel 32x32 tile, shared a 512 KB L2
// with the packed x: this order is 2-5% faster on those forwards on the Zen 2 EPYC, 2026-12-05,
// about 1% of the ResNet-18 step). Denser rows (P.blocked): position block outer, then blocks of cb
// input channels, then output channels, so the x window of (position block, channel block) stays in
// L1 while every row's nonzeros in it read it; partial sums in one staging row per channel (L2),
// then the epilogues.
template <typename T, int VB>
ST_INLINE void fwd_task_impl(const Args<T>& A, int64_t tile, int64_t o0, int64_t o1, bool pack) {
  const Plan& P = *A.P;
  const int64_t b0 = tile * P.bt, tb = std::min(P.bt, P.B - b0);
  T* xp = scratch<T>(size_t(P.C) * P.xs, 0);
  int32_t* cnt = A.counts ? A.counts->mine() : nullptr;
  if (pack) pack_x_tile(P, A.x, A.used_c, b0, tb, xp, A.xact);
  if (!P.blocked) {
    T* out = scratch<T>(size_t(P.L), 2);
    for (int64_t o = o0; o < o1; ++o) {
      const T init = A.bias ? A.bias[o] : T(0);
      const int64_t p0 = A.crow[o], n = A.crow[o + 1] - p0;
      if (n > 0) {
        int64_t q = 0;
        for (; q + QB <= P.L; q += QB) axpy_block<T, VB>(out + q, xp + q, A.xoff + p0, A.vals + p0, n, init);
        if (q < P.L) axpy_block<T, VB, QB / 2>(out + q, xp + q, A.xoff + p0, A.vals + p0, n, init);
      }
      fwd_finish<T, VB>(A, tile, o, out, cnt);
    }
  } else {
    T* ob = scratch<T>(size_t(o1 - o0) * P.L, 2);
    for (int64_t q = 0; q < P.L; q += QB) {
      const bool full = q + QB <= P.L;
      for (int64_t j = 0; j < P.ncb; ++j)
        for (int64_t o = o0; o < o1; ++o) {
          const int64_t* sg = A.seg + o * (P.ncb + 1);
          const int64_t p0 = sg[j], n = sg[j + 1] - p0;
          if (n == 0) continue;
          const bool acc = p0 != A.crow[o];  // an earlier channel block already wrote this block
          const T init = A.bias ? A.bias[o] : T(0);
          T* out = ob + (o - o0) * P.L + q;
          if (full) axpy_block<T, VB>(out, xp + q, A.xoff + p0, A.vals + p0, n, init, acc);
          else axpy_block<T, VB, QB / 2>(out, xp + q, A.xoff + p0, A.vals + p0, n, init, acc);
        }
    }
    for (int64_t o = o0; o < o1; ++o) fwd_finish<T, VB>(A, tile, o, ob + (o - o0) * P.L, cnt);
  }
  stream_fence();
}

// XAct's sums over `rows` rows of n elements of g (pitch gp_) and the raw y (pitch yp_) into s[2]
// (bn_act.cpp's bwd_sums on rows: explicit vectors, the mask a select; both take bn_act.h's sums_step).
template <typename T, int VB, bool RA>
ST_INLINE void xact_sums_rows(const T* g, int64_t gp_, const T* y, int64_t yp_, int64_t n, int64_t rows, T a, T b,
                              T m, double* s) {
  using V = typename SimdVec<T, VB>::V;
  using U = typename SimdVec<T, VB>::U;
  constexpr int64_t L = VB / sizeof(T);
  V s1{}, s2{};
  T t1 = 0, t2 = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T *gr = g + r * gp_, *yr = y + r * yp_;
    int64_t i = 0;
    for (; i + L <= n; i += L)
      sums_step<RA, false>(V(*reinterpret_cast<const U*>(gr + i)), V(*reinterpret_cast<const U*>(yr + i)), V{}, a, b, m,
                           s1, s2);
    for (; i < n; ++i) sums_step<RA, false>(gr[i], yr[i], T(0), a, b, m, t1, t2);
  }
  s[0] += hsum<T, VB>(s1) + t1, s[1] += hsum<T, VB>(s2) + t2;
}
template <typename T, int VB>
ST_INLINE void xact_sums(const XAct<T>& xa, int64_t c, const T* g, int64_t gp_, const T* y, int64_t yp_,
                         int64_t n, int64_t rows, double* s) {
  if constexpr (VB > 16)  // rows narrower than a vector (8x8 maps on AVX-512): half-width vectors
    if (n * int64_t(sizeof(T)) < VB) return xact_sums<T, VB / 2>(xa, c, g, gp_, y, yp_, n, rows, s);
  if (xa.relu) xact_sums_rows<T, VB, true>(g, gp_, y, yp_, n, rows, xa.scale[c], xa.shift[c], xa.mean[c], s);
  else xact_sums_rows<T, VB, false>(g, gp_, y, yp_, n, rows, xa.scale[c], xa.shift[c], xa.mean[c], s);
}

// Backward of one tile: dx for input channels [c0, c1), dvalues partial sums for rows [o0, o1).
template <typename T, int VB>
ST_INLINE void bwd_task_impl(const Args<T>& A, int64_t tile, int64_t c0, int64_t c1, int64_t o0,
                             int64_t o1, bool pack, T* part) {
  const Plan& P = *A.P;
  const int64_t b0 = tile * P.bt, tb = std::min(P.bt, P.B - b0), plane = P.H * P.W;
  T* xp = scratch<T>(part ? size_t(P.C) * P.xs : 1, 0);
  T* dyp = scratch<T>(size_t(P.O) * P.ys, 1);
  T* db = scratch<T>(size_t(P.nph) * P.S, 2);
  if (pack) {
    if (A.bn) pack_dy_tile_bn<T, VB>(P, *A.bn, A.dy, A.used_o, b0, tb, dyp, c0 == 0 && o0 == 0,
                              A.bn_part ? A.bn_part + tile * P.O : nullptr);
    else pack_dy_tile(P, A.dy, A.used_o, b0, tb, dyp);
    if (part) pack_x_tile(P, A.x, A.used_c, b0, tb, xp, A.xact);
  }
  if (A.dx) {
    for (int64_t c = c0; c < c1; ++c) {
      double* xs = A.xact && A.xact->part ? A.xact->part + (tile * P.C + c) * 2 : nullptr;
      if (!A.used_c[c]) {  // no nonzero reads channel c: dx = 0 (+ dx_add)
        for (int64_t b = 0; b < tb; ++b) {
          T* d = A.dx + ((b0 + b) * P.C + c) * plane;
          if (A.dx_add) stream_rows(d, plane, A.dx_add + (d - A.dx), plane, plane, 1);
          else stream_fill(d, plane, T(0));
          if (xs && A.dx_add) xact_sums<T, VB>(*A.xact, c, A.dx_add + (d - A.dx), 0, A.x + (d - A.dx), 0, plane, 1, xs);
        }
        continue;
      }
      for (int64_t f = 0; f < P.nph; ++f) {
        const int64_t e0 = A.dptr[c * P.nph + f], n = A.dptr[c * P.nph + f + 1] - e0;
        T* d = db + f * P.S;
        if (n == 0) { zero_n(d, P.LX); continue; }
        int64_t r = 0;
        for (; r + QB <= P.LX; r += QB) axpy_block<T, VB>(d + r, dyp + r, A.doff + e0, A.dval + e0, n, T(0));
        if (r < P.LX) axpy_block<T, VB, QB / 2>(d + r, dyp + r, A.doff + e0, A.dval + e0, n, T(0));
      }
      // dx[b, c, iy, ix] = dxp[phase((iy+ph)%sh, (ix+pw)%sw)][b][(iy+ph)/sh][(ix+pw)/sw]
      const int64_t C = P.C, H = P.H, W = P.W, sw = P.sw, frame = P.frame;
      const int64_t *row_off = P.row_off.data(), *col_off = P.col_off.data();
      if (A.dx_add)  // dx_add into the phase planes (in L2) before they are written out
        for (int64_t b = 0; b < tb; ++b) {
          const T* a = A.dx_add + ((b0 + b) * C + c) * plane;
          for (int64_t iy = 0; iy < H; ++iy) {
            T* rows = db + row_off[iy] + b * frame;
            const T* ar = a + iy * W;
            prefetch_ahead_n(ar, W);
            if (sw == 1) {
#pragma omp simd
              for (int64_t ix = 0; ix < W; ++ix) rows[ix] += ar[ix];
            } else if (sw == 2) {  // both column phases in one loop (vectorized: a de-interleave)
              T *r0 = rows + col_off[0], *r1 = rows + col_off[1];
              const int64_t half = W / 2;
#pragma omp simd
              for (int64_t v = 0; v < half; ++v) r0[v] += ar[2 * v], r1[v] += ar[2 * v + 1];
              if (W % 2) r0[half] += ar[W - 1];
            } else {
              for (int64_t j = 0; j < sw; ++j) {
                T* r = rows + col_off[j];
                for (int64_t ix = j, v = 0; ix < W; ix += sw, ++v) r[v] += ar[ix];
              }
            }
          }
        }
      alignas(64) T rowbuf[kRowBuf];
      for (int64_t b = 0; b < tb; ++b) {
        T* d = A.dx + ((b0 + b) * C + c) * plane;
        if (P.sh == 1 && sw == 1) {  // one phase: rows at pitch PW
          if (xs) xact_sums<T, VB>(*A.xact, c, db + b * frame, P.PW, A.x + (d - A.dx), W, W, H, xs);
          stream_rows(d, W, db + b * frame, P.PW, W, H);
          continue;
        }
        for (int64_t iy = 0; iy < H; ++iy) {
          const T* rows = db + row_off[iy] + b * frame;
          T* dr = d + iy * W;
          if (sw == 1) {
            stream_rows(dr, W, rows, 0, W, 1);
          } else if (sw == 2) {  // interleave the even- and odd-column phases (in L1, then streamed)
            const T* re = rows + col_off[0];
            const T* ro = rows + col_off[1];
            const bool st = W <= kRowBuf && streamable(dr, W, W);
            T* out = st ? rowbuf : dr;
            merge_row(out, re, ro, W / 2);
            if (W % 2) out[W - 1] = re[W / 2];
            if (st) stream_rows(dr, W, rowbuf, 0, W, 1);
          } else {
            for (int64_t j = 0; j < sw; ++j) {  // columns ix = j, j + sw, ...
              const T* r = rows + col_off[j];
              for (int64_t ix = j, v = 0; ix < W; ix += sw, ++v) dr[ix] = r[v];
            }
          }
        }
      }
    }
    stream_fence();
  }
  if (part) {
    using V = typename SimdVec<T, VB>::V;
    for (int64_t o = o0; o < o1; ++o) {
      const T* g = dyp + o * P.ys + P.F;
      const int64_t p0 = A.crow[o], n = A.crow[o + 1] - p0;
      V* pv = reinterpret_cast<V*>(scratch<T>(size_t(n) * (VB / sizeof(T)), 3));
      for (int64_t k = 0; k < n; ++k) pv[k] = V{};
      int64_t q = 0;
      for (; q + QB <= P.L; q += QB) dot_block<T, VB>(g + q, xp + q, A.xoff + p0, n, pv);
      if (q < P.L) dot_block<T, VB, QB / 2>(g + q, xp + q, A.xoff + p0, n, pv);
      for (int64_t k = 0; k < n; ++k) part[p0 + k] += hsum<T, VB>(pv[k]);
    }
  }
}

#define ST_DEFINE_TASKS(T)                                                                       \
  ST_MULTIVERSION void fwd_task(const Args<T>& A, int64_t tile, int64_t o0, int64_t o1,          \
                                bool pack) try {                                                 \
    ST_SWITCH_VB((fwd_task_impl<T, VB>(A, tile, o0, o1, pack)));                                 \
  } ST_CLONE_CATCH                                                                               \
  ST_MULTIVERSION void bwd_task(const Args<T>& A, int64_t tile, int64_t c0, int64_t c1,          \
                                int64_t o0, int64_t o1, bool pack, T* part) try {                \
    ST_SWITCH_VB((bwd_task_impl<T, VB>(A, tile, c0, c1, o0, o1, pack, part)));                   \
  } ST_CLONE_CATCH


// Index work shared by every tile (O(nnz)): x offsets per nonzero, the used channels and, for the
// input gradient, the CSC entries regrouped by (input channel, phase) with their dy offsets.
struct Index {
  std::vector<int64_t> xoff, dptr, doff, seg;
  std::vector<uint8_t> used_c, used_o;
};

}  // namespace

template <typename T>
void run_conv(const Plan& P, const T* x, const T* dy, const T* bias, const int64_t* crow,
              const int32_t* col, const T* vals, const int64_t* ccol, const int32_t* row_t,
              const int64_t* perm, int64_t nnz, T* y, T* dx, T* dvals, bool relu, double* stats,
              const T* dx_add, const BnPack<T>* bn, const XAct<T>* xact, int64_t* relu_counts) {
  const int64_t khkw = P.kh * P.kw;
  Index I;
  I.used_c.assign(P.C, 0);
  I.used_o.assign(P.O, 0);
  std::vector<T> dval;
  if (crow) {  // CSR known: x offsets (forward, weight gradient) and used channels
    // per column c*khkw + t, its x offset, looked up per nonzero: dividing each nonzero's column
    // (two 64-bit divisions) was most of a batch-1 call's index work (ResNet-18 layer4, 23593 nonzeros)
    std::vector<int64_t> coff(size_t(P.C * khkw));
    for (int64_t c = 0; c < P.C; ++c)
      for (int64_t t = 0; t < khkw; ++t) coff[c * khkw + t] = c * P.xs + P.XF + P.tap_ph[t] * P.S + P.tap_in[t];
    I.xoff.resize(nnz);
    at::parallel_for(0, nnz, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) I.xoff[p] = coff[col[p]];
    });
    std::vector<uint8_t> used_col(coff.size(), 0);
    for (int64_t p = 0; p < nnz; ++p) used_col[col[p]] = 1;
    for (int64_t c = 0; c < P.C; ++c)
      for (int64_t t = 0; t < khkw; ++t) I.used_c[c] |= used_col[c * khkw + t];
    if (y && P.blocked) {  // only the channel-blocked forward reads seg
      I.seg.resize(P.O * (P.ncb + 1));  // rows' columns ascend: channel blocks are sub-ranges
      for (int64_t o = 0; o < P.O; ++o) {
        int64_t p = crow[o];
        for (int64_t j = 0; j < P.ncb; ++j) {
          while (p < crow[o + 1] && col[p] < j * P.cb * khkw) ++p;
          I.seg[o * (P.ncb + 1) + j] = p;
        }
        I.seg[o * (P.ncb + 1) + P.ncb] = crow[o + 1];
      }
    }
    for (int64_t o = 0; o < P.O; ++o) I.used_o[o] = crow[o + 1] > crow[o];
  }
  if (dx) {  // CSC: per input channel, entries grouped by phase; dy offsets and values
    I.dptr.resize(P.C * P.nph + 1);
    I.doff.resize(nnz);
    dval.resize(nnz);
    at::parallel_for(0, P.C, 16, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        int64_t pos = ccol[c * khkw];
        for (int64_t f = 0; f < P.nph; ++f) {
          I.dptr[c * P.nph + f] = pos;
          for (int64_t t = 0; t < khkw; ++t) {
            if (P.tap_ph[t] != f) continue;
            for (int64_t k = ccol[c * khkw + t]; k < ccol[c * khkw + t + 1]; ++k, ++pos) {
              I.doff[pos] = int64_t(row_t[k]) * P.ys + P.F - P.tap_in[t];
              dval[pos] = vals[perm[k]];
            }
          }
        }
      }
    });
    I.dptr[P.C * P.nph] = nnz;
    for (int64_t c = 0; c < P.C; ++c) I.used_c[c] = ccol[(c + 1) * khkw] > ccol[c * khkw];
    for (int64_t k = 0; k < nnz; ++k) I.used_o[row_t[k]] = 1;
  }
  Args<T> A{&P, x, dy, vals, bias, crow, I.seg.data(), I.xoff.data(), I.dptr.data(), I.doff.data(), dval.data(),
            I.used_c.data(), I.used_o.data(), y, dx, relu, nullptr, dx_add, bn, xact, nullptr, nullptr};
  StateCounts counts(y ? relu_counts : nullptr, P.O * P.OH * P.OW);
  if (counts.counts) A.counts = &counts;
  std::vector<double> bn_part(bn && bn->dsum ? size_t(P.nbt) * P.O : 0, 0.0);
  if (!bn_part.empty()) A.bn_part = bn_part.data();
  std::vector<double> part(y && stats ? size_t(P.nbt) * P.O * 2 : 0, 0.0);
  if (!part.empty()) A.stats = part.data();
  run_tasks<T>(
      P.nbt, P.C, P.O, y != nullptr, nnz, dvals,
      [&](int64_t tile, int64_t o0, int64_t o1, bool pack) { ST_CLONE_CALL(fwd_task(A, tile, o0, o1, pack)); },
      [&](int64_t tile, int64_t c0, int64_t c1, int64_t o0, int64_t o1, bool pack, T* part) {
        ST_CLONE_CALL(bwd_task(A, tile, c0, c1, o0, o1, pack, part));
      });
  if (!part.empty()) reduce_stats(part, P.nbt, P.O, stats);
  counts.finish();
  if (!bn_part.empty())  // added to the caller's [O] in tile order (deterministic)
    for (int64_t t = 0; t < P.nbt; ++t)
      for (int64_t o = 0; o < P.O; ++o) bn->dsum[o] += bn_part[t * P.O + o];
}

}  // namespace sparsetrain
