"""The real-data loaders (hapt, reviews), natural missingness and regression targets
through the model, and bad input to MultimodalDataset's new arguments."""

import copy
import gzip
import io
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from test_data import single_thread, tiny_arrays  # noqa: F401 (autouse fixture)

from modalimmune.data import MultimodalDataset, hapt, load_dataset, load_hapt, reviews
from modalimmune.models import build_model


def text_features(texts):
    """A stand-in for the text encoder: a few cheap, deterministic features of each text."""
    return np.array([[len(t), t.count(" "), t.count("!"), t.count("love")] for t in texts], dtype=np.float32)


@pytest.fixture(scope="module")
def hapt_windows():
    return load_hapt()


@pytest.fixture(scope="module")
def reviews_table():
    return reviews.read_reviews()


def test_hapt_windows_shapes_and_classes(hapt_windows):
    views, labels, users = hapt_windows
    assert {name: array.shape for name, array in views.items()} == {"acc": (10411, 128, 3), "gyro": (10411, 128, 3)}
    assert np.bincount(labels).tolist() == [0, 1722, 1544, 1407, 1801, 1979, 1958]  # the 6 activities only
    assert sorted(np.unique(users)) == list(range(1, 31))
    user, columns = hapt.read_recordings()[0]
    first = hapt._window_starts(columns["label"])[0]
    assert user == users[0] and 1 <= columns["label"][first] <= 6
    assert (columns["label"][first:first + 128] == labels[0]).all()  # a window lies within one activity
    assert np.allclose(views["gyro"][0], np.stack([columns[c][first:first + 128] for c in hapt.CHANNELS["gyro"]], 1))


def test_hapt_is_split_by_user(hapt_windows):
    _, labels, users = hapt_windows
    data = load_dataset("hapt")
    assert data.modalities == ("acc", "gyro") and data.num_classes == 6 and data.present is None
    assert data.source == "hapt" and data.split_seed is None
    held = {split: set(users[data.indices(split).numpy()].tolist()) for split in ("train", "val", "test")}
    assert held == {split: set(ids) for split, ids in hapt.USER_SPLITS.items()}
    assert not held["train"] & held["val"] and not held["train"] & held["test"] and not held["val"] & held["test"]
    assert sum(data.split_size(s) for s in ("train", "val", "test")) == len(labels)
    assert [data.split_size(s) for s in ("train", "val", "test")] == [6229, 1186, 2996]


class _Payload:
    def __reduce__(self):
        return (print, ("ran",))


def test_hapt_unpickler_rebuilds_nothing_but_its_stand_ins():
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        hapt._OldPandasFrames(io.BytesIO(pickle.dumps(_Payload()))).load()
    with pytest.raises(pickle.UnpicklingError, match="refusing to rebuild"):
        hapt._reconstructor(type(io.BytesIO()), object, None)
    with pytest.raises(pickle.UnpicklingError, match="refusing to encode"):
        hapt._latin1("text", "utf-8")


def test_reviews_natural_missingness_counts(reviews_table):
    titles, texts = reviews_table["Title"], reviews_table["Review Text"]
    assert len(titles) == 23486
    assert sum(t is None for t in titles) == 3810 and sum(t is None for t in texts) == 845
    assert sum(a is None and b is None for a, b in zip(titles, texts)) == 844


def test_reviews_recommended_shapes_present_and_one_embedding_call():
    calls = []
    data = reviews.reviews_dataset("recommended", embed=lambda texts: calls.append(len(texts)) or text_features(texts))
    assert calls == [23486 - 845 + 23486 - 3810]  # every text that is there, in one call
    assert data.modalities == ("review", "title", "tabular") and data.num_classes == 2 and data.num_outputs == 2
    assert {name: tuple(x.shape) for name, x in data.inputs.items()} == {"review": (23486, 4), "title": (23486, 4),
                                                                         "tabular": (23486, 29)}
    assert torch.bincount(data.labels).tolist() == [4172, 19314]
    report = data.missingness()
    assert report["all"]["patterns"] == {"review+title+tabular": 19675, "review+tabular": 2966, "tabular": 844,
                                         "title+tabular": 1}
    assert report["all"]["missing"] == pytest.approx({"review": 845 / 23486, "title": 3810 / 23486, "tabular": 0.0})
    assert (data.inputs["title"][~data.present[:, 1]] == 0).all()
    assert set(data.raw_texts) == {"review", "title"}  # the raw texts, for the evaluation's text corruptions
    for position, name in enumerate(("review", "title")):
        texts = data.raw_texts[name].texts
        assert [t is not None for t in texts] == data.present[:, position].tolist()
        there = data.present[:, position]
        rows = there.nonzero()[:3, 0].tolist() + [int((~there).nonzero()[0, 0])]
        calls.clear()
        torch.testing.assert_close(data.text_input(name, [texts[i] for i in rows]), data.inputs[name][rows])
        assert calls == [3]  # the missing text is not encoded


