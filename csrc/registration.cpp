// Schemas of every modalimmune op, one block per op. Kernels live in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; fake kernels in modalimmune/ops/<op>.py.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(modalimmune, m) {
  // lowrank_svd: docs/ops/lowrank_svd.md. A (b, n, d) and omega (b, n, q), float32 or
  // float64, contiguous; returns U (b, n, k), S (b, k) descending, V (b, d, k).
  m.def("lowrank_svd(Tensor A, Tensor omega, int k, int niter) -> (Tensor U, Tensor S, Tensor V)");
  // curvature_mask: docs/ops/curvature_mask.md. Returns (stats, hist):
  // stats = float64[3] (masked count, sum g_d^2, sum (M*g_d)^2), hist = int64[256].
  m.def(
      "curvature_mask(Tensor(a!)[] grads_clean, Tensor[] grads_destr, Tensor(b!)[] curvature, "
      "Tensor[]? probe, float beta, float tau, bool soft) -> (Tensor, Tensor)");
  // neumann_update: docs/hypergrad.md. With u = w + damping*v: v <- v - alpha*u, p <- p + v;
  // returns float64[2] = (||v_new||^2, <v_old, u>). alpha: 0-dim float64 tensor on the device.
  m.def("neumann_update(Tensor(a!)[] v, Tensor(b!)[] p, Tensor[] w, Tensor alpha, float damping) -> Tensor");
}

#ifdef MODALIMMUNE_WITH_CUDA
#include <cuda_runtime_api.h>
constexpr bool kCudaBuilt = true;
constexpr int kCudaVersion = CUDART_VERSION;
#else
constexpr int kCudaVersion = 0;
constexpr bool kCudaBuilt = false;
#endif

PYBIND11_MODULE(_C, module) {
  module.attr("cuda_built") = kCudaBuilt;
  module.attr("cuda_version") = kCudaVersion;  // CUDART_VERSION compiled against, 0 without CUDA
  module.attr("torch_version") = MODALIMMUNE_TORCH_VERSION;
#if defined(__clang__)
  module.attr("compiler") = "clang " __clang_version__;
#elif defined(__GNUC__)
  module.attr("compiler") = "gcc " __VERSION__;
#else
  module.attr("compiler") = "unknown";
#endif
#ifdef _OPENMP
  module.attr("openmp") = _OPENMP;
#else
  module.attr("openmp") = 0;
#endif
}
