// The inner loops of cast_ on the CPU, compiled once per CPU capability (see cpu_dispatch.h). The plain
// nearest-even conversions fp32 <-> fp16/bf16 (with or without saturation) run on ATen's vector types;
// stochastic rounding draws one Philox call per eight elements (16 bits each) and rounds with rounding.h.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <limits>

#include "ops/cpu/cpu_dispatch.h"
#include "ops/philox.h"
#include "ops/rounding.h"

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace mixprec::cpu {
inline namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using FVec = Vectorized<float>;

template <typename T>
constexpr float max_finite() {
  return std::is_same_v<T, c10::Half> ? rounding::kHalfMax : rounding::kBFloat16Max;
}

template <typename Dst>
inline Dst round_one(float x, Rounding mode, bool saturate, uint32_t draw) {
  if constexpr (std::is_same_v<Dst, float>) {
    return x;  // widening is exact
  } else {
    if (saturate) x = rounding::saturate(x, max_finite<Dst>());
    if constexpr (std::is_same_v<Dst, c10::Half>) {
      return mode == Rounding::Stochastic ? rounding::to_half_stochastic(x, draw) : rounding::to_half_nearest(x);
    } else {
      return mode == Rounding::Stochastic ? rounding::to_bfloat16_stochastic(x, draw)
                                          : rounding::to_bfloat16_nearest(x);
    }
  }
}

// |x| > max and finite -> +-max; inf and NaN untouched (their compares are false or excluded).
inline FVec saturate_vec(const FVec& x, float max) {
  const FVec inf(std::numeric_limits<float>::infinity());
  const FVec a = x.abs();
  const FVec over = (a > FVec(max)) & (a != inf);
  const FVec sign = x & FVec(-0.0f);
  return FVec::blendv(x, FVec(max) | sign, over);
}

template <typename Dst, typename Src>
void cast_scalar(Dst* d, const Src* s, int64_t n, Rounding mode, bool saturate, RngKey key, uint64_t index0) {
  if (mode == Rounding::Stochastic) {
    // index0 is a multiple of 8, so groups of eight elements line up with one Philox call.
    for (int64_t i = 0; i < n; i += 8) {
      const uint64_t index = index0 + static_cast<uint64_t>(i);
      const philox::Draw4 r = philox::philox4x32_10(index / 8, key.offset, key.seed);
      const int64_t m = std::min<int64_t>(8, n - i);
      for (int64_t k = 0; k < m; ++k) {
        d[i + k] = round_one<Dst>(static_cast<float>(s[i + k]), mode, saturate, rounding::draw16(r.v, index + k));
      }
    }
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = round_one<Dst>(static_cast<float>(s[i]), mode, saturate, 0);
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// Stochastic rounding fp32 -> fp16/bf16, 64 elements (8 Philox groups) per step. Philox runs on 8 groups
// in the lanes of AVX2 registers, its outputs are put into element order (each 32-bit output serves two
// neighbouring elements, low half first), and the rounding is rounding.h's, lane by lane, so every bit
// equals the scalar path (and the CUDA kernel).
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

// Rounds n0 (a multiple of 64) elements; index0 is a multiple of 8.
template <typename Dst>
void stochastic_block64(Dst* d, const float* s, int64_t n0, bool saturate, RngKey key, uint64_t index0) {
  for (int64_t i = 0; i < n0; i += 64) {
    __m256i pairs[4];
    philox8((index0 + static_cast<uint64_t>(i)) / 8, key.offset, key.seed, pairs);
    for (int q = 0; q < 4; ++q) {
      // Zero-extending the 16-bit halves of four pair draws gives eight per-element draws in order.
      const __m256i draws[2] = {_mm256_cvtepu16_epi32(_mm256_castsi256_si128(pairs[q])),
                                _mm256_cvtepu16_epi32(_mm256_extracti128_si256(pairs[q], 1))};
      __m256 x[2];
      for (int h = 0; h < 2; ++h) {
        FVec v = FVec::loadu(s + i + 16 * q + 8 * h);
        if (saturate) v = saturate_vec(v, max_finite<Dst>());
        x[h] = v;
      }
      if constexpr (std::is_same_v<Dst, c10::BFloat16>) {
        const __m256i packed = _mm256_packus_epi32(bf16_stochastic(x[0], draws[0]), bf16_stochastic(x[1], draws[1]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i + 16 * q), _mm256_permute4x64_epi64(packed, 0xD8));
      } else {
        for (int h = 0; h < 2; ++h) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i + 16 * q + 8 * h), half_stochastic(x[h], draws[h]));
        }
      }
    }
  }
}

}  // namespace avx2
#endif  // CPU_CAPABILITY_AVX2

