// Meta kernels of mixprec's kernel ops: what each op returns (shape, dtype, device), computed without data.
// They serve both front doors: a LibTorch program runs the ops on torch::kMeta tensors (deferred
// initialisation, shape inference), and Python's FakeTensor, torch.compile, torch.export and opcheck run
// them as the ops' fake kernels (a FakeTensor presents itself as a meta tensor to a kernel).
//
// Sizes are c10::SymInt throughout (sym_sizes, empty_symint): under torch.compile's dynamic shapes a
// fake tensor's sizes are symbols, and sizes() would throw. The output shapes follow the rules the CPU and
// CUDA kernels allocate by (matrix_extent_of / grid_extent from ops/fp8_plan.h). Checks that need data or
// concrete sizes stay with the real kernels, which run on the real tensors later; the arguments an output's
// dtype or shape comes from (FP8 dtypes, cast and GEMM out dtypes, block sizes, histogram bins, the operands of
// linear_wgrad and merge_bf16_remainder, the GEMM operands' dtype and rank) are checked here by the kernels' own
// checks, so a trace refuses them as the kernels do. One rule the Meta kernels cannot keep under FakeTensorMode:
// there every fake tensor presents itself as a meta tensor, so a mix of fake devices in an in-place op (no output
// for FakeTensor to compare devices on) is refused when the real kernels run, as torch's own in-place ops are.
#include <ATen/ops/empty.h>
#include <c10/core/DeviceType.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "ops/cast_plan.h"
#include "ops/checks.h"
#include "ops/fp8_plan.h"
#include "ops/grad_stats_rule.h"
#include "ops/int8_plan.h"

