// fp8_quantize's nearest-rounding pass on the CPU, compiled once per CPU capability (see cpu_dispatch.h): the
// max of the inputs' magnitude bits and the codes of x * scale by ops/fp8.h's rule, in one read. The AVX2
// build runs the rule on 8 lanes at a time with integer operations on the fp32 bits (the same arithmetic as
// fp8::to_fp8_nearest: the subnormal range through an exact power-of-two scaling and the 2^23 rounding trick,
// the normal range by rebiasing the exponent and rounding the dropped bits half to even); tails, float64 and
// the DEFAULT build take the scalar rule. Both give the rule's bits (tests compare them, and Tensor.to).
#include <cstdint>

#include "ops/cpu/cpu_dispatch.h"
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

uint32_t fp8_nearest_run(const void* src, at::ScalarType dtype, uint8_t* dst, int64_t n, float scale,
                         fp8::Format format, bool saturate) {
  uint32_t m = 0;
  with_dtype(dtype, "fp8_quantize", [&](auto t) {
    using T = decltype(t);
    m = nearest_typed(static_cast<const T*>(src), dst, n, scale, format, saturate);
  });
  return m;
}

uint32_t magnitude_max_run(const void* src, at::ScalarType dtype, int64_t n) {
  uint32_t m = 0;
  with_dtype(dtype, "fp8_quantize", [&](auto t) { m = run_max(static_cast<const decltype(t)*>(src), n); });
  return m;
}

}  // namespace
}  // namespace CPU_CAPABILITY

MIXPREC_REGISTER_CPU_KERNEL(fp8_nearest_kernels, CPU_CAPABILITY::fp8_nearest_run);
MIXPREC_REGISTER_CPU_KERNEL(magnitude_max_kernels, CPU_CAPABILITY::magnitude_max_run);

}  // namespace mixprec::cpu
