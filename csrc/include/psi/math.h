// Math of the PSI-manifold optimizers, shared by the CPU and CUDA kernels.
//
// Every quantity a PSI-SGD step needs (the tangent gradient q, the momentum buffer, the search
// direction d, the retracted point, the transported buffer) is a linear combination of the three
// vectors a kernel holds for a group: the parameter w, the raw gradient g and the old momentum
// buffer m. So a group's step is computed in two parts:
//
//   1. one pass over the group accumulates the 6 entries of the Gram matrix of (w, g, m);
//   2. the scalar functions below turn the Gram matrix into two `Combo`s: the coefficients of the
//      new parameter and of the new buffer in the basis (w, g, m);
//   3. one more elementwise pass writes w' = P.w*w + P.g*g + P.m*m and m' = B.w*w + B.g*g + B.m*m.
//
// Part 2 is all the math, written once, in double, as small named functions that follow
// docs/ALGORITHMS.md line by line. Parts 1 and 3 are the only device-specific code. A long group
// (a whole tensor) needs no more than one reduction phase, whatever the options.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PSI_HD __host__ __device__ __forceinline__
#else
#define PSI_HD inline
#endif

namespace psi {

// Values of the integer options of the ops (the Python layer maps names to these).
enum Manifold : int64_t { kEuclidean = 0, kChannel = 1, kTensor = 2 };
enum Retraction : int64_t { kNormalize = 0, kExp = 1, kRetractNone = 2 };
enum Transport : int64_t { kProject = 0, kParallel = 1 };

// Below this geodesic length the exponential map falls back to the normalize retraction.
constexpr double kExpMinAngle = 1e-7;

// A vector of one group written as c.w * w + c.g * g + c.m * m.
struct Combo {
  double w, g, m;
};

PSI_HD Combo combo(double w, double g, double m) { return Combo{w, g, m}; }
PSI_HD Combo operator+(Combo a, Combo b) { return Combo{a.w + b.w, a.g + b.g, a.m + b.m}; }
PSI_HD Combo operator-(Combo a, Combo b) { return Combo{a.w - b.w, a.g - b.g, a.m - b.m}; }
PSI_HD Combo operator*(double s, Combo a) { return Combo{s * a.w, s * a.g, s * a.m}; }

// Gram matrix of (w, g, m) over one group. Kernels accumulate it with the raw gradient.
struct Gram {
  double ww, wg, wm, gg, gm, mm;
};

// <a, b> for two combinations of the same group.
PSI_HD double dot(Combo a, Combo b, const Gram& G) {
  return a.w * (b.w * G.ww + b.g * G.wg + b.m * G.wm) +
         a.g * (b.w * G.wg + b.g * G.gg + b.m * G.gm) +
         a.m * (b.w * G.wm + b.g * G.gm + b.m * G.mm);
}

// |a|, clamped at zero against rounding.
PSI_HD double norm(Combo a, const Gram& G) {
  const double s = dot(a, a, G);
  return s > 0.0 ? sqrt(s) : 0.0;
}

// The Gram matrix after the gradient is multiplied by f (1/grad_scale, -1 for maximize).
PSI_HD Gram scale_grad(Gram G, double f) {
  G.wg *= f;
  G.gm *= f;
  G.gg *= f * f;
  return G;
}

// The result of one step for one group: new parameter and new buffer, as combinations of the
// old (w, g, m). `skip` means: write nothing (zero group, 0-sphere, degenerate retraction).
struct Update {
  Combo param;
  Combo buf;
  bool skip;
};

PSI_HD Update unchanged() { return Update{Combo{1.0, 0.0, 0.0}, Combo{0.0, 0.0, 1.0}, true}; }

// The non-finite policy (docs/ALGORITHMS.md 6.6): a group whose w, g or m holds an inf or a NaN
// is not hidden: its new parameter and buffer are NaN, as torch.optim.SGD turns the affected
// entries NaN. The kernels sum the Gram matrix without overflow for every finite input (they
// redo a block in double when its opmath sums are not finite or too small), so a non-finite sum
// here means a non-finite input.
PSI_HD double gram_sum(const Gram& G) { return G.ww + G.wg + G.wm + G.gg + G.gm + G.mm; }
PSI_HD bool is_finite(double x) { return x - x == 0.0; }  // false for inf and NaN
PSI_HD Update poisoned(const Gram& G) {
  const double nan = gram_sum(G) * 0.0;  // inf * 0 or NaN * 0: NaN
  return Update{Combo{nan, nan, nan}, Combo{nan, nan, nan}, false};
}

// Options shared by psi_sgd_ and the Euclidean groups it also serves.
struct SgdOptions {
  double lr, momentum, dampening, weight_decay, max_grad_norm;
  bool nesterov, maximize;
  int64_t manifold, retraction, transport;
  int64_t block_rows;  // manifold channel: rows per group (1: channel groups; > 1: block groups)
};

// Tangent gradient at the unit representative u = w/n, scale-free:
//   q = n * (g - (<g,w>/|w|^2) w) = n g - (<g,w>/n) w
PSI_HD Combo project_tangent(const Gram& G, double n) { return Combo{-G.wg / n, n, 0.0}; }

// Per-group gradient clipping: q *= min(1, max_norm / |q|). max_norm <= 0 disables it.
PSI_HD Combo clip_norm(Combo q, const Gram& G, double max_norm) {
  if (max_norm > 0.0) {
    const double qn = norm(q, G);
    if (qn > max_norm) return (max_norm / qn) * q;
  }
  return q;
}

// Momentum buffer update in torch.optim.SGD's form; the first step stores the direction itself.
PSI_HD Combo momentum_update(Combo dir, double momentum, double dampening, bool first) {
  if (first) return dir;
  return Combo{0.0, 0.0, momentum} + (1.0 - dampening) * dir;
}

// Search direction: the buffer, or the Nesterov look-ahead dir + momentum * buf.
PSI_HD Combo search_direction(Combo dir, Combo buf, double momentum, bool nesterov) {
  return nesterov ? dir + momentum * buf : buf;
}

// Retraction "normalize": u' = (u - lr d) / |u - lr d| (geoopt's Sphere.retr). Returns false when
// u - lr d vanishes (the step cannot be taken).
PSI_HD bool retract_normalize(Combo u, Combo d, double lr, const Gram& G, Combo* u_new) {
  const Combo v = u - lr * d;
  const double r = norm(v, G);
  if (!(r > 0.0) || !is_finite(r)) return false;
  *u_new = (1.0 / r) * v;
  return true;
}

// Retraction "exp": the sphere's exponential map, t = lr |d|,
//   u' = cos(t) u - sin(t) d / |d|.
PSI_HD Combo retract_exp(Combo u, Combo d, double t, double d_norm) {
  return cos(t) * u - (sin(t) / d_norm) * d;
}

// Transport "project": m <- m - <m, u'> u'.
PSI_HD Combo transport_project(Combo m, Combo u_new, const Gram& G) {
  return m - dot(m, u_new, G) * u_new;
}

// Transport "parallel" along the geodesic of retract_exp, e = -d/|d| the direction of motion:
//   m <- m - <m, e> (sin(t) u + (1 - cos(t)) e)
PSI_HD Combo transport_parallel(Combo m, Combo u, Combo d, double t, double d_norm,
                                const Gram& G) {
  const Combo e = (-1.0 / d_norm) * d;
  return m - dot(m, e, G) * (sin(t) * u + (1.0 - cos(t)) * e);
}

// Coefficients of the raw gradient are wanted by the kernels: fold f back into them.
PSI_HD Update fold_grad_factor(Update up, double f) {
  up.param.g *= f;
  up.buf.g *= f;
  return up;
}

// The move shared by PSI-SGD and PSI-Adam: from the unit representative u = w/n along -lr d
// (d tangent at u) with the chosen retraction, then the buffer `buf` transported to the new
// point (when has_buf). Sets up->param (the new w) and up->buf; returns false when the
// retraction degenerates (u - lr d = 0): the group must then not change.
PSI_HD bool move_on_sphere(const Gram& G, double n, Combo d, Combo buf, bool has_buf, double lr,
                           int64_t retraction, int64_t transport, Update* up) {
  const Combo u{1.0 / n, 0.0, 0.0};
  Combo u_new{0.0, 0.0, 0.0};
  bool geodesic = false;
  double t = 0.0, d_norm = 0.0;
  if (retraction == kRetractNone) {
    // The plain quotient move w' = w - lr n d; its unit representative feeds the transport.
    up->param = Combo{1.0, 0.0, 0.0} - (lr * n) * d;
    const double r = norm(up->param, G);
    if (!(r > 0.0) || !is_finite(r)) return false;
    u_new = (1.0 / r) * up->param;
  } else {
    if (retraction == kExp) {
      d_norm = norm(d, G);
      t = lr * d_norm;
      geodesic = t >= kExpMinAngle;
    }
    if (geodesic) {
      u_new = retract_exp(u, d, t, d_norm);
    } else if (!retract_normalize(u, d, lr, G, &u_new)) {
      return false;
    }
    up->param = n * u_new;
  }
  if (has_buf) {
    up->buf = (transport == kParallel && geodesic) ? transport_parallel(buf, u, d, t, d_norm, G)
                                                   : transport_project(buf, u_new, G);
  }
  return true;
}

// One PSI-SGD step of one group (docs/ALGORITHMS.md section 2). `raw` is the Gram matrix with the raw
// gradient, f = (maximize ? -1 : 1) / grad_scale, numel the group's length, first whether this is
// the buffer's first step. Weight decay does not apply to PSI groups (the optimizer warns).
PSI_HD Update psi_sgd_update(const Gram& raw, const SgdOptions& o, double f, bool first,
                             int64_t numel) {
  if (!is_finite(gram_sum(raw))) return poisoned(raw);
  const Gram G = scale_grad(raw, f);
  // A zero group has no direction; a group of length 1 is a point of the 0-sphere: neither moves.
  if (!(G.ww > 0.0) || numel < 2) return unchanged();
  const double n = sqrt(G.ww);
  const Combo q = clip_norm(project_tangent(G, n), G, o.max_grad_norm);

  const bool has_momentum = o.momentum != 0.0;
  Combo buf{0.0, 0.0, 0.0};
  Combo d = q;
  if (has_momentum) {
    buf = momentum_update(q, o.momentum, o.dampening, first);
    d = search_direction(q, buf, o.momentum, o.nesterov);
  }

  Update up{Combo{0.0, 0.0, 0.0}, Combo{0.0, 0.0, 1.0}, false};
  if (!move_on_sphere(G, n, d, buf, has_momentum, o.lr, o.retraction, o.transport, &up)) {
    return unchanged();
  }
  return fold_grad_factor(up, f);
}

// One torch.optim.SGD step of a Euclidean tensor, elementwise, as combinations of (w, g, m):
//   g <- f g + wd w;  m <- mu m + (1 - damp) g (m <- g on the first step);
//   d = nesterov ? g + mu m : m;  w <- w - lr d
PSI_HD Update euclidean_sgd_update(const SgdOptions& o, double f, bool first) {
  const Combo grad{o.weight_decay, f, 0.0};
  Update up{Combo{0.0, 0.0, 0.0}, Combo{0.0, 0.0, 1.0}, false};
  Combo d = grad;
  if (o.momentum != 0.0) {
    up.buf = momentum_update(grad, o.momentum, o.dampening, first);
    d = search_direction(grad, up.buf, o.momentum, o.nesterov);
  }
  up.param = Combo{1.0, 0.0, 0.0} - o.lr * d;
  return up;
}

// The factor applied to the raw gradient: sign for maximize, 1/grad_scale for AMP.
PSI_HD double grad_factor(bool maximize, const float* grad_scale) {
  double f = maximize ? -1.0 : 1.0;
  if (grad_scale != nullptr) f /= static_cast<double>(*grad_scale);
  return f;
}

}  // namespace psi
