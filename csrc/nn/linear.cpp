// mixprec::nn::Linear: an autograd function whose backward sends the weight gradient through
// linear_wgrad_accum_ into an fp32 gradient, and the module around it.
#include "mixprec/nn.h"

#include <ATen/autocast_mode.h>
#include <torch/autograd.h>
#include <torch/nn/init.h>

#include <cmath>

#include "mixprec/ops.h"

namespace mixprec::nn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// autocast's rule for its lower-precision ops: floating tensors other than fp64 take its dtype.
torch::Tensor autocast_to(const torch::Tensor& t, std::optional<at::ScalarType> dtype) {
  if (!t.defined() || !dtype || !t.is_floating_point() || t.scalar_type() == *dtype ||
      t.scalar_type() == at::kDouble) {
    return t;
  }
  return t.to(*dtype);
}

struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& input, const torch::Tensor& weight,
                               const torch::Tensor& bias) {
    // Cast here with autocast's rule, keep the 16-bit input for the wgrad GEMM, and run at::linear with
    // autocast excluded (autograd functions run below the autocast key already; the guard says so).
    const c10::DeviceType device_type = input.device().type();
    std::optional<at::ScalarType> dtype;
    if (at::autocast::is_autocast_enabled(device_type)) {
      dtype = at::autocast::get_autocast_dtype(device_type);
    }
    const torch::Tensor x = autocast_to(input, dtype), w = autocast_to(weight, dtype), b = autocast_to(bias, dtype);
    torch::Tensor output;
    {
      const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      output = at::linear(x, w, b);
    }
    ctx->save_for_backward({x, w});
    ctx->saved_data["weight"] = weight;  // the parameter itself (a leaf): its gradient is the accumulator
    ctx->saved_data["has_bias"] = bias.defined();
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const torch::Tensor& x = saved[0];
    const torch::Tensor& w = saved[1];
    torch::Tensor go = grad_outputs[0];
    if (go.scalar_type() != x.scalar_type()) {
      go = go.to(x.scalar_type());
    }
    torch::Tensor grad_input, grad_bias;
    if (ctx->needs_input_grad(0)) {
      grad_input = go.matmul(w);
    }
    torch::Tensor grad_weight;
    if (ctx->needs_input_grad(1)) {
      torch::Tensor weight = ctx->saved_data["weight"].toTensor();
      if (weight.is_leaf()) {
        torch::Tensor& accumulator = weight.mutable_grad();
        if (!accumulator.defined()) {
          accumulator = torch::zeros(weight.sizes(), weight.options().dtype(torch::kFloat));
        } else if (accumulator.scalar_type() != torch::kFloat) {
          accumulator = accumulator.to(torch::kFloat);  // a 16-bit grad from another use (tied weights)
        }
        ops::linear_wgrad_accum_(accumulator, go, x);
      } else {  // a computed weight: its gradient must flow on through autograd
        grad_weight = go.reshape({-1, go.size(-1)}).t().matmul(x.reshape({-1, x.size(-1)}));
      }
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {
      // fp32 sum over the batch, rounded once to the bias's dtype by autograd.
      grad_bias = go.reshape({-1, go.size(-1)}).sum(0, /*keepdim=*/false, torch::kFloat);
    }
    return {grad_input, grad_weight, grad_bias};
  }
};

}  // namespace

torch::Tensor linear(const torch::Tensor& input, const torch::Tensor& weight, const torch::Tensor& bias) {
  return LinearFunction::apply(input, weight, bias);
}

LinearImpl::LinearImpl(const torch::nn::LinearOptions& options_) : options(options_) { reset(); }

LinearImpl::LinearImpl(const torch::nn::LinearImpl& other) : options(other.options) {
  weight = register_parameter("weight", other.weight);
  bias = register_parameter("bias", other.bias, /*requires_grad=*/other.bias.defined() && other.bias.requires_grad());
}

void LinearImpl::reset() {
  weight = register_parameter("weight", torch::empty({options.out_features(), options.in_features()}));
  if (options.bias()) {
    bias = register_parameter("bias", torch::empty(options.out_features()));
  } else {
    bias = register_parameter("bias", {}, /*requires_grad=*/false);
  }
  reset_parameters();
}

void LinearImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  if (bias.defined()) {
    const auto fans = torch::nn::init::_calculate_fan_in_and_fan_out(weight);
    const double bound = std::get<0>(fans) > 0 ? 1.0 / std::sqrt(static_cast<double>(std::get<0>(fans))) : 0.0;
    torch::nn::init::uniform_(bias, -bound, bound);
  }
}

void LinearImpl::pretty_print(std::ostream& stream) const {
  stream << "mixprec::nn::Linear(in_features=" << options.in_features()
         << ", out_features=" << options.out_features() << ", bias=" << std::boolalpha << options.bias() << ")";
}

torch::Tensor LinearImpl::forward(const torch::Tensor& input) { return linear(input, weight, bias); }

}  // namespace mixprec::nn
