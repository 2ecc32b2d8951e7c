"""PNG plots of a report: accuracy vs test-time drop rate (bands over seeds) and
accuracy per missing pattern."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def drop_rate_plot(path, report):
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, entry in report["methods"].items():
        curve = entry["drop_rate_curve"]
        mean = np.array([f["mean"] for f in curve["accuracy"]]) * 100
        std = np.array([f["std"] for f in curve["accuracy"]]) * 100
        ax.plot(curve["rates"], mean, marker="o", ms=3, label=name)
        ax.fill_between(curve["rates"], mean - std, mean + std, alpha=0.2)
    ax.set(xlabel="test-time drop rate p", ylabel="accuracy (%)",
           title=f"{report['dataset']}: accuracy vs drop rate ({len(report['seeds'])} seeds, ±1 std)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def subset_plot(path, report):
    """One column per kept subset (by size, then dataset order), one marker per method."""
    methods = report["methods"]
    subsets = list(next(iter(methods.values()))["subset_accuracy"])
    fig, ax = plt.subplots(figsize=(min(14, max(6, 0.22 * len(subsets))), 4.5))
    x = np.arange(len(subsets))
    offset = 0.6 / max(1, len(methods))
    for k, (name, entry) in enumerate(methods.items()):
        mean = np.array([entry["subset_accuracy"][s]["mean"] for s in subsets]) * 100
        std = np.array([entry["subset_accuracy"][s]["std"] for s in subsets]) * 100
        ax.errorbar(x + (k - (len(methods) - 1) / 2) * offset, mean, yerr=std, fmt="o", ms=3, elinewidth=0.8,
                    label=name)
    ax.set_xticks(x, subsets, rotation=90, fontsize=6 if len(subsets) > 20 else 8)
    ax.set(ylabel="accuracy (%)", xlim=(-0.6, len(subsets) - 0.4),
           title=f"{report['dataset']}: accuracy per kept subset (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(out_dir, report):
    paths = {"drop_rate_plot": os.path.join(out_dir, "drop_rate.png"),
             "subset_plot": os.path.join(out_dir, "subsets.png")}
    drop_rate_plot(paths["drop_rate_plot"], report)
    subset_plot(paths["subset_plot"], report)
    return paths
