"""``evaluate``: the evaluation protocol on one trained model (docs/benchmark.md,
"Evaluation protocol")."""

import torch

from ..data.missing import random_present
from ..models.base import eval_mode, pool
from . import corruptions, metrics

SNR_DB = (10.0, 0.0, -10.0)


class _Cache:
    """A split's embeddings computed once; patterns and corruptions then cost only
    fusion and head passes (or one modality's encoder for noise). With natural
    missingness (``batch.present``) a modality a sample lacks is never present,
    whatever mask a pattern asks for. ``metric`` is the task's figure: ``"accuracy"``
    (higher is better) or, for regression, ``"mae"`` (the mean absolute error)."""

    def __init__(self, model, dataset, split, batch_size, device):
        self.model, self.device = model, device
        self.metric = "mae" if dataset.task == "regression" else "accuracy"
        self.batches = [b.to(device) for b in dataset.batches(split, batch_size)]
        self.embeddings = [model.encode(b) for b in self.batches]
        self.natural = [None if b.present is None else b.present.cpu() for b in self.batches]

    def predictions(self, present_for, embeddings=None):
        """Predicted classes (regression: values) with ``present_for(batch_size, i)`` (within what the
        data has) as the mask of batch i."""
        out = []
        for i, (batch, emb) in enumerate(zip(self.batches, embeddings or self.embeddings)):
            present = present_for(len(batch), i)
            if self.natural[i] is not None:
                present = present & self.natural[i]
            outputs = self.model.head(self.model.fuse(emb, present.to(self.device), batch.masks))
            out.append(outputs.float().squeeze(-1) if self.metric == "mae" else outputs.argmax(-1))
        return torch.cat(out)

    def labels(self):
        return torch.cat([b.labels for b in self.batches])

    def per_sample(self, predicted):
        """Each sample's share of the metric: 1 for a right class (0 wrong), or its absolute error."""
        labels = self.labels()
        return (predicted - labels).abs() if self.metric == "mae" else (predicted == labels).float()

    def score(self, present_for, embeddings=None, rows=None):
        """The metric over the split, or over ``rows`` (a per-batch list of bool masks; None when no
        row is eligible)."""
        values = self.per_sample(self.predictions(present_for, embeddings))
        if rows is not None:
            values = values[torch.cat(rows).to(values.device)]
            if not len(values):
                return None
        return values.mean().item()

    def having(self, keep):
        """Per batch, the samples that have every modality of ``keep`` (None: all of them)."""
        if all(n is None for n in self.natural):
            return None
        return [torch.ones(len(b), dtype=torch.bool) if n is None else n[:, list(keep)].all(1)
                for b, n in zip(self.batches, self.natural)]


def _check(model, dataset, split):
    """``dataset`` as the data interface, checked against ``model`` and ``split``."""
    from ..data import as_data

    dataset = as_data(dataset)
    if tuple(getattr(model, "modalities", ())) != dataset.modalities:
        raise ValueError(f"model: its modalities {list(getattr(model, 'modalities', []))} differ from the "
                         f"dataset's {list(dataset.modalities)}")
    if dataset.split_size(split) == 0:
        raise ValueError(f"split: {split!r} of this dataset is empty")
    return dataset


