// Multi-tensor machinery shared by the fused CUDA kernels of the PSI ops (psi_sgd_cuda.cu,
// psi_adam_cuda.cu, psi_grams_cuda.cu): the metadata table, block-level Gram reductions, the
// elementwise writer of an Update, the chunked long-group reduce/apply kernels, the step bump of
// the last kernel (and the step counter kernel of calls with no other) and the host plan. See
// psi_sgd_cuda.cu for the launch scheme.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "psi/ops.h"
// Last: in the emulation build they define CUDA's keywords, after every system header.
#include "device_api.cuh"
#include "device_table.cuh"
#include "reduce.cuh"

namespace psi {
namespace {

constexpr int kThreads = 256;                          // threads per block, every kernel
constexpr int kItems = 8;                              // elements per thread of a short group
constexpr int64_t kRegisterGroup = kThreads * kItems;  // longest group held in registers
constexpr int kWarps = kThreads / 32;                  // warps per block
constexpr int64_t kWarpGroup = 32 * kItems;            // longest group one warp steps alone:
                                                       // a block steps kWarps such groups
constexpr int64_t kThreadGroup = 32;                   // longest group one thread steps alone:
                                                       // a block steps kThreads such groups
constexpr int64_t kChunk = 8192;                       // elements per block of a chunked pass
// Longest group one block steps alone, in one kernel (reduce, solve, write). Groups longer than
// kRegisterGroup are read twice by their block: the second read finds the group in L1/L2, where
// the first put it (a modelled assumption, benchmarks/gpu_static.py; only longer groups take the
// chunked three-kernel path, which reads them twice from DRAM).
constexpr int64_t kShortGroup = 65536;
constexpr int64_t kMaxGrid = int64_t{1} << 20;         // larger launches loop (grid-stride)
// Resident blocks per SM the short-group kernel is compiled for. 4 caps its registers at 64: the
// solve, run by one thread per group, then spills to local memory instead of lowering the
// occupancy of the whole kernel. Double elements need more registers: 2 (128 registers).
template <typename scalar_t>
constexpr int short_blocks_per_sm() {
  return sizeof(at::opmath_type<scalar_t>) == sizeof(double) ? 2 : 4;
}

// One row of the metadata table. Only int64 fields: the host fills it as a block of int64.
struct TensorMeta {
  int64_t w, g, m, step;  // device addresses of the param, grad, buffer (0: none) and step
  int64_t v;              // psi_adam_: device address of the second moments (0: none)
  int64_t numel;          // elements of the tensor
  int64_t group;          // elements per group (channel/tensor manifolds)
  int64_t chunks;         // long groups: chunks per group
  int64_t first_unit;     // index of the tensor's first work unit (group or chunk) in its launch
  int64_t first_group;    // long groups: index of the tensor's first group among all long groups
  int64_t gram;           // device address of the given Gram sums of its first group (a row
                          // of the op's grams table, psi/ops.h gram_row), 0: none
  int64_t gram_out;       // psi_grams: where the sums of its first group go, 0: none
};
constexpr int64_t kMetaWords = sizeof(TensorMeta) / sizeof(int64_t);
static_assert(sizeof(TensorMeta) == kMetaWords * sizeof(int64_t), "TensorMeta must be int64s");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

unsigned grid_for(int64_t units) {
  return static_cast<unsigned>(min64(units, kMaxGrid));
}

// The tensor whose units [key, next tensor's key) contain `unit`. Keys start at 0 and strictly
// increase (every tensor in a table has at least one unit).
template <int64_t TensorMeta::*kKey>
__device__ __forceinline__ const TensorMeta& find_tensor(const TensorMeta* metas, int64_t n,
                                                         int64_t unit) {
  int64_t lo = 0, hi = n - 1;  // invariant: metas[lo].*kKey <= unit, the answer is in [lo, hi]
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (metas[mid].*kKey <= unit) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return metas[lo];
}

__device__ __forceinline__ bool skip_step(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.0f;
}

__device__ __forceinline__ float fmadd(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fmadd(double a, double b, double c) { return fma(a, b, c); }

struct GramSum {
  __device__ __forceinline__ Gram operator()(const Gram& a, const Gram& b) const {
    return Gram{a.ww + b.ww, a.wg + b.wg, a.wm + b.wm, a.gg + b.gg, a.gm + b.gm, a.mm + b.mm};
  }
};
using BlockGramReduce = BlockReduce<Gram, kThreads>;
using WarpGramReduce = WarpReduce<Gram>;

// Running sums of one thread in opmath precision (as the CPU kernel's vector lanes), moved to
// double once per thread and chunk of kChunk elements (at most kChunk / kThreads elements).
template <typename opmath_t>
struct GramAcc {
  opmath_t ww = 0, wg = 0, wm = 0, gg = 0, gm = 0, mm = 0;
  __device__ __forceinline__ void add(opmath_t w, opmath_t g, opmath_t m, bool has_m) {
    ww = fmadd(w, w, ww);
    wg = fmadd(w, g, wg);
    gg = fmadd(g, g, gg);
    if (has_m) {
      wm = fmadd(w, m, wm);
      gm = fmadd(g, m, gm);
      mm = fmadd(m, m, mm);
    }
  }
  __device__ __forceinline__ Gram to_double() const {
    return Gram{static_cast<double>(ww), static_cast<double>(wg), static_cast<double>(wm),
                static_cast<double>(gg), static_cast<double>(gm), static_cast<double>(mm)};
  }
  // Sums that float opmath cannot be trusted with (not finite, or |w|^2 or |g|^2 below 2^-100:
  // their terms were subnormal or flushed): the caller sums its elements again in double, where
  // the square of every finite float is normal (docs/ALGORITHMS.md 6.7; the CPU kernels'
  // suspect_sums).
  __device__ __forceinline__ bool suspect() const {
    if (sizeof(opmath_t) >= sizeof(double)) return false;
    const opmath_t s = ww + wg + wm + gg + gm + mm;
    const opmath_t tiny = static_cast<opmath_t>(0x1p-100);
    return !(s - s == opmath_t(0)) || ww < tiny || gg < tiny;
  }
};


// Whether the coefficients of `up` are normal numbers (or zero, or NaN) of opmath_t; if not,
// the update is written in double (docs/ALGORITHMS.md 6.7).
template <typename opmath_t>
__device__ __forceinline__ bool fits_opmath(const Update& up) {
  if (sizeof(opmath_t) >= sizeof(double)) return true;
  const double cs[6] = {up.param.w, up.param.g, up.param.m, up.buf.w, up.buf.g, up.buf.m};
  bool fits = true;
#pragma unroll
  for (int k = 0; k < 6; ++k) {
    const double a = fabs(cs[k]);
    fits = fits && !(a > 3.4028234663852886e38) && !(a != 0.0 && a < 1.1754943508222875e-38);
  }
  return fits;
}

// The coefficients of an Update in compute_t precision (opmath_t, or double for coefficients
// outside its range); writes one element.
template <typename scalar_t, typename opmath_t, typename compute_t = opmath_t>
struct Writer {
  compute_t pw, pg, pm, bw, bg, bm;
  __device__ __forceinline__ explicit Writer(const Update& up)
      : pw(static_cast<compute_t>(up.param.w)), pg(static_cast<compute_t>(up.param.g)),
        pm(static_cast<compute_t>(up.param.m)), bw(static_cast<compute_t>(up.buf.w)),
        bg(static_cast<compute_t>(up.buf.g)), bm(static_cast<compute_t>(up.buf.m)) {}
  // w <- P.w w + P.g g + P.m m and m <- B.w w + B.g g + B.m m (the CPU kernel's order of
  // operations): the new w, and with has_m the new m in *m_out.
  __device__ __forceinline__ scalar_t next(compute_t wi, compute_t gi, compute_t mi, bool has_m,
                                           opmath_t* m_out) const {
    compute_t nw = fmadd(pg, gi, pw * wi);
    if (has_m) {
      nw = fmadd(pm, mi, nw);
      *m_out = static_cast<opmath_t>(fmadd(bm, mi, fmadd(bg, gi, bw * wi)));
    }
    return static_cast<scalar_t>(nw);
  }
  __device__ __forceinline__ void write(scalar_t* w, opmath_t* m, int64_t i, compute_t wi,
                                        compute_t gi, compute_t mi) const {
    w[i] = next(wi, gi, mi, m != nullptr, m != nullptr ? m + i : nullptr);
  }
};

// Writes the items this thread holds in registers (elements first + k * stride < len).
template <typename scalar_t, typename opmath_t, int N>
__device__ __forceinline__ void write_items(const Update& up, scalar_t* wp, opmath_t* mp,
                                            int64_t len, int first, int stride,
                                            const opmath_t (&w)[N], const opmath_t (&g)[N],
                                            const opmath_t (&m)[N]) {
  if (up.skip) return;
  if (fits_opmath<opmath_t>(up)) {
    const Writer<scalar_t, opmath_t> wr(up);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const int i = first + k * stride;
      if (i < len) wr.write(wp, mp, i, w[k], g[k], m[k]);
    }
  } else {
    const Writer<scalar_t, opmath_t, double> wr(up);
    for (int k = 0; k < N; ++k) {
      const int i = first + k * stride;
      if (i < len) wr.write(wp, mp, i, w[k], g[k], m[k]);
    }
  }
}

// Typed pointers of one tensor, offset to element `off`.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
struct Ptrs {
  scalar_t* w;
  const scalar_t* g;
  opmath_t* m;  // null without momentum
  __device__ __forceinline__ Ptrs(const TensorMeta& a, int64_t off)
      : w(reinterpret_cast<scalar_t*>(a.w) + off),
        g(reinterpret_cast<const scalar_t*>(a.g) + off),
        m(a.m != 0 ? reinterpret_cast<opmath_t*>(a.m) + off : nullptr) {}
  __device__ __forceinline__ Ptrs at(int64_t off) const {  // the same pointers + off elements
    Ptrs q = *this;
    q.w += off;
    q.g += off;
    if (q.m != nullptr) q.m += off;
    return q;
  }
};

// Loads this thread's items of a group held in registers (elements first + k * stride < len;
// zeros past the end) and returns their Gram sums: opmath, or double when suspect.
template <typename scalar_t, typename opmath_t, int N>
__device__ __forceinline__ Gram load_items(const Ptrs<scalar_t>& p, int64_t len, int first,
                                           int stride, opmath_t (&w)[N], opmath_t (&g)[N],
                                           opmath_t (&m)[N]) {
  const bool has_m = p.m != nullptr;
  GramAcc<opmath_t> acc;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const int i = first + k * stride;
    const bool in = i < len;
    w[k] = in ? static_cast<opmath_t>(p.w[i]) : opmath_t(0);
    g[k] = in ? static_cast<opmath_t>(p.g[i]) : opmath_t(0);
    m[k] = in && has_m ? p.m[i] : opmath_t(0);
    acc.add(w[k], g[k], m[k], has_m);
  }
  if (!acc.suspect()) return acc.to_double();
  GramAcc<double> exact;
#pragma unroll
  for (int k = 0; k < N; ++k) exact.add(w[k], g[k], m[k], has_m);  // padding items are zeros
  return exact.to_double();
}

// ---- element loops with 16-byte accesses ------------------------------------------------------
// The streaming loops (the Gram sums of groups read in place, the writes of an Update, the
// Euclidean kernels) access w and g in vectors of kVec elements (16 bytes: 4 fp32, 8 bf16/fp16,
// 2 fp64) and the opmath state (m, v) in the same number of elements (16 or 32 bytes), when
// every stream of the loop is 16-byte aligned; thread t takes vectors t, t + kThreads, ...,
// then the elements past the last whole vector one at a time (tail), as do unaligned streams.

template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));

