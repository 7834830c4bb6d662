// SparseConv2d on CPU: direct sparse convolution (no im2col) with a CSR weight
// W[O, C*kh*kw] (column = c*kh*kw + i*kw + j): forward, input gradient, weight gradient at nonzeros.
//
// Layout. A tile of `bt` samples of one input channel c is packed (zero padding included) into
// s_h*s_w "phase planes" of PH x PW: phase (a, b) holds xpad[s*u + a, s*v + b]. A stride-s conv
// becomes a stride-1 conv on the phases: tap (i, j) reads phase (i%s, j%s) at offset
// (i/s)*PW + j/s. Output (b, oy, ox) lives at q = b*PH*PW + oy*PW + ox of a grid with the same
// pitch, so every nonzero w[o, c, i, j] is ONE contiguous axpy over the whole tile:
//     yq[o][q] += w * xp[c][phase][q + off(i, j)]          (positions with ox >= OW are junk)
// Loops run over blocks of QB positions with the accumulators in vector registers, summing all
// nonzeros of a row before storing: work = nnz * B * PH*PW FMAs; traffic = x and y once each.
//   input gradient:  dxp[c][phase][r] = sum w * dyq[o][r - off]  (dyq zero at junk positions)
//   weight gradient: dw[o, c, i, j]  = sum_q dyq[o][q] * xp[c][phase][q + off]
// Parallel: tasks = (batch tile, chunk of output channels for forward and weight gradient, of
// input channels for the input gradient), so threads never write the same output. Hot loops are
// in ST_MULTIVERSION task functions (a lambda does not inherit the clones' target ISA).
#include <cstring>

#include "sparse_conv2d.h"

