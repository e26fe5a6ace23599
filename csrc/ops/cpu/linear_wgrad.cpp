// linear_wgrad_accum_ / linear_wgrad on the CPU: grad_output^T @ input with fp32 accumulation, added into
// an fp32 main_grad (beta = 1) or written into a fresh fp32 tensor (beta = 0).
//
// 16-bit operands are widened to fp32 a slab of rows at a time (so the temporary stays small however
// long the batch is) and handed to torch's fp32 GEMM: the products of two 16-bit values are exact in
// fp32 and every sum is an fp32 sum, the semantics of the CUDA cuBLASLt path.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/checks.h"

namespace mixprec::cpu {
namespace {

// Elements of widened grad_output + input per slab (64 MiB of fp32).
constexpr int64_t kSlabElements = int64_t{1} << 24;

// out (+)= go^T @ x over rows; `accumulate` false overwrites out (whatever it held, NaN included).
void wgrad_into(at::Tensor& out, const at::Tensor& grad_output, const at::Tensor& input, bool accumulate) {
  // The op is not differentiable (a create_graph backward uses a plain matmul instead): operands that require
  // grad must not make torch's out= GEMM refuse them.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor go = detail::as_row_matrix(grad_output);
  const at::Tensor x = detail::as_row_matrix(input);
  const int64_t rows = go.size(0);
  const bool widen = go.scalar_type() != at::kFloat;
  const int64_t slab = widen ? std::max<int64_t>(1, kSlabElements / (go.size(1) + x.size(1))) : rows;
  for (int64_t r = 0; r < rows; r += slab) {
    const int64_t n = std::min(slab, rows - r);
    const at::Tensor a = widen ? go.narrow(0, r, n).to(at::kFloat) : go.narrow(0, r, n);
    const at::Tensor b = widen ? x.narrow(0, r, n).to(at::kFloat) : x.narrow(0, r, n);
    if (accumulate || r > 0) {
      out.addmm_(a.t(), b);
    } else {
      at::mm_out(out, a.t(), b);
    }
  }
}

void linear_wgrad_accum_cpu(const at::Tensor& main_grad, const at::Tensor& grad_output, const at::Tensor& input) {
  detail::check_wgrad_args(main_grad, grad_output, input);
  if (main_grad.numel() == 0 || grad_output.numel() == 0) {
    return;  // nothing to add (an empty batch adds zero)
  }
  at::Tensor out = main_grad;
  wgrad_into(out, grad_output, input, /*accumulate=*/true);
}

at::Tensor linear_wgrad_cpu(const at::Tensor& grad_output, const at::Tensor& input) {
  bool has_work = false;
  at::Tensor out = detail::prepare_wgrad_output(grad_output, input, has_work);
  if (has_work) wgrad_into(out, grad_output, input, /*accumulate=*/false);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("linear_wgrad_accum_", &linear_wgrad_accum_cpu);
  m.impl("linear_wgrad", &linear_wgrad_cpu);
}
// Sparse inputs reach the argument checks (and their message) instead of "no kernel for SparseCPU".
TORCH_LIBRARY_IMPL(mixprec, SparseCPU, m) {
  m.impl("linear_wgrad_accum_", &linear_wgrad_accum_cpu);
  m.impl("linear_wgrad", &linear_wgrad_cpu);
}

}  // namespace mixprec::cpu
