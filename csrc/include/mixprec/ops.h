// Typed C++ entry points for mixprec's ops. Each call goes through the PyTorch dispatcher, so a
// LibTorch caller gets exactly the CPU/CUDA routing (and later autocast/tracing behaviour) that
// torch.ops.mixprec.* gives a Python caller. The schemas live in csrc/ops/registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <optional>
#include <string_view>
#include <tuple>

#include "mixprec/version.h"

namespace mixprec::ops {

/// In place, for every tensor in `grads`: `g *= inv_scale` (math in fp32; fp64 grads in fp64), and
/// `found_inf = 1` if any element of any gradient is inf or NaN. `found_inf` is never cleared, so
/// one flag can collect several calls. Gradients may mix fp32, fp16, bf16 and fp64 in one call.
/// `found_inf` and `inv_scale` are one-element float32 tensors on the gradients' device.
///
/// `amax`, when given, is a contiguous float32 vector with one entry per gradient, on the same device,
/// holding non-negative values (zeros to start): in the same pass, entry i becomes the larger of itself
/// and max|grads[i]| as read (before the multiplication), ordered NaN > inf > finite; an fp64 magnitude
/// beyond fp32's range reads as inf. Like `found_inf` it only grows, so it can collect several calls; it
/// tells which gradient overflowed (GradScaler's overflow report).
void unscale_and_check_(at::TensorList grads, const at::Tensor& found_inf, const at::Tensor& inv_scale,
                        const std::optional<at::Tensor>& amax = std::nullopt);

/// unscale_and_check_ that also returns the sum of squares of the unscaled gradients (a 0-dim fp32
/// tensor on the device, computed from the fp32 products before they are rounded to the gradient's
/// dtype), so clipping by the global norm needs no second pass over the gradients.
at::Tensor unscale_and_check_sumsq_(at::TensorList grads, const at::Tensor& found_inf,
                                    const at::Tensor& inv_scale,
                                    const std::optional<at::Tensor>& amax = std::nullopt);

/// Statistics of the gradients' values, for monitoring, from one pass (one launch on CUDA) and with no
/// host synchronisation: a float64 tensor [len(grads), 8 + num_bins] on `scale`'s device, one row per
/// gradient: numel, zeros, flushed (non-zero, but fp16 rounds g * scale to zero), subnormal (fp16 rounds
/// it to a subnormal), overflow (finite, but fp16 rounds it to inf), non-finite, sum of g^2, max |g|
/// over finite elements, then a histogram of floor(log2 |g|) over finite non-zero elements in bins
/// min_exponent .. min_exponent + num_bins - 1 (the end bins also take what lies beyond). `scale` (a
/// one-element float32 tensor) is the loss scale to judge fp16 at; the gradients hold true (unscaled)
/// values. fp32/fp16/bf16/fp64 gradients mixed, any strides.
at::Tensor grad_stats(at::TensorList grads, const at::Tensor& scale, int64_t min_exponent = -40,
                      int64_t num_bins = 64);

/// GradScaler's overflow bookkeeping for one step, on the device: when `found_inf` is non-zero, `record`
/// (float64 [3 + n]) becomes [step, scale, checked, amax...]; `amax` (float32 [n], filled by
/// unscale_and_check_) is then zeroed for the next step; `count` (int64, optional) counts overflowing steps.
void record_overflow_(const at::Tensor& record, const at::Tensor& amax, const at::Tensor& found_inf,
                      const at::Tensor& scale, int64_t step, int64_t checked,
                      const std::optional<at::Tensor>& count = std::nullopt);

/// The dynamic loss-scale state machine, in place on device tensors, with no host synchronisation.
///
/// `scale` (float32) and `growth_tracker`, `hysteresis_tracker` (int32) are one-element tensors;
/// `found_inf` is the flag filled by unscale_and_check_. On an overflow the growth counter resets and
/// one unit of the hysteresis budget is spent; when the budget is gone the scale backs off
/// (`scale *= backoff_factor`, not below `min_scale`). After `growth_interval` clean steps the scale
/// grows (`scale *= growth_factor`, not above `max_scale`, and only if the result is finite) and the
/// budget is refilled to `hysteresis`. With `consecutive_hysteresis`, every clean step refills it, so
/// only `hysteresis` overflows in a row back off (DeepSpeed's rule). With the defaults (hysteresis 1,
/// no bounds) the result is bit-identical to torch._amp_update_scale_ while the growth tracker is below
/// `growth_interval` (always, from a fresh start); a tracker at or past it (loaded, or a smaller interval
/// set since) grows at the next clean step here, where torch's `==` would count on and never grow.
///
/// `scale`, the trackers and `found_inf` must be distinct memory (refused otherwise).
void update_scale_(const at::Tensor& scale, const at::Tensor& growth_tracker,
                   const at::Tensor& hysteresis_tracker, const at::Tensor& found_inf, double growth_factor,
                   double backoff_factor, int64_t growth_interval, int64_t hysteresis = 1,
                   double min_scale = 0.0, std::optional<double> max_scale = std::nullopt,
                   bool consecutive_hysteresis = false);

/// Converts `src` (fp32, fp16 or bf16) to `dtype` (fp32, fp16 or bf16).
///   rounding "nearest": IEEE round-to-nearest-even, bit-identical to `src.to(dtype)` (NaN stays NaN).
///   rounding "stochastic": rounds up in magnitude with probability equal to the dropped fraction of an
///     ulp, so the cast is unbiased. Draws come from Philox keyed by `seed` and each element's position
///     in memory (the result is laid out like `src`): the same seed and tensor (layout included) give the
///     same bits, on CPU and CUDA alike; a transposed view of the same values draws in another order. Without a seed, the key comes
///     from torch's default generator of the device (torch.manual_seed governs it).
///   saturate: finite values beyond the target's largest finite value become +-that value, not +-inf;
///     inf and NaN pass through.
/// Widening to fp32 is exact and ignores rounding/saturate. The result is laid out like `src`.
at::Tensor cast(const at::Tensor& src, at::ScalarType dtype, std::string_view rounding = "nearest",
                bool saturate = false, std::optional<int64_t> seed = std::nullopt);

/// The multi-tensor cast: `dst[i] = cast(src[i], dst[i].dtype, ...)` in place, one CUDA launch for the
/// whole list (e.g. refreshing bf16 model params from fp32 masters). Pairs must have equal shapes; they are
/// cast in parallel, so no two dst may overlap and a src may overlap no dst but its own pair's, in full (a
/// cast in place): refused before anything is written. Stochastic draws are numbered across the list, so no
/// two elements share one.
void cast_(at::TensorList dst, at::TensorList src, std::string_view rounding = "nearest", bool saturate = false,
           std::optional<int64_t> seed = std::nullopt);

/// Splits fp32 `src` into a bf16 tensor usable as a model parameter and an int16 remainder from which
/// merge_bf16_remainder rebuilds the exact fp32 bits (4 bytes per value instead of 6 for bf16 + fp32).
/// The bf16 part is hi16 rounded to nearest with ties away from zero (not ties-to-even); finite values
/// with |x| >= 0x7f7f8000 (max bf16 + half an ulp) give +-inf there and still merge back exactly; NaN
/// gives the canonical bf16 NaN with remainder 0 and merges to a NaN (payload not kept).
std::tuple<at::Tensor, at::Tensor> split_bf16_remainder(const at::Tensor& src);

/// Rebuilds fp32 from split_bf16_remainder's two parts.
at::Tensor merge_bf16_remainder(const at::Tensor& bf16, const at::Tensor& remainder);

/// Optional on-device inputs of adam_step_ (each a one-element float32 tensor on the params' device).
struct AdamStepExtras {
  std::optional<at::Tensor> lr_tensor;   // replaces `lr` (e.g. changed between CUDA-graph replays)
  std::optional<at::Tensor> grad_scale;  // grads are divided by it inside the step
  std::optional<at::Tensor> found_inf;   // non-zero: nothing at all is written, step counts included
  std::optional<at::Tensor> clip_coef;   // grads are multiplied by it (global-norm clipping)
  /// AMSGrad: one running maximum of exp_avg_sq per row (dtype of the moments), updated in place; the
  /// denominator takes it instead of exp_avg_sq, as torch's Adam(amsgrad=True).
  std::optional<std::vector<at::Tensor>> max_exp_avg_sqs;
};

/// One fused Adam/AdamW step over whole lists, all math in fp32.
///
/// Rows are (params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], masters[i], steps[i]); steps are one-element
/// float32 tensors that advance only on applied steps. master_mode:
///   "none"      params are updated from their own values (fp32 params; or fp16/bf16 params whose
///               update is rounded with `rounding`, "stochastic" keeping small updates alive);
///   "fp32"      masters are fp32 copies; the 16-bit param is written as the rounding of its master;
///   "remainder" bf16 params with int16 remainders in `masters` (exact fp32 at 4 bytes per value).
/// Moments are fp32 or bf16 and keep their own dtype. `decoupled_weight_decay` = AdamW, else Adam (L2).
void adam_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList masters, at::TensorList steps, double lr, double beta1, double beta2, double eps,
                double weight_decay, bool decoupled_weight_decay = true, bool maximize = false,
                std::string_view master_mode = "none", std::string_view rounding = "nearest",
                std::optional<int64_t> seed = std::nullopt, const AdamStepExtras& extras = {});

/// The weight gradient of a linear layer accumulated in fp32: `main_grad += grad_output^T @ input`.
///
/// `grad_output` is [..., out_features] and `input` [..., in_features] with the same leading (batch)
/// shape and one dtype (fp32, fp16 or bf16); `main_grad` is a contiguous fp32 [out_features,
/// in_features] tensor, accumulated in place. Products and sums are fp32 (fp32 inputs: plain fp32 GEMM,
/// no TF32), so many micro-batches of 16-bit gradients add up without 16-bit rounding. On CUDA one
/// cuBLASLt GEMM with beta = 1 reads the 16-bit operands and reads and writes main_grad once. Inputs
/// whose rows are not contiguous and evenly spaced are copied to a contiguous layout first.
void linear_wgrad_accum_(const at::Tensor& main_grad, const at::Tensor& grad_output, const at::Tensor& input);

/// The same weight gradient as a fresh fp32 [out_features, in_features] tensor, `grad_output^T @ input`
/// (one cuBLASLt GEMM with beta = 0 on CUDA): what a backward returns when there is nothing to add to yet.
at::Tensor linear_wgrad(const at::Tensor& grad_output, const at::Tensor& input);

}  // namespace mixprec::ops
