// The elementwise half of a BatchNorm fused behind a sparse conv (engine/fused.py): the conv's
// epilogue already summed y and y^2 per channel (sparse_conv2d_stats), so the forward is one pass
//   out = act((y - mean[c]) scale[c] + shift[c] (+ residual)),   act = ReLU or identity
// (scale = weight invstd, shift = the BN's bias: bn_scale_shift; centred, see bn_act.h's bn_pre)
// and the backward two: per-channel sums of the masked gradient g, then the input gradient.
// Train mode (batch statistics mean, invstd; N = batch * height * width per channel), x^ = (y - mean) * invstd:
//   dbias = sum g,  dweight = sum g x^,  dy = w invstd (g - dbias / N - x^ dweight / N)
// eval mode (running statistics, constants): dy = w invstd g.
// ReLU before the BatchNorm (VGG-like's conv -> ReLU -> BN): y is that ReLU's output and dy is
// masked by y > 0. With a residual added before the ReLU, the residual's gradient is g itself.
// The backward also returns sum dy per channel (a bias of the conv before the BatchNorm).
#include "bn_act.h"
#include "rows.h"

namespace sparsetrain {
namespace {

// ---------------------------------------------------------------- forward
// Sample rows [s0, s1) of n = C * hw elements (maps under kRowPlane pixels), constants per element;
// with cnt, the positive outputs counted per neuron while each row is in cache.
template <typename T>
ST_INLINE void act_rows_impl(const T* y, const T* res, T* out, int64_t n, const T* m, const T* a, const T* b,
                             int64_t s0, int64_t s1, bool relu, int32_t* cnt) {
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t o = s * n;
    const T* r = res ? res + o : nullptr;
    if (relu && res) act_row<T, true, true>(y + o, r, out + o, n, m, a, b);
    else if (relu) act_row<T, true, false>(y + o, r, out + o, n, m, a, b);
    else if (res) act_row<T, false, true>(y + o, r, out + o, n, m, a, b);
    else act_row<T, false, false>(y + o, r, out + o, n, m, a, b);
    if (cnt) count_positive(cnt, out + o, 0, n, 1);
  }
}

// Planes [p0, p1) (C channels of hw elements), the same.
template <typename T>
ST_INLINE void act_planes_impl(const T* y, const T* res, T* out, const double* mean, const T* scale, const T* shift,
                               int64_t C, int64_t hw, int64_t p0, int64_t p1, bool relu, int32_t* cnt) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c = p % C, o = p * hw;
    const T* r = res ? res + o : nullptr;
    const T m = T(mean[c]), a = scale[c], b = shift[c];
    if (relu && res) act_plane<T, true, true>(y + o, r, out + o, hw, m, a, b);
    else if (relu) act_plane<T, true, false>(y + o, r, out + o, hw, m, a, b);
    else if (res) act_plane<T, false, true>(y + o, r, out + o, hw, m, a, b);
    else act_plane<T, false, false>(y + o, r, out + o, hw, m, a, b);
    if (cnt) count_positive(cnt + c * hw, out + o, 0, hw, 1);
  }
}

