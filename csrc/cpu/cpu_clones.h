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
