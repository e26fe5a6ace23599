// mixprec::qat: the QAT arithmetic behind both front doors (Python's mixprec.qat calls it through the qat_*
// ops registered at the end), the QAT and converted layers, and prepare / convert for Sequential models.
#include "mixprec/qat.h"

#include <ATen/autocast_mode.h>
#include <torch/library.h>
#include <torch/nn/functional/conv.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "mixprec/int8.h"
#include "nn/linear_detail.h"

namespace mixprec::qat {
namespace {
// The fake-quantized weight's gradient is formed in the weight's dtype, so a QAT layer has torch's gradient dtype
// (and works under DDP, which buckets gradients in the parameters' dtype), whatever an earlier layer pinned (an
// fp32 gradient of mixprec::nn::Linear) and through casts: Python's layers follow the same rule.
void own_dtype_grad_of(const torch::Tensor& weight) {
  if (weight.is_leaf() && weight.grad_dtype().has_value() && *weight.grad_dtype() != weight.scalar_type()) {
    nn::own_dtype_grad(weight);
  }
}

using ConvOptions = torch::nn::detail::ConvNdOptions<2>;

constexpr float kTiny = FLT_MIN;  // the step of an all-zero block: its codes stay 0 and 1 / step is finite

// A dimension's size, also under torch.compile's symbolic shapes (which it then specializes to: used for weights'
// and feature counts, whose sizes are fixed, never for a token count). Emptiness is asked as sym_numel() == 0,
// which does not specialize the count.
int64_t size_of(const torch::Tensor& t, int64_t dim) { return t.sym_size(dim).guard_int(__FILE__, __LINE__); }
int64_t numel_of(const torch::Tensor& t) { return t.sym_numel().guard_int(__FILE__, __LINE__); }

// `value` as a float32 tensor on `like`'s device. Dividing by it is a true division everywhere: CUDA divides by a
// CPU scalar as a multiplication by its reciprocal, which can differ by an ulp from int8.h's amax / 127.
torch::Tensor on_device(float value, const torch::Tensor& like) {
  return torch::full({}, value, like.options().dtype(torch::kFloat));
}

// max |t| along `dims` (all of them when empty), in t's dtype, as max(amax, -amin): two reading passes,
// where t.abs().amax() writes |t| out and reads it back (on the CPU also 4-5x slower: 48 vs 13 ms for a bf16
// [8192, 4096]; the infinity norm took 60). Exact, and NaN propagates as through amax.
torch::Tensor abs_max(const torch::Tensor& t, at::IntArrayRef dims, bool keepdim) {
  return at::maximum(t.amax(dims, keepdim), t.amin(dims, keepdim).neg());
}

// The steps of amaxes for codes up to `qmax` (int8.h's amax / qmax, never below FLT_MIN), float32: weight steps,
// dynamic activation steps and the start of a learnable one (init_input_step and seed_input_step must give the
// same bits).
torch::Tensor steps_of(const torch::Tensor& amax, int64_t qmax = 127) {
  return amax.to(torch::kFloat).div(on_device(static_cast<float>(qmax), amax)).clamp_min(kTiny);
}

// [out, everything else]: the matrix view every weight is quantized in.
torch::Tensor weight_matrix(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() >= 1, "mixprec::qat: a weight needs at least one dimension, got a 0-dim tensor");
  return weight.reshape({size_of(weight, 0), -1});
}

// The group length along a weight row (the whole row without groups), checked to divide it.
int64_t group_length(const torch::Tensor& w2, const QATConfig& config) {
  const int64_t cols = size_of(w2, 1);
  if (!config.group_size.has_value()) return std::max<int64_t>(cols, 1);
  const int64_t g = *config.group_size;
  TORCH_CHECK_VALUE(g >= 1 && cols % g == 0, "mixprec::qat: group_size ", g, " must divide in_features ", cols);
  return g;
}

torch::Tensor pack_int4(const torch::Tensor& codes) {
  const torch::Tensor u = codes.to(torch::kShort).bitwise_and(0xF).to(torch::kByte);
  using torch::indexing::Slice;
  return u.index({Slice(), Slice(0, torch::indexing::None, 2)})
      .bitwise_or(u.index({Slice(), Slice(1, torch::indexing::None, 2)}).bitwise_left_shift(4));
}

torch::Tensor unpack_int4(const torch::Tensor& packed) {
  const torch::Tensor low = packed.bitwise_and(0xF).to(torch::kChar);
  const torch::Tensor high = packed.bitwise_right_shift(4).to(torch::kChar);
  const torch::Tensor codes = torch::stack({low, high}, -1).reshape({size_of(packed, 0), -1});
  return torch::where(codes > 7, codes - 16, codes);
}

std::vector<int64_t> vec(const torch::ExpandingArray<2>& a) {
  const c10::IntArrayRef r = a;
  return r.vec();
}

bool padding_as_sizes(const ConvOptions& options) {
  return std::holds_alternative<torch::ExpandingArray<2>>(options.padding());
}
bool zero_padding_mode(const ConvOptions& options) {
  return std::holds_alternative<torch::enumtype::kZeros>(options.padding_mode());
}

/// The padding sizes of a layer that passed check_conv2d.
std::vector<int64_t> padding_of(const ConvOptions& options) {
  TORCH_INTERNAL_ASSERT(padding_as_sizes(options) && zero_padding_mode(options), "QATConv2d was not checked");
  return vec(std::get<torch::ExpandingArray<2>>(options.padding()));
}

torch::Tensor conv2d(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& bias,
                     const ConvOptions& options) {
  return torch::conv2d(x, w, bias, vec(options.stride()), padding_of(options), vec(options.dilation()),
                       options.groups());
}

// A learned input step as a positive float32 [1, 1] (by magnitude, never below FLT_MIN, as fake_quantize_weight
// takes a learnable weight step).
torch::Tensor input_step_of(const torch::Tensor& step, const char* name) {
  TORCH_CHECK_VALUE(step.numel() == 1 && step.is_floating_point(), "mixprec::qat: ", name,
                    " must be a floating tensor of one value (a per-tensor input step), got ", step.scalar_type(), " ",
                    step.sizes());
  return step.to(torch::kFloat).abs().clamp_min(kTiny).reshape({1, 1});
}

// The activation quantization of a converted layer: a static learned step, else dynamic (per token or tensor).
torch::Tensor quantize_activations(const torch::Tensor& input, bool per_token, const torch::Tensor& input_scale) {
  if (!input_scale.defined()) return fake_quantize_input(input, per_token);
  // A constant step (the buffer needs no gradient); the input's passes straight through, as the dynamic one's.
  return fake_quantize_input(input, input_scale.detach());
}

// A converted Conv2d's forward: the dequantized weight in the compute dtype, the input quantized per tensor.
torch::Tensor quantized_conv2d(const torch::Tensor& input, const torch::Tensor& codes, const torch::Tensor& scale,
                               at::IntArrayRef weight_shape, const torch::Tensor& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool activations,
                               const torch::Tensor& input_scale) {
  const at::ScalarType dtype = nn::detail::autocast_dtype(input).value_or(input.scalar_type());
  // Quantized in the input's own dtype, then cast: what training did under autocast.
  const torch::Tensor x = (activations ? quantize_activations(input, false, input_scale) : input).to(dtype);
  const torch::Tensor w = dequantize_weight(codes, scale.to(torch::kFloat)).reshape(weight_shape).to(dtype);
  return torch::conv2d(x, w, bias.defined() ? bias.to(dtype) : bias, stride, padding, dilation, groups);
}

}  // namespace

