// C++ tests of psi_cuda, run by ctest (see CMakeLists.txt).
//
//   test_psi_math math   psi/math.h: the Combo coefficients of psi_sgd_update and
//                        euclidean_sgd_update, applied to explicit vectors, against the step of
//                        docs/ALGORITHMS.md section 2 computed the slow obvious way (norm, unit vector,
//                        projection, momentum, retraction, transport) in double; plus the
//                        invariants of section 7 (norm kept, buffer tangent, equivariance).
//                        psi/adam.h the same way: psi_adam_update against PSI-Adam (section 3)
//                        computed on explicit vectors, euclidean_adam_step against AdamW's formula.
//   test_psi_math op     psi_cuda::psi_sgd_ called through the dispatcher on CPU tensors against
//                        the same slow computation, and bad calls that must throw and change nothing.
//   test_psi_math cuda   the same op cases on CUDA tensors (the CUDA kernel); exit status 77
//                        (ctest: skipped) when there is no GPU or no CUDA kernel.
//   test_psi_math        math and op.
//
// No framework: the EXPECT* macros of check.h count passes and print failing values; the last
// line is "N passed, M failed" and the exit status is 1 when anything failed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "check.h"
#include "psi/adam.h"
#include "psi/math.h"
#include "psi/ops.h"

namespace {

using Vec = std::vector<double>;

// |a - b|_inf <= tol * (1 + |b|_inf), printing the worst element when it fails.
#define EXPECT_VEC_NEAR(a, b, tol) check_vec_near((a), (b), (tol), #a, #b, __FILE__, __LINE__)

void check_vec_near(const Vec& a, const Vec& b, double tol, const char* an, const char* bn,
                    const char* file, int line) {
  std::string what = std::string("EXPECT_VEC_NEAR(") + an + ", " + bn + "): ";
  if (a.size() != b.size()) {
    record(false, file, line, what + "sizes " + std::to_string(a.size()) + " vs " +
                                  std::to_string(b.size()));
    return;
  }
  double scale = 0.0, worst = -1.0;
  size_t at = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    scale = std::max(scale, std::fabs(b[i]));
    const double d = std::fabs(a[i] - b[i]);
    if (!(d <= worst)) {  // also catches NaN
      worst = d;
      at = i;
    }
  }
  const double bound = tol * (1.0 + scale);
  const bool ok = a.empty() || worst <= bound;
  if (!ok) {
    what += "element " + std::to_string(at) + " of " + std::to_string(a.size()) + ": " +
            fmt(a[at]) + " vs " + fmt(b[at]) + ", diff " + fmt(worst) + " > " + fmt(bound);
  }
  record(ok, file, line, what);
}

// ---------------------------------------------------------------------------------------------
// Explicit vector arithmetic

double dot(const Vec& a, const Vec& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}
double norm(const Vec& a) { return std::sqrt(dot(a, a)); }
Vec scaled(double s, const Vec& a) {
  Vec r(a.size());
  for (size_t i = 0; i < a.size(); ++i) r[i] = s * a[i];
  return r;
}
// a + s * b
Vec axpy(const Vec& a, double s, const Vec& b) {
  Vec r(a.size());
  for (size_t i = 0; i < a.size(); ++i) r[i] = a[i] + s * b[i];
  return r;
}

Vec randn(std::mt19937_64& rng, size_t n, double scale = 1.0) {
  std::normal_distribution<double> dist(0.0, scale);
  Vec v(n);
  for (double& x : v) x = dist(rng);
  return v;
}

std::string describe(const psi::SgdOptions& o, double f, bool first, size_t n) {
  static const char* ret[] = {"normalize", "exp", "none"};
  static const char* tra[] = {"project", "parallel"};
  std::ostringstream s;
  s << "n=" << n << " manifold=" << o.manifold << " retraction=" << ret[o.retraction]
    << " transport=" << tra[o.transport] << " lr=" << o.lr << " momentum=" << o.momentum
    << " dampening=" << o.dampening << " nesterov=" << o.nesterov
    << " weight_decay=" << o.weight_decay << " max_grad_norm=" << o.max_grad_norm
    << " f=" << f << " first=" << first;
  return s.str();
}

psi::SgdOptions options(int64_t retraction, int64_t transport, double lr, double momentum,
                        double dampening, bool nesterov, double max_grad_norm,
                        int64_t manifold = psi::kChannel, double weight_decay = 0.0,
                        bool maximize = false) {
  return psi::make_sgd_options(lr, momentum, dampening, nesterov, weight_decay, maximize, manifold,
                               retraction, transport, max_grad_norm);
}

// ---------------------------------------------------------------------------------------------
// The slow obvious step (docs/ALGORITHMS.md section 2), on explicit vectors

struct Step {
  Vec w, m;
  bool skipped;
};

// One PSI-SGD step of one group. g_raw is the raw gradient; the gradient used is f * g_raw
// (f = sign of maximize / grad_scale). m is the old buffer (ignored without momentum).
Step slow_psi_sgd(const Vec& w, const Vec& g_raw, const Vec& m, const psi::SgdOptions& o,
                  double f, bool first) {
  const size_t N = w.size();
  const Step unchanged{w, m, true};
  const Vec g = scaled(f, g_raw);
  const double n = norm(w);
  if (!(n > 0.0) || N < 2) return unchanged;
  const Vec u = scaled(1.0 / n, w);
  // h = g - (<g,w>/|w|^2) w, q = n h
  const Vec h = axpy(g, -dot(g, w) / (n * n), w);
  Vec q = scaled(n, h);
  if (o.max_grad_norm > 0.0) {
    const double qn = norm(q);
    if (qn > o.max_grad_norm) q = scaled(o.max_grad_norm / qn, q);
  }
  const bool has_momentum = o.momentum != 0.0;
  Vec buf, d = q;
  if (has_momentum) {
    buf = first ? q : axpy(scaled(o.momentum, m), 1.0 - o.dampening, q);
    d = o.nesterov ? axpy(q, o.momentum, buf) : buf;
  }
  Vec u_new, w_new;
  bool geodesic = false;
  double t = 0.0, dn = 0.0;
  if (o.retraction == psi::kRetractNone) {
    w_new = axpy(w, -o.lr * n, d);
    const double r = norm(w_new);
    if (!(r > 0.0)) return unchanged;
    u_new = scaled(1.0 / r, w_new);
  } else {
    if (o.retraction == psi::kExp) {
      dn = norm(d);
      t = std::fabs(o.lr) * dn;
      geodesic = t >= 1e-7;
    }
    if (geodesic) {
      u_new = axpy(scaled(std::cos(t), u), -std::sin(t) / dn, d);
    } else {
      const Vec v = axpy(u, -o.lr, d);
      const double r = norm(v);
      if (!(r > 0.0)) return unchanged;
      u_new = scaled(1.0 / r, v);
    }
    w_new = scaled(n, u_new);
  }
  Vec m_new = m;
  if (has_momentum) {
    if (o.transport == psi::kParallel && geodesic) {
      const Vec e = scaled(-1.0 / dn, d);
      const Vec dir = axpy(scaled(std::sin(t), u), 1.0 - std::cos(t), e);
      m_new = axpy(buf, -dot(buf, e), dir);
    } else {
      m_new = axpy(buf, -dot(buf, u_new), u_new);
    }
  }
  return Step{w_new, m_new, false};
}

