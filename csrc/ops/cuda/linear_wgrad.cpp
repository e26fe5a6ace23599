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

#include <cublasLt.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "ops/checks.h"

// torch's own cuBLASLt handle (one per device and thread) and workspace (one per stream), exported by
// libtorch_cuda with these signatures since torch 2.6 (ATen/cuda/CUDAContextLight.h). They are declared
// here rather than included because that header pulls in cuSPARSE and cuSOLVER headers, which a CUDA
// toolkit without those libraries (cuBLASLt from the pip wheel) does not have. Sharing torch's
// workspace costs no memory and is stream-ordered with torch's own matmuls.
namespace at::cuda {
cublasLtHandle_t getCurrentCUDABlasLtHandle();
size_t getCUDABlasLtWorkspaceSize();
void* getCUDABlasLtWorkspace();
}  // namespace at::cuda

namespace mixprec::cuda {
namespace {

constexpr const char* kOp = "mixprec::linear_wgrad_accum_";

void check_cublas(cublasStatus_t status, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, kOp, ": ", what, " failed: ", cublasLtGetStatusString(status),
              " (status ", static_cast<int>(status), ")");
}

struct MatmulDescDeleter {
  void operator()(cublasLtMatmulDesc_t d) const { cublasLtMatmulDescDestroy(d); }
};
struct LayoutDeleter {
  void operator()(cublasLtMatrixLayout_t l) const { cublasLtMatrixLayoutDestroy(l); }
};
struct PreferenceDeleter {
  void operator()(cublasLtMatmulPreference_t p) const { cublasLtMatmulPreferenceDestroy(p); }
};
using MatmulDesc = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulDesc_t>, MatmulDescDeleter>;
using Layout = std::unique_ptr<std::remove_pointer_t<cublasLtMatrixLayout_t>, LayoutDeleter>;
using Preference = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>, PreferenceDeleter>;

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
    size_t h = std::hash<int64_t>()(key.device);
    const int64_t parts[] = {key.ab_type, key.m,       key.n,       key.k,       key.lda,
                             key.ldb,     key.ldc,     key.align_a, key.align_b, key.align_c,
                             static_cast<int64_t>(key.workspace)};
    for (int64_t v : parts) {
      h ^= std::hash<int64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    }
    return h;
  }
};

// The descriptors and the chosen algorithm for one key. cuBLASLt descriptors are plain host objects
// and are only read by cublasLtMatmul, so one plan serves every thread and stream.
struct Plan {
  MatmulDesc desc;
  Layout a, b, c;
  cublasLtMatmulAlgo_t algo{};
};

Layout make_layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t raw = nullptr;
  check_cublas(cublasLtMatrixLayoutCreate(&raw, type, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), ld),
               "cublasLtMatrixLayoutCreate");
  return Layout(raw);
}

std::unique_ptr<Plan> make_plan(const PlanKey& key, cublasLtHandle_t handle) {
  auto plan = std::make_unique<Plan>();
  cublasLtMatmulDesc_t desc = nullptr;
  // fp32 compute and scale for every operand type: fp32 inputs get a true fp32 GEMM (no TF32).
  check_cublas(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  plan->desc.reset(desc);
  const cublasOperation_t trans_a = CUBLAS_OP_N, trans_b = CUBLAS_OP_T;
  check_cublas(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)),
               "setting TRANSA");
  check_cublas(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)),
               "setting TRANSB");
  plan->a = make_layout(key.ab_type, key.m, key.k, key.lda);  // input, col-major [in, N]
  plan->b = make_layout(key.ab_type, key.n, key.k, key.ldb);  // grad_output, col-major [out, N], used as op T
  plan->c = make_layout(CUDA_R_32F, key.m, key.n, key.ldc);   // main_grad, col-major [in, out]

  cublasLtMatmulPreference_t raw_pref = nullptr;
  check_cublas(cublasLtMatmulPreferenceCreate(&raw_pref), "cublasLtMatmulPreferenceCreate");
  Preference pref(raw_pref);
  const uint64_t workspace = key.workspace;
  check_cublas(cublasLtMatmulPreferenceSetAttribute(pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                                    sizeof(workspace)),
               "setting the workspace size");
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> alignments[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_c},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_c}};
  for (const auto& [attr, value] : alignments) {
    check_cublas(cublasLtMatmulPreferenceSetAttribute(pref.get(), attr, &value, sizeof(value)),
                 "setting a pointer alignment");
  }
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  check_cublas(cublasLtMatmulAlgoGetHeuristic(handle, desc, plan->a.get(), plan->b.get(), plan->c.get(),
                                              plan->c.get(), pref.get(), 1, &result, &found),
               "cublasLtMatmulAlgoGetHeuristic");
  TORCH_CHECK(found > 0, kOp, ": cuBLASLt has no algorithm for this problem (m=", key.m, ", n=", key.n,
              ", k=", key.k, ", lda=", key.lda, ", ldb=", key.ldb, ")");
  plan->algo = result.algo;
  return plan;
}

// Plans by key, built once: the heuristic query costs far more than the GEMM setup it saves.
const Plan& cached_plan(const PlanKey& key, cublasLtHandle_t handle) {
  static std::mutex mutex;
  static std::unordered_map<PlanKey, std::unique_ptr<Plan>, PlanKeyHash> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) {
    it = cache.emplace(key, make_plan(key, handle)).first;
  }
  return *it->second;
}

uint32_t alignment_of(const void* ptr) {
  const auto address = reinterpret_cast<uintptr_t>(ptr);
  uint32_t alignment = 16;
  while (alignment > 1 && address % alignment != 0) {
    alignment /= 2;
  }
  return alignment;
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
                    alignment_of(x.const_data_ptr()),
                    alignment_of(go.const_data_ptr()),
                    alignment_of(out.const_data_ptr()),
                    workspace_size};
  const Plan& plan = cached_plan(key, handle);
  const float alpha = 1.0f;
  float* d = out.data_ptr<float>();
  check_cublas(cublasLtMatmul(handle, plan.desc.get(), &alpha, x.const_data_ptr(), plan.a.get(), go.const_data_ptr(),
                              plan.b.get(), &beta, d, plan.c.get(), d, plan.c.get(), &plan.algo, workspace,
                              workspace_size, c10::cuda::getCurrentCUDAStream()),
               "cublasLtMatmul");
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
