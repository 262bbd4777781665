// Math of Batch Normalization Preconditioning (docs/ALGORITHMS.md section 4), shared by the CPU and
// CUDA kernels. The kernels only reduce sums and loop over elements; every formula is here.
//
// Statistics. Each preconditioned layer keeps, per input channel, moving averages of the first
// moment mu and of the second moment s of its input. They are stored bias-corrected: with
// c_t = 1 - (1 - rho)^t the corrected average obeys
//     x_t = (1 - a_t) x_{t-1} + a_t batch_t,   a_t = rho / c_t   (a_1 = 1),
// which is the EMA divided by c_t, so the state needs no separate raw copy and after the first
// forward it holds exactly that batch's mean and mean of squares.
//
// Preconditioning. For z = W x + b (W: out x in; conv weights: out x in/groups x kernel), per
// input channel c:
//     with a bias:    G'[o,c,k] = (G[o,c,k] - g_b[o] mu[c]) / (max(s - mu^2, 0)[c] + eps)
//                     g_b'[o]   = g_b[o] - sum_{c,k} G'[o,c,k] mu[c]
//     without a bias: G'[o,c,k] = G[o,c,k] / (s[c] + eps)       (no centering possible)
// i.e. G' = (G - g_b shift[c]) inv[c] with the per-channel pair of bnp_channel() below.
#pragma once

#include <cmath>

#include "psi/math.h"

namespace psi {

// Weight of the batch in the bias-corrected average at the update that follows `step` updates.
PSI_HD double bnp_batch_weight(double momentum, double step) {
  const double t = step + 1.0;
  if (t <= 1.0 || momentum >= 1.0) return 1.0;
  return momentum / (1.0 - pow(1.0 - momentum, t));
}

// x_t = (1 - a) x_{t-1} + a batch; with a = 1 the batch value exactly.
PSI_HD double bnp_blend(double old, double batch, double a) { return (1.0 - a) * old + a * batch; }

// Per input channel coefficients: G' = (G - g_b shift) inv.
struct BnpChannel {
  double shift, inv;
};

PSI_HD BnpChannel bnp_channel(double mean, double sqmean, double eps, bool centered) {
  if (centered) {
    double var = sqmean - mean * mean;
    if (!(var > 0.0)) var = 0.0;
    return BnpChannel{mean, 1.0 / (var + eps)};
  }
  return BnpChannel{0.0, 1.0 / (sqmean + eps)};
}

// One element of the preconditioned weight gradient; g and gb already carry the gradient factor.
template <typename T>
PSI_HD T bnp_grad(T g, T gb, T shift, T inv) {
  return (g - gb * shift) * inv;
}

// The preconditioned bias gradient from the row sum acc = sum_{c,k} G'[o,c,k] shift[c].
PSI_HD double bnp_bias_grad(double gb, double acc) { return gb - acc; }

// One torch.optim.SGD step of an element with an already preconditioned (and unscaled) gradient
// gp: the coefficients of the new parameter and buffer in the basis (w, gp, m).
PSI_HD Update bnp_sgd_update(const SgdOptions& o, bool first) {
  return euclidean_sgd_update(o, 1.0, first);
}

}  // namespace psi
