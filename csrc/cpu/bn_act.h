// The BatchNorm behind a sparse conv (bn_act.cpp): the pieces its backward shares with the conv
// backward that applies the BatchNorm's input-gradient pass while packing its dy tiles
// (sparse_conv2d_bn_backward, sparse_conv2d.cpp), so both compute one formula.
#pragma once
#include <vector>

#include "common.h"
#include "unpool.h"

namespace sparsetrain {

// The BatchNorm's affine map (plus the residual) before the ReLU, on one element (X = T) or one
// vector (X = SimdVec V): (y - m) a + b with m the mean, a = weight * invstd, b the BN's bias.
// Centred, not y a + (b - m a): that form rounds to b +- |m a| 2^-24 where y == m, and a constant
// channel (a conv row without nonzeros outputs its bias) has a ~ weight / sqrt(eps) ~ 316 weight;
// a later BatchNorm on a channel made only of such values scales the error up by 1/sqrt(eps) again.
// Here y - m is exact near m (Sterbenz), so the error is relative to the output. The backward
// recomputes the ReLU's mask from y with this same function (same instruction set clone), so the
// mask is the forward's bit for bit.
template <bool RES, typename X, typename T>
ST_INLINE X bn_pre(X y, X r, T m, T a, T b) {
  if constexpr (RES) return (y - m) * a + b + r;
  return (y - m) * a + b;
}

// g masked by the ReLU after the BatchNorm (RA), recomputed from y (and the residual r): g where
// bn_pre > 0, else 0 (a NaN pre-activation masks, as the forward's ReLU gave it no gradient).
template <bool RA, bool RES, typename X, typename T>
ST_INLINE X mask_after(X g, X y, X r, T m, T a, T b) {
  if constexpr (RA) return bn_pre<RES>(y, r, m, a, b) > T(0) ? g : X{};
  return g;
}

// One element (X = T) or vector (X = V) of the BatchNorm backward's first-pass sums: g masked by
// the ReLU after, s1 += g, s2 += g (y - m); returns the masked g (bn_act.cpp's bwd_sums and the
// phase kernel's sums for a deferred BatchNorm, xact_sums).
template <bool RA, bool RES, typename X, typename T>
ST_INLINE X sums_step(X g, X y, X r, T a, T b, T m, X& s1, X& s2) {
  const X gm = mask_after<RA, RES>(g, y, r, m, a, b);
  s1 += gm;
  s2 += gm * (y - m);
  return gm;
}

// The forward on one plane of n elements: out = act((y - m) a + b (+ r)), act = ReLU (NaN stays NaN,
// as torch.relu) or identity. bn_act's passes and max_pool2x2's normalised planes both call it.
template <typename T, bool RELU, bool RES>
ST_INLINE void act_plane(const T* y, const T* r, T* out, int64_t n, T m, T a, T b) {
  prefetch_ahead_n(y, n);  // (before the loop: one per line inside it measured slower)
  if (RES) prefetch_ahead_n(r, n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T v = bn_pre<RES>(y[i], RES ? r[i] : T(0), m, a, b);
    if constexpr (RELU) v = v < T(0) ? T(0) : v;
    out[i] = v;
  }
}

// act_plane over one sample's row of channels, m, a and b per element.
template <typename T, bool RELU, bool RES>
ST_INLINE void act_row(const T* y, const T* r, T* out, int64_t n, const T* m, const T* a, const T* b) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    T v = bn_pre<RES>(y[i], RES ? r[i] : T(0), m[i], a[i], b[i]);
    if constexpr (RELU) v = v < T(0) ? T(0) : v;
    out[i] = v;
  }
}

// Maps of fewer than kRowPlane pixels (ResNet's 4x4, VGG's 2x2) go by sample rows of C * hw
// elements with the per-channel constants expanded per element: per-plane loops of 4..16
// elements cost more in loop overhead than in arithmetic (a [128, 512, 2, 2] gradient: 1.3 ms).
constexpr int64_t kRowPlane = 64;

