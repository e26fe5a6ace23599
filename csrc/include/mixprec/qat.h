// Quantization-aware training from LibTorch: the one implementation of mixprec's QAT arithmetic (Python's
// mixprec.qat calls these functions through ops), QAT and converted layers for Linear and Conv2d, and
// prepare / convert for torch::nn::Sequential models.
//
// A QAT layer fake-quantizes its weight (INT8 per output channel, or INT4 [-8, 7] per channel or per group of
// input features) and its input (INT8, per token for Linear, per tensor for Conv2d) with
// mixprec::int8::fake_quantize: fp32, fp16 and bf16 alike (under autocast too), straight-through gradients,
// and LSQ gradients for learnable steps. convert() stores the codes training simulated (INT4 packed two per
// byte) with their float32 steps; a converted Linear with INT8 per-channel weights runs its product as an INT8
// GEMM on per-token INT8 activations. With fold_batchnorm, a Conv2d's following BatchNorm2d is folded into it
// (training quantizes the folded weight; convert leaves no BatchNorm).
#pragma once

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/serialize/archive.h>

#include "mixprec/nn.h"

#include <cstdint>
#include <functional>
#include <optional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

namespace mixprec::qat {

struct QATConfig {
  int64_t weight_bits = 8;                        // 8: codes in [-127, 127]; 4: [-8, 7]
  std::optional<int64_t> group_size = std::nullopt;  // none: one step per output channel; else per group (Linear)
  bool activations = true;                        // fake-quantize the inputs to INT8 (dynamic, from their amax)
  bool learnable_scales = false;                  // the weight steps are parameters (LSQ), else from the amax
  /// With `activations`: the input step is a parameter ("input_step", [1], one step per tensor, LSQ's
  /// gradient) instead of each batch's amax / 127. It starts at 0, meaning not set yet: the layer's first
  /// forward sets it to that batch's amax / 127 (the dynamic rule's step; under data parallelism run that
  /// forward before the ranks diverge, e.g. on the same calibration batch). convert() keeps it as a static
  /// activation scale ("input_scale"), so the converted layer needs no amax of its input.
  bool learnable_activation_scales = false;
  /// prepare(): a Conv2d directly followed by a BatchNorm2d in a Sequential is folded with it (Jacob et al.,
  /// 2018): the QAT layer quantizes the folded weight W * gamma / sqrt(running_var + eps), the one the
  /// converted layer will hold, and takes the BatchNorm as its child "bn" (its entry becomes an Identity), so
  /// training still normalizes with batch statistics; convert() folds it away into the integer convolution. A
  /// BatchNorm with a zero gamma (zero_init_residual) is refused: the fold divides by it.
  bool fold_batchnorm = false;
};

/// The checks every QAT layer runs on its config (weight bits, and learnable activation steps only with
/// activations).
void check_config(const QATConfig& config);

/// What makes a Conv2d (and the BatchNorm2d folded into it, when `bn_features` is given) unfit for QAT,
/// raised as a ValueError naming the setting: padding not given as sizes or not zero padding, a group_size
/// (Linear layers only), a BatchNorm over other channels or without running statistics, a gamma with zeros.
/// QATConv2d's constructor and Python's mixprec.qat (op `qat_check_conv2d`) both check through it.
void check_conv2d(int64_t out_channels, bool padding_as_sizes, bool zero_padding_mode,
                  std::optional<int64_t> group_size, std::optional<int64_t> bn_features = std::nullopt,
                  bool bn_running_stats = false, const torch::Tensor& bn_weight = {});

/// The weight code range of `weight_bits` (8 or 4; anything else is an error).
std::pair<int64_t, int64_t> code_range(int64_t weight_bits);

/// `x` fake-quantized to INT8 per token (rows of its [..., features] view) or per tensor, from its own amax
/// (steps amax / 127, without gradient); differentiable straight through. Keeps x's dtype.
torch::Tensor fake_quantize_input(const torch::Tensor& x, bool per_token);

/// `x` fake-quantized to INT8 per tensor with the learnable step `step` ([1] float32, used by magnitude):
/// straight through for x, LSQ's gradient (scaled by 1 / sqrt(x.numel() * 127)) for the step.
torch::Tensor fake_quantize_input(const torch::Tensor& x, const torch::Tensor& step);

/// A learnable input step's start: when `step` is 0 (not set yet), sets it in place to x's amax / 127 (the
/// dynamic per-tensor step), without gradient; an empty, all-zero or NaN batch leaves it unset. Returns whether
/// the step is set now. Reads `step` (and the amax) back, a host sync: layers call it until it returns true,
/// i.e. on their first forward, and again after loading.
bool init_input_step(const torch::Tensor& step, const torch::Tensor& x);

/// The same start without reading anything back (no host sync; torch.compile traces it): `step` becomes x's
/// amax / 127 where it is 0 and the batch has a range, and stays as it is otherwise. It costs a read of `x`
/// on every call, so layers use it only where init_input_step cannot run (inside a compiled graph).
void seed_input_step(const torch::Tensor& step, const torch::Tensor& x);

/// The steps (amax / qmax per output channel or group; float32 [out, groups]) of `weight` ([out, ...]).
torch::Tensor weight_steps(const torch::Tensor& weight, const QATConfig& config);

/// `weight` fake-quantized as `config` says, with `step` ([out, groups] float32, learnable) or, undefined, the
/// steps of its own amax. Differentiable (straight through; LSQ for a step that requires grad).
torch::Tensor fake_quantize_weight(const torch::Tensor& weight, const QATConfig& config,
                                   const torch::Tensor& step = {});

/// BatchNorm folding's factor per output channel: gamma / sqrt(running_var + eps), or 1 / sqrt(running_var + eps)
/// without affine weights (`bn_weight` undefined); float32 [out].
torch::Tensor batchnorm_factor(const torch::Tensor& bn_weight, const torch::Tensor& running_var, double eps);

/// The folded weight W * f and bias beta + (b - running_mean) * f of a convolution and the BatchNorm2d after it
/// (f = batchnorm_factor), in float32: in eval, conv(x, W) + b followed by the BatchNorm is conv(x, W * f) + that
/// bias. Undefined bias, gamma or beta count as 0, 1 and 0.
std::pair<torch::Tensor, torch::Tensor> fold_batchnorm(const torch::Tensor& weight, const torch::Tensor& bias,
                                                       const torch::Tensor& bn_weight, const torch::Tensor& bn_bias,
                                                       const torch::Tensor& running_mean,
                                                       const torch::Tensor& running_var, double eps);

/// A folded QAT convolution before its BatchNorm: conv(x, fake_quantize_weight(W * f)) / f + b, with `x` the
/// layer's input as already fake-quantized and f the current batchnorm_factor. The weight is quantized as the
/// folded layer will hold it, and the BatchNorm that follows sees the convolution's own scale (batch statistics
/// in training); in eval the pair computes the folded convolution.
torch::Tensor folded_conv2d(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                            const torch::Tensor& weight_step, const QATConfig& config, const torch::Tensor& bn_weight,
                            const torch::Tensor& running_var, double eps, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

/// What convert() stores for a weight: the codes fake_quantize_weight simulated, as int8 [out, in * ...]
/// (INT4 with an even row length: uint8 [out, in * ... / 2], element 2j in the low nibble), and the steps.
struct QuantizedWeight {
  torch::Tensor codes;
  torch::Tensor scale;
};
QuantizedWeight quantize_weight(const torch::Tensor& weight, const QATConfig& config, const torch::Tensor& step = {});

/// The weight codes * steps in fp32, as a [out, in * ...] matrix (unpacking INT4).
torch::Tensor dequantize_weight(const torch::Tensor& codes, const torch::Tensor& scale);

/// A converted Linear's forward: with INT8 per-channel weights and `activations` (and on CUDA feature counts
/// that are multiples of 8), an INT8 GEMM on per-token INT8 activations (mixprec::int8::mm), unless the input
/// needs a gradient (grad mode on and input.requires_grad(): layers trained around a converted one), which the
/// path below passes straight through as training did; otherwise the
/// dequantized weight in the compute dtype (autocast's, or the input's) on the fake-quantized input. Either
/// way the activations are quantized in the input's own dtype, as in training.
/// A static `input_scale` ([1], a learned input step) replaces the per-token amax: the codes
/// round(x * (1 / input_scale)) clamped to [-127, 127], as the QAT layer simulated them.
torch::Tensor quantized_linear(const torch::Tensor& input, const torch::Tensor& codes, const torch::Tensor& scale,
                               const torch::Tensor& bias, const QATConfig& config,
                               const torch::Tensor& input_scale = {});

/// A Linear trained with fake-quantized weight and input.
class QATLinearImpl : public nn::CloneableKeepingFp32<QATLinearImpl> {
 public:
  /// Takes over `other`'s parameters (the same tensors, not copies).
  explicit QATLinearImpl(const torch::nn::LinearImpl& other, QATConfig config = {});
  /// The same for a mixprec::nn::Linear (torch's Linear with an fp32 weight gradient).
  explicit QATLinearImpl(const nn::LinearImpl& other, QATConfig config = {});
  void reset() override;
  /// As torch::nn::Linear's, and the learnable steps start again from the new weight, as prepare() starts them.
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const torch::Tensor& input);
  /// The learnable steps ("weight_step", "input_step"): rounded to 16 bits they would train and convert to other
  /// values.
  bool keeps_fp32(const std::string& name) const override;
  /// After a cast (to(dtype), mixprec::apply): the weight gradient in the weight's dtype (own_dtype_grad).
  void dtype_changed() override;

  torch::nn::LinearOptions options;
  QATConfig config;
  torch::Tensor weight, bias;
  torch::Tensor weight_step;  // with learnable_scales: [out, groups], registered as "weight_step"
  torch::Tensor input_step;   // with learnable_activation_scales: [1], registered as "input_step"
  bool input_step_checked = false;  // a forward has seen input_step set; load() clears it

  /// Module::load, and a loaded input step is checked (set if 0) again at the next forward.
  void load(torch::serialize::InputArchive& archive) override;

 private:
  void register_steps();  // the learnable steps the config asks for (after the weight)
};
TORCH_MODULE(QATLinear);

/// A Conv2d (zero padding given as sizes) trained with weights fake-quantized per output channel and inputs per
/// tensor.
class QATConv2dImpl : public nn::CloneableKeepingFp32<QATConv2dImpl> {
 public:
  /// With `bn` (the BatchNorm2d after `other`), the pair is folded: see QATConfig::fold_batchnorm.
  explicit QATConv2dImpl(const torch::nn::Conv2dImpl& other, QATConfig config = {},
                         torch::nn::BatchNorm2d bn = nullptr);
  void reset() override;
  /// As torch::nn::Conv2d's (a folded layer's BatchNorm too), and the learnable steps start again from the new
  /// weight, as prepare() starts them.
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const torch::Tensor& input);
  /// As QATLinear's.
  bool keeps_fp32(const std::string& name) const override;
  void dtype_changed() override;

