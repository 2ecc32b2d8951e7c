// The Python module modalimmune._C: what the build holds, for modalimmune/_extension.py and
// `modalimmune info`. The ops are defined in Python (modalimmune/ops/_library.py); this
// extension only implements them: TORCH_LIBRARY_IMPL blocks in csrc/cpu/<op>.cpp and
// csrc/cuda/<op>.cu.
#include <torch/extension.h>

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
