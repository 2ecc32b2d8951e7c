"""The certified truncated Neumann solver (docs/hypergrad.md, "Neumann series").

Solves ``H x = v`` with ``H = A + damping I`` and ``A`` given by a
matrix-vector product:

    v_0 = v, p_0 = v_0,   v_{j+1} = v_j - alpha H v_j,   p_{j+1} = p_j + v_{j+1}

and returns ``x = alpha (p_K - v_K)`` (the first K terms), whose residual
``v_0 - H x`` is exactly ``v_K``. The vector work of an iteration is the fused
op :func:`modalimmune.ops.neumann_update_`.
"""

import math

import torch

from .. import backend as _backends
from .. import checks
from ..ops.neumann_update import VECTOR_DTYPES, neumann_update_
from . import _vectors, certificate

_capture_streams = {}


def capture_stream(device=None):
    """The side stream on which ``neumann_solve(capture=True)`` captures its CUDA graph.

    Autograd runs each backward op on the stream of its forward op, so a
    ``matvec`` that replays a cached autograd graph (``HessianOperator``,
    ``GGNOperator``) must have built that graph inside
    ``with torch.cuda.stream(capture_stream()):``.
    """
    device = torch.device("cuda" if device is None else device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _capture_streams:
        _capture_streams[device] = torch.cuda.Stream(device)
    return _capture_streams[device]


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


def _checked_matvec(matvec, reference, single):
    """``matvec`` on lists, checked to return the structure, shapes, dtypes and device of its input."""
    def apply(vectors):
        out = _vectors.match("matvec", matvec(_vectors.like(vectors, single)), reference, single)
        for i, (got, ref) in enumerate(zip(out, reference)):
            if got.dtype != ref.dtype or got.device != ref.device:
                raise ValueError(f"matvec: output [{i}] is {got.dtype} on {got.device}, "
                                 f"expected {ref.dtype} on {ref.device} like its input")
        out = [o.detach().contiguous() for o in out]
        return [o.clone() if o.data_ptr() == x.data_ptr() else o for o, x in zip(out, vectors)]
    return apply


def _power_iteration(apply, damping, start, iters):
    """Largest eigenvalue of ``A + damping I`` by the power method from ``start``.

    Returns (last Rayleigh quotient, smallest Rayleigh quotient, unit vector).
    """
    def unit(vectors):
        norm = _vectors.dot(vectors, vectors).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
        return torch._foreach_mul(vectors, (1.0 / norm).to(vectors[0].dtype))

    q = unit(start)
    rayleigh = []
    for _ in range(iters):
        w = torch._foreach_add(apply(q), q, alpha=damping)
        rayleigh.append(_vectors.dot(q, w))
        q = unit(w)
    values = torch.stack(rayleigh).cpu()
    return float(values[-1]), float(values.min()), q


def _validate_args(v, damping, alpha, tol, max_iter, power_iters, capture, check_every, backend):
    v, single = _vectors.as_list("v", v)
    device = v[0].device
    for i, t in enumerate(v):
        if t.dtype not in VECTOR_DTYPES:
            raise TypeError(f"v[{i}]: expected float32 or float64, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"v[{i}]: expected a tensor on {device}, got {t.device}")
    if not checks.all_finite(v):
        raise ValueError("v: expected finite values, got inf or nan")
    damping = checks.number("damping", damping, 0.0)
    tol = checks.number("tol", tol)
    if tol <= 0.0:
        raise ValueError(f"tol: expected a value > 0, got {tol}")
    _positive_int("max_iter", max_iter)
    if alpha is None:
        _positive_int("power_iters", power_iters)
    elif checks.number("alpha", alpha) <= 0.0:
        raise ValueError(f"alpha: expected a value > 0, got {alpha}")
    if not isinstance(capture, bool):
        raise TypeError(f"capture: expected a bool, got {type(capture).__name__}")
    if capture and device.type != "cuda":
        raise ValueError(f"capture: CUDA graphs need CUDA tensors, got v on {device}; use capture=False")
    if check_every is not None:
        _positive_int("check_every", check_every)
    impl = _backends.resolve(backend, device, "neumann_update")
    return v, single, damping, tol, impl


def neumann_solve(matvec, v, *, damping=0.0, alpha=None, tol=1e-3, max_iter=200, power_iters=20,
                  assume_psd=False, backend="auto", capture=False, check_every=None, power_init=None,
                  relative_damping=0.0):
    """Solves ``(A + damping I) x = v`` by the truncated Neumann series, with a certificate.

    Args:
        matvec: ``A``: a callable taking and returning the structure of ``v``
            (a Tensor or a list of Tensors of the same shapes, dtype and device).
        v: the right-hand side (float32/float64, finite).
        damping: delta >= 0, added to ``A``; the error bound is ``||v_K|| / delta``.
        relative_damping: c >= 0: the damping used is ``max(damping, c * lambda_max(A))``
            with ``lambda_max(A)`` from the power iteration (which then runs first), so
            that the contraction ``rho <= 1 - c / (1 + c)`` and the a-priori iteration
            count do not depend on the curvature's scale (docs/hypergrad.md,
            "Damping"); the certificate reports the damping used. Needs ``alpha=None``.
        alpha: the step; default ``1 / lambda_max`` from ``power_iters`` power iterations.
        tol: stop once ``||v_K|| <= tol ||v||``.
        max_iter: at most this many iterations (one product each).
        power_iters: power iterations for ``lambda_max`` (warm-started from
            ``power_init``, e.g. a previous call's ``cert.eigvec``, else from ``v``).
        assume_psd: declare ``A`` positive semidefinite; without it no error
            bound is claimed and the result is never certified.
        backend: backend of the fused update (:func:`modalimmune.ops.neumann_update_`).
        capture: CUDA only: capture ``check_every`` iterations once as a CUDA
            graph and replay it; the statistics stay on the device and are read
            once per replay. On other devices it raises ``ValueError``.
        check_every: iterations between host-side convergence checks
            (default 1, or 10 with ``capture``). Iterations run in whole blocks,
            so up to ``check_every - 1`` extra iterations may follow the stop.

    Returns:
        ``(x, cert)``: ``x`` with the structure of ``v``; ``cert`` a
        :class:`~modalimmune.hypergrad.Certificate`.
    """
    vectors, single, damping, tol, impl = _validate_args(
        v, damping, alpha, tol, max_iter, power_iters, capture, check_every, backend)
    relative_damping = checks.number("relative_damping", relative_damping, 0.0)
    if relative_damping > 0.0 and alpha is not None:
        raise ValueError("relative_damping: needs the power iteration's lambda_max, so alpha must be None")
    v0 = [t.detach().contiguous().clone() for t in vectors]
    apply = _checked_matvec(matvec, v0, single)
    v0_norm = math.sqrt(float(_vectors.dot(v0, v0)))
    curvature = "psd (assumed)" if assume_psd else "general"
    if v0_norm == 0.0:
        return _vectors.like([torch.zeros_like(t) for t in v0], single), _zero_certificate(curvature, damping)

    if alpha is None:
        start = v0 if power_init is None else _vectors.match("power_init", power_init, v0, single)
        lambda_max, power_min, eigvec = _power_iteration(apply, damping, start, power_iters)
        # the same eigenvectors with every eigenvalue shifted by the added damping
        added = max(0.0, relative_damping * (lambda_max - damping) - damping)
        damping, lambda_max, power_min = damping + added, lambda_max + added, power_min + added
        alpha = 1.0 / abs(lambda_max) if lambda_max != 0.0 else 1.0
    else:
        lambda_max, power_min, eigvec = math.nan, math.inf, []

    dtype = torch.float32 if any(t.dtype == torch.float32 for t in v0) else torch.float64
    curvature_scale = abs(lambda_max) if math.isfinite(lambda_max) else 1.0 / alpha
    trace = certificate.Trace(v0_norm, tol, dtype, curvature_scale)
    v_state = [t.clone() for t in v0]
    p_state = [t.clone() for t in v0]
    alpha_t = torch.tensor(alpha, dtype=torch.float64, device=v0[0].device)
    block = check_every or (10 if capture else 1)
    rows = torch.zeros(block, 2, dtype=torch.float64, device=v0[0].device)

    def step(i):
        w = apply(v_state)
        rows[i].copy_(neumann_update_(v_state, p_state, w, alpha_t, damping=damping, backend=impl))

    (_captured_loop if capture else _eager_loop)(step, rows, trace, max_iter)
    x = torch._foreach_sub(p_state, v_state)
    torch._foreach_mul_(x, alpha)
    cert = certificate.build(trace, psd=assume_psd, curvature=curvature, tol=tol, max_iter=max_iter,
                             lambda_max=lambda_max, alpha=alpha, damping=damping,
                             power_min_rayleigh=power_min, eigvec=_vectors.like(eigvec, single) if eigvec else ())
    return _vectors.like(x, single), cert


def _run_block(step, rows, trace, count):
    for i in range(count):
        step(i)
    trace.feed(rows[:count].cpu().numpy())


def _eager_loop(step, rows, trace, max_iter):
    block = rows.shape[0]
    while trace.iterations < max_iter and not trace.stopped:
        _run_block(step, rows, trace, min(block, max_iter - trace.iterations))


def _captured_loop(step, rows, trace, max_iter):
    """Blocks of iterations: the first eagerly (warm-up), the next ones by
    replaying one CUDA graph of a block, a last partial block eagerly."""
    block = rows.shape[0]
    stream = capture_stream(rows.device)
    stream.wait_stream(torch.cuda.current_stream(rows.device))
    graph = None
    with torch.cuda.stream(stream):
        _run_block(step, rows, trace, min(block, max_iter))
        while trace.iterations < max_iter and not trace.stopped:
            count = min(block, max_iter - trace.iterations)
            if count < block:
                _run_block(step, rows, trace, count)
                continue
            if graph is None:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    for i in range(block):
                        step(i)
            graph.replay()
            trace.feed(rows.cpu().numpy())
    torch.cuda.current_stream(rows.device).wait_stream(stream)


def _zero_certificate(curvature, damping):
    """v = 0: x = 0 is exact."""
    return certificate.Certificate(
        certified=True, reason="", curvature=curvature, iterations=0, a_priori_iterations=0,
        lambda_max=math.nan, alpha=math.nan, rho=math.nan, damping=damping, residual_ratio=0.0,
        error_bound=0.0, min_rayleigh=math.nan)
