// The integer ops on CUDA. The rounding is ops/int8.h, the code the CPU runs, and element i of the row-major
// input always draws its stochastic bits from Philox group i / 8, so a seeded call gives the same bits on
// both devices.
//
//   int8_quantize, per row      one thread block per row: the row's amax (block reduction), its scale,
//                               then the codes (the row read again, from cache).
//   int8_quantize, other blocks three launches: every block's amax (threads over columns, rows in chunks;
//                               lanes sharing a block reduce with __reduce_max_sync before one atomicMax),
//                               the scales, then the codes.
//   int8_mm                     torch._int_mm (cuBLASLt, int32 accumulation), then one fused pass that
//                               dequantizes (fp32, the CPU's order of operations), adds the bias, rounds.
//   fake_quantize_forward/_backward  element-wise, threads over columns.
// Nothing reads a scale or an amax on the host: every launch stays asynchronous.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "ops/cuda/block_reduce.cuh"
#include "ops/cuda/ops.h"
#include "ops/cuda/rng.cuh"
#include "ops/int8.h"
#include "ops/int8_plan.h"
#include "ops/rounding.h"

namespace mixprec::cuda {
namespace {

using rounding::Mode;

constexpr int kRowThreads = 256;  // int8_quantize per row: threads per row
constexpr int kCols = 256;        // the column-parallel kernels: columns (threads) per thread block
constexpr int kRows = 64;         // ... and rows per thread block

struct Codes {
  Mode mode;
  at::PhiloxCudaState rng;
};

template <typename Src>
__global__ void __launch_bounds__(kRowThreads)
    quantize_rows_kernel(const Src* __restrict__ src, int8_t* __restrict__ dst, float* __restrict__ scale_inv,
                         int64_t rows, int64_t cols, bool pow2, Codes codes) {
  __shared__ uint32_t shared[kRowThreads / 32];
  const auto [seed, offset] = at::cuda::philox::unpack(codes.rng);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const Src* row = src + r * cols;
    uint32_t local = 0;
    for (int64_t c = threadIdx.x; c < cols; c += kRowThreads) local = max(local, magnitude_bits(static_cast<float>(row[c])));
    const int8::BlockScale bs = int8::block_scale(__uint_as_float(block_max(local, shared)), pow2);
    const float scale = bs.scale;
    if (threadIdx.x == 0) scale_inv[r] = bs.scale_inv;
    for (int64_t c = threadIdx.x; c < cols; c += kRowThreads) {
      const int64_t i = r * cols + c;
      const uint32_t draw = codes.mode == Mode::Stochastic ? draw_of(static_cast<uint64_t>(i), seed, offset) : 0u;
      dst[i] = int8::to_int8(static_cast<float>(row[c]), scale, codes.mode, draw);
    }
  }
}

// The column-parallel kernels: thread x of thread block (bx, by) takes column bx * kCols + x and rows
// by * kRows .. + kRows, striding by gridDim.y * kRows: every warp reads whole row segments (coalesced).

// amax[blk] |= max |src| over each block, as magnitude bits (zeroed before the launch).
template <typename Src>
__global__ void __launch_bounds__(kCols)
    block_amax_kernel(const Src* __restrict__ src, uint32_t* amax, int64_t rows, int64_t cols, detail::Fp8Blocks b) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(kCols) + threadIdx.x;
  const bool valid = c < cols;
  const int lane = threadIdx.x % 32;
  for (int64_t r0 = blockIdx.y * static_cast<int64_t>(kRows); r0 < rows; r0 += static_cast<int64_t>(gridDim.y) * kRows) {
    const int64_t r1 = min(rows, r0 + kRows);
    for (int64_t r = r0; r < r1;) {
      // The rows of this chunk in one block row: the same for every lane, so the warp stays converged.
      const int64_t block_row = r / b.block_rows;
      const int64_t end = min(r1, (block_row + 1) * b.block_rows);
      uint32_t local = 0;
      for (; r < end; ++r) {
        if (valid) local = max(local, magnitude_bits(static_cast<float>(src[r * cols + c])));
      }
      const long long blk = valid ? block_row * b.grid_cols + c / b.block_cols : -1;
      const unsigned peers = __match_any_sync(0xffffffffu, blk);
      const uint32_t m = __reduce_max_sync(peers, local);
      if (valid && m != 0 && lane == __ffs(peers) - 1) atomicMax(amax + blk, m);
    }
  }
}

