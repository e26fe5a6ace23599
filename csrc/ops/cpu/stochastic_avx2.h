// Stochastic rounding fp32 -> fp16/bf16 on AVX2, shared by the cast and the Adam step kernels (both
// compiled once per CPU capability; this part only in the AVX2 build). Philox runs on 8 groups in the
// lanes of AVX2 registers, its outputs are put into element order (each 32-bit output serves two
// neighbouring elements, low half first), and the rounding is rounding.h's, lane by lane, so every bit
// equals the scalar path (and the CUDA kernels).
#pragma once

#if defined(CPU_CAPABILITY_AVX2)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace mixprec::cpu {
inline namespace CPU_CAPABILITY {
namespace avx2 {


inline __m256i mulhilo(__m256i c, __m256i m, __m256i* hi) {
  const __m256i even = _mm256_mul_epu32(c, m);                         // 64-bit products, lanes 0 2 4 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);  // lanes 1 3 5 7
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  return _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// out[q] holds the 32-bit draws of element pairs 8q .. 8q+7 (elements 16q .. 16q+15) of the 64 elements
// that groups g0 .. g0+7 cover: pair p is output p % 4 of group p / 4.
inline void philox8(uint64_t g0, uint64_t offset, uint64_t seed, __m256i out[4]) {
  alignas(32) uint32_t lo[8], hi[8];
  for (int j = 0; j < 8; ++j) {
    const uint64_t g = g0 + static_cast<uint64_t>(j);
    lo[j] = static_cast<uint32_t>(g);
    hi[j] = static_cast<uint32_t>(g >> 32);
  }
  __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
  __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
  __m256i c2 = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(offset)));
  __m256i c3 = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(offset >> 32)));
  const __m256i m0 = _mm256_set1_epi32(static_cast<int32_t>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int32_t>(0xCD9E8D57u));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, hi1;
    const __m256i lo0 = mulhilo(c0, m0, &hi0);
    const __m256i lo1 = mulhilo(c2, m1, &hi1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int32_t>(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int32_t>(k1)));
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // 4 x 8 -> pair order: pair 4j + k takes output k of group j.
  const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
  const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
  out[0] = _mm256_permute2x128_si256(u0, u1, 0x20);
  out[1] = _mm256_permute2x128_si256(u2, u3, 0x20);
  out[2] = _mm256_permute2x128_si256(u0, u1, 0x31);
  out[3] = _mm256_permute2x128_si256(u2, u3, 0x31);
}

inline __m256 canonical_nan(__m256 x) {
  return _mm256_or_ps(_mm256_and_ps(x, _mm256_set1_ps(-0.0f)), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)));
}

// bf16 stochastic rounding of 8 floats with 16-bit draws; returns the bf16 bits in the low half of each
// 32-bit lane.
inline __m256i bf16_stochastic(__m256 x, __m256i draw) {
  const __m256i u = _mm256_castps_si256(x);
  __m256i r = _mm256_add_epi32(u, draw);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256i keep = _mm256_castps_si256(_mm256_or_ps(_mm256_and_ps(nan, _mm256_set1_ps(-0.0f)), x));
  // inf: the low half is zero, nothing carries; NaN: the canonical quiet NaN, like the scalar rule.
  r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), canonical_nan(_mm256_castsi256_ps(keep)), nan));
  return _mm256_srli_epi32(r, 16);
}

