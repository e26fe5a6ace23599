// Autograd-key kernels for mixprec's non-differentiable list ops that write in place. Without one, a custom
// op goes through torch's boxed autograd fallback: every tensor of both lists is boxed into IValues and
// unboxed again, and each copy's reference count change may take the GIL from a thread that released it.
// For cast_ of 148 small tensors that was most of the call's host time. These kernels do what the fallback
// did for these ops (nothing differentiable: run the op below autograd) plus what torch's in-place ops do
// and the fallthrough ADInplaceOrView key does not: advance the version counters of what was written.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>

namespace mixprec {
namespace {

void cast__autograd(c10::DispatchKeySet keys, at::TensorList dst, at::TensorList src, c10::string_view rounding,
                    bool saturate, std::optional<int64_t> seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mixprec::cast_", "")
                             .typed<void(at::TensorList, at::TensorList, c10::string_view, bool, std::optional<int64_t>)>();
  {
    // The kernels below autograd see the same tensors; nothing here records a graph.
    c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset_with_ADInplaceOrView);
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, dst, src, rounding, saturate, seed);
  }
  for (const at::Tensor& d : dst) d.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, Autograd, m) { m.impl("cast_", TORCH_FN(cast__autograd)); }

}  // namespace mixprec
