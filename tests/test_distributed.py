"""Data-parallel training (docs/distributed.md): 2 gloo ranks with half the batch each
train to the parameters of 1 process with the whole batch; torchrun runs the CLI."""

import glob
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from test_data import gappy_dataset, single_thread, tiny_arrays, tiny_dataset  # noqa: F401 (autouse fixture)

from modalimmune import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(method, out_dir, steps, natural=False):
    """A few optimizer steps of ``method`` on a tiny dataset (``natural``: with missing modalities),
    without dropout (so that the function of a sample does not depend on which rank draws its mask)."""
    from modalimmune.models import build_model
    from modalimmune.train import Trainer

    data = gappy_dataset(n=90) if natural else tiny_dataset(n=90)
    torch.manual_seed(0)
    model = build_model("mlp", data.spec, data.num_classes, hidden=16, embed_dim=8, fused_dim=16, dropout=0.0)
    trainer = Trainer(model, data, out_dir=out_dir, method=method, epochs=3, batch_size=16, grad_accum=2,
                      progress=False, patience=0, checkpoint_every=2, log_every=1)
    trainer.fit(max_steps=steps)
    return trainer


def _join(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")


def _worker(rank, world, port, method, out_dir, steps, result, natural):
    _join(rank, world, port)
    try:
        trainer = train(method, out_dir, steps, natural)
        params = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, params)
        if rank == 0:
            torch.save(gathered, result)
    finally:
        distributed.shutdown()


def run_two_ranks(method, out_dir, steps, result, natural=False):
    mp.start_processes(_worker, args=(2, free_port(), method, out_dir, steps, result, natural), nprocs=2,
                       start_method="spawn", join=True)
    return torch.load(result)


@pytest.mark.parametrize("method", ["erm", "ogm_ge[ge=off]"])
def test_two_ranks_with_half_batches_equal_one_process(method, tmp_path):
    steps = 5  # of 6; 2 optimizer steps per epoch, the last micro-batch of each (15 samples) splits 8 + 7
    one = train(method, str(tmp_path / "one"), steps)
    ranks = run_two_ranks(method, str(tmp_path / "two"), steps, str(tmp_path / "params.pt"))
    for name, value in one.model.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks disagree on {name}"
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # rank 0 alone wrote the files; its logged losses are those of the whole batch
    assert sorted(os.listdir(tmp_path / "two")) == ["checkpoint.pt", "checkpoint.pt.prev", "metrics.jsonl"]
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(read(tmp_path / "one"), read(tmp_path / "two"), strict=True):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        assert a.get("loss", 0) == pytest.approx(b.get("loss", 0), rel=1e-5)