// ---------------------------------------------------------------- backward
// The ReLU after the BatchNorm is recomputed, not saved: out > 0 iff pre(...) > 0.
// Pass 1 over planes [p0, p1) (memory order), sums into part [C][2]: sum g and sum g (y - mean),
// g = grad_out masked by the ReLU after (float per plane, double across planes). WG: g is also
// written to gout (the residual's gradient), built per plane in L1 and streamed out. up: grad_out is
// a pooled layer's (Unpool), each plane unpooled into L1 first.
template <typename T, int VB, bool RA, bool RES, bool WG = false>
ST_INLINE void bwd_sums_impl(const T* go, const T* y, const T* res, const T* scale, const T* shift,
                             const double* mean, int64_t C, int64_t hw, int64_t p0, int64_t p1, double* part,
                             T* gout = nullptr, const Unpool* up = nullptr) {
  using V = typename SimdVec<T, VB>::V;
  using U = typename SimdVec<T, VB>::U;
  constexpr int64_t L = VB / sizeof(T);
  T* tmp = WG ? scratch<T>(size_t(hw), 5) : nullptr;
  T* ubuf = up ? scratch<T>(size_t(hw), 6) : nullptr;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c = p % C;
    const T* gp = up ? up->plane(go, p, ubuf) : go + p * hw;
    const T* yp = y + p * hw;
    const T* rp = RES ? res + p * hw : nullptr;
    const T a = scale[c], b = shift[c], m = T(mean[c]);
    V s1{}, s2{};  // explicit vectors: an `omp simd reduction` kept these in stack slots
    int64_t i = 0;
    for (; i + L <= hw; i += L) {
      prefetch_ahead(gp + i), prefetch_ahead(yp + i);
      if (RES) prefetch_ahead(rp + i);
      const V g = sums_step<RA, RES>(V(*reinterpret_cast<const U*>(gp + i)), V(*reinterpret_cast<const U*>(yp + i)),
                                     RES ? V(*reinterpret_cast<const U*>(rp + i)) : V{}, a, b, m, s1, s2);
      if constexpr (WG) *reinterpret_cast<U*>(tmp + i) = g;
    }
    T t1 = hsum<T, VB>(s1), t2 = hsum<T, VB>(s2);
    for (; i < hw; ++i) {
      const T g = sums_step<RA, RES>(gp[i], yp[i], RES ? rp[i] : T(0), a, b, m, t1, t2);
      if constexpr (WG) tmp[i] = g;
    }
    part[2 * c] += t1;
    part[2 * c + 1] += t2;
    if constexpr (WG) stream_rows(gout + p * hw, hw, tmp, 0, hw, 1);
  }
  if constexpr (WG) stream_fence();
}

template <typename T, int VB>
ST_INLINE void bwd_sums_for(const T* go, const T* y, const T* res, const T* scale, const T* shift,
                            const double* mean, int64_t C, int64_t hw, int64_t p0, int64_t p1, double* part, bool ra,
                            T* gout, const Unpool* up) {
  if (gout) bwd_sums_impl<T, VB, true, true, true>(go, y, res, scale, shift, mean, C, hw, p0, p1, part, gout);
  else if (ra && res) bwd_sums_impl<T, VB, true, true>(go, y, res, scale, shift, mean, C, hw, p0, p1, part);
  else if (ra) bwd_sums_impl<T, VB, true, false>(go, y, res, scale, shift, mean, C, hw, p0, p1, part, nullptr, up);
  else bwd_sums_impl<T, VB, false, false>(go, y, res, scale, shift, mean, C, hw, p0, p1, part, nullptr, up);
}

// Pass 2 over planes [p0, p1): dy = ka g + kb (y - mean) + kc (kb = kc = 0 with running
// statistics), masked by y > 0 with a ReLU before; g written out for a residual.
template <typename T, int VB>
ST_INLINE void bwd_dy_impl(const T* go, const T* y, const T* res, const T* scale, const T* shift,
                           const double* mean, const double* k, int64_t C, int64_t hw, int64_t p0, int64_t p1,
                           T* dy, T* gout, double* dsum, bool ra, bool rb) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c = p % C, o = p * hw;
    dsum[c] += bn_dy_plane_for<T, VB>(ra, rb, res != nullptr, gout != nullptr, go + o, y + o, res ? res + o : nullptr, hw,
                                  scale[c], shift[c], T(mean[c]), T(k[3 * c]), T(k[3 * c + 1]), T(k[3 * c + 2]),
                                  dy + o, gout ? gout + o : nullptr);  // (the conv bias's gradient)
  }
}

