// C++ tests of the BNP ops, run by ctest (see CMakeLists.txt).
//
//   test_bnp math   psi/bnp.h: the bias-corrected average recursion against the EMA divided by
//                   1 - (1 - rho)^t, the per-channel coefficients, the preconditioned gradient.
//   test_bnp op     psi_cuda::bnp_update_stats_ and psi_cuda::bnp_sgd_ through the dispatcher on
//                   CPU tensors against a direct computation in double.
//   test_bnp cuda   the op cases on CUDA tensors; exit status 77 (ctest: skipped) without a GPU.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <random>
#include <vector>

#include "check.h"
#include "psi/bnp.h"
#include "psi/ops.h"

namespace {

void test_average_recursion() {
  g_case = "bias-corrected average";
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal;
  for (const double rho : {0.1, 0.01, 0.5, 1.0}) {
    double ema = 0.0, corrected = 123.0;  // the initial value must not matter
    for (int t = 1; t <= 200; ++t) {
      const double x = normal(rng);
      ema = (1.0 - rho) * ema + rho * x;
      const double a = psi::bnp_batch_weight(rho, t - 1);
      corrected = psi::bnp_blend(corrected, x, a);
      if (t == 1) EXPECT(corrected == x);  // exactly the first batch
      EXPECT_NEAR(corrected, ema / (1.0 - std::pow(1.0 - rho, t)), 1e-12);
    }
  }
  EXPECT(psi::bnp_batch_weight(0.1, 0.0) == 1.0);
  EXPECT_NEAR(psi::bnp_batch_weight(0.1, 1e9), 0.1, 1e-15);
}

void test_channel_coefficients() {
  g_case = "bnp_channel";
  const psi::BnpChannel c = psi::bnp_channel(2.0, 5.0, 1e-5, true);
  EXPECT(c.shift == 2.0);
  EXPECT_NEAR(c.inv, 1.0 / (1.0 + 1e-5), 1e-15);
  const psi::BnpChannel clamp = psi::bnp_channel(2.0, 3.999999, 0.5, true);  // s < mu^2
  EXPECT(clamp.inv == 2.0);
  const psi::BnpChannel u = psi::bnp_channel(2.0, 5.0, 1e-5, false);
  EXPECT(u.shift == 0.0);
  EXPECT_NEAR(u.inv, 1.0 / (5.0 + 1e-5), 1e-15);
  EXPECT_NEAR(psi::bnp_grad(3.0, 0.5, 2.0, 0.25), (3.0 - 1.0) * 0.25, 1e-15);
  EXPECT(psi::bnp_bias_grad(1.5, 0.25) == 1.25);
}

// ---------------------------------------------------------------------------------------------
// Ops through the dispatcher

at::Device g_device = at::kCPU;

using StatsSig = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      int64_t, double, const std::optional<at::Tensor>&);
using SgdSig = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                    at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                    at::TensorList, at::IntArrayRef, double, double, double, double, bool,
                    double, bool, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

at::TensorOptions f64() { return at::TensorOptions().dtype(at::kDouble).device(g_device); }

// Statistics of an NCHW input (and its channels-last copy) after two updates, against sums
// written out per channel.
void test_op_stats() {
  for (const bool channels_last : {false, true}) {
    g_case = channels_last ? "bnp_update_stats_ channels_last" : "bnp_update_stats_ NCHW";
    const int64_t N = 3, C = 4, H = 5, W = 6;
    at::Tensor mean = at::zeros({C}, f64()), sq = at::ones({C}, f64());
    at::Tensor step = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(g_device));
    std::vector<double> want_mean(C), want_sq(C);
    const double rho = 0.25;
    for (int t = 0; t < 2; ++t) {
      at::Tensor x = at::randn({N, C, H, W}, f64());
      if (channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
      op<StatsSig>("psi_cuda::bnp_update_stats_").call(x, mean, sq, step, 1, rho, std::nullopt);
      const at::Tensor xc = x.cpu().contiguous();
      const double* p = xc.const_data_ptr<double>();
      const double a = t == 0 ? 1.0 : rho / (1.0 - (1.0 - rho) * (1.0 - rho));
      for (int64_t c = 0; c < C; ++c) {
        double s = 0, q = 0;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t i = 0; i < H * W; ++i) {
            const double v = p[(n * C + c) * H * W + i];
            s += v;
            q += v * v;
          }
        want_mean[c] = (1 - a) * want_mean[c] + a * s / (N * H * W);
        want_sq[c] = (t == 0 ? 0.0 : (1 - a) * want_sq[c]) + a * q / (N * H * W);
      }
    }
    const at::Tensor m = mean.cpu(), s = sq.cpu();
    for (int64_t c = 0; c < C; ++c) {
      EXPECT_NEAR(m.const_data_ptr<double>()[c], want_mean[c], 1e-12);
      EXPECT_NEAR(s.const_data_ptr<double>()[c], want_sq[c], 1e-12);
    }
    EXPECT(step.cpu().item<float>() == 2.0f);
  }
}

