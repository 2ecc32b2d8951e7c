"""The figures of the evaluation protocol as small pure functions
(docs/benchmark.md, "Metrics")."""

import itertools

import numpy as np

DROP_RATES = tuple(round(0.1 * i, 1) for i in range(10))


def subsets(modalities):
    """Every non-empty subset of ``modalities`` as a tuple of positions, by size
    then in dataset order."""
    m = len(modalities)
    return [s for size in range(1, m + 1) for s in itertools.combinations(range(m), size)]


def subset_name(modalities, subset):
    """The kept modalities in dataset order joined by ``+`` (``fac+pix``)."""
    return "+".join(modalities[i] for i in sorted(subset))


ERROR_METRICS = ("mae",)  # lower is better


def missing_summary(subset_scores, modalities, metric="accuracy"):
    """(mean, worst) of the metric over the missing patterns: every non-empty proper subset that some
    sample can have (None: no sample has it); the worst of an error metric is its largest value."""
    full = "+".join(modalities)
    values = [v for k, v in subset_scores.items() if k != full and v is not None]
    if not values:  # a single modality has no missing pattern
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.max(values) if metric in ERROR_METRICS else np.min(values))


def robustness(levels, values, reference=None, metric="accuracy"):
    """``{"relative_robustness", "effective_robustness"}`` of a curve of the metric over ``levels``
    (effective: against ``reference``, None without one). An error metric enters negated, so that
    higher stays better and a positive effective robustness still means more robust than the
    reference (docs/benchmark.md, "Evaluation protocol")."""
    sign = -1.0 if metric in ERROR_METRICS else 1.0
    signed = [sign * v for v in values]
    return {"relative_robustness": relative_robustness(levels, signed),
            "effective_robustness": (effective_robustness(signed, [sign * v for v in reference])
                                     if reference is not None else None)}


def balanced_accuracy(predicted, labels):
    """The mean over the classes present in ``labels`` of the fraction of their samples predicted
    right (recall): the accuracy a classifier gets when every class weighs the same."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    return float(np.mean([np.mean(predicted[labels == c] == c) for c in np.unique(labels)]))


def drop_rate_auc(rates, accuracy):
    """Area under the accuracy-vs-drop-rate curve (trapezoids), divided by the
    span of rates: the curve's mean height, in accuracy units."""
    rates, accuracy = np.asarray(rates, float), np.asarray(accuracy, float)
    return float(np.trapezoid(accuracy, rates) / (rates[-1] - rates[0]))


def relative_robustness(rates, accuracy):
    """MultiBench's relative robustness: the raw area under the performance-vs-
    imperfection curve (trapezoids over the imperfection levels)."""
    return float(np.trapezoid(np.asarray(accuracy, float), np.asarray(rates, float)))


def effective_robustness(accuracy, reference):
    """MultiBench's effective robustness against a reference method's curve
    ``b`` at the same levels: ``sum_i f_i - (b_i + f_0 - b_0)`` — the accuracy
    kept beyond what the reference keeps, once both start from the same clean accuracy."""
    f, b = np.asarray(accuracy, float), np.asarray(reference, float)
    if f.shape != b.shape:
        raise ValueError(f"reference: expected a curve of {f.shape[0]} points, got {b.shape[0]}")
    return float(np.sum(f - (b + f[0] - b[0])))


def r2_score(predicted, target):
    """Coefficient of determination over all samples and features:
    ``1 - SSE / SST`` with SST about the per-feature mean."""
    predicted, target = np.asarray(predicted, float), np.asarray(target, float)
    sst = np.sum((target - target.mean(0)) ** 2)
    return float(1 - np.sum((predicted - target) ** 2) / sst) if sst > 0 else float("nan")


def mean_std(values):
    """``{"mean", "std"}`` over seeds (sample standard deviation; 0 for one seed)."""
    values = np.asarray(values, float)
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return {"mean": float(values.mean()), "std": std}
