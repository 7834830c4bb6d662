// SparseConv2d on CPU: the op entry points (argument checks, outputs) of sparse_conv2d and its
// gradients, and the choice between the three direct-convolution kernels: the strided 1x1 kernel
// for 1x1 convs without padding and a stride above 1 (sparse_conv2d_pointwise.cpp), the
// batch-innermost kernel for other small maps (sparse_conv2d_small.cpp) and the phase-plane kernel
// for the rest (sparse_conv2d_phase.cpp).
#include "bn_act.h"
#include "sparse_conv2d.h"

#include <limits>

namespace sparsetrain {
namespace {

struct ConvArgs {
  int64_t kh, kw;
  std::vector<int64_t> k, s, p;
};

ConvArgs check_conv_args(at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p) {
  TORCH_CHECK_VALUE(k.size() == 2 && s.size() == 2 && p.size() == 2,
                    "kernel_size, stride and padding must each have 2 entries");
  TORCH_CHECK_VALUE(k[0] >= 1 && k[1] >= 1, "kernel_size must be >= 1, got ", k);
  TORCH_CHECK_VALUE(s[0] >= 1 && s[1] >= 1, "stride must be >= 1, got ", s);
  TORCH_CHECK_VALUE(p[0] >= 0 && p[1] >= 0, "padding must be >= 0, got ", p);
  constexpr int64_t kMax = int64_t(1) << 31;  // (products of two such never overflow int64)
  TORCH_CHECK_VALUE(k[0] < kMax && k[1] < kMax && s[0] < kMax && s[1] < kMax && p[0] < kMax && p[1] < kMax,
                    "kernel_size, stride and padding must be < 2^31, got ", k, ", ", s, ", ", p);
  // (the plans loop over the taps before any output exists: a weight with no input channel would
  // otherwise admit any kernel, and a 2^15 x 2^15 one took minutes and gigabytes to refuse)
  TORCH_CHECK_VALUE(k[0] * k[1] <= (int64_t(1) << 24), "kernel_size must have at most 2^24 taps, got ", k);
  return {k[0], k[1], k.vec(), s.vec(), p.vec()};
}

void check_values_conv(const at::Tensor& values, int64_t nnz) {
  check_cpu(values, "values");
  check_float(values, "values");
  check_1d_contig(values, "values");
  TORCH_CHECK_VALUE(values.numel() == nnz, "values must have nnz = ", nnz, " entries, got ", values.numel());
}

void check_perm_conv(const at::Tensor& perm, int64_t nnz) {
  check_cpu(perm, "perm");
  check_dtype(perm, at::kLong, "perm");
  check_1d_contig(perm, "perm");
  TORCH_CHECK_VALUE(perm.numel() == nnz, "perm must have nnz = ", nnz, " entries, got ", perm.numel());
  const int64_t* q = perm.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(all_in_range(q, nnz, nnz), "perm has entries outside [0, ", nnz, ")");
}

// The CSC (ccol, row_t, perm) is the transpose of the CSR (crow, col): perm a permutation and entry
// k of column c the CSR entry perm[k] of row row_t[k], in column c; O(nnz + cols). Without crow,
// only that perm is a permutation. (The layers always build it so; an op called directly may not.)
void check_transposed(const at::Tensor* crow, const at::Tensor* col, const at::Tensor& ccol,
                      const at::Tensor& row_t, const at::Tensor& perm) {
  const int64_t nnz = perm.numel(), cols = ccol.numel() - 1;
  const int64_t *q = perm.data_ptr<int64_t>(), *cp = ccol.data_ptr<int64_t>();
  const int32_t* rt = row_t.data_ptr<int32_t>();
  const int64_t* rp = crow ? crow->data_ptr<int64_t>() : nullptr;
  const int32_t* ci = col ? col->data_ptr<int32_t>() : nullptr;
  std::vector<uint8_t> seen(nnz, 0);
  bool ok = true;
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t k = cp[c]; k < cp[c + 1]; ++k) {
      const int64_t e = q[k];
      ok &= !seen[e];
      seen[e] = 1;
      if (rp) ok &= (ci[e] == c) & (rp[rt[k]] <= e) & (e < rp[rt[k] + 1]);
    }
  TORCH_CHECK_VALUE(ok, rp ? "ccol_indices, row_indices_t and perm must be the transposed index of crow_indices and "
                       "col_indices (CSR.index() builds them)" : "perm must be a permutation of [0, nnz)");
}

// x (or grad_out) must be a 4-D NCHW CPU tensor of the dtype of `like` (named like_name) with
// `channels` channels.
void check_nchw(const at::Tensor& t, const at::Tensor& like, int64_t channels, const char* name,
                const char* what, const char* like_name) {
  check_cpu(t, name);
  check_float(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " must have the dtype of ", like_name, " (",
                   like.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D [batch, channels, height, width], got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.size(1) == channels, name, " has ", t.size(1), " channels but the weight expects ",
                    channels, " ", what);
}

// (cols from ccol_indices can be anything; x's channels * kh * kw always divide)
int64_t in_channels(int64_t cols, const ConvArgs& a) {
  TORCH_CHECK_VALUE(cols % (a.kh * a.kw) == 0, "ccol_indices must have in_channels * kh * kw + 1 entries, got ",
                    cols + 1, " (", cols, " columns, not a multiple of kh*kw = ", a.kh * a.kw, ")");
  return cols / (a.kh * a.kw);
}

// x for a kernel: x itself, or act((x - mean) scale + shift) written out where the kernel cannot
// apply it while packing (the small-map kernel, strides other than 1); `ia` is cleared then.
at::Tensor deferred_input(const at::Tensor& xc, std::optional<XActArgs>& ia, bool small, const Plan& P) {
  if (!ia || (!small && P.sh == 1 && P.sw == 1)) return xc;
  at::Tensor out = bn_apply(xc, *ia);
  ia.reset();
  return out;
}

// The kernels' view of the deferred BatchNorm (all null without one); its mean in T, kept in `mean`.
template <typename T>
XAct<T> kernel_xact(const std::optional<XActArgs>& ia, std::vector<T>& mean) {
  if (!ia) return XAct<T>{nullptr, nullptr, nullptr, false};
  const double* m = ia->mean.data_ptr<double>();
  mean.assign(m, m + ia->mean.numel());
  return XAct<T>{mean.data(), ia->scale.data_ptr<T>(), ia->shift.data_ptr<T>(), ia->relu};
}

// The forward, with the epilogue of sparse_conv2d_stats when stats is defined ([2, O] float64).
at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                        const at::Tensor& values, const at::Tensor& ccol, const at::Tensor& row_t,
                        const at::Tensor& perm, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                        at::IntArrayRef padding, const std::optional<at::Tensor>& bias, bool relu,
                        at::Tensor* stats, std::optional<XActArgs> ia = std::nullopt,
                        const std::optional<at::Tensor>& relu_counts = std::nullopt) {
  const ConvArgs a = check_conv_args(kernel_size, stride, padding);
  const int64_t O = crow.numel() - 1, cols = ccol.numel() - 1, C = in_channels(cols, a);
  check_compressed(crow, col, cols, "crow_indices", "col_indices", " (the columns ccol_indices has)");
  check_compressed(ccol, row_t, O, "ccol_indices", "row_indices_t", " (the rows crow_indices has)");
  check_values_conv(values, col.numel());
  check_perm_conv(perm, col.numel());
  check_nchw(x, values, C, "x", "(input channels)", "values");
  at::Tensor bc;
  if (bias) {
    check_cpu(*bias, "bias");
    TORCH_CHECK_TYPE(bias->scalar_type() == values.scalar_type(), "bias must have dtype ",
                     values.scalar_type(), ", got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == O, "bias must have shape [", O, "], got ",
                      bias->sizes());
    bc = bias->contiguous();
  }
  const Plan P = make_plan(x.size(0), C, x.size(2), x.size(3), O, a.k, a.s, a.p, x.element_size(),
                           col.numel());
  at::Tensor y = pooled_empty({P.B, O, P.OH, P.OW}, x.options());
  if (stats) *stats = at::zeros({2, O}, x.options().dtype(at::kDouble));
  int64_t* counts = relu_counts ? check_state_counts(*relu_counts, O * P.OH * P.OW) : nullptr;
  if (y.numel() == 0) return y;
  double* st = stats ? stats->data_ptr<double>() : nullptr;
  const int64_t prb = pointwise_conv_rows(P, x.element_size());
  const int64_t sbt = prb ? 0 : small_conv_tile(P, x.element_size());
  const at::Tensor xc = deferred_input(x.contiguous(), ia, sbt != 0 || prb != 0, P);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_conv2d", [&] {
    std::vector<scalar_t> xmean;
    const XAct<scalar_t> xa = kernel_xact(ia, xmean);
    if (prb)
      return pointwise_conv<scalar_t>(P, prb, xc.data_ptr<scalar_t>(), nullptr,
                                      bias ? bc.data_ptr<scalar_t>() : nullptr, crow.data_ptr<int64_t>(),
                                      col.data_ptr<int32_t>(), values.data_ptr<scalar_t>(), nullptr, nullptr,
                                      nullptr, col.numel(), y.data_ptr<scalar_t>(), nullptr, nullptr, relu, st,
                                      nullptr, counts);
    if (sbt)
      return small_conv<scalar_t>(P, sbt, xc.data_ptr<scalar_t>(), nullptr,
                                  bias ? bc.data_ptr<scalar_t>() : nullptr, crow.data_ptr<int64_t>(),
                                  col.data_ptr<int32_t>(), values.data_ptr<scalar_t>(), nullptr,
                                  nullptr, nullptr, col.numel(), y.data_ptr<scalar_t>(), nullptr, nullptr,
                                  relu, st, nullptr, counts);
    run_conv<scalar_t>(P, xc.data_ptr<scalar_t>(), nullptr, bias ? bc.data_ptr<scalar_t>() : nullptr,
                       crow.data_ptr<int64_t>(), col.data_ptr<int32_t>(), values.data_ptr<scalar_t>(),
                       nullptr, nullptr, nullptr, col.numel(), y.data_ptr<scalar_t>(), nullptr, nullptr,
                       relu, st, nullptr, nullptr, ia ? &xa : nullptr, counts);
  });
  return y;
}

