"""``curvature_mask_``: the fused multi-tensor curvature-aware gradient mask.

The math is in docs/ops/curvature_mask.md. Per parameter, in place:

    D   <- beta * D + (1 - beta) * probe              (only when a probe is given)
    M    = 1 where g_c * g_d >= 0 or |D| <= tau        ("agree or flat")
         = 0 (hard) or tau / |D| (soft) elsewhere
    g_c <- g_c + M * g_d

and the statistics of the pass: the count of coordinates with M < 1, the sums
of g_d^2 and (M g_d)^2, and the histogram of |D| on the fixed log-linear grid
of :func:`hist_edges`, from which the next step's tau is read
(:func:`quantile_from_hist`).
"""

from typing import NamedTuple

import torch

from .. import _extension
from .. import backend as _backends
from . import _validate

HIST_BINS = 256
HIST_MIN_EXP = -40
_HIST_OFFSET = (127 + HIST_MIN_EXP) << 2
MODES = ("hard", "soft")


class MaskStats(NamedTuple):
    """Statistics of one masking pass, as 0-dim tensors on the gradients' device
    (``float(stats.masked_fraction)`` reads one; no host sync happens inside the op)."""

    masked_fraction: torch.Tensor  # fraction of all coordinates with M < 1
    destr_norm: torch.Tensor  # ||g_d|| over every parameter
    kept_norm: torch.Tensor  # ||M * g_d||
    log_abs_hist: torch.Tensor  # int64[HIST_BINS] counts of |D| per bin of hist_edges()


def hist_edges():
    """The ``HIST_BINS + 1`` bin edges of |D| (float64): four bins per octave
    from 2^HIST_MIN_EXP, i.e. edges 2^e * (1 + j/4). The first bin also holds
    every smaller value (0 included), the last every larger one (inf included)."""
    b = torch.arange(1, HIST_BINS, dtype=torch.float64)
    inner = torch.exp2(HIST_MIN_EXP + torch.div(b, 4, rounding_mode="floor")) * (1 + (b % 4) / 4)
    inf = torch.tensor([float("inf")], dtype=torch.float64)
    return torch.cat([torch.zeros(1, dtype=torch.float64), inner, inf])


def quantile_from_hist(hist, q):
    """The upper edge of the bin where the cumulative share of counts reaches
    ``q``: at least a fraction ``q`` of the |D| values are <= the result."""
    q = _validate.finite_float("q", q, 0.0, 1.0)
    counts = hist.detach().double().cpu().cumsum(0)
    total = counts[-1].item()
    if total == 0:
        return 0.0
    b = int(torch.searchsorted(counts, q * total).item())
    return float(hist_edges()[min(b, HIST_BINS - 1) + 1])


def hist_bins(d):
    """Bin index of each |d| (read off the float32 bits, as every kernel does)."""
    bits = d.detach().float().abs().contiguous().view(torch.int32)
    return ((bits >> 21) - _HIST_OFFSET).clamp_(0, HIST_BINS - 1)


def curvature_mask_reference(grads_clean, grads_destr, curvature, probe, beta, tau, soft):
    """Pure-PyTorch implementation (the reference and the ``torch`` backend).

    Computes in float32, or in float64 when given float64 tensors (how the tests
    get their ground truth). Returns (stats float64[3], hist int64[HIST_BINS]).
    """
    device = grads_clean[0].device
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    hist = torch.zeros(HIST_BINS, dtype=torch.int64, device=device)
    for i, (gc, gd, d) in enumerate(zip(grads_clean, grads_destr, curvature)):
        work = torch.promote_types(gc.dtype, torch.float32)
        c, g = gc.to(work), gd.to(work)
        if probe is not None:
            d.mul_(beta).add_(probe[i].to(d.dtype), alpha=1.0 - beta)
        abs_d = d.to(work).abs()
        agree = (c == 0) | (g == 0) | ((c > 0) == (g > 0))
        keep = agree | (abs_d <= tau)
        blocked = abs_d.new_full((), tau).div(abs_d) if soft else torch.zeros((), dtype=work, device=device)
        m = torch.where(keep, torch.ones((), dtype=work, device=device), blocked)
        kept = m * g
        gc.copy_(c + kept)
        stats += torch.stack([(~keep).sum(), g.square().sum(), kept.square().sum()]).double()
        hist.index_add_(0, hist_bins(d).flatten().long(), torch.ones_like(d, dtype=torch.int64).flatten())
    return stats, hist


