// The CUDA execution model on the host: what csrc/cuda/*.cu needs in order to compile as C++ and
// run on the CPU (the emulation build, PSI_CUDA_EMULATION; see docs/EMULATOR.md).
//
//   * A launch runs its blocks one after another (forward, reverse or a seeded random order).
//     Every thread of a block is a fiber with its own stack (mmap'ed, with a guard page); a
//     thread runs until it reaches __syncthreads(), a warp collective or its end, then the next
//     thread of the schedule runs. A barrier releases when every live thread of the block waits
//     at the same __syncthreads() call; reaching it after other threads exited, or at different
//     call sites, is reported as an error.
//   * __shared__ variables are declared with PSI_SHARED(type, name) (arrays: PSI_SHARED(T[N],
//     name)): one static object per
//     kernel, filled with 0xFF bytes (NaN for floating point) at the start of every block, so a
//     block that reads what it did not write reads poison; the bytes are recorded per launch.
//   * Warp collectives (__shfl_*_sync, __ballot_sync, __syncwarp) wait for every lane of their
//     mask; a lane outside its own mask, a mask naming a lane that does not exist or has exited,
//     and lanes waiting with different masks are errors.
//   * Launches are checked against the limits of real GPUs (block <= 1024 threads, grid.y/z <=
//     65535, shared memory <= 48 KiB), logged, and queued on the emulated stream with their
//     arguments copied; the stream runs at the end of the op (or at a synchronize), after the
//     host code has returned: memory the host frees stays valid until then (as the stream-ordered
//     caching allocator keeps it), pinned host blocks are poisoned when freed unless a queued copy
//     still reads them.
// Errors in device code end the block and raise a c10::Error naming kernel, block and thread.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

namespace psi {
namespace emu {

// ---- what device code sees ---------------------------------------------------------------------

// The running thread's indices (set by the scheduler at every switch).
extern uint3 g_thread_idx, g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

// Linear index of the running thread in its block (x fastest, as CUDA numbers warps).
inline unsigned linear_tid() {
  return g_thread_idx.x + g_block_dim.x * (g_thread_idx.y + g_block_dim.y * g_thread_idx.z);
}
inline unsigned block_threads() { return g_block_dim.x * g_block_dim.y * g_block_dim.z; }

// Ends the running thread's block with an error (never returns to the caller).
[[noreturn]] void device_fail(const std::string& what);

// __syncthreads() at file:line: waits until every live thread of the block is there.
void syncthreads(const char* file, int line);

template <typename T>
using shared_type = T;

// Registers a __shared__ object of the running kernel; poisons it once per block.
void shared_var(void* p, size_t bytes);

// Warp collectives. `op` selects the exchange; values travel as up to 64 bytes (cub shuffles
// larger types word by word; one exchange of the whole value is the same result).
enum WarpOp : int { kSyncWarp, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot };
void warp_collective(unsigned mask, WarpOp op, int arg, int width, const void* in, size_t bytes,
                     void* out);

template <typename T>
T shfl(WarpOp op, unsigned mask, T v, int arg, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 64, "shfl of this type");
  T out;
  warp_collective(mask, op, arg, width, &v, sizeof(T), &out);
  return out;
}

// Fills an object with 0xFF bytes: NaN for float and double, -1 for integers.
template <typename T>
void poison(T& x) {
  static_assert(std::is_trivially_copyable_v<T>, "poison of this type");
  std::memset(static_cast<void*>(&x), 0xFF, sizeof(T));
}

// ---- the host side (used by csrc/cuda/device_api.cuh) ------------------------------------------

struct Stream;
Stream* current_stream();
bool is_capturing(Stream* s);

// Launch: checks the configuration, logs it, queues `task` (which runs every block) on `s`.
struct LaunchRecord {
  std::string kernel;
  dim3 grid, block;
  size_t shared_bytes;  // static (PSI_SHARED, measured while running) + dynamic
};
void enqueue_launch(Stream* s, const char* name, dim3 grid, dim3 block, size_t dynamic_smem,
                    std::function<void()> body);

// Queues host work that stands for a stream-ordered device operation (a copy_ between device
// tensors): it runs in stream order with the kernels.
void enqueue_task(Stream* s, std::function<void()> task);

// Pinned host buffer of `bytes` (a CPU tensor of int64 words) from the emulated caching host
// allocator; an error under capture, as cudaHostAlloc is.
at::Tensor pinned_empty_words(int64_t n, Stream* s);
// Queues the copy of `src` (pinned) into `dst` on `s`; records the use of src's block.
void copy_async(const at::Tensor& dst, const at::Tensor& src, Stream* s);

// The op entry: serializes emulated ops, swaps in the stream-ordered allocator, clears the launch
// log, runs the op's host code, then the stream.
class OpScope {
 public:
  OpScope();
  ~OpScope();
  void finish();  // runs the stream (throws what a kernel threw)
 private:
  bool finished_ = false;
};

template <auto F>
struct OpEntry;
template <typename R, typename... A, R (*F)(A...)>
struct OpEntry<F> {
  static R call(A... a) {
    OpScope scope;
    if constexpr (std::is_void_v<R>) {
      F(std::forward<A>(a)...);
      scope.finish();
    } else {
      R result = F(std::forward<A>(a)...);
      scope.finish();  // the kernels that write `result` run here
      return result;
    }
  }
};

// Controls (psi_cuda.emulated).
enum class Order : int { kForward = 0, kReverse = 1, kRandom = 2 };
void set_schedule(Order order, uint64_t seed);
void set_capture(bool on);
const std::vector<LaunchRecord>& launch_log();
int64_t host_copies();  // host-to-device copies (table uploads) queued by the last op
int64_t device_allocations();  // device tensors the last op allocated (host code and kernels)

// Runs one grid: every block of `grid` with `block` threads executing `body`. Returns the largest
// static shared memory any block registered.
size_t run_grid(const char* name, dim3 grid, dim3 block, const std::function<void()>& body);

}  // namespace emu
}  // namespace psi

