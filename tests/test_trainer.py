"""Trainer: learning, exact resume, accumulation, early stopping, checkpoints, methods."""

import json
import os
import pickle

import pytest
import torch
from test_data import single_thread, tiny_dataset  # noqa: F401 (autouse fixture)

from modalimmune.data.missing import missing_patterns
from modalimmune.eval.protocol import pattern_score
from modalimmune.methods import build_method, parse_method, split_methods
from modalimmune.methods.baselines import ogm_coefficients
from modalimmune.models import build_model
from modalimmune.train import TrainConfig, Trainer, checkpoint, load_model


@pytest.fixture(scope="module")
def data():
    return tiny_dataset(n=90)


def make(data, out_dir=None, seed=0, model_seed=0, **fields):
    torch.manual_seed(model_seed)
    model = build_model("mlp", data.spec, data.num_classes, hidden=16, embed_dim=8, fused_dim=16)
    fields = {"epochs": 3, "batch_size": 16, "progress": False, "seed": seed, "patience": 0, **fields}
    return Trainer(model, data, out_dir=out_dir, **fields)


def test_training_learns_the_task(data):
    trainer = make(data, epochs=12, lr=1e-2)
    summary = trainer.fit()
    assert summary["finished"] and summary["steps"] == 12 * 4
    assert summary["best_val_score"] >= 0.9


@pytest.mark.parametrize("method", ["erm", "moddrop", "ogm_ge", "moddrop_kd", "ensemble", "modalimmune"])
def test_resume_reproduces_an_uninterrupted_run(data, tmp_path, method):
    whole = make(data, tmp_path / "whole", method=method, checkpoint_every=3)
    whole.fit()
    cut = make(data, tmp_path / "cut", method=method, checkpoint_every=3)
    cut.fit(max_steps=8)  # "killed" after step 8: the last checkpoint is from step 6
    resumed = make(data, tmp_path / "cut", method=method, checkpoint_every=3, model_seed=99)
    resumed.fit(resume=True)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    lines = lambda d: (d / "metrics.jsonl").read_text()  # noqa: E731
    assert lines(tmp_path / "whole") == lines(tmp_path / "cut")
    assert not [f for f in os.listdir(tmp_path / "cut") if f.startswith(".tmp")]


def test_gradient_accumulation_matches_a_big_batch(data):
    big = make(data, batch_size=16, epochs=1, max_grad_norm=0.0)
    small = make(data, batch_size=8, grad_accum=2, epochs=1, max_grad_norm=0.0)
    for t in (big, small):
        t.model.eval()  # no dropout: both see the same function
        t.model.train = lambda mode=True, m=t.model: m  # keep it that way inside fit
    big.fit(max_steps=1)
    small.fit(max_steps=1)
    for a, b in zip(big.model.parameters(), small.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_early_stopping(data):
    summary = make(data, lr=1e-12, epochs=10, patience=2).fit()
    assert summary["stopped_early"] and summary["epochs"] == 3


def val_records(out_dir):
    return [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if r["event"] == "val"]


def test_robust_selection_keeps_the_best_clean_and_missing_mean(data, tmp_path):
    trainer = make(data, tmp_path, select="robust", epochs=6, lr=5e-3)
    trainer.fit()
    vals = val_records(tmp_path)
    for r in vals:
        assert r["val_score"] == pytest.approx((r["val_accuracy"] + r["val_missing_accuracy"]) / 2)
    scores = [r["val_score"] for r in vals]
    kept = trainer.state["best_epoch"]
    # the law: no later epoch scores better than the kept one, and a tie keeps the later epoch
    assert scores[kept] == max(scores) and all(s < scores[kept] for s in scores[kept + 1:])
    assert trainer.validate() == trainer.validate()
    per_pattern = [pattern_score(trainer.model, data, p, "val") for p in missing_patterns(len(data.modalities))]
    assert trainer.validate()["val_missing_accuracy"] == pytest.approx(sum(per_pattern) / len(per_pattern))
    seen = []  # the missing patterns: every non-empty proper subset of the modalities, after the clean pass
    fuse = trainer.model.fuse
    trainer.model.fuse = lambda embeddings, present, masks=None: (seen.append(present)
                                                                  or fuse(embeddings, present, masks))
    trainer.validate()
    patterns = [tuple(torch.nonzero(p[0]).flatten().tolist()) for p in seen[1:]]
    assert seen[0].all() and all((p == p[:1]).all() for p in seen)
    assert patterns == missing_patterns(len(data.modalities))


def test_selection_of_a_flat_run_keeps_the_last_epoch(data, tmp_path):
    trainer = make(data, tmp_path, epochs=3, lr=1e-12)  # every epoch scores the same: a tie keeps the later
    assert trainer.fit()["best_epoch"] == 2


@pytest.mark.parametrize("select", ["clean", "last"])
def test_clean_and_last_selection(data, tmp_path, select):
    trainer = make(data, tmp_path, select=select, epochs=4, lr=5e-3)
    trainer.fit()
    vals = val_records(tmp_path)
    assert all("val_missing_accuracy" not in r for r in vals)
    if select == "last":
        assert trainer.state["best_epoch"] == 3
    else:
        accuracy = [r["val_accuracy"] for r in vals]
        assert accuracy[trainer.state["best_epoch"]] == max(accuracy)
        assert all(a < max(accuracy) for a in accuracy[trainer.state["best_epoch"] + 1:])


def test_metrics_jsonl_and_exported_model(data, tmp_path):
    trainer = make(data, tmp_path, log_every=2)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["event"] for r in records} == {"step", "val"}
    assert [r["step"] for r in records if r["event"] == "step"] == list(range(2, 13, 2))
    model, state = load_model(str(tmp_path / "model.pt"), data)
    assert state["best_val_score"] == trainer.state["best_score"]
    batch = data.batch(data.indices("test"))
    assert torch.equal(model.eval()(batch), trainer.model.eval()(batch))


