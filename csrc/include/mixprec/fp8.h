// FP8 training from LibTorch: the formats, quantization with every scaling granularity the recipes use,
// and the delayed-scaling update. Each function calls its op (torch.ops.mixprec.fp8_*), so C++ and
// Python share one routing, and CPU and CUDA give the same bits.
//
// Conventions (Transformer Engine's): quantized = fp8(x * scale), and x ~= fp8 value * scale_inv with
// scale_inv = 1 / scale. A scale maps an amax (max |x|) to the format's largest finite value, divided by
// 2^margin, optionally rounded down to a power of two (then scale_inv is exact).
//
// Rounding is round-to-nearest-even (bit-identical to Tensor.to(dtype)) or stochastic (unbiased, seeded
// Philox draws per element, the same bits on CPU and CUDA). `saturate` (the default) turns a value beyond
// the largest finite one, inf included, into +-that value (as CUDA's SATFINITE conversion and torch 2.14's
// Tensor.to(float8_e4m3fn) do); without it, an overflow becomes NaN in E4M3 (which has no inf) and +-inf in
// E5M2 (as Tensor.to(float8_e5m2) does). NaN stays NaN.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace c10d {
class ProcessGroup;
}  // namespace c10d

namespace mixprec::fp8 {

/// The largest finite value of `dtype` (448 for torch::kFloat8_e4m3fn, 57344 for torch::kFloat8_e5m2).
double max_finite(at::ScalarType dtype);

struct QuantizeOptions {
  std::string rounding = "nearest";  // or "stochastic"
  bool saturate = true;
  std::optional<int64_t> seed = std::nullopt;  // stochastic rounding's key; none: the device's default generator
  bool transpose = false;                      // also return the [cols, rows] transposed copy
};

/// `input` as FP8 and what came out of the same pass over it.
struct Quantized {
  at::Tensor data;    // fp8(input * scale), shaped like input
  at::Tensor data_t;  // with `transpose`: the same codes as a contiguous [cols, rows] matrix, else undefined
  at::Tensor amax;    // max |input| (0-dim float32; NaN if input holds a NaN): the next delayed scale's input
};

/// Quantizes `input` (fp32, fp16 or bf16; seen as a [rows, cols] matrix, cols = its last dimension) to
/// `dtype` (float8_e4m3fn or float8_e5m2) with `scale`, a one-element float32 tensor on input's device
/// that is read on the device (no host sync), as delayed scaling needs.
Quantized quantize(const at::Tensor& input, const at::Tensor& scale, at::ScalarType dtype,
                   const QuantizeOptions& options = {});

struct BlockwiseOptions {
  int64_t margin = 0;  // the scale is divided by 2^margin (0..32)
  bool pow2_scales = false;
  std::string rounding = "nearest";
  bool saturate = true;
  std::optional<int64_t> seed = std::nullopt;
};

struct BlockQuantized {
  at::Tensor data;       // shaped like input
  at::Tensor scale_inv;  // float32 [ceil(rows / block_rows), ceil(cols / block_cols)]
};

/// Current scaling at any granularity: each block_rows x block_cols block of the [rows, cols] matrix gets
/// the scale of its own amax (an amax of 0, inf or NaN gives scale 1). -1 takes the whole extent:
/// (-1, -1) is per-tensor, (1, -1) row-wise, (1, 128) and (128, 128) DeepSeek-V3's activation and weight
/// blocks. Element [r, c] dequantizes as data[r, c] * scale_inv[r / block_rows, c / block_cols].
BlockQuantized quantize_blockwise(const at::Tensor& input, at::ScalarType dtype, int64_t block_rows,
                                  int64_t block_cols, const BlockwiseOptions& options = {});

/// Delayed scaling, on the device: `amax_history` is a float32 [history, n] matrix whose row 0 holds this
/// step's amax of each of n tensors and rows 1.. the steps before, newest first. Each scale[j] becomes the
/// scale of the history's max (algo "max") or of row 0 ("most_recent"), and scale_inv[j] = 1 / scale[j];
/// an amax of 0, inf or NaN keeps the previous scale. Then the window moves: every row moves down one,
/// the oldest drops out, and row 0 is zeroed for the next step.
/// With `turn` (a one-element float32 tensor shared by a layer's forward and backward updates; `side` 0 for the
/// forward's, 1 for the backward's), the update runs only if turn != side, and turn becomes side: the scales
/// of each side move once per forward-backward cycle however often that side runs in it (a layer called
/// twice before its backward, a graph backpropagated twice, a recomputation that reads the state as the
/// original pass left it). Read and written on the device, with no host sync. `take_turn` false (a forward that
/// builds no backward: a frozen layer, no_grad, reentrant checkpointing's first pass) is gated alike, but a due
/// update sets turn to 2 (both sides due) instead of `side`: such passes keep updating on their own, and the
/// next backward, if one comes, updates too.
void update_scales_(const at::Tensor& amax_history, const at::Tensor& scale, const at::Tensor& scale_inv,
                    at::ScalarType dtype, std::string_view algo = "max", int64_t margin = 0,
                    bool pow2_scales = false, const std::optional<at::Tensor>& turn = std::nullopt,
                    int64_t side = 0, bool take_turn = true);

/// A scaled FP8 GEMM: (a * a_scale_inv) @ (b * b_scale_inv)^T for a [m, k] and b [n, k] (float8_e4m3fn
/// or float8_e5m2; the layout of torch::nn::functional::linear(a, b)), as an [m, n] tensor of `out_dtype`
/// (fp32, bf16 or fp16); `bias` ([n], taken in out_dtype) joins the fp32 product before its one rounding, as
/// in torch::_scaled_mm and cuBLASLt's bias epilogue. Each scale_inv is one element (per
/// tensor), [rows, 1] (per row), [rows, ceil(k / 128)] (1x128 blocks) or [ceil(rows / 128), ceil(k / 128)]
/// (128x128 blocks): what quantize / quantize_blockwise return. CUDA: per-tensor scales on sm_89+ and row
/// scales on sm_90+ run one cuBLASLt FP8 GEMM (fp32 accumulation; `use_fast_accum` for forward GEMMs
/// only), other cases the emulation; every dimension must be a multiple of 16. CPU: the exact emulation
/// (dequantize, fp32 GEMM).
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv, const at::Tensor& b_scale_inv,
                at::ScalarType out_dtype = at::kBFloat16, const std::optional<at::Tensor>& bias = std::nullopt,
                bool use_fast_accum = false);

