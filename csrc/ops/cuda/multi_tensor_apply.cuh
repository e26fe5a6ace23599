// Multi-tensor apply: one kernel launch walks a whole list of tensors (the idea of apex's
// multi_tensor_apply, written afresh for mixprec).
//
// Each tensor is cut into chunks of kChunkSize elements and every thread block takes one chunk. The
// tensors' addresses, element counts, dtypes and the prefix sums of their chunk counts travel to the
// kernel as one by-value argument: CUDA >= 12.1 allows 32 KB of kernel arguments on sm_70 and newer,
// so a launch can carry hundreds of tensors without a host-to-device copy. A block finds its tensor
// by binary search over the prefix sums. Longer lists are split into several launches; `chunk_base`
// tells each launch where its chunks sit in the list-wide numbering (for per-chunk outputs).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
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

// A multiple of every vector width (16 bytes / 2-byte element = 8), so vector alignment carries
// from a tensor's start to each of its chunks.
constexpr int64_t kChunkSize = 1 << 16;

template <int Depth, int MaxTensors>
struct TensorListMeta {
  void* ptr[Depth][MaxTensors];
  int64_t numel[MaxTensors];
  int64_t chunk_start[MaxTensors + 1];  // chunk_start[i]: first chunk of tensor i in this launch
  int64_t aux[MaxTensors];              // one per-tensor number for the op (e.g. its RNG base index)
  DType dtype[Depth][MaxTensors];
  int num_tensors;
};

// Index of the tensor that owns chunk `chunk` of this launch.
template <int Depth, int MaxTensors>
__device__ __forceinline__ int tensor_of_chunk(const TensorListMeta<Depth, MaxTensors>& meta, int64_t chunk) {
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
/// number of elements and is dense. Empty tensors are skipped. `aux`, when given, fills meta.aux.
template <int Depth, int MaxTensors, typename Launch>
void multi_tensor_apply(const std::array<const std::vector<at::Tensor>*, Depth>& lists, Launch&& launch,
                        const std::vector<uint64_t>* aux = nullptr) {
  static_assert(sizeof(TensorListMeta<Depth, MaxTensors>) <= 30 * 1024,
                "kernel argument larger than CUDA's 32 KB limit");
  const size_t n = lists[0]->size();
  TensorListMeta<Depth, MaxTensors> meta;
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
    const at::Tensor& first = (*lists[0])[i];
    const int64_t numel = first.numel();
    if (numel == 0) continue;
    const int slot = meta.num_tensors;
    for (int d = 0; d < Depth; ++d) {
      const at::Tensor& t = (*lists[d])[i];
      meta.ptr[d][slot] = t.data_ptr();
      meta.dtype[d][slot] = to_dtype(t.scalar_type());
    }
    meta.numel[slot] = numel;
    meta.aux[slot] = aux != nullptr ? static_cast<int64_t>((*aux)[i]) : 0;
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
