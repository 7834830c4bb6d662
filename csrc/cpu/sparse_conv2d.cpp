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
#include <mutex>

#include "common.h"

namespace sparsetrain {
namespace {

constexpr int64_t QB = 128;                  // positions per register block (8 zmm of fp32)
constexpr int64_t kTileBytes = 768 * 1024;   // packed x (or dy) tile: stays in L2

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

struct Plan {
  int64_t B, C, H, W, O, kh, kw, sh, sw, ph, pw, OH, OW;
  int64_t PH, PW, frame, nph;  // phase plane, its size, number of phases
  int64_t bt, nbt;             // samples per tile, tiles
  int64_t S, L;                // phase segment stride, positions computed (multiples of QB)
  int64_t F, xs, ys;           // dy front slack (>= max tap shift), packed channel strides
  std::vector<int64_t> tap_in, tap_ph;  // per tap: shift inside the phase plane, phase index
  std::vector<int64_t> row_off, col_off;  // dx unpack: input row iy / column phase j -> dxp offset
};

Plan make_plan(int64_t B, int64_t C, int64_t H, int64_t W, int64_t O, at::IntArrayRef k,
               at::IntArrayRef st, at::IntArrayRef pad, size_t elem) {
  Plan P;
  P.B = B, P.C = C, P.H = H, P.W = W, P.O = O;
  P.kh = k[0], P.kw = k[1], P.sh = st[0], P.sw = st[1], P.ph = pad[0], P.pw = pad[1];
  const int64_t Hp = H + 2 * P.ph, Wp = W + 2 * P.pw;
  TORCH_CHECK(Hp >= P.kh && Wp >= P.kw, "input spatial size (", H, ", ", W, ") plus padding (",
              P.ph, ", ", P.pw, ") is smaller than the kernel (", P.kh, ", ", P.kw, ")");
  P.OH = (Hp - P.kh) / P.sh + 1, P.OW = (Wp - P.kw) / P.sw + 1;
  P.PH = ceil_div(Hp, P.sh), P.PW = ceil_div(Wp, P.sw);
  P.frame = P.PH * P.PW, P.nph = P.sh * P.sw;
  const int64_t per_sample = std::max<int64_t>(std::max<int64_t>(C * P.nph, O) * P.frame * elem, 1);
  const int64_t bt_max = std::clamp<int64_t>(kTileBytes / per_sample, 1, std::max<int64_t>(B, 1));
  int64_t nbt = ceil_div(B, bt_max);
  const int64_t nth = at::get_num_threads();
  if (nbt > 1 && nbt % nth) nbt = std::min<int64_t>(B, round_up(nbt, nth));  // balance threads
  P.bt = std::max<int64_t>(ceil_div(B, std::max<int64_t>(nbt, 1)), 1);
  P.nbt = ceil_div(B, P.bt);
  P.S = round_up(P.bt * P.frame, QB);
  P.L = round_up((P.bt - 1) * P.frame + (P.OH - 1) * P.PW + P.OW, QB);
  P.F = round_up(((P.kh - 1) / P.sh) * P.PW + (P.kw - 1) / P.sw, 16);
  P.xs = P.nph * P.S + QB;
  P.ys = P.F + P.S;
  for (int64_t i = 0; i < P.kh; ++i)
    for (int64_t j = 0; j < P.kw; ++j) {
      P.tap_in.push_back((i / P.sh) * P.PW + j / P.sw);
      P.tap_ph.push_back((i % P.sh) * P.sw + j % P.sw);
    }
  for (int64_t iy = 0; iy < H; ++iy) {
    const int64_t yy = iy + P.ph;
    P.row_off.push_back((yy % P.sh) * P.sw * P.S + (yy / P.sh) * P.PW);
  }
  for (int64_t j = 0; j < P.sw; ++j)  // column ix = j (+ k*sw) of x is column xx = j + pw of xpad
    P.col_off.push_back(((j + P.pw) % P.sw) * P.S + (j + P.pw) / P.sw);
  return P;
}

// Per-call operands, shared read-only by all tasks.
template <typename T>
struct Args {
  const Plan* P;
  const T *x, *dy, *vals, *bias;
  const int64_t* crow;     // CSR rows
  const int64_t* xoff;     // per nonzero: c*xs + phase*S + shift
  const int64_t* dptr;     // [C*nph + 1]: CSC entries of channel c, phase ph (dx order)
  const int64_t* doff;     // per dx entry: o*ys + F - shift
  const T* dval;           // per dx entry: its value
  const uint8_t *used_c, *used_o;
  T *y, *dx;
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

// Samples b0.. of channel c of x ([B, C, H, W]) into the phase planes at dst (stride xs).
template <typename T>
ST_INLINE void pack_x(const Plan& P, const T* x, int64_t b0, int64_t tb, int64_t c, T* dst) {
  for (int64_t a = 0; a < P.sh; ++a)
    for (int64_t bb = 0; bb < P.sw; ++bb) {
      T* seg = dst + (a * P.sw + bb) * P.S;
      // columns v with input column v*sw + bb - pw inside [0, W)
      const int64_t v0 = P.pw > bb ? ceil_div(P.pw - bb, P.sw) : 0;
      const int64_t v1 = std::max(v0, std::min(P.PW, ceil_div(P.W + P.pw - bb, P.sw)));
      for (int64_t b = 0; b < P.bt; ++b) {
        T* fr = seg + b * P.frame;
        if (b >= tb) { zero_n(fr, P.frame); continue; }
        const T* src = x + ((b0 + b) * P.C + c) * P.H * P.W;
        for (int64_t u = 0; u < P.PH; ++u) {
          T* row = fr + u * P.PW;
          const int64_t iy = u * P.sh + a - P.ph;
          if (iy < 0 || iy >= P.H) { zero_n(row, P.PW); continue; }
          const T* s = src + iy * P.W + bb - P.pw;
          zero_n(row, v0);
          if (P.sw == 1) copy_n(row + v0, s + v0, v1 - v0);
          else if (P.sw == 2) for (int64_t v = v0; v < v1; ++v) row[v] = s[2 * v];  // vectorised
          else for (int64_t v = v0; v < v1; ++v) row[v] = s[v * P.sw];
          zero_n(row + v1, P.PW - v1);
        }
      }
      zero_n(seg + P.bt * P.frame, P.S - P.bt * P.frame);
    }
  zero_n(dst + P.nph * P.S, P.xs - P.nph * P.S);
}

// Samples b0.. of channel o of dy ([B, O, OH, OW]) onto the output grid at dst + F, zeros at junk.
template <typename T>
ST_INLINE void pack_dy(const Plan& P, const T* dy, int64_t b0, int64_t tb, int64_t o, T* dst) {
  zero_n(dst, P.F);
  T* g = dst + P.F;
  for (int64_t b = 0; b < P.bt; ++b) {
    T* fr = g + b * P.frame;
    if (b >= tb) { zero_n(fr, P.frame); continue; }
    const T* src = dy + ((b0 + b) * P.O + o) * P.OH * P.OW;
    for (int64_t oy = 0; oy < P.OH; ++oy) {
      copy_n(fr + oy * P.PW, src + oy * P.OW, P.OW);
      zero_n(fr + oy * P.PW + P.OW, P.PW - P.OW);
    }
    zero_n(fr + P.OH * P.PW, (P.PH - P.OH) * P.PW);
  }
  zero_n(g + P.bt * P.frame, P.S - P.bt * P.frame);
}

// 64-byte GCC vectors (one zmm; two ymm or four xmm in the other clones); U: unaligned access.
template <typename T> struct Vec;
template <> struct Vec<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef float U __attribute__((vector_size(64), aligned(4)));
};
template <> struct Vec<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef double U __attribute__((vector_size(64), aligned(8)));
};

// The operands of a nonzero are QB scattered positions (another channel, another shift): a few
// cache lines from L2 each, so they are requested kPrefetch nonzeros ahead.
constexpr int64_t kPrefetch = 6;
template <typename T>
ST_INLINE void prefetch_block(const T* p) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t u = 0; u <= QB * int64_t(sizeof(T)); u += 64) __builtin_prefetch(c + u);
}

