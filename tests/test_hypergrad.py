"""The certified Neumann solver, the curvature products and implicit hypergradients."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modalimmune.hypergrad import Certificate, ggn_vp, hvp, implicit_hypergradient, neumann_solve

F64 = torch.float64


def _psd(n, cond, generator, zero_floor=True):
    """A random PSD matrix with eigenvalues spread log-uniformly over [1/cond, 1]
    (the smallest set to 0 with ``zero_floor``: only the damping keeps it invertible)."""
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=generator))
    lam = torch.exp(torch.rand(n, dtype=F64, generator=generator) * -math.log(cond))
    lam[0], lam[-1] = 1.0, 1.0 / cond
    if zero_floor:
        lam[-1] = 0.0
    return (q * lam) @ q.T


def _check_solve(n, cond, seed, backend, max_iter, tol, check_every=None):
    generator = torch.Generator().manual_seed(seed)
    a = _psd(n, cond, generator)
    damping = 1.0 / cond  # cond(A + damping I) ~ cond + 1
    b = torch.randn(n, dtype=F64, generator=generator)
    x, cert = neumann_solve(lambda v: a @ v, b, damping=damping, tol=tol, max_iter=max_iter,
                            assume_psd=True, backend=backend, check_every=check_every)
    exact = torch.linalg.solve(a + damping * torch.eye(n, dtype=F64), b)
    error = (x - exact).norm().item()
    assert math.isfinite(cert.error_bound)
    assert error <= cert.error_bound * (1 + 1e-9) + 1e-12, (error, cert)
    if cert.certified:
        assert cert.residual_ratio <= tol
        assert cert.error_bound <= tol * b.norm().item() / damping * (1 + 1e-9)
        rel_cond = (cond + 1) * tol * 1.01
        assert error / exact.norm().item() <= rel_cond
    else:
        assert "tolerance" in cert.reason and cert.iterations >= max_iter
    return cert


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.one_of(st.integers(5, 40), st.integers(41, 200)), log_cond=st.floats(1.0, 4.0),
       seed=st.integers(0, 2**31 - 1),
       tol=st.sampled_from([1e-3, 1e-6, 1e-9]), check_every=st.sampled_from([1, 8]))
def test_random_spd_bound_never_below_true_error(n, log_cond, seed, tol, check_every):
    _check_solve(n, 10**log_cond, seed, "torch", max_iter=150, tol=tol, check_every=check_every)


@pytest.mark.parametrize("log_cond", [1.0, 2.0, 4.0])
def test_random_spd_large(log_cond):
    cert = _check_solve(500, 10**log_cond, int(torch.randint(0, 2**31 - 1, ())), "torch", max_iter=400, tol=1e-6)
    assert cert.certified == (log_cond <= 1.0)  # cond 100 needs ~1400 iterations for 1e-6


def test_a_priori_iteration_count_is_honoured():
    """With the exact alpha = 1 / lambda_max, tol is reached within the a-priori count."""
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    a = _psd(60, 50.0, generator)
    damping = 0.02
    lam_max = torch.linalg.eigvalsh(a + damping * torch.eye(60, dtype=F64))[-1].item()
    b = torch.randn(60, dtype=F64, generator=generator)
    x, cert = neumann_solve(lambda v: a @ v, b, damping=damping, alpha=1.0 / lam_max, tol=1e-6,
                            max_iter=5000, assume_psd=True)
    assert cert.certified
    assert cert.a_priori_iterations == math.ceil(math.log(1e-6) / math.log(1 - damping / lam_max))
    assert cert.iterations <= cert.a_priori_iterations


@settings(max_examples=60, deadline=None)
@given(scale=st.floats(-4.0, 6.0), c=st.sampled_from([0.1, 0.25, 1.0]), seed=st.integers(0, 2**31 - 1))
def test_relative_damping_bounds_the_iterations_at_any_scale(scale, c, seed):
    """damping = max(delta, c lambda_max(A)): the a-priori count depends on c and tol only, the
    solve is certified within it, and the bound holds for the damped system actually solved."""
    generator = torch.Generator().manual_seed(seed)
    a = 10**scale * _psd(40, 1e3, generator)
    b = torch.randn(40, dtype=F64, generator=generator)
    tol, delta = 1e-6, 1e-3
    x, cert = neumann_solve(lambda v: a @ v, b, damping=delta, relative_damping=c, tol=tol, max_iter=1000,
                            power_iters=60, assume_psd=True)
    lam_max = torch.linalg.eigvalsh(a)[-1].item()
    estimate = cert.lambda_max - cert.damping  # the power iteration's lambda_max(A): a Rayleigh quotient
    assert 0.5 * lam_max <= estimate <= lam_max * (1 + 1e-9)
    assert cert.damping == pytest.approx(max(delta, c * estimate), rel=1e-9)
    assert cert.certified and cert.iterations <= cert.a_priori_iterations
    # the power iteration underestimates lambda_max a little: the count is that of rho = 1 - c / (1 + c)
    assert cert.a_priori_iterations <= math.ceil(math.log(tol) / math.log(1 - c / (1 + c) * 0.999))
    exact = torch.linalg.solve(a + cert.damping * torch.eye(40, dtype=F64), b)
    assert (x - exact).norm().item() <= cert.error_bound * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_list_structure_and_backends(backend):
    """v as a list of differently shaped tensors (a block-diagonal system)."""
    from modalimmune.backend import unavailable_reason

    if unavailable_reason(backend, "cpu"):
        pytest.skip(unavailable_reason(backend, "cpu"))
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    a1, a2 = _psd(6, 10.0, generator), _psd(12, 10.0, generator)
    b = [torch.randn(6, dtype=F64, generator=generator), torch.randn(3, 4, dtype=F64, generator=generator)]
    matvec = lambda v: [a1 @ v[0], (a2 @ v[1].flatten()).reshape(3, 4)]  # noqa: E731
    x, cert = neumann_solve(matvec, b, damping=0.2, tol=1e-10, max_iter=400, assume_psd=True, backend=backend)
    assert isinstance(x, list) and [t.shape for t in x] == [t.shape for t in b]
    eye = lambda n: torch.eye(n, dtype=F64)  # noqa: E731
    torch.testing.assert_close(x[0], torch.linalg.solve(a1 + 0.2 * eye(6), b[0]), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(x[1].flatten(), torch.linalg.solve(a2 + 0.2 * eye(12), b[1].flatten()),
                               rtol=1e-8, atol=1e-8)
    assert cert.certified and cert.error_bound < 1e-8


def _indefinite(n, generator):
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=generator))
    lam = torch.rand(n, dtype=F64, generator=generator) * 2 - 0.5  # eigenvalues in [-0.5, 1.5]
    lam[0] = -0.5
    return (q * lam) @ q.T


@pytest.mark.parametrize("assume_psd", [False, True])
def test_indefinite_never_certified(assume_psd):
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    for _ in range(20):
        a = _indefinite(int(torch.randint(5, 40, (), generator=generator)), generator)
        b = torch.randn(a.shape[0], dtype=F64, generator=generator)
        _, cert = neumann_solve(lambda v: a @ v, b, damping=0.05, tol=1e-6, max_iter=500, assume_psd=assume_psd)
        assert not cert.certified
        assert ("negative Rayleigh" in cert.reason or "diverge" in cert.reason), cert.reason
        if not assume_psd:
            assert "not known to be PSD" in cert.reason and cert.error_bound == math.inf
        else:
            assert cert.error_bound == math.inf  # the PSD assumption was seen to be false


def test_divergence_detected_with_too_large_step():
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    a = _psd(20, 10.0, generator)
    lam_max = torch.linalg.eigvalsh(a)[-1].item()
    b = torch.randn(20, dtype=F64, generator=generator)
    _, cert = neumann_solve(lambda v: a @ v, b, damping=0.1, alpha=3.0 / lam_max, max_iter=200, assume_psd=True)
    assert not cert.certified and "diverg" in cert.reason and cert.iterations < 200


def test_uncertified_without_damping_or_tolerance():
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    a = _psd(10, 10.0, generator, zero_floor=False)
    b = torch.randn(10, dtype=F64, generator=generator)
    _, cert = neumann_solve(lambda v: a @ v, b, tol=1e-8, max_iter=2000, assume_psd=True)
    assert not cert.certified and "damping is 0" in cert.reason and cert.error_bound == math.inf
    _, cert = neumann_solve(lambda v: a @ v, b, damping=1e-3, tol=1e-12, max_iter=3, assume_psd=True)
    assert not cert.certified and "tolerance" in cert.reason and cert.iterations == 3
    assert math.isfinite(cert.error_bound)


def test_warm_start_and_zero_rhs():
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    a = _psd(30, 10.0, generator)
    b = torch.randn(30, dtype=F64, generator=generator)
    lam_max = torch.linalg.eigvalsh(a)[-1].item() + 0.1
    _, first = neumann_solve(lambda v: a @ v, b, damping=0.1, power_iters=60, assume_psd=True)
    other = torch.randn(30, dtype=F64, generator=generator)
    _, warm = neumann_solve(lambda v: a @ v, other, damping=0.1, power_iters=1, power_init=first.eigvec,
                            assume_psd=True)
    _, cold = neumann_solve(lambda v: a @ v, other, damping=0.1, power_iters=1, assume_psd=True)
    assert abs(warm.lambda_max - lam_max) <= abs(first.lambda_max - lam_max) + 1e-12
    assert abs(warm.lambda_max - lam_max) < abs(cold.lambda_max - lam_max)
    x, cert = neumann_solve(lambda v: a @ v, torch.zeros(30, dtype=F64), damping=0.1)
    assert cert.certified and cert.error_bound == 0.0 and torch.equal(x, torch.zeros(30, dtype=F64))
    assert isinstance(cert, Certificate)
    with pytest.raises(Exception):
        cert.certified = False  # frozen


BAD_OPTIONS = {"damping": -1.0, "tol": 0.0, "max_iter": 0, "alpha": -1.0, "capture": True, "backend": "cuda",
               "relative_damping": -0.1}


@pytest.mark.parametrize("case, error, name", [
    ("structure", ValueError, "matvec"),
    ("shape", ValueError, "matvec"),
    ("dtype", ValueError, "matvec"),
    ("damping", ValueError, "damping"),
    ("tol", ValueError, "tol"),
    ("nonfinite", ValueError, "v:"),
    ("max_iter", ValueError, "max_iter"),
    ("alpha", ValueError, "alpha"),
    ("capture", ValueError, "capture"),
    ("backend", RuntimeError, "backend"),
    ("relative_damping", ValueError, "relative_damping"),
    ("relative_damping_with_alpha", ValueError, "relative_damping"),
])
def test_bad_input(case, error, name):
    b = torch.randn(4, dtype=F64)
    matvec, kwargs = (lambda v: 2 * v), {}
    if case == "structure":
        matvec = lambda v: [2 * v]  # noqa: E731
    elif case == "shape":
        matvec = lambda v: torch.zeros(5, dtype=F64)  # noqa: E731
    elif case == "dtype":
        matvec = lambda v: v.float()  # noqa: E731
    elif case == "nonfinite":
        b[1] = float("nan")
    elif case == "relative_damping_with_alpha":
        kwargs = {"relative_damping": 0.5, "alpha": 0.1}
    else:
        kwargs = {case: BAD_OPTIONS[case]}
    before = b.clone()
    with pytest.raises(error, match=name):
        neumann_solve(matvec, b, **kwargs)
    assert torch.equal(b, before) or case == "nonfinite"


# --- curvature products ---------------------------------------------------------------------------

def _mlp_loss(x, y):
    def loss_fn(w1, b1, w2):
        return torch.nn.functional.cross_entropy(torch.tanh(x @ w1 + b1) @ w2, y)
    return loss_fn


def test_hvp_modes_agree_with_autograd_functional():
    x, y = torch.randn(16, 5, dtype=F64), torch.randint(0, 3, (16,))
    params = [torch.randn(5, 7, dtype=F64), torch.randn(7, dtype=F64), torch.randn(7, 3, dtype=F64)]
    v = [torch.randn_like(p) for p in params]
    loss_fn = _mlp_loss(x, y)
    _, expected = torch.autograd.functional.hvp(loss_fn, tuple(params), tuple(v))
    for mode in ("double_backward", "fwd_rev"):
        got = hvp(loss_fn, params, v, mode=mode)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    single = hvp(lambda p: (p**4).sum(), params[1], v[1], mode="fwd_rev")
    torch.testing.assert_close(single, 12 * params[1] ** 2 * v[1])


def test_ggn_vp_modes_match_explicit_product():
    x, y = torch.randn(8, 4, dtype=F64), torch.randint(0, 3, (8,))
    params = [torch.randn(4, 6, dtype=F64), torch.randn(6, 3, dtype=F64)]
    v = [torch.randn_like(p) for p in params]
    model_fn = lambda w1, w2: torch.tanh(x @ w1) @ w2  # noqa: E731
    loss_fn = lambda out: torch.nn.functional.cross_entropy(out, y)  # noqa: E731
    flat = torch.cat([p.flatten() for p in params])
    split = lambda f: (f[:24].reshape(4, 6), f[24:].reshape(6, 3))  # noqa: E731
    jac = torch.autograd.functional.jacobian(lambda f: model_fn(*split(f)).flatten(), flat)
    out = model_fn(*params)
    h_out = torch.autograd.functional.hessian(lambda o: loss_fn(o.reshape(out.shape)), out.flatten())
    expected = jac.T @ h_out @ jac @ torch.cat([t.flatten() for t in v])
    for mode in ("double_backward", "fwd_rev"):
        got = torch.cat([g.flatten() for g in ggn_vp(model_fn, loss_fn, params, v, mode=mode)])
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


# --- implicit hypergradients ----------------------------------------------------------------------

def _ridge_problem(generator, n=60, d=8):
    x = torch.randn(n, d, dtype=F64, generator=generator)
    y = x @ torch.randn(d, dtype=F64, generator=generator) + 0.3 * torch.randn(n, dtype=F64, generator=generator)
    xv = torch.randn(40, d, dtype=F64, generator=generator)
    yv = xv @ torch.randn(d, dtype=F64, generator=generator)
    return x, y, xv, yv


def test_ridge_matches_closed_form():
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x, y, xv, yv = _ridge_problem(generator)
    n, d = x.shape
    phi = torch.tensor(math.log(0.2), dtype=F64, requires_grad=True)
    lam = phi.exp().item()
    gram = x.T @ x / n + lam * torch.eye(d, dtype=F64)
    theta_star = torch.linalg.solve(gram, x.T @ y / n)
    theta = theta_star.clone().requires_grad_()

    def inner():
        def loss_of_outputs(out):
            pred, weights = out
            return 0.5 * (pred - y).square().mean() + 0.5 * phi.exp() * weights.square().sum()
        return (x @ theta, theta), loss_of_outputs

    outer = lambda: 0.5 * (xv @ theta - yv).square().mean()  # noqa: E731
    (g,), cert = implicit_hypergradient(inner, outer, [theta], [phi], curvature="ggn", damping=1e-7,
                                        tol=1e-10, max_iter=3000)
    grad_val = xv.T @ (xv @ theta_star - yv) / xv.shape[0]
    expected = -grad_val @ torch.linalg.solve(gram, lam * theta_star)
    assert cert.certified, cert.reason
    assert g.item() == pytest.approx(expected.item(), rel=1e-4)
    assert math.isfinite(cert.hypergradient_bound)
    # the Hessian curvature of a quadratic is the same matrix
    (g_h,), _ = implicit_hypergradient(inner, outer, [theta], [phi], curvature="hessian", damping=1e-7,
                                       tol=1e-10, max_iter=3000)
    assert g_h.item() == pytest.approx(expected.item(), rel=1e-4)


def _logistic_fit(x, y, lam, steps=30):
    """argmin mean(softplus(-s x theta)) + lam/2 ||theta||^2 by Newton's method (float64)."""
    theta = torch.zeros(x.shape[1], dtype=F64)
    for _ in range(steps):
        s = torch.sigmoid(x @ theta)
        grad = x.T @ (s - y) / x.shape[0] + lam * theta
        hess = (x.T * (s * (1 - s))) @ x / x.shape[0] + lam * torch.eye(x.shape[1], dtype=F64)
        theta = theta - torch.linalg.solve(hess, grad)
    return theta


