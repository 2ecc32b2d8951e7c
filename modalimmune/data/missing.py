"""Random missing-modality patterns (training-time ModDrop and the test-time drop-rate curve)."""

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