at::Tensor sparse_conv2d(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                         const at::Tensor& values, const at::Tensor& ccol, const at::Tensor& row_t,
                         const at::Tensor& perm, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                         at::IntArrayRef padding, const std::optional<at::Tensor>& bias) {
  return conv_forward(x, crow, col, values, ccol, row_t, perm, kernel_size, stride, padding, bias,
                      false, nullptr);
}

// stats[1], the kernels' sum y^2, as the centred sum (y - mean)^2 = sum y^2 - (sum y)^2 / n, which
// cancels by E[y^2] / var: 1e-8 of var in double at mean/std 1e4 (combined as E[y^2] - mean^2 before
// 2026-12-07, fp64 BatchNorms far from zero lost their variance: 4e-9 of the output at mean/std 8e3,
// 33x at 8e7). In float64 a channel past kRecentre of that, 1e2 (~2e-14 of var), is summed again about
// its mean from y, one more read of that channel alone; float32 never (the cancellation stays below its
// own rounding up to mean/std ~1e5, where y itself no longer holds its spread, and a constant channel,
// common at high sparsity, would take that read every step). An empty weight row's channel is
// act(bias) throughout: 0.
void centre_stats(const at::Tensor& y, const at::Tensor& crow, at::Tensor& stats) {
  const int64_t B = y.size(0), O = y.size(1), plane = y.size(2) * y.size(3);
  if (B * plane == 0) return;
  const double n = double(B * plane);
  const double kRecentre = y.scalar_type() == at::kDouble ? 1e2 : std::numeric_limits<double>::infinity();
  double* s = stats.data_ptr<double>();
  const int64_t* rp = crow.data_ptr<int64_t>();
  std::vector<int64_t> again;
  for (int64_t o = 0; o < O; ++o) {
    const double sq = s[O + o];
    s[O + o] = rp[o + 1] == rp[o] ? 0.0 : std::max(sq - s[o] * (s[o] / n), 0.0);
    if (rp[o + 1] > rp[o] && sq > kRecentre * s[O + o]) again.push_back(o);  // (NaN: never; 0 of sq > 0: again)
  }
  if (again.empty()) return;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "centre_stats", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, int64_t(again.size()), 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t o = again[i];
        const double mean = s[o] / n;
        double m2 = 0;
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t* p = yp + (b * O + o) * plane;
          for (int64_t j = 0; j < plane; ++j) m2 += (double(p[j]) - mean) * (double(p[j]) - mean);
        }
        s[O + o] = m2;
      }
    });
  });
}