std::pair<int64_t, int64_t> code_range(int64_t weight_bits) {
  TORCH_CHECK_VALUE(weight_bits == 8 || weight_bits == 4, "mixprec::qat: weight_bits must be 8 or 4, got ",
                    weight_bits);
  return weight_bits == 8 ? std::pair<int64_t, int64_t>{-127, 127} : std::pair<int64_t, int64_t>{-8, 7};
}

void check_conv2d(int64_t out_channels, bool padding_as_sizes, bool zero_padding_mode,
                  std::optional<int64_t> group_size, std::optional<int64_t> bn_features, bool bn_running_stats,
                  const torch::Tensor& bn_weight) {
  TORCH_CHECK_VALUE(!group_size.has_value(), "mixprec::qat: group_size applies to Linear layers only");
  TORCH_CHECK_VALUE(padding_as_sizes && zero_padding_mode,
                    "mixprec::qat: Conv2d needs zero padding given as sizes (not \"same\"/\"valid\", padding_mode "
                    "\"zeros\"), got ", padding_as_sizes ? "sizes" : "a string", " and ",
                    zero_padding_mode ? "zeros" : "another padding_mode");
  if (!bn_features.has_value()) return;
  TORCH_CHECK_VALUE(*bn_features == out_channels && bn_running_stats,
                    "mixprec::qat: folding needs a BatchNorm2d with running statistics over the convolution's ",
                    out_channels, " output channels, got ", *bn_features, " features, running statistics ",
                    bn_running_stats ? "kept" : "not kept");
  // A meta BatchNorm (a model built on the meta device, prepared before to_empty) has no weight to check yet.
  TORCH_CHECK_VALUE(!bn_weight.defined() || bn_weight.is_meta() || !bn_weight.eq(0).any().item<bool>(),
                    "mixprec::qat: folding divides by the BatchNorm's weight (gamma), and some of its channels are "
                    "0 (e.g. zero_init_residual); fold before zero-initialising it, or leave this pair unfolded "
                    "(filter)");
}

void check_config(const QATConfig& config) {
  code_range(config.weight_bits);
  TORCH_CHECK_VALUE(!config.group_size.has_value() || *config.group_size >= 1,
                    "mixprec::qat: group_size must be a positive number of input features or none, got ",
                    config.group_size.value_or(0));
  TORCH_CHECK_VALUE(!config.learnable_activation_scales || config.activations,
                    "mixprec::qat: learnable_activation_scales needs activations (it learns their step)");
}

// A per-tensor fake quantization is element-wise: a channels_last activation (a QATConv2d's input after
// .to(memory_format=torch.channels_last)) is walked in its memory order, through the NHWC view that is contiguous,
// and comes back channels_last, so the convolution after it runs in the layout torch's would. Which layout a
// tensor contiguous in both (one channel, or 1x1 spatial) is in, torch's own rule decides (suggest_memory_format:
// what its convolution follows). Symbolic strides: under dynamic shapes these questions guard, not throw.
template <typename FakeQuantize>
torch::Tensor keeping_channels_last(const torch::Tensor& x, FakeQuantize&& fake_quantize) {
  const bool channels_last = x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                             x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  if (!channels_last) return fake_quantize(x);
  return fake_quantize(x.permute({0, 2, 3, 1})).permute({0, 3, 1, 2});
}

// An activation as the [rows, features] matrix its quantization walks (a 0-dim one as [1, 1]).
torch::Tensor activation_rows(const torch::Tensor& x) {
  return x.dim() == 0 ? x.reshape({1, 1}) : x.reshape({-1, size_of(x, -1)});
}

// fake_quantize_input from the amax of the [rows, features] view's rows (per token) or of all of it.
torch::Tensor fake_quantize_rows(const torch::Tensor& x, bool per_token) {
  const torch::Tensor m = activation_rows(x);
  const torch::Tensor a = m.detach();
  const torch::Tensor amax = per_token ? abs_max(a, {-1}, true) : abs_max(a, {}, false).reshape({1, 1});
  const torch::Tensor steps = steps_of(amax);
  return int8::fake_quantize(m, steps, -127, 127, per_token ? 1 : -1, -1).reshape_as(x);
}

torch::Tensor fake_quantize_input(const torch::Tensor& x, bool per_token) {
  if (x.sym_numel() == 0) return x;
  if (per_token) return fake_quantize_rows(x, true);
  return keeping_channels_last(x, [](const torch::Tensor& v) { return fake_quantize_rows(v, false); });
}

torch::Tensor fake_quantize_input(const torch::Tensor& x, const torch::Tensor& step) {
  const torch::Tensor s = input_step_of(step, "step");
  if (x.sym_numel() == 0) return x;
  // LSQ's gradient scale, as for weights: 1 / sqrt(elements per step * qmax). It depends on the token count, so
  // under torch.compile with dynamic shapes it specializes the graph; only asked where the step takes a
  // gradient (a converted layer's static step does not).
  const bool learns = s.requires_grad() && at::GradMode::is_enabled();
  const double grad_factor = learns ? 1.0 / std::sqrt(static_cast<double>(numel_of(x)) * 127.0) : 1.0;
  return keeping_channels_last(x, [&](const torch::Tensor& v) {
    return int8::fake_quantize(activation_rows(v), s, -127, 127, -1, -1, grad_factor).reshape_as(v);
  });
}

