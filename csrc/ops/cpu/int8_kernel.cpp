// The two passes of int8_quantize on the CPU, compiled once per CPU capability (see cpu_dispatch.h): each
// block's amax as the max of magnitude bits (NaN above inf above every finite value, as on CUDA), then the
// codes by ops/int8.h's rule, nearest or stochastic. Runs of a block's elements along a row, and per-column
// blocks, go through ATen's vector types 16 elements at a time (stochastic rounding: 64 at a time, Philox on 8
// groups at once, as the cast's kernels draw); blocks narrower than that along a row, heads up to the first
// 8-aligned draw index and float64 inputs take the scalar rule. Both builds give the rule's bits (tests
// compare them).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "ops/cpu/cpu_dispatch.h"
#include "ops/cpu/draws.h"
#include "ops/cpu/stochastic_avx2.h"
#include "ops/cpu/vec_common.h"
#include "ops/int8.h"
#include "ops/rounding.h"

namespace mixprec::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// x * scale -> NaN to 0, saturated to +-127, rounded half to even: int8::to_int8's nearest rule, lane-wise.
inline FVec codes(const FVec& x, const FVec& scale) {
  FVec v = x * scale;
  v = FVec::blendv(v, FVec(0.0f), v != v);
  v = at::vec::clamp(v, FVec(-int8::kInt8Max), FVec(int8::kInt8Max));
  return (v + FVec(12582912.0f)) - FVec(12582912.0f);  // int8::round_half_even
}