// torch.optim.SGD's step, elementwise.
Step slow_sgd(const Vec& w, const Vec& g_raw, const Vec& m, const psi::SgdOptions& o, double f,
              bool first) {
  Step s{w, m, false};
  for (size_t i = 0; i < w.size(); ++i) {
    double g = f * g_raw[i];
    if (o.weight_decay != 0.0) g += o.weight_decay * w[i];
    double d = g;
    if (o.momentum != 0.0) {
      s.m[i] = first ? g : o.momentum * m[i] + (1.0 - o.dampening) * g;
      d = o.nesterov ? g + o.momentum * s.m[i] : s.m[i];
    }
    s.w[i] = w[i] - o.lr * d;
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// The header's step, applied to the same vectors

psi::Gram gram(const Vec& w, const Vec& g, const Vec& m) {
  return psi::Gram{dot(w, w), dot(w, g), dot(w, m), dot(g, g), dot(g, m), dot(m, m)};
}

Vec apply(const psi::Combo& c, const Vec& w, const Vec& g, const Vec& m) {
  Vec r(w.size());
  for (size_t i = 0; i < w.size(); ++i) r[i] = c.w * w[i] + c.g * g[i] + c.m * m[i];
  return r;
}

Step header_step(const psi::Update& up, const Vec& w, const Vec& g, const Vec& m) {
  if (up.skip) return Step{w, m, true};
  return Step{apply(up.param, w, g, m), apply(up.buf, w, g, m), false};
}

Step header_psi_sgd(const Vec& w, const Vec& g, const Vec& m, const psi::SgdOptions& o, double f,
                    bool first) {
  return header_step(
      psi::psi_sgd_update(gram(w, g, m), o, f, first, static_cast<int64_t>(w.size())), w, g, m);
}

// ---------------------------------------------------------------------------------------------
// Part "math"

// Every valid option combination.
std::vector<psi::SgdOptions> option_grid(double lr, double max_grad_norm) {
  std::vector<psi::SgdOptions> grid;
  const int64_t rt[][2] = {{psi::kNormalize, psi::kProject},
                           {psi::kExp, psi::kProject},
                           {psi::kExp, psi::kParallel},
                           {psi::kRetractNone, psi::kProject}};
  const double mdn[][3] = {{0.0, 0.0, 0}, {0.9, 0.0, 0}, {0.9, 0.0, 1}, {0.7, 0.25, 0}};
  for (const auto& r : rt)
    for (const auto& x : mdn)
      grid.push_back(options(r[0], r[1], lr, x[0], x[1], x[2] != 0, max_grad_norm));
  return grid;
}

void test_header_against_slow() {
  std::mt19937_64 rng(1234);
  int cases = 0;
  for (size_t n : {2u, 3u, 17u}) {
    for (double scale : {1e-3, 1.0, 1e3}) {
      for (double lr : {0.1, 2.0, 1e-9}) {          // 1e-9: exp falls back to normalize
        for (double clip : {0.0, 0.05, 1e6}) {       // 0.05 clips, 1e6 does not
          for (const psi::SgdOptions& o : option_grid(lr, clip)) {
            for (double f : {1.0, -1.0, 1.0 / 65536.0}) {  // plain, maximize, AMP grad scale
              for (bool first : {true, false}) {
                if (first && o.momentum == 0.0) continue;
                const Vec w = randn(rng, n, scale);
                // gradient of a scale-invariant loss has size 1/|w|; f scales it back
                const Vec g = randn(rng, n, 1.0 / (scale * std::fabs(f)));
                const Vec m = randn(rng, n);
                g_case = describe(o, f, first, n) + " scale=" + fmt(scale);
                const Step want = slow_psi_sgd(w, g, m, o, f, first);
                const Step got = header_psi_sgd(w, g, m, o, f, first);
                EXPECT(got.skipped == want.skipped);
                EXPECT_VEC_NEAR(scaled(1.0 / scale, got.w), scaled(1.0 / scale, want.w), 1e-11);
                EXPECT_VEC_NEAR(got.m, want.m, 1e-11);
                if (o.momentum == 0.0) {
                  const psi::Update up = psi::psi_sgd_update(gram(w, g, m), o, f, first,
                                                             static_cast<int64_t>(n));
                  EXPECT(up.param.m == 0.0 && up.buf.w == 0.0 && up.buf.g == 0.0 &&
                        up.buf.m == 1.0);
                }
                ++cases;
              }
            }
          }
        }
      }
    }
  }
  std::printf("math: %d option/shape cases against the slow step\n", cases);
}

void test_skips() {
  std::mt19937_64 rng(7);
  for (const psi::SgdOptions& o : option_grid(0.1, 0.0)) {
    for (bool first : {true, false}) {
      g_case = "zero group: " + describe(o, 1.0, first, 5);
      const Vec zero(5, 0.0), g = randn(rng, 5), m = randn(rng, 5);
      const psi::Update up = psi::psi_sgd_update(gram(zero, g, m), o, 1.0, first, 5);
      EXPECT(up.skip);
      const Step s = header_step(up, zero, g, m);
      EXPECT_VEC_NEAR(s.w, zero, 0.0);
      EXPECT_VEC_NEAR(s.m, m, 0.0);
      for (double x : s.w) EXPECT(std::isfinite(x));

      g_case = "length-1 group: " + describe(o, 1.0, first, 1);
      const Vec w1{-2.5}, g1{0.75}, m1{0.5};
      const psi::Update up1 = psi::psi_sgd_update(gram(w1, g1, m1), o, 1.0, first, 1);
      EXPECT(up1.skip);
      const Step s1 = header_step(up1, w1, g1, m1);
      EXPECT(s1.w == w1 && s1.m == m1);
    }
  }
  // u - lr d == 0 exactly: w = (1, 0), g = 0, m = (1, 0), momentum 1, lr 1 -> d = u. The
  // normalize and none retractions cannot take the step; the group is left alone.
  for (int64_t r : {psi::kNormalize, psi::kRetractNone}) {
    const psi::SgdOptions o = options(r, psi::kProject, 1.0, 1.0, 0.0, false, 0.0);
    g_case = "degenerate retraction: " + describe(o, 1.0, false, 2);
    const Vec w{1.0, 0.0}, g{0.0, 0.0}, m{1.0, 0.0};
    EXPECT(psi::psi_sgd_update(gram(w, g, m), o, 1.0, false, 2).skip);
    EXPECT(slow_psi_sgd(w, g, m, o, 1.0, false).skipped);
  }
}

// Tangent buffer at u = w/|w| (as every buffer the op stores after its first step).
Vec tangent(const Vec& w, const Vec& m) {
  const double ww = dot(w, w);
  return axpy(m, -dot(m, w) / ww, w);
}

void test_invariants() {
  std::mt19937_64 rng(99);
  for (double lr : {0.05, 0.7, 3.0}) {
    for (const psi::SgdOptions& o : option_grid(lr, 0.0)) {
      for (bool first : {true, false}) {
        if (first && o.momentum == 0.0) continue;
        const size_t n = 9;
        const Vec w = randn(rng, n, 2.0), g = randn(rng, n), m = tangent(w, randn(rng, n));
        g_case = "invariants: " + describe(o, 1.0, first, n);
        const Step s = header_psi_sgd(w, g, m, o, 1.0, first);
        EXPECT(!s.skipped);
        const double nw = norm(w), nw2 = norm(s.w);
        // 2. the norm of the group is kept by normalize and exp
        if (o.retraction != psi::kRetractNone) EXPECT_NEAR(nw2, nw, 1e-13 * nw);
        // "none" moves the class like normalize: same direction, norm grows by
        // sqrt(1 + lr^2 |d|^2) when d is tangent (it is: q and the buffer are)
        if (o.retraction == psi::kRetractNone) {
          psi::SgdOptions on = o;
          on.retraction = psi::kNormalize;
          const Step sn = header_psi_sgd(w, g, m, on, 1.0, first);
          EXPECT_VEC_NEAR(scaled(1.0 / nw2, s.w), scaled(1.0 / nw, sn.w), 1e-13);
          EXPECT_VEC_NEAR(s.m, sn.m, 1e-12);
          Vec q = scaled(nw, tangent(w, g));
          Vec d = q;
          if (o.momentum != 0.0) {
            const Vec buf = first ? q : axpy(scaled(o.momentum, m), 1.0 - o.dampening, q);
            d = o.nesterov ? axpy(q, o.momentum, buf) : buf;
          }
          EXPECT_NEAR(nw2 / nw, std::sqrt(1.0 + lr * lr * dot(d, d)), 1e-12 * nw2 / nw);
        }
        // 2. the stored buffer is tangent at the new point: <m', u'> ~ 0
        if (o.momentum != 0.0) {
          EXPECT_NEAR(dot(s.m, s.w) / nw2, 0.0, 1e-12 * (1.0 + norm(s.m)));
          // parallel transport is an isometry of tangent vectors
          if (o.transport == psi::kParallel) {
            const Vec q = scaled(nw, tangent(w, g));
            const Vec buf = first ? q : axpy(scaled(o.momentum, m), 1.0 - o.dampening, q);
            EXPECT_NEAR(norm(s.m), norm(buf), 1e-12 * norm(buf));
          }
        }
        // exp moves along the great circle by the angle t = lr |d|
        if (o.retraction == psi::kExp && o.momentum == 0.0) {
          const double t = lr * nw * norm(tangent(w, g));
          if (t < 3.0) EXPECT_NEAR(std::acos(std::min(1.0, dot(w, s.w) / (nw * nw2))), t, 1e-7);
        }
        // A radial gradient does not move the point. In the Combo form the zero step is a
        // difference of terms of size lr_eff <g,w> (in P.w w + P.g g and in the quadratic form
        // |u - lr d|^2), so rounding grows like eps (lr_eff <g,w>)^2; lr_eff = lr (1 + momentum)
        // with Nesterov on the first step (d = q + momentum q).
        const Vec radial = scaled(0.3, w);
        const double big = lr * (o.nesterov ? 1.0 + o.momentum : 1.0) * dot(radial, w);
        const Step sr = header_psi_sgd(w, radial, Vec(n, 0.0), o, 1.0, true);
        EXPECT_VEC_NEAR(sr.w, w, 4e-16 * (1.0 + big * big));
        // 1. equivariance: (c w, g / c) gives c w' and the same (scale-free) buffer
        for (double c : {1e-3, 7.5, 1e4}) {
          const Step sc = header_psi_sgd(scaled(c, w), scaled(1.0 / c, g), m, o, 1.0, first);
          EXPECT_VEC_NEAR(scaled(1.0 / c, sc.w), s.w, 1e-12);
          EXPECT_VEC_NEAR(sc.m, s.m, 1e-12);
        }
      }
    }
  }
}

// 20 steps on the scale-invariant loss L(w) = <a, w/|w|>, whose gradient (a - <a,u>u)/|w| obeys
// g(c w) = g(w)/c: from c w0 every iterate is c times the one from w0, with the same buffer.
void test_trajectory() {
  std::mt19937_64 rng(5);
  const size_t n = 12;
  const Vec a = randn(rng, n), w0 = randn(rng, n);
  auto grad = [&](const Vec& w) {
    const double nw = norm(w);
    const Vec u = scaled(1.0 / nw, w);
    return scaled(1.0 / nw, axpy(a, -dot(a, u), u));
  };
  for (const psi::SgdOptions& o : option_grid(0.2, 0.5)) {
    for (double c : {0.01, 30.0}) {
      g_case = "trajectory c=" + fmt(c) + ": " + describe(o, 1.0, true, n);
      Vec w = w0, wc = scaled(c, w0), m(n, 0.0), mc(n, 0.0);
      const double loss0 = dot(a, scaled(1.0 / norm(w0), w0));
      for (int k = 0; k < 20; ++k) {
        const Step s = header_psi_sgd(w, grad(w), m, o, 1.0, k == 0);
        const Step sc = header_psi_sgd(wc, grad(wc), mc, o, 1.0, k == 0);
        w = s.w, m = s.m, wc = sc.w, mc = sc.m;
        EXPECT_VEC_NEAR(scaled(1.0 / c, wc), w, 1e-11);
        EXPECT_VEC_NEAR(mc, m, 1e-11);
        if (o.momentum != 0.0) EXPECT_NEAR(dot(m, w) / norm(w), 0.0, 1e-11 * (1.0 + norm(m)));
        if (o.retraction != psi::kRetractNone) EXPECT_NEAR(norm(w), norm(w0), 1e-12 * norm(w0));
      }
      // the loss went down (plain descent on a smooth loss with a moderate step)
      EXPECT(dot(a, scaled(1.0 / norm(w), w)) < loss0);
    }
  }
}

void test_euclidean() {
  std::mt19937_64 rng(11);
  int cases = 0;
  for (double wd : {0.0, 0.01}) {
    const double mdn[][3] = {{0.0, 0.0, 0}, {0.9, 0.0, 0}, {0.9, 0.0, 1}, {0.8, 0.3, 0}};
    for (const auto& x : mdn) {
      for (double f : {1.0, -1.0, 0.125}) {
        for (bool first : {true, false}) {
          psi::SgdOptions o = options(psi::kNormalize, psi::kProject, 0.05, x[0], x[1], x[2] != 0,
                                      0.0, psi::kEuclidean, wd, f < 0);
          const Vec w = randn(rng, 7), g = randn(rng, 7), m = randn(rng, 7);
          g_case = "euclidean: " + describe(o, f, first, 7);
          const Step want = slow_sgd(w, g, m, o, f, first);
          const Step got = header_step(psi::euclidean_sgd_update(o, f, first), w, g, m);
          EXPECT(!got.skipped);
          EXPECT_VEC_NEAR(got.w, want.w, 1e-15);
          EXPECT_VEC_NEAR(got.m, want.m, 1e-15);
          ++cases;
        }
      }
    }
  }
  std::printf("math: %d euclidean cases against torch.optim.SGD's formula\n", cases);
}

void test_helpers() {
  g_case = "grad_factor";
  const float two = 2.0f, big = 65536.0f;
  EXPECT(psi::grad_factor(false, nullptr) == 1.0);
  EXPECT(psi::grad_factor(true, nullptr) == -1.0);
  EXPECT(psi::grad_factor(true, &two) == -0.5);
  EXPECT(psi::grad_factor(false, &big) == 1.0 / 65536.0);

  g_case = "Gram helpers";
  std::mt19937_64 rng(3);
  const Vec w = randn(rng, 6), g = randn(rng, 6), m = randn(rng, 6);
  const psi::Gram G = gram(w, g, m);
  const psi::Combo a{0.3, -1.2, 2.0}, b{-0.7, 0.4, 0.1};
  EXPECT_NEAR(psi::dot(a, b, G), dot(apply(a, w, g, m), apply(b, w, g, m)), 1e-13);
  EXPECT_NEAR(psi::norm(a, G), norm(apply(a, w, g, m)), 1e-13);
  const psi::Gram Gs = psi::scale_grad(G, -0.25);
  const psi::Gram Gd = gram(w, scaled(-0.25, g), m);
  EXPECT_NEAR(Gs.ww, Gd.ww, 1e-14);
  EXPECT_NEAR(Gs.wg, Gd.wg, 1e-14);
  EXPECT_NEAR(Gs.wm, Gd.wm, 1e-14);
  EXPECT_NEAR(Gs.gg, Gd.gg, 1e-14);
  EXPECT_NEAR(Gs.gm, Gd.gm, 1e-14);
  EXPECT_NEAR(Gs.mm, Gd.mm, 1e-14);
  // norm of a vector that is zero up to rounding: 0, not NaN
  const psi::Gram Gz{1.0, 1.0, 0.0, 1.0, 0.0, 0.0};  // g == w
  EXPECT(psi::norm(psi::Combo{1.0, -1.0, 0.0}, Gz) == 0.0);
}

// ---------------------------------------------------------------------------------------------
// PSI-Adam (psi/adam.h): the slow obvious step of docs/ALGORITHMS.md section 3 on explicit vectors

struct AdamStep {
  Vec w, m;
  double v;
  bool skipped;
};

psi::AdamOptions adam_options(double lr, double beta1, double beta2, double eps, int64_t retraction,
                              int64_t transport, double max_grad_norm,
                              int64_t manifold = psi::kChannel, double weight_decay = 0.0) {
  psi::AdamOptions o;
  o.lr = lr;
  o.beta1 = beta1;
  o.beta2 = beta2;
  o.eps = eps;
  o.weight_decay = weight_decay;
  o.max_grad_norm = max_grad_norm;
  o.maximize = false;
  o.manifold = manifold;
  o.retraction = retraction;
  o.transport = transport;
  o.block_rows = 1;
  return o;
}

AdamStep slow_psi_adam(const Vec& w, const Vec& g_raw, const Vec& m, double v,
                       const psi::AdamOptions& o, double f, double t) {
  const size_t N = w.size();
  const AdamStep unchanged{w, m, v, true};
  const Vec g = scaled(f, g_raw);
  const double n = norm(w);
  if (!(n > 0.0) || N < 2) return unchanged;
  const Vec u = scaled(1.0 / n, w);
  Vec q = scaled(n, axpy(g, -dot(g, w) / (n * n), w));
  if (o.max_grad_norm > 0.0 && norm(q) > o.max_grad_norm) q = scaled(o.max_grad_norm / norm(q), q);
  const Vec m1 = axpy(scaled(o.beta1, m), 1.0 - o.beta1, q);
  const double v1 = o.beta2 * v + (1.0 - o.beta2) * dot(q, q);
  const double bc1 = 1.0 - std::pow(o.beta1, t), bc2 = 1.0 - std::pow(o.beta2, t);
  const double denom = std::sqrt(v1 / bc2) + o.eps;
  const Vec d = denom > 0.0 ? scaled(1.0 / (bc1 * denom), m1) : Vec(N, 0.0);
  Vec u_new, w_new;
  bool geodesic = false;
  double ang = 0.0, dn = 0.0;
  if (o.retraction == psi::kRetractNone) {
    w_new = axpy(w, -o.lr * n, d);
    if (!(norm(w_new) > 0.0)) return unchanged;
    u_new = scaled(1.0 / norm(w_new), w_new);
  } else {
    if (o.retraction == psi::kExp) {
      dn = norm(d);
      ang = o.lr * dn;
      geodesic = ang >= 1e-7;
    }
    if (geodesic) {
      u_new = axpy(scaled(std::cos(ang), u), -std::sin(ang) / dn, d);
    } else {
      const Vec x = axpy(u, -o.lr, d);
      if (!(norm(x) > 0.0)) return unchanged;
      u_new = scaled(1.0 / norm(x), x);
    }
    w_new = scaled(n, u_new);
  }
  Vec m_new;
  if (o.transport == psi::kParallel && geodesic) {
    const Vec e = scaled(-1.0 / dn, d);
    m_new = axpy(m1, -dot(m1, e), axpy(scaled(std::sin(ang), u), 1.0 - std::cos(ang), e));
  } else {
    m_new = axpy(m1, -dot(m1, u_new), u_new);
  }
  return AdamStep{w_new, m_new, v1, false};
}

AdamStep header_psi_adam(const Vec& w, const Vec& g, const Vec& m, double v,
                         const psi::AdamOptions& o, double f, double t) {
  const psi::AdamUpdate r =
      psi::psi_adam_update(gram(w, g, m), o, f, v, t, static_cast<int64_t>(w.size()));
  const Step s = header_step(r.up, w, g, m);
  return AdamStep{s.w, s.m, r.v, s.skipped};
}

void test_adam_header_against_slow() {
  std::mt19937_64 rng(4321);
  const int64_t rt[][2] = {{psi::kNormalize, psi::kProject},
                           {psi::kExp, psi::kProject},
                           {psi::kExp, psi::kParallel},
                           {psi::kRetractNone, psi::kProject}};
  int cases = 0;
  for (size_t n : {2u, 3u, 17u}) {
    for (double scale : {1e-3, 1.0, 1e3}) {
      for (double lr : {0.05, 1.5, 1e-9}) {
        for (double clip : {0.0, 0.05}) {
          for (const auto& r : rt) {
            for (double f : {1.0, -1.0, 1.0 / 65536.0}) {
              for (double t : {1.0, 2.0, 37.0}) {
                const psi::AdamOptions o = adam_options(lr, 0.9, 0.999, 1e-8, r[0], r[1], clip);
                const Vec w = randn(rng, n, scale);
                const Vec g = randn(rng, n, 1.0 / (scale * std::fabs(f)));
                // the first moment of step 1 is zero; later ones are tangent-ish, any is valid
                const Vec m = t == 1.0 ? Vec(n, 0.0) : randn(rng, n);
                const double v = t == 1.0 ? 0.0 : 0.5;
                g_case = "adam n=" + std::to_string(n) + " scale=" + fmt(scale) + " lr=" +
                         fmt(lr) + " clip=" + fmt(clip) + " retraction=" +
                         std::to_string(r[0]) + " transport=" + std::to_string(r[1]) +
                         " f=" + fmt(f) + " t=" + fmt(t);
                const AdamStep want = slow_psi_adam(w, g, m, v, o, f, t);
                const AdamStep got = header_psi_adam(w, g, m, v, o, f, t);
                EXPECT(got.skipped == want.skipped);
                EXPECT_VEC_NEAR(scaled(1.0 / scale, got.w), scaled(1.0 / scale, want.w), 1e-11);
                EXPECT_VEC_NEAR(got.m, want.m, 1e-11);
                EXPECT_NEAR(got.v, want.v, 1e-11 * (1.0 + want.v));
                ++cases;
              }
            }
          }
        }
      }
    }
  }
  std::printf("math: %d PSI-Adam cases against the slow step\n", cases);
}

void test_adam_invariants() {
  std::mt19937_64 rng(99);
  // First step, exp retraction: d = q / (|q| + eps), so the group turns by lr (radians), and
  // the scaled copy c*w takes the scaled step (equivariance), v the same for both.
  for (double c : {0.1, 3.0, 10.0}) {
    const Vec w = randn(rng, 9), g = randn(rng, 9), zero(9, 0.0);
    const psi::AdamOptions o = adam_options(0.2, 0.9, 0.999, 0.0, psi::kExp, psi::kParallel, 0.0);
    g_case = "adam invariants c=" + fmt(c);
    const AdamStep a = header_psi_adam(w, g, zero, 0.0, o, 1.0, 1.0);
    const AdamStep b = header_psi_adam(scaled(c, w), scaled(1.0 / c, g), zero, 0.0, o, 1.0, 1.0);
    EXPECT_NEAR(std::acos(dot(a.w, w) / (norm(a.w) * norm(w))), 0.2, 1e-12);
    EXPECT_NEAR(norm(a.w), norm(w), 1e-12 * norm(w));
    EXPECT_VEC_NEAR(scaled(1.0 / c, b.w), a.w, 1e-12);
    EXPECT_VEC_NEAR(b.m, a.m, 1e-12);
    EXPECT_NEAR(b.v, a.v, 1e-12 * a.v);
    EXPECT_NEAR(dot(a.m, a.w) / norm(a.w), 0.0, 1e-12 * norm(a.m));  // transported: tangent
  }
  // Zero and length-1 groups: nothing moves, v untouched.
  const psi::AdamOptions o = adam_options(0.1, 0.9, 0.999, 1e-8, psi::kNormalize, psi::kProject,
                                          0.0);
  g_case = "adam zero group";
  const Vec zero(4, 0.0), g = randn(rng, 4), m = randn(rng, 4);
  const psi::AdamUpdate z = psi::psi_adam_update(gram(zero, g, m), o, 1.0, 0.25, 3.0, 4);
  EXPECT(z.up.skip && z.v == 0.25);
  g_case = "adam length-1 group";
  const Vec w1{2.0}, g1{0.5}, m1{0.0};
  const psi::AdamUpdate l = psi::psi_adam_update(gram(w1, g1, m1), o, 1.0, 0.25, 3.0, 1);
  EXPECT(l.up.skip && l.v == 0.25);
  // q = 0 with eps = 0 on the first step: no direction, no NaN, the group stays put.
  g_case = "adam zero gradient, eps=0";
  const Vec w2 = randn(rng, 5), zero5(5, 0.0);
  const psi::AdamOptions o0 = adam_options(0.1, 0.9, 0.999, 0.0, psi::kNormalize, psi::kProject,
                                           0.0);
  const AdamStep s = header_psi_adam(w2, zero5, zero5, 0.0, o0, 1.0, 1.0);
  EXPECT_VEC_NEAR(s.w, w2, 1e-15);
  EXPECT_VEC_NEAR(s.m, zero5, 0.0);
  EXPECT(s.v == 0.0);
}

void test_adam_euclidean() {
  std::mt19937_64 rng(12);
  int cases = 0;
  for (double wd : {0.0, 0.01}) {
    for (double f : {1.0, -1.0, 0.125}) {
      for (double t : {1.0, 5.0}) {
        const psi::AdamOptions o = adam_options(0.01, 0.8, 0.95, 1e-6, psi::kNormalize,
                                                psi::kProject, 0.0, psi::kEuclidean, wd);
        const Vec w = randn(rng, 7), g = randn(rng, 7), m = randn(rng, 7);
        Vec v = randn(rng, 7);
        for (double& x : v) x = x * x;
        g_case = "adam euclidean wd=" + fmt(wd) + " f=" + fmt(f) + " t=" + fmt(t);
        const psi::AdamElementwiseT<double> c(psi::euclidean_adam_constants(o, f, t));
        const double bc1 = 1.0 - std::pow(0.8, t), bc2 = 1.0 - std::pow(0.95, t);
        for (size_t i = 0; i < w.size(); ++i) {
          // torch.optim.AdamW: decay, moments, bias-corrected step
          const double gi = f * g[i];
          const double mi = 0.8 * m[i] + 0.2 * gi;
          const double vi = 0.95 * v[i] + 0.05 * gi * gi;
          const double want = w[i] * (1.0 - 0.01 * wd) -
                              0.01 * (mi / bc1) / (std::sqrt(vi / bc2) + 1e-6);
          double m_got = m[i], v_got = v[i];
          const double got = psi::euclidean_adam_step(w[i], g[i], &m_got, &v_got, c);
          EXPECT_NEAR(got, want, 1e-14);
          EXPECT_NEAR(m_got, mi, 1e-15);
          EXPECT_NEAR(v_got, vi, 1e-15);
        }
        ++cases;
      }
    }
  }
  std::printf("math: %d euclidean cases against torch.optim.AdamW's formula\n", cases);
}

void run_math() {
  test_helpers();
  test_header_against_slow();
  test_skips();
  test_invariants();
  test_trajectory();
  test_euclidean();
  test_adam_header_against_slow();
  test_adam_invariants();
  test_adam_euclidean();
}

// ---------------------------------------------------------------------------------------------
// Part "op": psi_cuda::psi_sgd_ through the dispatcher

at::Device g_device = at::kCPU;  // where the op tests put their tensors

using PsiSgdSig = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, double,
                       double, double, bool, double, bool, int64_t, int64_t, int64_t, double,
                       const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                       int64_t, const std::optional<at::Tensor>&);

c10::TypedOperatorHandle<PsiSgdSig> psi_sgd_op() {
  static const c10::TypedOperatorHandle<PsiSgdSig> op =
      c10::Dispatcher::singleton().findSchemaOrThrow("psi_cuda::psi_sgd_", "").typed<PsiSgdSig>();
  return op;
}

struct State {
  std::vector<at::Tensor> params, grads, bufs, steps;
};

State clone(const State& s) {
  State c;
  for (const auto& t : s.params) c.params.push_back(t.clone(at::MemoryFormat::Preserve));
  for (const auto& t : s.grads) c.grads.push_back(t.clone(at::MemoryFormat::Preserve));
  for (const auto& t : s.bufs) c.bufs.push_back(t.clone(at::MemoryFormat::Preserve));
  for (const auto& t : s.steps) c.steps.push_back(t.clone());
  return c;
}

bool equal(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (!at::equal(a[i], b[i])) return false;
  return true;
}

void call(State& s, const psi::SgdOptions& o, const std::optional<at::Tensor>& grad_scale = {},
          const std::optional<at::Tensor>& found_inf = {}) {
  psi_sgd_op().call(s.params, s.grads, s.bufs, s.steps, o.lr, o.momentum, o.dampening,
                    o.nesterov, o.weight_decay, o.maximize, o.manifold, o.retraction, o.transport,
                    o.max_grad_norm, grad_scale, found_inf, o.block_rows,
                    std::optional<at::Tensor>());  // grams: computed by the op
}

Vec to_vec(const at::Tensor& t) {
  const at::Tensor d = t.to(at::Device(at::kCPU), at::kDouble).contiguous();
  return Vec(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

// The expected (params, bufs) after one step, computed group by group with slow_psi_sgd /
// slow_sgd on the tensors' values in double, in logical (contiguous) order.
std::pair<std::vector<Vec>, std::vector<Vec>> expected_step(const State& s,
                                                            const psi::SgdOptions& o, double f) {
  std::vector<Vec> ps, bs;
  const bool has_m = o.momentum != 0.0;
  for (size_t i = 0; i < s.params.size(); ++i) {
    const at::Tensor& p = s.params[i];
    const Vec w = to_vec(p), g = to_vec(s.grads[i]);
    const Vec m = has_m ? to_vec(s.bufs[i]) : Vec(w.size(), 0.0);
    const bool first = s.steps[i].item<float>() == 0.0f;
    Vec pw = w, pm = m;
    const int64_t numel = p.numel();
    const int64_t group = o.manifold == psi::kChannel
                              ? (p.size(0) == 0 ? 0 : numel / p.size(0))
                              : (o.manifold == psi::kTensor ? numel : 1);
    for (int64_t off = 0; group > 0 && off < numel; off += group) {
      const Vec wg(w.begin() + off, w.begin() + off + group);
      const Vec gg(g.begin() + off, g.begin() + off + group);
      const Vec mg(m.begin() + off, m.begin() + off + group);
      const Step st = o.manifold == psi::kEuclidean ? slow_sgd(wg, gg, mg, o, f, first)
                                                    : slow_psi_sgd(wg, gg, mg, o, f, first);
      std::copy(st.w.begin(), st.w.end(), pw.begin() + off);
      std::copy(st.m.begin(), st.m.end(), pm.begin() + off);
    }
    ps.push_back(pw);
    bs.push_back(pm);
  }
  return {ps, bs};
}

// One step of the op against the slow step; tol is relative to each tensor's largest value.
void step_and_compare(State& s, const psi::SgdOptions& o, double tol,
                      const std::optional<at::Tensor>& grad_scale = {}) {
  double f = o.maximize ? -1.0 : 1.0;
  if (grad_scale) f /= grad_scale->item<float>();
  const auto [want_p, want_m] = expected_step(s, o, f);
  std::vector<float> steps_before;
  for (const auto& t : s.steps) steps_before.push_back(t.item<float>());
  call(s, o, grad_scale);
  for (size_t i = 0; i < s.params.size(); ++i) {
    EXPECT_VEC_NEAR(to_vec(s.params[i]), want_p[i], tol);
    if (o.momentum != 0.0) EXPECT_VEC_NEAR(to_vec(s.bufs[i]), want_m[i], tol);
    EXPECT(s.steps[i].item<float>() == steps_before[i] + 1.0f);
  }
}

State make_state(const std::vector<std::vector<int64_t>>& shapes, at::ScalarType dtype,
                 bool momentum, bool channels_last = false) {
  State s;
  const at::ScalarType state_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& shape : shapes) {
    at::Tensor p = at::randn(shape, at::kDouble).to(g_device, dtype);
    if (channels_last && shape.size() == 4) p = p.contiguous(at::MemoryFormat::ChannelsLast);
    s.params.push_back(p);
    s.grads.push_back(at::randn(shape, at::kDouble).to(g_device, dtype));  // other layout
    if (momentum) s.bufs.push_back(at::zeros_like(p, state_dtype));
    s.steps.push_back(at::zeros({}, at::TensorOptions(at::kFloat).device(g_device)));
  }
  return s;
}

void new_grads(State& s) {
  for (auto& g : s.grads) g.copy_(at::randn(g.sizes(), at::kDouble));  // copy_ moves it over
}

void test_op_registered() {
  g_case = "op registration";
  const auto handle = c10::Dispatcher::singleton().findSchema({"psi_cuda::psi_sgd_", ""});
  EXPECT(handle.has_value());
  if (!handle) {
    std::fprintf(stderr, "psi_cuda::psi_sgd_ is not registered: libpsi_cuda_ops was not loaded\n");
    return;
  }
  EXPECT(handle->hasKernelForDispatchKey(g_device.is_cuda() ? c10::DispatchKey::CUDA
                                                            : c10::DispatchKey::CPU));
  std::ostringstream schema;
  schema << handle->schema();
  std::printf("op: %s\n", schema.str().c_str());
}

void test_op_channel() {
  at::manual_seed(0);
  // rows of 12, rows of 7, rows of length 1 (not moved), a zero row (not moved), no rows
  State s = make_state({{4, 3, 2, 2}, {5, 7}, {3}, {2, 5}, {0, 4}}, at::kFloat, true);
  s.params[3][1].zero_();
  const at::Tensor len1 = s.params[2].clone(), zero_row = s.params[3][1].clone();
  for (int64_t r : {psi::kNormalize, psi::kExp, psi::kRetractNone}) {
    const psi::SgdOptions o = options(r, psi::kProject, 0.1, 0.9, 0.0, true, 0.0);
    for (int k = 0; k < 2; ++k) {
      g_case = "op channel float step " + std::to_string(k) + ": " + describe(o, 1.0, k == 0, 0);
      step_and_compare(s, o, 2e-6);
      new_grads(s);
    }
  }
  g_case = "op channel float: untouched groups";
  EXPECT(at::equal(s.params[2], len1));
  EXPECT(at::equal(s.params[3][1], zero_row));
  EXPECT(at::equal(s.bufs[3][1].cpu(), at::zeros({5})));
}

void test_op_tensor_double() {
  at::manual_seed(1);
  // a long tensor group (> 65536 elements: reduced in chunks, in parallel), a length-1 tensor
  State s = make_state({{6, 5}, {40}, {1}, {300, 300}}, at::kDouble, true);
  const psi::SgdOptions o = options(psi::kExp, psi::kParallel, 0.3, 0.8, 0.0, false, 0.5,
                                    psi::kTensor);
  for (int k = 0; k < 3; ++k) {
    g_case = "op tensor double step " + std::to_string(k) + ": " + describe(o, 1.0, k == 0, 0);
    step_and_compare(s, o, 1e-12);
    new_grads(s);
  }
}

void test_op_long_rows() {
  at::manual_seed(2);
  State s = make_state({{2, 70000}, {3, 50}}, at::kFloat, false);
  const psi::SgdOptions o = options(psi::kRetractNone, psi::kProject, 0.05, 0.0, 0.0, false, 0.0);
  g_case = "op long rows float: " + describe(o, 1.0, true, 0);
  step_and_compare(s, o, 2e-6);
}

void test_op_euclidean() {
  at::manual_seed(3);
  State s = make_state({{10, 3}, {1000}, {1}}, at::kFloat, true);
  const psi::SgdOptions o = options(psi::kNormalize, psi::kProject, 0.05, 0.9, 0.1, false, 0.0,
                                    psi::kEuclidean, 0.01, true);
  for (int k = 0; k < 2; ++k) {
    g_case = "op euclidean float step " + std::to_string(k) + ": " + describe(o, -1.0, k == 0, 0);
    step_and_compare(s, o, 1e-6);
    new_grads(s);
  }
}

void test_op_channels_last_and_half() {
  at::manual_seed(4);
  State s = make_state({{8, 3, 3, 3}, {4, 2, 5, 5}}, at::kFloat, true, /*channels_last=*/true);
  const psi::SgdOptions o = options(psi::kNormalize, psi::kProject, 0.2, 0.9, 0.0, false, 0.1);
  g_case = "op channels_last float: " + describe(o, 1.0, true, 0);
  EXPECT(s.params[0].is_contiguous(at::MemoryFormat::ChannelsLast));
  step_and_compare(s, o, 2e-6);
  EXPECT(s.params[0].is_contiguous(at::MemoryFormat::ChannelsLast));

  for (at::ScalarType dt : {at::kHalf, at::kBFloat16}) {
    State h = make_state({{6, 33}, {64}}, dt, true);
    g_case = std::string("op ") + c10::toString(dt) + ": " + describe(o, 1.0, true, 0);
    EXPECT(h.bufs[0].scalar_type() == at::kFloat);
    // the result is rounded to the parameter dtype: one rounding of values of size ~1
    step_and_compare(h, o, dt == at::kHalf ? 1e-3 : 8e-3);
  }
}

void test_op_amp() {
  at::manual_seed(5);
  const psi::SgdOptions o = options(psi::kNormalize, psi::kProject, 0.1, 0.9, 0.0, false, 0.0);
  State s = make_state({{5, 4}, {7, 3}}, at::kFloat, true);
  g_case = "op grad_scale";
  const auto on_device = at::TensorOptions(at::kFloat).device(g_device);
  const at::Tensor scale = at::full({}, 1024.0f, on_device);
  for (auto& g : s.grads) g.mul_(1024.0f);
  step_and_compare(s, o, 2e-6, scale);

  g_case = "op found_inf=1 changes nothing";
  const State before = clone(s);
  call(s, o, scale, at::ones({}, on_device));
  EXPECT(equal(s.params, before.params));
  EXPECT(equal(s.bufs, before.bufs));
  EXPECT(equal(s.steps, before.steps));

  g_case = "op found_inf=0 steps";
  call(s, o, scale, at::zeros({}, on_device));
  EXPECT(!equal(s.params, before.params));
  EXPECT(s.steps[0].item<float>() == before.steps[0].item<float>() + 1.0f);
}

// A bad call must throw c10::Error before writing anything.
void expect_rejected(const std::string& what, State s, const psi::SgdOptions& o,
                     const std::string& message_part) {
  g_case = "bad call: " + what;
  const State before = clone(s);
  bool threw = false;
  std::string message;
  try {
    call(s, o);
  } catch (const c10::Error& e) {
    threw = true;
    message = e.what_without_backtrace();
  }
  EXPECT(threw);
  if (message.find(message_part) == std::string::npos) {
    record(false, __FILE__, __LINE__,
           "message lacks '" + message_part + "': " + message.substr(0, 300));
  } else {
    record(true, __FILE__, __LINE__, "");
  }
  EXPECT(equal(s.params, before.params));
  EXPECT(equal(s.bufs, before.bufs));
  EXPECT(equal(s.steps, before.steps));
}

void test_op_bad_calls() {
  at::manual_seed(6);
  const psi::SgdOptions o = options(psi::kNormalize, psi::kProject, 0.1, 0.9, 0.0, false, 0.0);
  State s = make_state({{4, 3}, {5, 2}, {6}}, at::kFloat, true);
  call(s, o);  // a first step, so the buffers hold something

  State bad_grad = clone(s);
  bad_grad.grads[1] = at::randn({2, 5}).to(g_device);
  expect_rejected("grads[1] of shape [2, 5] for params[1] of shape [5, 2]", bad_grad, o,
                  "grads[1]");

  State bad_buf = clone(s);
  bad_buf.bufs[2] = bad_buf.bufs[2].to(at::kDouble);
  expect_rejected("double momentum buffer for float params", bad_buf, o, "momentum_buffers[2]");

  State too_few = clone(s);
  too_few.grads.pop_back();
  expect_rejected("2 grads for 3 params", too_few, o, "grads");

  expect_rejected("parallel transport with normalize", clone(s),
                  options(psi::kNormalize, psi::kParallel, 0.1, 0.9, 0.0, false, 0.0),
                  "transport=parallel");
  expect_rejected("nesterov with dampening", clone(s),
                  options(psi::kNormalize, psi::kProject, 0.1, 0.9, 0.5, true, 0.0), "nesterov");

  if (g_device.is_cuda()) {
    State cpu_grad = clone(s);
    cpu_grad.grads[2] = cpu_grad.grads[2].cpu();
    expect_rejected("grads[2] on the CPU for CUDA params", cpu_grad, o, "grads[2]");
  }
}

// The same inputs give the same bits (sums are combined in a fixed order).
void test_op_repeatable() {
  at::manual_seed(8);
  const psi::SgdOptions o = options(psi::kExp, psi::kParallel, 0.1, 0.9, 0.0, false, 0.2,
                                    psi::kTensor);
  State a = make_state({{400, 300}, {64, 64}, {7}}, at::kFloat, true);
  State b = clone(a);
  g_case = "op repeatable";
  call(a, o);
  call(b, o);
  EXPECT(equal(a.params, b.params));
  EXPECT(equal(a.bufs, b.bufs));
}

// The sums of a group are combined in a fixed order: same bits with 1 and 2 threads.
void test_op_thread_count() {
  at::manual_seed(7);
  const psi::SgdOptions o = options(psi::kExp, psi::kProject, 0.1, 0.9, 0.0, false, 0.0,
                                    psi::kTensor);
  State a = make_state({{400, 300}, {64, 64}, {1000, 3}}, at::kFloat, true);
  State b = clone(a);
  const int threads = at::get_num_threads();
  g_case = "op thread count";
  at::set_num_threads(1);
  call(a, o);
  at::set_num_threads(std::max(2, threads));
  call(b, o);
  at::set_num_threads(threads);
  EXPECT(equal(a.params, b.params));
  EXPECT(equal(a.bufs, b.bufs));
}

void run_op() {
  test_op_registered();
  if (g_failed) return;
  test_op_channel();
  test_op_tensor_double();
  test_op_long_rows();
  test_op_euclidean();
  test_op_channels_last_and_half();
  test_op_amp();
  test_op_bad_calls();
  test_op_repeatable();
  if (!g_device.is_cuda()) test_op_thread_count();
}

}  // namespace

int main(int argc, char** argv) {
  const std::string part = argc > 1 ? argv[1] : "all";
  if (part != "all" && part != "math" && part != "op" && part != "cuda") {
    std::fprintf(stderr, "usage: %s [math|op|cuda|all]\n", argv[0]);
    return 2;
  }
  if (part == "cuda") {
    if (!at::hasCUDA()) {
      std::printf("no CUDA device (or a CPU-only torch): skipped\n");
      return 77;
    }
    g_device = at::Device(at::kCUDA, 0);
  }
  try {
    if (part == "all" || part == "math") run_math();
    if (part == "all" || part == "op" || part == "cuda") run_op();
  } catch (const std::exception& e) {
    ++g_failed;
    std::fprintf(stderr, "FAIL: exception in case [%s]: %s\n", g_case.c_str(), e.what());
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
