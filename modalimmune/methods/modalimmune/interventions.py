"""Interventions on one modality's embeddings (docs/method_training.md, "Interventions").

An embedding ``Z`` is ``(B, d)`` (pooled: the rows of the matrix that is
collapsed are the samples of the batch) or ``(B, T, d)`` (tokens: each sample
is its own ``(T, d)`` matrix), so both layouts go to the ops as they are.

- :func:`collapse`: remove the fraction ``strength`` of the centred energy,
  ``"spectral"`` (weakest directions first, :func:`modalimmune.ops.spectral_collapse`),
  ``"fixed_rank"`` (keep the top ``round((1 - s) k)`` directions whatever the
  spectrum: the ablation of the adaptive rank) or ``"zero"`` (shrink the whole
  embedding towards 0 by ``sqrt(1 - s)``: the ablation of the spectral structure).
- :func:`knock_out`: the collapse at strength 1 (only the row mean is left).
- :func:`add_noise`: Gaussian noise at a signal-to-noise ratio in dB.
- :func:`token_dropout`: drop tokens of token embeddings (their mask turns false).
- full removal is the model's own: ``present[:, m] = False``.
"""

import math

import torch

from ..ops import _validate
from ..ops.lowrank_svd import lowrank_svd
from ..ops.spectral_collapse import default_rank, spectral_collapse

COLLAPSES = ("spectral", "zero", "fixed_rank")


def knock_out(z):
    """Every row replaced by the row mean of its matrix (``C_1``: no sample-specific information)."""
    return z.mean(-2, keepdim=True).expand_as(z)


def _fixed_rank(z, strength, k, generator, backend):
    """Project the centred rows on their top ``r = round((1 - s) k)`` right singular vectors."""
    rank = round((1 - strength) * k)
    if rank == 0:
        return knock_out(z)
    with torch.no_grad():
        work = z.detach().float() if z.dtype in (torch.bfloat16, torch.float16) else z.detach()
        _, _, V = lowrank_svd(work - work.mean(-2, keepdim=True), rank, generator=generator, backend=backend)
    V = V.to(z.dtype)
    mean = z.mean(-2, keepdim=True)
    return mean + ((z - mean) @ V) @ V.mT  # the projector is a constant for autograd, as in spectral_collapse


def collapse(z, strength, *, mode="spectral", k=None, generator=None, backend="auto"):
    """``z`` with the fraction ``strength`` (a float in [0, 1]) of its information destroyed."""
    _validate.choice("mode", mode, COLLAPSES)
    strength = _validate.finite_float("strength", strength, 0.0, 1.0)
    if z.dim() not in (2, 3):
        raise ValueError(f"z: expected an embedding of shape (B, d) or (B, T, d), got {tuple(z.shape)}")
    if strength == 0:
        return z
    if strength == 1 and mode != "zero":
        return knock_out(z)
    if mode == "spectral":
        return spectral_collapse(z, strength, k=k, generator=generator, backend=backend)
    if mode == "zero":
        return z * math.sqrt(1 - strength)
    return _fixed_rank(z, strength, k or default_rank(*z.shape[-2:]), generator, backend)


def add_noise(z, snr_db, *, generator=None):
    """``z`` plus Gaussian noise whose power is the mean square of ``z`` over 10^(snr_db / 10)."""
    snr_db = _validate.finite_float("snr_db", snr_db)
    power = z.detach().float().square().mean()
    scale = (power / 10 ** (snr_db / 10)).sqrt().to(z.dtype)
    noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=generator.device if generator else z.device)
    return z + scale * noise.to(z.device)


def token_dropout(z, mask, rate, *, generator=None):
    """Drops each real token of ``z`` (B, T, d) with probability ``rate``, at least one kept
    per sample. Returns ``(z with dropped tokens zeroed, the new (B, T) mask)``."""
    rate = _validate.finite_float("rate", rate, 0.0, 1.0, high_open=True)
    if z.dim() != 3:
        raise ValueError(f"z: token dropout needs token embeddings (B, T, d), got shape {tuple(z.shape)}")
    mask = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device) if mask is None else mask
    draw = torch.rand(z.shape[:2], generator=generator, device=generator.device if generator else z.device)
    keep = (draw.to(z.device) >= rate) & mask
    # a sample left without tokens keeps its first real one
    first = mask.float().argmax(1)
    empty = ~keep.any(1)
    keep[empty, first[empty]] = True
    return z * keep[..., None].to(z.dtype), keep