  torch::nn::detail::ConvNdOptions<2> options;
  QATConfig config;
  torch::Tensor weight, bias;
  torch::Tensor weight_step;
  torch::Tensor input_step;
  bool input_step_checked = false;
  torch::nn::BatchNorm2d bn{nullptr};  // folded: the child "bn"

  void load(torch::serialize::InputArchive& archive) override;
};
TORCH_MODULE(QATConv2d);

/// A converted QATLinear: buffers "weight_codes" and "weight_scale", the bias, and with learned input steps
/// "input_scale".
class QuantizedLinearImpl : public nn::CloneableKeepingFp32<QuantizedLinearImpl> {
 public:
  explicit QuantizedLinearImpl(const QATLinearImpl& layer);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const torch::Tensor& input);
  /// The scales ("weight_scale", "input_scale").
  bool keeps_fp32(const std::string& name) const override;
  // to(dtype) reaches the bias alone: the codes stay integers and the scales float32.

  /// Module::load; the next forward checks the loaded input_scale again.
  void load(torch::serialize::InputArchive& archive) override;

  QATConfig config;
  torch::Tensor weight_codes, weight_scale, bias, input_scale;
  /// A step never learned converts to input_scale 0 (so that prepare -> convert can load a converted checkpoint);
  /// the first forward after the layer was made or loaded refuses to run with it (one host read).
  bool input_scale_checked = false;
};
TORCH_MODULE(QuantizedLinear);

