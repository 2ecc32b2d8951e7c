"""``spectral_collapse``: remove exactly a fraction ``strength`` of each matrix's
centred energy, weakest directions first (docs/ops/spectral_collapse.md).

    C_s(X) = 1 mu^T + X_c P,   P = V diag(w) V^T + gamma (I - V V^T)

with V the top-k right singular vectors of X_c (from :func:`lowrank_svd`),
gamma the weight of the energy outside the top k and w those of the k
directions. The weights come from removing energy in the order tail, e_k,
e_{k-1}, ..., e_1: a piece with energy E whose predecessors hold C loses the
fraction clamp((s - C) / E, 0, 1) of its energy, so its weight is the square
root of what is left. P is a constant for autograd: the gradient is
(G - 1 g_bar^T) P + 1 g_bar^T.
"""

import math

import torch

from .. import checks
from .lowrank_svd import _lowrank_svd, check_matrices

DEFAULT_RANK = 16


def default_rank(n, d):
    """k=None: the top min(16, n, d) directions are resolved individually."""
    return min(DEFAULT_RANK, n, d)


def collapse_weights(S, total_energy, strength):
    """(w (..., k), gamma (...,)) removing the fraction ``strength`` of ``total_energy``.

    S: the top-k singular values of X_c, descending; total_energy: ||X_c||_F^2.
    Computed in float64; strength 1 gives exactly zero weights.
    """
    S, strength = S.double(), strength.double()
    total = total_energy.double().clamp_min(torch.finfo(torch.float64).tiny)
    e = S.square() / total.unsqueeze(-1)
    tail = (1 - e.sum(-1)).clamp_min(0)
    pieces = torch.cat([tail.unsqueeze(-1), e.flip(-1)], -1)  # weakest first
    before = pieces.cumsum(-1) - pieces
    removed = ((strength.unsqueeze(-1) - before) / pieces.clamp_min(torch.finfo(S.dtype).tiny)).clamp(0, 1)
    weights = (1 - removed).sqrt().where(strength.unsqueeze(-1) < 1, 0.0)
    return weights[..., 1:].flip(-1), weights[..., 0]


def project(X, V, w, gamma):
    """1 mu^T + X_c P for P = V diag(w) V^T + gamma (I - V V^T); linear in X."""
    mean = X.mean(-2, keepdim=True)
    Xc = X - mean
    g = gamma[..., None, None]
    return mean + g * Xc + ((Xc @ V) * (w.unsqueeze(-2) - g)) @ V.mT


def _check_strength(strength, batch_shape):
    if isinstance(strength, torch.Tensor):
        if not strength.dtype.is_floating_point:
            checks.fail("strength", "a floating tensor", strength.dtype, TypeError)
        # a host sync; skipped inside torch.compile, where it would break the graph
        if not torch.compiler.is_compiling() and bool((strength.isnan() | (strength < 0) | (strength > 1)).any()):
            checks.fail("strength", "values in [0, 1] (no NaN)", "values outside")
        try:
            torch.broadcast_shapes(strength.shape, batch_shape)
        except RuntimeError:
            checks.fail("strength", f"a shape that broadcasts to the batch shape {tuple(batch_shape)}",
                        f"shape {tuple(strength.shape)}")
        return strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        checks.fail("strength", "a float or a tensor", type(strength).__name__, TypeError)
    if math.isnan(strength) or not 0 <= strength <= 1:
        checks.fail("strength", "a value in [0, 1]", strength)
    return float(strength)


def spectral_collapse(X, strength, *, k=None, oversample=8, niter=2, generator=None, backend="auto"):
    """Collapses each matrix of ``X`` (..., n, d) at ``strength`` s in [0, 1].

    s = 0 returns X itself (no SVD); s = 1 the row mean of each matrix. In
    between, the energy kept is 1 - s of the centred energy and the dominant
    directions survive longest. ``strength`` is a float or a tensor that
    broadcasts to X.shape[:-2]. ``k`` (None: :func:`default_rank`) directions are
    resolved by :func:`lowrank_svd` (with ``oversample``, ``niter``, ``generator``
    and ``backend``); the energy beyond them is shrunk as one block.
    """
    check_matrices("X", X)
    *batch, n, d = X.shape
    k = default_rank(n, d) if k is None else k
    strength = _check_strength(strength, batch)
    if isinstance(strength, float) and strength == 0:
        return X
    with torch.no_grad():
        work = X.detach().float() if X.dtype in (torch.bfloat16, torch.float16) else X.detach()
        Xc = work - work.mean(-2, keepdim=True)
        _, S, V = _lowrank_svd(Xc, k, oversample=oversample, niter=niter, generator=generator, backend=backend)
        s = torch.as_tensor(strength, dtype=S.dtype, device=S.device).expand(batch)
        w, gamma = collapse_weights(S, Xc.square().sum((-2, -1)), s)
    dtype = X.dtype
    return project(X, V.to(dtype), w.to(dtype), gamma.to(dtype))
