// Pruning ops: exact global magnitude selection over many tensors (radix select on the IEEE bit
// pattern of |w|, no concatenated copy, no sort) and re-packing a CSR after a threshold.
//
// Order used everywhere (deterministic tie-breaking): surviving entries sorted by (|w|, tensor
// position in the list, flat index). Pruning a fraction f removes the first k = floor(f * n) of
// them: every |w| < threshold, plus the first `ties` entries with |w| == threshold.
#include "common.h"

#include <cmath>
#include <cstring>

namespace sparsetrain {
namespace {

// |w| as an order-preserving unsigned key: for non-negative IEEE floats, bit order == value order.
template <typename T>
inline uint64_t mag_key(T v);
template <>
inline uint64_t mag_key<float>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u & 0x7fffffffu;
}
template <>
inline uint64_t mag_key<double>(double v) {
  uint64_t u;
  std::memcpy(&u, &v, 8);
  return u & 0x7fffffffffffffffull;
}

template <typename T>
double key_value(uint64_t key) {
  if constexpr (sizeof(T) == 4) {
    uint32_t u = uint32_t(key);
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else {
    double d;
    std::memcpy(&d, &key, 8);
    return d;
  }
}

constexpr int kBits = 16;
constexpr int64_t kBins = int64_t(1) << kBits;

template <typename T>
std::tuple<at::Tensor, at::Tensor> threshold_impl(const std::vector<at::Tensor>& ts,
                                                  const std::vector<at::Tensor>& ms,
                                                  double fraction) {
  // n = surviving entries
  int64_t n = 0;
  for (size_t i = 0; i < ts.size(); ++i)
    n += ms[i].defined() ? ms[i].sum().item<int64_t>() : ts[i].numel();
  // floor(fraction * n), never all of n below a fraction of 1 (the allowance pushed 1 - 1e-13 there)
  const int64_t k = std::min<int64_t>(fraction < 1.0 ? std::max<int64_t>(n - 1, 0) : n,
                                      int64_t(std::floor(fraction * double(n) * (1 + 1e-12))));
  auto thr = at::zeros({}, at::kDouble);
  auto ties = at::zeros({}, at::kLong);
  if (k <= 0) return {thr, ties};

  const int nthreads = at::get_num_threads();
  std::vector<int64_t> hist(size_t(nthreads) * kBins);
  uint64_t prefix = 0, pmask = 0;
  int64_t rank = k;  // 1-based rank of the threshold entry among those matching the prefix
  for (int shift = int(sizeof(T) * 8) - kBits; shift >= 0; shift -= kBits) {
    std::fill(hist.begin(), hist.end(), 0);
    for (size_t i = 0; i < ts.size(); ++i) {
      const T* w = ts[i].data_ptr<T>();
      const bool* m = ms[i].defined() ? ms[i].data_ptr<bool>() : nullptr;
      at::parallel_for(0, ts[i].numel(), 1 << 14, [&](int64_t b, int64_t e) {
        int64_t* h = hist.data() + size_t(at::get_thread_num()) * kBins;
        for (int64_t j = b; j < e; ++j) {
          if (m && !m[j]) continue;
          const uint64_t key = mag_key<T>(w[j]);
          if ((key & pmask) == prefix) ++h[(key >> shift) & (kBins - 1)];
        }
      });
    }
    int64_t cum = 0, bin = 0;
    for (; bin < kBins; ++bin) {
      int64_t c = 0;
      for (int th = 0; th < nthreads; ++th) c += hist[size_t(th) * kBins + bin];
      if (cum + c >= rank) break;
      cum += c;
    }
    TORCH_CHECK(bin < kBins, "magnitude_threshold: internal error (rank not found)");
    rank -= cum;
    prefix |= uint64_t(bin) << shift;
    pmask |= uint64_t(kBins - 1) << shift;
  }
  thr.fill_(key_value<T>(prefix));
  ties.fill_(rank);
  return {thr, ties};
}

std::tuple<at::Tensor, at::Tensor> magnitude_threshold(const at::TensorList tensors,
                                                       const c10::List<std::optional<at::Tensor>>& masks,
                                                       double fraction) {
  TORCH_CHECK_VALUE(std::isfinite(fraction) && fraction >= 0.0 && fraction <= 1.0,
                    "fraction must be in [0, 1], got ", fraction);
  TORCH_CHECK_VALUE(masks.size() == 0 || masks.size() == tensors.size(), "masks must be empty or have one entry per tensor (",
                    tensors.size(), "), got ", masks.size());
  if (tensors.empty()) return {at::zeros({}, at::kDouble), at::zeros({}, at::kLong)};
  const auto dt = tensors[0].scalar_type();
  std::vector<at::Tensor> ts, ms;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    check_cpu(t, "tensors");
    check_float(t, "tensors");
    TORCH_CHECK_TYPE(t.scalar_type() == dt, "tensors must all have one dtype, got ", dt, " and ",
                     t.scalar_type(), " (entry ", i, ")");
    ts.push_back(t.contiguous());
    at::Tensor m;
    if (masks.size() > 0) {
      std::optional<at::Tensor> mo = masks.get(i);
      if (mo.has_value()) {
        m = *mo;
        check_cpu(m, "masks");
        check_dtype(m, at::kBool, "masks");
        TORCH_CHECK_VALUE(m.sizes() == t.sizes(), "masks[", i, "] must have the shape of tensors[", i,
                          "] ", t.sizes(), ", got ", m.sizes());
        m = m.contiguous();
      }
    }
    ms.push_back(m);
  }
  if (dt == at::kFloat) return threshold_impl<float>(ts, ms, fraction);
  return threshold_impl<double>(ts, ms, fraction);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> csr_prune(
    const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values, double threshold,
    int64_t max_ties) {
  TORCH_CHECK_VALUE(!std::isnan(threshold), "threshold must not be NaN");
  TORCH_CHECK_VALUE(max_ties >= 0, "max_ties must be >= 0, got ", max_ties);
  const int64_t rows = crow.numel() - 1;
  check_compressed(crow, col, std::numeric_limits<int32_t>::max(), "crow_indices", "col_indices");
  check_cpu(values, "values");
  check_float(values, "values");
  check_1d_contig(values, "values");
  TORCH_CHECK_VALUE(values.numel() == col.numel(), "values must have nnz = ", col.numel(),
                    " entries, got ", values.numel());
  const int64_t nnz = col.numel();
  const int64_t* p = crow.data_ptr<int64_t>();
  std::vector<int64_t> keep;
  keep.reserve(nnz);
  at::Tensor new_crow = at::empty({rows + 1}, crow.options());
  int64_t* np = new_crow.data_ptr<int64_t>();
  int64_t ties = 0;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "csr_prune", [&] {
    const scalar_t* v = values.data_ptr<scalar_t>();
    np[0] = 0;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = p[r]; j < p[r + 1]; ++j) {
        const double a = std::abs(double(v[j]));
        bool drop = a < threshold;
        if (a == threshold && ties < max_ties) {
          drop = true;
          ++ties;
        }
        if (!drop) keep.push_back(j);  // NaN compares false: kept (never silently pruned)
      }
      np[r + 1] = int64_t(keep.size());
    }
  });
  at::Tensor keep_t = at::empty({int64_t(keep.size())}, crow.options());
  std::copy(keep.begin(), keep.end(), keep_t.data_ptr<int64_t>());
  return {new_crow, col.index_select(0, keep_t), values.index_select(0, keep_t), keep_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsetrain, CPU, m) {
  m.impl("magnitude_threshold", &magnitude_threshold);
  m.impl("csr_prune", &csr_prune);
}

}  // namespace sparsetrain