template <typename T, int N>
struct alignas(16) VecOf {  // N values of T moved as whole 16-byte words
  T v[N];
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* p, T (&out)[N]) {
  const VecOf<T, N> x = *reinterpret_cast<const VecOf<T, N>*>(p);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = x.v[k];
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const T (&in)[N]) {
  VecOf<T, N> x;
#pragma unroll
  for (int k = 0; k < N; ++k) x.v[k] = in[k];
  *reinterpret_cast<VecOf<T, N>*>(p) = x;
}

// The number of whole vectors of n elements that the vector loop of these streams takes: 0 when
// one of them (null: absent) is not 16-byte aligned.
template <typename scalar_t>
__device__ __forceinline__ int64_t vector_count(int64_t n, const void* a, const void* b,
                                                const void* c = nullptr,
                                                const void* d = nullptr) {
  const bool ok = aligned16(a) && aligned16(b) && (c == nullptr || aligned16(c)) &&
                  (d == nullptr || aligned16(d));
  return ok ? n / kVec<scalar_t> : 0;
}

// Loads vector j (elements j * V ... j * V + V - 1) of w, g and, when present, m.
template <typename scalar_t, typename opmath_t, int V>
__device__ __forceinline__ void load_wgm(const Ptrs<scalar_t, opmath_t>& p, int64_t j,
                                         scalar_t (&w)[V], scalar_t (&g)[V], opmath_t (&m)[V]) {
  load_vec<V>(p.w + j * V, w);
  load_vec<V>(p.g + j * V, g);
  if (p.m != nullptr) load_vec<V>(p.m + j * V, m);
}

