"""Host syncs per training step: a method's logs stay tensors until a log line is written, and the
trainer reads one value per optimizer step (whether to apply it). A sync is counted as a Python
read of a tensor's value (``item``, ``tolist``, ``float()``, ``int()``, ``bool()``, ``cpu()``); the
optimizer's own step counters, host tensors by design, are not counted."""

import contextlib

import pytest
import torch
from test_data import single_thread, tiny_dataset  # noqa: F401 (autouse fixture)

from modalimmune.models import build_model
from modalimmune.train import Trainer

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu")


class SyncCounter:
    """Counts tensor reads while ``active``; installs itself on ``torch.Tensor`` via ``monkeypatch``."""

    def __init__(self, monkeypatch):
        self.active, self.count = False, 0
        for name in READS:
            original = getattr(torch.Tensor, name)

            def read(tensor, *args, _original=original, **kwargs):
                self.count += self.active
                return _original(tensor, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, read)

    @contextlib.contextmanager
    def counting(self):
        before, self.active = self.count, True
        try:
            yield
        finally:
            self.active = False
        self.last = self.count - before

    @contextlib.contextmanager
    def paused(self):
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was


def per_step_syncs(monkeypatch, spec, steps, **fields):
    """(syncs inside each step's ``training_step``, syncs inside each ``_apply_step``)."""
    data = tiny_dataset(n=200)
    torch.manual_seed(0)
    model = build_model("mlp", data.spec, data.num_classes, hidden=16, embed_dim=8, fused_dim=16)
    trainer = Trainer(model, data, method=spec, epochs=3, batch_size=16, progress=False, log_every=1000,
                      **fields)
    counter = SyncCounter(monkeypatch)
    method_syncs, apply_syncs = [], []
    training_step, apply_step = trainer.method.training_step, trainer._apply_step
    optimizer_step = trainer.optimizer.step

    def counted_training_step(*args, **kwargs):
        with counter.counting():
            result = training_step(*args, **kwargs)
        method_syncs.append(counter.last)
        return result

    def counted_apply_step(*args, **kwargs):
        with counter.counting():
            apply_step(*args, **kwargs)
        apply_syncs.append(counter.last)

    def uncounted_optimizer_step(*args, **kwargs):
        with counter.paused():
            return optimizer_step(*args, **kwargs)
    monkeypatch.setattr(trainer.method, "training_step", counted_training_step)
    monkeypatch.setattr(trainer, "_apply_step", counted_apply_step)
    monkeypatch.setattr(trainer.optimizer, "step", uncounted_optimizer_step)
    trainer.fit(max_steps=steps)
    assert len(method_syncs) == len(apply_syncs) == steps
    return method_syncs, apply_syncs


@pytest.mark.parametrize("spec", ["erm", "moddrop", "ogm_ge", "moddrop_kd", "ensemble", "erm[keep=a+b]"])
def test_baselines_read_nothing_in_their_step(monkeypatch, spec):
    method_syncs, apply_syncs = per_step_syncs(monkeypatch, spec, 4)
    assert method_syncs == [0] * 4 and apply_syncs == [1] * 4


@pytest.mark.parametrize("spec, measures, probes", [("modalimmune", False, False),
                                                    ("modalimmune[controller=learnability]", True, False),
                                                    ("modalimmune[mask=hard,controller=ig]", True, True)])
def test_modalimmune_reads_nothing_outside_its_periodic_work(monkeypatch, spec, measures, probes):
    """The defaults' uniform draw makes no read at all. A measuring controller measures every 8th step (its
    scores come to the host: one copy); with the mask, the masker probes every 10th (tau from the
    histogram: one copy, then three reads of that host copy); every other micro-batch makes no read, and
    the whole optimizer step one."""
    steps = 13
    method_syncs, apply_syncs = per_step_syncs(monkeypatch, spec, steps)
    allowed = [measures * (s % 8 == 0) + 4 * probes * (s % 10 == 0) for s in range(steps)]
    assert all(0 < n <= limit if limit else n == 0 for n, limit in zip(method_syncs, allowed)), method_syncs
    assert apply_syncs == [1] * steps


def test_a_log_line_reads_the_logs_once_per_device(monkeypatch):
    data = tiny_dataset(n=200)
    model = build_model("mlp", data.spec, data.num_classes, hidden=16, embed_dim=8, fused_dim=16)
    trainer = Trainer(model, data, method="moddrop", epochs=1, batch_size=16, progress=False, log_every=1)
    counter = SyncCounter(monkeypatch)
    write = trainer.metrics.write
    seen = []

    def counted_write(**record):
        seen.append(record)
        return write(**record)
    monkeypatch.setattr(trainer.metrics, "write", counted_write)
    optimizer_step = trainer.optimizer.step

    def uncounted_optimizer_step(*args, **kwargs):
        with counter.paused():
            return optimizer_step(*args, **kwargs)
    monkeypatch.setattr(trainer.optimizer, "step", uncounted_optimizer_step)
    with counter.counting():
        trainer.fit(max_steps=3)
    # per step: the apply decision, and one tolist of the stacked logs (all on the CPU here)
    assert counter.last == 3 * 2 and len(seen) == 3
    assert all(isinstance(r["loss"], float) and isinstance(r["kept_fraction"], float) for r in seen)
