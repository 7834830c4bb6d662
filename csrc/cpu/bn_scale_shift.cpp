// A fused BatchNorm's per-channel constants from the sums its conv's epilogue took
// (sparse_conv2d_stats: stats [2, C] f64 = sum y, sum (y - mean)^2 over N = batch * height * width values):
//   batch statistics:  mean = sum y / N,  var = max(sum (y - mean)^2 / N, 0),  invstd = 1 / sqrt(var + eps)
//   running statistics (eval): mean = running_mean, invstd = 1 / sqrt(running_var + eps)
//   scale = weight * invstd,  shift = bias   (weight 1, bias 0 without affine)
// for the centred map (y - mean) * scale + shift the kernels apply (bn_act.h's bn_pre: exact where
// y == mean, which y * scale + (bias - mean * scale) is not)
// and, with batch statistics and running buffers given, nn.BatchNorm2d's update of them:
//   num_batches_tracked += 1;  m = momentum, or 1 / num_batches_tracked when momentum is None
//   running_mean = (1 - m) running_mean + m mean;  running_var = (1 - m) running_var + m var N / (N - 1)
// One call instead of ~20 small ATen ops per layer and step (~85 us each on a VGG-like step).
// Returns (mean f64, invstd f64, weight f64, scale, shift in `dtype`).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

