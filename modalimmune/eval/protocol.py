"""``evaluate``: the DESIGN section 9 protocol on one trained model
(docs/benchmark.md, "Protocol")."""

import torch

from ..data.missing import random_present
from ..models.base import pool
from . import metrics

SNR_DB = (10.0, 0.0, -10.0)


class _Cache:
    """A split's embeddings computed once; patterns and corruptions then cost only
    fusion and head passes (or one modality's encoder for noise)."""

    def __init__(self, model, dataset, split, batch_size, device):
        self.model, self.device = model, device
        self.batches = [b.to(device) for b in dataset.batches(split, batch_size)]
        self.embeddings = [model.encode(b) for b in self.batches]

    def predictions(self, present_for, embeddings=None):
        """Predicted classes with ``present_for(batch_size, i)`` as the mask of batch i."""
        out = []
        for i, (batch, emb) in enumerate(zip(self.batches, embeddings or self.embeddings)):
            present = present_for(len(batch), i).to(self.device)
            out.append(self.model.head(self.model.fuse(emb, present, batch.masks)).argmax(-1))
        return torch.cat(out)

    def accuracy(self, present_for, embeddings=None):
        labels = torch.cat([b.labels for b in self.batches])
        return (self.predictions(present_for, embeddings) == labels).float().mean().item()


def _check(model, dataset, split):
    from ..data import MultimodalDataset

    if not isinstance(dataset, MultimodalDataset):
        raise TypeError(f"dataset: expected a MultimodalDataset, got {type(dataset).__name__}")
    if tuple(getattr(model, "modalities", ())) != dataset.modalities:
        raise ValueError(f"model: its modalities {list(getattr(model, 'modalities', []))} differ from the "
                         f"dataset's {list(dataset.modalities)}")
    if dataset.split_size(split) == 0:
        raise ValueError(f"split: {split!r} of this dataset is empty")


@torch.no_grad()
def evaluate(model, dataset, split="test", seed=0, *, drop_rates=metrics.DROP_RATES, snr_db=SNR_DB,
             reference_curve=None, batch_size=512, device=None):
    """Accuracy of ``model`` on ``split`` of ``dataset`` under missing and noisy modalities.

    Returns a dict: ``clean_accuracy``; ``subset_accuracy`` for every non-empty
    subset of modalities (kept ones, ``a+b``); ``mean_missing_accuracy`` and
    ``worst_missing_accuracy`` over the proper subsets; ``drop_rate_curve``
    (each modality of each sample dropped with probability p, one always kept,
    masks drawn from ``seed``) with ``drop_rate_auc`` and MultiBench's
    ``relative_robustness``; ``effective_robustness`` against
    ``reference_curve`` (accuracies at the same rates, e.g. the ERM run's; None
    without one); ``noise_accuracy`` per modality and SNR (dB) of added Gaussian
    noise; ``reconstruction_r2`` per modality when the model decodes (its pooled
    embedding predicted with that modality missing), else None.
    """
    _check(model, dataset, split)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        names = dataset.modalities
        cache = _Cache(model, dataset, split, batch_size, device)
        m = len(names)
        pattern = lambda keep: lambda n, i: torch.zeros(n, m, dtype=torch.bool).index_fill_(  # noqa: E731
            1, torch.tensor(keep), True)
        subset_accuracy = {metrics.subset_name(names, s): cache.accuracy(pattern(s)) for s in metrics.subsets(names)}
        mean_missing, worst_missing = metrics.missing_summary(subset_accuracy, names)
        curve = [cache.accuracy(_drop_masks(m, rate, seed, k)) for k, rate in enumerate(drop_rates)]
        result = {
            "clean_accuracy": subset_accuracy["+".join(names)],
            "subset_accuracy": subset_accuracy,
            "mean_missing_accuracy": mean_missing,
            "worst_missing_accuracy": worst_missing,
            "drop_rate_curve": {"rates": list(drop_rates), "accuracy": curve},
            "drop_rate_auc": metrics.drop_rate_auc(drop_rates, curve),
            "relative_robustness": metrics.relative_robustness(drop_rates, curve),
            "effective_robustness": (metrics.effective_robustness(curve, reference_curve)
                                     if reference_curve is not None else None),
            "noise_accuracy": _noise(cache, names, snr_db, seed, pattern(range(m))),
            "reconstruction_r2": _reconstruction(cache, names) if getattr(model, "decodes", False) else None,
        }
    finally:
        model.train(was_training)
    return result


def _drop_masks(modalities, rate, seed, level):
    """Per-batch masks from a generator fixed by (seed, level): every method sees the same patterns."""
    generator = torch.Generator().manual_seed(seed * 1009 + level)
    return lambda n, i: random_present(n, modalities, rate, generator)


def _noise(cache, names, snr_db, seed, everything):
    """Accuracy with Gaussian noise of power P / 10^(snr/10) added to one modality
    (P its mean squared value over the split's real entries)."""
    out = {}
    for name in names:
        generator = torch.Generator().manual_seed(seed * 7 + names.index(name))
        inputs = [b.inputs[name] for b in cache.batches]
        real = [b.masks[name][..., None] if name in b.masks else torch.ones(1, dtype=torch.bool) for b in cache.batches]
        power = sum((x.square() * r).sum() for x, r in zip(inputs, real)) / sum(
            (r.expand_as(x)).sum() for x, r in zip(inputs, real))
        accuracy = []
        for snr in snr_db:
            sigma = (power / 10 ** (snr / 10)).sqrt()
            noisy = []
            for batch, emb, x, r in zip(cache.batches, cache.embeddings, inputs, real):
                noise = torch.randn(x.shape, generator=generator).to(x.device) * sigma
                noisy.append({**emb, name: cache.model.encode(batch.replace(name, x + noise * r))[name]})
            accuracy.append(cache.accuracy(everything, noisy))
        out[name] = {"snr_db": list(snr_db), "accuracy": accuracy}
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