// y = conv(x, W) + b (then relu(y) when `relu`) and, computed while each output tile is in cache,
// stats [2, O] float64: per output channel the sum of y over (batch, height, width) and its centred
// sum of squares (centre_stats): a BatchNorm's batch statistics without another pass over y. With
// in_mean, in_scale and in_shift, x is the previous layer's y and the conv reads
// act((x - in_mean) in_scale + in_shift) (XAct).
std::tuple<at::Tensor, at::Tensor> sparse_conv2d_stats(
    const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
    const at::Tensor& ccol, const at::Tensor& row_t, const at::Tensor& perm, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, const std::optional<at::Tensor>& bias, bool relu,
    const std::optional<at::Tensor>& in_mean, const std::optional<at::Tensor>& in_scale,
    const std::optional<at::Tensor>& in_shift, bool in_relu, const std::optional<at::Tensor>& relu_counts) {
  at::Tensor stats;
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D [batch, channels, height, width], got shape ", x.sizes());
  at::Tensor y = conv_forward(x, crow, col, values, ccol, row_t, perm, kernel_size, stride, padding,
                              bias, relu, &stats, check_in_act(in_mean, in_scale, in_shift, in_relu, x, x.size(1)),
                              relu_counts);
  centre_stats(y, crow, stats);
  return {y, stats};
}

// sparse_conv2d_bn_backward's BatchNorm (contiguous tensors; k from bn_grad_coefficients): the
// backward's grad_out is then the BatchNorm's output gradient.
struct BnArgs {
  const at::Tensor *y, *res, *scale, *shift, *mean;
  const std::vector<double>* k;
  bool relu_after, relu_before;
  at::Tensor* gout;  // g for a residual, or nullptr
  double* dsum;      // [O]: sum dy per channel, added
  const at::Tensor* pool_idx = nullptr;  // grad_out is a pooled layer's (its window positions), or nullptr
};