// The two passes over sample rows [s0, s1) (maps under kRowPlane pixels): constants per element
// (e: a, b, mean, ka, kb, kc, each C * hw), sums per element (acc [2][C * hw] for pass 1,
// [C * hw] for pass 2: a float sum over at most the batch, as the plane path's sum over a plane),
// reduced per channel in double by the caller.
template <typename T, bool RA, bool RES>
ST_INLINE void row_sums_impl(const T* go, const T* y, const T* res, const T* const* e, int64_t n,
                             int64_t s0, int64_t s1, T* acc) {
  const T *a = e[0], *b = e[1], *m = e[2];
  for (int64_t s = s0; s < s1; ++s) {
    const T* gp = go + s * n;
    const T* yp = y + s * n;
    const T* rp = RES ? res + s * n : nullptr;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) sums_step<RA, RES>(gp[i], yp[i], RES ? rp[i] : T(0), a[i], b[i], m[i], acc[i], acc[n + i]);
  }
}

template <typename T, bool RA, bool RB, bool RES, bool WG>
ST_INLINE void row_dy_impl(const T* go, const T* y, const T* res, const T* const* e, int64_t n,
                           int64_t s0, int64_t s1, T* dy, T* gout, T* acc) {
  const T *a = e[0], *b = e[1], *m = e[2], *ka = e[3], *kb = e[4], *kc = e[5];
  for (int64_t s = s0; s < s1; ++s) {
    const T* gp = go + s * n;
    const T* yp = y + s * n;
    const T* rp = RES ? res + s * n : nullptr;
    T* dp = dy + s * n;
    T* op = WG ? gout + s * n : nullptr;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      T g;
      const T v = bn_dy_value<RA, RB, RES>(gp[i], yp[i], RES ? rp[i] : T(0), a[i], b[i], m[i], ka[i], kb[i], kc[i], g);
      if constexpr (WG) op[i] = g;
      dp[i] = v;
      acc[i] += v;
    }
  }
}

// Pass 2's instantiation of the row path for the flags: ReLU after (ra), ReLU before (rb), residual,
// g written out (the plane path's is bn_act.h's bn_dy_plane_for).
#define ST_BN_DY_SWITCH(T, F, ARGS)                                                \
  do {                                                                           \
    const bool wg = gout != nullptr;                                             \
    if (ra && res && rb) wg ? F<T, true, true, true, true> ARGS : F<T, true, true, true, false> ARGS; \
    else if (ra && res) wg ? F<T, true, false, true, true> ARGS : F<T, true, false, true, false> ARGS; \
    else if (ra && rb) wg ? F<T, true, true, false, true> ARGS : F<T, true, true, false, false> ARGS;  \
    else if (ra) wg ? F<T, true, false, false, true> ARGS : F<T, true, false, false, false> ARGS;      \
    else if (rb) wg ? F<T, false, true, false, true> ARGS : F<T, false, true, false, false> ARGS;      \
    else wg ? F<T, false, false, false, true> ARGS : F<T, false, false, false, false> ARGS;           \
  } while (0)

