// What the per-capability CPU kernels (ops/cpu/*_kernel.cpp) share: loads of 16 fp32/fp16/bf16 elements as two
// fp32 vectors, the max of magnitude bits over a run, and the one dtype switch. Included inside each kernel's
// capability namespace (see cpu_dispatch.h), so every build gets its own copy.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

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

// fn(T{}) with T the C++ type of `dtype` (the four the INT8 and FP8 ops accept): one switch for every entry.
template <typename Fn>
void with_dtype(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(float{});
    case at::kHalf:
      return fn(c10::Half{});
    case at::kBFloat16:
      return fn(c10::BFloat16{});
    case at::kDouble:
      return fn(double{});
    default:
      TORCH_INTERNAL_ASSERT(false, op, ": unexpected dtype ", dtype);
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace mixprec::cpu
