"""Argument checks shared by the ops: each error names the argument and what was expected."""

import math

import torch

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tensor_list(name, value, length=None):
    """``value`` as a list of tensors, checked for type and (when given) length."""
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected a list of tensors, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"{name}[{i}]: expected a Tensor, got {type(item).__name__}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name}: expected {length} tensors (one per parameter), got {len(value)}")
    return list(value)


def finite_float(name, value, low=None, high=None, high_open=False):
    """``value`` as a finite float in [low, high] (or [low, high) with ``high_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite float, got {value}")
    too_high = high is not None and (value >= high if high_open else value > high)
    if (low is not None and value < low) or too_high:
        bounds = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"{name}: expected a value in {bounds}, got {value}")
    return value


def all_finite(tensors):
    """Whether every entry of a floating tensor (or of a list of them) is finite: one read
    pass each (its minimum and maximum, which NaN propagates to) and one host sync, a
    fraction of ``isfinite(t).all()``'s cost."""
    items = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    bounds = [torch.stack(torch.aminmax(t)).double() for t in items if t.numel()]
    return not bounds or bool(torch.isfinite(torch.cat(bounds)).all())


def choice(name, value, options):
    if value not in options:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def parameter_tensors(index, named, device):
    """The tensors of parameter ``index`` (``named``: (list name, tensor) pairs) are on
    ``device``, have the first one's shape, and are contiguous."""
    shape = named[0][1].shape
    for name, tensor in named:
        if tensor.device != device:
            raise ValueError(f"{name}[{index}]: expected a tensor on {device}, got {tensor.device}")
        if tensor.shape != shape:
            raise ValueError(f"{name}[{index}]: expected shape {tuple(shape)}, got {tuple(tensor.shape)}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name}[{index}]: expected a contiguous tensor")