@torch.no_grad()
def evaluate(model, dataset, split="test", seed=0, *, drop_rates=metrics.DROP_RATES, snr_db=SNR_DB,
             reference_curve=None, reference_corruption=None, batch_size=512, device=None):
    """Accuracy of ``model`` on ``split`` of ``dataset`` (MultimodalData, or what
    :func:`modalimmune.data.as_data` takes) under missing and corrupted modalities.

    Every figure is the task's ``metric`` (named in the result): ``accuracy``, or for a
    regression task ``mae``, the mean absolute error (the keys below then end in ``_mae``;
    lower is better, and the robustness figures are computed on the negated error so that
    higher stays better; ``clean_mse`` and ``clean_r2`` replace the balanced accuracy).

    Returns a dict: ``clean_accuracy`` (every sample with the modalities it has) and
    ``clean_balanced_accuracy`` (the mean recall over the classes); ``subset_accuracy``
    for every non-empty subset of modalities (kept ones, ``a+b``), over the samples
    that have all of them (natural missingness: a pattern a sample cannot have is
    skipped for it; None when no sample has it); ``mean_missing_accuracy`` and
    ``worst_missing_accuracy`` over the proper subsets; ``drop_rate_curve``
    (each modality of each sample dropped with probability p, one always kept,
    masks drawn from ``seed``) with ``drop_rate_auc`` and MultiBench's
    ``relative_robustness``; ``effective_robustness`` against
    ``reference_curve`` (accuracies at the same rates, e.g. the ERM run's; None
    without one); ``noise_accuracy`` per modality and SNR (dB) of added Gaussian
    noise; ``corruption``: per modality and corruption family the accuracy at
    levels 0-0.9 (docs/corruptions.md), effective robustness against
    ``reference_corruption`` (the same layout of accuracies, e.g. the ERM run's);
    ``natural_pattern_accuracy`` (per pattern of modalities the data has: sample
    count and clean accuracy) when the data lacks modalities, else None;
    ``reconstruction_r2`` per modality when the model decodes (its pooled
    embedding predicted with that modality missing), else None.
    """
    dataset = _check(model, dataset, split)
    device = device or next(model.parameters()).device
    with eval_mode(model):
        names = dataset.modalities
        cache = _Cache(model, dataset, split, batch_size, device)
        m = len(names)
        pattern = lambda keep: _kept(keep, m)  # noqa: E731
        metric = cache.metric
        subset = {metrics.subset_name(names, s): cache.score(pattern(s), rows=cache.having(s))
                  for s in metrics.subsets(names)}
        mean_missing, worst_missing = metrics.missing_summary(subset, names, metric)
        curve = [cache.score(_drop_masks(cache, m, rate, seed, k)) for k, rate in enumerate(drop_rates)]
        everything = pattern(range(m))
        clean = cache.predictions(everything)
        result = {
            "metric": metric,
            f"clean_{metric}": cache.per_sample(clean).mean().item(),
            f"subset_{metric}": subset,
            f"mean_missing_{metric}": mean_missing,
            f"worst_missing_{metric}": worst_missing,
            "drop_rate_curve": {"rates": list(drop_rates), metric: curve},
            "drop_rate_auc": metrics.drop_rate_auc(drop_rates, curve),
            **metrics.robustness(drop_rates, curve, reference_curve, metric),
            f"noise_{metric}": _noise(cache, names, snr_db, seed, everything),
            "corruption": corruptions.corruption_curves(cache, seed=seed, references=reference_corruption,
                                                        texts=_raw_texts(dataset, split, cache)),
            f"natural_pattern_{metric}": _natural_patterns(cache, names, clean),
            "reconstruction_r2": _reconstruction(cache, names) if getattr(model, "decodes", False) else None,
        }
        labels = cache.labels().cpu()
        if metric == "accuracy":
            result["clean_balanced_accuracy"] = metrics.balanced_accuracy(clean.cpu(), labels)
        else:
            result["clean_mse"] = float((clean.cpu() - labels).square().mean())
            result["clean_r2"] = metrics.r2_score(clean.cpu()[:, None], labels[:, None])
    return result


def _kept(keep, modalities):
    """The present masks of a fixed pattern: the modality positions ``keep`` in every sample."""
    return lambda n, i: torch.zeros(n, modalities, dtype=torch.bool).index_fill_(1, torch.tensor(list(keep)), True)