// Shared by the backward ops: dx when ccol is given (+ grad_input_add when defined), dvalues when
// crow is given; with bn, dy = the BatchNorm's input gradient of grad_out, computed as the phase
// kernel packs it (the small-map kernel and empty products get it written out first). `index`: the
// CSR (crow, col) the CSC must be the transpose of, when crow is not given (no dvalues wanted).
std::tuple<at::Tensor, at::Tensor> conv_backward(
    const at::Tensor& grad_out, const at::Tensor* x, at::IntArrayRef input_size, const at::Tensor* crow,
    const at::Tensor* col, const at::Tensor* values, const at::Tensor* ccol, const at::Tensor* row_t,
    const at::Tensor* perm, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    const std::optional<at::Tensor>& grad_input_add = std::nullopt, const BnArgs* bn = nullptr,
    std::optional<XActArgs> ia = std::nullopt, std::vector<double>* in_sums = nullptr,
    std::pair<const at::Tensor*, const at::Tensor*> index = {}) {
  const ConvArgs a = check_conv_args(kernel_size, stride, padding);
  TORCH_CHECK_VALUE(grad_out.dim() == 4, "grad_out must be 4-D [batch, channels, height, width], got shape ",
                    grad_out.sizes());
  const int64_t O = crow ? crow->numel() - 1 : grad_out.size(1);
  const int64_t cols = ccol ? ccol->numel() - 1 : x && x->dim() == 4 ? x->size(1) * a.kh * a.kw : 0;
  const int64_t C = in_channels(cols, a);
  const at::Tensor *icrow = crow ? crow : index.first, *icol = crow ? col : index.second;
  int64_t nnz = 0;
  if (icrow) {
    TORCH_CHECK_VALUE(icrow->numel() - 1 == O, "crow_indices must have out_channels + 1 = ", O + 1, " entries (",
                      "grad_out's channels), got ", icrow->numel());
    check_compressed(*icrow, *icol, cols, "crow_indices", "col_indices",
                     ccol ? " (the columns ccol_indices has)" : " (x's channels * kh * kw)");
    nnz = icol->numel();
  }
  if (ccol) {
    check_compressed(*ccol, *row_t, O, "ccol_indices", "row_indices_t",
                     icrow ? " (the rows crow_indices has)" : " (grad_out's channels)");
    TORCH_CHECK_VALUE(!icrow || row_t->numel() == nnz, "row_indices_t must have nnz = ", nnz, " entries");
    nnz = row_t->numel();
    check_values_conv(*values, nnz);
    check_perm_conv(*perm, nnz);
    check_transposed(icrow, icol, *ccol, *row_t, *perm);
  }
  const at::Tensor& like = x ? *x : *values;
  check_float(like, x ? "x" : "values");
  TORCH_CHECK_TYPE(!x || !values || values->scalar_type() == x->scalar_type(), "values must have the dtype of x (",
                   x->scalar_type(), "), got ", values ? values->scalar_type() : x->scalar_type());
  if (x) check_nchw(*x, like, C, "x", "(input channels)", "x");
  check_nchw(grad_out, like, O, "grad_out", "(output channels)", x ? "x" : "values");
  TORCH_CHECK_VALUE(input_size.size() == 2, "input_size must have 2 entries, got ", input_size);
  const int64_t B = grad_out.size(0), H = input_size[0], W = input_size[1];
  TORCH_CHECK_VALUE(!x || x->size(0) == B, "x and grad_out must have the same batch size, got ", x->size(0),
                    " and ", B);
  // input_size against the conv output (grad_out's, or y's when pooled) before make_plan, whose row
  // table is O(H): a far too large input_size is refused, never allocated. A conv of an H-row input
  // has more than (H - kh) / sh output rows (the exact sizes are checked below).
  const at::Tensor& conv_out = bn ? *bn->y : grad_out;
  TORCH_CHECK_VALUE(conv_out.dim() == 4, "y must be 4-D [batch, channels, height, width], got shape ", conv_out.sizes());
  TORCH_CHECK_VALUE(H >= 0 && W >= 0 && (H - a.kh) / a.s[0] < conv_out.size(2) && (W - a.kw) / a.s[1] < conv_out.size(3),
                    "input_size ", input_size, " does not fit ", bn ? "y" : "grad_out", "'s spatial size (",
                    conv_out.size(2), ", ", conv_out.size(3), ") for kernel_size ", kernel_size, " and stride ",
                    stride);
  const Plan P = make_plan(B, C, H, W, O, a.k, a.s, a.p, like.element_size(), nnz);
  const bool pooled = bn && bn->pool_idx;  // (grad_out: the pooled map's; the op checked it)
  TORCH_CHECK_VALUE(!bn || bn->y->sizes() == at::IntArrayRef({B, O, P.OH, P.OW}), "y must have the conv's "
                    "output shape [", B, ", ", O, ", ", P.OH, ", ", P.OW, "], got ", bn->y->sizes());
  TORCH_CHECK_VALUE(pooled || (grad_out.size(2) == P.OH && grad_out.size(3) == P.OW), "grad_out must have spatial size (",
                    P.OH, ", ", P.OW, ") for input (", H, ", ", W, "), got ", grad_out.sizes());
  at::Tensor g = grad_out.contiguous();
  const int64_t prb = pointwise_conv_rows(P, like.element_size());
  const int64_t sbt = prb ? 0 : small_conv_tile(P, like.element_size());
  if (!crow) ia.reset();  // (only the weight gradient reads x)
  const at::Tensor xc = x ? deferred_input(x->contiguous(), ia, sbt != 0 || prb != 0, P) : at::Tensor();
  // dy written out, then the plain backward: the small-map kernel, the strided 1x1 kernel on bands of
  // a map or a pooled gradient, no products
  if (bn && (sbt || (prb && (prb < P.OH || pooled)) || B == 0 || nnz == 0)) {
    if (pooled) g = max_pool2x2_backward(g, *bn->pool_idx, {P.OH, P.OW}, "pool_indices");
    at::Tensor dy = pooled_empty(g.sizes(), g.options());
    if (g.numel())
      bn_grad_input(g, *bn->y, bn->res, *bn->scale, *bn->shift, *bn->mean, *bn->k, bn->relu_after,
                    bn->relu_before, dy, bn->gout, bn->dsum);
    g = dy;
    bn = nullptr;
  }
  at::Tensor add;  // dx += grad_input_add, inside the kernel
  if (ccol && grad_input_add) {
    const at::Tensor& ga = *grad_input_add;
    check_cpu(ga, "grad_input_add");
    TORCH_CHECK_TYPE(ga.scalar_type() == g.scalar_type(), "grad_input_add must have dtype ", g.scalar_type(),
                     ", got ", ga.scalar_type());
    TORCH_CHECK_VALUE(ga.sizes() == at::IntArrayRef({B, C, H, W}), "grad_input_add must have the input's shape [",
                      B, ", ", C, ", ", H, ", ", W, "], got ", ga.sizes());
    add = ga.contiguous();
  }
  at::Tensor dx, dv;
  if (ccol) {
    dx = pooled_empty({B, C, H, W}, g.options());  // (no weights: add, or zeros)
    if (B == 0 || nnz == 0) add.defined() ? dx.copy_(add) : dx.zero_();
  }
  if (crow) dv = at::zeros({nnz}, g.options());
  if (B == 0 || nnz == 0) return {dx, dv};
  const bool has_add = add.defined();
  AT_DISPATCH_FLOATING_TYPES(like.scalar_type(), "sparse_conv2d_backward", [&] {
    if (sbt)
      return small_conv<scalar_t>(
          P, sbt, x ? xc.data_ptr<scalar_t>() : nullptr, g.data_ptr<scalar_t>(), nullptr,
          crow ? crow->data_ptr<int64_t>() : nullptr, crow ? col->data_ptr<int32_t>() : nullptr,
          values ? values->data_ptr<scalar_t>() : nullptr, ccol ? ccol->data_ptr<int64_t>() : nullptr,
          ccol ? row_t->data_ptr<int32_t>() : nullptr, ccol ? perm->data_ptr<int64_t>() : nullptr, nnz,
          nullptr, ccol ? dx.data_ptr<scalar_t>() : nullptr, crow ? dv.data_ptr<scalar_t>() : nullptr,
          false, nullptr, has_add ? add.data_ptr<scalar_t>() : nullptr);
    std::vector<scalar_t> xmean;
    XAct<scalar_t> xa = kernel_xact(ia, xmean);
    std::vector<double> xpart;  // (the deferred BatchNorm's sums from the dx planes)
    if (ia && in_sums && ccol) {
      xpart.assign(size_t(P.nbt) * C * 2, 0.0);
      xa.part = xpart.data();
    }
    BnPack<scalar_t> pk{};
    Unpool up{};
    if (bn) {
      using T = scalar_t;
      pk.y = bn->y->data_ptr<T>();
      pk.res = bn->res ? bn->res->data_ptr<T>() : nullptr;
      pk.scale = bn->scale->data_ptr<T>();
      pk.shift = bn->shift->data_ptr<T>();
      const double* m = bn->mean->data_ptr<double>();
      const std::vector<double>& k = *bn->k;
      for (int64_t o = 0; o < O; ++o) {
        pk.mean.push_back(T(m[o]));
        pk.ka.push_back(T(k[3 * o]));
        pk.kb.push_back(T(k[3 * o + 1]));
        pk.kc.push_back(T(k[3 * o + 2]));
      }
      pk.relu_after = bn->relu_after;
      pk.relu_before = bn->relu_before;
      pk.gout = bn->gout ? bn->gout->data_ptr<T>() : nullptr;
      pk.dsum = bn->dsum;
      if (bn->pool_idx) up = Unpool{bn->pool_idx->data_ptr<uint8_t>(), P.OH, P.OW}, pk.up = &up;
    }
    if (prb)
      return pointwise_conv<scalar_t>(
          P, prb, x ? xc.data_ptr<scalar_t>() : nullptr, g.data_ptr<scalar_t>(), nullptr,
          crow ? crow->data_ptr<int64_t>() : nullptr, crow ? col->data_ptr<int32_t>() : nullptr,
          values ? values->data_ptr<scalar_t>() : nullptr, ccol ? ccol->data_ptr<int64_t>() : nullptr,
          ccol ? row_t->data_ptr<int32_t>() : nullptr, ccol ? perm->data_ptr<int64_t>() : nullptr, nnz,
          nullptr, ccol ? dx.data_ptr<scalar_t>() : nullptr, crow ? dv.data_ptr<scalar_t>() : nullptr,
          false, nullptr, has_add ? add.data_ptr<scalar_t>() : nullptr, nullptr, bn ? &pk : nullptr);
    run_conv<scalar_t>(P, x ? xc.data_ptr<scalar_t>() : nullptr, g.data_ptr<scalar_t>(), nullptr,
                       crow ? crow->data_ptr<int64_t>() : nullptr, crow ? col->data_ptr<int32_t>() : nullptr,
                       values ? values->data_ptr<scalar_t>() : nullptr,
                       ccol ? ccol->data_ptr<int64_t>() : nullptr, ccol ? row_t->data_ptr<int32_t>() : nullptr,
                       ccol ? perm->data_ptr<int64_t>() : nullptr, nnz, nullptr,
                       ccol ? dx.data_ptr<scalar_t>() : nullptr, crow ? dv.data_ptr<scalar_t>() : nullptr,
                       false, nullptr, has_add ? add.data_ptr<scalar_t>() : nullptr, bn ? &pk : nullptr,
                       ia ? &xa : nullptr);
    if (xa.part) {  // tile order: deterministic
      in_sums->assign(size_t(C) * 2, 0.0);
      for (int64_t t = 0; t < P.nbt; ++t)
        for (int64_t i = 0; i < 2 * C; ++i) (*in_sums)[i] += xpart[t * 2 * C + i];
    }
  });
  return {dx, dv};
}