// One bnp_sgd_ step with momentum of a conv layer with bias (first step: buffer = gradient),
// then a second step, against the formula of docs/ALGORITHMS.md section 4 written out per element.
void test_op_sgd() {
  g_case = "bnp_sgd_ conv with bias, momentum";
  const int64_t O = 3, Ci = 2, K = 4;  // weight (O, Ci, 2, 2)
  const double lr = 0.1, mom = 0.9, eps = 1e-5;
  at::Tensor w = at::randn({O, Ci, 2, 2}, f64()), b = at::randn({O}, f64());
  at::Tensor mw = at::zeros_like(w), mb = at::zeros_like(b);
  at::Tensor step = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(g_device));
  at::Tensor mean = at::randn({Ci}, f64()), sq = mean * mean + at::rand({Ci}, f64());
  std::vector<double> W(w.numel()), B(b.numel()), MW(w.numel(), 0.0), MB(b.numel(), 0.0);
  for (int64_t i = 0; i < w.numel(); ++i) W[i] = w.cpu().const_data_ptr<double>()[i];
  for (int64_t i = 0; i < b.numel(); ++i) B[i] = b.cpu().const_data_ptr<double>()[i];
  const at::Tensor mc = mean.cpu(), sc = sq.cpu();
  for (int t = 0; t < 2; ++t) {
    const at::Tensor g = at::randn({O, Ci, 2, 2}, f64()), gb = at::randn({O}, f64());
    op<SgdSig>("psi_cuda::bnp_sgd_")
        .call({w}, {b}, {g}, {gb}, {mw}, {mb}, {step}, {mean}, {sq}, {1}, eps, lr, mom, 0.0,
              false, 0.0, false, std::nullopt, std::nullopt);
    const at::Tensor gc = g.cpu(), gbc = gb.cpu();
    for (int64_t o = 0; o < O; ++o) {
      double acc = 0;
      for (int64_t c = 0; c < Ci; ++c) {
        const double mu = mc.const_data_ptr<double>()[c];
        const double var = sc.const_data_ptr<double>()[c] - mu * mu;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t i = (o * Ci + c) * K + k;
          const double gp = (gc.const_data_ptr<double>()[i] - gbc.const_data_ptr<double>()[o] * mu) /
                            (var + eps);
          acc += gp * mu;
          MW[i] = t == 0 ? gp : mom * MW[i] + gp;
          W[i] -= lr * MW[i];
        }
      }
      const double gbp = gbc.const_data_ptr<double>()[o] - acc;
      MB[o] = t == 0 ? gbp : mom * MB[o] + gbp;
      B[o] -= lr * MB[o];
    }
  }
  const at::Tensor wc = w.cpu(), bc = b.cpu();
  for (int64_t i = 0; i < w.numel(); ++i) EXPECT_NEAR(wc.const_data_ptr<double>()[i], W[i], 1e-12);
  for (int64_t o = 0; o < O; ++o) EXPECT_NEAR(bc.const_data_ptr<double>()[o], B[o], 1e-12);
  EXPECT(step.cpu().item<float>() == 2.0f);

  g_case = "bnp_sgd_ with found_inf changes nothing";
  const at::Tensor w0 = w.clone(), b0 = b.clone(), mw0 = mw.clone();
  const at::Tensor one = at::ones({}, at::TensorOptions().dtype(at::kFloat).device(g_device));
  op<SgdSig>("psi_cuda::bnp_sgd_")
      .call({w}, {b}, {at::randn_like(w)}, {at::randn_like(b)}, {mw}, {mb}, {step}, {mean}, {sq},
            {1}, eps, lr, mom, 0.0, false, 0.0, false, one, one);
  EXPECT(at::equal(w, w0) && at::equal(b, b0) && at::equal(mw, mw0));
  EXPECT(step.cpu().item<float>() == 2.0f);
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
    if (part == "all" || part == "math") {
      test_average_recursion();
      test_channel_coefficients();
    }
    if (part == "all" || part == "op" || part == "cuda") {
      test_op_stats();
      test_op_sgd();
    }
  } catch (const std::exception& e) {
    ++g_failed;
    std::fprintf(stderr, "FAIL: exception in case [%s]: %s\n", g_case.c_str(), e.what());
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
