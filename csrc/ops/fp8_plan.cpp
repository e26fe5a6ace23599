#include "ops/fp8_plan.h"

#include <ATen/Context.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <string>
#include <string_view>

#include "ops/cast_plan.h"
#include "ops/checks.h"

namespace mixprec::detail {

namespace {

constexpr int64_t kMaxMargin = 32;

void check_margin(int64_t margin, const char* op) {
  TORCH_CHECK_VALUE(margin >= 0 && margin <= kMaxMargin, op, ": margin must be in [0, ", kMaxMargin,
                    "] (the scale is divided by 2^margin), got ", margin);
}

Fp8Input matrix_view(const at::Tensor& input, fp8::Format format, rounding::Mode mode) {
  const auto [rows, cols] = matrix_extent(input);
  return {input.contiguous(), rows, cols, format, mode};
}

}  // namespace

void check_dense_float_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.defined(), op, ": input must be a tensor, got an undefined tensor");
  TORCH_CHECK(input.layout() == at::kStrided, op, ": input must be a dense (strided) tensor, got layout ",
              input.layout());
  const at::ScalarType t = input.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": input must be float32, float16 or bfloat16, got ", t);
}

void check_block_sizes(int64_t block_rows, int64_t block_cols, const char* op) {
  TORCH_CHECK_VALUE(block_rows == -1 || block_rows >= 1, op,
                    ": block_rows must be positive or -1 (all rows in one block), got ", block_rows);
  TORCH_CHECK_VALUE(block_cols == -1 || block_cols >= 1, op,
                    ": block_cols must be positive or -1 (all columns in one block), got ", block_cols);
}

void check_gemm_out_dtype(at::ScalarType out_dtype, const char* op) {
  TORCH_CHECK_VALUE(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf, op,
                    ": out_dtype must be float32, bfloat16 or float16, got ", out_dtype);
}

Fp8Blocks block_grid(int64_t rows, int64_t cols, int64_t block_rows, int64_t block_cols, const char* op) {
  check_block_sizes(block_rows, block_cols, op);
  Fp8Blocks blocks;
  // A whole-extent block of an empty extent is still one (empty) block: the scale exists, and is 1.
  blocks.block_rows = block_rows == -1 ? std::max<int64_t>(rows, 1) : block_rows;
  blocks.block_cols = block_cols == -1 ? std::max<int64_t>(cols, 1) : block_cols;
  blocks.grid_rows = grid_extent(rows, block_rows);
  blocks.grid_cols = grid_extent(cols, block_cols);
  return blocks;
}

fp8::Format parse_fp8_dtype(at::ScalarType dtype, const char* op) {
  if (dtype == at::kFloat8_e4m3fn) return fp8::Format::E4M3;
  if (dtype == at::kFloat8_e5m2) return fp8::Format::E5M2;
  TORCH_CHECK_VALUE(false, op, ": dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got ", dtype);
}

Fp8Input check_fp8_quantize(const at::Tensor& input, const at::Tensor& scale, at::ScalarType dtype,
                            c10::string_view rounding) {
  constexpr const char* op = "mixprec::fp8_quantize";
  check_dense_float_input(input, op);
  const fp8::Format format = parse_fp8_dtype(dtype, op);
  const rounding::Mode mode = parse_rounding(std::string_view(rounding.data(), rounding.size()), op);
  check_one_element(scale, op, "scale", at::kFloat, input.device());
  return matrix_view(input, format, mode);
}

Fp8QuantizeOutputs empty_fp8_quantize_outputs(const Fp8Input& in, at::ScalarType dtype, bool transpose) {
  const at::TensorOptions options = in.input.options().dtype(dtype);
  return {at::empty(in.input.sizes(), options),
          transpose ? at::empty({in.cols, in.rows}, options) : at::empty({0}, options),
          at::empty({}, in.input.options().dtype(at::kFloat))};
}

