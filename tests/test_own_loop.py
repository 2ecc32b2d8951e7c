"""A method in a plain PyTorch loop (docs/examples/own_loop.py) trains exactly the Trainer's parameters."""

import importlib.util
import os

import pytest
import torch
from test_data import single_thread, tiny_dataset  # noqa: F401 (autouse fixture)

from modalimmune.models import build_model
from modalimmune.train import Trainer

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "examples", "own_loop.py")


def example():
    spec = importlib.util.spec_from_file_location("own_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_for(data):
    torch.manual_seed(0)
    return build_model("mlp", data.spec, data.num_classes, hidden=16, embed_dim=8, fused_dim=16)


@pytest.mark.parametrize("method, bf16", [("erm", False), ("ogm_ge", False), ("moddrop", True),
                                          ("modalimmune[mask=hard,hypergrad=neumann,hyper_every=3,probe_every=2,"
                                           "ig_every=2]", False),
                                          ("modalimmune[mask=hard,hypergrad=neumann,hyper_every=3,probe_every=2]",
                                           True)])
def test_own_loop_trains_the_trainers_parameters(method, bf16):
    data = tiny_dataset(n=240)
    settings = dict(epochs=1, batch_size=16, grad_accum=2, seed=3)
    trainer = Trainer(model_for(data), data, method=method, progress=False, patience=0,
                      bf16="on" if bf16 else "off", **settings)
    trainer.fit()
    assert trainer.state["step"] >= 5
    model = model_for(data)
    runner = example().train(model, data, method, bf16=bf16, **settings)
    for (name, a), b in zip(trainer.model.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    assert runner.step == trainer.state["step"]
    if runner.method.name == "modalimmune":
        assert torch.equal(runner.method.tuner.phi, trainer.method.tuner.phi)
        assert runner.method.tuner.log["hyper/solves"] > 0