// [C * hw] of T: per_channel[c * stride] repeated hw times per channel (any source type: the
// float64 statistics and coefficients too).
template <typename T, typename U>
std::vector<T> per_element(const U* per_channel, int64_t C, int64_t hw, int64_t stride = 1) {
  std::vector<T> e(size_t(C * hw));
  for (int64_t c = 0; c < C; ++c) std::fill_n(e.begin() + c * hw, hw, T(per_channel[c * stride]));
  return e;
}

// One element (T) or vector (SimdVec V) of the input gradient: dy = ka g + kb (y - mean) + kc with
// g = grad_out masked by the ReLU after (RA, mask_after), masked by y > 0 with a ReLU before (RB);
// g itself returned in gm (written out for a residual). The plane path (bn_dy_plane) calls it on
// vectors, bn_act.cpp's row path on elements with per-element constants.
template <bool RA, bool RB, bool RES, typename X, typename T>
ST_INLINE X bn_dy_value(X g, X y, X r, T a, T b, T m, T ka, T kb, T kc, X& gm) {
  g = mask_after<RA, RES>(g, y, r, m, a, b);
  gm = g;
  X v = ka * g + kb * (y - m) + kc;
  if constexpr (RB) v = y > T(0) ? v : X{};
  return v;
}

// The input gradient on one plane of n elements (bn_dy_value), written to dp, g to op for a
// residual (WG). Returns the plane's sum of dy (float, lanes of VB-byte vectors summed last).
// Explicit vectors: GCC's `omp simd reduction` kept the sum (and the masked g) in stack slots,
// a store-to-load chain per vector.
template <typename T, int VB, bool RA, bool RB, bool RES, bool WG>
ST_INLINE T bn_dy_plane(const T* gp, const T* yp, const T* rp, int64_t n, T a, T b, T m, T ka, T kb, T kc,
                        T* dp, T* op) {
  using V = typename SimdVec<T, VB>::V;
  using U = typename SimdVec<T, VB>::U;
  constexpr int64_t L = VB / sizeof(T);
  V s0{}, s1{};
  int64_t i = 0;
  auto step = [&](int64_t j, V& s) __attribute__((always_inline)) {  // (a lambda kept out of line loses the clone's ISA)
    prefetch_ahead(gp + j), prefetch_ahead(yp + j);  // (common.h)
    if (RES) prefetch_ahead(rp + j);
    V gm;
    const V v = bn_dy_value<RA, RB, RES>(V(*reinterpret_cast<const U*>(gp + j)), V(*reinterpret_cast<const U*>(yp + j)),
                                         RES ? V(*reinterpret_cast<const U*>(rp + j)) : V{}, a, b, m, ka, kb, kc, gm);
    if constexpr (WG) *reinterpret_cast<U*>(op + j) = gm;
    *reinterpret_cast<U*>(dp + j) = v;
    s += v;
  };
  for (; i + 2 * L <= n; i += 2 * L) step(i, s0), step(i + L, s1);
  // (a lone vector left here goes to the element loop: GCC compiled one as a separate multiply and
  // add where act_plane and the loops use a fused one, and the recomputed ReLU mask then differed
  // from the forward's for pre-activations within a rounding of 0)
  T s = hsum<T, VB>(s0 + s1);
  for (; i < n; ++i) {
    T gm;
    const T v = bn_dy_value<RA, RB, RES>(gp[i], yp[i], RES ? rp[i] : T(0), a, b, m, ka, kb, kc, gm);
    if constexpr (WG) op[i] = gm;
    dp[i] = v;
    s += v;
  }
  return s;
}