namespace mixprec::meta {
namespace {

// A meta tensor beside one that holds data (a meta scale with CPU operands) would make outputs of nothing.
// The dispatcher sends such a mix here (Meta outranks every backend), so the device rule of the real
// kernels is enforced here, naming the other devices.
struct Devices {
  bool other = false;
  std::string names;
  void add(const at::Tensor& t) {
    if (!t.defined() || t.is_meta()) return;
    const std::string name = c10::DeviceTypeName(t.device().type(), /*lower_case=*/true);
    if (names.find(name) == std::string::npos) names += (names.empty() ? "" : ", ") + name;
    other = true;
  }
  void add(const std::optional<at::Tensor>& t) {
    if (t) add(*t);
  }
  void add(at::TensorList list) {
    for (const at::Tensor& t : list) add(t);
  }
  void add(const std::optional<at::TensorList>& list) {
    if (list) add(*list);
  }
};

template <typename... Tensors>
void refuse_meta_mix(const char* op, const Tensors&... tensors) {
  Devices devices;
  (devices.add(tensors), ...);
  TORCH_CHECK(!devices.other, op, ": every tensor must be on one device, got meta tensors with ", devices.names,
              " ones (a meta tensor holds no data to compute with)");
}

at::Tensor empty(c10::SymIntArrayRef sizes, const at::Tensor& like, at::ScalarType dtype) {
  return at::empty_symint(sizes, like.options().dtype(dtype));
}

// The [grid_rows, grid_cols] table of per-block scales over input's [rows, cols] matrix view.
std::vector<c10::SymInt> scale_grid(const at::Tensor& input, int64_t block_rows, int64_t block_cols,
                                    const char* op) {
  detail::check_block_sizes(block_rows, block_cols, op);
  const auto [rows, cols] = detail::matrix_extent_of(input.sym_sizes());
  return {detail::grid_extent(rows, block_rows), detail::grid_extent(cols, block_cols)};
}

void unscale_and_check_(at::TensorList grads, const at::Tensor& found_inf, const at::Tensor& inv_scale,
                        const std::optional<at::Tensor>& amax) {
  refuse_meta_mix("mixprec::unscale_and_check_", grads, found_inf, inv_scale, amax);
}

at::Tensor unscale_and_check_sumsq_(at::TensorList grads, const at::Tensor& found_inf, const at::Tensor& inv_scale,
                                    const std::optional<at::Tensor>& amax) {
  refuse_meta_mix("mixprec::unscale_and_check_sumsq_", grads, found_inf, inv_scale, amax);
  return empty({}, found_inf, at::kFloat);
}

at::Tensor grad_stats(at::TensorList grads, const at::Tensor& scale, int64_t min_exponent, int64_t num_bins) {
  refuse_meta_mix("mixprec::grad_stats", grads, scale);
  detail::check_grad_stats_ranges(min_exponent, num_bins);
  const std::vector<c10::SymInt> shape = {c10::SymInt(static_cast<int64_t>(grads.size())),
                                          c10::SymInt(detail::kStatsHistogram + num_bins)};
  return empty(shape, scale, at::kDouble);
}

void record_overflow_(const at::Tensor& record, const at::Tensor& amax, const at::Tensor& found_inf,
                      const at::Tensor& scale, int64_t /*step*/, int64_t /*checked*/,
                      const std::optional<at::Tensor>& count) {
  refuse_meta_mix("mixprec::record_overflow_", record, amax, found_inf, scale, count);
}

void update_scale_(const at::Tensor& scale, const at::Tensor& growth_tracker, const at::Tensor& hysteresis_tracker,
                   const at::Tensor& found_inf, double /*growth_factor*/, double /*backoff_factor*/,
                   int64_t /*growth_interval*/, int64_t /*hysteresis*/, double /*min_scale*/,
                   std::optional<double> /*max_scale*/, bool /*consecutive_hysteresis*/) {
  refuse_meta_mix("mixprec::update_scale_", scale, growth_tracker, hysteresis_tracker, found_inf);
}

at::Tensor cast(const at::Tensor& src, at::ScalarType dtype, c10::string_view /*rounding*/, bool /*saturate*/,
                std::optional<int64_t> /*seed*/) {
  refuse_meta_mix("mixprec::cast", src);
  return detail::empty_cast_output(src, dtype);
}

void cast_(at::TensorList dst, at::TensorList src, c10::string_view /*rounding*/, bool /*saturate*/,
           std::optional<int64_t> /*seed*/) {
  refuse_meta_mix("mixprec::cast_", dst, src);
}

std::tuple<at::Tensor, at::Tensor> split_bf16_remainder(const at::Tensor& src) {
  refuse_meta_mix("mixprec::split_bf16_remainder", src);
  detail::check_split_args(src);
  return {empty(src.sym_sizes(), src, at::kBFloat16), empty(src.sym_sizes(), src, at::kShort)};
}

at::Tensor merge_bf16_remainder(const at::Tensor& bf16, const at::Tensor& remainder) {
  refuse_meta_mix("mixprec::merge_bf16_remainder", bf16, remainder);
  detail::check_merge_args(bf16, remainder);
  return empty(bf16.sym_sizes(), bf16, at::kFloat);
}

void adam_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList masters, at::TensorList steps, double /*lr*/, double /*beta1*/, double /*beta2*/,
                double /*eps*/, double /*weight_decay*/, bool /*decoupled_weight_decay*/, bool /*maximize*/,
                c10::string_view /*master_mode*/, c10::string_view /*rounding*/, std::optional<int64_t> /*seed*/,
                const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                std::optional<at::TensorList> max_exp_avg_sqs) {
  refuse_meta_mix("mixprec::adam_step_", params, grads, exp_avgs, exp_avg_sqs, masters, steps, lr_tensor, grad_scale,
                  found_inf, clip_coef, max_exp_avg_sqs);
}

void linear_wgrad_accum_(const at::Tensor& main_grad, const at::Tensor& grad_output, const at::Tensor& input) {
  refuse_meta_mix("mixprec::linear_wgrad_accum_", main_grad, grad_output, input);
}

at::Tensor linear_wgrad(const at::Tensor& grad_output, const at::Tensor& input) {
  constexpr const char* op = "mixprec::linear_wgrad";
  refuse_meta_mix(op, grad_output, input);
  detail::check_wgrad_operands(op, grad_output, input);
  return empty({grad_output.sym_size(-1), input.sym_size(-1)}, grad_output, at::kFloat);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fp8_quantize(const at::Tensor& input, const at::Tensor& scale,
                                                            at::ScalarType dtype, c10::string_view /*rounding*/,
                                                            bool /*saturate*/, std::optional<int64_t> /*seed*/,
                                                            bool transpose) {
  constexpr const char* op = "mixprec::fp8_quantize";
  refuse_meta_mix(op, input, scale);
  detail::parse_fp8_dtype(dtype, op);
  const auto [rows, cols] = detail::matrix_extent_of(input.sym_sizes());
  at::Tensor data_t = transpose ? empty({cols, rows}, input, dtype) : empty({c10::SymInt(0)}, input, dtype);
  return {empty(input.sym_sizes(), input, dtype), data_t, empty({}, input, at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor> fp8_quantize_blockwise(const at::Tensor& input, at::ScalarType dtype,
                                                          int64_t block_rows, int64_t block_cols, int64_t /*margin*/,
                                                          bool /*pow2_scales*/, c10::string_view /*rounding*/,
                                                          bool /*saturate*/, std::optional<int64_t> /*seed*/) {
  constexpr const char* op = "mixprec::fp8_quantize_blockwise";
  refuse_meta_mix(op, input);
  detail::parse_fp8_dtype(dtype, op);
  return {empty(input.sym_sizes(), input, dtype),
          empty(scale_grid(input, block_rows, block_cols, op), input, at::kFloat)};
}

void fp8_update_scales_(const at::Tensor& amax_history, const at::Tensor& scale, const at::Tensor& scale_inv,
                        at::ScalarType dtype, c10::string_view /*algo*/, int64_t /*margin*/, bool /*pow2_scales*/,
                        const std::optional<at::Tensor>& turn, int64_t /*side*/, bool /*take_turn*/) {
  constexpr const char* op = "mixprec::fp8_update_scales_";
  refuse_meta_mix(op, amax_history, scale, scale_inv, turn);
  detail::parse_fp8_dtype(dtype, op);
}

void fp8_reduce_amax_(const at::Tensor& forward_amax_history, const at::Tensor& backward_amax_history,
                      c10::string_view /*group_name*/) {
  // A meta (or fake) history holds no amaxes to reduce: the collective runs with the real tensors.
  refuse_meta_mix("mixprec::fp8_reduce_amax_", forward_amax_history, backward_amax_history);
}

at::Tensor fp8_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv,
                    const at::Tensor& b_scale_inv, at::ScalarType out_dtype, const std::optional<at::Tensor>& bias,
                    bool /*use_fast_accum*/) {
  constexpr const char* op = "mixprec::fp8_gemm";
  refuse_meta_mix(op, a, b, a_scale_inv, b_scale_inv, bias);
  detail::check_fp8_operand(op, "a", a);
  detail::check_fp8_operand(op, "b", b);
  detail::check_gemm_out_dtype(out_dtype, op);
  return empty({a.sym_size(0), b.sym_size(0)}, a, out_dtype);
}

void fp8_gemm_accum_(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv,
                     const at::Tensor& b_scale_inv) {
  constexpr const char* op = "mixprec::fp8_gemm_accum_";
  refuse_meta_mix(op, out, a, b, a_scale_inv, b_scale_inv);
  detail::check_fp8_operand(op, "a", a);
  detail::check_fp8_operand(op, "b", b);
}

at::Tensor fp8_dequantize(const at::Tensor& data, const at::Tensor& scale_inv) {
  refuse_meta_mix("mixprec::fp8_dequantize", data, scale_inv);
  detail::check_fp8_operand("mixprec::fp8_dequantize", "data", data);
  return empty(data.sym_sizes(), data, at::kFloat);
}

std::tuple<at::Tensor, at::Tensor> int8_quantize(const at::Tensor& input, int64_t block_rows, int64_t block_cols,
                                                 c10::string_view /*rounding*/, std::optional<int64_t> /*seed*/,
                                                 bool /*pow2_scales*/) {
  constexpr const char* op = "mixprec::int8_quantize";
  refuse_meta_mix(op, input);
  return {empty(input.sym_sizes(), input, at::kChar),
          empty(scale_grid(input, block_rows, block_cols, op), input, at::kFloat)};
}

at::Tensor int8_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv,
                   const at::Tensor& b_scale_inv, at::ScalarType out_dtype, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "mixprec::int8_mm";
  refuse_meta_mix(op, a, b, a_scale_inv, b_scale_inv, bias);
  detail::check_int8_operand(op, "a", a);
  detail::check_int8_operand(op, "b", b);
  detail::check_gemm_out_dtype(out_dtype, op);
  return empty({a.sym_size(0), b.sym_size(1)}, a, out_dtype);
}

at::Tensor fake_quantize_forward(const at::Tensor& input, const at::Tensor& scale, int64_t /*quant_min*/,
                                 int64_t /*quant_max*/, int64_t /*block_rows*/, int64_t /*block_cols*/) {
  refuse_meta_mix("mixprec::fake_quantize_forward", input, scale);
  return empty(input.sym_sizes(), input, input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_backward(const at::Tensor& grad, const at::Tensor& input,
                                                          const at::Tensor& scale, int64_t /*quant_min*/,
                                                          int64_t /*quant_max*/, int64_t /*block_rows*/,
                                                          int64_t /*block_cols*/, bool scale_grad) {
  refuse_meta_mix("mixprec::fake_quantize_backward", grad, input, scale);
  const auto [rows, cols] = detail::matrix_extent_of(input.sym_sizes());
  at::Tensor terms = scale_grad ? empty({rows, cols}, input, at::kFloat) : empty({c10::SymInt(0)}, input, at::kFloat);
  return {empty(input.sym_sizes(), input, input.scalar_type()), terms};
}

}  // namespace
}  // namespace mixprec::meta

TORCH_LIBRARY_IMPL(mixprec, Meta, m) {
  using namespace mixprec::meta;
  m.impl("unscale_and_check_", &unscale_and_check_);
  m.impl("unscale_and_check_sumsq_", &unscale_and_check_sumsq_);
  m.impl("grad_stats", &grad_stats);
  m.impl("record_overflow_", &record_overflow_);
  m.impl("update_scale_", &update_scale_);
  m.impl("cast", &cast);
  m.impl("cast_", &cast_);
  m.impl("split_bf16_remainder", &split_bf16_remainder);
  m.impl("merge_bf16_remainder", &merge_bf16_remainder);
  m.impl("adam_step_", &adam_step_);
  m.impl("linear_wgrad_accum_", &linear_wgrad_accum_);
  m.impl("linear_wgrad", &linear_wgrad);
  m.impl("fp8_quantize", &fp8_quantize);
  m.impl("fp8_quantize_blockwise", &fp8_quantize_blockwise);
  m.impl("fp8_update_scales_", &fp8_update_scales_);
  m.impl("fp8_reduce_amax_", &fp8_reduce_amax_);
  m.impl("fp8_gemm", &fp8_gemm);
  m.impl("fp8_gemm_accum_", &fp8_gemm_accum_);
  m.impl("fp8_dequantize", &fp8_dequantize);
  m.impl("int8_quantize", &int8_quantize);
  m.impl("int8_mm", &int8_mm);
  m.impl("fake_quantize_forward", &fake_quantize_forward);
  m.impl("fake_quantize_backward", &fake_quantize_backward);
}
