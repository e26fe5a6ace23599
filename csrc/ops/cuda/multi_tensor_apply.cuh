// Multi-tensor apply: one kernel launch walks a whole list of tensors (the idea of apex's
// multi_tensor_apply, written afresh for mixprec).
//
// Each tensor is cut into chunks of kChunkSize elements and every thread block takes one chunk. The
// tensors' addresses, element counts, dtypes and the prefix sums of their chunk counts travel to the
// kernel as one by-value argument: CUDA >= 12.1 drivers allow 32 KB of kernel arguments on sm_70 and
// newer, so a launch can carry hundreds of tensors without a host-to-device copy. Older drivers take
// 4 KB: large_kernel_args() asks the driver once, and ops instantiate their kernels for both sizes
// (with_max_tensors). A block finds its tensor by binary search over the prefix sums (uniform across the
// block, in the constant bank). Longer lists are split into several launches; `chunk_base` tells each
// launch where its chunks sit in the list-wide numbering (for per-chunk outputs). Only kernels that need
// a per-tensor number (the RNG base of stochastic rounding) carry `aux`, so the others fit more tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <type_traits>
#include <vector>

namespace mixprec::cuda {

// Short carries the int16 low halves of fp32 master weights kept as bf16 + remainder (adam_step_).
enum class DType : uint8_t { Float = 0, Half = 1, BFloat16 = 2, Double = 3, Short = 4 };

inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::Float;
    case at::kHalf:
      return DType::Half;
    case at::kBFloat16:
      return DType::BFloat16;
    case at::kDouble:
      return DType::Double;
    case at::kShort:
      return DType::Short;
    default:
      TORCH_CHECK(false, "mixprec: unsupported dtype ", t, " in a multi-tensor kernel");
  }
}

__host__ __device__ inline int dtype_size(DType t) {
  return t == DType::Double ? 8 : (t == DType::Float ? 4 : 2);
}

/// Four elements moved as one vector load/store (16 bytes for fp32, 8 for 16-bit types).
template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};

// Octets: the element-wise kernels take eight elements per step (one Philox call for stochastic rounding),
// as two Quad loads/stores where the pointer is Quad-aligned and the octet is whole (`full`), element by
// element otherwise (past n: zeros in, nothing out).
template <typename T>
__device__ __forceinline__ bool aligned4(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Quad<T>) == 0;
}

