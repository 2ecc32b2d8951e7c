"""MultimodalDataset: named modalities of one set of samples, a fixed stratified
train/val/test split, standardisation fitted on the training split only, padded
variable-length sequences with their masks, the modalities each sample has
(natural missingness) and classification or regression targets (docs/benchmark.md)."""

import numpy as np
import torch

from ..checks import choice, fail
from .base import (
    SPLITS,
    TASKS,
    Batch,
    ModalitySpec,
    MultimodalData,
    RawTexts,
    _without_absent,
    counted_rows,
    guarded_std,
    standardized,
)

TARGET_BINS = 10  # a regression split is stratified by the decile of the target


def _numeric_tensor(name, value, what):
    """``value`` (a Tensor or an ndarray) as a tensor, refused unless it holds bools or numbers."""
    if not isinstance(value, (torch.Tensor, np.ndarray)):
        fail(name, f"{what} (a Tensor or an ndarray)", type(value).__name__, TypeError)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":  # strings, objects, dates: numpy's own error would not name the argument
            fail(name, what, f"dtype {value.dtype}", TypeError)
        value = torch.as_tensor(value)
    if value.is_complex():
        fail(name, what, f"dtype {value.dtype}", TypeError)
    return value.detach()


def _float_features(name, value):
    """``value`` (a Tensor or an ndarray of numbers; bools refused) as a float32 tensor on the CPU."""
    tensor = _numeric_tensor(name, value, "numeric features")
    if not (tensor.is_floating_point() or tensor.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64)):
        fail(name, "numeric features", f"dtype {tensor.dtype}", TypeError)
    return tensor.to("cpu", torch.float32)


