// The host-to-device copy of the per-call metadata tables of the multi-tensor launches
// (multi_tensor.cuh, bnp_cuda.cu), safe to capture in a CUDA graph and reused across calls, and
// the step bump that advances a call's step counters from its last kernel.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <vector>

#include "device_api.cuh"

namespace psi {
namespace {

// Table words carried by value in the arguments of one write_table_kernel launch: 480 * 8 =
// 3840 bytes, plus a pointer and a count, under the 4 KB limit on kernel parameters.
constexpr int kTableWordsPerLaunch = 480;
struct TableWords {
  int64_t w[kTableWordsPerLaunch];
};

__global__ void write_table_kernel(const TableWords words, int64_t* dst, int n) {
  for (int i = static_cast<int>(threadIdx.x); i < n; i += static_cast<int>(blockDim.x)) {
    dst[i] = words.w[i];
  }
}

// Tables reused across calls (eager only): a table whose words equal those of one of the last
// kTableCache tables uploaded for the same device and stream is that device copy itself, with no
// upload. A table holds only addresses, sizes and zero words that the kernels leave at zero
// (StepBump's arrivals counter is reset by the block that used it), so equal words make an equal
// table; a new tensor (another address) or any other change makes other words and a new upload.
// Stream order keeps a reused table's earlier readers ahead of its next ones.
constexpr size_t kTableCache = 16;
struct CachedTable {
  int device;
  uintptr_t stream;
  std::vector<int64_t> words;
  at::Tensor table;
};

inline at::Tensor cached_table(const int64_t* words, int64_t n, const at::Device& device,
                               uintptr_t stream, std::mutex& mutex,
                               std::deque<CachedTable>& cache) {
  const std::lock_guard<std::mutex> lock(mutex);
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    if (it->device == device.index() && it->stream == stream &&
        it->words.size() == static_cast<size_t>(n) &&
        std::equal(it->words.begin(), it->words.end(), words)) {
      CachedTable hit = std::move(*it);  // most recent first
      cache.erase(it);
      cache.push_front(std::move(hit));
      return cache.front().table;
    }
  }
  return at::Tensor();
}

// A device tensor holding the `n` int64 `words`, written in stream order on `stream` (or an
// earlier call's copy of the same words); the host does not wait.
//
// Eager: one copy from a pinned host buffer (copy_ records the pinned block's use on the stream,
// so the caching host allocator does not reuse it before the copy has run).
// Under CUDA graph capture that copy would become a graph node reading the pinned block at every
// replay, long after the allocator has handed the block to someone else. Instead the words
// travel by value in the arguments of write_table_kernel launches (480 words each), which the
// graph stores in its nodes: every replay writes the same table again, before the kernels that
// read it (stream order). The device buffer comes from the graph's private memory pool; a later
// allocation of the capture that reuses it is ordered after those readers on the stream, and
// each replay rewrites the table before reading it.
inline at::Tensor upload_words(const int64_t* words, int64_t n, const at::Device& device,
                               dev::Stream stream) {
  const auto new_table = [&] {
    return at::empty({std::max<int64_t>(n, 1)},
                     at::TensorOptions().dtype(at::kLong).device(device));
  };
  if (n == 0) return new_table();
  if (dev::is_capturing(stream)) {
    at::Tensor dev = new_table();
    int64_t* dst = dev.data_ptr<int64_t>();
    for (int64_t begin = 0; begin < n; begin += kTableWordsPerLaunch) {
      const int64_t len = std::min<int64_t>(kTableWordsPerLaunch, n - begin);
      TableWords block{};
      std::memcpy(block.w, words + begin, static_cast<size_t>(len) * sizeof(int64_t));
      PSI_LAUNCH(write_table_kernel, 1, 128, 0, stream, block, dst + begin, static_cast<int>(len));
    }
    return dev;
  }
  // The capture path's kernel must not load for the first time inside a capture (lazy module
  // loading): load it on each device at its first eager upload.
  static std::atomic<uint64_t> loaded{0};
  const uint64_t bit = uint64_t{1} << (std::max<int>(device.index(), 0) % 64);
  if ((loaded.load() & bit) == 0) {
    dev::ensure_loaded(write_table_kernel);
    loaded.fetch_or(bit);
  }
  // Never destroyed: device tensors must not be freed by static destructors at exit, after the
  // allocator may be gone.
  static std::mutex& mutex = *new std::mutex();
  static std::deque<CachedTable>& cache = *new std::deque<CachedTable>();
  const uintptr_t stream_key = reinterpret_cast<uintptr_t>(stream);
  at::Tensor hit = cached_table(words, n, device, stream_key, mutex, cache);
  if (hit.defined()) return hit;
  at::Tensor dev = new_table();
  at::Tensor host = dev::pinned_words(n, stream);
  std::memcpy(host.data_ptr<int64_t>(), words, static_cast<size_t>(n) * sizeof(int64_t));
  dev::copy_to_device_async(dev, host, stream);  // n > 0: dev holds n words
  const std::lock_guard<std::mutex> lock(mutex);
  cache.push_front(CachedTable{device.index(), stream_key, std::vector<int64_t>(words, words + n),
                               dev});
  if (cache.size() > kTableCache) cache.pop_back();
  return dev;
}

// The step counters of a call are advanced by the last block of the call's last kernel, so they
// take no launch of their own. Every block of that kernel, once done with its units (its reads of
// the steps included), counts itself in `arrived`; the block that arrives last has seen every
// other block finish and adds 1 to every step (atomicAdd: a step tensor passed twice is
// incremented twice, as on the CPU). `arrived` is a zero word of the call's table, uploaded with
// it (a CUDA graph replay writes the table again, so it starts at zero there too). With found_inf
// set the kernels return at once: no block arrives and no step moves.
struct StepBump {
  const int64_t* steps = nullptr;  // addresses of the float32 steps; null: not this kernel's job
  int64_t n = 0;
  unsigned long long* arrived = nullptr;
};

// Called by every thread of every block at the end of a kernel (after its grid-stride loop).
__device__ __forceinline__ void bump_steps_when_last(const StepBump& bump) {
  if (bump.steps == nullptr) return;
  PSI_SHARED(int, last);
  __syncthreads();  // every thread of the block is done with its units
  if (threadIdx.x == 0) {
    __threadfence();  // this block's reads and writes come before its arrival
    last = atomicAdd(bump.arrived, 1ull) == static_cast<unsigned long long>(gridDim.x) - 1;
  }
  __syncthreads();
  if (last) {
    __threadfence();  // the other blocks' arrivals come before the increments
    for (int64_t i = threadIdx.x; i < bump.n; i += blockDim.x) {
      atomicAdd(reinterpret_cast<float*>(bump.steps[i]), 1.0f);
    }
    if (threadIdx.x == 0) *bump.arrived = 0;  // the table may serve the next call (cached)
  }
}

}  // namespace
}  // namespace psi
