"""The ready models follow the model contract (docs/benchmark.md, "Models")."""

import pytest
import torch
from test_data import single_thread, tiny_dataset  # noqa: F401 (autouse fixture)

from modalimmune.models import build_model, pool


@pytest.fixture(scope="module")
def data():
    return tiny_dataset()


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_contract_shapes(data, name):
    model = build_model(name, data.spec, data.num_classes, decode=True).eval()
    batch = data.batch(data.indices("train")[:7])
    embeddings = model.encode(batch)
    assert set(embeddings) == set(data.modalities)
    assert all(z.shape[0] == 7 and z.ndim in (2, 3) for z in embeddings.values())
    present = torch.ones(7, 3, dtype=torch.bool)
    joint = model.fuse(embeddings, present, batch.masks)
    assert joint.ndim == 2 and joint.shape[0] == 7
    assert model.head(joint).shape == (7, data.num_classes)
    decoded = model.decode(joint)
    assert {k: v.shape for k, v in decoded.items()} == {
        k: pool(z, batch.masks.get(k)).shape for k, z in embeddings.items()}
    assert torch.equal(model(batch), model.head(joint))


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_missing_modality_input_is_ignored(data, name):
    model = build_model(name, data.spec, data.num_classes).eval()
    batch = data.batch(data.indices("test")[:5])
    present = torch.tensor([[True, False, True]] * 5)
    before = model(batch, present)
    garbage = batch.replace("b", torch.randn_like(batch.inputs["b"]) * 100)
    assert torch.allclose(model(garbage, present), before, atol=1e-5)
    assert not torch.allclose(model(garbage), model(batch), atol=1e-3)  # but it counts when present


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_padding_is_ignored(data, name):
    model = build_model(name, data.spec, data.num_classes).eval()
    batch = data.batch(data.indices("train")[:6])
    seq = batch.inputs["seq"].clone()
    seq[~batch.masks["seq"]] = 50.0
    assert torch.allclose(model(batch.replace("seq", seq)), model(batch), atol=1e-5)


def test_unknown_model_name(data):
    with pytest.raises(ValueError, match="model: unknown 'cnn'"):
        build_model("cnn", data.spec, data.num_classes)


def test_pool_averages_real_tokens():
    z = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert pool(z, torch.tensor([[True, True, False]])).item() == 2.0
    assert torch.equal(pool(z[:, 0]), z[:, 0])