at::Tensor sparse_conv2d_grad_input(const at::Tensor& grad_out, const at::Tensor& ccol,
                                    const at::Tensor& row_t, const at::Tensor& perm,
                                    const at::Tensor& values, at::IntArrayRef input_size,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                    at::IntArrayRef padding,
                                    const std::optional<at::Tensor>& grad_input_add) {
  return std::get<0>(conv_backward(grad_out, nullptr, input_size, nullptr, nullptr, &values, &ccol,
                                   &row_t, &perm, kernel_size, stride, padding, grad_input_add));
}

at::Tensor sparse_conv2d_grad_weight(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& crow, const at::Tensor& col,
                                     at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                     at::IntArrayRef padding) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D [batch, channels, height, width], got shape ", x.sizes());
  return std::get<1>(conv_backward(grad_out, &x, {x.size(2), x.size(3)}, &crow, &col, nullptr,
                                   nullptr, nullptr, nullptr, kernel_size, stride, padding));
}

// Both gradients in one pass: dy is packed once per tile for dx and dvalues.
std::tuple<at::Tensor, at::Tensor> sparse_conv2d_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
    const at::Tensor& values, const at::Tensor& ccol, const at::Tensor& row_t, const at::Tensor& perm,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    const std::optional<at::Tensor>& grad_input_add) {
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D [batch, channels, height, width], got shape ", x.sizes());
  return conv_backward(grad_out, &x, {x.size(2), x.size(3)}, &crow, &col, &values, &ccol, &row_t,
                       &perm, kernel_size, stride, padding, grad_input_add);
}

