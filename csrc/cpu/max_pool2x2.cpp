// 2x2 max-pooling with stride 2 (VGG-like's stage ends; engine/fused.py swaps nn.MaxPool2d(2) for
// it in a fused model): out[b, c, i, j] = max of x[b, c, 2i:2i+2, 2j:2j+2], its position in the
// window (0..3, row-major) kept as one byte. Ties and NaN as PyTorch's CPU kernel: the first maximum
// in row-major order wins, a NaN wins over numbers (the last NaN over earlier ones). The backward
// writes every input gradient once (the max position gets the output's gradient, the others 0;
// rows and columns past 2 * (H / 2) get 0), so it needs no zero fill (unpool.h). One pass each way.
// With in_mean/in_scale/in_shift (a fused layer's BatchNorm, engine/fused.py), x is that BN's input
// y and each plane is first normalised into an L1 buffer by bn_act's own plane function (bn_act.h's
// act_plane: its output bit for bit), then pooled: the BN's activation is never written.
#include <atomic>
#include <type_traits>

#include "bn_act.h"

namespace sparsetrain {
namespace {

// The maximum of the window {r0[0], r0[1], r1[0], r1[1]} and its position (0..3, row-major) in k:
// the first maximum wins, a NaN wins over numbers and the last NaN over earlier ones (PyTorch's
// CPU rule). Branch-free (selects, `v != v` for NaN) so the loops around it vectorise.
template <typename T>
ST_INLINE T window_max(const T* r0, const T* r1, uint8_t& k) {
  const T a = r0[0], b = r0[1], c = r1[0], d = r1[1];
  T m = a;
  int p = 0;
  const bool tb = (b > m) | (b != b);
  m = tb ? b : m;
  p = tb ? 1 : p;
  const bool tc = (c > m) | (c != c);
  m = tc ? c : m;
  p = tc ? 2 : p;
  const bool td = (d > m) | (d != d);
  m = td ? d : m;
  p = td ? 3 : p;
  k = uint8_t(p);
  return m;
}

template <typename T>
ST_INLINE void pool_plane(const T* x, int64_t W, int64_t OH, int64_t OW, T* out, uint8_t* idx) {
  for (int64_t i = 0; i < OH; ++i) {
    const T* r0 = x + 2 * i * W;
    const T* r1 = r0 + W;
    T* o = out + i * OW;
    uint8_t* id = idx + i * OW;
#pragma omp simd
    for (int64_t j = 0; j < OW; ++j) {
      o[j] = window_max(r0 + 2 * j, r1 + 2 * j, id[j]);
    }
  }
}

// Even maps of 2..32 columns (VGG's stages): the planes' row pairs are evenly spaced, so
// pairs [q0, q1) are walked as one sequence with the row width N a compile-time constant (a
// straight-line row, no per-row loop setup: at OW = 4 the per-row loops cost 3x the pooling).
template <typename T, int N>
ST_INLINE void pool_pairs_n(const T* x, int64_t q0, int64_t q1, T* out, uint8_t* idx) {
  for (int64_t q = q0; q < q1; ++q) {
    const T* r0 = x + q * 4 * N;
    const T* r1 = r0 + 2 * N;
    T* o = out + q * N;
    uint8_t* id = idx + q * N;
    for (int j = 0; j < N; ++j) {
      o[j] = window_max(r0 + 2 * j, r1 + 2 * j, id[j]);
    }
  }
}

// Planes [p0, p1) of act((x - mean[c]) sc[c] + sh[c]) (C channels) as bn_act computes them (its
// plane function), normalised into buf (kActBuf elements) a block of planes at a time, then pooled.
constexpr int64_t kActBuf = 4096;
template <typename T>
ST_INLINE void pool_act_planes(const T* x, int64_t H, int64_t W, int64_t OH, int64_t OW, int64_t p0, int64_t p1,
                               T* out, uint8_t* idx, const double* mean, const T* sc, const T* sh, bool relu,
                               int64_t C, T* buf) {
  const int n = pair_width(H, W);
  const int64_t hw = H * W, nb = std::max<int64_t>(1, kActBuf / hw);
  for (int64_t pb = p0; pb < p1; pb += nb) {
    const int64_t pe = std::min(p1, pb + nb);
    for (int64_t p = pb; p < pe; ++p) {
      const int64_t c = p % C;
      const T m = T(mean[c]);
      if (relu) act_plane<T, true, false>(x + p * hw, nullptr, buf + (p - pb) * hw, hw, m, sc[c], sh[c]);
      else act_plane<T, false, false>(x + p * hw, nullptr, buf + (p - pb) * hw, hw, m, sc[c], sh[c]);
    }
    if (n) ST_PAIRS_SWITCH(n, (pool_pairs_n<T, NN>(buf, 0, (pe - pb) * OH, out + pb * OH * OW, idx + pb * OH * OW)))
    else
      for (int64_t p = pb; p < pe; ++p)
        pool_plane(buf + (p - pb) * hw, W, OH, OW, out + p * OH * OW, idx + p * OH * OW);
  }
}

// Samples [s0, s1) of maps under kRowPlane pixels, as bn_act's row path (constants per element m,
// a, b over a sample's n = C * H * W elements), each sample row normalised into buf, then pooled.
template <typename T>
ST_INLINE void pool_act_rows(const T* x, int64_t H, int64_t W, int64_t OH, int64_t OW, int64_t C, int64_t s0,
                             int64_t s1, T* out, uint8_t* idx, const T* m, const T* a, const T* b, bool relu,
                             T* buf) {
  const int n = pair_width(H, W);
  const int64_t len = C * H * W, olen = C * OH * OW;
  for (int64_t s = s0; s < s1; ++s) {
    if (relu) act_row<T, true, false>(x + s * len, nullptr, buf, len, m, a, b);
    else act_row<T, false, false>(x + s * len, nullptr, buf, len, m, a, b);
    if (n) ST_PAIRS_SWITCH(n, (pool_pairs_n<T, NN>(buf, 0, C * OH, out + s * olen, idx + s * olen)))
    else
      for (int64_t c = 0; c < C; ++c)
        pool_plane(buf + c * H * W, W, OH, OW, out + s * olen + c * OH * OW, idx + s * olen + c * OH * OW);
  }
}

#define ST_POOL_TASKS(T)                                                                        \
  ST_MULTIVERSION void pool_planes(const T* x, int64_t H, int64_t W, int64_t OH, int64_t OW,    \
                                   int64_t p0, int64_t p1, T* out, uint8_t* idx, const double* mean, \
                                   const T* sc, const T* sh, bool relu, int64_t C) try {        \
    if (sc) {                                                                                   \
      T* buf = scratch<T>(size_t(std::max<int64_t>(kActBuf, H * W)), 0);                        \
      pool_act_planes(x, H, W, OH, OW, p0, p1, out, idx, mean, sc, sh, relu, C, buf);           \
      return;                                                                                   \
    }                                                                                           \
    if (const int n = pair_width(H, W)) {                                                       \
      ST_PAIRS_SWITCH(n, (pool_pairs_n<T, NN>(x, p0 * OH, p1 * OH, out, idx)));                 \
      return;                                                                                   \
    }                                                                                           \
    for (int64_t p = p0; p < p1; ++p)                                                           \
      pool_plane(x + p * H * W, W, OH, OW, out + p * OH * OW, idx + p * OH * OW);               \
  } ST_CLONE_CATCH                                                                              \
  ST_MULTIVERSION void pool_rows(const T* x, int64_t H, int64_t W, int64_t OH, int64_t OW, int64_t C, \
                                 int64_t s0, int64_t s1, T* out, uint8_t* idx, const T* m, const T* a, \
                                 const T* b, bool relu) try {                                   \
    T* buf = scratch<T>(size_t(C * H * W), 0);                                                  \
    pool_act_rows(x, H, W, OH, OW, C, s0, s1, out, idx, m, a, b, relu, buf);                    \
  } ST_CLONE_CATCH                                                                              \
  ST_MULTIVERSION void unpool_planes(const T* g, const uint8_t* idx, int64_t H, int64_t W,      \
                                     int64_t OH, int64_t OW, int64_t p0, int64_t p1,            \
                                     T* dx) try {                                               \
    if (const int n = pair_width(H, W)) {                                                       \
      ST_PAIRS_SWITCH(n, (unpool_pairs_n<T, NN>(g, idx, p0 * OH, p1 * OH, dx)));                \
      return;                                                                                   \
    }                                                                                           \
    for (int64_t p = p0; p < p1; ++p)                                                           \
      unpool_plane(g + p * OH * OW, idx + p * OH * OW, H, W, OH, OW, dx + p * H * W);           \
  } ST_CLONE_CATCH
ST_POOL_TASKS(float)
ST_POOL_TASKS(double)
#undef ST_POOL_TASKS
#undef ST_PAIRS_SWITCH

void check_x4(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  check_float(t, name);
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D [batch, channels, height, width], got shape ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor> max_pool2x2(const at::Tensor& x, const std::optional<at::Tensor>& in_mean,
                                               const std::optional<at::Tensor>& in_scale,
                                               const std::optional<at::Tensor>& in_shift, bool in_relu) {
  check_x4(x, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), OH = H / 2, OW = W / 2;
  TORCH_CHECK_VALUE(H >= 2 && W >= 2, "x must be at least 2x2 to pool 2x2 (as nn.MaxPool2d(2)), got shape ", x.sizes());
  const std::optional<XActArgs> ia = check_in_act(in_mean, in_scale, in_shift, in_relu, x, C);
  const at::Tensor sc = ia ? ia->scale : at::Tensor(), sh = ia ? ia->shift : at::Tensor();
  const double* mean = ia ? ia->mean.data_ptr<double>() : nullptr;
  const at::Tensor xc = x.contiguous();
  at::Tensor out = pooled_empty({B, C, OH, OW}, x.options());
  at::Tensor idx = at::empty({B, C, OH, OW}, x.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, idx};
  const bool relu = ia && ia->relu;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max_pool2x2", [&] {
    using T = scalar_t;
    if (sc.defined() && H * W < kRowPlane) {  // bn_act's row path: sample rows, constants per element
      const std::vector<T> m = per_element<T>(mean, C, H * W);
      const std::vector<T> a = per_element<T>(sc.data_ptr<T>(), C, H * W), b = per_element<T>(sh.data_ptr<T>(), C, H * W);
      at::parallel_for(0, B, plane_grain(C * H * W), [&](int64_t s0, int64_t s1) {
        ST_CLONE_CALL(pool_rows(xc.data_ptr<T>(), H, W, OH, OW, C, s0, s1, out.data_ptr<T>(), idx.data_ptr<uint8_t>(), m.data(),
                                a.data(), b.data(), relu));
      });
      return;
    }
    at::parallel_for(0, B * C, plane_grain(H * W), [&](int64_t p0, int64_t p1) {
      ST_CLONE_CALL(pool_planes(xc.data_ptr<scalar_t>(), H, W, OH, OW, p0, p1, out.data_ptr<scalar_t>(), idx.data_ptr<uint8_t>(),
                                mean, sc.defined() ? sc.data_ptr<scalar_t>() : nullptr, sh.defined() ? sh.data_ptr<scalar_t>() : nullptr,
                                relu, C));
    });
  });
  return {out, idx};
}

}  // namespace

