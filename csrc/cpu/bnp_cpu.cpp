// CPU implementation of the BNP ops (math: psi/bnp.h).
//
// bnp_update_stats_: the input, seen as [outer, channels, inner] in memory order, is cut into
// items of about kStatsItem elements (row blocks when inner == 1, (channel, outer block) pairs
// otherwise); each item writes its per-channel double sums to its own slot and the slots are
// added in a fixed order, so the result does not depend on the thread count.
// bnp_precondition_ / bnp_sgd_: work items are blocks of output channels (rows); a row is
// preconditioned, summed for the bias and (bnp_sgd_) stepped in one pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "psi/bnp.h"
#include "psi/ops.h"
#include "cpu_clones.h"

namespace psi {
namespace {

constexpr int64_t kStatsItem = 1 << 15;  // elements per statistics work item
constexpr int64_t kRowsItem = 1 << 15;   // elements per row-block work item


// ---------------------------------------------------------------- statistics
//
// Sums run in acc_t (float; double for double input, at::opmath_type) over short blocks and are
// added up in double (docs/ALGORITHMS.md: accumulate in fp32, fp64 for the per-channel sums).

constexpr int64_t kLanes = 32;       // independent accumulators of a contiguous run
constexpr int64_t kRunFlush = 1024;  // elements summed in acc_t lanes before adding to double
constexpr int64_t kRowFlush = 64;    // rows summed in acc_t before adding to double
constexpr int64_t kShortRun = 64;    // runs shorter than this are summed as columns of rows

#define PSI_CPU_LOOPS "bnp_loops.inc"
#include "cpu_dispatch_loops.h"

// The loops of bnp_loops.inc for the CPU the process runs on.
template <typename scalar_t, typename acc_t>
void sum_runs(const scalar_t* x, int64_t stride, int64_t runs, int64_t n, double* sum,
              double* sq) {
  PSI_CPU_CALL((x, stride, runs, n, sum, sq), sum_runs_loop<scalar_t, acc_t>);
}

template <typename scalar_t, typename acc_t>
void sum_columns(const scalar_t* x, int64_t r0, int64_t r1, int64_t W, double* sum, double* sq,
                 acc_t* ps, acc_t* pq) {
  PSI_CPU_CALL((x, r0, r1, W, sum, sq, ps, pq), sum_columns_loop<scalar_t, acc_t>);
}


// Per-channel sums of a [outer, C, inner] input into sum/sq (length C), deterministically: the
// work is cut into items independent of the thread count, and their partial sums are added in
// item order.
template <typename scalar_t>
void channel_sums(const scalar_t* x, int64_t outer, int64_t C, int64_t inner, double* sum,
                  double* sq) {
  using acc_t = at::opmath_type<scalar_t>;
  if (inner < kShortRun) {
    // Rows of W = C * inner columns (Linear and channels-last inputs: inner == 1); each item
    // sums a block of rows per column, the columns of a channel are added at the end.
    const int64_t W = C * inner;
    const int64_t rows_per_item = std::max<int64_t>(1, kStatsItem / std::max<int64_t>(W, 1));
    const int64_t items = (outer + rows_per_item - 1) / rows_per_item;
    std::vector<double> part(static_cast<size_t>(items * 2 * W), 0.0);
    at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> scratch(static_cast<size_t>(2 * W));
      for (int64_t it = i0; it < i1; ++it) {
        double* ps = part.data() + it * 2 * W;
        sum_columns<scalar_t, acc_t>(x, it * rows_per_item,
                                     std::min(outer, (it + 1) * rows_per_item), W, ps, ps + W,
                                     scratch.data(), scratch.data() + W);
      }
    });
    for (int64_t it = 0; it < items; ++it) {
      const double* ps = part.data() + it * 2 * W;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t k = 0; k < inner; ++k) {
          sum[c] += ps[c * inner + k];
          sq[c] += ps[W + c * inner + k];
        }
      }
    }
    return;
  }
  // Long runs (NCHW-like): items are (channel, block of outer indices).
  const int64_t outer_per_item = std::max<int64_t>(1, kStatsItem / inner);
  const int64_t blocks = (outer + outer_per_item - 1) / outer_per_item;
  std::vector<double> part(static_cast<size_t>(blocks * C * 2), 0.0);
  at::parallel_for(0, blocks * C, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t c = it / blocks, b = it % blocks;
      double s = 0, q = 0;
      const int64_t o0 = b * outer_per_item, o1 = std::min(outer, o0 + outer_per_item);
      sum_runs<scalar_t, acc_t>(x + (o0 * C + c) * inner, C * inner, o1 - o0, inner, &s, &q);
      part[2 * it] = s;
      part[2 * it + 1] = q;
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t b = 0; b < blocks; ++b) {
      sum[c] += part[2 * (c * blocks + b)];
      sq[c] += part[2 * (c * blocks + b) + 1];
    }
  }
}

