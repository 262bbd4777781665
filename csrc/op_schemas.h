// The schemas of all psi_cuda ops, defined once: in the psi_cuda library (csrc/ops.cpp) and, in
// the emulation build, in psi_cuda_emu (csrc/emu/emu_ops.cpp), whose ops run csrc/cuda/*.cu on
// the CPU with the same arguments.
#pragma once

#include <torch/library.h>

namespace psi {

inline void define_ops(torch::Library& m) {
  // One PSI-SGD (or, with manifold=0, torch.optim.SGD) step over a list of same-device,
  // same-dtype tensors. manifold: 0 euclidean, 1 channel (groups of block_rows consecutive rows
  // of p.view(p.size(0), -1): one row for channel groups, more for block groups), 2 tensor. retraction: 0 normalize, 1 exp, 2 none. transport: 0 project, 1 parallel.
  // momentum_buffers is empty when momentum == 0. state_steps are float32 scalars, incremented
  // unless found_inf is set; a step of 0 marks a buffer's first step.
  // grams (PSI manifolds only): the Gram sums of every group of the call, given instead of
  // computed: psi_grams' table (float64, shape (groups, 7), rows in the order of the groups,
  // tensor by tensor; columns ww, wg, wm, gg, gm, mm of the raw (w, g, m), then the group's
  // length). For groups cut across ranks (sharded parameters): each rank sums its part, the
  // table is all-reduced, and every rank writes its part with the whole group's step; the op
  // does not read the data for sums, and takes group lengths from the table.
  m.def(
      "psi_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] state_steps, *, float lr, float momentum, float dampening, bool nesterov, "
      "float weight_decay, bool maximize, int manifold, int retraction, int transport, "
      "float max_grad_norm, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "int block_rows=1, Tensor? grams=None) -> ()");
  // The Gram sums of every group (manifold 1 with block_rows, or 2) of the lists, in one read of
  // (w, g, m): float64 (groups, 7), the table that psi_sgd_'s and psi_adam_'s grams take (6 sums,
  // then the group's length). buffers: empty (m = 0) or one per param, in the opmath dtype and
  // the params' layout.
  m.def(
      "psi_grams(Tensor[] params, Tensor[] grads, Tensor[] buffers, *, int manifold, "
      "int block_rows=1) -> Tensor");

  // BNP (psi/bnp.h). Statistics of one layer input: per channel (dim channel_dim) batch mean and
  // mean of squares in one pass, folded into the bias-corrected moving averages mean/sqmean
  // (float32 or float64), step += 1. An empty batch changes nothing; a non-finite one changes
  // nothing but batches (float32 scalar, optional): batches += 1 for every non-empty batch.
  m.def(
      "bnp_update_stats_(Tensor input, Tensor(a!) mean, Tensor(b!) sqmean, Tensor(c!) step, *, "
      "int channel_dim, float momentum, Tensor(d!)? batches=None) -> ()");
  // Rewrites weight and bias gradients with the BNP formula. bias_grads is empty (no-bias
  // variant for all layers of the call) or one per weight gradient; groups: conv groups.
  m.def(
      "bnp_precondition_(Tensor(a!)[] weight_grads, Tensor(b!)[] bias_grads, Tensor[] means, "
      "Tensor[] sqmeans, *, int[] groups, float eps) -> ()");
  // BNP preconditioning fused with one torch.optim.SGD step of every weight and bias (the
  // gradients themselves are not modified). One state step per layer; buffers empty when
  // momentum == 0.
  m.def(
      "bnp_sgd_(Tensor(a!)[] weights, Tensor(b!)[] biases, Tensor[] weight_grads, "
      "Tensor[] bias_grads, Tensor(c!)[] weight_momentum_buffers, "
      "Tensor(d!)[] bias_momentum_buffers, Tensor(e!)[] state_steps, Tensor[] means, "
      "Tensor[] sqmeans, *, int[] groups, float eps, float lr, float momentum, float dampening, "
      "bool nesterov, float weight_decay, bool maximize, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  // One PSI-Adam (or, with manifold=0, torch.optim.AdamW) step over a list of same-device,
  // same-dtype tensors (docs/ALGORITHMS.md section 3). exp_avgs have the params' shapes; exp_avg_sqs
  // hold one scalar per group (shape (rows / block_rows,) for channel, () or (1,) for tensor), per element
  // for euclidean. state_steps are float32 scalars: step t = state_step + 1 sets the bias
  // corrections; incremented unless found_inf is set, in which case nothing changes at all.
  // grams: as in psi_sgd_.
  m.def(
      "psi_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] state_steps, *, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool maximize, int manifold, int retraction, "
      "int transport, float max_grad_norm, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, int block_rows=1, Tensor? grams=None) -> ()");
}

}  // namespace psi