/// A converted QATConv2d: the convolution runs on the dequantized weight with the input quantized per tensor. A
/// folded one holds the folded weight's codes and the folded bias (the BatchNorm is gone).
class QuantizedConv2dImpl : public nn::CloneableKeepingFp32<QuantizedConv2dImpl> {
 public:
  explicit QuantizedConv2dImpl(const QATConv2dImpl& layer);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const torch::Tensor& input);
  /// The scales ("weight_scale", "input_scale").
  bool keeps_fp32(const std::string& name) const override;
  // to(dtype) reaches the bias alone: the codes stay integers and the scales float32.

  /// As QuantizedLinear's.
  void load(torch::serialize::InputArchive& archive) override;

  torch::nn::detail::ConvNdOptions<2> options;
  QATConfig config;
  std::vector<int64_t> weight_shape;
  torch::Tensor weight_codes, weight_scale, bias, input_scale;
  bool input_scale_checked = false;  // as QuantizedLinear's
};
TORCH_MODULE(QuantizedConv2d);

/// Which layers prepare() swaps: called for each Linear / Conv2d entry only (torch's, mixprec::nn::Linear, and the
/// 8-bit layers, which prepare refuses by name when the filter accepts them), with the entry's name ("3" or
/// "fc1") and the layer; none: every one. (Python's filter sees every module.)
using PrepareFilter = std::function<bool(const std::string& name, const torch::nn::Module& layer)>;

/// A Sequential like `model` (sharing its modules and parameters) whose Linear and Conv2d entries that `filter`
/// accepts are QAT layers: build the optimizer on the result. Existing parameter and buffer names stay the same
/// (learnable steps add weight_step / input_step). Only
/// the Sequential's own entries can be swapped: LibTorch modules call their children through member holders
/// (and nest Sequentials only as subclasses with a forward of their own), which no function can rewrite from
/// outside; build those layers with QATLinear / QATConv2d from the float layer in the module's constructor.
/// With fold_batchnorm, a Conv2d entry followed by a BatchNorm2d entry takes it as its child and the
/// BatchNorm's entry becomes a torch::nn::Identity (parameter names "i.bn.*").
torch::nn::Sequential prepare(const torch::nn::Sequential& model, const QATConfig& config = {},
                              const PrepareFilter& filter = nullptr);

/// A Sequential like `model` whose QAT layers are converted (integer weights plus scales).
torch::nn::Sequential convert(const torch::nn::Sequential& model);

}  // namespace mixprec::qat
