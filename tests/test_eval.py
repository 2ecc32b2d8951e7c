"""Metrics on hand-computed cases, the protocol on a model whose answers are known, reports."""

import json
import math

import numpy as np
import pytest
import torch
from test_data import single_thread, tiny_dataset  # noqa: F401 (autouse fixture)

from modalimmune import evaluate
from modalimmune.cli import main
from modalimmune.comparison import rebuild_report
from modalimmune.data import MultimodalDataset
from modalimmune.eval import metrics, plots
from modalimmune.eval.report import build_report, markdown, paired_differences, write_report
from modalimmune.models import ModalImmuneModel


class Oracle(ModalImmuneModel):
    """Predicts the class from modality ``a`` (a one-hot of the label) when it is
    present, and class 0 otherwise; ``b`` and ``c`` are ignored."""

    def __init__(self):
        super().__init__(("a", "b", "c"))
        self.scale = torch.nn.Parameter(torch.ones(()))

    def encode(self, batch):
        return dict(batch.inputs)

    def fuse(self, embeddings, present, masks=None):
        return embeddings["a"] * present[:, :1] * self.scale

    def head(self, joint):
        return joint + torch.tensor([1e-3, 0.0])  # ties (a missing) go to class 0


@pytest.fixture(scope="module")
def oracle_data():
    y = torch.arange(50) % 2
    return MultimodalDataset({"a": torch.eye(2)[y], "b": torch.randn(50, 3), "c": torch.randn(50, 1)}, y,
                             standardize=False)


def test_subset_names_and_order():
    names = ("fou", "fac", "pix")
    assert [metrics.subset_name(names, s) for s in metrics.subsets(names)] == [
        "fou", "fac", "pix", "fou+fac", "fou+pix", "fac+pix", "fou+fac+pix"]
    assert metrics.subset_name(names, (2, 1)) == "fac+pix"


def test_missing_summary_leaves_out_the_full_set():
    acc = {"a": 0.5, "b": 0.7, "a+b": 1.0}
    assert metrics.missing_summary(acc, ("a", "b")) == (0.6, 0.5)
    assert all(math.isnan(v) for v in metrics.missing_summary({"a": 1.0}, ("a",)))


def test_curve_areas_by_hand():
    rates = [0.0, 0.1, 0.2]
    acc = [1.0, 0.8, 0.4]
    # trapezoids: 0.1 * (1.0 + 0.8) / 2 + 0.1 * (0.8 + 0.4) / 2 = 0.15
    assert metrics.relative_robustness(rates, acc) == pytest.approx(0.15)
    assert metrics.drop_rate_auc(rates, acc) == pytest.approx(0.75)
    # MultiBench's loop (levels 0.1 apart) on the full 10-level curve
    curve = np.linspace(0.9, 0.45, 10)
    loop = sum((curve[i] + curve[i + 1]) * 0.1 / 2 for i in range(9))
    assert metrics.relative_robustness(metrics.DROP_RATES, curve) == pytest.approx(loop)


def test_effective_robustness_by_hand():
    f, b = [0.9, 0.8, 0.6], [0.95, 0.7, 0.5]
    # f - (b + f0 - b0) = [0, 0.15, 0.15]
    assert metrics.effective_robustness(f, b) == pytest.approx(0.3)
    assert metrics.effective_robustness(b, b) == 0
    with pytest.raises(ValueError, match="reference"):
        metrics.effective_robustness(f, b[:2])


def test_r2_and_mean_std():
    target = np.array([[1.0], [2.0], [3.0]])
    assert metrics.r2_score(target, target) == 1.0
    assert metrics.r2_score(np.full_like(target, 2.0), target) == 0.0
    assert metrics.mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2))}
    assert metrics.mean_std([0.5]) == {"mean": 0.5, "std": 0.0}


def test_protocol_on_a_known_model(oracle_data):
    result = evaluate(Oracle(), oracle_data, "test", seed=3)
    labels = oracle_data.labels[oracle_data.indices("test")]
    without_a = (labels == 0).float().mean().item()
    for subset, acc in result["subset_accuracy"].items():
        assert acc == pytest.approx(1.0 if "a" in subset.split("+") else without_a), subset
    assert list(result["subset_accuracy"]) == ["a", "b", "c", "a+b", "a+c", "b+c", "a+b+c"]
    assert result["clean_accuracy"] == 1.0
    assert result["mean_missing_accuracy"] == pytest.approx((3 + 3 * without_a) / 6)
    assert result["worst_missing_accuracy"] == pytest.approx(without_a)
    curve = result["drop_rate_curve"]["accuracy"]
    assert curve[0] == 1.0 and all(without_a - 1e-6 <= c <= 1.0 for c in curve)
    assert curve[-1] < curve[0]
    assert result["effective_robustness"] is None and result["reconstruction_r2"] is None
    assert set(result["noise_accuracy"]["b"]["accuracy"]) == {1.0}  # b is ignored: noise there costs nothing
    again = evaluate(Oracle(), oracle_data, "test", seed=3, reference_curve=curve)
    assert again["drop_rate_curve"] == result["drop_rate_curve"] and again["effective_robustness"] == 0.0


