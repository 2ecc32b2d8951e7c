"""Aggregating runs over seeds into report.json and report.md (layout in docs/benchmark.md)."""

import json
import math
import os

import numpy as np

from . import metrics

# per metric: (report key, table header, scale: 100 shows a fraction in percent)
SUMMARY = {
    "accuracy": (("clean_accuracy", "clean", 100), ("clean_balanced_accuracy", "balanced", 100),
                 ("mean_missing_accuracy", "mean missing", 100), ("worst_missing_accuracy", "worst missing", 100),
                 ("drop_rate_auc", "drop-rate AUC", 100), ("relative_robustness", "relative rob.", 1),
                 ("effective_robustness", "effective rob.", 1)),
    "mae": (("clean_mae", "clean MAE", 1), ("clean_r2", "clean R²", 1), ("mean_missing_mae", "mean missing MAE", 1),
            ("worst_missing_mae", "worst missing MAE", 1), ("drop_rate_auc", "drop-rate mean MAE", 1),
            ("relative_robustness", "relative rob.", 1), ("effective_robustness", "effective rob.", 1)),
}
UNITS = {"accuracy": ("Accuracy", "%", 100), "mae": ("MAE", "the target's units", 1)}  # (label, unit, scale)
PAIRED_AGAINST = "moddrop"  # the baseline every method is paired with, seed by seed
PAIRED_KEYS = ("clean", "mean_missing", "worst_missing")
NOISE_SE = 2  # a paired difference within this many standard errors of 0 is reported as noise


def _figure(values):
    """``{"mean", "std"}`` over seeds; both None when a value is missing or not finite."""
    if any(v is None or not math.isfinite(v) for v in values):
        return {"mean": None, "std": None}
    return metrics.mean_std(values)


def _curve(results, pick, metric):
    """The per-level ``{"mean", "std"}`` of the curve ``pick(result)`` over the seeds' results."""
    return [_figure(column) for column in np.array([pick(r)[metric] for r in results], dtype=float).T]


def paired_differences(runs, metric, against=PAIRED_AGAINST):
    """``{method: {key: {"mean", "se", "n"}}}``: each method's difference from ``against`` on the same
    seed for the clean, mean-missing and worst-missing figures, its mean and standard error over the
    seeds (positive: better than ``against``; an error enters negated); {} without ``against`` or with
    one seed (docs/benchmark.md, "compare and the report")."""
    if against not in runs or len(runs[against]) < 2:
        return {}
    sign = -1 if metric in metrics.ERROR_METRICS else 1
    paired = {}
    for method, results in runs.items():
        if method == against:
            continue
        paired[method] = {}
        for key in PAIRED_KEYS:
            name = f"{key}_{metric}"
            diffs = np.array([sign * (r[name] - base[name]) for r, base in zip(results, runs[against])], float)
            paired[method][key] = ({"mean": None, "se": None, "n": len(diffs)} if not np.isfinite(diffs).all() else
                                   {"mean": float(diffs.mean()), "se": float(diffs.std(ddof=1) / np.sqrt(len(diffs))),
                                    "n": len(diffs)})
    return paired


def _over_patterns(scores, metric):
    """(mean, worst) of one seed's scores over patterns (the worst of an error metric is its largest)."""
    return float(np.mean(scores)), float(np.max(scores) if metric in metrics.ERROR_METRICS else np.min(scores))


def oracle_summary(oracle, runs, metric):
    """The per-pattern oracle beside every method (docs/benchmark.md, "The oracle"): ``oracle`` is
    ``{pattern: [score per seed]}``. Every figure is over the oracle's patterns only: per pattern the
    oracle's score; the mean and the worst over the patterns, of the oracle and of each method (seed by
    seed, then mean ± std); ``gap`` the oracle's lead over ModDrop (positive: the oracle is better) and
    each method's ``gap_closed``, the share of that lead it wins back, (method - moddrop) / (oracle -
    moddrop) on the means over seeds (None without ModDrop or without a gap)."""
    patterns = list(oracle)
    sign = -1 if metric in metrics.ERROR_METRICS else 1
    seeds = len(next(iter(oracle.values())))
    summary = lambda per_seed: {key: _figure([_over_patterns(s, metric)[k] for s in per_seed])  # noqa: E731
                                for k, key in enumerate(("mean_missing", "worst_missing"))}
    out = {"patterns": {p: _figure(oracle[p]) for p in patterns},
           **summary([[oracle[p][i] for p in patterns] for i in range(seeds)]), "methods": {}}
    for method, results in runs.items():
        out["methods"][method] = summary([[r[f"subset_{metric}"][p] for p in patterns] for r in results])
    baseline = out["methods"].get(PAIRED_AGAINST)
    for key in ("mean_missing", "worst_missing"):
        if baseline is None or baseline[key]["mean"] is None or out[key]["mean"] is None:
            continue
        gap = out[key]["mean"] - baseline[key]["mean"]
        out.setdefault("gap", {})[key] = sign * gap
        for method, entry in out["methods"].items():
            closed = None if abs(gap) < 1e-12 or entry[key]["mean"] is None else (
                (entry[key]["mean"] - baseline[key]["mean"]) / gap)
            entry.setdefault("gap_closed", {})[key] = closed
    return out


