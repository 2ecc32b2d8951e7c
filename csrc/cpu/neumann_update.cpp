// CPU kernel of the fused Neumann update (docs/hypergrad.md).
// OpenMP over fixed-size chunks of all parameters; each chunk is one
// vectorisable pass that updates v and p and accumulates ||v_new||^2 and
// <v_old, w + damping v_old> in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "cpu/multi_tensor.h"
#include "neumann_update.h"

namespace modalimmune {
namespace {

template <typename scalar_t>
void update_range(scalar_t* __restrict__ v, scalar_t* __restrict__ p, const scalar_t* __restrict__ w,
                  int64_t n, scalar_t alpha, scalar_t damping, double& sq, double& dot) {
  double sq_local = 0.0, dot_local = 0.0;
#pragma omp simd reduction(+ : sq_local, dot_local)
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t v_old = v[i];
    const scalar_t u = w[i] + damping * v_old;
    const scalar_t v_new = v_old - alpha * u;
    v[i] = v_new;
    p[i] += v_new;
    dot_local += static_cast<double>(v_old) * static_cast<double>(u);
    sq_local += static_cast<double>(v_new) * static_cast<double>(v_new);
  }
  sq += sq_local;
  dot += dot_local;
}

at::Tensor neumann_update_cpu(at::TensorList v, at::TensorList p, at::TensorList w, const at::Tensor& alpha,
                              double damping) {
  check_neumann_update_args(v, p, w, alpha);
  const std::vector<Chunk> jobs = chunks_of(v);

  const double alpha_value = alpha.item<double>();
  double sq = 0.0, dot = 0.0;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : sq, dot)
  for (int64_t j = 0; j < static_cast<int64_t>(jobs.size()); ++j) {
    const Chunk& job = jobs[j];
    const int t = job.tensor;
    AT_DISPATCH_FLOATING_TYPES(v[t].scalar_type(), "neumann_update_cpu", [&] {
      update_range<scalar_t>(v[t].data_ptr<scalar_t>() + job.begin, p[t].data_ptr<scalar_t>() + job.begin,
                             w[t].data_ptr<scalar_t>() + job.begin, job.end - job.begin,
                             static_cast<scalar_t>(alpha_value), static_cast<scalar_t>(damping), sq, dot);
    });
  }

  at::Tensor stats = at::empty({2}, at::kDouble);
  stats.data_ptr<double>()[0] = sq;
  stats.data_ptr<double>()[1] = dot;
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(modalimmune, CPU, m) { m.impl("neumann_update", &neumann_update_cpu); }

}  // namespace modalimmune