namespace sparsetrain {
namespace {

constexpr int64_t QB = 128;  // positions per register block: 8 zmm accumulators of fp32
constexpr int64_t kTileBytes = 768 * 1024;   // packed x (or dy) tile: stays in L2
// Mean nonzeros per row from which the channel-blocked forward pays (measured on the ResNet-18
// shapes: ~10 % faster at 90 % sparsity, 58-460 per row; 5-20 % slower at 99 % and 99.9 %).
constexpr int64_t kBlockedRow = 50;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// Zero padding is not stored per sample: a phase plane holds only real pixels followed by zero
// columns/rows, and a tap reaching left of (above) the plane reads the previous row's (sample's)
// trailing zeros. So every shift may be negative, and the plane is as small as the shifts allow:
// 5x5 instead of 6x6 for a 4x4 input and a 3x3 kernel with padding 1 (25 positions instead of 36).
struct Plan {
  int64_t B, C, H, W, O, kh, kw, sh, sw, ph, pw, OH, OW;
  int64_t PH, PW, frame, nph;  // phase plane (real pixels + zero gap), its size, phases
  int64_t bt, nbt;             // samples per tile, tiles
  int64_t S, L, LX;            // segment stride (multiple of QB); positions computed for y/dw
                               // and for dx (multiples of QB/2: the last block may be half)
  int64_t XF, F, xs, ys;       // front slacks of packed x and dy, packed channel strides
  int64_t cb, ncb;             // input channels per L1 block of the forward, blocks
  std::vector<int64_t> tap_in, tap_ph;    // per tap: shift inside the phase plane, phase index
  std::vector<uint8_t> used_ph;           // phases some tap reads
  std::vector<int64_t> row_off, col_off;  // dx unpack: input row iy / column ix < sw -> offset
};

// Phase plane extent along one axis: it must hold the real pixels (n/s rounded up), the output
// grid (on), the reach of the last output (on - 1 + max shift) and, past the real pixels, as many
// zeros as the first output reaches before the plane (-min shift).
int64_t plane_extent(int64_t n, int64_t k, int64_t s, int64_t p, int64_t on) {
  const int64_t lo = floor_div(-p, s), hi = on - 1 + floor_div(k - 1 - p, s);
  return std::max({ceil_div(n, s) - lo, hi + 1, on, int64_t(1)});
}

Plan make_plan(int64_t B, int64_t C, int64_t H, int64_t W, int64_t O, at::IntArrayRef k,
               at::IntArrayRef st, at::IntArrayRef pad, size_t elem) {
  Plan P;
  P.B = B, P.C = C, P.H = H, P.W = W, P.O = O;
  P.kh = k[0], P.kw = k[1], P.sh = st[0], P.sw = st[1], P.ph = pad[0], P.pw = pad[1];
  const int64_t Hp = H + 2 * P.ph, Wp = W + 2 * P.pw;
  TORCH_CHECK(Hp >= P.kh && Wp >= P.kw, "input spatial size (", H, ", ", W, ") plus padding (",
              P.ph, ", ", P.pw, ") is smaller than the kernel (", P.kh, ", ", P.kw, ")");
  P.OH = (Hp - P.kh) / P.sh + 1, P.OW = (Wp - P.kw) / P.sw + 1;
  P.PH = plane_extent(H, P.kh, P.sh, P.ph, P.OH), P.PW = plane_extent(W, P.kw, P.sw, P.pw, P.OW);
  P.frame = P.PH * P.PW, P.nph = P.sh * P.sw;
  // tiles of the larger packed operand of ~kTileBytes (measured: sizing x + dy together for the
  // backward halves the tiles and is slower)
  const int64_t per_sample = std::max<int64_t>(std::max<int64_t>(C * P.nph, O) * P.frame * elem, 1);
  const int64_t bt_max = std::clamp<int64_t>(kTileBytes / per_sample, 1, std::max<int64_t>(B, 1));
  int64_t nbt = ceil_div(B, bt_max);
  const int64_t nth = at::get_num_threads();
  if (nbt > 1 && nbt % nth) nbt = std::min<int64_t>(B, round_up(nbt, nth));  // balance threads
  P.bt = std::max<int64_t>(ceil_div(B, std::max<int64_t>(nbt, 1)), 1);
  P.nbt = ceil_div(B, P.bt);
  P.S = round_up(P.bt * P.frame, QB);
  P.L = round_up((P.bt - 1) * P.frame + (P.OH - 1) * P.PW + P.OW, QB / 2);
  P.LX = round_up((P.bt - 1) * P.frame + (ceil_div(H, P.sh) - 1) * P.PW + ceil_div(W, P.sw), QB / 2);
  P.used_ph.assign(P.nph, 0);
  int64_t lo = 0, hi = 0;
  for (int64_t i = 0; i < P.kh; ++i)
    for (int64_t j = 0; j < P.kw; ++j) {
      const int64_t di = i - P.ph, dj = j - P.pw;  // tap (i, j) reads pixel (s*oy + di, s*ox + dj)
      const int64_t sh = floor_div(di, P.sh) * P.PW + floor_div(dj, P.sw);
      const int64_t f = (di - floor_div(di, P.sh) * P.sh) * P.sw + (dj - floor_div(dj, P.sw) * P.sw);
      P.tap_in.push_back(sh);
      P.tap_ph.push_back(f);
      P.used_ph[f] = 1;
      lo = std::min(lo, sh), hi = std::max(hi, sh);
    }
  P.XF = round_up(-lo, 16);             // x is read at q + shift >= -XF
  P.F = round_up(hi, 16);               // dy is read at r - shift >= -F
  P.xs = P.XF + P.nph * P.S + QB;       // tail: the last block reads up to QB past the grid
  P.ys = P.F + P.S + round_up(-lo, 16);
  {  // x window of one position block: QB + tap span per used phase, per channel
    int64_t nu = 0;
    for (auto u : P.used_ph) nu += u;
    const int64_t win = nu * (QB + hi - lo) * int64_t(elem);
    constexpr int64_t l1 = 40 * 1024;
    P.ncb = ceil_div(C, std::max<int64_t>(1, l1 / win));
    P.cb = ceil_div(C, P.ncb);
    P.ncb = ceil_div(C, P.cb);
  }
  for (int64_t iy = 0; iy < H; ++iy) P.row_off.push_back((iy % P.sh) * P.sw * P.S + (iy / P.sh) * P.PW);
  for (int64_t j = 0; j < P.sw; ++j) P.col_off.push_back(j * P.S);
  return P;
}

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
  bool blocked;            // forward by (position block, channel block): rows of >= kBlockedRow nonzeros
};

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

// Non-temporal copy of n elements (n * sizeof(T) a multiple of 16, d 16-byte aligned).
ST_INLINE void stream_n(float* d, const float* s, int64_t n) {
  for (int64_t i = 0; i < n; i += 4) _mm_stream_ps(d + i, _mm_loadu_ps(s + i));
}
ST_INLINE void stream_n(double* d, const double* s, int64_t n) {
  for (int64_t i = 0; i < n; i += 2) _mm_stream_pd(d + i, _mm_loadu_pd(s + i));
}

// Packing streams through x (dy) in memory order, sample by sample and channel by channel (the
// loads are the call's DRAM traffic); the zero slacks around each channel are written separately.
// x plane (b, c) -> frame b of channel c's phase planes (channel base dst, stride xs): phase
// (a, bb) row u, column v holds x[s*u + a, s*v + bb], zeros past the real pixels.
template <typename T>
ST_INLINE void pack_x_plane(const Plan& P, const T* src, int64_t b, T* dst) {
  for (int64_t a = 0; a < P.sh; ++a)
    for (int64_t bb = 0; bb < P.sw; ++bb) {
      if (!P.used_ph[a * P.sw + bb]) continue;  // no tap reads this phase (1x1 stride 2)
      T* fr = dst + P.XF + (a * P.sw + bb) * P.S + b * P.frame;
      const int64_t nv = bb < P.W ? ceil_div(P.W - bb, P.sw) : 0;  // real columns
      for (int64_t u = 0; u < P.PH; ++u) {
        T* row = fr + u * P.PW;
        const int64_t iy = u * P.sh + a;
        if (iy >= P.H) { zero_n(row, P.PW); continue; }
        const T* s = src + iy * P.W + bb;
        if (P.sw == 1) copy_n(row, s, nv);
        else if (P.sw == 2) for (int64_t v = 0; v < nv; ++v) row[v] = s[2 * v];  // vectorised
        else for (int64_t v = 0; v < nv; ++v) row[v] = s[v * P.sw];
        zero_n(row + nv, P.PW - nv);
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
  T* fr = dst + P.F + b * P.frame;
  for (int64_t oy = 0; oy < P.OH; ++oy) {
    copy_n(fr + oy * P.PW, src + oy * P.OW, P.OW);
    zero_n(fr + oy * P.PW + P.OW, P.PW - P.OW);
  }
  zero_n(fr + P.OH * P.PW, (P.PH - P.OH) * P.PW);
}

template <typename T>
ST_INLINE void pack_dy_slack(const Plan& P, int64_t tb, T* dst) {
  zero_n(dst, P.F);
  zero_n(dst + P.F + tb * P.frame, P.ys - P.F - tb * P.frame);
}

// The operands of a nonzero are QB scattered positions (another channel, another shift): a few
// cache lines from L2 each, so they are requested kPrefetch nonzeros ahead.
constexpr int64_t kPrefetch = 6;
template <typename T, int64_t NQ>
ST_INLINE void prefetch_block(const T* p) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t u = 0; u <= NQ * int64_t(sizeof(T)); u += 64) __builtin_prefetch(c + u);
}

// out[0:NQ] = (accumulate ? out : init) + sum_k w[k] * base[off[k] + 0:NQ], the NQ
// accumulators in registers.
template <typename T, int64_t NQ = QB>
ST_INLINE void axpy_block(T* __restrict out, const T* base, const int64_t* off, const T* w,
                          int64_t n, T init, bool accumulate = false) {
  using V = typename Vec<T>::V;
  using U = typename Vec<T>::U;
  constexpr int NV = NQ * sizeof(T) / 64;
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

// pv[k] (one vector of partial sums per nonzero) += g[0:NQ] * base[off[k] + 0:NQ] for k < n,
// the block of g in registers; the caller reduces pv[k] to a scalar once per tile.
template <typename T, int64_t NQ = QB>
ST_INLINE void dot_block(const T* g, const T* base, const int64_t* off, int64_t n,
                         typename Vec<T>::V* __restrict pv) {
  using V = typename Vec<T>::V;
  using U = typename Vec<T>::U;
  constexpr int NV = NQ * sizeof(T) / 64;
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

template <typename T>
ST_INLINE void pack_x_tile(const Args<T>& A, int64_t b0, int64_t tb, T* xp) {
  const Plan& P = *A.P;
  for (int64_t c = 0; c < P.C; ++c)
    if (A.used_c[c]) pack_x_slack(P, tb, xp + c * P.xs);
  for (int64_t b = 0; b < tb; ++b) {
    const T* src = A.x + (b0 + b) * P.C * P.H * P.W;
    for (int64_t c = 0; c < P.C; ++c)
      if (A.used_c[c]) pack_x_plane(P, src + c * P.H * P.W, b, xp + c * P.xs);
  }
}

template <typename T>
ST_INLINE void pack_dy_tile(const Args<T>& A, int64_t b0, int64_t tb, T* dyp) {
  const Plan& P = *A.P;
  for (int64_t o = 0; o < P.O; ++o)
    if (A.used_o[o]) pack_dy_slack(P, tb, dyp + o * P.ys);
  for (int64_t b = 0; b < tb; ++b) {
    const T* src = A.dy + (b0 + b) * P.O * P.OH * P.OW;
    for (int64_t o = 0; o < P.O; ++o)
      if (A.used_o[o]) pack_dy_plane(P, src + o * P.OH * P.OW, b, dyp + o * P.ys);
  }
}

// Forward of one tile for output channels [o0, o1), partial sums in ob (L2), then copied out.
// Sparse rows: one output channel at a time over all positions. Denser rows (A.blocked):
// position block outer, then blocks of cb input channels, then output channels, so the x window
// of (position block, channel block) stays in L1 while every row's nonzeros in it read it.
template <typename T>
ST_INLINE void fwd_task_impl(const Args<T>& A, int64_t tile, int64_t o0, int64_t o1, bool pack) {
  const Plan& P = *A.P;
  const int64_t b0 = tile * P.bt, tb = std::min(P.bt, P.B - b0), plane = P.OH * P.OW;
  T* xp = scratch<T>(size_t(P.C) * P.xs, 0);
  T* ob = scratch<T>(size_t(o1 - o0) * P.L, 2);
  if (pack) pack_x_tile(A, b0, tb, xp);
  if (!A.blocked) {
    for (int64_t o = o0; o < o1; ++o) {
      const T init = A.bias ? A.bias[o] : T(0);
      const int64_t p0 = A.crow[o], n = A.crow[o + 1] - p0;
      if (n == 0) continue;
      T* out = ob + (o - o0) * P.L;
      int64_t q = 0;
      for (; q + QB <= P.L; q += QB) axpy_block(out + q, xp + q, A.xoff + p0, A.vals + p0, n, init);
      if (q < P.L) axpy_block<T, QB / 2>(out + q, xp + q, A.xoff + p0, A.vals + p0, n, init);
    }
  } else {
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
          if (full) axpy_block(out, xp + q, A.xoff + p0, A.vals + p0, n, init, acc);
          else axpy_block<T, QB / 2>(out, xp + q, A.xoff + p0, A.vals + p0, n, init, acc);
        }
    }
  }
  for (int64_t o = o0; o < o1; ++o) {
    if (A.crow[o + 1] == A.crow[o]) {
      const T init = A.bias ? A.bias[o] : T(0);
      for (int64_t b = 0; b < tb; ++b) fill(A.y + ((b0 + b) * P.O + o) * plane, plane, init);
      continue;
    }
    const T* src = ob + (o - o0) * P.L;
    for (int64_t b = 0; b < tb; ++b) {
      T* yo = A.y + ((b0 + b) * P.O + o) * plane;
      for (int64_t oy = 0; oy < P.OH; ++oy)
        copy_n(yo + oy * P.OW, src + b * P.frame + oy * P.PW, P.OW);
    }
  }
}

// Backward of one tile: dx for input channels [c0, c1), dvalues partial sums for rows [o0, o1).
template <typename T>
ST_INLINE void bwd_task_impl(const Args<T>& A, int64_t tile, int64_t c0, int64_t c1, int64_t o0,
                             int64_t o1, bool pack, T* part) {
  const Plan& P = *A.P;
  const int64_t b0 = tile * P.bt, tb = std::min(P.bt, P.B - b0), plane = P.H * P.W;
  T* xp = scratch<T>(part ? size_t(P.C) * P.xs : 1, 0);
  T* dyp = scratch<T>(size_t(P.O) * P.ys, 1);
  T* db = scratch<T>(size_t(P.nph) * P.S, 2);
  if (pack) {
    pack_dy_tile(A, b0, tb, dyp);
    if (part) pack_x_tile(A, b0, tb, xp);
  }
  if (A.dx) {
    for (int64_t c = c0; c < c1; ++c) {
      if (!A.used_c[c]) {
        for (int64_t b = 0; b < tb; ++b) zero_n(A.dx + ((b0 + b) * P.C + c) * plane, plane);
        continue;
      }
      for (int64_t f = 0; f < P.nph; ++f) {
        const int64_t e0 = A.dptr[c * P.nph + f], n = A.dptr[c * P.nph + f + 1] - e0;
        T* d = db + f * P.S;
        if (n == 0) { zero_n(d, P.LX); continue; }
        int64_t r = 0;
        for (; r + QB <= P.LX; r += QB) axpy_block(d + r, dyp + r, A.doff + e0, A.dval + e0, n, T(0));
        if (r < P.LX) axpy_block<T, QB / 2>(d + r, dyp + r, A.doff + e0, A.dval + e0, n, T(0));
      }
      // dx[b, c, iy, ix] = dxp[phase((iy+ph)%sh, (ix+pw)%sw)][b][(iy+ph)/sh][(ix+pw)/sw]
      for (int64_t b = 0; b < tb; ++b) {
        T* d = A.dx + ((b0 + b) * P.C + c) * plane;
        for (int64_t iy = 0; iy < P.H; ++iy) {
          const T* rows = db + P.row_off[iy] + b * P.frame;
          T* dr = d + iy * P.W;
          if (P.sw == 1) {
            copy_n(dr, rows, P.W);
          } else if (P.sw == 2) {  // interleave the even- and odd-column phases
            const T* re = rows + P.col_off[0];
            const T* ro = rows + P.col_off[1];
            for (int64_t v = 0; v < P.W / 2; ++v) {
              dr[2 * v] = re[v];
              dr[2 * v + 1] = ro[v];
            }
            if (P.W % 2) dr[P.W - 1] = re[P.W / 2];
          } else {
            for (int64_t j = 0; j < P.sw; ++j) {  // columns ix = j, j + sw, ...
              const T* r = rows + P.col_off[j];
              for (int64_t ix = j, v = 0; ix < P.W; ix += P.sw, ++v) dr[ix] = r[v];
            }
          }
        }
      }
    }
  }
  if (part) {
    using V = typename Vec<T>::V;
    for (int64_t o = o0; o < o1; ++o) {
      const T* g = dyp + o * P.ys + P.F;
      const int64_t p0 = A.crow[o], n = A.crow[o + 1] - p0;
      V* pv = reinterpret_cast<V*>(scratch<T>(size_t(n) * (64 / sizeof(T)), 3));
      for (int64_t k = 0; k < n; ++k) pv[k] = V{};
      int64_t q = 0;
      for (; q + QB <= P.L; q += QB) dot_block(g + q, xp + q, A.xoff + p0, n, pv);
      if (q < P.L) dot_block<T, QB / 2>(g + q, xp + q, A.xoff + p0, n, pv);
      for (int64_t k = 0; k < n; ++k) part[p0 + k] += hsum<T>(pv[k]);
    }
  }
}

#define ST_DEFINE_TASKS(T)                                                                       \
  ST_MULTIVERSION void fwd_task(const Args<T>& A, int64_t tile, int64_t o0, int64_t o1,          \
                                bool pack) {                                                     \
    fwd_task_impl<T>(A, tile, o0, o1, pack);                                                     \
  }                                                                                              \
  ST_MULTIVERSION void bwd_task(const Args<T>& A, int64_t tile, int64_t c0, int64_t c1,          \
                                int64_t o0, int64_t o1, bool pack, T* part) {                    \
    bwd_task_impl<T>(A, tile, c0, c1, o0, o1, pack, part);                                       \
  }
ST_DEFINE_TASKS(float)
ST_DEFINE_TASKS(double)
#undef ST_DEFINE_TASKS

// Tiles x chunks of channels: one chunk per tile when there are enough tiles for all threads.
int64_t n_chunks(const Plan& P, int64_t channels) {
  const int64_t nth = at::get_num_threads();
  if (P.nbt >= nth) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(channels, ceil_div(nth, P.nbt)));
}

