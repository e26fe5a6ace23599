// mixprec::fp8's functions: typed calls of the fp8_* ops (csrc/ops/registration.cpp).
#include "mixprec/fp8.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "ops/fp8_plan.h"

namespace mixprec::fp8 {
namespace {
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

c10::string_view view(std::string_view s) { return {s.data(), s.size()}; }
}  // namespace

double max_finite(at::ScalarType dtype) {
  return fp8::max_finite(detail::parse_fp8_dtype(dtype, "mixprec::fp8::max_finite"));
}

Quantized quantize(const at::Tensor& input, const at::Tensor& scale, at::ScalarType dtype,
                   const QuantizeOptions& options) {
  static const auto op =
      find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, at::ScalarType,
                                                             c10::string_view, bool, std::optional<int64_t>, bool)>(
          "mixprec::fp8_quantize");
  auto [data, data_t, amax] =
      op.call(input, scale, dtype, view(options.rounding), options.saturate, options.seed, options.transpose);
  return {data, options.transpose ? data_t : at::Tensor(), amax};
}

BlockQuantized quantize_blockwise(const at::Tensor& input, at::ScalarType dtype, int64_t block_rows,
                                  int64_t block_cols, const BlockwiseOptions& options) {
  static const auto op =
      find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::ScalarType, int64_t, int64_t, int64_t, bool,
                                                 c10::string_view, bool, std::optional<int64_t>)>(
          "mixprec::fp8_quantize_blockwise");
  auto [data, scale_inv] = op.call(input, dtype, block_rows, block_cols, options.margin, options.pow2_scales,
                                   view(options.rounding), options.saturate, options.seed);
  return {data, scale_inv};
}

void update_scales_(const at::Tensor& amax_history, const at::Tensor& scale, const at::Tensor& scale_inv,
                    at::ScalarType dtype, std::string_view algo, int64_t margin, bool pow2_scales,
                    const std::optional<at::Tensor>& turn, int64_t side, bool take_turn) {
  static const auto op =
      find_op<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ScalarType, c10::string_view,
                   int64_t, bool, const std::optional<at::Tensor>&, int64_t, bool)>("mixprec::fp8_update_scales_");
  op.call(amax_history, scale, scale_inv, dtype, view(algo), margin, pow2_scales, turn, side, take_turn);
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv, const at::Tensor& b_scale_inv,
                at::ScalarType out_dtype, const std::optional<at::Tensor>& bias, bool use_fast_accum) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ScalarType,
                         const std::optional<at::Tensor>&, bool)>("mixprec::fp8_gemm");
  return op.call(a, b, a_scale_inv, b_scale_inv, out_dtype, bias, use_fast_accum);
}

at::Tensor dequantize(const at::Tensor& data, const at::Tensor& scale_inv) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&)>("mixprec::fp8_dequantize");
  return op.call(data, scale_inv);
}

void gemm_accum_(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv,
                 const at::Tensor& b_scale_inv) {
  static const auto op = find_op<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&)>("mixprec::fp8_gemm_accum_");
  op.call(out, a, b, a_scale_inv, b_scale_inv);
}

Scaling parse_scaling(std::string_view name) {
  if (name == "delayed") return Scaling::Delayed;
  if (name == "current") return Scaling::Current;
  if (name == "rowwise") return Scaling::Rowwise;
  if (name == "blockwise") return Scaling::Blockwise;
  TORCH_CHECK_VALUE(false, "mixprec: scaling must be \"delayed\", \"current\", \"rowwise\" or \"blockwise\", got \"",
                    std::string(name), "\"");
}

std::string_view scaling_name(Scaling scaling) {
  switch (scaling) {
    case Scaling::Delayed:
      return "delayed";
    case Scaling::Current:
      return "current";
    case Scaling::Rowwise:
      return "rowwise";
    case Scaling::Blockwise:
      return "blockwise";
  }
  return "?";
}

void check_recipe(const Recipe& recipe) {
  // The input and the weight meet in the forward GEMM, and no FP8 GEMM (cuBLASLt, torch._scaled_mm) takes two
  // E5M2 operands: E4M3 there, as in every format Python's Recipe names ("hybrid", "e4m3").
  TORCH_CHECK_VALUE(recipe.forward_dtype == at::kFloat8_e4m3fn,
                    "mixprec: Recipe.forward_dtype (input and weight) must be Float8_e4m3fn, got ",
                    recipe.forward_dtype);
  TORCH_CHECK_VALUE(recipe.backward_dtype == at::kFloat8_e4m3fn || recipe.backward_dtype == at::kFloat8_e5m2,
                    "mixprec: Recipe.backward_dtype (the output gradient) must be Float8_e4m3fn or Float8_e5m2, got ",
                    recipe.backward_dtype);
  TORCH_CHECK_VALUE(recipe.amax_history_len >= 1, "mixprec: amax_history_len must be >= 1, got ",
                    recipe.amax_history_len);
  TORCH_CHECK_VALUE(recipe.amax_compute_algo == "max" || recipe.amax_compute_algo == "most_recent",
                    "mixprec: amax_compute_algo must be \"max\" or \"most_recent\", got \"", recipe.amax_compute_algo,
                    "\"");
  TORCH_CHECK_VALUE(recipe.margin >= 0 && recipe.margin <= 32,
                    "mixprec: margin must be in [0, 32] (the scale is divided by 2^margin), got ", recipe.margin);
}