// grad_out of a pooled layer: the gradient of the 2x2 max-pool of the BatchNorm's output (y's
// shape), [B, C, H / 2, W / 2] like pool_indices, max_pool2x2's window positions.
void check_pooled_grad(const at::Tensor& grad_out, const at::Tensor& idx, const at::Tensor& y, bool residual) {
  TORCH_CHECK_VALUE(!residual, "pool_indices and a residual do not combine (a pooled layer has no shortcut)");
  check_cpu(grad_out, "grad_out");
  check_cpu(idx, "pool_indices");
  check_dtype(idx, at::kByte, "pool_indices");
  TORCH_CHECK_TYPE(grad_out.scalar_type() == y.scalar_type(), "grad_out must have y's dtype ", y.scalar_type(), ", got ",
                   grad_out.scalar_type());
  TORCH_CHECK_VALUE(y.dim() == 4, "y must be 4-D [batch, channels, height, width] with pool_indices, got shape ", y.sizes());
  const std::vector<int64_t> want = {y.size(0), y.size(1), y.size(2) / 2, y.size(3) / 2};
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(want), "grad_out must have the shape of y ", y.sizes(),
                    " pooled 2x2, ", at::IntArrayRef(want), ", with pool_indices, got ", grad_out.sizes());
  TORCH_CHECK_VALUE(idx.sizes() == grad_out.sizes(), "pool_indices must have grad_out's shape ", grad_out.sizes(), ", got ",
                    idx.sizes());
}