// int8::to_int8's stochastic rule lane-wise: up from floor(v) when the fraction exceeds the draw * 2^-16.
inline FVec stochastic_codes(const FVec& x, const FVec& scale, const FVec& draw16) {
  FVec v = x * scale;
  v = FVec::blendv(v, FVec(0.0f), v != v);
  v = at::vec::clamp(v, FVec(-int8::kInt8Max), FVec(int8::kInt8Max));
  const FVec low = v.floor();
  return FVec::blendv(low, low + FVec(1.0f), (v - low) > draw16 * FVec(1.52587890625e-05f));
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

// As run_codes with stochastic rounding: element i draws by index index0 + i (draws.h's numbering).
template <typename Src>
void run_codes_stochastic(const Src* p, int8_t* d, int64_t n, float scale, const float* scales, RngKey key,
                          uint64_t index0) {
  int64_t i = 0;
  Draws draws(key);
  const auto scalar_until = [&](int64_t end) {
    for (; i < end; ++i) {
      d[i] = int8::to_int8(static_cast<float>(p[i]), scales != nullptr ? scales[i] : scale, rounding::Mode::Stochastic,
                           draws.at(index0 + static_cast<uint64_t>(i)));
    }
  };
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (kVectorised<Src>) {
    scalar_until(avx2::elements_to_group(index0, n));
    const FVec s(scale);
    i = avx2::draw_blocks64(i, n, index0, key.offset, key.seed, [&](int64_t k, const __m256i draws[2]) {
      FVec a, b;
      load(p + k, a, b);
      const FVec sa = scales != nullptr ? FVec::loadu(scales + k) : s;
      const FVec sb = scales != nullptr ? FVec::loadu(scales + k + FVec::size()) : s;
      store_codes(d + k, stochastic_codes(a, sa, FVec(_mm256_cvtepi32_ps(draws[0]))));
      store_codes(d + k + FVec::size(), stochastic_codes(b, sb, FVec(_mm256_cvtepi32_ps(draws[1]))));
    });
  }
#endif
  scalar_until(n);
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
void codes_rows_typed(const Int8Rows& m, int64_t r0, int64_t r1, const float* scales, Rounding mode, RngKey key) {
  const Src* src = static_cast<const Src*>(m.src);
  // A run of n elements starting at flat index `first`, with one scale or per-element scales.
  const auto run = [&](int64_t first, int64_t n, float scale, const float* per_element) {
    if (mode == Rounding::Nearest) {
      run_codes(src + first, m.dst + first, n, scale, per_element);
    } else {
      run_codes_stochastic(src + first, m.dst + first, n, scale, per_element, key, static_cast<uint64_t>(first));
    }
  };
  for (int64_t r = r0; r < r1; ++r) {
    const float* s = scales + r / m.block_rows * m.grid_cols;
    if (m.block_cols == 1) {
      run(r * m.cols, m.cols, 0.0f, s);
    } else {
      for (int64_t c0 = 0, j = 0; c0 < m.cols; c0 += m.block_cols, ++j) {
        run(r * m.cols + c0, std::min(m.block_cols, m.cols - c0), s[j], nullptr);
      }
    }
  }
}

void int8_amax_rows(const Int8Rows& m, int64_t r0, int64_t r1, uint32_t* table) {
  with_dtype(m.dtype, "int8_quantize", [&](auto t) { amax_rows_typed<decltype(t)>(m, r0, r1, table); });
}

void int8_codes_rows(const Int8Rows& m, int64_t r0, int64_t r1, const float* scales, Rounding mode, RngKey key) {
  with_dtype(m.dtype, "int8_quantize",
             [&](auto t) { codes_rows_typed<decltype(t)>(m, r0, r1, scales, mode, key); });
}

// ---- fake quantization ----------------------------------------------------------------------------------

// kStep elements of two fp32 vectors stored as Dst (16-bit: rounded to nearest even, as static_cast does for
// every non-NaN value; callers keep NaN lanes off this path).
template <typename Dst>
inline void store(Dst* p, const FVec& a, const FVec& b) {
  if constexpr (std::is_same_v<Dst, float>) {
    a.store(p);
    b.store(p + FVec::size());
  } else {
    at::vec::convert_from_float<Dst>(a, b).store(p);
  }
}

inline bool any_nan(const FVec& a) { return (a != a).zero_mask() != (1 << FVec::size()) - 1; }

// int8::fake_quantize lane-wise for non-NaN x * inv: the rounded code and whether it was in range.
struct FakeQuantVec {
  FVec code, scaled;
  FVec inside;  // all-ones lanes where qmin <= round(x * inv) <= qmax
};
inline FakeQuantVec fake_quantize_vec(const FVec& x, const FVec& inv, const FVec& qmin, const FVec& qmax) {
  const FVec v = x * inv;
  const FVec r = (at::vec::clamp(v, qmin - FVec(1.0f), qmax + FVec(1.0f)) + FVec(12582912.0f)) - FVec(12582912.0f);
  return {at::vec::clamp(r, qmin, qmax), v, (r >= qmin) & (r <= qmax)};
}

// Elements [c0, c1) of row r with the scalar rule (float64 inputs, tails, steps holding a NaN lane).
template <typename T>
void forward_scalar(const FakeQuantRows& m, const T* x, T* y, int64_t c0, int64_t c1, const float* s) {
  for (int64_t c = c0; c < c1; ++c) {
    const float step = s[c / m.block_cols];
    y[c] = static_cast<T>(int8::fake_quantize(static_cast<float>(x[c]), step, 1.0f / step, m.qmin, m.qmax).value);
  }
}

template <typename T>
void backward_scalar(const FakeQuantRows& m, const T* x, const T* dy, T* dx, float* t, int64_t c0, int64_t c1,
                     const float* s) {
  for (int64_t c = c0; c < c1; ++c) {
    const float step = s[c / m.block_cols];
    const int8::FakeQuantized q = int8::fake_quantize(static_cast<float>(x[c]), step, 1.0f / step, m.qmin, m.qmax);
    const float g = static_cast<float>(dy[c]);
    dx[c] = static_cast<T>(q.inside ? g : 0.0f);
    if (t != nullptr) t[c] = int8::lsq_scale_term(q) * g;
  }
}

// The steps of elements [c, c + kStep) of a row as two vectors: per-column steps, or one block's step; false
// where the elements span blocks (blocks narrower than kStep always do: they take the scalar rule).
inline bool step_vectors(const FakeQuantRows& m, const float* s, int64_t c, FVec& sa, FVec& sb) {
  if (m.block_cols == 1) {
    sa = FVec::loadu(s + c);
    sb = FVec::loadu(s + c + FVec::size());
    return true;
  }
  if (c / m.block_cols != (c + kStep - 1) / m.block_cols) return false;
  sa = sb = FVec(s[c / m.block_cols]);
  return true;
}

template <typename T>
void forward_rows_typed(const FakeQuantRows& m, void* out, int64_t r0, int64_t r1, const float* steps) {
  const FVec qmin(m.qmin), qmax(m.qmax);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(m.x) + r * m.cols;
    T* y = static_cast<T*>(out) + r * m.cols;
    const float* s = steps + r / m.block_rows * m.grid_cols;
    int64_t c = 0;
    if constexpr (kVectorised<T>) {
      for (; c + kStep <= m.cols; c += kStep) {
        FVec xa, xb, sa, sb;
        if (!step_vectors(m, s, c, sa, sb)) {
          forward_scalar(m, x, y, c, c + kStep, s);
          continue;
        }
        load(x + c, xa, xb);
        const FakeQuantVec qa = fake_quantize_vec(xa, FVec(1.0f) / sa, qmin, qmax);
        const FakeQuantVec qb = fake_quantize_vec(xb, FVec(1.0f) / sb, qmin, qmax);
        const FVec ya = qa.code * sa, yb = qb.code * sb;
        // A NaN out (x * inv NaN, or an infinite step's 0 * inf): the scalar rule's conversion decides its bits.
        if (any_nan(ya) || any_nan(yb) || any_nan(qa.scaled) || any_nan(qb.scaled)) {
          forward_scalar(m, x, y, c, c + kStep, s);
          continue;
        }
        store(y + c, ya, yb);
      }
    }
    forward_scalar(m, x, y, c, m.cols, s);
  }
}

template <typename T>
void backward_rows_typed(const FakeQuantRows& m, const void* grad, void* grad_input, float* terms, int64_t r0,
                         int64_t r1, const float* steps) {
  const FVec qmin(m.qmin), qmax(m.qmax);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(m.x) + r * m.cols;
    const T* dy = static_cast<const T*>(grad) + r * m.cols;
    T* dx = static_cast<T*>(grad_input) + r * m.cols;
    float* t = terms != nullptr ? terms + r * m.cols : nullptr;
    const float* s = steps + r / m.block_rows * m.grid_cols;
    int64_t c = 0;
    if constexpr (kVectorised<T>) {
      for (; c + kStep <= m.cols; c += kStep) {
        FVec xa, xb, ga, gb, sa, sb;
        if (!step_vectors(m, s, c, sa, sb)) {
          backward_scalar(m, x, dy, dx, t, c, c + kStep, s);
          continue;
        }
        load(x + c, xa, xb);
        load(dy + c, ga, gb);
        const FakeQuantVec qa = fake_quantize_vec(xa, FVec(1.0f) / sa, qmin, qmax);
        const FakeQuantVec qb = fake_quantize_vec(xb, FVec(1.0f) / sb, qmin, qmax);
        // NaN lanes (in x * inv or in dy) take the scalar rule, whose conversions decide their bits.
        if (any_nan(qa.scaled) || any_nan(qb.scaled) || any_nan(ga) || any_nan(gb)) {
          backward_scalar(m, x, dy, dx, t, c, c + kStep, s);
          continue;
        }
        store(dx + c, ga & qa.inside, gb & qb.inside);
        if (t != nullptr) {
          (FVec::blendv(qa.code, qa.code - qa.scaled, qa.inside) * ga).store(t + c);
          (FVec::blendv(qb.code, qb.code - qb.scaled, qb.inside) * gb).store(t + c + FVec::size());
        }
      }
    }
    backward_scalar(m, x, dy, dx, t, c, m.cols, s);
  }
}

