"""effective_rank: RankMe against the float64 formula on exact singular values, bounds, gradient."""

import pytest
import torch

from modalimmune import ops


def rankme(H, k, eps=1e-7):
    S = torch.linalg.svdvals(H.double())[..., :k]
    p = S / S.sum(-1, keepdim=True).clamp_min(eps) + eps
    return (-(p * p.log()).sum(-1)).exp()


def test_matches_formula(backend_device):
    backend, device = backend_device
    scales = 0.6 ** torch.arange(24, dtype=torch.float64)
    H = (torch.linalg.qr(torch.randn(3, 50, 24, dtype=torch.float64))[0] * scales).to(device)
    r = ops.effective_rank(H, k=8, oversample=16, backend=backend)
    torch.testing.assert_close(r.cpu(), rankme(H.cpu(), 8), rtol=1e-8, atol=0)


def test_bounds():
    eye = torch.eye(6, dtype=torch.float64).expand(2, 6, 6)
    torch.testing.assert_close(ops.effective_rank(eye, backend="torch"), torch.full((2,), 6.0, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    rank_one = torch.randn(10, 1) @ torch.randn(1, 7)
    assert ops.effective_rank(rank_one, backend="torch").item() == pytest.approx(1.0, abs=1e-4)
    zero = ops.effective_rank(torch.zeros(4, 3), backend="torch")
    assert torch.isfinite(zero) and zero.item() == pytest.approx(1.0, abs=1e-3)


def test_gradient_through_singular_values_only():
    H = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(ops.effective_rank(H, k=6, backend="torch"), H)
    H64 = H.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(rankme(H64, 6), H64)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9)
    Z = torch.zeros(5, 4, requires_grad=True)
    ops.effective_rank(Z, backend="torch").backward()
    assert torch.isfinite(Z.grad).all()


def test_bad_input():
    with pytest.raises(ValueError, match="k: expected 1 <= k"):
        ops.effective_rank(torch.randn(5, 4), k=5)
    with pytest.raises(ValueError, match="eps"):
        ops.effective_rank(torch.randn(5, 4), eps=0.0)
    with pytest.raises(TypeError, match="H: expected float32"):
        ops.effective_rank(torch.ones(5, 4, dtype=torch.int32))
