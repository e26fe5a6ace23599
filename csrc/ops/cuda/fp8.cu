// The FP8 ops on CUDA. The rounding is ops/fp8.h, the code the CPU runs, and element i of the
// row-major input always draws its stochastic bits from Philox group i / 8, so a seeded call gives the
// same bits on both devices.
//
//   fp8_quantize            one pass: each thread converts octets (eight elements, one Philox call,
//                           vector loads where aligned) and keeps the amax, reduced per block and
//                           combined with one atomicMax on the magnitude bits. With `transpose`, 32x32
//                           tiles go through shared memory so both copies are written coalesced.
//   fp8_quantize_blockwise  one thread block per scaling block: the block's amax, its scale, then its
//                           elements (read again, now from cache). One block over the whole tensor
//                           (per-tensor current scaling) is three launches instead: a grid-wide amax,
//                           the scale, and the one-pass quantize.
//   fp8_update_scales_      one thread per scaled tensor.
// Nothing reads a scale or an amax on the host: every launch stays asynchronous.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "ops/cuda/block_reduce.cuh"
#include "ops/cuda/multi_tensor_apply.cuh"
#include "ops/cuda/ops.h"
#include "ops/cuda/rng.cuh"
#include "ops/fp8.h"
#include "ops/fp8_plan.h"
#include "ops/philox.h"
#include "ops/rounding.h"

namespace mixprec::cuda {
namespace {

using rounding::Mode;

constexpr int kThreads = 256;
constexpr int kTile = 32;       // transpose tiles: kTile x kTile elements
constexpr int kTileRows = 8;    // threads per tile column: each thread takes kTile / kTileRows rows
constexpr int kBlockThreads = 128;

struct Fp8Args {
  fp8::Format format;
  Mode mode;
  bool saturate;
  at::PhiloxCudaState rng;
  // Current scaling: a finite amax (final before the writing pass) saturates, see finite_block_saturate.
  bool finite_amax_saturates = false;
};

// One pass: data = fp8(src * scale[0]); amax (zeroed before the launch) |= max |src| as magnitude bits.
// `write` false only computes the amax (the first launch of per-tensor current scaling).
template <typename Src>
__global__ void __launch_bounds__(kThreads)
    quantize_kernel(const Src* __restrict__ src, uint8_t* __restrict__ dst, int64_t n, const float* scale,
                    uint32_t* amax, Fp8Args args, bool write) {
  __shared__ uint32_t shared[kThreads / 32];
  const auto [seed, offset] = at::cuda::philox::unpack(args.rng);
  const float s = write ? *scale : 1.0f;
  const bool saturate = write && args.finite_amax_saturates ? fp8::finite_block_saturate(args.saturate, *amax)
                                                             : args.saturate;
  const bool vec = aligned4<Src>(src);
  uint32_t local = 0;
  const int64_t octets = (n + 7) / 8;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; o < octets;
       o += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = o * 8;
    const bool full = i + 8 <= n;
    float x[8];
    load8(src, i, n, full && vec, x);
#pragma unroll
    for (int k = 0; k < 8; ++k) local = max(local, magnitude_bits(x[k]));
    if (!write) continue;
    philox::Draw4 r{{0, 0, 0, 0}};
    if (args.mode == Mode::Stochastic) r = philox::philox4x32_10(static_cast<uint64_t>(o), offset, seed);
    uint8_t out[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      out[k] = fp8::to_fp8(x[k] * s, args.format, args.mode, saturate, rounding::draw16(r.v, i + k));
    }
    if (full) {  // dst is a fresh allocation: every octet is 8-byte aligned
      uint2 packed;
      packed.x = out[0] | (out[1] << 8) | (out[2] << 16) | (static_cast<uint32_t>(out[3]) << 24);
      packed.y = out[4] | (out[5] << 8) | (out[6] << 16) | (static_cast<uint32_t>(out[7]) << 24);
      reinterpret_cast<uint2*>(dst)[o] = packed;
    } else {
      for (int k = 0; k < 8 && i + k < n; ++k) dst[i + k] = out[k];
    }
  }
  const uint32_t m = block_max(local, shared);
  if (threadIdx.x == 0 && m != 0) atomicMax(amax, m);
}

// data and its transpose through 32x32 tiles in shared memory: both writes are coalesced.
template <typename Src>
__global__ void __launch_bounds__(kTile* kTileRows)
    quantize_transpose_kernel(const Src* __restrict__ src, uint8_t* __restrict__ dst, uint8_t* __restrict__ dst_t,
                              int64_t rows, int64_t cols, const float* scale, uint32_t* amax, Fp8Args args) {
  __shared__ uint8_t tile[kTile][kTile + 4];
  __shared__ uint32_t shared[kTile * kTileRows / 32];
  const auto [seed, offset] = at::cuda::philox::unpack(args.rng);
  const float s = *scale;
  // Row tiles on x (up to 2^31 - 1 of them: any token count); column tiles on y, striding past 65535.
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  uint32_t local = 0;
  const int64_t c_stride = static_cast<int64_t>(gridDim.y) * kTile;
  for (int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTile; c0 < cols; c0 += c_stride) {
    for (int k = ty; k < kTile; k += kTileRows) {
      const int64_t r = r0 + k, c = c0 + tx;
      if (r < rows && c < cols) {
        const int64_t index = r * cols + c;
        const float x = static_cast<float>(src[index]);
        local = max(local, magnitude_bits(x));
        const uint32_t draw =
            args.mode == Mode::Stochastic ? draw_of(static_cast<uint64_t>(index), seed, offset) : 0u;
        const uint8_t code = fp8::to_fp8(x * s, args.format, args.mode, args.saturate, draw);
        dst[index] = code;
        tile[k][tx] = code;
      }
    }
    __syncthreads();
    for (int k = ty; k < kTile; k += kTileRows) {
      const int64_t c = c0 + k, r = r0 + tx;  // row c of the transpose, column r
      if (c < cols && r < rows) dst_t[c * rows + r] = tile[tx][k];
    }
    __syncthreads();  // the tile is written again for the next column tile
  }
  const uint32_t m = block_max(local, shared);
  if (threadIdx.x == 0 && m != 0) atomicMax(amax, m);
}

// scale[j] and scale_inv[j] from amax[j] (the magnitude bits a quantize launch left there).
__global__ void scales_from_amax_kernel(const uint32_t* amax, float* scale, float* scale_inv, int64_t n, float fp8_max,
                                        int margin, bool pow2) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= n) return;
  scale[j] = fp8::scale_from_amax(__uint_as_float(amax[j]), fp8_max, margin, pow2, 1.0f);
  scale_inv[j] = 1.0f / scale[j];
}

