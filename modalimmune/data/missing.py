"""Random missing-modality patterns (training-time ModDrop and the test-time drop-rate curve)."""

import torch


def random_present(batch, modalities, rate, generator=None, device=None):
    """A ``(batch, modalities)`` bool mask: each modality of each sample is dropped
    with probability ``rate``; a sample that would lose all of them keeps one,
    chosen uniformly, so that at least one modality is always present."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate: expected a probability in [0, 1], got {rate}")
    present = torch.rand(batch, modalities, generator=generator, device=device) >= rate
    rescue = torch.randint(modalities, (batch,), generator=generator, device=device)
    none_left = ~present.any(1)
    present[none_left, rescue[none_left]] = True
    return present
