"""lowrank_svd: accuracy against torch.linalg.svd in float64, every backend against the
reference, autograd, degenerate inputs, opcheck, bad input (torch.compile: tests/test_compile.py)."""

import importlib

import pytest
import torch

from modalimmune import ops
from modalimmune.backend import unavailable_reason

lr = importlib.import_module("modalimmune.ops.lowrank_svd")

F64 = torch.float64
SPECTRA = {
    "harmonic": lambda r: 1.0 / torch.arange(1, r + 1, dtype=F64),
    "geometric": lambda r: 0.7 ** torch.arange(r, dtype=F64),
    "low_rank": lambda r: torch.cat([torch.linspace(3, 1, 6, dtype=F64), torch.zeros(r - 6, dtype=F64)]),
    "low_rank_noise": lambda r: torch.cat([torch.linspace(3, 1, 6, dtype=F64), torch.full((r - 6,), 1e-3, dtype=F64)]),
}


def random_orthonormal(*shape, dtype=torch.float64):
    return torch.linalg.qr(torch.randn(*shape, dtype=dtype))[0]


def with_spectrum(batch, n, d, spectrum):
    """Matrices U diag(spectrum) V^T with random singular vectors, float64."""
    r = min(n, d)
    U, V = random_orthonormal(*batch, n, r), random_orthonormal(*batch, d, r)
    return (U * spectrum) @ V.mT


def rel_err(S, exact):
    return ((S - exact).abs() / exact.clamp_min(1e-300)).amax(-1)


def principal_sines(basis, exact):
    """sin of the largest principal angle between span(basis) and span(exact) (orthonormal columns)."""
    return torch.linalg.matrix_norm(basis - exact @ (exact.mT @ basis), ord=2)


@pytest.mark.parametrize("name", sorted(SPECTRA))
@pytest.mark.parametrize("batch", [(5,), (2, 3)])
def test_accuracy_against_full_svd(name, batch, capsys):
    n, d, k, oversample, niter = 90, 60, 6, 8, 2
    A = with_spectrum(batch, n, d, SPECTRA[name](min(n, d)))
    U, S, V = ops.lowrank_svd(A, k, oversample=oversample, niter=niter, backend="torch")
    Uf, Sf, Vh = torch.linalg.svd(A, full_matrices=False)
    err = rel_err(S, Sf[..., :k])
    angle_v = principal_sines(V, Vh.mT[..., :k])
    angle_u = principal_sines(U, Uf[..., :k])
    _, St, _ = torch.svd_lowrank(A.reshape(-1, n, d), q=k + oversample, niter=niter)
    err_torch = rel_err(St[..., :k], Sf.reshape(-1, min(n, d))[..., :k])
    with capsys.disabled():
        print(f"\n{name} {batch}: max rel err of S {err.max():.2e} (svd_lowrank {err_torch.max():.2e}); "
              f"largest principal angle sin U {angle_u.max():.2e} V {angle_v.max():.2e}")
    assert err.mean() <= max(1e-3, 1.5 * err_torch.mean())
    eye = torch.eye(k, dtype=A.dtype)
    torch.testing.assert_close(V.mT @ V, eye.expand_as(V.mT @ V), atol=1e-10, rtol=0)
    torch.testing.assert_close(U.mT @ U, eye.expand_as(U.mT @ U), atol=1e-8, rtol=0)
    if name in ("geometric", "low_rank", "low_rank_noise"):  # a gap after k: the subspace is found
        assert angle_v.max() < 1e-4 and angle_u.max() < 1e-4


def test_rank_bounds_and_clamping():
    A = torch.randn(7, 5, dtype=torch.float64)
    U, S, V = ops.lowrank_svd(A, 5, oversample=100, backend="torch")  # q clamped to min(n, d): exact
    torch.testing.assert_close(S, torch.linalg.svdvals(A))
    assert U.shape == (7, 5) and S.shape == (5,) and V.shape == (5, 5)


