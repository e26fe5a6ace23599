// fp8_quantize's passes on the CPU, compiled once per CPU capability (see cpu_dispatch.h): the max of the
// inputs' magnitude bits and the codes of x * scale by ops/fp8.h's rules, in one read. The AVX2 build runs the
// rules on 8 lanes at a time with operations on the fp32 bits:
// - nearest: the same arithmetic as fp8::to_fp8_nearest (the subnormal range through an exact power-of-two
//   scaling and the 2^23 rounding trick, the normal range by rebiasing the exponent and rounding the dropped
//   bits half to even);
// - stochastic: fp8::to_fp8_stochastic's choice between the two grid neighbours (the same fp32 products and
//   compare, so the same bits), with Philox run on 8 groups at once (stochastic_avx2.h), then the nearest
//   lanes on the chosen neighbour, which lies on the grid.
// - dequantize: codes to fp32 by bit operations (normal codes rebiased, subnormals as mantissa * spacing,
//   inf/NaN codes blended in), then the product with the scale: fp8::from_fp8(code) * scale exactly.
// Tails, unaligned heads, float64 and the DEFAULT build take the scalar rules. Both builds give the rules' bits
// (tests compare them, and Tensor.to).
#include <cstdint>

#include "ops/cpu/cpu_dispatch.h"
#include "ops/cpu/draws.h"
#include "ops/cpu/stochastic_avx2.h"
#include "ops/cpu/vec_common.h"
#include "ops/fp8.h"
#include "ops/rounding.h"

namespace mixprec::cpu {
inline namespace CPU_CAPABILITY {
namespace {

#if defined(CPU_CAPABILITY_AVX2)
// The format's constants as vectors, made once per call.
struct NearestLanes {
  __m256i min_normal, rebias, half_minus_one, max_code, overflow_code, nan_code, one, magnitude_mask, inf_bits,
      sign_byte;
  __m256 inv_spacing, two23;
  __m128i drop;

  NearestLanes(fp8::Format f, bool saturate) {
    const fp8::Spec s = fp8::spec(f);
    const int drop_bits = 23 - s.mantissa_bits;
    min_normal = _mm256_set1_epi32(static_cast<int32_t>(fp8::min_normal_bits(s)));
    rebias = _mm256_set1_epi32((127 - s.bias) << 23);
    half_minus_one = _mm256_set1_epi32((1 << (drop_bits - 1)) - 1);
    max_code = _mm256_set1_epi32(s.max_code);
    overflow_code = _mm256_set1_epi32(saturate ? s.max_code : s.overflow_code);
    nan_code = _mm256_set1_epi32(s.nan_code);
    one = _mm256_set1_epi32(1);
    magnitude_mask = _mm256_set1_epi32(0x7fffffff);
    inf_bits = _mm256_set1_epi32(0x7f800000);
    sign_byte = _mm256_set1_epi32(0x80);
    inv_spacing = _mm256_set1_ps(rounding::bits_float(fp8::inv_subnormal_spacing_bits(s)));
    two23 = _mm256_set1_ps(8388608.0f);
    drop = _mm_cvtsi32_si128(drop_bits);
  }
};

// fp8::to_fp8_nearest of 8 lanes, stored as 8 bytes at d.
inline void store_nearest(const __m256& y, const NearestLanes& k, uint8_t* d) {
  const __m256i u = _mm256_castps_si256(y);
  const __m256i a = _mm256_and_si256(u, k.magnitude_mask);
  const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(u, 24), k.sign_byte);
  // Subnormal range: the value in units of the subnormal spacing, rounded half to even by adding 2^23.
  const __m256 units = _mm256_mul_ps(_mm256_castsi256_ps(a), k.inv_spacing);
  const __m256i sub = _mm256_cvttps_epi32(_mm256_sub_ps(_mm256_add_ps(units, k.two23), k.two23));
  // Normal range: rebias the exponent, round the dropped bits half to even (a carry moves into the exponent).
  const __m256i odd = _mm256_and_si256(_mm256_srl_epi32(a, k.drop), k.one);
  const __m256i normal = _mm256_srl_epi32(
      _mm256_add_epi32(_mm256_add_epi32(_mm256_sub_epi32(a, k.rebias), k.half_minus_one), odd), k.drop);
  __m256i code = _mm256_blendv_epi8(normal, sub, _mm256_cmpgt_epi32(k.min_normal, a));
  // Beyond the largest finite value (inf included: its code is above max_code too), then NaN.
  code = _mm256_blendv_epi8(code, k.overflow_code, _mm256_cmpgt_epi32(code, k.max_code));
  code = _mm256_blendv_epi8(code, k.nan_code, _mm256_cmpgt_epi32(a, k.inf_bits));
  code = _mm256_or_si256(code, sign);
  const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(d), _mm_packus_epi16(words, words));
}

// What fp8::to_fp8_stochastic needs besides the nearest lanes, made once per call.
struct StochasticLanes {
  __m256i min_normal, magnitude_mask, sign_mask, inf_bits, exponent_mask, low_mask, mantissa_shift;
  __m256 inv_spacing, sub_spacing, draw_unit;