// The backward of sparse conv -> BatchNorm (-> + residual) (-> ReLU) in one op (engine/fused.py):
// the BatchNorm's first pass (per-channel sums of the masked gradient) over grad_out, y and the
// residual (writing the residual's gradient on maps of >= 64 pixels), then the conv's backward, whose phase kernel computes the BatchNorm's input gradient
// dy per plane while it packs its dy tiles: dy is never written out (bn_act_backward + the conv
// backward wrote it and read it back). Returns (dx or empty, dvalues or empty, the BatchNorm's
// dweight and dbias [C] f64, the residual's gradient or empty, sum dy [C] f64 for a conv bias, or
// empty without grad_bias: then dy is computed only for the channels some nonzero reads, unless the
// residual's gradient is still to be written from every plane (maps under 64 pixels); at 99.9% a
// 64-channel layer has ~28 such rows).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_conv2d_bn_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
    const at::Tensor& values, const at::Tensor& ccol, const at::Tensor& row_t, const at::Tensor& perm,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
    const std::optional<at::Tensor>& grad_input_add, const at::Tensor& y, const std::optional<at::Tensor>& residual,
    const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& invstd, bool batch_stats, bool relu_after, bool relu_before, bool grad_residual,
    bool grad_input, bool grad_values, const std::optional<at::Tensor>& in_mean,
    const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_shift, bool in_relu, bool grad_bias,
    bool in_sums, const std::optional<at::Tensor>& sums, const std::optional<at::Tensor>& pool_indices) {
  check_conv_args(kernel_size, stride, padding);  // (also where no conv gradient is wanted)
  check_bn_grad(pool_indices ? y : grad_out, y, residual, scale, shift, weight, mean, invstd);
  if (pool_indices) check_pooled_grad(grad_out, *pool_indices, y, residual.has_value());
  TORCH_CHECK_VALUE(!(relu_before && residual), "relu_before and a residual do not combine (conv -> ReLU -> BN -> + residual)");
  TORCH_CHECK_VALUE(!grad_residual || (residual && relu_after), "grad_residual needs a residual and relu_after (without "
                    "the ReLU after, the residual's gradient is grad_out itself)");
  TORCH_CHECK_VALUE(x.dim() == 4, "x must be 4-D [batch, channels, height, width], got shape ", x.sizes());
  std::optional<XActArgs> ia = check_in_act(in_mean, in_scale, in_shift, in_relu, x, x.size(1));
  const int64_t C = y.size(1);
  TORCH_CHECK_VALUE(!in_sums || ia, "in_sums needs in_mean, in_scale and in_shift (the deferred BatchNorm whose sums "
                    "it asks for)");
  if (sums) {
    check_cpu(*sums, "sums");
    TORCH_CHECK_TYPE(sums->scalar_type() == at::kDouble, "sums must be float64 [", C, ", 2] (per channel sum g, "
                     "sum g (y - mean)), got ", sums->scalar_type(), " ", sums->sizes());
    TORCH_CHECK_VALUE(sums->sizes() == at::IntArrayRef({C, 2}),
                      "sums must be float64 [", C, ", 2] (per channel sum g, sum g (y - mean)), got ",
                      sums->scalar_type(), " ", sums->sizes());
  }
  const at::Tensor given = sums ? sums->contiguous() : at::Tensor();
  const at::Tensor yc = y.contiguous(), sc = scale.contiguous(), sh = shift.contiguous();
  // A pooled layer (engine/fused.py's `pool`): grad_out is the gradient of the BN output's 2x2
  // max-pool. On maps of >= 256 pixels both passes unpool it plane by plane into L1 as they read it
  // (the input gradient, 4x grad_out's size and three quarters zeros, is never written); else, and
  // for the BN-only path (which writes dy whole anyway), it is written out first (max_pool2x2_backward).
  // VGG-like's fused step at 99%, in-process A/B: 32x32 layer 5.6 -> 4.0 ms, 16x16 3.4 -> 2.8 ms, but
  // 8x8 2.4 -> 3.7 ms (two unpools of 64-pixel planes, one per pass, cost more than the pass over the
  // written gradient).
  const bool pooled = pool_indices && (grad_input || grad_values) && y.dim() == 4 && y.size(2) * y.size(3) >= 256;
  const at::Tensor pidx = pooled ? pool_indices->contiguous() : at::Tensor();
  const at::Tensor go = pool_indices && !pooled ? max_pool2x2_backward(grad_out, *pool_indices, {y.size(2), y.size(3)}, "pool_indices")
                                                : grad_out.contiguous();
  std::atomic<bool> bad_idx{false};  // (the first pass reads every plane: it checks the positions)
  const Unpool up{pooled ? pidx.data_ptr<uint8_t>() : nullptr, pooled ? y.size(2) : 0, pooled ? y.size(3) : 0,
                  &bad_idx};
  const at::Tensor mc = mean.contiguous(), wc = weight.contiguous(), ic = invstd.contiguous();
  const at::Tensor rc = residual ? residual->contiguous() : at::Tensor();
  const at::Tensor* rp = residual ? &rc : nullptr;
  at::Tensor dw = at::zeros({C}, y.options().dtype(at::kDouble)), db = at::zeros({C}, dw.options());
  at::Tensor dsum = grad_bias ? at::zeros({C}, dw.options()) : at::empty({0}, dw.options());
  at::Tensor gres = grad_residual ? pooled_empty(yc.sizes(), yc.options()) : at::empty({0}, y.options());
  at::Tensor dx = at::empty({0}, x.options()), dv = at::empty({0}, values.options());
  at::Tensor xsums = at::empty({0}, dw.options());
  if (y.numel() == 0 && !grad_input && !grad_values) return {dx, dv, dw, db, gres, dsum, xsums};
  // A block's last conv (residual, ReLU after, the residual's gradient wanted): the first pass
  // writes g masked by the ReLU (that gradient) as it sums it, and the conv backward then reads it
  // in place of grad_out and the residual (one activation-sized read less; dy only for the channels
  // some nonzero reads). ResNet-18's fused step 217.6 -> 213.3 ms at 99%, 152.6 -> 147.4 ms at 99.9%
  // (AVX-512 Xeon, in-process interleaved A/B, 12 rounds).
  const bool gm_first = grad_residual && y.numel() && yc.dim() == 4 && yc.size(2) * yc.size(3) >= kRowPlane;
  const std::vector<double> k = y.numel() ? bn_grad_coefficients(go, yc, rp, sc, sh, wc, mc, ic, batch_stats,
                                                                 relu_after, dw.data_ptr<double>(),
                                                                 db.data_ptr<double>(), gm_first ? &gres : nullptr,
                                                                 sums && !gm_first ? given.data_ptr<double>() : nullptr,
                                                                 pooled ? &up : nullptr)
                                          : std::vector<double>(size_t(C) * 3, 0.0);
  if (pooled && sums && !gm_first)  // (given sums: no first pass read the planes; a pass over the bytes)
    at::parallel_for(0, pidx.numel(), 1 << 16, [&](int64_t b, int64_t e) {
      if (!window_positions(pidx.data_ptr<uint8_t>() + b, e - b)) bad_idx = true;
    });
  TORCH_CHECK_VALUE(!bad_idx.load(), "pool_indices must hold max_pool2x2's window positions (0 to 3), got a larger value");
  const at::Tensor& g = gm_first ? gres : go;
  const BnArgs bn{&yc, gm_first ? nullptr : rp, &sc, &sh, &mc, &k, relu_after && !gm_first, relu_before,
                  grad_residual && !gm_first ? &gres : nullptr, grad_bias ? dsum.data_ptr<double>() : nullptr,
                  pooled ? &pidx : nullptr};
  if (!grad_input && !grad_values) {  // the BatchNorm's gradients only
    at::Tensor dy = pooled_empty(yc.sizes(), yc.options());
    bn_grad_input(g, yc, bn.res, sc, sh, mc, k, bn.relu_after, relu_before, dy, bn.gout, bn.dsum);
    return {dx, dv, dw, db, gres, dsum, xsums};
  }
  std::vector<double> xs;
  auto [gx, gv] = conv_backward(g, &x, {x.size(2), x.size(3)}, grad_values ? &crow : nullptr,
                                grad_values ? &col : nullptr, &values, grad_input ? &ccol : nullptr,
                                grad_input ? &row_t : nullptr, grad_input ? &perm : nullptr, kernel_size, stride,
                                padding, grad_input_add, &bn, ia, in_sums ? &xs : nullptr, {&crow, &col});
  if (in_sums && grad_input) {  // the deferred BatchNorm's sums: from the kernel, or a pass over dx here
    if (xs.empty()) xs = bn_sums(gx, x.contiguous(), nullptr, ia->scale, ia->shift, ia->mean, ia->relu);
    xsums = at::empty({x.size(1), 2}, dw.options());
    std::copy(xs.begin(), xs.end(), xsums.data_ptr<double>());
  }
  return {grad_input ? gx : dx, grad_values ? gv : dv, dw, db, gres, dsum, xsums};
}

