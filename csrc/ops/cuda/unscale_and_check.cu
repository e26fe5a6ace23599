// unscale_and_check_ / unscale_and_check_sumsq_ on CUDA: one launch for the whole gradient list,
// whatever mix of fp32/fp16/bf16/fp64 it holds (each block branches once on its tensor's dtype).
// The optional per-tensor max |x| is a block reduction and one atomicMax per block. grad_stats (the
// gradients' value statistics a monitor logs every N steps) walks the same lists, so it lives here too.
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
#include "ops/grad_stats_rule.h"
#include "ops/cuda/ops.h"
#include "ops/cuda/multi_tensor_apply.cuh"

namespace mixprec::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kMaxTensors = 1100;      // no aux: ~27 KB of kernel arguments (1000 small grads in one launch)
constexpr int kMaxTensorsSmall = 150;  // drivers limited to 4 KB of kernel arguments
// With per-tensor amax each tensor also carries its index in the list (aux: empty tensors are skipped,
// so a launch's slot is not the list index): 33 bytes a tensor.
constexpr int kMaxTensorsAmax = 880;
constexpr int kMaxTensorsAmaxSmall = 115;
constexpr int kUnroll = 4;        // 16-byte loads in flight per thread

template <typename T>
struct alignas(16) Pack {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Magnitudes are compared as the bits of non-negative floats, which order finite < inf < NaN (the CPU
// kernel's rule too). An fp64 magnitude beyond fp32's range rounds to inf.
template <typename T, bool kSumsq, bool kAmax>
__device__ __forceinline__ void unscale_element(T& value, float inv, bool& bad, float& sq, unsigned& mx) {
  const opmath_t<T> x = static_cast<opmath_t<T>>(value);
  bad |= !isfinite(x);
  if constexpr (kAmax) {
    if constexpr (std::is_same_v<T, double>) {  // beyond fp32's range reads as inf, as on the CPU
      const double a = fabs(x);
      mx = max(mx, __float_as_uint(a > 3.4028234663852886e38 ? __int_as_float(0x7f800000) : static_cast<float>(a)));
    } else {
      mx = max(mx, __float_as_uint(fabsf(static_cast<float>(x))));
    }
  }
  const opmath_t<T> y = x * static_cast<opmath_t<T>>(inv);
  value = static_cast<T>(y);
  if constexpr (kSumsq) sq += static_cast<float>(y) * static_cast<float>(y);
}

// `store` is false when inv is exactly 1 (x * 1 == x): the block then only reads, for the inf check a
// scaler runs before handing the scale to a fused optimizer. Uniform per block, so no divergence.
// A start that is not 16-byte aligned (a gradient viewed inside a flat buffer) takes fewer than one
// vector's worth of elements as a scalar head; the rest is aligned and vectorised.
template <typename T, bool kSumsq, bool kAmax>
__device__ void unscale_chunk(T* p, int64_t n, float inv, bool store, bool& bad, float& sq, unsigned& mx) {
  constexpr int kVec = Pack<T>::kN;
  const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 16);
  const int64_t head = misalign % static_cast<int64_t>(sizeof(T)) != 0
                           ? n
                           : min(n, (16 - misalign) % 16 / static_cast<int64_t>(sizeof(T)));
  for (int64_t i = threadIdx.x; i < head; i += kThreads) {
    T value = p[i];
    unscale_element<T, kSumsq, kAmax>(value, inv, bad, sq, mx);
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
        for (int k = 0; k < kVec; ++k) unscale_element<T, kSumsq, kAmax>(r[u].v[k], inv, bad, sq, mx);
        if (store) vp[v] = r[u];
      }
    }
  }
  for (int64_t i = head + nvec * kVec + threadIdx.x; i < n; i += kThreads) {
    T value = p[i];
    unscale_element<T, kSumsq, kAmax>(value, inv, bad, sq, mx);
    if (store) p[i] = value;
  }
}

