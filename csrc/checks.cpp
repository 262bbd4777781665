// Argument checks shared by the CPU and CUDA implementations (see psi/ops.h).
#include "psi/ops.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace psi {

c10::ScalarType opmath_dtype(c10::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

SgdOptions make_sgd_options(double lr, double momentum, double dampening, bool nesterov,
                            double weight_decay, bool maximize, int64_t manifold,
                            int64_t retraction, int64_t transport, double max_grad_norm) {
  SgdOptions o;
  o.lr = lr;
  o.momentum = momentum;
  o.dampening = dampening;
  o.nesterov = nesterov;
  o.weight_decay = weight_decay;
  o.maximize = maximize;
  o.manifold = manifold;
  o.retraction = retraction;
  o.transport = transport;
  o.max_grad_norm = max_grad_norm;
  o.block_rows = 1;
  return o;
}

int64_t group_size(const at::Tensor& p, int64_t manifold, int64_t block_rows) {
  if (manifold != kChannel) return p.numel();
  return p.size(0) == 0 ? 0 : p.numel() / p.size(0) * block_rows;
}

at::Tensor grad_like_param(const at::Tensor& g, const at::Tensor& p) {
  if (g.strides() == p.strides()) return g;
  return at::empty_like(p).copy_(g);
}

namespace {

// Rows of p.view(p.size(0), -1) lie one after the other in memory (so a group of consecutive
// rows is one block of memory too).
bool groups_are_blocks(const at::Tensor& p, int64_t manifold) {
  if (!p.is_non_overlapping_and_dense()) return false;
  if (manifold != kChannel || p.dim() == 0 || p.size(0) <= 1 || p.numel() == 0) return true;
  return p.stride(0) == p.numel() / p.size(0);
}

void check_scalar_arg(const char* op, const std::optional<at::Tensor>& t, const char* name,
                      const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat,
              op, ": ", name, " must be a float32 tensor with one element, got dtype ",
              t->scalar_type(), " and ", t->numel(), " elements");
  TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(),
              " but params are on ", device);
}

void check_options(const char* op, int64_t manifold, int64_t retraction, int64_t transport,
                   double lr, double max_grad_norm, int64_t block_rows) {
  TORCH_CHECK_VALUE(block_rows >= 1, op, ": block_rows must be >= 1, got ", block_rows);
  TORCH_CHECK_VALUE(block_rows == 1 || manifold == kChannel, op,
              ": block_rows applies to manifold=1 (channel rows, grouped by block_rows); got "
              "block_rows=", block_rows, " with manifold ", manifold);
  TORCH_CHECK_VALUE(manifold >= kEuclidean && manifold <= kTensor, op,
              ": manifold must be 0 (euclidean), 1 (channel) or 2 (tensor), got ", manifold);
  TORCH_CHECK_VALUE(retraction >= kNormalize && retraction <= kRetractNone, op,
              ": retraction must be 0 (normalize), 1 (exp) or 2 (none), got ", retraction);
  TORCH_CHECK_VALUE(transport == kProject || transport == kParallel, op,
              ": transport must be 0 (project) or 1 (parallel), got ", transport);
  TORCH_CHECK_VALUE(transport != kParallel || retraction == kExp, op,
              ": transport=parallel needs retraction=exp (the geodesic it transports along)");
  TORCH_CHECK_VALUE(lr >= 0.0, op, ": lr must be >= 0, got ", lr);
  TORCH_CHECK_VALUE(max_grad_norm >= 0.0, op, ": max_grad_norm must be >= 0 (0 disables it), got ",
              max_grad_norm);
}

c10::ScalarType check_params_dtype(const char* op, at::TensorList params) {
  const c10::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": params must be float32, float64, float16 or bfloat16, got ", dtype);
  return dtype;
}

