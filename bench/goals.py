"""The goals of a comparison against ModDrop, read from a `compare` folder (its report.json and runs).

For each method (default: every method but the baseline) it prints, paired by seed against the baseline
(ModDrop unless `--baseline` names another method of the folder, e.g. the defaults beside their variants):
- the clean, mean-missing and worst-missing differences (mean ± standard error; goal: >= -0.5 point,
  "noise" when within 2 standard errors of 0);
- with an oracle: ModDrop's gap to it and the share the method closes (goal: >= 50 % where the gap is
  >= 3 points);
- the corruption curves: the paired difference at every level > 0 of every modality and family,
  the lowest mean and how many levels are below ModDrop by more than 2 standard errors (goal: none),
  beside how many would be by chance alone if the two methods were the same (the paired mean over its
  standard error is then Student-t with seeds - 1 degrees of freedom: 5.8 % of the levels at 5 seeds);
  and the same for each curve's mean over its levels, one test a curve: the levels of a curve come from the same
  models, so a seed's model that is a little worse moves several of them together, and the level count overstates
  the evidence.

    python bench/goals.py bench/results/compare_mfeat_oracle [--methods modalimmune,ensemble] [--baseline moddrop]
"""

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats

from modalimmune.methods import split_methods

BASELINE = "moddrop"
NOISE_SE = 2


def paired(values, base):
    diffs = np.asarray(values, float) - np.asarray(base, float)
    return diffs.mean(), diffs.std(ddof=1) / np.sqrt(len(diffs))


def paired_figures(ours, base, metric, sign):
    """[(key, mean, se)] of the paired differences of clean, mean-missing and worst-missing (an error negated)."""
    return [(key, *paired([sign * r[f"{key}_{metric}"] for r in ours], [sign * r[f"{key}_{metric}"] for r in base]))
            for key in ("clean", "mean_missing", "worst_missing")]


def runs(folder, method, seeds):
    return [json.loads((folder / "runs" / method / f"seed{s}" / "eval.json").read_text()) for s in seeds]


def chance_below(levels, seeds):
    """How many of ``levels`` paired differences fall below -NOISE_SE standard errors when the methods are the
    same (independent levels, normal differences): the count a "beyond noise" tally is to be read against."""
    return levels * stats.t.cdf(-NOISE_SE, seeds - 1)


def curves(ours, base, metric, sign):
    """{(modality, family): (levels, mine, theirs)}: each corruption curve's levels > 0 and both methods' values
    there, [seed, level] arrays."""
    out = {}
    for modality, families in ours[0]["corruption"].items():
        for family, curve in families.items():
            keep = [i for i, level in enumerate(curve["levels"]) if level != 0]
            values = [np.array([[sign * r["corruption"][modality][family][metric][i] for i in keep] for r in rs])
                      for rs in (ours, base)]
            out[modality, family] = ([curve["levels"][i] for i in keep], *values)
    return out


def corruption_differences(ours, base, metric, sign):
    """[(modality, family, level, mean, se)] of the paired differences at every level > 0."""
    return [(modality, family, level, *paired(mine[:, i], theirs[:, i]))
            for (modality, family), (levels, mine, theirs) in curves(ours, base, metric, sign).items()
            for i, level in enumerate(levels)]


def curve_differences(ours, base, metric, sign):
    """[(modality, family, mean, se)] of the paired differences of each curve's mean over its levels > 0: one test
    a curve, since a curve's levels come from the same models and move together."""
    return [(modality, family, *paired(mine.mean(1), theirs.mean(1)))
            for (modality, family), (_, mine, theirs) in curves(ours, base, metric, sign).items()]


def below_beyond_noise(rows):
    return [row for row in rows if row[-2] < 0 and abs(row[-2]) >= NOISE_SE * row[-1]]


def print_below(title, unit, rows, seeds, scale, baseline):
    """One line: how many ``rows`` (a name's fields, then mean and se) there are, the lowest, and the ones below
    ``baseline`` beyond noise beside the count expected by chance."""
    name = lambda row: " ".join(str(field) for field in row[:-2])  # noqa: E731
    worst, below = min(rows, key=lambda row: row[-2]), below_beyond_noise(rows)
    print(f"    {title}: {len(rows)} {unit}, lowest {worst[-2] * scale:+.2f} ± {worst[-1] * scale:.2f} "
          f"({name(worst)}), {len(below)} below {'ModDrop' if baseline == BASELINE else baseline} beyond noise "
          f"(by chance alone: {chance_below(len(rows), seeds):.1f})"
          + (": " + ", ".join(name(row) for row in below[:6]) if below else ""))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--methods", default=None, help="comma-separated (default: every method but the baseline)")
    p.add_argument("--baseline", default=BASELINE, help="the method the others are paired against")
    args = p.parse_args()
    report = json.loads((args.folder / "report.json").read_text())
    metric, seeds = report["metric"], report["seeds"]
    scale, sign = (100, 1) if metric == "accuracy" else (1, -1)
    methods = split_methods(args.methods) if args.methods else [m for m in report["methods"] if m != args.baseline]
    base = runs(args.folder, args.baseline, seeds)
    oracle = report.get("oracle") or {}
    unit = ("points" if scale == 100 else metric) + ("" if sign > 0 else ", error negated")
    print(f"{report['dataset']}: {len(seeds)} seeds, paired against {args.baseline} ({unit})")
    if oracle.get("gap"):
        print("ModDrop's gap to the oracle: " + ", ".join(f"{k} {v * scale:.2f}" for k, v in oracle["gap"].items()))
    for method in methods:
        ours = runs(args.folder, method, seeds)
        cells = []
        for key, mean, se in paired_figures(ours, base, metric, sign):
            verdict = "ok" if mean * scale >= -0.5 else ("noise" if abs(mean) < NOISE_SE * se else "LOSS")
            cells.append(f"{key} {mean * scale:+.2f} ± {se * scale:.2f} ({verdict})")
        print(f"- {method}: " + "; ".join(cells))
        closed = oracle.get("methods", {}).get(method, {}).get("gap_closed", {})
        for key, share in closed.items():
            gap = oracle["gap"][key] * scale
            if share is not None:
                goal = "goal: >= 50 %" if gap >= 3 else "gap < 3: no goal"
                print(f"    {key}: closes {100 * share:.0f} % of a {gap:.2f} gap ({goal})")
        levels = corruption_differences(ours, base, metric, sign)
        if levels:
            print_below("corruption", "levels", levels, len(seeds), scale, args.baseline)
            print_below("curves (each one's mean over its levels)", "curves",
                        curve_differences(ours, base, metric, sign), len(seeds), scale, args.baseline)


if __name__ == "__main__":
    main()
