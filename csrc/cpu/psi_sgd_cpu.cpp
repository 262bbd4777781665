// Fused CPU implementation of psi_cuda::psi_sgd_ (math: psi/math.h; work items and loops:
// group_loops.h, shared with psi_adam_).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "group_loops.h"
#include "psi/ops.h"

namespace psi {
namespace {

template <typename scalar_t>
void psi_sgd_cpu_impl(const std::vector<GroupTensor>& ts, const std::vector<char>& first,
                      const SgdOptions& o, double f) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto solve = [&](int64_t t, int64_t group, const Gram& G) {
    return psi_sgd_update(G, o, f, first[t] != 0, ts[t].solve_len(group));
  };
  const auto plain = [&](int64_t t, int64_t begin, int64_t end) {
    const GroupTensor& a = ts[t];
    apply_update(static_cast<scalar_t*>(a.w) + begin,
                 static_cast<const scalar_t*>(a.g) + begin,
                 a.m ? static_cast<opmath_t*>(a.m) + begin : nullptr, end - begin,
                 euclidean_sgd_update(o, f, first[t] != 0));
  };
  run_group_items<scalar_t>(ts, o.manifold == kEuclidean, solve, plain);
}

void psi_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                 at::TensorList state_steps, double lr, double momentum, double dampening,
                 bool nesterov, double weight_decay, bool maximize, int64_t manifold,
                 int64_t retraction, int64_t transport, double max_grad_norm,
                 const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf, int64_t block_rows,
                 const std::optional<at::Tensor>& grams) {
  const SgdOptions o = checked_sgd_options(params, grads, momentum_buffers, state_steps, lr,
                                           momentum, dampening, nesterov, weight_decay, maximize,
                                           manifold, retraction, transport, max_grad_norm,
                                           grad_scale, found_inf, block_rows, grams);
  if (params.empty()) return;
  if (found_inf.has_value() && *found_inf->data_ptr<float>() != 0.0f) return;  // CPU memory
  const double f = grad_factor(maximize, grad_scale ? grad_scale->data_ptr<float>() : nullptr);

  std::vector<at::Tensor> grads_laid_out;  // keeps copies of differently laid out grads alive
  // momentum_buffers is empty when momentum == 0 (checked): then no buffer.
  const std::vector<GroupTensor> ts =
      group_tensors(params, grads, momentum_buffers, manifold, block_rows,
                    grams ? grams->data_ptr<double>() : nullptr, grads_laid_out);
  std::vector<char> first;
  first.reserve(params.size());
  for (const at::Tensor& s : state_steps) first.push_back(*s.data_ptr<float>() == 0.0f);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "psi_sgd_cpu",
                                  [&] { psi_sgd_cpu_impl<scalar_t>(ts, first, o, f); });
  increment_steps_cpu(state_steps);
}

}  // namespace
}  // namespace psi

TORCH_LIBRARY_IMPL(psi_cuda, CPU, m) { m.impl("psi_sgd_", &psi::psi_sgd_cpu); }