def thread_names():
    names = []
    for path in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(path) as comm:
                names.append(comm.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return names


def _threads_after_shutdown(rank, world, port, out_dir, result):
    _join(rank, world, port)
    try:
        train("erm", out_dir, 2)  # its optimizer imports torch._dynamo after init_process_group
    finally:
        distributed.shutdown()
    with open(f"{result}.{rank}", "w") as f:
        json.dump(thread_names(), f)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc")
def test_shutdown_leaves_no_gloo_thread(tmp_path):
    """A process group still referenced at shutdown keeps gloo's threads alive, and at interpreter exit one
    of them can abort the process (`terminate called without an active exception`, exit code 1)."""
    result = str(tmp_path / "threads")
    mp.start_processes(_threads_after_shutdown, args=(2, free_port(), str(tmp_path / "run"), result), nprocs=2,
                       start_method="spawn", join=True)
    for rank in range(2):
        with open(f"{result}.{rank}") as f:
            names = json.load(f)
        assert names and not [n for n in names if "gloo" in n], f"rank {rank}: threads after shutdown: {names}"


def test_shutdown_waits_for_every_rank_unless_leaving_after_an_error(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.shutdown()
    assert calls == ["barrier", "destroy"]  # rank 0 has written model.pt before any rank leaves
    calls.clear()
    with pytest.raises(KeyError):
        with distributed.process_group("cpu"):
            raise KeyError("a rank failed")  # the other ranks may never reach a barrier
    assert calls == ["destroy"]


def test_helpers_are_no_ops_in_one_process():
    x = torch.arange(4.0)
    assert distributed.all_reduce_mean(x) is x and torch.equal(x, torch.arange(4.0))
    assert distributed.all_reduce_sum([x])[0] is x
    assert distributed.shard_rows(5) == slice(0, 5)
    assert torch.equal(distributed.batch_mean(x, 3), x)
    assert distributed.gather_rows(x) is x and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.init_from_env() is None or distributed.launched_by_torchrun()


def test_torchrun_cli_trains_and_resumes(tmp_path):
    import numpy as np

    modalities, y, lengths = tiny_arrays(n=60)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, y=y, seq_lengths=lengths["seq"], **modalities)
    out = tmp_path / "run"
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "modalimmune", "train", "--dataset", str(npz),
               "--epochs", "2", "--batch-size", "16", "--out", str(out), "--no-progress", "--checkpoint-every", "2",
               "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["finished"] and summary["world_size"] == 2
    assert {"model.pt", "checkpoint.pt", "metrics.jsonl"} <= set(os.listdir(out))
    again = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["steps"] == summary["steps"]


@pytest.mark.parametrize("method", [
    "modalimmune",  # the defaults
    "modalimmune[hyper_every=2,hypergrad=neumann,mask=hard]",
    "modalimmune[single_views=one]",  # the transformer's default: one view per sample, drawn over the global batch
    # partial collapse (the SVD over the gathered rows), the IG controller, noise, no mask
    "modalimmune[hyper_every=2,hypergrad=neumann,s_min=0.5,s_max=0.5,controller=ig,mask=soft]",
    "modalimmune[hyper_every=3,hypergrad=neumann,intervention=noise,s_min=0.3,s_max=0.6,controller=ig,per_sample=false]",
])
def test_modalimmune_two_ranks_equal_one_process(method, tmp_path):
    """The batch-level statistics (collapse SVD, noise power, effective rank), the draws, g_c,
    g_d and the probe before the mask, and the hypergradient's solve are the global batch's:
    2 ranks with half the batch each reach the parameters of 1 process (docs/distributed.md)."""
    two_ranks_equal_one_process(method, tmp_path)


@pytest.mark.parametrize("method", [
    "modalimmune",  # the single-view term's n_m and draws over the samples that have each view
    "modalimmune[blank_share=0.5,controller=learnability]",  # blanked removals; the learnability's natural mean
    "modalimmune[swap_share=0.5]",  # swapped removals: another row of the global batch, its views counted there
])
def test_modalimmune_two_ranks_equal_one_process_with_natural_missingness(method, tmp_path):
    """With modalities missing from some samples (the draws keep a sample's only views, the term counts each
    view over the samples that have it, the blanked rows are drawn over the global batch) 2 ranks still reach
    the parameters of 1 process."""
    two_ranks_equal_one_process(method, tmp_path, natural=True)


def two_ranks_equal_one_process(method, tmp_path, natural=False):
    steps = 5  # the fifth step's last micro-batch splits 8 + 7: uneven rank shares
    one = train(method, str(tmp_path / "one"), steps, natural)
    ranks = run_two_ranks(method, str(tmp_path / "two"), steps, str(tmp_path / "params.pt"), natural)
    for name, value in one.model.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks disagree on {name}"
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    records = list(zip(read(tmp_path / "one"), read(tmp_path / "two"), strict=True))
    if "neumann" in method:
        assert any(a.get("hyper/solves", 0) > 0 for a, _ in records), "no hypergradient step was taken"
    for a, b in records:
        for key in ("loss", "term/erank", "mask/tau", "hyper/iterations", "hyper/applied_total", "lambda/imm"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), f"step {a['step']}: {key}"