def test_reconstruction_r2_for_decoding_models():
    from modalimmune.models import build_model

    data = tiny_dataset()
    model = build_model("mlp", data.spec, data.num_classes, decode=True)
    result = evaluate(model, data)
    assert set(result["reconstruction_r2"]) == set(data.modalities)
    assert all(math.isfinite(v) and v <= 1 for v in result["reconstruction_r2"].values())


def test_evaluate_bad_input(oracle_data):
    with pytest.raises(ValueError, match="split: expected one of"):
        evaluate(Oracle(), oracle_data, "dev")
    with pytest.raises(ValueError, match="model: its modalities"):
        evaluate(Oracle(), tiny_dataset())
    with pytest.raises(TypeError, match="dataset: expected a MultimodalDataset"):
        evaluate(Oracle(), {"a": 1})


def test_report_layout_and_files(oracle_data, tmp_path):
    runs = {"erm": [evaluate(Oracle(), oracle_data, seed=s) for s in (0, 1)]}
    for r in runs["erm"]:
        r["effective_robustness"] = 0.0
    report = build_report("toy", oracle_data.modalities, [0, 1], runs)
    assert set(report) == {"dataset", "metric", "modalities", "seeds", "methods", "paired_vs_moddrop", "oracle"}
    assert report["metric"] == "accuracy" and report["paired_vs_moddrop"] == {}  # no moddrop run to pair with
    entry = report["methods"]["erm"]
    assert set(entry) == {"clean_accuracy", "clean_balanced_accuracy", "subset_accuracy", "mean_missing_accuracy",
                          "worst_missing_accuracy", "drop_rate_curve", "drop_rate_auc", "relative_robustness",
                          "effective_robustness", "corruption"}
    assert set(entry["corruption"]) == set(oracle_data.modalities)
    assert all(len(curve["accuracy"]) == len(curve["levels"]) == 10
               for curves in entry["corruption"].values() for curve in curves.values())
    assert entry["clean_accuracy"] == {"mean": 1.0, "std": 0.0}
    assert set(entry["drop_rate_curve"]) == {"rates", "accuracy"}
    assert all(set(f) == {"mean", "std"} for f in entry["drop_rate_curve"]["accuracy"])
    paths = write_report(str(tmp_path), report, runs)
    assert json.loads(open(paths["json"]).read()) == report
    text = markdown(report, runs)
    assert "| erm | 100.0 ± 0.0 |" in text and "| a+b |" in text and "## Accuracy with one modality corrupted" in text
    for key in ("drop_rate_plot", "subset_plot", "corruption_plot"):
        assert open(paths[key], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("metric", ["accuracy", "mae"])
def test_paired_differences_against_moddrop(metric):
    """Each method minus moddrop on the same seed: the mean and standard error of the per-seed
    differences, an error negated (positive is better)."""
    rng = np.random.default_rng(0)
    keys = ("clean", "mean_missing", "worst_missing")
    runs = {m: [{f"{k}_{metric}": float(rng.uniform(0.2, 0.8)) for k in keys} for _ in range(5)]
            for m in ("erm", "moddrop", "modalimmune")}
    paired = paired_differences(runs, metric)
    assert list(paired) == ["erm", "modalimmune"]
    sign = -1 if metric == "mae" else 1
    for method in paired:
        for key in keys:
            diffs = sign * np.array([r[f"{key}_{metric}"] - b[f"{key}_{metric}"]
                                     for r, b in zip(runs[method], runs["moddrop"])])
            assert paired[method][key] == {"mean": pytest.approx(diffs.mean()),
                                           "se": pytest.approx(diffs.std(ddof=1) / np.sqrt(5)), "n": 5}
    assert paired_differences({m: r[:1] for m, r in runs.items()}, metric) == {}  # one seed: no error bar
    assert paired_differences({"erm": runs["erm"]}, metric) == {}


def test_the_paired_table_marks_noise(oracle_data):
    """A clear paired difference is reported as it is; one within two standard errors of 0 as noise."""
    runs = {m: [evaluate(Oracle(), oracle_data, seed=s) for s in range(5)] for m in ("moddrop", "modalimmune")}
    for seed, (result, base) in enumerate(zip(runs["modalimmune"], runs["moddrop"])):
        result["clean_accuracy"] = base["clean_accuracy"] - 0.1 - 0.001 * seed
        result["mean_missing_accuracy"] = base["mean_missing_accuracy"] + 0.01 * (-1) ** seed
    text = markdown(build_report("toy", oracle_data.modalities, list(range(5)), runs), runs)
    assert "## Paired by seed: each method minus `moddrop`" in text
    row = next(line for line in text.splitlines() if line.startswith("| modalimmune | -"))
    clean, mean_missing, worst_missing = row.strip(" |").split(" | ")[1:]
    assert clean == "-10.2 ± 0.1" and mean_missing == "+0.2 ± 0.5 (noise)" and worst_missing == "+0.0 ± 0.0 (noise)"


def test_a_report_is_rebuilt_from_its_runs(oracle_data, tmp_path):
    runs = {"erm": [evaluate(Oracle(), oracle_data, seed=s) for s in (0, 1)],
            "moddrop": [evaluate(Oracle(), oracle_data, seed=s) for s in (0, 1)]}
    report = build_report("toy", oracle_data.modalities, [0, 1], runs)
    write_report(str(tmp_path), report, runs)
    for method, results in runs.items():
        for seed, result in zip((0, 1), results):
            (tmp_path / "runs" / method / f"seed{seed}").mkdir(parents=True)
            (tmp_path / "runs" / method / f"seed{seed}" / "eval.json").write_text(json.dumps(result))
    written = (tmp_path / "report.md").read_text()
    (tmp_path / "report.md").unlink()
    assert rebuild_report(str(tmp_path), log=lambda line: None) == json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "report.md").read_text() == written
    assert main(["report", "--out", str(tmp_path)]) == 0 and (tmp_path / "report.md").read_text() == written
    (tmp_path / "runs" / "moddrop" / "seed1" / "eval.json").unlink()
    with pytest.raises(FileNotFoundError, match="out: expected the evaluation of every run the report lists"):
        rebuild_report(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="out: expected a folder written by compare"):
        rebuild_report(str(tmp_path / "runs"))


