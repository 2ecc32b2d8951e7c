"""Argument checks used across the package, with one error format:

    ``<argument>: expected <what>, got <value>``

A value of the wrong kind raises ``TypeError``, one out of range ``ValueError``.
Each check returns the value it accepted (converted where that is its job), so
that a caller validates and stores in one line; nothing is modified before
every check of a call has passed.
"""

import math

import torch

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fail(name, expected, got, error=ValueError):
    """Raises ``error("name: expected ..., got ...")``."""
    raise error(f"{name}: expected {expected}, got {got}")


def _interval(low, high, low_open, high_open):
    if high is None:
        return f"> {low}" if low_open else f">= {low}"
    if low is None:
        return f"< {high}" if high_open else f"<= {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def number(name, value, low=None, high=None, *, low_open=False, high_open=False):
    """``value`` as a finite float within the bounds given (closed unless ``*_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(name, "a number", repr(value), TypeError)
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if not -math.inf < value < math.inf or below or above:  # also traces as a symbolic float
        bounds = "" if low is None and high is None else " " + _interval(low, high, low_open, high_open)
        fail(name, f"a finite number{bounds}", repr(value))
    return value


def integer(name, value, low=None, high=None):
    """``value`` as an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(name, "an int", repr(value), TypeError)
    if (low is not None and value < low) or (high is not None and value > high):
        fail(name, f"an int {_interval(low, high, False, False)}", repr(value))
    return value


def flag(name, value):
    """``value``, which must be True or False."""
    if not isinstance(value, bool):
        fail(name, "true or false", repr(value), TypeError)
    return value


def choice(name, value, options):
    """``value``, which must be one of ``options``."""
    if value not in options:
        fail(name, f"one of {', '.join(map(repr, options))}", repr(value))
    return value


def tensor_list(name, value, length=None):
    """``value`` as a list of tensors, checked for type and (when given) length."""
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        fail(name, "a list of tensors", type(value).__name__, TypeError)
    for i, item in enumerate(value):
        if not isinstance(item, torch.Tensor):
            fail(f"{name}[{i}]", "a Tensor", type(item).__name__, TypeError)
    if length is not None and len(value) != length:
        fail(name, f"{length} tensors (one per parameter)", f"{len(value)}")
    return list(value)


def all_finite(tensors):
    """Whether every entry of a floating tensor (or of a list of them) is finite: one read
    pass each (its minimum and maximum, which NaN propagates to) and one host sync, a
    fraction of ``isfinite(t).all()``'s cost."""
    items = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    bounds = [torch.stack(torch.aminmax(t)).double() for t in items if t.numel()]
    return not bounds or bool(torch.isfinite(torch.cat(bounds)).all())


def parameter_tensors(index, named, device):
    """The tensors of parameter ``index`` (``named``: (list name, tensor) pairs) are on
    ``device``, have the first one's shape, and are contiguous."""
    shape = named[0][1].shape
    for name, tensor in named:
        label = f"{name}[{index}]"
        if tensor.device != device:
            fail(label, f"a tensor on {device}", f"one on {tensor.device}")
        if tensor.shape != shape:
            fail(label, f"shape {tuple(shape)}", f"{tuple(tensor.shape)}")
        if not tensor.is_contiguous():
            fail(label, "a contiguous tensor", "a strided one")