@torch.no_grad()
def pattern_score(model, dataset, keep, split="test", *, batch_size=512, device=None):
    """The task's metric of ``model`` on ``split`` with only the modalities at positions ``keep``
    present (over the samples that have them all; None when none does): one missing pattern of
    :func:`evaluate`, for the per-pattern oracle."""
    dataset = _check(model, dataset, split)
    with eval_mode(model):
        cache = _Cache(model, dataset, split, batch_size, device or next(model.parameters()).device)
        return cache.score(_kept(keep, len(dataset.modalities)), rows=cache.having(keep))


def _drop_masks(cache, modalities, rate, seed, level):
    """Per-batch masks from a generator fixed by (seed, level): every method sees the same patterns
    (drawn among the modalities each sample has)."""
    generator = torch.Generator().manual_seed(seed * 1009 + level)
    return lambda n, i: random_present(n, modalities, rate, generator, within=cache.natural[i])


def _raw_texts(dataset, split, cache):
    """``{name: (per-batch raw texts, encode_text)}`` of the modalities that are a frozen text encoder's
    embeddings (``dataset.raw_texts``), for the text corruptions; {} without any."""
    if not dataset.raw_texts:
        return {}
    index = dataset.indices(split)
    batches = torch.split(index, [len(b) for b in cache.batches])  # the cache's batches, in split order
    return {name: ([[raw.texts[i] for i in batch.tolist()] for batch in batches],
                   lambda t, name=name: dataset.text_input(name, t))
            for name, raw in dataset.raw_texts.items()}


def _natural_patterns(cache, names, clean):
    """``{pattern: {"count", metric}}`` over the samples whose data has exactly that pattern
    (None without natural missingness)."""
    if all(n is None for n in cache.natural):
        return None
    natural = torch.cat([torch.ones(len(b), len(names), dtype=torch.bool) if n is None else n
                         for b, n in zip(cache.batches, cache.natural)])
    values = cache.per_sample(clean).cpu()
    out = {}
    for pattern in sorted({tuple(row) for row in natural.tolist()}, key=lambda p: (-sum(p), p)):
        rows = (natural == torch.tensor(pattern)).all(1)
        name = metrics.subset_name(names, [i for i, kept in enumerate(pattern) if kept])
        out[name] = {"count": int(rows.sum()), cache.metric: values[rows].mean().item()}
    return out


def _noise(cache, names, snr_db, seed, everything):
    """The metric with Gaussian noise of power P / 10^(snr/10) added to one modality
    (P its mean squared value over the split's real entries)."""
    out = {}
    for name in names:
        generator = torch.Generator().manual_seed(seed * 7 + names.index(name))
        inputs = [b.inputs[name] for b in cache.batches]
        real = [b.masks[name][..., None] if name in b.masks else torch.ones(1, dtype=torch.bool) for b in cache.batches]
        power = sum((x.square() * r).sum() for x, r in zip(inputs, real)) / sum(
            (r.expand_as(x)).sum() for x, r in zip(inputs, real))
        scores = []
        for snr in snr_db:
            sigma = (power / 10 ** (snr / 10)).sqrt()
            noisy = []
            for batch, emb, x, r in zip(cache.batches, cache.embeddings, inputs, real):
                noise = torch.randn(x.shape, generator=generator).to(x.device) * sigma
                noisy.append({**emb, name: cache.model.encode(batch.replace(name, x + noise * r))[name]})
            scores.append(cache.score(everything, noisy))
        out[name] = {"snr_db": list(snr_db), cache.metric: scores}
    return out


def _reconstruction(cache, names):
    out = {}
    for i, name in enumerate(names):
        predicted, target = [], []
        for batch, emb in zip(cache.batches, cache.embeddings):
            present = torch.ones(len(batch), len(names), dtype=torch.bool, device=cache.device)
            present[:, i] = False
            predicted.append(cache.model.decode(cache.model.fuse(emb, present, batch.masks))[name].float().cpu())
            target.append(pool(emb[name], batch.masks.get(name)).float().cpu())
        out[name] = metrics.r2_score(torch.cat(predicted), torch.cat(target))
    return out
