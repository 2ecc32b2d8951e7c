"""Guarded loading of the compiled extension ``modalimmune._C``.

A missing extension, or one built against another torch, never breaks
``import modalimmune``: it is reported once as a warning, and the ops fall back
to the backends that remain (the pure-PyTorch one always does).
"""

import importlib
import warnings

import torch

_state = {"module": None, "reason": None, "loaded": False}


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
        warnings.warn(_state["reason"] + "; the pure-PyTorch backend serves instead", stacklevel=2)
    return _state["module"]


def reason():
    """Why the extension is unusable, or None when it loaded."""
    load()
    return _state["reason"]


def has_op(name):
    """Whether the loaded extension registers ``modalimmune::<name>`` (a stale build may not)."""
    return load() is not None and hasattr(torch.ops.modalimmune, name)


def register_fake(name, fake):
    """Registers the fake kernel of the compiled op ``name`` when the loaded extension has it."""
    if has_op(name):
        torch.library.register_fake(f"modalimmune::{name}")(fake)
