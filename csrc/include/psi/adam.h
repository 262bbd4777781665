// Math of PSI-Adam (docs/ALGORITHMS.md section 3) and of the torch.optim.AdamW step its Euclidean
// groups take, shared by the CPU and CUDA kernels of psi_adam_.
//
// A PSI group keeps a first-moment buffer m (tangent, scale-free, like PSI-SGD's momentum) and
// ONE second-moment scalar v. Everything a step needs is again a function of the Gram matrix of
// (w, g, m) plus the scalars v and t (|q|^2 included, q being a combination of w and g), so the
// kernels reduce once, solve the group with psi_adam_update, and write w, m (and the scalar v)
// in one pass, exactly as for PSI-SGD. Euclidean groups are elementwise (v per element):
// euclidean_adam_step below, in the order of operations of torch's fused AdamW kernel.
#pragma once

#include "psi/math.h"

namespace psi {

// Options of psi_adam_ (the Euclidean groups use lr, betas, eps, weight_decay, maximize).
struct AdamOptions {
  double lr, beta1, beta2, eps, weight_decay, max_grad_norm;
  bool maximize;
  int64_t manifold, retraction, transport;
  int64_t block_rows;  // manifold channel: rows per group (as SgdOptions)
};

// Bias corrections of step t (t = 1 on the first step): 1 - beta^t.
PSI_HD double bias_correction(double beta, double t) { return 1.0 - pow(beta, t); }

// The step of one PSI group: the new (w, m) as combinations of the old (w, g, m), the new v,
// and whether anything is written (skip: w, m and v all stay as they are).
struct AdamUpdate {
  Update up;
  double v;
};

// First moment: m <- b1 m + (1 - b1) q.
PSI_HD Combo first_moment_update(Combo q, double beta1) {
  return Combo{0.0, 0.0, beta1} + (1.0 - beta1) * q;
}

// Second moment of a group, one scalar: v <- b2 v + (1 - b2) |q|^2.
PSI_HD double second_moment_update(double v, double q_sq, double beta2) {
  return beta2 * v + (1.0 - beta2) * q_sq;
}

// Search direction d = (m / bc1) / (sqrt(v / bc2) + eps); zero when the denominator vanishes
// (q = 0 on every step so far with eps = 0: there is nowhere to go).
PSI_HD Combo adam_direction(Combo m, double v, double bc1, double bc2, double eps) {
  const double denom = sqrt(v / bc2) + eps;
  if (!(denom > 0.0)) return Combo{0.0, 0.0, 0.0};
  return (1.0 / (bc1 * denom)) * m;
}

// One PSI-Adam step of one group (docs/ALGORITHMS.md section 3). `raw` is the Gram matrix with the
// raw gradient and the old first moment, f = (maximize ? -1 : 1) / grad_scale, v the group's old
// second moment, t the number of this step (old state step + 1), numel the group's length.
// Weight decay does not apply to PSI groups (the optimizer warns).
PSI_HD AdamUpdate psi_adam_update(const Gram& raw, const AdamOptions& o, double f, double v,
                                  double t, int64_t numel) {
  if (!is_finite(gram_sum(raw))) return AdamUpdate{poisoned(raw), gram_sum(raw) * 0.0};
  const Gram G = scale_grad(raw, f);
  // A zero group has no direction; a group of length 1 is a point of the 0-sphere: neither moves.
  if (!(G.ww > 0.0) || numel < 2) return AdamUpdate{unchanged(), v};
  const double n = sqrt(G.ww);
  const Combo q = clip_norm(project_tangent(G, n), G, o.max_grad_norm);
  const double q_sq = dot(q, q, G);

  const Combo m = first_moment_update(q, o.beta1);
  const double v_new = second_moment_update(v, q_sq > 0.0 ? q_sq : 0.0, o.beta2);
  const Combo d = adam_direction(m, v_new, bias_correction(o.beta1, t),
                                 bias_correction(o.beta2, t), o.eps);

  Update up{Combo{0.0, 0.0, 0.0}, Combo{0.0, 0.0, 1.0}, false};
  if (!move_on_sphere(G, n, d, m, /*has_buf=*/true, o.lr, o.retraction, o.transport, &up)) {
    return AdamUpdate{unchanged(), v};
  }
  return AdamUpdate{fold_grad_factor(up, f), v_new};
}

// Per-call constants of the Euclidean (torch.optim.AdamW) step at step number t.
struct AdamElementwise {
  double decay;      // 1 - lr * weight_decay (decoupled weight decay)
  double step_size;  // lr / (1 - beta1^t)
  double bc2_sqrt;   // sqrt(1 - beta2^t)
  double beta1, beta2, eps;
  double f;          // factor of the raw gradient: sign for maximize, 1/grad_scale
};

PSI_HD AdamElementwise euclidean_adam_constants(const AdamOptions& o, double f, double t) {
  return AdamElementwise{1.0 - o.lr * o.weight_decay, o.lr / bias_correction(o.beta1, t),
                         sqrt(bias_correction(o.beta2, t)), o.beta1, o.beta2, o.eps, f};
}

// One element of a torch.optim.AdamW step, in opmath precision T:
//   g <- f g;  w <- w (1 - lr wd);  m <- m + (1 - b1) (g - m);  v <- b2 v + (1 - b2) g^2;
//   w <- w - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)
// c holds the constants already in T (see AdamElementwiseT).
template <typename T>
struct AdamElementwiseT {
  T decay, step_size, bc2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps, f;
  PSI_HD explicit AdamElementwiseT(const AdamElementwise& c)
      : decay(static_cast<T>(c.decay)), step_size(static_cast<T>(c.step_size)),
        bc2_sqrt(static_cast<T>(c.bc2_sqrt)), one_minus_beta1(static_cast<T>(1.0 - c.beta1)),
        beta2(static_cast<T>(c.beta2)), one_minus_beta2(static_cast<T>(1.0 - c.beta2)),
        eps(static_cast<T>(c.eps)), f(static_cast<T>(c.f)) {}
};

PSI_HD float sqrt_op(float x) { return sqrtf(x); }
PSI_HD double sqrt_op(double x) { return sqrt(x); }

template <typename T>
PSI_HD T euclidean_adam_step(T w, T g_raw, T* m, T* v, const AdamElementwiseT<T>& c) {
  const T g = c.f * g_raw;
  w = w * c.decay;
  const T m_new = *m + c.one_minus_beta1 * (g - *m);
  const T v_new = c.beta2 * *v + c.one_minus_beta2 * g * g;
  *m = m_new;
  *v = v_new;
  return w - c.step_size * m_new / (sqrt_op(v_new) / c.bc2_sqrt + c.eps);
}

}  // namespace psi
