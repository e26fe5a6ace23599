// The vectorised inner loop of unscale_and_check_ on the CPU: one pass that multiplies by inv_scale,
// flags inf/NaN and (optionally) sums squares. With an inv_scale of exactly 1 nothing would change, so
// the pass only reads (a scaler's inf check before a fused optimizer step). Compiled once per CPU capability (see cpu_dispatch.h);
// the op itself (checks, chunking, threads) is in unscale_and_check.cpp.
#include "ops/cpu/cpu_dispatch.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>

namespace mixprec::cpu {
inline namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using FVec = Vectorized<float>;

// x * 0 is 0 for every finite x and NaN for inf and NaN, so summing it flags a non-finite value
// without a branch or a compare per element.
inline float lanes_sum(const FVec& v) {
  alignas(64) float tmp[FVec::size()];
  v.store(tmp);
  float s = 0.f;
  for (int i = 0; i < FVec::size(); ++i) s += tmp[i];
  return s;
}

template <bool kSumsq, bool kStore>
UnscaleChunkResult unscale_float(float* p, int64_t n, float inv_scale) {
  const FVec vinv(inv_scale);
  const FVec zero(0.f);
  FVec bad(0.f);
  FVec sq0(0.f), sq1(0.f);
  int64_t i = 0;
  // Two vectors per iteration: independent accumulators hide the FMA latency.
  for (; i + 2 * FVec::size() <= n; i += 2 * FVec::size()) {
    const FVec x0 = FVec::loadu(p + i);
    const FVec x1 = FVec::loadu(p + i + FVec::size());
    bad = bad + x0 * zero + x1 * zero;
    const FVec y0 = x0 * vinv;
    const FVec y1 = x1 * vinv;
    if constexpr (kStore) {
      y0.store(p + i);
      y1.store(p + i + FVec::size());
    }
    if constexpr (kSumsq) {
      sq0 = at::vec::fmadd(y0, y0, sq0);
      sq1 = at::vec::fmadd(y1, y1, sq1);
    }
  }
  float bad_s = lanes_sum(bad);
  double sq = kSumsq ? static_cast<double>(lanes_sum(sq0 + sq1)) : 0.0;
  for (; i < n; ++i) {
    const float x = p[i];
    bad_s += x * 0.f;
    const float y = x * inv_scale;
    if constexpr (kStore) p[i] = y;
    if constexpr (kSumsq) sq += static_cast<double>(y) * y;
  }
  return {std::isnan(bad_s), sq};
}

template <typename T, bool kSumsq, bool kStore>
UnscaleChunkResult unscale_reduced(T* p, int64_t n, float inv_scale) {
  using RVec = Vectorized<T>;  // holds 2 * FVec::size() elements
  const FVec vinv(inv_scale);
  const FVec zero(0.f);
  FVec bad(0.f);
  FVec sq0(0.f), sq1(0.f);
  int64_t i = 0;
  for (; i + RVec::size() <= n; i += RVec::size()) {
    auto [x0, x1] = at::vec::convert_to_float<T>(RVec::loadu(p + i));
    bad = bad + x0 * zero + x1 * zero;
    const FVec y0 = x0 * vinv;
    const FVec y1 = x1 * vinv;
    if constexpr (kStore) at::vec::convert_from_float<T>(y0, y1).store(p + i);
    if constexpr (kSumsq) {
      sq0 = at::vec::fmadd(y0, y0, sq0);
      sq1 = at::vec::fmadd(y1, y1, sq1);
    }
  }
  float bad_s = lanes_sum(bad);
  double sq = kSumsq ? static_cast<double>(lanes_sum(sq0 + sq1)) : 0.0;
  for (; i < n; ++i) {
    const float x = static_cast<float>(p[i]);
    bad_s += x * 0.f;
    const float y = x * inv_scale;
    if constexpr (kStore) p[i] = static_cast<T>(y);
    if constexpr (kSumsq) sq += static_cast<double>(y) * y;
  }
  return {std::isnan(bad_s), sq};
}

// fp64 gradients are rare (tests, scientific models); they keep fp64 math and a plain loop.
template <bool kSumsq, bool kStore>
UnscaleChunkResult unscale_double(double* p, int64_t n, float inv_scale) {
  const double inv = inv_scale;
  double bad = 0.0, sq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = p[i];
    bad += x * 0.0;
    const double y = x * inv;
    if constexpr (kStore) p[i] = y;
    if constexpr (kSumsq) sq += y * y;
  }
  return {std::isnan(bad), sq};
}

template <bool kSumsq, bool kStore>
UnscaleChunkResult unscale_typed(void* data, int64_t n, at::ScalarType dtype, float inv_scale) {
  switch (dtype) {
    case at::kFloat:
      return unscale_float<kSumsq, kStore>(static_cast<float*>(data), n, inv_scale);
    case at::kHalf:
      return unscale_reduced<c10::Half, kSumsq, kStore>(static_cast<c10::Half*>(data), n, inv_scale);
    case at::kBFloat16:
      return unscale_reduced<c10::BFloat16, kSumsq, kStore>(static_cast<c10::BFloat16*>(data), n, inv_scale);
    case at::kDouble:
      return unscale_double<kSumsq, kStore>(static_cast<double*>(data), n, inv_scale);
    default:
      TORCH_INTERNAL_ASSERT(false, "unscale_and_check_: unexpected dtype ", dtype);
  }
}

UnscaleChunkResult unscale_chunk(void* data, int64_t n, at::ScalarType dtype, float inv_scale, bool want_sumsq) {
  if (inv_scale == 1.0f) {  // x * 1 == x for every value: a read-only check
    return want_sumsq ? unscale_typed<true, false>(data, n, dtype, inv_scale)
                      : unscale_typed<false, false>(data, n, dtype, inv_scale);
  }
  return want_sumsq ? unscale_typed<true, true>(data, n, dtype, inv_scale)
                    : unscale_typed<false, true>(data, n, dtype, inv_scale);
}

}  // namespace
}  // namespace CPU_CAPABILITY

MIXPREC_REGISTER_CPU_KERNEL(unscale_chunk_kernels, CPU_CAPABILITY::unscale_chunk);

}  // namespace mixprec::cpu