// fp16 stochastic rounding of 8 floats (the same arithmetic as rounding::to_half_stochastic).
inline __m128i half_stochastic(__m256 x, __m256i draw) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256i ua = _mm256_castps_si256(a);
  const __m256 low_normal = _mm256_castsi256_ps(_mm256_and_si256(ua, _mm256_set1_epi32(static_cast<int32_t>(0xffffe000u))));
  const __m256 spacing_normal =
      _mm256_castsi256_ps(_mm256_sub_epi32(_mm256_and_si256(ua, _mm256_set1_epi32(0x7f800000)), _mm256_set1_epi32(10 << 23)));
  const __m256 spacing_sub = _mm256_set1_ps(5.9604644775390625e-08f);
  const __m256 low_sub = _mm256_mul_ps(
      _mm256_round_ps(_mm256_mul_ps(a, _mm256_set1_ps(16777216.0f)), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC), spacing_sub);
  const __m256 normal = _mm256_cmp_ps(a, _mm256_set1_ps(6.103515625e-05f), _CMP_GE_OQ);
  const __m256 low = _mm256_blendv_ps(low_sub, low_normal, normal);
  const __m256 spacing = _mm256_blendv_ps(spacing_sub, spacing_normal, normal);
  const __m256 u01 = _mm256_mul_ps(_mm256_cvtepi32_ps(draw), _mm256_set1_ps(1.52587890625e-05f));  // draw16 * 2^-16
  const __m256 up = _mm256_cmp_ps(_mm256_sub_ps(a, low), _mm256_mul_ps(u01, spacing), _CMP_GT_OQ);
  __m256 mag = _mm256_blendv_ps(low, _mm256_add_ps(low, spacing), up);
  mag = _mm256_blendv_ps(mag, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                         _mm256_cmp_ps(a, _mm256_set1_ps(65536.0f), _CMP_GE_OQ));
  __m256 y = _mm256_or_ps(mag, sign);
  y = _mm256_blendv_ps(y, canonical_nan(x), _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  return _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// The 16 per-element draws of pair block `pairs` (elements 16q .. 16q+15 of a 64-element block): zero-
// extending the 16-bit halves of the pair draws gives eight per-element draws in order, twice.
inline void element_draws(__m256i pairs, __m256i draws[2]) {
  draws[0] = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(pairs));
  draws[1] = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(pairs, 1));
}

/// Elements before the first whose draw index (index0 + i) starts a Philox group: a scalar head of at most
/// 7, after which draw_blocks64 can take over.
inline int64_t elements_to_group(uint64_t index0, int64_t n) {
  return std::min<int64_t>(n, static_cast<int64_t>((8 - index0 % 8) % 8));
}

/// From element i (index0 + i a multiple of 8) while 64 elements remain: Philox for 8 groups at once, then
/// fn(k, draws) for the four 16-element pieces from k (draws[0]: elements k..k+7, draws[1]: k+8..k+15).
/// Returns where the blocks end. The one loop every AVX2 stochastic kernel (cast, Adam, FP8, INT8) runs.
template <typename Fn>
inline int64_t draw_blocks64(int64_t i, int64_t n, uint64_t index0, uint64_t offset, uint64_t seed, Fn&& fn) {
  for (; i + 64 <= n; i += 64) {
    __m256i pairs[4];
    philox8((index0 + static_cast<uint64_t>(i)) / 8, offset, seed, pairs);
    for (int q = 0; q < 4; ++q) {
      __m256i draws[2];
      element_draws(pairs[q], draws);
      fn(i + 16 * q, draws);
    }
  }
  return i;
}

// Rounds 16 floats (x[0]: elements 0..7, x[1]: 8..15) stochastically with `draws` and stores them at d.
template <typename Dst>
inline void store_stochastic16(Dst* d, const __m256 x[2], const __m256i draws[2]) {
  static_assert(std::is_same_v<Dst, c10::BFloat16> || std::is_same_v<Dst, c10::Half>);
  if constexpr (std::is_same_v<Dst, c10::BFloat16>) {
    const __m256i packed = _mm256_packus_epi32(bf16_stochastic(x[0], draws[0]), bf16_stochastic(x[1], draws[1]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm256_permute4x64_epi64(packed, 0xD8));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d), half_stochastic(x[0], draws[0]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 8), half_stochastic(x[1], draws[1]));
  }
}

}  // namespace avx2
}  // namespace CPU_CAPABILITY
}  // namespace mixprec::cpu
#endif  // CPU_CAPABILITY_AVX2