Fp8Input check_fp8_blockwise(const at::Tensor& input, at::ScalarType dtype, int64_t block_rows, int64_t block_cols,
                             int64_t margin, c10::string_view rounding, Fp8Blocks& blocks) {
  constexpr const char* op = "mixprec::fp8_quantize_blockwise";
  check_dense_float_input(input, op);
  const fp8::Format format = parse_fp8_dtype(dtype, op);
  const rounding::Mode mode = parse_rounding(std::string_view(rounding.data(), rounding.size()), op);
  check_margin(margin, op);
  Fp8Input in = matrix_view(input, format, mode);
  blocks = block_grid(in.rows, in.cols, block_rows, block_cols, op);
  return in;
}

AmaxAlgo check_fp8_update_scales(const at::Tensor& amax_history, const at::Tensor& scale,
                                 const at::Tensor& scale_inv, at::ScalarType dtype, c10::string_view algo,
                                 int64_t margin, const std::optional<at::Tensor>& turn, int64_t side) {
  constexpr const char* op = "mixprec::fp8_update_scales_";
  parse_fp8_dtype(dtype, op);
  check_margin(margin, op);
  const std::string_view a(algo.data(), algo.size());
  TORCH_CHECK_VALUE(a == "max" || a == "most_recent", op, ": algo must be \"max\" or \"most_recent\", got \"",
                    std::string(a), "\"");
  const std::pair<const at::Tensor*, const char*> tensors[] = {
      {&amax_history, "amax_history"}, {&scale, "scale"}, {&scale_inv, "scale_inv"}};
  for (const auto& [t, name] : tensors) {
    TORCH_CHECK(t->defined(), op, ": ", name, " must be a tensor, got an undefined tensor");
    TORCH_CHECK(t->layout() == at::kStrided && t->is_contiguous(), op, ": ", name,
                " must be a contiguous dense tensor (it is updated in place)");
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->device() == amax_history.device(), op, ": ", name, " is on ", t->device(),
                " but amax_history is on ", amax_history.device(), "; every tensor must be on the same device");
  }
  TORCH_CHECK(amax_history.dim() == 2 && amax_history.size(0) >= 1, op,
              ": amax_history must be a [history, n] matrix with history >= 1, got shape ", amax_history.sizes());
  const int64_t n = amax_history.size(1);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == n, op, ": scale must have shape [", n,
              "] (one per column of amax_history), got ", scale.sizes());
  TORCH_CHECK(scale_inv.dim() == 1 && scale_inv.size(0) == n, op, ": scale_inv must have shape [", n,
              "] (one per column of amax_history), got ", scale_inv.sizes());
  check_no_overlap(scale, "scale", scale_inv, "scale_inv", op);
  check_no_overlap(scale, "scale", amax_history, "amax_history", op);
  check_no_overlap(scale_inv, "scale_inv", amax_history, "amax_history", op);
  if (turn.has_value()) {
    const at::Tensor& t = *turn;
    TORCH_CHECK(t.defined() && t.layout() == at::kStrided && t.scalar_type() == at::kFloat && t.numel() == 1, op,
                ": turn must be a one-element float32 tensor, got ",
                t.defined() ? t.toString() + " of shape " + c10::str(t.sizes()) : std::string("an undefined tensor"));
    TORCH_CHECK(t.device() == amax_history.device(), op, ": turn is on ", t.device(), " but amax_history is on ",
                amax_history.device(), "; every tensor must be on the same device");
    TORCH_CHECK_VALUE(side == 0 || side == 1, op, ": side must be 0 (the forward's scales) or 1 (the backward's), got ",
                      side);
    check_no_overlap(t, "turn", amax_history, "amax_history", op);
    check_no_overlap(t, "turn", scale, "scale", op);
    check_no_overlap(t, "turn", scale_inv, "scale_inv", op);
  }
  return a == "max" ? AmaxAlgo::Max : AmaxAlgo::MostRecent;
}