// params[i] and grads[i] against params[0]'s device and dtype.
void check_param_and_grad(const char* op, size_t i, const at::Tensor& p, const at::Tensor& g,
                          c10::ScalarType dtype, const at::Device& device, int64_t manifold,
                          int64_t block_rows) {
  TORCH_CHECK(p.layout() == at::kStrided, op, ": params[", i, "] must be a strided tensor");
  TORCH_CHECK(p.device() == device && p.scalar_type() == dtype, op, ": params[", i, "] is ",
              p.scalar_type(), " on ", p.device(), " but params[0] is ", dtype, " on ", device,
              "; call the op once per (device, dtype)");
  TORCH_CHECK(manifold != kChannel || p.dim() >= 1, op, ": params[", i,
              "] is a 0-dim tensor; manifold=channel needs at least one dimension");
  TORCH_CHECK_VALUE(block_rows == 1 || p.size(0) % block_rows == 0, op, ": params[", i,
              "] has ", p.size(0), " rows (size of dim 0), which block_rows=", block_rows,
              " does not divide");
  TORCH_CHECK(groups_are_blocks(p, manifold), op, ": params[", i, "] with sizes ", p.sizes(),
              " and strides ", p.strides(),
              " is not dense with dim 0 outermost; make it contiguous (or channels_last)");
  TORCH_CHECK(g.layout() == at::kStrided, op, ": grads[", i, "] is sparse; ", op,
              " needs dense gradients");
  TORCH_CHECK(g.sizes() == p.sizes(), op, ": grads[", i, "] has shape ", g.sizes(),
              " but params[", i, "] has shape ", p.sizes());
  TORCH_CHECK(g.scalar_type() == dtype && g.device() == device, op, ": grads[", i, "] is ",
              g.scalar_type(), " on ", g.device(), "; expected ", dtype, " on ", device,
              " like params[", i, "]");
}

// A state tensor with the shape and layout of params[i], in the opmath dtype.
void check_state_like_param(const char* op, const char* name, size_t i, const at::Tensor& m,
                            const at::Tensor& p, c10::ScalarType state_dtype) {
  TORCH_CHECK(m.layout() == at::kStrided && m.sizes() == p.sizes() &&
                  m.scalar_type() == state_dtype && m.device() == p.device(),
              op, ": ", name, "[", i, "] must be a ", state_dtype, " tensor of shape ", p.sizes(),
              " on ", p.device(), ", got ", m.scalar_type(), " of shape ", m.sizes(), " on ",
              m.device());
  TORCH_CHECK(m.strides() == p.strides(), op, ": ", name, "[", i, "] has strides ", m.strides(),
              " but params[", i, "] has strides ", p.strides(),
              "; create it with torch.zeros_like(param, dtype=...)");
}

void check_step(const char* op, size_t i, const at::Tensor& s, const at::Device& device) {
  TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat && s.device() == device, op,
              ": state_steps[", i, "] must be a float32 tensor with one element on ", device,
              ", got ", s.scalar_type(), " with ", s.numel(), " elements on ", s.device());
}

int64_t total_groups(at::TensorList params, int64_t manifold, int64_t block_rows);

// grams of psi_sgd_ / psi_adam_: float64, contiguous, (groups, kGramCols) on the params' device.
void check_grams(const char* op, at::TensorList params, int64_t manifold, int64_t block_rows,
                 const std::optional<at::Tensor>& grams) {
  if (!grams.has_value()) return;
  TORCH_CHECK_VALUE(manifold != kEuclidean, op,
                    ": grams (given Gram sums) apply to PSI groups (manifold 1 or 2), not to "
                    "manifold=0 (euclidean)");
  const int64_t groups = params.empty() ? 0 : total_groups(params, manifold, block_rows);
  const at::Tensor& G = *grams;
  TORCH_CHECK(G.layout() == at::kStrided && G.scalar_type() == at::kDouble && G.dim() == 2 &&
                  G.size(0) == groups && G.size(1) == kGramCols && G.is_contiguous(),
              op, ": grams must be a contiguous float64 tensor of shape (", groups, ", ",
              kGramCols, ") (a row of Gram sums and length per group of the call, as psi_grams "
              "returns), got ", G.scalar_type(),
              " of shape ", G.sizes(), G.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(params.empty() || G.device() == params[0].device(), op, ": grams is on ",
              G.device(), " but params are on ", params[0].device());
}

int64_t total_groups(at::TensorList params, int64_t manifold, int64_t block_rows) {
  int64_t groups = 0;
  for (const at::Tensor& p : params) {
    if (p.numel() > 0) groups += num_groups(p, manifold, block_rows);
  }
  return groups;
}

}  // namespace

