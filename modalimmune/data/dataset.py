"""MultimodalDataset: named modalities of one set of samples, a fixed stratified
train/val/test split, standardisation fitted on the training split only, and
padded variable-length sequences with their masks (docs/benchmark.md)."""

from dataclasses import dataclass, field

import numpy as np
import torch

SPLITS = ("train", "val", "test")


@dataclass
class Batch:
    """One mini-batch: ``inputs[name]`` is ``(B, d)`` (vectors) or ``(B, T, d)``
    (sequences, padded), ``masks[name]`` the ``(B, T)`` bool mask of real steps
    (sequence modalities only), ``labels`` ``(B,)`` int64."""

    inputs: dict
    labels: torch.Tensor
    masks: dict = field(default_factory=dict)

    def __len__(self):
        return self.labels.shape[0]

    def to(self, device):
        move = lambda d: {k: v.to(device, non_blocking=True) for k, v in d.items()}  # noqa: E731
        return Batch(move(self.inputs), self.labels.to(device), move(self.masks))

    def replace(self, name, value):
        """A batch with modality ``name``'s input replaced by ``value``."""
        return Batch({**self.inputs, name: value}, self.labels, self.masks)


@dataclass(frozen=True)
class ModalitySpec:
    """What a model needs to know about one modality: its feature dimension and,
    for sequences, the padded length."""

    dim: int
    max_len: int = 0  # 0: a single vector per sample

    @property
    def is_sequence(self):
        return self.max_len > 0


