// The two passes of int8_quantize on the CPU with nearest rounding, compiled once per CPU capability (see
// cpu_dispatch.h): each block's amax as the max of magnitude bits (NaN above inf above every finite value,
// as on CUDA), then the codes by ops/int8.h's rule. Runs of a block's elements along a row, and per-column
// blocks, go through ATen's vector types 16 elements at a time; blocks narrower than that along a row and
// float64 inputs take the scalar rule. Both builds give the rule's bits (tests compare them).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "ops/cpu/cpu_dispatch.h"
#include "ops/int8.h"
#include "ops/rounding.h"

namespace mixprec::cpu {
inline namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using FVec = Vectorized<float>;
using IVec = Vectorized<int32_t>;
constexpr int64_t kStep = 2 * FVec::size();  // elements per vector step: one 16-bit vector, two fp32 vectors

template <typename Src>
constexpr bool kVectorised = std::is_same_v<Src, float> || std::is_same_v<Src, c10::Half> ||
                             std::is_same_v<Src, c10::BFloat16>;

// kStep elements at p as two fp32 vectors (16-bit values widen exactly).
template <typename Src>
inline void load(const Src* p, FVec& a, FVec& b) {
  if constexpr (std::is_same_v<Src, float>) {
    a = FVec::loadu(p);
    b = FVec::loadu(p + FVec::size());
  } else {
    std::tie(a, b) = at::vec::convert_to_float<Src>(Vectorized<Src>::loadu(p));
  }
}

// The magnitude bits of each lane: non-negative int32, so a signed max orders them as magnitudes.
inline IVec magnitudes(const FVec& x) { return at::vec::cast<int32_t>(x) & IVec(0x7fffffff); }

inline uint32_t horizontal_max(const IVec& v) {
  alignas(64) int32_t lanes[IVec::size()];
  v.store(lanes);
  int32_t m = 0;
  for (int k = 0; k < IVec::size(); ++k) m = std::max(m, lanes[k]);
  return static_cast<uint32_t>(m);
}

// max of the magnitude bits of p[0, n).
template <typename Src>
uint32_t run_max(const Src* p, int64_t n) {
  uint32_t m = 0;
  int64_t i = 0;
  if constexpr (kVectorised<Src>) {
    if (n >= kStep) {
      IVec acc(0);
      for (; i + kStep <= n; i += kStep) {
        FVec a, b;
        load(p + i, a, b);
        acc = at::vec::maximum(acc, at::vec::maximum(magnitudes(a), magnitudes(b)));
      }
      m = horizontal_max(acc);
    }
  }
  for (; i < n; ++i) m = std::max(m, rounding::magnitude_bits(static_cast<float>(p[i])));
  return m;
}

// x * scale -> NaN to 0, saturated to +-127, rounded half to even: int8::to_int8's nearest rule, lane-wise.
inline FVec codes(const FVec& x, const FVec& scale) {
  FVec v = x * scale;
  v = FVec::blendv(v, FVec(0.0f), v != v);
  v = at::vec::clamp(v, FVec(-int8::kInt8Max), FVec(int8::kInt8Max));
  return (v + FVec(12582912.0f)) - FVec(12582912.0f);  // int8::round_half_even
}

// Stores 8 integral lanes in [-127, 127] as int8.
inline void store_codes(int8_t* d, const FVec& r) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256i i32 = _mm256_cvttps_epi32(r);
  const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(d), _mm_packs_epi16(i16, i16));
#else
  alignas(64) float lanes[FVec::size()];
  r.store(lanes);
  for (int k = 0; k < FVec::size(); ++k) d[k] = static_cast<int8_t>(lanes[k]);
#endif
}

// Codes of p[0, n) with one scale (scales == nullptr) or one scale per element (scales[0, n)).
template <typename Src>
void run_codes(const Src* p, int8_t* d, int64_t n, float scale, const float* scales) {
  int64_t i = 0;
  if constexpr (kVectorised<Src>) {
    const FVec s(scale);
    for (; i + kStep <= n; i += kStep) {
      FVec a, b;
      load(p + i, a, b);
      const FVec sa = scales != nullptr ? FVec::loadu(scales + i) : s;
      const FVec sb = scales != nullptr ? FVec::loadu(scales + i + FVec::size()) : s;
      store_codes(d + i, codes(a, sa));
      store_codes(d + i + FVec::size(), codes(b, sb));
    }
  }
  for (; i < n; ++i) {
    d[i] = int8::to_int8(static_cast<float>(p[i]), scales != nullptr ? scales[i] : scale, rounding::Mode::Nearest, 0);
  }
}

