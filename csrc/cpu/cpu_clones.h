// PSI_CPU_CLONES: compile a CPU loop twice, for AVX2+FMA (haswell) and the baseline, and pick
// one at load time (an ifunc). Baseline SSE2 vectors do 4 lanes without FMA, and the reductions
// then cost as much as the memory traffic; an AVX-512 build measured slower on 2 threads here.
#pragma once

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define PSI_CPU_CLONES \
  __attribute__((target_clones("arch=haswell", "default")))
#else
#define PSI_CPU_CLONES
#endif

#include <ATen/ATen.h>

namespace psi {
// state_steps += 1 on the CPU: the steps are checked float32 one-element CPU tensors, so the
// increment is a store (a Tensor::add_ per tensor costs ~1-2 us of dispatch each: ~0.3 ms a
// step on a ResNet-50 list).
inline void increment_steps_cpu(at::TensorList steps) {
  for (const at::Tensor& s : steps) {
    *s.data_ptr<float>() += 1.0f;
    s.unsafeGetTensorImpl()->bump_version();
  }
}
}  // namespace psi
