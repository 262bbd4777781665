// Fused CPU implementation of psi_cuda::psi_grams: the Gram sums of every PSI group of a list,
// by the work items and loops of psi_sgd_/psi_adam_ (group_loops.h) with a "solve" that records
// each group's sums and writes nothing. The sums are the ones those ops compute for themselves
// (same blocks, same order), so psi_sgd_(..., grams=psi_grams(...)) equals psi_sgd_(...).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "group_loops.h"
#include "psi/ops.h"

namespace psi {
namespace {

at::Tensor psi_grams_cpu(at::TensorList params, at::TensorList grads, at::TensorList buffers,
                         int64_t manifold, int64_t block_rows) {
  const int64_t groups = checked_grams_args(params, grads, buffers, manifold, block_rows);
  at::Tensor out = at::zeros({groups, kGramCols}, at::TensorOptions().dtype(at::kDouble));
  if (groups == 0) return out;
  double* table = out.data_ptr<double>();

  std::vector<at::Tensor> grads_laid_out;  // keeps copies of differently laid out grads alive
  std::vector<int64_t> first_row;          // row of each tensor's first group in `out`
  const std::vector<GroupTensor> ts = group_tensors(params, grads, buffers, manifold, block_rows,
                                                    nullptr, grads_laid_out, &first_row);
  // Called once per group (rows: on the thread that reduced it; long groups: after the chunks).
  const auto record = [&](int64_t t, int64_t group, const Gram& G) {
    set_gram_row(table, first_row[t] + group, G, ts[t].group);
    return unchanged();
  };
  const auto no_plain = [](int64_t, int64_t, int64_t) {};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "psi_grams",
                                  [&] { run_group_items<scalar_t>(ts, false, record, no_plain); });
  return out;
}

}  // namespace
}  // namespace psi

TORCH_LIBRARY_IMPL(psi_cuda, CPU, m) { m.impl("psi_grams", &psi::psi_grams_cpu); }