  explicit StochasticLanes(fp8::Format f) {
    const fp8::Spec s = fp8::spec(f);
    const int drop_bits = 23 - s.mantissa_bits;
    min_normal = _mm256_set1_epi32(static_cast<int32_t>(fp8::min_normal_bits(s)));
    magnitude_mask = _mm256_set1_epi32(0x7fffffff);
    sign_mask = _mm256_set1_epi32(static_cast<int32_t>(0x80000000u));
    inf_bits = _mm256_set1_epi32(0x7f800000);
    exponent_mask = inf_bits;
    low_mask = _mm256_set1_epi32(static_cast<int32_t>(~((1u << drop_bits) - 1u)));
    mantissa_shift = _mm256_set1_epi32(s.mantissa_bits << 23);
    inv_spacing = _mm256_set1_ps(rounding::bits_float(fp8::inv_subnormal_spacing_bits(s)));
    sub_spacing = _mm256_set1_ps(rounding::bits_float(fp8::subnormal_spacing_bits(s)));
    draw_unit = _mm256_set1_ps(1.52587890625e-05f);  // 2^-16
  }
};

// fp8::to_fp8_stochastic of 8 lanes with their 16-bit draws, stored as 8 bytes at d. Every lane computes
// both ranges' neighbours and keeps its own; a non-finite lane goes to the nearest rule unchanged, as in
// the scalar rule.
inline void store_stochastic(const __m256& y, __m256i draw, const StochasticLanes& k, const NearestLanes& n,
                             uint8_t* d) {
  const __m256i u = _mm256_castps_si256(y);
  const __m256i a = _mm256_and_si256(u, k.magnitude_mask);
  const __m256 af = _mm256_castsi256_ps(a);
  // Subnormal range: the truncated integer count of spacings (exact), times the spacing.
  const __m256 low_sub =
      _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvttps_epi32(_mm256_mul_ps(af, k.inv_spacing))), k.sub_spacing);
  // Normal range: the dropped bits cleared; the spacing is the value's power of two shifted by the mantissa.
  const __m256 low_normal = _mm256_castsi256_ps(_mm256_and_si256(a, k.low_mask));
  const __m256 spacing_normal =
      _mm256_castsi256_ps(_mm256_sub_epi32(_mm256_and_si256(a, k.exponent_mask), k.mantissa_shift));
  const __m256 subnormal = _mm256_castsi256_ps(_mm256_cmpgt_epi32(k.min_normal, a));
  const __m256 low = _mm256_blendv_ps(low_normal, low_sub, subnormal);
  const __m256 spacing = _mm256_blendv_ps(spacing_normal, k.sub_spacing, subnormal);
  const __m256 u01 = _mm256_mul_ps(_mm256_cvtepi32_ps(draw), k.draw_unit);
  const __m256 up = _mm256_cmp_ps(_mm256_sub_ps(af, low), _mm256_mul_ps(u01, spacing), _CMP_GT_OQ);
  const __m256 magnitude = _mm256_blendv_ps(low, _mm256_add_ps(low, spacing), up);
  const __m256i signed_neighbour = _mm256_or_si256(_mm256_castps_si256(magnitude), _mm256_and_si256(u, k.sign_mask));
  const __m256i finite = _mm256_cmpgt_epi32(k.inf_bits, a);
  store_nearest(_mm256_castsi256_ps(_mm256_blendv_epi8(u, signed_neighbour, finite)), n, d);
}
#endif

