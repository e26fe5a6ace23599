// fp8_gemm / fp8_gemm_accum_ on CUDA. Per-tensor scales on a GPU with FP8 tensor cores (sm_89 and newer)
// take one cuBLASLt FP8 GEMM: the scale_inv tensors are its A/B scale pointers (read on the device), the
// accumulation is fp32 (the tensor cores' own narrower accumulator is promoted to fp32 every few MMAs;
// CUBLASLT_MATMUL_DESC_FAST_ACCUM, only when asked, for forward GEMMs, skips that), and the
// output is fp32/bf16/fp16. A bias joins a 16-bit output in cuBLASLt's bias epilogue (in fp32, before the
// rounding, as torch._scaled_mm adds it); an fp32 output takes it after the GEMM (the same sum). Row-wise
// scales on both operands take cuBLASLt's outer-vector scale mode (cuBLASLt >= 12.9, sm_90+; a build against
// older cuBLAS headers has the per-tensor path only). fp8_gemm_accum_ is the
// same GEMM with beta = 1 into the fp32 accumulator: an FP8 weight gradient lands in main_grad without a separate
// add. Block scales (1x128 x 128x128, 128x128 x 1x128, 1x128 x 1x128: DeepSeek-V3's three GEMMs) take cuBLASLt's
// VEC128 / BLK128x128 scale modes on sm_90 with cuBLASLt >= 12.9 when MIXPREC_FP8_BLOCK_CUBLASLT=1: opt-in until
// the path has run on a GPU (a Hopper-only test sets it and checks against float64; gpu_check.sh benchmarks it).
// Other mixed granularities, E5M2 x E5M2 (which cuBLASLt does not multiply), older GPUs and any problem
// cuBLASLt's heuristic turns down go through the emulation (dequantize, fp32 GEMM), the CPU's implementation.
//
// Layout. cuBLASLt is column-major and its FP8 kernels want A transposed and B not ("TN"). Row-major a
// [m, k] is column-major [k, m] and b [n, k] is column-major [k, n], so
//   D (col-major [n, m] = row-major out [m, n]) = op_T(A = b) x op_N(B = a),
// with b's scale as A's and a's scale as B's. Host code only.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <string_view>
#include <unordered_set>

#include "ops/cuda/cublaslt.h"
#include "ops/fp8_plan.h"

// cuBLASLt's scale modes (the A/B_SCALE_MODE attributes, outer-vector and block modes) are in the headers of
// cuBLAS 12.9 and newer; an older toolkit builds the per-tensor path only (its scales are the default mode).
#if defined(CUBLAS_VERSION) && CUBLAS_VERSION >= 120900
#define MIXPREC_LT_SCALE_MODES 1
#else
#define MIXPREC_LT_SCALE_MODES 0
#endif

