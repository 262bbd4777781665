// The host-to-device copy of the per-call metadata tables of the multi-tensor launches
// (multi_tensor.cuh, bnp_cuda.cu), safe to capture in a CUDA graph.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

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

// A new device tensor holding the `n` int64 `words`, written in stream order on `stream`; the
// host does not wait.
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
  at::Tensor dev = at::empty({std::max<int64_t>(n, 1)},
                             at::TensorOptions().dtype(at::kLong).device(device));
  if (n == 0) return dev;
  if (dev::is_capturing(stream)) {
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
  at::Tensor host = dev::pinned_words(n, stream);
  std::memcpy(host.data_ptr<int64_t>(), words, static_cast<size_t>(n) * sizeof(int64_t));
  dev::copy_to_device_async(dev, host, stream);  // n > 0: dev holds n words
  return dev;
}

}  // namespace
}  // namespace psi
