// Fused CUDA implementation of psi_cuda::psi_sgd_ (math: psi/math.h; semantics: the CPU kernel
// csrc/cpu/psi_sgd_cpu.cpp, which this file follows step for step).
//
// One multi-tensor launch per kind of work (the shared pieces: multi_tensor.cuh). The host builds
// a table with one TensorMeta per non-empty tensor (device addresses of w, g, m and the step,
// sizes, the index of the tensor's first work unit) and copies it to the device asynchronously,
// or reuses the device copy of an earlier call with the same table (device_table.cuh); a block
// finds the tensor of its work unit by binary search over the first-unit column.
//
//   psi_short_groups_kernel  channel/tensor groups of at most kShortGroup (65536) elements, in one
//                            kernel (step_short_unit, multi_tensor.cuh): a group of at most
//                            kThreadGroup (32) elements is stepped by one thread (256 per block),
//                            of at most kWarpGroup (256) by one warp (8 per block), a longer one
//                            by a block. The thread sums, solves and writes its group; a warp or
//                            block reduces the group's Gram matrix, one thread solves the step,
//                            every thread writes its elements. Groups of at most kRegisterGroup (2048) elements are held
//                            in registers (one read, one write); longer ones are read a second
//                            time for the write, from L1/L2 where the first read left them. A
//                            call whose groups are all this short is one launch.
//   psi_long_reduce_kernel   longer groups, phase 1: one block per chunk of kChunk elements
//                            writes the chunk's partial Gram matrix to its own slot.
//   psi_long_solve_kernel    phase 2: one block per long group sums the partials of its group
//                            (fixed order: results do not depend on timing) and solves the step.
//   psi_long_apply_kernel    phase 3: one block per chunk writes the chunk with its group's step.
//   euclidean_sgd_kernel     Euclidean tensors: one block per chunk, elementwise.
// Every step += 1 is done by the last block of the last kernel, once every other block of that
// kernel is done (StepBump, multi_tensor.cuh): no block reads a step another has incremented, and
// the steps take no launch of their own (increment_steps_kernel only when every tensor is empty).
//
// Every kernel first reads found_inf and returns when it is set: then nothing at all changes.
// Nothing here waits for the device: found_inf, grad_scale and the steps are read by kernels.
// Limits: none on sizes (64-bit indices; launches of more than kMaxGrid units loop). Safe to
// capture in a CUDA graph: under capture the table reaches the device through kernel arguments
// instead of a pinned host buffer (device_table.cuh), and no kernel depends on host values.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "psi/ops.h"
#include "multi_tensor.cuh"  // last: see multi_tensor.cuh

namespace psi {
namespace {

// The step of one group from its Gram matrix, called by one thread of a block. Not inlined: the
// double-precision solve then does not add its registers to those that hold the group's elements
// (the values live across the call are saved on that one thread's stack instead).
__device__ __noinline__ Update solve_psi_group(const Gram& G, const SgdOptions& o,
                                               const float* grad_scale, const float* step,
                                               int64_t len) {
  return psi_sgd_update(G, o, grad_factor(o.maximize, grad_scale), *step == 0.0f, len);
}

// ---- short groups: a thread, a warp or a block per group (step_short_unit) -------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, short_blocks_per_sm<scalar_t>())
    psi_short_groups_kernel(const TensorMeta* metas, int64_t num_tensors, int64_t num_units,
                            SgdOptions o, const float* grad_scale, const float* found_inf,
                            StepBump bump) {
  if (skip_step(found_inf)) return;
  PSI_SHARED(ShortShared, sh);
  for (int64_t unit = blockIdx.x; unit < num_units; unit += gridDim.x) {
    const TensorMeta& a = find_tensor<&TensorMeta::first_unit>(metas, num_tensors, unit);
    step_short_unit<scalar_t>(a, unit - a.first_unit, sh, [&](const Gram& G, int64_t group) {
      return solve_psi_group(G, o, grad_scale, reinterpret_cast<const float*>(a.step),
                             solve_len(a, group));
    });
  }
  bump_steps_when_last(bump);
}

// ---- long groups: chunk partials, per-group solve, chunk writes --------------------------------

__global__ void __launch_bounds__(kThreads)
    psi_long_solve_kernel(const TensorMeta* metas, int64_t num_tensors, int64_t num_groups,
                          const Gram* partials, Update* updates, SgdOptions o,
                          const float* grad_scale, const float* found_inf) {
  if (skip_step(found_inf)) return;
  PSI_SHARED(typename BlockGramReduce::TempStorage, temp);
  for (int64_t j = blockIdx.x; j < num_groups; j += gridDim.x) {
    const TensorMeta& a = find_tensor<&TensorMeta::first_group>(metas, num_tensors, j);
    const Gram G = a.gram != 0 ? given_gram(a, j - a.first_group)
                               : long_group_gram(a, j, partials, temp);  // thread 0 only
    if (threadIdx.x == 0) {
      updates[j] = solve_psi_group(G, o, grad_scale, reinterpret_cast<const float*>(a.step),
                                   solve_len(a, j - a.first_group));
    }
    __syncthreads();  // temp is reused by the next group
  }
}

// ---- Euclidean tensors: elementwise torch.optim.SGD --------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    euclidean_sgd_kernel(const TensorMeta* metas, int64_t num_tensors, int64_t num_chunks,
                         SgdOptions o, const float* grad_scale, const float* found_inf,
                         StepBump bump) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (skip_step(found_inf)) return;
  for (int64_t unit = blockIdx.x; unit < num_chunks; unit += gridDim.x) {
    const TensorMeta& a = find_tensor<&TensorMeta::first_unit>(metas, num_tensors, unit);
    const int64_t begin = (unit - a.first_unit) * kChunk;
    const bool first = *reinterpret_cast<const float*>(a.step) == 0.0f;
    const Update up = euclidean_sgd_update(o, grad_factor(o.maximize, grad_scale), first);
    thread_apply<scalar_t, opmath_t>(Ptrs<scalar_t>(a, begin), min64(kChunk, a.numel - begin),
                                     up, threadIdx.x);
  }
  bump_steps_when_last(bump);
}

