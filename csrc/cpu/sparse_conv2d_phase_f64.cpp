// SparseConv2d on CPU, the phase-plane kernel in double precision (the gradient checks' dtype): the
// same code as sparse_conv2d_phase.cpp (sparse_conv2d_phase_impl.h), compiled as its own file so the
// float and double instantiations build in parallel.
#include "sparse_conv2d_phase_impl.h"

namespace sparsetrain {
namespace {
ST_DEFINE_TASKS(double)
}  // namespace

template void run_conv<double>(const Plan&, const double*, const double*, const double*,
                               const int64_t*, const int32_t*, const double*, const int64_t*,
                               const int32_t*, const int64_t*, int64_t, double*, double*, double*, bool, double*,
                               const double*, const BnPack<double>*, const XAct<double>*, int64_t*);

}  // namespace sparsetrain
