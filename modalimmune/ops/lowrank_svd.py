"""``lowrank_svd``: batched randomised top-k SVD (docs/ops/lowrank_svd.md).

For every matrix A (n x d) of the batch, with a Gaussian sketch Omega (n x q),
q = min(k + oversample, n, d):

    Z = orth(A^T Omega);  niter times  Z = orth(A^T (A Z))    (one pass over A each)
    Y = A Z;  Y^T Y = W diag(lambda) W^T                       (Rayleigh-Ritz)
    S = sqrt(lambda)[:k],  V = Z W[:, :k],  U = Y W[:, :k] / S

where a singular value zero to working precision takes its columns of U and V
from the sketch instead (no division by it), and the columns from the first one
that is not orthonormal to the previous ones (to 4 q eps) on are orthonormal
completions of the others (docs: "Degenerate inputs"). ``orth`` is
CholeskyQR2 with a shifted first Cholesky. The backends differ only in who runs
this: ``torch`` (the reference below), ``triton`` (the reference with its
products and Gram matrices from kernels/lowrank_svd.py: the op
``modalimmune::lowrank_svd_triton``), ``cpp`` and ``cuda`` (the op
``modalimmune::lowrank_svd``, csrc/*/lowrank_svd.*).
"""

import torch

from .. import backend as _backends
from .. import checks
from . import _library

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


def complete_basis(Q, reliable, source):
    """Q (b, m, q) with its columns outside ``reliable`` (b, q; a prefix of each row) replaced by
    an orthonormal basis of part of the complement of the others (assumed orthonormal): the
    same columns of ``source`` (b, m, q), projected out of them, normalised and orthonormalised,
    three times (docs/ops/lowrank_svd.md, "Degenerate inputs": a shifted CholeskyQR3, for nearly
    dependent sources). A fully reliable Q comes back bit for bit."""
    keep = reliable.unsqueeze(-2).to(Q.dtype)
    Q = Q * keep
    X = source * (1 - keep)
    for _ in range(3):
        X = X - Q @ (Q.mT @ X)
        # unit columns: the shift of the step is relative to each of them, not to the longest
        X = X * X.square().sum(-2, keepdim=True).clamp_min(torch.finfo(X.dtype).tiny).rsqrt()
        X = _cholqr_step(X, X.mT @ X)  # the reliable columns of X stay exactly zero
    return Q + X


def orthonormal_prefix(Q, resolved):
    """(b, q) mask of the longest prefix of the ``resolved`` columns (a prefix) of Q (b, m, q) that
    is orthonormal: column j is while max_{i <= j} |(Q^T Q)_ij - delta_ij| <= 4 q eps
    (docs/ops/lowrank_svd.md, "Degenerate inputs")."""
    q = Q.shape[-1]
    deviation = (Q.mT @ Q - torch.eye(q, dtype=Q.dtype, device=Q.device)).abs().triu().amax(-2)
    return (resolved & (deviation <= 4 * q * torch.finfo(Q.dtype).eps)).cumprod(-1).bool()


def _finish_factor(Q, resolved, sketch):
    """Q (the Ritz vectors; its unresolved columns unused) with its columns from the first one outside
    :func:`orthonormal_prefix` on completed: from their own directions where resolved, else from ``sketch``."""
    return complete_basis(Q, orthonormal_prefix(Q, resolved), torch.where(resolved.unsqueeze(-2), Q, sketch))


def lowrank_svd_reference(A, omega, niter, products=_products_torch):
    """The algorithm on (b, n, d) A and (b, n, q) omega in A's dtype (float32/float64):
    all q triplets, as the ops return them.

    ``products(A, Z, mode)`` returns (Y, Y^T Y); the ``triton`` backend passes its kernels.
    """
    Z = orthonormalize(*products(A, omega, MODE_ATZ))
    for _ in range(niter):
        Z = orthonormalize(*products(A, Z, MODE_ATAZ))
    Y, G = products(A, Z, MODE_AZ)
    vals, vecs = sorted_eigh(G)
    W = vecs.to(A.dtype)
    S = vals.clamp_min(0).sqrt().to(A.dtype)
    # s_i <= eps s_1 is zero to working precision: no division by it; the columns of U and V of
    # those values, and of values whose vectors the Gram matrix left not orthonormal, complete the
    # bases (docs/ops/lowrank_svd.md, "Degenerate inputs"), from the sketch (its rows repeated for V)
    info = torch.finfo(A.dtype)
    resolved = S > info.eps * S[..., :1]
    inverse = torch.where(resolved, S.clamp_min(info.tiny).reciprocal(), 0)
    n, d = A.shape[-2:]
    U = _finish_factor((Y @ W) * inverse.unsqueeze(-2), resolved, omega)
    V = _finish_factor(Z @ W, resolved, omega[..., torch.arange(d, device=A.device) % n, :])
    return U, S, V


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


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: S alone is cheap