def _validate_args(grads_clean, grads_destr, curvature, probe, beta, tau, mode):
    grads_clean = _validate.tensor_list("grads_clean", grads_clean)
    count = len(grads_clean)
    grads_destr = _validate.tensor_list("grads_destr", grads_destr, count)
    curvature = _validate.tensor_list("curvature", curvature, count)
    if probe is not None:
        probe = _validate.tensor_list("probe", probe, count)
    beta = _validate.finite_float("beta", beta, 0.0, 1.0, high_open=True)
    tau = _validate.finite_float("tau", tau, 0.0)
    _validate.choice("mode", mode, MODES)
    device = grads_clean[0].device if count else None
    for i in range(count):
        named = [("grads_clean", grads_clean[i]), ("grads_destr", grads_destr[i]), ("curvature", curvature[i])]
        if probe is not None:
            named.append(("probe", probe[i]))
        _validate.parameter_tensors(i, named, device)
        for name, tensor in named[:2]:
            if tensor.dtype not in _validate.GRAD_DTYPES:
                raise TypeError(f"{name}[{i}]: expected float32, bfloat16 or float16, got {tensor.dtype}")
        if grads_destr[i].dtype != grads_clean[i].dtype:
            raise TypeError(f"grads_destr[{i}]: expected {grads_clean[i].dtype} like grads_clean[{i}], got {grads_destr[i].dtype}")
        for name, tensor in named[2:]:
            if tensor.dtype != torch.float32:
                raise TypeError(f"{name}[{i}]: expected float32, got {tensor.dtype}")
    return grads_clean, grads_destr, curvature, probe, beta, tau


def curvature_mask_(grads_clean, grads_destr, curvature, probe=None, *, beta=0.99, tau, mode="hard", backend="auto"):
    """Masks the destructive gradients into the clean ones, in place.

    Args:
        grads_clean: g_c per parameter (float32/bfloat16/float16); receives g_c + M * g_d.
        grads_destr: g_d per parameter, same shapes and dtypes.
        curvature: D per parameter (float32), updated in place when ``probe`` is given.
        probe: Hutchinson estimates u * (H u) per parameter (float32), or None.
        beta: EMA factor of D, in [0, 1).
        tau: the curvature threshold (>= 0): |D| <= tau counts as flat.
        mode: ``"hard"`` (M = 0 where blocked) or ``"soft"`` (M = tau / |D|).
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"cuda"`` or ``"triton"``.

    Returns:
        :class:`MaskStats` of the pass. Every argument is checked before any
        tensor is written; bad input raises ``TypeError``/``ValueError`` naming it.
    """
    grads_clean, grads_destr, curvature, probe, beta, tau = _validate_args(
        grads_clean, grads_destr, curvature, probe, beta, tau, mode)
    if not grads_clean:
        _backends.resolve(backend, "cpu")
        zeros = torch.zeros(3, dtype=torch.float64)
        return _stats(zeros, torch.zeros(HIST_BINS, dtype=torch.int64), 0)
    impl = _backends.resolve(backend, grads_clean[0].device, "curvature_mask")
    soft = mode == "soft"
    if impl == "torch":
        stats, hist = curvature_mask_reference(grads_clean, grads_destr, curvature, probe, beta, tau, soft)
    elif impl == "triton":
        stats, hist = curvature_mask_triton(grads_clean, grads_destr, curvature, probe, beta, tau, soft)
    else:
        stats, hist = torch.ops.modalimmune.curvature_mask(grads_clean, grads_destr, curvature, probe, beta, tau, soft)
    return _stats(stats, hist, sum(g.numel() for g in grads_clean))


def _stats(stats, hist, numel):
    return MaskStats(
        masked_fraction=stats[0] / max(numel, 1),
        destr_norm=stats[1].sqrt(),
        kept_norm=stats[2].sqrt(),
        log_abs_hist=hist,
    )


def _fake(grads_clean, grads_destr, curvature, probe, beta, tau, soft):
    device = grads_clean[0].device
    return (torch.empty(3, dtype=torch.float64, device=device),
            torch.empty(HIST_BINS, dtype=torch.int64, device=device))


_SCHEMA = ("(Tensor(a!)[] grads_clean, Tensor[] grads_destr, Tensor(b!)[] curvature, Tensor[]? probe, "
           "float beta, float tau, bool soft) -> (Tensor, Tensor)")  # as csrc/registration.cpp


@torch.library.custom_op("modalimmune::curvature_mask_triton", mutates_args=("grads_clean", "curvature"), schema=_SCHEMA)
def curvature_mask_triton(grads_clean, grads_destr, curvature, probe, beta, tau, soft):
    """The Triton backend as a custom op (kernels/curvature_mask.py)."""
    from ..kernels import curvature_mask as kernel

    return kernel.curvature_mask(grads_clean, grads_destr, curvature, probe, beta, tau, soft)


curvature_mask_triton.register_fake(_fake)


_extension.register_fake("curvature_mask", _fake)
