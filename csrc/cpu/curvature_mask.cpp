// CPU kernel of the fused curvature mask (docs/ops/curvature_mask.md).
// OpenMP over fixed-size chunks of all parameters; inside a chunk, tiles of
// kTile elements: one vectorised pass for the update, the norms and the bin
// of each |D|, then a scalar pass that counts the bins into four interleaved
// histograms (consecutive increments of one bin do not wait on each other).
// Built with -fno-trapping-math (setup.py): without it GCC keeps the selects
// as branches and the first pass does not vectorise (6x slower).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <vector>

#include "cpu/multi_tensor.h"
#include "curvature_mask.h"

namespace modalimmune {
namespace {

constexpr int64_t kTile = 512;

struct Partial {
  int64_t masked = 0;
  double destr_sq = 0.0;
  double kept_sq = 0.0;
  std::array<int64_t, kHistBins> hist{};
};

template <typename grad_t, bool kProbe, bool kSoft>
void mask_range(grad_t* __restrict__ gc, const grad_t* __restrict__ gd, float* __restrict__ d,
                const float* __restrict__ probe, int64_t n, float beta, float one_minus_beta,
                float tau, Partial& acc) {
  uint8_t bins[kTile];
  uint32_t sub_hist[4][kHistBins] = {};  // a call covers at most one chunk: no overflow
  for (int64_t start = 0; start < n; start += kTile) {
    const int64_t len = std::min(kTile, n - start);
    float masked = 0.f, destr_sq = 0.f, kept_sq = 0.f;
    // Branch-free form of mask_value() so that the loop vectorises.
#pragma omp simd reduction(+ : masked, destr_sq, kept_sq)
    for (int64_t i = 0; i < len; ++i) {
      const int64_t j = start + i;
      float dj = d[j];
      if constexpr (kProbe) {
        dj = beta * dj + one_minus_beta * probe[j];
        d[j] = dj;
      }
      const float c = static_cast<float>(gc[j]);
      const float g = static_cast<float>(gd[j]);
      const float a = std::fabs(dj);
      const bool keep = (c == 0.f) | (g == 0.f) | ((c > 0.f) == (g > 0.f)) | (a <= tau);
      const float blocked = kSoft ? tau / a : 0.f;
      const float m = keep ? 1.f : blocked;
      const float kept = m * g;
      gc[j] = static_cast<grad_t>(c + kept);
      masked += keep ? 0.f : 1.f;
      destr_sq += g * g;
      kept_sq += kept * kept;
      uint32_t bits;
      std::memcpy(&bits, &a, sizeof(bits));
      bins[i] = static_cast<uint8_t>(hist_bin_from_bits(bits));
    }
    int64_t i = 0;
    for (; i + 4 <= len; i += 4) {
      ++sub_hist[0][bins[i]];
      ++sub_hist[1][bins[i + 1]];
      ++sub_hist[2][bins[i + 2]];
      ++sub_hist[3][bins[i + 3]];
    }
    for (; i < len; ++i) ++sub_hist[0][bins[i]];
    acc.masked += static_cast<int64_t>(masked);
    acc.destr_sq += destr_sq;
    acc.kept_sq += kept_sq;
  }
  for (int b = 0; b < kHistBins; ++b)
    acc.hist[b] += sub_hist[0][b] + sub_hist[1][b] + sub_hist[2][b] + sub_hist[3][b];
}

template <typename grad_t>
void mask_job(const Chunk& job, at::TensorList gc, at::TensorList gd, at::TensorList d,
              const std::optional<at::TensorList>& probe, float beta, float one_minus_beta,
              float tau, bool soft, Partial& acc) {
  const int t = job.tensor;
  grad_t* gc_p = gc[t].data_ptr<grad_t>() + job.begin;
  const grad_t* gd_p = gd[t].data_ptr<grad_t>() + job.begin;
  float* d_p = d[t].data_ptr<float>() + job.begin;
  const int64_t n = job.end - job.begin;
  if (probe.has_value()) {
    const float* p_p = (*probe)[t].data_ptr<float>() + job.begin;
    soft ? mask_range<grad_t, true, true>(gc_p, gd_p, d_p, p_p, n, beta, one_minus_beta, tau, acc)
         : mask_range<grad_t, true, false>(gc_p, gd_p, d_p, p_p, n, beta, one_minus_beta, tau, acc);
  } else {
    soft ? mask_range<grad_t, false, true>(gc_p, gd_p, d_p, nullptr, n, beta, one_minus_beta, tau, acc)
         : mask_range<grad_t, false, false>(gc_p, gd_p, d_p, nullptr, n, beta, one_minus_beta, tau, acc);
  }
}

std::tuple<at::Tensor, at::Tensor> curvature_mask_cpu(at::TensorList grads_clean,
                                                      at::TensorList grads_destr,
                                                      at::TensorList curvature,
                                                      std::optional<at::TensorList> probe,
                                                      double beta, double tau, bool soft) {
  check_curvature_mask_args(grads_clean, grads_destr, curvature, probe, at::kCPU);
  const std::vector<Chunk> jobs = chunks_of(grads_clean);

  Partial total;
  // 1 - beta is rounded from double: computing it from float(beta) would cost ~10 ulp
  const float beta_f = static_cast<float>(beta), one_minus_beta = static_cast<float>(1.0 - beta);
  const float tau_f = static_cast<float>(tau);
#pragma omp parallel
  {
    Partial mine;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t j = 0; j < static_cast<int64_t>(jobs.size()); ++j) {
      const Chunk& job = jobs[j];
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kBFloat16, at::kHalf, grads_clean[job.tensor].scalar_type(), "curvature_mask_cpu", [&] {
            mask_job<scalar_t>(job, grads_clean, grads_destr, curvature, probe, beta_f, one_minus_beta, tau_f, soft,
                               mine);
          });
    }
#pragma omp critical
    {
      total.masked += mine.masked;
      total.destr_sq += mine.destr_sq;
      total.kept_sq += mine.kept_sq;
      for (int b = 0; b < kHistBins; ++b) total.hist[b] += mine.hist[b];
    }
  }

  at::Tensor stats = at::empty({3}, at::kDouble);
  double* s = stats.data_ptr<double>();
  s[0] = static_cast<double>(total.masked);
  s[1] = total.destr_sq;
  s[2] = total.kept_sq;
  at::Tensor hist = at::empty({kHistBins}, at::kLong);
  std::copy(total.hist.begin(), total.hist.end(), hist.data_ptr<int64_t>());
  return {stats, hist};
}

}  // namespace

TORCH_LIBRARY_IMPL(modalimmune, CPU, m) { m.impl("curvature_mask", &curvature_mask_cpu); }

}  // namespace modalimmune
