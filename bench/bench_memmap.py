"""Peak memory of training from a memory-mapped dataset folder at 1x and 10x the size (goal: within 10 %).

Two folders of the same synthetic data (docs/benchmark.md, "Memory-mapped folders"), written by
``save_memmap_dataset`` from a stream generated batch by batch: a vector modality, a variable-length
sequence modality and natural missingness (each modality absent from 10 % of the samples). Each
folder is then trained from in a fresh subprocess -- opened (the standardisation statistics: one
streaming pass over the training split), then the same number of optimizer steps of the same model
and method (fewer than one epoch of the 1x folder, so neither validates) -- and the subprocess reports
its peak resident set size: ``VmHWM`` of ``/proc/self/status`` and ``ru_maxrss`` of
``resource.getrusage``. Flat memory: the peaks differ by the size of the split index, not the data's.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from modalimmune.data import SPLITS, Batch, ModalitySpec, MultimodalData, save_memmap_dataset  # noqa: E402

VECTOR_DIM, SEQUENCE_LEN, SEQUENCE_DIM, CLASSES = 512, 64, 16, 10
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


class SyntheticStream(MultimodalData):
    """``samples`` synthetic samples generated batch by batch (nothing held): the class shifts the
    vector's mean; sequences of 8 to 64 steps; each modality absent from 10 % of the samples."""

    random_access = False
    natural_missingness = True

    def __init__(self, samples):
        self.name, self.task, self.classes = "synthetic", "classification", torch.arange(CLASSES)
        self.spec = {"vector": ModalitySpec(VECTOR_DIM), "sequence": ModalitySpec(SEQUENCE_DIM, SEQUENCE_LEN)}
        self.sizes = {split: round(fraction * samples) for split, fraction in SPLIT_FRACTIONS.items()}

    def split_size(self, split):
        return self.sizes[split]

    def batches(self, split, batch_size, *, order=None):
        generator = torch.Generator().manual_seed(SPLITS.index(split))
        for start in range(0, self.sizes[split], batch_size):
            count = min(batch_size, self.sizes[split] - start)
            labels = torch.randint(CLASSES, (count,), generator=generator)
            vector = torch.randn(count, VECTOR_DIM, generator=generator) + labels[:, None] * 0.1
            sequence = torch.randn(count, SEQUENCE_LEN, SEQUENCE_DIM, generator=generator)
            lengths = torch.randint(8, SEQUENCE_LEN + 1, (count,), generator=generator)
            mask = torch.arange(SEQUENCE_LEN) < lengths[:, None]
            present = torch.rand(count, 2, generator=generator) >= 0.1
            present[~present.any(1), 0] = True
            vector, sequence = vector * present[:, :1], sequence * (mask & present[:, 1:])[..., None]
            yield Batch({"vector": vector, "sequence": sequence}, labels, {"sequence": mask}, present)


def peak_rss_mb():
    """(VmHWM, ru_maxrss) of this process in MiB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmHWM"].split()[0]) / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_memory(folder):
    """The control: the folder's arrays read whole into a MultimodalDataset."""
    import numpy as np

    from modalimmune.data import MemmapDataset, MultimodalDataset

    mapped = MemmapDataset(folder, standardize=False)
    arrays = {name: np.load(mapped.path(f"{name}.npy")) for name in mapped.modalities}
    lengths = {name: np.load(path) for name, path in mapped.lengths.items()}
    return MultimodalDataset(arrays, np.load(mapped.path("labels.npy")), lengths=lengths,
                             present=np.load(mapped.path("present.npy")), splits=mapped.splits, name=mapped.name)


def child(folder, steps, batch_size, method, device, control):
    """Opens ``folder`` (``control``: reads it whole) and trains ``steps`` optimizer steps; prints the
    figures as JSON."""
    from modalimmune.data import MemmapDataset
    from modalimmune.models import build_model
    from modalimmune.train import Trainer

    torch.set_num_threads(1)
    before = peak_rss_mb()[0]
    started = time.perf_counter()
    data = in_memory(folder) if control else MemmapDataset(folder)
    opened = time.perf_counter()
    torch.manual_seed(0)
    model = build_model("mlp", data.spec, data.num_outputs)
    trainer = Trainer(model, data, method=method, batch_size=batch_size, epochs=1, progress=False, bf16="off",
                      device=device)
    if steps >= trainer.steps_per_epoch:
        raise SystemExit(f"--steps: expected fewer than the {trainer.steps_per_epoch} steps of an epoch")
    summary = trainer.fit(max_steps=steps)
    hwm, maxrss = peak_rss_mb()
    print(json.dumps({"samples": len(data), "steps": summary["steps"], "hwm_mb": hwm, "maxrss_mb": maxrss,
                      "imports_mb": before, "open_s": opened - started, "train_s": time.perf_counter() - opened}))


