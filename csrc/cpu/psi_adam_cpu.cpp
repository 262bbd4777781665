// Fused CPU implementation of psi_cuda::psi_adam_ (math: psi/adam.h; work items and loops:
// group_loops.h, shared with psi_sgd_).
//
// PSI groups: one reduction of the Gram matrix of (w, g, m) per group, psi_adam_update solves
// the group (new w and m as combinations of w, g, m, and the new second-moment scalar, written
// by the solve itself), one write pass, exactly as psi_sgd_ with momentum. Euclidean tensors:
// torch.optim.AdamW elementwise (euclidean_adam_step).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "group_loops.h"
#include "psi/adam.h"
#include "psi/ops.h"

namespace psi {
namespace {

#define PSI_CPU_LOOPS "adam_loops.inc"
#include "cpu_dispatch_loops.h"

template <typename scalar_t, typename opmath_t>
void euclidean_adam(scalar_t* w, const scalar_t* g, opmath_t* m, opmath_t* v, int64_t n,
                    const AdamElementwise& constants) {
  PSI_CPU_CALL((w, g, m, v, n, constants), euclidean_adam_loop<scalar_t, opmath_t>);
}

template <typename scalar_t>
void psi_adam_cpu_impl(const std::vector<GroupTensor>& ts, const std::vector<void*>& vs,
                       const std::vector<double>& t_of, const AdamOptions& o, double f) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto solve = [&](int64_t t, int64_t group, const Gram& G) {
    opmath_t* v = static_cast<opmath_t*>(vs[t]) + group;
    const AdamUpdate r =
        psi_adam_update(G, o, f, static_cast<double>(*v), t_of[t], ts[t].solve_len(group));
    if (!r.up.skip) *v = static_cast<opmath_t>(r.v);
    return r.up;
  };
  const auto plain = [&](int64_t t, int64_t begin, int64_t end) {
    const GroupTensor& a = ts[t];
    euclidean_adam(static_cast<scalar_t*>(a.w) + begin,
                        static_cast<const scalar_t*>(a.g) + begin,
                        static_cast<opmath_t*>(a.m) + begin,
                        static_cast<opmath_t*>(vs[t]) + begin, end - begin,
                        euclidean_adam_constants(o, f, t_of[t]));
  };
  run_group_items<scalar_t>(ts, o.manifold == kEuclidean, solve, plain);
}

void psi_adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList state_steps, double lr, double beta1,
                  double beta2, double eps, double weight_decay, bool maximize, int64_t manifold,
                  int64_t retraction, int64_t transport, double max_grad_norm,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, int64_t block_rows,
                 const std::optional<at::Tensor>& grams) {
  const AdamOptions o = checked_adam_options(params, grads, exp_avgs, exp_avg_sqs, state_steps,
                                             lr, beta1, beta2, eps, weight_decay, maximize,
                                             manifold, retraction, transport, max_grad_norm,
                                             grad_scale, found_inf, block_rows, grams);
  if (params.empty()) return;
  if (found_inf.has_value() && *found_inf->data_ptr<float>() != 0.0f) return;  // CPU memory
  const double f = grad_factor(maximize, grad_scale ? grad_scale->data_ptr<float>() : nullptr);

  std::vector<at::Tensor> grads_laid_out;  // keeps copies of differently laid out grads alive
  const std::vector<GroupTensor> ts =
      group_tensors(params, grads, exp_avgs, manifold, block_rows,
                    grams ? grams->data_ptr<double>() : nullptr, grads_laid_out);
  std::vector<void*> vs;
  std::vector<double> t_of;  // the number of this step: state step + 1
  vs.reserve(params.size());
  t_of.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    vs.push_back(exp_avg_sqs[i].data_ptr());
    t_of.push_back(static_cast<double>(*state_steps[i].data_ptr<float>()) + 1.0);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "psi_adam_cpu",
                                  [&] { psi_adam_cpu_impl<scalar_t>(ts, vs, t_of, o, f); });
  increment_steps_cpu(state_steps);
}

}  // namespace
}  // namespace psi

TORCH_LIBRARY_IMPL(psi_cuda, CPU, m) { m.impl("psi_adam_", &psi::psi_adam_cpu); }
