// mixprec::optim::Adam and AdamW for LibTorch: torch::optim::Optimizer subclasses on the fused
// adam_step_ op, with master weights kept in the optimizer state (saved and loaded by torch::save /
// torch::load of the optimizer, bit-exact resume included).
#pragma once

#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "mixprec/version.h"

namespace mixprec::optim {

/// Options of Adam, LibTorch style (chainable setters); defaults are torch::optim::AdamOptions'.
/// mixprec::optim::AdamW takes AdamWOptions (weight_decay 1e-2, as torch::optim::AdamWOptions).
struct AdamOptions : public torch::optim::OptimizerCloneableOptions<AdamOptions> {
  AdamOptions(double lr = 1e-3);  // NOLINT(google-explicit-constructor): mirrors torch::optim
  TORCH_ARG(double, lr) = 1e-3;
  typedef std::tuple<double, double> betas_t;
  TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 0.0;
  /// Only false: the fused step keeps no maximum of the second moments (true is refused).
  TORCH_ARG(bool, amsgrad) = false;
  TORCH_ARG(bool, maximize) = false;
  /// "auto" (fp32 masters for fp16/bf16 params), "fp32", "remainder" (bf16 + int16) or "none".
  TORCH_ARG(std::string, master_weights) = "auto";
  /// torch::kFloat or torch::kBFloat16.
  TORCH_ARG(c10::ScalarType, moment_dtype) = c10::ScalarType::Float;
  /// How 16-bit params are written: "nearest" or "stochastic".
  TORCH_ARG(std::string, rounding) = "nearest";
  /// Key for stochastic rounding (a fresh one per step is derived from it); -1: torch's generator.
  TORCH_ARG(int64_t, seed) = -1;
  /// Steps taken with `seed` so far (part of the saved state, so a resumed run repeats its draws).
  TORCH_ARG(int64_t, rng_calls) = 0;

 public:  // TORCH_ARG leaves the section private
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
};

/// torch::optim::AdamWOptions' defaults (weight_decay 1e-2) for mixprec::optim::AdamW. The setters are
/// AdamOptions', so `AdamWOptions(3e-4).weight_decay(0.1)` chains as with torch.
struct AdamWOptions : public AdamOptions {
  AdamWOptions(double lr = 1e-3) : AdamOptions(lr) { weight_decay(1e-2); }  // NOLINT(google-explicit-constructor)
};

/// Per-parameter state: step count, moments, and the master copy (fp32) or bf16 remainder (int16).
struct AdamParamState : public torch::optim::OptimizerCloneableParamState<AdamParamState> {
  TORCH_ARG(torch::Tensor, step);
  TORCH_ARG(torch::Tensor, exp_avg);
  TORCH_ARG(torch::Tensor, exp_avg_sq);
  TORCH_ARG(torch::Tensor, master);
  TORCH_ARG(torch::Tensor, remainder);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

/// Adam with master weights (L2 weight decay added to the gradient), a drop-in for torch::optim::Adam.
class Adam : public torch::optim::Optimizer {
 public:
  explicit Adam(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamOptions defaults = {});
  explicit Adam(std::vector<torch::Tensor> params, AdamOptions defaults = {})
      : Adam({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}

  torch::Tensor step(LossClosure closure = nullptr) override;

  /// The step a loss scaler drives: gradients are divided by `grad_scale` inside the fused kernel (and
  /// written back divided, as torch's fused optimizers leave them), and when `found_inf` (one-element
  /// float32) is non-zero nothing is written. No host synchronisation.
  void step_scaled(const std::optional<torch::Tensor>& grad_scale, const std::optional<torch::Tensor>& found_inf);

  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 protected:
  Adam(const std::vector<torch::optim::OptimizerParamGroup>& param_groups, AdamOptions defaults, bool decoupled);

 private:
  bool decoupled_;
};

/// AdamW (decoupled weight decay, default 1e-2) with master weights, a drop-in for torch::optim::AdamW.
class AdamW : public Adam {
 public:
  explicit AdamW(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                 AdamOptions defaults = AdamWOptions())
      : Adam(param_groups, std::move(defaults), /*decoupled=*/true) {}
  explicit AdamW(std::vector<torch::Tensor> params, AdamOptions defaults = AdamWOptions())
      : AdamW({torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults)) {}
};

}  // namespace mixprec::optim