def _backward(ctx, gU, gS, gV):
    U, S, V = ctx.saved_tensors
    return svd_backward(U, S, V, gU, gS, gV), None, None


class _ReferenceSVD(torch.autograd.Function):
    """The ``torch`` backend with the ops' backward (not the derivative of its algorithm)."""

    @staticmethod
    def forward(A, omega, niter):
        return lowrank_svd_reference(A, omega, niter)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


def _fake(A, omega, niter):
    b, n, d = A.shape
    q = omega.shape[-1]
    return A.new_empty(b, n, q), A.new_empty(b, q), A.new_empty(b, d, q)


def _triton_kernel(A, omega, niter):
    from ..kernels import lowrank_svd as kernel

    return tuple(t.contiguous() for t in lowrank_svd_reference(A, omega, niter, kernel.products))


# A (b, n, d) and omega (b, n, q), both float32 or both float64, contiguous, q <= min(n, d):
# all q triplets, U (b, n, q), S (b, q) descending, V (b, d, q); differentiable (svd_backward)
SCHEMA = "(Tensor A, Tensor omega, int niter) -> (Tensor U, Tensor S, Tensor V)"
_AUTOGRAD = (_backward, _setup_context)
compiled_op = _library.define("lowrank_svd", SCHEMA, _fake, autograd=_AUTOGRAD)  # csrc/cpu/, csrc/cuda/
triton_op = _library.define("lowrank_svd_triton", SCHEMA, _fake, kernel=_triton_kernel, autograd=_AUTOGRAD)


def check_matrices(name, A, check_finite=True):
    """A as a (..., n, d) floating tensor with data (and finite, with ``check_finite``), else
    TypeError/ValueError naming ``name``."""
    if not isinstance(A, torch.Tensor):
        checks.fail(name, "a Tensor", type(A).__name__, TypeError)
    if A.dtype not in INPUT_DTYPES:
        checks.fail(name, "float32, float64, bfloat16 or float16", A.dtype, TypeError)
    if A.dim() < 2:
        checks.fail(name, "a tensor of shape (..., n, d) with at least 2 dims", f"shape {tuple(A.shape)}")
    if A.shape[-1] == 0 or A.shape[-2] == 0:
        checks.fail(name, "non-empty matrices", f"shape {tuple(A.shape)}")
    if A.device.type == "meta":
        checks.fail(name, "a tensor with data (the op reads its values)", "a meta tensor")
    # one extra read of A and a host sync; skipped inside torch.compile, where it would break the graph
    if check_finite and not torch.compiler.is_compiling() and not checks.all_finite(A):
        checks.fail(name, "finite values", "NaN or Inf")


def check_rank(name, k, A):
    """k as the number of triplets of A (an int, or a SymInt under torch.compile), 1 <= k <= min(n, d)."""
    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)):
        checks.fail(name, "an int", type(k).__name__, TypeError)
    limit = min(A.shape[-2], A.shape[-1])
    if not 1 <= k <= limit:
        checks.fail(name, f"1 <= {name} <= min(n, d) = {limit}", k)
    return k


def _nonnegative_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        checks.fail(name, "an int", type(value).__name__, TypeError)
    if value < 0:
        checks.fail(name, "an int >= 0", value)
    return value


def _draw(A, q, generator):
    """The (n, q) Gaussian draw of the sketch in A's dtype on A's device: with ``generator``
    on the generator's own device, else from the default generator of A's device."""
    if generator is None:
        return torch.randn((A.shape[-2], q), dtype=A.dtype, device=A.device)
    return torch.randn((A.shape[-2], q), generator=generator, dtype=A.dtype, device=generator.device).to(A.device)