__global__ void block_scales_kernel(const uint32_t* amax, float* scale, float* scale_inv, int64_t n, bool pow2) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int8::BlockScale bs = int8::block_scale(__uint_as_float(amax[j]), pow2);
    scale[j] = bs.scale;
    scale_inv[j] = bs.scale_inv;
  }
}

template <typename Src>
__global__ void __launch_bounds__(kCols)
    block_quantize_kernel(const Src* __restrict__ src, int8_t* __restrict__ dst, const float* __restrict__ scale,
                          int64_t rows, int64_t cols, detail::Fp8Blocks b, Codes codes) {
  const auto [seed, offset] = at::cuda::philox::unpack(codes.rng);
  const int64_t c = blockIdx.x * static_cast<int64_t>(kCols) + threadIdx.x;
  if (c >= cols) return;
  const int64_t block_col = c / b.block_cols;
  for (int64_t r0 = blockIdx.y * static_cast<int64_t>(kRows); r0 < rows; r0 += static_cast<int64_t>(gridDim.y) * kRows) {
    for (int64_t r = r0; r < min(rows, r0 + kRows); ++r) {
      const int64_t i = r * cols + c;
      const uint32_t draw = codes.mode == Mode::Stochastic ? draw_of(static_cast<uint64_t>(i), seed, offset) : 0u;
      dst[i] = int8::to_int8(static_cast<float>(src[i]), scale[r / b.block_rows * b.grid_cols + block_col], codes.mode,
                             draw);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kCols)
    fake_quantize_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ steps, int64_t rows,
                         int64_t cols, detail::Fp8Blocks b, float qmin, float qmax) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(kCols) + threadIdx.x;
  if (c >= cols) return;
  const int64_t block_col = c / b.block_cols;
  for (int64_t r0 = blockIdx.y * static_cast<int64_t>(kRows); r0 < rows; r0 += static_cast<int64_t>(gridDim.y) * kRows) {
    for (int64_t r = r0; r < min(rows, r0 + kRows); ++r) {
      const float s = steps[r / b.block_rows * b.grid_cols + block_col];
      const int64_t i = r * cols + c;
      y[i] = static_cast<T>(int8::fake_quantize(static_cast<float>(x[i]), s, 1.0f / s, qmin, qmax).value);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kCols)
    fake_quantize_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ grad_x,
                                  float* __restrict__ terms, const float* __restrict__ steps, int64_t rows,
                                  int64_t cols, detail::Fp8Blocks b, float qmin, float qmax) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(kCols) + threadIdx.x;
  if (c >= cols) return;
  const int64_t block_col = c / b.block_cols;
  for (int64_t r0 = blockIdx.y * static_cast<int64_t>(kRows); r0 < rows; r0 += static_cast<int64_t>(gridDim.y) * kRows) {
    for (int64_t r = r0; r < min(rows, r0 + kRows); ++r) {
      const float s = steps[r / b.block_rows * b.grid_cols + block_col];
      const int64_t i = r * cols + c;
      const int8::FakeQuantized q = int8::fake_quantize(static_cast<float>(x[i]), s, 1.0f / s, qmin, qmax);
      const float dy = static_cast<float>(grad[i]);
      grad_x[i] = static_cast<T>(q.inside ? dy : 0.0f);
      if (terms != nullptr) terms[i] = __fmul_rn(int8::lsq_scale_term(q), dy);
    }
  }
}

