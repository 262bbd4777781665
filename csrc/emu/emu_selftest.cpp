// Kernels with known defects (and their correct twins), written as CUDA code against the device
// API, to show that the emulator catches each kind of defect it claims to: races between threads
// (schedule-dependent results, poisoned shared memory), divergent barriers, a barrier after some
// threads exited, a reduction's aggregate read outside thread 0, warp collectives with bad
// masks, launches over the limits, and a pinned buffer freed before the copy that reads it.
// Run by tests/test_emulator.py through psi_cuda_emu::_selftest.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include <vector>

// Last: CUDA's keywords (multi_tensor.cuh includes device_api.cuh and reduce.cuh).
#include "../cuda/multi_tensor.cuh"

namespace psi {
namespace {

constexpr int kSelfThreads = 64;

// Thread t reads the element thread t + 1 wrote, with (kSync) or without a barrier between.
template <bool kSync>
__global__ void neighbour_kernel(float* out) {
  PSI_SHARED(float[kSelfThreads], buf);
  const unsigned t = threadIdx.x;
  buf[t] = static_cast<float>(t);
  if (kSync) __syncthreads();
  out[blockIdx.x * kSelfThreads + t] = buf[(t + 1) % kSelfThreads];
}

// Reads shared memory no thread of this block wrote (another block did, earlier).
__global__ void stale_shared_kernel(float* out) {
  PSI_SHARED(float[kSelfThreads], buf);
  const unsigned t = threadIdx.x;
  if (blockIdx.x == 0) buf[t] = 1.0f;
  __syncthreads();
  out[blockIdx.x * kSelfThreads + t] = buf[t];
}

__global__ void divergent_barrier_kernel(float*) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void barrier_after_exit_kernel(float*) {
  if (threadIdx.x == 0) return;
  __syncthreads();
}

// Every thread stores the block sum: only thread 0's is defined (cub's contract).
__global__ void reduce_everywhere_kernel(float* out) {
  using Reduce = BlockReduce<float, kSelfThreads>;
  PSI_SHARED(typename Reduce::TempStorage, temp);
  out[threadIdx.x] = Reduce(temp).Sum(static_cast<float>(threadIdx.x));
}

// Shuffles and ballots of lane values; out[32 * k + lane] for k = 0..4.
__global__ void warp_ops_kernel(float* out) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const float v = static_cast<float>(threadIdx.x);
  out[threadIdx.x * 5 + 0] = __shfl_down_sync(0xffffffffu, v, 3);
  out[threadIdx.x * 5 + 1] = __shfl_up_sync(0xffffffffu, v, 5);
  out[threadIdx.x * 5 + 2] = __shfl_xor_sync(0xffffffffu, v, 7);
  out[threadIdx.x * 5 + 3] = __shfl_sync(0xffffffffu, v, 9, 16);
  out[threadIdx.x * 5 + 4] = static_cast<float>(__ballot_sync(0xffffffffu, lane % 3 == 0));
}

__global__ void lane_outside_mask_kernel(float*) {
  if (threadIdx.x % 32 == 0) __syncwarp(0xfffffffeu);
}

__global__ void mask_names_exited_lane_kernel(float*) {
  if (threadIdx.x % 32 == 31) return;
  __syncwarp(0xffffffffu);
}

__global__ void mismatched_masks_kernel(float*) {
  __syncwarp(threadIdx.x % 32 < 16 ? 0x0000ffffu : 0xffffffffu);
}

// Half of warp 0 waits for the other half, which waits at a block barrier.
__global__ void warp_sync_against_barrier_kernel(float*) {
  if (threadIdx.x < 16) __syncwarp();
  __syncthreads();
}

__global__ void big_shared_kernel(float* out) {
  PSI_SHARED(float[13000], buf);  // 52000 bytes > 48 KiB
  buf[threadIdx.x] = 0.0f;
  out[threadIdx.x] = buf[threadIdx.x];
}

__global__ void copy_words_kernel(const int64_t* src, float* out, int n) {
  for (int i = static_cast<int>(threadIdx.x); i < n; i += static_cast<int>(blockDim.x)) {
    out[i] = static_cast<float>(src[i]);
  }
}

// A table uploaded the right way (dev::copy_to_device_async records the pinned block's use) or
// the wrong way (a raw copy queued on the stream, the block freed before it runs).
void upload_and_read(float* out, int n, bool record_use, dev::Stream s) {
  at::Tensor dev = at::empty({n}, at::TensorOptions().dtype(at::kLong));
  {
    at::Tensor host = dev::pinned_words(n, s);
    for (int i = 0; i < n; ++i) host.data_ptr<int64_t>()[i] = i + 1;
    if (record_use) {
      dev::copy_to_device_async(dev, host, s);
    } else {
      int64_t* d = dev.data_ptr<int64_t>();
      const int64_t* h = host.data_ptr<int64_t>();
      emu::enqueue_task(s, [d, h, n] { std::memcpy(d, h, n * sizeof(int64_t)); });
    }
  }  // host is freed here, before the stream runs
  PSI_LAUNCH(copy_words_kernel, 1, 32, 0, s, dev.const_data_ptr<int64_t>(), out, n);
}

// The index arithmetic of the multi-tensor kernels on sizes past 2^31 elements, without
// allocating them: chunk_of_group and find_tensor (multi_tensor.cuh) as the kernels call them.
std::vector<int64_t> chunk_of_group_at(int64_t group_len, int64_t first_unit, int64_t unit) {
  TensorMeta a{};
  a.group = group_len;
  a.chunks = ceil_div(group_len, kChunk);
  a.first_unit = first_unit;
  const ChunkOfGroup c = chunk_of_group(a, unit);
  return {c.group, c.begin, c.len};
}

int64_t find_tensor_at(const std::vector<int64_t>& first_units, int64_t unit) {
  std::vector<TensorMeta> metas(first_units.size());
  for (size_t i = 0; i < metas.size(); ++i) metas[i].first_unit = first_units[i];
  const TensorMeta& found = find_tensor<&TensorMeta::first_unit>(
      metas.data(), static_cast<int64_t>(metas.size()), unit);
  return &found - metas.data();
}

void selftest(const std::string& name, const at::Tensor& out) {
  TORCH_CHECK(out.is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous(),
              "_selftest: out must be a contiguous float32 CPU tensor");
  float* o = out.data_ptr<float>();
  const dev::Stream s = emu::current_stream();
  const auto need = [&](int64_t n) {
    TORCH_CHECK(out.numel() >= n, "_selftest ", name, ": out needs ", n, " elements");
  };
  if (name == "race") {
    need(2 * kSelfThreads);
    PSI_LAUNCH(neighbour_kernel<false>, 2, kSelfThreads, 0, s, o);
  } else if (name == "synced") {
    need(2 * kSelfThreads);
    PSI_LAUNCH(neighbour_kernel<true>, 2, kSelfThreads, 0, s, o);
  } else if (name == "stale_shared") {
    need(2 * kSelfThreads);
    PSI_LAUNCH(stale_shared_kernel, 2, kSelfThreads, 0, s, o);
  } else if (name == "divergent_barrier") {
    PSI_LAUNCH(divergent_barrier_kernel, 1, kSelfThreads, 0, s, o);
  } else if (name == "barrier_after_exit") {
    PSI_LAUNCH(barrier_after_exit_kernel, 1, kSelfThreads, 0, s, o);
  } else if (name == "reduce_everywhere") {
    need(kSelfThreads);
    PSI_LAUNCH(reduce_everywhere_kernel, 1, kSelfThreads, 0, s, o);
  } else if (name == "warp_ops") {
    need(5 * kSelfThreads);
    PSI_LAUNCH(warp_ops_kernel, 1, kSelfThreads, 0, s, o);
  } else if (name == "lane_outside_mask") {
    PSI_LAUNCH(lane_outside_mask_kernel, 1, kSelfThreads, 0, s, o);
  } else if (name == "mask_names_exited_lane") {
    PSI_LAUNCH(mask_names_exited_lane_kernel, 1, kSelfThreads, 0, s, o);
  } else if (name == "mismatched_masks") {
    PSI_LAUNCH(mismatched_masks_kernel, 1, kSelfThreads, 0, s, o);
  } else if (name == "warp_sync_against_barrier") {
    PSI_LAUNCH(warp_sync_against_barrier_kernel, 1, kSelfThreads, 0, s, o);
  } else if (name == "partial_warp_full_mask") {
    PSI_LAUNCH(warp_ops_kernel, 1, 40, 0, s, o);  // the second warp has 8 lanes
  } else if (name == "block_too_large") {
    PSI_LAUNCH(neighbour_kernel<true>, 1, 1025, 0, s, o);
  } else if (name == "grid_y_too_large") {
    PSI_LAUNCH(neighbour_kernel<true>, dim3(1, 65536), kSelfThreads, 0, s, o);
  } else if (name == "empty_grid") {
    PSI_LAUNCH(neighbour_kernel<true>, 0, kSelfThreads, 0, s, o);
  } else if (name == "shared_too_large") {
    need(kSelfThreads);
    PSI_LAUNCH(big_shared_kernel, 1, kSelfThreads, 0, s, o);
  } else if (name == "pinned_recorded" || name == "pinned_unrecorded") {
    need(16);
    upload_and_read(o, 16, name == "pinned_recorded", s);
  } else {
    TORCH_CHECK(false, "_selftest: unknown case ", name);
  }
}

}  // namespace
}  // namespace psi

TORCH_LIBRARY_FRAGMENT(psi_cuda_emu, m) {
  m.def("_selftest(str name, Tensor(a!) out) -> ()");
  m.def("_chunk_of_group(int group_len, int first_unit, int unit) -> int[]",
        [](int64_t g, int64_t f, int64_t u) { return psi::chunk_of_group_at(g, f, u); });
  m.def("_find_tensor(int[] first_units, int unit) -> int",
        [](std::vector<int64_t> firsts, int64_t u) { return psi::find_tensor_at(firsts, u); });
}

TORCH_LIBRARY_IMPL(psi_cuda_emu, CPU, m) {
  m.impl("_selftest", PSI_CUDA_OP(psi::selftest));
}