// Calls bn_dy_plane for the flags: ReLU after (ra), ReLU before (rb), residual (read only with ra:
// it only moves the recomputed mask), g written to op (wg).
template <typename T, int VB>
ST_INLINE T bn_dy_plane_for(bool ra, bool rb, bool res, bool wg, const T* gp, const T* yp, const T* rp, int64_t n,
                            T a, T b, T m, T ka, T kb, T kc, T* dp, T* op) {
#define ST_BN_PLANE(RA, RB, RES) \
  (wg ? bn_dy_plane<T, VB, RA, RB, RES, true>(gp, yp, rp, n, a, b, m, ka, kb, kc, dp, op) \
      : bn_dy_plane<T, VB, RA, RB, RES, false>(gp, yp, rp, n, a, b, m, ka, kb, kc, dp, op))
  if (ra && res) return rb ? ST_BN_PLANE(true, true, true) : ST_BN_PLANE(true, false, true);
  if (ra) return rb ? ST_BN_PLANE(true, true, false) : ST_BN_PLANE(true, false, false);
  return rb ? ST_BN_PLANE(false, true, false) : ST_BN_PLANE(false, false, false);
#undef ST_BN_PLANE
}

// t: a [C] tensor of `dtype` on the CPU (a per-channel argument named `name`).
void check_channels(const at::Tensor& t, int64_t C, at::ScalarType dtype, const char* name);

// A BatchNorm (+ ReLU) applied to an op's input x as it reads it (the in_mean, in_scale, in_shift,
// in_relu arguments of sparse_conv2d_stats, sparse_conv2d_bn_backward and max_pool2x2): x holds the
// BatchNorm's input y and the op reads act((y - mean[c]) scale[c] + shift[c]) (bn_pre).
struct XActArgs {
  at::Tensor mean;          // [C] float64, contiguous
  at::Tensor scale, shift;  // [C], x's dtype, contiguous
  bool relu;
};

// The checked arguments (given together; mean float64, scale and shift x's dtype, [C] on the CPU),
// or nullopt without them.
std::optional<XActArgs> check_in_act(const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& scale,
                                     const std::optional<at::Tensor>& shift, bool relu, const at::Tensor& x, int64_t C);

// act((y - mean) scale + shift) as a new (pooled) tensor: bn_act without a residual, for the
// kernels that cannot apply a deferred BatchNorm while packing (XAct).
at::Tensor bn_apply(const at::Tensor& y, const XActArgs& a);

// bn_act_backward's argument checks.
void check_bn_grad(const at::Tensor& grad_out, const at::Tensor& y, const std::optional<at::Tensor>& residual,
                   const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& weight,
                   const at::Tensor& mean, const at::Tensor& invstd);

// Pass 1 (contiguous tensors): [C][2] = per channel sum g and sum g (y - mean), g = grad_out masked by
// the ReLU after. With gm (a residual, relu_after, maps of >= kRowPlane pixels): that g, i.e. the
// residual's gradient, written to gm in the same pass. With up (no residual, maps of >= kRowPlane
// pixels): go is a pooled layer's gradient, unpooled plane by plane (Unpool).
std::vector<double> bn_sums(const at::Tensor& go, const at::Tensor& y, const at::Tensor* res, const at::Tensor& scale,
                            const at::Tensor& shift, const at::Tensor& mean, bool relu_after, at::Tensor* gm = nullptr,
                            const Unpool* up = nullptr);

// k [C][3] = (ka, kb, kc) per channel and the BatchNorm's parameter gradients dw, db (float64 [C])
// from bn_sums, or from `given` sums (the same [C][2], computed by the conv that produced grad_out).
std::vector<double> bn_grad_coefficients(const at::Tensor& go, const at::Tensor& y, const at::Tensor* res,
                                         const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& weight,
                                         const at::Tensor& mean, const at::Tensor& invstd, bool batch_stats,
                                         bool relu_after, double* dw, double* db, at::Tensor* gm = nullptr,
                                         const double* given = nullptr, const Unpool* up = nullptr);

// Pass 2 materialised: dy, g for a residual (gout), sum dy per channel added to dsum [C].
void bn_grad_input(const at::Tensor& go, const at::Tensor& y, const at::Tensor* res, const at::Tensor& scale,
                   const at::Tensor& shift, const at::Tensor& mean, const std::vector<double>& k, bool relu_after,
                   bool relu_before, at::Tensor& dy, at::Tensor* gout, double* dsum);

}  // namespace sparsetrain