int64_t sparse_conv2d_small_tile(at::IntArrayRef input_size, int64_t out_channels,
                                 at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::ScalarType dtype) {
  const ConvArgs a = check_conv_args(kernel_size, stride, padding);
  TORCH_CHECK_VALUE(input_size.size() == 4, "input_size must be [batch, channels, height, width], got ",
                    input_size);
  TORCH_CHECK_VALUE(input_size[0] >= 0 && input_size[1] >= 0, "input_size's batch and channels must be >= 0, got ",
                    input_size);  // (the spatial size: make_plan)
  TORCH_CHECK_VALUE(out_channels >= 0, "out_channels must be >= 0, got ", out_channels);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, "dtype must be float32 or float64, got ", dtype);
  const size_t elem = c10::elementSize(dtype);
  const Plan P = make_plan(input_size[0], input_size[1], input_size[2], input_size[3], out_channels,
                           a.k, a.s, a.p, elem, 0, /*offsets=*/false);  // the geometry only
  return pointwise_conv_rows(P, elem) ? -1 : small_conv_tile(P, elem);  // (the strided 1x1 kernel first)
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsetrain, CompositeImplicitAutograd, m) {
  m.impl("sparse_conv2d_small_tile", &sparse_conv2d_small_tile);
}

TORCH_LIBRARY_IMPL(sparsetrain, CPU, m) {
  m.impl("sparse_conv2d", &sparse_conv2d);
  m.impl("sparse_conv2d_stats", &sparse_conv2d_stats);
  m.impl("sparse_conv2d_grad_input", &sparse_conv2d_grad_input);
  m.impl("sparse_conv2d_grad_weight", &sparse_conv2d_grad_weight);
  m.impl("sparse_conv2d_backward", &sparse_conv2d_backward);
  m.impl("sparse_conv2d_bn_backward", &sparse_conv2d_bn_backward);
}

}  // namespace sparsetrain
