// Autograd and ADInplaceOrView kernels for mixprec's non-differentiable ops that write into lists of tensors
// or into tensors (cast_, unscale_and_check_(_sumsq_), adam_step_, record_overflow_, update_scale_,
// fp8_update_scales_, fp8_gemm_accum_, linear_wgrad_accum_). Without them a custom op goes through
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

using T = const at::Tensor&;

struct RecordOverflowName {
  static constexpr const char* value = "mixprec::record_overflow_";
};
using RecordOverflow = Inplace<RecordOverflowName, void(T, T, T, T, int64_t, int64_t, OptTensor)>;

struct UpdateScaleName {
  static constexpr const char* value = "mixprec::update_scale_";
};
using UpdateScale =
    Inplace<UpdateScaleName, void(T, T, T, T, double, double, int64_t, int64_t, double, std::optional<double>, bool)>;

struct Fp8UpdateScalesName {
  static constexpr const char* value = "mixprec::fp8_update_scales_";
};
using Fp8UpdateScales =
    Inplace<Fp8UpdateScalesName, void(T, T, T, at::ScalarType, c10::string_view, int64_t, bool, OptTensor, int64_t, bool)>;

struct Fp8GemmAccumName {
  static constexpr const char* value = "mixprec::fp8_gemm_accum_";
};
using Fp8GemmAccum = Inplace<Fp8GemmAccumName, void(T, T, T, T, T)>;

struct WgradAccumName {
  static constexpr const char* value = "mixprec::linear_wgrad_accum_";
};
using WgradAccum = Inplace<WgradAccumName, void(T, T, T)>;

}  // namespace

// One list, so that the two dispatch keys cannot drift apart.
#define MIXPREC_INPLACE_OPS(X)                 \
  X("cast_", Cast)                             \
  X("unscale_and_check_", Unscale)             \
  X("unscale_and_check_sumsq_", UnscaleSumsq)  \
  X("adam_step_", Adam)                        \
  X("record_overflow_", RecordOverflow)        \
  X("update_scale_", UpdateScale)              \
  X("fp8_update_scales_", Fp8UpdateScales)     \
  X("fp8_gemm_accum_", Fp8GemmAccum)           \
  X("linear_wgrad_accum_", WgradAccum)

TORCH_LIBRARY_IMPL(mixprec, Autograd, m) {
#define MIXPREC_AUTOGRAD(name, Op) m.impl(name, TORCH_FN(Op::autograd));
  MIXPREC_INPLACE_OPS(MIXPREC_AUTOGRAD)
#undef MIXPREC_AUTOGRAD
}

TORCH_LIBRARY_IMPL(mixprec, ADInplaceOrView, m) {
#define MIXPREC_INPLACE_OR_VIEW(name, Op) m.impl(name, TORCH_FN(Op::inplace_or_view));
  MIXPREC_INPLACE_OPS(MIXPREC_INPLACE_OR_VIEW)
#undef MIXPREC_INPLACE_OR_VIEW
}

}  // namespace mixprec
