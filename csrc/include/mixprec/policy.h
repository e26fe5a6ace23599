// Precision policies and an RAII autocast guard for LibTorch: say "this model trains in mixed bf16, keep
// the norm layers in fp32" once (mixprec::Policy), then enter autocast with it (mixprec::AutocastGuard)
// and cast a module's storage with it (mixprec::apply). Python's mixprec.Policy wraps this same parser.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <torch/nn/module.h>

#include <string>
#include <vector>

#include "mixprec/optim.h"
#include "mixprec/version.h"

namespace mixprec {

struct Policy {
  /// The canonical name: float32, mixed_float16, mixed_bfloat16, float16, bfloat16, or the explicit
  /// "params=...,compute=...,output=..." form.
  std::string name;
  /// The dtype autocast computes in.
  c10::ScalarType compute_dtype = c10::ScalarType::Float;
  /// The dtype parameters are stored in.
  c10::ScalarType param_dtype = c10::ScalarType::Float;
  /// The dtype of the optimizer's master copy: Float for mixed policies, the param dtype (no master,
  /// pair with stochastic rounding) for pure 16-bit ones.
  c10::ScalarType master_dtype = c10::ScalarType::Float;
  /// The dtype a model's outputs should have (jmp's output dtype; the compute dtype by default).
  c10::ScalarType output_dtype = c10::ScalarType::Float;
  /// Module type names kept in fp32 (a module is kept when its type name contains one of them).
  std::vector<std::string> keep_fp32 = {"BatchNorm", "LayerNorm", "GroupNorm"};

  /// fp16 compute needs a loss scale; bf16 and fp32 do not.
  bool needs_loss_scaling() const { return compute_dtype == c10::ScalarType::Half; }
  /// The mixprec::optim::AdamW options for this policy (Python's Policy.optimizer builds the same): fp32 masters
  /// for mixed policies; for pure 16-bit ones no master copy and stochastic rounding of the updates, seeded from
  /// the default CPU generator's seed (torch::manual_seed's: runs with different seeds draw differently, and the
  /// optimizer's own counter, saved in its state, continues the draws on resume).
  optim::AdamWOptions adam_options(double lr = 1e-3) const;
  /// Whether a module of this type name stays in fp32.
  bool keeps_fp32(const std::string& module_type) const;

  /// jmp's casts: `t` in the compute, param or output dtype if it is floating point (differentiably, as
  /// Tensor::to; the same tensor if it already has that dtype), unchanged otherwise (indices, masks). E.g.
  /// `policy.cast_to_output(model->forward(policy.cast_to_compute(x)))`.
  at::Tensor cast_to_compute(const at::Tensor& t) const;
  at::Tensor cast_to_param(const at::Tensor& t) const;
  at::Tensor cast_to_output(const at::Tensor& t) const;

  /// Parses every name users already know: ours (float32, mixed_float16, mixed_bfloat16, float16,
  /// bfloat16), Keras's (mixed_float16, mixed_bfloat16), Lightning's (32-true, 16-mixed, bf16-mixed,
  /// 16-true, bf16-true, 32, 16, bf16), Accelerate's (no, fp16, bf16) and jmp's explicit form
  /// (params=float32,compute=bfloat16,output=float32; p=, c=, o= and f32/f16/bf16 accepted). Anything
  /// else is an error that lists what is accepted.
  static Policy from_string(const std::string& name);
  static Policy float32() { return from_string("float32"); }
  static Policy mixed_float16() { return from_string("mixed_float16"); }
  static Policy mixed_bfloat16() { return from_string("mixed_bfloat16"); }
  static Policy float16() { return from_string("float16"); }
  static Policy bfloat16() { return from_string("bfloat16"); }
};

/// RAII over ATen's autocast state for one device type: on construction, autocast is enabled with the
/// policy's compute dtype (disabled for a float32 policy) and the nesting count goes up; on destruction
/// the previous enabled flag, dtype and cache setting come back exactly, and the cast cache is cleared
/// when the outermost guard exits. Thread-local like autocast itself; nestable; exception-safe.
class AutocastGuard {
 public:
  AutocastGuard(const Policy& policy, c10::DeviceType device_type);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  c10::DeviceType device_type_;
  bool prev_enabled_;
  c10::ScalarType prev_dtype_;
  bool prev_cache_enabled_;
};

/// Casts `module`'s floating-point parameters and buffers to the policy's param dtype, except those of
/// fp32-kept modules (norm layers), which become float32, and those a layer keeps exact (nn::KeepsFp32: FP8
/// scaling state, QAT steps, converted layers' scales), which stay as they are. LibTorch modules have no forward hooks, so a
/// kept layer receives the previous layer's 16-bit activations as they are: ATen's batch/layer/group
/// norm kernels take 16-bit input with fp32 weights and compute in fp32, and autocast runs them in fp32.
/// Fails, naming the parameter, for parameters of non-floating dtypes.
void apply(torch::nn::Module& module, const Policy& policy);

}  // namespace mixprec