#define ST_BN_ACT_TASKS(T)                                                                         \
  ST_MULTIVERSION void act_rows(const T* y, const T* res, T* out, int64_t n, const T* m, const T* a,  \
                                const T* b, int64_t s0, int64_t s1, bool relu, int32_t* cnt) try { \
    act_rows_impl<T>(y, res, out, n, m, a, b, s0, s1, relu, cnt);                                  \
  } ST_CLONE_CATCH                                                                                 \
  ST_MULTIVERSION void act_planes(const T* y, const T* res, T* out, const double* mean, const T* scale, \
                                  const T* shift, int64_t C, int64_t hw, int64_t p0, int64_t p1, bool relu, \
                                  int32_t* cnt) try {                                              \
    act_planes_impl<T>(y, res, out, mean, scale, shift, C, hw, p0, p1, relu, cnt);                 \
  } ST_CLONE_CATCH                                                                                 \
  ST_MULTIVERSION void bwd_sums(const T* go, const T* y, const T* res, const T* scale, const T* shift,   \
                                const double* mean, int64_t C, int64_t hw, int64_t p0, int64_t p1,  \
                                double* part, bool ra, T* gout, const Unpool* up) try {            \
    ST_SWITCH_VB((bwd_sums_for<T, VB>(go, y, res, scale, shift, mean, C, hw, p0, p1, part, ra, gout, up))); \
  } ST_CLONE_CATCH                                                                                 \
  ST_MULTIVERSION void bwd_dy(const T* go, const T* y, const T* res, const T* scale, const T* shift, \
                              const double* mean, const double* k, int64_t C, int64_t hw,          \
                              int64_t p0, int64_t p1, T* dy, T* gout, double* dsum, bool ra, bool rb) try { \
    ST_SWITCH_VB((bwd_dy_impl<T, VB>(go, y, res, scale, shift, mean, k, C, hw, p0, p1, dy, gout, dsum, ra, rb))); \
  } ST_CLONE_CATCH                                                                                 \
  ST_MULTIVERSION void row_sums(const T* go, const T* y, const T* res, const T* const* e, int64_t n, \
                                int64_t s0, int64_t s1, T* acc, bool ra) try {                     \
    if (ra && res) row_sums_impl<T, true, true>(go, y, res, e, n, s0, s1, acc);                    \
    else if (ra) row_sums_impl<T, true, false>(go, y, res, e, n, s0, s1, acc);                     \
    else row_sums_impl<T, false, false>(go, y, res, e, n, s0, s1, acc);                            \
  } ST_CLONE_CATCH                                                                                 \
  ST_MULTIVERSION void row_dy(const T* go, const T* y, const T* res, const T* const* e, int64_t n,   \
                              int64_t s0, int64_t s1, T* dy, T* gout, T* acc, bool ra, bool rb) try {  \
    ST_BN_DY_SWITCH(T, row_dy_impl, (go, y, res, e, n, s0, s1, dy, gout, acc));                        \
  } ST_CLONE_CATCH
ST_BN_ACT_TASKS(float)
ST_BN_ACT_TASKS(double)
#undef ST_BN_ACT_TASKS
#undef ST_BN_DY_SWITCH

// ---------------------------------------------------------------- ops
// y: [B, C, H, W] (any dims >= 2: channels second) of float32/float64 on the CPU.
void check_act(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  check_float(t, name);
  TORCH_CHECK_VALUE(t.dim() >= 2, name, " must be [batch, channels, ...] (>= 2-D), got shape ", t.sizes());
}

void check_like(const at::Tensor& t, const at::Tensor& y, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.sizes() == y.sizes(), name, " must have the shape of y ", y.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == y.scalar_type(), name, " must have dtype ", y.scalar_type(), ", got ",
                   t.scalar_type());
}

int64_t plane_size(const at::Tensor& y) {  // (from the sizes: an empty batch has planes too)
  int64_t n = 1;
  for (int64_t d = 2; d < y.dim(); ++d) n *= y.size(d);
  return n;
}

