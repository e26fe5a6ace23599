// The integer ops on the CPU: block-scaled symmetric INT8 quantization, the INT8 GEMM (exact: a float64
// GEMM of the codes, whose sums are integers below 2^53, then the fp32 dequantization), and fake
// quantization with its straight-through / learnable-scale backward. The rounding is ops/int8.h, the code
// the CUDA kernels run, so both backends give the same bits; this backend is also the reference.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "ops/cpu/cpu_dispatch.h"
#include "ops/int8.h"
#include "ops/int8_plan.h"
#include "ops/rounding.h"

namespace mixprec::cpu {
namespace {

constexpr int64_t kInt8Grain = 1 << 15;  // elements per parallel task

// Rows per parallel task for a pass over a [rows, cols] matrix.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kInt8Grain / std::max<int64_t>(cols, 1)); }

std::tuple<at::Tensor, at::Tensor> int8_quantize_cpu(const at::Tensor& input, int64_t block_rows, int64_t block_cols,
                                                     c10::string_view rounding, std::optional<int64_t> seed,
                                                     bool pow2_scales) {
  const detail::Int8Input in = detail::check_int8_quantize(input, block_rows, block_cols, rounding);
  const detail::Fp8Blocks b = in.blocks;
  at::Tensor data = at::empty(in.input.sizes(), in.input.options().dtype(at::kChar));
  at::Tensor scale_inv = at::empty({b.grid_rows, b.grid_cols}, in.input.options().dtype(at::kFloat));
  const int64_t nblocks = b.grid_rows * b.grid_cols;
  const RngKey key = in.mode == rounding::Mode::Stochastic ? stochastic_key(seed) : RngKey{0, 0};
  std::vector<float> scale(static_cast<size_t>(nblocks));
  auto* dst = data.data_ptr<int8_t>();
  float* inv = scale_inv.data_ptr<float>();
  // Both passes run the vectorised kernels of the CPU's capability (cpu_dispatch.h; int8_kernel.cpp).
  const Int8Rows m{in.input.const_data_ptr(), dst, in.input.scalar_type(), in.cols, b.block_rows, b.block_cols,
                   b.grid_cols};
  const Int8AmaxFn amax_rows = int8_amax_kernels.get("int8_quantize");
  // Every block's amax. With several block rows, tasks take whole block rows and write their own entries;
  // with one, tasks take row ranges with a table each (grid_cols entries), combined by max.
  std::vector<uint32_t> amax(static_cast<size_t>(nblocks), 0u);
  if (b.grid_rows > 1) {
    at::parallel_for(0, b.grid_rows, std::max<int64_t>(1, row_grain(in.cols) / b.block_rows), [&](int64_t g0, int64_t g1) {
      amax_rows(m, g0 * b.block_rows, std::min(in.rows, g1 * b.block_rows), amax.data());
    });
  } else {
    using Table = std::vector<uint32_t>;
    amax = at::parallel_reduce(
        0, in.rows, row_grain(in.cols), Table(static_cast<size_t>(nblocks), 0u),
        [&](int64_t r0, int64_t r1, Table table) {
          amax_rows(m, r0, r1, table.data());
          return table;
        },
        [](Table x, const Table& y) {
          for (size_t j = 0; j < x.size(); ++j) x[j] = std::max(x[j], y[j]);
          return x;
        });
  }
  for (int64_t j = 0; j < nblocks; ++j) {
    const int8::BlockScale bs = int8::block_scale(rounding::bits_float(amax[static_cast<size_t>(j)]), pow2_scales);
    scale[static_cast<size_t>(j)] = bs.scale;
    inv[j] = bs.scale_inv;
  }
  const Int8CodesFn codes_rows = int8_codes_kernels.get("int8_quantize");
  at::parallel_for(0, in.rows, row_grain(in.cols),
                   [&](int64_t r0, int64_t r1) { codes_rows(m, r0, r1, scale.data(), in.mode, key); });
  return {data, scale_inv};
}

at::Tensor int8_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv,
                       const at::Tensor& b_scale_inv, at::ScalarType out_dtype, const std::optional<at::Tensor>& bias) {
  const detail::Int8MmArgs g = detail::check_int8_mm(a, b, a_scale_inv, b_scale_inv, out_dtype, bias);
  return detail::int8_mm_dequantize(detail::int8_mm_exact(g), g, out_dtype, bias);
}

FakeQuantRows fake_quant_rows(const detail::FakeQuantArgs& f) {
  return {f.input.const_data_ptr(), f.input.scalar_type(), f.cols, f.blocks.block_rows, f.blocks.block_cols,
          f.blocks.grid_cols, f.qmin, f.qmax};
}

// Both directions run the kernels of the CPU's capability (int8_kernel.cpp): vectorised where 16 elements
// share a step or have per-column steps, the scalar rule elsewhere.
at::Tensor fake_quantize_forward_cpu(const at::Tensor& input, const at::Tensor& scale, int64_t quant_min,
                                     int64_t quant_max, int64_t block_rows, int64_t block_cols) {
  const detail::FakeQuantArgs f = detail::check_fake_quantize("mixprec::fake_quantize_forward", input, scale,
                                                              quant_min, quant_max, block_rows, block_cols);
  at::Tensor out = at::empty_like(f.input);
  const FakeQuantRows m = fake_quant_rows(f);
  const FakeQuantForwardFn kernel = fake_quantize_forward_kernels.get("fake_quantize_forward");
  const float* steps = f.scale.const_data_ptr<float>();
  void* y = out.data_ptr();
  at::parallel_for(0, f.rows, row_grain(f.cols), [&](int64_t r0, int64_t r1) { kernel(m, y, r0, r1, steps); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_backward_cpu(const at::Tensor& grad, const at::Tensor& input,
                                                              const at::Tensor& scale, int64_t quant_min,
                                                              int64_t quant_max, int64_t block_rows,
                                                              int64_t block_cols, bool scale_grad) {
  const detail::FakeQuantArgs f = detail::check_fake_quantize("mixprec::fake_quantize_backward", input, scale,
                                                              quant_min, quant_max, block_rows, block_cols);
  const at::Tensor g = detail::check_fake_quantize_grad(grad, f);
  at::Tensor grad_input = at::empty_like(f.input);
  at::Tensor terms = scale_grad ? at::empty({f.rows, f.cols}, f.input.options().dtype(at::kFloat))
                                : at::empty({0}, f.input.options().dtype(at::kFloat));
  const FakeQuantRows m = fake_quant_rows(f);
  const FakeQuantBackwardFn kernel = fake_quantize_backward_kernels.get("fake_quantize_backward");
  const float* steps = f.scale.const_data_ptr<float>();
  const void* dy = g.const_data_ptr();
  void* dx = grad_input.data_ptr();
  float* t = scale_grad ? terms.data_ptr<float>() : nullptr;
  at::parallel_for(0, f.rows, row_grain(f.cols), [&](int64_t r0, int64_t r1) { kernel(m, dy, dx, t, r0, r1, steps); });
  return {grad_input, terms};
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("int8_quantize", &int8_quantize_cpu);
  m.impl("int8_mm", &int8_mm_cpu);
  m.impl("fake_quantize_forward", &fake_quantize_forward_cpu);
  m.impl("fake_quantize_backward", &fake_quantize_backward_cpu);
}

// A sparse input routes the call here; the checks then name it.
TORCH_LIBRARY_IMPL(mixprec, SparseCPU, m) {
  m.impl("int8_quantize", &int8_quantize_cpu);
  m.impl("int8_mm", &int8_mm_cpu);
  m.impl("fake_quantize_forward", &fake_quantize_forward_cpu);
}

}  // namespace mixprec::cpu
