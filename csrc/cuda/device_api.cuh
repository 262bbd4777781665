// The device API of the CUDA host code: streams, the device guard, capture status, pinned
// buffers, asynchronous copies, kernel launches and op registration. Two implementations: CUDA
// (nvcc) and the emulator (PSI_CUDA_EMULATION: csrc/cuda/*.cu compiled as C++ and run on the CPU,
// csrc/emu/). Host code in csrc/cuda/ reaches the device only through this file and
// reduce.cuh, so both builds run the same kernels and the same host code.
//
//   PSI_LAUNCH(kernel, grid, block, smem, stream, args...)   kernel<<<grid, block, smem,
//                                                           stream>>>(args...) + launch check
//   PSI_SHARED(type, name)                                 __shared__ type name (arrays: T[N])
//   PSI_CUDA_OPS_IMPL(m) { m.impl("op", PSI_CUDA_OP(fn)); }  registration: the CUDA dispatch key
//                                                           of psi_cuda, or the psi_cuda_emu ops
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <utility>

#if defined(PSI_CUDA_EMULATION)
#include "../emu/emu.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace psi {
namespace dev {

#if defined(PSI_CUDA_EMULATION)

using Stream = emu::Stream*;

class DeviceGuard {
 public:
  explicit DeviceGuard(const at::Device&) {}
};

inline Stream current_stream(const at::Device&) { return emu::current_stream(); }

inline bool is_capturing(Stream s) { return emu::is_capturing(s); }

// Emulated tensors live on the CPU.
inline void check_device(const at::Device& d, const char* op, const char* what) {
  TORCH_CHECK(d.is_cpu(), op, ": the emulated CUDA kernel got ", what, " on ", d);
}

inline at::Tensor pinned_words(int64_t n, Stream s) { return emu::pinned_empty_words(n, s); }

template <typename... P>
void ensure_loaded(void (*)(P...)) {}  // nothing to load

inline void copy_to_device_async(const at::Tensor& dst, const at::Tensor& src_pinned, Stream s) {
  emu::copy_async(dst, src_pinned, s);
}

// dst <- src in stream order (after the kernels launched before it): the copy back of results
// that kernels wrote into a temporary. On the emulated stream it is queued like a launch.
inline void copy_(const at::Tensor& dst, const at::Tensor& src, Stream s) {
  emu::enqueue_task(s, [dst, src]() mutable { dst.copy_(src); });
}

template <typename... P, typename... A>
void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, Stream s,
            A&&... args) {
  // The arguments are converted to the kernel's parameter types now, as a launch copies them.
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  emu::enqueue_launch(s, name, grid, block, smem,
                      [kernel, params] { std::apply(kernel, params); });
}

#define PSI_CUDA_OPS_IMPL(m) TORCH_LIBRARY_IMPL(psi_cuda_emu, CPU, m)
#define PSI_CUDA_OP(fn) (&::psi::emu::OpEntry<&fn>::call)

#else  // CUDA

using Stream = cudaStream_t;

class DeviceGuard {
 public:
  explicit DeviceGuard(const at::Device& d) : guard_(d) {}

 private:
  c10::cuda::CUDAGuard guard_;
};

inline Stream current_stream(const at::Device& d) {
  return c10::cuda::getCurrentCUDAStream(d.index()).stream();
}

// Whether `s` is being captured into a CUDA graph. On the legacy default stream the query fails
// with cudaErrorStreamCaptureImplicit while another thread captures in global mode: that counts
// as capturing (the caller then takes the path that is legal under capture).
inline bool is_capturing(Stream s) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(s, &status);
  if (err == cudaErrorStreamCaptureImplicit) {
    (void)cudaGetLastError();  // clear this thread's last error (not a sticky one)
    return true;
  }
  C10_CUDA_CHECK(err);
  return status != cudaStreamCaptureStatusNone;
}

// Loads `kernel`'s module on the current device now, so that its first launch does not fall
// inside a stream capture under CUDA's lazy module loading.
template <typename... P>
void ensure_loaded(void (*kernel)(P...)) {
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(kernel)));
}

inline void check_device(const at::Device& d, const char* op, const char* what) {
  TORCH_CHECK(d.is_cuda(), op, ": the CUDA kernel got ", what, " on ", d);
}

// A pinned host tensor of n int64 words from torch's caching host allocator.
inline at::Tensor pinned_words(int64_t n, Stream) {
  return at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
}

// dst (device) <- src (pinned host), in stream order on the current stream; the caching host
// allocator records the block's use, so it is not reused before the copy has run.
inline void copy_to_device_async(const at::Tensor& dst, const at::Tensor& src_pinned, Stream) {
  const_cast<at::Tensor&>(dst).copy_(src_pinned, /*non_blocking=*/true);
}

// dst <- src in stream order (a copy on the current stream, after the kernels launched before).
inline void copy_(const at::Tensor& dst, const at::Tensor& src, Stream) {
  const_cast<at::Tensor&>(dst).copy_(src);
}

template <typename... P, typename... A>
void launch(const char*, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, Stream s,
            A&&... args) {
  kernel<<<grid, block, smem, s>>>(std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define PSI_CUDA_OPS_IMPL(m) TORCH_LIBRARY_IMPL(psi_cuda, CUDA, m)
#define PSI_CUDA_OP(fn) (&fn)

template <typename T>
using shared_type = T;
// A __shared__ object; arrays are written as the type: PSI_SHARED(float[256], buf).
#define PSI_SHARED(type, name) __shared__ ::psi::dev::shared_type<type> name

#endif

}  // namespace dev
}  // namespace psi

// `kernel` may be a parenthesized template-id with commas: PSI_LAUNCH((k<a, b>), ...).
#define PSI_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::psi::dev::launch(#kernel, kernel, grid, block, smem, stream, __VA_ARGS__)