// out[r, c] = round_out((float(acc[r, c]) * a_scale[r]) * b_scale[c] (+ float(bias[c]))): one rounding.
template <typename Out>
__global__ void dequantize_kernel(const int32_t* __restrict__ acc, int64_t ld, Out* __restrict__ out,
                                  const float* __restrict__ a_scale, bool a_rows, const float* __restrict__ b_scale,
                                  bool b_cols, const Out* __restrict__ bias, int64_t m, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < m * n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / n, c = i % n;
    float v = __fmul_rn(__fmul_rn(static_cast<float>(acc[r * ld + c]), a_scale[a_rows ? r : 0]),
                        b_scale[b_cols ? c : 0]);
    if (bias != nullptr) v = __fadd_rn(v, static_cast<float>(bias[c]));
    out[i] = static_cast<Out>(v);
  }
}

dim3 column_grid(int64_t rows, int64_t cols) {
  return dim3(static_cast<unsigned>((cols + kCols - 1) / kCols),
              static_cast<unsigned>(std::clamp<int64_t>((rows + kRows - 1) / kRows, 1, 65535)));
}

int grid_for(int64_t items, int threads) {
  return static_cast<int>(std::clamp<int64_t>((items + threads - 1) / threads, 1, 65535));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> int8_quantize_cuda(const at::Tensor& input, int64_t block_rows, int64_t block_cols,
                                                      c10::string_view rounding, std::optional<int64_t> seed,
                                                      bool pow2_scales) {
  const detail::Int8Input in = detail::check_int8_quantize(input, block_rows, block_cols, rounding);
  const detail::Fp8Blocks b = in.blocks;
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor data = at::empty(in.input.sizes(), in.input.options().dtype(at::kChar));
  at::Tensor scale_inv = at::empty({b.grid_rows, b.grid_cols}, in.input.options().dtype(at::kFloat));
  const int64_t nblocks = b.grid_rows * b.grid_cols;
  if (nblocks == 0) return {data, scale_inv};
  const Codes codes{in.mode,
                    in.mode == Mode::Stochastic ? stochastic_state(seed, input.device()) : at::PhiloxCudaState(0, 0)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto* dst = data.data_ptr<int8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.input.scalar_type(), "mixprec::int8_quantize", [&] {
    const scalar_t* src = in.input.const_data_ptr<scalar_t>();
    // Row scales take one thread block per row; an input without rows (one all-zero scale block) takes the
    // block path below, which writes its scale without launching a grid of zero blocks.
    if (b.block_rows == 1 && b.grid_cols == 1 && in.rows > 0) {
      quantize_rows_kernel<scalar_t>
          <<<static_cast<unsigned>(std::min<int64_t>(in.rows, 1 << 20)), kRowThreads, 0, stream>>>(
              src, dst, scale_inv.data_ptr<float>(), in.rows, in.cols, pow2_scales, codes);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    at::Tensor amax = at::zeros({nblocks}, in.input.options().dtype(at::kInt));
    at::Tensor scale = at::empty({nblocks}, in.input.options().dtype(at::kFloat));
    auto* amax_bits = reinterpret_cast<uint32_t*>(amax.data_ptr<int32_t>());
    const bool work = in.rows * in.cols > 0;
    if (work) {
      block_amax_kernel<scalar_t><<<column_grid(in.rows, in.cols), kCols, 0, stream>>>(src, amax_bits, in.rows,
                                                                                       in.cols, b);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    block_scales_kernel<<<grid_for(nblocks, 256), 256, 0, stream>>>(amax_bits, scale.data_ptr<float>(),
                                                                     scale_inv.data_ptr<float>(), nblocks, pow2_scales);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (work) {
      block_quantize_kernel<scalar_t><<<column_grid(in.rows, in.cols), kCols, 0, stream>>>(
          src, dst, scale.const_data_ptr<float>(), in.rows, in.cols, b, codes);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {data, scale_inv};
}

at::Tensor int8_mm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv,
                        const at::Tensor& b_scale_inv, at::ScalarType out_dtype, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "mixprec::int8_mm";
  const detail::Int8MmArgs g = detail::check_int8_mm(a, b, a_scale_inv, b_scale_inv, out_dtype, bias);
  const c10::cuda::CUDAGuard guard(a.device());
  if (g.m == 0 || g.n == 0 || g.k == 0) {
    return detail::int8_mm_dequantize(at::zeros({g.m, g.n}, a.options().dtype(at::kInt)), g, out_dtype, bias);
  }
  TORCH_CHECK_VALUE(g.k % 8 == 0 && g.n % 8 == 0, op,
                    ": on CUDA k and n must be multiples of 8 (cuBLASLt's INT8 GEMM), got a ", a.sizes(), " and b ",
                    b.sizes());
  // torch._int_mm takes more than 16 rows: a short a is padded with zero rows, whose products are dropped.
  at::Tensor a_rows = g.a.contiguous();
  if (g.m <= 16) a_rows = at::cat({a_rows, at::zeros({32 - g.m, g.k}, a_rows.options())});
  // b column-major (b^T row-major): the TN layout of cuBLASLt's INT8 kernels; a transposed view already is.
  const at::Tensor b_cols = g.b.t().contiguous().t();
  const at::Tensor acc = at::_int_mm(a_rows, b_cols);
  at::Tensor out = at::empty({g.m, g.n}, a.options().dtype(out_dtype));
  const at::Tensor a_scale = g.a_scale_inv.contiguous(), b_scale = g.b_scale_inv.contiguous();
  at::Tensor bias_out;
  if (bias.has_value() && bias->defined()) bias_out = bias->to(out_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "mixprec::int8_mm", [&] {
    dequantize_kernel<scalar_t><<<grid_for(g.m * g.n, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        acc.const_data_ptr<int32_t>(), acc.stride(0), out.data_ptr<scalar_t>(), a_scale.const_data_ptr<float>(),
        a_scale.numel() > 1, b_scale.const_data_ptr<float>(), b_scale.numel() > 1,
        bias_out.defined() ? bias_out.const_data_ptr<scalar_t>() : nullptr, g.m, g.n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor fake_quantize_forward_cuda(const at::Tensor& input, const at::Tensor& scale, int64_t quant_min,
                                      int64_t quant_max, int64_t block_rows, int64_t block_cols) {
  const detail::FakeQuantArgs f = detail::check_fake_quantize("mixprec::fake_quantize_forward", input, scale,
                                                              quant_min, quant_max, block_rows, block_cols);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty_like(f.input);
  if (f.rows * f.cols == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.input.scalar_type(), "mixprec::fake_quantize", [&] {
    fake_quantize_kernel<scalar_t><<<column_grid(f.rows, f.cols), kCols, 0, c10::cuda::getCurrentCUDAStream()>>>(
        f.input.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), f.scale.const_data_ptr<float>(), f.rows, f.cols,
        f.blocks, f.qmin, f.qmax);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fake_quantize_backward_cuda(const at::Tensor& grad, const at::Tensor& input,
                                                               const at::Tensor& scale, int64_t quant_min,
                                                               int64_t quant_max, int64_t block_rows,
                                                               int64_t block_cols, bool scale_grad) {
  const detail::FakeQuantArgs f = detail::check_fake_quantize("mixprec::fake_quantize_backward", input, scale,
                                                              quant_min, quant_max, block_rows, block_cols);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor g = detail::check_fake_quantize_grad(grad, f);
  at::Tensor grad_input = at::empty_like(f.input);
  at::Tensor terms = scale_grad ? at::empty({f.rows, f.cols}, f.input.options().dtype(at::kFloat))
                                : at::empty({0}, f.input.options().dtype(at::kFloat));
  if (f.rows * f.cols == 0) return {grad_input, terms};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.input.scalar_type(), "mixprec::fake_quantize", [&] {
    fake_quantize_backward_kernel<scalar_t>
        <<<column_grid(f.rows, f.cols), kCols, 0, c10::cuda::getCurrentCUDAStream()>>>(
            g.const_data_ptr<scalar_t>(), f.input.const_data_ptr<scalar_t>(), grad_input.data_ptr<scalar_t>(),
            scale_grad ? terms.data_ptr<float>() : nullptr, f.scale.const_data_ptr<float>(), f.rows, f.cols, f.blocks,
            f.qmin, f.qmax);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_input, terms};
}

}  // namespace mixprec::cuda