namespace sparsetrain {
namespace {

void check_channel_vector(const std::optional<at::Tensor>& t, const char* name, int64_t C) {
  if (!t) return;
  TORCH_CHECK_TYPE(t->is_floating_point(), name, " must be a 1-D floating CPU tensor of ", C, " channels, got ",
                   t->sizes(), " ", t->scalar_type());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C && t->device().is_cpu(), name,
                    " must be a 1-D floating CPU tensor of ", C, " channels, got ", t->sizes(), " ", t->scalar_type());
}

at::Tensor as_f64(const std::optional<at::Tensor>& t, int64_t C, double fill) {
  // (a copy always: weight comes back as an output, which the schema says aliases no input)
  return t ? t->detach().to(at::kDouble, false, /*copy=*/true).contiguous()
           : at::full({C}, fill, at::TensorOptions(at::kDouble));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_scale_shift(
    const at::Tensor& stats, int64_t count, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& num_batches_tracked,
    std::optional<double> momentum, double eps, bool batch_stats, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(stats.scalar_type() == at::kDouble, "stats must be a float64 CPU tensor [2, C] (sum y, sum y^2), got ",
                   stats.sizes(), " ", stats.scalar_type());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == 2 && stats.device().is_cpu(),
                    "stats must be a float64 CPU tensor [2, C] (sum y, sum y^2), got ", stats.sizes(), " ",
                    stats.scalar_type());
  const int64_t C = stats.size(1);
  check_channel_vector(weight, "weight", C);
  check_channel_vector(bias, "bias", C);
  check_channel_vector(running_mean, "running_mean", C);
  check_channel_vector(running_var, "running_var", C);
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "running_mean and running_var must be given together");
  TORCH_CHECK_VALUE(batch_stats || running_mean.has_value(), "running_mean and running_var are needed without batch_stats");
  TORCH_CHECK_VALUE(eps >= 0, "eps must be >= 0, got ", eps);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble, "dtype must be float32 or float64, got ", dtype);
  const bool update = batch_stats && running_mean.has_value();
  TORCH_CHECK_VALUE(!batch_stats || count >= (update ? 2 : 1), "count must be >= ", update ? 2 : 1,
                    " values per channel with batch statistics", update ? " and a running update" : "", ", got ",
                    count);
  if (update) {
    TORCH_CHECK_VALUE(running_mean->is_contiguous() && running_var->is_contiguous(),
                      "running_mean and running_var must be contiguous");
    TORCH_CHECK_VALUE(momentum.has_value() || num_batches_tracked.has_value(),
                      "num_batches_tracked is needed when momentum is None (the cumulative average)");
    // (every check before the first write: a refused call leaves the buffers as they were)
    const at::ScalarType rt = running_mean->scalar_type();
    TORCH_CHECK_TYPE((rt == at::kFloat || rt == at::kDouble) && running_var->scalar_type() == rt,
                     "running_mean and running_var must both be float32 or both float64, got ", rt, " and ",
                     running_var->scalar_type());
    TORCH_CHECK_TYPE(!num_batches_tracked || num_batches_tracked->scalar_type() == at::kLong,
                     "num_batches_tracked must be a one-element int64 CPU tensor (nn.BatchNorm2d's), got ",
                     num_batches_tracked ? num_batches_tracked->scalar_type() : at::kLong);
    TORCH_CHECK_VALUE(!num_batches_tracked || (num_batches_tracked->numel() == 1 && num_batches_tracked->device().is_cpu()),
                      "num_batches_tracked must be a one-element int64 CPU tensor (nn.BatchNorm2d's), got shape ",
                      num_batches_tracked ? num_batches_tracked->sizes() : at::IntArrayRef(), " ",
                      num_batches_tracked ? num_batches_tracked->scalar_type() : at::kLong);
    TORCH_CHECK_VALUE(!running_mean->is_same(*running_var) && running_mean->data_ptr() != running_var->data_ptr(),
                      "running_mean and running_var must be two tensors, got the same one twice");
    const at::MemOverlapStatus overlap = at::get_overlap_status(*running_mean, *running_var);
    TORCH_CHECK_VALUE(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial,
                      "running_mean and running_var must not share memory (views of one buffer would overwrite "
                      "each other), got overlapping tensors");
  }
  const auto f64 = at::TensorOptions(at::kDouble);
  at::Tensor mean = at::empty({C}, f64), invstd = at::empty({C}, f64);
  at::Tensor w = as_f64(weight, C, 1.0), b = as_f64(bias, C, 0.0);
  at::Tensor scale = at::empty({C}, f64), shift = at::empty({C}, f64);
  double* mp = mean.data_ptr<double>();
  double* ip = invstd.data_ptr<double>();
  const double *wp = w.data_ptr<double>(), *bp = b.data_ptr<double>();
  double *sp = scale.data_ptr<double>(), *hp = shift.data_ptr<double>();
  std::vector<double> var(batch_stats ? C : 0);
  if (batch_stats) {
    const at::Tensor s = stats.contiguous();
    const double* s0 = s.data_ptr<double>();
    const double n = double(count);
    for (int64_t c = 0; c < C; ++c) {
      mp[c] = s0[c] / n;
      var[c] = std::max(s0[C + c] / n, 0.0);
      ip[c] = 1.0 / std::sqrt(var[c] + eps);
    }
  } else {
    const at::Tensor rm = running_mean->to(at::kDouble).contiguous(), rv = running_var->to(at::kDouble).contiguous();
    for (int64_t c = 0; c < C; ++c) {
      mp[c] = rm.data_ptr<double>()[c];
      ip[c] = 1.0 / std::sqrt(rv.data_ptr<double>()[c] + eps);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    sp[c] = wp[c] * ip[c];
    hp[c] = bp[c];
  }
  if (update) {
    double m = momentum.value_or(0.0);
    if (num_batches_tracked) {
      num_batches_tracked->add_(1);
      if (!momentum) m = 1.0 / num_batches_tracked->item<double>();
    }
    const double unbias = double(count) / double(count - 1);
    AT_DISPATCH_FLOATING_TYPES(running_mean->scalar_type(), "bn_scale_shift_update", [&] {
      using T = scalar_t;
      T *rm = running_mean->data_ptr<T>(), *rv = running_var->data_ptr<T>();
      const T keep = T(1.0 - m), take = T(m);
      for (int64_t c = 0; c < C; ++c) {
        rm[c] = rm[c] * keep + take * T(mp[c]);
        rv[c] = rv[c] * keep + take * T(var[c] * unbias);
      }
    });
  }
  return {mean, invstd, w, scale.to(dtype), shift.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsetrain, CPU, m) { m.impl("bn_scale_shift", &bn_scale_shift); }

}  // namespace sparsetrain