def build_report(dataset_name, modalities, seeds, runs, oracle=None):
    """``runs[method][i]`` is the evaluate() result of seed ``seeds[i]`` (all of one task's metric);
    ``oracle``: ``{pattern: [score per seed]}`` of ``compare --oracle`` (None: none was trained)."""
    metric = next(iter(runs.values()))[0]["metric"]
    methods = {}
    for method, results in runs.items():
        entry = {key: _figure([r[key] for r in results]) for key, _, _ in SUMMARY[metric]}
        subsets = results[0][f"subset_{metric}"]
        entry[f"subset_{metric}"] = {k: _figure([r[f"subset_{metric}"][k] for r in results]) for k in subsets}
        entry["drop_rate_curve"] = {"rates": results[0]["drop_rate_curve"]["rates"],
                                    metric: _curve(results, lambda r: r["drop_rate_curve"], metric)}
        entry["corruption"] = {
            name: {family: {"levels": curve["levels"],
                            metric: _curve(results, lambda r, n=name, f=family: r["corruption"][n][f], metric),
                            **{key: _figure([r["corruption"][name][family][key] for r in results])
                               for key in ("relative_robustness", "effective_robustness")}}
                   for family, curve in curves.items()}
            for name, curves in results[0]["corruption"].items()}
        methods[method] = entry
    return {"dataset": dataset_name, "metric": metric, "modalities": list(modalities), "seeds": list(seeds),
            "methods": methods, f"paired_vs_{PAIRED_AGAINST}": paired_differences(runs, metric),
            "oracle": oracle_summary(oracle, runs, metric) if oracle else None}


def _cell(figure, scale):
    if figure["mean"] is None:
        return "–"
    digits = 1 if scale == 100 else 3
    return f"{figure['mean'] * scale:.{digits}f} ± {figure['std'] * scale:.{digits}f}"


def _mean_cell(figure, scale):
    return "–" if figure["mean"] is None else f"{figure['mean'] * scale:.{1 if scale == 100 else 3}f}"