template <typename Dst, typename Src>
void cast_typed(Dst* d, const Src* s, int64_t n, Rounding mode, bool saturate, RngKey key, uint64_t index0) {
  constexpr bool kNarrowing = std::is_same_v<Src, float> && !std::is_same_v<Dst, float>;
  constexpr bool kWidening = std::is_same_v<Dst, float> && !std::is_same_v<Src, float>;
  int64_t i = 0;
  if constexpr (std::is_same_v<Dst, Src>) {
    if (!saturate || std::is_same_v<Dst, float>) {
      std::memcpy(d, s, static_cast<size_t>(n) * sizeof(Dst));  // a value of the target type is already rounded
      return;
    }
  } else if constexpr (kNarrowing) {
#if defined(CPU_CAPABILITY_AVX2)
    if (mode == Rounding::Stochastic) {
      i = n / 64 * 64;
      avx2::stochastic_block64<Dst>(d, s, i, saturate, key, index0);
    }
#endif
    if (mode == Rounding::Nearest) {
      using RVec = Vectorized<Dst>;
      for (; i + RVec::size() <= n; i += RVec::size()) {
        FVec a = FVec::loadu(s + i);
        FVec b = FVec::loadu(s + i + FVec::size());
        if (saturate) {
          a = saturate_vec(a, max_finite<Dst>());
          b = saturate_vec(b, max_finite<Dst>());
        }
        at::vec::convert_from_float<Dst>(a, b).store(d + i);
      }
    }
  } else if constexpr (kWidening) {
    using RVec = Vectorized<Src>;
    for (; i + RVec::size() <= n; i += RVec::size()) {
      auto [a, b] = at::vec::convert_to_float<Src>(RVec::loadu(s + i));
      a.store(d + i);
      b.store(d + i + FVec::size());
    }
  }
  // Remainders, stochastic rounding, and fp16 <-> bf16 (through fp32).
  cast_scalar<Dst, Src>(d + i, s + i, n - i, mode, saturate, key, index0 + static_cast<uint64_t>(i));
}

template <typename Src>
void cast_from(const CastChunk& c, Rounding mode, bool saturate, RngKey key) {
  const Src* s = static_cast<const Src*>(c.src);
  switch (c.dst_dtype) {
    case at::kFloat:
      return cast_typed(static_cast<float*>(c.dst), s, c.n, mode, saturate, key, c.rng_index);
    case at::kHalf:
      return cast_typed(static_cast<c10::Half*>(c.dst), s, c.n, mode, saturate, key, c.rng_index);
    case at::kBFloat16:
      return cast_typed(static_cast<c10::BFloat16*>(c.dst), s, c.n, mode, saturate, key, c.rng_index);
    default:
      TORCH_INTERNAL_ASSERT(false, "cast_: unexpected dst dtype ", c.dst_dtype);
  }
}

void cast_chunk(const CastChunk& c, Rounding mode, bool saturate, RngKey key) {
  switch (c.src_dtype) {
    case at::kFloat:
      return cast_from<float>(c, mode, saturate, key);
    case at::kHalf:
      return cast_from<c10::Half>(c, mode, saturate, key);
    case at::kBFloat16:
      return cast_from<c10::BFloat16>(c, mode, saturate, key);
    default:
      TORCH_INTERNAL_ASSERT(false, "cast_: unexpected src dtype ", c.src_dtype);
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY

MIXPREC_REGISTER_CPU_KERNEL(cast_chunk_kernels, CPU_CAPABILITY::cast_chunk);

}  // namespace mixprec::cpu
