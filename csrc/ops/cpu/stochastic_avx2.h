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
#include <type_traits>

namespace mixprec::cpu {
inline namespace CPU_CAPABILITY {
namespace avx2 {

// out[q] holds the 32-bit draws of element pairs 8q .. 8q+7 (elements 16q .. 16q+15) of the 64 elements
// that groups g0 .. g0+7 cover: pair p is output p % 4 of group p / 4.
inline void philox8(uint64_t g0, uint64_t offset, uint64_t seed, __m256i out[4]) {
  // Counters built in registers (8 scalar stores read back as a vector stall store forwarding).
  const uint32_t g0_lo = static_cast<uint32_t>(g0);
  const __m256i start = _mm256_set1_epi32(static_cast<int32_t>(g0_lo));
  const __m256i c0 = _mm256_add_epi32(start, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(g0 >> 32)));
  if (g0_lo > 0xFFFFFFFFu - 7u) {  // the low word wraps within the 8 groups: carry into the high word there
    const __m256i bias = _mm256_set1_epi32(static_cast<int32_t>(0x80000000u));
    c1 = _mm256_sub_epi32(c1, _mm256_cmpgt_epi32(_mm256_xor_si256(start, bias), _mm256_xor_si256(c0, bias)));
  }
  const __m256i c2 = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(offset)));
  const __m256i c3 = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(offset >> 32)));
  // The rounds run on the even groups (e*) and the odd groups (o*, moved down) apart, each word in the low
  // half of a 64-bit lane: _mm256_mul_epu32 reads exactly those, a product's low word stays where the next
  // round reads it, and its high word is one shift away (the high halves hold junk no round reads). This
  // saves the blends a merged layout needs every round.
  __m256i e0 = c0, e1 = c1, e2 = c2, e3 = c3;
  __m256i o0 = _mm256_srli_epi64(c0, 32), o1 = _mm256_srli_epi64(c1, 32), o2 = c2, o3 = c3;
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53u);
  const __m256i m1 = _mm256_set1_epi64x(0xCD9E8D57u);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int32_t>(k0));
    const __m256i key1 = _mm256_set1_epi32(static_cast<int32_t>(k1));
    const __m256i pe0 = _mm256_mul_epu32(e0, m0), pe1 = _mm256_mul_epu32(e2, m1);
    const __m256i po0 = _mm256_mul_epu32(o0, m0), po1 = _mm256_mul_epu32(o2, m1);
    e0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pe1, 32), e1), key0);
    e2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pe0, 32), e3), key1);
    e1 = pe1;
    e3 = pe0;
    o0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(po1, 32), o1), key0);
    o2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(po0, 32), o3), key1);
    o1 = po1;
    o3 = po0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  // Even and odd groups back into lanes 0..7, then 4 x 8 -> pair order: pair 4j + k takes output k of group j.
  const auto merge = [](__m256i even, __m256i odd) { return _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA); };
  const __m256i r0 = merge(e0, o0), r1 = merge(e1, o1), r2 = merge(e2, o2), r3 = merge(e3, o3);
  const __m256i t0 = _mm256_unpacklo_epi32(r0, r1), t1 = _mm256_unpackhi_epi32(r0, r1);
  const __m256i t2 = _mm256_unpacklo_epi32(r2, r3), t3 = _mm256_unpackhi_epi32(r2, r3);
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
  // inf: the low half is zero, nothing carries; NaN: the canonical quiet NaN with the input's sign, like the
  // scalar rule.
  r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), canonical_nan(x), nan));
  return _mm256_srli_epi32(r, 16);
}

// fp16 stochastic rounding of 8 floats: the same results as rounding::to_half_stochastic (round up iff the
// part below the fp16 grid point, as a fraction of the spacing, exceeds draw16 * 2^-16).
inline __m128i half_stochastic(__m256 x, __m256i draw) {
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  // fp16 normals (and everything above, which becomes inf): the 13 bits fp16 drops, f, give the fraction
  // f * 2^-13, so the rule is f * 8 > draw16, i.e. f > draw16 >> 3: adding 0x1FFF - (draw16 >> 3) carries
  // into bit 13 exactly then, and clearing the 13 bits leaves a value fp16 holds exactly (or >= 65536: inf).
  const __m256i addend = _mm256_sub_epi32(_mm256_set1_epi32(0x1FFF), _mm256_srli_epi32(draw, 3));
  __m256 mag = _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(_mm256_castps_si256(a), addend),
                                                    _mm256_set1_epi32(static_cast<int32_t>(0xffffe000u))));
  // fp16 subnormals (spacing 2^-24 whatever the exponent) only when a lane has one: rare in weights.
  const __m256 subnormal = _mm256_cmp_ps(a, _mm256_set1_ps(6.103515625e-05f), _CMP_LT_OQ);
  if (!_mm256_testz_ps(subnormal, subnormal)) {
    const __m256 spacing = _mm256_set1_ps(5.9604644775390625e-08f);
    const __m256 low = _mm256_mul_ps(
        _mm256_round_ps(_mm256_mul_ps(a, _mm256_set1_ps(16777216.0f)), _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC), spacing);
    const __m256 u01 = _mm256_mul_ps(_mm256_cvtepi32_ps(draw), _mm256_set1_ps(1.52587890625e-05f));  // draw16 * 2^-16
    const __m256 up = _mm256_cmp_ps(_mm256_sub_ps(a, low), _mm256_mul_ps(u01, spacing), _CMP_GT_OQ);
    mag = _mm256_blendv_ps(mag, _mm256_blendv_ps(low, _mm256_add_ps(low, spacing), up), subnormal);
  }
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
