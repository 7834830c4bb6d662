// Packing of the phase-plane kernel (sparse_conv2d_phase.cpp): tiles of x and dy into the packed
// layout its Plan describes (phase planes of PH x PW per channel, zero slacks around them), read by
// every nonzero's contiguous axpy. Included by sparse_conv2d_phase.cpp only.
#pragma once
#include "bn_act.h"
#include "rows.h"
#include "sparse_conv2d.h"

namespace sparsetrain {

// Positions per register block of the phase-plane kernel (fp32: 8 zmm accumulators on AVX-512,
// two passes of 8 ymm on AVX2); segments are padded so the last block may read QB positions past
// the grid.
constexpr int64_t QB = 128;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Packing streams through x (dy) in memory order, sample by sample and channel by channel (the
// loads are the call's DRAM traffic); the zero slacks around each channel are written separately.
// x plane (b, c) -> frame b of channel c's phase planes (channel base dst, stride xs): phase
// (a, bb) row u, column v holds x[s*u + a, s*v + bb], zeros past the real pixels.
// Plan fields are read into locals first here and in the other row loops: the row copies are
// byte moves that may alias anything, so a field read through P would be reloaded after every
// store (measured: 3x slower packing of 8x8 maps).
// With xa (stride 1 only, XAct): the rows are act((x - m) a + b) of the deferred BatchNorm.
template <typename T>
ST_INLINE void pack_x_plane(const Plan& P, const T* src, int64_t b, T* dst, const XAct<T>* xa = nullptr,
                            int64_t c = 0) {
  const int64_t sh = P.sh, sw = P.sw, H = P.H, W = P.W, PH = P.PH, PW = P.PW;
  const int64_t XF = P.XF, S = P.S, frame = P.frame;
  if (!xa) prefetch_ahead_n(src, H * W);  // (act_plane requests its rows itself)
  if (sh == 1 && sw == 1) {  // one phase: each row's W pixels, then PW - W zeros; zero rows below
    T* fr = dst + XF + b * frame;
    if (xa) {
      const T m = xa->mean[c], a = xa->scale[c], sft = xa->shift[c];
      for (int64_t r = 0; r < H; ++r) {
        T* d = fr + r * PW;
        const T* s = src + r * W;
        if (xa->relu) act_plane<T, true, false>(s, nullptr, d, W, m, a, sft);  // (bn_act's own row function)
        else act_plane<T, false, false>(s, nullptr, d, W, m, a, sft);
        zero_n(d + W, PW - W);
      }
    } else {
      copy_rows(fr, PW, src, W, W, H, PW - W);
    }
    zero_n(fr + H * PW, (PH - H) * PW);
    return;
  }
  const uint8_t* used = P.used_ph.data();
  if (sh == 2 && sw == 2 && W % 2 == 0) {  // rows in memory order: row iy -> row iy/2 of phases
    const int64_t nv = W / 2;              // (iy%2, 0) (even columns) and (iy%2, 1) (odd columns)
    T* fr = dst + XF + b * frame;
    for (int64_t iy = 0; iy < H; ++iy) {
      const int64_t f = 2 * (iy & 1), u = iy >> 1;
      T* e = used[f] ? fr + f * S + u * PW : nullptr;
      T* o = used[f + 1] ? fr + (f + 1) * S + u * PW : nullptr;
      if (e || o) split_row(e, o, src + iy * W, nv, PW - nv);
    }
    for (int64_t f = 0; f < 4; ++f) {  // rows past the real ones: 2u + a >= H
      const int64_t u0 = (H - (f >> 1) + 1) / 2;
      if (used[f]) zero_n(fr + f * S + u0 * PW, (PH - u0) * PW);
    }
    return;
  }
  for (int64_t a = 0; a < sh; ++a)
    for (int64_t bb = 0; bb < sw; ++bb) {
      if (!used[a * sw + bb]) continue;  // no tap reads this phase (1x1 stride 2)
      T* fr = dst + XF + (a * sw + bb) * S + b * frame;
      const int64_t nv = bb < W ? ceil_div(W - bb, sw) : 0;  // real columns
      for (int64_t u = 0; u < PH; ++u) {
        T* row = fr + u * PW;
        const int64_t iy = u * sh + a;
        if (iy >= H) { zero_n(row, PW); continue; }
        const T* s = src + iy * W + bb;
        if (sw == 2) for (int64_t v = 0; v < nv; ++v) row[v] = s[2 * v];  // vectorised
        else if (sw == 1) copy_n(row, s, nv);
        else for (int64_t v = 0; v < nv; ++v) row[v] = s[v * sw];
        zero_n(row + nv, PW - nv);
      }
    }
}

// Zeros of channel base dst outside the frames of samples < tb: front slack, frames of missing
// samples, segment tails; unused phases only where neighbouring phases' reads may reach.
template <typename T>
ST_INLINE void pack_x_slack(const Plan& P, int64_t tb, T* dst) {
  zero_n(dst, P.XF);
  for (int64_t f = 0; f < P.nph; ++f) {
    T* seg = dst + P.XF + f * P.S;
    if (!P.used_ph[f]) {  // reads of the neighbouring phases reach QB past their end, XF before
      zero_n(seg, QB);
      const int64_t back = std::min(P.XF, P.S);
      zero_n(seg + P.S - back, back);
      continue;
    }
    zero_n(seg + tb * P.frame, P.S - tb * P.frame);
  }
  zero_n(dst + P.XF + P.nph * P.S, P.xs - P.XF - P.nph * P.S);
}

// dy plane (b, o) onto frame b of the output grid at dst + F, zeros at junk positions.
template <typename T>
ST_INLINE void pack_dy_plane(const Plan& P, const T* src, int64_t b, T* dst) {
  const int64_t OH = P.OH, OW = P.OW, PH = P.PH, PW = P.PW;
  T* fr = dst + P.F + b * P.frame;
  copy_rows(fr, PW, src, OW, OW, OH, PW - OW);
  zero_n(fr + OH * PW, (PH - OH) * PW);
}

template <typename T>
ST_INLINE void pack_dy_slack(const Plan& P, int64_t tb, T* dst) {
  zero_n(dst, P.F);
  zero_n(dst + P.F + tb * P.frame, P.ys - P.F - tb * P.frame);
}

// Samples [b0, b0 + tb) of x (all channels c with used[c]) -> the packed tile xp, slacks zeroed.
template <typename T>
ST_INLINE void pack_x_tile(const Plan& P, const T* x, const uint8_t* used, int64_t b0, int64_t tb, T* xp,
                           const XAct<T>* xa = nullptr) {
  const int64_t C = P.C, hw = P.H * P.W, xs = P.xs;
  for (int64_t c = 0; c < C; ++c)
    if (used[c]) pack_x_slack(P, tb, xp + c * xs);
  for (int64_t b = 0; b < tb; ++b) {
    const T* src = x + (b0 + b) * C * hw;
    for (int64_t c = 0; c < C; ++c)
      if (used[c]) pack_x_plane(P, src + c * hw, b, xp + c * xs, xa, c);
  }
}

// Samples [b0, b0 + tb) of dy (output channels o with used[o]) -> the packed tile dyp.
template <typename T>
ST_INLINE void pack_dy_tile(const Plan& P, const T* dy, const uint8_t* used, int64_t b0, int64_t tb, T* dyp) {
  const int64_t O = P.O, ohw = P.OH * P.OW, ys = P.ys;
  for (int64_t o = 0; o < O; ++o)
    if (used[o]) pack_dy_slack(P, tb, dyp + o * ys);
  for (int64_t b = 0; b < tb; ++b) {
    const T* src = dy + (b0 + b) * O * ohw;
    for (int64_t o = 0; o < O; ++o)
      if (used[o]) prefetch_ahead_n(src + o * ohw, ohw), pack_dy_plane(P, src + o * ohw, b, dyp + o * ys);
  }
}

// pack_dy_tile with the BatchNorm's input gradient computed per plane from g (BnPack): every plane
// a packed row reads, and, for the first channel chunk of the tile (`first`), every plane for the
// residual's gradient and the bias sums (dsum: this tile's [O] partials). The residual's gradient
// (activation-sized, read back only by the block's other branch, after this whole pass) is built
// per plane in L1 and streamed out: plain stores first read every line (read-for-ownership); on the
// AVX-512 Xeon, ResNet-18's fused step at 99% 243 -> 231 ms (in-process interleaved A/B). A pooled
// layer's g (G.up) is unpooled plane by plane into L1.
template <typename T, int VB>
ST_INLINE void pack_dy_tile_bn(const Plan& P, const BnPack<T>& G, const T* g, const uint8_t* used, int64_t b0,
                               int64_t tb, T* dyp, bool first, double* dsum) {
  const int64_t O = P.O, ohw = P.OH * P.OW, ys = P.ys;
  T* tmp = scratch<T>(size_t(ohw), 4);
  T* ubuf = G.up ? scratch<T>(size_t(ohw), 6) : nullptr;
  const bool wg = first && G.gout, all = first && (G.gout || dsum);
  T* gtmp = wg ? scratch<T>(size_t(ohw), 5) : nullptr;  // (the residual's gradient plane)
  for (int64_t o = 0; o < O; ++o)
    if (used[o]) pack_dy_slack(P, tb, dyp + o * ys);
  for (int64_t b = 0; b < tb; ++b)
    for (int64_t o = 0; o < O; ++o) {
      if (!used[o] && !all) continue;
      const int64_t off = ((b0 + b) * O + o) * ohw;
      const T* gp = G.up ? G.up->plane(g, (b0 + b) * O + o, ubuf) : g + off;
      const T s = bn_dy_plane_for<T, VB>(G.relu_after, G.relu_before, G.res != nullptr, wg, gp, G.y + off,
                                     G.res ? G.res + off : nullptr, ohw, G.scale[o], G.shift[o], G.mean[o], G.ka[o],
                                     G.kb[o], G.kc[o], tmp, wg ? gtmp : nullptr);
      if (wg) stream_rows(G.gout + off, ohw, gtmp, 0, ohw, 1);
      if (first && dsum) dsum[o] += s;
      if (used[o]) pack_dy_plane(P, tmp, b, dyp + o * ys);
    }
  if (wg) stream_fence();
}

}  // namespace sparsetrain
