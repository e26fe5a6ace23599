// What the CPU and CUDA kernels of the FP8 ops share: argument checks (same messages on both backends,
// raised before anything is written), the matrix view every FP8 kernel walks, and the outputs.
//
// Every FP8 op sees its input as a row-major [rows, cols] matrix: cols is the last dimension and rows the
// product of the others (a 0-dim tensor is [1, 1]), which is how a Linear's activations, weights and
// gradients enter a GEMM. A non-contiguous input is read through a contiguous copy.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <utility>

#include "ops/fp8.h"
#include "ops/rounding.h"

namespace mixprec::detail {

/// torch.float8_e4m3fn -> E4M3, torch.float8_e5m2 -> E5M2; anything else is an error naming `op`.
fp8::Format parse_fp8_dtype(at::ScalarType dtype, const char* op);

/// The checked input of a quantize op, as the kernels walk it.
struct Fp8Input {
  at::Tensor input;  // contiguous, fp32 / fp16 / bf16
  int64_t rows;
  int64_t cols;
  fp8::Format format;
  rounding::Mode mode;
};

/// fp8_quantize: input dense fp32/fp16/bf16; scale a one-element fp32 tensor on input's device.
Fp8Input check_fp8_quantize(const at::Tensor& input, const at::Tensor& scale, at::ScalarType dtype,
                            c10::string_view rounding);

/// fp8_quantize's outputs: data shaped like input; data_t [cols, rows] when `transpose`, else empty [0];
/// amax a 0-dim fp32 tensor. All on the input's device.
struct Fp8QuantizeOutputs {
  at::Tensor data;
  at::Tensor data_t;
  at::Tensor amax;
};
Fp8QuantizeOutputs empty_fp8_quantize_outputs(const Fp8Input& in, at::ScalarType dtype, bool transpose);

/// A block scaling layout: blocks of block_rows x block_cols elements of the [rows, cols] matrix (the
/// last blocks of a row or column may be partial), grid_rows x grid_cols of them.
struct Fp8Blocks {
  int64_t block_rows;
  int64_t block_cols;
  int64_t grid_rows;
  int64_t grid_cols;
};

/// Shared with the INT8 ops: `input` must be a dense fp32 / fp16 / bf16 tensor (the message names `op`).
void check_dense_float_input(const at::Tensor& input, const char* op);

/// The [rows, cols] matrix view's extents: cols the last dimension, rows the product of the others.
/// Templated on the integer so that the Meta kernels (ops/meta.cpp, c10::SymInt sizes under torch.compile's
/// dynamic shapes) describe outputs by the rule the kernels allocate them by.
template <typename Int>
std::pair<Int, Int> matrix_extent_of(c10::ArrayRef<Int> sizes) {
  Int rows = 1, cols = 1;
  if (!sizes.empty()) {
    cols = sizes.back();
    for (size_t d = 0; d + 1 < sizes.size(); ++d) rows = rows * sizes[d];
  }
  return {rows, cols};
}
inline std::pair<int64_t, int64_t> matrix_extent(const at::Tensor& input) { return matrix_extent_of(input.sizes()); }

/// How many blocks of `block` elements (-1: the whole extent, one block even when empty) cover `extent`.
template <typename Int>
Int grid_extent(const Int& extent, int64_t block) {
  return block == -1 ? Int(1) : (extent + (block - 1)) / block;
}

/// block_rows / block_cols must each be positive or -1 (the whole extent); the message names `op`.
void check_block_sizes(int64_t block_rows, int64_t block_cols, const char* op);

/// A GEMM's out_dtype (fp8_gemm, int8_mm): float32, bfloat16 or float16.
void check_gemm_out_dtype(at::ScalarType out_dtype, const char* op);

/// The blocks of block_rows x block_cols (each positive, or -1 for the whole extent) over [rows, cols].
Fp8Blocks block_grid(int64_t rows, int64_t cols, int64_t block_rows, int64_t block_cols, const char* op);

/// fp8_quantize_blockwise: block_rows / block_cols are positive or -1 (the whole extent); margin in [0, 32].
Fp8Input check_fp8_blockwise(const at::Tensor& input, at::ScalarType dtype, int64_t block_rows, int64_t block_cols,
                             int64_t margin, c10::string_view rounding, Fp8Blocks& blocks);

/// How delayed scaling reduces the amax history.
enum class AmaxAlgo : int { Max = 0, MostRecent = 1 };

/// fp8_update_scales_: amax_history a contiguous fp32 [history, n] matrix (history >= 1), scale and
/// scale_inv contiguous fp32 [n] vectors, all on one device; algo "max" or "most_recent"; margin in [0, 32];
/// `turn` (if given) a one-element fp32 tensor on that device, apart from the others, and side 0 or 1.
AmaxAlgo check_fp8_update_scales(const at::Tensor& amax_history, const at::Tensor& scale,
                                 const at::Tensor& scale_inv, at::ScalarType dtype, c10::string_view algo,
                                 int64_t margin, const std::optional<at::Tensor>& turn, int64_t side);

/// How a scale_inv tensor covers its [rows, k] GEMM operand: blocks of block_rows x block_cols elements.
struct Fp8ScaleLayout {
  int64_t block_rows = 0;
  int64_t block_cols = 0;
  bool per_tensor = false;  // one element: the whole operand is one block
};

/// The checked operands of fp8_gemm / fp8_gemm_accum_: a [m, k] and b [n, k] FP8 matrices (row-major,
/// contiguous), each with its scale_inv layout. out = dequant(a) @ dequant(b)^T, shape [m, n].
struct Fp8GemmArgs {
  at::Tensor a, b, a_scale_inv, b_scale_inv;
  Fp8ScaleLayout a_layout, b_layout;
  int64_t m, n, k;
};

/// An FP8 GEMM operand (`name` of `op`): a dense 2-D float8_e4m3fn / float8_e5m2 tensor (no sizes read: the Meta
/// kernels run it under symbolic shapes too).
void check_fp8_operand(const char* op, const char* name, const at::Tensor& x);

/// Checks shared by both GEMM ops: FP8 2-D operands on one device with equal k, and scale_inv tensors of
/// one of the layouts: one element (per tensor), [rows, 1] (per row), [rows, ceil(k / 128)] (1x128 blocks)
/// or [ceil(rows / 128), ceil(k / 128)] (128x128 blocks).
Fp8GemmArgs check_fp8_gemm(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv,
                           const at::Tensor& b_scale_inv);

/// fp8_gemm's own checks: out_dtype fp32/bf16/fp16, bias a float [n] vector on the operands' device.
void check_fp8_gemm_output(at::ScalarType out_dtype, const std::optional<at::Tensor>& bias, const Fp8GemmArgs& g);

/// fp8_gemm_accum_'s own check: out a contiguous fp32 [m, n] matrix on the operands' device.
void check_fp8_gemm_accum(const at::Tensor& out, const Fp8GemmArgs& g);

/// The operand in fp32: every code times its block's scale_inv (fp32 products).
at::Tensor dequantize(const at::Tensor& x, const at::Tensor& scale_inv, const Fp8ScaleLayout& layout);
/// fp8_dequantize's checks: `data` a 2-D FP8 matrix, `scale_inv` one of the layouts fp8_gemm takes for it.
Fp8ScaleLayout check_fp8_dequantize(const char* op, const at::Tensor& data, const at::Tensor& scale_inv);
/// dequantize on the CPU in one pass (ops/cpu/fp8.cpp: the capability's kernel per block of a row), the same
/// bits as the generic one, which converts and multiplies in two ATen passes.
at::Tensor dequantize_cpu(const at::Tensor& x, const at::Tensor& scale_inv, const Fp8ScaleLayout& layout);

/// The GEMMs through dequantization and an fp32 GEMM with fp32 accumulation (no TF32): the CPU
/// implementation and the reference every other path is tested against. The bias (bias_for_fp32_sum) joins
/// the fp32 product before the one rounding to out_dtype. Where torch may run CPU fp32 matmuls in reduced
/// precision (fp32_matmul_at_full_precision() false), the CPU sums in float64 and rounds the sum to fp32
/// once, so that a program's speed setting never turns the reference into a bf16-product GEMM.
at::Tensor emulated_fp8_gemm(const Fp8GemmArgs& g, at::ScalarType out_dtype, const std::optional<at::Tensor>& bias);
void emulated_fp8_gemm_accum_(const at::Tensor& out, const Fp8GemmArgs& g);

/// Whether torch runs fp32 matmuls at full precision: set_float32_matmul_precision("highest"), the default.
/// Where the precision was set through torch's per-backend API (torch.backends.*.fp32_precision), the
/// legacy query refuses to answer; then this says no, and callers take a path that is exact anyway.
bool fp32_matmul_at_full_precision();

/// A GEMM's bias as it joins the fp32 product: taken in `out_dtype` (as cuBLASLt's bias epilogue and
/// torch._scaled_mm take it), then widened to fp32 for the sum before the one rounding to out_dtype.
inline at::Tensor bias_for_fp32_sum(const at::Tensor& bias, at::ScalarType out_dtype) {
  return bias.to(out_dtype).to(at::kFloat);
}

}  // namespace mixprec::detail
