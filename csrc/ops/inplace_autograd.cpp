// Autograd and ADInplaceOrView kernels for mixprec's non-differentiable ops that write into lists of tensors
// (cast_, unscale_and_check_, unscale_and_check_sumsq_, adam_step_). Without them a custom op goes through
// torch's boxed fallbacks: every tensor of every list is boxed into IValues and unboxed again (for cast_ of
// 148 small tensors, most of the call's host time), and the fallthrough ADInplaceOrView key never advances
// the version counters of what was written. As for torch's in-place ops: the Autograd kernel refuses to
// write, under grad mode, into a tensor that requires grad; the ADInplaceOrView kernel (which also runs
// under inference mode) advances the version counter of every tensor the schema marks as written.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <cstddef>
#include <optional>
#include <utility>
#include <vector>

namespace mixprec {
namespace {

// Visitors over one argument of any type the schemas use.
void bump(const at::Tensor& t) {
  if (t.defined()) torch::autograd::increment_version(t);
}
void bump(const std::optional<at::Tensor>& t) {
  if (t.has_value()) bump(*t);
}
void bump(at::TensorList list) {
  for (const at::Tensor& t : list) bump(t);
}
void bump(const std::optional<at::TensorList>& list) {
  if (list.has_value()) bump(*list);
}
template <typename T>
void bump(const T&) {}

// The first written tensor that requires grad, as its position in the list (or 0), if any.
std::optional<size_t> requiring_grad(const at::Tensor& t) {
  return t.defined() && t.requires_grad() ? std::optional<size_t>(0) : std::nullopt;
}
std::optional<size_t> requiring_grad(const std::optional<at::Tensor>& t) {
  return t.has_value() ? requiring_grad(*t) : std::nullopt;
}
std::optional<size_t> requiring_grad(at::TensorList list) {
  for (size_t i = 0; i < list.size(); ++i) {
    if (list[i].defined() && list[i].requires_grad()) return i;
  }
  return std::nullopt;
}
std::optional<size_t> requiring_grad(const std::optional<at::TensorList>& list) {
  return list.has_value() ? requiring_grad(*list) : std::nullopt;
}
template <typename T>
std::optional<size_t> requiring_grad(const T&) {
  return std::nullopt;
}

template <typename Name, typename Signature>
struct Inplace;

template <typename Name, typename Ret, typename... Args>
struct Inplace<Name, Ret(Args...)> {
  static const c10::TypedOperatorHandle<Ret(Args...)>& op() {
    static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(Name::value, "").template typed<Ret(Args...)>();
    return handle;
  }
  // Which arguments the schema marks as written (Tensor(a!), Tensor(a!)[], ...).
  static const std::vector<bool>& written() {
    static const std::vector<bool> flags = [] {
      std::vector<bool> out;
      for (const c10::Argument& a : op().schema().arguments()) out.push_back(a.alias_info() && a.alias_info()->isWrite());
      return out;
    }();
    return flags;
  }

  static Ret autograd(c10::DispatchKeySet keys, Args... args) {
    if (c10::GradMode::is_enabled()) {
      size_t index = 0;
      const auto check = [&](const auto& arg) {
        if (written()[index]) {
          const std::optional<size_t> at = requiring_grad(arg);
          TORCH_CHECK(!at.has_value(), Name::value, ": ", op().schema().arguments()[index].name(), "[", at.value_or(0),
                      "] requires grad, and the op is not differentiable: call it under torch.no_grad()");
        }
        ++index;
      };
      (check(args), ...);
    }
    at::AutoDispatchBelowAutograd below;
    return op().redispatch(keys & c10::after_autograd_keyset, args...);
  }

  static Ret inplace_or_view(c10::DispatchKeySet keys, Args... args) {
    const auto bump_written = [&] {
      size_t index = 0;
      ((written()[index++] ? bump(args) : void()), ...);
    };
    if constexpr (std::is_void_v<Ret>) {
      {
        at::AutoDispatchBelowADInplaceOrView below;
        op().redispatch(keys & c10::after_ADInplaceOrView_keyset, args...);
      }
      bump_written();
    } else {
      Ret out = [&] {
        at::AutoDispatchBelowADInplaceOrView below;
        return op().redispatch(keys & c10::after_ADInplaceOrView_keyset, args...);
      }();
      bump_written();
      return out;
    }
  }
};

using OptTensor = const std::optional<at::Tensor>&;

struct CastName {
  static constexpr const char* value = "mixprec::cast_";
};
using Cast = Inplace<CastName, void(at::TensorList, at::TensorList, c10::string_view, bool, std::optional<int64_t>)>;

struct UnscaleName {
  static constexpr const char* value = "mixprec::unscale_and_check_";
};
using Unscale = Inplace<UnscaleName, void(at::TensorList, const at::Tensor&, const at::Tensor&, OptTensor)>;

struct UnscaleSumsqName {
  static constexpr const char* value = "mixprec::unscale_and_check_sumsq_";
};
using UnscaleSumsq =
    Inplace<UnscaleSumsqName, at::Tensor(at::TensorList, const at::Tensor&, const at::Tensor&, OptTensor)>;

struct AdamName {
  static constexpr const char* value = "mixprec::adam_step_";
};
using Adam = Inplace<AdamName, void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                    at::TensorList, double, double, double, double, double, bool, bool,
                                    c10::string_view, c10::string_view, std::optional<int64_t>, OptTensor, OptTensor,
                                    OptTensor, OptTensor, std::optional<at::TensorList>)>;

}  // namespace

TORCH_LIBRARY_IMPL(mixprec, Autograd, m) {
  m.impl("cast_", TORCH_FN(Cast::autograd));
  m.impl("unscale_and_check_", TORCH_FN(Unscale::autograd));
  m.impl("unscale_and_check_sumsq_", TORCH_FN(UnscaleSumsq::autograd));
  m.impl("adam_step_", TORCH_FN(Adam::autograd));
}

TORCH_LIBRARY_IMPL(mixprec, ADInplaceOrView, m) {
  m.impl("cast_", TORCH_FN(Cast::inplace_or_view));
  m.impl("unscale_and_check_", TORCH_FN(Unscale::inplace_or_view));
  m.impl("unscale_and_check_sumsq_", TORCH_FN(UnscaleSumsq::inplace_or_view));
  m.impl("adam_step_", TORCH_FN(Adam::inplace_or_view));
}

}  // namespace mixprec
