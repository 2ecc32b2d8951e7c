"""The command line end to end on a tiny .npz, and its errors."""

import json
import os
import re
import shutil

import numpy as np
import pytest
from test_data import BAD_NPZ, _write_bad_npz, single_thread, tiny_arrays  # noqa: F401 (autouse fixture)

from modalimmune.cli import main
from modalimmune.train import checkpoint


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    modalities, y, lengths = tiny_arrays(n=60)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, y=y, seq_lengths=lengths["seq"], **modalities)
    return str(path)


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_train_then_eval(npz, tmp_path, capsys):
    out = tmp_path / "run"
    code, text = run(capsys, "train", "--dataset", npz, "--method", "moddrop[p=0.3]", "--epochs", "2",
                     "--seed", "1", "--out", str(out), "--no-progress")
    first = json.loads(text)
    assert code == 0 and first["finished"] and first["epochs"] == 2
    assert {p.name for p in out.iterdir()} == {"model.pt", "checkpoint.pt", "checkpoint.pt.prev", "metrics.jsonl"}
    code, text = run(capsys, "train", "--dataset", npz, "--method", "moddrop[p=0.3]", "--epochs", "2",
                     "--seed", "1", "--out", str(out), "--no-progress", "--resume")
    assert code == 0 and json.loads(text)["steps"] == first["steps"]  # finished: nothing more to do
    code, text = run(capsys, "eval", "--checkpoint", str(out / "model.pt"), "--dataset", npz,
                     "--out", str(tmp_path / "eval"))
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert code == 0 and json.loads(text)["clean_accuracy"] == result["clean_accuracy"]
    assert set(result["subset_accuracy"]) == {"a", "b", "seq", "a+b", "a+seq", "b+seq", "a+b+seq"}


def test_train_builds_the_model_a_method_needs_and_eval_rebuilds_it(npz, tmp_path, capsys):
    out = tmp_path / "ensemble"
    code, _ = run(capsys, "train", "--dataset", npz, "--method", "ensemble", "--epochs", "1", "--out", str(out),
                  "--no-progress", "--select", "last")
    assert code == 0 and checkpoint.load(out / "model.pt", ("model_name",))["model_name"] == "ensemble"
    code, text = run(capsys, "eval", "--checkpoint", str(out / "model.pt"), "--dataset", npz,
                     "--out", str(tmp_path / "eval"))
    assert code == 0 and 0 <= json.loads(text)["worst_missing_accuracy"] <= 1


