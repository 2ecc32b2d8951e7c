"""``lowrank_svd``: batched randomised top-k SVD (docs/ops/lowrank_svd.md).

For every matrix A (n x d) of the batch, with a Gaussian sketch Omega (n x q),
q = min(k + oversample, n, d):

    Z = orth(A^T Omega);  niter times  Z = orth(A^T (A Z))    (one pass over A each)
    Y = A Z;  Y^T Y = W diag(lambda) W^T                       (Rayleigh-Ritz)
    S = sqrt(lambda)[:k],  V = Z W[:, :k],  U = Y W[:, :k] / S

``orth`` is CholeskyQR2 with a shifted first Cholesky. The backends differ only
in who runs this: ``torch`` (the reference below), ``triton`` (the reference
with its products and Gram matrices from kernels/lowrank_svd.py), ``cpp`` and
``cuda`` (the registered op ``modalimmune::lowrank_svd``, csrc/*/lowrank_svd.*).
"""

import torch

from .. import _extension
from .. import backend as _backends
from . import _validate

_OP = "modalimmune::lowrank_svd"
COMPUTE_DTYPES = (torch.float32, torch.float64)
INPUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# product modes of kernels/lowrank_svd.py: Y = A Z, Y = A^T Z, Y = A^T (A Z)
MODE_AZ, MODE_ATZ, MODE_ATAZ = 0, 1, 2


def _products_torch(A, Z, mode):
    """(Y, Y^T Y) for the product named by ``mode``."""
    if mode == MODE_AZ:
        Y = A @ Z
    elif mode == MODE_ATZ:
        Y = A.mT @ Z
    else:
        Y = A.mT @ (A @ Z)
    return Y, Y.mT @ Y


def _cholqr_step(Y, G):
    """Y R^{-1} with R^T R = G + tau I, tau = eps tr(G) + tiny (docs: "Orthonormalisation")."""
    info = torch.finfo(Y.dtype)
    G = G.double()
    tau = info.eps * G.diagonal(0, -2, -1).sum(-1) + info.tiny
    L, _ = torch.linalg.cholesky_ex(G + tau[..., None, None] * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device))
    return torch.linalg.solve_triangular(L.mT.to(Y.dtype), Y, upper=True, left=False)


def orthonormalize(Y, G):
    """CholeskyQR2 of Y given its Gram matrix G = Y^T Y (the first Cholesky shifted)."""
    Q = _cholqr_step(Y, G)
    return _cholqr_step(Q, Q.mT @ Q)


def sorted_eigh(G):
    """Eigen-decomposition of symmetric G in float64: eigenvalues descending, each
    eigenvector with its largest-magnitude entry positive (every backend's convention)."""
    vals, vecs = torch.linalg.eigh(G.double())
    vals, vecs = vals.flip(-1), vecs.flip(-1)
    pivot = torch.gather(vecs, -2, vecs.abs().argmax(-2, keepdim=True))
    return vals, vecs * torch.where(pivot < 0, -1.0, 1.0)


def lowrank_svd_reference(A, omega, k, niter, products=_products_torch):
    """The algorithm on (b, n, d) A and (b, n, q) omega, in A's dtype (float32/float64).

    ``products(A, Z, mode)`` returns (Y, Y^T Y); the ``triton`` backend passes its kernels.
    """
    Z = orthonormalize(*products(A, omega, MODE_ATZ))
    for _ in range(niter):
        Z = orthonormalize(*products(A, Z, MODE_ATAZ))
    Y, G = products(A, Z, MODE_AZ)
    vals, vecs = sorted_eigh(G)
    W = vecs[..., :k].to(A.dtype)
    S = vals[..., :k].clamp_min(0).sqrt().to(A.dtype)
    info = torch.finfo(A.dtype)  # s_i <= eps s_1 is zero to working precision: its U column is 0
    inverse = torch.where(S > info.eps * S[..., :1], S.clamp_min(info.tiny).reciprocal(), 0)
    U = (Y @ W) * inverse.unsqueeze(-2)
    return U, S, Z @ W


def _fake(A, omega, k, niter):
    b, n, d = A.shape
    return A.new_empty(b, n, k), A.new_empty(b, k), A.new_empty(b, d, k)


_SCHEMA = "(Tensor A, Tensor omega, int k, int niter) -> (Tensor U, Tensor S, Tensor V)"  # as csrc/registration.cpp


@torch.library.custom_op("modalimmune::lowrank_svd_triton", mutates_args=(), schema=_SCHEMA)
def lowrank_svd_triton(A, omega, k, niter):
    """The Triton backend as a custom op (products fused with their Gram matrix in kernels/lowrank_svd.py)."""
    from ..kernels import lowrank_svd as kernel

    return tuple(t.contiguous() for t in lowrank_svd_reference(A, omega, k, niter, kernel.products))


lowrank_svd_triton.register_fake(_fake)

if _extension.load() is not None and hasattr(torch.ops.modalimmune, "lowrank_svd"):  # absent from a stale build
    torch.library.register_fake(_OP)(_fake)


def _run(impl, A, omega, k, niter):
    if impl == "torch":
        return lowrank_svd_reference(A, omega, k, niter)
    if impl == "triton":
        return lowrank_svd_triton(A, omega, k, niter)
    return torch.ops.modalimmune.lowrank_svd(A, omega, k, niter)


def _guarded_inverse(x, scale):
    """x / (x^2 + delta^2), delta = sqrt(eps) * scale + tiny: 1/x away from 0, bounded near it."""
    info = torch.finfo(x.dtype)
    delta = info.eps ** 0.5 * scale + info.tiny ** 0.25
    return x / (x * x + delta * delta)