// The element loops below take this thread's share of n elements: vectors first, first +
// kStride, ... (when every stream is aligned), then tail elements nv * V + first, + kStride, ...
// kStride = kThreads with first = threadIdx.x: a block's elements shared by its threads;
// kStride = 1 with first = 0: all n elements by one thread, in order (groups of at most
// kThreadGroup).

// This thread's sums of the Gram matrix of its share of n elements, in acc_t (opmath_t, or
// double).
template <typename acc_t, int kStride, typename scalar_t, typename opmath_t>
__device__ __forceinline__ GramAcc<acc_t> gram_sums(const Ptrs<scalar_t>& p, int64_t n,
                                                    int64_t first) {
  constexpr int V = kVec<scalar_t>;
  GramAcc<acc_t> acc;
  const bool has_m = p.m != nullptr;
  const int64_t nv = vector_count<scalar_t>(n, p.w, p.g, p.m);
  for (int64_t j = first; j < nv; j += kStride) {
    scalar_t w[V], g[V];
    opmath_t m[V];
    load_wgm(p, j, w, g, m);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      acc.add(static_cast<acc_t>(static_cast<opmath_t>(w[k])),
              static_cast<acc_t>(static_cast<opmath_t>(g[k])),
              has_m ? static_cast<acc_t>(m[k]) : acc_t(0), has_m);
    }
  }
  for (int64_t i = nv * V + first; i < n; i += kStride) {
    acc.add(static_cast<acc_t>(static_cast<opmath_t>(p.w[i])),
            static_cast<acc_t>(static_cast<opmath_t>(p.g[i])),
            has_m ? static_cast<acc_t>(p.m[i]) : acc_t(0), has_m);
  }
  return acc;
}

