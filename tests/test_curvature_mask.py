"""curvature_mask_ on every backend against the float64 reference; opcheck; autograd safety; bad input
(torch.compile: tests/test_compile.py)."""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modalimmune import ops
from modalimmune.ops import curvature_mask as cm

SHAPES = [(1,), (3,), (1023,), (4097,), (31, 33), (3, 5, 7)]
# bf16/fp16 outputs are rounded once from the fp32 result: half an ulp of the output dtype
GRAD_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}


def make_inputs(dtype, device, shapes=SHAPES):
    """Gradients of both signs, curvature spread over many octaves (so tau cuts it)."""
    gc = [torch.randn(s, device=device).to(dtype) for s in shapes]
    gd = [torch.randn(s, device=device).to(dtype) for s in shapes]
    d = [torch.randn(s, device=device) * torch.exp2(torch.randn(s, device=device) * 8) for s in shapes]
    probe = [torch.randn(s, device=device) * 4 for s in shapes]
    return gc, gd, d, probe


def reference64(gc, gd, d, probe, beta, tau, soft):
    up = lambda ts: [t.detach().double().cpu() for t in ts]  # noqa: E731
    gc64, d64 = up(gc), up(d)
    # float32 rounding of the EMA is relative to its terms, not to its (possibly cancelled) sum
    d_scale = [beta * a.abs() + (1 - beta) * b.abs() for a, b in zip(d64, up(probe))] if probe else d64
    stats, hist = cm.curvature_mask_reference(gc64, up(gd), d64, up(probe) if probe else None, beta, tau, soft)
    return gc64, d64, d_scale, stats, hist


def assert_matches(gc, d, stats, gc64, d64, d_scale, ref_stats, ref_hist, dtype):
    for out, ref, scale in zip(d, d64, d_scale):
        assert bool(((out.double().cpu() - ref).abs() <= 4 * 2 ** -24 * scale.abs()).all())
    for out, ref in zip(gc, gc64):
        tol = GRAD_RTOL[dtype]
        torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    numel = sum(t.numel() for t in gc)
    assert stats.masked_fraction.item() * numel == pytest.approx(ref_stats[0].item(), abs=1e-6)
    assert stats.destr_norm.item() == pytest.approx(math.sqrt(ref_stats[1]), rel=1e-5)
    assert stats.kept_norm.item() == pytest.approx(math.sqrt(ref_stats[2]), rel=1e-5)
    # the histogram is of the D the op wrote (checked against the reference above): bin for bin
    # from those values; against the float64 D only up to the values that rounding moved across a
    # bin edge (each moves one count between two bins)
    own_hist = torch.zeros_like(ref_hist)
    for out in d:
        own_hist.index_add_(0, cm.hist_bins(out.cpu()).flatten().long(), torch.ones(out.numel(), dtype=torch.int64))
    assert torch.equal(stats.log_abs_hist.cpu(), own_hist)
    moved = sum(int((cm.hist_bins(out.cpu()) != cm.hist_bins(ref)).sum()) for out, ref in zip(d, d64))
    assert moved <= 2 and int((own_hist - ref_hist).abs().sum()) <= 2 * moved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("with_probe", [False, True])
def test_matches_reference(backend_device, dtype, mode, with_probe):
    backend, device = backend_device
    gc, gd, d, probe = make_inputs(dtype, device)
    probe = probe if with_probe else None
    tau = float(torch.cat([t.abs().flatten() for t in d]).median())
    expected = reference64(gc, gd, d, probe, 0.9, tau, mode == "soft")
    stats = ops.curvature_mask_(gc, gd, d, probe, beta=0.9, tau=tau, mode=mode, backend=backend)
    assert 0.1 < stats.masked_fraction.item() < 0.4  # both branches of the rule are exercised
    assert_matches(gc, d, stats, *expected, dtype)


def test_many_tensors_and_mixed_dtypes(backend_device):
    """More tensors than one CUDA pointer table holds, with two gradient dtypes."""
    backend, device = backend_device
    shapes = [(int(n),) for n in torch.randint(1, 300, (130,))]
    gc, gd, d, probe = make_inputs(torch.float32, device, shapes)
    for i in range(0, len(shapes), 3):
        gc[i], gd[i] = gc[i].bfloat16(), gd[i].bfloat16()
    expected = reference64(gc, gd, d, probe, 0.5, 1.0, False)
    stats = ops.curvature_mask_(gc, gd, d, probe, beta=0.5, tau=1.0, backend=backend)
    assert_matches(gc, d, stats, *expected, torch.bfloat16)


