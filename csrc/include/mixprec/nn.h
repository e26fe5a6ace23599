// mixprec::nn::Linear for LibTorch: a drop-in torch::nn::Linear whose weight gradient is accumulated in
// fp32 by the weight-gradient GEMM itself (mixprec::ops::linear_wgrad_accum_, cuBLASLt on CUDA).
#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/options/linear.h>
#include <torch/nn/pimpl.h>

#include <ostream>

#include "mixprec/version.h"

namespace mixprec::nn {

/// `input @ weight^T + bias` whose backward accumulates dL/dweight in fp32:
/// `weight.grad() += grad_output^T @ input`, with `weight.grad()` an fp32 tensor whatever the weight's
/// dtype (created as zeros at the first backward). C++ tensors carry no attributes, so the fp32
/// accumulator that Python keeps in `weight.main_grad` is the weight's gradient itself here: every
/// torch::optim optimizer, mixprec::optim::AdamW and mixprec::GradScaler read it as they read any
/// gradient, and `zero_grad()` clears it. Input and bias gradients flow as usual. Under autocast the
/// GEMMs run in the autocast dtype, as at::linear's would.
torch::Tensor linear(const torch::Tensor& input, const torch::Tensor& weight, const torch::Tensor& bias = {});

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

  /// The fp32 weight-gradient accumulator (the weight's gradient; undefined before the first backward).
  const torch::Tensor& main_grad() const { return weight.grad(); }

  torch::nn::LinearOptions options;
  torch::Tensor weight;
  torch::Tensor bias;
};

TORCH_MODULE(Linear);

}  // namespace mixprec::nn
