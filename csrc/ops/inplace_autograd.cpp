// Autograd and ADInplaceOrView kernels for cast_, mixprec's non-differentiable list op that writes in place.
// Without them a custom op goes through torch's boxed fallbacks: every tensor of both lists is boxed into
// IValues and unboxed again (for cast_ of 148 small tensors, most of the call's host time), and the
// fallthrough ADInplaceOrView key never advances the version counters of what was written. As for torch's
// in-place ops: the Autograd kernel refuses to write into a tensor autograd tracks, and the ADInplaceOrView
// kernel (which also runs under inference mode) bumps the versions.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <optional>

namespace mixprec {
namespace {

using CastFn = void(at::TensorList, at::TensorList, c10::string_view, bool, std::optional<int64_t>);

const c10::TypedOperatorHandle<CastFn>& cast_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mixprec::cast_", "").typed<CastFn>();
  return op;
}

void cast__autograd(c10::DispatchKeySet keys, at::TensorList dst, at::TensorList src, c10::string_view rounding,
                    bool saturate, std::optional<int64_t> seed) {
  if (c10::GradMode::is_enabled()) {
    for (size_t i = 0; i < dst.size(); ++i) {
      TORCH_CHECK(!dst[i].requires_grad(), "mixprec::cast_: dst[", i, "] requires grad, and cast_ is not "
                  "differentiable: write into it under torch.no_grad() (as when refreshing parameters from masters)");
    }
  }
  at::AutoDispatchBelowAutograd below;
  cast_op().redispatch(keys & c10::after_autograd_keyset, dst, src, rounding, saturate, seed);
}

void cast__inplace_or_view(c10::DispatchKeySet keys, at::TensorList dst, at::TensorList src,
                           c10::string_view rounding, bool saturate, std::optional<int64_t> seed) {
  {
    at::AutoDispatchBelowADInplaceOrView below;
    cast_op().redispatch(keys & c10::after_ADInplaceOrView_keyset, dst, src, rounding, saturate, seed);
  }
  for (const at::Tensor& d : dst) torch::autograd::increment_version(d);
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, Autograd, m) { m.impl("cast_", TORCH_FN(cast__autograd)); }
TORCH_LIBRARY_IMPL(mixprec, ADInplaceOrView, m) { m.impl("cast_", TORCH_FN(cast__inplace_or_view)); }

}  // namespace mixprec
