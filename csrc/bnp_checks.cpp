// Argument checks and layouts of the BNP ops (see psi/ops.h), shared by CPU and CUDA.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "psi/ops.h"

namespace psi {
namespace {

bool is_float_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_stat_vector(const char* op, const char* name, size_t i, const at::Tensor& t,
                       int64_t channels, const at::Device& device) {
  TORCH_CHECK(t.layout() == at::kStrided && t.dim() == 1 && t.size(0) == channels &&
                  (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) &&
                  t.device() == device && t.is_contiguous(),
              op, ": ", name, "[", i, "] must be a contiguous float32 or float64 vector of ",
              channels, " input channels on ", device, ", got ", t.scalar_type(), " of shape ",
              t.sizes(), " on ", t.device());
}

void check_scalar(const char* op, const char* name, const std::optional<at::Tensor>& t,
                  const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == device, op,
              ": ", name, " must be a float32 tensor with one element on ", device, ", got ",
              t->scalar_type(), " with ", t->numel(), " elements on ", t->device());
}

// True when `t` (dim >= 3) is laid out channels-last: dim 0 outermost, dim 1 innermost.
bool is_channels_last(const at::Tensor& t) {
  if (t.dim() < 3) return false;
  std::vector<int64_t> order{0};
  for (int64_t d = 2; d < t.dim(); ++d) order.push_back(d);
  order.push_back(1);
  return t.permute(order).is_contiguous();
}

}  // namespace

StatsLayout checked_stats_layout(const at::Tensor& x, const at::Tensor& mean,
                                 const at::Tensor& sqmean, const at::Tensor& step,
                                 int64_t channel_dim, double momentum,
                                 const std::optional<at::Tensor>& batches) {
  const char* op = "bnp_update_stats_";
  TORCH_CHECK(x.layout() == at::kStrided, op, ": input must be a dense tensor");
  TORCH_CHECK(is_float_dtype(x.scalar_type()), op,
              ": input must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": input must have at least one dimension");
  TORCH_CHECK_VALUE(channel_dim >= -x.dim() && channel_dim < x.dim(), op, ": channel_dim ",
              channel_dim, " is out of range for an input of ", x.dim(), " dimensions");
  TORCH_CHECK_VALUE(momentum > 0.0 && momentum <= 1.0, op, ": momentum must be in (0, 1], got ",
              momentum);
  const int64_t cd = channel_dim < 0 ? channel_dim + x.dim() : channel_dim;
  const int64_t channels = x.size(cd);
  check_stat_vector(op, "mean", 0, mean, channels, x.device());
  check_stat_vector(op, "sqmean", 0, sqmean, channels, x.device());
  TORCH_CHECK(sqmean.scalar_type() == mean.scalar_type(), op, ": sqmean is ",
              sqmean.scalar_type(), " but mean is ", mean.scalar_type());
  TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kFloat &&
                  step.device() == x.device(),
              op, ": step must be a float32 tensor with one element on ", x.device(), ", got ",
              step.scalar_type(), " with ", step.numel(), " elements on ", step.device());
  if (batches.has_value()) {
    const at::Tensor& b = *batches;
    TORCH_CHECK(b.numel() == 1 && b.scalar_type() == at::kFloat && b.device() == x.device(),
                op, ": batches must be a float32 tensor with one element on ", x.device(),
                ", got ", b.scalar_type(), " with ", b.numel(), " elements on ", b.device());
    TORCH_CHECK(!b.is_same(step), op, ": batches and step must be different tensors");
  }

  StatsLayout L{x, 1, channels, 1};
  if (x.is_contiguous()) {
    for (int64_t d = 0; d < cd; ++d) L.outer *= x.size(d);
    for (int64_t d = cd + 1; d < x.dim(); ++d) L.inner *= x.size(d);
  } else if (cd == 1 && is_channels_last(x)) {
    L.outer = x.numel() / std::max<int64_t>(channels, 1);
    if (channels == 0) L.outer = 0;
  } else {
    L.x = x.contiguous();
    for (int64_t d = 0; d < cd; ++d) L.outer *= x.size(d);
    for (int64_t d = cd + 1; d < x.dim(); ++d) L.inner *= x.size(d);
  }
  return L;
}