def test_logistic_matches_finite_difference():
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    n, d = 80, 6
    x = torch.randn(n, d, dtype=F64, generator=generator)
    w_true = torch.randn(d, dtype=F64, generator=generator)
    y = (torch.rand(n, dtype=F64, generator=generator) < torch.sigmoid(x @ w_true)).to(F64)
    xv = torch.randn(50, d, dtype=F64, generator=generator)
    yv = (torch.rand(50, dtype=F64, generator=generator) < torch.sigmoid(xv @ w_true)).to(F64)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    val_loss = lambda theta: bce(xv @ theta, yv)  # noqa: E731
    phi0 = math.log(0.05)
    theta = _logistic_fit(x, y, math.exp(phi0)).requires_grad_()
    phi = torch.tensor(phi0, dtype=F64, requires_grad=True)

    def inner():
        def loss_of_outputs(out):
            logits, weights = out
            return bce(logits, y) + 0.5 * phi.exp() * weights.square().sum()
        return (x @ theta, theta), loss_of_outputs

    (g,), cert = implicit_hypergradient(inner, lambda: val_loss(theta), [theta], [phi], damping=1e-8,
                                        tol=1e-9, max_iter=5000)
    h = 1e-4
    fd = (val_loss(_logistic_fit(x, y, math.exp(phi0 + h)))
          - val_loss(_logistic_fit(x, y, math.exp(phi0 - h)))) / (2 * h)
    assert cert.certified, cert.reason
    assert g.item() == pytest.approx(fd.item(), rel=1e-3)


