// CPU kernel of the fused Neumann update (docs/hypergrad.md).
// OpenMP over fixed-size chunks of all parameters; each chunk is one
// vectorisable pass that updates v and p and accumulates ||v_new||^2 and
// <v_old, w + damping v_old> in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

namespace modalimmune {
namespace {

constexpr int64_t kChunk = 1 << 16;

struct Job {
  int tensor;
  int64_t begin;
  int64_t end;
};

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
  const size_t count = v.size();
  TORCH_CHECK(p.size() == count && w.size() == count, "neumann_update: tensor lists differ in length");
  TORCH_CHECK(alpha.dim() == 0 && alpha.device().is_cpu(), "neumann_update: alpha must be a 0-dim CPU tensor");
  std::vector<Job> jobs;
  for (size_t t = 0; t < count; ++t) {
    const int64_t n = v[t].numel();
    TORCH_CHECK(v[t].is_contiguous() && p[t].is_contiguous() && w[t].is_contiguous() && p[t].numel() == n &&
                    w[t].numel() == n && p[t].scalar_type() == v[t].scalar_type() &&
                    w[t].scalar_type() == v[t].scalar_type() &&
                    (v[t].scalar_type() == at::kFloat || v[t].scalar_type() == at::kDouble),
                "neumann_update: parameter ", t, " has mismatched, non-contiguous or non-float tensors");
    for (int64_t begin = 0; begin < n; begin += kChunk)
      jobs.push_back({static_cast<int>(t), begin, std::min(n, begin + kChunk)});
  }

  const double alpha_value = alpha.item<double>();
  double sq = 0.0, dot = 0.0;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : sq, dot)
  for (int64_t j = 0; j < static_cast<int64_t>(jobs.size()); ++j) {
    const Job& job = jobs[j];
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