def test_reviews_rating_is_a_finite_regression_target(monkeypatch):
    made = []
    encoders = types.SimpleNamespace(MiniLM=lambda: made.append("MiniLM") or "encoder",
                                     cached_embeddings=lambda encoder, texts: text_features(texts))
    monkeypatch.setitem(sys.modules, "modalimmune.encoders", encoders)  # the default embedding step
    reviews._minilm.cache_clear()  # the encoder is built once per process
    data = load_dataset("reviews_rating")
    assert made == ["MiniLM"] and data.name == data.source == "reviews_rating"
    assert data.task == "regression" and data.num_outputs == 1 and data.labels.dtype == torch.float32
    assert torch.isfinite(data.labels).all() and sorted(torch.unique(data.labels).tolist()) == [1, 2, 3, 4, 5]
    assert torch.bincount(data.labels.long()).tolist() == [0, 842, 1565, 2871, 5077, 13131]
    recommended = load_dataset("reviews")  # the two tasks share their split (stratified by the recommendation)
    assert all(torch.equal(data.indices(s), recommended.indices(s)) for s in ("train", "val", "test"))


def test_reviews_tabular_features(reviews_table):
    features, names = reviews.tabular_features(reviews_table)
    assert features.shape == (23486, 29) and names[:2] == ("age", "log1p_positive_feedback")
    assert "Class Name=Chemises" not in names and "Class Name=Trend" in names  # 1 review; 119 reviews
    one_hot = features[:, 2:]
    assert set(np.unique(one_hot)) == {0.0, 1.0} and (one_hot[:, :3].sum(1) <= 1).all()


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_models_take_the_present_of_the_data(model):
    modalities, y, lengths = tiny_arrays(n=30)
    present = np.ones((30, 3), dtype=bool)
    present[::3, 2] = False  # absent sequences
    present[1::3, 0] = False
    data = MultimodalDataset(modalities, y, lengths=lengths, present=present)
    torch.manual_seed(0)
    net = build_model(model, data.spec, data.num_classes, **({"patch": 2} if model == "transformer" else {}))
    batch = data.batch(data.indices("train"))
    assert net.all_present(batch) is batch.present
    torch.nn.functional.cross_entropy(net(batch), batch.labels).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def _bad(change):
    modalities, y, lengths = tiny_arrays()
    present = np.ones((60, 3), dtype=bool)
    present[3, 0] = False
    return change(modalities, y, lengths, present)


