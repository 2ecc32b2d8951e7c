"""The fused Neumann update op against its float64 reference, on every backend."""

import pytest
import torch

from modalimmune.ops import neumann_update_, neumann_update_reference

# odd sizes; 70001 crosses a 65536-element chunk
SHAPES = [(3, 5), (70001,), (1,), (17, 1, 3)]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _state(shapes, dtype, device):
    return [[torch.randn(s, dtype=dtype, device=device) for s in shapes] for _ in range(3)]


def _reference(v, p, w, alpha, damping):
    v64, p64, w64 = ([t.double().clone() for t in ts] for ts in (v, p, w))
    stats = neumann_update_reference(v64, p64, w64, torch.tensor(alpha, dtype=torch.float64, device=v[0].device),
                                     damping)
    return v64, p64, stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("damping", [0.0, 0.37])
def test_matches_reference(backend_device, dtype, damping):
    backend, device = backend_device
    v, p, w = _state(SHAPES, dtype, device)
    alpha = 0.3 + torch.rand(()).item()
    v_ref, p_ref, stats_ref = _reference(v, p, w, alpha, damping)
    stats = neumann_update_(v, p, w, torch.tensor(alpha, dtype=torch.float64, device=device),
                            damping=damping, backend=backend)
    for got, want in zip(v + p, v_ref + p_ref):
        torch.testing.assert_close(got.double(), want, **TOL[dtype])
    assert stats.dtype == torch.float64 and stats.shape == (2,)
    torch.testing.assert_close(stats, stats_ref, rtol=TOL[dtype]["rtol"] * 10, atol=1e-6)


def test_mixed_dtypes_and_float_alpha(backend_device):
    backend, device = backend_device
    v, p, w = _state([(5,), (4, 3)], torch.float64, device)
    for ts in (v, p, w):
        ts[1] = ts[1].float()
    v_ref, p_ref, stats_ref = _reference(v, p, w, 0.5, 0.1)
    stats = neumann_update_(v, p, w, 0.5, damping=0.1, backend=backend)
    for got, want in zip(v + p, v_ref + p_ref):
        torch.testing.assert_close(got.double(), want, **TOL[torch.float32])
    torch.testing.assert_close(stats, stats_ref, rtol=1e-5, atol=1e-6)


def test_residual_norm_and_rayleigh_quotient_meaning():
    """sq is ||v - alpha (w + d v)||^2 and dot is <v, w + d v> for the old v."""
    v, p, w = _state([(6,)], torch.float64, "cpu")
    old = v[0].clone()
    stats = neumann_update_(v, p, w, 0.25, damping=0.5, backend="torch")
    u = w[0] + 0.5 * old
    assert stats[1].item() == pytest.approx(torch.dot(old, u).item(), rel=1e-12)
    assert stats[0].item() == pytest.approx((old - 0.25 * u).square().sum().item(), rel=1e-12)


def test_empty_lists():
    assert neumann_update_([], [], [], 0.5).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("case, error, name", [
    ("shape", ValueError, "w[1]"),
    ("dtype", TypeError, "p[0]"),
    ("half", TypeError, "v[0]"),
    ("length", ValueError, "w:"),
    ("noncontiguous", ValueError, "p[1]"),
    ("alpha_shape", ValueError, "alpha"),
    ("alpha_inf", ValueError, "alpha"),
    ("damping", ValueError, "damping"),
    ("not_a_list", TypeError, "v:"),
])
def test_bad_input_names_argument_and_leaves_tensors(case, error, name):
    v, p, w = _state([(4,), (3, 2)], torch.float32, "cpu")
    alpha, damping = torch.tensor(0.5, dtype=torch.float64), 0.0
    if case == "shape":
        w[1] = torch.randn(2, 3)
    elif case == "dtype":
        p[0] = p[0].double()
    elif case == "half":
        v[0] = v[0].half()
    elif case == "length":
        w = w[:1]
    elif case == "noncontiguous":
        p[1] = torch.randn(2, 3).t()
    elif case == "alpha_shape":
        alpha = torch.ones(2)
    elif case == "alpha_inf":
        alpha = float("inf")
    elif case == "damping":
        damping = -1.0
    before = [t.clone() for t in v + p]
    with pytest.raises(error, match=name.replace("[", r"\[").replace("]", r"\]")):
        neumann_update_(v[0] if case == "not_a_list" else v, p, w, alpha, damping=damping)
    for got, want in zip(v + p, before):
        assert torch.equal(got, want)


def test_unavailable_backend_says_why():
    v, p, w = _state([(4,)], torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="cuda"):
        neumann_update_(v, p, w, 0.5, backend="cuda")


def _opcheck_args(device):
    v, p, w = _state([(5,), (3, 4)], torch.float32, device)
    return (v, p, w, torch.tensor(0.5, dtype=torch.float64, device=device), 0.25)


def test_opcheck_compiled(backend_device):
    backend, device = backend_device
    if backend not in ("cpp", "cuda"):
        pytest.skip("the compiled op serves the cpp and cuda backends")
    torch.library.opcheck(torch.ops.modalimmune.neumann_update.default, _opcheck_args(device))


@pytest.mark.triton
def test_opcheck_triton():
    from modalimmune.backend import unavailable_reason
    from modalimmune.ops.neumann_update import neumann_update_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if unavailable_reason("triton", device):
        pytest.skip(unavailable_reason("triton", device))
    torch.library.opcheck(neumann_update_triton, _opcheck_args(device))


def test_torch_compile_fullgraph(backend_device):
    backend, device = backend_device
    v, p, w = _state([(7,), (2, 3)], torch.float32, device)
    v_ref, p_ref, stats_ref = _reference(v, p, w, 0.5, 0.1)
    alpha = torch.tensor(0.5, dtype=torch.float64, device=device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(v, p, w, alpha):
        return neumann_update_(v, p, w, alpha, damping=0.1, backend=backend)

    stats = step(v, p, w, alpha)
    for got, want in zip(v + p, v_ref + p_ref):
        torch.testing.assert_close(got.double(), want, **TOL[torch.float32])
    torch.testing.assert_close(stats, stats_ref, rtol=1e-5, atol=1e-6)