void fake_quantize_forward_rows(const FakeQuantRows& m, void* y, int64_t r0, int64_t r1, const float* steps) {
  with_dtype(m.dtype, "fake_quantize", [&](auto t) { forward_rows_typed<decltype(t)>(m, y, r0, r1, steps); });
}

void fake_quantize_backward_rows(const FakeQuantRows& m, const void* dy, void* dx, float* terms, int64_t r0,
                                 int64_t r1, const float* steps) {
  with_dtype(m.dtype, "fake_quantize",
             [&](auto t) { backward_rows_typed<decltype(t)>(m, dy, dx, terms, r0, r1, steps); });
}

}  // namespace
}  // namespace CPU_CAPABILITY

MIXPREC_REGISTER_CPU_KERNEL(int8_amax_kernels, CPU_CAPABILITY::int8_amax_rows);
MIXPREC_REGISTER_CPU_KERNEL(int8_codes_kernels, CPU_CAPABILITY::int8_codes_rows);
MIXPREC_REGISTER_CPU_KERNEL(fake_quantize_forward_kernels, CPU_CAPABILITY::fake_quantize_forward_rows);
MIXPREC_REGISTER_CPU_KERNEL(fake_quantize_backward_kernels, CPU_CAPABILITY::fake_quantize_backward_rows);

}  // namespace mixprec::cpu