// Index work shared by every tile (O(nnz)): x offsets per nonzero, the used channels and, for the
// input gradient, the CSC entries regrouped by (input channel, phase) with their dy offsets.
struct Index {
  std::vector<int64_t> xoff, dptr, doff, seg;
  std::vector<uint8_t> used_c, used_o;
};

template <typename T>
void run_conv(const Plan& P, const T* x, const T* dy, const T* bias, const int64_t* crow,
              const int32_t* col, const T* vals, const int64_t* ccol, const int32_t* row_t,
              const int64_t* perm, int64_t nnz, T* y, T* dx, T* dvals) {
  const int64_t khkw = P.kh * P.kw;
  Index I;
  I.used_c.assign(P.C, 0);
  I.used_o.assign(P.O, 0);
  std::vector<T> dval;
  if (crow) {  // CSR known: x offsets (forward, weight gradient) and used channels
    I.xoff.resize(nnz);
    at::parallel_for(0, nnz, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t t = col[p] % khkw;
        I.xoff[p] = (col[p] / khkw) * P.xs + P.XF + P.tap_ph[t] * P.S + P.tap_in[t];
      }
    });
    for (int64_t p = 0; p < nnz; ++p) I.used_c[col[p] / khkw] = 1;
    I.seg.resize(P.O * (P.ncb + 1));  // rows' columns ascend: channel blocks are sub-ranges
    for (int64_t o = 0; o < P.O; ++o) {
      int64_t p = crow[o];
      for (int64_t j = 0; j <= P.ncb; ++j) {
        const int64_t end = std::min(j, P.ncb) * P.cb * khkw;
        while (p < crow[o + 1] && col[p] < end) ++p;
        I.seg[o * (P.ncb + 1) + j] = j == P.ncb ? crow[o + 1] : p;
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
            I.used_c.data(), I.used_o.data(), y, dx, nnz >= kBlockedRow * P.O};
  if (y) {
    const int64_t nch = n_chunks(P, P.O);
    at::parallel_for(0, P.nbt * nch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t tile = task / nch, ch = task % nch;
        fwd_task(A, tile, P.O * ch / nch, P.O * (ch + 1) / nch, task == begin || ch == 0);
      }

    });
    return;
  }
  // backward: chunks split input channels (dx) and output channels (dvalues) alike
  const int64_t nth = at::get_num_threads();
  const int64_t nch = n_chunks(P, std::max(P.C, P.O));
  std::vector<T> partial(dvals ? size_t(nth) * nnz : 0, T(0));
  at::parallel_for(0, P.nbt * nch, 1, [&](int64_t begin, int64_t end) {
    T* part = dvals ? partial.data() + size_t(at::get_thread_num()) * nnz : nullptr;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task / nch, ch = task % nch;
      bwd_task(A, tile, P.C * ch / nch, P.C * (ch + 1) / nch, P.O * ch / nch,
               P.O * (ch + 1) / nch, task == begin || ch == 0, part);
    }
  });
  if (dvals) reduce_partials(partial.data(), nth, nnz, dvals);
}

