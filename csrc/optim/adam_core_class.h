// The torch custom class torch.classes.mixprec.AdamCore: the Python optimizer's handle on the C++ core and the
// state of the parameters it has seen. Declared here so that mixprec._C can bind its per-step call directly.
// Internal.
#pragma once

#include <torch/custom_class.h>

#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "mixprec/optim.h"

namespace mixprec::detail {

// The core plus the state of the parameters it has seen. Python's optimizer.state holds the same tensors:
// the Python layer pushes its state here when it changed (set_states) and mirrors what a step created or
// replaced (state_of), so the per-step path crosses into C++ once per param group.
struct AdamCoreClass : torch::CustomClassHolder {
  struct Entry {
    torch::Tensor param;  // held, so the key (its TensorImpl) cannot be reused by another tensor
    optim::AdamParamState state;
  };
  optim::AdamCore core;
  std::unordered_map<const c10::TensorImpl*, Entry> states;

  optim::AdamParamState& state_of(const torch::Tensor& p);

  /// One param group's step, from Python's arguments (options as the group holds them). Returns (rng_calls
  /// after the step, indices whose state was created or replaced).
  std::tuple<int64_t, std::vector<int64_t>> step_group(
      int64_t group, at::TensorList params, std::optional<std::vector<torch::Tensor>> locals,
      std::optional<std::vector<std::optional<torch::Tensor>>> grads, double lr,
      const std::optional<torch::Tensor>& lr_tensor, double beta1, double beta2, double eps, double weight_decay,
      bool decoupled, bool amsgrad, bool maximize, const std::string& master_weights, c10::ScalarType moment_dtype,
      const std::string& rounding, std::optional<int64_t> seed, int64_t rng_calls,
      const std::optional<torch::Tensor>& grad_scale, const std::optional<torch::Tensor>& found_inf, int64_t shard);
};

/// The core behind a torch.classes.mixprec.AdamCore object (any other object is refused). mixprec._C binds the
/// per-step call on it directly, without TorchScript's method dispatch and its conversion of the parameter
/// list into IValues.
c10::intrusive_ptr<AdamCoreClass> adam_core_of(const c10::IValue& object);

}  // namespace mixprec::detail
