// update_scale_ on CUDA: the shared rule of update_scale_rule.h in a one-thread kernel, so the scale
// never leaves the device and a training step needs no host synchronisation.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "ops/checks.h"
#include "ops/cuda/ops.h"
#include "ops/update_scale_rule.h"

namespace mixprec::cuda {
namespace {

__global__ void update_scale_kernel(float* scale, int32_t* growth_tracker, int32_t* hysteresis_tracker,
                                    const float* found_inf, const detail::UpdateScaleParams params) {
  detail::update_scale_rule(scale, growth_tracker, hysteresis_tracker, *found_inf, params);
}

// One thread writes the head; every thread copies (on an overflow) and zeroes a stride of amax.
__global__ void record_overflow_kernel(double* record, float* amax, int64_t n, const float* found_inf,
                                       const float* scale, int64_t step, int64_t checked, int64_t* count) {
  const float found = *found_inf;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    detail::record_overflow_head(record, found, *scale, step, checked, count);
  }
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (found != 0.0f) record[3 + i] = static_cast<double>(amax[i]);
    amax[i] = 0.0f;
  }
}

}  // namespace

void record_overflow_cuda(const at::Tensor& record, const at::Tensor& amax, const at::Tensor& found_inf,
                          const at::Tensor& scale, int64_t step, int64_t checked,
                          const std::optional<at::Tensor>& count) {
  detail::check_record_overflow_args(record, amax, found_inf, scale, step, checked, count);
  const c10::cuda::CUDAGuard guard(amax.device());
  constexpr int kThreads = 256;
  const int64_t n = amax.numel();
  const auto blocks = static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 1024));
  record_overflow_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      record.data_ptr<double>(), amax.data_ptr<float>(), n, found_inf.const_data_ptr<float>(),
      scale.const_data_ptr<float>(), step, checked,
      count.has_value() && count->defined() ? count->data_ptr<int64_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void update_scale_cuda(const at::Tensor& scale, const at::Tensor& growth_tracker, const at::Tensor& hysteresis_tracker,
                       const at::Tensor& found_inf, double growth_factor, double backoff_factor,
                       int64_t growth_interval, int64_t hysteresis, double min_scale, std::optional<double> max_scale,
                       bool consecutive_hysteresis) {
  const detail::UpdateScaleParams params = detail::check_update_scale_args(
      scale, growth_tracker, hysteresis_tracker, found_inf, growth_factor, backoff_factor, growth_interval, hysteresis,
      min_scale, max_scale, consecutive_hysteresis);
  const c10::cuda::CUDAGuard guard(scale.device());
  update_scale_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(
      scale.data_ptr<float>(), growth_tracker.data_ptr<int32_t>(), hysteresis_tracker.data_ptr<int32_t>(),
      found_inf.const_data_ptr<float>(), params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mixprec::cuda