std::optional<RowLayout> row_layout(const at::Tensor& w) {
  if (w.dim() < 2) return std::nullopt;
  RowLayout L;
  L.rows = w.size(0);
  L.cin_g = w.size(1);
  L.row_len = L.rows == 0 ? 0 : w.numel() / L.rows;
  const int64_t kernel = L.cin_g == 0 ? 0 : L.row_len / L.cin_g;
  if (w.is_contiguous()) {
    // Linear (or a 1x1 kernel): the channel is the index inside the row.
    L.chan_inner = kernel == 1;
    L.outer = L.chan_inner ? 1 : L.cin_g;
    L.inner = L.chan_inner ? L.cin_g : kernel;
    return L;
  }
  if (is_channels_last(w)) {
    L.chan_inner = true;
    L.outer = kernel;
    L.inner = L.cin_g;
    return L;
  }
  return std::nullopt;
}

void check_bnp_layers(const char* op, at::TensorList weights, at::TensorList biases,
                      at::TensorList means, at::TensorList sqmeans, at::IntArrayRef groups,
                      double eps) {
  const size_t n = weights.size();
  const char* wname = std::string(op) == "bnp_precondition_" ? "weight_grads" : "weights";
  const char* bname = std::string(op) == "bnp_precondition_" ? "bias_grads" : "biases";
  TORCH_CHECK(biases.empty() || biases.size() == n, op, ": got ", biases.size(), " ", bname,
              " for ", n, " ", wname, "; expected ", n, " or 0 (layers without bias)");
  TORCH_CHECK(means.size() == n && sqmeans.size() == n && groups.size() == n, op, ": got ", n,
              " ", wname, " but ", means.size(), " means, ", sqmeans.size(), " sqmeans and ",
              groups.size(), " groups");
  TORCH_CHECK_VALUE(eps > 0.0, op, ": eps must be > 0, got ", eps);
  if (n == 0) return;
  const at::Device device = weights[0].device();
  const c10::ScalarType dtype = weights[0].scalar_type();
  TORCH_CHECK(is_float_dtype(dtype), op, ": ", wname,
              " must be float32, float64, float16 or bfloat16, got ", dtype);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.layout() == at::kStrided, op, ": ", wname, "[", i, "] must be dense");
    TORCH_CHECK(w.device() == device && w.scalar_type() == dtype, op, ": ", wname, "[", i,
                "] is ", w.scalar_type(), " on ", w.device(), " but ", wname, "[0] is ", dtype,
                " on ", device, "; call the op once per (device, dtype)");
    TORCH_CHECK(w.dim() >= 2, op, ": ", wname, "[", i, "] has shape ", w.sizes(),
                "; expected a Linear (out, in) or Conv (out, in/groups, *kernel) weight");
    TORCH_CHECK_VALUE(groups[i] >= 1 && w.size(0) % groups[i] == 0, op, ": groups[", i, "] = ",
                groups[i], " must be >= 1 and divide the ", w.size(0), " output channels");
    const int64_t in_channels = w.size(1) * groups[i];
    check_stat_vector(op, "means", i, means[i], in_channels, device);
    check_stat_vector(op, "sqmeans", i, sqmeans[i], in_channels, device);
    if (!biases.empty()) {
      const at::Tensor& b = biases[i];
      TORCH_CHECK(b.layout() == at::kStrided && b.dim() == 1 && b.size(0) == w.size(0) &&
                      b.scalar_type() == dtype && b.device() == device,
                  op, ": ", bname, "[", i, "] must be a ", dtype, " vector of ", w.size(0),
                  " elements on ", device, ", got ", b.scalar_type(), " of shape ", b.sizes(),
                  " on ", b.device());
    }
  }
}

