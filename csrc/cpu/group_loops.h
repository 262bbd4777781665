// The loops and the work-item driver shared by the fused CPU kernels of the PSI ops
// (psi_sgd_cpu.cpp, psi_adam_cpu.cpp). Both solve a group from the Gram matrix of (w, g, m) and
// write w' and m' as combinations of (w, g, m); they differ only in the solve (psi/math.h,
// psi/adam.h) and in their elementwise Euclidean step.
//
// The tensors of the list are cut into work items of about kItemElems elements:
//   rows   - whole channel groups (short rows), one row after the other: reduce it (from
//            memory), solve, write it (its second read hits L1/L2). That ran 1.35-1.5x the
//            stream-limit loop on ResNet-50's channel tensors where a pipeline that wrote row r-1
//            in the loop that reduced row r ran 1.7-1.9x: rows of 1024+ values (3 streams of
//            12+ KB) do not fit in L1 twice, and that loop's cache re-reads held back its memory
//            reads (rows of 256-512 values: the same time either way);
//   chunk  - a piece of a long group (a tensor group, or a row longer than kLongGroup): its
//            partial Gram matrix is stored, the group is solved once all its chunks are reduced,
//            then a second parallel pass writes it;
//   plain  - a piece of a Euclidean tensor: elementwise, no reduction.
// One at::parallel_for runs every item; a second one runs the write pass of the chunks. Each
// thread gets an equal share of the elements. A tensor with given sums (the ops' grams=) skips
// every reduction: its rows items solve and write, its chunks only write.
// Sums of a group are combined in a fixed order, so results do not depend on the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_clones.h"
#include "psi/math.h"
#include "psi/ops.h"

