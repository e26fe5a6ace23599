// update_scale_ on the CPU: the shared rule of update_scale_rule.h applied to the tensors' memory.
#include <torch/library.h>

#include <optional>

#include "ops/checks.h"
#include "ops/update_scale_rule.h"

namespace mixprec::cpu {
namespace {

void update_scale_cpu(const at::Tensor& scale, const at::Tensor& growth_tracker, const at::Tensor& hysteresis_tracker,
                      const at::Tensor& found_inf, double growth_factor, double backoff_factor,
                      int64_t growth_interval, int64_t hysteresis, double min_scale, std::optional<double> max_scale,
                      bool consecutive_hysteresis) {
  const detail::UpdateScaleParams params = detail::check_update_scale_args(
      scale, growth_tracker, hysteresis_tracker, found_inf, growth_factor, backoff_factor, growth_interval, hysteresis,
      min_scale, max_scale, consecutive_hysteresis);
  detail::update_scale_rule(scale.data_ptr<float>(), growth_tracker.data_ptr<int32_t>(),
                            hysteresis_tracker.data_ptr<int32_t>(), *found_inf.const_data_ptr<float>(), params);
}

void record_overflow_cpu(const at::Tensor& record, const at::Tensor& amax, const at::Tensor& found_inf,
                         const at::Tensor& scale, int64_t step, int64_t checked, const std::optional<at::Tensor>& count) {
  detail::check_record_overflow_args(record, amax, found_inf, scale, step, checked, count);
  const float found = *found_inf.const_data_ptr<float>();
  double* rec = record.data_ptr<double>();
  detail::record_overflow_head(rec, found, *scale.const_data_ptr<float>(), step, checked,
                               count.has_value() && count->defined() ? count->data_ptr<int64_t>() : nullptr);
  float* a = amax.data_ptr<float>();
  const int64_t n = amax.numel();
  if (found != 0.0f) {
    for (int64_t i = 0; i < n; ++i) rec[3 + i] = static_cast<double>(a[i]);
  }
  std::fill(a, a + n, 0.0f);  // ready for the next step's unscale pass
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("update_scale_", &update_scale_cpu);
  m.impl("record_overflow_", &record_overflow_cpu);
}

}  // namespace mixprec::cpu
