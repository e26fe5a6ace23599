#include "ops/fp8_plan.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <string>
#include <string_view>

#include "ops/cast_plan.h"
#include "ops/checks.h"

namespace mixprec::detail {

namespace {

constexpr int64_t kMaxMargin = 32;

void check_dense_float_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.defined(), op, ": input must be a tensor, got an undefined tensor");
  TORCH_CHECK(input.layout() == at::kStrided, op, ": input must be a dense (strided) tensor, got layout ",
              input.layout());
  const at::ScalarType t = input.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": input must be float32, float16 or bfloat16, got ", t);
}

void check_margin(int64_t margin, const char* op) {
  TORCH_CHECK_VALUE(margin >= 0 && margin <= kMaxMargin, op, ": margin must be in [0, ", kMaxMargin,
                    "] (the scale is divided by 2^margin), got ", margin);
}

Fp8Input matrix_view(const at::Tensor& input, fp8::Format format, rounding::Mode mode) {
  Fp8Input in{input.contiguous(), 1, 1, format, mode};
  if (input.dim() > 0) {
    in.cols = input.size(-1);
    for (int64_t d = 0; d + 1 < input.dim(); ++d) in.rows *= input.size(d);
  }
  return in;
}

}  // namespace

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
  TORCH_CHECK_VALUE(block_rows == -1 || block_rows >= 1, op,
                    ": block_rows must be positive or -1 (all rows in one block), got ", block_rows);
  TORCH_CHECK_VALUE(block_cols == -1 || block_cols >= 1, op,
                    ": block_cols must be positive or -1 (all columns in one block), got ", block_cols);
  check_margin(margin, op);
  Fp8Input in = matrix_view(input, format, mode);
  // A whole-extent block of an empty extent is still one (empty) block: the scale exists, and is 1.
  blocks.block_rows = block_rows == -1 ? std::max<int64_t>(in.rows, 1) : block_rows;
  blocks.block_cols = block_cols == -1 ? std::max<int64_t>(in.cols, 1) : block_cols;
  blocks.grid_rows = block_rows == -1 ? 1 : (in.rows + blocks.block_rows - 1) / blocks.block_rows;
  blocks.grid_cols = block_cols == -1 ? 1 : (in.cols + blocks.block_cols - 1) / blocks.block_cols;
  return in;
}

AmaxAlgo check_fp8_update_scales(const at::Tensor& amax_history, const at::Tensor& scale,
                                 const at::Tensor& scale_inv, at::ScalarType dtype, c10::string_view algo,
                                 int64_t margin) {
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
  return a == "max" ? AmaxAlgo::Max : AmaxAlgo::MostRecent;
}

}  // namespace mixprec::detail