def _mlp_problem(device):
    """A two-layer tanh MLP with exp(phi) weight decay: (inner, outer, params, phi)."""
    x, y = torch.randn(32, 5, device=device), torch.randint(0, 3, (32,), device=device)
    xv, yv = torch.randn(16, 5, device=device), torch.randint(0, 3, (16,), device=device)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device)
    params = list(model.parameters())
    phi = torch.tensor(math.log(1e-2), device=device, requires_grad=True)
    ce = torch.nn.functional.cross_entropy

    def inner():
        def loss_of_outputs(out):
            logits, *weights = out
            return ce(logits, y) + 0.5 * phi.exp() * sum(w.square().sum() for w in weights)
        return (model(x), *params), loss_of_outputs

    return inner, lambda: ce(model(xv), yv), params, phi


def test_two_layer_mlp_ggn_certified_hessian_not():
    inner, outer, params, phi = _mlp_problem("cpu")
    g, cert = implicit_hypergradient(inner, outer, params, [phi], curvature="ggn", damping=0.05, tol=1e-3,
                                     max_iter=1000)
    assert cert.certified, cert.reason
    assert cert.curvature == "ggn" and math.isfinite(cert.error_bound) and math.isfinite(cert.hypergradient_bound)
    assert g[0].shape == phi.shape and torch.isfinite(g[0])
    g_h, cert_h = implicit_hypergradient(inner, outer, params, [phi], curvature="hessian", damping=0.05,
                                         tol=1e-3, max_iter=1000)
    assert not cert_h.certified and "not known to be PSD" in cert_h.reason
    assert cert_h.error_bound == math.inf and cert_h.hypergradient_bound == math.inf


