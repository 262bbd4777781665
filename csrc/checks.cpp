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
  return o;
}

int64_t group_size(const at::Tensor& p, int64_t manifold) {
  if (manifold != kChannel) return p.numel();
  return p.size(0) == 0 ? 0 : p.numel() / p.size(0);
}

at::Tensor grad_like_param(const at::Tensor& g, const at::Tensor& p) {
  if (g.strides() == p.strides()) return g;
  return at::empty_like(p).copy_(g);
}

namespace {

bool groups_are_blocks(const at::Tensor& p, int64_t manifold) {
  if (!p.is_non_overlapping_and_dense()) return false;
  if (manifold != kChannel || p.dim() == 0 || p.size(0) <= 1 || p.numel() == 0) return true;
  return p.stride(0) == group_size(p, manifold);
}

void check_scalar_arg(const std::optional<at::Tensor>& t, const char* name,
                      const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat,
              "psi_sgd_: ", name, " must be a float32 tensor with one element, got dtype ",
              t->scalar_type(), " and ", t->numel(), " elements");
  TORCH_CHECK(t->device() == device, "psi_sgd_: ", name, " is on ", t->device(),
              " but params are on ", device);
}

}  // namespace

void check_psi_sgd_args(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                        at::TensorList steps, const SgdOptions& o,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(o.manifold >= kEuclidean && o.manifold <= kTensor,
              "psi_sgd_: manifold must be 0 (euclidean), 1 (channel) or 2 (tensor), got ",
              o.manifold);
  TORCH_CHECK(o.retraction >= kNormalize && o.retraction <= kRetractNone,
              "psi_sgd_: retraction must be 0 (normalize), 1 (exp) or 2 (none), got ",
              o.retraction);
  TORCH_CHECK(o.transport == kProject || o.transport == kParallel,
              "psi_sgd_: transport must be 0 (project) or 1 (parallel), got ", o.transport);
  TORCH_CHECK(o.transport != kParallel || o.retraction == kExp,
              "psi_sgd_: transport=parallel needs retraction=exp (the geodesic it transports along)");
  TORCH_CHECK(o.lr >= 0.0, "psi_sgd_: lr must be >= 0, got ", o.lr);
  TORCH_CHECK(o.momentum >= 0.0, "psi_sgd_: momentum must be >= 0, got ", o.momentum);
  TORCH_CHECK(o.max_grad_norm >= 0.0, "psi_sgd_: max_grad_norm must be >= 0 (0 disables it), got ",
              o.max_grad_norm);
  TORCH_CHECK(!o.nesterov || (o.momentum > 0.0 && o.dampening == 0.0),
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
  const c10::ScalarType dtype = params[0].scalar_type();
  const c10::ScalarType state_dtype = opmath_dtype(dtype);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "psi_sgd_: params must be float32, float64, float16 or bfloat16, got ", dtype);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(p.layout() == at::kStrided, "psi_sgd_: params[", i, "] must be a strided tensor");
    TORCH_CHECK(p.device() == device && p.scalar_type() == dtype, "psi_sgd_: params[", i,
                "] is ", p.scalar_type(), " on ", p.device(), " but params[0] is ", dtype,
                " on ", device, "; call the op once per (device, dtype)");
    TORCH_CHECK(o.manifold != kChannel || p.dim() >= 1, "psi_sgd_: params[", i,
                "] is a 0-dim tensor; manifold=channel needs at least one dimension");
    TORCH_CHECK(groups_are_blocks(p, o.manifold), "psi_sgd_: params[", i, "] with sizes ",
                p.sizes(), " and strides ", p.strides(),
                " is not dense with dim 0 outermost; make it contiguous (or channels_last)");
    TORCH_CHECK(g.layout() == at::kStrided, "psi_sgd_: grads[", i,
                "] is sparse; psi_sgd_ needs dense gradients");
    TORCH_CHECK(g.sizes() == p.sizes(), "psi_sgd_: grads[", i, "] has shape ", g.sizes(),
                " but params[", i, "] has shape ", p.sizes());
    TORCH_CHECK(g.scalar_type() == dtype && g.device() == device, "psi_sgd_: grads[", i,
                "] is ", g.scalar_type(), " on ", g.device(), "; expected ", dtype, " on ",
                device, " like params[", i, "]");
    if (has_momentum) {
      const at::Tensor& m = bufs[i];
      TORCH_CHECK(m.layout() == at::kStrided && m.sizes() == p.sizes() &&
                      m.scalar_type() == state_dtype && m.device() == device,
                  "psi_sgd_: momentum_buffers[", i, "] must be a ", state_dtype,
                  " tensor of shape ", p.sizes(), " on ", device, ", got ", m.scalar_type(),
                  " of shape ", m.sizes(), " on ", m.device());
      TORCH_CHECK(m.strides() == p.strides(), "psi_sgd_: momentum_buffers[", i,
                  "] has strides ", m.strides(), " but params[", i, "] has strides ",
                  p.strides(), "; create it with torch.zeros_like(param, dtype=...)");
    }
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat && s.device() == device,
                "psi_sgd_: state_steps[", i, "] must be a float32 tensor with one element on ",
                device, ", got ", s.scalar_type(), " with ", s.numel(), " elements on ",
                s.device());
  }
  check_scalar_arg(grad_scale, "grad_scale", device);
  check_scalar_arg(found_inf, "found_inf", device);
}

SgdOptions checked_sgd_options(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                               at::TensorList steps, double lr, double momentum, double dampening,
                               bool nesterov, double weight_decay, bool maximize,
                               int64_t manifold, int64_t retraction, int64_t transport,
                               double max_grad_norm, const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf) {
  const SgdOptions o = make_sgd_options(lr, momentum, dampening, nesterov, weight_decay, maximize,
                                        manifold, retraction, transport, max_grad_norm);
  check_psi_sgd_args(params, grads, bufs, steps, o, grad_scale, found_inf);
  return o;
}

}  // namespace psi