bool init_input_step(const torch::Tensor& step, const torch::Tensor& x) {
  // Nothing here is part of the graph: the check's arithmetic recorded nothing either, so the forward that
  // sets the step saves what every later one saves (activation checkpointing compares the counts).
  const torch::NoGradGuard no_grad;
  input_step_of(step, "step");
  // Meta tensors (shape inference, a model built on the meta device) hold no range to start the step from.
  if (step.is_meta() || x.is_meta()) return false;
  if (step.item<float>() != 0.0f) return true;
  if (x.sym_numel() == 0) return false;
  const torch::Tensor amax = abs_max(x.detach(), {}, false).to(torch::kFloat);
  // An all-zero (or NaN) batch says nothing about the range: the step stays unset for the next batch.
  const float a = amax.item<float>();
  if (!(a > 0.0f)) return false;
  step.copy_(steps_of(amax).reshape(step.sizes()));
  return true;
}

void seed_input_step(const torch::Tensor& step, const torch::Tensor& x) {
  const torch::NoGradGuard no_grad;  // as init_input_step: nothing here is part of the graph
  input_step_of(step, "step");
  if (x.sym_numel() == 0) return;
  const torch::Tensor amax = abs_max(x.detach(), {}, false).to(torch::kFloat).reshape(step.sizes());
  // init_input_step's value, where it would set one: a step still 0, and a batch whose amax is positive (not 0,
  // not NaN).
  const torch::Tensor start = steps_of(amax).to(step.scalar_type());
  step.copy_(at::where(step.eq(0).logical_and(amax.gt(0)), start, step));
}

torch::Tensor weight_steps(const torch::Tensor& weight, const QATConfig& config) {
  const int64_t qmax = code_range(config.weight_bits).second;
  const torch::Tensor w2 = weight_matrix(weight.detach());
  const int64_t g = group_length(w2, config);
  const torch::Tensor amax = abs_max(w2.reshape({size_of(w2, 0), -1, g}), {-1}, false);
  return steps_of(amax, qmax);
}

torch::Tensor fake_quantize_weight(const torch::Tensor& weight, const QATConfig& config, const torch::Tensor& step) {
  const auto [qmin, qmax] = code_range(config.weight_bits);
  const torch::Tensor w2 = weight_matrix(weight);
  const int64_t g = group_length(w2, config);
  const int64_t block_cols = config.group_size.has_value() ? g : -1;
  torch::Tensor out;
  if (step.defined()) {
    // A learnable step is used by magnitude (an optimizer may push it through zero; with a symmetric range
    // -s quantizes as s does), and never below FLT_MIN, so 1 / step stays finite.
    const torch::Tensor s = step.to(torch::kFloat).abs().clamp_min(kTiny);
    // LSQ's gradient scale: 1 / sqrt(elements per step * qmax).
    const double per_block =
        static_cast<double>(numel_of(w2)) / static_cast<double>(std::max<int64_t>(numel_of(s), 1));
    out = int8::fake_quantize(w2, s, qmin, qmax, 1, block_cols, 1.0 / std::sqrt(per_block * static_cast<double>(qmax)));
  } else {
    out = int8::fake_quantize(w2, weight_steps(weight, config), qmin, qmax, 1, block_cols);
  }
  return out.reshape_as(weight);
}

torch::Tensor batchnorm_factor(const torch::Tensor& bn_weight, const torch::Tensor& running_var, double eps) {
  TORCH_CHECK_VALUE(running_var.defined() && running_var.dim() == 1,
                    "mixprec::qat: BatchNorm folding needs the BatchNorm's running_var (track_running_stats=true)");
  // gamma / std, as torch.ao's folding divides (not gamma * rsqrt, which can differ in the last bit).
  const torch::Tensor std = running_var.to(torch::kFloat).add(eps).sqrt();
  return bn_weight.defined() ? bn_weight.to(torch::kFloat).div(std) : std.reciprocal();
}

std::pair<torch::Tensor, torch::Tensor> fold_batchnorm(const torch::Tensor& weight, const torch::Tensor& bias,
                                                       const torch::Tensor& bn_weight, const torch::Tensor& bn_bias,
                                                       const torch::Tensor& running_mean,
                                                       const torch::Tensor& running_var, double eps) {
  const torch::Tensor f = batchnorm_factor(bn_weight, running_var, eps);
  TORCH_CHECK_VALUE(weight.dim() >= 1 && size_of(weight, 0) == size_of(f, 0), "mixprec::qat: BatchNorm folding: the "
                    "convolution's ", weight.dim() >= 1 ? size_of(weight, 0) : 0, " output channels and the "
                    "BatchNorm's ", size_of(f, 0), " features differ");
  std::vector<int64_t> shape(static_cast<size_t>(weight.dim()), 1);
  shape[0] = -1;
  const torch::Tensor w = weight.to(torch::kFloat).mul(f.reshape(shape));
  torch::Tensor b = running_mean.to(torch::kFloat).neg();
  if (bias.defined()) b = b.add(bias.to(torch::kFloat));
  b = b.mul(f);
  if (bn_bias.defined()) b = b.add(bn_bias.to(torch::kFloat));
  return {w, b};
}

torch::Tensor folded_conv2d(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                            const torch::Tensor& weight_step, const QATConfig& config, const torch::Tensor& bn_weight,
                            const torch::Tensor& running_var, double eps, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const torch::Tensor f = batchnorm_factor(bn_weight, running_var, eps);
  // Folded in float32, as fold_batchnorm folds for convert(): the codes simulated here are the ones stored then.
  const torch::Tensor w = fake_quantize_weight(weight.to(torch::kFloat).mul(f.reshape({-1, 1, 1, 1})), config,
                                               weight_step);
  const torch::Tensor y = torch::conv2d(x, w.to(x.scalar_type()), {}, stride, padding, dilation, groups);
  // Back to the convolution's own scale in fp32 (f as convert() folds it, not rounded to a 16-bit output's
  // dtype), handed to the BatchNorm in the convolution's output dtype, as the unfolded pair would.
  torch::Tensor out = y.to(torch::kFloat).div(f.reshape({1, -1, 1, 1}));
  if (bias.defined()) out = out.add(bias.to(torch::kFloat).reshape({1, -1, 1, 1}));
  return out.to(y.scalar_type());
}

