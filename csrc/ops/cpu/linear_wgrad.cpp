// linear_wgrad_accum_ on the CPU: main_grad += grad_output^T @ input with fp32 accumulation.
//
// 16-bit operands are widened to fp32 a slab of rows at a time (so the temporary stays small however
// long the batch is) and handed to torch's fp32 GEMM with beta = 1: the products of two 16-bit values
// are exact in fp32 and every sum is an fp32 sum, the semantics of the CUDA cuBLASLt path.
#include <ATen/ops/addmm.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/checks.h"

namespace mixprec::cpu {
namespace {

// Elements of widened grad_output + input per slab (64 MiB of fp32).
constexpr int64_t kSlabElements = int64_t{1} << 24;

void linear_wgrad_accum_cpu(const at::Tensor& main_grad, const at::Tensor& grad_output, const at::Tensor& input) {
  detail::check_wgrad_args(main_grad, grad_output, input);
  if (main_grad.numel() == 0 || grad_output.numel() == 0) {
    return;  // nothing to add (an empty batch adds zero)
  }
  const at::Tensor go = detail::as_row_matrix(grad_output);
  const at::Tensor x = detail::as_row_matrix(input);
  const int64_t rows = go.size(0);
  if (go.scalar_type() == at::kFloat) {
    main_grad.addmm_(go.t(), x);
    return;
  }
  const int64_t slab = std::max<int64_t>(1, kSlabElements / (go.size(1) + x.size(1)));
  for (int64_t r = 0; r < rows; r += slab) {
    const int64_t n = std::min(slab, rows - r);
    main_grad.addmm_(go.narrow(0, r, n).to(at::kFloat).t(), x.narrow(0, r, n).to(at::kFloat));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CPU, m) { m.impl("linear_wgrad_accum_", &linear_wgrad_accum_cpu); }
// Sparse inputs reach the argument checks (and their message) instead of "no kernel for SparseCPU".
TORCH_LIBRARY_IMPL(mixprec, SparseCPU, m) { m.impl("linear_wgrad_accum_", &linear_wgrad_accum_cpu); }

}  // namespace mixprec::cpu