// This thread's share of the Gram matrix of n <= kChunk elements: opmath sums, or double ones
// (the same elements again) when those are suspect.
template <typename scalar_t, typename opmath_t, int kStride = kThreads>
__device__ Gram chunk_gram(const Ptrs<scalar_t>& p, int64_t n, int64_t first) {
  const GramAcc<opmath_t> acc = gram_sums<opmath_t, kStride, scalar_t, opmath_t>(p, n, first);
  if (!acc.suspect()) return acc.to_double();
  return gram_sums<double, kStride, scalar_t, opmath_t>(p, n, first).to_double();
}

// This thread's share of the Gram matrix of n elements: chunk by chunk of kChunk elements, each
// chunk's opmath sums added in double (one chunk: chunk_gram's result, bit for bit).
template <typename scalar_t, typename opmath_t>
__device__ Gram thread_gram(const Ptrs<scalar_t>& p, int64_t n) {
  Gram sum = chunk_gram<scalar_t, opmath_t>(p, min64(kChunk, n), threadIdx.x);
  for (int64_t begin = kChunk; begin < n; begin += kChunk) {
    sum = GramSum()(sum, chunk_gram<scalar_t, opmath_t>(p.at(begin), min64(kChunk, n - begin),
                                                        threadIdx.x));
  }
  return sum;
}