// ---- CUDA's names, after every system header (they would otherwise rewrite attributes) ---------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// Use PSI_SHARED(type, name): a plain __shared__ would be a per-thread local here.
#define __shared__ __shared__is_not_emulated_use_PSI_SHARED
// PSI_SHARED(float[256], buf): arrays are written as the type (shared_type makes that legal).
#define PSI_SHARED(type, name)                       \
  static ::psi::emu::shared_type<type> name;         \
  ::psi::emu::shared_var(&name, sizeof(name))

#define threadIdx (::psi::emu::g_thread_idx)
#define blockIdx (::psi::emu::g_block_idx)
#define blockDim (::psi::emu::g_block_dim)
#define gridDim (::psi::emu::g_grid_dim)
#define warpSize 32

// The call site identifies the barrier (a return address would not: the compiler may duplicate a
// call into two branches).
#define __syncthreads() ::psi::emu::syncthreads(__FILE__, __LINE__)
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::psi::emu::warp_collective(mask, ::psi::emu::kSyncWarp, 0, 32, nullptr, 0, nullptr);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::psi::emu::shfl(::psi::emu::kShflIdx, mask, v, src, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::psi::emu::shfl(::psi::emu::kShflUp, mask, v, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::psi::emu::shfl(::psi::emu::kShflDown, mask, v, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::psi::emu::shfl(::psi::emu::kShflXor, mask, v, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  unsigned out = 0;
  const int p = pred != 0;
  ::psi::emu::warp_collective(mask, ::psi::emu::kBallot, 0, 32, &p, sizeof(p), &out);
  return out;
}
inline unsigned __lanemask_lt() { return (1u << (::psi::emu::linear_tid() % 32)) - 1u; }

// Memory fences order nothing here: the threads of the emulator never run at the same time (the
// memory model is what the emulator cannot show, docs/EMULATOR.md).
inline void __threadfence() {}

// Atomics: the threads of the emulator never run at the same time.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
T __ldg(const T* p) {
  return *p;
}
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