template <bool kSumsq, bool kAmax, typename Meta>
__global__ void __launch_bounds__(kThreads)
    unscale_and_check_kernel(const Meta meta, float* found_inf, const float* inv_scale, float* partials,
                             int64_t chunk_base, float* amax) {
  const int64_t chunk = blockIdx.x;
  const int t = tensor_of_chunk(meta, chunk);
  const int64_t begin = (chunk - meta.chunk_start[t]) * kChunkSize;
  const int64_t n = min(kChunkSize, meta.numel[t] - begin);
  const float inv = *inv_scale;
  const bool store = inv != 1.f;
  bool bad = false;
  float sq = 0.f;
  unsigned mx = 0u;
  switch (meta.dtype[0][t]) {
    case DType::Float:
      unscale_chunk<float, kSumsq, kAmax>(static_cast<float*>(meta.ptr[0][t]) + begin, n, inv, store, bad, sq, mx);
      break;
    case DType::Half:
      unscale_chunk<c10::Half, kSumsq, kAmax>(static_cast<c10::Half*>(meta.ptr[0][t]) + begin, n, inv, store, bad, sq, mx);
      break;
    case DType::BFloat16:
      unscale_chunk<c10::BFloat16, kSumsq, kAmax>(static_cast<c10::BFloat16*>(meta.ptr[0][t]) + begin, n, inv, store, bad, sq, mx);
      break;
    case DType::Double:
      unscale_chunk<double, kSumsq, kAmax>(static_cast<double*>(meta.ptr[0][t]) + begin, n, inv, store, bad, sq, mx);
      break;
  }
  // One write per block at most; the flag is only ever set, so racing blocks agree.
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.f;
  if constexpr (kAmax) {
    __shared__ unsigned warp_max[kThreads / 32];
    for (int offset = 16; offset > 0; offset /= 2) mx = max(mx, __shfl_down_sync(0xffffffffu, mx, offset));
    if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = mx;
    __syncthreads();
    if (threadIdx.x < 32) {
      unsigned m = threadIdx.x < kThreads / 32 ? warp_max[threadIdx.x] : 0u;
      for (int offset = 16; offset > 0; offset /= 2) m = max(m, __shfl_down_sync(0xffffffffu, m, offset));
      // One atomic per block; the caller's entries are non-negative, so unsigned order is float order.
      if (threadIdx.x == 0) atomicMax(reinterpret_cast<unsigned*>(amax + meta.aux[t]), m);
    }
  }
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

template <bool kAmax, int M, int MSmall>
void launch_all(const std::vector<at::Tensor>& views, bool want_sumsq, cudaStream_t stream, float* found_ptr,
                const float* inv_ptr, float* partial_ptr, float* amax_ptr) {
  std::vector<uint64_t> index;
  if constexpr (kAmax) {
    index.resize(views.size());
    for (size_t i = 0; i < views.size(); ++i) index[i] = i;
  }
  static_assert(fits_small_kernel_args<TensorListMeta<1, MSmall, kAmax>, float*, float*, float*, int64_t, float*>());
  with_max_tensors<M, MSmall>([&](auto capacity) {
    constexpr int C = decltype(capacity)::value;
    using Meta = TensorListMeta<1, C, kAmax>;
    multi_tensor_apply<1, C, kAmax>(
        {at::TensorList(views)},
        [&](const Meta& meta, int64_t n_chunks, int64_t chunk_base) {
          if (want_sumsq) {
            unscale_and_check_kernel<true, kAmax, Meta>
                <<<n_chunks, kThreads, 0, stream>>>(meta, found_ptr, inv_ptr, partial_ptr, chunk_base, amax_ptr);
          } else {
            unscale_and_check_kernel<false, kAmax, Meta>
                <<<n_chunks, kThreads, 0, stream>>>(meta, found_ptr, inv_ptr, partial_ptr, chunk_base, amax_ptr);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        },
        kAmax ? &index : nullptr);
  });
}

at::Tensor unscale_impl(const char* op, at::TensorList grads, const at::Tensor& found_inf, const at::Tensor& inv_scale,
                        const std::optional<at::Tensor>& amax, bool want_sumsq) {
  detail::check_unscale_args(op, grads, found_inf, inv_scale, amax);
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
  if (amax.has_value() && amax->defined()) {
    launch_all<true, kMaxTensorsAmax, kMaxTensorsAmaxSmall>(views, want_sumsq, stream, found_ptr, inv_ptr,
                                                            partial_ptr, amax->data_ptr<float>());
  } else {
    launch_all<false, kMaxTensors, kMaxTensorsSmall>(views, want_sumsq, stream, found_ptr, inv_ptr, partial_ptr,
                                                     nullptr);
  }
  dense.write_back();
  if (!want_sumsq) return {};
  return chunks > 0 ? partials.sum() : at::zeros({}, found_inf.options());
}

// ---- grad_stats: the statistics of the gradients' values, one row per gradient ----------------------------

template <typename T, typename Op>
__device__ void stats_chunk(const T* p, int64_t n, Op scale, int min_exponent, int num_bins, int* counts, int* hist,
                            double& sumsq, unsigned long long& amax) {
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const Op g = static_cast<Op>(p[i]);
    int column = 0, bin = 0;
    detail::classify_grad<Op>(g, scale, min_exponent, num_bins, column, bin);
    if (column != detail::kStatsNumel) atomicAdd(&counts[column], 1);  // the rare columns: shared atomics
    if (bin >= 0) {
      atomicAdd(&hist[bin], 1);
      // Non-negative doubles order as their bits: the max of |g| over finite elements.
      amax = max(amax, static_cast<unsigned long long>(__double_as_longlong(fabs(static_cast<double>(g)))));
    }
    sumsq += static_cast<double>(g) * static_cast<double>(g);
  }
}

// One block per 64K-element chunk; the block counts into shared memory, then adds its row into the
// gradient's row of `out` with one global atomic per column (out starts as zeros).
template <typename Meta>
__global__ void __launch_bounds__(kThreads)
    grad_stats_kernel(const Meta meta, const float* scale_ptr, int min_exponent, int num_bins, double* out) {
  extern __shared__ int shared[];
  int* counts = shared;                        // kStatsCounts entries
  int* hist = shared + detail::kStatsCounts;   // num_bins entries
  for (int i = threadIdx.x; i < detail::kStatsCounts + num_bins; i += kThreads) shared[i] = 0;
  __syncthreads();
  const int64_t chunk = blockIdx.x;
  const int t = tensor_of_chunk(meta, chunk);
  const int64_t begin = (chunk - meta.chunk_start[t]) * kChunkSize;
  const int64_t n = min(kChunkSize, meta.numel[t] - begin);
  const float scale = *scale_ptr;
  double sumsq = 0.0;
  unsigned long long amax = 0ull;
  switch (meta.dtype[0][t]) {
    case DType::Float:
      stats_chunk<float, float>(static_cast<const float*>(meta.ptr[0][t]) + begin, n, scale, min_exponent, num_bins,
                                counts, hist, sumsq, amax);
      break;
    case DType::Half:
      stats_chunk<c10::Half, float>(static_cast<const c10::Half*>(meta.ptr[0][t]) + begin, n, scale, min_exponent,
                                    num_bins, counts, hist, sumsq, amax);
      break;
    case DType::BFloat16:
      stats_chunk<c10::BFloat16, float>(static_cast<const c10::BFloat16*>(meta.ptr[0][t]) + begin, n, scale,
                                        min_exponent, num_bins, counts, hist, sumsq, amax);
      break;
    default:
      stats_chunk<double, double>(static_cast<const double*>(meta.ptr[0][t]) + begin, n, scale, min_exponent,
                                  num_bins, counts, hist, sumsq, amax);
      break;
  }
  __shared__ double warp_sums[kThreads / 32];
  __shared__ unsigned long long warp_max[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    sumsq += __shfl_down_sync(0xffffffffu, sumsq, offset);
    amax = max(amax, __shfl_down_sync(0xffffffffu, amax, offset));
  }
  if (threadIdx.x % 32 == 0) {
    warp_sums[threadIdx.x / 32] = sumsq;
    warp_max[threadIdx.x / 32] = amax;
  }
  __syncthreads();
  const int width = detail::kStatsHistogram + num_bins;
  double* row = out + meta.aux[t] * width;
  if (threadIdx.x == 0) {
    double s = 0.0;
    unsigned long long m = 0ull;
    for (int w = 0; w < kThreads / 32; ++w) {  // a fixed order within the block
      s += warp_sums[w];
      m = max(m, warp_max[w]);
    }
    atomicAdd(&row[detail::kStatsNumel], static_cast<double>(n));
    atomicAdd(&row[detail::kStatsSumsq], s);
    atomicMax(reinterpret_cast<unsigned long long*>(&row[detail::kStatsAmax]), m);
  }
  for (int c = threadIdx.x; c < detail::kStatsCounts + num_bins; c += kThreads) {
    if (c == detail::kStatsNumel) continue;
    const int v = shared[c];
    if (v != 0) atomicAdd(&row[c < detail::kStatsCounts ? c : c - detail::kStatsCounts + detail::kStatsHistogram],
                          static_cast<double>(v));
  }
}

}  // namespace

