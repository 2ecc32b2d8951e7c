"""``collate``: dict samples ``{modality: tensor, ..., "label": y, "present": {modality: bool}}`` into
a Batch (docs/benchmark.md, "Your own torch data"); also a ``DataLoader``'s ``collate_fn``."""

import math
import numbers

import numpy as np
import torch

from ..checks import choice, fail
from .base import TASKS, Batch, ModalitySpec
from .dataset import _float_features

LABEL, PRESENT = "label", "present"


def sample_modalities(sample, where):
    """The modality order a sample gives: its keys other than ``label`` and ``present``, then the
    modalities named only in its ``present``."""
    if not isinstance(sample, dict):
        fail(where, "a dict sample {modality: tensor, ..., 'label': y}", type(sample).__name__, TypeError)
    present = sample.get(PRESENT, {})
    names = [k for k in sample if k not in (LABEL, PRESENT)]
    names += [k for k in (present if isinstance(present, dict) else {}) if k not in sample]
    if not names:
        fail(where, "at least one modality besides 'label' and 'present'", f"the keys {list(sample)}")
    return checked_modalities(names, where)


def checked_modalities(names, where):
    """``names`` as a tuple of distinct modality names: non-empty strings without '+' (the pattern separator)."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        fail(where, "a non-empty list of modality names", repr(names), TypeError)
    for key in names:
        if not isinstance(key, str) or not key or "+" in key or key in (LABEL, PRESENT):
            fail(where, "modality names that are non-empty strings without '+', not 'label' or 'present'",
                 repr(key))
    if len(set(names)) != len(names):
        fail(where, "distinct modality names", repr(list(names)))
    return tuple(names)


def _size(value):
    return value.numel() if isinstance(value, torch.Tensor) else value.size


def _integral(value):
    """Whether a tensor or an ndarray holds bools or integers."""
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "biu"
    return not (value.is_floating_point() or value.is_complex())


def _flag(name, value):
    """One entry of a sample's ``present``: a bool, 0 or 1, or a one-element tensor of them."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and _integral(value) and _size(value) == 1:
        value = value.item()
    if not isinstance(value, (bool, int, np.bool_, np.integer)):
        fail(name, "True or False", repr(value), TypeError)
    if value not in (0, 1):
        fail(name, "True or False", repr(value))
    return bool(value)


def label_task(label):
    """The task a label's type says when none is given: integers classify, floats regress."""
    if isinstance(label, (torch.Tensor, np.ndarray)):
        return "classification" if _integral(label) else "regression"
    return "classification" if isinstance(label, numbers.Integral) else "regression"