// out[0:QB] = init + sum_k w[k] * base[off[k] + 0:QB], the QB accumulators in registers.
template <typename T>
ST_INLINE void axpy_block(T* __restrict out, const T* base, const int64_t* off, const T* w,
                          int64_t n, T init) {
  using V = typename Vec<T>::V;
  using U = typename Vec<T>::U;
  constexpr int NV = QB * sizeof(T) / 64;
  V acc[NV];
  for (int u = 0; u < NV; ++u) acc[u] = V{} + init;
  for (int64_t k = 0; k < n; ++k) {
    const T v = w[k];
    const U* s = reinterpret_cast<const U*>(base + off[k]);
    if (k + kPrefetch < n) prefetch_block<T>(base + off[k + kPrefetch]);
    for (int u = 0; u < NV; ++u) acc[u] += v * s[u];
  }
  for (int u = 0; u < NV; ++u) reinterpret_cast<U*>(out)[u] = acc[u];
}

// pv[k] (one vector of partial sums per nonzero) += g[0:QB] * base[off[k] + 0:QB] for k < n,
// the block of g in registers; the caller reduces pv[k] to a scalar once per tile.
template <typename T>
ST_INLINE void dot_block(const T* g, const T* base, const int64_t* off, int64_t n,
                         typename Vec<T>::V* __restrict pv) {
  using V = typename Vec<T>::V;
  using U = typename Vec<T>::U;
  constexpr int NV = QB * sizeof(T) / 64;
  V gv[NV];
  for (int u = 0; u < NV; ++u) gv[u] = reinterpret_cast<const U*>(g)[u];
  for (int64_t k = 0; k < n; ++k) {
    const U* s = reinterpret_cast<const U*>(base + off[k]);
    if (k + kPrefetch < n) prefetch_block<T>(base + off[k + kPrefetch]);
    V a0 = gv[0] * s[0], a1 = gv[1] * s[1];
    for (int u = 2; u < NV; u += 2) {
      a0 += gv[u] * s[u];
      a1 += gv[u + 1] * s[u + 1];
    }
    pv[k] += a0 + a1;
  }
}