def test_compare_writes_the_report(npz, tmp_path, capsys):
    out = tmp_path / "cmp"
    code, _ = run(capsys, "compare", "--dataset", npz, "--methods", "erm,moddrop,ogm_ge", "--seeds", "2",
                  "--epochs", "2", "--out", str(out), "--no-progress")
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "tiny" and report["modalities"] == ["a", "b", "seq"] and report["seeds"] == [0, 1]
    assert list(report["methods"]) == ["erm", "moddrop", "ogm_ge"]
    assert report["methods"]["erm"]["effective_robustness"] == {"mean": 0.0, "std": 0.0}
    runs = [json.loads((out / "runs" / m / f"seed{s}" / "eval.json").read_text())
            for m in ("erm", "moddrop") for s in (0, 1)]
    assert report["methods"]["moddrop"]["clean_accuracy"]["mean"] == pytest.approx(
        np.mean([r["clean_accuracy"] for r in runs[2:]]))
    assert "| moddrop |" in (out / "report.md").read_text()
    assert (out / "drop_rate.png").stat().st_size > 1000 and (out / "subsets.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["train", "--dataset", "nope", "--out", "x"],
     r"dataset: expected mfeat, avdigits, hapt, .* or the path of an \.npz file, got 'nope'"),
    (["train", "--dataset", "NPZ", "--method", "magic", "--out", "x"], r"method: .*'magic'"),
    (["train", "--dataset", "NPZ", "--epochs", "0", "--out", "x"], "config.epochs"),
    (["compare", "--dataset", "NPZ", "--methods", "erm,nope", "--out", "x"], r"method: .*'nope'"),
    (["eval", "--checkpoint", "CORRUPT", "--dataset", "NPZ", "--out", "x"], "checkpoint: .* not a readable"),
])
def test_errors_name_the_argument(npz, tmp_path, capsys, argv, message):
    corrupt = tmp_path / "model.pt"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    argv = [{"NPZ": npz, "CORRUPT": str(corrupt), "x": str(tmp_path / "x")}.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_bad_npz_files(tmp_path, capsys):
    modalities, y, _ = tiny_arrays(n=30)
    np.savez(tmp_path / "short.npz", y=y[:-2], **modalities)
    np.savez(tmp_path / "nan.npz", y=y, a=np.full((30, 2), np.nan), b=modalities["b"])
    for name, message in (("short", "modalities['a']: expected 28 samples (one per label), got 30"),
                          ("nan", r"modalities\['a'\]")):
        with pytest.raises(SystemExit):
            main(["train", "--dataset", str(tmp_path / f"{name}.npz"), "--out", str(tmp_path / "o")])
        assert message.replace("\\", "") in capsys.readouterr().err.replace("\\", "")


@pytest.mark.parametrize("kind, error, message", BAD_NPZ, ids=[case[0] for case in BAD_NPZ])
def test_bad_npz_files_give_one_line_naming_the_argument(tmp_path, capsys, kind, error, message):
    """No traceback: one line naming the file and, where one is at fault, the array (y for the labels)."""
    path = _write_bad_npz(tmp_path, kind)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dataset", str(path), "--out", str(tmp_path / "o"), "--no-progress"])
    err, prefix = capsys.readouterr().err, "modalimmune train: error: "
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith(prefix), err
    assert re.search(message, err[len(prefix):]) and str(path) in err, err
    assert not (tmp_path / "o").exists()


def test_eval_finds_the_npz_it_was_trained_on(npz, tmp_path, capsys, monkeypatch):
    """model.pt records the .npz's absolute path (the dataset's ``source``): eval needs no --dataset, from
    any working directory; a checkpoint whose dataset has moved is refused with a clear message."""
    data = tmp_path / "data.npz"
    shutil.copy(npz, data)
    code, _ = run(capsys, "train", "--dataset", os.path.relpath(data), "--epochs", "1", "--out", str(tmp_path / "run"),
                  "--no-progress")
    model = tmp_path / "run" / "model.pt"
    assert code == 0 and checkpoint.load(str(model))["dataset_source"] == str(data)
    monkeypatch.chdir(tmp_path / "run")
    code, text = run(capsys, "eval", "--checkpoint", str(model), "--out", str(tmp_path / "eval"))
    assert code == 0 and json.loads(text)["clean_accuracy"] >= 0
    data.rename(tmp_path / "elsewhere.npz")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--checkpoint", str(model), "--out", str(tmp_path / "eval2")])
    assert exit_info.value.code == 2
    assert re.search(rf"--dataset: {re.escape(str(model))} was trained on {re.escape(str(data))}, which is no "
                     r"longer there .*--dataset",
                     capsys.readouterr().err)
    code, _ = run(capsys, "eval", "--checkpoint", str(model), "--dataset", str(tmp_path / "elsewhere.npz"),
                  "--out", str(tmp_path / "eval2"))
    assert code == 0


def test_eval_says_when_the_checkpoint_does_not_record_its_dataset(npz, tmp_path, capsys):
    run(capsys, "train", "--dataset", npz, "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress")
    state = checkpoint.load(str(tmp_path / "run" / "model.pt"))
    state.pop("dataset_source", None)  # as in a model.pt of a dataset given in memory, or an older one
    checkpoint.save(str(tmp_path / "old.pt"), state)
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(tmp_path / "old.pt"), "--out", str(tmp_path / "eval")])
    assert re.search(r"--dataset: expected the dataset .*old\.pt was trained on, got none given, and the checkpoint "
                     r"records only its name 'tiny'", capsys.readouterr().err)
    assert not (tmp_path / "eval").exists()


def test_compare_refuses_to_run_under_torchrun(npz, tmp_path, capsys, monkeypatch):
    """Under torchrun every rank would train every method and write the same files."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--dataset", npz, "--methods", "erm", "--seeds", "1", "--out", str(tmp_path / "cmp")])
    assert exit_info.value.code == 2
    assert re.search(r"compare: expected one process .*got WORLD_SIZE=2 from torchrun; run it without torchrun",
                     capsys.readouterr().err)
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("method", ["erm", "modalimmune"])
def test_a_diverging_run_is_skipped_and_counted_alike_by_every_method(npz, tmp_path, capsys, method):
    """``--lr 1e30``: the steps turn non-finite; every method skips and counts them, and the run stops
    with the same clear error (not a raise from inside the method's step)."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main(["train", "--dataset", npz, "--method", method, "--lr", "1e30", "--epochs", "8", "--out", str(out),
              "--no-progress", "--max-nonfinite-steps", "3"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "3 optimizer steps in a row had a non-finite loss or gradient" in err, err
    saved = checkpoint.load(str(out / "checkpoint.pt"))
    assert saved["trainer"]["nonfinite_total"] >= 3