/// data * scale_inv as an fp32 [rows, k] matrix, for FP8 `data` [rows, k] and a scale_inv of any layout
/// gemm takes: the exact value of each code times its scale, one fp32 rounding (what the GEMM emulation
/// multiplies). CPU: one vectorised pass.
at::Tensor dequantize(const at::Tensor& data, const at::Tensor& scale_inv);

/// The same product added into `out`, a contiguous fp32 [m, n] accumulator (beta = 1 in one cuBLASLt
/// GEMM on CUDA): an FP8 weight gradient accumulated straight into an fp32 main_grad.
void gemm_accum_(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv,
                 const at::Tensor& b_scale_inv);

/// How a Float8Linear scales its three operands (input, weight, output gradient).
///   Delayed    per tensor, from the max of the last amax_history_len amaxes (Transformer Engine's default):
///              the scale is known before the data is read, so quantizing is one pass; the state lives in
///              the layer's buffers.
///   Current    per tensor, from this tensor's own amax (an extra read of the input).
///   Rowwise    per row of each GEMM operand (and per column for the transposed products).
///   Blockwise  1x128 blocks for activations and gradients, 128x128 for weights (DeepSeek-V3).
enum class Scaling : int { Delayed = 0, Current = 1, Rowwise = 2, Blockwise = 3 };

/// "delayed", "current", "rowwise", "blockwise"; anything else is an error that lists them.
Scaling parse_scaling(std::string_view name);
std::string_view scaling_name(Scaling scaling);

