// Schemas of all psi_cuda ops. Implementations: csrc/cpu/*.cpp (CPU), csrc/cuda/*.cu (CUDA);
// fake (meta) implementations for torch.compile: psi_cuda/ops.py.
#include <torch/library.h>

#include "op_schemas.h"

#ifdef PSI_CUDA_PYTHON_MODULE
#include <Python.h>

// `import psi_cuda._C` loads this library, which registers the ops with the dispatcher.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

TORCH_LIBRARY(psi_cuda, m) { psi::define_ops(m); }
