// What grad_stats_ counts for one gradient element, as one function for host and device code, so the
// CPU and CUDA kernels classify alike. The layout of the op's output row is here too.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace mixprec::detail {

/// Columns of a grad_stats row (one row per gradient, float64): counts, then sums, then the histogram.
enum GradStatsColumn : int {
  kStatsNumel = 0,
  kStatsZero,       // exactly zero
  kStatsFlush,      // non-zero, but |g * scale| < 2^-25: fp16 rounds it to zero
  kStatsSubnormal,  // 2^-25 <= |g * scale| < 2^-14: fp16 keeps it with reduced precision
  kStatsOverflow,   // finite, but |g * scale| > 65504: fp16 makes it inf
  kStatsNonfinite,  // inf or NaN already
  kStatsSumsq,      // sum of g^2 (NaN/inf propagate): the squared norm
  kStatsAmax,       // max |g| over finite elements (0 when none)
  kStatsHistogram,  // first of num_bins exponent bins
};
constexpr int kStatsCounts = kStatsSumsq;  // the integer-valued columns come first

/// The fp16 thresholds the counts use, in the terms of |g * scale|.
constexpr double kFp16FlushBelow = 0x1p-25;  // half the smallest subnormal: rounds to zero below
constexpr double kFp16MinNormal = 0x1p-14;
constexpr double kFp16Max = 65504.0;

/// The count column an element falls in (kStatsNumel for a normal, representable one, which adds to no
/// count but numel) and, for a finite non-zero element, its histogram bin: floor(log2 |g|) - min_exponent
/// clamped to [0, num_bins); -1 otherwise. `Op` is the math type: float, or double for fp64 gradients.
template <typename Op>
C10_HOST_DEVICE inline void classify_grad(Op g, Op scale, int min_exponent, int num_bins, int& column, int& bin) {
#ifdef __CUDA_ARCH__
  const bool finite = ::isfinite(g);
#else
  const bool finite = std::isfinite(g);
#endif
  bin = -1;
  if (!finite) {
    column = kStatsNonfinite;
    return;
  }
  if (g == Op(0)) {
    column = kStatsZero;
    return;
  }
  const Op a = g < Op(0) ? -g : g;
  const Op scaled = a * scale;  // in Op: an fp32 product beyond fp32's range is inf, an overflow too
  if (scaled < Op(kFp16FlushBelow)) {
    column = kStatsFlush;
  } else if (scaled < Op(kFp16MinNormal)) {
    column = kStatsSubnormal;
  } else if (scaled > Op(kFp16Max)) {
    column = kStatsOverflow;
  } else {
    column = kStatsNumel;
  }
#ifdef __CUDA_ARCH__
  const int e = ::ilogb(a) - min_exponent;  // floor(log2 a), subnormals included
#else
  const int e = std::ilogb(a) - min_exponent;
#endif
  bin = e < 0 ? 0 : (e >= num_bins ? num_bins - 1 : e);
}

}  // namespace mixprec::detail
