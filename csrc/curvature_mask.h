// Shared by the CPU and CUDA kernels of the fused curvature-mask op (docs/ops/curvature_mask.md).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "modalimmune_constants.h"
#include "multi_tensor.h"

#ifdef __CUDACC__
#define MI_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MI_HOST_DEVICE inline
#endif

namespace modalimmune {

// The op's tensor lists (schema in modalimmune/ops/curvature_mask.py): g_c float32, bfloat16 or
// float16, g_d of g_c's dtype, D and the probe float32, all on `device`.
inline void check_curvature_mask_args(at::TensorList grads_clean, at::TensorList grads_destr, at::TensorList curvature,
                                      const std::optional<at::TensorList>& probe, const at::Device& device) {
  std::vector<TensorListArg> lists = {
      {"grads_clean", grads_clean}, {"grads_destr", grads_destr}, {"curvature", curvature, at::kFloat}};
  if (probe.has_value()) lists.push_back({"probe", *probe, at::kFloat});
  check_tensor_lists("curvature_mask", lists, {at::kFloat, at::kBFloat16, at::kHalf}, device);
}

// Histogram of |D| on a log-linear grid (constants in modalimmune/ops/constants.py). The bin is
// read straight off the float's bits (exponent and top mantissa bits), so every backend puts a
// value in exactly the same bin.
MI_HOST_DEVICE int hist_bin_from_bits(uint32_t bits) {
  const int bin = static_cast<int>((bits & 0x7fffffffu) >> kHistShift) - kHistOffset;
  return bin < 0 ? 0 : (bin >= kHistBins ? kHistBins - 1 : bin);
}

// "Agree or flat": M = 1 when g_c·g_d >= 0 (a zero counts as agreement) or
// |D| <= tau; otherwise 0 (hard) or tau/|D| (soft). Decided on signs, so a
// product that would underflow cannot change the answer.
MI_HOST_DEVICE float mask_value(float gc, float gd, float abs_d, float tau, bool soft) {
  bool agree = (gc == 0.f) || (gd == 0.f) || ((gc > 0.f) == (gd > 0.f));
  if (agree || abs_d <= tau) return 1.f;
  return soft ? tau / abs_d : 0.f;
}

}  // namespace modalimmune