at::Tensor bn_act(const at::Tensor& y, const at::Tensor& mean, const at::Tensor& scale, const at::Tensor& shift,
                  const std::optional<at::Tensor>& residual, bool relu,
                  const std::optional<at::Tensor>& relu_counts) {
  check_act(y, "y");
  const int64_t B = y.size(0), C = y.size(1), hw = plane_size(y);
  check_channels(mean, C, at::kDouble, "mean");
  check_channels(scale, C, y.scalar_type(), "scale");
  check_channels(shift, C, y.scalar_type(), "shift");
  if (residual) check_like(*residual, y, "residual");
  const at::Tensor yc = y.contiguous(), mc = mean.contiguous(), sc = scale.contiguous(), sh = shift.contiguous();
  const at::Tensor rc = residual ? residual->contiguous() : at::Tensor();
  at::Tensor out = pooled_empty(yc.sizes(), yc.options());  // (no page faults on a fresh buffer)
  StateCounts counts(relu_counts ? check_state_counts(*relu_counts, C * hw) : nullptr, C * hw);
  if (out.numel() == 0) return out;
  // (the multiversioned loops run inside the parallel lambdas: a lambda does not inherit a clone's ISA)
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "bn_act", [&] {
    using T = scalar_t;
    const T *yp = yc.data_ptr<T>(), *rp = residual ? rc.data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    if (hw < kRowPlane) {  // sample rows; the constants per element
      const int64_t n = C * hw;
      const std::vector<T> m = per_element<T>(mc.data_ptr<double>(), C, hw);
      const std::vector<T> a = per_element<T>(sc.data_ptr<T>(), C, hw), b = per_element<T>(sh.data_ptr<T>(), C, hw);
      at::parallel_for(0, B, plane_grain(n), [&](int64_t s0, int64_t s1) {
        ST_CLONE_CALL(act_rows(yp, rp, op, n, m.data(), a.data(), b.data(), s0, s1, relu, counts.mine()));
      });
    } else {
      at::parallel_for(0, B * C, plane_grain(hw), [&](int64_t p0, int64_t p1) {
        ST_CLONE_CALL(act_planes(yp, rp, op, mc.data_ptr<double>(), sc.data_ptr<T>(), sh.data_ptr<T>(), C, hw, p0, p1,
                                 relu, counts.mine()));
      });
    }
  });
  counts.finish();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward(
    const at::Tensor& grad_out, const at::Tensor& y, const std::optional<at::Tensor>& residual,
    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& weight, const at::Tensor& mean, const at::Tensor& invstd, bool batch_stats,
    bool relu_after, bool relu_before, bool grad_residual) {
  check_bn_grad(grad_out, y, residual, scale, shift, weight, mean, invstd);
  const int64_t C = y.size(1);
  const at::Tensor go = grad_out.contiguous(), yc = y.contiguous(), sc = scale.contiguous();
  const at::Tensor sh = shift.contiguous(), mc = mean.contiguous();
  const at::Tensor wc = weight.contiguous(), ic = invstd.contiguous();
  const at::Tensor rc = residual ? residual->contiguous() : at::Tensor();
  at::Tensor dy = pooled_empty(yc.sizes(), yc.options());
  at::Tensor g = grad_residual ? pooled_empty(yc.sizes(), yc.options()) : at::empty({0}, y.options());
  at::Tensor dw = at::zeros({C}, y.options().dtype(at::kDouble)), db = at::zeros({C}, dw.options());
  at::Tensor dsum = at::zeros({C}, dw.options());
  if (y.numel() == 0) return {dy, dw, db, g, dsum};
  const at::Tensor* rp = residual ? &rc : nullptr;
  const std::vector<double> k = bn_grad_coefficients(go, yc, rp, sc, sh, wc, mc, ic, batch_stats, relu_after,
                                                     dw.data_ptr<double>(), db.data_ptr<double>());
  bn_grad_input(go, yc, rp, sc, sh, mc, k, relu_after, relu_before, dy, grad_residual ? &g : nullptr,
                dsum.data_ptr<double>());
  return {dy, dw, db, g, dsum};
}

}  // namespace

