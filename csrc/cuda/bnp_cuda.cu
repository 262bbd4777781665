// CUDA implementation of the BNP ops psi_cuda::bnp_update_stats_, bnp_precondition_ and bnp_sgd_
// (math: psi/bnp.h; semantics: the CPU kernels in csrc/cpu/bnp_cpu.cpp, which this file follows:
// same checks, same layouts, same order of the formulas). Only sums and element loops are here.
//
// bnp_update_stats_ (input seen as [outer, C, inner] in memory order), one launch:
//   stats_columns_kernel  inner < 32 (Linear input, channels-last conv input, small spatial
//                         sizes): x read as rows of W = C * inner columns, a block a tile of tx
//                         columns (threads along columns: coalesced whatever the inner size) x
//                         ty threads along rows, over one chunk of rows.
//   stats_planes_kernel   inner >= 32 (NCHW-like): a block is (channel, chunk of kStatsChunk of
//                         the channel's outer * inner elements), reduced over the block.
//   Each block writes its partial sums to the stream's workspace and counts itself in its
//   segment's (tile's, channel's) arrival counter; the last block of a segment adds the
//   segment's partials over the chunks in chunk order, and the block that completes the last
//   segment counts the batch (batches, optional), checks the channel totals (a batch with an inf
//   or a NaN changes nothing else), blends them into mean/sqmean with the batch weight of the
//   step it reads, and advances the step. No
//   allocation once the stream's workspace has grown to the largest layer (stats_workspace).
// Each thread sums in float (double for float64 input) and moves its sums to double every
// kStatsFlush elements; partials and totals are double, added in a fixed order: the result does
// not depend on timing or on which block arrives last.
//
// bnp_precondition_ / bnp_sgd_: one multi-tensor launch per phase. The host builds a table with
// one LayerMeta per layer that has rows (device addresses, row layout, the index of its first
// row among all rows), copies it to the device without waiting (device_table.cuh), and a
// block finds the layer of its row by binary search (as in psi_sgd_cuda.cu).
//   channel_table_kernel  one block per layer: per input channel (shift, inv) = bnp_channel(mean,
//                         sqmean) into a scratch table (opmath precision).
//   bnp_rows_kernel       one block per output channel (row): G' = bnp_grad(f g, f g_b, shift,
//                         inv) for every element, written back to the gradient (precondition)
//                         or used for the SGD step of the weight and its buffer (sgd; the
//                         gradient is only read); then the row sum of G' shift is block-reduced
//                         and thread 0 writes the bias gradient (precondition) or steps the bias
//                         and its buffer (sgd). For bnp_sgd_ each block reads its layer's step on
//                         the device: first = (step == 0) selects bnp_sgd_update(o, first); f
//                         (maximize sign, 1 / grad_scale) is also read on the device.
//   (bnp_sgd_: every state step += 1 by the last block of bnp_rows_kernel, once every row has
//   read its layer's step: StepBump, device_table.cuh; increment_steps_kernel when no layer has
//   rows.)
// bnp_sgd_ kernels read found_inf first and return when it is set: then nothing changes.
// Nothing here waits for the device.
//
// Limits: a row is handled by a single block (256 threads), so a layer with few, very long rows
// (e.g. one output channel of a million inputs) runs on few SMs; the statistics of an input with
// a huge inner size run on (channel, chunk) blocks and have no such limit. Layouts other than
// those of row_layout/checked_stats_layout go through contiguous copies (as on the CPU). Safe to
// capture in a CUDA graph: under capture the layer table reaches the device through kernel
// arguments instead of a pinned host buffer (device_table.cuh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

#include "psi/bnp.h"
#include "psi/ops.h"
// Last: in the emulation build they define CUDA's keywords, after every system header.
#include "device_api.cuh"
#include "device_table.cuh"
#include "reduce.cuh"

namespace psi {
namespace {

constexpr int kThreads = 256;                   // threads per block, every kernel
constexpr int64_t kMaxGrid = int64_t{1} << 20;  // larger 1-D launches loop (grid-stride)
constexpr int64_t kStatsChunk = 16384;          // stats, inner > 1: elements per block
constexpr int64_t kMinRowsPerThread = 8;        // stats, inner == 1: rows per thread at least
constexpr int64_t kStatsTargetBlocks = 2048;    // stats, inner == 1: blocks aimed at (chunks cap)

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

unsigned grid_for(int64_t units) { return static_cast<unsigned>(min64(units, kMaxGrid)); }

int64_t address(const void* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p)); }

__device__ __forceinline__ bool skip_step(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.0f;
}

// Sum and sum of squares, reduced together.
template <typename T>
struct SumSq {
  T s, q;
};

struct SumSqOp {
  template <typename T>
  __device__ __forceinline__ SumSq<T> operator()(const SumSq<T>& a, const SumSq<T>& b) const {
    return SumSq<T>{a.s + b.s, a.q + b.q};
  }
};

// Running sums of one thread: float (double for float64 input), moved to double every
// kStatsFlush elements, as the CPU kernel flushes its lanes (a float sum of many values near a
// large mean would lose the variance, sqmean - mean^2). Block reductions and partials: double.
template <typename scalar_t>
using stats_acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
constexpr int kStatsFlush = 64;

