"""Faults (docs/distributed.md, "Faults"): SIGKILL at random moments, corrupted
checkpoints, non-finite losses and gradients."""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_data import single_thread, tiny_arrays  # noqa: F401 (autouse fixture)
from test_trainer import data, make  # noqa: F401 (fixture)

from modalimmune.methods import ERM, register_method
from modalimmune.train import NonFiniteError, checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLS = 20


def _train_command(npz, out, epochs, checkpoint_every=1):
    return [sys.executable, "-m", "modalimmune", "train", "--dataset", str(npz), "--epochs", str(epochs),
            "--batch-size", "8", "--out", str(out), "--no-progress", "--checkpoint-every", str(checkpoint_every),
            "--device", "cpu", "--patience", "0", "--resume"]


def _wait_for_new_checkpoint(process, path, since, timeout=60):
    """Until ``path`` changes after ``since`` (training runs) or the process ends."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and process.poll() is None:
        try:  # the file is briefly absent while a new checkpoint rotates the old one to .prev
            if os.stat(path).st_mtime_ns > since:
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    return False


def _kill_during_write(process, folder, timeout=10):
    """SIGKILL as soon as a checkpoint's temporary file exists (a write in progress)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and process.poll() is None:
        if any(name.startswith(".checkpoint.pt.tmp-") for name in os.listdir(folder)):
            process.send_signal(signal.SIGKILL)
            return True
    process.send_signal(signal.SIGKILL)
    return False


def _final(out):
    state = checkpoint.load(str(out / "checkpoint.pt"))
    return state["model"], (out / "metrics.jsonl").read_bytes(), checkpoint.load(str(out / "model.pt"))["model"]