at::Tensor grad_stats_cuda(at::TensorList grads, const at::Tensor& scale, int64_t min_exponent, int64_t num_bins) {
  detail::check_grad_stats_args(grads, scale, min_exponent, num_bins);
  const c10::cuda::CUDAGuard guard(scale.device());
  const int width = detail::kStatsHistogram + static_cast<int>(num_bins);
  at::Tensor out = at::zeros({static_cast<int64_t>(grads.size()), width}, scale.options().dtype(at::kDouble));
  const detail::DenseViews dense(grads);  // read only: nothing is written back
  const std::vector<at::Tensor>& views = dense.views();
  std::vector<uint64_t> index(views.size());
  for (size_t i = 0; i < views.size(); ++i) index[i] = i;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t shared_bytes = sizeof(int) * (detail::kStatsCounts + num_bins);
  const float* scale_ptr = scale.const_data_ptr<float>();
  double* out_ptr = out.data_ptr<double>();
  static_assert(fits_small_kernel_args<TensorListMeta<1, kMaxTensorsAmaxSmall, true>, float*, int, int, double*>());
  with_max_tensors<kMaxTensorsAmax, kMaxTensorsAmaxSmall>([&](auto capacity) {
    constexpr int C = decltype(capacity)::value;
    using Meta = TensorListMeta<1, C, true>;
    multi_tensor_apply<1, C, true>(
        {at::TensorList(views)},
        [&](const Meta& meta, int64_t n_chunks, int64_t) {
          grad_stats_kernel<Meta><<<n_chunks, kThreads, shared_bytes, stream>>>(
              meta, scale_ptr, static_cast<int>(min_exponent), static_cast<int>(num_bins), out_ptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        },
        &index);
  });
  return out;
}

void unscale_and_check_cuda(at::TensorList grads, const at::Tensor& found_inf, const at::Tensor& inv_scale,
                            const std::optional<at::Tensor>& amax) {
  unscale_impl("mixprec::unscale_and_check_", grads, found_inf, inv_scale, amax, false);
}

at::Tensor unscale_and_check_sumsq_cuda(at::TensorList grads, const at::Tensor& found_inf,
                                        const at::Tensor& inv_scale, const std::optional<at::Tensor>& amax) {
  return unscale_impl("mixprec::unscale_and_check_sumsq_", grads, found_inf, inv_scale, amax, true);
}

}  // namespace mixprec::cuda