QuantizedWeight quantize_weight(const torch::Tensor& weight, const QATConfig& config, const torch::Tensor& step) {
  const torch::NoGradGuard no_grad;
  const auto [qmin, qmax] = code_range(config.weight_bits);
  const torch::Tensor w2 = weight_matrix(weight.detach()).to(torch::kFloat);
  group_length(w2, config);
  const torch::Tensor s = step.defined() ? step.detach().to(torch::kFloat).abs().clamp_min(kTiny).contiguous()
                                         : weight_steps(weight, config);
  // fake_quantize's rule, directly: round(w * (1 / s)) half to even (torch::round), clamped; NaN -> 0.
  const torch::Tensor inv = s.reciprocal().repeat_interleave(size_of(w2, 1) / std::max<int64_t>(size_of(s, 1), 1), 1);
  const torch::Tensor codes = w2.mul(inv).round().clamp(static_cast<double>(qmin), static_cast<double>(qmax))
                                  .nan_to_num(0.0).to(torch::kChar);
  const bool pack = config.weight_bits == 4 && size_of(w2, 1) % 2 == 0;
  return {pack ? pack_int4(codes) : codes, s};
}

torch::Tensor dequantize_weight(const torch::Tensor& codes, const torch::Tensor& scale) {
  const torch::Tensor c = (codes.scalar_type() == torch::kByte ? unpack_int4(codes) : codes).to(torch::kFloat);
  return c.mul(scale.repeat_interleave(size_of(c, 1) / std::max<int64_t>(size_of(scale, 1), 1), 1));
}

torch::Tensor quantized_linear(const torch::Tensor& input, const torch::Tensor& codes, const torch::Tensor& scale,
                               const torch::Tensor& bias, const QATConfig& config, const torch::Tensor& input_scale) {
  const at::ScalarType dtype = nn::detail::autocast_dtype(input).value_or(input.scalar_type());
  const torch::Tensor b = bias.defined() ? bias.to(dtype) : bias;
  const torch::Tensor steps = scale.to(torch::kFloat);
  const int64_t in = size_of(input, -1), out = size_of(codes, 0);
  // The INT8 GEMM where it runs: INT8 per-channel weights, INT8 activations, and on CUDA the shapes
  // cuBLASLt's INT8 kernels take. Activations are quantized in the input's own dtype, as training did
  // before autocast cast the result: the same codes.
  // Not when the input needs a gradient (layers trained around a converted one): the INT8 GEMM has no
  // backward, and the simulated path below passes the gradient straight through, as training did.
  const bool wants_grad = at::GradMode::is_enabled() && input.requires_grad();
  const bool gemm = config.weight_bits == 8 && !config.group_size.has_value() && config.activations &&
                    dtype != torch::kDouble && input.scalar_type() != torch::kDouble && !wants_grad &&
                    (input.device().is_cpu() || (in % 8 == 0 && out % 8 == 0));
  if (gemm) {
    const torch::Tensor rows = input.reshape({-1, in});
    int8::Quantized q;
    if (input_scale.defined()) {
      // The codes fake_quantize simulates with the static step: round(x * (1 / step)) half to even, clamped;
      // a NaN becomes code 0, as int8::quantize's codes do on the dynamic path.
      const torch::Tensor s = input_step_of(input_scale, "input_scale");
      q.data = rows.to(torch::kFloat).mul(s.reciprocal()).round().clamp(-127.0, 127.0).nan_to_num(0.0)
                   .to(torch::kChar);
      q.scale_inv = s.expand_symint({rows.sym_size(0), 1}).contiguous();
    } else {
      q = int8::quantize(rows, 1, -1);
    }
    std::optional<torch::Tensor> b_opt;
    if (b.defined()) b_opt = b;
    c10::SymDimVector shape(input.sym_sizes().begin(), input.sym_sizes().end());  // the token count stays symbolic
    shape.back() = out;
    return int8::mm(q.data, codes.t(), q.scale_inv, steps.reshape({1, out}), dtype, b_opt).reshape_symint(shape);
  }
  const torch::Tensor x = (config.activations ? quantize_activations(input, true, input_scale) : input).to(dtype);
  return torch::linear(x, dequantize_weight(codes, steps).to(dtype), b);
}

// ---- layers ----------------------------------------------------------------------------------------------------

namespace {

// A QAT layer's input: fake-quantized per token / per tensor from its amax, or per tensor with the learned
// step (set from the first batch that reaches it).
torch::Tensor layer_input(const torch::Tensor& input, bool per_token, const QATConfig& config,
                          const torch::Tensor& input_step, bool& checked) {
  if (!config.activations) return input;
  if (!config.learnable_activation_scales) return fake_quantize_input(input, per_token);
  if (!checked) checked = init_input_step(input_step, input);  // until a batch has set it
  return fake_quantize_input(input, input_step);
}

// A forward that raises leaves a learnable input step as it found it: the first forward sets the step from its
// batch before the GEMM or convolution can refuse that batch (a wrong shape or dtype), and a step set from a
// refused batch would never be set again (the Python layers keep it alike).
class InputStepKeeper {
 public:
  InputStepKeeper(const torch::Tensor& step, bool& checked)
      : step_(step), checked_(checked), exceptions_(std::uncaught_exceptions()) {
    if (!step.defined() || checked || step.is_meta()) return;
    const torch::NoGradGuard no_grad;
    before_ = step.detach().clone();
  }
  InputStepKeeper(const InputStepKeeper&) = delete;
  InputStepKeeper& operator=(const InputStepKeeper&) = delete;
  ~InputStepKeeper() {
    if (!before_.defined() || std::uncaught_exceptions() == exceptions_) return;
    try {
      const torch::NoGradGuard no_grad;
      step_.detach().copy_(before_);
      checked_ = false;
    } catch (...) {  // a destructor must not throw while the forward's error unwinds: that error is the one to see
    }
  }