def test_bf16_autocast_on_cpu_trains(data):
    trainer = make(data, bf16="on", epochs=1)
    assert trainer.bf16
    assert trainer.fit()["finished"]


def test_checkpoint_is_atomic_and_refuses_code(tmp_path):
    path = str(tmp_path / "c.pt")
    checkpoint.save(path, {"x": torch.ones(2)})
    assert torch.equal(checkpoint.load(path)["x"], torch.ones(2))
    assert os.listdir(tmp_path) == ["c.pt"]
    with open(path, "r+b") as file:  # truncated, as after a crash of a non-atomic writer
        file.truncate(40)
    with pytest.raises(ValueError, match="checkpoint: .* is not a readable modalimmune checkpoint"):
        checkpoint.load(path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))
    with open(path, "wb") as file:
        pickle.dump({"format": checkpoint.FORMAT, "x": Evil()}, file)
    with pytest.raises(ValueError, match="checkpoint: .* not a readable"):
        checkpoint.load(path)
    torch.save({"other": 1}, path)
    with pytest.raises(ValueError, match="no checksum header"):
        checkpoint.load(path)
    with pytest.raises(FileNotFoundError, match="checkpoint: no such file"):
        checkpoint.load(str(tmp_path / "absent.pt"))


def test_resume_refuses_a_checkpoint_of_another_run(data, tmp_path):
    make(data, tmp_path, epochs=1).fit()
    with pytest.raises(ValueError, match="checkpoint: .* another method"):
        make(data, tmp_path, epochs=1, method="moddrop").fit(resume=True)