// Writes this thread's share of n elements with `wr`.
template <int kStride, typename scalar_t, typename opmath_t, typename compute_t>
__device__ __forceinline__ void apply_writer(const Ptrs<scalar_t>& p, int64_t n,
                                             const Writer<scalar_t, opmath_t, compute_t>& wr,
                                             int64_t first) {
  constexpr int V = kVec<scalar_t>;
  const bool has_m = p.m != nullptr;
  // The double writer (coefficients outside opmath's range: rare) stays scalar: its registers
  // would not leave room for the vectors.
  const int64_t nv =
      std::is_same<compute_t, opmath_t>::value ? vector_count<scalar_t>(n, p.w, p.g, p.m) : 0;
  for (int64_t j = first; j < nv; j += kStride) {
    scalar_t w[V], g[V];
    opmath_t m[V];
    load_wgm(p, j, w, g, m);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const compute_t mk = has_m ? static_cast<compute_t>(m[k]) : compute_t(0);
      w[k] = wr.next(static_cast<compute_t>(static_cast<opmath_t>(w[k])),
                     static_cast<compute_t>(static_cast<opmath_t>(g[k])), mk, has_m, &m[k]);
    }
    store_vec<V>(p.w + j * V, w);
    if (has_m) store_vec<V>(p.m + j * V, m);
  }
  for (int64_t i = nv * V + first; i < n; i += kStride) {
    const compute_t mi = has_m ? static_cast<compute_t>(p.m[i]) : compute_t(0);
    wr.write(p.w, p.m, i, static_cast<compute_t>(static_cast<opmath_t>(p.w[i])),
             static_cast<compute_t>(static_cast<opmath_t>(p.g[i])), mi);
  }
}

// Writes this thread's share of n elements with `up` (nothing when up.skip): in opmath, or in
// double when a coefficient of `up` is outside opmath's normal range.
template <typename scalar_t, typename opmath_t, int kStride = kThreads>
__device__ void thread_apply(const Ptrs<scalar_t>& p, int64_t n, const Update& up,
                             int64_t first) {
  if (up.skip) return;
  if (fits_opmath<opmath_t>(up)) {
    apply_writer<kStride>(p, n, Writer<scalar_t, opmath_t>(up), first);
  } else {
    apply_writer<kStride>(p, n, Writer<scalar_t, opmath_t, double>(up), first);
  }
}

// The Gram sums given for group `group` of tensor `a` (a.gram != 0).
__device__ __forceinline__ Gram given_gram(const TensorMeta& a, int64_t group) {
  return gram_row(reinterpret_cast<const double*>(a.gram), group);
}

// The length of group `group` of tensor `a` as the solve sees it: with given sums, the table's
// (the group may extend beyond this tensor, cut across ranks).
__device__ __forceinline__ int64_t solve_len(const TensorMeta& a, int64_t group) {
  return a.gram != 0 ? gram_row_len(reinterpret_cast<const double*>(a.gram), group) : a.group;
}

// Shared memory of a short-group kernel's block: the block reduction, or one warp reduction
// per warp, and the step of each warp's group (of the block's group: up[0]).
struct ShortShared {
  typename BlockGramReduce::TempStorage block;
  typename WarpGramReduce::TempStorage warp[kWarps];
  Update up[kWarps];
};

// The number of work units of a tensor in the short-group kernels (groups of at most
// kShortGroup elements): one per kThreads groups of at most kThreadGroup, one per kWarps groups
// of at most kWarpGroup, one per longer group.
inline int64_t short_units(int64_t group, int64_t groups) {
  if (group <= kThreadGroup) return ceil_div(groups, kThreads);
  return group <= kWarpGroup ? ceil_div(groups, kWarps) : groups;
}

