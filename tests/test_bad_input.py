"""Bad input across the public API, table-driven: every case must raise a clear
error that names the argument, and leave every tensor, file and state untouched."""

import copy
import os
import pickle
from unittest import mock

import numpy as np
import pytest
import torch
from test_data import _write_bad_npz, single_thread, tiny_arrays, tiny_dataset  # noqa: F401 (autouse fixture)

from modalimmune import ops
from modalimmune.cli import main
from modalimmune.data import MultimodalDataset, load_dataset
from modalimmune.data.dataset import Batch
from modalimmune.eval import evaluate
from modalimmune.models import build_model
from modalimmune.train import TrainConfig, Trainer, checkpoint

NAN = float("nan")


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _mask(*tensors, **kwargs):
    """Arguments of curvature_mask_ over one parameter, each list replaceable."""
    parts = dict(grads_clean=[_r(5)], grads_destr=[_r(5)], curvature=[_r(5)], probe=None)
    parts.update(kwargs)
    return ops.curvature_mask_, (parts.pop("grads_clean"), parts.pop("grads_destr"), parts.pop("curvature"),
                                 parts.pop("probe")), {"tau": 1.0, **parts}


def _neumann(**kwargs):
    parts = dict(v=[_r(4)], p=[_r(4)], w=[_r(4)], alpha=0.1)
    parts.update(kwargs)
    return ops.neumann_update_, (parts.pop("v"), parts.pop("p"), parts.pop("w"), parts.pop("alpha")), parts


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shared, read-only material: a dataset, a model, a model.pt and a checkpoint."""
    folder = tmp_path_factory.mktemp("world")
    data = tiny_dataset(n=60)
    torch.manual_seed(0)
    model = build_model("mlp", data.spec, data.num_classes, hidden=8, embed_dim=4, fused_dim=8)
    trainer = Trainer(model, data, out_dir=str(folder / "run"), epochs=1, batch_size=16, progress=False)
    trainer.fit()
    modalities, y, lengths = tiny_arrays(n=60)
    np.savez(folder / "tiny.npz", y=y, seq_lengths=lengths["seq"], **modalities)
    np.savez(folder / "no_y.npz", **modalities)
    (folder / "garbage.npz").write_bytes(b"not a zip file at all")

    class Evil:
        def __reduce__(self):
            return (open, (str(folder / "pwned"), "w"))
    payload = pickle.dumps({"format": checkpoint.FORMAT, "model": Evil()})
    header = b"%s sha256=%s size=%d\n" % (checkpoint.MAGIC, __import__("hashlib").sha256(payload).hexdigest().encode(),
                                          len(payload))
    (folder / "evil.pt").write_bytes(header + payload)
    raw = (folder / "run" / "checkpoint.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (folder / "flipped.pt").write_bytes(raw[:-10] + bytes(b ^ 1 for b in raw[-10:]))
    (folder / "folder.pt").mkdir()
    for kind in ("empty", "text", "scalar", "string-labels", "objects", "two-samples"):
        _write_bad_npz(folder, kind)
    moved = checkpoint.load(str(folder / "run" / "model.pt"))
    checkpoint.save(str(folder / "moved.pt"), {**moved, "dataset_source": str(folder / "moved_away.npz")})
    return {"data": data, "model": model, "folder": folder, "modalities": modalities, "y": y}


def _model(world):
    return world["model"]


def _trainer(world, **fields):
    return Trainer, (world["model"], world["data"]), {"progress": False, **fields}


def _dataset(world, **changes):
    modalities = {k: torch.as_tensor(v).clone() for k, v in world["modalities"].items()}
    labels = torch.as_tensor(world["y"]).clone()
    for key, value in changes.items():
        if key == "labels":
            labels = value(labels)
        else:
            modalities = value(modalities)
    return MultimodalDataset, (modalities, labels), {}


def _with(modalities, key, value):
    return {**modalities, key: value}


def _without(batch, name):
    return Batch({k: v for k, v in batch.inputs.items() if k != name}, batch.labels, batch.masks)


def _dataset_with_extra(world):
    modalities = {k: torch.as_tensor(v) for k, v in world["modalities"].items()}
    modalities["extra"] = torch.zeros(len(world["y"]), 3)
    return MultimodalDataset(modalities, world["y"])


def _cli(world, *argv):
    return main, ([a.format(f=world["folder"]) for a in argv],), {}


def _cli_under_torchrun(world, *argv):
    def launched_by_torchrun(argv):
        with mock.patch.dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0"):
            main(argv)
    return launched_by_torchrun, _cli(world, *argv)[1], {}


def _two_samples(**kwargs):
    return MultimodalDataset, ({"a": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}, torch.tensor([0, 1])), kwargs


# (id, builder(world) -> (fn, args, kwargs), exception type(s), regex the message must match)
CASES = [
    # -- ops: shapes, dtypes, NaN/Inf, empty, ranks, options
    ("mask/shape", lambda w: _mask(grads_destr=[_r(6)]), (ValueError, TypeError), r"grads_destr"),
    ("mask/dtype", lambda w: _mask(curvature=[_r(5).double()]), (ValueError, TypeError), r"curvature"),
    ("mask/int", lambda w: _mask(grads_clean=[torch.ones(5, dtype=torch.long)]), (ValueError, TypeError),
     r"grads_clean"),
    ("mask/count", lambda w: _mask(grads_destr=[_r(5), _r(5)]), (ValueError, TypeError), r"grads_destr"),
    ("mask/not-a-list", lambda w: _mask(grads_clean=_r(5)), (ValueError, TypeError), r"grads_clean"),
    ("mask/tau-nan", lambda w: _mask(tau=NAN), (ValueError, TypeError), r"tau"),
    ("mask/tau-negative", lambda w: _mask(tau=-1.0), (ValueError, TypeError), r"tau"),
    ("mask/beta", lambda w: _mask(beta=1.0), (ValueError, TypeError), r"beta"),
    ("mask/mode", lambda w: _mask(mode="medium"), (ValueError, TypeError), r"mode"),
    ("mask/backend", lambda w: _mask(backend="opencl"), (ValueError, TypeError), r"backend"),
    ("mask/probe-shape", lambda w: _mask(probe=[_r(3)]), (ValueError, TypeError), r"probe"),
    ("mask/device", lambda w: _mask(curvature=[torch.zeros(5, device="meta")]), (ValueError, TypeError, RuntimeError),
     r"curvature|device"),
    ("neumann/shape", lambda w: _neumann(p=[_r(5)]), (ValueError, TypeError), r"\bp\b"),
    ("neumann/dtype", lambda w: _neumann(w=[_r(4).double()]), (ValueError, TypeError), r"\bw\b"),
    ("neumann/alpha-nan", lambda w: _neumann(alpha=NAN), (ValueError, TypeError), r"alpha"),
    ("neumann/damping", lambda w: _neumann(damping=-1.0), (ValueError, TypeError), r"damping"),
    ("neumann/count", lambda w: _neumann(v=[_r(4), _r(4)]), (ValueError, TypeError), r"\b[vpw]\b"),
    ("svd/1d", lambda w: (ops.lowrank_svd, (_r(5), 2), {}), (ValueError, TypeError), r"\bA\b"),
    ("svd/int", lambda w: (ops.lowrank_svd, (torch.ones(5, 4, dtype=torch.long), 2), {}), (ValueError, TypeError),
     r"\bA\b"),
    ("svd/k-zero", lambda w: (ops.lowrank_svd, (_r(6, 4), 0), {}), (ValueError, TypeError), r"\bk\b"),
    ("svd/k-big", lambda w: (ops.lowrank_svd, (_r(6, 4), 9), {}), (ValueError, TypeError), r"\bk\b"),
    ("svd/nan", lambda w: (ops.lowrank_svd, (_r(6, 4).index_fill_(0, torch.tensor([1]), NAN), 2), {}),
     (ValueError, TypeError), r"\bA\b"),
    ("svd/empty", lambda w: (ops.lowrank_svd, (_r(0, 4), 1), {}), (ValueError, TypeError), r"\bA\b|\bk\b"),
    ("svd/niter", lambda w: (ops.lowrank_svd, (_r(6, 4), 2), {"niter": -1}), (ValueError, TypeError), r"niter"),
    ("svd/oversample", lambda w: (ops.lowrank_svd, (_r(6, 4), 2), {"oversample": -2}), (ValueError, TypeError),
     r"oversample"),
    ("erank/1d", lambda w: (ops.effective_rank, (_r(5),), {}), (ValueError, TypeError), r"\bH\b"),
    ("erank/inf", lambda w: (ops.effective_rank, (_r(6, 4).index_fill_(1, torch.tensor([0]), float("inf")),), {}),
     (ValueError, TypeError), r"\bH\b"),
    ("erank/eps", lambda w: (ops.effective_rank, (_r(6, 4),), {"eps": -1.0}), (ValueError, TypeError), r"eps"),
    ("collapse/strength", lambda w: (ops.spectral_collapse, (_r(6, 4), 1.5), {}), (ValueError, TypeError),
     r"strength"),
    ("collapse/strength-nan", lambda w: (ops.spectral_collapse, (_r(6, 4), NAN), {}), (ValueError, TypeError),
     r"strength"),
    ("collapse/1d", lambda w: (ops.spectral_collapse, (_r(6), 0.5), {}), (ValueError, TypeError), r"\bX\b"),
    ("collapse/nan", lambda w: (ops.spectral_collapse, (_r(6, 4).index_fill_(0, torch.tensor([2]), NAN), 0.5), {}),
     (ValueError, TypeError), r"\bX\b"),
    ("collapse/backend", lambda w: (ops.spectral_collapse, (_r(6, 4), 0.5), {"backend": "fpga"}),
     (ValueError, TypeError), r"backend"),
    ("quantile/q", lambda w: (ops.quantile_from_hist, (torch.ones(ops.hist_edges().numel() - 1), 1.5), {}),
     (ValueError, TypeError), r"\bq\b"),
    # -- bad config values
    ("config/epochs", lambda w: (TrainConfig, (), {"epochs": 0}), ValueError, r"config\.epochs"),
    ("config/batch", lambda w: (TrainConfig, (), {"batch_size": 2.5}), ValueError, r"config\.batch_size"),
    ("config/lr", lambda w: (TrainConfig, (), {"lr": float("inf")}), ValueError, r"config\.lr"),
    ("config/lr-zero", lambda w: (TrainConfig, (), {"lr": 0}), ValueError, r"config\.lr"),
    ("config/bf16", lambda w: (TrainConfig, (), {"bf16": True}), ValueError, r"config\.bf16"),
    ("config/select", lambda w: (TrainConfig, (), {"select": "missing"}), ValueError, r"config\.select"),
    ("config/warmup", lambda w: (TrainConfig, (), {"warmup_fraction": 2}), ValueError, r"config\.warmup_fraction"),
    ("config/nonfinite", lambda w: (TrainConfig, (), {"max_nonfinite_steps": -1}), ValueError,
     r"config\.max_nonfinite_steps"),
    ("config/progress", lambda w: (TrainConfig, (), {"progress": "yes"}), ValueError, r"config\.progress"),
    ("config/options", lambda w: (TrainConfig, (), {"model_options": [1]}), ValueError, r"config\.model_options"),
    ("config/unknown", lambda w: (TrainConfig.from_dict, ({"epochs": 1, "epoch": 2},), {}), ValueError, r"epoch\b"),
    # -- the trainer
    ("trainer/method", lambda w: _trainer(w, method="sgd"), ValueError, r"method: expected one of .*got 'sgd'"),
    ("trainer/method-option", lambda w: _trainer(w, method="moddrop[q=1]"), ValueError, r"method: moddrop has no"),
    ("trainer/method-value", lambda w: _trainer(w, method="moddrop[p=1.5]"), ValueError, r"option p"),
    ("trainer/device", lambda w: _trainer(w, device="tpu:7"), ValueError, r"config\.device"),
    ("trainer/not-a-model", lambda w: (Trainer, (torch.nn.Linear(2, 2), w["data"]), {}), TypeError, r"model"),
    ("trainer/config-type", lambda w: (Trainer, (w["model"], w["data"], {"epochs": 1}), {}), TypeError, r"config"),
    ("trainer/config-and-fields", lambda w: (Trainer, (w["model"], w["data"], TrainConfig()), {"epochs": 2}),
     ValueError, r"config"),
    ("trainer/other-modalities", lambda w: (Trainer, (build_model("mlp", {"a": w["data"].spec["a"]}, 3), w["data"]),
                                            {}), ValueError, r"model: its modalities"),
    ("trainer/resume-corrupt", lambda w: (Trainer(w["model"], w["data"], progress=False, epochs=1).fit,
                                          (str(w["folder"] / "flipped.pt"),), {}), ValueError, r"checksum mismatch"),
    # -- data: missing / extra keys, counts, NaN, single class, labels
    ("data/nan", lambda w: _dataset(w, m=lambda m: _with(m, "a", torch.as_tensor(m["a"]).index_fill(
        0, torch.tensor([3]), NAN))),
     ValueError, r"modalities\['a'\]"),
    ("data/inf", lambda w: _dataset(w, m=lambda m: _with(m, "b", torch.as_tensor(m["b"]) / 0)), ValueError,
     r"modalities\['b'\]"),
    ("data/count", lambda w: _dataset(w, m=lambda m: _with(m, "a", torch.as_tensor(m["a"])[:-1])), ValueError,
     r"modalities\['a'\]"),
    ("data/one-class", lambda w: _dataset(w, labels=lambda y: torch.zeros_like(y)), ValueError, r"labels"),
    ("data/float-labels", lambda w: _dataset(w, labels=lambda y: y.double() + 0.5), ValueError, r"labels"),
    ("data/2d-labels", lambda w: _dataset(w, labels=lambda y: y[:, None]), ValueError, r"labels"),
    ("data/empty", lambda w: (MultimodalDataset, ({}, torch.arange(4)), {}), ValueError, r"modalities"),
    ("data/4d", lambda w: _dataset(w, m=lambda m: _with(m, "a", torch.zeros(60, 2, 2, 2))), ValueError,
     r"modalities\['a'\]"),
    ("data/bad-name", lambda w: _dataset(w, m=lambda m: _with(m, "a+b", m["a"])), ValueError, r"modalities"),
    ("data/lengths", lambda w: (MultimodalDataset, ({"a": torch.zeros(4, 2)}, torch.tensor([0, 1, 0, 1])),
                                {"lengths": {"zz": torch.ones(4)}}), ValueError, r"lengths"),
    ("data/fractions", lambda w: (MultimodalDataset, ({"a": torch.zeros(4, 2)}, torch.tensor([0, 1, 0, 1])),
                                  {"fractions": (0.5, 0.6, 0.1)}), ValueError, r"fractions"),
    ("data/unknown-name", lambda w: (load_dataset, ("imagenet",), {}), (ValueError, FileNotFoundError), r"dataset"),
    ("data/batch-size", lambda w: (lambda: next(w["data"].batches("train", 0)), (), {}), ValueError, r"batch_size"),
    ("data/split", lambda w: (w["data"].indices, ("dev",), {}), ValueError, r"split"),
    ("data/0d", lambda w: _dataset(w, m=lambda m: _with(m, "a", torch.tensor(3.0))), ValueError,
     r"modalities\['a'\]: expected samples first"),
    ("data/string-labels", lambda w: (MultimodalDataset, ({"a": torch.zeros(4, 2)}, np.array(list("abab"))), {}),
     TypeError, r"labels: expected N integer class labels"),
    ("data/empty-val-test", lambda w: _two_samples(), ValueError, r"splits: expected at least one sample in each"),
    ("data/splits-keys", lambda w: _two_samples(splits={"train": [0, 1]}), ValueError, r"splits: expected the keys"),
    ("data/splits-range", lambda w: _two_samples(splits={"train": [0, 1], "val": [2], "test": [1]}), ValueError,
     r"splits\['val'\]"),
    ("data/splits-empty", lambda w: _two_samples(splits={"train": [0, 1], "val": [], "test": [1]}), ValueError,
     r"splits\['val'\]"),
    # -- models: missing / extra modality keys, empty batches, labels out of range
    ("model/missing-key", lambda w: (w["model"].encode, (_without(w["data"].batch(torch.arange(4)), "a"),), {}),
     (ValueError, KeyError, TypeError), r"\ba\b"),
    ("model/extra-key", lambda w: (Trainer, (w["model"], _dataset_with_extra(w)), {}), ValueError,
     r"model: its modalities"),
    ("model/spec", lambda w: (build_model, ("mlp", {}, 3), {}), ValueError, r"spec"),
    ("model/outputs", lambda w: (build_model, ("mlp", w["data"].spec, 0), {}), ValueError, r"num_outputs"),
    ("model/name", lambda w: (build_model, ("resnet", w["data"].spec, 3), {}), ValueError, r"model"),
    # -- evaluate
    ("evaluate/split", lambda w: (evaluate, (w["model"], w["data"], "dev"), {}), ValueError, r"split"),
    ("evaluate/drop-rates", lambda w: (evaluate, (w["model"], w["data"]), {"drop_rates": [0.0, 1.5]}), ValueError,
     r"rate"),
    ("evaluate/batch-size", lambda w: (evaluate, (w["model"], w["data"]), {"batch_size": 0}), ValueError,
     r"batch_size"),
    ("evaluate/other-modalities", lambda w: (evaluate, (build_model("mlp", {"a": w["data"].spec["a"]}, 3),
                                                        w["data"]), {}), ValueError, r"model|dataset"),
    ("evaluate/not-a-model", lambda w: (evaluate, (torch.nn.Linear(2, 2), w["data"]), {}), (TypeError, ValueError),
     r"model"),
    # -- checkpoints: unreadable, truncated, corrupted, pickled code
    ("checkpoint/absent", lambda w: (checkpoint.load, (str(w["folder"] / "absent.pt"),), {}), FileNotFoundError,
     r"checkpoint: no such file"),
    ("checkpoint/folder", lambda w: (checkpoint.load, (str(w["folder"] / "folder.pt"),), {}), FileNotFoundError,
     r"checkpoint"),
    ("checkpoint/truncated", lambda w: (checkpoint.load, (str(w["folder"] / "truncated.pt"),), {}), ValueError,
     r"checkpoint: .*truncated"),
    ("checkpoint/flipped", lambda w: (checkpoint.load, (str(w["folder"] / "flipped.pt"),), {}), ValueError,
     r"checkpoint: .*checksum mismatch"),
    ("checkpoint/pickled-code", lambda w: (checkpoint.load, (str(w["folder"] / "evil.pt"),), {}), ValueError,
     r"checkpoint: .*not a readable"),
    ("checkpoint/npz", lambda w: (checkpoint.load, (str(w["folder"] / "tiny.npz"),), {}), ValueError,
     r"no checksum header"),
    ("checkpoint/type", lambda w: (checkpoint.load, (42,), {}), TypeError, r"checkpoint: expected a path"),
    # -- the CLI (exit code 2 and a message naming the argument)
    ("cli/dataset", lambda w: _cli(w, "train", "--dataset", "{f}/absent.npz", "--out", "{f}/o"), SystemExit,
     r"dataset|absent"),
    ("cli/garbage-npz", lambda w: _cli(w, "train", "--dataset", "{f}/garbage.npz", "--out", "{f}/o"), SystemExit,
     r"garbage\.npz"),
    ("cli/no-y", lambda w: _cli(w, "train", "--dataset", "{f}/no_y.npz", "--out", "{f}/o"), SystemExit, r"\by\b"),
    ("cli/method", lambda w: _cli(w, "train", "--dataset", "{f}/tiny.npz", "--method", "sgd", "--out", "{f}/o"),
     SystemExit, r"method"),
    ("cli/epochs", lambda w: _cli(w, "train", "--dataset", "{f}/tiny.npz", "--epochs", "0", "--out", "{f}/o"),
     SystemExit, r"epochs"),
    ("cli/threads", lambda w: _cli(w, "train", "--dataset", "{f}/tiny.npz", "--threads", "0", "--out", "{f}/o"),
     SystemExit, r"--threads"),
    ("cli/nonfinite", lambda w: _cli(w, "train", "--dataset", "{f}/tiny.npz", "--max-nonfinite-steps", "-2",
                                     "--out", "{f}/o"), SystemExit, r"max_nonfinite_steps"),
    ("cli/eval-evil", lambda w: _cli(w, "eval", "--checkpoint", "{f}/evil.pt", "--out", "{f}/o"), SystemExit,
     r"checkpoint"),
    ("cli/eval-truncated", lambda w: _cli(w, "eval", "--checkpoint", "{f}/truncated.pt", "--out", "{f}/o"),
     SystemExit, r"truncated"),
    ("cli/eval-absent", lambda w: _cli(w, "eval", "--checkpoint", "{f}/absent.pt", "--out", "{f}/o"), SystemExit,
     r"no such file"),
    ("cli/compare-seeds", lambda w: _cli(w, "compare", "--dataset", "{f}/tiny.npz", "--seeds", "0", "--out", "{f}/o"),
     SystemExit, r"seeds"),
    ("cli/empty-npz", lambda w: _cli(w, "train", "--dataset", "{f}/empty.npz", "--out", "{f}/o"), SystemExit,
     r"dataset: cannot read .*empty\.npz: the file is empty"),
    ("cli/text-npz", lambda w: _cli(w, "train", "--dataset", "{f}/text.npz", "--out", "{f}/o"), SystemExit,
     r"dataset: cannot read .*text\.npz: it is not an \.npz archive"),
    ("cli/0d-array", lambda w: _cli(w, "train", "--dataset", "{f}/scalar.npz", "--out", "{f}/o"), SystemExit,
     r"modalities\['a'\]: expected samples first"),
    ("cli/string-labels", lambda w: _cli(w, "train", "--dataset", "{f}/string-labels.npz", "--out", "{f}/o"),
     SystemExit, r"\by: expected N integer class labels"),
    ("cli/object-array", lambda w: _cli(w, "train", "--dataset", "{f}/objects.npz", "--out", "{f}/o"), SystemExit,
     r"array 'a' of .*objects\.npz"),
    ("cli/empty-val-test", lambda w: _cli(w, "train", "--dataset", "{f}/two-samples.npz", "--out", "{f}/o"),
     SystemExit, r"splits: expected at least one sample in each"),
    ("cli/eval-moved-dataset", lambda w: _cli(w, "eval", "--checkpoint", "{f}/moved.pt", "--out", "{f}/o"),
     SystemExit, r"--dataset: .*moved_away\.npz, which is no longer there"),
    ("cli/eval-unrecorded-dataset", lambda w: _cli(w, "eval", "--checkpoint", "{f}/run/model.pt", "--out", "{f}/o"),
     SystemExit, r"--dataset: expected the dataset"),
    ("cli/compare-torchrun", lambda w: _cli_under_torchrun(w, "compare", "--dataset", "{f}/tiny.npz", "--out",
                                                           "{f}/o"), SystemExit, r"compare: expected one process"),
]


def _tensors(value, found):
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _tensors(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _tensors(item, found)
    return found


def _bits(t):
    return t.detach().clone().contiguous() if t.device.type == "meta" else t.detach().clone().contiguous().view(-1)


def _files(folder):
    return {os.path.join(root, name): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


def _same(a, b):
    if a.device.type == "meta":
        return a.shape == b.shape
    raw = lambda t: t if t.dtype == torch.bool else t.view(torch.uint8)  # noqa: E731
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(raw(a), raw(b))


@pytest.mark.parametrize("name, build, errors, message", [pytest.param(*c, id=c[0]) for c in CASES])
def test_bad_input(world, name, build, errors, message, capsys):
    fn, args, kwargs = build(world)
    tensors = _tensors((args, kwargs), [])
    before = [_bits(t) for t in tensors]
    model_before = copy.deepcopy(world["model"].state_dict())
    data_before = {k: v.clone() for k, v in world["data"].inputs.items()}
    files_before = _files(world["folder"])
    with pytest.raises(errors) as caught:
        fn(*args, **kwargs)
    text = str(caught.value) if not isinstance(caught.value, SystemExit) else capsys.readouterr().err
    if isinstance(caught.value, SystemExit):
        assert caught.value.code == 2, text
    assert __import__("re").search(message, text), f"{name}: the error does not name the argument: {text!r}"
    for t, b in zip(tensors, before):
        assert _same(_bits(t), b), f"{name}: an argument tensor was modified"
    for key, value in world["model"].state_dict().items():
        assert torch.equal(value, model_before[key]), f"{name}: the model was modified"
    for key, value in world["data"].inputs.items():
        assert torch.equal(value, data_before[key]), f"{name}: the dataset was modified"
    assert _files(world["folder"]) == files_before, f"{name}: a file was created or modified"
    assert not (world["folder"] / "pwned").exists(), "a checkpoint ran code"


def test_case_count():
    assert len(CASES) >= 80