def test_bad_config_and_model(data):
    with pytest.raises(ValueError, match="config.epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="config.bf16"):
        TrainConfig(bf16="yes")
    with pytest.raises(ValueError, match="method: expected one of .*, got 'sgd'"):
        make(data, method="sgd")
    other = tiny_dataset(n=30)
    other.inputs = {"x": other.inputs["a"]}
    with pytest.raises(ValueError, match="model: its modalities"):
        Trainer(build_model("mlp", data.spec, 3), other, progress=False)
    with pytest.raises(TypeError, match="model: expected a module with encode"):
        Trainer(torch.nn.Linear(2, 2), data)


def test_method_specs():
    assert parse_method("moddrop[p=0.25]") == ("moddrop", {"p": 0.25})
    assert parse_method("ogm_ge[alpha=1, ge=off]") == ("ogm_ge", {"alpha": 1, "ge": "off"})
    assert build_method("ogm_ge[ge=off]").ge is False and build_method("ogm_ge[ge=true]").ge is True
    with pytest.raises(ValueError, match="method ogm_ge option ge: expected true/false"):
        build_method("ogm_ge[ge=maybe]")
    assert split_methods("erm, moddrop[p=0.1,x=2],ogm_ge") == ["erm", "moddrop[p=0.1,x=2]", "ogm_ge"]
    assert build_method("moddrop[p=0.25]").p == 0.25
    with pytest.raises(ValueError, match="moddrop has no option 'q'"):
        build_method("moddrop[q=1]")
    with pytest.raises(ValueError, match=r"method moddrop option p: expected a finite number in \[0.0, 1.0\)"):
        build_method("moddrop[p=1.5]")
    with pytest.raises(ValueError, match="method: expected NAME"):
        parse_method("moddrop[p=1")


def test_ogm_coefficients_generalise_peng_et_al():
    alpha = 0.7
    # two modalities: the leader gets 1 - tanh(alpha * s_lead / s_other), the other 1
    k = ogm_coefficients([6.0, 3.0], alpha)
    assert torch.allclose(k, torch.tensor([1 - torch.tanh(torch.tensor(alpha * 2.0)).item(), 1.0], dtype=k.dtype))
    # three: each is compared with the mean of the others
    k = ogm_coefficients([4.0, 2.0, 2.0], alpha)
    assert k[1] == 1 and k[2] == 1
    assert abs(k[0].item() - (1 - torch.tanh(torch.tensor(alpha * 2.0)).item())) < 1e-7
    assert torch.equal(ogm_coefficients([1.0, 1.0, 1.0], alpha), torch.ones(3, dtype=torch.float64))


def test_moddrop_and_ogm_change_the_gradients(data, tmp_path):
    drop = make(data, tmp_path / "d", method="moddrop[p=0.6]", epochs=1, log_every=1)
    drop.fit()
    kept = [json.loads(x).get("kept_fraction") for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert 0.3 < sum(k for k in kept if k is not None) / 4 < 0.8
    ogm = make(data, tmp_path / "o", method="ogm_ge", epochs=1, log_every=1)
    ogm.fit()
    records = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    coefficients = [r[f"ogm_coeff/{m}"] for r in records if r["event"] == "step" for m in data.modalities]
    assert min(coefficients) < 1.0 and max(coefficients) == 1.0


class DocumentedModel(torch.nn.Module):
    """A model written to the documented contract alone (no ModalImmuneModel base class)."""

    def __init__(self, spec, num_classes, with_all_present=True):
        super().__init__()
        self.modalities = tuple(spec)
        vectors = {m for m, s in spec.items() if not s.is_sequence}
        self.encoders = torch.nn.ModuleDict({m: torch.nn.Linear(spec[m].dim, 4) for m in vectors})
        self.sequences = torch.nn.ModuleDict({m: torch.nn.Linear(spec[m].dim, 4) for m in spec if m not in vectors})
        self.classifier = torch.nn.Linear(4 * len(spec), num_classes)
        if not with_all_present:
            self.all_present = None

    def encode(self, batch):
        out = {m: layer(batch.inputs[m]) for m, layer in self.encoders.items()}
        out.update({m: layer(batch.inputs[m]).mean(1) for m, layer in self.sequences.items()})
        return out

    def fuse(self, embeddings, present, masks=None):
        return torch.cat([embeddings[m] * present[:, i, None] for i, m in enumerate(self.modalities)], -1)

    def head(self, joint):
        return self.classifier(joint)

    def all_present(self, batch):
        return torch.ones(len(batch), len(self.modalities), dtype=torch.bool)


def test_a_model_written_to_the_documented_contract_trains(data):
    for method in ("erm", "moddrop", "modalimmune[hypergrad=off]"):
        summary = Trainer(DocumentedModel(data.spec, data.num_classes), data, method=method, epochs=1,
                          batch_size=16, progress=False).fit()
        assert summary["finished"], method
    with pytest.raises(TypeError, match=r"model: expected a module with encode, fuse, head, all_present .*"
                                        r"without all_present\(\)"):
        Trainer(DocumentedModel(data.spec, data.num_classes, with_all_present=False), data)


@pytest.mark.parametrize("change, message", [
    ({"lr": 1e-5}, r"another lr \(lr=0.002; this run: lr=1e-05\)"),
    ({"select": "clean"}, "another select"),
    ({"model_seed": 0, "hidden": 8}, "weights of another model"),
])
def test_resume_refuses_what_a_resumed_run_cannot_change(data, tmp_path, change, message):
    make(data, tmp_path, epochs=2, checkpoint_every=2).fit(max_steps=3)
    saved = (tmp_path / "checkpoint.pt").read_bytes()
    hidden = change.pop("hidden", None)
    if hidden:
        torch.manual_seed(0)
        model = build_model("mlp", data.spec, data.num_classes, hidden=hidden, embed_dim=8, fused_dim=16)
        trainer = Trainer(model, data, out_dir=tmp_path, epochs=2, batch_size=16, progress=False, patience=0,
                          checkpoint_every=2)
    else:
        trainer = make(data, tmp_path, epochs=2, checkpoint_every=2, **change)
    before = [p.detach().clone() for p in trainer.params]
    with pytest.raises(ValueError, match=message):
        trainer.fit(resume=True)
    assert all(torch.equal(p, q) for p, q in zip(before, trainer.params))  # nothing was loaded
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved


def test_resume_applies_what_only_watches_the_run(data, tmp_path):
    whole = make(data, tmp_path / "whole", epochs=2, checkpoint_every=2)
    whole.fit()
    cut = make(data, tmp_path / "cut", epochs=2, checkpoint_every=2)
    cut.fit(max_steps=3)
    resumed = make(data, tmp_path / "cut", epochs=2, checkpoint_every=1, max_nonfinite_steps=3)
    resumed.fit(resume=True)
    assert all(torch.equal(a, b) for a, b in zip(whole.params, resumed.params))
    assert checkpoint.load(str(tmp_path / "cut" / "checkpoint.pt"))["config"]["checkpoint_every"] == 1


def test_resume_refuses_a_checkpoint_of_another_dataset(data, tmp_path):
    make(data, tmp_path, epochs=1).fit()
    other = tiny_dataset(n=120)
    torch.manual_seed(0)
    model = build_model("mlp", other.spec, other.num_classes, hidden=16, embed_dim=8, fused_dim=16)
    with pytest.raises(ValueError, match="checkpoint: .* trained on another dataset"):
        Trainer(model, other, out_dir=tmp_path, epochs=1, batch_size=16, progress=False, patience=0).fit(resume=True)


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(data, tmp_path):
    make(data, tmp_path, epochs=1).fit()
    files = {name: (tmp_path / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl", "model.pt")}
    with pytest.raises(FileExistsError, match=r"out_dir: expected a folder without a run, got .* holding "
                                              r"checkpoint.pt, metrics.jsonl, model.pt"):
        make(data, tmp_path, epochs=1).fit()
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
    make(data, tmp_path, epochs=1, seed=1, overwrite=True).fit()
    assert (tmp_path / "checkpoint.pt").read_bytes() != files["checkpoint.pt"]


def test_method_options_the_data_cannot_serve_fail_before_anything_is_written(tmp_path):
    """Six modalities: the exact Shapley controller (M <= 5) is refused by the Trainer before it
    creates its folder, and by compare before its first method trains."""
    from modalimmune import compare
    from modalimmune.data import MultimodalDataset

    generator = torch.Generator().manual_seed(0)
    six = MultimodalDataset({f"m{i}": torch.randn(60, 3, generator=generator) for i in range(6)},
                            torch.arange(60) % 3)
    model = build_model("mlp", six.spec, six.num_classes, hidden=8, embed_dim=4, fused_dim=8)
    with pytest.raises(ValueError, match=r"method modalimmune: estimator: 'shapley' needs M <= 5"):
        Trainer(model, six, out_dir=tmp_path / "run", method="modalimmune[controller=shapley]", progress=False)
    with pytest.raises(ValueError, match=r"method modalimmune: estimator: 'shapley' needs M <= 5"):
        compare(six, ["erm", "modalimmune[controller=shapley]"], 1, str(tmp_path / "cmp"), epochs=1, log=None)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cmp").exists()
