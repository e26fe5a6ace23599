// The C++ object behind a torch.classes object, checked. Internal.
#pragma once

#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>
#include <torch/custom_class.h>

namespace mixprec::detail {

/// The `T` behind `object`, a torch.classes.mixprec.<name> object; a TypeError for any other object. (Called
/// inside libmixprec, where the class was registered, so the class lookup sees the registering library's type.)
template <class T>
c10::intrusive_ptr<T> custom_class_of(const c10::IValue& object, const char* name) {
  TORCH_CHECK_TYPE(object.isObject() && object.toObjectRef().type() == c10::getCustomClassType<c10::intrusive_ptr<T>>(),
                   "expected a torch.classes.mixprec.", name, ", got ", object.tagKind());
  return object.toCustomClass<T>();
}

}  // namespace mixprec::detail
