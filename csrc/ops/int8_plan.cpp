#include "ops/int8_plan.h"

#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <string>
#include <string_view>

#include "ops/cast_plan.h"

namespace mixprec::detail {

namespace {

constexpr int64_t kMaxK = 131071;  // 131071 * 128^2 < 2^31: no int32 sum of int8 products overflows

// A scale of one element or of `len` elements along one axis, as a [1, 1], [len, 1] or [1, len] view.
at::Tensor scale_view(const char* op, const char* name, const at::Tensor& s, int64_t len, bool rows, c10::Device device) {
  TORCH_CHECK(s.defined(), op, ": ", name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK(s.layout() == at::kStrided, op, ": ", name, " must be a dense tensor, got layout ", s.layout());
  TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", s.scalar_type());
  TORCH_CHECK(s.device() == device, op, ": ", name, " is on ", s.device(), " but the operands are on ", device);
  if (s.numel() == 1 && s.dim() <= 2) return s.reshape({1, 1});
  const bool fits = rows ? (s.dim() == 2 && s.size(0) == len && s.size(1) == 1) || (s.dim() == 1 && s.size(0) == len)
                         : (s.dim() == 2 && s.size(0) == 1 && s.size(1) == len) || (s.dim() == 1 && s.size(0) == len);
  TORCH_CHECK(fits, op, ": ", name, " must have one element (per tensor) or shape ",
              rows ? "[" + std::to_string(len) + ", 1] (one per row of a)" : "[1, " + std::to_string(len) + "] (one per column of b)",
              ", got ", s.sizes());
  return rows ? s.reshape({len, 1}) : s.reshape({1, len});
}


}  // namespace

void check_int8_operand(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.defined(), op, ": ", name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK(x.layout() == at::kStrided, op, ": ", name, " must be a dense tensor, got layout ", x.layout());
  TORCH_CHECK(x.scalar_type() == at::kChar, op, ": ", name, " must be int8, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be a 2-D matrix, got ", x.dim(), " dimensions");
}

Int8Input check_int8_quantize(const at::Tensor& input, int64_t block_rows, int64_t block_cols,
                              c10::string_view rounding) {
  constexpr const char* op = "mixprec::int8_quantize";
  check_dense_float_input(input, op);
  const rounding::Mode mode = parse_rounding(std::string_view(rounding.data(), rounding.size()), op);
  const auto [rows, cols] = matrix_extent(input);
  const Fp8Blocks blocks = block_grid(rows, cols, block_rows, block_cols, op);
  return {input.contiguous(), rows, cols, mode, blocks};
}

Int8MmArgs check_int8_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv,
                         const at::Tensor& b_scale_inv, at::ScalarType out_dtype, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "mixprec::int8_mm";
  check_int8_operand(op, "a", a);
  check_int8_operand(op, "b", b);
  TORCH_CHECK(b.device() == a.device(), op, ": b is on ", b.device(), " but a is on ", a.device());
  TORCH_CHECK(a.size(1) == b.size(0), op, ": a [m, k] and b [k, n] must share k, got a ", a.sizes(), " and b ",
              b.sizes());
  TORCH_CHECK_VALUE(a.size(1) <= kMaxK, op, ": k must be at most ", kMaxK,
                    " (int32 sums of int8 products stay exact up to there), got ", a.size(1));
  check_gemm_out_dtype(out_dtype, op);
  Int8MmArgs g;
  g.m = a.size(0);
  g.k = a.size(1);
  g.n = b.size(1);
  g.a_scale_inv = scale_view(op, "a_scale_inv", a_scale_inv, g.m, true, a.device());
  g.b_scale_inv = scale_view(op, "b_scale_inv", b_scale_inv, g.n, false, a.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->layout() == at::kStrided, op, ": bias must be a dense tensor, got layout ", bias->layout());
    const at::ScalarType t = bias->scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op,
                ": bias must be float32, bfloat16 or float16, got ", t);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.n, op, ": bias must have shape [", g.n,
                "] (b's columns), got ", bias->sizes());
    TORCH_CHECK(bias->device() == a.device(), op, ": bias is on ", bias->device(), " but the operands are on ",
                a.device());
  }
  g.a = a;
  g.b = b;
  return g;
}

at::Tensor int8_mm_exact(const Int8MmArgs& g) {
  // Every product of two codes is at most 128^2 = 2^14 in magnitude, so with k <= 1024 every partial sum,
  // in any order, is an integer of at most 2^24: exact in fp32, whose GEMM is about twice float64's speed
  // and reads half the bytes. Longer sums take float64 (exact up to 2^53), and so does any sum while torch
  // may run fp32 matmuls in reduced precision.
  const bool fp32_exact = g.k <= 1024 && fp32_matmul_at_full_precision();
  const at::ScalarType exact = fp32_exact ? at::kFloat : at::kDouble;
  // Not under autocast, which a layer's forward may run in: an fp16 or bf16 mm would round the integer sums
  // (fp16 overflows past 65504).
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return at::mm(g.a.to(exact), g.b.to(exact));
}

