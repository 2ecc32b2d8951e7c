"""The goals of a comparison against ModDrop, read from a `compare` folder (its report.json and runs).

For each method (default: every method but ModDrop) it prints, paired by seed against ModDrop:
- the clean, mean-missing and worst-missing differences (mean ± standard error; goal: >= -0.5 point,
  "noise" when within 2 standard errors of 0);
- with an oracle: ModDrop's gap to it and the share the method closes (goal: >= 50 % where the gap is
  >= 3 points);
- the corruption curves: the paired difference at every level > 0 of every modality and family,
  the lowest mean and how many levels are below ModDrop by more than 2 standard errors (goal: none),
  beside how many would be by chance alone if the two methods were the same (the paired mean over its
  standard error is then Student-t with seeds - 1 degrees of freedom: 5.8 % of the levels at 5 seeds).

    python bench/goals.py bench/results/compare_mfeat_oracle [--methods modalimmune,ensemble]
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


def corruption_differences(ours, base, metric, sign):
    """[(modality, family, level, mean, se)] of the paired differences at every level > 0."""
    out = []
    for modality, families in ours[0]["corruption"].items():
        for family, curve in families.items():
            for i, level in enumerate(curve["levels"]):
                if level == 0:
                    continue
                mine = [sign * r["corruption"][modality][family][metric][i] for r in ours]
                theirs = [sign * r["corruption"][modality][family][metric][i] for r in base]
                out.append((modality, family, level, *paired(mine, theirs)))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--methods", default=None, help="comma-separated (default: every method but moddrop)")
    args = p.parse_args()
    report = json.loads((args.folder / "report.json").read_text())
    metric, seeds = report["metric"], report["seeds"]
    scale, sign = (100, 1) if metric == "accuracy" else (1, -1)
    methods = split_methods(args.methods) if args.methods else [m for m in report["methods"] if m != BASELINE]
    base = runs(args.folder, BASELINE, seeds)
    oracle = report.get("oracle") or {}
    print(f"{report['dataset']}: {len(seeds)} seeds, paired against {BASELINE} ({'points' if scale == 100 else metric}"
          f"{'' if sign > 0 else ', error negated'})")
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
            worst = min(levels, key=lambda row: row[3])
            below = [row for row in levels if row[3] < 0 and abs(row[3]) >= NOISE_SE * row[4]]
            print(f"    corruption: {len(levels)} levels, lowest {worst[3] * scale:+.2f} ± {worst[4] * scale:.2f} "
                  f"({worst[0]} {worst[1]} {worst[2]}), {len(below)} below ModDrop beyond noise "
                  f"(by chance alone: {chance_below(len(levels), len(seeds)):.1f})"
                  + (": " + ", ".join(f"{m} {f} {lv}" for m, f, lv, _, _ in below[:6]) if below else ""))


if __name__ == "__main__":
    main()