namespace psi {
namespace {

constexpr int64_t kItemElems = 1 << 15;  // elements per work item
// Elements per rows item (whole rows; 2^13 to 2^19 measured the same on ResNet-50).
constexpr int64_t kRowItemElems = 1 << 17;
constexpr int64_t kLongGroup = 1 << 16;  // longer groups are reduced in chunks, in parallel
constexpr int64_t kFlush = 1 << 10;      // opmath partial sums are moved to double this often

// The two loops below are the whole per-element work. They are plain loops over restrict
// pointers that the compiler vectorizes (`#pragma omp simd`, enabled by -fopenmp-simd, lets it
// reorder the float reductions). An extension is compiled without torch's CPU-capability flags,
// where at::vec::Vectorized falls back to its generic array code: that ran 2.5x slower than
// torch's fused SGD on this loop, the plain loop runs at the same speed (benchmarks/).

// On x86-64 the loops are compiled twice and picked at run time (cpu_clones.h).

// Range of the opmath sums and coefficients (docs/ALGORITHMS.md 6.7). For float opmath the
// squares of entries beyond about 1e19 overflow and those below about 1e-19 lose bits or vanish,
// although the step itself is scale invariant. So a block whose float sums are not finite, or
// whose |w|^2 or |g|^2 is below 2^-100, is summed again in double (the square of every finite
// float is a normal double); and an update whose coefficients fall outside float's normal range
// is written in double. Ordinary rows never take these paths (a compare per block and per row).
template <typename opmath_t>
inline bool suspect_sums(opmath_t ww, opmath_t wg, opmath_t gg, opmath_t wm, opmath_t gm,
                         opmath_t mm) {
  if constexpr (sizeof(opmath_t) >= sizeof(double)) {
    return false;
  } else {
    const opmath_t s = ww + wg + gg + wm + gm + mm;
    constexpr opmath_t kTiny = 0x1p-100f;
    return !(s - s == 0) || ww < kTiny || gg < kTiny;
  }
}

template <typename opmath_t>
inline bool fits_opmath(const Update& up) {
  if constexpr (sizeof(opmath_t) >= sizeof(double)) {
    return true;
  } else {
    const double cs[6] = {up.param.w, up.param.g, up.param.m, up.buf.w, up.buf.g, up.buf.m};
    for (double c : cs) {
      const double a = std::fabs(c);  // NaN (a poisoned update) fits: it stays NaN in float
      if (a > std::numeric_limits<opmath_t>::max() ||
          (a != 0.0 && a < std::numeric_limits<opmath_t>::min()))
        return false;
    }
    return true;
  }
}

#define PSI_CPU_LOOPS "group_loops.inc"
#include "cpu_dispatch_loops.h"

// The loops of group_loops.inc for the CPU the process runs on.
template <typename scalar_t, typename opmath_t>
Gram reduce_gram(const scalar_t* w, const scalar_t* g, const opmath_t* m, int64_t n) {
  PSI_CPU_CALL((w, g, m, n), reduce_gram_loop<scalar_t, opmath_t>);
}

template <typename scalar_t, typename opmath_t>
void apply_update(scalar_t* w, const scalar_t* g, opmath_t* m, int64_t n, const Update& up) {
  PSI_CPU_CALL((w, g, m, n, up), apply_update_loop<scalar_t, opmath_t>);
}

// One tensor of a call: addresses of w, g (laid out like w) and m (null: no buffer), its size and
// the length of its groups; `given`: the Gram sums of its groups (rows of the op's grams table,
// psi/ops.h gram_row), or null to compute them.
struct GroupTensor {
  void* w;
  const void* g;
  void* m;
  int64_t numel, group;
  const double* given = nullptr;
  // The length of group `g` as the solve sees it: with given sums, the table's (the group may
  // extend beyond this tensor, cut across ranks).
  int64_t solve_len(int64_t g) const { return given != nullptr ? gram_row_len(given, g) : group; }
};

// The GroupTensors of an op's lists: w, g (a copy in the layout of w, kept alive in `keep`, when
// it has another), m (null when `bufs` is empty), sizes; with `grams` (the op's table), each
// non-empty tensor's given sums. `first_row`, if not null, receives the table row of each
// tensor's first group (the rows of empty tensors' groups: none).
inline std::vector<GroupTensor> group_tensors(at::TensorList params, at::TensorList grads,
                                              at::TensorList bufs, int64_t manifold,
                                              int64_t block_rows, const double* grams,
                                              std::vector<at::Tensor>& keep,
                                              std::vector<int64_t>* first_row = nullptr) {
  std::vector<GroupTensor> ts;
  ts.reserve(params.size());
  keep.reserve(params.size());
  int64_t row = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    keep.push_back(grad_like_param(grads[i], params[i]));
    GroupTensor a;
    a.w = params[i].data_ptr();
    a.g = keep.back().data_ptr();
    a.m = bufs.empty() ? nullptr : bufs[i].data_ptr();
    a.numel = params[i].numel();
    a.group = group_size(params[i], manifold, block_rows);
    if (first_row != nullptr) first_row->push_back(row);
    if (a.numel > 0 && manifold != kEuclidean) {
      if (grams != nullptr) a.given = grams + kGramCols * row;
      row += num_groups(params[i], manifold, block_rows);
    }
    ts.push_back(a);
  }
  return ts;
}

enum ItemKind : int { kRows, kChunk, kPlain };

struct Item {
  int kind;
  int64_t tensor;
  int64_t begin, end;  // rows for kRows, elements for kChunk/kPlain
  int64_t slot;        // kChunk: index of its partial Gram; -1 otherwise
  int64_t long_group;  // kChunk: index of its long group
};

struct LongGroup {
  int64_t tensor, offset, first_slot, num_slots;
};

// Runs one step over the tensors `ts`, all Euclidean or all PSI groups:
//   solve(tensor, group, G) -> Update  the step of group `group` (its index within the tensor)
//                                      from its Gram matrix; called once per group, also for
//                                      groups that then skip (the solve may write per-group
//                                      state, e.g. Adam's second moment, of its own group only);
//   plain(tensor, begin, end)          the elementwise step of elements [begin, end).
template <typename scalar_t, typename Solve, typename Plain>
void run_group_items(const std::vector<GroupTensor>& ts, bool euclidean, const Solve& solve,
                     const Plain& plain) {
  using opmath_t = at::opmath_type<scalar_t>;

  std::vector<Item> items;
  std::vector<LongGroup> longs;
  int64_t slots = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(ts.size()); ++t) {
    const GroupTensor& a = ts[t];
    if (a.numel == 0) continue;
    if (euclidean) {
      for (int64_t b = 0; b < a.numel; b += kItemElems)
        items.push_back({kPlain, t, b, std::min(a.numel, b + kItemElems), -1, -1});
    } else if (a.group <= kLongGroup) {
      const int64_t rows = a.numel / a.group;
      const int64_t per_item = std::max<int64_t>(1, kRowItemElems / a.group);
      for (int64_t r = 0; r < rows; r += per_item)
        items.push_back({kRows, t, r, std::min(rows, r + per_item), -1, -1});
    } else {
      for (int64_t off = 0; off < a.numel; off += a.group) {
        const int64_t first_slot = slots;
        for (int64_t b = off; b < off + a.group; b += kItemElems)
          items.push_back({kChunk, t, b, std::min(off + a.group, b + kItemElems),
                           a.given != nullptr ? -1 : slots++,
                           static_cast<int64_t>(longs.size())});
        longs.push_back({t, off, first_slot, slots - first_slot});
      }
    }
  }

