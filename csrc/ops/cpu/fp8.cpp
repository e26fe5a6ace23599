// The FP8 ops on the CPU: quantize with a given scale (amax and the transposed copy in the same call),
// block-scaled quantize (per tensor, per row, 1x128, 128x128, ...), and the delayed-scaling update. The
// rounding is ops/fp8.h, the code the CUDA kernels run, so the two backends give the same bits; this
// backend is also the reference the recipes are tested against.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "ops/cpu/cpu_dispatch.h"
#include "ops/fp8.h"
#include "ops/fp8_plan.h"
#include "ops/rounding.h"

namespace mixprec::cpu {
namespace {

constexpr int64_t kFp8Grain = 1 << 16;  // elements per parallel piece at least (pieces may start anywhere)

/// Quantizes elements [begin, end) of `src` with `scale`; returns the max of their magnitude bits. Either
/// rounding runs the capability's kernel (fp8_kernel.cpp); element i draws by its index in the whole tensor.
template <typename Src>
uint32_t quantize_range(const Src* src, uint8_t* dst, int64_t begin, int64_t end, float scale,
                        const detail::Fp8Input& in, bool saturate, RngKey key) {
  constexpr at::ScalarType dtype = c10::CppTypeToScalarType<Src>::value;
  if (in.mode == rounding::Mode::Nearest) {
    return fp8_nearest_kernels.get("fp8_quantize")(src + begin, dtype, dst + begin, end - begin, scale, in.format,
                                                   saturate);
  }
  return fp8_stochastic_kernels.get("fp8_quantize")(src + begin, dtype, dst + begin, end - begin, scale, in.format,
                                                    saturate, key, static_cast<uint64_t>(begin));
}

#if defined(__SSE2__)
/// The 8x8 bytes at `src` (rows `src_stride` apart) transposed into `dst` (rows `dst_stride` apart): three
/// rounds of interleaving (bytes, pairs, quads) turn 8 rows of 8 bytes into 8 columns.
inline void transpose_8x8(const uint8_t* src, int64_t src_stride, uint8_t* dst, int64_t dst_stride) {
  const auto row = [&](int k) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + k * src_stride)); };
  const __m128i a0 = _mm_unpacklo_epi8(row(0), row(1)), a1 = _mm_unpacklo_epi8(row(2), row(3));
  const __m128i a2 = _mm_unpacklo_epi8(row(4), row(5)), a3 = _mm_unpacklo_epi8(row(6), row(7));
  const __m128i b0 = _mm_unpacklo_epi16(a0, a1), b1 = _mm_unpackhi_epi16(a0, a1);  // rows 0-3: columns 0-3, 4-7
  const __m128i b2 = _mm_unpacklo_epi16(a2, a3), b3 = _mm_unpackhi_epi16(a2, a3);  // rows 4-7 likewise
  const __m128i cols[4] = {_mm_unpacklo_epi32(b0, b2), _mm_unpackhi_epi32(b0, b2), _mm_unpacklo_epi32(b1, b3),
                           _mm_unpackhi_epi32(b1, b3)};  // two whole columns each
  for (int k = 0; k < 4; ++k) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + (2 * k) * dst_stride), cols[k]);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + (2 * k + 1) * dst_stride), _mm_unpackhi_epi64(cols[k], cols[k]));
  }
}
#endif

