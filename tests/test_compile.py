"""Every op under torch.compile(fullgraph=True) on every backend: a second input shape (a
smaller last batch, another sequence length), which turns automatic dynamic shapes on,
dynamic=True from the start, a generator for the sketch, and one inductor build. Each
compiled result is checked against the eager call on the same input and sketch."""

import pytest
import torch

from modalimmune import ops

# (batch, n, d) of successive calls: under automatic dynamic shapes the second (a smaller last batch)
# recompiles with the batch dynamic, the third (another sequence length) with n dynamic too
SHAPES = [(6, 12, 8), (4, 12, 8), (6, 9, 8)]


def _seeded(fn, *args):
    """fn(*args) with the default generator, which draws the sketch, in the same state each time."""
    torch.manual_seed(7)
    return fn(*args)


def _svd(x, backend):
    U, S, V = ops.lowrank_svd(x, 3, backend=backend)
    return U @ torch.diag_embed(S) @ V.mT, S


MATRIX_OPS = {
    "lowrank_svd": _svd,
    "effective_rank": lambda x, backend: ops.effective_rank(x, k=4, backend=backend),
    "spectral_collapse": lambda x, backend: ops.spectral_collapse(x, 0.5, k=3, backend=backend),
    "spectral_collapse_per_matrix": lambda x, backend: ops.spectral_collapse(
        x, torch.linspace(0.1, 0.9, x.shape[0], dtype=x.dtype), k=3, backend=backend),
}


def _compile(fn, dynamic, compiler="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=compiler)


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
@pytest.mark.parametrize("name", sorted(MATRIX_OPS))
def test_matrix_ops_trace_with_changing_shapes(backend_device, name, dynamic):
    backend, device = backend_device
    fn = MATRIX_OPS[name]
    compiled = _compile(fn, dynamic)
    for b, n, d in SHAPES if dynamic is None else SHAPES[:2]:
        x = (torch.randn(b, n, d, dtype=torch.float64) * torch.linspace(3, 0.5, d, dtype=torch.float64)).to(device)
        torch.testing.assert_close(_seeded(compiled, x, backend), _seeded(fn, x, backend), rtol=1e-10, atol=1e-10)


def test_lowrank_svd_with_a_generator(backend_device):
    """The compiled graph draws from the generator object it is given, as eager does: the same
    state gives the same result, the state advances, another generator is used (recompiled)."""
    backend, device = backend_device

    def top(x, generator):
        return ops.lowrank_svd(x, 3, generator=generator, backend=backend)[1]

    compiled = _compile(top, None)
    x = torch.randn(5, 11, 7, dtype=torch.float64, device=device)
    g = torch.Generator(device).manual_seed(3)
    first, second = compiled(x, g), compiled(x, g)
    g.manual_seed(3)
    assert torch.equal(first, top(x, g)) and torch.equal(second, top(x, g))
    other = torch.Generator(device).manual_seed(3)
    assert torch.equal(compiled(x, other), first)
    smaller = x[:3, :9]
    g.manual_seed(4)
    expected = top(smaller, g)
    g.manual_seed(4)
    assert torch.equal(compiled(smaller, g), expected)


def _multi_tensor_inputs(numels, device):
    return ([torch.randn(n, device=device) for n in numels] for _ in range(4))


def _compiled_in_place_matches_eager(step, dynamic, inputs, written):
    """``step`` compiled gives the eager outputs and writes the same values into the tensor lists at
    positions ``written`` of ``inputs(numels)``, over three sets of list lengths (a second shape)."""
    compiled = _compile(step, dynamic)
    for numels in [(9, 20), (7, 20), (7, 33)]:
        args = inputs(numels)
        eager = [[t.clone() for t in a] if i in written else a for i, a in enumerate(args)]
        expected = step(*eager)
        torch.testing.assert_close(compiled(*args), expected)
        torch.testing.assert_close([t for i in written for t in args[i]], [t for i in written for t in eager[i]])


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
def test_curvature_mask_traces_with_changing_shapes(backend_device, dynamic):
    backend, device = backend_device

    def step(gc, gd, d, probe):
        stats = ops.curvature_mask_(gc, gd, d, probe, beta=0.9, tau=0.5, backend=backend)
        return stats.masked_fraction, stats.kept_norm, stats.log_abs_hist

    _compiled_in_place_matches_eager(step, dynamic, lambda n: list(_multi_tensor_inputs(n, device)), written=(0, 2))


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
def test_neumann_update_traces_with_changing_shapes(backend_device, dynamic):
    backend, device = backend_device

    def step(v, p, w, alpha):
        return ops.neumann_update_(v, p, w, alpha, damping=0.1, backend=backend)

    alpha = torch.tensor(0.4, dtype=torch.float64, device=device)
    _compiled_in_place_matches_eager(step, dynamic, lambda n: [*list(_multi_tensor_inputs(n, device))[:3], alpha],
                                     written=(0, 1))


@pytest.mark.slow
def test_inductor_builds_the_effective_rank_with_dynamic_shapes(monkeypatch):
    """One inductor build (C++ codegen on the CPU): the op is an extern call in generated code.
    fallback_random: the sketch from the eager generator, so that the results compare."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    backend = "cpp" if __import__("modalimmune").backends()["cpp"] else "torch"
    fn = MATRIX_OPS["effective_rank"]
    compiled = _compile(fn, None, compiler="inductor")
    for b, n, d in SHAPES[:2]:
        x = torch.randn(b, n, d)
        torch.testing.assert_close(_seeded(compiled, x, backend), _seeded(fn, x, backend), rtol=1e-5, atol=1e-5)
