// The psi_cuda_emu library: the psi_cuda op schemas (op_schemas.h), implemented by the emulated
// CUDA kernels (csrc/emu/*_emu.cpp compile csrc/cuda/*.cu as C++), and the emulator's controls.
// Python: psi_cuda/emulated.py.
#include <torch/library.h>

#include <sstream>
#include <string>

#ifdef PSI_CUDA_PYTHON_MODULE
#include <Python.h>
#endif

#include "../op_schemas.h"
#include "emu.h"  // last: it defines CUDA's keywords

#ifdef PSI_CUDA_PYTHON_MODULE

// `import psi_cuda._emu` loads this library, which registers the psi_cuda_emu ops.
extern "C" {
PyObject* PyInit__emu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_emu", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

namespace {

void set_schedule(int64_t order, int64_t seed) {
  TORCH_CHECK(order >= 0 && order <= 2, "schedule order must be 0 (forward), 1 (reverse) or 2 "
              "(random); got ", order);
  psi::emu::set_schedule(static_cast<psi::emu::Order>(order), static_cast<uint64_t>(seed));
}

void set_capture(bool on) { psi::emu::set_capture(on); }

// One line per launch of the last op: kernel name, grid, block, shared bytes (tab-separated).
std::string launches() {
  std::ostringstream s;
  for (const auto& r : psi::emu::launch_log()) {
    s << r.kernel << '\t' << r.grid.x << ',' << r.grid.y << ',' << r.grid.z << '\t' << r.block.x
      << ',' << r.block.y << ',' << r.block.z << '\t' << r.shared_bytes << '\n';
  }
  return s.str();
}

}  // namespace

TORCH_LIBRARY(psi_cuda_emu, m) {
  psi::define_ops(m);
  m.def("_set_schedule(int order, int seed) -> ()", &set_schedule);
  m.def("_set_capture(bool on) -> ()", &set_capture);
  m.def("_launches() -> str", &launches);
  m.def("_host_copies() -> int", []() -> int64_t { return psi::emu::host_copies(); });
  m.def("_device_allocations() -> int",
        []() -> int64_t { return psi::emu::device_allocations(); });
}
