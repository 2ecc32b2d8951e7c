// Shared definitions of the fused curvature-mask op (docs/ops/curvature_mask.md).
#pragma once
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define MI_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MI_HOST_DEVICE inline
#endif

namespace modalimmune {

// Histogram of |D| on a log-linear grid: four bins per octave from 2^kHistMinExp.
// The bin is read straight off the float's bits (exponent and two top mantissa
// bits), so every backend puts a value in exactly the same bin.
constexpr int kHistBins = 256;
constexpr int kHistMinExp = -40;
constexpr int kHistOffset = (127 + kHistMinExp) << 2;

MI_HOST_DEVICE int hist_bin_from_bits(uint32_t bits) {
  int bin = static_cast<int>((bits & 0x7fffffffu) >> 21) - kHistOffset;
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