// Steps work unit `unit` of tensor `a` (a.group <= kShortGroup), the short-group kernels of
// psi_sgd_ and psi_adam_, and returns after a barrier (`sh` may then be reused):
// * groups of at most kThreadGroup elements: one thread per group (kThreads consecutive groups
//   per unit) sums, solves and writes its group: the solves of a warp run side by side instead
//   of one lane solving while 31 wait; the group's elements are read twice, the second time from
//   L1 (a block's groups: at most 256 * 32 elements);
// * groups of at most kWarpGroup elements: one warp per group (kWarps consecutive groups per
//   unit); each lane holds its elements in registers, a warp reduction, lane 0 solves, the
//   lanes write from their registers;
// * at most kRegisterGroup: one block per group, held in registers the same way;
// * longer: one block per group, reduced in a first read and written in a second (which finds
//   the group in L1/L2).
// `solve(G, group)` is called by one thread per group with the group's Gram sums (the given ones
// when a.gram is set: then no reduction) and returns its step. A block-wide call.
template <typename scalar_t, typename Solve>
__device__ __forceinline__ void step_short_unit(const TensorMeta& a, int64_t unit,
                                                ShortShared& sh, const Solve& solve) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t len = a.group;
  // The branches on len and a.gram are the same for the whole block (they belong to the tensor),
  // the one on `group` for a whole warp.
  if (len <= kThreadGroup) {
    const int64_t group = unit * kThreads + threadIdx.x;
    if (group < a.numel / len) {
      const Ptrs<scalar_t> p(a, group * len);
      const Gram G = a.gram != 0 ? given_gram(a, group)
                                 : chunk_gram<scalar_t, opmath_t, 1>(p, len, 0);  // in order
      thread_apply<scalar_t, opmath_t, 1>(p, len, solve(G, group), 0);
    }
  } else if (len <= kWarpGroup) {
    const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
    const int64_t group = unit * kWarps + warp;
    if (group < a.numel / len) {
      const Ptrs<scalar_t> p(a, group * len);
      opmath_t w[kItems], g[kItems], m[kItems];
      const Gram part = load_items<scalar_t>(p, len, lane, 32, w, g, m);
      const Gram G = a.gram != 0 ? given_gram(a, group)
                                 : WarpGramReduce(sh.warp[warp]).Reduce(part, GramSum());
      if (lane == 0) sh.up[warp] = solve(G, group);  // G: lane 0 only
      __syncwarp();
      write_items<scalar_t>(sh.up[warp], p.w, p.m, len, lane, 32, w, g, m);
    }
  } else if (len <= kRegisterGroup) {
    const Ptrs<scalar_t> p(a, unit * len);
    opmath_t w[kItems], g[kItems], m[kItems];
    const Gram part = load_items<scalar_t>(p, len, threadIdx.x, kThreads, w, g, m);
    const Gram G = a.gram != 0 ? given_gram(a, unit)
                               : BlockGramReduce(sh.block).Reduce(part, GramSum());
    if (threadIdx.x == 0) sh.up[0] = solve(G, unit);  // G: thread 0 only
    __syncthreads();
    write_items<scalar_t>(sh.up[0], p.w, p.m, len, threadIdx.x, kThreads, w, g, m);
  } else {
    const Ptrs<scalar_t> p(a, unit * len);
    const Gram G = a.gram != 0 ? given_gram(a, unit)
                               : BlockGramReduce(sh.block).Reduce(
                                     thread_gram<scalar_t, opmath_t>(p, len), GramSum());
    if (threadIdx.x == 0) sh.up[0] = solve(G, unit);
    __syncthreads();
    thread_apply<scalar_t, opmath_t>(p, len, sh.up[0], threadIdx.x);
  }
  __syncthreads();  // sh is reused by the next unit
}

// Chunk `unit` of a long-group tensor: its group's index within the tensor and its elements.
struct ChunkOfGroup {
  int64_t group, begin, len;
};