template <typename Src>
void amax_rows_typed(const Int8Rows& m, int64_t r0, int64_t r1, uint32_t* table) {
  const Src* src = static_cast<const Src*>(m.src);
  for (int64_t r = r0; r < r1; ++r) {
    const Src* row = src + r * m.cols;
    uint32_t* t = table + r / m.block_rows * m.grid_cols;
    if (m.block_cols == 1) {  // a block per column: the row's magnitudes max into the table lane-wise
      int64_t c = 0;
      if constexpr (kVectorised<Src>) {
        int32_t* ti = reinterpret_cast<int32_t*>(t);  // entries are magnitude bits, below 2^31
        for (; c + kStep <= m.cols; c += kStep) {
          FVec a, b;
          load(row + c, a, b);
          at::vec::maximum(IVec::loadu(ti + c), magnitudes(a)).store(ti + c);
          at::vec::maximum(IVec::loadu(ti + c + IVec::size()), magnitudes(b)).store(ti + c + IVec::size());
        }
      }
      for (; c < m.cols; ++c) t[c] = std::max(t[c], rounding::magnitude_bits(static_cast<float>(row[c])));
    } else {
      for (int64_t c0 = 0, j = 0; c0 < m.cols; c0 += m.block_cols, ++j) {
        t[j] = std::max(t[j], run_max(row + c0, std::min(m.block_cols, m.cols - c0)));
      }
    }
  }
}

template <typename Src>
void codes_rows_typed(const Int8Rows& m, int64_t r0, int64_t r1, const float* scales) {
  const Src* src = static_cast<const Src*>(m.src);
  for (int64_t r = r0; r < r1; ++r) {
    const Src* row = src + r * m.cols;
    int8_t* d = m.dst + r * m.cols;
    const float* s = scales + r / m.block_rows * m.grid_cols;
    if (m.block_cols == 1) {
      run_codes(row, d, m.cols, 0.0f, s);
    } else {
      for (int64_t c0 = 0, j = 0; c0 < m.cols; c0 += m.block_cols, ++j) {
        run_codes(row + c0, d + c0, std::min(m.block_cols, m.cols - c0), s[j], nullptr);
      }
    }
  }
}

void int8_amax_rows(const Int8Rows& m, int64_t r0, int64_t r1, uint32_t* table) {
  switch (m.dtype) {
    case at::kFloat:
      return amax_rows_typed<float>(m, r0, r1, table);
    case at::kHalf:
      return amax_rows_typed<c10::Half>(m, r0, r1, table);
    case at::kBFloat16:
      return amax_rows_typed<c10::BFloat16>(m, r0, r1, table);
    case at::kDouble:
      return amax_rows_typed<double>(m, r0, r1, table);
    default:
      TORCH_INTERNAL_ASSERT(false, "int8_quantize: unexpected dtype ", m.dtype);
  }
}

void int8_codes_rows(const Int8Rows& m, int64_t r0, int64_t r1, const float* scales) {
  switch (m.dtype) {
    case at::kFloat:
      return codes_rows_typed<float>(m, r0, r1, scales);
    case at::kHalf:
      return codes_rows_typed<c10::Half>(m, r0, r1, scales);
    case at::kBFloat16:
      return codes_rows_typed<c10::BFloat16>(m, r0, r1, scales);
    case at::kDouble:
      return codes_rows_typed<double>(m, r0, r1, scales);
    default:
      TORCH_INTERNAL_ASSERT(false, "int8_quantize: unexpected dtype ", m.dtype);
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY

MIXPREC_REGISTER_CPU_KERNEL(int8_amax_kernels, CPU_CAPABILITY::int8_amax_rows);
MIXPREC_REGISTER_CPU_KERNEL(int8_codes_kernels, CPU_CAPABILITY::int8_codes_rows);

}  // namespace mixprec::cpu
