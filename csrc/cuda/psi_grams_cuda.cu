// Fused CUDA implementation of psi_cuda::psi_grams (semantics: the CPU kernel
// csrc/cpu/psi_grams_cpu.cpp): the Gram sums of every PSI group of a list, summed exactly as
// psi_sgd_/psi_adam_ sum them for themselves (multi_tensor.cuh), so that
// psi_sgd_(..., grams=psi_grams(...)) equals psi_sgd_(...).
//
//   psi_grams_short_kernel   groups of at most kShortGroup elements: step_short_unit, whose
//                            solving thread writes the row and returns an update that skips.
//   psi_long_reduce_kernel   longer groups: chunk partials (shared with psi_sgd_);
//   psi_grams_long_kernel    one block per long group adds its partials and writes the row.
//
// No step counters, no found_inf: the op reads its inputs and writes a new tensor.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "psi/ops.h"
#include "multi_tensor.cuh"  // last: see multi_tensor.cuh

namespace psi {
namespace {

// step_short_unit itself, with a "solve" that records the group's sums in its row and leaves
// the group unchanged: the sums of psi_sgd_/psi_adam_ by construction, for every kind of short
// group (as the CPU kernel runs the ops' work-item driver).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    psi_grams_short_kernel(const TensorMeta* metas, int64_t num_tensors, int64_t num_units) {
  PSI_SHARED(ShortShared, sh);
  for (int64_t unit = blockIdx.x; unit < num_units; unit += gridDim.x) {
    const TensorMeta& a = find_tensor<&TensorMeta::first_unit>(metas, num_tensors, unit);
    double* out = reinterpret_cast<double*>(a.gram_out);
    step_short_unit<scalar_t>(a, unit - a.first_unit, sh, [&](const Gram& G, int64_t group) {
      set_gram_row(out, group, G, a.group);
      return unchanged();  // skip: nothing is written
    });
  }
}

__global__ void __launch_bounds__(kThreads)
    psi_grams_long_kernel(const TensorMeta* metas, int64_t num_tensors, int64_t num_groups,
                          const Gram* partials) {
  PSI_SHARED(typename BlockGramReduce::TempStorage, temp);
  for (int64_t j = blockIdx.x; j < num_groups; j += gridDim.x) {
    const TensorMeta& a = find_tensor<&TensorMeta::first_group>(metas, num_tensors, j);
    const Gram G = long_group_gram(a, j, partials, temp);  // thread 0 only
    if (threadIdx.x == 0) {
      set_gram_row(reinterpret_cast<double*>(a.gram_out), j - a.first_group, G, a.group);
    }
    __syncthreads();  // temp is reused by the next group
  }
}

template <typename scalar_t>
void launch_psi_grams(const Plan& plan, const TensorMeta* shorts, const TensorMeta* longs,
                      const at::Device& device, dev::Stream stream) {
  if (plan.short_units > 0) {
    PSI_LAUNCH(psi_grams_short_kernel<scalar_t>, grid_for(plan.short_units), kThreads, 0,
               stream, shorts, static_cast<int64_t>(plan.shorts.size()), plan.short_units);
  }
  if (plan.long_groups > 0) {
    const int64_t n = static_cast<int64_t>(plan.longs.size());
    at::Tensor partials = at::empty({plan.long_chunks * static_cast<int64_t>(sizeof(Gram))},
                                    at::TensorOptions().dtype(at::kByte).device(device));
    Gram* partials_ptr = reinterpret_cast<Gram*>(partials.data_ptr());
    PSI_LAUNCH(psi_long_reduce_kernel<scalar_t>, grid_for(plan.long_chunks), kThreads, 0, stream,
               longs, n, plan.long_chunks, partials_ptr, static_cast<const float*>(nullptr));
    PSI_LAUNCH(psi_grams_long_kernel, grid_for(plan.long_groups), kThreads, 0, stream, longs, n,
               plan.long_groups, static_cast<const Gram*>(partials_ptr));
  }  // partials go back to the caching allocator, stream-ordered after these kernels
}

at::Tensor psi_grams_cuda(at::TensorList params, at::TensorList grads, at::TensorList buffers,
                          int64_t manifold, int64_t block_rows) {
  const int64_t groups = checked_grams_args(params, grads, buffers, manifold, block_rows);
  if (params.empty()) {
    return at::zeros({0, kGramCols}, at::TensorOptions().dtype(at::kDouble));
  }
  const at::Device device = params[0].device();
  dev::check_device(device, "psi_grams", "params");
  const dev::DeviceGuard guard(device);
  const dev::Stream stream = dev::current_stream(device);
  at::Tensor out =
      at::empty({groups, kGramCols}, at::TensorOptions().dtype(at::kDouble).device(device));
  if (groups == 0) return out;

  std::vector<at::Tensor> grads_laid_out;  // keeps copies of differently laid out grads alive
  grads_laid_out.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    grads_laid_out.push_back(grad_like_param(grads[i], params[i]));
  }
  const Plan plan = make_plan(params, grads_laid_out, buffers, {}, {}, manifold, block_rows,
                              nullptr, out.data_ptr<double>());
  const DeviceTables tables = upload_plan(plan, device, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "psi_grams",
                                  [&] {
                                    launch_psi_grams<scalar_t>(plan, tables.shorts, tables.longs,
                                                               device, stream);
                                  });
  return out;
}

}  // namespace
}  // namespace psi

PSI_CUDA_OPS_IMPL(m) { m.impl("psi_grams", PSI_CUDA_OP(psi::psi_grams_cuda)); }
