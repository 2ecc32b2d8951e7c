"""The one data interface of the Trainer, ``compare``, the CLI and ``evaluate`` (docs/benchmark.md,
"Datasets"): ``Batch``, ``ModalitySpec``, ``MultimodalData`` and the standardisation its
implementations share (``MultimodalDataset`` in memory, ``SampleDataset`` and ``SampleStream`` over a
user's torch data, ``MemmapDataset`` over memory-mapped files)."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..checks import fail, integer

SPLITS = ("train", "val", "test")
TASKS = ("classification", "regression")
STATISTICS_BATCH = 1024  # samples per batch of a streaming statistics pass


@dataclass
class Batch:
    """One mini-batch: ``inputs[name]`` is ``(B, d)`` (vectors) or ``(B, T, d)``
    (sequences, padded), ``masks[name]`` the ``(B, T)`` bool mask of real steps
    (sequence modalities only), ``labels`` ``(B,)`` int64 class indices or, for
    regression, float32 targets; ``present`` the ``(B, M)`` bool mask of the
    modalities each sample has, in the dataset's modality order (None: the data
    has no missing modality)."""

    inputs: dict
    labels: torch.Tensor
    masks: dict = field(default_factory=dict)
    present: torch.Tensor = None

    def __len__(self):
        return self.labels.shape[0]

    def to(self, device):
        move = lambda d: {k: v.to(device, non_blocking=True) for k, v in d.items()}  # noqa: E731
        present = None if self.present is None else self.present.to(device, non_blocking=True)
        return Batch(move(self.inputs), self.labels.to(device), move(self.masks), present)

    def replace(self, name, value):
        """A batch with modality ``name``'s input replaced by ``value``."""
        return Batch({**self.inputs, name: value}, self.labels, self.masks, self.present)

    def select(self, rows):
        """The samples at ``rows`` (a slice or an index tensor) as a Batch."""
        present = None if self.present is None else self.present[rows]
        return Batch({k: v[rows] for k, v in self.inputs.items()}, self.labels[rows],
                     {k: m[rows] for k, m in self.masks.items()}, present)


class RawTexts(NamedTuple):
    """A modality that is a frozen text encoder's embeddings, with its raw texts: ``texts`` (one per
    sample, in dataset order; None where the sample has no text) and ``encode`` (texts, None allowed
    -> ``(len(texts), dim)`` array of the encoder's output, before standardisation)."""

    texts: list
    encode: Callable


@dataclass(frozen=True)
class ModalitySpec:
    """What a model needs to know about one modality: its feature dimension and,
    for sequences, the padded length."""

    dim: int
    max_len: int = 0  # 0: a single vector per sample

    @property
    def is_sequence(self):
        return self.max_len > 0


def _without_absent(value, kept):
    """``value`` (a tensor or a list of sequences) with the samples not ``kept`` zeroed, whatever they held."""
    if isinstance(value, list):
        return [item if keep else torch.zeros_like(item) for item, keep in zip(value, kept.tolist())]
    return torch.where(kept.view(-1, *[1] * (value.ndim - 1)), value, 0.0)


def counted_rows(value, mask, kept):
    """The feature rows that a modality's statistics count: those of the samples that have it
    (``kept``; None: all) and, for a sequence (``mask``: its real steps; None for vectors), their real steps."""
    if kept is not None:
        value, mask = value[kept], None if mask is None else mask[kept]
    return value if mask is None else value[mask]


def guarded_std(std):
    """Standard deviations with the constant (or single-sample, NaN) features left unscaled."""
    return torch.where(std > 1e-6, std, torch.ones_like(std))


def standardized(inputs, masks, present, statistics):
    """``inputs`` standardised per feature with ``statistics`` (``{name: (mean, std)}``), padding and the
    entries of absent modalities (``present``, ``(N, M)`` or None) zero again."""
    out = {}
    for position, (key, value) in enumerate(inputs.items()):
        mean, std = statistics[key]
        value = (value - mean) / std
        if key in masks:
            value = value * masks[key][..., None]
        if present is not None:
            value = _without_absent(value, present[:, position])
        out[key] = value
    return out


def streaming_statistics(batches, modalities):
    """Each modality's per-feature mean and (unbiased) standard deviation over the training samples
    that have it (real steps only), in one pass over ``batches`` of raw values: float64 sums merged
    batch by batch (Chan et al.), so memory stays that of one batch."""
    count, mean, m2 = dict.fromkeys(modalities, 0), {}, {}
    for batch in batches:
        for position, key in enumerate(modalities):
            kept = None if batch.present is None else batch.present[:, position]
            rows = counted_rows(batch.inputs[key], batch.masks.get(key), kept).double()
            if not len(rows):
                continue
            batch_mean = rows.mean(0)
            batch_m2 = (rows - batch_mean).square().sum(0)
            if not count[key]:
                count[key], mean[key], m2[key] = len(rows), batch_mean, batch_m2
                continue
            total, delta = count[key] + len(rows), batch_mean - mean[key]
            mean[key] = mean[key] + delta * (len(rows) / total)
            m2[key] = m2[key] + batch_m2 + delta.square() * (count[key] * len(rows) / total)
            count[key] = total
    for key in modalities:
        if not count[key]:
            fail("present", f"modality {key!r} in at least one training sample (its statistics)", "none")
    return {key: (mean[key].float(), guarded_std((m2[key] / (count[key] - 1)).sqrt().float()))
            for key in modalities}


