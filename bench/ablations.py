"""Each ablation of a method minus the method itself, paired by seed (what each mechanism contributes).

Reads the runs of one or more `compare` folders of the same dataset and seeds (an ablation run
later into its own folder pairs with the method's runs of the first): for every method whose
name starts with ``REFERENCE[`` the paired difference of clean, mean-missing and worst-missing
against ``REFERENCE`` (mean ± standard error; "noise" within 2 standard errors of 0). A
mechanism contributes where switching it off costs beyond noise, i.e. where the difference
of its ablation is negative beyond noise.

    python bench/ablations.py bench/results/compare_mfeat_oracle bench/results/compare_mfeat_oracle_rank
"""

import argparse
import json
from pathlib import Path

from goals import NOISE_SE, paired_figures, runs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+")
    p.add_argument("--reference", default="modalimmune")
    args = p.parse_args()
    report = json.loads((args.folders[0] / "report.json").read_text())
    metric, seeds = report["metric"], report["seeds"]
    scale, sign = (100, 1) if metric == "accuracy" else (1, -1)
    reference = runs(args.folders[0], args.reference, seeds)
    print(f"{report['dataset']}: {len(seeds)} seeds, each ablation minus {args.reference}, paired by seed "
          f"({'points' if scale == 100 else metric}{'' if sign > 0 else ', error negated'})")
    for folder in args.folders:
        methods = json.loads((folder / "report.json").read_text())["methods"]
        for method in methods:
            if not method.startswith(args.reference + "["):
                continue
            ours = runs(folder, method, seeds)
            cells = [f"{key} {mean * scale:+.2f} ± {se * scale:.2f}"
                     f"{' (noise)' if abs(mean) < NOISE_SE * se or mean == 0 else ''}"
                     for key, mean, se in paired_figures(ours, reference, metric, sign)]
            print(f"- {method}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
