// Fused CUDA implementation of psi_cuda::psi_adam_ (math: psi/adam.h; semantics: the CPU kernel
// csrc/cpu/psi_adam_cpu.cpp). The launch scheme is psi_sgd_cuda.cu's (multi_tensor.cuh): a
// PSI-Adam group is reduced and written exactly like a PSI-SGD group with momentum; only the
// solve differs, which also writes the group's second-moment scalar.
//
//   psi_adam_short_groups_kernel  groups of at most kShortGroup (65536) elements: a thread, a
//                                 warp or a block per group, reduce, solve and write in one kernel
//                                 (step_short_unit).
//   psi_long_reduce_kernel,       longer groups: chunk partials (shared with psi_sgd_),
//   psi_adam_long_solve_kernel    per-group solve (writes v),
//   psi_long_apply_kernel         chunk writes (shared with psi_sgd_).
//   euclidean_adam_kernel         Euclidean tensors: torch.optim.AdamW, elementwise.
// Every step += 1 is done by the last block of the last kernel (StepBump, multi_tensor.cuh).
//
// The bias corrections use t = step + 1, read on the device; every kernel returns at once when
// found_inf is set, so then nothing changes (steps, m and v included). No host sync.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "psi/adam.h"
#include "psi/ops.h"
#include "multi_tensor.cuh"  // last: see multi_tensor.cuh

namespace psi {
namespace {

// The step of group `group` of tensor `a` from its Gram matrix, called by one thread of a block;
// writes the group's second moment unless the group does not move. Not inlined (see
// solve_psi_group in psi_sgd_cuda.cu).
template <typename opmath_t>
__device__ __noinline__ Update solve_adam_group(const Gram& G, const AdamOptions& o,
                                                const float* grad_scale, const TensorMeta& a,
                                                int64_t group) {
  opmath_t* v = reinterpret_cast<opmath_t*>(a.v) + group;
  const double t = static_cast<double>(*reinterpret_cast<const float*>(a.step)) + 1.0;
  const AdamUpdate r = psi_adam_update(G, o, grad_factor(o.maximize, grad_scale),
                                       static_cast<double>(*v), t, solve_len(a, group));
  if (!r.up.skip) *v = static_cast<opmath_t>(r.v);
  return r.up;
}

// ---- short groups: a thread, a warp or a block per group (step_short_unit) -------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, short_blocks_per_sm<scalar_t>())
    psi_adam_short_groups_kernel(const TensorMeta* metas, int64_t num_tensors,
                                 int64_t num_units, AdamOptions o, const float* grad_scale,
                                 const float* found_inf, StepBump bump) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (skip_step(found_inf)) return;
  PSI_SHARED(ShortShared, sh);
  for (int64_t unit = blockIdx.x; unit < num_units; unit += gridDim.x) {
    const TensorMeta& a = find_tensor<&TensorMeta::first_unit>(metas, num_tensors, unit);
    step_short_unit<scalar_t>(a, unit - a.first_unit, sh, [&](const Gram& G, int64_t group) {
      return solve_adam_group<opmath_t>(G, o, grad_scale, a, group);
    });
  }
  bump_steps_when_last(bump);
}

// ---- long groups: the per-group solve (reduce and apply are shared with psi_sgd_) -------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    psi_adam_long_solve_kernel(const TensorMeta* metas, int64_t num_tensors, int64_t num_groups,
                               const Gram* partials, Update* updates, AdamOptions o,
                               const float* grad_scale, const float* found_inf) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (skip_step(found_inf)) return;
  PSI_SHARED(typename BlockGramReduce::TempStorage, temp);
  for (int64_t j = blockIdx.x; j < num_groups; j += gridDim.x) {
    const TensorMeta& a = find_tensor<&TensorMeta::first_group>(metas, num_tensors, j);
    const Gram G = a.gram != 0 ? given_gram(a, j - a.first_group)
                               : long_group_gram(a, j, partials, temp);  // thread 0 only
    if (threadIdx.x == 0) {
      updates[j] = solve_adam_group<opmath_t>(G, o, grad_scale, a, j - a.first_group);
    }
    __syncthreads();  // temp is reused by the next group
  }
}

// ---- Euclidean tensors: elementwise torch.optim.AdamW ------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    euclidean_adam_kernel(const TensorMeta* metas, int64_t num_tensors, int64_t num_chunks,
                          AdamOptions o, const float* grad_scale, const float* found_inf,
                          StepBump bump) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (skip_step(found_inf)) return;
  const double f = grad_factor(o.maximize, grad_scale);
  for (int64_t unit = blockIdx.x; unit < num_chunks; unit += gridDim.x) {
    const TensorMeta& a = find_tensor<&TensorMeta::first_unit>(metas, num_tensors, unit);
    const int64_t begin = (unit - a.first_unit) * kChunk;
    const int64_t n = min64(kChunk, a.numel - begin);
    const double t = static_cast<double>(*reinterpret_cast<const float*>(a.step)) + 1.0;
    const AdamElementwiseT<opmath_t> c(euclidean_adam_constants(o, f, t));
    const Ptrs<scalar_t> p(a, begin);
    opmath_t* v = reinterpret_cast<opmath_t*>(a.v) + begin;
    // 16-byte vectors while w, g, m and v are aligned (multi_tensor.cuh), then the tail.
    constexpr int V = kVec<scalar_t>;
    const int64_t nv = vector_count<scalar_t>(n, p.w, p.g, p.m, v);
    for (int64_t j = threadIdx.x; j < nv; j += kThreads) {
      scalar_t w[V], g[V];
      opmath_t m[V], vv[V];
      load_wgm(p, j, w, g, m);  // m: always present for Adam
      load_vec<V>(v + j * V, vv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        w[k] = static_cast<scalar_t>(euclidean_adam_step(static_cast<opmath_t>(w[k]),
                                                         static_cast<opmath_t>(g[k]), &m[k],
                                                         &vv[k], c));
      }
      store_vec<V>(p.w + j * V, w);
      store_vec<V>(p.m + j * V, m);
      store_vec<V>(v + j * V, vv);
    }
    for (int64_t i = nv * V + threadIdx.x; i < n; i += kThreads) {
      opmath_t mi = p.m[i], vi = v[i];
      const opmath_t wi = euclidean_adam_step(static_cast<opmath_t>(p.w[i]),
                                              static_cast<opmath_t>(p.g[i]), &mi, &vi, c);
      p.w[i] = static_cast<scalar_t>(wi);
      p.m[i] = mi;
      v[i] = vi;
    }
  }
  bump_steps_when_last(bump);
}

