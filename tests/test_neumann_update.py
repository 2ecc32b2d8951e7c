"""The fused Neumann update op against its float64 reference, on every backend; opcheck; autograd
safety; bad input (torch.compile: tests/test_compile.py)."""

import pytest
import torch

from modalimmune.ops import neumann_update as neumann_module
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


def test_opcheck(backend_device):
    """Schema, fake kernel, autograd registration and AOT dispatch of the op each backend runs."""
    backend, device = backend_device
    if backend == "torch":
        pytest.skip("the torch backend is no op")
    op = neumann_module.triton_op if backend == "triton" else neumann_module.compiled_op
    torch.library.opcheck(op, _opcheck_args(device))


@pytest.mark.parametrize("written", ["v", "p"])
def test_written_tensors_follow_autograd_rules(backend_device, written):
    """As for an in-place PyTorch op: a tensor the op writes may not require grad (nothing is
    written then), and a tensor saved for backward and written after is caught by backward."""
    backend, device = backend_device
    v, p, w = _state([(4,), (2, 3)], torch.float32, device)
    state = {"v": v, "p": p}
    state[written][1].requires_grad_()
    before = [t.detach().clone() for t in v + p]
    with pytest.raises(RuntimeError, match=rf"{written}\[1\]: expected a tensor that does not require grad"):
        neumann_update_(v, p, w, 0.5, backend=backend)
    assert all(torch.equal(a.detach(), b) for a, b in zip(v + p, before))
    with torch.no_grad():  # allowed there, as for PyTorch's in-place ops
        neumann_update_(v, p, w, 0.5, backend=backend)

    v, p, w = _state([(4,), (2, 3)], torch.float32, device)
    x = torch.randn(4, device=device, requires_grad=True)
    loss = (x * {"v": v, "p": p}[written][0]).sum()  # saves the tensor
    version = v[0]._version, p[0]._version
    neumann_update_(v, p, w, 0.5, backend=backend)
    assert (v[0]._version, p[0]._version) == (version[0] + 1, version[1] + 1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("case, match", [
    ("alpha", r"alpha: expected a 0-dim float64 tensor"),
    ("dtype", r"w\[1\]: expected Float, got Double"),
    ("length", r"p: expected 2 tensors like v, got 1"),
])
def test_compiled_op_checks_its_lists(backend_device, case, match):
    """Direct calls of the compiled op meet the one list check of its C++/CUDA kernels
    (csrc/multi_tensor.h), which names the list and the tensor."""
    backend, device = backend_device
    if backend not in ("cpp", "cuda"):
        pytest.skip("the check of the compiled kernels")
    v, p, w = _state([(4,), (3, 2)], torch.float32, device)
    alpha = torch.tensor(0.5, dtype=torch.float64, device=device)
    if case == "alpha":
        alpha = alpha.float()
    elif case == "dtype":
        w[1] = w[1].double()
    else:
        p = p[:1]
    with pytest.raises(RuntimeError, match=match):
        neumann_module.compiled_op(v, p, w, alpha, 0.0)