// ---- steps -------------------------------------------------------------------------------------

// ---- host ---------------------------------------------------------------------------------------

template <typename scalar_t>
void launch_psi_sgd(const Plan& plan, const DeviceTables& tables, const SgdOptions& o,
                    const float* grad_scale, const float* found_inf, const at::Device& device,
                    dev::Stream stream) {
  const StepBumps bumps = step_bumps(plan, tables);
  if (plan.short_units > 0) {
    PSI_LAUNCH(psi_short_groups_kernel<scalar_t>, grid_for(plan.short_units), kThreads, 0, stream,
               tables.shorts, static_cast<int64_t>(plan.shorts.size()), plan.short_units, o,
               grad_scale, found_inf, bumps.shorts);
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
    PSI_LAUNCH(psi_long_solve_kernel, grid_for(plan.long_groups), kThreads, 0, stream,
               tables.longs, n, plan.long_groups, partials_ptr, updates_ptr, o, grad_scale,
               found_inf);
    PSI_LAUNCH(psi_long_apply_kernel<scalar_t>, grid_for(plan.long_chunks), kThreads, 0, stream,
               tables.longs, n, plan.long_chunks, updates_ptr, found_inf, bumps.longs);
  }  // partials/updates go back to the caching allocator, stream-ordered after these kernels
  if (plan.plain_chunks > 0) {
    PSI_LAUNCH(euclidean_sgd_kernel<scalar_t>, grid_for(plan.plain_chunks), kThreads, 0, stream,
               tables.plains, static_cast<int64_t>(plan.plains.size()), plan.plain_chunks, o,
               grad_scale, found_inf, bumps.plains);
  }
  if (bumps.own_kernel) {
    PSI_LAUNCH(increment_steps_kernel, grid_for(ceil_div(tables.num_steps, kThreads)), kThreads,
               0, stream, tables.steps, tables.num_steps, found_inf);
  }
}

void psi_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
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
  const at::Device device = params[0].device();
  dev::check_device(device, "psi_sgd_", "params");
  const dev::DeviceGuard guard(device);
  const dev::Stream stream = dev::current_stream(device);

  std::vector<at::Tensor> grads_laid_out;  // keeps copies of differently laid out grads alive
  grads_laid_out.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    grads_laid_out.push_back(grad_like_param(grads[i], params[i]));
  }
  const Plan plan = make_plan(params, grads_laid_out, momentum_buffers, {}, state_steps, manifold,
                              block_rows, grams ? grams->data_ptr<double>() : nullptr);
  const DeviceTables tables = upload_plan(plan, device, stream);

  const float* scale = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  const float* inf = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "psi_sgd_cuda", [&] {
                                    launch_psi_sgd<scalar_t>(plan, tables, o, scale, inf,
                                                             device, stream);
                                  });
}

}  // namespace
}  // namespace psi

PSI_CUDA_OPS_IMPL(m) { m.impl("psi_sgd_", PSI_CUDA_OP(psi::psi_sgd_cuda)); }
