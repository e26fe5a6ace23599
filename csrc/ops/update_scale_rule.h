// The loss-scale state machine as one function usable from host and device code, so the CPU and
// CUDA kernels of update_scale_ cannot drift apart.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace mixprec::detail {

struct UpdateScaleParams {
  double growth_factor;
  double backoff_factor;
  int64_t growth_interval;
  int32_t hysteresis;
  double min_scale;
  double max_scale;  // +inf when unbounded
  bool consecutive_hysteresis;
};

// Products are formed in double and rounded once to float, as torch._amp_update_scale_ does; with
// hysteresis 1, min_scale 0 and max_scale inf the result is therefore bit-identical to torch's while the
// growth tracker is below the interval (torch grows on `==`, this on `>=`: a loaded tracker past a smaller
// interval still grows).
C10_HOST_DEVICE inline void update_scale_rule(float* scale, int32_t* growth_tracker, int32_t* hysteresis_tracker,
                                              float found_inf, const UpdateScaleParams& p) {
  if (found_inf != 0.0f) {  // NaN counts as an overflow too
    *growth_tracker = 0;
    const int32_t left = *hysteresis_tracker > 0 ? *hysteresis_tracker - 1 : 0;
    *hysteresis_tracker = left;
    if (left == 0) {
      double backed_off = static_cast<double>(*scale) * p.backoff_factor;
      // min_scale 0 means no floor (torch's rule: a negative scale stays negative, -0 stays -0).
      if (p.min_scale > 0.0 && backed_off < p.min_scale) backed_off = p.min_scale;
      *scale = static_cast<float>(backed_off);
    }
    return;
  }
  if (p.consecutive_hysteresis) *hysteresis_tracker = p.hysteresis;
  const int64_t successful = static_cast<int64_t>(*growth_tracker) + 1;
  if (successful >= p.growth_interval) {
    double grown = static_cast<double>(*scale) * p.growth_factor;
    if (grown > p.max_scale) grown = p.max_scale;
    const float grown_f = static_cast<float>(grown);
    // Growth that would overflow float is skipped (torch does the same). x - x == 0 exactly when x is
    // finite, on host and device alike, without depending on which isfinite overloads are visible.
    if (grown_f - grown_f == 0.0f) *scale = grown_f;
    *growth_tracker = 0;
    *hysteresis_tracker = p.hysteresis;
  } else {
    *growth_tracker = static_cast<int32_t>(successful);
  }
}

/// record_overflow_'s scalar part (one thread): on an overflow the record's head takes the step number, the
/// scale and the number of gradients checked; `count` (if given) counts overflowing steps. The per-element part (copy the
/// step's amax into the record on an overflow, zero it for the next step) is the kernels' loop.
C10_HOST_DEVICE inline void record_overflow_head(double* record, float found_inf, float scale, int64_t step,
                                                 int64_t checked, int64_t* count) {
  const bool overflowed = found_inf != 0.0f;  // NaN counts, as in update_scale_rule
  if (overflowed) {
    record[0] = static_cast<double>(step);
    record[1] = static_cast<double>(scale);
    record[2] = static_cast<double>(checked);
  }
  if (count != nullptr && overflowed) *count += 1;
}

}  // namespace mixprec::detail