# torch.compile cannot put a torch.Generator into a graph: there the draw is the op below, which
# finds the generator by a handle that _generator_handle gives it while the graph is traced
_GENERATORS = {}  # handle -> generator; kept alive, so that no other object takes its id


@torch.compiler.assume_constant_result
def _generator_handle(generator):
    """Run when torch.compile traces a call (the result is a constant of the graph, which
    guards on the generator object: another generator recompiles)."""
    _GENERATORS[id(generator)] = generator
    return id(generator)


def _fake_sketch(A, q, generator):
    return A.new_empty(A.shape[-2], q)


def _sketch_kernel(A, q, generator):
    return _draw(A, q, _GENERATORS[generator])


gaussian_sketch_op = _library.define("gaussian_sketch", "(Tensor A, SymInt q, int generator) -> Tensor", _fake_sketch,
                                     kernel=_sketch_kernel, tags=(torch.Tag.nondeterministic_seeded,))


def sketch(A, q, generator):
    """The Gaussian sketch Omega (..., n, q) in A's dtype: one n x q draw with ``generator`` (on its
    own device) shared by every matrix of the batch (docs/ops/lowrank_svd.md, "Sketch")."""
    if generator is not None and torch.compiler.is_compiling():
        omega = gaussian_sketch_op(A, q, _generator_handle(generator))
    else:
        omega = _draw(A, q, generator)
    return omega.expand(*A.shape[:-1], q)


def lowrank_svd(A, k, *, oversample=8, niter=2, generator=None, backend="auto"):
    """Top-k singular triplets of every matrix of the batch ``A`` (..., n, d).

    Args:
        A: float32/float64 (bfloat16/float16 are computed in float32); every leading dim is a batch.
        k: number of singular triplets, 1 <= k <= min(n, d).
        oversample: extra sketch columns p; q = min(k + p, n, d).
        niter: power iterations (passes A^T (A Z)).
        generator: torch.Generator of the sketch; the result is a function of A and its state
            (also under torch.compile, which keeps a reference to each generator it meets).
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"cuda"`` or ``"triton"``.

    Returns:
        (U (..., n, k), S (..., k) descending, V (..., d, k)) in A's dtype, differentiable.
        U and V have orthonormal columns also where A's rank is below k: the columns of
        singular values at or below eps * S[..., 0] (zero to working precision) are
        orthonormal completions drawn from the sketch, and columns that the Gram matrix
        resolves only to its precision are orthonormalised against the previous ones
        (to 4 q eps, q = min(k + oversample, n, d)).
    """
    check_matrices("A", A)
    return _lowrank_svd(A, k, oversample=oversample, niter=niter, generator=generator, backend=backend)


def _lowrank_svd(A, k, *, oversample, niter, generator, backend):
    """:func:`lowrank_svd` of a batch that :func:`check_matrices` accepted: the callers that
    checked it under their own name do not read it twice (a host sync each)."""
    check_rank("k", k, A)
    oversample = _nonnegative_int("oversample", oversample)
    niter = _nonnegative_int("niter", niter)
    if generator is not None and not isinstance(generator, torch.Generator):
        checks.fail("generator", "a torch.Generator or None", type(generator).__name__, TypeError)
    impl = _backends.resolve(backend, A.device, "lowrank_svd")
    *batch, n, d = A.shape
    q = min(k + oversample, n, d)
    work = A if A.dtype in COMPUTE_DTYPES else A.float()
    flat = work.reshape(-1, n, d).contiguous()
    omega = sketch(work, q, generator).reshape(-1, n, q).contiguous()
    # all q Ritz triplets: the backward needs them (docs/ops/lowrank_svd.md, "Backward")
    if impl == "torch":
        U, S, V = _ReferenceSVD.apply(flat, omega, niter)
    else:
        U, S, V = (triton_op if impl == "triton" else compiled_op)(flat, omega, niter)
    return (U[..., :k].reshape(*batch, n, k).to(A.dtype), S[..., :k].reshape(*batch, k).to(A.dtype),
            V[..., :k].reshape(*batch, d, k).to(A.dtype))
