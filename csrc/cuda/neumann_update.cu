// CUDA kernel of the fused Neumann update (docs/hypergrad.md).
// One pass over memory: each block handles one chunk of one parameter (pointer
// tables from multi_tensor.cuh), reads alpha from device memory (no host sync,
// so a loop of updates can be captured in a CUDA graph), and adds its
// block-reduced ||v_new||^2 and <v_old, w + damping v_old> to the output with
// one double atomic per value.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/multi_tensor.cuh"
#include "neumann_update.h"

namespace modalimmune {
namespace {

constexpr int kThreads = 512;

// Sums x over the block; thread 0 adds the result to *out.
template <typename T>
__device__ __forceinline__ void block_sum_into(T x, T* shared, double* out) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  x = warp_sum(x);
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < static_cast<int>(blockDim.x / 32) ? shared[lane] : T(0);
    x = warp_sum(x);
    if (lane == 0) atomicAdd(out, static_cast<double>(x));
  }
  __syncthreads();
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    neumann_update_kernel(const __grid_constant__ TensorTable<3> table, const double* __restrict__ alpha_ptr,
                          scalar_t damping, double* __restrict__ stats) {
  __shared__ scalar_t s_partial[kThreads / 32];
  const int t = table.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(table.numel[t], begin + kChunk);
  scalar_t* v = static_cast<scalar_t*>(table.addresses[0][t]);
  scalar_t* p = static_cast<scalar_t*>(table.addresses[1][t]);
  const scalar_t* w = static_cast<const scalar_t*>(table.addresses[2][t]);
  const scalar_t alpha = static_cast<scalar_t>(*alpha_ptr);

  scalar_t sq = 0, dot = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const scalar_t v_old = v[i];
    const scalar_t u = w[i] + damping * v_old;
    const scalar_t v_new = v_old - alpha * u;
    v[i] = v_new;
    p[i] += v_new;
    dot += v_old * u;
    sq += v_new * v_new;
  }
  block_sum_into(sq, s_partial, stats);
  block_sum_into(dot, s_partial, stats + 1);
}

at::Tensor neumann_update_cuda(at::TensorList v, at::TensorList p, at::TensorList w, const at::Tensor& alpha,
                               double damping) {
  check_neumann_update_args(v, p, w, alpha);
  c10::cuda::CUDAGuard guard(alpha.device());
  const auto lists = gather_lists({v, p, w});
  at::Tensor stats = at::zeros({2}, alpha.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  for (auto& [dtype, group] : group_by_dtype(lists)) {  // parameters grouped by dtype
    AT_DISPATCH_FLOATING_TYPES(dtype, "neumann_update_cuda", [&] {
      multi_tensor_apply<3>(group, [&](const TensorTable<3>& table, int blocks) {
        neumann_update_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
            table, alpha.data_ptr<double>(), static_cast<scalar_t>(damping), stats.data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(modalimmune, CUDA, m) { m.impl("neumann_update", &neumann_update_cuda); }

}  // namespace modalimmune
