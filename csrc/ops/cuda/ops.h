// The CUDA implementations of mixprec's ops, defined in the .cu files and registered with the dispatcher
// in registration.cpp. The registration lives apart because torch/library.h is the costliest header
// nvcc can parse: 43 of update_scale.cu's 48 s of compile time, in three passes (device, host stub,
// host), where the C++ compiler reads it once from a precompiled header.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace mixprec::cuda {

void unscale_and_check_cuda(at::TensorList grads, const at::Tensor& found_inf, const at::Tensor& inv_scale,
                            const std::optional<at::Tensor>& amax);
at::Tensor unscale_and_check_sumsq_cuda(at::TensorList grads, const at::Tensor& found_inf,
                                        const at::Tensor& inv_scale, const std::optional<at::Tensor>& amax);

at::Tensor grad_stats_cuda(at::TensorList grads, const at::Tensor& scale, int64_t min_exponent, int64_t num_bins);

void record_overflow_cuda(const at::Tensor& record, const at::Tensor& amax, const at::Tensor& found_inf,
                          const at::Tensor& scale, int64_t step, int64_t checked,
                          const std::optional<at::Tensor>& count);
void update_scale_cuda(const at::Tensor& scale, const at::Tensor& growth_tracker, const at::Tensor& hysteresis_tracker,
                       const at::Tensor& found_inf, double growth_factor, double backoff_factor,
                       int64_t growth_interval, int64_t hysteresis, double min_scale, std::optional<double> max_scale,
                       bool consecutive_hysteresis);

void cast__cuda(at::TensorList dst, at::TensorList src, c10::string_view rounding, bool saturate,
                std::optional<int64_t> seed);
at::Tensor cast_cuda(const at::Tensor& src, at::ScalarType dtype, c10::string_view rounding, bool saturate,
                     std::optional<int64_t> seed);
std::tuple<at::Tensor, at::Tensor> split_bf16_remainder_cuda(const at::Tensor& src);
at::Tensor merge_bf16_remainder_cuda(const at::Tensor& bf16, const at::Tensor& remainder);

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList masters, at::TensorList steps, double lr, double beta1, double beta2, double eps,
                    double weight_decay, bool decoupled_weight_decay, bool maximize, c10::string_view master_mode,
                    c10::string_view rounding, std::optional<int64_t> seed,
                    const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                    std::optional<at::TensorList> max_exp_avg_sqs);

std::tuple<at::Tensor, at::Tensor, at::Tensor> fp8_quantize_cuda(const at::Tensor& input, const at::Tensor& scale,
                                                                 at::ScalarType dtype, c10::string_view rounding,
                                                                 bool saturate, std::optional<int64_t> seed,
                                                                 bool transpose);
std::tuple<at::Tensor, at::Tensor> fp8_quantize_blockwise_cuda(const at::Tensor& input, at::ScalarType dtype,
                                                               int64_t block_rows, int64_t block_cols, int64_t margin,
                                                               bool pow2_scales, c10::string_view rounding,
                                                               bool saturate, std::optional<int64_t> seed);
void fp8_update_scales__cuda(const at::Tensor& amax_history, const at::Tensor& scale, const at::Tensor& scale_inv,
                             at::ScalarType dtype, c10::string_view algo, int64_t margin, bool pow2_scales,
                             const std::optional<at::Tensor>& turn, int64_t side, bool take_turn);

std::tuple<at::Tensor, at::Tensor> int8_quantize_cuda(const at::Tensor& input, int64_t block_rows, int64_t block_cols,
                                                      c10::string_view rounding, std::optional<int64_t> seed,
                                                      bool pow2_scales);
at::Tensor int8_mm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv,
                        const at::Tensor& b_scale_inv, at::ScalarType out_dtype, const std::optional<at::Tensor>& bias);
at::Tensor fake_quantize_forward_cuda(const at::Tensor& input, const at::Tensor& scale, int64_t quant_min,
                                      int64_t quant_max, int64_t block_rows, int64_t block_cols);
std::tuple<at::Tensor, at::Tensor> fake_quantize_backward_cuda(const at::Tensor& grad, const at::Tensor& input,
                                                               const at::Tensor& scale, int64_t quant_min,
                                                               int64_t quant_max, int64_t block_rows,
                                                               int64_t block_cols, bool scale_grad);

}  // namespace mixprec::cuda
