"""Builds the compiled extension ``modalimmune._C``.

The C++ CPU part (OpenMP) is always built. The CUDA part is built when the
installed torch is a CUDA build and nvcc is found, also without a visible GPU
(compile and link only). Environment:

- ``MODALIMMUNE_CUDA=auto|0|1``: build the CUDA part when possible / never / always
  (``1`` fails the build when it cannot be done).
- ``TORCH_CUDA_ARCH_LIST``: honoured; defaults to ``8.0;9.0a`` when no GPU is visible.
- ``MAX_JOBS``: parallel compile jobs (read by torch's build extension).
- ``MODALIMMUNE_PORTABLE=1``: no ``-march=native`` on the C++ sources.
- ``MODALIMMUNE_BUILD_EXT=0``: no extension (the Makefile registers the editable
  package this way, then builds the extension in place and incrementally with
  ``setup.py build_ext --inplace``).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def _find_cuda_home():
    """The toolkit root: $CUDA_HOME/$CUDA_PATH, /usr/local/cuda, or where nvcc lives."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # torch reads it at import

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    mode = os.environ.get("MODALIMMUNE_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"MODALIMMUNE_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if _cuda_home is None:
        problems.append("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if problems and mode == "1":
        sys.exit("MODALIMMUNE_CUDA=1 but the CUDA part cannot be built: " + "; ".join(problems))
    if problems:
        print("modalimmune: building without CUDA: " + "; ".join(problems))
    return not problems


def _wheel_cuda_includes():
    """Include folders of the nvidia-* wheels (cublas, cusparse, ... headers)."""
    import site

    roots = site.getsitepackages() + [site.getusersitepackages()]
    found = []
    for root in roots:
        found += sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
    return found


def _extension():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math lets GCC turn the kernels' selects into vector blends
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", f'-DMODALIMMUNE_TORCH_VERSION="{torch.__version__}"']
    if os.environ.get("MODALIMMUNE_PORTABLE") != "1":
        cxx.append("-march=native")
    kwargs = dict(
        name="modalimmune._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if not with_cuda:
        return CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a"
    kwargs["sources"] += sorted(glob.glob("csrc/cuda/*.cu"))
    kwargs["include_dirs"] += _wheel_cuda_includes()
    nvcc = ["-O3", "-lineinfo", "-DMODALIMMUNE_WITH_CUDA"]
    cxx.append("-DMODALIMMUNE_WITH_CUDA")
    return CUDAExtension(extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)


setup(
    name="modalimmune",
    version="0.1.0",
    description="Fused kernels and a trainer for multimodal models that survive missing modalities",
    packages=find_packages(include=["modalimmune", "modalimmune.*"]) + ["modalimmune.kernels"],
    package_dir={"modalimmune.kernels": "kernels"},
    ext_modules=[_extension()] if os.environ.get("MODALIMMUNE_BUILD_EXT", "1") != "0" else [],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["modalimmune = modalimmune.cli:main"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
)