// One thread block per scaling block of the [rows, cols] matrix.
template <typename Src>
__global__ void __launch_bounds__(kBlockThreads)
    quantize_blocks_kernel(const Src* __restrict__ src, uint8_t* __restrict__ dst, float* __restrict__ scale_inv,
                           int64_t rows, int64_t cols, detail::Fp8Blocks b, int margin, bool pow2, Fp8Args args) {
  __shared__ uint32_t shared[kBlockThreads / 32];
  const auto [seed, offset] = at::cuda::philox::unpack(args.rng);
  const int64_t blk = blockIdx.x;
  const int64_t r0 = blk / b.grid_cols * b.block_rows, c0 = blk % b.grid_cols * b.block_cols;
  const int64_t h = min(rows, r0 + b.block_rows) - r0, w = min(cols, c0 + b.block_cols) - c0;
  uint32_t local = 0;
  for (int64_t e = threadIdx.x; e < h * w; e += kBlockThreads) {
    local = max(local, magnitude_bits(static_cast<float>(src[(r0 + e / w) * cols + c0 + e % w])));
  }
  const uint32_t amax = block_max(local, shared);
  const float scale = fp8::scale_from_amax(__uint_as_float(amax), fp8::max_finite(args.format), margin, pow2, 1.0f);
  if (threadIdx.x == 0) scale_inv[blk] = 1.0f / scale;
  const bool saturate = fp8::finite_block_saturate(args.saturate, amax);
  for (int64_t e = threadIdx.x; e < h * w; e += kBlockThreads) {
    const int64_t index = (r0 + e / w) * cols + c0 + e % w;
    const uint32_t draw = args.mode == Mode::Stochastic ? draw_of(static_cast<uint64_t>(index), seed, offset) : 0u;
    dst[index] = fp8::to_fp8(static_cast<float>(src[index]) * scale, args.format, args.mode, saturate, draw);
  }
}

