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
  kStatsFlush,      // non-zero, but fp16 rounds g * scale to zero: |g * scale| <= 2^-25
  kStatsSubnormal,  // fp16 rounds g * scale to a subnormal: 2^-25 < |g * scale| < 2^-14 - 2^-25
  kStatsOverflow,   // finite, but fp16 rounds g * scale to inf: |g * scale| >= 65520
  kStatsNonfinite,  // inf or NaN already
  kStatsSumsq,      // sum of g^2 (NaN/inf propagate): the squared norm
  kStatsAmax,       // max |g| over finite elements (0 when none)
  kStatsHistogram,  // first of num_bins exponent bins
};
constexpr int kStatsCounts = kStatsSumsq;  // the integer-valued columns come first

/// The fp16 thresholds the counts use, in the terms of |g * scale|, under round-to-nearest-even: the
/// categories say what a cast to fp16 would produce. Half the smallest subnormal is a tie that rounds to
/// zero (even); halfway between the largest subnormal and 2^-14 rounds up to the normal 2^-14 (even);
/// halfway between 65504 and the next step (65536) rounds to inf.
constexpr double kFp16FlushAtOrBelow = 0x1p-25;
constexpr double kFp16NormalFrom = 0x1p-14 - 0x1p-25;
constexpr double kFp16InfFrom = 65520.0;

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
  if (scaled <= Op(kFp16FlushAtOrBelow)) {
    column = kStatsFlush;
  } else if (scaled < Op(kFp16NormalFrom)) {
    column = kStatsSubnormal;
  } else if (scaled >= Op(kFp16InfFrom)) {
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
