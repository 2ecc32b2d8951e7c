"""A user's own torch data behind the data interface (docs/benchmark.md, "Your own torch data"):
``SampleDataset`` (a map-style Dataset of dict samples, random access), ``SampleStream`` (per-split
iterables: IterableDatasets, DataLoaders) and ``as_data``, which the Trainer, ``compare`` and
``evaluate`` call on what they are given."""

import collections.abc

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..checks import choice, fail, integer
from .base import SPLITS, TASKS, Batch, ModalitySpec, MultimodalData
from .collate import LABEL, PRESENT, check_shape, checked_modalities, collated, sample_modalities, sample_parts
from .dataset import _automatic_splits, _given_splits, _target_bins, check_fractions


class _Survey:
    """What one reading of the samples learns: their labels, each modality's shape and longest
    sequence, and whether any sample lacks a modality; every sample is checked on the way."""

    def __init__(self, modalities, task, standardize):
        """Checks the arguments that shape the reading before anything is read."""
        self.modalities = None if modalities is None else checked_modalities(modalities, "modalities")
        self.task = choice("task", task, TASKS)
        if not isinstance(standardize, (bool, dict)):
            fail("standardize", "False, True or {name: (mean, std)}", type(standardize).__name__, TypeError)
        self.shapes, self.labels, self.missing = {}, [], False

    def add(self, sample, where):
        if self.modalities is None:
            self.modalities = sample_modalities(sample, where)
        values, label = sample_parts(sample, where, self.modalities, self.task)
        for name, value in values.items():
            rank, dim, longest = self.shapes.setdefault(name, (value.ndim, value.shape[-1], 0))
            check_shape(where, name, value, (rank, dim, None))
            if rank == 2:
                self.shapes[name] = (rank, dim, max(longest, len(value)))
        self.missing |= len(values) < len(self.modalities)
        self.labels.append(label)

    def spec(self):
        for name in self.modalities:
            if name not in self.shapes:
                fail("dataset", f"modality {name!r} in at least one sample (its shape)", "none")
        return {name: ModalitySpec(self.shapes[name][1], self.shapes[name][2]) for name in self.modalities}

    def label_tensor(self):
        return torch.tensor(self.labels, dtype=torch.int64 if self.task == "classification" else torch.float32)


class _UserData(MultimodalData):
    """What SampleDataset and SampleStream share: the survey's results and batches from samples."""

    def _adopt(self, survey, name, standardize):
        self.name, self.task, self.spec = name, survey.task, survey.spec()
        self.natural_missingness = survey.missing
        self.classes = None
        if self.task == "classification":
            self.classes = torch.unique(survey.label_tensor())
            if len(self.classes) < 2:
                fail("labels", "at least 2 classes", f"{len(self.classes)}")
        self.statistics = self._fit_statistics(standardize)

    def _from_samples(self, samples, names):
        """Samples as a raw Batch: collated to the spec, class labels as indices into ``classes``."""
        batch = collated(samples, names, self.modalities, self.spec, self.task)
        if self.classes is None:
            return batch
        index = torch.searchsorted(self.classes, batch.labels).clamp(max=len(self.classes) - 1)
        unknown = self.classes[index] != batch.labels
        if unknown.any():
            row = int(unknown.nonzero()[0, 0])
            fail(f"{names[row]}['label']", f"one of the classes read at construction ({self.classes.tolist()})",
                 repr(batch.labels[row].item()))
        return Batch(batch.inputs, index, batch.masks, batch.present)