StateLoad plan_state_load(Scaling scaling, const std::vector<int64_t>& numels, bool has_weight) {
  TORCH_CHECK_VALUE(numels.size() == 7, "mixprec::fp8::plan_state_load: 7 numels (the state's buffers), got ",
                    numels.size());
  if (scaling != Scaling::Delayed) return StateLoad::Skip;
  // The six buffers before fp8_turn hold the state; the turn alone (or empty buffers) is no state.
  const auto six_end = numels.begin() + 6;
  const bool none = std::all_of(numels.begin(), six_end, [](int64_t n) { return n < 0; });
  const bool any_empty = std::any_of(numels.begin(), numels.end(), [](int64_t n) { return n == 0; });
  if (none || any_empty) return has_weight ? StateLoad::Restart : StateLoad::Skip;
  if (std::any_of(numels.begin(), six_end, [](int64_t n) { return n < 0; })) return StateLoad::Partial;
  return numels.back() < 0 ? StateLoad::InitialTurn : StateLoad::Load;
}

ScalingState make_scaling_state(const Recipe& recipe, const at::TensorOptions& options) {
  const at::TensorOptions f = options.dtype(at::kFloat);
  if (recipe.scaling != Scaling::Delayed) {
    // Seven tensors, not one seven times: each becomes a buffer of its own.
    const auto none = [&] { return at::empty({0}, f); };
    return {none(), none(), none(), none(), none(), none(), none()};
  }
  TORCH_CHECK_VALUE(recipe.amax_history_len >= 1, "mixprec: amax_history_len must be >= 1, got ",
                    recipe.amax_history_len);
  // turn 1: as if a backward had just updated, so the first forward updates.
  return {at::zeros({recipe.amax_history_len, 2}, f), at::ones({2}, f), at::ones({2}, f),
          at::zeros({recipe.amax_history_len, 1}, f), at::ones({1}, f), at::ones({1}, f), at::ones({1}, f)};
}

void reduce_amax(const ScalingState& state, c10d::ProcessGroup& group) {
  const at::Tensor& forward = state.forward_amax_history;
  const at::Tensor& backward = state.backward_amax_history;
  const auto check = [](const at::Tensor& history, const char* name, int64_t width) {
    TORCH_CHECK_VALUE(history.defined() && history.dim() == 2 && history.size(0) >= 1 && history.size(1) == width &&
                          history.scalar_type() == at::kFloat,
                      "mixprec::fp8::reduce_amax: ", name, " must be delayed scaling's float32 [history, ", width,
                      "] amax history, got ",
                      history.defined() ? history.toString() + " " + c10::str(history.sizes()) : "undefined");
  };
  check(forward, "forward_amax_history", 2);
  check(backward, "backward_amax_history", 1);
  TORCH_CHECK_VALUE(forward.device() == backward.device(),
                    "mixprec::fp8::reduce_amax: both amax histories must be on one device, got ", forward.device(),
                    " and ", backward.device());
  // One collective for both rows; the group reduces on the tensors' device (its NCCL backend for CUDA).
  std::vector<at::Tensor> rows{at::cat({forward[0], backward[0]})};
  c10d::AllreduceOptions options;
  options.reduceOp = c10d::ReduceOp::MAX;
  group.allreduce(rows, options)->wait();
  forward[0].copy_(rows[0].narrow(0, 0, 2));
  backward[0].copy_(rows[0].narrow(0, 2, 1));
}

}  // namespace mixprec::fp8

// Python's Float8Linear names its group by torch.distributed's group name, which resolves to the same
// c10d::ProcessGroup a C++ program holds. Not decomposed: a fake tensor has nothing to reduce (its Meta kernel,
// ops/meta.cpp, does nothing).
TORCH_LIBRARY_IMPL(mixprec, CompositeExplicitAutograd, m) {
  // One kernel for every device: the CPU's is one vectorised pass (ops/cpu/fp8.cpp), others two ATen ops.
  m.impl("fp8_dequantize", [](const at::Tensor& data, const at::Tensor& scale_inv) {
    const mixprec::detail::Fp8ScaleLayout layout =
        mixprec::detail::check_fp8_dequantize("mixprec::fp8_dequantize", data, scale_inv);
    return mixprec::detail::dequantize(data, scale_inv, layout);
  });
  m.impl("fp8_reduce_amax_", [](const at::Tensor& forward_amax_history, const at::Tensor& backward_amax_history,
                                c10::string_view group_name) {
    const c10::intrusive_ptr<c10d::ProcessGroup> group =
        c10d::resolve_process_group(std::string(group_name.data(), group_name.size()));
    mixprec::fp8::ScalingState state;
    state.forward_amax_history = forward_amax_history;
    state.backward_amax_history = backward_amax_history;
    mixprec::fp8::reduce_amax(state, *group);
  });
}

// No tensor argument: the kernel is the op's only one (CompositeImplicitAutograd serves every dispatch).
TORCH_LIBRARY_IMPL(mixprec, CompositeImplicitAutograd, m) {
  m.impl("fp8_check_recipe", [](c10::string_view scaling, at::ScalarType forward_dtype, at::ScalarType backward_dtype,
                                int64_t amax_history_len, c10::string_view amax_compute_algo, int64_t margin) {
    mixprec::fp8::Recipe recipe;
    recipe.scaling = mixprec::fp8::parse_scaling(std::string_view(scaling.data(), scaling.size()));
    recipe.forward_dtype = forward_dtype;
    recipe.backward_dtype = backward_dtype;
    recipe.amax_history_len = amax_history_len;
    recipe.amax_compute_algo = std::string(amax_compute_algo.data(), amax_compute_algo.size());
    recipe.margin = margin;
    mixprec::fp8::check_recipe(recipe);
  });
  m.impl("fp8_state_load_plan", [](c10::string_view scaling, std::vector<int64_t> numels, bool has_weight) {
    return static_cast<int64_t>(mixprec::fp8::plan_state_load(
        mixprec::fp8::parse_scaling(std::string_view(scaling.data(), scaling.size())), numels, has_weight));
  });
}