template <typename acc_t>
struct StatsAcc {
  acc_t s = 0, q = 0;
  double ds = 0, dq = 0;
  int run = 0;
  __device__ __forceinline__ void add(acc_t v) {
    s += v;
    q += v * v;
    if (++run == kStatsFlush) flush();
  }
  __device__ __forceinline__ void flush() {
    ds += static_cast<double>(s);
    dq += static_cast<double>(q);
    s = q = 0;
    run = 0;
  }
  __device__ __forceinline__ SumSq<double> total() {
    flush();
    return SumSq<double>{ds, dq};
  }
};

// Element i of a statistics vector, float32 or float64 (is_f64).
__device__ __forceinline__ double load_stat(const void* p, int64_t is_f64, int64_t i) {
  return is_f64 ? static_cast<const double*>(p)[i]
                : static_cast<double>(static_cast<const float*>(p)[i]);
}

// ================================================================ bnp_update_stats_
//
// One launch per call. Each block writes the partial sums of its unit (a chunk of rows of a tile
// of columns, or a chunk of one channel's elements) to the call's workspace, then counts itself
// in the arrival counter of its segment (tile or channel): the block that arrives last in a
// segment adds the segment's partials over its chunks in chunk order (column totals) and counts
// the segment in the call's counter; the block that completes the call's counter checks that
// every channel total is finite, blends them into mean/sqmean and advances the step. Every
// counter is reset to zero by the block that saw it complete. All sums are added in a fixed
// order, so the result does not depend on which block finishes last.
//
// The workspace: the counters (segments + 1 words, zero between calls), and 8-byte words of
// scratch: the column totals (2 * cols), the chunk partials (2 * chunks * cols). It belongs to the
// stream and is reused by every call on it (stats_workspace), so a forward allocates nothing once
// the largest layer has run.

constexpr int kPlanesMinInner = 32;  // inner sizes from here on take the planes kernel

struct StatsWork {
  unsigned long long* arrived;  // [segments + 1]: one per segment, then the call's
  double* col_sum;              // [cols], then col_sq = col_sum + cols
  double* part_sum;             // [chunks * cols], then part_sq = part_sum + chunks * cols
  int64_t cols, chunks;
};

// What the block that finishes the call writes: mean/sqmean (float32 or float64) of C channels,
// channel c the sum of columns [c * cols_per_channel, (c + 1) * cols_per_channel).
struct StatsOut {
  void* mean;
  void* sqmean;
  int64_t stat_f64;  // 1: mean/sqmean are float64
  float* step;
  float* batches;  // null: not counted
  double momentum, count;
  int64_t C, cols_per_channel;
};

__device__ __forceinline__ int block_tid() {
  return static_cast<int>(threadIdx.y * blockDim.x + threadIdx.x);
}

// Called by every thread of the block once its writes to the workspace are done; true in every
// thread of the block whose arrival completes `*counter` (the `expected`-th), which also resets
// it. The writers' fences, then thread 0's count: the standard fence-then-count pattern (the
// reader reads through volatile pointers, past L1).
__device__ __forceinline__ bool arrive_last(unsigned long long* counter,
                                            unsigned long long expected) {
  PSI_SHARED(int, last);
  __threadfence();  // this thread's workspace writes are visible before the block's arrival
  __syncthreads();
  if (block_tid() == 0) {
    last = atomicAdd(counter, 1ull) == expected - 1;
    if (last) *counter = 0;  // every arrival has happened: ready for the next call
  }
  __syncthreads();
  const bool is_last = last != 0;
  if (is_last) __threadfence();
  return is_last;
}

__device__ __forceinline__ void channel_total(const StatsWork& w, const StatsOut& o, int64_t c,
                                              double& s, double& q) {
  const volatile double* cs = w.col_sum;
  const volatile double* cq = w.col_sum + w.cols;
  s = 0;
  q = 0;
  for (int64_t i = c * o.cols_per_channel; i < (c + 1) * o.cols_per_channel; ++i) {
    s += cs[i];
    q += cq[i];
  }
}

__device__ __forceinline__ void store_stat(void* p, int64_t f64, int64_t c, double v) {
  if (f64) {
    static_cast<double*>(p)[c] = v;
  } else {
    static_cast<float*>(p)[c] = static_cast<float>(v);
  }
}