class SampleDataset(_UserData):
    """A map-style dataset of dict samples as MultimodalData (docs/benchmark.md, "Your own torch data").

    ``dataset``: anything with ``len()`` whose ``dataset[i]`` (i in 0..N-1) is a dict sample
    ``{modality: tensor, ..., "label": y}`` with an optional ``present`` (see :func:`collate`);
    a torch ``Dataset``, a list. Construction reads every sample once: each is checked, and the
    classes (any integer values, mapped to ``0..C-1`` as by MultimodalDataset), each modality's
    shape and longest sequence (the padded length of every batch) and whether samples lack
    modalities are found. ``modalities``: their order (default: the first sample's). ``splits``:
    None (stratified as MultimodalDataset does, by ``split_seed`` and ``fractions``),
    ``{"train": idx, "val": idx, "test": idx}``, or a function ``splits(position, sample)`` that
    names each sample's split. ``standardize``: False (the samples as they are), True (statistics
    from one streaming pass over the training split, over the samples that have each modality) or
    ``{name: (mean, std)}``. A batch reads its samples again, in this process."""

    def __init__(self, dataset, *, task="classification", modalities=None, name="custom", splits=None, split_seed=0,
                 fractions=(0.7, 0.1, 0.2), standardize=False):
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__") or not hasattr(
                dataset, "__len__"):
            fail("dataset", "a map-style dataset (len() and dataset[i]; a stream goes through SampleStream)",
                 type(dataset).__name__, TypeError)
        check_fractions(fractions)
        if splits is not None and not callable(splits) and not isinstance(splits, dict):
            fail("splits", "None, {'train': idx, 'val': idx, 'test': idx} or a function (position, sample) -> split",
                 type(splits).__name__, TypeError)
        survey, named = _Survey(modalities, task, standardize), {split: [] for split in SPLITS}
        self.split_seed = None  # a split of the user's
        for position in range(len(dataset)):
            sample = dataset[position]
            survey.add(sample, f"dataset[{position}]")
            if callable(splits):
                named[choice(f"splits({position}, sample)", splits(position, sample), SPLITS)].append(position)
        if not survey.labels:
            fail("dataset", "at least one sample", "none")
        if callable(splits):
            splits = {split: torch.tensor(positions, dtype=torch.int64) for split, positions in named.items()}
            if not all(len(splits[split]) for split in SPLITS):
                fail("splits", "at least one sample in each of train, val and test",
                     ", ".join(f"{split} {len(splits[split])}" for split in SPLITS))
        elif splits is not None:
            splits = _given_splits(splits, len(survey.labels))
        else:
            labels = survey.label_tensor()
            strata = labels if task == "classification" else _target_bins(labels)
            splits = _automatic_splits(strata, fractions, split_seed)
            self.split_seed = split_seed
        self.dataset, self.splits = dataset, splits
        self._adopt(survey, name, standardize)

    def __len__(self):
        return len(self.dataset)

    def indices(self, split):
        return self.splits[choice("split", split, SPLITS)]

    def _raw_batch(self, index):
        positions = index.tolist()
        return self._from_samples([self.dataset[i] for i in positions], [f"dataset[{i}]" for i in positions])


def _unbatched(item, where):
    """The samples of one item of a stream: the item itself, or the rows of a batch -- a Batch
    (``collate_fn=collate``) or a DataLoader's default collate of dict samples (every value stacked,
    ``label`` 1-d)."""
    if isinstance(item, Batch):
        names = tuple(item.inputs)
        for row in range(len(item)):
            has = [True] * len(names) if item.present is None else item.present[row].tolist()
            sample = {name: item.inputs[name][row][item.masks[name][row]] if name in item.masks else
                      item.inputs[name][row] for name, kept in zip(names, has) if kept}
            yield {**sample, LABEL: item.labels[row], PRESENT: dict(zip(names, has))}
        return
    label = item.get(LABEL) if isinstance(item, dict) else None
    if not isinstance(label, torch.Tensor) or label.ndim != 1:
        yield item
        return
    count, present = len(label), item.get(PRESENT, {})
    columns = [(f"{where}[{key!r}]", value) for key, value in item.items() if key != PRESENT]
    columns += [(f"{where}['present'][{key!r}]", value) for key, value in present.items()] if isinstance(
        present, dict) else []
    for name, value in columns:
        if not isinstance(value, torch.Tensor) or not value.ndim or len(value) != count:
            fail(name, f"a batch of {count} rows (the label's length)",
                 f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__)
    for row in range(count):
        sample = {key: value[row] for key, value in item.items() if key != PRESENT}
        if isinstance(present, dict):
            sample[PRESENT] = {key: value[row] for key, value in present.items()}
        yield sample


def _stream_samples(iterable, split):
    """(name, sample) for each sample of one pass over ``iterable``, named by its position in the split."""
    position = 0
    for item in iterable:
        for sample in _unbatched(item, f"{split}[{position}]"):
            yield f"{split}[{position}]", sample
            position += 1


