// Registers the CUDA kernels of the .cu files (declared in ops/cuda/ops.h) with the dispatcher; see
// ops.h for why this is not done beside them. The cuBLASLt GEMMs (linear_wgrad.cpp, fp8_gemm.cpp) are
// C++ and register themselves.
#include <torch/library.h>

#include "ops/cuda/ops.h"

namespace mixprec::cuda {

namespace {

// A sparse tensor routes a call to SparseCUDA; the ops that take gradients or parameters are registered
// there too, so their argument checks name it (as the SparseCPU registrations in ops/cpu do) instead of the
// dispatcher reporting a missing kernel. The scale updates take no such tensors.
void register_kernels(torch::Library& m, bool sparse) {
  m.impl("unscale_and_check_", &unscale_and_check_cuda);
  m.impl("unscale_and_check_sumsq_", &unscale_and_check_sumsq_cuda);
  m.impl("grad_stats", &grad_stats_cuda);
  m.impl("cast", &cast_cuda);
  m.impl("cast_", &cast__cuda);
  m.impl("split_bf16_remainder", &split_bf16_remainder_cuda);
  m.impl("merge_bf16_remainder", &merge_bf16_remainder_cuda);
  m.impl("adam_step_", &adam_step_cuda);
  m.impl("fp8_quantize", &fp8_quantize_cuda);
  m.impl("fp8_quantize_blockwise", &fp8_quantize_blockwise_cuda);
  m.impl("int8_quantize", &int8_quantize_cuda);
  m.impl("int8_mm", &int8_mm_cuda);
  m.impl("fake_quantize_forward", &fake_quantize_forward_cuda);
  m.impl("fake_quantize_backward", &fake_quantize_backward_cuda);
  if (!sparse) {
    m.impl("update_scale_", &update_scale_cuda);
    m.impl("record_overflow_", &record_overflow_cuda);
    m.impl("fp8_update_scales_", &fp8_update_scales__cuda);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) { register_kernels(m, false); }
TORCH_LIBRARY_IMPL(mixprec, SparseCUDA, m) { register_kernels(m, true); }

}  // namespace mixprec::cuda
