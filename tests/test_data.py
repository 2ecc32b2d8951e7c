"""Loaders, splits, standardisation, padding, .npz files and bad input."""

import os

import numpy as np
import pytest
import torch

from modalimmune.data import MultimodalDataset, load_avdigits, load_dataset, stratified_split
from modalimmune.data.missing import random_present


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The models here are tiny: one thread is faster, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_arrays(n=60, classes=3, seed=0):
    """A small separable problem: 'a' carries the class, 'b' is noise, 'seq' a variable-length sequence."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    a = np.eye(classes)[y] * 3 + rng.normal(size=(n, classes)) * 0.3
    b = rng.normal(size=(n, 5))
    lengths = rng.integers(2, 7, size=n)
    seq = np.zeros((n, 6, 2), dtype=np.float32)
    for i, t in enumerate(lengths):
        seq[i, :t] = rng.normal(size=(t, 2)) + y[i]
    return {"a": a.astype(np.float32), "b": b.astype(np.float32), "seq": seq}, y, {"seq": lengths}


def tiny_dataset(n=60, classes=3, seed=0, split_seed=0):
    modalities, y, lengths = tiny_arrays(n, classes, seed)
    return MultimodalDataset(modalities, y, lengths=lengths, name="tiny", split_seed=split_seed)


def gappy_present(n):
    """The (n, 3) ``present`` mask of natural missingness: 'a' absent in every third sample, 'seq' in every
    fifth ('b' always there)."""
    present = np.ones((n, 3), dtype=bool)
    present[::3, 0] = False
    present[1::5, 2] = False
    return present


def gappy_dataset(n):
    """The tiny dataset with :func:`gappy_present`'s natural missingness."""
    modalities, y, lengths = tiny_arrays(n=n)
    return MultimodalDataset(modalities, y, lengths=lengths, present=gappy_present(n), name="gappy")


def test_mfeat_shapes_and_classes():
    data = load_dataset("mfeat")
    assert data.source == "mfeat"
    dims = {name: data.inputs[name].shape for name in data.modalities}
    assert dims == {"fou": (2000, 76), "fac": (2000, 216), "kar": (2000, 64), "pix": (2000, 240),
                    "zer": (2000, 47), "mor": (2000, 6)}
    assert data.num_classes == 10 and torch.bincount(data.labels).tolist() == [200] * 10
    assert [data.split_size(s) for s in ("train", "val", "test")] == [1400, 200, 400]


def test_avdigits_pairs_by_label_and_keeps_sequence_lengths():
    views, labels, image_labels = load_avdigits()
    assert views["image"].shape == (3000, 784) and len(views["audio"]) == 3000
    assert np.array_equal(labels, image_labels)  # every clip is paired with an image of its digit
    assert np.bincount(labels).tolist() == [300] * 10
    data = MultimodalDataset(views, labels, name="avdigits")
    lengths = torch.tensor([len(c) for c in views["audio"]])
    assert data.inputs["audio"].shape == (3000, int(lengths.max()), 13)
    assert torch.equal(data.masks["audio"].sum(1), lengths)
    assert (data.inputs["audio"][~data.masks["audio"]] == 0).all()  # padding stays zero after standardising
    again = load_avdigits()
    assert np.array_equal(again[0]["image"], views["image"])  # the pairing seed is fixed


def test_splits_are_stratified_disjoint_and_fixed_by_seed():
    labels = torch.arange(103) % 4
    first, again, other = (stratified_split(labels, (0.7, 0.1, 0.2), s) for s in (5, 5, 6))
    everything = torch.cat([first[s] for s in ("train", "val", "test")])
    assert torch.equal(torch.sort(everything).values, torch.arange(103))
    assert all(torch.equal(first[s], again[s]) for s in first)
    assert not torch.equal(first["train"], other["train"])
    for cls in range(4):
        counts = [int((labels[first[s]] == cls).sum()) for s in ("train", "val", "test")]
        total = int((labels == cls).sum())
        assert counts[1] == round(0.1 * total) and counts[2] == round(0.2 * total)


