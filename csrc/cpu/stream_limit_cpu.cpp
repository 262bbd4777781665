// psi_cuda_bench::stream_limit_(w, g, m): the memory-bound limit the step benchmark measures the
// fused optimizers against (psi_cuda/apps/bench.py). A plain loop with the access pattern of a
// momentum step, m = 0.9 m + g, w -= 1e-3 m (read three fp32 streams, write two), compiled with
// the extension's flags and ISA dispatch and split over threads with at::parallel_for in the
// chunks the CPU kernels use. Not an optimizer: it sits in its own library, psi_cuda_bench, so
// that psi_cuda's op list stays the product's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_clones.h"

namespace psi {
namespace {

#define PSI_CPU_LOOPS "stream_limit_loops.inc"
#include "cpu_dispatch_loops.h"

void stream_limit(float* w, const float* g, float* m, int64_t n) {
  PSI_CPU_CALL((w, g, m, n), stream_limit_loop);
}

constexpr int64_t kStreamChunk = int64_t{1} << 15;  // elements per parallel_for item (as kItemElems)

void stream_limit_cpu(const at::Tensor& w, const at::Tensor& g, const at::Tensor& m) {
  for (const auto& [t, name] : {std::pair{&w, "w"}, std::pair{&g, "g"}, std::pair{&m, "m"}}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->is_contiguous() && t->is_cpu(),
                      "stream_limit_: ", name, " must be a contiguous float32 CPU tensor");
    TORCH_CHECK_VALUE(t->numel() == w.numel(), "stream_limit_: ", name, " must have ",
                      w.numel(), " elements, like w; got ", t->numel());
  }
  float* wp = w.data_ptr<float>();
  const float* gp = g.const_data_ptr<float>();
  float* mp = m.data_ptr<float>();
  const int64_t n = w.numel();
  at::parallel_for(0, (n + kStreamChunk - 1) / kStreamChunk, 1, [&](int64_t c0, int64_t c1) {
    const int64_t b = c0 * kStreamChunk, e = std::min(n, c1 * kStreamChunk);
    stream_limit(wp + b, gp + b, mp + b, e - b);
  });
}

}  // namespace
}  // namespace psi

TORCH_LIBRARY(psi_cuda_bench, m) {
  m.def("stream_limit_(Tensor(a!) w, Tensor g, Tensor(b!) m) -> ()");
}
TORCH_LIBRARY_IMPL(psi_cuda_bench, CPU, m) { m.impl("stream_limit_", psi::stream_limit_cpu); }
