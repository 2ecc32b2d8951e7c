"""bf16 autocast training (docs/distributed.md, "Mixed precision"): on mfeat it
reaches the accuracy of fp32 training within one point, for every method."""

import pytest
import torch
from test_data import single_thread  # noqa: F401 (autouse fixture)

from modalimmune.data import load_dataset
from modalimmune.models import build_model
from modalimmune.train import Trainer


@pytest.fixture(scope="module")
def mfeat():
    return load_dataset("mfeat")




def accuracy(model, data):
    batch = data.batch(data.indices("test"))
    with torch.no_grad():
        return (model.eval()(batch).argmax(-1) == batch.labels).float().mean().item()


def trained(data, bf16, method="erm", epochs=6):
    torch.manual_seed(0)
    model = build_model("mlp", data.spec, data.num_classes, hidden=64, embed_dim=32, fused_dim=64)
    trainer = Trainer(model, data, method=method, epochs=epochs, batch_size=64, lr=3e-3, bf16=bf16,
                      progress=False, patience=0)
    trainer.fit()
    return trainer


def test_bf16_reaches_the_fp32_accuracy_on_mfeat(mfeat):
    fp32, bf16 = trained(mfeat, "off"), trained(mfeat, "on")
    assert bf16.bf16 and not fp32.bf16
    a, b = accuracy(fp32.model, mfeat), accuracy(bf16.model, mfeat)
    assert a > 0.9 and abs(a - b) <= 0.01, (a, b)


@pytest.mark.parametrize("method", ["moddrop", "ogm_ge", "modalimmune[hypergrad=neumann,hyper_every=2]"])
def test_every_method_trains_under_bf16(mfeat, method):
    trainer = trained(mfeat, "on", method, epochs=1)
    assert trainer.state["nonfinite_total"] == 0
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in trainer.model.parameters())
    assert accuracy(trainer.model, mfeat) > 0.5