void bnp_update_stats_cpu(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& sqmean,
                          const at::Tensor& step, int64_t channel_dim, double momentum,
                          const std::optional<at::Tensor>& batches) {
  const StatsLayout L =
      checked_stats_layout(input, mean, sqmean, step, channel_dim, momentum, batches);
  const int64_t count = L.outer * L.inner;
  if (L.x.numel() == 0 || count == 0) return;
  if (batches.has_value()) *batches->data_ptr<float>() += 1.0f;  // every non-empty batch
  const int64_t C = L.channels;
  std::vector<double> sum(C, 0.0), sq(C, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, L.x.scalar_type(), "bnp_stats", [&] {
    channel_sums(L.x.const_data_ptr<scalar_t>(), L.outer, C, L.inner, sum.data(), sq.data());
  });
  // A batch with an inf or a NaN (or squares that overflow the sums) does not enter the
  // averages and does not count as a step (docs/ALGORITHMS.md 4.4).
  for (int64_t c = 0; c < C; ++c) {
    if (!(sum[c] - sum[c] == 0.0) || !(sq[c] - sq[c] == 0.0)) return;
  }
  float* t = step.data_ptr<float>();
  const double a = bnp_batch_weight(momentum, static_cast<double>(*t));
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bnp_stats_blend", [&] {
    scalar_t* mu = mean.data_ptr<scalar_t>();
    scalar_t* s = sqmean.data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      mu[c] = static_cast<scalar_t>(bnp_blend(mu[c], sum[c] / count, a));
      s[c] = static_cast<scalar_t>(bnp_blend(s[c], sq[c] / count, a));
    }
  });
  *t += 1.0f;
}

// ---------------------------------------------------------------- preconditioning

// Per input channel (shift, inv) of one layer, in opmath_t.
template <typename opmath_t>
std::vector<opmath_t> channel_table(const at::Tensor& mean, const at::Tensor& sqmean, double eps,
                                    bool centered) {
  const int64_t C = mean.numel();
  std::vector<opmath_t> tab(static_cast<size_t>(2 * C));
  const at::Tensor mu = mean.to(at::kDouble), s = sqmean.to(at::kDouble);
  const double* pm = mu.const_data_ptr<double>();
  const double* ps = s.const_data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    const BnpChannel ch = bnp_channel(pm[c], ps[c], eps, centered);
    tab[c] = static_cast<opmath_t>(ch.shift);
    tab[C + c] = static_cast<opmath_t>(ch.inv);
  }
  return tab;
}

template <typename scalar_t, typename opmath_t>
double bnp_row(scalar_t* g, scalar_t* w, opmath_t* m, const RowLayout& L, const opmath_t* sh,
               const opmath_t* iv, opmath_t f, opmath_t gb, const Update& up) {
  PSI_CPU_CALL((g, w, m, L, sh, iv, f, gb, up), bnp_row_loop<scalar_t, opmath_t>);
}

// A layer of one call, prepared for the row loop.
template <typename scalar_t, typename opmath_t>
struct Layer {
  RowLayout L;
  scalar_t *g, *w, *b, *gb;  // w, b: nullptr for bnp_precondition_; b, gb: nullptr without bias
  const scalar_t* gb_in;     // bias gradient read by bnp_sgd_
  opmath_t *m, *mb;          // momentum buffers or nullptr
  std::vector<opmath_t> tab; // shift[C], inv[C]
  int64_t per_group;
};

// Runs every row of every layer: one at::parallel_for over blocks of rows.
template <typename scalar_t, typename opmath_t>
void run_rows(std::vector<Layer<scalar_t, opmath_t>>& layers, opmath_t f, const Update& up) {
  struct Item { size_t layer; int64_t r0, r1; };
  std::vector<Item> items;
  for (size_t li = 0; li < layers.size(); ++li) {
    const RowLayout& L = layers[li].L;
    const int64_t rows_per_item = std::max<int64_t>(1, kRowsItem / std::max<int64_t>(L.row_len, 1));
    for (int64_t r = 0; r < L.rows; r += rows_per_item) {
      items.push_back({li, r, std::min(L.rows, r + rows_per_item)});
    }
  }
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      Layer<scalar_t, opmath_t>& Y = layers[items[it].layer];
      const RowLayout& L = Y.L;
      const int64_t C = static_cast<int64_t>(Y.tab.size() / 2);
      for (int64_t r = items[it].r0; r < items[it].r1; ++r) {
        const int64_t c0 = (r / Y.per_group) * L.cin_g;
        const opmath_t* sh = Y.tab.data() + c0;
        const opmath_t* iv = Y.tab.data() + C + c0;
        const int64_t off = r * L.row_len;
        const bool has_bias = Y.gb != nullptr || Y.gb_in != nullptr;
        const opmath_t gb = has_bias
            ? f * static_cast<opmath_t>(Y.w == nullptr ? Y.gb[r] : Y.gb_in[r]) : opmath_t(0);
        const double acc = bnp_row<scalar_t, opmath_t>(Y.g + off, Y.w ? Y.w + off : nullptr,
                                                       Y.m ? Y.m + off : nullptr, L, sh, iv, f,
                                                       gb, up);
        if (!has_bias) continue;
        const double gbp = bnp_bias_grad(static_cast<double>(gb), acc);
        if (Y.w == nullptr) {
          Y.gb[r] = static_cast<scalar_t>(gbp);
        } else {
          const double bi = static_cast<double>(Y.b[r]);
          const double mi = Y.mb ? static_cast<double>(Y.mb[r]) : 0.0;
          Y.b[r] = static_cast<scalar_t>(up.param.w * bi + up.param.g * gbp + up.param.m * mi);
          if (Y.mb) Y.mb[r] = static_cast<opmath_t>(up.buf.w * bi + up.buf.g * gbp + up.buf.m * mi);
        }
      }
    }
  });
}