template <typename T>
ST_INLINE T hsum(typename Vec<T>::V v) {
  T s = 0;
  for (size_t t = 0; t < 64 / sizeof(T); ++t) s += v[t];
  return s;
}

template <typename T>
ST_INLINE void pack_x_tile(const Args<T>& A, int64_t b0, int64_t tb, T* xp) {
  const Plan& P = *A.P;
  for (int64_t c = 0; c < P.C; ++c)
    if (A.used_c[c]) pack_x(P, A.x, b0, tb, c, xp + c * P.xs);
}

// Forward of one tile for output channels [o0, o1).
template <typename T>
ST_INLINE void fwd_task_impl(const Args<T>& A, int64_t tile, int64_t o0, int64_t o1, bool pack) {
  const Plan& P = *A.P;
  const int64_t b0 = tile * P.bt, tb = std::min(P.bt, P.B - b0), plane = P.OH * P.OW;
  T* xp = scratch<T>(size_t(P.C) * P.xs, 0);
  T* ob = scratch<T>(size_t(P.L), 2);
  if (pack) pack_x_tile(A, b0, tb, xp);
  for (int64_t o = o0; o < o1; ++o) {
    const T init = A.bias ? A.bias[o] : T(0);
    const int64_t p0 = A.crow[o], n = A.crow[o + 1] - p0;
    if (n == 0) {
      for (int64_t b = 0; b < tb; ++b) fill(A.y + ((b0 + b) * P.O + o) * plane, plane, init);
      continue;
    }
    for (int64_t q = 0; q < P.L; q += QB) axpy_block(ob + q, xp + q, A.xoff + p0, A.vals + p0, n, init);
    for (int64_t b = 0; b < tb; ++b) {
      T* yo = A.y + ((b0 + b) * P.O + o) * plane;
      for (int64_t oy = 0; oy < P.OH; ++oy)
        copy_n(yo + oy * P.OW, ob + b * P.frame + oy * P.PW, P.OW);
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
    for (int64_t o = 0; o < P.O; ++o)
      if (A.used_o[o]) pack_dy(P, A.dy, b0, tb, o, dyp + o * P.ys);
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
        if (n == 0) { zero_n(d, P.S); continue; }
        for (int64_t r = 0; r < P.S; r += QB) axpy_block(d + r, dyp + r, A.doff + e0, A.dval + e0, n, T(0));
      }
      // dx[b, c, iy, ix] = dxp[phase((iy+ph)%sh, (ix+pw)%sw)][b][(iy+ph)/sh][(ix+pw)/sw]
      for (int64_t b = 0; b < tb; ++b) {
        T* d = A.dx + ((b0 + b) * P.C + c) * plane;
        for (int64_t iy = 0; iy < P.H; ++iy) {
          const T* rows = db + P.row_off[iy] + b * P.frame;
          T* dr = d + iy * P.W;
          if (P.sw == 1) {
            copy_n(dr, rows + P.pw, P.W);
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
      for (int64_t q = 0; q < P.L; q += QB) dot_block(g + q, xp + q, A.xoff + p0, n, pv);
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
  std::vector<int64_t> xoff, dptr, doff;
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
  if (col) {  // CSR known: x offsets (forward, weight gradient) and used channels
    I.xoff.resize(nnz);
    at::parallel_for(0, nnz, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t t = col[p] % khkw;
        I.xoff[p] = (col[p] / khkw) * P.xs + P.tap_ph[t] * P.S + P.tap_in[t];
      }
    });
    for (int64_t p = 0; p < nnz; ++p) I.used_c[col[p] / khkw] = 1;
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
  Args<T> A{&P, x, dy, vals, bias, crow, I.xoff.data(), I.dptr.data(), I.doff.data(), dval.data(),
            I.used_c.data(), I.used_o.data(), y, dx};
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
  if (dvals)  // fixed-order reduction of the per-thread partial sums
    at::parallel_for(0, nnz, 1 << 12, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        T s = 0;
        for (int64_t t = 0; t < nth; ++t) s += partial[size_t(t) * nnz + p];
        dvals[p] = s;
      }
    });
}

// ------------------------------------------------------------------------------ output pool
// A fresh 33 MB activation costs ~8k page faults (~10 ms, as much as the whole sparse product at
// 99%). Large outputs are therefore taken from buffers this engine allocated earlier and that no
// tensor references any more (storage use_count 1: only the pool holds it), like the caching
// allocator of CUDA. Bounded by kPoolBytes; free entries are evicted first-in when full.
constexpr size_t kPoolMinBytes = size_t(1) << 20;
constexpr size_t kPoolBytes = size_t(2) << 30;

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  const size_t bytes = c10::multiply_integers(sizes) * c10::elementSize(c10::typeMetaToScalarType(opt.dtype()));
  if (bytes < kPoolMinBytes) return at::empty(sizes, opt);
  static std::mutex mu;
  static std::vector<at::Storage> pool;
  static size_t held = 0;
  std::lock_guard<std::mutex> lock(mu);
  for (const at::Storage& st : pool)
    if (st.nbytes() == bytes && st.use_count() == 1) return at::empty({0}, opt).set_(st, 0, sizes);
  at::Tensor t = at::empty(sizes, opt);
  for (size_t i = 0; i < pool.size() && held + bytes > kPoolBytes;) {
    if (pool[i].use_count() == 1) {
      held -= pool[i].nbytes();
      pool.erase(pool.begin() + i);
    } else {
      ++i;
    }
  }
  if (held + bytes <= kPoolBytes) {
    pool.push_back(t.storage());
    held += bytes;
  }
  return t;
}

// ------------------------------------------------------------------------------ op entry points
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
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d", [&] {
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
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "sparse_conv2d_backward", [&] {
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

}  // namespace

TORCH_LIBRARY_IMPL(sparsetrain, CPU, m) {
  m.impl("sparse_conv2d", &sparse_conv2d);
  m.impl("sparse_conv2d_grad_input", &sparse_conv2d_grad_input);
  m.impl("sparse_conv2d_grad_weight", &sparse_conv2d_grad_weight);
  m.impl("sparse_conv2d_backward", &sparse_conv2d_backward);
}

}  // namespace sparsetrain
