"""CurvatureMasker: Hutchinson probes, tau one step late, the op wired into p.grad, state."""

import pytest
import torch

from modalimmune import CurvatureMasker, ops


def quadratic_problem(n=6):
    """Loss 0.5 x^T A x + b^T x with a known Hessian A (clean) and a linear destructive loss."""
    a = torch.randn(n, n, dtype=torch.float64)
    a = a @ a.T + torch.diag(torch.linspace(0.01, 100, n, dtype=torch.float64))
    x = torch.nn.Parameter(torch.randn(n, dtype=torch.float64).float())
    b = torch.randn(n)
    c = torch.randn(n)

    def losses():
        clean = 0.5 * x @ (a.float() @ x) + b @ x
        destr = c @ x + 0.1 * (x ** 2).sum()
        return clean, destr

    return x, a, losses


def test_hutchinson_probe_is_u_times_hessian_u():
    x, a, losses = quadratic_problem()
    masker = CurvatureMasker([x], probe_every=1)
    clean, destr = losses()
    (grad,) = torch.autograd.grad(clean + destr, [x], create_graph=True)
    state = masker.generator.get_state()
    (probe,) = masker.hutchinson([grad])
    u = torch.randint(0, 2, x.shape, generator=torch.Generator().set_state(state)).float() * 2 - 1
    hessian = a.float() + 0.2 * torch.eye(len(x))
    torch.testing.assert_close(probe, u * (hessian @ u), rtol=1e-5, atol=1e-4)
    assert set(u.tolist()) <= {-1.0, 1.0}


def test_probe_mean_estimates_hessian_diagonal():
    x, a, losses = quadratic_problem()
    masker = CurvatureMasker([x], probe_every=1)
    clean, destr = losses()
    (grad,) = torch.autograd.grad(clean, [x], create_graph=True)
    mean = torch.stack([masker.hutchinson([grad])[0] for _ in range(4000)]).mean(0)
    diag = torch.diagonal(a).float()
    assert ((mean - diag).abs() <= 0.1 * a.abs().sum(1).float()).all()


def test_step_writes_masked_gradient_and_keeps_tau_one_step_late():
    x, a, losses = quadratic_problem(64)
    masker = CurvatureMasker([x], probe_every=1, quantile=0.5, beta=0.5, backend="torch")
    clean, destr = losses()
    stats = masker.step(clean, destr)
    assert stats.masked_fraction.item() == 0.0  # no curvature known yet: nothing is masked
    tau_after_first = masker.tau
    assert tau_after_first == ops.quantile_from_hist(stats.log_abs_hist, 0.5)

    clean, destr = losses()
    g_c, = torch.autograd.grad(clean, [x], retain_graph=True)
    g_d, = torch.autograd.grad(destr, [x], retain_graph=True)
    d_before = masker.curvature[0].clone()
    gen_state = masker.generator.get_state()
    x.grad = None  # step adds into .grad, as backward does
    stats = masker.step(clean, destr)
    # replay the same probe and rule by hand with tau from the previous step
    u = torch.randint(0, 2, x.shape, generator=torch.Generator().set_state(gen_state)).float() * 2 - 1
    hessian = a.float()  # of the clean loss alone: the destructive part's 0.2 I is not probed
    d_new = 0.5 * d_before + 0.5 * u * (hessian @ u)
    torch.testing.assert_close(masker.curvature[0], d_new, rtol=1e-5, atol=1e-5)
    agree = (g_c * g_d) >= 0
    m = (agree | (d_new.abs() <= tau_after_first)).float()
    torch.testing.assert_close(x.grad, g_c + m * g_d, rtol=1e-5, atol=1e-6)
    assert stats.masked_fraction.item() == pytest.approx((m < 1).float().mean().item())
    assert 0 < stats.masked_fraction.item() < 1


def test_probe_every_skips_steps():
    x, _, losses = quadratic_problem()
    masker = CurvatureMasker([x], probe_every=3, backend="torch")
    seen = []
    for _ in range(7):
        before = masker.curvature[0].clone()
        masker.step(*losses())
        seen.append(not torch.equal(before, masker.curvature[0]))
    assert seen == [True, False, False, True, False, False, True]


def test_state_dict_round_trip_continues_identically():
    x, _, losses = quadratic_problem()
    masker = CurvatureMasker([x], probe_every=2, backend="torch")
    for _ in range(3):
        masker.step(*losses())
    state = masker.state_dict()
    twin = CurvatureMasker([x], probe_every=2, backend="torch", seed=99)
    twin.load_state_dict(state)
    x.grad = None
    masker.step(*losses())
    first = x.grad.clone()
    x.grad = None
    twin.step(*losses())
    torch.testing.assert_close(x.grad, first)
    torch.testing.assert_close(twin.curvature[0], masker.curvature[0])
    assert twin.tau == masker.tau


def test_step_adds_its_scaled_gradient_into_grad():
    """``grad_scale * (g_c + M g_d)`` lands on top of what ``.grad`` held (gradient accumulation)."""
    x, _, losses = quadratic_problem(32)
    masker = CurvatureMasker([x], probe_every=1, quantile=0.5, backend="torch")
    masker.step(*losses())  # curvature known from here on: some coordinates get masked
    twin = CurvatureMasker([x], probe_every=1, quantile=0.5, backend="torch")
    twin.load_state_dict(masker.state_dict())
    x.grad = None
    stats = masker.step(*losses())
    alone = x.grad.clone()
    held = torch.randn_like(x)
    x.grad = held.clone()
    twin_stats = twin.step(*losses(), grad_scale=0.25)
    torch.testing.assert_close(x.grad, held + 0.25 * alone)
    assert stats.masked_fraction.item() == twin_stats.masked_fraction.item() > 0


@pytest.mark.parametrize("kwargs,argument", [
    ({"quantile": 1.5}, "quantile"), ({"beta": 1.0}, "beta"), ({"probe_every": -1}, "probe_every"),
    ({"mode": "gentle"}, "mode"),
])
def test_bad_arguments(kwargs, argument):
    x, _, _ = quadratic_problem()
    with pytest.raises(ValueError, match=argument):
        CurvatureMasker([x], **kwargs)


def test_bad_state_leaves_masker_untouched():
    x, _, losses = quadratic_problem()
    masker = CurvatureMasker([x], backend="torch")
    masker.step(*losses())
    before = masker.state_dict()
    bad = dict(before, curvature=[torch.zeros(3)])
    with pytest.raises(ValueError, match="curvature"):
        masker.load_state_dict(bad)
    torch.testing.assert_close(masker.curvature[0], before["curvature"][0])
    assert masker.steps == before["steps"]
