// 2x2 max-pooling with stride 2 (VGG-like's stage ends; engine/fused.py swaps nn.MaxPool2d(2) for
// it in a fused model): out[b, c, i, j] = max of x[b, c, 2i:2i+2, 2j:2j+2], its position in the
// window (0..3, row-major) kept as one byte. Ties and NaN as PyTorch's CPU kernel: the first maximum
// in row-major order wins, a NaN wins over numbers (the last NaN over earlier ones). The backward
// writes every input gradient once (the max position gets the output's gradient, the others 0;
// rows and columns past 2 * (H / 2) get 0), so it needs no zero fill. One pass each way.
#include "common.h"

namespace sparsetrain {
namespace {

// Branch-free (selects, `v != v` for NaN) so the row loop vectorises.
template <typename T>
ST_INLINE void pool_plane(const T* x, int64_t W, int64_t OH, int64_t OW, T* out, uint8_t* idx) {
  for (int64_t i = 0; i < OH; ++i) {
    const T* r0 = x + 2 * i * W;
    const T* r1 = r0 + W;
    T* o = out + i * OW;
    uint8_t* id = idx + i * OW;
#pragma omp simd
    for (int64_t j = 0; j < OW; ++j) {
      const T a = r0[2 * j], b = r0[2 * j + 1], c = r1[2 * j], d = r1[2 * j + 1];
      T m = a;
      int k = 0;
      const bool tb = (b > m) | (b != b);
      m = tb ? b : m;
      k = tb ? 1 : k;
      const bool tc = (c > m) | (c != c);
      m = tc ? c : m;
      k = tc ? 2 : k;
      const bool td = (d > m) | (d != d);
      m = td ? d : m;
      k = td ? 3 : k;
      o[j] = m;
      id[j] = uint8_t(k);
    }
  }
}

template <typename T>
ST_INLINE void unpool_plane(const T* g, const uint8_t* idx, int64_t H, int64_t W, int64_t OH, int64_t OW, T* dx) {
  for (int64_t i = 0; i < OH; ++i) {
    T* r0 = dx + 2 * i * W;
    T* r1 = r0 + W;
    const T* gi = g + i * OW;
    const uint8_t* ki = idx + i * OW;
#pragma omp simd
    for (int64_t j = 0; j < OW; ++j) {
      const T v = gi[j];
      const int k = ki[j];
      r0[2 * j] = k == 0 ? v : T(0);
      r0[2 * j + 1] = k == 1 ? v : T(0);
      r1[2 * j] = k == 2 ? v : T(0);
      r1[2 * j + 1] = k == 3 ? v : T(0);
    }
    if (W % 2) r0[W - 1] = r1[W - 1] = T(0);
  }
  if (H % 2) std::fill(dx + (H - 1) * W, dx + H * W, T(0));
}

#define ST_POOL_TASKS(T)                                                                        \
  ST_MULTIVERSION void pool_planes(const T* x, int64_t H, int64_t W, int64_t OH, int64_t OW,    \
                                   int64_t p0, int64_t p1, T* out, uint8_t* idx) {               \
    for (int64_t p = p0; p < p1; ++p)                                                           \
      pool_plane(x + p * H * W, W, OH, OW, out + p * OH * OW, idx + p * OH * OW);               \
  }                                                                                             \
  ST_MULTIVERSION void unpool_planes(const T* g, const uint8_t* idx, int64_t H, int64_t W,      \
                                     int64_t OH, int64_t OW, int64_t p0, int64_t p1, T* dx) {   \
    for (int64_t p = p0; p < p1; ++p)                                                           \
      unpool_plane(g + p * OH * OW, idx + p * OH * OW, H, W, OH, OW, dx + p * H * W);           \
  }
ST_POOL_TASKS(float)
ST_POOL_TASKS(double)
#undef ST_POOL_TASKS

void check_x4(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  check_float(t, name);
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D [batch, channels, height, width], got shape ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor> max_pool2x2(const at::Tensor& x) {
  check_x4(x, "x");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), OH = H / 2, OW = W / 2;
  TORCH_CHECK(H >= 2 && W >= 2, "x must be at least 2x2 to pool 2x2 (as nn.MaxPool2d(2)), got shape ", x.sizes());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = pooled_empty({B, C, OH, OW}, x.options());
  at::Tensor idx = at::empty({B, C, OH, OW}, x.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, idx};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max_pool2x2", [&] {
    at::parallel_for(0, B * C, plane_grain(H * W), [&](int64_t p0, int64_t p1) {
      pool_planes(xc.data_ptr<scalar_t>(), H, W, OH, OW, p0, p1, out.data_ptr<scalar_t>(), idx.data_ptr<uint8_t>());
    });
  });
  return {out, idx};
}

at::Tensor max_pool2x2_backward(const at::Tensor& grad_out, const at::Tensor& indices, at::IntArrayRef input_size) {
  check_x4(grad_out, "grad_out");
  check_cpu(indices, "indices");
  check_dtype(indices, at::kByte, "indices");
  TORCH_CHECK(indices.sizes() == grad_out.sizes(), "indices must have the shape of grad_out ", grad_out.sizes(),
              ", got ", indices.sizes());
  TORCH_CHECK(input_size.size() == 2, "input_size must be [height, width], got ", input_size);
  const int64_t B = grad_out.size(0), C = grad_out.size(1), H = input_size[0], W = input_size[1];
  const int64_t OH = grad_out.size(2), OW = grad_out.size(3);
  TORCH_CHECK(H >= 0 && W >= 0 && H / 2 == OH && W / 2 == OW, "input_size (", H, ", ", W,
              ") does not pool 2x2 to grad_out's (", OH, ", ", OW, ")");
  const at::Tensor g = grad_out.contiguous(), ic = indices.contiguous();
  at::Tensor dx = pooled_empty({B, C, H, W}, grad_out.options());
  if (dx.numel() == 0) return dx;
  if (OH == 0 || OW == 0) return dx.zero_();
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "max_pool2x2_backward", [&] {
    at::parallel_for(0, B * C, plane_grain(H * W), [&](int64_t p0, int64_t p1) {
      unpool_planes(g.data_ptr<scalar_t>(), ic.data_ptr<uint8_t>(), H, W, OH, OW, p0, p1, dx.data_ptr<scalar_t>());
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsetrain, CPU, m) {
  m.impl("max_pool2x2", &max_pool2x2);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward);
}

}  // namespace sparsetrain
