// unscale_and_check_ / unscale_and_check_sumsq_ on the CPU: validation, splitting every gradient
// into chunks, and running the chunks in parallel through the vectorised kernel of the best CPU
// capability. Each chunk reports its own flag, partial sum and max |x| into its own slot; the partial
// sums are added in chunk order, so the result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "ops/checks.h"
#include "ops/cpu/cpu_dispatch.h"
#include "ops/cpu/parallel_chunks.h"
#include "ops/rounding.h"

namespace mixprec::cpu {
namespace {

// 64K elements: large enough to amortise the per-chunk call, small enough to balance threads.
constexpr int64_t kUnscaleChunk = 1 << 16;

struct Chunk {
  void* data;
  int64_t n;
  at::ScalarType dtype;
  size_t tensor;
};


double unscale_impl(const char* op, at::TensorList grads, const at::Tensor& found_inf, const at::Tensor& inv_scale,
                    const std::optional<at::Tensor>& amax, bool want_sumsq) {
  detail::check_unscale_args(op, grads, found_inf, inv_scale, amax);
  const float inv = inv_scale.item<float>();  // a CPU tensor: reading it is not a device sync
  detail::DenseViews dense(grads);

  std::vector<Chunk> chunks;
  int64_t elements = 0;
  for (size_t t = 0; t < dense.views().size(); ++t) {
    const at::Tensor& g = dense.views()[t];
    const int64_t numel = g.numel();
    elements += numel;
    char* base = static_cast<char*>(g.data_ptr());
    const int64_t item = g.element_size();
    for (int64_t begin = 0; begin < numel; begin += kUnscaleChunk) {
      chunks.push_back({base + begin * item, std::min(kUnscaleChunk, numel - begin), g.scalar_type(), t});
    }
  }
  std::vector<uint8_t> found(chunks.size(), 0);
  std::vector<double> partial(chunks.size(), 0.0);
  std::vector<float> chunk_amax(chunks.size(), 0.f);
  const UnscaleChunkFn kernel = unscale_chunk_kernels.get("unscale_and_check_");
  parallel_chunks(static_cast<int64_t>(chunks.size()), elements, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const UnscaleChunkResult r = kernel(chunks[c].data, chunks[c].n, chunks[c].dtype, inv, want_sumsq);
      found[c] = r.found_nonfinite;
      partial[c] = r.sumsq;
      chunk_amax[c] = r.amax;
    }
  });
  if (inv != 1.0f) dense.write_back();  // an inv_scale of 1 changed nothing (a read-only check)

  bool any = false;
  double sumsq = 0.0;
  for (size_t c = 0; c < chunks.size(); ++c) {
    any = any || found[c];
    sumsq += partial[c];
  }
  if (any) found_inf.fill_(1.0);  // set, never cleared: one flag can collect several calls
  if (amax.has_value() && amax->defined()) {
    float* out = amax->data_ptr<float>();
    for (size_t c = 0; c < chunks.size(); ++c) {
      // Magnitudes are compared as the bits of non-negative floats, which order finite < inf < NaN: the
      // same rule as the CUDA kernel's atomicMax, so both backends leave the same entry for the same gradients.
      const size_t t = chunks[c].tensor;
      if (rounding::float_bits(chunk_amax[c]) > rounding::float_bits(out[t])) out[t] = chunk_amax[c];
    }
  }
  return sumsq;
}

void unscale_and_check_cpu(at::TensorList grads, const at::Tensor& found_inf, const at::Tensor& inv_scale,
                           const std::optional<at::Tensor>& amax) {
  unscale_impl("mixprec::unscale_and_check_", grads, found_inf, inv_scale, amax, /*want_sumsq=*/false);
}

at::Tensor unscale_and_check_sumsq_cpu(at::TensorList grads, const at::Tensor& found_inf,
                                       const at::Tensor& inv_scale, const std::optional<at::Tensor>& amax) {
  const double sumsq = unscale_impl("mixprec::unscale_and_check_sumsq_", grads, found_inf, inv_scale, amax, true);
  // The fp32 result of a sum past fp32's range is +inf (IEEE's conversion, as the CUDA kernel's fp32 sums
  // give it), not an error: at::scalar_tensor(double) on an fp32 tensor refuses such a value, and the
  // gradients are already written by then.
  return at::scalar_tensor(static_cast<float>(sumsq), found_inf.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("unscale_and_check_", &unscale_and_check_cpu);
  m.impl("unscale_and_check_sumsq_", &unscale_and_check_sumsq_cpu);
}

// A sparse gradient routes the call to the sparse key; land it in the same checks, which name the
// offending entry, instead of the dispatcher's generic "no kernel" error.
TORCH_LIBRARY_IMPL(mixprec, SparseCPU, m) {
  m.impl("unscale_and_check_", &unscale_and_check_cpu);
  m.impl("unscale_and_check_sumsq_", &unscale_and_check_sumsq_cpu);
}

}  // namespace mixprec::cpu
