// The torch custom class torch.classes.mixprec.GradScaler holds a mixprec::GradScaler; declared here
// so that other bindings (torch.classes.mixprec.Monitor) can take one as an argument. Internal.
#pragma once

#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "mixprec/grad_scaler.h"

namespace mixprec::detail {

struct GradScalerClass : torch::CustomClassHolder {
  GradScaler impl;
  GradScalerClass(const std::string& device, double init_scale, double growth_factor, double backoff_factor,
                  int64_t growth_interval, bool enabled, int64_t hysteresis, bool consecutive_hysteresis,
                  double min_scale, std::optional<double> max_scale, bool dynamic)
      : impl(c10::Device(device), GradScalerOptions()
                                      .init_scale(init_scale)
                                      .growth_factor(growth_factor)
                                      .backoff_factor(backoff_factor)
                                      .growth_interval(growth_interval)
                                      .enabled(enabled)
                                      .hysteresis(hysteresis)
                                      .consecutive_hysteresis(consecutive_hysteresis)
                                      .min_scale(min_scale)
                                      .max_scale(max_scale)
                                      .dynamic(dynamic)) {}
};

/// The scaler behind a torch.classes.mixprec.GradScaler object (any other object is refused). mixprec._C binds
/// the scaler's per-step calls directly on it: a call through TorchScript's method dispatch costs about 2.5 us,
/// and about 40 us when the step's forward and backward passes have evicted that machinery from the caches.
c10::intrusive_ptr<GradScalerClass> grad_scaler_of(const c10::IValue& object);

/// unscale_grads_ of the gradients set on `params` (their order kept, for the overflow record). False, with
/// nothing done, when a parameter or gradient is a tensor subclass (FSDP2's DTensor): Python then hands over
/// the local shards itself.
bool unscale_params(GradScaler& scaler, int64_t key, at::TensorList params);

/// prepare_scaled_step of the gradients set on `params`; nullopt, with nothing done, as unscale_params.
std::optional<GradScaler::ScaledStep> prepare_scaled_step_params(GradScaler& scaler, int64_t key,
                                                                 at::TensorList params);

/// Registers torch.classes.mixprec.Monitor (csrc/monitor.cpp) into `m`.
void register_monitor_class(torch::Library& m);

}  // namespace mixprec::detail