namespace {

Fp8ScaleLayout scale_layout(const char* op, const char* name, const at::Tensor& s, int64_t rows, int64_t k,
                            c10::Device device) {
  TORCH_CHECK(s.defined(), op, ": ", name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK(s.layout() == at::kStrided, op, ": ", name, " must be a dense tensor, got layout ", s.layout());
  TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", s.scalar_type());
  TORCH_CHECK(s.device() == device, op, ": ", name, " is on ", s.device(), " but the operands are on ", device);
  if (s.numel() == 1) return {std::max<int64_t>(rows, 1), std::max<int64_t>(k, 1), true};
  const int64_t row_blocks = (rows + 127) / 128, col_blocks = (k + 127) / 128;
  Fp8ScaleLayout layout;
  if (s.dim() == 2) {
    if (s.size(0) == rows) {
      layout.block_rows = 1;
    } else if (s.size(0) == row_blocks) {
      layout.block_rows = 128;
    }
    if (s.size(1) == 1) {
      layout.block_cols = std::max<int64_t>(k, 1);
    } else if (s.size(1) == col_blocks) {
      layout.block_cols = 128;
    }
  }
  TORCH_CHECK(layout.block_rows > 0 && layout.block_cols > 0, op, ": ", name, " must have shape [1] (per tensor), [",
              rows, ", 1] (per row), [", rows, ", ", col_blocks, "] (1x128 blocks) or [", row_blocks, ", ", col_blocks,
              "] (128x128 blocks) for its [", rows, ", ", k, "] operand, got ", s.sizes());
  return layout;
}


}  // namespace

void check_fp8_operand(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.defined(), op, ": ", name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK(x.layout() == at::kStrided, op, ": ", name, " must be a dense tensor, got layout ", x.layout());
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat8_e4m3fn || x.scalar_type() == at::kFloat8_e5m2, op, ": ", name,
                    " must be torch.float8_e4m3fn or torch.float8_e5m2, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be a 2-D matrix, got ", x.dim(), " dimensions");
}

Fp8ScaleLayout check_fp8_dequantize(const char* op, const at::Tensor& data, const at::Tensor& scale_inv) {
  check_fp8_operand(op, "data", data);
  return scale_layout(op, "scale_inv", scale_inv, data.size(0), data.size(1), data.device());
}

Fp8GemmArgs check_fp8_gemm(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_inv,
                           const at::Tensor& b_scale_inv) {
  check_fp8_operand(op, "a", a);
  check_fp8_operand(op, "b", b);
  TORCH_CHECK(b.device() == a.device(), op, ": b is on ", b.device(), " but a is on ", a.device());
  TORCH_CHECK(a.size(1) == b.size(1), op, ": a [m, k] and b [n, k] must share k, got a ", a.sizes(), " and b ",
              b.sizes());
  Fp8GemmArgs g;
  g.m = a.size(0);
  g.n = b.size(0);
  g.k = a.size(1);
  g.a_layout = scale_layout(op, "a_scale_inv", a_scale_inv, g.m, g.k, a.device());
  g.b_layout = scale_layout(op, "b_scale_inv", b_scale_inv, g.n, g.k, a.device());
  g.a = a.contiguous();
  g.b = b.contiguous();
  g.a_scale_inv = a_scale_inv.contiguous();
  g.b_scale_inv = b_scale_inv.contiguous();
  return g;
}

void check_fp8_gemm_output(at::ScalarType out_dtype, const std::optional<at::Tensor>& bias, const Fp8GemmArgs& g) {
  constexpr const char* op = "mixprec::fp8_gemm";
  check_gemm_out_dtype(out_dtype, op);
  if (!bias.has_value() || !bias->defined()) return;
  TORCH_CHECK(bias->layout() == at::kStrided, op, ": bias must be a dense tensor, got layout ", bias->layout());
  const at::ScalarType t = bias->scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op,
              ": bias must be float32, bfloat16 or float16, got ", t);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.n, op, ": bias must have shape [", g.n, "] (b's rows), got ",
              bias->sizes());
  TORCH_CHECK(bias->device() == g.a.device(), op, ": bias is on ", bias->device(), " but the operands are on ",
              g.a.device());
}

