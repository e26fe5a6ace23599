// The Python extension module mixprec._C. The ops live in libmixprec and register themselves with the
// dispatcher when it loads; importing this module is what loads it (the module is linked against it,
// and the calls below keep that link). Python-only glue goes here; CMake never builds this file.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/api/object.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <vector>

#include "grad_scaler_class.h"
#include "optim/adam_core_class.h"
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

using mixprec::detail::AdamCoreClass;
using mixprec::detail::GradScalerClass;
using Scaler = c10::intrusive_ptr<GradScalerClass>;

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

  // The calls mixprec.GradScaler makes every iteration, on the same C++ scaler as its
  // torch.classes.mixprec.GradScaler object: TorchScript's method dispatch costs about 2.5 us a call warm, and
  // about 40 us for the first call after a forward and backward pass have evicted it from the caches; a pybind
  // call costs a tenth of either. Errors and warnings reach Python as from torch's own bindings.
  py::class_<GradScalerClass, Scaler>(m, "GradScalerHandle")
      .def(py::init([](const torch::jit::Object& object) {
             return mixprec::detail::grad_scaler_of(c10::IValue(object._ivalue()));
           }),
           py::arg("script_object"))
      .def("has_scale", torch::wrap_pybind_function([](GradScalerClass& s) { return s.impl.has_scale(); }))
      .def("scale", torch::wrap_pybind_function([](GradScalerClass& s, const at::Tensor& t) { return s.impl.scale(t); }))
      // With a process group the check ends in a collective, which waits for the other ranks: without the GIL,
      // as torch.distributed's own bindings wait (this process's other Python threads keep running).
      .def("unscale_params_", torch::wrap_pybind_function([](GradScalerClass& s, int64_t key, py::handle params) {
             const BorrowedTensors p(params, "params");
             std::optional<py::gil_scoped_release> no_gil;
             if (s.impl.options().process_group()) no_gil.emplace();
             return mixprec::detail::unscale_params(s.impl, key, p.list());
           }))
      .def("prepare_scaled_step_params",
           torch::wrap_pybind_function([](GradScalerClass& s, int64_t key, py::handle params) {
             using Result = std::tuple<bool, std::optional<at::Tensor>, std::optional<at::Tensor>>;
             const BorrowedTensors p(params, "params");
             std::optional<mixprec::GradScaler::ScaledStep> r;
             {
               std::optional<py::gil_scoped_release> no_gil;
               if (s.impl.options().process_group()) no_gil.emplace();
               r = mixprec::detail::prepare_scaled_step_params(s.impl, key, p.list());
             }
             if (!r.has_value()) return Result(false, std::nullopt, std::nullopt);
             return Result(true, r->grad_scale, r->found_inf);
           }))
      .def("is_unscaled",
           torch::wrap_pybind_function([](GradScalerClass& s, int64_t key) { return s.impl.is_unscaled(key); }))
      .def("found_inf",
           torch::wrap_pybind_function([](GradScalerClass& s, int64_t key) { return s.impl.found_inf(key); }))
      .def("check_not_stepped",
           torch::wrap_pybind_function([](GradScalerClass& s, int64_t key) { s.impl.check_not_stepped(key); }))
      .def("mark_stepped",
           torch::wrap_pybind_function([](GradScalerClass& s, int64_t key) { s.impl.mark_stepped(key); }))
      .def("update", torch::wrap_pybind_function([](GradScalerClass& s) { s.impl.update(); }));

  // mixprec.optim's per-group step on the same core as its torch.classes.mixprec.AdamCore object, for groups
  // of plain tensors (DTensor groups hand over their local shards through torch.classes, once per step).
  py::class_<AdamCoreClass, c10::intrusive_ptr<AdamCoreClass>>(m, "AdamCoreHandle")
      .def(py::init([](const torch::jit::Object& object) {
             return mixprec::detail::adam_core_of(c10::IValue(object._ivalue()));
           }),
           py::arg("script_object"))
      .def("step_group",
           torch::wrap_pybind_function([](AdamCoreClass& core, int64_t group, py::handle params, double lr,
                                          std::optional<at::Tensor> lr_tensor, double beta1, double beta2, double eps,
                                          double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                                          const std::string& master_weights, at::ScalarType moment_dtype,
                                          const std::string& rounding, std::optional<int64_t> seed, int64_t rng_calls,
                                          std::optional<at::Tensor> grad_scale, std::optional<at::Tensor> found_inf) {
             const BorrowedTensors p(params, "params");
             return core.step_group(group, p.list(), std::nullopt, std::nullopt, lr, lr_tensor, beta1, beta2, eps,
                                    weight_decay, decoupled, amsgrad, maximize, master_weights, moment_dtype, rounding,
                                    seed, rng_calls, grad_scale, found_inf, 0);
           }));
}
