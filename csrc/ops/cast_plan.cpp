#include "ops/cast_plan.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/SymBool.h>
#include <c10/util/Exception.h>

#include "ops/checks.h"
#include "ops/prefetch.h"

namespace mixprec::detail {

namespace {
bool castable(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }
}  // namespace

rounding::Mode parse_rounding(std::string_view rounding, const char* op) {
  if (rounding == "nearest") return rounding::Mode::Nearest;
  if (rounding == "stochastic") return rounding::Mode::Stochastic;
  TORCH_CHECK(false, op, ": rounding must be \"nearest\" or \"stochastic\", got \"", std::string(rounding), "\"");
}

void check_cast_args(const char* op, at::TensorList dst, at::TensorList src) {
  TORCH_CHECK(dst.size() == src.size(), op, ": dst and src must have the same length, got ", dst.size(), " and ",
              src.size());
  if (dst.empty()) return;
  prefetch_tensors(dst);
  prefetch_tensors(src);
  const c10::Device device = src[0].device();
  for (size_t i = 0; i < dst.size(); ++i) {
    const at::Tensor& d = dst[i];
    const at::Tensor& s = src[i];
    // The overlap check and the kernel read every storage: prefetched a few pairs ahead of this check.
    if (i + 4 < dst.size()) {
      prefetch_storage(dst[i + 4]);
      prefetch_storage(src[i + 4]);
    }
    TORCH_CHECK(d.defined() && s.defined(), op, ": dst[", i, "] and src[", i, "] must be tensors");
    TORCH_CHECK(s.layout() == at::kStrided, op, ": src[", i, "] must be a dense tensor, got layout ", s.layout());
    TORCH_CHECK(d.layout() == at::kStrided, op, ": dst[", i, "] must be a dense tensor, got layout ", d.layout());
    TORCH_CHECK(castable(s.scalar_type()), op, ": src[", i, "] must be float32, float16 or bfloat16, got ",
                s.scalar_type());
    TORCH_CHECK(castable(d.scalar_type()), op, ": dst[", i, "] must be float32, float16 or bfloat16, got ",
                d.scalar_type());
    TORCH_CHECK(d.sizes() == s.sizes(), op, ": dst[", i, "] has shape ", d.sizes(), " but src[", i, "] has shape ",
                s.sizes());
    TORCH_CHECK(s.device() == device, op, ": src[", i, "] is on ", s.device(), " but src[0] is on ", device,
                "; every tensor must be on the same device");
    TORCH_CHECK(d.device() == device, op, ": dst[", i, "] is on ", d.device(), " but src[0] is on ", device,
                "; every tensor must be on the same device");
  }
  // The pairs are cast in parallel: no two dst may overlap (nor one have elements that share memory: an
  // expanded view), and a src may overlap no dst but its own pair's, and that one only in full (a cast in
  // place). Refused before anything is written; views of one buffer that do not overlap pass.
  check_read_list(src, dst, check_written_list(dst, op, "dst"), op, "src", "dst");
}

CastPlan::CastPlan(at::TensorList dst, at::TensorList src) : dst_(dst) {
  dst_work_.reserve(dst.size());
  src_work_.reserve(src.size());
  rng_base_.reserve(dst.size());
  for (size_t i = 0; i < dst.size(); ++i) {
    const at::Tensor& d = dst[i];
    const at::Tensor& s = src[i];
    if (d.is_non_overlapping_and_dense()) {
      dst_work_.push_back(d);
    } else {
      dst_work_.push_back(at::empty(d.sizes(), d.options()));  // contiguous; copied into d by finish()
      copy_back_.push_back(i);
    }
    const at::Tensor& w = dst_work_.back();
    if (s.is_non_overlapping_and_dense() && s.strides() == w.strides()) {
      src_work_.push_back(s);
    } else {
      // An exact same-dtype copy laid out like the destination.
      src_work_.push_back(at::empty_strided(w.sizes(), w.strides(), s.options()).copy_(s));
    }
    rng_base_.push_back(rng_elements_);
    rng_elements_ += (static_cast<uint64_t>(d.numel()) + 7) / 8 * 8;
  }
}

void CastPlan::finish() {
  for (size_t i : copy_back_) const_cast<at::Tensor&>(dst_[i]).copy_(dst_work_[i]);
}

at::Tensor empty_cast_output(const at::Tensor& src, at::ScalarType dtype) {
  TORCH_CHECK(castable(dtype), "mixprec::cast: dtype must be float32, float16 or bfloat16, got ", dtype);
  return at::empty_like(src, src.options().dtype(dtype), at::MemoryFormat::Preserve);
}

void check_split_args(const at::Tensor& src) {
  constexpr const char* op = "mixprec::split_bf16_remainder";
  TORCH_CHECK(src.defined() && src.layout() == at::kStrided, op, ": src must be a dense tensor");
  TORCH_CHECK(src.scalar_type() == at::kFloat, op, ": src must be float32, got ", src.scalar_type());
}

void check_merge_args(const at::Tensor& bf16, const at::Tensor& remainder) {
  constexpr const char* op = "mixprec::merge_bf16_remainder";
  TORCH_CHECK(bf16.defined() && bf16.layout() == at::kStrided, op, ": bf16 must be a dense tensor");
  TORCH_CHECK(remainder.defined() && remainder.layout() == at::kStrided, op, ": remainder must be a dense tensor");
  TORCH_CHECK(bf16.scalar_type() == at::kBFloat16, op, ": bf16 must be bfloat16, got ", bf16.scalar_type());
  TORCH_CHECK(remainder.scalar_type() == at::kShort, op, ": remainder must be int16, got ", remainder.scalar_type());
  // Symbolic, per dimension with expect_true: the Meta kernel runs this under dynamic (also data-dependent) shapes.
  const c10::SymIntArrayRef a = bf16.sym_sizes(), b = remainder.sym_sizes();
  TORCH_CHECK(a.size() == b.size(), op, ": bf16 has shape ", a, " but remainder has shape ", b);
  for (size_t d = 0; d < a.size(); ++d) {
    TORCH_SYM_CHECK(a[d].sym_eq(b[d]), op, ": bf16 has shape ", a, " but remainder has shape ", b);
  }
  TORCH_CHECK(bf16.device() == remainder.device(), op, ": bf16 is on ", bf16.device(), " but remainder is on ",
              remainder.device());
}

}  // namespace mixprec::detail
