// The vectorised inner loop of unscale_and_check_ on the CPU: one pass that multiplies by inv_scale,
// takes max |x| (which flags inf/NaN) and (optionally) sums squares. With an inv_scale of exactly 1 nothing would change, so
// the pass only reads (a scaler's inf check before a fused optimizer step). Compiled once per CPU capability (see cpu_dispatch.h);
// the op itself (checks, chunking, threads) is in unscale_and_check.cpp.
#include "ops/cpu/cpu_dispatch.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>

namespace mixprec::cpu {
inline namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using FVec = Vectorized<float>;

// The chunk's max |x| is tracked with a NaN-propagating maximum, so it also answers the inf/NaN check
// (it is finite exactly when every element is): one max per element instead of a separate test.
inline float nan_max(float a, float b) { return (std::isnan(a) || a > b) ? a : b; }

inline float lanes_max(const FVec& v) {
  alignas(64) float tmp[FVec::size()];
  v.store(tmp);
  float m = 0.f;
  for (int i = 0; i < FVec::size(); ++i) m = nan_max(tmp[i], m);
  return m;
}

inline float lanes_sum(const FVec& v) {
  alignas(64) float tmp[FVec::size()];
  v.store(tmp);
  float s = 0.f;
  for (int i = 0; i < FVec::size(); ++i) s += tmp[i];
  return s;
}

inline UnscaleChunkResult chunk_result(float amax, double sumsq) {
  amax = std::fabs(amax);  // a propagated NaN may carry a sign bit; the contract is a non-negative value
  return {!std::isfinite(amax), sumsq, amax};
}

template <bool kSumsq, bool kStore>
UnscaleChunkResult unscale_float(float* p, int64_t n, float inv_scale) {
  const FVec vinv(inv_scale);
  FVec mx0(0.f), mx1(0.f);
  FVec sq0(0.f), sq1(0.f);
  int64_t i = 0;
  // Two vectors per iteration: independent accumulators hide the FMA latency.
  for (; i + 2 * FVec::size() <= n; i += 2 * FVec::size()) {
    const FVec x0 = FVec::loadu(p + i);
    const FVec x1 = FVec::loadu(p + i + FVec::size());
    mx0 = at::vec::maximum(mx0, x0.abs());
    mx1 = at::vec::maximum(mx1, x1.abs());
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
  float mx = lanes_max(at::vec::maximum(mx0, mx1));
  double sq = kSumsq ? static_cast<double>(lanes_sum(sq0 + sq1)) : 0.0;
  for (; i < n; ++i) {
    const float x = p[i];
    mx = nan_max(std::fabs(x), mx);
    const float y = x * inv_scale;
    if constexpr (kStore) p[i] = y;
    if constexpr (kSumsq) sq += static_cast<double>(y) * y;
  }
  return chunk_result(mx, sq);
}

template <typename T, bool kSumsq, bool kStore>
UnscaleChunkResult unscale_reduced(T* p, int64_t n, float inv_scale) {
  using RVec = Vectorized<T>;  // holds 2 * FVec::size() elements
  const FVec vinv(inv_scale);
  FVec mx0(0.f), mx1(0.f);
  FVec sq0(0.f), sq1(0.f);
  int64_t i = 0;
  for (; i + RVec::size() <= n; i += RVec::size()) {
    auto [x0, x1] = at::vec::convert_to_float<T>(RVec::loadu(p + i));
    mx0 = at::vec::maximum(mx0, x0.abs());
    mx1 = at::vec::maximum(mx1, x1.abs());
    const FVec y0 = x0 * vinv;
    const FVec y1 = x1 * vinv;
    if constexpr (kStore) at::vec::convert_from_float<T>(y0, y1).store(p + i);
    if constexpr (kSumsq) {
      sq0 = at::vec::fmadd(y0, y0, sq0);
      sq1 = at::vec::fmadd(y1, y1, sq1);
    }
  }
  float mx = lanes_max(at::vec::maximum(mx0, mx1));
  double sq = kSumsq ? static_cast<double>(lanes_sum(sq0 + sq1)) : 0.0;
  for (; i < n; ++i) {
    const float x = static_cast<float>(p[i]);
    mx = nan_max(std::fabs(x), mx);
    const float y = x * inv_scale;
    if constexpr (kStore) p[i] = static_cast<T>(y);
    if constexpr (kSumsq) sq += static_cast<double>(y) * y;
  }
  return chunk_result(mx, sq);
}

// fp64 gradients are rare (tests, scientific models); they keep fp64 math and a plain loop. The flag
// comes from the fp64 values; the reported max |x| is rounded to fp32 (inf beyond its range).
template <bool kSumsq, bool kStore>
UnscaleChunkResult unscale_double(double* p, int64_t n, float inv_scale) {
  const double inv = inv_scale;
  double mx = 0.0, sq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = p[i];
    const double a = std::fabs(x);
    if (std::isnan(a) || a > mx) mx = a;
    const double y = x * inv;
    if constexpr (kStore) p[i] = y;
    if constexpr (kSumsq) sq += y * y;
  }
  const float amax = mx > std::numeric_limits<float>::max() ? std::numeric_limits<float>::infinity()
                                                             : static_cast<float>(mx);  // NaN stays NaN
  return {!std::isfinite(mx), sq, std::fabs(amax)};
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
