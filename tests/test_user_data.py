"""A user's own data (docs/benchmark.md, "Your own torch data", "Memory-mapped folders"): map-style
Datasets, IterableDatasets and DataLoaders of dict samples, the padding collate and memory-mapped
folders train and evaluate through the one data interface, exactly like the in-memory dataset
where they hold the same data; bad input names the sample, the key or the file."""

import json
import os

import numpy as np
import pytest
import torch
from test_data import gappy_present, single_thread, tiny_arrays  # noqa: F401 (autouse fixture)
from torch.utils.data import DataLoader, Dataset, IterableDataset

from modalimmune import compare
from modalimmune.cli import main
from modalimmune.data import (
    MemmapDataset,
    MultimodalDataset,
    SampleDataset,
    SampleStream,
    as_data,
    base,
    collate,
    save_memmap_dataset,
)
from modalimmune.eval import evaluate
from modalimmune.models import build_model
from modalimmune.train import Trainer

N = 90
ORDER = ("a", "b", "seq")  # the first sample lacks 'a': its keys alone would put it last


def arrays(missing):
    modalities, y, lengths = tiny_arrays(n=N)
    return modalities, y, lengths, gappy_present(N) if missing else None


def dict_samples(modalities, y, lengths, present=None):
    """The same data as dict samples: the sequence cut to its length, an absent modality left out."""
    samples = []
    for i in range(len(y)):
        sample = {"a": torch.from_numpy(modalities["a"][i]), "b": torch.from_numpy(modalities["b"][i]),
                  "seq": torch.from_numpy(modalities["seq"][i, :lengths["seq"][i]]), "label": int(y[i])}
        if present is not None and not present[i].all():
            sample["present"] = {name: bool(has) for name, has in zip(("a", "b", "seq"), present[i])}
            for name, has in zip(("a", "b", "seq"), present[i]):
                if not has:
                    del sample[name]
        samples.append(sample)
    return samples