// The block that completes the call: batches += 1; a batch whose channel totals are not all
// finite (an inf or a NaN in it, or squares beyond the sums' range) changes nothing else, the
// step included (docs/ALGORITHMS.md 4.4); otherwise the blend with the batch weight of the step,
// then step += 1.
__device__ __forceinline__ void finalize_stats(const StatsWork& w, const StatsOut& o) {
  PSI_SHARED(int, bad);
  const int tid = block_tid();
  const int nthreads = static_cast<int>(blockDim.x * blockDim.y);
  if (tid == 0) {
    bad = 0;
    if (o.batches != nullptr) *o.batches += 1.0f;
  }
  __syncthreads();
  bool found = false;
  for (int64_t c = tid; c < o.C; c += nthreads) {
    double s, q;
    channel_total(w, o, c, s, q);
    found = found || !(s - s == 0.0) || !(q - q == 0.0);
  }
  if (found) bad = 1;  // every writer writes 1
  __syncthreads();
  if (bad != 0) return;  // uniform over the block
  const double a = bnp_batch_weight(o.momentum, static_cast<double>(*o.step));
  for (int64_t c = tid; c < o.C; c += nthreads) {
    double s, q;
    channel_total(w, o, c, s, q);
    store_stat(o.mean, o.stat_f64, c, bnp_blend(load_stat(o.mean, o.stat_f64, c), s / o.count, a));
    store_stat(o.sqmean, o.stat_f64, c,
               bnp_blend(load_stat(o.sqmean, o.stat_f64, c), q / o.count, a));
  }
  __syncthreads();  // every thread has read the step
  if (tid == 0) *o.step += 1.0f;
}

// Sum over threadIdx.y of ssum/ssq[threadIdx.y * blockDim.x + threadIdx.x] (a fixed tree; ty a
// power of 2), left in row 0.
__device__ __forceinline__ void tree_over_y(double* ssum, double* ssq) {
  const unsigned tid = threadIdx.y * blockDim.x + threadIdx.x;
  __syncthreads();
  for (unsigned h = blockDim.y / 2; h > 0; h /= 2) {
    if (threadIdx.y < h) {
      ssum[tid] += ssum[tid + h * blockDim.x];
      ssq[tid] += ssq[tid + h * blockDim.x];
    }
    __syncthreads();
  }
}

// inner < kPlanesMinInner: x is [rows, W] in memory (W = C * inner columns; column j belongs to
// channel j / inner), read along rows, so a warp reads contiguous columns whatever the inner
// size. blockDim = (tx, ty), tx * ty == kThreads, ty a power of 2; blockIdx.x: tile of tx
// columns (a segment), blockIdx.y: chunk of rows_per_chunk rows. Partials of chunk k, column j
// at part[k * W + j].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    stats_columns_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t rows_per_chunk,
                         StatsWork w, StatsOut o) {
  using acc_t = stats_acc_t<scalar_t>;
  PSI_SHARED(double[kThreads], ssum);
  PSI_SHARED(double[kThreads], ssq);
  const int64_t W = w.cols;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t r0 = chunk * rows_per_chunk;
  const int64_t r1 = min64(rows, r0 + rows_per_chunk);
  const unsigned tid = threadIdx.y * blockDim.x + threadIdx.x;
  StatsAcc<acc_t> acc;
  if (j < W) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      acc.add(static_cast<acc_t>(x[r * W + j]));
    }
  }
  const SumSq<double> t = acc.total();
  ssum[tid] = t.s;
  ssq[tid] = t.q;
  tree_over_y(ssum, ssq);
  if (threadIdx.y == 0 && j < W) {
    volatile double* ps = w.part_sum;
    ps[chunk * W + j] = ssum[threadIdx.x];
    ps[w.chunks * W + chunk * W + j] = ssq[threadIdx.x];
  }
  if (!arrive_last(w.arrived + blockIdx.x, gridDim.y)) return;

  // Last chunk of this tile: its columns' totals over the chunks, thread (x, y) adding chunks
  // y, y + ty, ... in order, then the same tree over y.
  double s = 0, q = 0;
  if (j < W) {
    const volatile double* ps = w.part_sum;
    for (int64_t k = threadIdx.y; k < w.chunks; k += blockDim.y) {
      s += ps[k * W + j];
      q += ps[w.chunks * W + k * W + j];
    }
  }
  ssum[tid] = s;
  ssq[tid] = q;
  tree_over_y(ssum, ssq);
  if (threadIdx.y == 0 && j < W) {
    volatile double* cs = w.col_sum;
    cs[j] = ssum[threadIdx.x];
    cs[W + j] = ssq[threadIdx.x];
  }
  if (!arrive_last(w.arrived + gridDim.x, gridDim.x)) return;
  finalize_stats(w, o);
}

