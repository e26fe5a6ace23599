// The typed C++ wrappers of csrc/include/mixprec/ops.h: each looks its op up once in the dispatcher
// and calls it, so C++ and Python callers share one routing.
#include "mixprec/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>

#ifndef MIXPREC_VERSION
#error "MIXPREC_VERSION must be defined by the build"
#endif

namespace mixprec {

const char* version() { return MIXPREC_VERSION; }

bool built_with_cuda() {
#ifdef MIXPREC_WITH_CUDA
  return true;
#else
  return false;
#endif
}

namespace ops {
namespace {
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}
}  // namespace

void unscale_and_check_(at::TensorList grads, const at::Tensor& found_inf, const at::Tensor& inv_scale,
                        const std::optional<at::Tensor>& amax) {
  static const auto op =
      find_op<void(at::TensorList, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>(
          "mixprec::unscale_and_check_");
  op.call(grads, found_inf, inv_scale, amax);
}

at::Tensor unscale_and_check_sumsq_(at::TensorList grads, const at::Tensor& found_inf, const at::Tensor& inv_scale,
                                    const std::optional<at::Tensor>& amax) {
  static const auto op =
      find_op<at::Tensor(at::TensorList, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>(
          "mixprec::unscale_and_check_sumsq_");
  return op.call(grads, found_inf, inv_scale, amax);
}

at::Tensor grad_stats(at::TensorList grads, const at::Tensor& scale, int64_t min_exponent, int64_t num_bins) {
  static const auto op =
      find_op<at::Tensor(at::TensorList, const at::Tensor&, int64_t, int64_t)>("mixprec::grad_stats");
  return op.call(grads, scale, min_exponent, num_bins);
}

void record_overflow_(const at::Tensor& record, const at::Tensor& amax, const at::Tensor& found_inf,
                      const at::Tensor& scale, int64_t step, int64_t checked, const std::optional<at::Tensor>& count) {
  static const auto op =
      find_op<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                   const std::optional<at::Tensor>&)>("mixprec::record_overflow_");
  op.call(record, amax, found_inf, scale, step, checked, count);
}

void update_scale_(const at::Tensor& scale, const at::Tensor& growth_tracker,
                   const at::Tensor& hysteresis_tracker, const at::Tensor& found_inf, double growth_factor,
                   double backoff_factor, int64_t growth_interval, int64_t hysteresis, double min_scale,
                   std::optional<double> max_scale, bool consecutive_hysteresis) {
  static const auto op =
      find_op<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                   int64_t, int64_t, double, std::optional<double>, bool)>("mixprec::update_scale_");
  op.call(scale, growth_tracker, hysteresis_tracker, found_inf, growth_factor, backoff_factor, growth_interval,
          hysteresis, min_scale, max_scale, consecutive_hysteresis);
}

at::Tensor cast(const at::Tensor& src, at::ScalarType dtype, std::string_view rounding, bool saturate,
                std::optional<int64_t> seed) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, at::ScalarType, c10::string_view, bool, std::optional<int64_t>)>(
          "mixprec::cast");
  return op.call(src, dtype, c10::string_view(rounding.data(), rounding.size()), saturate, seed);
}

void cast_(at::TensorList dst, at::TensorList src, std::string_view rounding, bool saturate,
           std::optional<int64_t> seed) {
  static const auto op =
      find_op<void(at::TensorList, at::TensorList, c10::string_view, bool, std::optional<int64_t>)>("mixprec::cast_");
  op.call(dst, src, c10::string_view(rounding.data(), rounding.size()), saturate, seed);
}

std::tuple<at::Tensor, at::Tensor> split_bf16_remainder(const at::Tensor& src) {
  static const auto op =
      find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>("mixprec::split_bf16_remainder");
  return op.call(src);
}

at::Tensor merge_bf16_remainder(const at::Tensor& bf16, const at::Tensor& remainder) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("mixprec::merge_bf16_remainder");
  return op.call(bf16, remainder);
}

void adam_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList masters, at::TensorList steps, double lr, double beta1, double beta2, double eps,
                double weight_decay, bool decoupled_weight_decay, bool maximize, std::string_view master_mode,
                std::string_view rounding, std::optional<int64_t> seed, const AdamStepExtras& extras) {
  using Opt = const std::optional<at::Tensor>&;
  static const auto op =
      find_op<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                   double, double, double, double, double, bool, bool, c10::string_view, c10::string_view,
                   std::optional<int64_t>, Opt, Opt, Opt, Opt, std::optional<at::TensorList>)>("mixprec::adam_step_");
  std::optional<at::TensorList> vmax;
  if (extras.max_exp_avg_sqs.has_value()) vmax = at::TensorList(*extras.max_exp_avg_sqs);
  op.call(params, grads, exp_avgs, exp_avg_sqs, masters, steps, lr, beta1, beta2, eps, weight_decay,
          decoupled_weight_decay, maximize, c10::string_view(master_mode.data(), master_mode.size()),
          c10::string_view(rounding.data(), rounding.size()), seed, extras.lr_tensor, extras.grad_scale,
          extras.found_inf, extras.clip_coef, vmax);
}

void linear_wgrad_accum_(const at::Tensor& main_grad, const at::Tensor& grad_output, const at::Tensor& input) {
  static const auto op = find_op<void(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "mixprec::linear_wgrad_accum_");
  op.call(main_grad, grad_output, input);
}

at::Tensor linear_wgrad(const at::Tensor& grad_output, const at::Tensor& input) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("mixprec::linear_wgrad");
  return op.call(grad_output, input);
}

}  // namespace ops
}  // namespace mixprec
