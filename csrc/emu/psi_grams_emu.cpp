// The emulation build of csrc/cuda/psi_grams_cuda.cu: the same source, compiled as C++ with
// PSI_CUDA_EMULATION (csrc/emu/emu.h), registered as psi_cuda_emu ops.
#include "../cuda/psi_grams_cuda.cu"