// inner >= kPlanesMinInner: x is [outer, C, inner]; channel c (a segment) has n = outer * inner
// elements in runs of inner, cut into chunks of kStatsChunk. Unit u = c * chunks + k
// (grid-stride); its partials at part[u].
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    stats_planes_kernel(const scalar_t* __restrict__ x, int64_t outer, int64_t inner, StatsWork w,
                        StatsOut o) {
  using acc_t = stats_acc_t<scalar_t>;
  using StatsReduce = BlockReduce<SumSq<double>, kThreads>;
  PSI_SHARED(typename StatsReduce::TempStorage, temp);
  const int64_t C = o.C, chunks = w.chunks;
  const int64_t n = outer * inner;
  // A thread steps kThreads elements: kThreads / inner runs and kThreads % inner inside one.
  const int64_t step_o = kThreads / inner, step_i = kThreads % inner;
  for (int64_t unit = blockIdx.x; unit < C * chunks; unit += gridDim.x) {
    const int64_t c = unit / chunks;
    const int64_t j0 = (unit % chunks) * kStatsChunk;
    const int64_t j1 = min64(n, j0 + kStatsChunk);
    StatsAcc<acc_t> acc;
    int64_t j = j0 + threadIdx.x;
    if (j < j1) {
      int64_t jo = j / inner, ji = j % inner;
      for (; j < j1; j += kThreads) {
        acc.add(static_cast<acc_t>(x[(jo * C + c) * inner + ji]));
        jo += step_o;
        ji += step_i;
        if (ji >= inner) {
          ji -= inner;
          ++jo;
        }
      }
    }
    const SumSq<double> t = StatsReduce(temp).Reduce(acc.total(), SumSqOp());
    if (threadIdx.x == 0) {
      volatile double* ps = w.part_sum;
      ps[unit] = t.s;
      ps[C * chunks + unit] = t.q;
    }
    // (arrive_last's barriers also order temp's reuse below after this reduction.)
    if (arrive_last(w.arrived + c, chunks)) {
      // Last chunk of channel c: its total over the chunks (strided by thread, then the block
      // reduction: a fixed order).
      double s = 0, q = 0;
      const volatile double* ps = w.part_sum;
      for (int64_t k = threadIdx.x; k < chunks; k += kThreads) {
        s += ps[c * chunks + k];
        q += ps[C * chunks + c * chunks + k];
      }
      const SumSq<double> total = StatsReduce(temp).Reduce(SumSq<double>{s, q}, SumSqOp());
      if (threadIdx.x == 0) {
        volatile double* cs = w.col_sum;
        cs[c] = total.s;
        cs[C + c] = total.q;
      }
      if (arrive_last(w.arrived + C, C)) finalize_stats(w, o);
    }
    __syncthreads();  // temp and the shared flags are reused by the next unit
  }
}

// The statistics workspace of `stream`: `counters` zero words and `words` scratch words. One per
// device and stream, kept and grown (never shrunk) across calls, so calls after the largest one
// allocate nothing. The counters are a buffer of their own, so that every counter word is zero
// between calls whatever the layout of the previous call (a kernel resets each counter it
// completes); the scratch needs no initial value. Stream order keeps each call's use after the
// previous call's; a grown buffer's old block goes back to the caching allocator, which reuses it
// on this stream only after the kernels already queued. Under CUDA graph capture: fresh buffers
// from the graph's pool instead (the counters' memset is replayed with the graph), so a graph
// never shares the eager workspace.
struct StatsBuffers {
  at::Tensor counters, scratch;
};

StatsBuffers stats_workspace(int64_t counters, int64_t words, const at::Device& device,
                             dev::Stream stream) {
  const auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  if (dev::is_capturing(stream)) {
    return StatsBuffers{at::zeros({counters}, opts), at::empty({words}, opts)};
  }
  struct Entry {
    int device;
    uintptr_t stream;
    StatsBuffers buffers;
  };
  // Never destroyed: device tensors must not be freed by static destructors at exit.
  static std::mutex& mutex = *new std::mutex();
  static std::vector<Entry>& cache = *new std::vector<Entry>();
  const uintptr_t key = reinterpret_cast<uintptr_t>(stream);
  const std::lock_guard<std::mutex> lock(mutex);
  Entry* entry = nullptr;
  for (Entry& e : cache) {
    if (e.device == device.index() && e.stream == key) entry = &e;
  }
  if (entry == nullptr) {
    cache.push_back(Entry{device.index(), key,
                          StatsBuffers{at::zeros({counters}, opts), at::empty({words}, opts)}});
    return cache.back().buffers;
  }
  StatsBuffers& b = entry->buffers;
  if (b.counters.numel() < counters) {
    b.counters = at::zeros({std::max(counters, 2 * b.counters.numel())}, opts);
  }
  if (b.scratch.numel() < words) {
    b.scratch = at::empty({std::max(words, 2 * b.scratch.numel())}, opts);
  }
  return b;  // references the caller holds until its launch is queued
}

