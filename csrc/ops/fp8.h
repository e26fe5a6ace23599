// The FP8 formats mixprec trains with, written once as host/device functions on bit patterns so the
// CPU kernels, the CUDA kernels and the tests' expectations all round the same way.
//
//   E4M3 (torch.float8_e4m3fn)  bias 7, 3 mantissa bits, largest finite 448, no inf; NaN is S.1111.111.
//   E5M2 (torch.float8_e5m2)    bias 15, 2 mantissa bits, largest finite 57344, IEEE-style inf and NaN.
//
// Rounding (rounding.h's two modes, on the fp8 grid):
//   nearest      round-to-nearest-even, bit-identical to Tensor.to(float8_*) (c10's conversion).
//   stochastic   rounds up in magnitude with probability equal to the dropped fraction of an fp8 ulp,
//                from a 16-bit draw per element (the bias is below 2^-16 of an ulp).
// Overflow (a value that rounds beyond the largest finite value, or an inf):
//   saturate      +-largest finite value (CUDA's __NV_SATFINITE, Transformer Engine's casts; torch 2.14's
//                 Tensor.to(float8_e4m3fn) does the same);
//   no saturate   NaN for E4M3 (it has no inf; torch <= 2.13's conversion), +-inf for E5M2 (Tensor.to).
// NaN stays NaN (sign kept) either way.
//
// Scales (every recipe): quantized = fp8(x * scale), dequantized = fp8 * scale_inv with
// scale_inv = 1 / scale. scale_from_amax maps a tensor's (or block's) max |x| to the format's largest
// finite value, divided by 2^margin, optionally rounded down to a power of two (then scale_inv is exact).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "ops/rounding.h"

