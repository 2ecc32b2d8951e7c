"""task="regression" end to end: every method that serves it trains with the squared error, the
controller's gain is the squared change of the prediction, and the protocol reports the mean absolute
error per pattern, its mean and worst (the largest), and robustness figures on the negated error."""

import numpy as np
import pytest
import torch
from test_data import single_thread  # noqa: F401 (autouse fixture)

from modalimmune import compare, evaluate
from modalimmune.data import MultimodalDataset
from modalimmune.methods.modalimmune.controller import information_gain
from modalimmune.models import build_model
from modalimmune.train import Trainer


@pytest.fixture(scope="module")
def data():
    """y = 2 a_0 - b_0 + noise: both modalities carry part of the target."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 3)).astype(np.float32), rng.normal(size=(200, 2)).astype(np.float32)
    y = (2 * a[:, 0] - b[:, 0] + 0.1 * rng.normal(size=200)).astype(np.float32)
    return MultimodalDataset({"a": a, "b": b}, y, task="regression", name="linear")


def make(data, method, epochs=8, **fields):
    torch.manual_seed(0)
    model = build_model("mlp", data.spec, data.num_outputs, hidden=32, embed_dim=8, fused_dim=16, dropout=0.0)
    return Trainer(model, data, method=method, epochs=epochs, batch_size=32, lr=1e-2, progress=False, patience=0,
                   **fields)


@pytest.mark.parametrize("method", ["erm", "moddrop", "modalimmune[hyper_every=3]"])
def test_methods_learn_the_target(data, method):
    trainer = make(data, method)
    trainer.fit()
    result = evaluate(trainer.model, data)
    spread = float(data.labels[data.indices("test")].std())
    assert result["metric"] == "mae" and result["clean_mae"] < 0.5 * spread
    assert result["clean_r2"] > 0.6
    assert result["worst_missing_mae"] == max(result["subset_mae"]["a"], result["subset_mae"]["b"])
    assert result["subset_mae"]["a+b"] == pytest.approx(result["clean_mae"])


def test_ogm_ge_refuses_regression(data):
    with pytest.raises(ValueError, match="method ogm_ge: expected a classification task"):
        make(data, "ogm_ge")


def test_validation_selects_on_the_error(data):
    trainer = make(data, "erm", epochs=3)
    trainer.fit()
    val = trainer.validate()
    assert set(val) == {"val_loss", "val_mae", "val_missing_mae", "val_score"}
    assert val["val_score"] == pytest.approx(-(val["val_mae"] + val["val_missing_mae"]) / 2)  # the negated error
    assert trainer.state["best_score"] <= 0


def test_information_gain_of_a_regression_is_half_the_squared_change(data):
    trainer = make(data, "erm", epochs=2)
    trainer.fit()
    model = trainer.model.eval()
    batch = data.batch(data.indices("test")[:16])
    embeddings = model.encode(batch)
    present = torch.ones(16, 2, dtype=torch.bool)
    gains = information_gain(model, embeddings, present, batch.masks, [{0}, {1}], regression=True)
    with torch.no_grad():
        full = model.head(model.fuse(embeddings, present, batch.masks)).squeeze(-1)
        for i, m in enumerate((0, 1)):
            kept = present.clone()
            kept[:, m] = False
            without = model.head(model.fuse(embeddings, kept, batch.masks)).squeeze(-1)
            assert gains[i].item() == pytest.approx(0.5 * (full - without).square().mean().item(), rel=1e-5)


def test_robustness_of_an_error_is_signed_so_higher_is_better(data, tmp_path):
    report = compare(data, ["erm", "moddrop"], 1, str(tmp_path), epochs=3, batch_size=32, log=lambda line: None)
    assert report["metric"] == "mae"
    erm, moddrop = report["methods"]["erm"], report["methods"]["moddrop"]
    assert erm["effective_robustness"]["mean"] == 0.0
    curve = moddrop["drop_rate_curve"]["mae"]
    assert moddrop["relative_robustness"]["mean"] < 0  # the area under the negated error curve
    assert moddrop["relative_robustness"]["mean"] == pytest.approx(
        -np.trapezoid([f["mean"] for f in curve], moddrop["drop_rate_curve"]["rates"]))
    assert "MAE" in (tmp_path / "report.md").read_text()