// ------------------------------------------------------------------------------ op entry points
ConvGeom geom(const Plan& P) {
  return {P.B, P.C, P.H, P.W, P.O, P.kh, P.kw, P.sh, P.sw, P.ph, P.pw, P.OH, P.OW};
}

struct ConvArgs {
  int64_t kh, kw;
  std::vector<int64_t> k, s, p;
};

ConvArgs check_conv_args(at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p) {
  TORCH_CHECK(k.size() == 2 && s.size() == 2 && p.size() == 2,
              "kernel_size, stride and padding must each have 2 entries");
  TORCH_CHECK(k[0] >= 1 && k[1] >= 1, "kernel_size must be >= 1, got ", k);
  TORCH_CHECK(s[0] >= 1 && s[1] >= 1, "stride must be >= 1, got ", s);
  TORCH_CHECK(p[0] >= 0 && p[1] >= 0, "padding must be >= 0, got ", p);
  return {k[0], k[1], k.vec(), s.vec(), p.vec()};
}

void check_values_conv(const at::Tensor& values, int64_t nnz) {
  check_cpu(values, "values");
  check_float(values, "values");
  check_1d_contig(values, "values");
  TORCH_CHECK(values.numel() == nnz, "values must have nnz = ", nnz, " entries, got ", values.numel());
}

