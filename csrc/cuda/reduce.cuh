// Block and warp reductions of the kernels: cub's BlockReduce / WarpReduce under nvcc, and the
// emulator's implementation of the same contract otherwise (cub's device code is inline PTX).
//
// The contract, as cub's: Reduce/Sum return the aggregate in thread 0 (lane 0) only; temp storage
// may be reused only after a __syncthreads() (__syncwarp()) that follows the call. The emulated
// version runs cub's default algorithm (BLOCK_REDUCE_WARP_REDUCTIONS: warp shuffles, per-warp
// aggregates in shared memory, one barrier; same order of additions, same storage), returns
// poison (NaN bytes) to every thread but thread 0 and has no trailing barrier, so a kernel that
// reads the aggregate elsewhere or reuses the storage too early fails the emulated tests.
#pragma once

#include "device_api.cuh"

#if !defined(PSI_CUDA_EMULATION)
#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>

namespace psi {
template <typename T, int kBlockThreads>
using BlockReduce = cub::BlockReduce<T, kBlockThreads>;
template <typename T>
using WarpReduce = cub::WarpReduce<T>;
}  // namespace psi

#else

namespace psi {
namespace emu_reduce {

struct Plus {
  template <typename T>
  T operator()(const T& a, const T& b) const {
    return a + b;
  }
};

// cub's WarpReduceShfl on a full warp: v = op(v, shfl_down(v, offset)) for offsets 1, 2, 4, 8,
// 16; lane 0 ends with the aggregate.
template <typename T, typename Op>
T warp_shuffle_reduce(T v, Op op) {
  const unsigned lane = emu::linear_tid() % 32;
  for (unsigned offset = 1; offset < 32; offset *= 2) {
    const T other = __shfl_down_sync(0xffffffffu, v, offset);
    if (lane + offset < 32) v = op(v, other);
  }
  return v;
}

}  // namespace emu_reduce

// cub's BLOCK_REDUCE_WARP_REDUCTIONS: a shuffle reduction in every warp, lane 0 of each warp
// stores its aggregate, a barrier, thread 0 adds the aggregates in warp order.
template <typename T, int kBlockThreads>
class BlockReduce {
  static_assert(kBlockThreads % 32 == 0, "emulated BlockReduce: whole warps only");
  static constexpr int kWarps = kBlockThreads / 32;

 public:
  struct TempStorage {
    T warp_aggregates[kWarps];
  };

  explicit BlockReduce(TempStorage& temp) : temp_(temp) {}

  template <typename Op>
  T Reduce(T value, Op op) {
    if (emu::block_threads() != kBlockThreads) {
      emu::device_fail("BlockReduce for " + std::to_string(kBlockThreads) +
                       " threads used in a block of " + std::to_string(emu::block_threads()));
    }
    const unsigned tid = emu::linear_tid();
    const T warp_aggregate = emu_reduce::warp_shuffle_reduce(value, op);
    if (tid % 32 == 0) temp_.warp_aggregates[tid / 32] = warp_aggregate;
    __syncthreads();
    T result;
    if (tid == 0) {
      result = temp_.warp_aggregates[0];
      for (int w = 1; w < kWarps; ++w) result = op(result, temp_.warp_aggregates[w]);
    } else {
      emu::poison(result);
    }
    return result;
  }

  T Sum(T value) { return Reduce(value, emu_reduce::Plus()); }

 private:
  TempStorage& temp_;
};

// A full warp (32 lanes) reduction by shuffles; the aggregate is valid in lane 0.
template <typename T>
class WarpReduce {
 public:
  struct TempStorage {};  // cub's shuffle reduction keeps nothing in shared memory

  explicit WarpReduce(TempStorage&) {}

  template <typename Op>
  T Reduce(T value, Op op) {
    T result = emu_reduce::warp_shuffle_reduce(value, op);
    if (emu::linear_tid() % 32 != 0) emu::poison(result);
    return result;
  }

  T Sum(T value) { return Reduce(value, emu_reduce::Plus()); }
};

}  // namespace psi

#endif
