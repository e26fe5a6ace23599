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
#include "ops/cpu/stochastic_avx2.h"
#include "ops/philox.h"
#include "ops/rounding.h"

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
// Rounds n0 (a multiple of 64) elements, 8 Philox groups per step; index0 is a multiple of 8.
template <typename Dst>
void stochastic_block64_avx2(Dst* d, const float* s, int64_t n0, bool saturate, RngKey key, uint64_t index0) {
  avx2::draw_blocks64(0, n0, index0, key.offset, key.seed, [&](int64_t k, const __m256i draws[2]) {
    __m256 x[2];
    for (int h = 0; h < 2; ++h) {
      FVec v = FVec::loadu(s + k + 8 * h);
      if (saturate) v = saturate_vec(v, max_finite<Dst>());
      x[h] = v;
    }
    avx2::store_stochastic16(d + k, x, draws);
  });
}
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
      stochastic_block64_avx2<Dst>(d, s, i, saturate, key, index0);
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