void check_perm_conv(const at::Tensor& perm, int64_t nnz) {
  check_cpu(perm, "perm");
  check_dtype(perm, at::kLong, "perm");
  check_1d_contig(perm, "perm");
  TORCH_CHECK(perm.numel() == nnz, "perm must have nnz = ", nnz, " entries, got ", perm.numel());
  const int64_t* q = perm.data_ptr<int64_t>();
  bool ok = true;
  for (int64_t i = 0; i < nnz; ++i) ok &= (q[i] >= 0) & (q[i] < nnz);
  TORCH_CHECK(ok, "perm has entries outside [0, ", nnz, ")");
}

// x (or grad_out) must be a 4-D NCHW CPU tensor of the values' dtype with `channels` channels.
void check_nchw(const at::Tensor& t, const at::Tensor& like, int64_t channels, const char* name,
                const char* what) {
  check_cpu(t, name);
  check_float(t, name);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D [batch, channels, height, width], got shape ",
              t.sizes());
  TORCH_CHECK(t.size(1) == channels, name, " has ", t.size(1), " channels but the weight expects ",
              channels, " ", what);
}

int64_t in_channels(int64_t cols, const ConvArgs& a) {
  TORCH_CHECK(cols % (a.kh * a.kw) == 0, "the weight has ", cols,
              " columns, not a multiple of kh*kw = ", a.kh * a.kw);
  return cols / (a.kh * a.kw);
}