void bnp_update_stats_cuda(const at::Tensor& input, const at::Tensor& mean,
                           const at::Tensor& sqmean, const at::Tensor& step, int64_t channel_dim,
                           double momentum, const std::optional<at::Tensor>& batches) {
  const StatsLayout L =
      checked_stats_layout(input, mean, sqmean, step, channel_dim, momentum, batches);
  const int64_t count = L.outer * L.inner;
  if (L.x.numel() == 0 || count == 0) return;
  dev::check_device(input.device(), "bnp_update_stats_", "an input");
  const dev::DeviceGuard guard(input.device());
  const dev::Stream stream = dev::current_stream(input.device());
  const int64_t C = L.channels;
  const bool columns = L.inner < kPlanesMinInner;

  // Work split: cols (column totals), chunks per segment, segments.
  int64_t cols = 0, chunks = 0, segments = 0, rows_per_chunk = 0;
  unsigned tx = 1;
  if (columns) {
    cols = C * L.inner;
    while (tx < 32 && tx < cols) tx *= 2;
    segments = ceil_div(cols, tx);
    const int64_t ty = kThreads / tx;
    const int64_t max_chunks = std::max<int64_t>(1, kStatsTargetBlocks / segments);
    chunks = std::min(ceil_div(L.outer, ty * kMinRowsPerThread), max_chunks);
    rows_per_chunk = ceil_div(L.outer, chunks);
    chunks = ceil_div(L.outer, rows_per_chunk);
  } else {
    cols = C;
    chunks = ceil_div(count, kStatsChunk);
    segments = C;
  }
  const StatsBuffers ws =
      stats_workspace(segments + 1, 2 * cols + 2 * chunks * cols, input.device(), stream);
  StatsWork w{};
  w.arrived = reinterpret_cast<unsigned long long*>(ws.counters.data_ptr<int64_t>());
  w.col_sum = reinterpret_cast<double*>(ws.scratch.data_ptr<int64_t>());
  w.part_sum = w.col_sum + 2 * cols;
  w.cols = cols;
  w.chunks = chunks;
  StatsOut o{};
  o.mean = mean.data_ptr();
  o.sqmean = sqmean.data_ptr();
  o.stat_f64 = mean.scalar_type() == at::kDouble;
  o.step = step.data_ptr<float>();
  o.batches = batches.has_value() ? batches->data_ptr<float>() : nullptr;
  o.momentum = momentum;
  o.count = static_cast<double>(count);
  o.C = C;
  o.cols_per_channel = columns ? L.inner : 1;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, L.x.scalar_type(),
                                  "bnp_update_stats_cuda", [&] {
    const scalar_t* x = L.x.const_data_ptr<scalar_t>();
    if (columns) {
      const dim3 block(tx, static_cast<unsigned>(kThreads / tx));
      const dim3 grid(static_cast<unsigned>(segments), static_cast<unsigned>(chunks));
      PSI_LAUNCH(stats_columns_kernel<scalar_t>, grid, block, 0, stream, x, L.outer,
                 rows_per_chunk, w, o);
    } else {
      PSI_LAUNCH(stats_planes_kernel<scalar_t>, grid_for(C * chunks), kThreads, 0, stream, x,
                 L.outer, L.inner, w, o);
    }
  });
}

// ================================================================ rows: precondition and sgd

// One row of the layer table. Only int64 fields: the host fills it as a block of int64.
struct LayerMeta {
  int64_t g, gb;              // weight / bias gradient (gb 0 without bias): read, and written
                              // back by bnp_precondition_
  int64_t w, m, b, mb, step;  // bnp_sgd_: weight, its buffer, bias, its buffer (0: none), step
  int64_t mean, sqmean;       // statistics vectors
  int64_t mean_f64, sqmean_f64;  // 1 when that vector is float64, 0 when float32
  int64_t channels;           // input channels (cin_g * groups)
  int64_t tab;                // offset of this layer's shift[channels], inv[channels] in the table
  int64_t row_len, inner, cin_g, chan_inner, per_group;  // RowLayout (outer = row_len / inner)
  int64_t first_row;          // index of the layer's first row among all rows of the launch
};
constexpr int64_t kMetaWords = sizeof(LayerMeta) / sizeof(int64_t);
static_assert(sizeof(LayerMeta) == kMetaWords * sizeof(int64_t), "LayerMeta must be int64s");

// The layer whose rows [first_row, next layer's first_row) contain `unit`. first_row starts at 0
// and strictly increases (every layer in a table has at least one row).
__device__ __forceinline__ const LayerMeta& find_layer(const LayerMeta* metas, int64_t n,
                                                       int64_t unit) {
  int64_t lo = 0, hi = n - 1;  // invariant: metas[lo].first_row <= unit, the answer in [lo, hi]
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (metas[mid].first_row <= unit) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return metas[lo];
}

__device__ __forceinline__ double load_stat(int64_t addr, int64_t is_f64, int64_t i) {
  return load_stat(reinterpret_cast<const void*>(addr), is_f64, i);
}

// One block per layer: tab[a.tab + c] = shift, tab[a.tab + channels + c] = inv.
template <typename opmath_t>
__global__ void __launch_bounds__(kThreads)
    channel_table_kernel(const LayerMeta* metas, int64_t num_layers, opmath_t* tab, double eps,
                         bool centered, const float* found_inf) {
  if (skip_step(found_inf)) return;
  for (int64_t l = blockIdx.x; l < num_layers; l += gridDim.x) {
    const LayerMeta& a = metas[l];
    for (int64_t c = threadIdx.x; c < a.channels; c += kThreads) {
      const BnpChannel ch = bnp_channel(load_stat(a.mean, a.mean_f64, c),
                                        load_stat(a.sqmean, a.sqmean_f64, c), eps, centered);
      tab[a.tab + c] = static_cast<opmath_t>(ch.shift);
      tab[a.tab + a.channels + c] = static_cast<opmath_t>(ch.inv);
    }
  }
}