void check_bnp_sgd_args(at::TensorList weights, at::TensorList biases, at::TensorList wgrads,
                        at::TensorList bgrads, at::TensorList wbufs, at::TensorList bbufs,
                        at::TensorList steps, const SgdOptions& o,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
  const char* op = "bnp_sgd_";
  TORCH_CHECK_VALUE(o.lr >= 0.0, op, ": lr must be >= 0, got ", o.lr);
  TORCH_CHECK_VALUE(o.momentum >= 0.0, op, ": momentum must be >= 0, got ", o.momentum);
  TORCH_CHECK_VALUE(o.weight_decay >= 0.0, op, ": weight_decay must be >= 0, got ", o.weight_decay);
  TORCH_CHECK_VALUE(!o.nesterov || (o.momentum > 0.0 && o.dampening == 0.0), op,
              ": nesterov needs momentum > 0 and dampening == 0");
  const size_t n = weights.size();
  const bool has_momentum = o.momentum != 0.0;
  TORCH_CHECK(wgrads.size() == n && bgrads.size() == biases.size(), op, ": got ", n,
              " weights and ", biases.size(), " biases but ", wgrads.size(), " weight_grads and ",
              bgrads.size(), " bias_grads");
  TORCH_CHECK(wbufs.size() == (has_momentum ? n : 0) &&
                  bbufs.size() == (has_momentum ? biases.size() : 0),
              op, ": got ", wbufs.size(), " weight and ", bbufs.size(),
              " bias momentum buffers; expected one per weight and bias",
              has_momentum ? "" : " only with momentum != 0 (none now)");
  TORCH_CHECK(steps.size() == n, op, ": got ", n, " weights but ", steps.size(),
              " state_steps (one per layer)");
  if (n == 0) return;
  const at::Device device = weights[0].device();
  const c10::ScalarType dtype = weights[0].scalar_type();
  const c10::ScalarType state_dtype = opmath_dtype(dtype);
  auto check_like = [&](const char* name, size_t i, const at::Tensor& t, const at::Tensor& p,
                        c10::ScalarType want, bool same_strides) {
    TORCH_CHECK(t.layout() == at::kStrided && t.sizes() == p.sizes() &&
                    t.scalar_type() == want && t.device() == device,
                op, ": ", name, "[", i, "] must be a dense ", want, " tensor of shape ",
                p.sizes(), " on ", device, ", got ", t.scalar_type(), " of shape ", t.sizes(),
                " on ", t.device());
    TORCH_CHECK(!same_strides || t.strides() == p.strides(), op, ": ", name, "[", i,
                "] has strides ", t.strides(), " but its parameter has strides ", p.strides());
  };
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(row_layout(weights[i]).has_value(), op, ": weights[", i, "] with sizes ",
                weights[i].sizes(), " and strides ", weights[i].strides(),
                " is neither contiguous nor channels_last");
    check_like("weight_grads", i, wgrads[i], weights[i], dtype, false);
    if (has_momentum) check_like("weight_momentum_buffers", i, wbufs[i], weights[i], state_dtype, true);
    if (!biases.empty()) {
      TORCH_CHECK(biases[i].is_contiguous(), op, ": biases[", i, "] must be contiguous");
      check_like("bias_grads", i, bgrads[i], biases[i], dtype, false);
      if (has_momentum) check_like("bias_momentum_buffers", i, bbufs[i], biases[i], state_dtype, true);
    }
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat && s.device() == device, op,
                ": state_steps[", i, "] must be a float32 tensor with one element on ", device,
                ", got ", s.scalar_type(), " with ", s.numel(), " elements on ", s.device());
  }
  check_scalar(op, "grad_scale", grad_scale, device);
  check_scalar(op, "found_inf", found_inf, device);
}

}  // namespace psi