at::Tensor sparse_conv2d(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                         const at::Tensor& values, const at::Tensor& ccol, const at::Tensor& row_t,
                         const at::Tensor& perm, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, const std::optional<at::Tensor>& bias) {
  const ConvArgs a = check_conv_args(kernel_size, stride, padding);
  const int64_t O = crow.numel() - 1, cols = ccol.numel() - 1, C = in_channels(cols, a);
  check_compressed(crow, col, cols, "crow_indices", "col_indices");
  check_compressed(ccol, row_t, O, "ccol_indices", "row_indices_t");
  check_values_conv(values, col.numel());
  check_perm_conv(perm, col.numel());
  check_nchw(x, values, C, "x", "(input channels)");
  at::Tensor bc;
  if (bias) {
    check_cpu(*bias, "bias");
    TORCH_CHECK(bias->scalar_type() == values.scalar_type(), "bias must have dtype ",
                values.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == O, "bias must have shape [", O, "], got ",
                bias->sizes());
    bc = bias->contiguous();
  }
  const at::Tensor xc = x.contiguous();
  const Plan P = make_plan(x.size(0), C, x.size(2), x.size(3), O, a.k, a.s, a.p, x.element_size());
  at::Tensor y = pooled_empty({P.B, O, P.OH, P.OW}, x.options());
  if (y.numel() == 0) return y;
  const int64_t sbt = small_conv_tile(geom(P), x.element_size());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d", [&] {
    if (sbt)
      return small_conv<scalar_t>(geom(P), sbt, xc.data_ptr<scalar_t>(), nullptr,
                                  bias ? bc.data_ptr<scalar_t>() : nullptr, crow.data_ptr<int64_t>(),
                                  col.data_ptr<int32_t>(), values.data_ptr<scalar_t>(), nullptr,
                                  nullptr, nullptr, col.numel(), y.data_ptr<scalar_t>(), nullptr, nullptr);
    run_conv<scalar_t>(P, xc.data_ptr<scalar_t>(), nullptr, bias ? bc.data_ptr<scalar_t>() : nullptr,
                       crow.data_ptr<int64_t>(), col.data_ptr<int32_t>(), values.data_ptr<scalar_t>(),
                       nullptr, nullptr, nullptr, col.numel(), y.data_ptr<scalar_t>(), nullptr, nullptr);
  });
  return y;
}

