"""Interventions: what the method does to the embeddings of its targets
(docs/method_training.md, "Interventions").

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

:class:`Views` is a batch as the fusion sees it; :func:`intervene` turns the clean
views into the perturbed ones for a matrix of per-sample target strengths.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from ... import checks, distributed
from ...ops.lowrank_svd import lowrank_svd
from ...ops.spectral_collapse import default_rank, spectral_collapse

COLLAPSES = ("spectral", "zero", "fixed_rank")
INTERVENTIONS = ("collapse", "remove", "noise", "token_dropout")


@dataclass(frozen=True)
class Views:
    """A batch as fusion and head see it: ``embeddings`` by modality ((B, d) or (B, T, d)), the
    (B, M) bool ``present`` mask in the model's modality order, and the (B, T) token ``masks``. ``apart``, of
    perturbed views whose embeddings are the clean ones but on a few rows (swapped views): those rows' indices,
    a long tensor, so that the rest can share the clean pass (:func:`objective.forward_pair`)."""

    embeddings: dict
    present: torch.Tensor
    masks: dict
    apart: torch.Tensor | None = None

    def apply(self, fn):
        """The views with ``fn`` applied to every tensor (rows selected, detached, gathered ...)."""
        return Views({k: fn(z) for k, z in self.embeddings.items()}, fn(self.present),
                     {k: fn(m) for k, m in self.masks.items()})

    def gathered(self):
        """Detached and with the rows of every data-parallel rank (itself in one process)."""
        return self.apply(lambda t: distributed.gather_rows(t.detach()))


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
    checks.choice("mode", mode, COLLAPSES)
    strength = checks.number("strength", strength, 0.0, 1.0)
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
    snr_db = checks.number("snr_db", snr_db)
    power = z.detach().float().square().mean()
    scale = (power / 10 ** (snr_db / 10)).sqrt().to(z.dtype)
    noise = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=generator.device if generator else z.device)
    return z + scale * noise.to(z.device)


def token_dropout(z, mask, rate, *, generator=None):
    """Drops each real token of ``z`` (B, T, d) with probability ``rate``, at least one kept
    per sample. Returns ``(z with dropped tokens zeroed, the new (B, T) mask)``."""
    rate = checks.number("rate", rate, 0.0, 1.0, high_open=True)
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


def blank(z):
    """Every sample's embedding replaced by the batch's mean one (rows of a pooled matrix, each token position
    of token embeddings): the view is there and carries nothing of its sample."""
    return z.mean(0, keepdim=True).expand_as(z)


def draw_swaps(strengths, share, generator):
    """Which targets of the host (B, M) ``strengths`` are candidates to be swapped rather than removed, each with
    probability ``share``: a host bool matrix drawn from ``generator`` (the controller's), so that the step knows
    without a device read which rows may change (docs/method.md, "Swapped views"). None, and no draw, where
    nothing can be swapped: a share of 0, or fewer than three modalities (a view is outvoted only by two left)."""
    if share == 0 or strengths.shape[1] < 3:
        return None
    return (strengths > 0) & (torch.rand(strengths.shape, generator=generator, dtype=torch.float64) < share)


def _on_rows(rows, damaged, z):
    """``damaged`` on the samples ``rows`` (B,) marks, ``z`` on the others."""
    return torch.where(rows.view(-1, *([1] * (z.dim() - 1))), damaged, z)


def intervene(views, strengths, names, *, kind="collapse", collapse_mode="spectral", generator=None, ctx=None,
              blank_share=0.0, swaps=None):
    """The perturbed :class:`Views` of ``views``: ``strengths`` is a CPU (B, M) float64 matrix giving
    each sample's targets and their strength (0: untouched), ``names`` the modalities in its column
    order, ``kind`` one of ``INTERVENTIONS``. A modality's strength is the same for all the samples
    that target it (the controller's s_m), so its damaged embedding is computed once (for pooled
    embeddings over the whole batch, whose rows are the samples) and kept on the targeted rows;
    with ``kind="collapse"`` a strength of 1 is removal (``present = False``, the model's own
    missing handling); with ``blank_share`` each removed target is instead, with that probability,
    kept present with its embedding :func:`blank`-ed (docs/method.md, "Blank views"; drawn on the
    device); a removed target that ``swaps`` (:func:`draw_swaps`) marks is, where the sample keeps two other
    present views and the previous sample has the view, kept present with that sample's embedding and token
    mask (docs/method.md, "Swapped views"); when swaps are the only change of the embeddings, the result's
    ``apart`` lists this rank's rows that ``swaps`` marks.
    Under data parallelism (``ctx``) B is the global micro-batch: the damage is computed on its gathered rows
    and this rank keeps its own. No decision reads device data back to the host."""
    embeddings, present, masks = dict(views.embeddings), views.present.clone(), dict(views.masks)
    gather, ours = (ctx.gather_rows, ctx.batch_rows(present.shape[0])[1]) if ctx else (lambda x: x, slice(None))
    targeted = strengths.numpy() > 0
    top = strengths.numpy().max(0)  # of a targeted modality: its targets' strength (the others are <= 0)
    removes = np.full(len(names), kind == "remove") | ((kind == "collapse") & (top >= 1))  # per modality
    if swaps is not None:
        had = gather(views.present)
        outvoted = (had & ~torch.from_numpy(targeted).to(present.device)).sum(1) >= 2
    for m in np.flatnonzero(targeted.any(0)):
        name, strength = names[m], float(top[m])
        rows = torch.from_numpy(targeted[:, m]).to(present.device)
        if removes[m]:
            if swaps is not None:
                z = gather(embeddings[name])
                donor_has = had[:, m].roll(1, 0)  # the previous sample's view is real, not a missing one's filler
                swapped = rows & outvoted & donor_has & swaps[:, m].to(present.device)
                embeddings[name] = _on_rows(swapped, z.roll(1, 0), z)[ours]
                if masks.get(name) is not None:
                    real = gather(masks[name])
                    masks[name] = _on_rows(swapped, real.roll(1, 0), real)[ours]
                rows = rows & ~swapped
            if blank_share > 0:
                z = gather(embeddings[name])
                blanked = rows & (torch.rand(rows.shape, generator=generator, device=rows.device) < blank_share)
                embeddings[name] = _on_rows(blanked, blank(z), z)[ours]
                rows = rows & ~blanked
            present[:, m] &= ~rows[ours]
            continue
        z = gather(embeddings[name])
        if kind == "collapse":
            damaged = collapse(z, strength, mode=collapse_mode, generator=generator)
        elif kind == "noise":  # strength s: noise power s / (1 - s) times the signal's
            s = min(max(strength, 1e-6), 1 - 1e-6)
            damaged = add_noise(z, 10 * math.log10((1 - s) / s), generator=generator)
        elif z.dim() == 3:  # token dropout at rate s (pooled embeddings: no tokens to drop, left as is)
            real = masks.get(name)
            real = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device) if real is None else gather(real)
            damaged, dropped = token_dropout(z, real, min(strength, 0.99), generator=generator)
            masks[name] = torch.where(rows[:, None], dropped, real)[ours]
        else:
            continue
        if not targeted[:, m].all():
            damaged = _on_rows(rows, damaged, z)
        embeddings[name] = damaged[ours]
    # a sample whose targets are every modality it has (natural missingness) keeps them
    emptied = ~present.any(1, keepdim=True)
    apart = None
    if swaps is not None and removes[targeted.any(0)].all() and blank_share == 0:  # only the swaps' rows differ
        apart = torch.from_numpy(np.flatnonzero(swaps.numpy()[ours].any(1))).to(present.device)
    return Views(embeddings, torch.where(emptied, views.present, present), masks, apart)
