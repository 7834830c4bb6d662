// SparseConv2d on CPU, the phase-plane kernel (any map size): direct sparse convolution (no
// im2col) with a CSR weight W[O, C*kh*kw] (column = c*kh*kw + i*kw + j): forward, input gradient,
// weight gradient at the nonzeros. The op entry points are in sparse_conv2d.cpp.
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
// y and dx are written with streaming stores (rows.h): at 99.9 % sparsity writing them is most of
// the call's memory traffic.
#include "sparse_conv2d_phase_impl.h"

namespace sparsetrain {
namespace {

int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
// a * b (both >= 0), saturated at INT64_MAX: the plan's sizes of far-padded, widely strided inputs
// (262657 channels, stride 8192, padding 990 * 8192 wrapped the per-sample size to 1: a segfault)
int64_t sat_mul(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_mul_overflow(a, b, &r) ? INT64_MAX : r;
}

// Phase plane extent along one axis: it must hold the real pixels (n/s rounded up), the output
// grid (on), the reach of the last output (on - 1 + max shift) and, past the real pixels, as many
// zeros as the first output reaches before the plane (-min shift).
int64_t plane_extent(int64_t n, int64_t k, int64_t s, int64_t p, int64_t on) {
  const int64_t lo = floor_div(-p, s), hi = on - 1 + floor_div(k - 1 - p, s);
  return std::max({ceil_div(n, s) - lo, hi + 1, on, int64_t(1)});
}

}  // namespace

Plan make_plan(int64_t B, int64_t C, int64_t H, int64_t W, int64_t O, at::IntArrayRef k,
               at::IntArrayRef st, at::IntArrayRef pad, size_t elem, int64_t nnz, bool offsets) {
  TORCH_CHECK_VALUE(H >= 0 && W >= 0, "input spatial size must be >= 0, got (", H, ", ", W, ")");
  // (an empty tensor costs nothing at any size: H rows of 2^40 would be looped over below)
  TORCH_CHECK_VALUE(H < (int64_t(1) << 31) && W < (int64_t(1) << 31), "input spatial size must be < 2^31, got (", H, ", ",
                    W, ")");
  Plan P;
  P.blocked = nnz >= kBlockedRow * O;
  P.B = B, P.C = C, P.H = H, P.W = W, P.O = O;
  P.kh = k[0], P.kw = k[1], P.sh = st[0], P.sw = st[1], P.ph = pad[0], P.pw = pad[1];
  const int64_t Hp = H + 2 * P.ph, Wp = W + 2 * P.pw;
  TORCH_CHECK_VALUE(Hp >= P.kh && Wp >= P.kw, "input spatial size (", H, ", ", W, ") plus padding (",
                    P.ph, ", ", P.pw, ") is smaller than the kernel (", P.kh, ", ", P.kw, ")");
  // a stride past the last kernel position leaves one output row (column): the same conv with the
  // stride clamped there (its phase planes would otherwise number stride_h * stride_w)
  P.sh = std::min(P.sh, Hp - P.kh + 1), P.sw = std::min(P.sw, Wp - P.kw + 1);
  P.OH = (Hp - P.kh) / P.sh + 1, P.OW = (Wp - P.kw) / P.sw + 1;
  P.PH = plane_extent(H, P.kh, P.sh, P.ph, P.OH), P.PW = plane_extent(W, P.kw, P.sw, P.pw, P.OW);
  P.frame = sat_mul(P.PH, P.PW), P.nph = sat_mul(P.sh, P.sw);
  // tiles of the larger packed operand of ~tile bytes (measured: sizing x + dy together for the
  // backward halves the tiles and is slower)
  const int64_t per_sample =
      std::max<int64_t>(sat_mul(sat_mul(std::max<int64_t>(sat_mul(C, P.nph), O), P.frame), int64_t(elem)), 1);
  // A padding far past the kernel with a large stride makes stride_h * stride_w planes of mostly
  // zeros (stride and padding 4096 on a 5x5 input: 16.8 M planes, 1.8 GB a sample, and the per-thread
  // scratch's bad_alloc inside the parallel region aborted the process; 2048: 13 s and 6.9 GB for a
  // 3x3 output). Refused where the planes would exceed both 64 MiB a sample and 4x the sample's input
  // and output (a conv the kernels serve packs about its padded input: never near this).
  const int64_t io = sat_mul(std::min(sat_mul(sat_mul(C, H), W), INT64_MAX / 2) +
                                 std::min(sat_mul(sat_mul(O, P.OH), P.OW), INT64_MAX / 2), int64_t(elem));
  TORCH_CHECK_VALUE(per_sample <= std::max<int64_t>(int64_t(64) << 20, 4 * io), "stride (", P.sh, ", ", P.sw,
                    ") and padding (", P.ph, ", ", P.pw, ") on a (", H, ", ", W, ") input: the CPU kernels would pack "
                    "each sample into ", P.nph, " phase planes of (", P.PH, ", ", P.PW, "), ", per_sample,
                    " bytes; a padding this far past the kernel is not supported: use a smaller padding (or pad "
                    "the input with F.pad)");
  const int64_t tile_bytes = P.blocked ? kTileBytesDense : kTileBytesSparse;
  const int64_t bt_max = std::clamp<int64_t>(tile_bytes / per_sample, 1, std::max<int64_t>(B, 1));
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
    P.ncb = std::max<int64_t>(1, ceil_div(C, std::max<int64_t>(1, l1 / win)));  // (>= 1: no input channel)
    P.cb = std::max<int64_t>(1, ceil_div(C, P.ncb));
    P.ncb = std::max<int64_t>(1, ceil_div(C, P.cb));
  }
  // (x's row table, read only where x is packed: none for an empty batch or no input channel, whose
  // H may be any size at no cost)
  for (int64_t iy = 0; offsets && B > 0 && C > 0 && iy < H; ++iy) P.row_off.push_back((iy % P.sh) * P.sw * P.S + (iy / P.sh) * P.PW);
  for (int64_t j = 0; j < P.sw; ++j) P.col_off.push_back(j * P.S);
  return P;
}

namespace {
ST_DEFINE_TASKS(float)
}  // namespace

template void run_conv<float>(const Plan&, const float*, const float*, const float*, const int64_t*,
                              const int32_t*, const float*, const int64_t*, const int32_t*,
                              const int64_t*, int64_t, float*, float*, float*, bool, double*,
                              const float*, const BnPack<float>*, const XAct<float>*, int64_t*);

}  // namespace sparsetrain
