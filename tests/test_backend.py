"""Backend availability, selection, the guarded extension load and `modalimmune info`."""

import os
import re
import subprocess
import sys

import pytest
import torch

import modalimmune
from modalimmune import backend


def run_python(code, env=None):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_backends_dict():
    available = modalimmune.backends()
    assert set(available) == {"torch", "cpp", "cuda", "triton"}
    assert available["torch"] is True
    assert available["cuda"] == (backend.unavailable_reason("cuda") is None)


def test_auto_picks_fastest_usable():
    expected = "cpp" if modalimmune.backends()["cpp"] else "torch"
    assert backend.resolve("auto", "cpu") == expected
    if torch.cuda.is_available():
        assert backend.resolve("auto", "cuda") in ("cuda", "triton")


def test_explicit_backend_errors_say_why():
    with pytest.raises(RuntimeError, match="backend='cuda'.*(GPU|CUDA|built)"):
        backend.resolve("cuda", "cpu")
    with pytest.raises(ValueError, match="backend"):
        backend.resolve("opencl", "cpu")


def test_triton_on_cpu_needs_the_interpreter():
    code = ("import modalimmune.backend as b; print(b.unavailable_reason('triton', 'cpu'))")
    out = run_python(code, {"TRITON_INTERPRET": "0"}).stdout
    if "not installed" not in out:
        assert "TRITON_INTERPRET=1" in out


def test_missing_extension_warns_once_and_torch_serves():
    code = """
import importlib.abc, sys, warnings
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "modalimmune._C":
            raise ImportError("simulated: no compiled extension")
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import modalimmune, torch
    from modalimmune import ops
    g = [torch.randn(5)]; d = [torch.zeros(5)]
    stats = ops.curvature_mask_(g, [torch.randn(5)], d, tau=1.0)
print(len([w for w in caught if "modalimmune._C" in str(w.message)]), modalimmune.backends()["cpp"])
try:
    ops.curvature_mask_(g, [torch.randn(5)], d, tau=1.0, backend="cpp")
except RuntimeError as error:
    print("error:", error)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "1 False"
    assert "simulated: no compiled extension" in lines[1] and "backend='cpp'" in lines[1]


def test_extension_built_for_another_torch_is_refused():
    code = """
import warnings, torch
torch.__version__ = "0.0.1-other"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import modalimmune
print(modalimmune.backends()["cpp"], any("built for torch" in str(w.message) for w in caught))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]


@pytest.mark.skipif(os.environ.get("MODALIMMUNE_CUDA") != "1", reason="only where the build was asked to include CUDA")
def test_cuda_part_was_built():
    from modalimmune import _C

    assert _C.cuda_built and _C.cuda_version > 0


def test_info_command_lists_versions_and_backends():
    result = subprocess.run([sys.executable, "-m", "modalimmune", "info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for word in ("torch", "triton", "extension", "cpp", "cuda", "GPU"):
        assert word in result.stdout
    for name, usable in modalimmune.backends().items():
        line = next(row for row in result.stdout.splitlines() if row.strip().startswith(name + " "))
        assert ("unusable:" not in line) == usable


@pytest.mark.skipif(not modalimmune.backends()["cpp"], reason="needs the compiled extension")
def test_stale_extension_without_an_op_is_not_used():
    """An extension built from older sources lacks newer ops: cpp is refused for them, auto falls back."""
    assert backend.unavailable_reason("cpp", "cpu", op="no_such_op").startswith("modalimmune._C has no CPU kernel")
    assert backend.resolve("auto", "cpu", op="no_such_op") == "torch"
    with pytest.raises(RuntimeError, match="older sources"):
        backend.resolve("cpp", "cpu", op="no_such_op")


def test_extension_that_defines_the_schemas_is_refused_with_a_message():
    """A build from before the schemas moved to Python still has TORCH_LIBRARY(modalimmune, m).
    Loaded after the Python definitions it would abort the process (a duplicate schema), so the
    package loads it first; this stands in for it with a module whose import defines a schema the
    same way, and checks the one warning, the refusal and that the other backends still serve."""
    code = """
import importlib.abc, importlib.machinery, sys, types, warnings, torch
class StaleBuild(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "modalimmune._C" else None
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        module.library = torch.library.Library("modalimmune", "DEF")  # what TORCH_LIBRARY does
        module.library.define("neumann_update(Tensor(a!)[] v, Tensor(b!)[] p, Tensor[] w, Tensor alpha, "
                              "float damping) -> Tensor")
        module.torch_version, module.cuda_built = torch.__version__, False
sys.meta_path.insert(0, StaleBuild())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import modalimmune
    from modalimmune import ops
print(sum("TORCH_LIBRARY" in str(w.message) for w in caught), modalimmune.backends()["cpp"])
v = [torch.ones(3)]
print(ops.neumann_update_(v, [torch.zeros(3)], [torch.ones(3)], 0.5).tolist())
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "1 False"
    assert lines[1] == "[0.75, 3.0]"


def test_generated_constants_header_matches_python():
    """The C++/CUDA kernels read the constants of modalimmune/ops/constants.py from the header the
    build generates (setup.py): every constant, with its value."""
    from modalimmune.ops import constants

    header = os.path.join(os.path.dirname(__file__), "..", "build", "generated", "modalimmune_constants.h")
    if not os.path.exists(header):
        pytest.skip("the extension was not built in this checkout")
    with open(header) as f:
        found = dict(re.findall(r"constexpr \w+ (k\w+) = (-?\d+);", f.read()))
    expected = {"k" + "".join(w.capitalize() for w in name.split("_")): str(value)
                for name, value in vars(constants).items() if name.isupper()}
    assert found == expected
