"""Aggregating runs over seeds into report.json and report.md (layout in docs/benchmark.md)."""

import json
import math
import os

import numpy as np

from . import metrics

# (report key, table header, scale to show it in percent)
SUMMARY = (("clean_accuracy", "clean", 100), ("clean_balanced_accuracy", "balanced", 100),
           ("mean_missing_accuracy", "mean missing", 100),
           ("worst_missing_accuracy", "worst missing", 100), ("drop_rate_auc", "drop-rate AUC", 100),
           ("relative_robustness", "relative rob.", 1), ("effective_robustness", "effective rob.", 1))


def _figure(values):
    """``{"mean", "std"}`` over seeds; both None when a value is missing or not finite."""
    if any(v is None or not math.isfinite(v) for v in values):
        return {"mean": None, "std": None}
    return metrics.mean_std(values)


def build_report(dataset_name, modalities, seeds, runs):
    """``runs[method][i]`` is the evaluate() result of seed ``seeds[i]``."""
    methods = {}
    for method, results in runs.items():
        entry = {key: _figure([r[key] for r in results]) for key, _, _ in SUMMARY}
        entry["subset_accuracy"] = {k: _figure([r["subset_accuracy"][k] for r in results])
                                    for k in results[0]["subset_accuracy"]}
        curves = np.array([r["drop_rate_curve"]["accuracy"] for r in results])
        entry["drop_rate_curve"] = {"rates": results[0]["drop_rate_curve"]["rates"],
                                    "accuracy": [_figure(column) for column in curves.T]}
        entry["corruption"] = {
            name: {family: {"levels": curve["levels"],
                            "accuracy": [_figure(column) for column in np.array(
                                [r["corruption"][name][family]["accuracy"] for r in results]).T],
                            **{key: _figure([r["corruption"][name][family][key] for r in results])
                               for key in ("relative_robustness", "effective_robustness")}}
                   for family, curve in curves.items()}
            for name, curves in results[0]["corruption"].items()}
        methods[method] = {k: entry[k] for k in ("clean_accuracy", "clean_balanced_accuracy", "subset_accuracy",
                                                  "mean_missing_accuracy", "worst_missing_accuracy", "drop_rate_curve",
                                                  "drop_rate_auc", "relative_robustness", "effective_robustness",
                                                  "corruption")}
    return {"dataset": dataset_name, "modalities": list(modalities), "seeds": list(seeds), "methods": methods}


def _cell(figure, scale):
    if figure["mean"] is None:
        return "–"
    digits = 1 if scale == 100 else 3
    return f"{figure['mean'] * scale:.{digits}f} ± {figure['std'] * scale:.{digits}f}"


