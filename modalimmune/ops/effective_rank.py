"""``effective_rank``: RankMe's exp(-sum p_i log p_i), p_i = s_i / sum_j s_j + eps,
over the top-k singular values (docs/ops/spectral_collapse.md, "Effective rank").

Differentiable through the singular values only (the gradient of s_i is u_i v_i^T).
"""

from .. import checks
from .lowrank_svd import _lowrank_svd, check_matrices, check_rank

DEFAULT_RANK = 64


def effective_rank(H, *, k=None, eps=1e-7, oversample=8, niter=2, generator=None, backend="auto",
                   check_finite=True):
    """Effective rank of each matrix of ``H`` (..., n, d); a tensor of shape H.shape[:-2].

    ``k=None`` uses min(64, n, d) singular values; the result lies in [1, k]
    (up to ``eps``); a zero matrix gives 1. ``check_finite=False`` skips the scan of ``H``
    for NaN/Inf (a read of ``H`` and a host sync): a training step passes finite input or
    lets a non-finite one make its loss non-finite, and the step is then skipped.
    """
    check_matrices("H", H, check_finite)
    k = min(DEFAULT_RANK, *H.shape[-2:]) if k is None else k
    check_rank("k", k, H)
    eps = checks.number("eps", eps, 0.0, low_open=True)
    _, S, _ = _lowrank_svd(H, k, oversample=oversample, niter=niter, generator=generator, backend=backend)
    p = S / S.sum(-1, keepdim=True).clamp_min(eps) + eps
    return (-(p * p.log()).sum(-1)).exp()