namespace mixprec::cuda {
namespace {

/// How cuBLASLt applies the scales: one per tensor, one per row of each operand (outer vectors), or per block
/// (each operand's mode: VEC128 for 1x128 blocks along k, BLK128x128 for 128x128 blocks).
enum class LtScales : int { None = 0, Tensor = 1, OuterVector = 2, Blocks = 3 };

/// The scale modes of cuBLASLt's A and B (our b and a): 0 (CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F, a name
/// older headers lack) for per-tensor scales.
struct LtModes {
  LtScales kind = LtScales::None;
  int32_t a = 0, b = 0;
};

struct Fp8PlanKey {
  int device;
  LtScales scales;
  int32_t a_mode, b_mode;
  cudaDataType_t a_type, b_type, d_type;  // cuBLASLt's A (our b), B (our a), D
  int64_t m, n, k;                        // cuBLASLt's: m = our n, n = our m
  bool fast_accum, accumulate, bias;
  uint32_t align_d;
  size_t workspace;
  bool operator==(const Fp8PlanKey& o) const {
    return device == o.device && scales == o.scales && a_mode == o.a_mode && b_mode == o.b_mode &&
           a_type == o.a_type && b_type == o.b_type &&
           d_type == o.d_type && m == o.m && n == o.n && k == o.k && fast_accum == o.fast_accum &&
           accumulate == o.accumulate && bias == o.bias && align_d == o.align_d && workspace == o.workspace;
  }
};

struct Fp8PlanKeyHash {
  size_t operator()(const Fp8PlanKey& key) const {
    return lt::hash_fields({key.device, static_cast<int64_t>(key.scales), key.a_mode, key.b_mode, key.a_type,
                            key.b_type, key.d_type, key.m,
                            key.n, key.k, key.fast_accum, key.accumulate, key.bias, key.align_d,
                            static_cast<int64_t>(key.workspace)});
  }
};

cudaDataType_t fp8_type(at::ScalarType t) { return t == at::kFloat8_e4m3fn ? CUDA_R_8F_E4M3 : CUDA_R_8F_E5M2; }

cudaDataType_t out_type(at::ScalarType t) {
  return t == at::kBFloat16 ? CUDA_R_16BF : (t == at::kHalf ? CUDA_R_16F : CUDA_R_32F);
}

// The descriptor carries the scale pointers, which change from call to call: each call gets its own
// (a host object, cheap), while the layouts and the algorithm are cached by problem. `bias` (D's type, one
// per row of D = per column of our output, 16-byte aligned) turns on the bias epilogue.
lt::MatmulDesc fp8_desc(const char* op, const LtModes& modes, bool fast_accum, const void* scale_a,
                        const void* scale_b, const at::Tensor* bias) {
  lt::MatmulDesc desc = lt::make_desc(op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
  lt::set_attribute(op, desc.get(), CUBLASLT_MATMUL_DESC_TRANSA, CUBLAS_OP_T, "setting TRANSA");
  lt::set_attribute(op, desc.get(), CUBLASLT_MATMUL_DESC_TRANSB, CUBLAS_OP_N, "setting TRANSB");
  const int8_t fast = fast_accum ? 1 : 0;
  lt::set_attribute(op, desc.get(), CUBLASLT_MATMUL_DESC_FAST_ACCUM, fast, "setting FAST_ACCUM");
#if MIXPREC_LT_SCALE_MODES
  if (modes.kind == LtScales::OuterVector || modes.kind == LtScales::Blocks) {
    // Outer vectors: A's has one scale per row of op(A) (our b's rows), B's one per column of op(B) (our a's
    // rows). Blocks: lt_block_scales gives the layouts.
    lt::set_attribute(op, desc.get(), CUBLASLT_MATMUL_DESC_A_SCALE_MODE, modes.a, "setting the A scale mode");
    lt::set_attribute(op, desc.get(), CUBLASLT_MATMUL_DESC_B_SCALE_MODE, modes.b, "setting the B scale mode");
  }
#endif
  lt::set_attribute(op, desc.get(), CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, scale_a, "setting the A scale");
  lt::set_attribute(op, desc.get(), CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, scale_b, "setting the B scale");
  if (bias != nullptr) {
    const uint32_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    lt::set_attribute(op, desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue, "setting the bias epilogue");
    const void* pointer = bias->const_data_ptr();
    lt::set_attribute(op, desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, pointer, "setting the bias");
    const int32_t type = out_type(bias->scalar_type());
    lt::set_attribute(op, desc.get(), CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, type, "setting the bias type");
  }
  return desc;
}

int compute_capability(int device) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major * 10 + minor;
}

[[maybe_unused]] bool rowwise(const detail::Fp8ScaleLayout& layout, int64_t k) {
  return !layout.per_tensor && layout.block_rows == 1 && layout.block_cols >= k;
}

/// An environment flag: set, non-empty and not "0". Read where it is asked (cheap next to a GEMM).
bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' && std::string_view(v) != "0";
}

#if MIXPREC_LT_SCALE_MODES
/// An operand's cuBLASLt block-scale mode: VEC128 for 1x128 blocks along k, BLK128x128 for 128x128 blocks (one
/// scale along k counts as either only when k <= 128: a per-row scale over a longer k is not 128-wide blocks),
/// or nothing.
std::optional<int32_t> block_mode(const detail::Fp8ScaleLayout& layout, int64_t k) {
  if (layout.per_tensor || (layout.block_cols != 128 && k > 128)) return std::nullopt;
  if (layout.block_rows == 1) return CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
  if (layout.block_rows == 128) return CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
  return std::nullopt;
}

/// A block-scaled operand's scale_inv ([rows, ceil(k / 128)] or [ceil(rows / 128), ceil(k / 128)], row-major) in
/// the layout cuBLASLt reads for `mode` (the one torch._scaled_mm hands it for its 1x128 / 128x128 recipes):
/// VEC128 column-major (the rows fastest); BLK128x128 with the k blocks fastest, each row of blocks padded to
/// a multiple of 4.
at::Tensor lt_block_scales(const at::Tensor& s, int32_t mode) {
  if (mode == CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F) return s.t().contiguous();
  const int64_t k_blocks = s.size(1), padded = (k_blocks + 3) / 4 * 4;
  if (padded == k_blocks) return s.contiguous();
  at::Tensor out = at::zeros({s.size(0), padded}, s.options());
  out.narrow(1, 0, k_blocks).copy_(s);
  return out;
}
#endif

/// The cuBLASLt scale modes that take this problem on this GPU, or kind None (the emulation takes it).
LtModes cublaslt_scales(const detail::Fp8GemmArgs& g) {
  if (g.a.scalar_type() == at::kFloat8_e5m2 && g.b.scalar_type() == at::kFloat8_e5m2) return {};
  const int cc = compute_capability(g.a.get_device());
  if (g.a_layout.per_tensor && g.b_layout.per_tensor) return {cc >= 89 ? LtScales::Tensor : LtScales::None};
#if MIXPREC_LT_SCALE_MODES
  const bool lt_12_9 = cublasLtGetVersion() >= 120900;
  if (rowwise(g.a_layout, g.k) && rowwise(g.b_layout, g.k) && cc >= 90 && lt_12_9) {
    const int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    return {LtScales::OuterVector, mode, mode};
  }
  // cuBLASLt's block modes exist on sm_90 (Hopper) only, and not with both operands in 128x128 blocks.
  if (cc == 90 && lt_12_9 && env_flag("MIXPREC_FP8_BLOCK_CUBLASLT")) {
    const std::optional<int32_t> a = block_mode(g.b_layout, g.k), b = block_mode(g.a_layout, g.k);
    const int32_t square = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
    if (a && b && !(*a == square && *b == square)) return {LtScales::Blocks, *a, *b};
  }
#endif
  return {};
}

/// cuBLASLt's FP8 kernels need 16-byte aligned rows: every dimension a multiple of 16.
void check_multiples_of_16(const char* op, const detail::Fp8GemmArgs& g) {
  TORCH_CHECK(g.m % 16 == 0 && g.n % 16 == 0 && g.k % 16 == 0, op,
              ": on CUDA every dimension of an FP8 GEMM must be a multiple of 16 (pad the operands), got m=", g.m,
              ", n=", g.n, ", k=", g.k);
}

/// MIXPREC_FP8_GEMM_STRICT=1: a problem cuBLASLt turns down raises instead of going to the emulation, so that
/// a test can tell that a cuBLASLt path (e.g. the bias epilogue) really ran. Read on each decline only.
bool strict() { return env_flag("MIXPREC_FP8_GEMM_STRICT"); }

// Problems whose plan cuBLASLt turned down (no algorithm): the emulation takes them from then on.
struct Declined {
  std::mutex mutex;
  std::unordered_set<Fp8PlanKey, Fp8PlanKeyHash> keys;
};
Declined& declined() {
  static Declined* d = new Declined();  // leaked: usable from other statics' destructors
  return *d;
}

// out (row-major [m, n], dtype d) = dequant(a) @ dequant(b)^T + (accumulate ? out : 0) (+ bias, out's dtype,
// contiguous and 16-byte aligned, in the epilogue). Returns false, with nothing written, when cuBLASLt has no
// algorithm for the problem.
bool cublaslt_fp8_gemm(const char* op, const LtModes& modes, const detail::Fp8GemmArgs& g, const at::Tensor& out,
                       bool fast_accum, bool accumulate, const at::Tensor* bias = nullptr) {
  // Block-scaled kernels promote their partial sums themselves: no fast accumulation there.
  if (modes.kind == LtScales::Blocks) fast_accum = false;
  // The FP8 kernels read 16-byte rows (k is a multiple of 16): a view that starts off 16 bytes is copied.
  const at::Tensor a = lt::alignment_of(g.a.const_data_ptr()) < 16 ? g.a.clone() : g.a;
  const at::Tensor b = lt::alignment_of(g.b.const_data_ptr()) < 16 ? g.b.clone() : g.b;
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  void* workspace = at::cuda::getCUDABlasLtWorkspace();
  const size_t workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  const Fp8PlanKey key{g.a.get_device(), modes.kind, modes.a, modes.b, fp8_type(g.b.scalar_type()),
                       fp8_type(g.a.scalar_type()), out_type(out.scalar_type()), g.n, g.m, g.k, fast_accum,
                       accumulate, bias != nullptr, lt::alignment_of(out.const_data_ptr()), workspace_size};
  {
    std::lock_guard<std::mutex> lock(declined().mutex);
    if (declined().keys.count(key)) {
      TORCH_CHECK(!strict(), op, ": cuBLASLt turned this problem down earlier (MIXPREC_FP8_GEMM_STRICT is set)");
      return false;
    }
  }
  // Scale vectors start 16-byte aligned, as cuBLASLt's vector loads may assume (a one-element view is cloned
  // too: cheap).
#if MIXPREC_LT_SCALE_MODES
  const bool blocks = modes.kind == LtScales::Blocks;
  const at::Tensor a_scales = blocks ? lt_block_scales(g.b_scale_inv, modes.a) : g.b_scale_inv;
  const at::Tensor b_scales = blocks ? lt_block_scales(g.a_scale_inv, modes.b) : g.a_scale_inv;
#else
  const at::Tensor& a_scales = g.b_scale_inv;
  const at::Tensor& b_scales = g.a_scale_inv;
#endif
  const at::Tensor sa = lt::alignment_of(a_scales.const_data_ptr()) < 16 ? a_scales.clone() : a_scales;
  const at::Tensor sb = lt::alignment_of(b_scales.const_data_ptr()) < 16 ? b_scales.clone() : b_scales;
  const void* scale_a = sa.const_data_ptr();
  const void* scale_b = sb.const_data_ptr();
  const lt::Plan* plan = nullptr;
  try {
    plan = &lt::cached_plan<Fp8PlanKey, Fp8PlanKeyHash>(key, [&](const Fp8PlanKey& k) {
      auto p = std::make_unique<lt::Plan>();
      p->desc = fp8_desc(op, modes, k.fast_accum, scale_a, scale_b, bias);
      p->a = lt::make_layout(op, k.a_type, k.k, k.m, k.k);  // b: col-major [k, n_ours], op T
      p->b = lt::make_layout(op, k.b_type, k.k, k.n, k.k);  // a: col-major [k, m_ours], op N
      p->c = lt::make_layout(op, k.d_type, k.m, k.n, k.m);
      p->d = lt::make_layout(op, k.d_type, k.m, k.n, k.m);
      const uint32_t align[4] = {16, 16, k.align_d, k.align_d};
      lt::choose_algo(op, handle, *p, k.workspace, align, c10::str("FP8 m=", k.n, ", n=", k.m, ", k=", k.k));
      return p;
    });
  } catch (const c10::Error&) {
    if (strict()) throw;
    std::lock_guard<std::mutex> lock(declined().mutex);
    declined().keys.insert(key);
    return false;
  }
  const lt::MatmulDesc desc = fp8_desc(op, modes, fast_accum, scale_a, scale_b, bias);
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  void* d = out.data_ptr();
  const cublasStatus_t status =
      cublasLtMatmul(handle, desc.get(), &alpha, b.const_data_ptr(), plan->a.get(), a.const_data_ptr(),
                     plan->b.get(), &beta, d, plan->c.get(), d, plan->d.get(), &plan->algo, workspace, workspace_size,
                     c10::cuda::getCurrentCUDAStream());
  // A scale-mode or epilogue combination cuBLASLt only refuses at launch (nothing is written then): the
  // emulation takes this problem from now on. Per-tensor scales without a bias are the documented FP8
  // path: an error there is one.
  if ((modes.kind != LtScales::Tensor || bias != nullptr) && !strict() &&
      (status == CUBLAS_STATUS_NOT_SUPPORTED || status == CUBLAS_STATUS_INVALID_VALUE)) {
    std::lock_guard<std::mutex> lock(declined().mutex);
    declined().keys.insert(key);
    return false;
  }
  lt::check(status, op, "cublasLtMatmul");
  return true;
}

at::Tensor fp8_gemm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv,
                         const at::Tensor& b_scale_inv, at::ScalarType out_dtype, const std::optional<at::Tensor>& bias,
                         bool use_fast_accum) {
  constexpr const char* op = "mixprec::fp8_gemm";
  const detail::Fp8GemmArgs g = detail::check_fp8_gemm(op, a, b, a_scale_inv, b_scale_inv);
  detail::check_fp8_gemm_output(out_dtype, bias, g);
  check_multiples_of_16(op, g);
  const c10::cuda::CUDAGuard guard(a.device());
  const LtModes modes = g.m == 0 || g.n == 0 || g.k == 0 ? LtModes{} : cublaslt_scales(g);
  if (modes.kind != LtScales::None) {
    at::Tensor out = at::empty({g.m, g.n}, a.options().dtype(out_dtype));
    const bool has_bias = bias.has_value() && bias->defined();
    // A 16-bit output takes the bias in the epilogue, before its rounding; an fp32 one adds it after (the
    // same fp32 sum, and cuBLASLt's FP8 kernels want a bf16 bias for an fp32 output).
    at::Tensor epilogue_bias;
    if (has_bias && out_dtype != at::kFloat) {
      epilogue_bias = bias->to(out_dtype).contiguous();
      if (lt::alignment_of(epilogue_bias.const_data_ptr()) < 16) epilogue_bias = epilogue_bias.clone();
    }
    if (cublaslt_fp8_gemm(op, modes, g, out, use_fast_accum, false,
                          epilogue_bias.defined() ? &epilogue_bias : nullptr)) {
      if (has_bias && out_dtype == at::kFloat) out.add_(*bias);
      return out;
    }
  }
  return detail::emulated_fp8_gemm(g, out_dtype, bias);
}

void fp8_gemm_accum__cuda(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                          const at::Tensor& a_scale_inv, const at::Tensor& b_scale_inv) {
  constexpr const char* op = "mixprec::fp8_gemm_accum_";
  const detail::Fp8GemmArgs g = detail::check_fp8_gemm(op, a, b, a_scale_inv, b_scale_inv);
  detail::check_fp8_gemm_accum(out, g);
  check_multiples_of_16(op, g);
  const c10::cuda::CUDAGuard guard(a.device());
  if (g.m == 0 || g.n == 0 || g.k == 0) return;  // adds nothing
  const LtModes modes = cublaslt_scales(g);
  if (modes.kind != LtScales::None && cublaslt_fp8_gemm(op, modes, g, out, false, true)) return;
  detail::emulated_fp8_gemm_accum_(out, g);
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, CUDA, m) {
  m.impl("fp8_gemm", &fp8_gemm_cuda);
  m.impl("fp8_gemm_accum_", &fp8_gemm_accum__cuda);
}

}  // namespace mixprec::cuda
