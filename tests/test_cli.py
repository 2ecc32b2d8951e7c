"""The command line end to end on a tiny .npz, and its errors."""

import json
import re

import numpy as np
import pytest

from modalimmune.cli import main
from test_data import single_thread, tiny_arrays  # noqa: F401 (autouse fixture)


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
    (["train", "--dataset", "nope", "--out", "x"], "dataset: unknown 'nope'"),
    (["train", "--dataset", "NPZ", "--method", "magic", "--out", "x"], "method: unknown 'magic'"),
    (["train", "--dataset", "NPZ", "--epochs", "0", "--out", "x"], "config.epochs"),
    (["compare", "--dataset", "NPZ", "--methods", "erm,nope", "--out", "x"], "method: unknown 'nope'"),
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
    for name, message in (("short", "has 30 samples but labels has 28"), ("nan", r"modalities\['a'\]")):
        with pytest.raises(SystemExit):
            main(["train", "--dataset", str(tmp_path / f"{name}.npz"), "--out", str(tmp_path / "o")])
        assert message.replace("\\", "") in capsys.readouterr().err.replace("\\", "")