class MapStyle(Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


class Stream(IterableDataset):
    def __init__(self, samples):
        self.samples = samples

    def __iter__(self):
        return iter(self.samples)


def make_trainer(data, out_dir=None, **fields):
    torch.manual_seed(0)
    model = build_model("mlp", as_data(data).spec, as_data(data).num_outputs, hidden=16, embed_dim=8, fused_dim=16)
    fields = {"epochs": 2, "batch_size": 16, "progress": False, "patience": 0, "method": "modalimmune[hyper_every=2]",
              **fields}
    return Trainer(model, data, out_dir=out_dir, **fields)


def train(data, out_dir=None, **fields):
    trainer = make_trainer(data, out_dir, **fields)
    trainer.fit()
    return trainer


def same_parameters(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def same_batches(a, b):
    assert torch.equal(a.labels, b.labels) and a.inputs.keys() == b.inputs.keys() and a.masks.keys() == b.masks.keys()
    assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert (a.present is None) == (b.present is None)
    assert a.present is None or torch.equal(a.present, b.present)


def same_data_same_training(reference, data, tmp_path):
    """``data`` gives ``reference``'s splits and batches, trains the same parameters and metrics log and
    evaluates the same."""
    for split in ("train", "val", "test"):
        assert torch.equal(data.indices(split), reference.indices(split))
        for a, b in zip(reference.batches(split, 7), data.batches(split, 7)):
            same_batches(a, b)
    ours, theirs = train(reference, tmp_path / "ref"), train(data, tmp_path / "data")
    assert same_parameters(ours, theirs)
    assert (tmp_path / "ref" / "metrics.jsonl").read_text() == (tmp_path / "data" / "metrics.jsonl").read_text()
    assert evaluate(ours.model, reference) == evaluate(theirs.model, data)


@pytest.mark.parametrize("missing", [False, True], ids=["complete", "natural-missingness"])
@pytest.mark.parametrize("standardize", [False, True], ids=["raw", "same-statistics"])
def test_a_map_style_dataset_trains_exactly_like_the_same_multimodal_dataset(tmp_path, missing, standardize):
    modalities, y, lengths, present = arrays(missing)
    reference = MultimodalDataset(modalities, y, lengths=lengths, present=present, name="tiny",
                                  standardize=standardize)
    user = SampleDataset(MapStyle(dict_samples(modalities, y, lengths, present)), name="tiny", modalities=ORDER,
                         standardize=reference.statistics if standardize else False)
    assert user.spec == reference.spec and user.natural_missingness == missing
    same_data_same_training(reference, user, tmp_path)


def test_streaming_statistics_equal_the_in_memory_ones():
    modalities, y, lengths, present = arrays(missing=True)
    reference = MultimodalDataset(modalities, y, lengths=lengths, present=present)
    user = SampleDataset(dict_samples(modalities, y, lengths, present), modalities=ORDER, standardize=True)
    for name, (mean, std) in reference.statistics.items():
        assert torch.allclose(user.statistics[name][0], mean, atol=1e-6)
        assert torch.allclose(user.statistics[name][1], std, atol=1e-6)
    many = base.streaming_statistics(user._raw_batches("train", 5), user.modalities)  # merged over 9 batches
    for name in many:
        assert torch.allclose(many[name][0], user.statistics[name][0], atol=1e-6)
        assert torch.allclose(many[name][1], user.statistics[name][1], atol=1e-6)


def test_user_splits_by_indices_or_by_function():
    modalities, y, lengths, _ = arrays(missing=False)
    samples = dict_samples(modalities, y, lengths)
    given = {"train": range(0, 60), "val": range(60, 75), "test": range(75, 90)}
    by_indices = SampleDataset(samples, splits={k: list(v) for k, v in given.items()})
    by_function = SampleDataset(samples, splits=lambda i, sample: next(k for k, v in given.items() if i in v))
    for split, positions in given.items():
        assert by_indices.indices(split).tolist() == list(positions) == by_function.indices(split).tolist()
    assert by_function.split_size("val") == 15


def test_iterable_datasets_and_data_loaders_train_and_evaluate(tmp_path):
    modalities, y, lengths, present = arrays(missing=True)
    samples = dict_samples(modalities, y, lengths, present)
    reference = SampleDataset(samples, splits={"train": range(60), "val": range(60, 75), "test": range(75, 90)},
                              modalities=ORDER)
    fixed = [{"a": s.get("a", torch.zeros(3)), "b": s["b"], "label": s["label"], "present": {"a": "a" in s, "b": True}}
             for s in samples]  # the default collate needs every key in every sample, and sequences of one length
    loaders = {
        "iterable": {"train": Stream(samples[:60]), "val": Stream(samples[60:75]), "test": samples[75:]},
        "loader-collate": {"train": DataLoader(samples[:60], batch_size=8, collate_fn=collate),
                           "val": DataLoader(samples[60:75], batch_size=None), "test": Stream(samples[75:])},
        "loader-default-collate": {"train": DataLoader(fixed[:60], batch_size=8), "val": fixed[60:75],
                                   "test": DataLoader(fixed[75:], batch_size=4)},
    }
    for kind, splits in loaders.items():
        stream = SampleStream(splits, standardize=True, modalities=None if kind.endswith("default-collate") else ORDER)
        assert [stream.split_size(s) for s in ("train", "val", "test")] == [60, 15, 15], kind
        if kind != "loader-default-collate":  # the same samples as the map-style dataset, in its order
            assert stream.spec == reference.spec and stream.natural_missingness
            for a, b in zip(SampleDataset(samples, splits=reference.splits, standardize=stream.statistics,
                                          modalities=ORDER)
                            .batches("train", 16), stream.batches("train", 16)):
                same_batches(a, b)
        trainer = train(stream, tmp_path / kind, epochs=1)
        assert trainer.state["step"] == 4 and all(torch.isfinite(p).all() for p in trainer.params)
        result = evaluate(trainer.model, stream)
        assert 0 <= result["clean_accuracy"] <= 1 and result["natural_pattern_accuracy"] is not None


def test_a_stream_resumes_by_replaying_its_pass(tmp_path):
    modalities, y, lengths, _ = arrays(missing=False)
    samples = dict_samples(modalities, y, lengths)
    stream = SampleStream({"train": Stream(samples[:60]), "val": samples[60:75], "test": samples[75:]})
    whole = train(stream, tmp_path / "whole", checkpoint_every=3)
    make_trainer(stream, tmp_path / "cut", checkpoint_every=3).fit(max_steps=5)  # "killed" mid-epoch after step 5
    resumed = make_trainer(stream, tmp_path / "cut", checkpoint_every=3)  # the checkpoint of step 3
    resumed.fit(resume=True)
    assert same_parameters(whole, resumed)
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("missing", [False, True], ids=["complete", "natural-missingness"])
def test_a_memmap_folder_round_trips_and_trains_like_the_in_memory_dataset(tmp_path, missing):
    modalities, y, lengths, present = arrays(missing)
    reference = MultimodalDataset(modalities, y, lengths=lengths, present=present, name="tiny")
    folder = save_memmap_dataset(reference, tmp_path / "tiny", batch_size=16)
    mapped = MemmapDataset(folder)
    assert mapped.statistics is None  # written standardised: read as written
    assert sorted(os.listdir(folder)) == sorted(["meta.json", "labels.npy", "splits.npz", "a.npy", "b.npy", "seq.npy",
                                                 "seq_lengths.npy"] + ["present.npy"] * missing)
    assert (mapped.spec, mapped.classes.tolist(), mapped.natural_missingness) == (
        reference.spec, reference.classes.tolist(), missing)
    same_data_same_training(reference, mapped, tmp_path)


def test_a_raw_memmap_folder_is_standardised_with_cached_statistics(tmp_path, monkeypatch):
    modalities, y, lengths, present = arrays(missing=True)
    reference = MultimodalDataset(modalities, y, lengths=lengths, present=present)
    raw = MultimodalDataset(modalities, y, lengths=lengths, present=present, standardize=False)
    folder = save_memmap_dataset(raw, tmp_path / "raw")
    mapped = MemmapDataset(folder)
    assert os.path.exists(os.path.join(folder, "statistics.npz"))
    for name, (mean, std) in reference.statistics.items():
        assert torch.allclose(mapped.statistics[name][0], mean, atol=1e-6)
        assert torch.allclose(mapped.statistics[name][1], std, atol=1e-6)
    index = reference.indices("test")
    for name in reference.modalities:
        assert torch.allclose(mapped.batch(index).inputs[name], reference.batch(index).inputs[name], atol=1e-5)
    monkeypatch.setattr(base, "streaming_statistics", lambda *a: pytest.fail("the cache was not used"))
    again = MemmapDataset(folder)
    assert all(torch.equal(again.statistics[k][1], mapped.statistics[k][1]) for k in mapped.statistics)
    assert MemmapDataset(folder, standardize=False).statistics is None


def test_a_memmap_folder_of_a_stream_keeps_its_splits_in_order(tmp_path):
    modalities, y, lengths, present = arrays(missing=True)
    samples = dict_samples(modalities, y, lengths, present)
    stream = SampleStream({"train": samples[:60], "val": samples[60:75], "test": samples[75:]}, modalities=ORDER)
    mapped = MemmapDataset(save_memmap_dataset(stream, tmp_path / "s"), standardize=False)
    assert mapped.indices("val").tolist() == list(range(60, 75))
    for split in ("train", "val", "test"):
        for a, b in zip(stream.batches(split, 8), mapped.batches(split, 8)):
            same_batches(a, b)


def test_a_memmap_folder_without_splits_is_split_by_split_seed(tmp_path):
    modalities, y, lengths, _ = arrays(missing=False)
    reference = MultimodalDataset(modalities, y, lengths=lengths, split_seed=3)
    folder = save_memmap_dataset(reference, tmp_path / "f")
    os.unlink(os.path.join(folder, "splits.npz"))
    mapped = MemmapDataset(folder, split_seed=3)
    assert all(torch.equal(mapped.indices(s), reference.indices(s)) for s in ("train", "val", "test"))


def test_the_trainer_and_compare_take_a_torch_dataset_and_split_iterables(tmp_path):
    modalities, y, lengths, _ = arrays(missing=False)
    samples = dict_samples(modalities, y, lengths)
    trainer = train(MapStyle(samples), epochs=1)  # wrapped: SampleDataset, stratified split
    assert isinstance(trainer.dataset, SampleDataset) and trainer.dataset.split_size("train") == 63
    splits = {"train": samples[:60], "val": samples[60:75], "test": samples[75:]}
    report = compare(splits, ["erm", "moddrop"], 1, str(tmp_path / "cmp"), epochs=1, batch_size=16, progress=False,
                     log=lambda line: None)
    assert set(report["methods"]) == {"erm", "moddrop"}


def test_the_cli_trains_and_evaluates_a_memmap_folder(tmp_path, capsys):
    modalities, y, lengths, present = arrays(missing=True)
    folder = save_memmap_dataset(MultimodalDataset(modalities, y, lengths=lengths, present=present, name="tiny",
                                                   standardize=False), tmp_path / "tiny")
    out = tmp_path / "run"
    assert main(["train", "--dataset", folder, "--method", "moddrop", "--epochs", "2", "--out", str(out),
                 "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["finished"]
    assert main(["eval", "--checkpoint", str(out / "model.pt"), "--out", str(tmp_path / "eval")]) == 0  # the source
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert json.loads(capsys.readouterr().out)["clean_accuracy"] == result["clean_accuracy"]
    assert set(result["natural_pattern_accuracy"]) == {"a+b+seq", "b+seq", "a+b", "b"}


def test_collate_stacks_pads_and_masks():
    samples = [{"v": torch.ones(3), "s": torch.full((2, 4), 2.0), "label": 1},
               {"v": np.zeros(3, dtype=np.float64), "present": {"s": False}, "label": np.int64(0)},
               {"v": torch.arange(3.0), "s": torch.ones(4, 4, dtype=torch.float64), "label": torch.tensor(2)}]
    batch = collate(samples)
    assert batch.inputs["v"].shape == (3, 3) and batch.inputs["v"].dtype == torch.float32
    assert batch.inputs["s"].shape == (3, 4, 4) and batch.masks["s"].sum(1).tolist() == [2, 1, 4]
    assert batch.inputs["s"][0, 2:].abs().sum() == 0 and batch.inputs["s"][1].abs().sum() == 0  # padding, absent
    assert batch.present.tolist() == [[True, True], [True, False], [True, True]]
    assert batch.labels.dtype == torch.int64 and batch.labels.tolist() == [1, 0, 2]
    padded = collate(samples, spec={"v": base.ModalitySpec(3), "s": base.ModalitySpec(4, 6)})
    assert padded.inputs["s"].shape == (3, 6, 4) and torch.equal(padded.inputs["s"][:, :4], batch.inputs["s"])
    regression = collate([{"v": torch.ones(2), "label": 0.5}, {"v": torch.zeros(2), "label": 3}])
    assert regression.labels.dtype == torch.float32 and regression.present is None
    assert regression.labels.tolist() == [0.5, 3.0] and set(regression.masks) == set()
    assert collate([{"v": torch.ones(2), "label": 1.0}], task="classification").labels.dtype == torch.int64


COLLATE_ERRORS = [  # (samples, error, message)
    ([{"v": torch.ones(2), "label": 0}, {"v": torch.ones(2)}], ValueError,
     r"^samples\[1\]: expected a 'label' key, got the keys \['v'\]$"),
    ([{"v": torch.ones(2), "label": 0}, {"v": torch.ones(2, 2), "label": 1}], ValueError,
     r"^samples\[1\]\['v'\]: expected a \(d,\) vector like the modality's other samples, got shape \(2, 2\)$"),
    ([{"v": torch.ones(2, 2, 2), "label": 0}], ValueError,
     r"^samples\[0\]\['v'\]: expected a \(d,\) vector or a \(T, d\) sequence, not empty, got shape \(2, 2, 2\)$"),
    ([{"v": torch.ones(2), "w": torch.ones(1), "label": 0}, {"v": torch.ones(2), "present": {"x": False}, "label": 1}],
     ValueError, r"^samples\[1\]\['present'\]: expected keys among the modalities \(v, w\), got 'x'$"),
    ([{"v": torch.ones(2), "label": 0}, {"v": torch.ones(2), "x": torch.ones(2), "label": 1}], ValueError,
     r"^samples\[1\]: expected keys among 'label', 'present' and the modalities \(v\), got 'x'$"),
    ([{"v": torch.ones(2), "w": torch.ones(1), "label": 0}, {"v": torch.ones(2), "label": 1}], ValueError,
     r"^samples\[1\]: expected the modality 'w' \(or present=\{'w': False\}\)"),
    ([{"v": torch.ones(2), "present": {"v": False}, "label": 0}], ValueError,
     r"^samples\[0\]\['present'\]: expected at least one modality in the sample, got none$"),
    ([{"v": torch.ones(2), "present": {"v": 2}, "label": 0}], ValueError,
     r"^samples\[0\]\['present'\]\['v'\]: expected True or False, got 2$"),
    ([{"v": torch.ones(2), "label": 0}, {"v": torch.ones(2), "label": 1.5}], ValueError,
     r"^samples\[1\]\['label'\]: expected an integer class label, got 1\.5$"),
    ([{"v": torch.ones(2), "label": 0}, {"v": torch.ones(2), "label": "cat"}], TypeError,
     r"^samples\[1\]\['label'\]: expected a number, got 'cat'$"),
    ([{"v": torch.tensor([1.0, float("nan")]), "label": 0}], ValueError,
     r"^samples\[0\]\['v'\]: expected finite features, got NaN or Inf$"),
    ([{"v": np.array(["a", "b"]), "label": 0}], TypeError, r"^samples\[0\]\['v'\]: expected numeric features"),
    ([{"v": torch.ones(2), "label": 0}, [1, 2]], TypeError, r"^samples\[1\]: expected a dict sample"),
    ([], ValueError, r"^samples: expected a non-empty list of dict samples, got an empty one$"),
]


@pytest.mark.parametrize("samples, error, message", COLLATE_ERRORS, ids=[str(i) for i in range(len(COLLATE_ERRORS))])
def test_collate_errors_name_the_sample_and_the_key(samples, error, message):
    tensors = [v.clone() for s in samples if isinstance(s, dict) for v in s.values() if isinstance(v, torch.Tensor)]
    with pytest.raises(error, match=message):
        collate(samples)
    after = [v for s in samples if isinstance(s, dict) for v in s.values() if isinstance(v, torch.Tensor)]
    assert all(torch.equal(a, b) or (a.isnan().any() and b.isnan().any()) for a, b in zip(tensors, after))


def test_user_data_errors_name_the_argument(tmp_path):
    good = [{"v": torch.ones(2) * i, "label": i % 2} for i in range(12)]
    splits = {"train": range(6), "val": range(6, 9), "test": range(9, 12)}
    with pytest.raises(ValueError, match=r"^dataset\[4\]\['v'\]: expected 2 features like the modality's other"):
        SampleDataset(good[:4] + [{"v": torch.ones(3), "label": 0}] + good[5:], splits=splits)
    with pytest.raises(ValueError, match=r"^dataset\[3\]: expected a 'label' key"):
        SampleDataset(good[:3] + [{"v": torch.ones(2)}], splits={"train": [0], "val": [1], "test": [2]})
    with pytest.raises(ValueError, match=r"^labels: expected at least 2 classes, got 1$"):
        SampleDataset([{"v": torch.ones(2), "label": 0}] * 6, splits={"train": [0, 1, 2], "val": [3], "test": [4, 5]})
    with pytest.raises(ValueError, match=r"^splits\(2, sample\): expected one of 'train', 'val', 'test', got 'dev'$"):
        SampleDataset(good, splits=lambda i, sample: "dev" if i == 2 else "train")
    with pytest.raises(ValueError, match=r"^splits: expected at least one sample in each of train, val and test"):
        SampleDataset(good, splits=lambda i, sample: "train")
    with pytest.raises(TypeError, match=r"^dataset: expected a map-style dataset"):
        SampleDataset(Stream(good))
    with pytest.raises(TypeError, match=r"^splits\['train'\]: expected a re-iterable"):
        SampleStream({"train": (s for s in good), "val": good, "test": good})
    with pytest.raises(ValueError, match=r"^splits: expected the keys 'train', 'val' and 'test', got \['train'\]$"):
        SampleStream({"train": good})
    with pytest.raises(ValueError, match=r"^splits\['val'\]: expected at least one sample, got none$"):
        SampleStream({"train": good, "val": [], "test": good})
    with pytest.raises(ValueError, match=r"^val\[1\]\['present'\]: expected keys among the modalities \(v\)"):
        SampleStream({"train": good, "val": [good[0], {**good[1], "present": {"w": True}}], "test": good})
    with pytest.raises(ValueError, match=r"^train\[8\]\['v'\]: expected a batch of 8 rows \(the label's length\)"):
        SampleStream({"train": [{"v": torch.ones(8, 2), "label": torch.arange(8) % 2},
                                {"v": torch.ones(7, 2), "label": torch.arange(8) % 2}], "val": good, "test": good})
    with pytest.raises(TypeError, match=r"^dataset: expected one iterable per split for an IterableDataset"):
        Trainer(build_model("mlp", {"v": base.ModalitySpec(2)}, 2), Stream(good))
    with pytest.raises(TypeError, match=r"^dataset: expected a MultimodalDataset \(or other"):
        evaluate(build_model("mlp", {"v": base.ModalitySpec(2)}, 2), "mfeat")
    with pytest.raises(ValueError, match=r"^standardize\['v'\]: expected a mean and a std of shape \(2,\)"):
        SampleDataset(good, splits=splits, standardize={"v": (torch.zeros(3), torch.ones(3))})
    changing = [list(good)]
    stream = SampleStream({"train": Stream(changing[0]), "val": good, "test": good})
    changing[0].pop()  # the stream now yields one sample fewer than when it was read
    with pytest.raises(ValueError, match=r"^splits\['train'\]: expected the 12 samples it yielded when first read, "
                                         r"got 11 on this pass"):
        list(stream.batches("train", 5))


def test_a_bad_sample_fails_before_anything_is_read_further_or_written(tmp_path):
    good = [{"v": torch.ones(2) * i, "label": i % 2} for i in range(12)]
    splits = {"train": DataLoader(good[:5] + [{"v": torch.ones(2)}] + good[6:], batch_size=None), "val": good,
              "test": good}
    model = build_model("mlp", {"v": base.ModalitySpec(2)}, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^train\[5\]: expected a 'label' key, got the keys \['v'\]$"):
        Trainer(model, splits, out_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=r"^train\[5\]: expected a 'label' key"):
        compare(splits, ["erm"], 1, str(tmp_path / "cmp"), log=None)
    assert not os.listdir(tmp_path) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    class Unread(Dataset):  # the arguments are checked before any sample is read
        def __len__(self):
            return 3

        def __getitem__(self, i):
            pytest.fail("a sample was read")
    with pytest.raises(TypeError, match=r"^standardize: expected False, True or \{name: \(mean, std\)\}, got str$"):
        SampleDataset(Unread(), standardize="yes")
    with pytest.raises(ValueError, match=r"^modalities: expected distinct modality names, got \['a', 'a'\]$"):
        SampleDataset(Unread(), modalities=["a", "a"])
    with pytest.raises(ValueError, match=r"^task: expected one of 'classification', 'regression', got 'ranking'$"):
        SampleStream({"train": [], "val": [], "test": []}, task="ranking")


def _memmap(tmp_path, name="d"):
    modalities, y, lengths, present = arrays(missing=True)
    data = MultimodalDataset(modalities, y, lengths=lengths, present=present, standardize=False)
    return save_memmap_dataset(data, tmp_path / name)


def _edit(folder, filename, value):
    np.save(os.path.join(folder, filename), value)


def _meta(folder, **changes):
    path = os.path.join(folder, "meta.json")
    meta = json.loads(open(path).read())
    meta.update(changes)
    open(path, "w").write(json.dumps({k: v for k, v in meta.items() if v != "DROP"}))


MEMMAP_ERRORS = [  # (change to a good folder, error, message; opened, or its batch of the test split read)
    (lambda f: os.unlink(os.path.join(f, "meta.json")), FileNotFoundError, r"^dataset: .*/d has no meta\.json"),
    (lambda f: open(os.path.join(f, "meta.json"), "w").write("{"), ValueError, r"meta\.json: cannot read it as JSON"),
    (lambda f: _meta(f, format="v0"), ValueError, r"meta\.json: format: expected 'modalimmune-memmap-1', got 'v0'$"),
    (lambda f: _meta(f, modalities=["a", "labels"]), ValueError, r"meta\.json: modalities: expected modality names"),
    (lambda f: _meta(f, task="ranking"), ValueError, r"meta\.json: task: expected one of"),
    (lambda f: _meta(f, classes=[0]), ValueError, r"meta\.json: classes: expected a list of at least 2 distinct"),
    (lambda f: os.unlink(os.path.join(f, "b.npy")), FileNotFoundError, r"^dataset: no such file .*/d/b\.npy$"),
    (lambda f: _edit(f, "b.npy", np.zeros((89, 5))), ValueError, r"/d/b\.npy: expected a numeric \(90, d\) or"),
    (lambda f: _edit(f, "a_lengths.npy", np.ones(90, dtype=np.int64)), ValueError,
     r"/d/a_lengths\.npy: expected \(90,\) integer lengths of the sequences of a\.npy"),
    (lambda f: _edit(f, "present.npy", np.ones((90, 2), dtype=bool)), ValueError, r"/d/present\.npy: expected a \(90,"),
    (lambda f: open(os.path.join(f, "a.npy"), "wb").write(b"junk"), ValueError,
     r"/d/a\.npy: cannot read it as a memory-mappable \.npy array"),
    (lambda f: np.savez(os.path.join(f, "splits.npz"), train=[0], val=[1]), ValueError,
     r"/d/splits\.npz: splits: expected the keys 'train', 'val' and 'test'"),
    (lambda f: _edit(f, "labels.npy", np.full(90, 7)), ValueError,
     r"/d/labels\.npy: expected class indices in \[0, 2\] \(into meta\.json's classes\), got 7 in sample \d+$"),
    (lambda f: _edit(f, "b.npy", np.where(np.arange(90)[:, None] == 77, np.nan, np.load(os.path.join(f, "b.npy")))),
     ValueError, r"/d/b\.npy: expected finite features, got NaN or Inf in sample 77$"),
    (lambda f: _edit(f, "seq_lengths.npy", np.full(90, 9)), ValueError, r"/d/seq_lengths\.npy: expected lengths in"),
    (lambda f: _edit(f, "present.npy", np.zeros((90, 3), dtype=bool)), ValueError,
     r"/d/present\.npy: expected at least one modality in every sample, got none in sample \d+$"),
]


@pytest.mark.parametrize("change, error, message", MEMMAP_ERRORS, ids=[str(i) for i in range(len(MEMMAP_ERRORS))])
def test_memmap_errors_name_the_file(tmp_path, change, error, message):
    folder = _memmap(tmp_path)
    MemmapDataset(folder, standardize=False)  # a good folder opens
    change(folder)
    with pytest.raises(error, match=message):
        data = MemmapDataset(folder, standardize=False)
        data.batch(torch.arange(90))


def test_the_writer_refuses_a_folder_that_holds_files_and_writes_nothing(tmp_path):
    folder = _memmap(tmp_path)
    before = {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)}
    with pytest.raises(FileExistsError, match=r"^directory: expected a new or empty folder, got .*/d, which holds"):
        save_memmap_dataset(MemmapDataset(folder, standardize=False), folder)
    assert {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)} == before
    with pytest.raises(ValueError, match=r"^data\.modalities: expected modality names"):
        save_memmap_dataset(MultimodalDataset({"labels": torch.randn(9, 2)}, torch.arange(9) % 3), tmp_path / "n")
    assert sorted(os.listdir(tmp_path)) == ["d"]