class SampleStream(_UserData):
    """Per-split streams of dict samples as MultimodalData, without random access (docs/benchmark.md,
    "Your own torch data").

    ``splits``: ``{"train": it, "val": it, "test": it}``, each an IterableDataset, a DataLoader or
    another re-iterable (a list; not a one-shot iterator or generator) that yields the same samples
    in the same order on every pass. An item is a dict sample (see :func:`collate`), or a batch of
    them from a DataLoader -- its default collate (a dict of stacked tensors, ``label`` 1-d) or
    ``collate_fn=collate`` (a Batch); batches are split into their samples and batched again with
    the batch size asked for, so the Trainer's ``batch_size`` holds whatever the loader does (a
    DataLoader with ``batch_size=None`` yields samples, loaded by its workers). Construction reads
    every split once (checks, classes, shapes, sizes, missingness); ``standardize`` as in
    SampleDataset (True: one more pass over the training split). The Trainer reads the training
    stream once per epoch in its own order (``seed`` does not shuffle it) and a resume replays the
    epoch's pass up to where the checkpoint stood: exact only when every pass yields the same order."""

    random_access = False

    def __init__(self, splits, *, task="classification", modalities=None, name="custom", standardize=False):
        if not isinstance(splits, dict):
            fail("splits", "a dict {'train': iterable, 'val': iterable, 'test': iterable}", type(splits).__name__,
                 TypeError)
        if set(splits) != set(SPLITS):
            fail("splits", "the keys 'train', 'val' and 'test'", repr(sorted(map(str, splits))))
        for split in SPLITS:
            stream = splits[split]
            if not isinstance(stream, collections.abc.Iterable) or isinstance(stream, collections.abc.Iterator):
                fail(f"splits[{split!r}]", "a re-iterable of samples (an IterableDataset, a DataLoader, a list; "
                     "an iterator or a generator is read only once)", type(stream).__name__, TypeError)
        survey, self.sizes = _Survey(modalities, task, standardize), {}
        for split in SPLITS:
            before = len(survey.labels)
            for where, sample in _stream_samples(splits[split], split):
                survey.add(sample, where)
            self.sizes[split] = len(survey.labels) - before
            if not self.sizes[split]:
                fail(f"splits[{split!r}]", "at least one sample", "none")
        self.splits = dict(splits)
        self._adopt(survey, name, standardize)

    def split_size(self, split):
        return self.sizes[choice("split", split, SPLITS)]

    def batches(self, split, batch_size, *, order=None):
        """The split's batches in the stream's own order (``order`` must be None)."""
        if order is not None:
            fail("order", "None (a stream is read in its own order)", type(order).__name__)
        for batch in self._raw_batches(split, batch_size):
            yield self._finished(batch)

    def _raw_batches(self, split, batch_size):
        integer("batch_size", batch_size, 1)
        samples, names, count = [], [], 0
        for where, sample in _stream_samples(self.splits[choice("split", split, SPLITS)], split):
            samples.append(sample)
            names.append(where)
            count += 1
            if len(samples) == batch_size:
                yield self._from_samples(samples, names)
                samples, names = [], []
        if samples:
            yield self._from_samples(samples, names)
        if count != self.sizes[split]:
            raise ValueError(f"splits[{split!r}]: expected the {self.sizes[split]} samples it yielded when first "
                             f"read, got {count} on this pass (a stream must yield the same samples every pass)")


def as_data(dataset):
    """``dataset`` as the data interface: MultimodalData (a MultimodalDataset, a MemmapDataset, ...) as it
    is, a map-style torch Dataset or a list of dict samples as a SampleDataset (default split and no
    standardisation), ``{"train": ..., "val": ..., "test": ...}`` iterables as a SampleStream."""
    if isinstance(dataset, MultimodalData):
        return dataset
    if isinstance(dataset, dict) and set(dataset) == set(SPLITS):
        return SampleStream(dataset)
    if isinstance(dataset, (IterableDataset, DataLoader)):
        fail("dataset", "one iterable per split for an IterableDataset or a DataLoader (it has no split): "
             "{'train': ..., 'val': ..., 'test': ...} or a SampleStream", type(dataset).__name__, TypeError)
    if isinstance(dataset, (torch.utils.data.Dataset, list, tuple)):
        return SampleDataset(dataset)
    fail("dataset", "a MultimodalDataset (or other modalimmune.data.MultimodalData), a map-style torch Dataset of "
         "dict samples, or {'train': ..., 'val': ..., 'test': ...} iterables of them", type(dataset).__name__,
         TypeError)
