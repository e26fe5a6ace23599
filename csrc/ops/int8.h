// The integer quantization rules mixprec trains with, written once as host/device functions so the CPU
// kernels, the CUDA kernels and the tests' expectations all round the same way.
//
// Symmetric INT8 (int8_quantize, Int8Linear): each scaling block of a [rows, cols] matrix gets
//   step      = amax / 127 (fp32; at least FLT_MIN; optionally rounded up to a power of two)
//   scale     = 1 / step
//   code      = round(x * scale), saturated to [-127, 127] (so -code is always a code too)
//   scale_inv = step               (x ~= code * scale_inv)
// which is fake quantization's arithmetic with that step (below), so QAT's simulated codes, the converted
// model's and Int8Linear's agree bit for bit. An all-zero block gets scale 1 (codes 0). A block holding inf or
// NaN gets scale 1 and scale_inv NaN: every product that reads it is NaN, so an overflow upstream still
// reaches GradScaler's inf check instead of vanishing into saturated codes. A NaN element's code is 0.
//
// Rounding: "nearest" is round-to-nearest-even; "stochastic" rounds up with probability equal to the
// fraction (a 16-bit draw per element, rounding::draw16: the bias is below 2^-16).
//
// Fake quantization (QAT; torch.fake_quantize_per_channel_affine's arithmetic with zero_point 0):
//   inv = 1 / s (fp32), r = round_half_even(x * inv), q = clamp(r, qmin, qmax), y = q * s
// and the straight-through gradient passes where qmin <= r <= qmax. Unlike torch, a NaN input gives a NaN
// output (torch turns it into a code). The learnable scale's gradient (LSQ, Esser et al. 2020) per element
// is q - x * inv inside the range, qmin or qmax outside it, times the incoming gradient.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "ops/rounding.h"

namespace mixprec::int8 {

constexpr float kInt8Max = 127.0f;

/// Adding and subtracting 1.5 * 2^23 rounds any |v| <= 2^22 to an integer, half to even (the default
/// rounding mode, host and device; nothing here is compiled with fast-math).
C10_HOST_DEVICE inline float round_half_even(float v) { return (v + 12582912.0f) - 12582912.0f; }

/// a * b rounded to fp32: never contracted into an FMA with a following add (nvcc contracts by default),
/// so the device rounds exactly as the host does.
C10_HOST_DEVICE inline float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

/// The INT8 code of x * scale: NaN -> 0, saturated to [-127, 127], then rounded.
C10_HOST_DEVICE inline int8_t to_int8(float x, float scale, rounding::Mode mode, uint32_t draw16) {
  float v = mul_rn(x, scale);
  if (v != v) return 0;
  v = v < -kInt8Max ? -kInt8Max : (v > kInt8Max ? kInt8Max : v);  // inf included
  float r;
  if (mode == rounding::Mode::Stochastic) {
    const float low = floorf(v);
    // v - low is exact (both lie within one power of two of each other or v is an integer), in [0, 1).
    const float draw = mul_rn(static_cast<float>(draw16 & 0xffffu), 1.52587890625e-05f);  // * 2^-16
    r = (v - low) > draw ? low + 1.0f : low;
  } else {
    r = round_half_even(v);
  }
  return static_cast<int8_t>(r);
}

/// The step of a block whose largest magnitude is `amax` (finite and non-zero): amax / 127, at least FLT_MIN
/// (so 1 / step is finite), rounded up to a power of two when `pow2` (then 1 / step is exact).
C10_HOST_DEVICE inline float step_from_amax(float amax, bool pow2) {
  float step = amax / kInt8Max;
  if (step < 1.17549435e-38f) step = 1.17549435e-38f;
  if (pow2) {
    const uint32_t b = rounding::float_bits(step);
    if (b & 0x007fffffu) step = rounding::bits_float((b & 0x7f800000u) + 0x00800000u);
  }
  return step;
}

/// The block's scale and dequantization factor (see the header comment).
struct BlockScale {
  float scale;
  float scale_inv;
};

C10_HOST_DEVICE inline BlockScale block_scale(float amax, bool pow2) {
  const uint32_t a = rounding::float_bits(amax) & 0x7fffffffu;
  if (!rounding::is_finite_bits(a)) return {1.0f, rounding::bits_float(0x7fc00000u)};
  if (a == 0) return {1.0f, 1.0f};
  const float step = step_from_amax(rounding::bits_float(a), pow2);
  return {1.0f / step, step};
}

/// One element of fake quantization with step `s` (inv = 1 / s, computed once by the caller).
struct FakeQuantized {
  float value;  // q * s (NaN for a NaN input)
  float code;   // q, in [qmin, qmax]
  float scaled; // x * inv
  bool inside;  // qmin <= round(x * inv) <= qmax: the straight-through gradient passes
};

C10_HOST_DEVICE inline FakeQuantized fake_quantize(float x, float s, float inv, float qmin, float qmax) {
  const float v = mul_rn(x, inv);
  if (v != v) return {v, 0.0f, v, false};
  // Clamping to one step beyond the range first keeps round_half_even in its exact range; the result of
  // rounding and clamping is torch's nearbyint-then-clamp.
  const float r = round_half_even(v < qmin - 1.0f ? qmin - 1.0f : (v > qmax + 1.0f ? qmax + 1.0f : v));
  const bool inside = r >= qmin && r <= qmax;
  const float q = r < qmin ? qmin : (r > qmax ? qmax : r);
  return {mul_rn(q, s), q, v, inside};
}

/// The learnable scale's gradient term of one element (before the incoming gradient and grad_factor).
C10_HOST_DEVICE inline float lsq_scale_term(const FakeQuantized& f) {
  return f.inside ? f.code - f.scaled : f.code;  // outside, the code is qmin or qmax
}

}  // namespace mixprec::int8