BACKEND_SHAPES = [((3,), 37, 29, 4), ((2, 2), 20, 45, 3), ((), 64, 16, 8)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,n,d,k", BACKEND_SHAPES)
def test_backend_matches_reference(backend_device, dtype, batch, n, d, k):
    backend, device = backend_device
    spectrum = torch.cat([torch.linspace(10, 5, k, dtype=torch.float64), 0.5 ** torch.arange(1, min(n, d) - k + 1)])
    A = with_spectrum(batch, n, d, spectrum).to(device=device, dtype=dtype)
    seed = int(torch.randint(0, 2 ** 31, ()))
    U, S, V = ops.lowrank_svd(A, k, generator=torch.Generator(device).manual_seed(seed), backend=backend)
    Ur, Sr, Vr = ops.lowrank_svd(A, k, generator=torch.Generator(device).manual_seed(seed), backend="torch")
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(S, Sr, rtol=tol, atol=tol)
    # separated spectrum: the vectors agree, sign convention included
    torch.testing.assert_close(U, Ur, rtol=0, atol=50 * tol)
    torch.testing.assert_close(V, Vr, rtol=0, atol=50 * tol)
    exact = torch.linalg.svdvals(A.double())[..., :k]
    torch.testing.assert_close(S.double(), exact, rtol=tol, atol=tol)
    assert S.dtype == dtype and U.device.type == device


def test_same_generator_state_same_result(backend_device):
    backend, device = backend_device
    A = torch.randn(3, 30, 20, device=device)
    first = ops.lowrank_svd(A, 4, generator=torch.Generator(device).manual_seed(7), backend=backend)
    second = ops.lowrank_svd(A, 4, generator=torch.Generator(device).manual_seed(7), backend=backend)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_half_inputs_computed_in_float32():
    # a decaying spectrum: the top 3 are found to well within bf16's rounding (a flat one, as
    # torch.randn gives, left the randomised third value 2-5 % off in about 1 draw in 30)
    A = with_spectrum((4,), 40, 24, 0.7 ** torch.arange(24, dtype=torch.float64)).bfloat16()
    seed = int(torch.randint(0, 2 ** 31, ()))
    U, S, V = ops.lowrank_svd(A, 3, generator=torch.Generator().manual_seed(seed), backend="torch")
    assert S.dtype == torch.bfloat16
    _, S32, _ = ops.lowrank_svd(A.float(), 3, generator=torch.Generator().manual_seed(seed), backend="torch")
    assert torch.equal(S, S32.bfloat16())  # the float32 computation on the same input, rounded once
    exact = torch.linalg.svdvals(A.double())[..., :3]
    torch.testing.assert_close(S.double(), exact, rtol=2e-2, atol=0)


def _exact_rank(n, d):
    """A random (n, d) float64 matrix with a well separated spectrum."""
    r = min(n, d)
    return with_spectrum((), n, d, torch.linspace(4, 1, r, dtype=torch.float64)).requires_grad_()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck(backend):
    if unavailable_reason(backend, "cpu"):
        pytest.skip(unavailable_reason(backend, "cpu"))
    seed = int(torch.randint(0, 2 ** 31, ()))
    # q = min(n, d): the subspace is exact, so finite differences see the true SVD
    for n, d, k in [(7, 5, 3), (4, 6, 2)]:
        A = _exact_rank(n, d)
        generator = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
        call = lambda a, out, k=k: ops.lowrank_svd(a, k, generator=generator(), backend=backend)[out]  # noqa: E731
        assert torch.autograd.gradcheck(lambda a: call(a, 1), (A,))
        # vectors up to sign: weight each by a sign-invariant function
        assert torch.autograd.gradcheck(lambda a: (call(a, 0) * call(a, 2).sum(-2, keepdim=True).sign()), (A,))
        assert torch.autograd.gradcheck(lambda a: call(a, 0) @ call(a, 2).mT, (A,))


@pytest.mark.parametrize("case", ["zero", "rank_one", "repeated", "two_by_two", "three_by_two"])
def test_degenerate_inputs_are_finite(backend_device, case):
    backend, device = backend_device
    make = {
        "zero": lambda: torch.zeros(2, 8, 6),
        "rank_one": lambda: torch.randn(2, 8, 1) @ torch.randn(2, 1, 6),
        "repeated": lambda: with_spectrum((2,), 8, 6, torch.ones(6, dtype=torch.float64)).float(),
        "two_by_two": lambda: torch.randn(2, 2, 2),
        "three_by_two": lambda: torch.randn(2, 3, 2),
    }
    A = make[case]().to(device).requires_grad_()
    k = min(A.shape[-2:])
    U, S, V = ops.lowrank_svd(A, k, backend=backend)
    (U.sum() + S.sum() + V.sum()).backward()
    for t in (U, S, V, A.grad):
        assert torch.isfinite(t).all()
    # a Gram-based float32 value is resolved to ~sqrt(eps) s_1 absolute (a random 2x2 may have s_2 ~ 1e-5)
    exact = torch.linalg.svdvals(A.detach().double().cpu())
    torch.testing.assert_close(S.double().cpu(), exact, rtol=1e-4, atol=1e-3 * float(exact.max()) + 1e-6)


def assert_orthonormal(X, tol):
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    torch.testing.assert_close(X.mT @ X, eye.expand(*X.shape[:-2], -1, -1), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["zero", "k_above_rank", "square_rank_deficient", "rank_one_wide"])
def test_rank_deficient_factors_are_orthonormal(backend_device, dtype, case):
    """U and V keep orthonormal columns when k exceeds the rank (as LAPACK's and
    torch.svd_lowrank's do): U's columns of zero singular values complete the basis, orthogonal
    to the resolved ones, and A = U diag(S) V^T still holds (docs/ops/lowrank_svd.md)."""
    backend, device = backend_device
    n, d, rank, k = {"zero": (9, 7, 0, 5), "k_above_rank": (13, 10, 2, 6), "square_rank_deficient": (6, 6, 3, 6),
                     "rank_one_wide": (5, 11, 1, 5)}[case]
    A = (torch.randn(3, n, rank, dtype=torch.float64) @ torch.randn(3, rank, d, dtype=torch.float64)).to(device, dtype)
    U, S, V = ops.lowrank_svd(A, k, backend=backend)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_orthonormal(U, tol)
    assert_orthonormal(V, tol)
    assert (S[..., rank:] <= torch.finfo(dtype).eps ** 0.5 * S[..., :1]).all()
    scale = float(A.abs().max()) + 1
    torch.testing.assert_close(U @ torch.diag_embed(S) @ V.mT, A, atol=10 * tol * scale, rtol=0)


GRAM_LIMITED = {  # (dtype, maker, orthonormality tolerance, rank deficient); 16 x 16, k = q = 16
    # rank 3 plus a rank-5 part below sqrt(eps) s_1: values at or below eps s_1 and values resolved
    # only to the Gram matrix's precision, whose Ritz vectors are not orthonormal
    "float32": (torch.float32, lambda: (torch.randn(8, 16, 3) @ torch.randn(8, 3, 16)
                                        + 1e-4 * torch.randn(8, 16, 5) @ torch.randn(8, 5, 16)), 1e-5, True),
    "float64": (torch.float64, lambda: (torch.randn(8, 16, 3, dtype=F64) @ torch.randn(8, 3, 16, dtype=F64)
                                        + 1e-8 * torch.randn(8, 16, 5, dtype=F64) @ torch.randn(8, 5, 16, dtype=F64)),
                1e-12, True),
    # full rank, but the power iteration's panel is beyond CholeskyQR2: Z (so Z W) loses a direction
    "square": (torch.float32, lambda: torch.randn(8, 16, 16), 1e-5, False),
    "geometric": (torch.float32, lambda: with_spectrum((8,), 16, 16, 0.5 ** torch.arange(16, dtype=F64)).float(),
                  1e-5, False),
}


@pytest.mark.parametrize("case", sorted(GRAM_LIMITED))
def test_gram_limited_spectra_give_orthonormal_factors(backend_device, case):
    """U and V orthonormal to working precision where the Gram matrix cannot resolve the trailing
    values: the columns of values at or below eps s_1 and those from the first Ritz vector that is not
    orthonormal to the previous ones on complete the bases, orthogonal to the others (no division by
    those values); S is the Gram matrix's, the backward and the effective rank's gradient finite
    (docs/ops/lowrank_svd.md, "Degenerate inputs")."""
    backend, device = backend_device
    dtype, make, tol, rank_deficient = GRAM_LIMITED[case]
    A = make().to(device).requires_grad_()
    U, S, V = ops.lowrank_svd(A, 16, backend=backend)
    assert_orthonormal(U.detach(), tol)
    assert_orthonormal(V.detach(), tol)
    eps = torch.finfo(dtype).eps
    assert (S <= eps * S[..., :1]).any() or not rank_deficient
    for Ub, Vb, Sb in zip(U.detach(), V.detach(), S.detach()):
        zero = Sb <= eps * Sb[0]
        for X in (Ub, Vb):  # the completion of the unresolved values is orthogonal to the other columns
            assert ((X[:, ~zero].mT @ X[:, zero]).abs() <= tol).all()
    # S is the Gram matrix's: its values to ~sqrt(eps) s_1 absolute
    exact = torch.linalg.svdvals(A.detach().double().cpu())
    torch.testing.assert_close(S.detach().double().cpu(), exact, rtol=1e-4, atol=1e-3 * float(exact.max()))
    (U.sum() + S.sum() + V.sum()).backward()
    assert torch.isfinite(A.grad).all()
    H = A.detach().clone().requires_grad_()
    ops.effective_rank(H, k=16, backend=backend).sum().backward()
    assert torch.isfinite(H.grad).all()


def test_orthonormal_ritz_vectors_are_returned_as_computed(monkeypatch):
    """Where every Ritz vector is orthonormal to 4 q eps (a well-conditioned input), no column is
    completed and the factors come back bit for bit as Y W / S and Z W (docs/ops/lowrank_svd.md)."""
    calls, original = [], lr.complete_basis

    def complete_basis(Q, reliable, source):
        out = original(Q, reliable, source)
        calls.append(bool(reliable.all()) and torch.equal(out, Q))
        return out

    monkeypatch.setattr(lr, "complete_basis", complete_basis)
    for dtype in (torch.float32, torch.float64):
        ops.lowrank_svd(torch.randn(4, 64, 32, dtype=dtype), 16, backend="torch")
    assert calls == [True] * 4


def test_svd_backward_matches_autograd_of_full_svd():
    A = _exact_rank(9, 6)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    V = Vh.mT
    for which in range(3):
        grads = [torch.zeros_like(U), torch.zeros_like(S), torch.zeros_like(V)]
        grads[which] = torch.randn_like(grads[which])
        grads[which][..., 4:] = 0  # as a top-4 result sees it
        loss = sum((out * g).sum() for out, g in zip((U, S, V), grads))
        (expected,) = torch.autograd.grad(loss, A, retain_graph=True)
        torch.testing.assert_close(lr.svd_backward(U.detach(), S.detach(), V.detach(), *grads), expected)


def test_opcheck(backend_device):
    """Schema, fake kernel, autograd (the registered backward) and AOT dispatch of the op each
    backend runs."""
    backend, device = backend_device
    if backend == "torch":
        pytest.skip("the torch backend is no op")
    op = lr.triton_op if backend == "triton" else lr.compiled_op
    A = torch.randn(2, 12, 9, dtype=torch.float64, device=device, requires_grad=True)
    omega = torch.randn(2, 12, 6, dtype=torch.float64, device=device)
    torch.library.opcheck(op, (A, omega, 1))


def test_opcheck_gaussian_sketch():
    """The sketch op of compiled code draws from a generator: its value changes from call to call,
    so the AOT-dispatch checks, which compare two calls, do not apply."""
    generator = torch.Generator().manual_seed(0)
    handle = lr._generator_handle(generator)
    torch.library.opcheck(lr.gaussian_sketch_op, (torch.randn(2, 7, 5), 3, handle),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    generator.manual_seed(0)
    first = lr.gaussian_sketch_op(torch.randn(7, 5), 3, handle)
    assert torch.equal(first, torch.randn((7, 3), generator=torch.Generator().manual_seed(0)))


def test_meta_tensor_is_refused_by_name():
    with pytest.raises(ValueError, match="A: expected a tensor with data"):
        ops.lowrank_svd(torch.empty(3, 6, 4, device="meta"), 2)


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((torch.randn(5, 4), 5), {}, ValueError, "k: expected 1 <= k <= min"),
    ((torch.randn(5, 4), 0), {}, ValueError, "k: expected 1 <= k"),
    ((torch.randn(5), 1), {}, ValueError, "A: expected a tensor of shape"),
    ((torch.ones(5, 4, dtype=torch.int64), 1), {}, TypeError, "A: expected float32"),
    ((torch.randn(5, 4), 2.0), {}, TypeError, "k: expected an int"),
    ((torch.randn(5, 4), 2), {"niter": -1}, ValueError, "niter: expected an int >= 0"),
    ((torch.randn(5, 4), 2), {"oversample": -3}, ValueError, "oversample"),
    ((torch.randn(5, 4), 2), {"backend": "nope"}, ValueError, "backend"),
    (([[1.0]], 1), {}, TypeError, "A: expected a Tensor"),
])
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        ops.lowrank_svd(*args, **kwargs)
