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

/// Registers torch.classes.mixprec.Monitor (csrc/monitor.cpp) into `m`.
void register_monitor_class(torch::Library& m);

}  // namespace mixprec::detail
