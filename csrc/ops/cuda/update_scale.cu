// update_scale_ on CUDA: the shared rule of update_scale_rule.h in a one-thread kernel, so the scale
// never leaves the device and a training step needs no host synchronisation.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "ops/checks.h"
#include "ops/cuda/ops.h"
#include "ops/update_scale_rule.h"

namespace mixprec::cuda {
namespace {

__global__ void update_scale_kernel(float* scale, int32_t* growth_tracker, int32_t* hysteresis_tracker,
                                    const float* found_inf, const detail::UpdateScaleParams params) {
  detail::update_scale_rule(scale, growth_tracker, hysteresis_tracker, *found_inf, params);
}

}  // namespace

void update_scale_cuda(const at::Tensor& scale, const at::Tensor& growth_tracker, const at::Tensor& hysteresis_tracker,
                       const at::Tensor& found_inf, double growth_factor, double backoff_factor,
                       int64_t growth_interval, int64_t hysteresis, double min_scale, std::optional<double> max_scale,
                       bool consecutive_hysteresis) {
  detail::check_update_scale_args(scale, growth_tracker, hysteresis_tracker, found_inf, growth_factor, backoff_factor,
                                  growth_interval, hysteresis, min_scale, max_scale);
  const c10::cuda::CUDAGuard guard(scale.device());
  const detail::UpdateScaleParams params{growth_factor,
                                         backoff_factor,
                                         growth_interval,
                                         static_cast<int32_t>(hysteresis),
                                         min_scale,
                                         max_scale.value_or(std::numeric_limits<double>::infinity()),
                                         consecutive_hysteresis};
  update_scale_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(
      scale.data_ptr<float>(), growth_tracker.data_ptr<int32_t>(), hysteresis_tracker.data_ptr<int32_t>(),
      found_inf.const_data_ptr<float>(), params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mixprec::cuda