def svd_backward(U, S, V, gU, gS, gV):
    """Gradient of a thin SVD A = U diag(S) V^T (docs/ops/lowrank_svd.md, "Backward").

    Given the q Ritz triplets, it treats the energy outside them as zero singular
    values (exact when q = min(n, d)). Any of gU, gS, gV may be None. The 1/(s_j^2 - s_i^2) and 1/s_i factors are
    guarded by :func:`_guarded_inverse` with the scale s_1^2 (resp. s_1).
    """
    s1 = S[..., :1].unsqueeze(-1)
    inner = torch.diag_embed(gS) if gS is not None else torch.zeros_like(S).diag_embed()
    if gU is None and gV is None:
        return U @ inner @ V.mT
    E = S.unsqueeze(-2).square() - S.unsqueeze(-1).square()  # E_ij = s_j^2 - s_i^2
    F = _guarded_inverse(E, s1.square())
    F.diagonal(0, -2, -1).zero_()
    s_inv = _guarded_inverse(S, s1.squeeze(-1))
    gA = 0
    if gU is not None:
        J = U.mT @ gU
        inner = inner + F * (J - J.mT) * S.unsqueeze(-2)
        gUs = gU * s_inv.unsqueeze(-2)
        gA = gA + (gUs - U @ (U.mT @ gUs)) @ V.mT
    if gV is not None:
        K = V.mT @ gV
        inner = inner + F * (K - K.mT) * S.unsqueeze(-1)
        gVs = gV * s_inv.unsqueeze(-2)
        gA = gA + U @ (gVs - V @ (V.mT @ gVs)).mT
    return gA + U @ inner @ V.mT


class _LowRankSVD(torch.autograd.Function):
    @staticmethod
    def forward(A, omega, k, niter, impl):
        return _run(impl, A, omega, k, niter)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: S alone is cheap

    @staticmethod
    def backward(ctx, gU, gS, gV):
        U, S, V = ctx.saved_tensors
        return svd_backward(U, S, V, gU, gS, gV), None, None, None, None


def check_matrices(name, A):
    """A as a (..., n, d) floating tensor, else TypeError/ValueError naming ``name``."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(A).__name__}")
    if A.dtype not in INPUT_DTYPES:
        raise TypeError(f"{name}: expected float32, float64, bfloat16 or float16, got {A.dtype}")
    if A.dim() < 2:
        raise ValueError(f"{name}: expected a tensor of shape (..., n, d) with at least 2 dims, got shape {tuple(A.shape)}")
    if A.shape[-1] == 0 or A.shape[-2] == 0:
        raise ValueError(f"{name}: expected non-empty matrices, got shape {tuple(A.shape)}")
    # one extra read of A and a host sync; skipped inside torch.compile, where it would break the graph
    if not torch.compiler.is_compiling() and not _validate.all_finite(A):
        raise ValueError(f"{name}: expected finite values, found NaN or Inf")


def check_rank(name, k, A):
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name}: expected an int, got {type(k).__name__}")
    limit = min(A.shape[-2], A.shape[-1])
    if not 1 <= k <= limit:
        raise ValueError(f"{name}: expected 1 <= {name} <= min(n, d) = {limit}, got {k}")


def _nonnegative_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value}")
    return value


def sketch(A, q, generator):
    """The Gaussian sketch Omega (..., n, q) in A's dtype: one n x q draw with ``generator`` (on its
    own device) shared by every matrix of the batch (docs/ops/lowrank_svd.md, "Sketch")."""
    device = generator.device if generator is not None else A.device
    omega = torch.randn((A.shape[-2], q), generator=generator, dtype=A.dtype, device=device).to(A.device)
    return omega.expand(*A.shape[:-1], q)


def lowrank_svd(A, k, *, oversample=8, niter=2, generator=None, backend="auto"):
    """Top-k singular triplets of every matrix of the batch ``A`` (..., n, d).

    Args:
        A: float32/float64 (bfloat16/float16 are computed in float32); every leading dim is a batch.
        k: number of singular triplets, 1 <= k <= min(n, d).
        oversample: extra sketch columns p; q = min(k + p, n, d).
        niter: power iterations (passes A^T (A Z)).
        generator: torch.Generator of the sketch; the result is a function of A and its state.
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"cuda"`` or ``"triton"``.

    Returns:
        (U (..., n, k), S (..., k) descending, V (..., d, k)) in A's dtype, differentiable.
        Columns of U belonging to singular values at or below eps * S[..., 0] are zero.
    """
    check_matrices("A", A)
    check_rank("k", k, A)
    oversample = _nonnegative_int("oversample", oversample)
    niter = _nonnegative_int("niter", niter)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    impl = _backends.resolve(backend, A.device)
    *batch, n, d = A.shape
    q = min(k + oversample, n, d)
    work = A if A.dtype in COMPUTE_DTYPES else A.float()
    omega = sketch(work, q, generator)
    flat = work.reshape(-1, n, d).contiguous()
    # all q Ritz triplets: the backward needs them (docs/ops/lowrank_svd.md, "Backward")
    U, S, V = _LowRankSVD.apply(flat, omega.reshape(-1, n, q).contiguous(), q, niter, impl)
    return (U[..., :k].reshape(*batch, n, k).to(A.dtype), S[..., :k].reshape(*batch, k).to(A.dtype),
            V[..., :k].reshape(*batch, d, k).to(A.dtype))