__device__ __forceinline__ ChunkOfGroup chunk_of_group(const TensorMeta& a, int64_t unit) {
  const int64_t local = unit - a.first_unit;
  const int64_t group = local / a.chunks;
  const int64_t start = (local % a.chunks) * kChunk;
  return ChunkOfGroup{group, group * a.group + start, min64(kChunk, a.group - start)};
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    psi_long_reduce_kernel(const TensorMeta* metas, int64_t num_tensors, int64_t num_chunks,
                           Gram* partials, const float* found_inf) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (skip_step(found_inf)) return;
  PSI_SHARED(typename BlockGramReduce::TempStorage, temp);
  for (int64_t unit = blockIdx.x; unit < num_chunks; unit += gridDim.x) {
    const TensorMeta& a = find_tensor<&TensorMeta::first_unit>(metas, num_tensors, unit);
    if (a.gram != 0) continue;  // given sums (the branch is the same for the whole block)
    const ChunkOfGroup c = chunk_of_group(a, unit);
    const Gram part = thread_gram<scalar_t, opmath_t>(Ptrs<scalar_t>(a, c.begin), c.len);
    const Gram G = BlockGramReduce(temp).Reduce(part, GramSum());
    if (threadIdx.x == 0) partials[unit] = G;
    __syncthreads();  // temp is reused by the next chunk
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    psi_long_apply_kernel(const TensorMeta* metas, int64_t num_tensors, int64_t num_chunks,
                          const Update* updates, const float* found_inf, StepBump bump) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (skip_step(found_inf)) return;
  for (int64_t unit = blockIdx.x; unit < num_chunks; unit += gridDim.x) {
    const TensorMeta& a = find_tensor<&TensorMeta::first_unit>(metas, num_tensors, unit);
    const ChunkOfGroup c = chunk_of_group(a, unit);
    thread_apply<scalar_t, opmath_t>(Ptrs<scalar_t>(a, c.begin), c.len,
                                     updates[a.first_group + c.group], threadIdx.x);
  }
  bump_steps_when_last(bump);
}


// The Gram sums of long group j (its tensor `a`): the partials of its chunks added in a fixed
// order (results do not depend on timing); the result is in thread 0. A block-wide call.
__device__ __forceinline__ Gram long_group_gram(const TensorMeta& a, int64_t j,
                                                const Gram* partials,
                                                typename BlockGramReduce::TempStorage& temp) {
  const Gram* part = partials + a.first_unit + (j - a.first_group) * a.chunks;
  Gram sum{0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t c = threadIdx.x; c < a.chunks; c += kThreads) sum = GramSum()(sum, part[c]);
  return BlockGramReduce(temp).Reduce(sum, GramSum());
}

// A call with no kernel of its own (every tensor empty) still advances its steps.
__global__ void increment_steps_kernel(const int64_t* steps, int64_t n, const float* found_inf) {
  if (skip_step(found_inf)) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    atomicAdd(reinterpret_cast<float*>(steps[i]), 1.0f);
  }
}

int64_t address(const void* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p)); }

// The tables of one call: which tensors go to which kernel, and how many units each launch has.
struct Plan {
  std::vector<TensorMeta> shorts, longs, plains;
  std::vector<int64_t> steps;  // every step, empty tensors included
  int64_t short_units = 0, long_chunks = 0, long_groups = 0, plain_chunks = 0;
};

