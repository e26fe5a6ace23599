// cast / cast_ and the bf16 remainder split/merge on the CPU: checks and planning (cast_plan.h), then
// 64K-element chunks over every pair run in parallel through the capability-specific kernel.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "ops/cast_plan.h"
#include "ops/cpu/cpu_dispatch.h"
#include "ops/cpu/parallel_chunks.h"
#include "ops/rounding.h"

namespace mixprec::cpu {
namespace {

constexpr int64_t kCastChunk = 1 << 16;  // a multiple of 4: chunks start on Philox groups

void cast_lists(const char* op, at::TensorList dst, at::TensorList src, c10::string_view rounding, bool saturate,
                std::optional<int64_t> seed) {
  const Rounding mode = detail::parse_rounding(std::string_view(rounding.data(), rounding.size()), op);
  detail::check_cast_args(op, dst, src);
  detail::CastPlan plan(dst, src);
  const RngKey key = mode == Rounding::Stochastic ? stochastic_key(seed) : RngKey{0, 0};

  std::vector<CastChunk> chunks;
  int64_t elements = 0;
  for (size_t i = 0; i < plan.dst_work().size(); ++i) {
    const at::Tensor& d = plan.dst_work()[i];
    const at::Tensor& s = plan.src_work()[i];
    const int64_t numel = d.numel();
    elements += numel;
    char* dp = static_cast<char*>(d.data_ptr());
    const char* sp = static_cast<const char*>(s.const_data_ptr());
    for (int64_t begin = 0; begin < numel; begin += kCastChunk) {
      chunks.push_back({dp + begin * d.element_size(), sp + begin * s.element_size(), std::min(kCastChunk, numel - begin),
                        d.scalar_type(), s.scalar_type(), plan.rng_base()[i] + static_cast<uint64_t>(begin)});
    }
  }
  const CastChunkFn kernel = cast_chunk_kernels.get("cast_");
  parallel_chunks(static_cast<int64_t>(chunks.size()), elements, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) kernel(chunks[c], mode, saturate, key);
  });
  plan.finish();
}

void cast__cpu(at::TensorList dst, at::TensorList src, c10::string_view rounding, bool saturate,
               std::optional<int64_t> seed) {
  cast_lists("mixprec::cast_", dst, src, rounding, saturate, seed);
}

at::Tensor cast_cpu(const at::Tensor& src, at::ScalarType dtype, c10::string_view rounding, bool saturate,
                    std::optional<int64_t> seed) {
  return detail::cast_functional(src, dtype, [&](at::TensorList dst, at::TensorList srcs) {
    cast_lists("mixprec::cast", dst, srcs, rounding, saturate, seed);
  });
}

std::tuple<at::Tensor, at::Tensor> split_bf16_remainder_cpu(const at::Tensor& src) {
  detail::check_split_args(src);
  const at::Tensor s = src.contiguous();
  at::Tensor hi = at::empty(s.sizes(), s.options().dtype(at::kBFloat16));
  at::Tensor lo = at::empty(s.sizes(), s.options().dtype(at::kShort));
  const float* sp = s.const_data_ptr<float>();
  auto* hp = reinterpret_cast<uint16_t*>(hi.data_ptr<at::BFloat16>());
  int16_t* lp = lo.data_ptr<int16_t>();
  at::parallel_for(0, s.numel(), kCastChunk, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const rounding::SplitBFloat16 r = rounding::split_bf16_remainder(sp[i]);
      hp[i] = r.bf16;
      lp[i] = r.remainder;
    }
  });
  return {hi, lo};
}

at::Tensor merge_bf16_remainder_cpu(const at::Tensor& bf16, const at::Tensor& remainder) {
  detail::check_merge_args(bf16, remainder);
  const at::Tensor h = bf16.contiguous();
  const at::Tensor r = remainder.contiguous();
  at::Tensor out = at::empty(h.sizes(), h.options().dtype(at::kFloat));
  const auto* hp = reinterpret_cast<const uint16_t*>(h.const_data_ptr<at::BFloat16>());
  const int16_t* rp = r.const_data_ptr<int16_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, h.numel(), kCastChunk, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) op[i] = rounding::merge_bf16_remainder(hp[i], rp[i]);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("cast", &cast_cpu);
  m.impl("cast_", &cast__cpu);
  m.impl("split_bf16_remainder", &split_bf16_remainder_cpu);
  m.impl("merge_bf16_remainder", &merge_bf16_remainder_cpu);
}

// A sparse tensor routes the call here; the checks then name it (see unscale_and_check).
TORCH_LIBRARY_IMPL(mixprec, SparseCPU, m) {
  m.impl("cast", &cast_cpu);
  m.impl("cast_", &cast__cpu);
  m.impl("split_bf16_remainder", &split_bf16_remainder_cpu);
  m.impl("merge_bf16_remainder", &merge_bf16_remainder_cpu);
}

}  // namespace mixprec::cpu
