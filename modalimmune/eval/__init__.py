"""The evaluation protocol (docs/benchmark.md, "Evaluation protocol"), its metrics and reports."""

from . import metrics
from .protocol import evaluate
from .report import build_report, write_report

__all__ = ["metrics", "evaluate", "build_report", "write_report"]