template <typename Src>
uint32_t nearest_typed(const Src* p, uint8_t* d, int64_t n, float scale, fp8::Format format, bool saturate) {
  uint32_t m = 0;
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (kVectorised<Src>) {
    if (n >= kStep) {
      const NearestLanes k(format, saturate);
      const FVec s(scale);
      IVec acc(0);
      for (; i + kStep <= n; i += kStep) {
        FVec a, b;
        load(p + i, a, b);
        acc = at::vec::maximum(acc, at::vec::maximum(magnitudes(a), magnitudes(b)));
        store_nearest(a * s, k, d + i);  // one fp32 product per element, as the scalar rule
        store_nearest(b * s, k, d + i + FVec::size());
      }
      m = horizontal_max(acc);
    }
  }
#endif
  for (; i < n; ++i) {
    const float x = static_cast<float>(p[i]);
    m = std::max(m, rounding::magnitude_bits(x));
    d[i] = fp8::to_fp8_nearest(x * scale, format, saturate);
  }
  return m;
}

// Stochastic rounding of p[0, n): element i takes the draw of index index0 + i (draws.h's numbering).
template <typename Src>
uint32_t stochastic_typed(const Src* p, uint8_t* d, int64_t n, float scale, fp8::Format format, bool saturate,
                          RngKey key, uint64_t index0) {
  uint32_t m = 0;
  int64_t i = 0;
  Draws draws(key);
  const auto scalar_until = [&](int64_t end) {
    for (; i < end; ++i) {
      const float x = static_cast<float>(p[i]);
      m = std::max(m, rounding::magnitude_bits(x));
      d[i] = fp8::to_fp8_stochastic(x * scale, format, saturate, draws.at(index0 + static_cast<uint64_t>(i)));
    }
  };
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (kVectorised<Src>) {
    // Scalar up to the first index on a Philox group, then 64 elements (8 groups) per step.
    scalar_until(avx2::elements_to_group(index0, n));
    if (n - i >= 64) {
      const NearestLanes nearest(format, saturate);
      const StochasticLanes lanes(format);
      const FVec s(scale);
      IVec acc(0);
      i = avx2::draw_blocks64(i, n, index0, key.offset, key.seed, [&](int64_t k, const __m256i draws[2]) {
        FVec a, b;
        load(p + k, a, b);
        acc = at::vec::maximum(acc, at::vec::maximum(magnitudes(a), magnitudes(b)));
        store_stochastic(a * s, draws[0], lanes, nearest, d + k);
        store_stochastic(b * s, draws[1], lanes, nearest, d + k + FVec::size());
      });
      m = std::max(m, horizontal_max(acc));  // the scalar head counted already
    }
  }
#endif
  scalar_until(n);
  return m;
}

uint32_t fp8_stochastic_run(const void* src, at::ScalarType dtype, uint8_t* dst, int64_t n, float scale,
                            fp8::Format format, bool saturate, RngKey key, uint64_t index0) {
  uint32_t m = 0;
  with_dtype(dtype, "fp8_quantize", [&](auto t) {
    using T = decltype(t);
    m = stochastic_typed(static_cast<const T*>(src), dst, n, scale, format, saturate, key, index0);
  });
  return m;
}