template <typename T>
__device__ __forceinline__ void load8(const T* p, int64_t i, int64_t n, bool full, float (&out)[8]) {
  if (full) {
    const Quad<T> a = reinterpret_cast<const Quad<T>*>(p + i)[0];
    const Quad<T> b = reinterpret_cast<const Quad<T>*>(p + i)[1];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[k] = static_cast<float>(a.v[k]);
      out[k + 4] = static_cast<float>(b.v[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) out[k] = i + k < n ? static_cast<float>(p[i + k]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, int64_t i, int64_t n, bool full, const T (&v)[8]) {
  if (full) {
    Quad<T> a, b;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      a.v[k] = v[k];
      b.v[k] = v[k + 4];
    }
    reinterpret_cast<Quad<T>*>(p + i)[0] = a;
    reinterpret_cast<Quad<T>*>(p + i)[1] = b;
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (i + k < n) p[i + k] = v[k];
    }
  }
}

// A multiple of every vector width (16 bytes / 2-byte element = 8), so vector alignment carries
// from a tensor's start to each of its chunks.
constexpr int64_t kChunkSize = 1 << 16;

template <int MaxTensors, bool HasAux>
struct AuxField {
  int64_t aux[MaxTensors];  // one per-tensor number for the op (e.g. its RNG base index)
};
template <int MaxTensors>
struct AuxField<MaxTensors, false> {};

template <int Depth, int MaxTensors, bool HasAux = false>
struct TensorListMeta : AuxField<MaxTensors, HasAux> {
  void* ptr[Depth][MaxTensors];
  int64_t numel[MaxTensors];
  int64_t chunk_start[MaxTensors + 1];  // chunk_start[i]: first chunk of tensor i in this launch
  DType dtype[Depth][MaxTensors];
  int num_tensors;
};

/// Whether kernels may take 32 KB of arguments (CUDA >= 12.1 driver on sm_70 or newer; mixprec builds for
/// sm_80 and up) rather than the classic 4 KB. MIXPREC_SMALL_KERNEL_ARGS=1 forces the 4 KB path, so
/// that it can be tested on any machine. Asked once per process.
inline bool large_kernel_args() {
  static const bool large = [] {
    const char* force = std::getenv("MIXPREC_SMALL_KERNEL_ARGS");
    if (force != nullptr && *force != '\0' && std::string_view(force) != "0") return false;
    int driver = 0;
    return cudaDriverGetVersion(&driver) == cudaSuccess && driver >= 12010;
  }();
  return large;
}

/// Calls body(std::integral_constant<int, Large>{}) where large_kernel_args(), else with Small: the op
/// instantiates its launch for both list capacities and picks one at run time.
template <int Large, int Small, typename Body>
void with_max_tensors(Body&& body) {
  if (large_kernel_args()) {
    body(std::integral_constant<int, Large>{});
  } else {
    body(std::integral_constant<int, Small>{});
  }
}

/// The 4 KB limit minus what else a kernel takes by value.
template <typename Meta, typename... Others>
constexpr bool fits_small_kernel_args() {
  return sizeof(Meta) + (sizeof(Others) + ... + 0) <= 4096;
}

// Index of the tensor that owns chunk `chunk` of this launch.
template <int Depth, int MaxTensors, bool HasAux>
__device__ __forceinline__ int tensor_of_chunk(const TensorListMeta<Depth, MaxTensors, HasAux>& meta, int64_t chunk) {
  int lo = 0, hi = meta.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (meta.chunk_start[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

inline int64_t num_chunks(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

/// Calls `launch(meta, chunks_in_launch, chunk_base)` once per batch of tensors. `lists[d][i]` is the
/// i-th tensor of the d-th list; all lists have the same length and every tensor in a row has the same
/// number of elements and is dense. Empty tensors are skipped. With HasAux, `aux` (one number per row)
/// fills meta.aux.
template <int Depth, int MaxTensors, bool HasAux = false, typename Launch>
void multi_tensor_apply(const std::array<at::TensorList, Depth>& lists, Launch&& launch,
                        const std::vector<uint64_t>* aux = nullptr) {
  static_assert(sizeof(TensorListMeta<Depth, MaxTensors, HasAux>) <= 30 * 1024,
                "kernel argument larger than CUDA's 32 KB limit");
  TORCH_INTERNAL_ASSERT((aux != nullptr) == HasAux, "multi_tensor_apply: aux given iff the kernel takes it");
  const size_t n = lists[0].size();
  TensorListMeta<Depth, MaxTensors, HasAux> meta;
  meta.num_tensors = 0;
  meta.chunk_start[0] = 0;
  int64_t chunk_base = 0;
  auto flush = [&]() {
    if (meta.num_tensors == 0) return;
    const int64_t chunks = meta.chunk_start[meta.num_tensors];
    launch(meta, chunks, chunk_base);
    chunk_base += chunks;
    meta.num_tensors = 0;
  };
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& first = lists[0][i];
    const int64_t numel = first.numel();
    if (numel == 0) continue;
    const int slot = meta.num_tensors;
    for (int d = 0; d < Depth; ++d) {
      const at::Tensor& t = lists[d][i];
      meta.ptr[d][slot] = t.data_ptr();
      meta.dtype[d][slot] = to_dtype(t.scalar_type());
    }
    meta.numel[slot] = numel;
    if constexpr (HasAux) meta.aux[slot] = static_cast<int64_t>((*aux)[i]);
    meta.chunk_start[slot + 1] = meta.chunk_start[slot] + num_chunks(numel);
    meta.num_tensors = slot + 1;
    if (meta.num_tensors == MaxTensors) flush();
  }
  flush();
}

/// Total chunks over a list, for sizing per-chunk outputs before multi_tensor_apply runs.
inline int64_t total_chunks(const std::vector<at::Tensor>& list) {
  int64_t total = 0;
  for (const at::Tensor& t : list) total += num_chunks(t.numel());
  return total;
}

}  // namespace mixprec::cuda
