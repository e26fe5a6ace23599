// cast / cast_ and the bf16 remainder split/merge on CUDA. cast_ is one multi-tensor launch over every
// (dst, src) pair, whatever their dtypes: each thread converts groups of eight elements (one Philox call
// per group for stochastic rounding), with vector loads and stores where both sides are aligned. The
// rounding itself is rounding.h, the same code the CPU runs, so a seeded cast gives the same bits on
// both devices.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>
#include <tuple>

#include "ops/cast_plan.h"
#include "ops/cuda/multi_tensor_apply.cuh"
#include "ops/cuda/ops.h"
#include "ops/cuda/rng.cuh"
#include "ops/philox.h"
#include "ops/rounding.h"

namespace mixprec::cuda {
namespace {

using rounding::Mode;

constexpr int kThreads = 512;
constexpr int kMaxTensors = 448;      // two pointer lists: ~19 KB of kernel arguments
constexpr int kMaxTensorsSmall = 88;  // drivers limited to 4 KB of kernel arguments

template <typename Dst>
__device__ __forceinline__ Dst round_one(float x, Mode mode, bool saturate, uint32_t draw) {
  if constexpr (std::is_same_v<Dst, float>) {
    return x;
  } else if constexpr (std::is_same_v<Dst, c10::Half>) {
    if (saturate) x = rounding::saturate(x, rounding::kHalfMax);
    return mode == Mode::Stochastic ? rounding::to_half_stochastic(x, draw) : rounding::to_half_nearest(x);
  } else {
    if (saturate) x = rounding::saturate(x, rounding::kBFloat16Max);
    return mode == Mode::Stochastic ? rounding::to_bfloat16_stochastic(x, draw) : rounding::to_bfloat16_nearest(x);
  }
}

// Each thread converts octets: eight elements, one Philox call (16 bits per element), two 4-element
// vector loads and stores where both sides are aligned.
template <typename Dst, typename Src>
__device__ void cast_chunk(Dst* d, const Src* s, int64_t n, Mode mode, bool saturate, uint64_t seed, uint64_t offset,
                           uint64_t index0) {
  const bool vec = aligned4<Dst>(d) && aligned4<Src>(s);
  const int64_t octets = (n + 7) / 8;
  for (int64_t o = threadIdx.x; o < octets; o += kThreads) {
    const int64_t i = o * 8;
    const bool full = vec && i + 8 <= n;
    float x[8];
    load8(s, i, n, full, x);
    const uint64_t index = index0 + static_cast<uint64_t>(i);
    philox::Draw4 r{{0, 0, 0, 0}};
    if (mode == Mode::Stochastic) r = philox::philox4x32_10(index / 8, offset, seed);
    Dst out[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) out[k] = round_one<Dst>(x[k], mode, saturate, rounding::draw16(r.v, index + k));
    store8(d, i, n, full, out);
  }
}

template <typename Src>
__device__ void cast_from(DType dst_dtype, void* d, const Src* s, int64_t n, Mode mode, bool saturate, uint64_t seed,
                          uint64_t offset, uint64_t index0) {
  switch (dst_dtype) {
    case DType::Float:
      return cast_chunk(static_cast<float*>(d), s, n, mode, saturate, seed, offset, index0);
    case DType::Half:
      return cast_chunk(static_cast<c10::Half*>(d), s, n, mode, saturate, seed, offset, index0);
    case DType::BFloat16:
      return cast_chunk(static_cast<c10::BFloat16*>(d), s, n, mode, saturate, seed, offset, index0);
    default:
      return;  // excluded by the host checks
  }
}

template <int M>
__global__ void __launch_bounds__(kThreads)
    cast_kernel(const TensorListMeta<2, M, true> meta, Mode mode, bool saturate, at::PhiloxCudaState rng) {
  const int64_t chunk = blockIdx.x;
  const int t = tensor_of_chunk(meta, chunk);
  const int64_t begin = (chunk - meta.chunk_start[t]) * kChunkSize;
  const int64_t n = min(kChunkSize, meta.numel[t] - begin);
  const auto [seed, offset] = at::cuda::philox::unpack(rng);
  const uint64_t index0 = static_cast<uint64_t>(meta.aux[t] + begin);
  void* d = meta.ptr[0][t];
  const void* s = meta.ptr[1][t];
  const DType dd = meta.dtype[0][t];
  switch (meta.dtype[1][t]) {
    case DType::Float:
      return cast_from(dd, static_cast<char*>(d) + begin * dtype_size(dd), static_cast<const float*>(s) + begin, n, mode,
                       saturate, seed, offset, index0);
    case DType::Half:
      return cast_from(dd, static_cast<char*>(d) + begin * dtype_size(dd), static_cast<const c10::Half*>(s) + begin, n,
                       mode, saturate, seed, offset, index0);
    case DType::BFloat16:
      return cast_from(dd, static_cast<char*>(d) + begin * dtype_size(dd),
                       static_cast<const c10::BFloat16*>(s) + begin, n, mode, saturate, seed, offset, index0);
    default:
      return;
  }
}

void cast_lists(const char* op, at::TensorList dst, at::TensorList src, c10::string_view rounding, bool saturate,
                std::optional<int64_t> seed) {
  const Mode mode = detail::parse_rounding(std::string_view(rounding.data(), rounding.size()), op);
  detail::check_cast_args(op, dst, src);
  if (dst.empty()) return;
  const c10::cuda::CUDAGuard guard(src[0].device());
  detail::CastPlan plan(dst, src);
  const at::PhiloxCudaState rng =
      mode == Mode::Stochastic ? stochastic_state(seed, src[0].device()) : at::PhiloxCudaState(0, 0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  static_assert(
      fits_small_kernel_args<TensorListMeta<2, kMaxTensorsSmall, true>, Mode, bool, at::PhiloxCudaState>());
  with_max_tensors<kMaxTensors, kMaxTensorsSmall>([&](auto capacity) {
    constexpr int M = decltype(capacity)::value;
    multi_tensor_apply<2, M, true>(
        {at::TensorList(plan.dst_work()), at::TensorList(plan.src_work())},
        [&](const TensorListMeta<2, M, true>& meta, int64_t chunks, int64_t) {
          cast_kernel<M><<<chunks, kThreads, 0, stream>>>(meta, mode, saturate, rng);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        },
        &plan.rng_base());
  });
  plan.finish();
}

__global__ void split_kernel(const float* src, uint16_t* hi, int16_t* lo, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const rounding::SplitBFloat16 r = rounding::split_bf16_remainder(src[i]);
    hi[i] = r.bf16;
    lo[i] = r.remainder;
  }
}

__global__ void merge_kernel(const uint16_t* hi, const int16_t* lo, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = rounding::merge_bf16_remainder(hi[i], lo[i]);
  }
}

int elementwise_blocks(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

}  // namespace

void cast__cuda(at::TensorList dst, at::TensorList src, c10::string_view rounding, bool saturate,
                std::optional<int64_t> seed) {
  cast_lists("mixprec::cast_", dst, src, rounding, saturate, seed);
}

at::Tensor cast_cuda(const at::Tensor& src, at::ScalarType dtype, c10::string_view rounding, bool saturate,
                     std::optional<int64_t> seed) {
  return detail::cast_functional(src, dtype, [&](at::TensorList dst, at::TensorList srcs) {
    cast_lists("mixprec::cast", dst, srcs, rounding, saturate, seed);
  });
}

std::tuple<at::Tensor, at::Tensor> split_bf16_remainder_cuda(const at::Tensor& src) {
  detail::check_split_args(src);
  const c10::cuda::CUDAGuard guard(src.device());
  const at::Tensor s = src.contiguous();
  at::Tensor hi = at::empty(s.sizes(), s.options().dtype(at::kBFloat16));
  at::Tensor lo = at::empty(s.sizes(), s.options().dtype(at::kShort));
  if (s.numel() > 0) {
    split_kernel<<<elementwise_blocks(s.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        s.const_data_ptr<float>(), reinterpret_cast<uint16_t*>(hi.data_ptr<at::BFloat16>()), lo.data_ptr<int16_t>(),
        s.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {hi, lo};
}

at::Tensor merge_bf16_remainder_cuda(const at::Tensor& bf16, const at::Tensor& remainder) {
  detail::check_merge_args(bf16, remainder);
  const c10::cuda::CUDAGuard guard(bf16.device());
  const at::Tensor h = bf16.contiguous();
  const at::Tensor r = remainder.contiguous();
  at::Tensor out = at::empty(h.sizes(), h.options().dtype(at::kFloat));
  if (h.numel() > 0) {
    merge_kernel<<<elementwise_blocks(h.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const uint16_t*>(h.const_data_ptr<at::BFloat16>()), r.const_data_ptr<int16_t>(),
        out.data_ptr<float>(), h.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace mixprec::cuda