// bufs: empty (no buffer) or one per param; second_moments: empty (psi_sgd_) or one per param.
// steps: one per param, or empty (psi_grams). grams_in: null, or the (groups, 7) float64 table
// of given Gram sums (psi_sgd_/psi_adam_); grams_out: null, or the table psi_grams writes.
Plan make_plan(at::TensorList params, const std::vector<at::Tensor>& grads, at::TensorList bufs,
               at::TensorList second_moments, at::TensorList steps, int64_t manifold,
               int64_t block_rows, const double* grams_in = nullptr,
               double* grams_out = nullptr) {
  Plan plan;
  int64_t first_row = 0;  // grams row of the tensor's first group
  for (size_t i = 0; i < params.size(); ++i) {
    if (!steps.empty()) plan.steps.push_back(address(steps[i].data_ptr<float>()));
    const at::Tensor& p = params[i];
    if (p.numel() == 0) continue;
    TensorMeta a{};
    a.w = address(p.data_ptr());
    a.g = address(grads[i].data_ptr());
    a.m = bufs.empty() ? 0 : address(bufs[i].data_ptr());
    a.v = second_moments.empty() ? 0 : address(second_moments[i].data_ptr());
    a.step = steps.empty() ? 0 : address(steps[i].data_ptr<float>());
    a.numel = p.numel();
    if (grams_in != nullptr) a.gram = address(grams_in + kGramCols * first_row);
    if (grams_out != nullptr) a.gram_out = address(grams_out + kGramCols * first_row);
    if (manifold != kEuclidean) first_row += num_groups(p, manifold, block_rows);
    if (manifold == kEuclidean) {
      a.first_unit = plan.plain_chunks;
      plan.plain_chunks += ceil_div(a.numel, kChunk);
      plan.plains.push_back(a);
      continue;
    }
    a.group = group_size(p, manifold, block_rows);  // >= 1 since numel > 0
    const int64_t groups = a.numel / a.group;
    if (a.group <= kShortGroup) {
      a.first_unit = plan.short_units;
      plan.short_units += short_units(a.group, groups);
      plan.shorts.push_back(a);
    } else {
      a.chunks = ceil_div(a.group, kChunk);
      a.first_unit = plan.long_chunks;
      a.first_group = plan.long_groups;
      plan.long_chunks += groups * a.chunks;
      plan.long_groups += groups;
      plan.longs.push_back(a);
    }
  }
  return plan;
}

// The device copy of a plan's tables: shorts, longs, plains (TensorMeta rows), the steps, and
// the zero word the last kernel's blocks count their arrivals in (StepBump).
struct DeviceTables {
  at::Tensor storage;
  const TensorMeta *shorts, *longs, *plains;
  const int64_t* steps;
  int64_t num_steps;
  unsigned long long* arrived;
  StepBump bump() const { return StepBump{steps, num_steps, arrived}; }
};

DeviceTables upload_plan(const Plan& plan, const at::Device& device, dev::Stream stream) {
  // Tables -> device without waiting; graph-safe under CUDA graph capture (device_table.cuh).
  std::vector<int64_t> words;
  words.reserve((plan.shorts.size() + plan.longs.size() + plan.plains.size()) * kMetaWords +
                plan.steps.size() + 1);
  for (const std::vector<TensorMeta>* table : {&plan.shorts, &plan.longs, &plan.plains}) {
    for (const TensorMeta& a : *table) {
      const int64_t* row = reinterpret_cast<const int64_t*>(&a);
      words.insert(words.end(), row, row + kMetaWords);
    }
  }
  words.insert(words.end(), plan.steps.begin(), plan.steps.end());
  words.push_back(0);  // arrived (StepBump)
  const at::Tensor dev =
      upload_words(words.data(), static_cast<int64_t>(words.size()), device, stream);
  DeviceTables d;
  d.storage = dev;
  d.shorts = reinterpret_cast<const TensorMeta*>(dev.data_ptr<int64_t>());
  d.longs = d.shorts + plan.shorts.size();
  d.plains = d.longs + plan.longs.size();
  d.steps = reinterpret_cast<const int64_t*>(d.plains + plan.plains.size());
  d.num_steps = static_cast<int64_t>(plan.steps.size());
  d.arrived = reinterpret_cast<unsigned long long*>(const_cast<int64_t*>(d.steps + d.num_steps));
  return d;
}

// Which kernel of a psi_sgd_/psi_adam_ call advances the steps: the last one launched (short
// groups, then long groups, then Euclidean tensors), or increment_steps_kernel when none is.
struct StepBumps {
  StepBump shorts, longs, plains;
  bool own_kernel;
};
inline StepBumps step_bumps(const Plan& plan, const DeviceTables& tables) {
  StepBumps b{};
  if (plan.plain_chunks > 0) {
    b.plains = tables.bump();
  } else if (plan.long_groups > 0) {
    b.longs = tables.bump();
  } else if (plan.short_units > 0) {
    b.shorts = tables.bump();
  } else {
    b.own_kernel = true;
  }
  return b;
}

}  // namespace
}  // namespace psi
