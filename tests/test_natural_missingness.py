"""Samples that lack a modality in the data (docs/benchmark.md, "Datasets"): every method trains on
them, ModDrop and ModalImmune never remove what is already gone, and the controller measures a
modality's information gain only on the samples that have it."""

import numpy as np
import pytest
import torch
from test_data import gappy_dataset, single_thread  # noqa: F401 (autouse fixture)

from modalimmune.data.missing import missing_patterns
from modalimmune.eval.protocol import pattern_score
from modalimmune.methods import StepContext, build_method
from modalimmune.methods.modalimmune import Views
from modalimmune.methods.modalimmune.controller import _variant_predictions, information_gain
from modalimmune.models import build_model
from modalimmune.train import Trainer


@pytest.fixture(scope="module")
def data():
    """'a' absent in every third sample, 'seq' in every fifth ('b' always there)."""
    return gappy_dataset(n=150)


def make(data, method):
    torch.manual_seed(0)
    model = build_model(build_method(method).model or "mlp", data.spec, data.num_classes, hidden=16, embed_dim=8,
                        fused_dim=16)
    return Trainer(model, data, method=method, epochs=1, batch_size=16, progress=False, patience=0)


@pytest.mark.parametrize("method", ["erm", "moddrop", "ogm_ge", "moddrop_kd", "ensemble", "erm[keep=a+b]",
                                    "modalimmune", "modalimmune[hypergrad=neumann,hyper_every=2,mask=hard]",
                                    "modalimmune[per_sample=true,controller=uniform]"])
def test_every_method_trains(data, method):
    trainer = make(data, method)
    assert trainer.fit()["finished"] and all(torch.isfinite(p).all() for p in trainer.params)


def test_robust_validation_scores_each_pattern_on_the_samples_that_have_it(data):
    trainer = make(data, "erm")
    trainer.fit()
    scores = [pattern_score(trainer.model, data, p, "val") for p in missing_patterns(3)]
    val = trainer.validate()
    assert val["val_missing_accuracy"] == pytest.approx(np.mean([s for s in scores if s is not None]))


def first_batch(trainer):
    return trainer.dataset.batch(trainer.dataset.indices("train")[:16])


def test_moddrop_keeps_only_what_the_sample_has(data, monkeypatch):
    trainer = make(data, "moddrop[p=0.5]")
    seen = []
    fuse = trainer.model.fuse
    monkeypatch.setattr(trainer.model, "fuse", lambda z, present, masks=None: seen.append(present) or
                        fuse(z, present, masks))
    batch = first_batch(trainer)
    trainer.method.training_step(trainer.model, batch, StepContext(trainer.params, 1.0, 0, 0, 1))
    (present,) = seen
    assert not (present & ~batch.present).any() and present.any(1).all()


def test_modalimmune_never_removes_what_is_gone_nor_everything(data):
    trainer = make(data, "modalimmune[per_sample=true,hypergrad=off]")
    batch = first_batch(trainer)
    natural = trainer.model.all_present(batch)
    assert torch.equal(natural, batch.present) and not natural.all()
    clean = Views(trainer.model.encode(batch), natural, batch.masks)
    strengths = torch.zeros(16, 3, dtype=torch.float64)
    strengths[:, 1] = 1.0  # every sample loses 'b' ...
    strengths[::2, 0] = 1.0  # ... and half of them 'a' too: those without 'seq' would be left with nothing
    out = trainer.method.intervene(clean, strengths).present
    assert not (out & ~natural).any() and out.any(1).all()
    emptied = ~(natural & ~(strengths > 0)).any(1)
    assert emptied.any() and torch.equal(out[emptied], natural[emptied])  # such a sample keeps what it has
    assert not out[~emptied, 1].any()


def test_information_gain_is_averaged_over_the_samples_that_have_the_modality(data):
    trainer = make(data, "erm")
    model, batch = trainer.model.eval(), first_batch(trainer)
    embeddings = model.encode(batch)
    sets = [{0}, {2}]
    gains = information_gain(model, embeddings, batch.present, batch.masks, sets, natural=True)
    full, knocked = _variant_predictions(model, embeddings, batch.present, batch.masks,
                                         [{0, 1, 2} - s for s in sets])
    kl = (full.exp() * (full - knocked)).sum(-1).double()  # (sets, batch)
    for i, s in enumerate(sets):
        having = batch.present[:, sorted(s)].any(1)
        assert 0 < having.sum() < 16
        assert kl[i][~having].abs().max() < 1e-6  # nothing to remove: no information
        assert gains[i].item() == pytest.approx(kl[i][having].mean().item(), rel=1e-5)
    diluted = information_gain(model, embeddings, batch.present, batch.masks, sets)
    assert (diluted < gains).all()
