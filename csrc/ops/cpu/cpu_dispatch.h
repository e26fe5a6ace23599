// Run-time choice between CPU kernel builds. Every ops/cpu/*_kernel.cpp is compiled once per CPU
// capability (DEFAULT: baseline x86-64 or whatever the target is; AVX2: -mavx2 -mfma -mf16c) with
// ATen's vector types in a namespace of that capability, so the builds cannot collide. Each build
// registers its entry in a KernelTable at load time; callers take the best one the running CPU
// supports. at::native::get_cpu_capability() honours ATEN_CPU_CAPABILITY=default, which lets tests run
// the DEFAULT build on an AVX2 machine and compare the two bit for bit.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "ops/adam_rule.h"
#include "ops/fp8.h"
#include "ops/rounding.h"

namespace mixprec::cpu {

enum class Capability : int { Default = 0, Avx2 = 1 };
constexpr int kNumCapabilities = 2;

/// The best capability that both the running CPU (and ATEN_CPU_CAPABILITY) allows and has an entry.
Capability runtime_capability();

template <typename Fn>
class KernelTable {
 public:
  constexpr KernelTable() = default;  // constant-initialised: safe to register into from any static init
  void set(Capability c, Fn fn) { fns_[static_cast<int>(c)] = fn; }
  Fn get(const char* name) const {
    const int best = static_cast<int>(runtime_capability());
    for (int c = best; c >= 0; --c) {
      if (fns_[c] != nullptr) return fns_[c];
    }
    TORCH_INTERNAL_ASSERT(false, "mixprec: no CPU kernel was registered for ", name);
  }

