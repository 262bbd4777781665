// Compiles the loop file named by PSI_CPU_LOOPS twice (see cpu_clones.h): once in namespace
// loops_base for the baseline ISA, once in loops_avx2 under #pragma GCC target("avx2,fma").
// Usage, inside the kernel file's namespace:
//   #define PSI_CPU_LOOPS "bnp_loops.inc"
//   #include "cpu_dispatch_loops.h"
// Meant to be included once per loop file, hence no include guard.
#ifndef PSI_CPU_LOOPS
#error "define PSI_CPU_LOOPS (the loop file) before including cpu_dispatch_loops.h"
#endif
namespace loops_base {
#include PSI_CPU_LOOPS
}  // namespace loops_base
#if PSI_CPU_DISPATCH
PSI_CPU_AVX2_BEGIN
namespace loops_avx2 {
#include PSI_CPU_LOOPS
}  // namespace loops_avx2
PSI_CPU_AVX2_END
#endif
#undef PSI_CPU_LOOPS
