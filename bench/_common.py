"""Shared helpers of the benchmarks: timing, machine description, Markdown tables."""

import argparse
import datetime
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    p.add_argument("--out", type=Path, default=None, help="Markdown file for the results table")
    return p


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, repeats=10, warmup=2, budget_s=5.0):
    """Median wall time of ``fn()`` in seconds (CUDA: events around each call).

    Slow candidates get fewer repeats (at least 3) so that one stays within ``budget_s``.
    """
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync(device)
    per_call = (time.perf_counter() - t0) / max(warmup, 1)
    repeats = max(3, min(repeats, int(budget_s / max(per_call, 1e-9))))
    times = []
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine(device):
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    try:
        model = next(row.split(":", 1)[1].strip() for row in open("/proc/cpuinfo") if row.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(path, title, device, table, notes=""):
    command = " ".join([Path(sys.executable).name] + sys.argv)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    text = (f"# {title}\n\n- date: {datetime.date.today().isoformat()}\n- machine: {machine(device)}\n"
            f"- command: `{command}`\n- commit: {commit}\n\n{table}\n")
    if notes:
        text += f"\n{notes}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
