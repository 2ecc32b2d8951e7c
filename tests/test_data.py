"""Loaders, splits, standardisation, padding, .npz files and bad input."""

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


def test_mfeat_shapes_and_classes():
    data = load_dataset("mfeat")
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
    data = MultimodalDataset({"s": seqs, "v": torch.randn(4, 3)}, [0, 1, 0, 1], fractions=(1.0, 0.0, 0.0),
                             standardize=False)
    assert data.inputs["s"].shape == (4, 4, 2)
    assert data.masks["s"].sum(1).tolist() == [1, 4, 2, 3]
    assert data.inputs["s"][2, 2:].abs().sum() == 0 and data.spec["s"].max_len == 4
    batch = data.batch(torch.tensor([1, 3]))
    assert set(batch.masks) == {"s"} and batch.labels.tolist() == [1, 1]


def test_npz_round_trip(tmp_path):
    modalities, y, lengths = tiny_arrays()
    path = tmp_path / "mine.npz"
    np.savez(path, y=y, seq_lengths=lengths["seq"], **modalities)
    data = load_dataset(str(path))
    assert data.modalities == ("a", "b", "seq") and data.name == "mine"
    assert torch.equal(data.masks["seq"].sum(1), torch.as_tensor(lengths["seq"]))
    assert torch.equal(data.inputs["a"], tiny_dataset().inputs["a"])


@pytest.mark.parametrize("change, message", [
    (lambda m, y, l: (m, y[:-1], l), "has 60 samples but labels has 59"),
    (lambda m, y, l: ({**m, "b": np.where(np.arange(60)[:, None] == 7, np.nan, m["b"])}, y, l),
     r"modalities\['b'\].*sample 7 has NaN"),
    (lambda m, y, l: (m, np.zeros_like(y), l), "labels: expected at least 2 classes"),
    (lambda m, y, l: (m, y, {"c": l["seq"]}), "lengths: 'c' is not a modality"),
    (lambda m, y, l: (m, y, {"seq": l["seq"] + 5}), r"modalities\['seq'\]: lengths must lie in"),
    (lambda m, y, l: ({}, y, {}), "modalities: expected a non-empty dict"),
    (lambda m, y, l: ({"a+b": m["a"]}, y, {}), "modalities: names must be"),
])
def test_bad_arrays_raise_naming_the_argument(change, message):
    modalities, y, lengths = change(*tiny_arrays())
    with pytest.raises(ValueError, match=message):
        MultimodalDataset(modalities, y, lengths=lengths)


def test_bad_dataset_names_and_files(tmp_path):
    with pytest.raises(ValueError, match="dataset: unknown 'nope'"):
        load_dataset("nope")
    with pytest.raises(FileNotFoundError, match="dataset: no such file"):
        load_dataset(str(tmp_path / "absent.npz"))
    np.savez(tmp_path / "nolabels.npz", a=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="has no 'y' array"):
        load_dataset(str(tmp_path / "nolabels.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read"):
        load_dataset(str(tmp_path / "junk.npz"))


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
