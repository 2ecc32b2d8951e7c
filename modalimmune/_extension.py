"""Guarded loading of the compiled extension ``modalimmune._C``.

A missing extension, one built against another torch, or one built from older
sources never breaks ``import modalimmune``: it is reported once as a warning,
and the ops fall back to the backends that remain (the pure-PyTorch one always
does). The extension only implements ops (their CPU and CUDA kernels); the ops
themselves are defined in Python, by modalimmune/ops/_library.py, which loads
the extension first (docs/backends.md, "Ops and torch.library").
"""

import importlib
import warnings

import torch

_state = {"module": None, "reason": None, "loaded": False}
_kernels = {}  # (op, dispatch key) -> bool: the extension registers all its kernels when it loads


def _warn(reason):
    warnings.warn(reason + "; the pure-PyTorch backend serves instead", stacklevel=3)


def load():
    """The extension module, or None; the reason it is unusable is in :func:`reason`."""
    if _state["loaded"]:
        return _state["module"]
    _state["loaded"] = True
    try:
        module = importlib.import_module("modalimmune._C")
    except (ImportError, OSError) as error:
        _state["reason"] = f"modalimmune._C could not be loaded ({error}); build it with `make install`"
    else:
        if module.torch_version != torch.__version__:
            _state["reason"] = (
                f"modalimmune._C was built for torch {module.torch_version}, but torch "
                f"{torch.__version__} is running; rebuild it with `make install`"
            )
        else:
            _state["module"] = module
    if _state["reason"] is not None:
        _warn(_state["reason"])
    return _state["module"]


def refuse(reason):
    """Marks the loaded extension unusable for ``reason`` (warned once)."""
    if _state["module"] is not None:
        _state["module"], _state["reason"] = None, reason
        _warn(reason)


def reason():
    """Why the extension is unusable, or None when it loaded."""
    load()
    return _state["reason"]


@torch.compiler.assume_constant_result  # torch.compile reads it while tracing
def has_kernel(op, dispatch_key):
    """Whether the loaded extension implements ``modalimmune::<op>`` for ``dispatch_key``
    ("CPU" or "CUDA"; a build from older sources may lack a newer op)."""
    if load() is None:
        return False
    if (op, dispatch_key) not in _kernels:
        try:
            found = torch._C._dispatch_has_kernel_for_dispatch_key(f"modalimmune::{op}", dispatch_key)
        except RuntimeError:  # no such op
            found = False
        _kernels[op, dispatch_key] = found
    return _kernels[op, dispatch_key]
