"""PNG plots of a report: accuracy vs test-time drop rate (bands over seeds),
accuracy per missing pattern, accuracy vs corruption level per modality and
family and, for the methods that log it, the per-modality information gain
over training (from the runs' metrics.jsonl)."""

import glob
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def values(figures, key, metric):
    """``figure[key]`` of each figure (an accuracy in %), NaN where it is None (a pattern no sample has)."""
    scale = 100 if metric == "accuracy" else 1
    return np.array([np.nan if f[key] is None else f[key] * scale for f in figures], dtype=float)


def _label(report):
    return "accuracy (%)" if report["metric"] == "accuracy" else "MAE"


def drop_rate_plot(path, report):
    fig, ax = plt.subplots(figsize=(6, 4))
    metric = report["metric"]
    for name, entry in report["methods"].items():
        curve = entry["drop_rate_curve"]
        mean, std = values(curve[metric], "mean", metric), values(curve[metric], "std", metric)
        ax.plot(curve["rates"], mean, marker="o", ms=3, label=name)
        ax.fill_between(curve["rates"], mean - std, mean + std, alpha=0.2)
    ax.set(xlabel="test-time drop rate p", ylabel=_label(report),
           title=f"{report['dataset']}: {metric} vs drop rate ({len(report['seeds'])} seeds, ±1 std)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def subset_plot(path, report):
    """One column per kept subset (by size, then dataset order), one marker per method."""
    methods, metric = report["methods"], report["metric"]
    subsets = list(next(iter(methods.values()))[f"subset_{metric}"])
    fig, ax = plt.subplots(figsize=(min(14, max(6, 0.22 * len(subsets))), 4.5))
    x = np.arange(len(subsets))
    offset = 0.6 / max(1, len(methods))
    for k, (name, entry) in enumerate(methods.items()):
        figures = [entry[f"subset_{metric}"][s] for s in subsets]
        mean, std = values(figures, "mean", metric), values(figures, "std", metric)
        ax.errorbar(x + (k - (len(methods) - 1) / 2) * offset, mean, yerr=std, fmt="o", ms=3, elinewidth=0.8,
                    label=name)
    ax.set_xticks(x, subsets, rotation=90, fontsize=6 if len(subsets) > 20 else 8)
    ax.set(ylabel=_label(report), xlim=(-0.6, len(subsets) - 0.4),
           title=f"{report['dataset']}: {metric} per kept subset (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def corruption_plot(path, report):
    """A panel per (modality, corruption family): accuracy vs level, one line per method."""
    methods = report["methods"]
    first = next(iter(methods.values()))["corruption"]
    panels = [(name, family) for name, curves in first.items() for family in curves]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for ax, (name, family) in zip(axes.flat, panels):
        for method, entry in methods.items():
            curve = entry["corruption"][name][family]
            ax.plot(curve["levels"], values(curve[report["metric"]], "mean", report["metric"]), marker="o", ms=2,
                    label=method)
        ax.set(title=f"{name}: {family}", xlabel="level", ylabel=_label(report))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{report['dataset']}: {report['metric']} with one modality corrupted (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


DRAW_PREFIX = "pi/"  # what every ModalImmune controller logs: the probability each modality is removed


def controller_history(run_dir):
    """``(steps, {modality: values})`` of the ``pi/<modality>`` figures (the controller's probability of
    removing each modality) of one run's metrics.jsonl (step records only); empty when the run logs none."""
    steps, values = [], {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return steps, values
    with open(path) as file:
        for line in file:
            record = json.loads(line)
            draws = {k[len(DRAW_PREFIX):]: v for k, v in record.items() if k.startswith(DRAW_PREFIX)}
            if record.get("event") != "step" or not draws:
                continue
            steps.append(record["step"])
            for name, value in draws.items():
                values.setdefault(name, []).append(value)
    return steps, values


def method_controller_histories(out_dir, methods):
    """Per method (in ``methods`` order): the controller histories of its seeds (methods without a
    controller log none)."""
    histories = {}
    for method in methods:
        for run_dir in sorted(glob.glob(os.path.join(glob.escape(out_dir), "runs", glob.escape(method), "seed*"))):
            steps, values = controller_history(run_dir)
            if steps:
                histories.setdefault(method, []).append((steps, values))
    return histories


def controller_plot(path, report, histories):
    """One panel per method: the probability that each modality is removed against the optimizer step,
    mean over the seeds (truncated to the shortest run)."""
    fig, axes = plt.subplots(len(histories), 1, figsize=(7, 2.6 * len(histories)), squeeze=False, sharex=True)
    for ax, (method, runs) in zip(axes[:, 0], histories.items()):
        length = min(len(steps) for steps, _ in runs)
        steps = runs[0][0][:length]
        for name in report["modalities"]:
            series = np.array([values[name][:length] for _, values in runs if name in values])
            if len(series):
                ax.plot(steps, series.mean(0), label=name)
        ax.set(ylabel="P(removed)", title=f"{method} ({len(runs)} seeds, mean)", ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=min(6, len(report["modalities"])))
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle(f"{report['dataset']}: the controller's draw over training", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(out_dir, report):
    paths = {"drop_rate_plot": os.path.join(out_dir, "drop_rate.png"),
             "subset_plot": os.path.join(out_dir, "subsets.png")}
    drop_rate_plot(paths["drop_rate_plot"], report)
    subset_plot(paths["subset_plot"], report)
    if any(entry.get("corruption") for entry in report["methods"].values()):
        paths["corruption_plot"] = os.path.join(out_dir, "corruption.png")
        corruption_plot(paths["corruption_plot"], report)
    histories = method_controller_histories(out_dir, report["methods"])
    if histories:
        paths["controller_plot"] = os.path.join(out_dir, "controller.png")
        controller_plot(paths["controller_plot"], report, histories)
    return paths