BAD = [  # (case, change(modalities, labels, lengths, present) -> kwargs, error, message)
    ("label-missing", lambda m, y, lens, p: dict(modalities=m, labels=np.where(np.arange(60) == 7, np.nan, y),
                                              lengths=lens), ValueError,
     r"^labels: expected N integer class labels, got nan in sample 7$"),
    ("label-absent", lambda m, y, lens, p: dict(modalities=m, labels=y[:-1], lengths=lens), ValueError,
     r"^modalities\['a'\]: expected 59 samples \(one per label\), got 60$"),
    ("wrong-rank", lambda m, y, lens, p: dict(modalities={**m, "b": m["b"][:, 0]}, labels=y, lengths=lens), ValueError,
     (r"^modalities\['b'\]: expected samples first: \(N, d\), \(N, T, d\) or a list of N \(T_i, d\), "
      r"got shape \(60,\)$")),
    ("present-key", lambda m, y, lens, p: dict(modalities=m, labels=y, lengths=lens, present={"c": p[:, 0]}),
     ValueError,
     r"^present: expected keys among the modalities \(a, b, seq\), got 'c'$"),
    ("present-shape", lambda m, y, lens, p: dict(modalities=m, labels=y, lengths=lens, present=p[:, :2]), ValueError,
     r"^present: expected a \(60, 3\) bool array \(samples, modalities a, b, seq\) or a dict, got shape \(60, 2\)$"),
    ("present-column", lambda m, y, lens, p: dict(modalities=m, labels=y, lengths=lens, present={"a": p[:-1, 0]}),
     ValueError, r"^present\['a'\]: expected 60 booleans \(one per sample\), got shape \(59,\)$"),
    ("present-floats", lambda m, y, lens, p: dict(modalities=m, labels=y, lengths=lens, present=p.astype(np.float32)),
     TypeError, r"^present: expected booleans \(True: the sample has the modality\), got dtype torch.float32$"),
    ("present-values", lambda m, y, lens, p: dict(modalities=m, labels=y, lengths=lens, present=p.astype(int) * 2),
     ValueError, r"^present: expected booleans \(True: the sample has the modality\), got the value 2$"),
    ("present-list", lambda m, y, lens, p: dict(modalities=m, labels=y, lengths=lens, present=p.tolist()), TypeError,
     r"^present: expected a \(60, 3\) bool array .* or a dict, got list$"),
    ("no-modality", lambda m, y, lens, p: dict(modalities=m, labels=y, lengths=lens,
                                            present=np.where(np.arange(60)[:, None] == 9, False, p)), ValueError,
     r"^present: expected at least one modality in every sample, got none in sample 9$"),
    ("nan-present", lambda m, y, lens, p: dict(
        modalities={**m, "a": np.where(np.arange(60)[:, None] == 4, np.nan, m["a"])}, labels=y, lengths=lens,
        present=p),
     ValueError,
     r"^modalities\['a'\]: expected finite features, got NaN or Inf in sample 4$"),  # only absent entries may be NaN
    ("target-nan", lambda m, y, lens, p: dict(modalities=m, labels=np.where(np.arange(60) == 5, np.nan, y * 1.5),
                                           lengths=lens, task="regression"), ValueError,
     r"^labels: expected N finite regression targets, got nan in sample 5$"),
    ("target-inf", lambda m, y, lens, p: dict(modalities=m, labels=np.where(np.arange(60) == 8, 1e300, y * 1.5),
                                           lengths=lens, task="regression"), ValueError,
     r"^labels: expected N finite regression targets, got inf in sample 8$"),
    ("target-shape", lambda m, y, lens, p: dict(modalities=m, labels=np.stack([y, y], 1) * 1.0, lengths=lens,
                                             task="regression"), ValueError,
     r"^labels: expected N finite regression targets, got shape \(60, 2\)$"),
    ("target-strings", lambda m, y, lens, p: dict(modalities=m, labels=np.array(["1.5"] * 60), lengths=lens,
                                               task="regression"), TypeError,
     r"^labels: expected N finite regression targets, got dtype <U3$"),
    ("task", lambda m, y, lens, p: dict(modalities=m, labels=y, lengths=lens, task="ranking"), ValueError,
     r"^task: expected one of 'classification', 'regression', got 'ranking'$"),
    ("no-statistics", lambda m, y, lens, p: dict(
        modalities=m, labels=y, lengths=lens, present={"b": np.arange(60) == 59},
        splits={"train": np.arange(40), "val": [40], "test": [59]}),
     ValueError,
     r"^present: expected modality 'b' in at least one training sample \(its statistics\), got none$"),
]


@pytest.mark.parametrize("case, change, error, message", BAD, ids=[case[0] for case in BAD])
def test_bad_input_is_refused_naming_the_argument_and_touches_nothing(case, change, error, message):
    kwargs = _bad(change)
    before = copy.deepcopy(kwargs)
    with pytest.raises(error, match=message):
        MultimodalDataset(**kwargs)
    for key, value in before.items():
        if isinstance(value, dict):
            assert value.keys() == kwargs[key].keys()
            assert all(np.array_equal(v, kwargs[key][k], equal_nan=True) for k, v in value.items())
        elif isinstance(value, np.ndarray):
            assert np.array_equal(value, kwargs[key], equal_nan=value.dtype.kind == "f")


def test_a_tensor_given_with_absent_entries_is_not_modified():
    a = torch.randn(20, 3)
    a[::2] = float("nan")
    kept = a.clone()
    present = {"a": torch.arange(20) % 2 == 1}
    data = MultimodalDataset({"a": a, "b": torch.randn(20, 2)}, torch.arange(20) % 2, present=present,
                             standardize=False, splits={"train": range(20), "val": [0], "test": [1]})
    assert torch.allclose(a, kept, equal_nan=True) and (data.inputs["a"][::2] == 0).all()


def test_a_bad_hapt_file_is_named(tmp_path, monkeypatch):
    path = tmp_path / "HAPT.pkl.gz"
    with gzip.open(path, "wb") as file:
        pickle.dump({1: [np.zeros(3)]}, file, protocol=2)
    monkeypatch.setattr(hapt, "package_file", lambda *parts: str(path))
    with pytest.raises(ValueError, match=r"^dataset: .*HAPT\.pkl\.gz is not the expected pickle of pandas frames"):
        hapt.read_recordings()