at::Tensor int8_mm_dequantize(const at::Tensor& acc, const Int8MmArgs& g, at::ScalarType out_dtype,
                              const std::optional<at::Tensor>& bias) {
  // Each step rounds to fp32, as the fused CUDA kernel's fp32 arithmetic does; the bias (in out_dtype) is
  // added in fp32 before the one rounding to out_dtype, as torch's GEMMs with a bias epilogue do.
  at::Tensor out = acc.to(at::kFloat).mul_(g.a_scale_inv).mul_(g.b_scale_inv);
  if (bias.has_value() && bias->defined()) out.add_(bias_for_fp32_sum(*bias, out_dtype));
  return out.to(out_dtype);
}

FakeQuantArgs check_fake_quantize(const char* op, const at::Tensor& input, const at::Tensor& scale, int64_t quant_min,
                                  int64_t quant_max, int64_t block_rows, int64_t block_cols) {
  check_dense_float_input(input, op);
  TORCH_CHECK_VALUE(quant_min < quant_max && quant_min >= -32768 && quant_max <= 32768, op,
                    ": quant_min < quant_max within [-32768, 32768] required, got [", quant_min, ", ", quant_max, "]");
  const auto [rows, cols] = matrix_extent(input);
  const Fp8Blocks blocks = block_grid(rows, cols, block_rows, block_cols, op);
  TORCH_CHECK_VALUE(rows % blocks.block_rows == 0 && cols % blocks.block_cols == 0, op, ": blocks of ", block_rows,
                    " x ", block_cols, " must divide the input's [", rows, ", ", cols,
                    "] matrix view (rows = product of the leading dimensions, cols = the last one)");
  TORCH_CHECK(scale.defined(), op, ": scale must be a tensor, got an undefined tensor");
  TORCH_CHECK(scale.layout() == at::kStrided, op, ": scale must be a dense tensor, got layout ", scale.layout());
  TORCH_CHECK(scale.scalar_type() == at::kFloat, op, ": scale must be float32, got ", scale.scalar_type());
  TORCH_CHECK(scale.device() == input.device(), op, ": scale is on ", scale.device(), " but input is on ",
              input.device());
  const bool one = blocks.grid_rows == 1 && blocks.grid_cols == 1;
  TORCH_CHECK((one && scale.numel() == 1) ||
                  (scale.dim() == 2 && scale.size(0) == blocks.grid_rows && scale.size(1) == blocks.grid_cols),
              op, ": scale must have shape [", blocks.grid_rows, ", ", blocks.grid_cols,
              "] (one step per block of the input), got ", scale.sizes());
  return {input.contiguous(), scale.reshape({blocks.grid_rows, blocks.grid_cols}).contiguous(), rows, cols, blocks,
          static_cast<float>(quant_min), static_cast<float>(quant_max)};
}

at::Tensor check_fake_quantize_grad(const at::Tensor& grad, const FakeQuantArgs& f) {
  constexpr const char* op = "mixprec::fake_quantize_backward";
  TORCH_CHECK(grad.defined() && grad.layout() == at::kStrided, op, ": grad must be a dense tensor");
  TORCH_CHECK(grad.sizes() == f.input.sizes(), op, ": grad must have input's shape ", f.input.sizes(), ", got ",
              grad.sizes());
  TORCH_CHECK(grad.device() == f.input.device(), op, ": grad is on ", grad.device(), " but input is on ",
              f.input.device());
  TORCH_CHECK(grad.is_floating_point() && grad.scalar_type() != at::kDouble, op,
              ": grad must be float32, float16 or bfloat16, got ", grad.scalar_type());
  return grad.to(f.input.scalar_type()).contiguous();  // the output's dtype is the input's
}

at::Tensor sum_blocks(const at::Tensor& terms, const FakeQuantArgs& f) {
  const Fp8Blocks& b = f.blocks;
  if (f.rows * f.cols == 0) return at::zeros({b.grid_rows, b.grid_cols}, terms.options().dtype(at::kDouble));
  const at::Tensor blocks = terms.reshape({b.grid_rows, b.block_rows, b.grid_cols, b.block_cols});
  // One fp32 at::sum over a large block splits its work by the CPU's thread count, so its bits moved with it
  // (1-4 ulps, as torch's own learnable fake quantization's). Instead: fp32 sums of fixed runs along each
  // block row (many short sums, each one sequential whatever the threads), then float64 over those partials,
  // a tensor 1/run the size: as fast as the plain sum, and independent of the thread count. A block row that
  // no run of 8 or more divides is summed in float64 directly (ATen casts it first: a full copy).
  for (const int64_t run : {64, 32, 16, 8}) {
    if (b.block_cols % run != 0) continue;
    return blocks.reshape({b.grid_rows, b.block_rows, b.grid_cols, b.block_cols / run, run})
        .sum(4)
        .to(at::kDouble)
        .sum({1, 3});
  }
  return blocks.sum({1, 3}, false, at::kDouble);
}

}  // namespace mixprec::detail