// One block per row (grid-stride over all rows of all layers). kSgd: bnp_sgd_ (w, m, b, mb
// stepped, gradients only read); otherwise bnp_precondition_ (gradients rewritten in place).
template <typename scalar_t, bool kSgd>
__global__ void __launch_bounds__(kThreads)
    bnp_rows_kernel(const LayerMeta* metas, int64_t num_layers, int64_t num_rows,
                    const at::opmath_type<scalar_t>* tab, SgdOptions o, const float* grad_scale,
                    const float* found_inf, StepBump bump) {
  using opmath_t = at::opmath_type<scalar_t>;
  using RowReduce = BlockReduce<double, kThreads>;
  if (skip_step(found_inf)) return;
  PSI_SHARED(typename RowReduce::TempStorage, temp);
  const opmath_t f = kSgd ? static_cast<opmath_t>(grad_factor(o.maximize, grad_scale))
                          : opmath_t(1);
  for (int64_t unit = blockIdx.x; unit < num_rows; unit += gridDim.x) {
    const LayerMeta a = find_layer(metas, num_layers, unit);  // a copy: the writes below
                                                              // cannot alias it
    const int64_t r = unit - a.first_row;
    const int64_t c0 = (r / a.per_group) * a.cin_g;  // first input channel of the row's group
    const opmath_t* sh = tab + a.tab + c0;
    const opmath_t* iv = tab + a.tab + a.channels + c0;
    const int64_t off = r * a.row_len;
    scalar_t* g = reinterpret_cast<scalar_t*>(a.g) + off;
    scalar_t* gb_ptr = reinterpret_cast<scalar_t*>(a.gb);  // null without bias
    const bool has_bias = gb_ptr != nullptr;
    const opmath_t gb = has_bias ? f * static_cast<opmath_t>(gb_ptr[r]) : opmath_t(0);
    // bnp_sgd_: the step of this layer's buffers, chosen on the device by its step counter.
    const Update up = kSgd ? bnp_sgd_update(o, *reinterpret_cast<const float*>(a.step) == 0.0f)
                           : unchanged();
    const opmath_t pw = static_cast<opmath_t>(up.param.w), pg = static_cast<opmath_t>(up.param.g),
                   pm = static_cast<opmath_t>(up.param.m);
    const opmath_t bw = static_cast<opmath_t>(up.buf.w), bg = static_cast<opmath_t>(up.buf.g),
                   bm = static_cast<opmath_t>(up.buf.m);
    scalar_t* w = kSgd ? reinterpret_cast<scalar_t*>(a.w) + off : nullptr;
    opmath_t* m = kSgd && a.m != 0 ? reinterpret_cast<opmath_t*>(a.m) + off : nullptr;

    // Element j of the row is (block jo, index ji) of `outer` blocks of `inner` elements; its
    // input channel is ji (chan_inner) or jo. A thread steps kThreads elements at a time.
    opmath_t s = 0;  // this thread's part of sum_j G'[j] shift[channel(j)]
    int64_t j = threadIdx.x;
    if (j < a.row_len) {
      const int64_t step_o = kThreads / a.inner, step_i = kThreads % a.inner;
      int64_t jo = j / a.inner, ji = j % a.inner;
      for (; j < a.row_len; j += kThreads) {
        const int64_t c = a.chan_inner ? ji : jo;
        const opmath_t shc = sh[c];
        const opmath_t gp = bnp_grad<opmath_t>(f * static_cast<opmath_t>(g[j]), gb, shc, iv[c]);
        s += gp * shc;
        if constexpr (kSgd) {
          const opmath_t wi = static_cast<opmath_t>(w[j]);
          if (m != nullptr) {
            const opmath_t mi = m[j];
            w[j] = static_cast<scalar_t>(pw * wi + pg * gp + pm * mi);
            m[j] = bw * wi + bg * gp + bm * mi;
          } else {
            w[j] = static_cast<scalar_t>(pw * wi + pg * gp);
          }
        } else {
          g[j] = static_cast<scalar_t>(gp);
        }
        jo += step_o;
        ji += step_i;
        if (ji >= a.inner) {
          ji -= a.inner;
          ++jo;
        }
      }
    }
    if (has_bias) {  // uniform over the block
      const double acc = RowReduce(temp).Sum(static_cast<double>(s));  // valid in thread 0
      if (threadIdx.x == 0) {
        // Every thread has read gb_ptr[r] before the reduction's barriers: safe to overwrite.
        const double gbp = bnp_bias_grad(static_cast<double>(gb), acc);
        if constexpr (kSgd) {
          scalar_t* b = reinterpret_cast<scalar_t*>(a.b);
          opmath_t* mb = a.mb != 0 ? reinterpret_cast<opmath_t*>(a.mb) : nullptr;
          const double bi = static_cast<double>(b[r]);
          const double mi = mb != nullptr ? static_cast<double>(mb[r]) : 0.0;
          b[r] = static_cast<scalar_t>(up.param.w * bi + up.param.g * gbp + up.param.m * mi);
          if (mb != nullptr) {
            mb[r] = static_cast<opmath_t>(up.buf.w * bi + up.buf.g * gbp + up.buf.m * mi);
          }
        } else {
          gb_ptr[r] = static_cast<scalar_t>(gbp);
        }
      }
      __syncthreads();  // temp is reused by the next row
    }
  }
  bump_steps_when_last(bump);  // bnp_sgd_: the layers' steps, once every row has read its own
}

