// The BatchNorm behind a sparse conv (bn_act.cpp): the pieces its backward shares with the conv
// backward that applies the BatchNorm's input-gradient pass while packing its dy tiles
// (sparse_conv2d_bn_backward, sparse_conv2d.cpp), so both compute one formula.
#pragma once
#include "common.h"

namespace sparsetrain {

// The BatchNorm's affine map (plus the residual) before the ReLU. The backward recomputes the
// ReLU's mask from y with this same function (same instruction set clone), so the mask is the
// forward's bit for bit.
template <typename T, bool RES>
ST_INLINE T bn_pre(const T* y, const T* r, int64_t i, T a, T b) {
  if constexpr (RES) return y[i] * a + b + r[i];
  return y[i] * a + b;
}

// The input gradient on one plane of n elements: dy = ka g + kb (y - mean) + kc with g = grad_out
// masked by the ReLU after (RA, recomputed), masked by y > 0 with a ReLU before (RB); g written to
// op for a residual (WG). Returns the plane's sum of dy (float, as one plane).
template <typename T, bool RA, bool RB, bool RES, bool WG>
ST_INLINE T bn_dy_plane(const T* gp, const T* yp, const T* rp, int64_t n, T a, T b, T m, T ka, T kb, T kc,
                        T* dp, T* op) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const T g = RA && !(bn_pre<T, RES>(yp, rp, i, a, b) > T(0)) ? T(0) : gp[i];
    if constexpr (WG) op[i] = g;
    T v = ka * g + kb * (yp[i] - m) + kc;
    if constexpr (RB) v = yp[i] > T(0) ? v : T(0);
    dp[i] = v;
    s += v;
  }
  return s;
}

// Calls bn_dy_plane for the flags: ReLU after (ra), ReLU before (rb), residual (read only with ra:
// it only moves the recomputed mask), g written to op (wg).
template <typename T>
ST_INLINE T bn_dy_plane_for(bool ra, bool rb, bool res, bool wg, const T* gp, const T* yp, const T* rp, int64_t n,
                            T a, T b, T m, T ka, T kb, T kc, T* dp, T* op) {
#define ST_BN_PLANE(RA, RB, RES) \
  (wg ? bn_dy_plane<T, RA, RB, RES, true>(gp, yp, rp, n, a, b, m, ka, kb, kc, dp, op) \
      : bn_dy_plane<T, RA, RB, RES, false>(gp, yp, rp, n, a, b, m, ka, kb, kc, dp, op))
  if (ra && res) return rb ? ST_BN_PLANE(true, true, true) : ST_BN_PLANE(true, false, true);
  if (ra) return rb ? ST_BN_PLANE(true, true, false) : ST_BN_PLANE(true, false, false);
  return rb ? ST_BN_PLANE(false, true, false) : ST_BN_PLANE(false, false, false);
#undef ST_BN_PLANE
}

// act(scale[c] * y + shift[c]) as a new (pooled) tensor: bn_act without a residual, for the
// kernels that cannot apply a deferred BatchNorm while packing (XAct below).
at::Tensor bn_apply(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift, bool relu);

// bn_act_backward's argument checks.
void check_bn_grad(const at::Tensor& grad_out, const at::Tensor& y, const std::optional<at::Tensor>& residual,
                   const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& weight,
                   const at::Tensor& mean, const at::Tensor& invstd);

// Pass 1 (contiguous tensors): k [C][3] = (ka, kb, kc) per channel, and the BatchNorm's parameter
// gradients dw, db (float64 [C]).
std::vector<double> bn_grad_coefficients(const at::Tensor& go, const at::Tensor& y, const at::Tensor* res,
                                         const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& weight,
                                         const at::Tensor& mean, const at::Tensor& invstd, bool batch_stats,
                                         bool relu_after, double* dw, double* db);

// Pass 2 materialised: dy, g for a residual (gout), sum dy per channel added to dsum [C].
void bn_grad_input(const at::Tensor& go, const at::Tensor& y, const at::Tensor* res, const at::Tensor& scale,
                   const at::Tensor& shift, const at::Tensor& mean, const std::vector<double>& k, bool relu_after,
                   bool relu_before, at::Tensor& dy, at::Tensor* gout, double* dsum);

}  // namespace sparsetrain
