"""Backend availability and selection (docs/backends.md).

Every op has four implementations: ``torch`` (the pure-PyTorch reference, always
available), ``cpp`` (C++ with OpenMP, CPU tensors), ``cuda`` (CUDA, GPU tensors),
``triton`` (GPU tensors; CPU tensors too under ``TRITON_INTERPRET=1``).
"""

import importlib.util
import os

import torch

from . import _extension

BACKENDS = ("torch", "cpp", "cuda", "triton")


def triton_interpreted():
    """True when Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_MISSING = "Triton is not installed (pip install triton)" if importlib.util.find_spec("triton") is None else None


def unavailable_reason(backend, device=None, op=None):
    """Why ``backend`` cannot run on ``device`` (None: it can).

    With ``device=None`` the question is whether the backend is usable at all
    on this machine; with ``op`` (a compiled op's name) also whether the loaded
    extension implements that op for the backend's device.
    """
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected 'auto' or one of {', '.join(BACKENDS)}"
    device = torch.device(device) if device is not None else None
    if backend == "torch":
        return None
    if backend == "triton":
        if _TRITON_MISSING:
            return _TRITON_MISSING
        on_gpu = torch.cuda.is_available()
        if device is None:
            return None if on_gpu or triton_interpreted() else "no GPU visible and TRITON_INTERPRET is not 1"
        if device.type == "cuda":
            return None if on_gpu else "no GPU visible"
        if device.type == "cpu":
            return None if triton_interpreted() else "CPU tensors need TRITON_INTERPRET=1 for Triton"
        return f"Triton does not run on {device.type} tensors"
    module = _extension.load()
    if module is None:
        return _extension.reason()
    if backend == "cuda":
        if not module.cuda_built:
            return "modalimmune._C was built without CUDA (no CUDA torch or no nvcc at build time)"
        if not torch.cuda.is_available():
            return "no GPU visible"
    key = "CPU" if backend == "cpp" else "CUDA"
    if op is not None and not _extension.has_kernel(op, key):
        return (f"modalimmune._C has no {key} kernel of op {op!r}: it was built from older sources; "
                "rebuild it with `make install`")
    if device is not None and device.type != key.lower():
        return f"the {backend} backend runs on {key} tensors, got {device.type} tensors"
    return None


def backends():
    """``{"torch": True, "cpp": bool, "cuda": bool, "triton": bool}``: usable on this machine."""
    return {name: unavailable_reason(name) is None for name in BACKENDS}


def resolve(backend, device, op=None):
    """The concrete backend for an op on tensors of ``device``.

    ``"auto"`` picks the fastest usable one: ``cuda``, then ``triton``, for GPU
    tensors; ``cpp`` for CPU tensors (the Triton interpreter is never chosen by
    itself); ``torch`` otherwise. An explicit backend that cannot serve raises
    ``RuntimeError`` saying why. ``op`` names the compiled op the cpp/cuda
    backends would call.
    """
    device = torch.device(device)
    if backend == "auto":
        order = ("cuda", "triton") if device.type == "cuda" else ("cpp",)
        for name in order:
            if unavailable_reason(name, device, op) is None:
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {', '.join(BACKENDS)}, got {backend!r}")
    why = unavailable_reason(backend, device, op)
    if why is not None:
        raise RuntimeError(f"backend={backend!r} cannot run here: {why}")
    return backend
