// 8-bit (and narrower) integers from LibTorch: block-scaled symmetric INT8 quantization, the INT8 GEMM with
// int32 accumulation and fused dequantization, and differentiable fake quantization for quantization-aware
// training. Each function calls its op (torch.ops.mixprec.*), so C++ and Python share one routing, and CPU
// and CUDA give the same bits.
//
// Every op sees a tensor as a [rows, cols] matrix (cols = its last dimension, rows = the product of the
// others) cut into blocks of block_rows x block_cols elements; -1 takes the whole extent. (1, -1) is per row
// (a Linear weight's output channels, or tokens), (-1, 1) per column, (1, g) groups of g along each row,
// (-1, -1) the whole tensor.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>

namespace mixprec::int8 {

struct QuantizeOptions {
  std::string rounding = "nearest";            // or "stochastic" (unbiased; seeded Philox draws per element)
  std::optional<int64_t> seed = std::nullopt;  // stochastic rounding's key; none: the device's default generator
  bool pow2_scales = false;                    // scales rounded down to powers of two (exact scale_inv)
};

/// A tensor in INT8 and the factors that dequantize it: input[r, c] ~= data[r, c] * scale_inv[r / block_rows,
/// c / block_cols].
struct Quantized {
  at::Tensor data;       // int8, shaped like the input, codes in [-127, 127]
  at::Tensor scale_inv;  // float32 [ceil(rows / block_rows), ceil(cols / block_cols)]
};

/// Symmetric INT8 quantization in one op: each block's amax, its step amax / 127, and the rounded, saturated
/// codes. An all-zero block gets scale 1; a block holding inf or NaN gets scale_inv NaN (so products that use
/// it are NaN and an overflow is not hidden), and a NaN element's code is 0. `input`: fp32, fp16 or bf16.
Quantized quantize(const at::Tensor& input, int64_t block_rows = 1, int64_t block_cols = -1,
                   const QuantizeOptions& options = {});

/// (a * a_scale_inv) @ (b * b_scale_inv) for int8 a [m, k] and b [k, n] (any strides; a transposed view is
/// free), with the products summed exactly in int32 (k <= 131071), then dequantized in fp32 as
/// (float(sum) * a_scale_inv[i]) * b_scale_inv[j], plus `bias` ([n], taken in out_dtype, added in fp32), then
/// rounded once to `out_dtype` (fp32, bf16 or fp16). a_scale_inv: one element or [m, 1]; b_scale_inv: one
/// element or [1, n]. CUDA:
/// torch::_int_mm (cuBLASLt) and one fused dequantization pass; k and n must be multiples of 8. CPU: an exact
/// GEMM of the codes (fp32 while every sum stays within 2^24, i.e. k <= 1024; float64 beyond); both give the
/// same bits.
at::Tensor mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv, const at::Tensor& b_scale_inv,
              at::ScalarType out_dtype = at::kFloat, const std::optional<at::Tensor>& bias = std::nullopt);

/// Fake quantization for QAT, differentiable: y = clamp(round(x / s), quant_min, quant_max) * s per block, with
/// x / s computed as x * (1 / s) and rounded half to even (torch::fake_quantize_per_channel_affine's arithmetic
/// with zero point 0), `scale` an fp32 [grid_rows, grid_cols] tensor of positive steps (one element for a
/// single block). The gradient passes straight through where the rounded value lies in the range (zero
/// outside); when `scale` requires grad it gets LSQ's gradient (round(x/s) - x/s inside the range, quant_min
/// or quant_max outside, times the incoming gradient), summed per block and multiplied by `grad_factor`.
/// fp32, fp16 and bf16 inputs keep their dtype (under autocast too); a NaN input stays NaN. The blocks must
/// divide the matrix view.
at::Tensor fake_quantize(const at::Tensor& input, const at::Tensor& scale, int64_t quant_min, int64_t quant_max,
                         int64_t block_rows = -1, int64_t block_cols = -1, double grad_factor = 1.0);

}  // namespace mixprec::int8
