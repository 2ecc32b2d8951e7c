"""A dataset folder of memory-mapped ``.npy`` arrays (docs/benchmark.md, "Memory-mapped folders"):
``MemmapDataset`` reads it batch by batch, so that a dataset larger than memory trains with flat
memory; ``save_memmap_dataset`` writes one from any MultimodalData, batch by batch too."""

import hashlib
import itertools
import json
import os
import shutil
import tempfile
import zipfile

import numpy as np
import torch

from ..checks import choice, fail, integer
from .base import SPLITS, TASKS, Batch, ModalitySpec, MultimodalData, _without_absent
from .collate import checked_modalities
from .dataset import _automatic_splits, _check_finite, _given_splits, _pad, _target_bins, check_fractions
from .user import as_data

FORMAT = "modalimmune-memmap-1"
META, LABELS, PRESENT, SPLITS_FILE = "meta.json", "labels.npy", "present.npy", "splits.npz"
STATISTICS = "statistics.npz"  # written by the reader: the training split's statistics, cached
RESERVED = ("labels", "present")  # modality names whose files would be others'


def _gather(path, rows):
    """Rows of one ``.npy`` file, copied out of a mapping that is closed again at once: the process
    keeps no page of the file (a mapping kept open would count every page it touched in the RSS)."""
    array = np.load(path, mmap_mode="r")
    return torch.from_numpy(np.ascontiguousarray(array[rows]))


