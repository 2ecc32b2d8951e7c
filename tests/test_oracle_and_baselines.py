"""The per-pattern oracle (patterns, erm[keep=...], compare --oracle, the report beside it) and the
baselines moddrop_kd and ensemble."""

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data import single_thread, tiny_dataset  # noqa: F401 (autouse fixture)

from modalimmune.comparison import compare, oracle_patterns, rebuild_report
from modalimmune.data.missing import missing_patterns, random_present
from modalimmune.eval.protocol import pattern_score
from modalimmune.eval.report import oracle_summary
from modalimmune.methods import StepContext, build_method
from modalimmune.methods.base import distillation_loss, task_loss
from modalimmune.models import build_model
from modalimmune.train import Trainer

SMALL = dict(hidden=16, embed_dim=8, fused_dim=16)


@pytest.fixture(scope="module")
def data():
    return tiny_dataset(n=90)


@given(st.integers(1, 8), st.one_of(st.none(), st.integers(1, 40)), st.integers(0, 3))
@settings(max_examples=60, deadline=None)
def test_missing_patterns(m, limit, seed):
    every = [s for size in range(1, m) for s in itertools.combinations(range(m), size)]
    patterns = missing_patterns(m, limit, seed)
    assert len(set(patterns)) == len(patterns) and set(patterns) <= set(every)
    assert patterns == sorted(patterns, key=lambda s: (len(s), s))  # by size, then in order
    if limit is None or len(every) <= limit:
        assert patterns == every
    else:
        assert len(patterns) == limit and patterns == missing_patterns(m, limit, seed)
        extremes = [s for s in every if len(s) in (1, m - 1)]
        assert set(extremes[:limit]) <= set(patterns)


def test_oracle_patterns_cover_every_pattern_up_to_five_modalities():
    for m in range(2, 6):
        assert len(oracle_patterns(tuple("abcde"[:m]))) == 2 ** m - 2
    six = oracle_patterns(tuple("abcdef"))
    assert len(six) == 20 and all((i,) in six for i in range(6))
    assert all(tuple(j for j in range(6) if j != i) in six for i in range(6))


def make(data, method, **fields):
    torch.manual_seed(0)
    model = build_model(build_method(method).model or "mlp", data.spec, data.num_classes, **SMALL)
    fields = {"epochs": 2, "batch_size": 16, "progress": False, **fields}
    return Trainer(model, data, method=method, **fields)


def test_erm_keep_trains_and_validates_on_its_pattern_alone(data):
    trainer = make(data, "erm[keep=a+seq]", epochs=3, lr=5e-3)
    step(trainer)
    grads = {n: p.grad for n, p in trainer.model.named_parameters()}
    assert all(g is None or g.abs().max() == 0 for n, g in grads.items() if n.startswith("encoders.b."))
    assert grads["missing.b"].abs().max() > 0  # b's "missing" embedding is what stands in for it
    assert grads["missing.a"] is None or grads["missing.a"].abs().max() == 0
    trainer.fit()
    kept = (0, 2)
    assert trainer.validate()["val_accuracy"] == pytest.approx(pattern_score(trainer.model, data, kept, "val"))
    assert "val_missing_accuracy" not in trainer.validate()


@pytest.mark.parametrize("keep", ["x", "a+a", 3])
def test_erm_keep_refuses_what_is_not_a_pattern(data, keep):
    with pytest.raises(ValueError, match="method erm option keep"):
        make(data, f"erm[keep={keep}]")


def test_oracle_summary_by_hand():
    def run(a, b, ab):
        return {"subset_accuracy": {"a": a, "b": b, "a+b": ab}}
    runs = {"moddrop": [run(0.6, 0.4, 0.9), run(0.7, 0.5, 0.9)], "x": [run(0.7, 0.5, 0.9), run(0.8, 0.6, 0.9)]}
    oracle = {"a": [0.8, 0.8], "b": [0.6, 0.7]}
    summary = oracle_summary(oracle, runs, "accuracy")
    assert summary["mean_missing"]["mean"] == pytest.approx(0.725)
    assert summary["worst_missing"]["mean"] == pytest.approx(0.65)
    assert summary["methods"]["moddrop"]["mean_missing"]["mean"] == pytest.approx(0.55)
    # ModDrop's gaps: 0.175 (mean) and 0.2 (worst); x is 0.1 better on both
    assert summary["gap"] == pytest.approx({"mean_missing": 0.175, "worst_missing": 0.2})
    assert summary["methods"]["x"]["gap_closed"] == pytest.approx({"mean_missing": 0.1 / 0.175,
                                                                   "worst_missing": 0.5})
    assert summary["methods"]["moddrop"]["gap_closed"] == {"mean_missing": 0.0, "worst_missing": 0.0}
    errors = oracle_summary({"a": [1.0, 1.0]}, {"moddrop": [{"subset_mae": {"a": 2.0}}] * 2,
                                                "y": [{"subset_mae": {"a": 1.5}}] * 2}, "mae")
    assert errors["gap"]["mean_missing"] == pytest.approx(1.0)  # the oracle's error is lower: a positive gap
    assert errors["methods"]["y"]["gap_closed"]["worst_missing"] == pytest.approx(0.5)


