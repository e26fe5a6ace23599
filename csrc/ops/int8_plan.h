// What the CPU and CUDA kernels of the integer ops share: argument checks (same messages on both backends,
// raised before anything is written), the matrix view the kernels walk (ops/fp8_plan.h's: cols the last
// dimension, rows the product of the others), and the reference arithmetic of the INT8 GEMM.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>

#include "ops/fp8_plan.h"
#include "ops/rounding.h"

namespace mixprec::detail {

/// The checked input of int8_quantize: contiguous fp32 / fp16 / bf16, its [rows, cols] view and blocks.
struct Int8Input {
  at::Tensor input;
  int64_t rows;
  int64_t cols;
  rounding::Mode mode;
  Fp8Blocks blocks;
};

Int8Input check_int8_quantize(const at::Tensor& input, int64_t block_rows, int64_t block_cols,
                              c10::string_view rounding);

/// The checked operands of int8_mm: a [m, k] and b [k, n] int8 (any strides), with a_scale_inv one element or
/// [m, 1] (per row of a) and b_scale_inv one element or [1, n] (per column of b), fp32; k <= 131071 so that
/// int32 sums of int8 products cannot overflow.
struct Int8MmArgs {
  at::Tensor a, b, a_scale_inv, b_scale_inv;  // the scales as [m, 1] / [1, n] or [1, 1] views
  int64_t m, n, k;
};

/// An INT8 GEMM operand: a dense 2-D int8 tensor (no sizes read, as check_fp8_operand).
void check_int8_operand(const char* op, const char* name, const at::Tensor& x);

Int8MmArgs check_int8_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv,
                         const at::Tensor& b_scale_inv, at::ScalarType out_dtype, const std::optional<at::Tensor>& bias);

/// The exact integer product of int8_mm's operands, as fp32 where every partial sum stays within 2^24
/// (k <= 1024, and fp32 matmuls at full precision), else as float64 (below 2^53): the CPU path and the
/// reference of the CUDA one.
at::Tensor int8_mm_exact(const Int8MmArgs& g);

/// out = (float(acc) * a_scale_inv) * b_scale_inv + bias (the bias in out_dtype, widened), each step in
/// fp32, then one rounding to out_dtype: the dequantization both backends perform, in this order.
at::Tensor int8_mm_dequantize(const at::Tensor& acc, const Int8MmArgs& g, at::ScalarType out_dtype,
                              const std::optional<at::Tensor>& bias);

/// The checked arguments of fake_quantize_forward / _backward: `input` a dense fp32 / fp16 / bf16 tensor,
/// scale an fp32 [grid_rows, grid_cols] tensor of positive steps on its device, quant_min < quant_max within
/// [-2^15, 2^15], and blocks that divide the matrix view (each positive or -1).
struct FakeQuantArgs {
  at::Tensor input;  // contiguous
  at::Tensor scale;  // contiguous [grid_rows, grid_cols]
  int64_t rows, cols;
  Fp8Blocks blocks;
  float qmin, qmax;
};

FakeQuantArgs check_fake_quantize(const char* op, const at::Tensor& input, const at::Tensor& scale, int64_t quant_min,
                                  int64_t quant_max, int64_t block_rows, int64_t block_cols);

/// fake_quantize_backward's grad argument (the input's shape, a 16/32-bit float dtype, its device), contiguous
/// in the input's dtype.
at::Tensor check_fake_quantize_grad(const at::Tensor& grad, const FakeQuantArgs& f);

/// The per-block sums of an fp32 [rows, cols] matrix of per-element terms: [grid_rows, grid_cols], float64
/// (fp32 sums of fixed runs, then float64 over them: the same bits whatever the CPU's thread count).
at::Tensor sum_blocks(const at::Tensor& terms, const FakeQuantArgs& f);

}  // namespace mixprec::detail