 private:
  const torch::Tensor& step_;
  bool& checked_;
  int exceptions_;
  torch::Tensor before_;
};

torch::Tensor new_input_step(const torch::Tensor& weight) {
  return torch::zeros({1}, weight.options().dtype(torch::kFloat));
}

// A converted layer's static input scale: the learned step's magnitude. A step never set (0) converts too, as
// torch.ao's convert does without calibration, so that a model rebuilt as prepare -> convert can load a converted
// checkpoint; check_input_scale refuses to run with it.
torch::Tensor learned_input_scale(const torch::Tensor& input_step) {
  const torch::NoGradGuard no_grad;
  return input_step.detach().abs().clone();
}

// Whether a converted layer's static input scale was learned (or loaded): every entry non-zero. One host read.
bool input_scale_set(const torch::Tensor& s) { return s.ne(0).all().item<bool>(); }

// A converted layer runs only with an input scale that training learned or a checkpoint loaded: checked at the
// first forward after it was made or loaded (`checked`), where reading is possible (not on meta tensors, not while
// a CUDA graph captures).
void check_input_scale(const torch::Tensor& s, bool& checked, std::string_view layer) {
  if (checked || !s.defined() || !nn::detail::can_read(s)) return;
  TORCH_CHECK_VALUE(input_scale_set(s), "mixprec::qat::", layer, ": input_scale is 0: the QAT layer's "
                    "input_step was never set before convert; run at least one training forward before convert, or "
                    "load a converted checkpoint into this layer");
  checked = true;
}

// What a checkpoint does to a layer's learnable steps (the rule of both front doors; Python's layers ask it through
// qat_steps_plan): a checkpoint of the weight without any of the steps (a plain model's, pretrained weights loaded
// after prepare) restarts them as prepare starts them; one with part of the steps is partial (C++ refuses it,
// naming the rest; Python leaves it to torch's strict / piecewise loading).
enum class StepsLoad : int64_t { Load = 0, Restart = 1, Partial = 2 };

StepsLoad plan_steps_load(const std::vector<bool>& in_checkpoint, bool has_weight) {
  const bool none = std::none_of(in_checkpoint.begin(), in_checkpoint.end(), [](bool b) { return b; });
  const bool all = std::all_of(in_checkpoint.begin(), in_checkpoint.end(), [](bool b) { return b; });
  if (!in_checkpoint.empty() && none) return has_weight ? StepsLoad::Restart : StepsLoad::Load;
  return all ? StepsLoad::Load : StepsLoad::Partial;
}

// The learnable steps where prepare() starts them: the weight step from `weight` (the weight the layer quantizes),
// the input step at 0 (set by the next forward). In place: an optimizer built before keeps its tensors.
void restart_steps(const torch::Tensor& weight_step, const torch::Tensor& input_step, bool& input_step_checked,
                   const torch::Tensor& weight, const QATConfig& config) {
  const torch::NoGradGuard no_grad;
  if (weight_step.defined()) weight_step.copy_(weight_steps(weight, config));
  if (input_step.defined()) input_step.zero_();
  input_step_checked = false;
}

// Module::load for a QAT layer: restarted steps start from the loaded weight (`weight_of`: the weight the layer
// quantizes) and at 0 for the input step (set by the next forward); a partial archive is refused before anything
// is read.
void load_qat_layer(torch::nn::Module& layer, torch::serialize::InputArchive& archive, const char* name,
                    const QATConfig& config, torch::Tensor& weight_step, torch::Tensor& input_step,
                    bool& input_step_checked, const std::function<torch::Tensor()>& weight_of) {
  std::vector<std::string> steps;
  std::vector<bool> in_archive;
  for (const torch::Tensor* t : {&weight_step, &input_step}) {
    if (!t->defined()) continue;
    steps.emplace_back(t == &weight_step ? "weight_step" : "input_step");
    torch::Tensor probe;  // try_read into a fresh tensor only looks
    in_archive.push_back(archive.try_read(steps.back(), probe));
  }
  const StepsLoad plan = plan_steps_load(in_archive, /*has_weight=*/true);
  if (plan == StepsLoad::Partial) {
    std::string missing;
    for (size_t i = 0; i < steps.size(); ++i) {
      if (!in_archive[i]) missing += (missing.empty() ? "" : ", ") + steps[i];
    }
    TORCH_CHECK(false, "mixprec::qat::", name, "::load: the archive holds part of the QAT steps; missing: ", missing);
  }
  const bool restart = plan == StepsLoad::Restart;
  if (!restart) {
    layer.torch::nn::Module::load(archive);
  } else {
    for (auto& item : layer.named_parameters(/*recurse=*/false)) {
      if (item.key() != "weight_step" && item.key() != "input_step") archive.read(item.key(), item.value());
    }
    for (auto& item : layer.named_buffers(/*recurse=*/false)) archive.read(item.key(), item.value(), true);
    for (const auto& child : layer.named_children()) {
      torch::serialize::InputArchive child_archive;
      archive.read(child.key(), child_archive);
      child.value()->load(child_archive);
    }
    restart_steps(weight_step, input_step, input_step_checked, weight_of(), config);
  }
  input_step_checked = false;  // a loaded input step is checked (set if 0) again at the next forward
}

// The weight a QATConv2d quantizes, where its learnable steps start: its own, or folded with its BatchNorm.
torch::Tensor quantized_conv_weight(const torch::Tensor& weight, const torch::Tensor& bias,
                                    const torch::nn::BatchNorm2d& bn) {
  if (!bn) return weight;
  return fold_batchnorm(weight, bias, bn->weight, bn->bias, bn->running_mean, bn->running_var, bn->options.eps())
      .first;
}

}  // namespace

QATLinearImpl::QATLinearImpl(const torch::nn::LinearImpl& other, QATConfig config_)
    : options(other.options), config(std::move(config_)) {
  check_config(config);
  nn::detail::adopt_linear_parameters(*this, other, weight, bias);
  own_dtype_grad_of(weight);
  register_steps();
}

QATLinearImpl::QATLinearImpl(const nn::LinearImpl& other, QATConfig config_)
    : options(other.options), config(std::move(config_)) {
  check_config(config);
  weight = register_parameter("weight", other.weight);
  bias = register_parameter("bias", other.bias, /*requires_grad=*/other.bias.defined() && other.bias.requires_grad());
  own_dtype_grad_of(weight);  // mixprec::nn::Linear kept an fp32 gradient
  register_steps();
}

