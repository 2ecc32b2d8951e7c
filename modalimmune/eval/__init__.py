"""The evaluation protocol of DESIGN section 9, comparisons and reports."""

from . import metrics
from .compare import compare
from .protocol import evaluate
from .report import build_report, write_report

__all__ = ["metrics", "compare", "evaluate", "build_report", "write_report"]