def test_compare_with_the_oracle(data, tmp_path):
    report = compare(data, ["moddrop", "ensemble"], 2, str(tmp_path), oracle=True, epochs=1, batch_size=16,
                     progress=False, model_options=SMALL, log=lambda line: None)
    patterns = ["a", "b", "seq", "a+b", "a+seq", "b+seq"]
    assert list(report["oracle"]["patterns"]) == patterns
    for pattern in patterns:
        for seed in (0, 1):
            saved = json.loads((tmp_path / "oracle" / pattern / f"seed{seed}" / "eval.json").read_text())
            assert saved["pattern"] == pattern and 0 <= saved["score"] <= 1
    assert set(report["oracle"]["methods"]) == {"moddrop", "ensemble"}
    markdown = (tmp_path / "report.md").read_text()
    assert "Beside the per-pattern oracle (6 patterns" in markdown
    assert "| kept | moddrop | ensemble | oracle |" in markdown
    assert rebuild_report(str(tmp_path), log=lambda line: None) == json.loads((tmp_path / "report.json").read_text())


def test_distillation_loss_against_float64():
    teacher, student = torch.randn(7, 5), torch.randn(7, 5, requires_grad=True)
    p = teacher.double().softmax(-1)
    want = (p * (p.log() - student.detach().double().log_softmax(-1))).sum(-1).mean()
    # the loss is float32: compared at float32's tolerances with the float64 reference rounded to it
    torch.testing.assert_close(distillation_loss(teacher, student), want.float())
    assert distillation_loss(teacher, teacher.clone()).abs() < 1e-6
    regression = 0.5 * (teacher[:, :1].double() - student[:, :1].detach().double()).square().mean()
    torch.testing.assert_close(distillation_loss(teacher[:, :1], student[:, :1]), regression.float())
    teacher.requires_grad_(True)
    g_teacher, g_student = torch.autograd.grad(distillation_loss(teacher, student), [teacher, student],
                                               allow_unused=True)
    assert g_teacher is None and g_student.abs().max() > 0


def step(trainer):
    trainer.optimizer.zero_grad(set_to_none=True)
    batch = trainer.dataset.batch(trainer.dataset.indices("train")[:16])
    return batch, trainer.method.training_step(trainer.model, batch, StepContext(trainer.params, 1.0, 0, 0, 1))


def test_moddrop_kd_loss_by_hand(data):
    trainer = make(data, "moddrop_kd[p=0.5,weight=2.0]")
    model = trainer.model.eval()  # no dropout noise: the step can be recomputed
    state = trainer.method.generator.get_state()
    batch, logs = step(trainer)
    trainer.method.generator.set_state(state)
    present = random_present(16, 3, 0.5, trainer.method.generator, batch.labels.device)
    embeddings = model.encode(batch)
    full = model.head(model.fuse(embeddings, model.all_present(batch), batch.masks))
    dropped = model.head(model.fuse(embeddings, present, batch.masks))
    p = full.double().softmax(-1)
    kl = (p * (p.log() - dropped.double().log_softmax(-1))).sum(-1).mean()
    assert not present.all() and present.any(1).all()
    assert logs["distill"].item() == pytest.approx(kl.item(), rel=1e-3, abs=1e-6)  # float32 against float64
    want = task_loss(full, batch.labels) + task_loss(dropped, batch.labels) + 2.0 * kl
    assert logs["loss"].item() == pytest.approx(want.item(), rel=1e-5)


def test_ensemble_is_the_mean_of_the_present_heads(data):
    model = build_model("ensemble", data.spec, data.num_classes, **SMALL).eval()
    batch = data.batch(data.indices("train")[:8])
    embeddings = model.encode(batch)
    present = torch.tensor([[True, False, True]] * 8)
    heads = [model.heads[m](embeddings[m]).log_softmax(-1) for m in data.modalities]
    torch.testing.assert_close(model.head(model.fuse(embeddings, present)), (heads[0] + heads[2]) / 2)
    other = {**embeddings, "b": torch.randn_like(embeddings["b"])}  # an absent modality changes nothing
    torch.testing.assert_close(model.fuse(other, present), model.fuse(embeddings, present))
    with pytest.raises(ValueError, match="decode"):
        build_model("ensemble", data.spec, data.num_classes, decode=True)


def test_ensemble_method_trains_each_head_on_its_own_loss(data):
    trainer = make(data, "ensemble")
    assert type(trainer.model).__name__ == "UnimodalEnsemble"
    model = trainer.model.eval()
    batch, logs = step(trainer)
    embeddings = model.encode(batch)
    own = [task_loss(model.heads[m](embeddings[m]), batch.labels) for m in data.modalities]
    assert logs["loss"].item() == pytest.approx(sum(own).item() / 3, rel=1e-5)
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())