// bnp_sgd_ with no rows at all: the steps still advance. atomicAdd: a step tensor passed twice is
// incremented twice, as on the CPU.
__global__ void increment_steps_kernel(const int64_t* steps, int64_t n, const float* found_inf) {
  if (skip_step(found_inf)) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    atomicAdd(reinterpret_cast<float*>(steps[i]), 1.0f);
  }
}

// The layer table of one call (layers without rows left out), the total of rows and of table
// channels, and every step address (bnp_sgd_; layers without rows included).
struct RowsPlan {
  std::vector<LayerMeta> layers;
  std::vector<int64_t> steps;
  int64_t rows = 0, channels = 0;
};

// Adds layer `grad` (already in a row_layout layout) to the plan; w/m/b/mb/step: see LayerMeta.
void add_layer(RowsPlan& plan, const at::Tensor& grad, const at::Tensor* bias_grad,
               const at::Tensor& mean, const at::Tensor& sqmean, int64_t groups) {
  const RowLayout L = *row_layout(grad);
  if (L.rows == 0) return;
  LayerMeta a{};
  a.g = address(grad.data_ptr());
  a.gb = bias_grad != nullptr ? address(bias_grad->data_ptr()) : 0;
  a.mean = address(mean.data_ptr());
  a.sqmean = address(sqmean.data_ptr());
  a.mean_f64 = mean.scalar_type() == at::kDouble;
  a.sqmean_f64 = sqmean.scalar_type() == at::kDouble;
  a.channels = mean.numel();
  a.tab = 2 * plan.channels;
  a.row_len = L.row_len;
  a.inner = L.inner;
  a.cin_g = L.cin_g;
  a.chan_inner = L.chan_inner;
  a.per_group = std::max<int64_t>(1, L.rows / groups);
  a.first_row = plan.rows;
  plan.rows += L.rows;
  plan.channels += a.channels;
  plan.layers.push_back(a);
}

// Copies the layer table, the step addresses and the arrivals counter of the step bump to the
// device without waiting, or reuses an earlier call's copy (graph-safe under CUDA graph
// capture: device_table.cuh). Returns the device buffer (layers first, then steps, then the
// counter).
at::Tensor upload(const RowsPlan& plan, const at::Device& device, dev::Stream stream) {
  std::vector<int64_t> words;
  words.reserve(plan.layers.size() * kMetaWords + plan.steps.size() + 1);
  for (const LayerMeta& a : plan.layers) {
    const int64_t* row = reinterpret_cast<const int64_t*>(&a);
    words.insert(words.end(), row, row + kMetaWords);
  }
  words.insert(words.end(), plan.steps.begin(), plan.steps.end());
  words.push_back(0);  // arrived (StepBump)
  return upload_words(words.data(), static_cast<int64_t>(words.size()), device, stream);
}

// The channel table and the row pass of one call (when the plan has rows).
template <typename scalar_t, bool kSgd>
void launch_rows(const RowsPlan& plan, const LayerMeta* metas, double eps, bool centered,
                 const SgdOptions& o, const float* grad_scale, const float* found_inf,
                 const at::Device& device, dev::Stream stream, StepBump bump = StepBump{}) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (plan.rows == 0) return;
  const int64_t n = static_cast<int64_t>(plan.layers.size());
  const at::Tensor tab = at::empty(
      {std::max<int64_t>(1, 2 * plan.channels)},
      at::TensorOptions().dtype(c10::CppTypeToScalarType<opmath_t>::value).device(device));
  opmath_t* tab_ptr = tab.data_ptr<opmath_t>();
  PSI_LAUNCH(channel_table_kernel<opmath_t>, grid_for(n), kThreads, 0, stream, metas, n, tab_ptr,
             eps, centered, found_inf);
  PSI_LAUNCH((bnp_rows_kernel<scalar_t, kSgd>), grid_for(plan.rows), kThreads, 0, stream, metas, n,
             plan.rows, tab_ptr, o, grad_scale, found_inf, bump);
}  // tab goes back to the caching allocator, stream-ordered after these kernels