def markdown(report, runs):
    methods, metric = report["methods"], report["metric"]
    label, unit, scale = UNITS[metric]
    summary = SUMMARY[metric]
    lines = [f"# {report['dataset']}: robustness to missing modalities", "",
             f"Modalities: {', '.join(report['modalities'])}. Seeds: {', '.join(map(str, report['seeds']))}. "
             f"Mean ± std over seeds; {label} in {unit}; robustness as MultiBench defines it "
             "(effective robustness against `erm` of the same seed"
             f"{'; an error enters negated, so higher is better' if metric in metrics.ERROR_METRICS else ''}).",
             "", "| method | " + " | ".join(h for _, h, _ in summary) + " |", "|---" * (len(summary) + 1) + "|"]
    for name, entry in methods.items():
        lines.append(f"| {name} | " + " | ".join(_cell(entry[k], s) for k, _, s in summary) + " |")
    lines += _paired_table(report, metric)
    lines += _oracle_table(report, metric)
    rates = next(iter(methods.values()))["drop_rate_curve"]["rates"]
    lines += ["", f"## {label} vs test-time drop rate ({unit})", "",
              "| method | " + " | ".join(f"p={r}" for r in rates) + " |", "|---" * (1 + len(rates)) + "|"]
    for name, entry in methods.items():
        lines.append(f"| {name} | " + " | ".join(_mean_cell(f, scale) for f in entry["drop_rate_curve"][metric])
                     + " |")
    snrs = next(iter(runs.values()))[0][f"noise_{metric}"][report["modalities"][0]]["snr_db"]
    lines += ["", f"## {label} with Gaussian noise on one modality ({unit}, mean over seeds)", "",
              "| method | modality | " + " | ".join(f"{s:g} dB" for s in snrs) + " |", "|---" * (2 + len(snrs)) + "|"]
    for name, results in runs.items():
        for modality in report["modalities"]:
            values = np.mean([r[f"noise_{metric}"][modality][metric] for r in results], 0)
            lines.append(f"| {name} | {modality} | " + " | ".join(
                _mean_cell({"mean": v}, scale) for v in values) + " |")
    lines += _corruption_tables(methods, metric)
    lines += _natural_table(runs, metric)
    if any(results[0]["reconstruction_r2"] for results in runs.values()):
        names = report["modalities"]
        lines += ["", "## Reconstruction R² of a missing modality's embedding", "",
                  "| method | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
        for name, results in runs.items():
            if results[0]["reconstruction_r2"]:
                lines.append(f"| {name} | " + " | ".join(
                    f"{np.mean([r['reconstruction_r2'][m] for r in results]):.3f}" for m in names) + " |")
    oracle = (report.get("oracle") or {}).get("patterns", {})
    lines += ["", f"## {label} per missing pattern (kept modalities, {unit})", "",
              "| kept | " + " | ".join(methods) + (" | oracle |" if oracle else " |"),
              "|---" * (1 + len(methods) + bool(oracle)) + "|"]
    for subset in next(iter(methods.values()))[f"subset_{metric}"]:
        lines.append(f"| {subset} | " + " | ".join(_cell(e[f"subset_{metric}"][subset], scale)
                                                   for e in methods.values())
                     + (f" | {_cell(oracle[subset], scale) if subset in oracle else ''} |" if oracle else " |"))
    return "\n".join(lines) + "\n"


def _oracle_table(report, metric):
    """Each method beside the per-pattern oracle: mean and worst over the oracle's patterns, and the share
    of ModDrop's gap to the oracle it closes."""
    oracle = report.get("oracle")
    if not oracle:
        return []
    label, unit, scale = UNITS[metric]
    digits = 1 if scale == 100 else 3
    gap = oracle.get("gap", {})
    share = lambda v: "–" if v is None else f"{100 * v:.0f} %"  # noqa: E731
    lines = ["", f"## Beside the per-pattern oracle ({len(oracle['patterns'])} patterns; {unit}, "
                 "mean ± std over seeds)",
             "", "The oracle: for each missing pattern, the same model trained on that pattern alone (ERM, the same "
             "budget and selection). ModDrop's gap to it: mean missing "
             + (f"{gap['mean_missing'] * scale:.{digits}f}" if "mean_missing" in gap else "–") + ", worst missing "
             + (f"{gap['worst_missing'] * scale:.{digits}f}" if "worst_missing" in gap else "–")
             + "; \"closed\": the share of that gap a method wins back.", "",
             "| method | mean missing | closed | worst missing | closed |", "|---|---|---|---|---|",
             f"| oracle | {_cell(oracle['mean_missing'], scale)} | | {_cell(oracle['worst_missing'], scale)} | |"]
    for name, entry in oracle["methods"].items():
        closed = entry.get("gap_closed", {})
        lines.append(f"| {name} | {_cell(entry['mean_missing'], scale)} | {share(closed.get('mean_missing'))} | "
                     f"{_cell(entry['worst_missing'], scale)} | {share(closed.get('worst_missing'))} |")
    return lines


def _paired_table(report, metric):
    """Each method minus ModDrop, paired by seed: mean ± standard error, "(noise)" within NOISE_SE of 0."""
    paired = report.get(f"paired_vs_{PAIRED_AGAINST}")
    if not paired:
        return []
    label, unit, scale = UNITS[metric]
    error = metric in metrics.ERROR_METRICS
    lines = ["", f"## Paired by seed: each method minus `{PAIRED_AGAINST}` ({unit}; mean ± standard error over "
                 f"{next(iter(next(iter(paired.values())).values()))['n']} seeds"
                 f"{'; the error negated, so positive is better' if error else ''}; "
                 f"\"(noise)\": within {NOISE_SE} standard errors of 0)", "",
             "| method | " + " | ".join(k.replace("_", " ") for k in PAIRED_KEYS) + " |",
             "|---" * (1 + len(PAIRED_KEYS)) + "|"]
    digits = 1 if scale == 100 else 3
    for name, figures in paired.items():
        cells = []
        for key in PAIRED_KEYS:
            f = figures[key]
            if f["mean"] is None:
                cells.append("–")
                continue
            noise = " (noise)" if abs(f["mean"]) < NOISE_SE * f["se"] or f["mean"] == 0 else ""
            cells.append(f"{f['mean'] * scale:+.{digits}f} ± {f['se'] * scale:.{digits}f}{noise}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _corruption_tables(methods, metric):
    """The metric per corruption level, one table per family (docs/corruptions.md)."""
    label, unit, scale = UNITS[metric]
    first = next(iter(methods.values()))["corruption"]
    families = sorted({family for curves in first.values() for family in curves})
    lines = []
    for family in families:
        levels = next(c[family]["levels"] for c in first.values() if family in c)
        lines += ["", f"## {label} with one modality corrupted: {family} ({unit}, mean over seeds; "
                      "effective robustness against `erm`)", "",
                  "| method | modality | " + " | ".join(f"{v:g}" for v in levels) + " | effective rob. |",
                  "|---" * (3 + len(levels)) + "|"]
        for name, entry in methods.items():
            for modality, curves in entry["corruption"].items():
                if family in curves:
                    curve = curves[family]
                    lines.append(f"| {name} | {modality} | " + " | ".join(_mean_cell(f, scale) for f in curve[metric])
                                 + f" | {_cell(curve['effective_robustness'], 1)} |")
    return lines


def _natural_table(runs, metric):
    """The clean metric per pattern of modalities the data has (natural missingness), mean over seeds."""
    label, unit, scale = UNITS[metric]
    key = f"natural_pattern_{metric}"
    first = next(iter(runs.values()))[0][key]
    if not first:
        return []
    lines = ["", f"## Clean {label} by the data's own pattern of modalities ({unit}, mean over seeds)", "",
             "| method | " + " | ".join(f"{p} (n={v['count']})" for p, v in first.items()) + " |",
             "|---" * (1 + len(first)) + "|"]
    for name, results in runs.items():
        lines.append(f"| {name} | " + " | ".join(
            _mean_cell({"mean": np.mean([r[key][p][metric] for r in results])}, scale) for p in first) + " |")
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
