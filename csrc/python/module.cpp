// The Python extension module mixprec._C. The ops live in libmixprec and register themselves with the
// dispatcher when it loads; importing this module is what loads it (the module is linked against it,
// and the calls below keep that link). Python-only glue goes here; CMake never builds this file.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "mixprec/version.h"

namespace {

PyObject* py_version(PyObject*, PyObject*) { return PyUnicode_FromString(mixprec::version()); }

PyObject* py_built_with_cuda(PyObject*, PyObject*) { return PyBool_FromLong(mixprec::built_with_cuda()); }

PyMethodDef methods[] = {
    {"version", py_version, METH_NOARGS, "The version of the libmixprec this module is linked against."},
    {"built_with_cuda", py_built_with_cuda, METH_NOARGS, "True when libmixprec was built with CUDA kernels."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mixprec's native module (loads libmixprec).", -1,
                          methods, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module_def); }
