"""Missing-modality patterns: random ones (training-time ModDrop, the test-time drop-rate curve) and
the fixed list that validation and the oracle go through."""

import itertools

import torch

from ..checks import fail, number


def random_present(batch, modalities, rate, generator=None, device=None, *, within=None):
    """A ``(batch, modalities)`` bool mask: each modality of each sample is dropped
    with probability ``rate``; a sample that would lose all of them keeps one,
    chosen uniformly, so that at least one modality is always present.
    ``within``: the ``(batch, modalities)`` mask of the modalities the samples have
    (natural missingness, ``batch.present``); only those can be kept, and the one a
    sample keeps is chosen among them."""
    number("rate", rate, 0.0, 1.0)
    if within is not None:
        if within.shape != (batch, modalities) or within.dtype != torch.bool:
            fail("within", f"a ({batch}, {modalities}) bool mask", f"shape {tuple(within.shape)} dtype {within.dtype}")
        if not within.any(1).all():
            fail("within", "a modality in every sample", f"none in sample {int((~within.any(1)).nonzero()[0, 0])}")
    present = torch.rand(batch, modalities, generator=generator, device=device) >= rate
    if within is None:
        rescue = torch.randint(modalities, (batch,), generator=generator, device=device)
    else:
        present &= within
        rescue = torch.multinomial(within.float(), 1, generator=generator).squeeze(1)
    none_left = ~present.any(1)
    present[none_left, rescue[none_left]] = True
    return present


def missing_patterns(modalities, limit=None, seed=0):
    """The missing patterns of ``modalities`` modalities: every non-empty proper subset of kept
    positions (tuples, by size then in order). With ``limit`` and more patterns than that, a
    fixed sample of ``limit``: every single modality and every leave-one-out pattern (the
    extremes: the weakest pattern is usually a single modality), then patterns drawn from the rest
    with ``seed`` (docs/benchmark.md, "The oracle")."""
    every = [s for size in range(1, modalities) for s in itertools.combinations(range(modalities), size)]
    if limit is None or len(every) <= limit:
        return every
    extremes = [s for s in every if len(s) in (1, modalities - 1)]
    rest = [s for s in every if len(s) not in (1, modalities - 1)]
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = set(extremes[:limit]) | {rest[i] for i in order[:max(0, limit - len(extremes))]}
    return [s for s in every if s in chosen]
