"""bench/goals.py's corruption tallies: per level and per curve, paired by seed."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location("goals", Path(__file__).parents[1] / "bench" / "goals.py")
goals = importlib.util.module_from_spec(spec)
spec.loader.exec_module(goals)


def fake_runs(values, levels):
    """eval.json-like records, one a seed: ``values[seed][modality]`` is that curve's accuracies."""
    return [{"corruption": {m: {"noise": {"levels": levels, "accuracy": list(curve)}} for m, curve in seed.items()}}
            for seed in values]


@pytest.mark.parametrize("seed", range(3))
def test_curve_difference_is_the_mean_of_its_level_differences(seed):
    rng = np.random.default_rng(seed)
    levels = [0.0, 0.3, 0.6, 0.9]
    base = rng.uniform(0.5, 1.0, (5, 2, 4))
    ours = base + rng.normal(0, 0.01, base.shape)
    ours[:, 1, 1:] -= 0.05  # the second curve below at every level > 0, far beyond its noise
    runs = [fake_runs([{m: x[s, i] for i, m in enumerate("ab")} for s in range(5)], levels) for x in (ours, base)]
    rows = goals.corruption_differences(*runs, "accuracy", 1)
    curves = goals.curve_differences(*runs, "accuracy", 1)
    assert [row[:3] for row in rows] == [(m, "noise", lv) for m in "ab" for lv in levels[1:]]  # level 0 left out
    for m, family, mean, se in curves:
        mine = [row[3] for row in rows if row[0] == m]
        assert mean == pytest.approx(np.mean(mine))
        assert se == pytest.approx((ours - base)[:, "ab".index(m), 1:].mean(1).std(ddof=1) / np.sqrt(5))
    assert [row[0] for row in goals.below_beyond_noise(curves)] == ["b"]
    assert [row[2] for row in goals.below_beyond_noise(rows) if row[0] == "b"] == levels[1:]