void QATLinearImpl::register_steps() {
  if (config.learnable_scales) {
    weight_step = register_parameter("weight_step", weight_steps(weight, config));
  } else {
    weight_steps(weight, config);  // checks the groups now, not at the first forward
  }
  if (config.learnable_activation_scales) input_step = register_parameter("input_step", new_input_step(weight));
}

void QATLinearImpl::reset() {
  // clone(): fresh tensors of the same shapes, which clone() then fills with copies of the values.
  weight = register_parameter("weight", torch::empty_like(weight));
  bias = bias.defined() ? register_parameter("bias", torch::empty_like(bias))
                        : register_parameter("bias", {}, /*requires_grad=*/false);
  if (weight_step.defined()) weight_step = register_parameter("weight_step", torch::empty_like(weight_step));
  if (input_step.defined()) input_step = register_parameter("input_step", torch::empty_like(input_step));
}

void QATLinearImpl::reset_parameters() {
  nn::detail::init_linear_parameters(weight, bias);
  restart_steps(weight_step, input_step, input_step_checked, weight, config);
}

void QATLinearImpl::load(torch::serialize::InputArchive& archive) {
  load_qat_layer(*this, archive, "QATLinear", config, weight_step, input_step, input_step_checked,
                 [this] { return weight; });
}

void QATLinearImpl::pretty_print(std::ostream& stream) const {
  stream << "mixprec::qat::QATLinear(in_features=" << options.in_features() << ", out_features=" << options.out_features()
         << ", weight_bits=" << config.weight_bits << ")";
}

torch::Tensor QATLinearImpl::forward(const torch::Tensor& input) {
  const InputStepKeeper keep(input_step, input_step_checked);
  const torch::Tensor x = layer_input(input, true, config, input_step, input_step_checked);
  return torch::linear(x, fake_quantize_weight(weight, config, weight_step), bias);
}

QATConv2dImpl::QATConv2dImpl(const torch::nn::Conv2dImpl& other, QATConfig config_, torch::nn::BatchNorm2d bn_)
    : options(other.options), config(std::move(config_)) {
  check_config(config);
  check_conv2d(options.out_channels(), padding_as_sizes(options), zero_padding_mode(options), config.group_size,
               bn_ ? std::optional<int64_t>(bn_->options.num_features()) : std::nullopt,
               bn_ && bn_->options.track_running_stats(), bn_ ? bn_->weight : torch::Tensor());
  weight = register_parameter("weight", other.weight);
  bias = options.bias() ? register_parameter("bias", other.bias) : register_parameter("bias", {}, false);
  if (bn_) bn = register_module("bn", bn_);
  if (config.learnable_scales) {
    const torch::NoGradGuard no_grad;
    weight_step = register_parameter("weight_step", weight_steps(quantized_conv_weight(weight, bias, bn), config));
  }
  if (config.learnable_activation_scales) input_step = register_parameter("input_step", new_input_step(weight));
}

void QATConv2dImpl::reset() {
  weight = register_parameter("weight", torch::empty_like(weight));
  bias = bias.defined() ? register_parameter("bias", torch::empty_like(bias)) : register_parameter("bias", {}, false);
  if (weight_step.defined()) weight_step = register_parameter("weight_step", torch::empty_like(weight_step));
  if (input_step.defined()) input_step = register_parameter("input_step", torch::empty_like(input_step));
  if (bn) bn = register_module("bn", torch::nn::BatchNorm2d(bn->options));
}

void QATConv2dImpl::reset_parameters() {
  const torch::NoGradGuard no_grad;  // the folded weight the steps start from is not part of a graph
  // torch::nn::Conv2d's initialisation is Linear's rule (kaiming_uniform_ with a = sqrt(5), the bias within
  // 1 / sqrt(fan_in)), with fan_in from the weight's shape.
  nn::detail::init_linear_parameters(weight, bias);
  if (bn) bn->reset_parameters();  // its statistics are part of the weight the steps start from
  restart_steps(weight_step, input_step, input_step_checked, quantized_conv_weight(weight, bias, bn), config);
}

void QATConv2dImpl::load(torch::serialize::InputArchive& archive) {
  load_qat_layer(*this, archive, "QATConv2d", config, weight_step, input_step, input_step_checked,
                 [this] { return quantized_conv_weight(weight, bias, bn); });
}

void QATConv2dImpl::pretty_print(std::ostream& stream) const {
  stream << "mixprec::qat::QATConv2d(" << options.in_channels() << ", " << options.out_channels()
         << ", weight_bits=" << config.weight_bits << (bn ? ", folded with its BatchNorm2d" : "") << ")";
}

torch::Tensor QATConv2dImpl::forward(const torch::Tensor& input) {
  const InputStepKeeper keep(input_step, input_step_checked);
  const torch::Tensor x = layer_input(input, false, config, input_step, input_step_checked);
  if (!bn) return conv2d(x, fake_quantize_weight(weight, config, weight_step), bias, options);
  return bn->forward(folded_conv2d(x, weight, bias, weight_step, config, bn->weight, bn->running_var,
                                   bn->options.eps(), vec(options.stride()), padding_of(options),
                                   vec(options.dilation()), options.groups()));
}

QuantizedLinearImpl::QuantizedLinearImpl(const QATLinearImpl& layer) : config(layer.config) {
  const torch::Tensor s =
      layer.input_step.defined() ? learned_input_scale(layer.input_step) : torch::Tensor();
  const QuantizedWeight q = quantize_weight(layer.weight, config, layer.weight_step);
  weight_codes = register_buffer("weight_codes", q.codes);
  weight_scale = register_buffer("weight_scale", q.scale);
  if (layer.bias.defined()) bias = register_buffer("bias", layer.bias.detach().clone());
  if (s.defined()) input_scale = register_buffer("input_scale", s);
}

void QuantizedLinearImpl::reset() {
  // clone(): buffers of the same shapes, which clone() then fills with copies of the values.
  weight_codes = register_buffer("weight_codes", torch::empty_like(weight_codes));
  weight_scale = register_buffer("weight_scale", torch::empty_like(weight_scale));
  if (bias.defined()) bias = register_buffer("bias", torch::empty_like(bias));
  if (input_scale.defined()) input_scale = register_buffer("input_scale", torch::empty_like(input_scale));
}

