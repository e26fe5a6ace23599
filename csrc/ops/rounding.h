// Every rounding rule mixprec uses to move numbers between fp32 and 16-bit formats, written once as
// host/device functions on bit patterns, so the CPU kernels, the CUDA kernels and the fused optimizer
// step all round the same way.
//
//   nearest      IEEE round-to-nearest-even (what Tensor.to does); NaN stays NaN.
//   stochastic   rounds up in magnitude with probability equal to the dropped fraction of an ulp, so
//                E[round(x)] = x; driven by a 16-bit uniform draw per element (see below).
//   saturate     finite values beyond the target's largest finite value become +-that value instead of
//                +-inf; inf and NaN pass through.
//   remainder    fp32 = [hi16 | lo16]: the bf16 part is hi16 rounded by the top bit of lo16, the int16
//                remainder is lo16; merging rebuilds the fp32 bits exactly (Transformer Engine's
//                store_param_remainders).
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace mixprec::rounding {

/// How a value that does not fit the target format is rounded.
enum class Mode : int { Nearest = 0, Stochastic = 1 };

C10_HOST_DEVICE inline uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

/// |x|'s bits: their unsigned order is the order of the magnitudes, and any NaN sorts above inf, so a max
/// over them propagates NaN into an amax as torch's amax does (and on CUDA can be an integer atomicMax).
C10_HOST_DEVICE inline uint32_t magnitude_bits(float x) { return float_bits(x) & 0x7fffffffu; }

C10_HOST_DEVICE inline float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

C10_HOST_DEVICE inline bool is_nan_bits(uint32_t u) { return (u & 0x7fffffffu) > 0x7f800000u; }
C10_HOST_DEVICE inline bool is_finite_bits(uint32_t u) { return (u & 0x7f800000u) != 0x7f800000u; }

constexpr float kHalfMax = 65504.0f;
constexpr float kBFloat16Max = 3.38953139e38f;  // 0x7f7f0000

// ---- round to nearest even (c10's conversions are RNE on host and device) ----------------------------
// These are Tensor.to's conversions on each device, NaN bits included: the CPU gives fp16 0x7e00 | sign
// (F16C builds keep payload bits) and bf16 0x7fc0; CUDA gives the canonical 0x7fff for both.
C10_HOST_DEVICE inline c10::Half to_half_nearest(float x) { return c10::Half(x); }
C10_HOST_DEVICE inline c10::BFloat16 to_bfloat16_nearest(float x) { return c10::BFloat16(x); }

// ---- stochastic rounding --------------------------------------------------------------------------------
// Each element gets 16 uniform random bits: bf16 drops exactly 16 bits of fp32, and fp16 drops 13 bits in
// its normal range, so 16 bits make both roundings exactly unbiased there (fp16's subnormal range, below
// 2^-14, keeps a bias under 2^-16 of an fp16 ulp, i.e. < 2^-40). One Philox call serves 8 elements.
//
// bf16 keeps fp32's exponent range, so adding the draw below the cut and truncating is an unbiased
// rounding for every finite input, subnormals included (the bit patterns of one sign are ordered like
// the values). A carry out of the largest binade gives inf, with the right probability.
C10_HOST_DEVICE inline c10::BFloat16 to_bfloat16_stochastic(float x, uint32_t draw16) {
  const uint32_t u = float_bits(x);
  if (is_nan_bits(u)) return c10::BFloat16(0x7fc0 | ((u >> 16) & 0x8000), c10::BFloat16::from_bits());
  if (!is_finite_bits(u)) return c10::BFloat16(static_cast<uint16_t>(u >> 16), c10::BFloat16::from_bits());
  const uint32_t rounded = u + (draw16 & 0xffffu);
  return c10::BFloat16(static_cast<uint16_t>(rounded >> 16), c10::BFloat16::from_bits());
}

// fp16 has a narrower exponent range than fp32, so the cut moves with the binade: take the fp16 value
// below |x| (toward zero), the fp16 spacing there, and round up with probability (|x| - low) / spacing.
// Both are exact in fp32: low is |x| with low bits cleared, the spacing a power of two.
C10_HOST_DEVICE inline c10::Half to_half_stochastic(float x, uint32_t draw16) {
  const uint32_t u = float_bits(x);
  if (!is_finite_bits(u)) {  // inf stays inf; NaN becomes the quiet NaN of its sign, as bf16's rule does:
    // spelled out because c10::Half(NaN) differs by device (canonical 0x7fff on CUDA) and build (F16C
    // keeps payload bits), and a seeded cast promises the same bits everywhere.
    const auto sign16 = static_cast<uint16_t>((u >> 16) & 0x8000u);
    return c10::Half(static_cast<uint16_t>(sign16 | (is_nan_bits(u) ? 0x7e00u : 0x7c00u)), c10::Half::from_bits());
  }
  const uint32_t sign = u & 0x80000000u;
  const float a = bits_float(u & 0x7fffffffu);
  float low, spacing;
  if (a >= 65536.0f) {
    return c10::Half(bits_float(sign | 0x7f800000u));  // beyond the next would-be binade: always inf
  } else if (a >= 6.103515625e-05f) {                   // fp16 normal range, 2^-14 and up
    low = bits_float(float_bits(a) & 0xffffe000u);      // clear the 13 bits fp16 does not keep
    spacing = bits_float((float_bits(a) & 0x7f800000u) - (10u << 23));  // 2^(exponent - 10)
  } else {                                                              // fp16 subnormals: spacing 2^-24
    spacing = 5.9604644775390625e-08f;
    low = static_cast<float>(static_cast<int32_t>(a * 16777216.0f)) * spacing;  // exact truncation
  }
  // The draw as a fraction in [0, 1); (a - low) and draw * spacing are both exact in fp32.
  const float draw = static_cast<float>(draw16 & 0xffffu) * 1.52587890625e-05f;  // * 2^-16
  const float magnitude = (a - low) > draw * spacing ? low + spacing : low;
  // low + spacing may be 65536 (the binade above 65504): that is fp16's overflow, i.e. inf.
  return c10::Half(bits_float(sign | float_bits(magnitude)));
}

// ---- saturation -----------------------------------------------------------------------------------------
C10_HOST_DEVICE inline float saturate(float x, float max_finite) {
  const uint32_t u = float_bits(x);
  if (!is_finite_bits(u)) return x;
  if (x > max_finite) return max_finite;
  if (x < -max_finite) return -max_finite;
  return x;
}

// ---- bf16 + int16 remainder -------------------------------------------------------------------------------
// The bf16 half is hi16 rounded to nearest with ties away from zero (lo16 >= 0x8000 rounds the magnitude
// up), so the bf16 tensor is a faithful model parameter; merge() undoes the rounding from the remainder's
// sign. Finite values at or above max_bf16 + half an ulp (|x| >= 0x7f7f8000) give a bf16 of +-inf and
// still merge back exactly; NaN splits into the canonical bf16 NaN with remainder 0 and merges to a NaN.
struct SplitBFloat16 {
  uint16_t bf16;
  int16_t remainder;
};

C10_HOST_DEVICE inline SplitBFloat16 split_bf16_remainder(float x) {
  const uint32_t u = float_bits(x);
  if (is_nan_bits(u)) return {static_cast<uint16_t>(0x7fc0 | ((u >> 16) & 0x8000)), 0};
  const uint16_t lo = static_cast<uint16_t>(u & 0xffffu);
  uint16_t hi = static_cast<uint16_t>(u >> 16);
  // Never wraps: a finite x has hi <= 0x7f7f (or 0xff7f), and +-inf has lo == 0.
  if (lo & 0x8000u) hi = static_cast<uint16_t>(hi + 1);
  return {hi, static_cast<int16_t>(lo)};
}

C10_HOST_DEVICE inline float merge_bf16_remainder(uint16_t bf16, int16_t remainder) {
  uint16_t hi = bf16;
  if (remainder < 0) hi = static_cast<uint16_t>(hi - 1);
  return bits_float((static_cast<uint32_t>(hi) << 16) | static_cast<uint16_t>(remainder));
}

/// The 16-bit draw of element `index` from its group's four 32-bit Philox outputs (group = index / 8):
/// elements 2p and 2p+1 of a group share output p, low half first.
C10_HOST_DEVICE inline uint32_t draw16(const uint32_t (&group_draws)[4], uint64_t index) {
  const uint32_t word = group_draws[(index >> 1) & 3];
  return (index & 1) ? (word >> 16) : (word & 0xffffu);
}

}  // namespace mixprec::rounding