def test_sigkill_at_random_moments_resumes_to_the_same_run(tmp_path):
    modalities, y, lengths = tiny_arrays(n=120, seed=3)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, y=y, seq_lengths=lengths["seq"], **modalities)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}
    epochs = 6  # 11 optimizer steps per epoch, a checkpoint after each
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run(_train_command(npz, whole, epochs), env=env, check=True, capture_output=True, timeout=120)

    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    os.makedirs(cut)
    kills, during_write, finished_early = 0, 0, 0
    while kills < KILLS:
        # no writer runs here
        stamp = os.stat(cut / "checkpoint.pt").st_mtime_ns if (cut / "checkpoint.pt").exists() else 0
        process = subprocess.Popen(_train_command(npz, cut, epochs), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        if not _wait_for_new_checkpoint(process, str(cut / "checkpoint.pt"), stamp):
            assert process.wait() == 0, process.stderr.read().decode()[-2000:]
            finished_early += 1  # nothing left to interrupt: start over in a fresh folder
            for name in os.listdir(cut):
                os.unlink(cut / name)
            continue
        if kills % 3 == 0:
            during_write += _kill_during_write(process, cut)
        else:
            time.sleep(rng.uniform(0, 0.05))
            process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
        kills += 1
    assert finished_early == 0
    assert during_write >= KILLS // 3 - 1, "the checkpoint writes were never caught in progress"
    done = subprocess.run(_train_command(npz, cut, epochs), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (model_a, metrics_a, best_a), (model_b, metrics_b, best_b) = _final(whole), _final(cut)
    for name, value in model_a.items():
        assert torch.equal(value, model_b[name]), name
        assert torch.equal(best_a[name], best_b[name]), name
    assert metrics_a == metrics_b
    assert not glob.glob(str(cut / ".checkpoint.pt.tmp-*"))


def test_sigterm_stops_at_a_step_boundary_and_resumes_to_the_same_run(tmp_path):
    """SIGTERM at random moments: each time the run writes its checkpoint at the next optimizer-step
    boundary and exits with PREEMPTED_EXIT_CODE; resumed each time, it ends as the uninterrupted run."""
    from modalimmune.train.trainer import PREEMPTED_EXIT_CODE

    modalities, y, lengths = tiny_arrays(n=120, seed=4)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, y=y, seq_lengths=lengths["seq"], **modalities)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}
    # an epoch of this run is some 30 ms of training: six of them, and a signal within 30 ms of a record,
    # so that several signals land before the end however fast the machine trains
    epochs, whole, cut = 6, tmp_path / "whole", tmp_path / "cut"
    command = lambda out: _train_command(npz, out, epochs, checkpoint_every=0)  # noqa: E731 (after each epoch)
    subprocess.run(command(whole), env=env, check=True, capture_output=True, timeout=120)
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    os.makedirs(cut)
    stops = 0
    while True:
        metrics = cut / "metrics.jsonl"
        written = metrics.stat().st_size if metrics.exists() else 0
        process = subprocess.Popen(command(cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not _wait_for_growth(process, metrics, written):
            assert process.wait() == 0 and _finished(cut, epochs), process.stderr.read().decode()[-2000:]
            break
        time.sleep(rng.uniform(0, 0.03))
        process.send_signal(signal.SIGTERM)
        code, err = process.wait(), process.stderr.read().decode()
        process.stderr.close()
        if code in (0, -signal.SIGTERM) and _finished(cut, epochs):
            break  # training and the export were done before the signal (SIGTERM then only ends the process)
        assert code == PREEMPTED_EXIT_CODE and "stopped by SIGTERM" in err, (code, err[-2000:])
        assert (cut / "checkpoint.pt").exists() and not glob.glob(str(cut / ".checkpoint.pt.tmp-*"))
        stops += 1
    assert stops >= 2, "SIGTERM never landed while training ran"
    (model_a, metrics_a, best_a), (model_b, metrics_b, best_b) = _final(whole), _final(cut)
    for name, value in model_a.items():
        assert torch.equal(value, model_b[name]), name
        assert torch.equal(best_a[name], best_b[name]), name
    assert metrics_a == metrics_b


def _finished(out, epochs):
    """Whether the run in ``out`` trained all its epochs and wrote its model.pt."""
    return (out / "model.pt").exists() and checkpoint.load(str(out / "checkpoint.pt"))["trainer"]["epoch"] == epochs


def _wait_for_growth(process, path, size, timeout=60):
    """Until ``path`` grows past ``size`` (this process trains: it writes records) or the process ends."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and process.poll() is None:
        if path.exists() and path.stat().st_size > size:
            return True
        time.sleep(0.002)
    return False


def test_a_corrupted_checkpoint_falls_back_to_the_previous_one(data, tmp_path):  # noqa: F811
    whole = make(data, tmp_path / "whole", checkpoint_every=2)
    whole.fit()
    cut = make(data, tmp_path / "cut", checkpoint_every=2)
    cut.fit(max_steps=7)
    path = tmp_path / "cut" / "checkpoint.pt"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped bit pattern in the middle
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch"):
        checkpoint.load(str(path))
    resumed = make(data, tmp_path / "cut", checkpoint_every=2, model_seed=5)
    with pytest.warns(RuntimeWarning, match="resuming from the previous checkpoint .*checkpoint.pt.prev"):
        resumed.fit(resume=True)
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert (tmp_path / "whole" / "metrics.jsonl").read_bytes() == (tmp_path / "cut" / "metrics.jsonl").read_bytes()

    path.write_bytes(path.read_bytes()[:100])  # truncated, and the previous one too: no silent restart
    (tmp_path / "cut" / "checkpoint.pt.prev").write_bytes(b"")
    with pytest.raises(ValueError, match="truncated|no checksum header"):
        make(data, tmp_path / "cut", checkpoint_every=2).fit(resume=True)


@register_method("test_nonfinite")
class NonFiniteAt(ERM):
    """ERM whose loss is multiplied by NaN or Inf on the listed optimizer steps (a test double)."""

    def __init__(self, steps="", value="nan"):
        self.steps = {int(s) for s in str(steps).split(":") if s}
        self.value = float(value)

    def training_step(self, model, batch, ctx):
        if ctx.step not in self.steps:
            return super().training_step(model, batch, ctx)
        logits = model(batch)
        loss = torch.nn.functional.cross_entropy(logits.float(), batch.labels) * self.value
        ctx.backward(loss)
        return {"loss": loss.item()}


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nonfinite_steps_are_skipped_and_counted(data, tmp_path, value):  # noqa: F811
    trainer = make(data, tmp_path, method=f"test_nonfinite[steps=3:4,value={value}]", log_every=1,
                   checkpoint_every=1, epochs=2)
    trainer.fit(max_steps=3)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    adam = [s["exp_avg"].clone() for s in trainer.optimizer.state.values()]
    trainer.fit(resume=True, max_steps=5)  # steps 4 and 5 (ctx.step 3 and 4) are not finite
    for name, value_ in trainer.model.state_dict().items():
        assert torch.equal(value_, before[name]), name
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(adam, trainer.optimizer.state.values()))
    assert trainer.state["nonfinite_total"] == 2 and trainer.state["nonfinite_run"] == 2
    summary = trainer.fit(resume=True)
    assert summary["finished"] and trainer.state["nonfinite_run"] == 0
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in records if r["event"] == "step"][2:6] == [0, 1, 2, 2]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_too_many_nonfinite_steps_stop_with_the_last_good_state(data, tmp_path):  # noqa: F811
    reference = make(data)
    reference.fit(max_steps=2)  # the steps before the first bad one
    trainer = make(data, tmp_path, method="test_nonfinite[steps=2:3:4:5]", max_nonfinite_steps=3)
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row had a non-finite loss or gradient "
                                             r"\(up to step 5.*max_nonfinite_steps=3\); the last good state is in"):
        trainer.fit()
    saved = checkpoint.load(str(tmp_path / "checkpoint.pt"))
    for name, value in reference.model.state_dict().items():
        assert torch.equal(saved["model"][name], value), name
    assert saved["trainer"]["step"] == 5 and saved["trainer"]["nonfinite_run"] == 3