// LibTorch's Module::to casts every tensor, integer codes and float32 steps and scales included; these layers
// cast the others only (KeepsFp32), as Python's keep theirs. A QAT layer's weight gradient stays in the weight's
// dtype through casts (own_dtype_grad_of).
namespace {
bool is_step(const std::string& name) { return name == "weight_step" || name == "input_step"; }
bool is_scale(const std::string& name) { return name == "weight_scale" || name == "input_scale"; }
}  // namespace

bool QATLinearImpl::keeps_fp32(const std::string& name) const { return is_step(name); }
bool QATConv2dImpl::keeps_fp32(const std::string& name) const { return is_step(name); }
void QATLinearImpl::dtype_changed() { own_dtype_grad_of(weight); }
void QATConv2dImpl::dtype_changed() { own_dtype_grad_of(weight); }
bool QuantizedLinearImpl::keeps_fp32(const std::string& name) const { return is_scale(name); }
bool QuantizedConv2dImpl::keeps_fp32(const std::string& name) const { return is_scale(name); }

void QuantizedLinearImpl::pretty_print(std::ostream& stream) const {
  // INT4 codes come two to a byte (uint8); INT8 ones one per int8.
  const int64_t in_features = weight_codes.size(1) * (weight_codes.scalar_type() == torch::kByte ? 2 : 1);
  stream << "mixprec::qat::QuantizedLinear(in_features=" << in_features << ", out_features=" << weight_codes.size(0)
         << ", weight_bits=" << config.weight_bits << ")";
}

torch::Tensor QuantizedLinearImpl::forward(const torch::Tensor& input) {
  check_input_scale(input_scale, input_scale_checked, "QuantizedLinear");
  return quantized_linear(input, weight_codes, weight_scale, bias, config, input_scale);
}

void QuantizedLinearImpl::load(torch::serialize::InputArchive& archive) {
  input_scale_checked = false;
  torch::nn::Module::load(archive);
}

QuantizedConv2dImpl::QuantizedConv2dImpl(const QATConv2dImpl& layer)
    : options(layer.options), config(layer.config), weight_shape(layer.weight.sizes().vec()) {
  const torch::Tensor s =
      layer.input_step.defined() ? learned_input_scale(layer.input_step) : torch::Tensor();
  torch::Tensor w = layer.weight, b = layer.bias.defined() ? layer.bias.detach().clone() : torch::Tensor();
  if (layer.bn) {
    const torch::NoGradGuard no_grad;
    const auto& bn = *layer.bn;
    std::tie(w, b) = fold_batchnorm(layer.weight, layer.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                    bn.options.eps());
  }
  const QuantizedWeight q = quantize_weight(w, config, layer.weight_step);
  weight_codes = register_buffer("weight_codes", q.codes);
  weight_scale = register_buffer("weight_scale", q.scale);
  if (b.defined()) bias = register_buffer("bias", b);
  if (s.defined()) input_scale = register_buffer("input_scale", s);
}

void QuantizedConv2dImpl::reset() {
  weight_codes = register_buffer("weight_codes", torch::empty_like(weight_codes));
  weight_scale = register_buffer("weight_scale", torch::empty_like(weight_scale));
  if (bias.defined()) bias = register_buffer("bias", torch::empty_like(bias));
  if (input_scale.defined()) input_scale = register_buffer("input_scale", torch::empty_like(input_scale));
}

void QuantizedConv2dImpl::pretty_print(std::ostream& stream) const {
  stream << "mixprec::qat::QuantizedConv2d(" << options.in_channels() << ", " << options.out_channels()
         << ", weight_bits=" << config.weight_bits << ")";
}

void QuantizedConv2dImpl::load(torch::serialize::InputArchive& archive) {
  input_scale_checked = false;
  torch::nn::Module::load(archive);
}

torch::Tensor QuantizedConv2dImpl::forward(const torch::Tensor& input) {
  check_input_scale(input_scale, input_scale_checked, "QuantizedConv2d");
  return quantized_conv2d(input, weight_codes, weight_scale, weight_shape, bias, vec(options.stride()),
                          padding_of(options), vec(options.dilation()), options.groups(), config.activations,
                          input_scale);
}

// ---- Sequential ------------------------------------------------------------------------------------------------

torch::nn::Sequential prepare(const torch::nn::Sequential& model, const QATConfig& config, const PrepareFilter& filter) {
  torch::nn::Sequential out;
  const size_t n = model->size();
  const auto accepted = [&](const std::string& name, const torch::nn::Module& m) { return !filter || filter(name, m); };
  // The entries keep their names ("fc1", or "0" for an unnamed one), so parameter names and checkpoints still fit.
  const auto names = model->named_children();
  for (size_t i = 0; i < n; ++i) {
    std::string name = names[i].key();
    const std::shared_ptr<torch::nn::Module> m = model->ptr(i);
    const auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(m);
    const auto ours = std::dynamic_pointer_cast<nn::LinearImpl>(m);
    const auto conv = std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(m);
    const bool eight_bit = std::dynamic_pointer_cast<nn::Float8LinearImpl>(m) || std::dynamic_pointer_cast<nn::Int8LinearImpl>(m);
    // An 8-bit layer already quantizes its GEMMs another way: refused by name, not skipped silently.
    TORCH_CHECK_VALUE(!eight_bit || !accepted(name, *m), "mixprec::qat::prepare: entry '", name, "' (", m->name(),
                      ") already runs its GEMMs in 8 bits; prepare QAT before converting it, or leave it out with the "
                      "filter");
    if (linear && accepted(name, *linear)) {
      out->push_back(std::move(name), QATLinear(*linear, config));
    } else if (ours && accepted(name, *ours)) {
      out->push_back(std::move(name), QATLinear(*ours, config));
    } else if (conv && accepted(name, *conv)) {
      std::shared_ptr<torch::nn::BatchNorm2dImpl> bn;
      if (config.fold_batchnorm && i + 1 < n) bn = std::dynamic_pointer_cast<torch::nn::BatchNorm2dImpl>(model->ptr(i + 1));
      out->push_back(std::move(name),
                     QATConv2d(*conv, config, bn ? torch::nn::BatchNorm2d(bn) : torch::nn::BatchNorm2d(nullptr)));
      if (bn) {
        ++i;
        out->push_back(std::string(names[i].key()), torch::nn::Identity());  // the conv runs it now
      }
    } else {
      out->push_back(std::move(name), *(model->begin() + static_cast<std::ptrdiff_t>(i)));
    }
  }
  return out;
}