at::Tensor max_pool2x2_backward(const at::Tensor& grad_out, const at::Tensor& indices, at::IntArrayRef input_size,
                                const char* name) {
  check_x4(grad_out, "grad_out");
  check_cpu(indices, name);
  check_dtype(indices, at::kByte, name);
  TORCH_CHECK_VALUE(indices.sizes() == grad_out.sizes(), name, " must have the shape of grad_out ", grad_out.sizes(),
                    ", got ", indices.sizes());
  TORCH_CHECK_VALUE(input_size.size() == 2, "input_size must be [height, width], got ", input_size);
  const int64_t B = grad_out.size(0), C = grad_out.size(1), H = input_size[0], W = input_size[1];
  const int64_t OH = grad_out.size(2), OW = grad_out.size(3);
  TORCH_CHECK_VALUE(H >= 0 && W >= 0 && H / 2 == OH && W / 2 == OW, "input_size (", H, ", ", W,
                    ") does not pool 2x2 to grad_out's (", OH, ", ", OW, ")");
  const at::Tensor g = grad_out.contiguous(), ic = indices.contiguous();
  at::Tensor dx = pooled_empty({B, C, H, W}, grad_out.options());
  if (dx.numel() == 0) return dx;
  if (OH == 0 || OW == 0) return dx.zero_();
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "max_pool2x2_backward", [&] {
    at::parallel_for(0, B * C, plane_grain(H * W), [&](int64_t p0, int64_t p1) {
      // (checked per chunk just before unpooling reads the same bytes: no separate pass over memory)
      if (!window_positions(ic.data_ptr<uint8_t>() + p0 * OH * OW, (p1 - p0) * OH * OW)) {
        bad = true;
        return;
      }
      ST_CLONE_CALL(unpool_planes(g.data_ptr<scalar_t>(), ic.data_ptr<uint8_t>(), H, W, OH, OW, p0, p1, dx.data_ptr<scalar_t>()));
    });
  });
  TORCH_CHECK_VALUE(!bad, name, " must hold max_pool2x2's window positions (0 to 3), got a larger value");
  return dx;
}

namespace {
at::Tensor max_pool2x2_backward_op(const at::Tensor& grad_out, const at::Tensor& indices, at::IntArrayRef input_size) {
  return max_pool2x2_backward(grad_out, indices, input_size, "indices");
}
}  // namespace

TORCH_LIBRARY_IMPL(sparsetrain, CPU, m) {
  m.impl("max_pool2x2", &max_pool2x2);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward_op);
}

}  // namespace sparsetrain