uint32_t fp8_nearest_run(const void* src, at::ScalarType dtype, uint8_t* dst, int64_t n, float scale,
                         fp8::Format format, bool saturate) {
  uint32_t m = 0;
  with_dtype(dtype, "fp8_quantize", [&](auto t) {
    using T = decltype(t);
    m = nearest_typed(static_cast<const T*>(src), dst, n, scale, format, saturate);
  });
  return m;
}

void fp8_dequantize_run(const uint8_t* src, float* dst, int64_t n, fp8::Format format, float scale) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX2)
  const fp8::Spec s = fp8::spec(format);
  const bool e5m2 = format == fp8::Format::E5M2;
  const __m256i mag_mask = _mm256_set1_epi32(0x7f);
  const __m256i rebias = _mm256_set1_epi32((127 - s.bias) << 23);
  const __m256i first_normal = _mm256_set1_epi32(1 << s.mantissa_bits);  // smaller magnitudes: subnormal or 0
  const __m256 spacing = _mm256_set1_ps(rounding::bits_float(fp8::subnormal_spacing_bits(s)));
  // E4M3 (fn): 0x7f is NaN. E5M2: exponent 31, 0x7c inf and above it NaN.
  const __m256i last_finite = _mm256_set1_epi32(e5m2 ? 0x7b : 0x7e);
  const __m256i inf_code = _mm256_set1_epi32(0x7c);
  const __m256 nan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000));
  const __m256 inf = _mm256_castsi256_ps(_mm256_set1_epi32(0x7f800000));
  const __m128i shift = _mm_cvtsi32_si128(23 - s.mantissa_bits);
  const __m256 vscale = _mm256_set1_ps(scale);
  for (; i + 8 <= n; i += 8) {
    const __m256i code = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i)));
    const __m256i mag = _mm256_and_si256(code, mag_mask);
    const __m256i sign = _mm256_slli_epi32(_mm256_andnot_si256(mag_mask, code), 24);
    __m256 v = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_sll_epi32(mag, shift), rebias));
    v = _mm256_blendv_ps(v, _mm256_mul_ps(_mm256_cvtepi32_ps(mag), spacing),
                         _mm256_castsi256_ps(_mm256_cmpgt_epi32(first_normal, mag)));
    const __m256 special = e5m2 ? _mm256_blendv_ps(nan, inf, _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, inf_code)))
                                : nan;
    v = _mm256_blendv_ps(v, special, _mm256_castsi256_ps(_mm256_cmpgt_epi32(mag, last_finite)));
    v = _mm256_or_ps(v, _mm256_castsi256_ps(sign));
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(v, vscale));
  }
#endif
  for (; i < n; ++i) dst[i] = fp8::from_fp8(src[i], format) * scale;
}

uint32_t magnitude_max_run(const void* src, at::ScalarType dtype, int64_t n) {
  uint32_t m = 0;
  with_dtype(dtype, "fp8_quantize", [&](auto t) { m = run_max(static_cast<const decltype(t)*>(src), n); });
  return m;
}

}  // namespace
}  // namespace CPU_CAPABILITY

MIXPREC_REGISTER_CPU_KERNEL(fp8_nearest_kernels, CPU_CAPABILITY::fp8_nearest_run);
MIXPREC_REGISTER_CPU_KERNEL(fp8_stochastic_kernels, CPU_CAPABILITY::fp8_stochastic_run);
MIXPREC_REGISTER_CPU_KERNEL(magnitude_max_kernels, CPU_CAPABILITY::magnitude_max_run);
MIXPREC_REGISTER_CPU_KERNEL(fp8_dequantize_kernels, CPU_CAPABILITY::fp8_dequantize_run);

}  // namespace mixprec::cpu