// Shared by the three backward ops: dx when ccol is given, dvalues when crow is given.
std::tuple<at::Tensor, at::Tensor> conv_backward(
    const at::Tensor& grad_out, const at::Tensor* x, at::IntArrayRef input_size, const at::Tensor* crow,
    const at::Tensor* col, const at::Tensor* values, const at::Tensor* ccol, const at::Tensor* row_t,
    const at::Tensor* perm, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  const ConvArgs a = check_conv_args(kernel_size, stride, padding);
  TORCH_CHECK(grad_out.dim() == 4, "grad_out must be 4-D [batch, channels, height, width], got shape ",
              grad_out.sizes());
  const int64_t O = crow ? crow->numel() - 1 : grad_out.size(1);
  const int64_t cols = ccol ? ccol->numel() - 1 : x && x->dim() == 4 ? x->size(1) * a.kh * a.kw : 0;
  const int64_t C = in_channels(cols, a);
  int64_t nnz = 0;
  if (crow) {
    check_compressed(*crow, *col, cols, "crow_indices", "col_indices");
    nnz = col->numel();
  }
  if (ccol) {
    check_compressed(*ccol, *row_t, O, "ccol_indices", "row_indices_t");
    TORCH_CHECK(!crow || row_t->numel() == nnz, "row_indices_t must have nnz = ", nnz, " entries");
    nnz = row_t->numel();
    check_values_conv(*values, nnz);
    check_perm_conv(*perm, nnz);
  }
  const at::Tensor& like = x ? *x : *values;
  check_float(like, x ? "x" : "values");
  if (x) check_nchw(*x, like, C, "x", "(input channels)");
  check_nchw(grad_out, like, O, "grad_out", "(output channels)");
  TORCH_CHECK(input_size.size() == 2, "input_size must have 2 entries, got ", input_size);
  const int64_t B = grad_out.size(0), H = input_size[0], W = input_size[1];
  TORCH_CHECK(!x || x->size(0) == B, "x and grad_out must have the same batch size, got ", x->size(0),
              " and ", B);
  const Plan P = make_plan(B, C, H, W, O, a.k, a.s, a.p, like.element_size());
  TORCH_CHECK(grad_out.size(2) == P.OH && grad_out.size(3) == P.OW, "grad_out must have spatial size (",
              P.OH, ", ", P.OW, ") for input (", H, ", ", W, "), got ", grad_out.sizes());
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor xc = x ? x->contiguous() : at::Tensor();
  at::Tensor dx, dv;
  if (ccol) dx = (B == 0 || nnz == 0) ? at::zeros({B, C, H, W}, g.options()) : pooled_empty({B, C, H, W}, g.options());
  if (crow) dv = at::zeros({nnz}, g.options());
  if (B == 0 || nnz == 0) return {dx, dv};
  const int64_t sbt = small_conv_tile(geom(P), like.element_size());
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "sparse_conv2d_backward", [&] {
    if (sbt)
      return small_conv<scalar_t>(
          geom(P), sbt, x ? xc.data_ptr<scalar_t>() : nullptr, g.data_ptr<scalar_t>(), nullptr,
          crow ? crow->data_ptr<int64_t>() : nullptr, crow ? col->data_ptr<int32_t>() : nullptr,
          values ? values->data_ptr<scalar_t>() : nullptr, ccol ? ccol->data_ptr<int64_t>() : nullptr,
          ccol ? row_t->data_ptr<int32_t>() : nullptr, ccol ? perm->data_ptr<int64_t>() : nullptr, nnz,
          nullptr, ccol ? dx.data_ptr<scalar_t>() : nullptr, crow ? dv.data_ptr<scalar_t>() : nullptr);
    run_conv<scalar_t>(P, x ? xc.data_ptr<scalar_t>() : nullptr, g.data_ptr<scalar_t>(), nullptr,
                       crow ? crow->data_ptr<int64_t>() : nullptr, crow ? col->data_ptr<int32_t>() : nullptr,
                       values ? values->data_ptr<scalar_t>() : nullptr,
                       ccol ? ccol->data_ptr<int64_t>() : nullptr, ccol ? row_t->data_ptr<int32_t>() : nullptr,
                       ccol ? perm->data_ptr<int64_t>() : nullptr, nnz, nullptr,
                       ccol ? dx.data_ptr<scalar_t>() : nullptr, crow ? dv.data_ptr<scalar_t>() : nullptr);
  });
  return {dx, dv};
}

