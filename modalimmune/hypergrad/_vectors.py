"""Vectors of the solver: a Tensor or a list of Tensors, handled as a list."""

import torch


def as_list(name, value):
    """``(tensors, single)``: ``value`` as a list of tensors, and whether it was one Tensor."""
    if isinstance(value, torch.Tensor):
        return [value], True
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"{name}: expected a Tensor or a non-empty list of Tensors, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"{name}[{i}]: expected a Tensor, got {type(item).__name__}")
    return list(value), False


def like(tensors, single):
    """The inverse of :func:`as_list`."""
    return tensors[0] if single else list(tensors)


def match(name, value, reference, single):
    """``value`` as a list with the structure and shapes of ``reference`` (a list from :func:`as_list`)."""
    if single != isinstance(value, torch.Tensor):
        expected = "a Tensor" if single else f"a list of {len(reference)} Tensors"
        raise ValueError(f"{name}: expected {expected} like the input, got {type(value).__name__}")
    tensors, _ = as_list(name, value)
    if len(tensors) != len(reference):
        raise ValueError(f"{name}: expected {len(reference)} tensors like the input, got {len(tensors)}")
    for i, (got, ref) in enumerate(zip(tensors, reference)):
        if got.shape != ref.shape:
            raise ValueError(f"{name}[{i}]: expected shape {tuple(ref.shape)}, got {tuple(got.shape)}")
    return tensors


def dot(a, b):
    """Sum over the list of <a_i, b_i>, as a float64 0-dim tensor (no host sync)."""
    return sum(torch.dot(x.flatten(), y.flatten()).double() for x, y in zip(a, b))


def grad_or_zeros(outputs, inputs, grad_outputs=None, **kwargs):
    """``torch.autograd.grad`` that skips outputs without a graph and gives zeros
    (not None) for inputs that do not influence the outputs."""
    outputs = list(outputs)
    keep = [i for i, out in enumerate(outputs) if out.requires_grad]
    grads = [None] * len(inputs)
    if keep:
        grads = torch.autograd.grad(
            [outputs[i] for i in keep], inputs,
            grad_outputs=None if grad_outputs is None else [grad_outputs[i] for i in keep],
            allow_unused=True, **kwargs)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]