def test_agreement_rules_exact(backend_device):
    """Zeros count as agreement; flat coordinates pass; blocked ones get 0 or tau/|D|."""
    backend, device = backend_device
    gc = torch.tensor([1.0, -2.0, 0.0, 3.0, -1.0, 2.0, 2.0], device=device)
    gd = torch.tensor([2.0, 1.0, -5.0, 0.0, 4.0, -4.0, -1.0], device=device)
    d = torch.tensor([9.0, 9.0, 9.0, 9.0, 0.5, 8.0, -4.0], device=device)
    hard, soft = gc.clone(), gc.clone()
    ops.curvature_mask_([hard], [gd], [d.clone()], tau=1.0, mode="hard", backend=backend)
    ops.curvature_mask_([soft], [gd], [d.clone()], tau=1.0, mode="soft", backend=backend)
    expect_hard = torch.tensor([3.0, -2.0, -5.0, 3.0, 3.0, 2.0, 2.0])
    expect_soft = torch.tensor([3.0, -2.0 + 1.0 / 9, -5.0, 3.0, 3.0, 2.0 - 4.0 / 8, 2.0 - 1.0 / 4])
    torch.testing.assert_close(hard.cpu(), expect_hard)
    torch.testing.assert_close(soft.cpu(), expect_soft)


@settings(max_examples=40, deadline=None)
@given(tau=st.floats(0, 1e3), low=st.floats(0, 1e3), beta=st.floats(0, 0.999))
def test_mask_laws(tau, low, beta):
    """Laws of the rule: kept energy never exceeds the destructive energy, the
    soft mask passes at least what the hard one does, and a tau above every
    |D| masks nothing."""
    gc, gd, d, probe = make_inputs(torch.float32, "cpu", [(257,)])
    d[0].clamp_(min=-low, max=low)
    hard_out, soft_out = gc[0].clone(), gc[0].clone()
    hard = ops.curvature_mask_([hard_out], gd, [d[0].clone()], probe, beta=beta, tau=tau, mode="hard", backend="torch")
    soft = ops.curvature_mask_([soft_out], gd, [d[0].clone()], probe, beta=beta, tau=tau, mode="soft", backend="torch")
    assert hard.kept_norm <= hard.destr_norm * (1 + 1e-6)
    assert soft.kept_norm >= hard.kept_norm * (1 - 1e-6)
    assert hard.masked_fraction == soft.masked_fraction
    assert int(hard.log_abs_hist.sum()) == 257
    none = ops.curvature_mask_([gc[0].clone()], gd, [d[0].clone()], tau=low + 1.0, backend="torch")
    assert none.masked_fraction.item() == 0.0


def test_hist_edges_and_quantile():
    edges = ops.hist_edges()
    assert len(edges) == cm.HIST_BINS + 1 and bool((edges[1:] > edges[:-1]).all())
    values = torch.exp2(torch.rand(10_000) * 40 - 20)
    hist = torch.bincount(cm.hist_bins(values).flatten(), minlength=cm.HIST_BINS)
    for b in torch.randint(0, cm.HIST_BINS, (50,)).tolist():  # every value lies inside its bin
        inside = values[cm.hist_bins(values) == b]
        assert bool(((inside >= edges[b]) & (inside < edges[b + 1])).all())
    for q in (0.1, 0.5, 0.9):
        tau = ops.quantile_from_hist(hist, q)
        # the smallest value with a fraction q at or below it (no interpolation towards the next one,
        # which may lie in the next bin when q * numel values fill the bins up to tau exactly)
        exact = torch.quantile(values.double(), q, interpolation="lower").item()
        assert exact <= tau <= exact * 2 ** 0.25 * 1.26  # within one bin above the exact quantile
        assert int((values <= tau).sum()) >= q * values.numel()


def test_empty_lists_and_empty_tensors(backend_device):
    backend, device = backend_device
    stats = ops.curvature_mask_([], [], [], tau=1.0, backend="torch")
    assert stats.masked_fraction.item() == 0.0 and int(stats.log_abs_hist.sum()) == 0
    empty = torch.empty(0, device=device)
    stats = ops.curvature_mask_([empty], [empty.clone()], [empty.clone()], tau=1.0, backend=backend)
    assert int(stats.log_abs_hist.sum()) == 0


def _set(position, index, make):
    def mutate(args):
        args[position][index] = make()
    return mutate


def _truncate(args):
    args[1] = args[1][:1]


def _unwrap(args):
    args[0] = args[0][0]


# (case, mutation of (grads_clean, grads_destr, curvature, probe), keyword overrides, error, argument named)
BAD_INPUT = [
    ("lengths", _truncate, {}, ValueError, "grads_destr"),
    ("shape", _set(1, 1, lambda: torch.randn(3, 2)), {}, ValueError, "grads_destr[1]"),
    ("int-dtype", _set(0, 0, lambda: torch.ones(5, dtype=torch.int32)), {}, TypeError, "grads_clean[0]"),
    ("curvature-dtype", _set(2, 0, lambda: torch.randn(5).half()), {}, TypeError, "curvature[0]"),
    ("grad-dtypes-differ", _set(1, 0, lambda: torch.randn(5).bfloat16()), {}, TypeError, "grads_destr[0]"),
    ("non-contiguous", _set(0, 1, lambda: torch.randn(3, 2).t()), {}, ValueError, "grads_clean[1]"),
    ("probe-shape", _set(3, 0, lambda: torch.randn(6)), {}, ValueError, "probe[0]"),
    ("not-a-list", _unwrap, {}, TypeError, "grads_clean"),
    ("tau-negative", None, {"tau": -1.0}, ValueError, "tau"),
    ("tau-nan", None, {"tau": float("nan")}, ValueError, "tau"),
    ("tau-inf", None, {"tau": float("inf")}, ValueError, "tau"),
    ("beta-one", None, {"beta": 1.0}, ValueError, "beta"),
    ("beta-negative", None, {"beta": -0.1}, ValueError, "beta"),
    ("mode", None, {"mode": "medium"}, ValueError, "mode"),
    ("backend", None, {"backend": "fortran"}, ValueError, "backend"),
]