def test_implicit_bad_input():
    theta = torch.randn(3, requires_grad=True)
    phi = torch.zeros((), requires_grad=True)
    with pytest.raises(TypeError, match="inner_loss"):
        implicit_hypergradient(lambda: (theta**2).sum(), lambda: theta.sum(), [theta], [phi], curvature="ggn")
    with pytest.raises(ValueError, match="curvature"):
        implicit_hypergradient(lambda: (theta**2).sum(), lambda: theta.sum(), [theta], [phi], curvature="exact")
    with pytest.raises(ValueError, match=r"hparams\[0\]"):
        implicit_hypergradient(lambda: (theta**2).sum(), lambda: theta.sum(), [theta], [torch.zeros(())])


# --- CUDA graph capture ---------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_captured_solve_matches_eager(backend):
    from modalimmune.backend import unavailable_reason

    if unavailable_reason(backend, "cuda"):
        pytest.skip(unavailable_reason(backend, "cuda"))
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    a = _psd(50, 20.0, generator).cuda()
    b = torch.randn(50, dtype=F64, generator=generator).cuda()
    options = dict(damping=0.05, tol=1e-8, max_iter=1000, assume_psd=True, backend=backend, check_every=10)
    x_eager, eager = neumann_solve(lambda v: a @ v, b, **options)
    x_graph, graph = neumann_solve(lambda v: a @ v, b, capture=True, **options)
    assert eager.certified and graph.certified
    assert graph.iterations == eager.iterations  # both stop at the end of the same block
    torch.testing.assert_close(x_graph, x_eager, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
def test_captured_implicit_hypergradient_matches_eager():
    inner, outer, params, phi = _mlp_problem("cuda")
    options = dict(damping=0.05, tol=1e-4, max_iter=1000, check_every=10)
    g_eager, eager = implicit_hypergradient(inner, outer, params, [phi], **options)
    g_graph, graph = implicit_hypergradient(inner, outer, params, [phi], capture=True, **options)
    assert eager.certified and graph.certified and graph.iterations == eager.iterations
    torch.testing.assert_close(g_graph[0], g_eager[0], rtol=1e-4, atol=1e-7)


def test_curvature_products_through_fused_attention():
    """A double backward through the fused attention kernels (chosen on the CPU in float64 too) is
    not implemented: the products build their graphs with the math kernel
    (``models.base.math_attention``) and match the products of an explicit softmax attention."""
    q, kv = torch.randn(3, 2, 5, 4, dtype=F64), torch.randn(3, 2, 6, 4, dtype=F64)
    params = [torch.randn(4, 4, dtype=F64), torch.randn(4, 4, dtype=F64)]
    v = [torch.randn_like(p) for p in params]
    model_fn = lambda wq, wk: torch.nn.functional.scaled_dot_product_attention(q @ wq, kv @ wk, kv)  # noqa: E731
    math_model = lambda wq, wk: torch.softmax((q @ wq) @ (kv @ wk).mT / 2, -1) @ kv  # noqa: E731
    loss_fn = lambda out: out.square().sum()  # noqa: E731
    flat, vflat = (torch.cat([t.flatten() for t in ts]) for ts in (params, v))
    split = lambda f: (f[:16].reshape(4, 4), f[16:].reshape(4, 4))  # noqa: E731
    jac = torch.autograd.functional.jacobian(lambda f: math_model(*split(f)).flatten(), flat)
    got = torch.cat([g.flatten() for g in ggn_vp(model_fn, loss_fn, params, v)])
    torch.testing.assert_close(got, 2 * jac.T @ jac @ vflat, rtol=1e-10, atol=1e-10)
    _, expected = torch.autograd.functional.hvp(lambda f: loss_fn(math_model(*split(f))), flat, vflat)
    got = torch.cat([h.flatten() for h in hvp(lambda wq, wk: loss_fn(model_fn(wq, wk)), params, v)])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