/// out[c * rows + r] = data[r * cols + c], in cache-sized tiles of 8x8 blocks (SSE2), bytes at the edges.
void transpose_bytes(const uint8_t* data, uint8_t* out, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 64;
  at::parallel_for(0, (rows + kTile - 1) / kTile, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const int64_t r0 = t * kTile, r1 = std::min(rows, r0 + kTile);
      for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
        const int64_t c1 = std::min(cols, c0 + kTile);
        int64_t r8 = r0, c8 = c0;  // where the 8x8 blocks end
#if defined(__SSE2__)
        r8 = r0 + (r1 - r0) / 8 * 8;
        c8 = c0 + (c1 - c0) / 8 * 8;
        for (int64_t r = r0; r < r8; r += 8) {
          for (int64_t c = c0; c < c8; c += 8) transpose_8x8(data + r * cols + c, cols, out + c * rows + r, rows);
        }
#endif
        for (int64_t c = c0; c < c1; ++c) {
          // Outside the blocks: the columns past c8 in every row, and the rows past r8 in the others.
          for (int64_t r = c < c8 ? r8 : r0; r < r1; ++r) out[c * rows + r] = data[r * cols + c];
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fp8_quantize_cpu(const at::Tensor& input, const at::Tensor& scale,
                                                                at::ScalarType dtype, c10::string_view rounding,
                                                                bool saturate, std::optional<int64_t> seed,
                                                                bool transpose) {
  const detail::Fp8Input in = detail::check_fp8_quantize(input, scale, dtype, rounding);
  detail::Fp8QuantizeOutputs out = detail::empty_fp8_quantize_outputs(in, dtype, transpose);
  const float s = *scale.const_data_ptr<float>();
  const RngKey key = in.mode == rounding::Mode::Stochastic ? stochastic_key(seed) : RngKey{0, 0};
  auto* dst = static_cast<uint8_t*>(out.data.data_ptr());
  uint32_t amax = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.input.scalar_type(), "mixprec::fp8_quantize", [&] {
    const scalar_t* src = in.input.const_data_ptr<scalar_t>();
    amax = at::parallel_reduce(
        0, in.input.numel(), kFp8Grain, uint32_t{0},
        [&](int64_t begin, int64_t end, uint32_t ident) {
          return std::max(ident, quantize_range(src, dst, begin, end, s, in, saturate, key));
        },
        [](uint32_t a, uint32_t b) { return std::max(a, b); });
  });
  *out.amax.data_ptr<float>() = rounding::bits_float(amax);
  if (transpose) transpose_bytes(dst, static_cast<uint8_t*>(out.data_t.data_ptr()), in.rows, in.cols);
  return {out.data, out.data_t, out.amax};
}

std::tuple<at::Tensor, at::Tensor> fp8_quantize_blockwise_cpu(const at::Tensor& input, at::ScalarType dtype,
                                                              int64_t block_rows, int64_t block_cols, int64_t margin,
                                                              bool pow2_scales, c10::string_view rounding,
                                                              bool saturate, std::optional<int64_t> seed) {
  detail::Fp8Blocks b{};
  const detail::Fp8Input in =
      detail::check_fp8_blockwise(input, dtype, block_rows, block_cols, margin, rounding, b);
  at::Tensor data = at::empty(in.input.sizes(), in.input.options().dtype(dtype));
  at::Tensor scale_inv = at::empty({b.grid_rows, b.grid_cols}, in.input.options().dtype(at::kFloat));
  const RngKey key = in.mode == rounding::Mode::Stochastic ? stochastic_key(seed) : RngKey{0, 0};
  const float fp8_max = fp8::max_finite(in.format);
  auto* dst = static_cast<uint8_t*>(data.data_ptr());
  float* inv = scale_inv.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.input.scalar_type(), "mixprec::fp8_quantize_blockwise", [&] {
        const scalar_t* src = in.input.const_data_ptr<scalar_t>();
        const MagnitudeMaxFn max_run = magnitude_max_kernels.get("fp8_quantize_blockwise");
        // One block per task: its amax, its scale, then its elements (read again, from cache).
        at::parallel_for(0, b.grid_rows * b.grid_cols, 1, [&](int64_t first, int64_t last) {
          for (int64_t blk = first; blk < last; ++blk) {
            const int64_t r0 = blk / b.grid_cols * b.block_rows, r1 = std::min(in.rows, r0 + b.block_rows);
            const int64_t c0 = blk % b.grid_cols * b.block_cols, c1 = std::min(in.cols, c0 + b.block_cols);
            uint32_t amax = 0;
            for (int64_t r = r0; r < r1; ++r) {
              amax = std::max(amax, max_run(src + r * in.cols + c0, in.input.scalar_type(), c1 - c0));
            }
            const float scale = fp8::scale_from_amax(rounding::bits_float(amax), fp8_max, static_cast<int>(margin),
                                                     pow2_scales, 1.0f);
            inv[blk] = 1.0f / scale;
            for (int64_t r = r0; r < r1; ++r) {
              quantize_range(src, dst, r * in.cols + c0, r * in.cols + c1, scale, in,
                             fp8::finite_block_saturate(saturate, amax), key);
            }
          }
        });
      });
  return {data, scale_inv};
}

void fp8_update_scales__cpu(const at::Tensor& amax_history, const at::Tensor& scale, const at::Tensor& scale_inv,
                            at::ScalarType dtype, c10::string_view algo, int64_t margin, bool pow2_scales,
                            const std::optional<at::Tensor>& turn, int64_t side, bool take_turn) {
  const detail::AmaxAlgo a =
      detail::check_fp8_update_scales(amax_history, scale, scale_inv, dtype, algo, margin, turn, side);
  const float fp8_max = fp8::max_finite(detail::parse_fp8_dtype(dtype, "mixprec::fp8_update_scales_"));
  if (turn.has_value()) {
    // The scales move once per turn: only if the other side (or nobody yet) updated last. `!=`, so that any
    // other value (an averaged buffer's 0.5, NaN) counts as the other side's. Without take_turn (a pass no
    // backward follows) a due update marks the turn 2, both sides due: the next pass of either updates.
    float* t = turn->data_ptr<float>();
    const bool due = *t != static_cast<float>(side);
    if (take_turn) {
      *t = static_cast<float>(side);
    } else if (due) {
      *t = 2.0f;
    }
    if (!due) return;
  }
  const int64_t history = amax_history.size(0), n = amax_history.size(1);
  float* h = amax_history.data_ptr<float>();
  float* s = scale.data_ptr<float>();
  float* si = scale_inv.data_ptr<float>();
  for (int64_t j = 0; j < n; ++j) {
    uint32_t amax = rounding::magnitude_bits(h[j]);
    if (a == detail::AmaxAlgo::Max) {
      for (int64_t k = 1; k < history; ++k) amax = std::max(amax, rounding::magnitude_bits(h[k * n + j]));
    }
    s[j] = fp8::scale_from_amax(rounding::bits_float(amax), fp8_max, static_cast<int>(margin), pow2_scales, s[j]);
    si[j] = 1.0f / s[j];
    // The window moves on: row k + 1 takes row k, row 0 is cleared for the next step's amax.
    for (int64_t k = history - 1; k > 0; --k) h[k * n + j] = h[(k - 1) * n + j];
    h[j] = 0.0f;
  }
}

// The GEMMs on the CPU are the exact emulation: dequantize, then an fp32 GEMM with fp32 accumulation.
// use_fast_accum only changes CUDA's forward GEMM; here every sum is fp32.
at::Tensor fp8_gemm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv,
                        const at::Tensor& b_scale_inv, at::ScalarType out_dtype, const std::optional<at::Tensor>& bias,
                        bool /*use_fast_accum*/) {
  const detail::Fp8GemmArgs g = detail::check_fp8_gemm("mixprec::fp8_gemm", a, b, a_scale_inv, b_scale_inv);
  detail::check_fp8_gemm_output(out_dtype, bias, g);
  return detail::emulated_fp8_gemm(g, out_dtype, bias);
}