def _header(path):
    """(shape, dtype) of a ``.npy`` file, read without loading it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset: no such file {path}")
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as error:  # not .npy, truncated, or Python objects (pickle)
        raise ValueError(f"dataset: {path}: cannot read it as a memory-mappable .npy array ({error})") from None
    return array.shape, array.dtype


def _check_names(names, where):
    """Modality names that also make file names of their own."""
    for name in checked_modalities(names, where):
        if "/" in name or name.startswith(".") or name in RESERVED or name.endswith("_lengths"):
            fail(where, f"modality names that make file names of their own: without '/', not starting with '.', "
                 f"not {' or '.join(RESERVED)}, not ending in '_lengths'", repr(name))


class MemmapDataset(MultimodalData):
    """A folder of memory-mapped arrays as MultimodalData (docs/benchmark.md, "Memory-mapped
    folders"): ``meta.json`` (``format``, ``modalities``, ``task``, ``classes``, optional ``name``
    and ``standardized``), ``<modality>.npy`` ``(N, d)`` or ``(N, T, d)`` with an optional
    ``<modality>_lengths.npy``, ``labels.npy`` (class indices into ``classes``, or regression
    targets), optional ``present.npy`` ``(N, M)`` and ``splits.npz`` (without it: the stratified
    split by ``split_seed`` and ``fractions``). A batch maps the files, copies its rows and unmaps
    them, so memory stays that of one batch whatever N. ``standardize``: None (unless meta.json says
    ``standardized``), True or False; the statistics come from one streaming pass over the training
    split, cached in ``statistics.npz`` (in memory only when the folder is read-only). The files'
    headers are checked here; values (NaN, lengths, labels, present) as each batch is read."""

    def __init__(self, directory, *, split_seed=0, fractions=(0.7, 0.1, 0.2), standardize=None):
        if not isinstance(directory, (str, os.PathLike)):
            fail("directory", "a path", type(directory).__name__, TypeError)
        check_fractions(fractions)
        if standardize is not None and not isinstance(standardize, bool):
            fail("standardize", "None, True or False", repr(standardize), TypeError)
        self.directory = self.source = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"dataset: no such folder {self.directory}")
        meta = self._read_meta()
        self.name, self.task = meta.get("name", os.path.basename(self.directory)), meta["task"]
        self.classes = None if self.task == "regression" else torch.tensor(meta["classes"])
        shape, dtype = _header(self.path(LABELS))
        kinds = "iu" if self.task == "classification" else "iuf"
        if len(shape) != 1 or not shape[0] or dtype.kind not in kinds:
            fail(f"dataset: {self.path(LABELS)}", f"a 1-d array of {'class indices' if kinds == 'iu' else 'numbers'} "
                 "(one per sample)", f"shape {shape} dtype {dtype}")
        self.count = shape[0]
        self.spec, self.lengths = {}, {}
        for name in meta["modalities"]:
            self.spec[name] = self._modality_spec(name)
        self.natural_missingness = os.path.exists(self.path(PRESENT))
        if self.natural_missingness:
            shape, dtype = _header(self.path(PRESENT))
            if shape != (self.count, len(self.spec)) or dtype.kind not in "biu":
                fail(f"dataset: {self.path(PRESENT)}", f"a ({self.count}, {len(self.spec)}) bool array",
                     f"shape {shape} dtype {dtype}")
        self.splits, self.split_seed = self._read_splits(split_seed, fractions)
        if standardize is None:
            standardize = not meta["standardized"]
        self.statistics = self._cached_statistics() if standardize else None

    def path(self, filename):
        return os.path.join(self.directory, filename)

    def _read_meta(self):
        path = self.path(META)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset: {self.directory} has no {META} (a memory-mapped dataset folder: "
                                    "docs/benchmark.md, \"Memory-mapped folders\")")
        try:
            with open(path) as file:
                meta = json.load(file)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"dataset: {path}: cannot read it as JSON ({error})") from None
        where = f"dataset: {path}"
        if not isinstance(meta, dict):
            fail(where, "a JSON object", type(meta).__name__)
        if meta.get("format") != FORMAT:
            fail(f"{where}: format", repr(FORMAT), repr(meta.get("format")))
        _check_names(meta.get("modalities"), f"{where}: modalities")
        meta.setdefault("task", "classification")
        choice(f"{where}: task", meta["task"], TASKS)
        classes = meta.get("classes")
        integers = isinstance(classes, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in classes)
        if meta["task"] == "classification" and not (integers and len(set(classes)) == len(classes) >= 2):
            fail(f"{where}: classes", "a list of at least 2 distinct integers (labels.npy indexes it)", repr(classes))
        meta.setdefault("standardized", False)
        if not isinstance(meta["standardized"], bool):
            fail(f"{where}: standardized", "true or false", repr(meta["standardized"]))
        if not isinstance(meta.get("name", ""), str):
            fail(f"{where}: name", "a string", repr(meta["name"]))
        return meta

    def _modality_spec(self, name):
        path = self.path(f"{name}.npy")
        shape, dtype = _header(path)
        if len(shape) not in (2, 3) or shape[0] != self.count or 0 in shape or dtype.kind not in "iuf":
            fail(f"dataset: {path}", f"a numeric ({self.count}, d) or ({self.count}, T, d) array (one row per label)",
                 f"shape {shape} dtype {dtype}")
        lengths = self.path(f"{name}_lengths.npy")
        if os.path.exists(lengths):
            length_shape, length_dtype = _header(lengths)
            if len(shape) != 3 or length_shape != (self.count,) or length_dtype.kind not in "iu":
                fail(f"dataset: {lengths}", f"({self.count},) integer lengths of the sequences of {name}.npy",
                     f"shape {length_shape} dtype {length_dtype} beside a {len(shape)}-d {name}.npy")
            self.lengths[name] = lengths
        return ModalitySpec(shape[-1], shape[1] if len(shape) == 3 else 0)

    def _read_splits(self, split_seed, fractions):
        path = self.path(SPLITS_FILE)
        if not os.path.exists(path):
            labels = torch.from_numpy(np.load(self.path(LABELS)))
            strata = labels if self.task == "classification" else _target_bins(labels.float())
            return _automatic_splits(strata, fractions, split_seed), split_seed
        try:
            with np.load(path, allow_pickle=False) as archive:
                return _given_splits({key: archive[key] for key in archive.files}, self.count), None
        except TypeError as error:
            raise TypeError(f"dataset: {path}: {error}") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"dataset: {path}: {error}") from None

    def _fingerprint(self):
        """What the cached statistics were computed from: the files (size, modification time) and the split."""
        files = sorted(f for f in os.listdir(self.directory) if f.endswith(".npy"))
        stamp = [(f, os.stat(self.path(f)).st_size, os.stat(self.path(f)).st_mtime_ns) for f in files]
        digest = hashlib.sha256(json.dumps([list(self.spec), stamp]).encode())
        digest.update(self.splits["train"].numpy().tobytes())
        return digest.hexdigest()

    def _cached_statistics(self):
        path, fingerprint = self.path(STATISTICS), self._fingerprint()
        try:
            with np.load(path, allow_pickle=False) as cached:
                if str(cached["fingerprint"]) == fingerprint:
                    return {name: (torch.from_numpy(cached[f"mean_{i}"]), torch.from_numpy(cached[f"std_{i}"]))
                            for i, name in enumerate(self.spec)}
        except (OSError, KeyError, ValueError, EOFError):  # none yet, or another or a damaged one: computed again
            pass
        statistics = self._fit_statistics(True)
        arrays = {f"{part}_{i}": value.numpy() for i, pair in enumerate(statistics.values())
                  for part, value in zip(("mean", "std"), pair)}
        try:
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".statistics-", suffix=".npz",
                                             delete=False) as file:
                np.savez(file, fingerprint=np.array(fingerprint), **arrays)
            os.replace(file.name, path)
        except OSError:  # a read-only folder: the statistics stay in memory
            pass
        return statistics

    def __len__(self):
        return self.count

    def indices(self, split):
        return self.splits[choice("split", split, SPLITS)]

    def _raw_batch(self, index):
        rows = index.numpy()
        present = _gather(self.path(PRESENT), rows) if self.natural_missingness else None
        if present is not None:
            bad = (present != 0) & (present != 1)
            if bad.any():
                fail(f"dataset: {self.path(PRESENT)}", "booleans", f"{present[bad][0].item()} in sample "
                     f"{int(index[bad.any(1).nonzero()[0, 0]])}")
            present = present.bool()
            if not present.any(1).all():
                fail(f"dataset: {self.path(PRESENT)}", "at least one modality in every sample",
                     f"none in sample {int(index[(~present.any(1)).nonzero()[0, 0]])}")
        inputs, masks = {}, {}
        for position, (name, spec) in enumerate(self.spec.items()):
            value = _gather(self.path(f"{name}.npy"), rows).float()
            kept = None if present is None else present[:, position]
            if kept is not None:
                value = _without_absent(value, kept)
            if spec.is_sequence:
                lengths = _gather(self.lengths[name], rows) if name in self.lengths else None
                value, mask = _pad(f"dataset: {self.lengths.get(name, self.path(f'{name}.npy'))}", value, lengths, kept)
                masks[name] = mask if mask is not None else torch.ones(value.shape[:2], dtype=torch.bool)
            _check_finite(f"dataset: {self.path(f'{name}.npy')}", value, index)
            inputs[name] = value
        return Batch(inputs, self._labels(index, rows), masks, present)

    def _labels(self, index, rows):
        labels, where = _gather(self.path(LABELS), rows), f"dataset: {self.path(LABELS)}"
        if self.task == "regression":
            labels = labels.float()
            bad = ~torch.isfinite(labels)
            what = "finite regression targets"
        else:
            labels = labels.long()
            bad = (labels < 0) | (labels >= len(self.classes))
            what = f"class indices in [0, {len(self.classes) - 1}] (into meta.json's classes)"
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            fail(where, what, f"{labels[row].item()} in sample {int(index[row])}")
        return labels


def save_memmap_dataset(data, directory, *, batch_size=1024):
    """Writes ``data`` (MultimodalData, or what :func:`as_data` takes) as a memory-mapped dataset
    folder (docs/benchmark.md, "Memory-mapped folders"), batch by batch, so that memory stays that of
    one batch: the batches as ``data`` gives them (standardised when it standardises; meta.json then
    says ``standardized`` and the folder is read as written) and its split (a stream: its splits one
    after another). ``directory`` must be new or empty; it appears whole or not at all (written beside
    it, then renamed). Returns its absolute path."""
    data = as_data(data)
    integer("batch_size", batch_size, 1)
    if not isinstance(directory, (str, os.PathLike)):
        fail("directory", "a path", type(directory).__name__, TypeError)
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise FileExistsError(f"directory: expected a new or empty folder, got {directory}, which holds files")
    _check_names(list(data.modalities), "data.modalities")
    if data.random_access:
        count = len(data)
        batches = (data.batch(torch.arange(start, min(start + batch_size, count)))
                   for start in range(0, count, batch_size))
        splits = {split: data.indices(split).numpy() for split in SPLITS}
    else:
        sizes = [data.split_size(split) for split in SPLITS]
        count, starts = sum(sizes), np.cumsum([0, *sizes])
        batches = itertools.chain.from_iterable(data.batches(split, batch_size) for split in SPLITS)
        splits = {split: np.arange(starts[i], starts[i + 1]) for i, split in enumerate(SPLITS)}
    files = {LABELS: (np.int64 if data.task == "classification" else np.float32, (count,))}
    for name, spec in data.spec.items():
        files[f"{name}.npy"] = (np.float32, (count, spec.max_len, spec.dim) if spec.is_sequence else (count, spec.dim))
        if spec.is_sequence:
            files[f"{name}_lengths.npy"] = (np.int64, (count,))
    if data.natural_missingness:
        files[PRESENT] = (np.bool_, (count, len(data.spec)))
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    temporary = tempfile.mkdtemp(dir=os.path.dirname(directory), prefix=f".{os.path.basename(directory)}.tmp-")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, 0o777 & ~umask)  # mkdtemp's folder is private; the dataset's is not
        for filename, (dtype, shape) in files.items():  # the header and a sparse file of the full size
            np.lib.format.open_memmap(os.path.join(temporary, filename), mode="w+", dtype=dtype, shape=shape).flush()
        start = 0
        for batch in batches:
            columns = {LABELS: batch.labels, PRESENT: batch.present}
            for name, value in batch.inputs.items():
                columns[f"{name}.npy"] = value
                if name in batch.masks:
                    columns[f"{name}_lengths.npy"] = batch.masks[name].sum(1)
            for filename in files:  # mapped for this batch only: written pages go to the file, not the RSS
                target = np.load(os.path.join(temporary, filename), mmap_mode="r+")
                target[start:start + len(batch)] = columns[filename].numpy()
                target.flush()
                del target
            start += len(batch)
        np.savez(os.path.join(temporary, SPLITS_FILE), **splits)
        meta = {"format": FORMAT, "name": data.name, "task": data.task, "modalities": list(data.modalities),
                "classes": None if data.classes is None else data.classes.tolist(),
                "standardized": data.statistics is not None}
        with open(os.path.join(temporary, META), "w") as file:
            json.dump(meta, file, indent=1)
        os.replace(temporary, directory)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return directory