def markdown(report, runs):
    methods = report["methods"]
    lines = [f"# {report['dataset']}: robustness to missing modalities", "",
             f"Modalities: {', '.join(report['modalities'])}. Seeds: {', '.join(map(str, report['seeds']))}. "
             "Mean ± std over seeds; accuracies in %; robustness as MultiBench defines it "
             "(effective robustness against `erm` of the same seed).", "",
             "| method | " + " | ".join(h for _, h, _ in SUMMARY) + " |",
             "|---" * (len(SUMMARY) + 1) + "|"]
    for name, entry in methods.items():
        lines.append(f"| {name} | " + " | ".join(_cell(entry[k], s) for k, _, s in SUMMARY) + " |")
    lines += ["", "## Accuracy vs test-time drop rate (%)", "",
              "| method | " + " | ".join(f"p={r}" for r in next(iter(methods.values()))["drop_rate_curve"]["rates"])
              + " |", "|---" * (1 + len(next(iter(methods.values()))["drop_rate_curve"]["rates"])) + "|"]
    for name, entry in methods.items():
        lines.append(f"| {name} | " + " | ".join(f"{f['mean'] * 100:.1f}" for f in entry["drop_rate_curve"]["accuracy"])
                     + " |")
    noise = {name: results[0]["noise_accuracy"] for name, results in runs.items()}
    first = next(iter(noise.values()))
    snrs = first[report["modalities"][0]]["snr_db"]
    lines += ["", "## Accuracy with Gaussian noise on one modality (%, mean over seeds)", "",
              "| method | modality | " + " | ".join(f"{s:g} dB" for s in snrs) + " |", "|---" * (2 + len(snrs)) + "|"]
    for name, results in runs.items():
        for modality in report["modalities"]:
            values = np.mean([r["noise_accuracy"][modality]["accuracy"] for r in results], 0)
            lines.append(f"| {name} | {modality} | " + " | ".join(f"{v * 100:.1f}" for v in values) + " |")
    lines += _corruption_tables(methods)
    lines += _natural_table(runs)
    if any(results[0]["reconstruction_r2"] for results in runs.values()):
        names = report["modalities"]
        lines += ["", "## Reconstruction R² of a missing modality's embedding", "",
                  "| method | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
        for name, results in runs.items():
            if results[0]["reconstruction_r2"]:
                lines.append(f"| {name} | " + " | ".join(
                    f"{np.mean([r['reconstruction_r2'][m] for r in results]):.3f}" for m in names) + " |")
    lines += ["", "## Accuracy per missing pattern (kept modalities, %)", "",
              "| kept | " + " | ".join(methods) + " |", "|---" * (1 + len(methods)) + "|"]
    for subset in next(iter(methods.values()))["subset_accuracy"]:
        lines.append(f"| {subset} | " + " | ".join(_cell(e["subset_accuracy"][subset], 100) for e in methods.values())
                     + " |")
    return "\n".join(lines) + "\n"


def _corruption_tables(methods):
    """Accuracy per corruption level, one table per family (docs/corruptions.md)."""
    first = next(iter(methods.values()))["corruption"]
    families = sorted({family for curves in first.values() for family in curves})
    lines = []
    for family in families:
        levels = next(c[family]["levels"] for c in first.values() if family in c)
        lines += ["", f"## Accuracy with one modality corrupted: {family} (%, mean over seeds; "
                      "effective robustness against `erm`)", "",
                  "| method | modality | " + " | ".join(f"{v:g}" for v in levels) + " | effective rob. |",
                  "|---" * (3 + len(levels)) + "|"]
        for name, entry in methods.items():
            for modality, curves in entry["corruption"].items():
                if family in curves:
                    curve = curves[family]
                    lines.append(f"| {name} | {modality} | " + " | ".join(_cell(f, 100).split(" ±")[0]
                                                                          for f in curve["accuracy"])
                                 + f" | {_cell(curve['effective_robustness'], 1)} |")
    return lines


def _natural_table(runs):
    """Clean accuracy per pattern of modalities the data has (natural missingness), mean over seeds."""
    first = next(iter(runs.values()))[0]["natural_pattern_accuracy"]
    if not first:
        return []
    lines = ["", "## Clean accuracy by the data's own pattern of modalities (%, mean over seeds)", "",
             "| method | " + " | ".join(f"{p} (n={v['count']})" for p, v in first.items()) + " |",
             "|---" * (1 + len(first)) + "|"]
    for name, results in runs.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{np.mean([r['natural_pattern_accuracy'][p]['accuracy'] for r in results]) * 100:.1f}" for p in first)
            + " |")
    return lines


def write_json(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w") as file:
        json.dump(value, file, indent=1, allow_nan=False)
        file.write("\n")
    os.replace(tmp, path)


def write_report(out_dir, report, runs):
    """report.json, report.md and the plots; returns their paths."""
    from . import plots

    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "report.json"), "markdown": os.path.join(out_dir, "report.md")}
    write_json(paths["json"], report)
    with open(paths["markdown"], "w") as file:
        file.write(markdown(report, runs))
    paths.update(plots.write_plots(out_dir, report))
    return paths