void fp8_gemm_accum__cpu(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv,
                         const at::Tensor& b_scale_inv) {
  const detail::Fp8GemmArgs g = detail::check_fp8_gemm("mixprec::fp8_gemm_accum_", a, b, a_scale_inv, b_scale_inv);
  detail::check_fp8_gemm_accum(out, g);
  detail::emulated_fp8_gemm_accum_(out, g);
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CPU, m) {
  m.impl("fp8_gemm", &fp8_gemm_cpu);
  m.impl("fp8_gemm_accum_", &fp8_gemm_accum__cpu);
  m.impl("fp8_quantize", &fp8_quantize_cpu);
  m.impl("fp8_quantize_blockwise", &fp8_quantize_blockwise_cpu);
  m.impl("fp8_update_scales_", &fp8_update_scales__cpu);
}

// A sparse input routes the call here; the checks then name it.
TORCH_LIBRARY_IMPL(mixprec, SparseCPU, m) {
  m.impl("fp8_quantize", &fp8_quantize_cpu);
  m.impl("fp8_quantize_blockwise", &fp8_quantize_blockwise_cpu);
}

}  // namespace mixprec::cpu

namespace mixprec::detail {

at::Tensor dequantize_cpu(const at::Tensor& x, const at::Tensor& scale_inv, const Fp8ScaleLayout& layout) {
  const at::Tensor codes = x.contiguous();
  const at::Tensor scales = scale_inv.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const int64_t rows = codes.dim() == 2 ? codes.size(0) : 1, cols = codes.numel() / std::max<int64_t>(rows, 1);
  if (codes.numel() == 0) return out;
  const fp8::Format format = parse_fp8_dtype(codes.scalar_type(), "mixprec::fp8_gemm");
  const auto* src = static_cast<const uint8_t*>(codes.const_data_ptr());
  float* dst = out.data_ptr<float>();
  const float* s = scales.const_data_ptr<float>();
  const cpu::Fp8DequantizeFn run = cpu::fp8_dequantize_kernels.get("fp8_gemm");
  // Per tensor: one scale, any split. Otherwise row r's block of columns [c, c + block_cols) takes scale
  // [r / block_rows][c / block_cols] of the [ceil(rows / block_rows), ceil(cols / block_cols)] table.
  const int64_t block_cols = layout.per_tensor ? cols : std::min(layout.block_cols, cols);
  const int64_t block_rows = layout.per_tensor ? rows : layout.block_rows;
  const int64_t grid_cols = (cols + block_cols - 1) / block_cols;
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(cols, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row_scales = s + (layout.per_tensor ? 0 : (r / block_rows) * grid_cols);
      for (int64_t c = 0, b = 0; c < cols; c += block_cols, ++b) {
        const int64_t n = std::min(block_cols, cols - c);
        run(src + r * cols + c, dst + r * cols + c, n, format, row_scales[layout.per_tensor ? 0 : b]);
      }
    }
  });
  return out;
}

}  // namespace mixprec::detail