namespace mixprec::fp8 {

enum class Format : int { E4M3 = 0, E5M2 = 1 };

constexpr float kE4M3Max = 448.0f;
constexpr float kE5M2Max = 57344.0f;

/// What differs between the two formats; every function below is written once over it.
struct Spec {
  int mantissa_bits;
  int bias;
  float max_finite;
  uint8_t max_code;       // the code of +max_finite
  uint8_t overflow_code;  // what an overflow becomes without saturation (E4M3: NaN, E5M2: inf)
  uint8_t nan_code;
};

C10_HOST_DEVICE constexpr Spec spec(Format f) {
  return f == Format::E4M3 ? Spec{3, 7, kE4M3Max, 0x7e, 0x7f, 0x7f} : Spec{2, 15, kE5M2Max, 0x7b, 0x7c, 0x7f};
}

C10_HOST_DEVICE inline float max_finite(Format f) { return spec(f).max_finite; }

/// The smallest normal value 2^(1 - bias) as fp32 bits, and the subnormal spacing 2^(1 - bias - mantissa).
C10_HOST_DEVICE constexpr uint32_t min_normal_bits(const Spec& s) {
  return static_cast<uint32_t>(127 + 1 - s.bias) << 23;
}
C10_HOST_DEVICE constexpr uint32_t subnormal_spacing_bits(const Spec& s) {
  return static_cast<uint32_t>(127 + 1 - s.bias - s.mantissa_bits) << 23;
}
/// 1 / the subnormal spacing: multiplying by it is exact (and needs no IEEE division on the GPU).
C10_HOST_DEVICE constexpr uint32_t inv_subnormal_spacing_bits(const Spec& s) {
  return static_cast<uint32_t>(127 - 1 + s.bias + s.mantissa_bits) << 23;
}

/// Round-to-nearest-even code of the magnitude bits `a` (finite, sign cleared), or a code above
/// max_code when the value rounds beyond the largest finite value. The result is not truncated to 8
/// bits, so "above max_code" is exact for every finite input.
C10_HOST_DEVICE inline uint32_t nearest_magnitude_code(uint32_t a, const Spec& s) {
  if (a < min_normal_bits(s)) {
    // Subnormal range: the value in units of the subnormal spacing (an exact power-of-two scaling, at
    // most 2^mantissa_bits), rounded to the nearest even integer. The integer is the code itself: the
    // value one spacing above the largest subnormal is the smallest normal, whose code is 2^mantissa_bits.
    const float units = rounding::bits_float(a) * rounding::bits_float(inv_subnormal_spacing_bits(s));
    // 2^23 forces the fraction out of a float (round-to-nearest-even, the default mode everywhere).
    const float rounded = (units + 8388608.0f) - 8388608.0f;
    return static_cast<uint32_t>(rounded);
  }
  const int drop = 23 - s.mantissa_bits;
  // Rebias the exponent, then round the dropped bits half to even; a carry moves into the exponent.
  const uint32_t rebiased = a - (static_cast<uint32_t>(127 - s.bias) << 23);
  const uint32_t odd = (a >> drop) & 1u;
  return (rebiased + ((1u << (drop - 1)) - 1u) + odd) >> drop;
}

/// fp32 -> fp8 code, round to nearest even.
C10_HOST_DEVICE inline uint8_t to_fp8_nearest(float x, Format f, bool saturate) {
  const Spec s = spec(f);
  const uint32_t u = rounding::float_bits(x);
  const uint8_t sign = static_cast<uint8_t>(u >> 24) & 0x80u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | s.nan_code;
  if (a == 0x7f800000u) return sign | (saturate ? s.max_code : s.overflow_code);
  const uint32_t code = nearest_magnitude_code(a, s);
  if (code > s.max_code) return sign | (saturate ? s.max_code : s.overflow_code);
  return sign | static_cast<uint8_t>(code);
}

/// fp32 -> fp8 code, stochastic rounding with the 16-bit uniform draw `draw16` (rounding::draw16).
C10_HOST_DEVICE inline uint8_t to_fp8_stochastic(float x, Format f, bool saturate, uint32_t draw16) {
  const Spec s = spec(f);
  const uint32_t u = rounding::float_bits(x);
  if (!rounding::is_finite_bits(u)) return to_fp8_nearest(x, f, saturate);
  const uint32_t sign = u & 0x80000000u;
  const uint32_t a_bits = u & 0x7fffffffu;
  const float a = rounding::bits_float(a_bits);
  float low, spacing;
  if (a_bits < min_normal_bits(s)) {
    spacing = rounding::bits_float(subnormal_spacing_bits(s));
    // Truncation of an exact power-of-two scaling: a small integer times the spacing, exact.
    low = static_cast<float>(static_cast<int32_t>(a * rounding::bits_float(inv_subnormal_spacing_bits(s)))) * spacing;
  } else {
    const int drop = 23 - s.mantissa_bits;
    low = rounding::bits_float(a_bits & ~((1u << drop) - 1u));
    spacing = rounding::bits_float((a_bits & 0x7f800000u) - (static_cast<uint32_t>(s.mantissa_bits) << 23));
  }
  // (a - low) and the draw times the spacing are both exact in fp32 (see rounding::to_half_stochastic).
  const float draw = static_cast<float>(draw16 & 0xffffu) * 1.52587890625e-05f;  // * 2^-16
  const float magnitude = (a - low) > draw * spacing ? low + spacing : low;
  // magnitude lies on the fp8 grid (or one step beyond the largest finite value): nearest is exact.
  return to_fp8_nearest(rounding::bits_float(sign | rounding::float_bits(magnitude)), f, saturate);
}

/// Whether current scaling's cast of a block whose max |x| has the magnitude bits `amax` saturates. A finite
/// amax is mapped onto the largest finite value by its scale, so no finite value of the block overflows: only
/// the scale's rounding can put the largest one an fp32 ulp beyond it (448.00003), which nearest rounding
/// brings back and stochastic rounding would send one fp8 step up about once in 2^16 draws. Such a block
/// saturates whatever `saturate` says; a block holding inf or NaN (scale 1) casts as `saturate` says.
C10_HOST_DEVICE inline bool finite_block_saturate(bool saturate, uint32_t amax) {
  return saturate || amax < 0x7f800000u;
}

C10_HOST_DEVICE inline uint8_t to_fp8(float x, Format f, rounding::Mode mode, bool saturate, uint32_t draw16) {
  return mode == rounding::Mode::Stochastic ? to_fp8_stochastic(x, f, saturate, draw16)
                                            : to_fp8_nearest(x, f, saturate);
}

/// fp8 code -> fp32 (exact).
C10_HOST_DEVICE inline float from_fp8(uint8_t code, Format f) {
  const Spec s = spec(f);
  const uint32_t sign = static_cast<uint32_t>(code & 0x80u) << 24;
  const uint32_t mag = code & 0x7fu;
  const uint32_t exponent = mag >> s.mantissa_bits;
  const uint32_t mantissa = mag & ((1u << s.mantissa_bits) - 1u);
  if (f == Format::E4M3 ? mag == 0x7fu : exponent == 31u) {
    return rounding::bits_float(sign | (mantissa == 0 && f == Format::E5M2 ? 0x7f800000u : 0x7fc00000u));
  }
  if (exponent == 0) {
    return rounding::bits_float(sign | rounding::float_bits(static_cast<float>(mantissa) *
                                                            rounding::bits_float(subnormal_spacing_bits(s))));
  }
  return rounding::bits_float(sign | ((exponent + 127u - static_cast<uint32_t>(s.bias)) << 23) |
                              (mantissa << (23 - s.mantissa_bits)));
}

/// The scale that maps `amax` onto the format's largest finite value, divided by 2^margin (the ops accept
/// 0 <= margin <= 32, fp8_plan.cpp's kMaxMargin; the formula itself holds up to 126), rounded down to a
/// power of two when `pow2`. An amax that is zero, inf or NaN gives `fallback` (1 for current scaling; the
/// previous scale for delayed scaling). A scale that overflows fp32 (a tiny amax) becomes the largest finite
/// float, as in Transformer Engine; one below fp32's normal range (a huge amax with a margin) becomes the smallest
/// normal float, 2^-126, whose reciprocal (the dequantization factor) is finite and exact, and which still maps
/// any finite amax within the format (FLT_MAX * 2^-126 < 4).
C10_HOST_DEVICE inline float scale_from_amax(float amax, float fp8_max, int margin, bool pow2, float fallback) {
  const uint32_t a = rounding::float_bits(amax) & 0x7fffffffu;
  if (a == 0 || !rounding::is_finite_bits(a)) return fallback;
  float scale = fp8_max / rounding::bits_float(a);
  // 2^-margin is exact for margin <= 126; the product is exact unless it leaves the normal range.
  scale *= rounding::bits_float(static_cast<uint32_t>(127 - margin) << 23);
  if (!rounding::is_finite_bits(rounding::float_bits(scale))) scale = 3.40282347e38f;
  if (rounding::float_bits(scale) < 0x00800000u) scale = rounding::bits_float(0x00800000u);  // see above
  if (pow2) scale = rounding::bits_float(rounding::float_bits(scale) & 0x7f800000u);  // its exponent alone
  return scale;
}

}  // namespace mixprec::fp8