def _as_float_tensor(name, value):
    if isinstance(value, (list, tuple)):  # variable-length sequences
        return [_as_float_tensor(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if not isinstance(value, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{name}: expected a Tensor, an ndarray or a list of them, got {type(value).__name__}")
    tensor = torch.as_tensor(np.asarray(value) if isinstance(value, np.ndarray) else value)
    if not (tensor.is_floating_point() or tensor.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{name}: expected numeric features, got dtype {tensor.dtype}")
    tensor = tensor.detach().to("cpu", torch.float32)
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).reshape(tensor.shape[0], -1).any(1).nonzero()[0, 0]) if tensor.ndim else 0
        raise ValueError(f"{name}: features must be finite; sample {bad} has NaN or Inf")
    return tensor


def _pad(name, sequences, lengths):
    """Stacks a list of (T_i, d) tensors, or checks a padded (N, T, d) tensor and its
    lengths; returns (padded, mask)."""
    if isinstance(sequences, list):
        if not sequences:
            raise ValueError(f"{name}: expected at least one sample")
        dims = {s.shape[1:] for s in sequences}
        if any(s.ndim != 2 for s in sequences) or len(dims) != 1:
            raise ValueError(f"{name}: every sequence must be (T_i, d) with one d, got shapes "
                             f"{sorted({tuple(s.shape) for s in sequences})[:3]}")
        lengths = torch.tensor([s.shape[0] for s in sequences])
        sequences = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True)
    elif lengths is None:
        return sequences, None
    lengths = torch.as_tensor(lengths).long()
    if sequences.ndim != 3 or lengths.shape != (sequences.shape[0],):
        raise ValueError(f"{name}: lengths need a (N, T, d) array and N lengths, got {tuple(sequences.shape)} "
                         f"and {tuple(lengths.shape)}")
    if (lengths < 1).any() or (lengths > sequences.shape[1]).any():
        raise ValueError(f"{name}: lengths must lie in [1, {sequences.shape[1]}]")
    mask = torch.arange(sequences.shape[1]) < lengths[:, None]
    return sequences * mask[..., None], mask


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


class MultimodalDataset:
    """Samples with M named modalities and a class label.

    ``modalities``: ``{name: array}`` in the order the modalities are reported;
    each array has the samples first: ``(N, d)``, ``(N, T, d)`` with
    ``lengths[name]``, or a list of N ``(T_i, d)`` sequences.  ``labels``: N
    integer class labels (any values; they are mapped to ``0..C-1``).
    The split is stratified by class and fixed by ``split_seed``; every modality
    is standardised with the mean and standard deviation of the training split.
    """

    def __init__(self, modalities, labels, *, lengths=None, name="custom", split_seed=0,
                 fractions=(0.7, 0.1, 0.2), standardize=True):
        if not isinstance(modalities, dict) or not modalities:
            raise ValueError("modalities: expected a non-empty dict {name: array}")
        for key in modalities:
            if not isinstance(key, str) or not key or "+" in key:
                raise ValueError(f"modalities: names must be non-empty strings without '+', got {key!r}")
        lengths = dict(lengths or {})
        for key in lengths:
            if key not in modalities:
                raise ValueError(f"lengths: {key!r} is not a modality (modalities: {', '.join(modalities)})")
        if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6 or fractions[0] <= 0:
            raise ValueError(f"fractions: expected (train, val, test) >= 0 summing to 1 with train > 0, got {fractions}")
        self.name = name
        self.split_seed = split_seed
        labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        if labels.ndim != 1 or labels.is_floating_point() and not torch.equal(labels, labels.round()):
            raise ValueError(f"labels: expected N integer class labels, got shape {tuple(labels.shape)} "
                             f"dtype {labels.dtype}")
        self.classes, labels = torch.unique(labels, return_inverse=True)
        if len(self.classes) < 2:
            raise ValueError(f"labels: expected at least 2 classes, got {len(self.classes)}")
        self.labels = labels.long()
        n = len(self.labels)
        self.inputs, self.masks = {}, {}
        for key, value in modalities.items():
            value = _as_float_tensor(f"modalities[{key!r}]", value)
            value, mask = _pad(f"modalities[{key!r}]", value, lengths.get(key))
            if value.shape[0] != n:
                raise ValueError(f"modalities[{key!r}]: has {value.shape[0]} samples but labels has {n}; "
                                 "every modality needs one row per sample")
            if value.ndim not in (2, 3):
                raise ValueError(f"modalities[{key!r}]: expected (N, d) or (N, T, d), got {tuple(value.shape)}")
            self.inputs[key] = value
            if value.ndim == 3:
                self.masks[key] = mask if mask is not None else torch.ones(value.shape[:2], dtype=torch.bool)
        self.splits = stratified_split(self.labels, fractions, split_seed)
        if standardize:
            self._standardize()

    def _standardize(self):
        train = self.splits["train"]
        for key, value in self.inputs.items():
            rows = value[train]
            if key in self.masks:  # statistics over the real steps only
                rows = rows[self.masks[key][train]]
            mean, std = rows.mean(0), rows.std(0)
            std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant features stay put
            value = (value - mean) / std
            if key in self.masks:
                value = value * self.masks[key][..., None]
            self.inputs[key] = value

    @property
    def modalities(self):
        return tuple(self.inputs)

    @property
    def num_classes(self):
        return len(self.classes)

    @property
    def spec(self):
        """``{name: ModalitySpec}``: what a model needs to be built for this data."""
        return {k: ModalitySpec(v.shape[-1], v.shape[1] if v.ndim == 3 else 0) for k, v in self.inputs.items()}

    def __len__(self):
        return len(self.labels)

    def split_size(self, split):
        return len(self.indices(split))

    def indices(self, split):
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
        return self.splits[split]

    def batch(self, index):
        """The samples at ``index`` (a LongTensor of dataset positions) as a Batch."""
        return Batch({k: v[index] for k, v in self.inputs.items()}, self.labels[index],
                     {k: m[index] for k, m in self.masks.items()})

    def batches(self, split, batch_size, *, order=None):
        """Batches of ``split`` in ``order`` (a permutation of the split's positions;
        default: dataset order)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        index = self.indices(split)
        if order is not None:
            index = index[order]
        for start in range(0, len(index), batch_size):
            yield self.batch(index[start:start + batch_size])

    def __repr__(self):
        shapes = ", ".join(f"{k}{tuple(v.shape[1:])}" for k, v in self.inputs.items())
        return (f"MultimodalDataset({self.name!r}: {len(self)} samples, {self.num_classes} classes, {shapes}; "
                f"split {[len(self.splits[s]) for s in SPLITS]} seed {self.split_seed})")
