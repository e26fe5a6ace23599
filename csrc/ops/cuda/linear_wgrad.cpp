// linear_wgrad_accum_ on CUDA: one cuBLASLt GEMM, main_grad(fp32) = grad_output^T @ input + main_grad;
// linear_wgrad: the same GEMM with beta = 0 into a fresh fp32 tensor.
//
// cuBLASLt takes 16-bit A/B with fp32 C/D and an fp32 compute type, so the weight gradient goes from
// the 16-bit activations straight into the fp32 accumulator: no 16-bit gradient is ever formed, and
// main_grad is read and written once (torch's composition writes a 16-bit gradient, reads it back,
// reads and writes main_grad). Host code only: compiled by the C++ compiler, linked to cuBLASLt.
//
// Layout. cuBLASLt is column-major; a row-major [rows, width] matrix with row stride ld is a
// column-major [width, rows] matrix with leading dimension ld. With N = batch rows:
//   D (col-major [in, out], ld = in)  = A (input: col-major [in, N], op N) x B (grad_output: stored
//   col-major [out, N], op T) + C (= D),
// which is main_grad (row-major [out, in]) += grad_output^T @ input.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <functional>
#include <memory>

#include "ops/checks.h"
#include "ops/cuda/cublaslt.h"

namespace mixprec::cuda {
namespace {

constexpr const char* kOp = "mixprec::linear_wgrad_accum_";

// Everything that decides the descriptors and the algorithm cuBLASLt's heuristic picks.
struct PlanKey {
  int device;
  cudaDataType_t ab_type;
  int64_t m, n, k, lda, ldb, ldc;
  uint32_t align_a, align_b, align_c;  // pointer alignments in bytes (up to 16): they limit the kernels
  size_t workspace;
  bool operator==(const PlanKey& o) const {
    return device == o.device && ab_type == o.ab_type && m == o.m && n == o.n && k == o.k && lda == o.lda &&
           ldb == o.ldb && ldc == o.ldc && align_a == o.align_a && align_b == o.align_b && align_c == o.align_c &&
           workspace == o.workspace;
  }
};

struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const {
    return lt::hash_fields({key.device, key.ab_type, key.m, key.n, key.k, key.lda, key.ldb, key.ldc, key.align_a,
                            key.align_b, key.align_c, static_cast<int64_t>(key.workspace)});
  }
};

std::unique_ptr<lt::Plan> make_plan(const PlanKey& key) {
  auto plan = std::make_unique<lt::Plan>();
  // fp32 compute and scale for every operand type: fp32 inputs get a true fp32 GEMM (no TF32).
  plan->desc = lt::make_desc(kOp, CUBLAS_COMPUTE_32F, CUDA_R_32F);
  lt::set_attribute(kOp, plan->desc.get(), CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_N, "setting TRANSA");
  lt::set_attribute(kOp, plan->desc.get(), CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_T, "setting TRANSB");
  plan->a = lt::make_layout(kOp, key.ab_type, key.m, key.k, key.lda);  // input, col-major [in, N]
  plan->b = lt::make_layout(kOp, key.ab_type, key.n, key.k, key.ldb);  // grad_output, col-major [out, N], op T
  plan->c = lt::make_layout(kOp, CUDA_R_32F, key.m, key.n, key.ldc);   // main_grad, col-major [in, out]
  plan->d = lt::make_layout(kOp, CUDA_R_32F, key.m, key.n, key.ldc);
  const uint32_t align[4] = {key.align_a, key.align_b, key.align_c, key.align_c};
  lt::choose_algo(kOp, at::cuda::getCurrentCUDABlasLtHandle(), *plan, key.workspace, align,
                  c10::str("m=", key.m, ", n=", key.n, ", k=", key.k, ", lda=", key.lda, ", ldb=", key.ldb));
  return plan;
}

cudaDataType_t cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return CUDA_R_16F;
    case at::kBFloat16:
      return CUDA_R_16BF;
    default:
      return CUDA_R_32F;
  }
}

// out = go^T @ x + beta * out in one cuBLASLt GEMM (beta 0: out's old contents are never read).
void wgrad_into(const at::Tensor& out, const at::Tensor& grad_output, const at::Tensor& input, float beta) {
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor go = detail::as_row_matrix(grad_output);
  const at::Tensor x = detail::as_row_matrix(input);

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  void* workspace = at::cuda::getCUDABlasLtWorkspace();
  const size_t workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  const PlanKey key{out.get_device(),
                    cuda_type(go.scalar_type()),
                    /*m=*/x.size(1),
                    /*n=*/go.size(1),
                    /*k=*/go.size(0),
                    /*lda=*/x.stride(0),
                    /*ldb=*/go.stride(0),
                    /*ldc=*/out.size(1),
                    lt::alignment_of(x.const_data_ptr()),
                    lt::alignment_of(go.const_data_ptr()),
                    lt::alignment_of(out.const_data_ptr()),
                    workspace_size};
  const lt::Plan& plan = lt::cached_plan<PlanKey, PlanKeyHash>(key, make_plan);
  const float alpha = 1.0f;
  float* d = out.data_ptr<float>();
  lt::check(cublasLtMatmul(handle, plan.desc.get(), &alpha, x.const_data_ptr(), plan.a.get(), go.const_data_ptr(),
                           plan.b.get(), &beta, d, plan.c.get(), d, plan.d.get(), &plan.algo, workspace, workspace_size,
                           c10::cuda::getCurrentCUDAStream()),
            kOp, "cublasLtMatmul");
}

void linear_wgrad_accum_cuda(const at::Tensor& main_grad, const at::Tensor& grad_output, const at::Tensor& input) {
  detail::check_wgrad_args(main_grad, grad_output, input);
  if (main_grad.numel() == 0 || grad_output.numel() == 0) {
    return;  // nothing to add (an empty batch adds zero)
  }
  wgrad_into(main_grad, grad_output, input, 1.0f);
}

at::Tensor linear_wgrad_cuda(const at::Tensor& grad_output, const at::Tensor& input) {
  bool has_work = false;
  at::Tensor out = detail::prepare_wgrad_output(grad_output, input, has_work);
  if (has_work) wgrad_into(out, grad_output, input, 0.0f);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) {
  m.impl("linear_wgrad_accum_", &linear_wgrad_accum_cuda);
  m.impl("linear_wgrad", &linear_wgrad_cuda);
}
TORCH_LIBRARY_IMPL(mixprec, SparseCUDA, m) {
  m.impl("linear_wgrad_accum_", &linear_wgrad_accum_cuda);
  m.impl("linear_wgrad", &linear_wgrad_cuda);
}

}  // namespace mixprec::cuda
