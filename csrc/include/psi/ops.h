// Host-side pieces shared by the CPU and CUDA implementations of the ops: argument checks (all
// done before anything is written, so a bad call changes nothing) and the layout helpers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

#include "psi/adam.h"
#include "psi/math.h"

namespace psi {

// Checks every argument of psi_sgd_ and raises a c10::Error naming the argument and what was
// expected. Afterwards: all params share one device and one floating dtype, grads match them in
// shape/dtype/device, buffers (when momentum != 0) have the opmath dtype and the params' layout,
// steps are float32 scalars on the params' device.
void check_psi_sgd_args(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                        at::TensorList steps, const SgdOptions& o,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf);

SgdOptions make_sgd_options(double lr, double momentum, double dampening, bool nesterov,
                            double weight_decay, bool maximize, int64_t manifold,
                            int64_t retraction, int64_t transport, double max_grad_norm);

// The options of a psi_sgd_ call, after check_psi_sgd_args passed: the first line of every
// psi_sgd_ kernel (CPU and CUDA), which take the op's arguments in schema order.
SgdOptions checked_sgd_options(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                               at::TensorList steps, double lr, double momentum, double dampening,
                               bool nesterov, double weight_decay, bool maximize,
                               int64_t manifold, int64_t retraction, int64_t transport,
                               double max_grad_norm, const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf, int64_t block_rows,
                               const std::optional<at::Tensor>& grams);

// Checks every argument of psi_adam_ (as check_psi_sgd_args; exp_avgs have the params' layout,
// exp_avg_sqs too for manifold=euclidean, else one contiguous element per group).
void check_psi_adam_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList steps, const AdamOptions& o,
                         const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf);

// The options of a psi_adam_ call, after check_psi_adam_args passed: the first line of every
// psi_adam_ kernel.
AdamOptions checked_adam_options(at::TensorList params, at::TensorList grads,
                                 at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                 at::TensorList steps, double lr, double beta1, double beta2,
                                 double eps, double weight_decay, bool maximize, int64_t manifold,
                                 int64_t retraction, int64_t transport, double max_grad_norm,
                                 const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf, int64_t block_rows,
                                 const std::optional<at::Tensor>& grams);

// Checks the arguments of psi_grams (as psi_sgd_'s, with buffers empty or one per param) and
// returns the number of groups of the lists.
int64_t checked_grams_args(at::TensorList params, at::TensorList grads, at::TensorList buffers,
                           int64_t manifold, int64_t block_rows);

// The table of psi_grams (and grams of psi_sgd_/psi_adam_): float64 (groups, kGramCols), a row
// per group: its 6 Gram sums (Gram's order) and its number of elements, which add up over the
// parts of a group like the sums do (a group cut across ranks: all-reduced with them).
constexpr int64_t kGramCols = 7;
PSI_HD Gram gram_row(const double* table, int64_t row) {
  const double* r = table + kGramCols * row;
  return Gram{r[0], r[1], r[2], r[3], r[4], r[5]};
}
// The group's length in a table row (an exact integer in double up to 2^53).
PSI_HD int64_t gram_row_len(const double* table, int64_t row) {
  return static_cast<int64_t>(table[kGramCols * row + 6]);
}
PSI_HD void set_gram_row(double* table, int64_t row, const Gram& G, int64_t len) {
  double* r = table + kGramCols * row;
  r[0] = G.ww; r[1] = G.wg; r[2] = G.wm; r[3] = G.gg; r[4] = G.gm; r[5] = G.mm;
  r[6] = static_cast<double>(len);
}

// Number of groups of `p`: rows / block_rows for channel, 1 for tensor, elements for euclidean.
int64_t num_groups(const at::Tensor& p, int64_t manifold, int64_t block_rows);

// Length of one group of `p` in memory: block_rows rows of p.view(p.size(0), -1) for the channel
// manifold (one row: channel groups; more: block groups, docs/ALGORITHMS.md 1.2b), the whole
// tensor otherwise. Groups are contiguous blocks of memory in every layout the checks admit
// (contiguous, channels-last, any dense layout whose outermost dimension is dim 0).
int64_t group_size(const at::Tensor& p, int64_t manifold, int64_t block_rows);

// `g` itself when it has the layout of `p`, else a copy of it in that layout.
at::Tensor grad_like_param(const at::Tensor& g, const at::Tensor& p);

// The dtype of the math and of the optimizer state for a parameter dtype: float for
// float/half/bfloat16, double for double.
c10::ScalarType opmath_dtype(c10::ScalarType param_dtype);

// --- BNP (psi/bnp.h) ---

// Memory view of a layer input for the statistics: [outer, channels, inner] in memory order
// (Linear input and channels-last conv input: inner == 1). `x` is the input itself, or a
// contiguous copy when its layout is neither contiguous nor channels-last.
struct StatsLayout {
  at::Tensor x;
  int64_t outer, channels, inner;
};

// Checks the arguments of bnp_update_stats_ (errors name the argument) and returns the layout.
StatsLayout checked_stats_layout(const at::Tensor& input, const at::Tensor& mean,
                                 const at::Tensor& sqmean, const at::Tensor& step,
                                 int64_t channel_dim, double momentum,
                                 const std::optional<at::Tensor>& batches);

// Memory view of one output channel (row) of a weight (out, in/groups, *kernel): `outer` blocks
// of `inner` elements; the input channel is the block index (contiguous conv weights) or the
// index inside a block (Linear weights and channels-last conv weights: chan_inner).
struct RowLayout {
  int64_t rows, row_len, outer, inner, cin_g;
  bool chan_inner;
};

// The row layout of `w`, or nullopt when it has neither of the two layouts above.
std::optional<RowLayout> row_layout(const at::Tensor& w);

// Checks bnp_precondition_ / bnp_sgd_ arguments shared by both (errors start with `op`): the
// weight gradients (or weights), bias list (empty or one per layer, shape (out,)), statistics
// (one float32/float64 vector of in_channels per layer), groups and eps.
void check_bnp_layers(const char* op, at::TensorList weights, at::TensorList biases,
                      at::TensorList means, at::TensorList sqmeans, at::IntArrayRef groups,
                      double eps);

// Checks everything else of bnp_sgd_ (after check_bnp_layers): grads, buffers, steps, options.
void check_bnp_sgd_args(at::TensorList weights, at::TensorList biases, at::TensorList wgrads,
                        at::TensorList bgrads, at::TensorList wbufs, at::TensorList bbufs,
                        at::TensorList steps, const SgdOptions& o,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf);

}  // namespace psi
