// The per-element loops of the CPU kernels are compiled twice on x86-64 (GCC): for the baseline
// ISA and for AVX2+FMA, and picked at run time by what the CPU supports.
//
// A loop file (*.inc, no includes) is included once in namespace loops_base and once, between
// PSI_CPU_AVX2_BEGIN and PSI_CPU_AVX2_END (#pragma GCC target("avx2,fma")), in namespace
// loops_avx2 (cpu_dispatch_loops.h does both); PSI_CPU_CALL((args), fn) returns the call of the
// one for this CPU. The check is a cached __builtin_cpu_supports, made after the CPU feature
// table is initialised.
//
// Why not target_clones: its ifunc resolvers run during relocation, and with this toolchain
// they read the feature table before it is filled in, so they picked the baseline clone on
// every CPU (measured here: an AVX-512 Xeon ran the SSE2 loops).
#pragma once

#include <ATen/ATen.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PSI_CPU_DISPATCH 1
#define PSI_CPU_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define PSI_CPU_AVX2_END _Pragma("GCC pop_options")
#else
#define PSI_CPU_DISPATCH 0
#endif

namespace psi {

// True when the CPU runs AVX2 and FMA code (computed once).
inline bool cpu_has_avx2_fma() {
#if PSI_CPU_DISPATCH
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

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

#if PSI_CPU_DISPATCH
#define PSI_CPU_CALL(args, ...) \
  return ::psi::cpu_has_avx2_fma() ? loops_avx2::__VA_ARGS__ args : loops_base::__VA_ARGS__ args
#else
#define PSI_CPU_CALL(args, ...) return loops_base::__VA_ARGS__ args
#endif
