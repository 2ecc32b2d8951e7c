"""Implicit-function hypergradients (docs/hypergrad.md, "hypergradient").

At an inner optimum theta*(phi) of L(theta, phi):

    dL_val/dphi = d_phi L_val - (d^2 L / d phi d theta) H^{-1} grad_theta L_val

with H the curvature of L in theta (Gauss-Newton or Hessian) plus damping,
``H^{-1}`` applied by the certified Neumann solver.
"""

import contextlib
import dataclasses
import math

import torch

from .. import checks
from ..models.base import math_attention
from . import _vectors
from .hvp import GGNOperator, HessianOperator
from .neumann import capture_stream, neumann_solve

CURVATURES = ("ggn", "hessian")
MAX_BOUND_ROWS = 64  # hypergradient bound only for at most this many hyperparameter entries


def _parameters(name, values):
    values = checks.tensor_list(name, values)
    if not values:
        raise ValueError(f"{name}: expected at least one tensor")
    for i, t in enumerate(values):
        if not t.requires_grad:
            raise ValueError(f"{name}[{i}]: expected a tensor that requires grad")
    return values


def _scalar(name, value):
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise TypeError(f"{name}: expected a scalar Tensor, got {type(value).__name__}")
    return value.reshape(())


def _inner_parts(result, curvature):
    """(loss, outputs, loss_of_outputs) from what ``inner_loss()`` returned."""
    if isinstance(result, tuple) and len(result) == 2 and callable(result[1]):
        outputs, loss_of_outputs = result
        return _scalar("inner_loss", loss_of_outputs(outputs)), outputs, loss_of_outputs
    if curvature == "ggn":
        raise TypeError("inner_loss: curvature='ggn' needs inner_loss() to return (outputs, loss_of_outputs), "
                        f"got {type(result).__name__}")
    return _scalar("inner_loss", result), None, None


def _hypergradient_bound(inner_loss_value, params, hparams, error_bound):
    """||M||_F * error_bound with M = d^2 L / d phi d theta, one backward pass per row."""
    if not math.isfinite(error_bound) or sum(h.numel() for h in hparams) > MAX_BOUND_ROWS:
        return math.inf
    per_hparam = _vectors.grad_or_zeros([inner_loss_value], hparams, create_graph=True)
    rows = torch.cat([g.flatten() for g in per_hparam])
    norm_sq = 0.0
    for entry in rows:
        row = _vectors.grad_or_zeros([entry], params, retain_graph=True)
        norm_sq += float(_vectors.dot(row, row))
    return math.sqrt(norm_sq) * error_bound


def implicit_hypergradient(inner_loss, outer_loss, params, hparams, *, curvature="ggn", damping=1e-3, tol=1e-3,
                           max_iter=200, assume_psd=False, **solver_options):
    """The implicit hypergradient of ``outer_loss`` with respect to ``hparams``.

    Args:
        inner_loss: closure returning the training loss L(theta, phi), either a
            scalar, or a pair ``(outputs, loss_of_outputs)`` with
            ``L = loss_of_outputs(outputs)``. ``curvature="ggn"`` needs the pair:
            its curvature is ``J^T (d^2 l / d out^2) J`` with ``J = d outputs / d
            theta``, PSD when ``loss_of_outputs`` is convex in the outputs. A
            term of L that is not a function of the model outputs (weight decay)
            enters by passing the parameters themselves as an output.
        outer_loss: closure returning the validation loss L_val(theta, phi).
        params: theta, the tensors (requiring grad) the inner problem is
            solved over; a subset restricts the hypergradient to it.
        hparams: phi, the tensors (requiring grad) to differentiate with respect to.
        curvature: ``"ggn"`` (certifiable: PSD by construction) or ``"hessian"``
            (certified only with ``assume_psd=True``).
        damping, tol, max_iter, assume_psd: as for :func:`neumann_solve`.
        solver_options: further :func:`neumann_solve` options (``backend``,
            ``capture``, ``check_every``, ``power_iters``, ``alpha``, ``power_init``,
            ``relative_damping``).

    Returns:
        ``(g, cert)``: ``g`` a list matching ``hparams``; ``cert`` the solver's
        :class:`Certificate` with ``curvature`` and ``hypergradient_bound``
        (a bound on the error of ``g`` in the Euclidean norm, from the
        Frobenius norm of the mixed derivative; inf when uncertified or when
        ``hparams`` has more than ``MAX_BOUND_ROWS`` entries).
    """
    params = _parameters("params", params)
    hparams = _parameters("hparams", hparams)
    checks.choice("curvature", curvature, CURVATURES)
    # a captured solve replays the curvature's autograd graph: it must be built on the capture stream
    stream = None
    if solver_options.get("capture", False) and params[0].device.type == "cuda":
        stream = capture_stream(params[0].device)
        stream.wait_stream(torch.cuda.current_stream(params[0].device))
    with torch.enable_grad(), math_attention():
        grads = _vectors.grad_or_zeros([_scalar("outer_loss", outer_loss())], params + hparams)
        v0, direct = grads[:len(params)], grads[len(params):]
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            loss, outputs, loss_of_outputs = _inner_parts(inner_loss(), curvature)
            inner_grads = _vectors.grad_or_zeros([loss], params, create_graph=True)
            if curvature == "ggn":
                operator = GGNOperator(outputs, loss_of_outputs, params)
            else:
                operator = HessianOperator(inner_grads, params)
        x, cert = neumann_solve(operator, [g.detach() for g in v0], damping=damping, tol=tol, max_iter=max_iter,
                                assume_psd=assume_psd or curvature == "ggn", **solver_options)
        mixed = _vectors.grad_or_zeros(inner_grads, hparams, grad_outputs=x, retain_graph=True)
        g = [(d - m).detach() for d, m in zip(direct, mixed)]
        bound = _hypergradient_bound(loss, params, hparams, cert.error_bound)
    return g, dataclasses.replace(cert, curvature=curvature, hypergradient_bound=bound)
