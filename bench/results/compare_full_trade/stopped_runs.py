"""Paired differences (points, clean / mean missing) of the hapt runs stopped before their 10 seeds, from the
compare logs in LOGS (default: hapt/logs beside this file): `python stopped_runs.py [LOGS]`."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/, for goals.py
from goals import paired  # noqa: E402

LINE = re.compile(r"(\S+) seed (\d+): clean accuracy ([\d.]+) mean-missing ([\d.]+)")
REFERENCES = ("modalimmune", "modalimmune[single_share=full]", "moddrop")
STOPPED = ("h_n5", "h_n75", "h_i5", "h_fb25", "h_ska")


def read(log):
    """{method: {seed: (clean, mean missing)}} in points."""
    runs = {}
    for line in log.read_text().splitlines():
        if match := LINE.match(line):
            runs.setdefault(match[1], {})[int(match[2])] = (100 * float(match[3]), 100 * float(match[4]))
    return runs


def paired_by_seed(runs, reference):
    """'mean +- standard error' of the per-seed differences (goals.paired), clean and mean missing."""
    seeds = sorted(runs)
    return [f"{mean:+.2f} +- {se:.2f}" for mean, se in
            (paired([runs[s][i] for s in seeds], [reference[s][i] for s in seeds]) for i in range(2))]


def main(logs):
    references = {**read(logs / "moddrop_defaults_oracle.log"), **read(logs / "single_share_full.log")}
    for name in STOPPED:
        for method, runs in read(logs / f"{name}.log").items():
            print(f"{method} ({len(runs)} seeds, {name}.log)")
            for reference in REFERENCES:
                clean, mean = paired_by_seed(runs, references[reference])
                print(f"   minus {reference}: clean {clean}, mean missing {mean}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "hapt" / "logs")
