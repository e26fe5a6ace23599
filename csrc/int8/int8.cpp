// mixprec::int8's functions: typed calls of the integer ops (csrc/ops/registration.cpp), and fake_quantize's
// autograd function, registered above autograd so Python's mixprec.ops.fake_quantize is this code.
#include "mixprec/int8.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string_view>
#include <tuple>

#include "ops/int8_plan.h"

namespace mixprec::int8 {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

c10::string_view view(std::string_view s) { return {s.data(), s.size()}; }

at::Tensor fake_quantize_forward(const at::Tensor& input, const at::Tensor& scale, int64_t quant_min,
                                 int64_t quant_max, int64_t block_rows, int64_t block_cols) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, int64_t)>(
      "mixprec::fake_quantize_forward");
  return op.call(input, scale, quant_min, quant_max, block_rows, block_cols);
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_backward(const at::Tensor& grad, const at::Tensor& input,
                                                          const at::Tensor& scale, int64_t quant_min,
                                                          int64_t quant_max, int64_t block_rows, int64_t block_cols,
                                                          bool scale_grad) {
  static const auto op =
      find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                                 int64_t, int64_t, int64_t, bool)>("mixprec::fake_quantize_backward");
  return op.call(grad, input, scale, quant_min, quant_max, block_rows, block_cols, scale_grad);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct FakeQuantizeFunction : public torch::autograd::Function<FakeQuantizeFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& scale, int64_t quant_min,
                            int64_t quant_max, int64_t block_rows, int64_t block_cols, double grad_factor) {
    ctx->save_for_backward({input, scale});
    ctx->saved_data["qmin"] = quant_min;
    ctx->saved_data["qmax"] = quant_max;
    ctx->saved_data["block_rows"] = block_rows;
    ctx->saved_data["block_cols"] = block_cols;
    ctx->saved_data["grad_factor"] = grad_factor;
    return fake_quantize_forward(input, scale, quant_min, quant_max, block_rows, block_cols);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &scale = saved[1];
    const int64_t qmin = ctx->saved_data["qmin"].toInt(), qmax = ctx->saved_data["qmax"].toInt();
    const int64_t block_rows = ctx->saved_data["block_rows"].toInt();
    const int64_t block_cols = ctx->saved_data["block_cols"].toInt();
    const bool scale_grad = ctx->needs_input_grad(1);
    const at::Tensor& grad = grad_outputs[0];
    // Under create_graph the gradients are differentiable in `grad` (they are linear in it): the kernel gives
    // the mask and the LSQ terms for a gradient of ones, and the products with `grad` are recorded ops. Their
    // dependence on input and scale is not (the mask is piecewise constant; the LSQ terms' slope is dropped).
    const bool differentiable = at::GradMode::is_enabled();
    auto [grad_input, terms] =
        fake_quantize_backward(differentiable ? at::ones_like(grad) : grad, input.detach(), scale.detach(), qmin, qmax,
                               block_rows, block_cols, scale_grad);
    if (differentiable) {
      grad_input = grad_input.mul(grad);
      if (scale_grad) terms = terms.mul(grad.to(at::kFloat).reshape(terms.sizes()));
    }
    at::Tensor grad_scale;
    if (scale_grad) {
      const detail::FakeQuantArgs f = detail::check_fake_quantize("mixprec::fake_quantize", input, scale, qmin, qmax,
                                                                  block_rows, block_cols);
      // Per-block sums of the per-element terms (fp32), in float64 with the factor, rounded once to the terms'
      // dtype, in the scale's own shape.
      grad_scale = detail::sum_blocks(terms, f)
                       .mul(ctx->saved_data["grad_factor"].toDouble())
                       .to(terms.scalar_type())
                       .reshape(scale.sizes());
    }
    return {ctx->needs_input_grad(0) ? grad_input : at::Tensor(), grad_scale, at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

Quantized quantize(const at::Tensor& input, int64_t block_rows, int64_t block_cols, const QuantizeOptions& options) {
  static const auto op =
      find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, int64_t, c10::string_view,
                                                 std::optional<int64_t>, bool)>("mixprec::int8_quantize");
  auto [data, scale_inv] =
      op.call(input, block_rows, block_cols, view(options.rounding), options.seed, options.pow2_scales);
  return {data, scale_inv};
}

at::Tensor mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv, const at::Tensor& b_scale_inv,
              at::ScalarType out_dtype, const std::optional<at::Tensor>& bias) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ScalarType,
                         const std::optional<at::Tensor>&)>("mixprec::int8_mm");
  return op.call(a, b, a_scale_inv, b_scale_inv, out_dtype, bias);
}

at::Tensor fake_quantize(const at::Tensor& input, const at::Tensor& scale, int64_t quant_min, int64_t quant_max,
                         int64_t block_rows, int64_t block_cols, double grad_factor) {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, int64_t, double)>(
          "mixprec::fake_quantize");
  return op.call(input, scale, quant_min, quant_max, block_rows, block_cols, grad_factor);
}

// Above autograd: the autograd function records its own node.
TORCH_LIBRARY_IMPL(mixprec, CompositeImplicitAutograd, m) {
  m.impl("fake_quantize", [](const at::Tensor& input, const at::Tensor& scale, int64_t quant_min, int64_t quant_max,
                             int64_t block_rows, int64_t block_cols, double grad_factor) {
    return FakeQuantizeFunction::apply(input, scale, quant_min, quant_max, block_rows, block_cols, grad_factor);
  });
}

}  // namespace mixprec::int8