void check_fp8_gemm_accum(const at::Tensor& out, const Fp8GemmArgs& g) {
  constexpr const char* op = "mixprec::fp8_gemm_accum_";
  TORCH_CHECK(out.defined(), op, ": out must be a tensor, got an undefined tensor");
  TORCH_CHECK(out.layout() == at::kStrided && out.is_contiguous(), op,
              ": out must be a contiguous dense tensor (it is accumulated in place)");
  TORCH_CHECK(out.scalar_type() == at::kFloat, op, ": out must be float32 (the fp32 accumulator), got ",
              out.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == g.m && out.size(1) == g.n, op, ": out must have shape [", g.m, ", ",
              g.n, "] (a's rows by b's rows), got ", out.sizes());
  TORCH_CHECK(out.device() == g.a.device(), op, ": out is on ", out.device(), " but the operands are on ",
              g.a.device());
}

at::Tensor dequantize(const at::Tensor& x, const at::Tensor& scale_inv, const Fp8ScaleLayout& layout) {
  if (x.is_cpu()) return dequantize_cpu(x, scale_inv, layout);
  const at::Tensor values = x.to(at::kFloat);
  if (layout.per_tensor) return values.mul(scale_inv.reshape({}));
  at::Tensor s = scale_inv;
  if (layout.block_rows > 1) s = s.repeat_interleave(layout.block_rows, 0).narrow(0, 0, x.size(0));
  if (layout.block_cols > 1) s = s.repeat_interleave(layout.block_cols, 1).narrow(1, 0, x.size(1));
  return values.mul(s);
}

bool fp32_matmul_at_full_precision() {
  try {
    return at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::HIGHEST;
  } catch (const c10::Error&) {
    return false;
  }
}

namespace {

// On the CPU, torch's reduced matmul precision ("medium"/"high", or mkldnn's per-backend "bf16"/"tf32") may
// run an fp32 GEMM on bf16 or TF32 products, which NoTF32Guard (CUDA's TF32 only) does not prevent. The
// emulation is the reference, so there it sums in float64: every product of two fp32 values is exact in
// float64, and the fp32 result comes from one rounding of a sum at least as accurate as an fp32 GEMM's.
bool cpu_sum_in_float64(const Fp8GemmArgs& g) { return g.a.is_cpu() && !fp32_matmul_at_full_precision(); }

// The emulation's operands: a and b^T dequantized to fp32.
std::pair<at::Tensor, at::Tensor> dequantized_operands(const Fp8GemmArgs& g) {
  return {dequantize(g.a, g.a_scale_inv, g.a_layout), dequantize(g.b, g.b_scale_inv, g.b_layout).t()};
}

}  // namespace

at::Tensor emulated_fp8_gemm(const Fp8GemmArgs& g, at::ScalarType out_dtype, const std::optional<at::Tensor>& bias) {
  const at::NoTF32Guard fp32_products;  // what the contract says, whatever torch's TF32 settings
  // Nor autocast's, which a layer's forward may run under: it would run the mm in fp16 or bf16.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto [a, bt] = dequantized_operands(g);
  at::Tensor out =
      cpu_sum_in_float64(g) ? at::mm(a.to(at::kDouble), bt.to(at::kDouble)).to(at::kFloat) : at::mm(a, bt);
  // The bias (in out_dtype, as cuBLASLt's bias epilogue and torch._scaled_mm take it) joins the fp32 product
  // before the one rounding to out_dtype.
  if (bias.has_value() && bias->defined()) out.add_(bias_for_fp32_sum(*bias, out_dtype));
  return out.to(out_dtype);
}

void emulated_fp8_gemm_accum_(const at::Tensor& out, const Fp8GemmArgs& g) {
  const at::NoTF32Guard fp32_products;
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto [a, bt] = dequantized_operands(g);
  if (cpu_sum_in_float64(g)) {
    // out + the product, summed in float64 and rounded once, as addmm_ with beta = 1 rounds once.
    out.copy_(at::addmm(out.to(at::kDouble), a.to(at::kDouble), bt.to(at::kDouble)));
  } else {
    out.addmm_(a, bt);
  }
}

}  // namespace mixprec::detail
