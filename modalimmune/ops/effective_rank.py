"""``effective_rank``: RankMe's exp(-sum p_i log p_i), p_i = s_i / sum_j s_j + eps,
over the top-k singular values (docs/ops/spectral_collapse.md, "Effective rank").

Differentiable through the singular values only (the gradient of s_i is u_i v_i^T).
"""

from .lowrank_svd import check_matrices, check_rank, lowrank_svd

DEFAULT_RANK = 64


def effective_rank(H, *, k=None, eps=1e-7, oversample=8, niter=2, generator=None, backend="auto"):
    """Effective rank of each matrix of ``H`` (..., n, d); a tensor of shape H.shape[:-2].

    ``k=None`` uses min(64, n, d) singular values; the result lies in [1, k]
    (up to ``eps``); a zero matrix gives 1.
    """
    check_matrices("H", H)
    k = min(DEFAULT_RANK, *H.shape[-2:]) if k is None else k
    check_rank("k", k, H)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps: expected a float > 0, got {eps!r}")
    _, S, _ = lowrank_svd(H, k, oversample=oversample, niter=niter, generator=generator, backend=backend)
    p = S / S.sum(-1, keepdim=True).clamp_min(eps) + eps
    return (-(p * p.log()).sum(-1)).exp()