void check_channels(const at::Tensor& t, int64_t C, at::ScalarType dtype, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == C, name, " must have shape [", C, "] (one per channel), got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

std::optional<XActArgs> check_in_act(const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& scale,
                                     const std::optional<at::Tensor>& shift, bool relu, const at::Tensor& x, int64_t C) {
  TORCH_CHECK_VALUE(mean.has_value() == scale.has_value() && scale.has_value() == shift.has_value(),
                    "in_mean, in_scale and in_shift must be given together (the deferred BatchNorm)");
  if (!scale) return std::nullopt;
  check_channels(*mean, C, at::kDouble, "in_mean");
  check_channels(*scale, C, x.scalar_type(), "in_scale");
  check_channels(*shift, C, x.scalar_type(), "in_shift");
  return XActArgs{mean->contiguous(), scale->contiguous(), shift->contiguous(), relu};
}

at::Tensor bn_apply(const at::Tensor& y, const XActArgs& a) {
  return bn_act(y, a.mean, a.scale, a.shift, std::nullopt, a.relu, std::nullopt);
}

void check_bn_grad(const at::Tensor& grad_out, const at::Tensor& y, const std::optional<at::Tensor>& residual,
                   const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& weight,
                   const at::Tensor& mean, const at::Tensor& invstd) {
  check_act(y, "y");
  check_like(grad_out, y, "grad_out");
  const int64_t C = y.size(1);
  check_channels(scale, C, y.scalar_type(), "scale");
  check_channels(shift, C, y.scalar_type(), "shift");
  check_channels(weight, C, at::kDouble, "weight");
  check_channels(mean, C, at::kDouble, "mean");
  check_channels(invstd, C, at::kDouble, "invstd");
  if (residual) check_like(*residual, y, "residual");
}

std::vector<double> bn_sums(const at::Tensor& go, const at::Tensor& y, const at::Tensor* res, const at::Tensor& scale,
                            const at::Tensor& shift, const at::Tensor& mean, bool relu_after, at::Tensor* gm,
                            const Unpool* up) {
  const int64_t B = y.size(0), C = y.size(1), hw = plane_size(y), planes = B * C;
  const int64_t nth = at::get_num_threads();
  std::vector<double> part(size_t(nth) * C * 2, 0.0), sums(size_t(C) * 2, 0.0);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "bn_sums", [&] {
    using T = scalar_t;
    const T *gp = go.data_ptr<T>(), *yp = y.data_ptr<T>();
    const T *sp = scale.data_ptr<T>(), *hp = shift.data_ptr<T>();
    const T* rp = res ? res->data_ptr<T>() : nullptr;
    const double* m = mean.data_ptr<double>();
    TORCH_CHECK(!gm || (relu_after && res && hw >= kRowPlane), "bn_sums writes the masked gradient only "
                "for a residual with the ReLU after, on maps of >= ", kRowPlane, " pixels");
    TORCH_CHECK(!up || (!res && hw >= kRowPlane), "bn_sums unpools a pooled gradient only without a residual, on "
                "maps of >= ", kRowPlane, " pixels");
    T* gmp = gm ? gm->data_ptr<T>() : nullptr;
    // per-thread partial sums (planes or rows in memory order), summed in thread order
    if (hw < kRowPlane) {
      const int64_t n = C * hw;
      const std::vector<T> a = per_element<T>(sp, C, hw), b = per_element<T>(hp, C, hw), mm = per_element<T>(m, C, hw);
      const T* ep[3] = {a.data(), b.data(), mm.data()};
      std::vector<T> racc(size_t(nth) * 2 * n, T(0));
      at::parallel_for(0, B, plane_grain(n), [&](int64_t s0, int64_t s1) {
        ST_CLONE_CALL(row_sums(gp, yp, rp, ep, n, s0, s1, racc.data() + size_t(at::get_thread_num()) * 2 * n, relu_after));
      });
      for (int64_t t = 0; t < nth; ++t)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t i = 0; i < hw; ++i) {
            part[(t * C + c) * 2] += racc[t * 2 * n + c * hw + i];
            part[(t * C + c) * 2 + 1] += racc[t * 2 * n + n + c * hw + i];
          }
    } else {
      at::parallel_for(0, planes, plane_grain(hw), [&](int64_t p0, int64_t p1) {
        ST_CLONE_CALL(bwd_sums(gp, yp, rp, sp, hp, m, C, hw, p0, p1, part.data() + size_t(at::get_thread_num()) * C * 2, relu_after,
                               gmp, up));
      });
    }
  });
  for (int64_t t = 0; t < nth; ++t)
    for (int64_t c = 0; c < C; ++c) sums[2 * c] += part[(t * C + c) * 2], sums[2 * c + 1] += part[(t * C + c) * 2 + 1];
  return sums;
}