 private:
  Fn fns_[kNumCapabilities] = {};
};

/// What a vectorised chunk kernel reports back.
struct UnscaleChunkResult {
  bool found_nonfinite;
  double sumsq;
  float amax;  ///< max |x| of the values as read: NaN if any is NaN, else inf if any is inf (non-negative)
};

/// Unscales `n` elements of dtype `dtype` at `data` in place; sums squares when `want_sumsq`.
using UnscaleChunkFn = UnscaleChunkResult (*)(void* data, int64_t n, at::ScalarType dtype, float inv_scale,
                                              bool want_sumsq);
extern KernelTable<UnscaleChunkFn> unscale_chunk_kernels;

/// One piece of a cast: `n` elements from `src` to `dst` (same layout), whose first element has index
/// `rng_index` in the list-wide numbering that stochastic rounding draws by (a multiple of 8).
struct CastChunk {
  void* dst;
  const void* src;
  int64_t n;
  at::ScalarType dst_dtype;
  at::ScalarType src_dtype;
  uint64_t rng_index;
};

using Rounding = rounding::Mode;

/// Philox key and stream offset for stochastic rounding.
struct RngKey {
  uint64_t seed;
  uint64_t offset;
};

/// The key of a stochastic rounding: `seed` itself, or with no seed a fresh one from torch's default CPU
/// generator, so torch.manual_seed governs the draws.
RngKey stochastic_key(std::optional<int64_t> seed);

using CastChunkFn = void (*)(const CastChunk& chunk, Rounding rounding, bool saturate, RngKey key);
extern KernelTable<CastChunkFn> cast_chunk_kernels;

/// One piece of an Adam step: `n` elements of one parameter's row (all laid out alike).
struct AdamChunk {
  void* param;
  void* grad;  // written back divided by grad_scale when AdamCommon::write_grad
  void* exp_avg;
  void* exp_avg_sq;
  void* master;  // fp32 master, int16 remainder, or unused (see AdamCommon::mode)
  void* max_exp_avg_sq;  // AMSGrad's running maximum (the moments' dtype), or null without AMSGrad
  int64_t n;
  at::ScalarType param_dtype;
  at::ScalarType grad_dtype;
  at::ScalarType moment_dtype;
  detail::AdamScalars scalars;
  uint64_t rng_index;  // multiple of 8
};

/// What every chunk of one adam_step_ call shares.
struct AdamCommon {
  detail::MasterMode mode;
  Rounding rounding;  // how a 16-bit param is written from its fp32 value
  RngKey key;
  float grad_scale;  // the gradients are divided by it, as torch's fused Adam divides (1 when there is none)
  float clip_coef;   // 1 when there is none
  bool write_grad;   // store grad / grad_scale back (a grad_scale was given), as torch's fused Adam does
};

using AdamChunkFn = void (*)(const AdamChunk& chunk, const AdamCommon& common);
extern KernelTable<AdamChunkFn> adam_chunk_kernels;

/// A contiguous [rows, cols] matrix being quantized to INT8 in blocks of block_rows x block_cols (int8.h's
/// rule): row r's block scales start at r / block_rows * grid_cols in a table of the grid.
struct Int8Rows {
  const void* src;
  int8_t* dst;
  at::ScalarType dtype;
  int64_t cols, block_rows, block_cols, grid_cols;
};

/// Rows [r0, r1): each block's entry of `table` becomes the max of itself and its elements' magnitude bits.
using Int8AmaxFn = void (*)(const Int8Rows& m, int64_t r0, int64_t r1, uint32_t* table);
extern KernelTable<Int8AmaxFn> int8_amax_kernels;
/// Rows [r0, r1): the codes, each element by its block's entry of `scales`; stochastic rounding draws by the
/// element's flat index under `key` (draws.h's numbering).
using Int8CodesFn = void (*)(const Int8Rows& m, int64_t r0, int64_t r1, const float* scales, Rounding mode,
                             RngKey key);
extern KernelTable<Int8CodesFn> int8_codes_kernels;

/// A contiguous [rows, cols] matrix being fake-quantized in blocks (int8.h's fake_quantize), the block
/// layout as in Int8Rows; `x` and `y` (and the gradients) are of `dtype`.
struct FakeQuantRows {
  const void* x;
  at::ScalarType dtype;
  int64_t cols, block_rows, block_cols, grid_cols;
  float qmin, qmax;
};

/// Rows [r0, r1) of the forward: y = the fake-quantized x, each element by its block's step in `steps`.
using FakeQuantForwardFn = void (*)(const FakeQuantRows& m, void* y, int64_t r0, int64_t r1, const float* steps);
extern KernelTable<FakeQuantForwardFn> fake_quantize_forward_kernels;
/// Rows [r0, r1) of the backward: dx = dy where the code was in range, else 0; and, when `terms` is not
/// null, the learnable step's per-element term times dy (fp32).
using FakeQuantBackwardFn = void (*)(const FakeQuantRows& m, const void* dy, void* dx, float* terms, int64_t r0,
                                     int64_t r1, const float* steps);
extern KernelTable<FakeQuantBackwardFn> fake_quantize_backward_kernels;

/// `n` elements of `dtype` at `src` quantized to FP8 codes of `format` as fp8::to_fp8_nearest(x * scale)
/// into `dst`; returns the max of the inputs' magnitude bits (their amax, NaN above inf above finite values).
using Fp8NearestFn = uint32_t (*)(const void* src, at::ScalarType dtype, uint8_t* dst, int64_t n, float scale,
                                  fp8::Format format, bool saturate);
extern KernelTable<Fp8NearestFn> fp8_nearest_kernels;
/// As Fp8NearestFn with fp8::to_fp8_stochastic: element i rounds with the draw of index `index0 + i` under
/// `key` (draws.h's numbering, the one every backend uses).
using Fp8StochasticFn = uint32_t (*)(const void* src, at::ScalarType dtype, uint8_t* dst, int64_t n, float scale,
                                     fp8::Format format, bool saturate, RngKey key, uint64_t index0);
extern KernelTable<Fp8StochasticFn> fp8_stochastic_kernels;
/// `n` FP8 codes of `format` at `src` as fp32 values times `scale` at `dst`: fp8::from_fp8 (exact), then one
/// fp32 product.
using Fp8DequantizeFn = void (*)(const uint8_t* src, float* dst, int64_t n, fp8::Format format, float scale);
extern KernelTable<Fp8DequantizeFn> fp8_dequantize_kernels;
/// The max of the magnitude bits of `n` elements of `dtype` at `src`.
using MagnitudeMaxFn = uint32_t (*)(const void* src, at::ScalarType dtype, int64_t n);
extern KernelTable<MagnitudeMaxFn> magnitude_max_kernels;

}  // namespace mixprec::cpu

// In a *_kernel.cpp: MIXPREC_REGISTER_CPU_KERNEL(table, function) registers this build's entry.
#define MIXPREC_CPU_CONCAT_INNER(a, b) a##b
#define MIXPREC_CPU_CONCAT(a, b) MIXPREC_CPU_CONCAT_INNER(a, b)
#define MIXPREC_REGISTER_CPU_KERNEL(table, fn)                                                        \
  static const bool MIXPREC_CPU_CONCAT(mixprec_cpu_kernel_registered_, __LINE__) =                   \
      (::mixprec::cpu::table.set(static_cast<::mixprec::cpu::Capability>(MIXPREC_CPU_CAPABILITY_ID), \
                                 &fn),                                                               \
       true)