int64_t checked_grams_args(at::TensorList params, at::TensorList grads, at::TensorList buffers,
                           int64_t manifold, int64_t block_rows) {
  const char* op = "psi_grams";
  TORCH_CHECK_VALUE(manifold == kChannel || manifold == kTensor, op,
                    ": manifold must be 1 (channel or block rows) or 2 (tensor), got ", manifold);
  check_options(op, manifold, kNormalize, kProject, 0.0, 0.0, block_rows);
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, op, ": got ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK(buffers.empty() || buffers.size() == n, op, ": got ", buffers.size(),
              " buffers for ", n, " params; expected none or one per param");
  if (n == 0) return 0;
  const at::Device device = params[0].device();
  const c10::ScalarType dtype = check_params_dtype(op, params);
  for (size_t i = 0; i < n; ++i) {
    check_param_and_grad(op, i, params[i], grads[i], dtype, device, manifold, block_rows);
    if (!buffers.empty()) {
      check_state_like_param(op, "buffers", i, buffers[i], params[i], opmath_dtype(dtype));
    }
  }
  return total_groups(params, manifold, block_rows);
}

void check_psi_sgd_args(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                        at::TensorList steps, const SgdOptions& o,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
  const char* op = "psi_sgd_";
  check_options(op, o.manifold, o.retraction, o.transport, o.lr, o.max_grad_norm, o.block_rows);
  TORCH_CHECK_VALUE(o.momentum >= 0.0, "psi_sgd_: momentum must be >= 0, got ", o.momentum);
  TORCH_CHECK_VALUE(!o.nesterov || (o.momentum > 0.0 && o.dampening == 0.0),
              "psi_sgd_: nesterov needs momentum > 0 and dampening == 0");

  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, "psi_sgd_: got ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK(steps.size() == n, "psi_sgd_: got ", n, " params but ", steps.size(),
              " state_steps");
  const bool has_momentum = o.momentum != 0.0;
  TORCH_CHECK(bufs.size() == (has_momentum ? n : 0), "psi_sgd_: got ", bufs.size(),
              " momentum_buffers for ", n, " params; expected ", (has_momentum ? n : 0),
              has_momentum ? "" : " (momentum is 0)");
  if (n == 0) return;

  const at::Device device = params[0].device();
  const c10::ScalarType dtype = check_params_dtype(op, params);
  const c10::ScalarType state_dtype = opmath_dtype(dtype);
  for (size_t i = 0; i < n; ++i) {
    check_param_and_grad(op, i, params[i], grads[i], dtype, device, o.manifold, o.block_rows);
    if (has_momentum) {
      check_state_like_param(op, "momentum_buffers", i, bufs[i], params[i], state_dtype);
    }
    check_step(op, i, steps[i], device);
  }
  check_scalar_arg(op, grad_scale, "grad_scale", device);
  check_scalar_arg(op, found_inf, "found_inf", device);
}

int64_t num_groups(const at::Tensor& p, int64_t manifold, int64_t block_rows) {
  if (manifold == kEuclidean) return p.numel();
  return manifold == kChannel ? p.size(0) / block_rows : 1;
}