def _label(name, value, task):
    """A sample's label as a Python int (class) or float (regression target)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if _size(value) != 1:
            fail(name, "one label (a number or a one-element tensor)", f"shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        fail(name, "a number", repr(value), TypeError)
    if task == "classification":
        if not (isinstance(value, numbers.Integral) or float(value).is_integer()):  # NaN included
            fail(name, "an integer class label", repr(value))
        return int(value)
    if not math.isfinite(value):
        fail(name, "a finite regression target", repr(value))
    return float(value)


def sample_parts(sample, where, modalities, task):
    """One sample checked: ({name: float32 tensor} for the modalities it has, its label). Every key
    must be a modality, ``label`` or ``present``; a modality may be left out only where ``present``
    says the sample lacks it; what an absent modality holds is ignored."""
    if not isinstance(sample, dict):
        fail(where, "a dict sample {modality: tensor, ..., 'label': y}", type(sample).__name__, TypeError)
    if LABEL not in sample:
        fail(where, "a 'label' key", f"the keys {[str(k) for k in sample]}")
    for key in sample:
        if key not in modalities and key not in (LABEL, PRESENT):
            fail(where, f"keys among 'label', 'present' and the modalities ({', '.join(modalities)})", repr(key))
    present = sample.get(PRESENT, {})
    if not isinstance(present, dict):
        fail(f"{where}['present']", "a dict {modality: bool}", type(present).__name__, TypeError)
    for key in present:
        if key not in modalities:
            fail(f"{where}['present']", f"keys among the modalities ({', '.join(modalities)})", repr(key))
    values = {}
    for name in modalities:
        if not _flag(f"{where}['present'][{name!r}]", present.get(name, True)):
            continue
        if name not in sample:
            fail(where, f"the modality {name!r} (or present={{{name!r}: False}})", f"the keys {list(sample)}")
        value = _float_features(f"{where}[{name!r}]", sample[name])
        if value.ndim not in (1, 2) or not value.numel():
            fail(f"{where}[{name!r}]", "a (d,) vector or a (T, d) sequence, not empty", f"shape {tuple(value.shape)}")
        if not torch.isfinite(value).all():
            fail(f"{where}[{name!r}]", "finite features", "NaN or Inf")
        values[name] = value
    if not values:
        fail(f"{where}['present']", "at least one modality in the sample", "none")
    return values, _label(f"{where}['label']", sample[LABEL], task)


def check_shape(where, name, value, known):
    """``value`` agrees with ``known`` = (rank, dim, max_len or None): a (d,) vector or a (T, d) sequence."""
    rank, dim, max_len = known
    if value.ndim != rank:
        what = "a (T, d) sequence" if rank == 2 else "a (d,) vector"
        fail(f"{where}[{name!r}]", f"{what} like the modality's other samples", f"shape {tuple(value.shape)}")
    if value.shape[-1] != dim:
        fail(f"{where}[{name!r}]", f"{dim} features like the modality's other samples", f"shape {tuple(value.shape)}")
    if max_len is not None and rank == 2 and len(value) > max_len:
        fail(f"{where}[{name!r}]", f"at most {max_len} steps (the spec)", f"{len(value)}")


def collated(samples, names, modalities, spec, task):
    """``samples`` (their ``names`` for errors) as a Batch; ``spec`` (``{name: ModalitySpec}`` or None)
    fixes each modality's shape and padded length, else the batch's samples do."""
    parts = [sample_parts(s, where, modalities, task) for s, where in zip(samples, names)]
    inputs, masks = {}, {}
    for name in modalities:
        values = [p[0].get(name) for p in parts]
        if spec is not None:
            known = (2 if spec[name].is_sequence else 1, spec[name].dim, spec[name].max_len or None)
        else:
            first = next((v for v in values if v is not None), None)
            if first is None:
                fail("samples", f"modality {name!r} in at least one sample of the batch (its shape), or a spec",
                     "none")
            known = (first.ndim, first.shape[-1], None)
        for value, where in zip(values, names):
            if value is not None:
                check_shape(where, name, value, known)
        rank, dim, max_len = known
        if rank == 1:
            inputs[name] = torch.stack([torch.zeros(dim) if v is None else v for v in values])
            continue
        steps = max_len or max(len(v) for v in values if v is not None)
        padded, mask = torch.zeros(len(values), steps, dim), torch.zeros(len(values), steps, dtype=torch.bool)
        for row, value in enumerate(values):
            length = 1 if value is None else len(value)  # an absent sequence: one zero step
            if value is not None:
                padded[row, :length] = value
            mask[row, :length] = True
        inputs[name], masks[name] = padded, mask
    present = torch.tensor([[name in p[0] for name in modalities] for p in parts])
    labels = torch.tensor([p[1] for p in parts], dtype=torch.int64 if task == "classification" else torch.float32)
    return Batch(inputs, labels, masks, None if present.all() else present)


def collate(samples, *, modalities=None, spec=None, task=None):
    """Dict samples ``{modality: tensor, ..., "label": y}`` as a Batch: vectors ``(d,)`` stacked,
    sequences ``(T_i, d)`` zero-padded (to ``spec[name].max_len``, else to the longest) with their
    mask; an optional per-sample ``present`` (``{modality: bool}``; a modality not named is there)
    says which modalities the sample has -- an absent one may be left out and is zero (a sequence:
    one zero step); ``batch.present`` is None when every sample has every modality. Labels are
    int64 (classification) or float32 (regression); ``task`` None: as the first label's type says.
    ``modalities``: the order (default: the first sample's keys). Works as a DataLoader's
    ``collate_fn``. Bad input raises naming the sample and the key: ``samples[3]['audio']: ...``."""
    if not isinstance(samples, (list, tuple)):
        fail("samples", "a non-empty list of dict samples", type(samples).__name__, TypeError)
    if not samples:
        fail("samples", "a non-empty list of dict samples", "an empty one")
    if modalities is None:
        modalities = sample_modalities(samples[0], "samples[0]")
    modalities = checked_modalities(modalities, "modalities")
    if spec is not None and (not isinstance(spec, dict) or not all(isinstance(spec.get(m), ModalitySpec)
                                                                   for m in modalities)):
        fail("spec", f"None or {{name: ModalitySpec}} for the modalities {', '.join(modalities)}", repr(spec),
             TypeError)
    if task is None:
        task = label_task(samples[0].get(LABEL) if isinstance(samples[0], dict) else None)
    names = [f"samples[{i}]" for i in range(len(samples))]
    return collated(samples, names, modalities, spec, choice("task", task, TASKS))
