// What every cuBLASLt GEMM in mixprec shares: torch's handle and workspace, RAII descriptors, status checks,
// pointer alignments, and a cache of plans (descriptors + the heuristic's algorithm) by problem key.
// Host code only.
#pragma once

#include <c10/util/Exception.h>

#include <cublasLt.h>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <type_traits>
#include <unordered_map>

// torch's own cuBLASLt handle (one per device and thread) and workspace (one per stream), exported by
// libtorch_cuda with these signatures since torch 2.6 (ATen/cuda/CUDAContextLight.h). They are declared
// here rather than included because that header pulls in cuSPARSE and cuSOLVER headers, which a CUDA
// toolkit without those libraries (cuBLASLt from the pip wheel) does not have. Sharing torch's
// workspace costs no memory and is stream-ordered with torch's own matmuls.
namespace at::cuda {
cublasLtHandle_t getCurrentCUDABlasLtHandle();
size_t getCUDABlasLtWorkspaceSize();
void* getCUDABlasLtWorkspace();
}  // namespace at::cuda

namespace mixprec::cuda::lt {

inline void check(cublasStatus_t status, const char* op, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, op, ": ", what, " failed: ", cublasLtGetStatusString(status),
              " (status ", static_cast<int>(status), ")");
}

struct MatmulDescDeleter {
  void operator()(cublasLtMatmulDesc_t d) const { cublasLtMatmulDescDestroy(d); }
};
struct LayoutDeleter {
  void operator()(cublasLtMatrixLayout_t l) const { cublasLtMatrixLayoutDestroy(l); }
};
struct PreferenceDeleter {
  void operator()(cublasLtMatmulPreference_t p) const { cublasLtMatmulPreferenceDestroy(p); }
};
using MatmulDesc = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulDesc_t>, MatmulDescDeleter>;
using Layout = std::unique_ptr<std::remove_pointer_t<cublasLtMatrixLayout_t>, LayoutDeleter>;
using Preference = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>, PreferenceDeleter>;

/// The descriptors and the chosen algorithm of one problem. cuBLASLt descriptors are plain host objects
/// and are only read by cublasLtMatmul, so one plan serves every thread and stream.
struct Plan {
  MatmulDesc desc;
  Layout a, b, c, d;
  cublasLtMatmulAlgo_t algo{};
};

inline MatmulDesc make_desc(const char* op, cublasComputeType_t compute, cudaDataType_t scale_type) {
  cublasLtMatmulDesc_t raw = nullptr;
  check(cublasLtMatmulDescCreate(&raw, compute, scale_type), op, "cublasLtMatmulDescCreate");
  return MatmulDesc(raw);
}

template <typename T>
void set_attribute(const char* op, cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const T& value,
                   const char* what) {
  check(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)), op, what);
}

inline Layout make_layout(const char* op, cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t raw = nullptr;
  check(cublasLtMatrixLayoutCreate(&raw, type, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), ld), op,
        "cublasLtMatrixLayoutCreate");
  return Layout(raw);
}

/// Asks the heuristic for the best algorithm of `plan` (a..d set) within `workspace` bytes and the given
/// pointer alignments (A, B, C, D); an error naming `op` and `problem` when there is none.
template <typename Problem>
void choose_algo(const char* op, cublasLtHandle_t handle, Plan& plan, uint64_t workspace, const uint32_t (&align)[4],
                 const Problem& problem) {
  cublasLtMatmulPreference_t raw = nullptr;
  check(cublasLtMatmulPreferenceCreate(&raw), op, "cublasLtMatmulPreferenceCreate");
  Preference pref(raw);
  check(cublasLtMatmulPreferenceSetAttribute(pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                             sizeof(workspace)),
        op, "setting the workspace size");
  const cublasLtMatmulPreferenceAttributes_t attrs[] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4; ++i) {
    check(cublasLtMatmulPreferenceSetAttribute(pref.get(), attrs[i], &align[i], sizeof(align[i])), op,
          "setting a pointer alignment");
  }
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  check(cublasLtMatmulAlgoGetHeuristic(handle, plan.desc.get(), plan.a.get(), plan.b.get(), plan.c.get(),
                                       plan.d.get(), pref.get(), 1, &result, &found),
        op, "cublasLtMatmulAlgoGetHeuristic");
  TORCH_CHECK(found > 0 && result.state == CUBLAS_STATUS_SUCCESS, op, ": cuBLASLt has no algorithm for this "
              "problem (", problem, ")");
  plan.algo = result.algo;
}

/// Plans by key, built once by `make(key)`: the heuristic query costs far more than the GEMM setup it saves.
template <typename Key, typename Hash, typename Make>
const Plan& cached_plan(const Key& key, Make&& make) {
  static std::mutex mutex;
  static std::unordered_map<Key, std::unique_ptr<Plan>, Hash> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, make(key)).first;
  return *it->second;
}

/// The largest power of two up to 16 that divides the address: the alignment the kernels may assume.
inline uint32_t alignment_of(const void* ptr) {
  const auto address = reinterpret_cast<uintptr_t>(ptr);
  uint32_t alignment = 16;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

/// Combines hashes of integer fields (boost's hash_combine).
inline size_t hash_fields(std::initializer_list<int64_t> fields) {
  size_t h = 0;
  for (int64_t v : fields) h ^= std::hash<int64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  return h;
}

}  // namespace mixprec::cuda::lt