def given_statistics(statistics, spec):
    """The user's ``{name: (mean, std)}`` for every modality of ``spec``, each a ``(dim,)`` float32
    tensor, std > 0."""
    if set(statistics) != set(spec):
        fail("standardize", f"{{name: (mean, std)}} for the modalities {', '.join(spec)}", repr(sorted(statistics)))
    out = {}
    for key, item in spec.items():
        pair = statistics[key]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            fail(f"standardize[{key!r}]", "a (mean, std) pair", type(pair).__name__, TypeError)
        mean, std = (torch.as_tensor(v, dtype=torch.float32) for v in pair)
        if mean.shape != (item.dim,) or std.shape != (item.dim,):
            fail(f"standardize[{key!r}]", f"a mean and a std of shape ({item.dim},)",
                 f"{tuple(mean.shape)} and {tuple(std.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            fail(f"standardize[{key!r}]", "a finite mean and a finite std > 0", "other values")
        out[key] = (mean, std)
    return out


class MultimodalData:
    """The data the Trainer, ``compare``, the CLI and ``evaluate`` take (docs/benchmark.md, "Your own
    torch data"). An implementation sets ``name``, ``task`` (one of ``TASKS``), ``classes`` (the class
    values; None for regression), ``spec`` (``{name: ModalitySpec}`` in modality order),
    ``source`` (where :func:`load_dataset` finds it again; None) and ``statistics`` (the
    ``{name: (mean, std)}`` its batches are standardised with; None), and implements
    ``split_size(split)`` and ``batches(split, batch_size)``. With ``random_access`` (the
    default) it also has ``indices(split)`` (the split's sample positions) and ``batch(index)``
    (the samples at those positions), which the Trainer's seeded epoch order and exact resume use;
    a stream (``random_access = False``) is read in its own order, pass after pass."""

    random_access = True
    source = None
    statistics = None
    natural_missingness = False  # True: every batch carries ``present``, even one where nothing is missing
    raw_texts = None  # {name: RawTexts} for modalities that are a frozen text encoder's embeddings

    @property
    def modalities(self):
        return tuple(self.spec)

    @property
    def num_classes(self):
        """The number of classes; None for regression."""
        return None if self.classes is None else len(self.classes)

    @property
    def num_outputs(self):
        """The model's output size: the number of classes, or 1 for regression."""
        return 1 if self.classes is None else len(self.classes)

    def split_size(self, split):
        return len(self.indices(split))

    def text_input(self, name, texts):
        """Modality ``name``'s input for raw ``texts`` (None: a missing text): its frozen encoder's
        embeddings standardised as the data's, ``(len(texts), dim)`` float32; what the evaluation's
        text corruptions feed the model (docs/corruptions.md, "Raw text")."""
        raw = self.raw_texts[name]
        embeddings = torch.as_tensor(raw.encode(list(texts)), dtype=torch.float32)
        if self.statistics is not None:
            mean, std = self.statistics[name]
            embeddings = (embeddings - mean) / std
        present = torch.tensor([t is not None for t in texts])
        return _without_absent(embeddings, present)

    def indices(self, split):
        raise NotImplementedError(f"{type(self).__name__} has no random access (a stream)")

    def batch(self, index):
        """The samples at ``index`` (a LongTensor of dataset positions) as a Batch."""
        return self._finished(self._raw_batch(index))

    def _raw_batch(self, index):
        """The samples at ``index`` as stored: not standardised."""
        raise NotImplementedError(f"{type(self).__name__} has no random access (a stream)")

    def _raw_batches(self, split, batch_size):
        index = self.indices(split)
        for start in range(0, len(index), batch_size):
            yield self._raw_batch(index[start:start + batch_size])

    def batches(self, split, batch_size, *, order=None):
        """Batches of ``split`` in ``order`` (a permutation of the split's positions;
        default: dataset order)."""
        integer("batch_size", batch_size, 1)
        index = self.indices(split)
        if order is not None:
            index = index[order]
        for start in range(0, len(index), batch_size):
            yield self.batch(index[start:start + batch_size])

    def _finished(self, batch):
        """A raw batch as the data gives it: standardised with ``statistics`` (when set) and, with
        natural missingness, with a ``present`` mask even where every sample has everything."""
        present = batch.present
        if present is None and self.natural_missingness:
            present = torch.ones(len(batch), len(self.spec), dtype=torch.bool)
        inputs = batch.inputs
        if self.statistics is not None:
            inputs = standardized(inputs, batch.masks, present, self.statistics)
        return Batch(inputs, batch.labels, batch.masks, present)

    def _fit_statistics(self, standardize):
        """``statistics`` from the ``standardize`` argument: False (None), True (one streaming pass over
        the raw training batches) or the user's ``{name: (mean, std)}``."""
        if standardize is False:
            return None
        if standardize is True:
            return streaming_statistics(self._raw_batches("train", STATISTICS_BATCH), self.modalities)
        return given_statistics(standardize, self.spec)

    def __repr__(self):
        shapes = ", ".join(f"{k}{(s.max_len, s.dim) if s.is_sequence else (s.dim,)}" for k, s in self.spec.items())
        target = "regression targets" if self.classes is None else f"{self.num_classes} classes"
        sizes = [self.split_size(s) for s in SPLITS]
        return f"{type(self).__name__}({self.name!r}: {target}, {shapes}; split {sizes})"
