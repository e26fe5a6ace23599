// The one place where mixprec's op schemas are declared. Kernels register next to their code
// (TORCH_LIBRARY_IMPL in ops/cpu/*.cpp and ops/cuda/registration.cpp); the Meta kernels, which are also the
// fake kernels torch.compile and opcheck trace with, are ops/meta.cpp. Keep the argument names in step with
// csrc/include/mixprec/ops.h.
#include <torch/library.h>

TORCH_LIBRARY(mixprec, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  m.def(
      "unscale_and_check_(Tensor(a!)[] grads, Tensor(b!) found_inf, Tensor inv_scale, Tensor(c!)? amax=None) -> ()",
      tags);
  m.def(
      "unscale_and_check_sumsq_(Tensor(a!)[] grads, Tensor(b!) found_inf, Tensor inv_scale, "
      "Tensor(c!)? amax=None) -> Tensor",
      tags);
  // One row per gradient (float64): numel, zero, flush, subnormal, overflow, nonfinite, sumsq, amax, then
  // num_bins exponent bins; see ops/grad_stats_rule.h.
  m.def("grad_stats(Tensor[] grads, Tensor scale, int min_exponent=-40, int num_bins=64) -> Tensor", tags);
  // Overflow attribution's bookkeeping per step, on the device: see ops/update_scale_rule.h.
  m.def(
      "record_overflow_(Tensor(a!) record, Tensor(b!) amax, Tensor found_inf, Tensor scale, int step, int checked, "
      "Tensor(c!)? count=None) -> ()",
      tags);
  m.def(
      "update_scale_(Tensor(a!) scale, Tensor(b!) growth_tracker, Tensor(c!) hysteresis_tracker, "
      "Tensor found_inf, float growth_factor, float backoff_factor, int growth_interval, "
      "int hysteresis=1, float min_scale=0.0, float? max_scale=None, "
      "bool consecutive_hysteresis=False) -> ()",
      tags);
  m.def(
      "cast(Tensor src, ScalarType dtype, str rounding=\"nearest\", bool saturate=False, int? seed=None) -> Tensor",
      tags);
  m.def(
      "cast_(Tensor(a!)[] dst, Tensor[] src, str rounding=\"nearest\", bool saturate=False, int? seed=None) -> ()",
      tags);
  m.def("split_bf16_remainder(Tensor src) -> (Tensor, Tensor)", tags);
  m.def("merge_bf16_remainder(Tensor bf16, Tensor remainder) -> Tensor", tags);
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor(f!)[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] masters, Tensor(e!)[] steps, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool decoupled_weight_decay=True, bool maximize=False, str master_mode=\"none\", "
      "str rounding=\"nearest\", int? seed=None, Tensor? lr_tensor=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, Tensor? clip_coef=None, Tensor(g!)[]? max_exp_avg_sqs=None) -> ()",
      tags);
  // FP8 (csrc/ops/fp8.h): data = fp8(input * scale); scale_inv = 1 / scale dequantizes.
  m.def(
      "fp8_quantize(Tensor input, Tensor scale, ScalarType dtype, str rounding=\"nearest\", bool saturate=True, "
      "int? seed=None, bool transpose=False) -> (Tensor data, Tensor data_t, Tensor amax)",
      tags);
  m.def(
      "fp8_quantize_blockwise(Tensor input, ScalarType dtype, int block_rows, int block_cols, int margin=0, "
      "bool pow2_scales=False, str rounding=\"nearest\", bool saturate=True, int? seed=None) "
      "-> (Tensor data, Tensor scale_inv)",
      tags);
  m.def(
      "fp8_update_scales_(Tensor(a!) amax_history, Tensor(b!) scale, Tensor(c!) scale_inv, ScalarType dtype, "
      "str algo=\"max\", int margin=0, bool pow2_scales=False, Tensor(d!)? turn=None, int side=0, "
      "bool take_turn=True) -> ()",
      tags);
  // out = (a * a_scale_inv) @ (b * b_scale_inv)^T for FP8 a [m, k], b [n, k]; scales per tensor, row or block.
  m.def(
      "fp8_gemm(Tensor a, Tensor b, Tensor a_scale_inv, Tensor b_scale_inv, ScalarType out_dtype, "
      "Tensor? bias=None, bool use_fast_accum=False) -> Tensor",
      tags);
  m.def(
      "fp8_gemm_accum_(Tensor(a!) out, Tensor a, Tensor b, Tensor a_scale_inv, Tensor b_scale_inv) -> ()",
      tags);
  // data * scale_inv as fp32, for the scale layouts fp8_gemm takes (the GEMM emulation's operand).
  m.def("fp8_dequantize(Tensor data, Tensor scale_inv) -> Tensor", tags);
  // INT8 (csrc/ops/int8.h): per block step = amax / 127, data = round(input * (1 / step)); input ~= data * scale_inv.
  m.def(
      "int8_quantize(Tensor input, int block_rows, int block_cols, str rounding=\"nearest\", int? seed=None, "
      "bool pow2_scales=False) -> (Tensor data, Tensor scale_inv)",
      tags);
  // out = (a * a_scale_inv) @ (b * b_scale_inv) for int8 a [m, k], b [k, n]: int32 sums, fp32 dequantization.
  m.def(
      "int8_mm(Tensor a, Tensor b, Tensor a_scale_inv, Tensor b_scale_inv, ScalarType out_dtype, Tensor? bias=None) "
      "-> Tensor",
      tags);
  // Fake quantization (QAT): fake_quantize is differentiable (csrc/int8/int8.cpp, above autograd); the other
  // two are its kernels. scale_terms: the learnable scale's per-element gradient terms, or [0].
  m.def(
      "fake_quantize(Tensor input, Tensor scale, int quant_min, int quant_max, int block_rows=-1, "
      "int block_cols=-1, float grad_factor=1.0) -> Tensor",
      tags);
  m.def(
      "fake_quantize_forward(Tensor input, Tensor scale, int quant_min, int quant_max, int block_rows=-1, "
      "int block_cols=-1) -> Tensor",
      tags);
  m.def(
      "fake_quantize_backward(Tensor grad, Tensor input, Tensor scale, int quant_min, int quant_max, "
      "int block_rows, int block_cols, bool scale_grad) -> (Tensor grad_input, Tensor scale_terms)",
      tags);
  m.def("linear_wgrad_accum_(Tensor(a!) main_grad, Tensor grad_output, Tensor input) -> ()", tags);
  m.def("linear_wgrad(Tensor grad_output, Tensor input) -> Tensor", tags);
  // mixprec::nn::linear, keep_fp32_grad and own_dtype_grad (csrc/nn/linear.cpp), implemented above autograd.
  m.def("linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor", tags);
  m.def("keep_fp32_grad_(Tensor weight) -> ()");
  m.def("own_dtype_grad_(Tensor weight) -> ()");
  // mixprec::fp8::make_scaling_state: a Float8Linear's six state tensors for a recipe, on `like`'s device.
  m.def("fp8_scaling_state(str scaling, int amax_history_len, Tensor like) -> Tensor[]");
  // mixprec::fp8::check_recipe (csrc/fp8/fp8.cpp): Python's Recipe runs the C++ checks when it is built.
  m.def(
      "fp8_check_recipe(str scaling, ScalarType forward_dtype, ScalarType backward_dtype, int amax_history_len, "
      "str amax_compute_algo, int margin) -> ()");
  // mixprec::fp8::plan_state_load (csrc/fp8/fp8.cpp): Python's Float8Linear loads checkpoints by the C++ rule;
  // the result is a StateLoad (0 skip, 1 load, 2 initial turn, 3 restart, 4 partial).
  m.def("fp8_state_load_plan(str scaling, int[] numels, bool has_weight) -> int");
  // mixprec::fp8::reduce_amax (csrc/fp8/fp8.cpp) over the torch.distributed group of that name.
  m.def("fp8_reduce_amax_(Tensor(a!) forward_amax_history, Tensor(b!) backward_amax_history, str group_name) -> ()");
  // mixprec::nn::float8_linear (csrc/nn/linear.cpp): the scaling state is updated in place (delayed scaling);
  // `turn` is ScalingState::turn (None: the scales move on every training pass).
  m.def(
      "float8_linear(Tensor input, Tensor weight, Tensor? bias, Tensor(a!) forward_amax_history, "
      "Tensor(b!) forward_scale, Tensor(c!) forward_scale_inv, Tensor(d!) backward_amax_history, "
      "Tensor(e!) backward_scale, Tensor(f!) backward_scale_inv, str scaling, ScalarType forward_dtype, "
      "ScalarType backward_dtype, str amax_compute_algo, int margin, bool pow2_scales, bool fast_accum, *, "
      "bool update_state=True, Tensor(g!)? turn=None) -> Tensor");
  // The same with Float8WeightCache's five tensors: [] to fill (they are returned), or a filled list to use.
  m.def(
      "float8_linear_cached(Tensor input, Tensor weight, Tensor? bias, Tensor(a!) forward_amax_history, "
      "Tensor(b!) forward_scale, Tensor(c!) forward_scale_inv, Tensor(d!) backward_amax_history, "
      "Tensor(e!) backward_scale, Tensor(f!) backward_scale_inv, str scaling, ScalarType forward_dtype, "
      "ScalarType backward_dtype, str amax_compute_algo, int margin, bool pow2_scales, bool fast_accum, "
      "Tensor[] weight_cache, *, bool update_state=True, Tensor(g!)? turn=None) -> (Tensor, Tensor[])");
  // mixprec::nn::int8_linear (csrc/nn/int8_linear.cpp): which GEMMs run in INT8.
  m.def(
      "int8_linear(Tensor input, Tensor weight, Tensor? bias=None, bool int8_forward=True, "
      "bool int8_input_grad=True, bool int8_weight_grad=False) -> Tensor",
      tags);
  // The same with Int8WeightCache's four tensors: [] to fill (they are returned), or a filled list to use.
  m.def(
      "int8_linear_cached(Tensor input, Tensor weight, Tensor? bias, bool int8_forward, bool int8_input_grad, "
      "bool int8_weight_grad, Tensor[] weight_cache) -> (Tensor, Tensor[])");
  // mixprec::qat (csrc/qat/qat.cpp), above autograd: Python's mixprec.qat layers are these functions.
  m.def("qat_fake_quantize_input(Tensor input, bool per_token, Tensor? step=None) -> Tensor", tags);
  // Sets a learnable input step that is still 0 from the batch's amax; returns whether it did (a host read).
  m.def("qat_init_input_step_(Tensor(a!) step, Tensor input) -> bool");
  // The same without a host read (mixprec::qat::seed_input_step), for compiled graphs.
  m.def("qat_seed_input_step_(Tensor(a!) step, Tensor input) -> ()");
  // Whether a converted layer's input_scale is set (not 0: a step never learned); one host read.
  m.def("qat_input_scale_set(Tensor input_scale) -> bool");
  m.def("qat_fake_quantize_weight(Tensor weight, Tensor? step, int weight_bits, int? group_size) -> Tensor", tags);
  m.def("qat_weight_steps(Tensor weight, int weight_bits, int? group_size) -> Tensor", tags);
  // mixprec::qat::check_config (csrc/qat/qat.cpp): Python's QATConfig runs the C++ checks when it is built.
  m.def("qat_check_config(int weight_bits, int? group_size, bool activations, bool learnable_activation_scales) -> ()");
  // What a checkpoint does to a QAT layer's learnable steps (csrc/qat/qat.cpp, both front doors' rule): 0 load
  // (or nothing to load), 1 restart, 2 partial.
  m.def("qat_steps_plan(bool[] in_checkpoint, bool has_weight) -> int");
  // mixprec::qat::check_conv2d: the Conv2d (and folded BatchNorm2d) checks of both front doors.
  m.def(
      "qat_check_conv2d(int out_channels, bool padding_as_sizes, bool zero_padding_mode, int? group_size, "
      "int? bn_features=None, bool bn_running_stats=False, Tensor? bn_weight=None) -> ()");
  m.def(
      "qat_quantize_weight(Tensor weight, Tensor? step, int weight_bits, int? group_size) -> (Tensor codes, "
      "Tensor scale)",
      tags);
  m.def("qat_dequantize_weight(Tensor codes, Tensor scale) -> Tensor", tags);
  // BatchNorm folding: the folded weight and bias, and a folded QAT convolution's output before its BatchNorm.
  m.def(
      "qat_fold_batchnorm(Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, Tensor running_mean, "
      "Tensor running_var, float eps) -> (Tensor, Tensor)",
      tags);
  m.def(
      "qat_folded_conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor? step, int weight_bits, Tensor? bn_weight, "
      "Tensor running_var, float eps, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor",
      tags);
  m.def(
      "qat_quantized_linear(Tensor input, Tensor codes, Tensor scale, Tensor? bias, int weight_bits, "
      "int? group_size, bool activations, Tensor? input_scale=None) -> Tensor",
      tags);
  m.def(
      "qat_quantized_conv2d(Tensor input, Tensor codes, Tensor scale, int[] weight_shape, Tensor? bias, "
      "int[] stride, int[] padding, int[] dilation, int groups, bool activations, Tensor? input_scale=None) "
      "-> Tensor",
      tags);
}