torch::nn::Sequential convert(const torch::nn::Sequential& model) {
  torch::nn::Sequential out;
  const auto names = model->named_children();
  size_t i = 0;
  for (const torch::nn::AnyModule& any : *model) {
    std::string name = names[i++].key();
    const std::shared_ptr<torch::nn::Module> m = any.ptr();
    if (auto linear = std::dynamic_pointer_cast<QATLinearImpl>(m)) {
      out->push_back(std::move(name), QuantizedLinear(*linear));
    } else if (auto conv = std::dynamic_pointer_cast<QATConv2dImpl>(m)) {
      out->push_back(std::move(name), QuantizedConv2d(*conv));
    } else {
      out->push_back(std::move(name), any);
    }
  }
  return out;
}

namespace {

QATConfig op_config(int64_t weight_bits, std::optional<int64_t> group_size, bool activations = true) {
  QATConfig c;
  c.weight_bits = weight_bits;
  c.group_size = group_size;
  c.activations = activations;
  return c;
}

}  // namespace

// Python's mixprec.qat calls these (above autograd: the fake quantization records its own node).
TORCH_LIBRARY_IMPL(mixprec, CompositeImplicitAutograd, m) {
  m.impl("qat_fake_quantize_input", [](const at::Tensor& input, bool per_token, const std::optional<at::Tensor>& step) {
    if (!step.has_value()) return fake_quantize_input(input, per_token);
    TORCH_CHECK_VALUE(!per_token, "mixprec::qat_fake_quantize_input: a learnable step is per tensor; pass "
                      "per_token=False with it");
    return fake_quantize_input(input, *step);
  });
  m.impl("qat_init_input_step_", [](const at::Tensor& step, const at::Tensor& input) {
    return init_input_step(step, input);
  });
  m.impl("qat_seed_input_step_", [](const at::Tensor& step, const at::Tensor& input) { seed_input_step(step, input); });
  m.impl("qat_input_scale_set", [](const at::Tensor& input_scale) { return input_scale_set(input_scale); });
  m.impl("qat_fake_quantize_weight", [](const at::Tensor& weight, const std::optional<at::Tensor>& step,
                                        int64_t weight_bits, std::optional<int64_t> group_size) {
    return fake_quantize_weight(weight, op_config(weight_bits, group_size), step.value_or(at::Tensor()));
  });
  m.impl("qat_check_config", [](int64_t weight_bits, std::optional<int64_t> group_size, bool activations,
                                bool learnable_activation_scales) {
    QATConfig config;
    config.weight_bits = weight_bits;
    config.group_size = group_size;
    config.activations = activations;
    config.learnable_activation_scales = learnable_activation_scales;
    check_config(config);
  });
  m.impl("qat_steps_plan", [](c10::List<bool> in_checkpoint, bool has_weight) {
    return static_cast<int64_t>(plan_steps_load(std::vector<bool>(in_checkpoint.begin(), in_checkpoint.end()),
                                                has_weight));
  });
  m.impl("qat_check_conv2d", [](int64_t out_channels, bool padding_as_sizes, bool zero_padding_mode,
                                std::optional<int64_t> group_size, std::optional<int64_t> bn_features,
                                bool bn_running_stats, const std::optional<at::Tensor>& bn_weight) {
    check_conv2d(out_channels, padding_as_sizes, zero_padding_mode, group_size, bn_features, bn_running_stats,
                 bn_weight.value_or(at::Tensor()));
  });
  m.impl("qat_weight_steps", [](const at::Tensor& weight, int64_t weight_bits, std::optional<int64_t> group_size) {
    return weight_steps(weight, op_config(weight_bits, group_size));
  });
  m.impl("qat_quantize_weight", [](const at::Tensor& weight, const std::optional<at::Tensor>& step,
                                   int64_t weight_bits, std::optional<int64_t> group_size) {
    const QuantizedWeight q = quantize_weight(weight, op_config(weight_bits, group_size), step.value_or(at::Tensor()));
    return std::make_tuple(q.codes, q.scale);
  });
  m.impl("qat_dequantize_weight", [](const at::Tensor& codes, const at::Tensor& scale) {
    return dequantize_weight(codes, scale);
  });
  m.impl("qat_quantized_linear", [](const at::Tensor& input, const at::Tensor& codes, const at::Tensor& scale,
                                    const std::optional<at::Tensor>& bias, int64_t weight_bits,
                                    std::optional<int64_t> group_size, bool activations,
                                    const std::optional<at::Tensor>& input_scale) {
    return quantized_linear(input, codes, scale, bias.value_or(at::Tensor()),
                            op_config(weight_bits, group_size, activations), input_scale.value_or(at::Tensor()));
  });
  m.impl("qat_fold_batchnorm",
         [](const at::Tensor& weight, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bn_weight,
            const std::optional<at::Tensor>& bn_bias, const at::Tensor& running_mean, const at::Tensor& running_var,
            double eps) {
           auto [w, b] = fold_batchnorm(weight, bias.value_or(at::Tensor()), bn_weight.value_or(at::Tensor()),
                                        bn_bias.value_or(at::Tensor()), running_mean, running_var, eps);
           return std::make_tuple(w, b);
         });
  m.impl("qat_folded_conv2d",
         [](const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
            const std::optional<at::Tensor>& step, int64_t weight_bits, const std::optional<at::Tensor>& bn_weight,
            const at::Tensor& running_var, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
            at::IntArrayRef dilation, int64_t groups) {
           return folded_conv2d(input, weight, bias.value_or(at::Tensor()), step.value_or(at::Tensor()),
                                op_config(weight_bits, std::nullopt), bn_weight.value_or(at::Tensor()), running_var,
                                eps, stride, padding, dilation, groups);
         });
  m.impl("qat_quantized_conv2d",
         [](const at::Tensor& input, const at::Tensor& codes, const at::Tensor& scale, at::IntArrayRef weight_shape,
            const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
            at::IntArrayRef dilation, int64_t groups, bool activations, const std::optional<at::Tensor>& input_scale) {
           return quantized_conv2d(input, codes, scale, weight_shape, bias.value_or(at::Tensor()), stride, padding,
                                   dilation, groups, activations, input_scale.value_or(at::Tensor()));
         });
}

}  // namespace mixprec::qat
