// The Python extension module mixprec._C. The ops live in libmixprec and register themselves with the
// dispatcher when it loads; importing this module is what loads it (the module is linked against it,
// and the calls below keep that link). Python-only glue goes here; CMake never builds this file.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <string>
#include <vector>

#include "mixprec/ops.h"
#include "mixprec/version.h"

namespace {

namespace py = pybind11;

// A Python list or tuple of tensors as an at::TensorList whose handles borrow the tensors: no reference
// count changes per tensor (with torch's Python-object ownership each dropped reference can take the
// interpreter's slow path). A tuple copy of the sequence keeps every tensor alive for the call.
class BorrowedTensors {
 public:
  BorrowedTensors(py::handle sequence, const char* name) : items_(py::reinterpret_steal<py::tuple>(
                                                                PySequence_Tuple(sequence.ptr()))) {
    if (!items_) throw py::error_already_set();
    tensors_.reserve(items_.size());
    for (size_t i = 0; i < items_.size(); ++i) {
      PyObject* item = PyTuple_GET_ITEM(items_.ptr(), static_cast<Py_ssize_t>(i));
      if (!THPVariable_Check(item)) {
        release();
        throw py::type_error(std::string(name) + "[" + std::to_string(i) + "] must be a Tensor, got " +
                             Py_TYPE(item)->tp_name);
      }
      tensors_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(THPVariable_Unpack(item)));
    }
  }
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  ~BorrowedTensors() { release(); }

  at::TensorList list() const { return tensors_; }
  int64_t elements() const {
    int64_t n = 0;
    for (const at::Tensor& t : tensors_) n += t.numel();
    return n;
  }

 private:
  void release() {
    for (at::Tensor& t : tensors_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
    tensors_.clear();
  }
  py::tuple items_;
  std::vector<at::Tensor> tensors_;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mixprec's native module (loads libmixprec).";
  m.def("version", [] { return std::string(mixprec::version()); },
        "The version of the libmixprec this module is linked against.");
  m.def("built_with_cuda", [] { return mixprec::built_with_cuda(); },
        "True when libmixprec was built with CUDA kernels.");
  // The eager fast path of mixprec.ops.cast_: the same op through the dispatcher (typed, so fake tensors,
  // __torch_dispatch__ modes and the op's checks still apply), without torch.ops' conversion of two tensor
  // lists into IValues and back, which was most of the call's host time for 148 small tensors. Python
  // falls back to torch.ops under torch.compile and __torch_function__ overrides.
  m.def(
      "cast_",
      [](py::handle dst, py::handle src, const std::string& rounding, bool saturate, std::optional<int64_t> seed) {
        const BorrowedTensors d(dst, "dst"), s(src, "src");
        // Other Python threads (data loading, checkpoint writers) run while a large cast does, as with
        // torch's bindings. A small one keeps the GIL: each tensor handle the op copies then goes through
        // torch's Python-object reference path without taking the GIL back, which costs more than it runs.
        if (s.elements() >= (int64_t{1} << 20)) {
          py::gil_scoped_release no_gil;
          mixprec::ops::cast_(d.list(), s.list(), rounding, saturate, seed);
        } else {
          mixprec::ops::cast_(d.list(), s.list(), rounding, saturate, seed);
        }
      },
      py::arg("dst"), py::arg("src"), py::arg("rounding"), py::arg("saturate"), py::arg("seed"));
}