def write(folder, samples):
    started = time.perf_counter()
    save_memmap_dataset(SyntheticStream(samples), folder, batch_size=4096)
    print(json.dumps({"write_s": time.perf_counter() - started}))


def run_child(*argv):
    """``bench_memmap.py argv`` in a fresh subprocess; its JSON line. (Linux carries the parent's RSS at
    the fork into the child's ``ru_maxrss``, so the parent stays small: the data is written in a
    subprocess too.)"""
    command = [sys.executable, __file__, *map(str, argv)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = _common.parser(__doc__)
    p.add_argument("--samples", type=int, default=20_000, help="samples at 1x")
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--method", default="modalimmune")
    p.add_argument("--folder", type=Path, default=None, help="where the data is written (default: a temporary one)")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)  # the measured subprocess
    p.add_argument("--write", type=Path, default=None, help=argparse.SUPPRESS)  # the writing subprocess
    p.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)  # the control subprocess
    args = p.parse_args()
    if args.child:
        return child(args.child, args.steps, args.batch_size, args.method, args.device, args.in_memory)
    if args.write:
        return write(args.write, args.samples)
    if args.quick:
        args.samples, args.steps = 2_000, 20
    root = Path(tempfile.mkdtemp(dir=args.folder, prefix="bench_memmap-"))
    rows, results = [], {}
    try:
        for scale in (1, args.scale):
            folder = root / f"{scale}x"
            written = run_child("--write", folder, "--samples", args.samples * scale)["write_s"]
            size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
            train = ["--child", folder, "--steps", args.steps, "--batch-size", args.batch_size, "--method", args.method,
                     "--device", args.device]
            results[scale] = run_child(*train)
            runs = [(f"{scale}x", results[scale])]
            if scale == args.scale:
                runs.append((f"{scale}x read whole into memory (control)", run_child(*train, "--in-memory")))
            for label, result in runs:
                rows.append([label, f"{result['samples']:,}", f"{size_mb:,.0f}", result["steps"],
                             f"{result['hwm_mb']:,.0f}", f"{result['maxrss_mb']:,.0f}", f"{result['imports_mb']:,.0f}",
                             f"{written:.1f}", f"{result['open_s']:.1f}", f"{result['train_s']:.1f}"])
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = {key: results[args.scale][key] / results[1][key] for key in ("hwm_mb", "maxrss_mb")}
    rows.append([f"**{args.scale}x / 1x**", "", "", "", f"**{ratio['hwm_mb']:.3f}**", f"**{ratio['maxrss_mb']:.3f}**",
                 "", "", "", ""])
    table = _common.markdown_table(["size", "samples", "folder (MiB)", "steps", "peak RSS, VmHWM (MiB)",
                                    "ru_maxrss (MiB)", "RSS after imports (MiB)", "write (s)", "open (s)",
                                    "train (s)"], rows)
    verdict = "within" if abs(ratio["hwm_mb"] - 1) <= 0.10 else "NOT within"
    notes = (f"Peak RSS at {args.scale}x is {ratio['hwm_mb']:.3f}x that at 1x ({verdict} the 10 % goal). Data: a "
             f"{VECTOR_DIM}-d vector and a ({SEQUENCE_LEN}, {SEQUENCE_DIM}) sequence of 8-{SEQUENCE_LEN} steps per "
             f"sample, each modality absent from 10 % of the samples, float32; split 70/10/20. Training: the "
             f"late-fusion MLP, `{args.method}`, batch {args.batch_size}, 1 torch thread, from a fresh subprocess "
             "per folder that opens it (the standardisation statistics: one streaming pass over the training split, "
             "then cached in the folder) and trains; `open (s)` is that pass. The peak includes both; `ru_maxrss` "
             "also counts what the process was forked from. The control row reads the arrays whole into a "
             "MultimodalDataset (the in-memory path) and trains the same steps: what memory that grows with the data "
             "looks like in this measurement. A batch maps "
             "each file, copies its rows and unmaps it, so the process holds no page of the data between batches "
             "(the page cache does, outside the RSS).")
    _common.write_report(args.out or _common.RESULTS / "kernels" / "memmap_cpu.md",
                         "Training from a memory-mapped dataset: peak memory at 1x and 10x", args.device, table, notes)


if __name__ == "__main__":
    main()