void check_psi_adam_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList steps, const AdamOptions& o,
                         const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf) {
  const char* op = "psi_adam_";
  check_options(op, o.manifold, o.retraction, o.transport, o.lr, o.max_grad_norm, o.block_rows);
  TORCH_CHECK_VALUE(o.beta1 >= 0.0 && o.beta1 < 1.0, "psi_adam_: beta1 must be in [0, 1), got ",
              o.beta1);
  TORCH_CHECK_VALUE(o.beta2 >= 0.0 && o.beta2 < 1.0, "psi_adam_: beta2 must be in [0, 1), got ",
              o.beta2);
  TORCH_CHECK_VALUE(o.eps >= 0.0, "psi_adam_: eps must be >= 0, got ", o.eps);
  TORCH_CHECK_VALUE(o.weight_decay >= 0.0, "psi_adam_: weight_decay must be >= 0, got ",
              o.weight_decay);

  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, "psi_adam_: got ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK(exp_avgs.size() == n, "psi_adam_: got ", n, " params but ", exp_avgs.size(),
              " exp_avgs");
  TORCH_CHECK(exp_avg_sqs.size() == n, "psi_adam_: got ", n, " params but ",
              exp_avg_sqs.size(), " exp_avg_sqs");
  TORCH_CHECK(steps.size() == n, "psi_adam_: got ", n, " params but ", steps.size(),
              " state_steps");
  if (n == 0) return;

  const at::Device device = params[0].device();
  const c10::ScalarType dtype = check_params_dtype(op, params);
  const c10::ScalarType state_dtype = opmath_dtype(dtype);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_param_and_grad(op, i, p, grads[i], dtype, device, o.manifold, o.block_rows);
    check_state_like_param(op, "exp_avgs", i, exp_avgs[i], p, state_dtype);
    if (o.manifold == kEuclidean) {
      check_state_like_param(op, "exp_avg_sqs", i, exp_avg_sqs[i], p, state_dtype);
    } else {
      // One second-moment scalar per group: shape (rows,) for channel, () or (1,) for tensor.
      const at::Tensor& v = exp_avg_sqs[i];
      const int64_t groups = num_groups(p, o.manifold, o.block_rows);
      TORCH_CHECK(v.layout() == at::kStrided && v.numel() == groups &&
                      v.scalar_type() == state_dtype && v.device() == device &&
                      v.is_contiguous(),
                  "psi_adam_: exp_avg_sqs[", i, "] must be a contiguous ", state_dtype,
                  " tensor with one element per group (", groups, " for params[", i,
                  "] of shape ", p.sizes(), ") on ", device, ", got ", v.scalar_type(),
                  " of shape ", v.sizes(), " on ", v.device());
    }
    check_step(op, i, steps[i], device);
  }
  check_scalar_arg(op, grad_scale, "grad_scale", device);
  check_scalar_arg(op, found_inf, "found_inf", device);
}

AdamOptions checked_adam_options(at::TensorList params, at::TensorList grads,
                                 at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                 at::TensorList steps, double lr, double beta1, double beta2,
                                 double eps, double weight_decay, bool maximize, int64_t manifold,
                                 int64_t retraction, int64_t transport, double max_grad_norm,
                                 const std::optional<at::Tensor>& grad_scale,
                                 const std::optional<at::Tensor>& found_inf, int64_t block_rows,
                                 const std::optional<at::Tensor>& grams) {
  AdamOptions o;
  o.lr = lr;
  o.beta1 = beta1;
  o.beta2 = beta2;
  o.eps = eps;
  o.weight_decay = weight_decay;
  o.max_grad_norm = max_grad_norm;
  o.maximize = maximize;
  o.manifold = manifold;
  o.retraction = retraction;
  o.transport = transport;
  o.block_rows = block_rows;
  check_psi_adam_args(params, grads, exp_avgs, exp_avg_sqs, steps, o, grad_scale, found_inf);
  check_grams("psi_adam_", params, manifold, block_rows, grams);
  return o;
}

SgdOptions checked_sgd_options(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                               at::TensorList steps, double lr, double momentum, double dampening,
                               bool nesterov, double weight_decay, bool maximize,
                               int64_t manifold, int64_t retraction, int64_t transport,
                               double max_grad_norm, const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf, int64_t block_rows,
                               const std::optional<at::Tensor>& grams) {
  SgdOptions o = make_sgd_options(lr, momentum, dampening, nesterov, weight_decay, maximize,
                                  manifold, retraction, transport, max_grad_norm);
  o.block_rows = block_rows;
  check_psi_sgd_args(params, grads, bufs, steps, o, grad_scale, found_inf);
  check_grams("psi_sgd_", params, manifold, block_rows, grams);
  return o;
}

}  // namespace psi
