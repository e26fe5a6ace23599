// mixprec::nn::Linear for LibTorch: a drop-in torch::nn::Linear whose weight gradient is fp32, formed and
// accumulated by the weight-gradient GEMM itself (mixprec::ops::linear_wgrad*, cuBLASLt on CUDA).
#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/options/linear.h>
#include <torch/nn/pimpl.h>

#include <ostream>

#include "mixprec/version.h"

namespace mixprec::nn {

/// `input @ weight^T + bias` whose backward forms dL/dweight with fp32 products and sums (the wgrad GEMM,
/// cuBLASLt on CUDA), never as a 16-bit tensor. The gradient reaches `weight.grad()` in the weight's
/// grad_dtype: fp32 after keep_fp32_grad (mixprec::nn::Linear does it), so it is an ordinary gradient
/// that every optimizer, mixprec::GradScaler and `zero_grad()` see. When `weight.grad()` already holds a
/// gradient (gradient accumulation) in a plain `backward()` (not autograd::grad, no `inputs`, no
/// create_graph) and no hook needs the new part on its own, the GEMM adds into it in place (beta = 1).
/// Input and bias gradients flow as usual (the bias's summed in fp32). Under autocast the GEMMs run in the
/// autocast dtype, as at::linear's would. The same function is Python's mixprec.nn.linear.
torch::Tensor linear(const torch::Tensor& input, const torch::Tensor& weight, const torch::Tensor& bias = {});

/// Gives a leaf `weight` an fp32 gradient (grad_dtype float32), converting one it holds. Tensor subclasses
/// (FSDP2's DTensors, which assign gradients in their own dtypes) and float64 weights are left alone.
void keep_fp32_grad(const torch::Tensor& weight);

/// Drop-in for torch::nn::LinearImpl (same options, parameter names, initialisation and state dict)
/// whose forward is mixprec::nn::linear.
class LinearImpl : public torch::nn::Cloneable<LinearImpl> {
 public:
  LinearImpl(int64_t in_features, int64_t out_features)
      : LinearImpl(torch::nn::LinearOptions(in_features, out_features)) {}
  explicit LinearImpl(const torch::nn::LinearOptions& options);
  /// Takes over `other`'s parameters (the same tensors, not copies): converts an existing layer in
  /// place of a model, keeping optimizers that already hold the tensors valid.
  explicit LinearImpl(const torch::nn::LinearImpl& other);

  void reset() override;
  /// torch::nn::Linear's initialisation: kaiming-uniform weight, uniform(+-1/sqrt(in)) bias.
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  torch::Tensor forward(const torch::Tensor& input);

  /// The fp32 weight gradient (the weight's gradient; undefined before the first backward).
  const torch::Tensor& main_grad() const { return weight.grad(); }

  torch::nn::LinearOptions options;
  torch::Tensor weight;
  torch::Tensor bias;
};

TORCH_MODULE(Linear);

}  // namespace mixprec::nn