// With a `turn` the launch is one block: every thread reads it before thread 0 writes it (take_turn).
__global__ void update_scales_kernel(float* history, float* scale, float* scale_inv, int64_t length, int64_t n,
                                     float fp8_max, bool use_max, int margin, bool pow2, float* turn, float side,
                                     bool take_turn) {
  const bool due = turn == nullptr || *turn != side;
  if (turn != nullptr) {  // as the CPU kernel: taken, or marked 2 (both sides due) by a due pass that does not take it
    __syncthreads();
    if (threadIdx.x == 0 && (take_turn || due)) *turn = take_turn ? side : 2.0f;
  }
  if (!due) return;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t amax = magnitude_bits(history[j]);
    if (use_max) {
      for (int64_t k = 1; k < length; ++k) amax = max(amax, magnitude_bits(history[k * n + j]));
    }
    scale[j] = fp8::scale_from_amax(__uint_as_float(amax), fp8_max, margin, pow2, scale[j]);
    scale_inv[j] = 1.0f / scale[j];
    for (int64_t k = length - 1; k > 0; --k) history[k * n + j] = history[(k - 1) * n + j];
    history[j] = 0.0f;
  }
}

int grid_for(int64_t items, int threads) {
  return static_cast<int>(std::clamp<int64_t>((items + threads - 1) / threads, 1, 65535));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> fp8_quantize_cuda(const at::Tensor& input, const at::Tensor& scale,
                                                                 at::ScalarType dtype, c10::string_view rounding,
                                                                 bool saturate, std::optional<int64_t> seed,
                                                                 bool transpose) {
  const detail::Fp8Input in = detail::check_fp8_quantize(input, scale, dtype, rounding);
  const c10::cuda::CUDAGuard guard(input.device());
  detail::Fp8QuantizeOutputs out = detail::empty_fp8_quantize_outputs(in, dtype, transpose);
  out.amax.zero_();
  const int64_t n = in.input.numel();
  if (n == 0) return {out.data, out.data_t, out.amax};
  const Fp8Args args{in.format, in.mode, saturate,
                     in.mode == Mode::Stochastic ? stochastic_state(seed, input.device()) : at::PhiloxCudaState(0, 0),
                     /*finite_amax_saturates=*/false};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto* amax = reinterpret_cast<uint32_t*>(out.amax.data_ptr<float>());
  auto* dst = static_cast<uint8_t*>(out.data.data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.input.scalar_type(), "mixprec::fp8_quantize", [&] {
    const scalar_t* src = in.input.const_data_ptr<scalar_t>();
    if (transpose) {
      const dim3 grid(static_cast<unsigned>((in.rows + kTile - 1) / kTile),
                      static_cast<unsigned>(std::min<int64_t>((in.cols + kTile - 1) / kTile, 65535)));
      quantize_transpose_kernel<scalar_t><<<grid, kTile * kTileRows, 0, stream>>>(
          src, dst, static_cast<uint8_t*>(out.data_t.data_ptr()), in.rows, in.cols, scale.const_data_ptr<float>(),
          amax, args);
    } else {
      quantize_kernel<scalar_t><<<grid_for((n + 7) / 8, kThreads), kThreads, 0, stream>>>(
          src, dst, n, scale.const_data_ptr<float>(), amax, args, true);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out.data, out.data_t, out.amax};
}

std::tuple<at::Tensor, at::Tensor> fp8_quantize_blockwise_cuda(const at::Tensor& input, at::ScalarType dtype,
                                                               int64_t block_rows, int64_t block_cols, int64_t margin,
                                                               bool pow2_scales, c10::string_view rounding,
                                                               bool saturate, std::optional<int64_t> seed) {
  detail::Fp8Blocks b{};
  const detail::Fp8Input in =
      detail::check_fp8_blockwise(input, dtype, block_rows, block_cols, margin, rounding, b);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor data = at::empty(in.input.sizes(), in.input.options().dtype(dtype));
  at::Tensor scale_inv = at::empty({b.grid_rows, b.grid_cols}, in.input.options().dtype(at::kFloat));
  const int64_t blocks = b.grid_rows * b.grid_cols;
  if (blocks == 0) return {data, scale_inv};
  const Fp8Args args{in.format, in.mode, saturate,
                     in.mode == Mode::Stochastic ? stochastic_state(seed, input.device()) : at::PhiloxCudaState(0, 0),
                     /*finite_amax_saturates=*/true};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float fp8_max = fp8::max_finite(in.format);
  auto* dst = static_cast<uint8_t*>(data.data_ptr());
  const int64_t n = in.input.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.input.scalar_type(), "mixprec::fp8_quantize_blockwise", [&] {
        const scalar_t* src = in.input.const_data_ptr<scalar_t>();
        if (blocks == 1) {
          // Per-tensor current scaling: the grid-wide amax, its scale, then the one-pass quantize.
          at::Tensor amax = at::zeros({1}, in.input.options().dtype(at::kInt));
          at::Tensor scale = at::empty({1}, in.input.options().dtype(at::kFloat));
          auto* amax_bits = reinterpret_cast<uint32_t*>(amax.data_ptr<int32_t>());
          quantize_kernel<scalar_t><<<grid_for((n + 7) / 8, kThreads), kThreads, 0, stream>>>(
              src, dst, n, nullptr, amax_bits, args, false);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          scales_from_amax_kernel<<<1, 32, 0, stream>>>(amax_bits, scale.data_ptr<float>(),
                                                       scale_inv.data_ptr<float>(), 1, fp8_max,
                                                       static_cast<int>(margin), pow2_scales);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          if (n > 0) {
            // The second pass finds the same amax again: its atomicMax leaves the buffer as it is.
            quantize_kernel<scalar_t><<<grid_for((n + 7) / 8, kThreads), kThreads, 0, stream>>>(
                src, dst, n, scale.const_data_ptr<float>(), amax_bits, args, true);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        } else {
          TORCH_CHECK(blocks <= 0x7fffffff, "mixprec::fp8_quantize_blockwise: at most 2^31 - 1 blocks, got ", blocks);
          quantize_blocks_kernel<scalar_t><<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(
              src, dst, scale_inv.data_ptr<float>(), in.rows, in.cols, b, static_cast<int>(margin), pow2_scales,
              args);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
  return {data, scale_inv};
}

void fp8_update_scales__cuda(const at::Tensor& amax_history, const at::Tensor& scale, const at::Tensor& scale_inv,
                             at::ScalarType dtype, c10::string_view algo, int64_t margin, bool pow2_scales,
                             const std::optional<at::Tensor>& turn, int64_t side, bool take_turn) {
  const detail::AmaxAlgo a =
      detail::check_fp8_update_scales(amax_history, scale, scale_inv, dtype, algo, margin, turn, side);
  const float fp8_max = fp8::max_finite(detail::parse_fp8_dtype(dtype, "mixprec::fp8_update_scales_"));
  const c10::cuda::CUDAGuard guard(amax_history.device());
  const int64_t n = amax_history.size(1);
  if (n == 0 && !turn.has_value()) return;
  // A turn is read and written by the kernel (no host sync); one block, so that no block reads it late.
  update_scales_kernel<<<turn.has_value() ? 1 : grid_for(n, kThreads), kThreads, 0,
                         c10::cuda::getCurrentCUDAStream()>>>(
      amax_history.data_ptr<float>(), scale.data_ptr<float>(), scale_inv.data_ptr<float>(), amax_history.size(0), n,
      fp8_max, a == detail::AmaxAlgo::Max, static_cast<int>(margin), pow2_scales,
      turn.has_value() ? turn->data_ptr<float>() : nullptr, static_cast<float>(side), take_turn);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace mixprec::cuda