def test_controller_plot_from_the_runs_metrics(oracle_data, tmp_path):
    runs = {name: [evaluate(Oracle(), oracle_data, seed=0)] for name in ("erm", "modalimmune")}
    for name, pi in (("erm", None), ("modalimmune", (0.5, 0.1, 0.0))):
        run_dir = tmp_path / "runs" / name / "seed0"
        run_dir.mkdir(parents=True)
        records = [{"event": "step", "step": 10 * k, "loss": 1.0} for k in (1, 2, 3)]
        if pi:
            for k, record in enumerate(records):
                record.update({f"pi/{m}": v * (k + 1) for m, v in zip("abc", pi)})
        records.insert(1, {"event": "val", "step": 10, "val_accuracy": 1.0})
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    steps, values = plots.controller_history(str(tmp_path / "runs" / "modalimmune" / "seed0"))
    assert steps == [10, 20, 30] and list(values) == ["a", "b", "c"]
    assert values["b"] == pytest.approx([0.1, 0.2, 0.3]) and values["c"] == [0.0, 0.0, 0.0]
    assert list(plots.method_controller_histories(str(tmp_path), ["erm", "modalimmune"])) == ["modalimmune"]
    report = build_report("toy", oracle_data.modalities, [0], runs)
    paths = write_report(str(tmp_path), report, runs)
    assert open(paths["controller_plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    del runs["modalimmune"], report["methods"]["modalimmune"]
    assert "controller_plot" not in write_report(str(tmp_path / "erm_only"), report, runs)  # no controller: no plot


def test_natural_missingness_skips_the_patterns_a_sample_cannot_have():
    """'a' is absent in the data for every fourth sample: the oracle is right on every sample that has
    it, and on the others only when the class is 0."""
    y = torch.arange(80) % 2
    present = torch.ones(80, 3, dtype=torch.bool)
    present[::4, 0] = False
    data = MultimodalDataset({"a": torch.eye(2)[y], "b": torch.randn(80, 3), "c": torch.randn(80, 1)}, y,
                             present=present.numpy(), standardize=False)
    result = evaluate(Oracle(), data)
    test = data.indices("test")
    has_a, labels = present[test, 0], y[test]
    assert (~has_a).any() and has_a.any()
    assert result["subset_accuracy"]["a"] == 1.0  # only the samples that have 'a' count for a pattern keeping it
    assert result["subset_accuracy"]["a+b+c"] == 1.0
    expected_clean = (has_a | (labels == 0)).float().mean().item()
    assert result["clean_accuracy"] == pytest.approx(expected_clean)
    lacking = result["natural_pattern_accuracy"]["b+c"]
    assert lacking["count"] == int((~has_a).sum())
    assert lacking["accuracy"] == pytest.approx((labels[~has_a] == 0).float().mean().item())
    assert result["natural_pattern_accuracy"]["a+b+c"] == {"count": int(has_a.sum()), "accuracy": 1.0}
    recall = [(has_a | (labels == 0))[labels == c].float().mean().item() for c in (0, 1)]
    assert result["clean_balanced_accuracy"] == pytest.approx(sum(recall) / 2)
    assert evaluate(Oracle(), oracle_data_full())["natural_pattern_accuracy"] is None


def oracle_data_full():
    y = torch.arange(50) % 2
    return MultimodalDataset({"a": torch.eye(2)[y], "b": torch.randn(50, 3), "c": torch.randn(50, 1)}, y,
                             standardize=False)