// ---- host ---------------------------------------------------------------------------------------

template <typename scalar_t>
void launch_psi_adam(const Plan& plan, const DeviceTables& tables, const AdamOptions& o,
                     const float* grad_scale, const float* found_inf, const at::Device& device,
                     dev::Stream stream) {
  const StepBumps bumps = step_bumps(plan, tables);
  if (plan.short_units > 0) {
    PSI_LAUNCH(psi_adam_short_groups_kernel<scalar_t>, grid_for(plan.short_units), kThreads, 0,
               stream, tables.shorts, static_cast<int64_t>(plan.shorts.size()), plan.short_units,
               o, grad_scale, found_inf, bumps.shorts);
  }
  if (plan.long_groups > 0) {
    const int64_t n = static_cast<int64_t>(plan.longs.size());
    const at::TensorOptions bytes = at::TensorOptions().dtype(at::kByte).device(device);
    at::Tensor partials =
        at::empty({plan.long_chunks * static_cast<int64_t>(sizeof(Gram))}, bytes);
    at::Tensor updates =
        at::empty({plan.long_groups * static_cast<int64_t>(sizeof(Update))}, bytes);
    Gram* partials_ptr = reinterpret_cast<Gram*>(partials.data_ptr());
    Update* updates_ptr = reinterpret_cast<Update*>(updates.data_ptr());
    PSI_LAUNCH(psi_long_reduce_kernel<scalar_t>, grid_for(plan.long_chunks), kThreads, 0, stream,
               tables.longs, n, plan.long_chunks, partials_ptr, found_inf);
    PSI_LAUNCH(psi_adam_long_solve_kernel<scalar_t>, grid_for(plan.long_groups), kThreads, 0,
               stream, tables.longs, n, plan.long_groups, partials_ptr, updates_ptr, o, grad_scale,
               found_inf);
    PSI_LAUNCH(psi_long_apply_kernel<scalar_t>, grid_for(plan.long_chunks), kThreads, 0, stream,
               tables.longs, n, plan.long_chunks, updates_ptr, found_inf, bumps.longs);
  }  // partials/updates go back to the caching allocator, stream-ordered after these kernels
  if (plan.plain_chunks > 0) {
    PSI_LAUNCH(euclidean_adam_kernel<scalar_t>, grid_for(plan.plain_chunks), kThreads, 0, stream,
               tables.plains, static_cast<int64_t>(plan.plains.size()), plan.plain_chunks, o,
               grad_scale, found_inf, bumps.plains);
  }
  if (bumps.own_kernel) {
    PSI_LAUNCH(increment_steps_kernel, grid_for(ceil_div(tables.num_steps, kThreads)), kThreads,
               0, stream, tables.steps, tables.num_steps, found_inf);
  }
}

void psi_adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList state_steps, double lr,
                   double beta1, double beta2, double eps, double weight_decay, bool maximize,
                   int64_t manifold, int64_t retraction, int64_t transport, double max_grad_norm,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, int64_t block_rows,
                   const std::optional<at::Tensor>& grams) {
  const AdamOptions o = checked_adam_options(params, grads, exp_avgs, exp_avg_sqs, state_steps,
                                             lr, beta1, beta2, eps, weight_decay, maximize,
                                             manifold, retraction, transport, max_grad_norm,
                                             grad_scale, found_inf, block_rows, grams);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  dev::check_device(device, "psi_adam_", "params");
  const dev::DeviceGuard guard(device);
  const dev::Stream stream = dev::current_stream(device);

  std::vector<at::Tensor> grads_laid_out;  // keeps copies of differently laid out grads alive
  grads_laid_out.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    grads_laid_out.push_back(grad_like_param(grads[i], params[i]));
  }
  const Plan plan = make_plan(params, grads_laid_out, exp_avgs, exp_avg_sqs, state_steps,
                              manifold, block_rows, grams ? grams->data_ptr<double>() : nullptr);
  const DeviceTables tables = upload_plan(plan, device, stream);
  const float* scale = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  const float* inf = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "psi_adam_cuda", [&] {
                                    launch_psi_adam<scalar_t>(plan, tables, o, scale, inf, device,
                                                              stream);
                                  });
}

}  // namespace
}  // namespace psi

PSI_CUDA_OPS_IMPL(m) { m.impl("psi_adam_", PSI_CUDA_OP(psi::psi_adam_cuda)); }
