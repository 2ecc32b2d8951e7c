// Shared by the CPU and CUDA kernels of the batched low-rank SVD (docs/ops/lowrank_svd.md).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

namespace modalimmune {

// The op's contract (schema in modalimmune/ops/lowrank_svd.py): A (b, n, d) and omega (b, n, q),
// both float32 or both float64, with 1 <= q <= min(n, d) and niter >= 0; all q triplets come back.
inline void check_lowrank_svd_args(const at::Tensor& A, const at::Tensor& omega, int64_t niter) {
  TORCH_CHECK(A.dim() == 3 && omega.dim() == 3 && A.size(0) == omega.size(0) && A.size(1) == omega.size(1),
              "lowrank_svd: expected A (b, n, d) and omega (b, n, q), got ", A.sizes(), " and ", omega.sizes());
  TORCH_CHECK(A.scalar_type() == omega.scalar_type() &&
                  (A.scalar_type() == at::kFloat || A.scalar_type() == at::kDouble),
              "lowrank_svd: A and omega: expected both float32 or both float64, got ", A.scalar_type(), " and ",
              omega.scalar_type());
  const int64_t q = omega.size(2);
  TORCH_CHECK(1 <= q && q <= std::min(A.size(1), A.size(2)), "lowrank_svd: omega: expected 1 <= q <= min(n, d), got ",
              q);
  TORCH_CHECK(niter >= 0, "lowrank_svd: niter: expected an int >= 0, got ", niter);
}

}  // namespace modalimmune
