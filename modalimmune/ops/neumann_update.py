"""``neumann_update_``: the fused vector work of one Neumann iteration.

The math is in docs/hypergrad.md. Per parameter, in place, with ``w = A v``
given and ``u = w + damping * v`` (so that ``u = (A + damping I) v``):

    dot += <v, u>          (the Rayleigh quotient's numerator, old v)
    v   <- v - alpha * u
    p   <- p + v           (new v)
    sq  += ||v||^2         (new v: the residual of the series)

in one pass over memory for every parameter. Returns float64[2] = (sq, dot).
``alpha`` is a 0-dim tensor on the tensors' device, read by the kernel, so that
a loop of updates needs no host synchronisation (and can be captured in a CUDA
graph); a Python float is accepted too.
"""

import torch

from .. import backend as _backends
from .. import checks
from . import _library

VECTOR_DTYPES = (torch.float32, torch.float64)


def neumann_update_reference(v, p, w, alpha, damping):
    """Pure-PyTorch implementation (the reference and the ``torch`` backend).

    Works in the tensors' dtype (float64 tensors give the tests' ground truth);
    the two sums are accumulated in float64. Not differentiable: the solver's
    state is not part of any autograd graph.
    """
    stats = torch.zeros(2, dtype=torch.float64, device=alpha.device)
    for vi, pi, wi in zip(v, p, w):
        u = wi.add(vi, alpha=damping) if damping else wi
        dot = torch.dot(vi.flatten(), u.flatten()).double()
        vi.sub_(u * alpha.to(vi.dtype))
        pi.add_(vi)
        stats += torch.stack([vi.flatten().square().sum(dtype=torch.float64), dot])
    return stats


def _validate_args(v, p, w, alpha, damping):
    v = checks.tensor_list("v", v)
    count = len(v)
    p = checks.tensor_list("p", p, count)
    w = checks.tensor_list("w", w, count)
    damping = checks.number("damping", damping, 0.0)
    device = v[0].device if count else torch.device("cpu")
    for i in range(count):
        named = (("v", v[i]), ("p", p[i]), ("w", w[i]))
        checks.parameter_tensors(i, named, device)
        for name, tensor in named:
            if tensor.dtype not in VECTOR_DTYPES:
                raise TypeError(f"{name}[{i}]: expected float32 or float64, got {tensor.dtype}")
            if tensor.dtype != v[i].dtype:
                raise TypeError(f"{name}[{i}]: expected {v[i].dtype} like v[{i}], got {tensor.dtype}")
    if isinstance(alpha, torch.Tensor):
        if alpha.dim() != 0 or not alpha.is_floating_point():
            checks.fail("alpha", "a 0-dim floating-point tensor", f"shape {tuple(alpha.shape)} {alpha.dtype}")
        if alpha.device != device:
            checks.fail("alpha", f"a tensor on {device}", alpha.device)
        alpha = alpha.to(torch.float64)
    else:
        alpha = torch.tensor(checks.number("alpha", alpha), dtype=torch.float64, device=device)
    _library.check_writable("v", v, "neumann_update_")
    _library.check_writable("p", p, "neumann_update_")
    return v, p, w, alpha, damping


def neumann_update_(v, p, w, alpha, *, damping=0.0, backend="auto"):
    """One Neumann iteration's vector work, in place, fused over every tensor.

    Args:
        v: the series term per parameter (float32/float64); receives v - alpha (w + damping v).
        p: the partial sum per parameter, same shapes and dtypes; receives p + v (new v).
        w: A v per parameter (read only).
        alpha: the step, a 0-dim tensor on the tensors' device (no host sync) or a float.
        damping: delta >= 0, the multiple of v added to w.
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"cuda"`` or ``"triton"``.

    Returns:
        float64[2] on the tensors' device: (||v_new||^2, <v_old, w + damping v_old>).
        Every argument is checked before any tensor is written. As with an in-place
        PyTorch op, v and p may not require grad (``RuntimeError``, in grad mode),
        and their version counters go up.
    """
    v, p, w, alpha, damping = _validate_args(v, p, w, alpha, damping)
    if not v:
        _backends.resolve(backend, "cpu")
        return torch.zeros(2, dtype=torch.float64)
    impl = _backends.resolve(backend, v[0].device, "neumann_update")
    if impl == "torch":
        return neumann_update_reference(v, p, w, alpha, damping)
    return (triton_op if impl == "triton" else compiled_op)(v, p, w, alpha, damping)


def _fake(v, p, w, alpha, damping):
    return torch.empty(2, dtype=torch.float64, device=alpha.device)


def _triton_kernel(v, p, w, alpha, damping):
    from ..kernels import neumann_update as kernel

    return kernel.neumann_update(v, p, w, alpha, damping)


# alpha: a 0-dim float64 tensor on the tensors' device; returns float64[2] = (||v_new||^2, <v_old, u>)
SCHEMA = "(Tensor(a!)[] v, Tensor(b!)[] p, Tensor[] w, Tensor alpha, float damping) -> Tensor"
compiled_op = _library.define("neumann_update", SCHEMA, _fake)  # csrc/cpu/, csrc/cuda/neumann_update.*
triton_op = _library.define("neumann_update_triton", SCHEMA, _fake, kernel=_triton_kernel)  # kernels/