def _as_float_tensor(name, value):
    if isinstance(value, (list, tuple)):  # variable-length sequences
        return [_as_float_tensor(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if not isinstance(value, (torch.Tensor, np.ndarray)):
        fail(name, "a Tensor, an ndarray or a list of them", type(value).__name__, TypeError)
    tensor = _float_features(name, value)
    if tensor.ndim not in (2, 3):
        fail(name, "samples first: (N, d), (N, T, d) or a list of N (T_i, d)", f"shape {tuple(tensor.shape)}")
    return tensor


def _first_sample(bad):
    """The position of the first sample (row) of ``bad`` with a True entry."""
    return int(bad.reshape(bad.shape[0], -1).any(1).nonzero()[0, 0])


def _check_finite(name, tensor, positions=None):
    """Refuses NaN or Inf, naming the first bad sample (its row, or its entry of ``positions``)."""
    if not torch.isfinite(tensor).all():
        row = _first_sample(~torch.isfinite(tensor))
        fail(name, "finite features", f"NaN or Inf in sample {row if positions is None else int(positions[row])}")


def _as_labels(name, labels):
    """N integer class labels (integral floats too) as an int64 tensor."""
    labels = _numeric_tensor(name, labels if isinstance(labels, torch.Tensor) else np.asarray(labels),
                             "N integer class labels")
    if labels.ndim != 1:
        fail(name, "N integer class labels", f"shape {tuple(labels.shape)} dtype {labels.dtype}")
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):  # NaN (a missing label) included
        bad = _first_sample(labels != labels.round())
        fail(name, "N integer class labels", f"{labels[bad].item()} in sample {bad}")
    return labels.long()


def _as_targets(name, targets):
    """N finite regression targets as a float32 tensor, in their own units (not standardised)."""
    targets = _numeric_tensor(name, targets if isinstance(targets, torch.Tensor) else np.asarray(targets),
                              "N finite regression targets")
    if targets.dtype == torch.bool:
        fail(name, "N finite regression targets", f"dtype {targets.dtype}", TypeError)
    if targets.ndim != 1:
        fail(name, "N finite regression targets", f"shape {tuple(targets.shape)}")
    targets = targets.to("cpu", torch.float32)
    if not torch.isfinite(targets).all():  # also a float64 target beyond float32's range
        bad = _first_sample(~torch.isfinite(targets))
        fail(name, "N finite regression targets", f"{targets[bad].item()} in sample {bad}")
    return targets


def _target_bins(targets):
    """The decile of each regression target (tied targets share a bin): the strata of its split."""
    targets = targets.double()
    edges = torch.quantile(targets, torch.linspace(0, 1, TARGET_BINS + 1, dtype=torch.float64)[1:-1])
    return torch.bucketize(targets, torch.unique(edges))


def _present_column(name, value, count):
    """N booleans (bools, or integers 0 and 1) as a bool tensor."""
    value = _numeric_tensor(name, value if isinstance(value, torch.Tensor) else np.asarray(value),
                            "booleans (True: the sample has the modality)")
    if value.is_floating_point():
        fail(name, "booleans (True: the sample has the modality)", f"dtype {value.dtype}", TypeError)
    if value.dtype != torch.bool and ((value != 0) & (value != 1)).any():
        fail(name, "booleans (True: the sample has the modality)", f"the value {value[(value != 0) & (value != 1)][0]}")
    if value.shape != (count,):
        fail(name, f"{count} booleans (one per sample)", f"shape {tuple(value.shape)}")
    return value.to("cpu", torch.bool)


def _as_present(present, names, count):
    """The ``(N, M)`` bool mask of the modalities each sample has (``names`` order), from an
    ``(N, M)`` array or ``{name: N booleans}`` (a modality not named: every sample has it)."""
    if isinstance(present, dict):
        for key in present:
            if key not in names:
                fail("present", f"keys among the modalities ({', '.join(names)})", repr(key))
        mask = torch.stack([_present_column(f"present[{key!r}]", present[key], count) if key in present
                            else torch.ones(count, dtype=torch.bool) for key in names], 1)
    else:
        what = f"a ({count}, {len(names)}) bool array (samples, modalities {', '.join(names)}) or a dict"
        if not isinstance(present, (torch.Tensor, np.ndarray)):
            fail("present", what, type(present).__name__, TypeError)
        if tuple(present.shape) != (count, len(names)):
            fail("present", what, f"shape {tuple(present.shape)}")
        mask = _present_column("present", present.reshape(-1), count * len(names)).reshape(count, len(names))
    if not mask.any(1).all():
        fail("present", "at least one modality in every sample", f"none in sample {_first_sample(~mask.any(1))}")
    return mask


def _pad(name, sequences, lengths, kept=None):
    """Stacks a list of (T_i, d) tensors, or checks a padded (N, T, d) tensor and its
    lengths; returns (padded, mask). ``kept``: the samples that have the modality (None:
    all); only their lengths are checked, an absent sample is one zero step."""
    if isinstance(sequences, list):
        if not sequences:
            fail(name, "at least one sample", "an empty list")
        if any(s.ndim != 2 for s in sequences) or len({s.shape[1:] for s in sequences}) != 1:
            fail(name, "sequences (T_i, d) with one d", f"shapes {sorted({tuple(s.shape) for s in sequences})[:3]}")
        lengths = torch.tensor([s.shape[0] for s in sequences])
        sequences = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    elif lengths is None:
        if kept is None or sequences.ndim != 3:
            return sequences, None
        lengths = torch.full((sequences.shape[0],), sequences.shape[1])
    lengths = _numeric_tensor(name, lengths if isinstance(lengths, torch.Tensor) else np.asarray(lengths),
                              "N integer lengths")
    if sequences.ndim != 3 or lengths.shape != (sequences.shape[0],):
        fail(name, "a (N, T, d) array with N lengths", f"shapes {tuple(sequences.shape)} and {tuple(lengths.shape)}")
    checked = lengths if kept is None else lengths[kept]
    if (checked < 1).any() or (checked > sequences.shape[1]).any():
        fail(name, f"lengths in [1, {sequences.shape[1]}]", f"lengths from {checked.min().item()} to "
                                                             f"{checked.max().item()}")
    lengths = lengths.long() if kept is None else torch.where(kept, lengths.long(), 1)
    mask = torch.arange(sequences.shape[1]) < lengths[:, None]
    return sequences * mask[..., None], mask


def _as_raw_texts(raw_texts, inputs, present):
    """``{name: RawTexts}`` checked against the modalities (vectors, one text per sample, None exactly
    where the sample lacks the modality); None when not given."""
    if raw_texts is None:
        return None
    if not isinstance(raw_texts, dict):
        fail("raw_texts", "a dict {modality: (texts, encode)}", type(raw_texts).__name__, TypeError)
    checked, vectors = {}, [k for k, v in inputs.items() if v.ndim == 2]
    for key, value in raw_texts.items():
        argument = f"raw_texts[{key!r}]"
        if key not in vectors:
            fail("raw_texts", f"keys among the vector modalities ({', '.join(vectors)})", repr(key))
        if not (isinstance(value, tuple) and len(value) == 2 and callable(value[1])):
            fail(argument, "(texts, encode) with encode a function texts -> embeddings", type(value).__name__,
                 TypeError)
        texts = list(value[0])
        if len(texts) != len(inputs[key]):
            fail(argument, f"{len(inputs[key])} texts (one per sample)", f"{len(texts)}")
        has = [True] * len(texts) if present is None else present[:, list(inputs).index(key)].tolist()
        for i, (text, there) in enumerate(zip(texts, has)):
            if not (isinstance(text, str) if there else text is None):
                fail(f"{argument} text {i}", "a str" if there else "None (the sample lacks the modality)",
                     type(text).__name__, TypeError)
        checked[key] = RawTexts(texts, value[1])
    return checked


def stratified_split(labels, fractions, seed):
    """Indices of each split: every class is shuffled with ``seed`` and cut by
    ``fractions`` (rounded, at least one sample per split when the class has enough)."""
    generator = torch.Generator().manual_seed(seed)
    parts = {split: [] for split in SPLITS}
    for cls in torch.unique(labels):
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = round(fractions[1] * len(members))
        n_test = round(fractions[2] * len(members))
        if len(members) >= 3:
            n_val, n_test = max(n_val, 1), max(n_test, 1)
        n_train = len(members) - n_val - n_test
        parts["train"].append(members[:n_train])
        parts["val"].append(members[n_train:n_train + n_val])
        parts["test"].append(members[n_train + n_val:])
    return {split: torch.sort(torch.cat(idx)).values for split, idx in parts.items()}


def check_fractions(fractions):
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6 or fractions[0] <= 0:
        fail("fractions", "(train, val, test) >= 0 summing to 1 with train > 0", repr(fractions))


def _given_split(name, index, count):
    """A split the user chose: distinct dataset positions in [0, count), at least one, in dataset order."""
    index = _numeric_tensor(name, index if isinstance(index, torch.Tensor) else np.asarray(index),
                            "integer sample positions")
    if index.ndim != 1 or not len(index):
        fail(name, "a non-empty 1-d array of sample positions", f"shape {tuple(index.shape)}")
    if index.is_floating_point() or index.dtype == torch.bool:
        fail(name, "integer sample positions", f"dtype {index.dtype}", TypeError)
    if index.min() < 0 or index.max() >= count:
        fail(name, f"positions in [0, {count - 1}]", f"{index.min().item()} to {index.max().item()}")
    index = torch.sort(index.long()).values
    if (index[1:] == index[:-1]).any():
        fail(name, "distinct positions", f"{int(index[1:][index[1:] == index[:-1]][0])} more than once")
    return index


def _given_splits(splits, count):
    if not isinstance(splits, dict):
        fail("splits", "None or a dict {'train': idx, 'val': idx, 'test': idx}", type(splits).__name__, TypeError)
    if set(splits) != set(SPLITS):
        fail("splits", "the keys 'train', 'val' and 'test'", repr(sorted(splits)))
    return {split: _given_split(f"splits[{split!r}]", splits[split], count) for split in SPLITS}


def _automatic_splits(labels, fractions, seed):
    """The stratified split, refused when a split is empty (validation would select on nothing)."""
    splits = stratified_split(labels, fractions, seed)
    if not all(len(splits[split]) for split in SPLITS):
        sizes = ", ".join(f"{split} {len(splits[split])}" for split in SPLITS)
        fail("splits", "at least one sample in each of train, val and test",
             f"{sizes} of {len(labels)} samples from the stratified split with fractions {tuple(fractions)}; give "
             "more samples per class, or choose the samples with splits={'train': ..., 'val': ..., 'test': ...}")
    return splits


class MultimodalDataset(MultimodalData):
    """Samples with M named modalities and a class label or a regression target.

    ``modalities``: ``{name: array}`` in the order the modalities are reported;
    each array has the samples first: ``(N, d)``, ``(N, T, d)`` with
    ``lengths[name]``, or a list of N ``(T_i, d)`` sequences.
    ``task="classification"``: ``labels`` are N integer class labels (any values;
    they are mapped to ``0..C-1``). ``task="regression"``: N finite targets, kept
    as float32 in their own units -- not standardised, so that errors (MAE) read in
    the target's units; ``classes`` and ``num_classes`` are then None and
    ``num_outputs`` (the model's output size) is 1.
    ``present``: the modalities each sample has when the data itself lacks some
    (natural missingness): an ``(N, M)`` bool array in modality order, or
    ``{name: N booleans}`` (a modality not named is in every sample); every sample
    needs at least one. What an absent entry holds is ignored (NaN allowed): it is
    zero after standardisation, i.e. the training mean, and an absent sequence is one
    zero step. None (or all true) is no missingness, and batches carry ``present=None``.
    The split is stratified by class (regression: by the decile of the target; ``strata``: by
    these labels instead, one per sample) and
    fixed by ``split_seed``, with ``fractions`` of the samples in (train, val, test);
    every split must get at least one sample. ``splits``: the user's own split
    instead, ``{"train": idx, "val": idx, "test": idx}``, each a non-empty 1-d array
    of distinct sample positions (``fractions`` and ``split_seed`` are then unused;
    the splits may overlap, e.g. for a smoke test on two samples, but then the
    validation and test figures are not those of held-out data).
    Every modality is standardised with the mean and standard deviation of the
    training samples that have it. ``source``: where the data can be loaded again (a
    packaged dataset's name or an ``.npz``'s absolute path, as :func:`load_dataset`
    sets it; None for arrays given in memory); ``model.pt`` records it so that
    ``modalimmune eval`` finds the data. ``raw_texts``: ``{name: (texts, encode)}`` for modalities
    that are a frozen text encoder's embeddings (one text per sample, None where it lacks the
    modality; ``encode(texts) -> (n, dim)`` the encoder), which the evaluation corrupts before
    encoding (docs/corruptions.md, "Raw text"). The in-memory implementation of
    :class:`MultimodalData`; ``statistics`` holds the ``{name: (mean, std)}`` it standardised with.
    """

    def __init__(self, modalities, labels, *, lengths=None, present=None, task="classification", name="custom",
                 split_seed=0, fractions=(0.7, 0.1, 0.2), splits=None, standardize=True, source=None,
                 raw_texts=None, strata=None):
        if not isinstance(modalities, dict):
            fail("modalities", "a non-empty dict {name: array}", type(modalities).__name__, TypeError)
        if not modalities:
            fail("modalities", "a non-empty dict {name: array}", "{}")
        for key in modalities:
            if not isinstance(key, str) or not key or "+" in key:
                fail("modalities", "names that are non-empty strings without '+'", repr(key))
        lengths = dict(lengths or {})
        for key in lengths:
            if key not in modalities:
                fail("lengths", f"keys among the modalities ({', '.join(modalities)})", repr(key))
        check_fractions(fractions)
        choice("task", task, TASKS)
        if task == "classification":
            labels = _as_labels("labels", labels)
            classes, labels = torch.unique(labels, return_inverse=True)
            if len(classes) < 2:
                fail("labels", "at least 2 classes", f"{len(classes)}")
            default_strata = labels
        else:
            classes, labels = None, _as_targets("labels", labels)
            default_strata = _target_bins(labels)
        n = len(labels)
        if strata is None:
            strata = default_strata
        else:
            strata = torch.unique(_as_labels("strata", strata), return_inverse=True)[1]
            if len(strata) != n:
                fail("strata", f"{n} values (one per sample)", f"{len(strata)}")
        if present is not None:
            present = _as_present(present, tuple(modalities), n)
            present = None if present.all() else present
        inputs, masks = {}, {}
        for position, (key, value) in enumerate(modalities.items()):
            argument = f"modalities[{key!r}]"
            value = _as_float_tensor(argument, value)
            if len(value) != n:
                fail(argument, f"{n} samples (one per label)", f"{len(value)}")
            kept = None if present is None else present[:, position]
            if kept is not None:
                value = _without_absent(value, kept)
            value, mask = _pad(argument, value, lengths.get(key), kept)
            _check_finite(argument, value)
            inputs[key] = value
            if value.ndim == 3:
                masks[key] = mask if mask is not None else torch.ones(value.shape[:2], dtype=torch.bool)
        if splits is None:
            splits = _automatic_splits(strata, fractions, split_seed)
        else:
            splits, split_seed = _given_splits(splits, n), None
        self.name, self.source, self.split_seed, self.task = name, source, split_seed, task
        self.classes, self.labels, self.inputs, self.masks, self.splits = classes, labels, inputs, masks, splits
        self.present, self.natural_missingness = present, present is not None
        self.raw_texts = _as_raw_texts(raw_texts, inputs, present)
        if standardize:
            self._standardize()

    def _standardize(self):
        train, statistics = self.splits["train"], {}
        for position, (key, value) in enumerate(self.inputs.items()):
            kept = None if self.present is None else self.present[train, position]
            rows = counted_rows(value[train], self.masks[key][train] if key in self.masks else None, kept)
            if not len(rows):  # statistics over the training samples that have the modality
                fail("present", f"modality {key!r} in at least one training sample (its statistics)", "none")
            statistics[key] = (rows.mean(0), guarded_std(rows.std(0)))  # constant features stay put
        self.statistics = statistics
        self.inputs = standardized(self.inputs, self.masks, self.present, statistics)

    @property
    def modalities(self):
        return tuple(self.inputs)

    @property
    def spec(self):
        """``{name: ModalitySpec}``: what a model needs to be built for this data."""
        return {k: ModalitySpec(v.shape[-1], v.shape[1] if v.ndim == 3 else 0) for k, v in self.inputs.items()}

    def __len__(self):
        return len(self.labels)

    def indices(self, split):
        return self.splits[choice("split", split, SPLITS)]

    def missingness(self):
        """The natural missingness of all samples and of each split: ``{"all" | split:
        {"samples": n, "missing": {name: fraction of samples without it},
        "patterns": {"a+b": count}}}``, a pattern named by the modalities its samples
        have (modality order), the most frequent first."""
        present = self.present if self.present is not None else torch.ones(len(self), len(self.inputs),
                                                                            dtype=torch.bool)
        report = {}
        for split, index in {"all": torch.arange(len(self)), **self.splits}.items():
            rows = present[index]
            patterns, counts = torch.unique(rows, dim=0, return_counts=True)
            named = {"+".join(m for m, has in zip(self.modalities, pattern.tolist()) if has): int(count)
                     for pattern, count in zip(patterns, counts)}
            missing = {m: (~rows[:, i]).double().mean().item() for i, m in enumerate(self.modalities)}
            report[split] = {"samples": len(index), "missing": missing,
                             "patterns": dict(sorted(named.items(), key=lambda item: (-item[1], item[0])))}
        return report

    def batch(self, index):
        """The samples at ``index`` (a LongTensor of dataset positions) as a Batch."""
        present = None if self.present is None else self.present[index]
        return Batch({k: v[index] for k, v in self.inputs.items()}, self.labels[index],
                     {k: m[index] for k, m in self.masks.items()}, present)

    def __repr__(self):
        shapes = ", ".join(f"{k}{tuple(v.shape[1:])}" for k, v in self.inputs.items())
        target = "regression targets" if self.classes is None else f"{self.num_classes} classes"
        missing = "" if self.present is None else "; missing " + ", ".join(
            f"{m} {fraction:.1%}" for m, fraction in self.missingness()["all"]["missing"].items() if fraction)
        return (f"MultimodalDataset({self.name!r}: {len(self)} samples, {target}, {shapes}; "
                f"split {[len(self.splits[s]) for s in SPLITS]} "
                f"{'given' if self.split_seed is None else f'seed {self.split_seed}'}{missing})")