struct Recipe {
  Scaling scaling = Scaling::Delayed;
  at::ScalarType forward_dtype = at::kFloat8_e4m3fn;  // input and weight
  at::ScalarType backward_dtype = at::kFloat8_e5m2;   // output gradient: E5M2's range ("hybrid"), or E4M3
  int64_t amax_history_len = 16;                      // Delayed only
  std::string amax_compute_algo = "max";              // Delayed only: "max" or "most_recent"
  int64_t margin = 0;                                 // scales divided by 2^margin
  bool pow2_scales = false;
  bool fast_accum = true;  // the forward GEMM's faster FP8 accumulation (CUDA); backward GEMMs never use it
};

/// Refuses a recipe no layer can run, naming the field: a forward_dtype other than E4M3 (no FP8 GEMM takes two
/// E5M2 operands), a backward_dtype other than E4M3/E5M2, amax_history_len < 1,
/// amax_compute_algo other than "max" / "most_recent", margin outside [0, 32]. Float8Linear's constructors and
/// forward run it, and so does Python's mixprec.fp8.Recipe when it is built (through the op
/// mixprec::fp8_check_recipe), so a bad recipe fails where it is written.
void check_recipe(const Recipe& recipe);

/// Delayed scaling's state, as plain fp32 tensors (a layer's buffers, so state dicts hold them): the
/// forward's amax history [history, 2] (input, weight) with its scale and scale_inv [2], and the
/// backward's [history, 1] (output gradient) with scale and scale_inv [1]. Scales start at 1. `turn` [1]
/// says which side updated its scales last (0 the forward, 1 the backward; it starts at 1, so the first
/// forward updates): each side updates once per turn (see update_scales_), and amaxes recorded within a
/// turn are combined by max. A state without `turn` (undefined) updates on every training pass, as before
/// it existed.
struct ScalingState {
  at::Tensor forward_amax_history, forward_scale, forward_scale_inv;
  at::Tensor backward_amax_history, backward_scale, backward_scale_inv;
  at::Tensor turn;
};

/// Fresh state for `recipe` on `options`' device (empty tensors for the recipes without state).
ScalingState make_scaling_state(const Recipe& recipe, const at::TensorOptions& options);

/// What loading a checkpoint does to a layer's scaling state: one rule for Python's Float8Linear and C++'s.
enum class StateLoad {
  Skip,         ///< nothing to load: the recipe keeps no state, or the checkpoint holds neither state nor weight
                ///< (a partial load of other tensors, e.g. adapters); the layer's state stays as it is
  Load,         ///< the checkpoint's state, as it is
  InitialTurn,  ///< the checkpoint's state, fp8_turn excepted (older checkpoints lack it): the initial turn, as
                ///< checkpoints are saved between steps
  Restart,      ///< a checkpoint of the weight without state (a plain Linear's, or the empty buffers a stateless
                ///< recipe saved): the initial state, since what the layer recorded belonged to its old weight
  Partial,      ///< part of a state: C++ refuses it, naming what is missing; Python leaves it to torch (strict
                ///< loads report the missing keys, strict=False loads piecewise, as sharded loaders do)
};

/// The rule: `numels` holds, per state buffer in ScalingState's order (fp8_turn last), the checkpoint's element
/// count or -1 where it has no entry; `has_weight` whether the checkpoint holds the layer's weight.
StateLoad plan_state_load(Scaling scaling, const std::vector<int64_t>& numels, bool has_weight);

/// MAX-reduces row 0 of both amax histories (the amaxes the last forward and backward recorded) over `group`,
/// in place (Transformer Engine's reduce_amax): the forward updates its scales from them next, and the
/// backward's row 0 waits for the next backward, so every rank's scales see every rank's amax and the ranks of
/// a data-parallel group keep identical state. One all-reduce of three floats (asynchronous on NCCL: the
/// current stream waits for it, the host does not). Every rank of the group must call it, in the same order.
void reduce_amax(const ScalingState& state, c10d::ProcessGroup& group);

}  // namespace mixprec::fp8
