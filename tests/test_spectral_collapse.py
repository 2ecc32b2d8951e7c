"""spectral_collapse: strength semantics, energy accounting, the detached-projector
backward, adaptivity to the spectrum, every backend, bad input."""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modalimmune import ops

sc = importlib.import_module("modalimmune.ops.spectral_collapse")


def centred_energy(X):
    return (X - X.mean(-2, keepdim=True)).double().square().sum((-2, -1))


def test_strength_zero_is_identity_and_one_is_row_mean():
    X = torch.randn(3, 10, 7)
    assert ops.spectral_collapse(X, 0.0) is X
    Y = ops.spectral_collapse(X, 1.0, backend="torch")
    torch.testing.assert_close(Y, X.mean(-2, keepdim=True).expand_as(X), rtol=0, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(s=st.floats(0.0, 1.0), n=st.integers(2, 12), d=st.integers(1, 9), k=st.integers(1, 4))
def test_energy_kept_is_one_minus_strength(s, n, d, k):
    X = torch.randn(2, n, d, dtype=torch.float64) * torch.linspace(3, 0.2, d, dtype=torch.float64)
    k = min(k, n, d)
    Y = ops.spectral_collapse(X, s, k=k, backend="torch")
    kept = centred_energy(Y) / centred_energy(X)
    torch.testing.assert_close(kept, torch.full_like(kept, 1 - s), rtol=0, atol=1e-9)
    torch.testing.assert_close(Y.mean(-2), X.mean(-2))  # the mean is never touched


def test_monotone_in_strength_and_weakest_directions_go_first(backend_device):
    backend, device = backend_device
    scales = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.1, 0.1], dtype=torch.float64)
    X = (torch.randn(4, 40, 6, dtype=torch.float64) * scales).to(device)
    strengths = torch.linspace(0, 1, 9).tolist()
    kept = [centred_energy(ops.spectral_collapse(X, s, k=4, backend=backend)).cpu() for s in strengths]
    for a, b in zip(kept, kept[1:]):
        assert bool((b <= a + 1e-9).all())
    # removing 10% of the energy leaves the top direction intact
    Y = ops.spectral_collapse(X, 0.1, k=4, backend=backend)
    V1 = torch.linalg.svd(X - X.mean(-2, keepdim=True))[2][..., :1, :].mT
    Xc, Yc = X - X.mean(-2, keepdim=True), Y - Y.mean(-2, keepdim=True)
    torch.testing.assert_close(Yc @ V1, Xc @ V1, rtol=1e-6, atol=1e-6)


def test_adapts_to_each_spectrum():
    """A modality whose energy sits in one direction keeps that one direction."""
    low = torch.randn(1, 50, 1) @ torch.randn(1, 1, 8) + 1e-3 * torch.randn(1, 50, 8)
    flat = torch.randn(1, 50, 8)
    X = torch.cat([low, flat]).double()
    Y = ops.spectral_collapse(X, 0.3, k=8, backend="torch")
    ranks = torch.linalg.matrix_rank(Y - Y.mean(-2, keepdim=True), rtol=1e-6)
    assert ranks.tolist()[0] == 1 and ranks.tolist()[1] >= 4


def test_backward_is_the_detached_projector_formula(backend_device):
    backend, device = backend_device
    X = torch.randn(2, 3, 12, 5, dtype=torch.float64, device=device, requires_grad=True)
    strength = torch.tensor([[0.2, 0.5, 0.95], [0.0, 0.7, 1.0]], dtype=torch.float64, device=device)
    gen = lambda: torch.Generator(device).manual_seed(3)  # noqa: E731
    Y = ops.spectral_collapse(X, strength, k=3, generator=gen(), backend=backend)
    G = torch.randn_like(Y)
    (grad,) = torch.autograd.grad(Y, X, G)
    # P from the same SVD: the collapse map applied to the basis of R^d
    with torch.no_grad():
        Xc = X - X.mean(-2, keepdim=True)
        _, S, V = ops.lowrank_svd(Xc, 3, generator=gen(), backend=backend)
        w, gamma = sc.collapse_weights(S, Xc.square().sum((-2, -1)), strength)
        eye = torch.eye(5, dtype=X.dtype, device=device)
        P = V @ torch.diag_embed(w) @ V.mT + gamma[..., None, None] * (eye - V @ V.mT)
    g_bar = G.mean(-2, keepdim=True)
    torch.testing.assert_close(grad, (G - g_bar) @ P + g_bar)
    torch.testing.assert_close(Y, X.mean(-2, keepdim=True) + Xc @ P)


@pytest.mark.parametrize("case", ["zero", "one_row", "rank_one", "tiny"])
def test_degenerate_inputs_are_finite(backend_device, case):
    backend, device = backend_device
    X = {"zero": torch.zeros(2, 6, 4), "one_row": torch.randn(2, 1, 4),
         "rank_one": torch.randn(2, 6, 1) @ torch.randn(2, 1, 4), "tiny": torch.randn(2, 3, 2)}[case]
    X = X.to(device).requires_grad_()
    Y = ops.spectral_collapse(X, 0.5, backend=backend)
    Y.square().sum().backward()
    assert torch.isfinite(Y).all() and torch.isfinite(X.grad).all()
    assert bool((centred_energy(Y) <= 0.5 * centred_energy(X) * (1 + 1e-5) + 1e-6).all())


@pytest.mark.parametrize("strength,error,match", [
    (1.5, ValueError, r"strength: expected a value in \[0, 1\]"),
    (-0.1, ValueError, "strength"),
    (float("nan"), ValueError, "strength"),
    (torch.tensor([0.5, float("nan")]), ValueError, "strength"),
    (torch.tensor([0.5, 0.2, 0.1]), ValueError, "strength: expected a shape that broadcasts"),
    ("half", TypeError, "strength"),
])
def test_bad_strength(strength, error, match):
    X = torch.randn(2, 5, 4)
    before = X.clone()
    with pytest.raises(error, match=match):
        ops.spectral_collapse(X, strength)
    assert torch.equal(X, before)


def test_bad_matrix():
    with pytest.raises(ValueError, match="X: expected a tensor of shape"):
        ops.spectral_collapse(torch.randn(5), 0.5)
    with pytest.raises(ValueError, match="k: expected 1 <= k"):
        ops.spectral_collapse(torch.randn(5, 4), 0.5, k=9)