std::vector<double> bn_grad_coefficients(const at::Tensor& go, const at::Tensor& y, const at::Tensor* res,
                                         const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& weight,
                                         const at::Tensor& mean, const at::Tensor& invstd, bool batch_stats,
                                         bool relu_after, double* dwp, double* dbp, at::Tensor* gm,
                                         const double* given, const Unpool* up) {
  const int64_t B = y.size(0), C = y.size(1), hw = plane_size(y);
  const std::vector<double> sums = given ? std::vector<double>(given, given + 2 * C)
                                         : bn_sums(go, y, res, scale, shift, mean, relu_after, gm, up);
  std::vector<double> k(size_t(C) * 3);
  const double* w = weight.data_ptr<double>();
  const double* inv = invstd.data_ptr<double>();
  const double N = double(B) * hw;
  for (int64_t c = 0; c < C; ++c) {
    const double sg = sums[2 * c], sgy = sums[2 * c + 1];
    dbp[c] = sg;
    dwp[c] = sgy * inv[c];
    const double a = w[c] * inv[c];
    k[3 * c] = a;
    k[3 * c + 1] = batch_stats ? -a * inv[c] * dwp[c] / N : 0.0;
    k[3 * c + 2] = batch_stats ? -a * sg / N : 0.0;
  }
  return k;
}

void bn_grad_input(const at::Tensor& go, const at::Tensor& y, const at::Tensor* res, const at::Tensor& scale,
                   const at::Tensor& shift, const at::Tensor& mean, const std::vector<double>& k, bool relu_after,
                   bool relu_before, at::Tensor& dy, at::Tensor* gout_t, double* ds) {
  const int64_t B = y.size(0), C = y.size(1), hw = plane_size(y), planes = B * C;
  const int64_t nth = at::get_num_threads();
  std::vector<double> spart(size_t(nth) * C, 0.0);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "bn_grad_input", [&] {
    using T = scalar_t;
    const T *gp = go.data_ptr<T>(), *yp = y.data_ptr<T>();
    const T *sp = scale.data_ptr<T>(), *hp = shift.data_ptr<T>();
    const T* rp = res ? res->data_ptr<T>() : nullptr;
    const double* m = mean.data_ptr<double>();
    T* gout = gout_t ? gout_t->data_ptr<T>() : nullptr;
    if (hw < kRowPlane) {
      const int64_t n = C * hw;
      std::vector<std::vector<T>> e = {per_element<T>(sp, C, hw), per_element<T>(hp, C, hw), per_element<T>(m, C, hw)};
      for (int64_t j = 0; j < 3; ++j) e.push_back(per_element<T>(k.data() + j, C, hw, 3));
      const T* ep[6];
      for (int64_t j = 0; j < 6; ++j) ep[j] = e[j].data();
      std::vector<T> racc(size_t(nth) * n, T(0));
      at::parallel_for(0, B, plane_grain(n), [&](int64_t s0, int64_t s1) {
        ST_CLONE_CALL(row_dy(gp, yp, rp, ep, n, s0, s1, dy.data_ptr<T>(), gout, racc.data() + size_t(at::get_thread_num()) * n,
                             relu_after, relu_before));
      });
      for (int64_t t = 0; t < nth; ++t)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t i = 0; i < hw; ++i) spart[t * C + c] += racc[t * n + c * hw + i];
    } else {
      at::parallel_for(0, planes, plane_grain(hw), [&](int64_t p0, int64_t p1) {
        ST_CLONE_CALL(bwd_dy(gp, yp, rp, sp, hp, m, k.data(), C, hw, p0, p1, dy.data_ptr<T>(), gout,
                             spart.data() + size_t(at::get_thread_num()) * C, relu_after, relu_before));
      });
    }
  });
  if (ds)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < nth; ++t) ds[c] += spart[t * C + c];
}

TORCH_LIBRARY_IMPL(sparsetrain, CPU, m) {
  m.impl("bn_act", &bn_act);
  m.impl("bn_act_backward", &bn_act_backward);
}

}  // namespace sparsetrain
