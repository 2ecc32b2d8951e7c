import os

import torch

# Without a GPU the Triton kernels run through the interpreter; this must be set
# before any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import modalimmune  # noqa: E402
from modalimmune.backend import unavailable_reason  # noqa: E402


def backend_params(device="cpu"):
    """pytest params for every backend on ``device``; unusable ones skip with the reason."""
    names = ("torch", "cpp", "triton") if device == "cpu" else ("torch", "cuda", "triton")
    params = []
    for name in names:
        why = None if device != "cuda" or torch.cuda.is_available() else "no GPU visible"
        why = why or unavailable_reason(name, device)
        marks = [pytest.mark.triton] if name == "triton" else []
        marks += [pytest.mark.cuda] if device == "cuda" else []
        if why:
            marks.append(pytest.mark.skip(reason=f"{name} on {device}: {why}"))
        params.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return params


ALL_BACKENDS = backend_params("cpu") + backend_params("cuda")


@pytest.fixture(params=ALL_BACKENDS)
def backend_device(request):
    """(backend, device) for each backend that can run here."""
    return request.param


# Fresh random inputs on every run; MODALIMMUNE_TEST_SEED=N replays a run.
SEED = int(os.environ.get("MODALIMMUNE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return f"modalimmune: test seed {SEED} (MODALIMMUNE_TEST_SEED={SEED} replays it); backends {modalimmune.backends()}"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SEED + sum(map(ord, request.node.nodeid)))
