"""Interventions on embeddings: spectral / zero / fixed-rank collapse, knock-out, noise, token dropout."""

import math

import pytest
import torch

from modalimmune.methods.modalimmune.interventions import add_noise, collapse, knock_out, token_dropout


def centred_energy(x):
    return (x - x.mean(-2, keepdim=True)).square().sum((-2, -1))


def decaying(n, d, rate, batch=()):
    """Matrices with singular values rate^i (a controlled spectrum)."""
    q_left, _ = torch.linalg.qr(torch.randn(*batch, n, n, dtype=torch.float64))
    q_right, _ = torch.linalg.qr(torch.randn(*batch, d, d, dtype=torch.float64))
    r = min(n, d)
    s = rate ** torch.arange(r, dtype=torch.float64)
    return (q_left[..., :r] * s) @ q_right[..., :r].mT + 2.0


@pytest.mark.parametrize("shape", [(64, 24), (7, 11, 9)])
@pytest.mark.parametrize("strength", [0.1, 0.5, 0.93])
def test_spectral_collapse_keeps_one_minus_s_of_the_energy_per_matrix(shape, strength):
    z = torch.randn(shape, dtype=torch.float64) * torch.linspace(0.1, 3, shape[-1], dtype=torch.float64)
    y = collapse(z, strength)
    assert y.shape == z.shape
    torch.testing.assert_close(centred_energy(y) / centred_energy(z),
                               torch.full(shape[:-2], 1 - strength, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(y.mean(-2), z.mean(-2))  # each matrix keeps its row mean


def test_strength_zero_is_identity_and_one_the_row_mean():
    z = torch.randn(5, 6, 4)
    for mode in ("spectral", "zero", "fixed_rank"):
        assert collapse(z, 0.0, mode=mode) is z
    for mode in ("spectral", "fixed_rank"):
        y = collapse(z, 1.0, mode=mode)
        torch.testing.assert_close(y, z.mean(1, keepdim=True).expand_as(z))
    torch.testing.assert_close(knock_out(z), z.mean(1, keepdim=True).expand_as(z))
    assert torch.equal(collapse(z, 1.0, mode="zero"), torch.zeros_like(z))


def test_zero_shrinks_isotropically():
    z = torch.randn(9, 5)
    torch.testing.assert_close(collapse(z, 0.36, mode="zero"), 0.8 * z)


def test_fixed_rank_keeps_a_rank_set_by_the_strength_not_the_spectrum():
    ranks = {}
    for rate in (0.3, 0.95):
        z = decaying(40, 20, rate)
        y = collapse(z, 0.5, mode="fixed_rank", k=10)
        ranks[rate] = torch.linalg.matrix_rank(y - y.mean(0), atol=1e-8).item()
    assert ranks == {0.3: 5, 0.95: 5}
    # the spectral collapse keeps fewer directions of a steep spectrum than of a flat one
    kept = {rate: torch.linalg.matrix_rank(collapse(decaying(40, 20, rate), 0.5, k=20) -
                                           decaying(40, 20, rate).mean(0), atol=1e-8).item()
            for rate in (0.3, 0.95)}
    assert kept[0.3] < kept[0.95]


def test_collapse_passes_gradients_to_the_embedding():
    z = torch.randn(32, 8, requires_grad=True)
    collapse(z, 0.5).square().sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_noise_has_the_requested_snr():
    z = torch.randn(1000, 200) * 2
    noisy = add_noise(z, 10.0, generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    snr = 10 * math.log10(z.square().mean().item() / (noisy - z).square().mean().item())
    assert snr == pytest.approx(10.0, abs=0.1)  # 200000 draws: the power to ~0.3 % (0.014 dB), 7 sigma


def test_token_dropout_rate_mask_and_one_token_kept():
    z = torch.randn(200, 12, 3)
    mask = torch.arange(12)[None, :] < torch.randint(1, 13, (200, 1))
    dropped, keep = token_dropout(z, mask, 0.6, generator=torch.Generator().manual_seed(1))
    assert not (keep & ~mask).any()  # padding stays padding
    assert keep.any(1).all()
    assert torch.equal(dropped, z * keep[..., None])
    fraction = 1 - keep.sum().item() / mask.sum().item()
    assert 0.55 < fraction < 0.65


@pytest.mark.parametrize("call, name", [
    (lambda z: collapse(z, 0.5, mode="median"), "mode"),
    (lambda z: collapse(z, 1.5), "strength"),
    (lambda z: collapse(z, float("nan")), "strength"),
    (lambda z: collapse(z[0, 0], 0.5), "z"),
    (lambda z: token_dropout(z[:, 0], None, 0.1), "z"),
    (lambda z: token_dropout(z, None, 1.0), "rate"),
    (lambda z: add_noise(z, float("inf")), "snr_db"),
])
def test_bad_input(call, name):
    z = torch.randn(4, 5, 3)
    before = z.clone()
    with pytest.raises(ValueError, match=name):
        call(z)
    assert torch.equal(z, before)
