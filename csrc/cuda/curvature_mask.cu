// CUDA kernel of the fused curvature mask (docs/ops/curvature_mask.md).
// One pass over memory: each block handles one chunk of one parameter (pointer
// tables from multi_tensor.cuh), four elements per thread per step with vector
// loads when aligned, a shared-memory histogram of |D| and block-reduced
// statistics added to the outputs with one atomic per block and value.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/multi_tensor.cuh"
#include "curvature_mask.h"

namespace modalimmune {
namespace {

constexpr int kThreads = 512;
constexpr int kVec = 4;

template <typename T>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

template <typename grad_t, bool kProbe, bool kSoft>
__global__ void __launch_bounds__(kThreads)
    curvature_mask_kernel(const __grid_constant__ TensorTable<4> table, float beta,
                          float one_minus_beta, float tau,
                          double* __restrict__ stats, unsigned long long* __restrict__ hist) {
  __shared__ unsigned int s_hist[kHistBins];
  __shared__ float s_partial[3][kThreads / 32];
  for (int b = threadIdx.x; b < kHistBins; b += blockDim.x) s_hist[b] = 0;
  __syncthreads();

  const int t = table.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(table.numel[t], begin + kChunk);
  grad_t* gc = static_cast<grad_t*>(table.addresses[0][t]);
  const grad_t* gd = static_cast<const grad_t*>(table.addresses[1][t]);
  float* d = static_cast<float*>(table.addresses[2][t]);
  const float* probe = static_cast<const float*>(table.addresses[3][t]);

  float masked = 0.f, destr_sq = 0.f, kept_sq = 0.f;
  auto update = [&](grad_t& c_io, grad_t g_in, float& d_io, float p) {
    if constexpr (kProbe) d_io = beta * d_io + one_minus_beta * p;
    const float c = static_cast<float>(c_io), g = static_cast<float>(g_in);
    const float abs_d = fabsf(d_io);
    const float m = mask_value(c, g, abs_d, tau, kSoft);
    const float kept = m * g;
    c_io = static_cast<grad_t>(c + kept);
    masked += m < 1.f ? 1.f : 0.f;
    destr_sq += g * g;
    kept_sq += kept * kept;
    atomicAdd(&s_hist[hist_bin_from_bits(__float_as_uint(abs_d))], 1u);
  };

  const uintptr_t addr_bits = reinterpret_cast<uintptr_t>(gc) | reinterpret_cast<uintptr_t>(gd);
  const uintptr_t f32_bits = reinterpret_cast<uintptr_t>(d) | reinterpret_cast<uintptr_t>(probe);
  const bool aligned = addr_bits % sizeof(Vec<grad_t>) == 0 && f32_bits % sizeof(Vec<float>) == 0;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * kVec;
  for (int64_t i = begin + threadIdx.x * kVec; i < end; i += stride) {
    if (aligned && i + kVec <= end) {
      Vec<grad_t> c = *reinterpret_cast<Vec<grad_t>*>(gc + i);
      const Vec<grad_t> g = *reinterpret_cast<const Vec<grad_t>*>(gd + i);
      Vec<float> dv = *reinterpret_cast<Vec<float>*>(d + i);
      Vec<float> pv{};
      if constexpr (kProbe) pv = *reinterpret_cast<const Vec<float>*>(probe + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) update(c.v[k], g.v[k], dv.v[k], pv.v[k]);
      *reinterpret_cast<Vec<grad_t>*>(gc + i) = c;
      if constexpr (kProbe) *reinterpret_cast<Vec<float>*>(d + i) = dv;
    } else {
      for (int64_t j = i; j < min(i + kVec, end); ++j) {
        float dj = d[j];
        update(gc[j], gd[j], dj, kProbe ? probe[j] : 0.f);
        if constexpr (kProbe) d[j] = dj;
      }
    }
  }

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  masked = warp_sum(masked);
  destr_sq = warp_sum(destr_sq);
  kept_sq = warp_sum(kept_sq);
  if (lane == 0) {
    s_partial[0][warp] = masked;
    s_partial[1][warp] = destr_sq;
    s_partial[2][warp] = kept_sq;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
#pragma unroll
    for (int s = 0; s < 3; ++s) {
      float x = lane < warps ? s_partial[s][lane] : 0.f;
      x = warp_sum(x);
      if (lane == 0) atomicAdd(stats + s, static_cast<double>(x));
    }
  }
  for (int b = threadIdx.x; b < kHistBins; b += blockDim.x)
    if (s_hist[b] != 0) atomicAdd(hist + b, static_cast<unsigned long long>(s_hist[b]));
}

template <typename grad_t>
void launch_group(const std::vector<std::vector<at::Tensor>>& lists, bool with_probe, double beta,
                  float tau, bool soft, at::Tensor& stats, at::Tensor& hist) {
  // 1 - beta is rounded from double: computing it from float(beta) would cost ~10 ulp
  const float beta_f = static_cast<float>(beta), one_minus_beta = static_cast<float>(1.0 - beta);
  auto stream = at::cuda::getCurrentCUDAStream();
  double* stats_p = stats.data_ptr<double>();
  auto* hist_p = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
  multi_tensor_apply<4>(lists, [&](const TensorTable<4>& table, int blocks) {
    auto kernel = with_probe ? (soft ? curvature_mask_kernel<grad_t, true, true>
                                     : curvature_mask_kernel<grad_t, true, false>)
                             : (soft ? curvature_mask_kernel<grad_t, false, true>
                                     : curvature_mask_kernel<grad_t, false, false>);
    kernel<<<blocks, kThreads, 0, stream>>>(table, beta_f, one_minus_beta, tau, stats_p, hist_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> curvature_mask_cuda(at::TensorList grads_clean,
                                                       at::TensorList grads_destr,
                                                       at::TensorList curvature,
                                                       std::optional<at::TensorList> probe,
                                                       double beta, double tau, bool soft) {
  TORCH_CHECK(!grads_clean.empty(), "curvature_mask: grads_clean: expected at least one tensor on the GPU");
  check_curvature_mask_args(grads_clean, grads_destr, curvature, probe, grads_clean[0].device());
  c10::cuda::CUDAGuard guard(grads_clean[0].device());
  const auto lists = gather_lists({grads_clean, grads_destr, curvature, probe});
  at::Tensor stats = at::zeros({3}, grads_clean[0].options().dtype(at::kDouble));
  at::Tensor hist = at::zeros({kHistBins}, grads_clean[0].options().dtype(at::kLong));
  for (auto& [dtype, group] : group_by_dtype(lists)) {  // parameters grouped by gradient dtype
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "curvature_mask_cuda", [&] {
      launch_group<scalar_t>(group, probe.has_value(), beta, static_cast<float>(tau), soft, stats,
                             hist);
    });
  }
  return {stats, hist};
}

}  // namespace

TORCH_LIBRARY_IMPL(modalimmune, CUDA, m) { m.impl("curvature_mask", &curvature_mask_cuda); }

}  // namespace modalimmune
