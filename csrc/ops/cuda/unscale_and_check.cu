// unscale_and_check_ / unscale_and_check_sumsq_ on CUDA: one launch for the whole gradient list,
// whatever mix of fp32/fp16/bf16/fp64 it holds (each block branches once on its tensor's dtype).
// 16-byte vector loads (a misaligned start takes a short scalar head first), 64-bit indices, and the
// optional sum of squares reduced per block into its own slot and summed afterwards in a fixed order
// (deterministic, no atomics).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "ops/checks.h"
#include "ops/cuda/ops.h"
#include "ops/cuda/multi_tensor_apply.cuh"

namespace mixprec::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kMaxTensors = 1100;      // no aux: ~27 KB of kernel arguments (1000 small grads in one launch)
constexpr int kMaxTensorsSmall = 150;  // drivers limited to 4 KB of kernel arguments
constexpr int kUnroll = 4;        // 16-byte loads in flight per thread

template <typename T>
struct alignas(16) Pack {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T, bool kSumsq>
__device__ __forceinline__ void unscale_element(T& value, float inv, bool& bad, float& sq) {
  const opmath_t<T> x = static_cast<opmath_t<T>>(value);
  bad |= !isfinite(x);
  const opmath_t<T> y = x * static_cast<opmath_t<T>>(inv);
  value = static_cast<T>(y);
  if constexpr (kSumsq) sq += static_cast<float>(y) * static_cast<float>(y);
}

// `store` is false when inv is exactly 1 (x * 1 == x): the block then only reads, for the inf check a
// scaler runs before handing the scale to a fused optimizer. Uniform per block, so no divergence.
// A start that is not 16-byte aligned (a gradient viewed inside a flat buffer) takes fewer than one
// vector's worth of elements as a scalar head; the rest is aligned and vectorised.
template <typename T, bool kSumsq>
__device__ void unscale_chunk(T* p, int64_t n, float inv, bool store, bool& bad, float& sq) {
  constexpr int kVec = Pack<T>::kN;
  const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 16);
  const int64_t head = misalign % static_cast<int64_t>(sizeof(T)) != 0
                           ? n
                           : min(n, (16 - misalign) % 16 / static_cast<int64_t>(sizeof(T)));
  for (int64_t i = threadIdx.x; i < head; i += kThreads) {
    T value = p[i];
    unscale_element<T, kSumsq>(value, inv, bad, sq);
    if (store) p[i] = value;
  }
  const int64_t nvec = (n - head) / kVec;
  Pack<T>* vp = reinterpret_cast<Pack<T>*>(p + head);  // 16-byte aligned (or nvec == 0)
  for (int64_t base = threadIdx.x; base < nvec; base += static_cast<int64_t>(kThreads) * kUnroll) {
    Pack<T> r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + static_cast<int64_t>(u) * kThreads;
      if (v < nvec) r[u] = vp[v];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + static_cast<int64_t>(u) * kThreads;
      if (v < nvec) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) unscale_element<T, kSumsq>(r[u].v[k], inv, bad, sq);
        if (store) vp[v] = r[u];
      }
    }
  }
  for (int64_t i = head + nvec * kVec + threadIdx.x; i < n; i += kThreads) {
    T value = p[i];
    unscale_element<T, kSumsq>(value, inv, bad, sq);
    if (store) p[i] = value;
  }
}

template <bool kSumsq, int M>
__global__ void __launch_bounds__(kThreads)
    unscale_and_check_kernel(const TensorListMeta<1, M> meta, float* found_inf, const float* inv_scale,
                             float* partials, int64_t chunk_base) {
  const int64_t chunk = blockIdx.x;
  const int t = tensor_of_chunk(meta, chunk);
  const int64_t begin = (chunk - meta.chunk_start[t]) * kChunkSize;
  const int64_t n = min(kChunkSize, meta.numel[t] - begin);
  const float inv = *inv_scale;
  const bool store = inv != 1.f;
  bool bad = false;
  float sq = 0.f;
  switch (meta.dtype[0][t]) {
    case DType::Float:
      unscale_chunk<float, kSumsq>(static_cast<float*>(meta.ptr[0][t]) + begin, n, inv, store, bad, sq);
      break;
    case DType::Half:
      unscale_chunk<c10::Half, kSumsq>(static_cast<c10::Half*>(meta.ptr[0][t]) + begin, n, inv, store, bad, sq);
      break;
    case DType::BFloat16:
      unscale_chunk<c10::BFloat16, kSumsq>(static_cast<c10::BFloat16*>(meta.ptr[0][t]) + begin, n, inv, store, bad, sq);
      break;
    case DType::Double:
      unscale_chunk<double, kSumsq>(static_cast<double*>(meta.ptr[0][t]) + begin, n, inv, store, bad, sq);
      break;
  }
  // One write per block at most; the flag is only ever set, so racing blocks agree.
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.f;
  if constexpr (kSumsq) {
    __shared__ float warp_sums[kThreads / 32];
    for (int offset = 16; offset > 0; offset /= 2) sq += __shfl_down_sync(0xffffffffu, sq, offset);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sq;
    __syncthreads();
    if (threadIdx.x < 32) {
      float s = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.f;
      for (int offset = 16; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
      if (threadIdx.x == 0) partials[chunk_base + chunk] = s;
    }
  }
}

at::Tensor unscale_impl(const char* op, at::TensorList grads, const at::Tensor& found_inf, const at::Tensor& inv_scale,
                        bool want_sumsq) {
  detail::check_unscale_args(op, grads, found_inf, inv_scale);
  const c10::cuda::CUDAGuard guard(found_inf.device());
  detail::DenseViews dense(grads);
  const std::vector<at::Tensor>& views = dense.views();
  const int64_t chunks = total_chunks(views);
  at::Tensor partials;
  if (want_sumsq) partials = at::empty({chunks}, found_inf.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  float* found_ptr = found_inf.data_ptr<float>();
  const float* inv_ptr = inv_scale.const_data_ptr<float>();
  float* partial_ptr = want_sumsq ? partials.data_ptr<float>() : nullptr;
  static_assert(fits_small_kernel_args<TensorListMeta<1, kMaxTensorsSmall>, float*, float*, float*, int64_t>());
  with_max_tensors<kMaxTensors, kMaxTensorsSmall>([&](auto capacity) {
    constexpr int M = decltype(capacity)::value;
    multi_tensor_apply<1, M>({&views}, [&](const TensorListMeta<1, M>& meta, int64_t n_chunks, int64_t chunk_base) {
      if (want_sumsq) {
        unscale_and_check_kernel<true, M>
            <<<n_chunks, kThreads, 0, stream>>>(meta, found_ptr, inv_ptr, partial_ptr, chunk_base);
      } else {
        unscale_and_check_kernel<false, M>
            <<<n_chunks, kThreads, 0, stream>>>(meta, found_ptr, inv_ptr, partial_ptr, chunk_base);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  dense.write_back();
  if (!want_sumsq) return {};
  return chunks > 0 ? partials.sum() : at::zeros({}, found_inf.options());
}

}  // namespace

void unscale_and_check_cuda(at::TensorList grads, const at::Tensor& found_inf, const at::Tensor& inv_scale) {
  unscale_impl("mixprec::unscale_and_check_", grads, found_inf, inv_scale, false);
}

at::Tensor unscale_and_check_sumsq_cuda(at::TensorList grads, const at::Tensor& found_inf,
                                        const at::Tensor& inv_scale) {
  return unscale_impl("mixprec::unscale_and_check_sumsq_", grads, found_inf, inv_scale, true);
}

}  // namespace mixprec::cuda
