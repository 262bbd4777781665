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
                               const std::optional<at::Tensor>& found_inf);

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
                                 const std::optional<at::Tensor>& found_inf);

// Number of groups of `p`: rows for channel, 1 for tensor, elements for euclidean.
int64_t num_groups(const at::Tensor& p, int64_t manifold);

// Length of one group of `p` in memory: a row of p.view(p.size(0), -1) for the channel manifold,
// the whole tensor otherwise. Groups are contiguous blocks of memory in every layout the checks
// admit (contiguous, channels-last, any dense layout whose outermost dimension is dim 0).
int64_t group_size(const at::Tensor& p, int64_t manifold);

// `g` itself when it has the layout of `p`, else a copy of it in that layout.
at::Tensor grad_like_param(const at::Tensor& g, const at::Tensor& p);

// The dtype of the math and of the optimizer state for a parameter dtype: float for
// float/half/bfloat16, double for double.
c10::ScalarType opmath_dtype(c10::ScalarType param_dtype);

}  // namespace psi
