"""Curvature-vector products: Hessian (two modes) and Gauss-Newton (docs/hypergrad.md).

The operators keep what can be reused between products (the gradient built
with ``create_graph=True``, the gradient of the loss with respect to the
outputs), so that a loop of products pays one backward pass each.
"""

import torch

from .. import checks
from ..models.base import math_attention
from . import _vectors

HVP_MODES = ("double_backward", "fwd_rev")


class HessianOperator:
    """``v -> H v`` for the Hessian of a loss, by reverse-over-reverse.

    ``grads`` is the gradient of the loss with respect to ``params`` built with
    ``create_graph=True``; each product is one backward pass through it.
    """

    def __init__(self, grads, params):
        self.grads = list(grads)
        self.params = list(params)

    def __call__(self, v):
        return _vectors.grad_or_zeros(self.grads, self.params, grad_outputs=v, retain_graph=True)


class GGNOperator:
    """``v -> J^T (d^2 l / d out^2) J v``, the Gauss-Newton product of ``l(f(params))``.

    ``outputs`` (a Tensor or a tuple of Tensors) carry the graph of ``f`` back to
    ``params``; ``loss_of_outputs`` maps them to the scalar loss ``l``. The
    product is positive semidefinite whenever ``l`` is convex in the outputs.
    ``jvp(v) -> J v`` may be given (forward mode); by default J v is the
    derivative of the linear map ``u -> J^T u`` (a double vector-Jacobian product).
    """

    def __init__(self, outputs, loss_of_outputs, params, jvp=None):
        self.outputs, self._single = _vectors.as_list("outputs", outputs)
        self.params = list(params)
        self._detached = [out.detach().requires_grad_() for out in self.outputs]
        with torch.enable_grad():
            loss = loss_of_outputs(_vectors.like(self._detached, self._single))
            self._output_grads = _vectors.grad_or_zeros([loss], self._detached, create_graph=True)
            if jvp is None:
                self._dummy = [torch.zeros_like(out, requires_grad=True) for out in self.outputs]
                self._jtu = _vectors.grad_or_zeros(self.outputs, self.params, grad_outputs=self._dummy,
                                                   create_graph=True)
        self._jvp = jvp or self._double_vjp

    def _double_vjp(self, v):
        return _vectors.grad_or_zeros(self._jtu, self._dummy, grad_outputs=v, retain_graph=True)

    def __call__(self, v):
        jv = self._jvp(v)
        hjv = _vectors.grad_or_zeros(self._output_grads, self._detached, grad_outputs=jv, retain_graph=True)
        return _vectors.grad_or_zeros(self.outputs, self.params, grad_outputs=hjv, retain_graph=True)


def _prepare(params, v, mode):
    params, single = _vectors.as_list("params", params)
    v = _vectors.match("v", v, params, single)
    checks.choice("mode", mode, HVP_MODES)
    return [p.detach() for p in params], [x.detach() for x in v], single


def hvp(loss_fn, params, v, mode="double_backward"):
    """Hessian-vector product ``H v``, ``H`` the Hessian of ``loss_fn(*params)``.

    Args:
        loss_fn: a function of the parameters returning a scalar (as for
            ``torch.autograd.functional.hvp``; use ``torch.func.functional_call``
            for a module).
        params: a Tensor or a list of Tensors (the point).
        v: the vector, with the structure of ``params``.
        mode: ``"double_backward"`` (reverse over reverse) or ``"fwd_rev"``
            (forward-mode derivative of the gradient, ``torch.func``).

    Returns:
        ``H v`` with the structure of ``params``.
    """
    params, v, single = _prepare(params, v, mode)
    if mode == "fwd_rev":
        grad_fn = torch.func.grad(loss_fn, argnums=tuple(range(len(params))))
        _, out = torch.func.jvp(grad_fn, tuple(params), tuple(v))
        return _vectors.like(list(out), single)
    with torch.enable_grad(), math_attention():
        leaves = [p.requires_grad_() for p in params]
        grads = _vectors.grad_or_zeros([loss_fn(*leaves)], leaves, create_graph=True)
        return _vectors.like(HessianOperator(grads, leaves)(v), single)


def ggn_vp(model_fn, loss_fn, params, v, mode="double_backward"):
    """Generalised Gauss-Newton product ``J^T (d^2 l/d out^2) J v``.

    Args:
        model_fn: a function of the parameters returning the outputs (a Tensor
            or a tuple of Tensors).
        loss_fn: the loss as a function of those outputs (convex in them for
            the product to be positive semidefinite: squared error,
            cross-entropy, weight decay on parameters passed as an output).
        params, v: as for :func:`hvp`.
        mode: how ``J v`` is formed: ``"double_backward"`` (two vector-Jacobian
            products) or ``"fwd_rev"`` (forward mode, ``torch.func.jvp``).
    """
    params, v, single = _prepare(params, v, mode)
    jvp = None
    if mode == "fwd_rev":
        def jvp(vec):
            _, out = torch.func.jvp(model_fn, tuple(p.detach() for p in params), tuple(vec))
            return _vectors.as_list("model_fn output", out)[0]
    with torch.enable_grad(), math_attention():
        leaves = [p.requires_grad_() for p in params]
        return _vectors.like(GGNOperator(model_fn(*leaves), loss_fn, leaves, jvp)(v), single)