at::Tensor sparse_conv2d_grad_input(const at::Tensor& grad_out, const at::Tensor& ccol,
                                    const at::Tensor& row_t, const at::Tensor& perm,
                                    const at::Tensor& values, at::IntArrayRef input_size,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding) {
  return std::get<0>(conv_backward(grad_out, nullptr, input_size, nullptr, nullptr, &values, &ccol,
                                   &row_t, &perm, kernel_size, stride, padding));
}

at::Tensor sparse_conv2d_grad_weight(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& crow, const at::Tensor& col,
                                     at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D [batch, channels, height, width], got shape ", x.sizes());
  return std::get<1>(conv_backward(grad_out, &x, {x.size(2), x.size(3)}, &crow, &col, nullptr,
                                   nullptr, nullptr, nullptr, kernel_size, stride, padding));
}

// Both gradients in one pass: dy is packed once per tile for dx and dvalues.
std::tuple<at::Tensor, at::Tensor> sparse_conv2d_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
    const at::Tensor& values, const at::Tensor& ccol, const at::Tensor& row_t, const at::Tensor& perm,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D [batch, channels, height, width], got shape ", x.sizes());
  return conv_backward(grad_out, &x, {x.size(2), x.size(3)}, &crow, &col, &values, &ccol, &row_t,
                       &perm, kernel_size, stride, padding);
}

int64_t sparse_conv2d_small_tile(at::IntArrayRef input_size, int64_t out_channels,
                                 at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::ScalarType dtype) {
  const ConvArgs a = check_conv_args(kernel_size, stride, padding);
  TORCH_CHECK(input_size.size() == 4, "input_size must be [batch, channels, height, width], got ",
              input_size);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "dtype must be float32 or float64, got ", dtype);
  const size_t elem = c10::elementSize(dtype);
  const Plan P = make_plan(input_size[0], input_size[1], input_size[2], input_size[3], out_channels,
                           a.k, a.s, a.p, elem);
  return small_conv_tile(geom(P), elem);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsetrain, CompositeImplicitAutograd, m) {
  m.impl("sparse_conv2d_small_tile", &sparse_conv2d_small_tile);
}

TORCH_LIBRARY_IMPL(sparsetrain, CPU, m) {
  m.impl("sparse_conv2d", &sparse_conv2d);
  m.impl("sparse_conv2d_grad_input", &sparse_conv2d_grad_input);
  m.impl("sparse_conv2d_grad_weight", &sparse_conv2d_grad_weight);
  m.impl("sparse_conv2d_backward", &sparse_conv2d_backward);
}

}  // namespace sparsetrain