@pytest.mark.parametrize("mutate,overrides,error,argument", [pytest.param(*c[1:], id=c[0]) for c in BAD_INPUT])
def test_bad_input_names_argument_and_writes_nothing(mutate, overrides, error, argument):
    args = list(make_inputs(torch.float32, "cpu", [(5,), (2, 3)]))
    if mutate:
        mutate(args)
    as_list = lambda a: a if isinstance(a, list) else [a]  # noqa: E731
    snapshot = [[t.clone() for t in as_list(a)] for a in args]
    kwargs = dict(beta=0.9, tau=0.5, mode="hard", backend="cpp") | overrides
    with pytest.raises(error, match=re.escape(argument) + ":"):
        ops.curvature_mask_(*args, **kwargs)
    for before, after in zip(snapshot, args):
        assert all(torch.equal(b, a) for b, a in zip(before, as_list(after)))


def test_explicit_backend_that_cannot_serve_says_why():
    gc, gd, d, _ = make_inputs(torch.float32, "cpu", [(4,)])
    with pytest.raises(RuntimeError, match="cuda"):
        ops.curvature_mask_(gc, gd, d, tau=1.0, backend="cuda")


@pytest.mark.parametrize("with_probe", [False, True])
def test_opcheck(backend_device, with_probe):
    """Schema, fake kernel, autograd registration and AOT dispatch of the op each backend runs."""
    backend, device = backend_device
    if backend == "torch":
        pytest.skip("the torch backend is no op")
    op = cm.triton_op if backend == "triton" else cm.compiled_op
    gc, gd, d, probe = make_inputs(torch.float32, device, [(7,), (3, 4)])
    gc[1], gd[1] = gc[1].bfloat16(), gd[1].bfloat16()
    torch.library.opcheck(op, (gc, gd, d, probe if with_probe else None, 0.9, 0.5, False))


@pytest.mark.parametrize("written", ["grads_clean", "curvature"])
def test_written_tensors_follow_autograd_rules(backend_device, written):
    """As for an in-place PyTorch op: a tensor the op writes may not require grad (nothing is
    written then), and a tensor saved for backward and written after is caught by backward."""
    backend, device = backend_device
    gc, gd, d, probe = make_inputs(torch.float32, device, [(5,), (2, 3)])
    {"grads_clean": gc, "curvature": d}[written][1].requires_grad_()
    before = [t.detach().clone() for t in gc + d]
    with pytest.raises(RuntimeError, match=rf"{written}\[1\]: expected a tensor that does not require grad"):
        ops.curvature_mask_(gc, gd, d, probe, beta=0.9, tau=0.5, backend=backend)
    assert all(torch.equal(a.detach(), b) for a, b in zip(gc + d, before))
    with torch.no_grad():  # allowed there, as for PyTorch's in-place ops
        ops.curvature_mask_(gc, gd, d, probe, beta=0.9, tau=0.5, backend=backend)

    gc, gd, d, probe = make_inputs(torch.float32, device, [(5,), (2, 3)])
    x = torch.randn(5, device=device, requires_grad=True)
    loss = (x * {"grads_clean": gc, "curvature": d}[written][0]).sum()  # saves the tensor
    version = gc[0]._version, d[0]._version
    ops.curvature_mask_(gc, gd, d, probe, beta=0.9, tau=0.5, backend=backend)
    assert gc[0]._version > version[0] and d[0]._version > version[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("case, match", [
    ("length", r"probe: expected 2 tensors like grads_clean, got 1"),
    ("numel", r"grads_destr\[1\]: expected 6 elements like grads_clean\[1\], got 7"),
    ("dtype", r"curvature\[0\]: expected Float, got Half"),
    ("strided", r"grads_clean\[1\]: expected a contiguous tensor"),
])
def test_compiled_op_checks_its_lists(backend_device, case, match):
    """Direct calls of the compiled op meet the one list check of its C++/CUDA kernels
    (csrc/multi_tensor.h), which names the list and the tensor."""
    backend, device = backend_device
    if backend not in ("cpp", "cuda"):
        pytest.skip("the check of the compiled kernels")
    gc, gd, d, probe = make_inputs(torch.float32, device, [(5,), (2, 3)])
    if case == "length":
        probe = probe[:1]
    elif case == "numel":
        gd[1] = torch.randn(7, device=device)
    elif case == "dtype":
        d[0] = d[0].half()
    else:
        gc[1] = torch.randn(3, 2, device=device).t()
    with pytest.raises(RuntimeError, match=match):
        cm.compiled_op(gc, gd, d, probe, 0.9, 0.5, False)