  auto ptrs = [&](const GroupTensor& a, int64_t off) {
    return std::make_tuple(static_cast<scalar_t*>(a.w) + off,
                           static_cast<const scalar_t*>(a.g) + off,
                           a.m ? static_cast<opmath_t*>(a.m) + off : nullptr);
  };

  // Threads get equal shares of elements, not of items (items of small tensors are small): an
  // item belongs to the share that holds its first element.
  std::vector<int64_t> starts(items.size() + 1, 0);
  for (size_t k = 0; k < items.size(); ++k) {
    const Item& it = items[k];
    const int64_t elems = it.kind == kRows ? (it.end - it.begin) * ts[it.tensor].group
                                           : it.end - it.begin;
    starts[k + 1] = starts[k] + elems;
  }
  auto for_items = [&](const auto& body) {
    at::parallel_for(0, starts.back(), kItemElems, [&](int64_t lo, int64_t hi) {
      auto k = std::lower_bound(starts.begin(), starts.end() - 1, lo) - starts.begin();
      for (; k < static_cast<int64_t>(items.size()) && starts[k] < hi; ++k) body(items[k]);
    });
  };

  std::vector<Gram> partial(slots);
  for_items([&](const Item& it) {
    const GroupTensor& a = ts[it.tensor];
    if (it.kind == kPlain) {
      plain(it.tensor, it.begin, it.end);
    } else if (it.kind == kRows) {  // per row: reduce (or given sums), solve, write
      for (int64_t r = it.begin; r < it.end; ++r) {
        auto [w, g, m] = ptrs(a, r * a.group);
        const Gram G = a.given != nullptr ? gram_row(a.given, r) : reduce_gram(w, g, m, a.group);
        apply_update(w, g, m, a.group, solve(it.tensor, r, G));
      }
    } else if (it.slot >= 0) {
      auto [w, g, m] = ptrs(a, it.begin);
      partial[it.slot] = reduce_gram(w, g, m, it.end - it.begin);
    }
  });
  if (longs.empty()) return;

  std::vector<Update> updates(longs.size());
  for (size_t j = 0; j < longs.size(); ++j) {
    const LongGroup& lg = longs[j];
    const GroupTensor& a = ts[lg.tensor];
    const int64_t group = lg.offset / a.group;
    Gram G{0, 0, 0, 0, 0, 0};
    for (int64_t s = lg.first_slot; s < lg.first_slot + lg.num_slots; ++s) {
      const Gram& P = partial[s];
      G.ww += P.ww; G.wg += P.wg; G.wm += P.wm; G.gg += P.gg; G.gm += P.gm; G.mm += P.mm;
    }
    updates[j] = solve(lg.tensor, group, a.given != nullptr ? gram_row(a.given, group) : G);
  }
  for_items([&](const Item& it) {
    if (it.kind != kChunk) return;
    auto [w, g, m] = ptrs(ts[it.tensor], it.begin);
    apply_update(w, g, m, it.end - it.begin, updates[it.long_group]);
  });
}

}  // namespace
}  // namespace psi
