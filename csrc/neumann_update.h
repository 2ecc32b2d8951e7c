// Shared by the CPU and CUDA kernels of the fused Neumann update (docs/hypergrad.md).
#pragma once
#include <ATen/ATen.h>

#include "multi_tensor.h"

namespace modalimmune {

// The op's arguments (schema in modalimmune/ops/neumann_update.py): v, p, w of one dtype per
// parameter, float32 or float64, on the device of alpha, a 0-dim float64 tensor.
inline void check_neumann_update_args(at::TensorList v, at::TensorList p, at::TensorList w, const at::Tensor& alpha) {
  TORCH_CHECK(alpha.dim() == 0 && alpha.scalar_type() == at::kDouble,
              "neumann_update: alpha: expected a 0-dim float64 tensor, got ", alpha.dim(), " dims of ",
              alpha.scalar_type());
  check_tensor_lists("neumann_update", {{"v", v}, {"p", p}, {"w", w}}, {at::kFloat, at::kDouble}, alpha.device());
}

}  // namespace modalimmune