void bnp_precondition_cpu(at::TensorList weight_grads, at::TensorList bias_grads,
                          at::TensorList means, at::TensorList sqmeans, at::IntArrayRef groups,
                          double eps) {
  check_bnp_layers("bnp_precondition_", weight_grads, bias_grads, means, sqmeans, groups, eps);
  if (weight_grads.empty()) return;
  const bool centered = !bias_grads.empty();
  // Gradients in another layout are preconditioned in a contiguous copy and copied back.
  std::vector<at::Tensor> work(weight_grads.begin(), weight_grads.end());
  std::vector<at::Tensor> bias_work(bias_grads.begin(), bias_grads.end());
  for (auto& t : work) if (!row_layout(t)) t = t.contiguous();
  for (auto& t : bias_work) if (!t.is_contiguous()) t = t.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, work[0].scalar_type(), "bnp_precondition", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<Layer<scalar_t, opmath_t>> layers;
    for (size_t i = 0; i < work.size(); ++i) {
      Layer<scalar_t, opmath_t> Y{};
      Y.L = *row_layout(work[i]);
      Y.g = work[i].data_ptr<scalar_t>();
      Y.gb = centered ? bias_work[i].data_ptr<scalar_t>() : nullptr;
      Y.tab = channel_table<opmath_t>(means[i], sqmeans[i], eps, centered);
      Y.per_group = std::max<int64_t>(1, Y.L.rows / groups[i]);
      layers.push_back(std::move(Y));
    }
    run_rows(layers, opmath_t(1), unchanged());
  });
  for (size_t i = 0; i < work.size(); ++i) {
    if (!work[i].is_same(weight_grads[i])) weight_grads[i].copy_(work[i]);
  }
  for (size_t i = 0; i < bias_work.size(); ++i) {
    if (!bias_work[i].is_same(bias_grads[i])) bias_grads[i].copy_(bias_work[i]);
  }
}

void bnp_sgd_cpu(at::TensorList weights, at::TensorList biases, at::TensorList weight_grads,
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
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return;
  const double f = grad_factor(maximize, grad_scale ? grad_scale->const_data_ptr<float>() : nullptr);
  const bool centered = !biases.empty();
  const bool has_momentum = momentum != 0.0;
  // Layers are grouped by whether their buffers are fresh: the update coefficients differ.
  for (const bool first : {true, false}) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "bnp_sgd", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      std::vector<Layer<scalar_t, opmath_t>> layers;
      std::vector<at::Tensor> keep;  // gradient copies in the parameter layout
      for (size_t i = 0; i < weights.size(); ++i) {
        if ((state_steps[i].item<float>() == 0.0f) != first) continue;
        Layer<scalar_t, opmath_t> Y{};
        Y.L = *row_layout(weights[i]);
        keep.push_back(grad_like_param(weight_grads[i], weights[i]));
        Y.g = keep.back().data_ptr<scalar_t>();
        Y.w = weights[i].data_ptr<scalar_t>();
        Y.m = has_momentum ? weight_bufs[i].data_ptr<opmath_t>() : nullptr;
        if (centered) {
          keep.push_back(bias_grads[i].contiguous());
          Y.gb_in = keep.back().const_data_ptr<scalar_t>();
          Y.b = biases[i].data_ptr<scalar_t>();
          Y.mb = has_momentum ? bias_bufs[i].data_ptr<opmath_t>() : nullptr;
        }
        Y.tab = channel_table<opmath_t>(means[i], sqmeans[i], eps, centered);
        Y.per_group = std::max<int64_t>(1, Y.L.rows / groups[i]);
        layers.push_back(std::move(Y));
      }
      if (!layers.empty()) {
        run_rows(layers, static_cast<opmath_t>(f), bnp_sgd_update(o, first));
      }
    });
  }
  increment_steps_cpu(state_steps);
}

}  // namespace

TORCH_LIBRARY_IMPL(psi_cuda, CPU, m) {
  m.impl("bnp_update_stats_", &bnp_update_stats_cpu);
  m.impl("bnp_precondition_", &bnp_precondition_cpu);
  m.impl("bnp_sgd_", &bnp_sgd_cpu);
}

}  // namespace psi