void bnp_precondition_cuda(at::TensorList weight_grads, at::TensorList bias_grads,
                           at::TensorList means, at::TensorList sqmeans, at::IntArrayRef groups,
                           double eps) {
  check_bnp_layers("bnp_precondition_", weight_grads, bias_grads, means, sqmeans, groups, eps);
  if (weight_grads.empty()) return;
  const at::Device device = weight_grads[0].device();
  dev::check_device(device, "bnp_precondition_", "weight_grads");
  const dev::DeviceGuard guard(device);
  const dev::Stream stream = dev::current_stream(device);
  const bool centered = !bias_grads.empty();
  // Gradients in another layout are preconditioned in a contiguous copy and copied back.
  std::vector<at::Tensor> work(weight_grads.begin(), weight_grads.end());
  std::vector<at::Tensor> bias_work(bias_grads.begin(), bias_grads.end());
  for (auto& t : work) if (!row_layout(t)) t = t.contiguous();
  for (auto& t : bias_work) if (!t.is_contiguous()) t = t.contiguous();

  RowsPlan plan;
  for (size_t i = 0; i < work.size(); ++i) {
    add_layer(plan, work[i], centered ? &bias_work[i] : nullptr, means[i], sqmeans[i], groups[i]);
  }
  if (plan.rows > 0) {
    const at::Tensor table = upload(plan, device, stream);
    const LayerMeta* metas = reinterpret_cast<const LayerMeta*>(table.data_ptr<int64_t>());
    const SgdOptions none{};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work[0].scalar_type(),
                                    "bnp_precondition_cuda", [&] {
      launch_rows<scalar_t, false>(plan, metas, eps, centered, none, nullptr, nullptr, device,
                                   stream);
    });
  }
  for (size_t i = 0; i < work.size(); ++i) {
    if (!work[i].is_same(weight_grads[i])) dev::copy_(weight_grads[i], work[i], stream);
  }
  for (size_t i = 0; i < bias_work.size(); ++i) {
    if (!bias_work[i].is_same(bias_grads[i])) dev::copy_(bias_grads[i], bias_work[i], stream);
  }
}

void bnp_sgd_cuda(at::TensorList weights, at::TensorList biases, at::TensorList weight_grads,
                  at::TensorList bias_grads, at::TensorList weight_bufs, at::TensorList bias_bufs,
                  at::TensorList state_steps, at::TensorList means, at::TensorList sqmeans,
                  at::IntArrayRef groups, double eps, double lr, double momentum,
                  double dampening, bool nesterov, double weight_decay, bool maximize,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf) {
  check_bnp_layers("bnp_sgd_", weights, biases, means, sqmeans, groups, eps);
  const SgdOptions o = make_sgd_options(lr, momentum, dampening, nesterov, weight_decay,
                                        maximize, kEuclidean, kNormalize, kProject, 0.0);
  check_bnp_sgd_args(weights, biases, weight_grads, bias_grads, weight_bufs, bias_bufs,
                     state_steps, o, grad_scale, found_inf);
  if (weights.empty()) return;
  const at::Device device = weights[0].device();
  dev::check_device(device, "bnp_sgd_", "weights");
  const dev::DeviceGuard guard(device);
  const dev::Stream stream = dev::current_stream(device);
  const bool centered = !biases.empty();
  const bool has_momentum = momentum != 0.0;

  std::vector<at::Tensor> keep;  // gradient copies in the parameter layout, alive until launched
  keep.reserve(2 * weights.size());
  RowsPlan plan;
  for (size_t i = 0; i < weights.size(); ++i) {
    plan.steps.push_back(address(state_steps[i].data_ptr<float>()));
    keep.push_back(grad_like_param(weight_grads[i], weights[i]));
    const at::Tensor& wg = keep.back();
    const at::Tensor* bg = nullptr;
    if (centered) {
      keep.push_back(bias_grads[i].contiguous());
      bg = &keep.back();
    }
    const size_t before = plan.layers.size();
    add_layer(plan, wg, bg, means[i], sqmeans[i], groups[i]);
    if (plan.layers.size() == before) continue;  // no rows
    LayerMeta& a = plan.layers.back();
    a.w = address(weights[i].data_ptr());
    a.m = has_momentum ? address(weight_bufs[i].data_ptr()) : 0;
    a.b = centered ? address(biases[i].data_ptr()) : 0;
    a.mb = centered && has_momentum ? address(bias_bufs[i].data_ptr()) : 0;
    a.step = address(state_steps[i].data_ptr<float>());
  }

  const at::Tensor table = upload(plan, device, stream);
  const LayerMeta* metas = reinterpret_cast<const LayerMeta*>(table.data_ptr<int64_t>());
  const int64_t* steps = table.data_ptr<int64_t>() + plan.layers.size() * kMetaWords;
  const int64_t num_steps = static_cast<int64_t>(plan.steps.size());
  // The rows kernel's last block advances the steps (StepBump); with no rows, a kernel of its own.
  auto* arrived = reinterpret_cast<unsigned long long*>(const_cast<int64_t*>(steps) + num_steps);
  const StepBump bump{steps, num_steps, arrived};
  const float* scale = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  const float* inf = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(),
                                  "bnp_sgd_cuda", [&] {
    launch_rows<scalar_t, true>(plan, metas, eps, centered, o, scale, inf, device, stream, bump);
  });
  if (plan.rows == 0) {
    PSI_LAUNCH(increment_steps_kernel, grid_for(ceil_div(num_steps, kThreads)), kThreads, 0,
               stream, steps, num_steps, inf);
  }
}

}  // namespace
}  // namespace psi

PSI_CUDA_OPS_IMPL(m) {
  m.impl("bnp_update_stats_", PSI_CUDA_OP(psi::bnp_update_stats_cuda));
  m.impl("bnp_precondition_", PSI_CUDA_OP(psi::bnp_precondition_cuda));
  m.impl("bnp_sgd_", PSI_CUDA_OP(psi::bnp_sgd_cuda));
}