def test_a_split_stratified_by_given_strata():
    """``strata``: the split keeps each stratum's share (here a grouping unrelated to the classes), and
    bad strata are refused by name."""
    y = torch.arange(600) % 3
    groups = (torch.arange(600) // 3) % 4  # 150 samples per group, every class in each
    data = MultimodalDataset({"a": torch.randn(600, 2)}, y, strata=groups, split_seed=5)
    for split, share in zip(("train", "val", "test"), (0.7, 0.1, 0.2)):
        assert torch.bincount(groups[data.indices(split)]).tolist() == [round(150 * share)] * 4
    again = MultimodalDataset({"a": torch.randn(600, 2)}, y.float() * 1.5, task="regression", strata=groups,
                              split_seed=5)
    assert all(torch.equal(again.indices(s), data.indices(s)) for s in ("train", "val", "test"))
    with pytest.raises(ValueError, match=r"^strata: expected 600 values \(one per sample\), got 599"):
        MultimodalDataset({"a": torch.randn(600, 2)}, y, strata=groups[1:])
    with pytest.raises(ValueError, match=r"^strata: expected N integer class labels"):
        MultimodalDataset({"a": torch.randn(600, 2)}, y, strata=groups + 0.5)


def test_standardisation_uses_the_training_split_only():
    modalities, y, lengths = tiny_arrays()
    data = MultimodalDataset(modalities, y, lengths=lengths)
    train = data.indices("train")
    assert torch.allclose(data.inputs["a"][train].mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(data.inputs["a"][train].std(0), torch.ones(3), atol=1e-5)
    test = data.indices("test")
    modalities["a"][test.numpy()] += 100.0  # changing test features must not move the statistics
    shifted = MultimodalDataset(modalities, y, lengths=lengths)
    assert torch.equal(shifted.inputs["a"][train], data.inputs["a"][train])
    real = data.masks["seq"][train]
    assert torch.allclose(data.inputs["seq"][train][real].mean(0), torch.zeros(2), atol=1e-5)


def test_variable_length_lists_are_padded_with_masks():
    seqs = [torch.ones(t, 2) * t for t in (1, 4, 2, 3)]
    data = MultimodalDataset({"s": seqs, "v": torch.randn(4, 3)}, [0, 1, 0, 1], standardize=False,
                             splits={"train": [0, 1, 2, 3], "val": [0, 1], "test": [2, 3]})
    assert data.inputs["s"].shape == (4, 4, 2)
    assert data.masks["s"].sum(1).tolist() == [1, 4, 2, 3]
    assert data.inputs["s"][2, 2:].abs().sum() == 0 and data.spec["s"].max_len == 4
    batch = data.batch(torch.tensor([1, 3]))
    assert set(batch.masks) == {"s"} and batch.labels.tolist() == [1, 1]


def test_npz_round_trip(tmp_path):
    modalities, y, lengths = tiny_arrays()
    path = tmp_path / "mine.npz"
    np.savez(path, y=y, seq_lengths=lengths["seq"], **modalities)
    data = load_dataset(os.path.relpath(path))
    assert data.modalities == ("a", "b", "seq") and data.name == "mine"
    assert data.source == str(path) and os.path.isabs(data.source)  # model.pt records it: eval finds the file
    assert torch.equal(data.masks["seq"].sum(1), torch.as_tensor(lengths["seq"]))
    assert torch.equal(data.inputs["a"], tiny_dataset().inputs["a"])


@pytest.mark.parametrize("change, message", [
    (lambda m, y, lens: (m, y[:-1], lens), r"modalities\['a'\]: expected 59 samples \(one per label\), got 60"),
    (lambda m, y, lens: ({**m, "b": np.where(np.arange(60)[:, None] == 7, np.nan, m["b"])}, y, lens),
     r"modalities\['b'\]: expected finite features, got NaN or Inf in sample 7"),
    (lambda m, y, lens: (m, np.zeros_like(y), lens), "labels: expected at least 2 classes"),
    (lambda m, y, lens: (m, y, {"c": lens["seq"]}),
     r"lengths: expected keys among the modalities \(a, b, seq\), got 'c'"),
    (lambda m, y, lens: (m, y, {"seq": lens["seq"] + 5}), r"modalities\['seq'\]: expected lengths in \[1, 6\]"),
    (lambda m, y, lens: ({}, y, {}), "modalities: expected a non-empty dict"),
    (lambda m, y, lens: ({"a+b": m["a"]}, y, {}), "modalities: expected names that are non-empty strings without"),
    (lambda m, y, lens: ({**m, "a": np.array(3.0, dtype=np.float32)}, y, lens),
     r"modalities\['a'\]: expected samples first.*shape \(\)"),
])
def test_bad_arrays_raise_naming_the_argument(change, message):
    modalities, y, lengths = change(*tiny_arrays())
    with pytest.raises(ValueError, match=message):
        MultimodalDataset(modalities, y, lengths=lengths)


@pytest.mark.parametrize("labels", [np.array(list("abc" * 20)), np.array([None] * 60), [1j] * 60])
def test_labels_of_the_wrong_kind_are_refused_naming_labels(labels):
    modalities, _, lengths = tiny_arrays()
    with pytest.raises(TypeError, match=r"^labels: expected N integer class labels, got dtype"):
        MultimodalDataset(modalities, labels, lengths=lengths)


def test_an_empty_split_is_refused_unless_the_user_gives_the_split():
    two = {"a": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}  # one sample per class: the stratified split has no val/test
    with pytest.raises(ValueError, match=r"^splits: expected at least one sample in each of train, val and test, "
                                         r"got train 2, val 0, test 0 of 2 samples.*splits=\{'train'"):
        MultimodalDataset(two, [0, 1])
    with pytest.raises(ValueError, match=r"^splits: .*got train 4, val 0, test 0 of 4"):
        MultimodalDataset({"a": torch.randn(4, 2)}, [0, 1, 0, 1], fractions=(1.0, 0.0, 0.0))
    data = MultimodalDataset(two, [0, 1], splits={"train": [1, 0], "val": torch.tensor([0, 1]), "test": np.array([1])})
    assert {s: data.indices(s).tolist() for s in ("train", "val", "test")} == {"train": [0, 1], "val": [0, 1],
                                                                               "test": [1]}
    assert data.split_seed is None and "given" in repr(data)
    assert torch.allclose(data.inputs["a"].mean(0), torch.zeros(2))  # standardised on the given training split


@pytest.mark.parametrize("splits, error, message", [
    ([[0], [1], [2]], TypeError, r"^splits: expected None or a dict"),
    ({"train": [0, 1], "val": [2]}, ValueError, r"^splits: expected the keys 'train', 'val' and 'test'"),
    ({"train": [0, 1], "val": [2], "test": []}, ValueError, r"^splits\['test'\]: expected a non-empty 1-d array"),
    ({"train": [0, 4], "val": [2], "test": [3]}, ValueError, r"^splits\['train'\]: expected positions in \[0, 3\]"),
    ({"train": [0, 0], "val": [2], "test": [3]}, ValueError, r"^splits\['train'\]: expected distinct positions"),
    ({"train": [0.0, 1.0], "val": [2], "test": [3]}, TypeError, r"^splits\['train'\]: expected integer sample"),
    ({"train": [True, False], "val": [2], "test": [3]}, TypeError, r"^splits\['train'\]: expected integer sample"),
])
def test_bad_given_splits_are_refused(splits, error, message):
    with pytest.raises(error, match=message):
        MultimodalDataset({"a": torch.randn(4, 2)}, [0, 1, 0, 1], splits=splits)


def test_bad_dataset_names_and_files(tmp_path):
    with pytest.raises(ValueError, match=r"dataset: expected mfeat, avdigits, hapt, reviews, reviews_recommended, "
                                         r"reviews_rating or the path of an \.npz file, got 'nope'"):
        load_dataset("nope")
    with pytest.raises(FileNotFoundError, match="dataset: no such file"):
        load_dataset(str(tmp_path / "absent.npz"))
    np.savez(tmp_path / "nolabels.npz", a=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="has no 'y' array"):
        load_dataset(str(tmp_path / "nolabels.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        load_dataset(str(tmp_path / "junk.npz"))


def _write_bad_npz(folder, kind):
    """An .npz that once ended in a traceback or a misleading message."""
    path = folder / f"{kind}.npz"
    modalities, y, _ = tiny_arrays(n=30)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("a,b,y\n0.5,1.5,0\n")
    elif kind == "npy":
        with open(path, "wb") as file:
            np.save(file, modalities["a"])
    elif kind == "truncated":
        np.savez(path, y=y, a=modalities["a"])
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "scalar":
        np.savez(path, y=y, a=np.float32(3.0), b=modalities["b"])
    elif kind == "string-labels":
        np.savez(path, y=np.array(list("xyz" * 10)), a=modalities["a"])
    elif kind == "objects":
        np.savez(path, y=y, a=np.array([{"x": 1}] * 30, dtype=object))
    elif kind == "two-samples":
        np.savez(path, y=y[:2], a=modalities["a"][:2])
    return path


BAD_NPZ = [  # (kind, error, what the message must say)
    ("empty", ValueError, r"^dataset: cannot read .*empty\.npz: the file is empty$"),
    ("text", ValueError, r"^dataset: cannot read .*text\.npz: it is not an \.npz archive.*starts with b'a,b,'"),
    ("npy", ValueError, r"^dataset: cannot read .*npy\.npz: it is not an \.npz archive"),
    ("truncated", ValueError, r"^dataset: cannot read .*truncated\.npz as an \.npz archive"),
    ("scalar", ValueError, r"^dataset: .*scalar\.npz: modalities\['a'\]: expected samples first.*got shape \(\)$"),
    ("string-labels", TypeError, r"^dataset: .*string-labels\.npz: y: expected N integer class labels, got dtype <U1$"),
    ("objects", ValueError, r"^dataset: array 'a' of .*objects\.npz cannot be read"),
    ("two-samples", ValueError, r"^dataset: .*two-samples\.npz: splits: expected at least one sample in each"),
]


@pytest.mark.parametrize("kind, error, message", BAD_NPZ, ids=[case[0] for case in BAD_NPZ])
def test_bad_npz_files_are_refused_naming_the_array(tmp_path, kind, error, message):
    path = _write_bad_npz(tmp_path, kind)
    with pytest.raises(error, match=message):
        load_dataset(str(path))


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.9, 1.0])
def test_random_present_keeps_at_least_one(rate):
    generator = torch.Generator().manual_seed(1)
    present = random_present(4000, 3, rate, generator)
    assert present.any(1).all()
    if rate == 0.0:
        assert present.all()
    if rate == 1.0:
        assert (present.sum(1) == 1).all()
    if 0 < rate < 1:  # P(kept) = (1 - r) + r^M / M: the rescue adds back one modality of the all-dropped rows
        expected = (1 - rate) + rate ** 3 / 3
        assert abs(present.float().mean().item() - expected) < 0.03


def test_natural_missingness_zero_fills_absent_entries_and_standardises_on_present_samples():
    modalities, y, lengths = tiny_arrays()
    present = np.ones((60, 3), dtype=bool)
    present[::4, 0] = False  # 'a' absent in 15 samples, which hold NaN
    present[1::4, 2] = False  # 'seq' absent in 15 others, with lengths out of range
    modalities["a"][::4] = np.nan
    lengths["seq"][1::4] = 0
    data = MultimodalDataset(modalities, y, lengths=lengths, present=present)
    assert torch.equal(data.present, torch.as_tensor(present))
    absent_a = torch.as_tensor(~present[:, 0])
    assert (data.inputs["a"][absent_a] == 0).all()
    train = data.indices("train")
    kept = train[torch.as_tensor(present[:, 0])[train]]
    assert torch.allclose(data.inputs["a"][kept].mean(0), torch.zeros(3), atol=1e-5)  # statistics: present only
    assert torch.allclose(data.inputs["a"][kept].std(0), torch.ones(3), atol=1e-5)
    absent_seq = torch.as_tensor(~present[:, 2])
    assert (data.inputs["seq"][absent_seq] == 0).all() and (data.masks["seq"][absent_seq].sum(1) == 1).all()
    batch = data.batch(torch.tensor([0, 1, 2]))
    assert batch.present.tolist() == present[:3].tolist()
    assert torch.equal(batch.to("cpu").present, batch.present)
    assert torch.equal(batch.replace("a", batch.inputs["a"] + 1).present, batch.present)
    as_dict = MultimodalDataset(modalities, y, lengths=lengths, present={"a": present[:, 0], "seq": present[:, 2]})
    assert all(torch.equal(as_dict.inputs[k], data.inputs[k]) for k in data.modalities)


def test_no_missingness_keeps_batches_without_present():
    modalities, y, lengths = tiny_arrays()
    every = MultimodalDataset(modalities, y, lengths=lengths, present=np.ones((60, 3), dtype=bool))
    plain = tiny_dataset()
    assert every.present is None and plain.batch(torch.arange(4)).present is None
    assert all(torch.equal(every.inputs[k], plain.inputs[k]) for k in plain.modalities)
    report = plain.missingness()
    assert report["all"] == {"samples": 60, "missing": {"a": 0.0, "b": 0.0, "seq": 0.0}, "patterns": {"a+b+seq": 60}}


def test_missingness_reports_fractions_and_patterns_per_split():
    modalities, y, lengths = tiny_arrays()
    present = np.ones((60, 3), dtype=bool)
    present[:10, 1] = False
    present[10:13, 0] = False
    data = MultimodalDataset(modalities, y, lengths=lengths, present=present)
    report = data.missingness()
    assert report["all"]["samples"] == 60 and report["all"]["patterns"] == {"a+b+seq": 47, "a+seq": 10, "b+seq": 3}
    assert report["all"]["missing"] == pytest.approx({"a": 3 / 60, "b": 10 / 60, "seq": 0.0})
    for split in ("train", "val", "test"):
        rows = present[data.indices(split).numpy()]
        assert report[split]["samples"] == len(rows)
        assert sum(report[split]["patterns"].values()) == len(rows)
        assert report[split]["missing"]["b"] == pytest.approx((~rows[:, 1]).mean())
    assert "missing a 5.0%, b 16.7%" in repr(data)


def test_regression_targets_are_floats_in_their_own_units_with_a_binned_split():
    modalities, _, lengths = tiny_arrays(n=200)
    targets = np.random.default_rng(3).normal(50.0, 10.0, size=200)
    data = MultimodalDataset(modalities, targets, lengths=lengths, task="regression")
    assert data.labels.dtype == torch.float32
    assert torch.equal(data.labels, torch.as_tensor(targets, dtype=torch.float32))  # not standardised
    assert data.classes is None and data.num_classes is None and data.num_outputs == 1 and data.task == "regression"
    assert "regression targets" in repr(data)
    assert [data.split_size(s) for s in ("train", "val", "test")] == [140, 20, 40]
    deciles = np.quantile(targets, np.linspace(0, 1, 11)[1:-1])
    for split in ("val", "test"):  # every decile of the target is in every split
        assert len(np.unique(np.searchsorted(deciles, targets[data.indices(split).numpy()]))) == 10
    again = MultimodalDataset(modalities, targets, lengths=lengths, task="regression")
    assert all(torch.equal(again.splits[s], data.splits[s]) for s in data.splits)
    assert tiny_dataset().num_outputs == 3 and tiny_dataset().task == "classification"


def test_npz_may_carry_present(tmp_path):
    modalities, y, lengths = tiny_arrays()
    present = np.ones((60, 3), dtype=bool)
    present[5, 0] = present[6, 1] = False
    modalities["a"][5] = np.nan
    path = tmp_path / "gaps.npz"
    np.savez(path, y=y, seq_lengths=lengths["seq"], present=present, **modalities)
    data = load_dataset(str(path))
    assert data.modalities == ("a", "b", "seq") and data.present[:7, :2].tolist() == present[:7, :2].tolist()
    assert (data.inputs["a"][5] == 0).all()
    np.savez(path, y=y, present=present[:, :2], **modalities)
    with pytest.raises(ValueError, match=r"^dataset: .*gaps\.npz: present: expected a \(60, 3\) bool array"):
        load_dataset(str(path))


def test_random_present_within_the_natural_missingness():
    generator = torch.Generator().manual_seed(2)
    within = torch.rand(3000, 3, generator=generator) < 0.6
    within[~within.any(1), 1] = True
    for rate in (0.0, 0.5, 1.0):
        present = random_present(3000, 3, rate, generator, within=within)
        assert present.any(1).all() and not (present & ~within).any()  # never a modality the sample lacks
        if rate == 0.0:
            assert torch.equal(present, within)
    kept = random_present(3000, 3, 1.0, generator, within=within)
    assert (kept.sum(1) == 1).all() and kept.float().mean(0).min() > 0.2  # the rescue chooses among the present
    with pytest.raises(ValueError, match=r"^within: expected a \(3000, 3\) bool mask"):
        random_present(3000, 3, 0.5, generator, within=within[:, :2])
