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

from .. import backend as _backends
from .. import checks
from . import _library
from .constants import HIST_BINS, HIST_MANTISSA_BITS, HIST_MIN_EXP, HIST_OFFSET, HIST_SHIFT

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
    per_octave = 1 << HIST_MANTISSA_BITS
    b = torch.arange(1, HIST_BINS, dtype=torch.float64)
    octave = torch.div(b, per_octave, rounding_mode="floor")
    inner = torch.exp2(HIST_MIN_EXP + octave) * (1 + (b % per_octave) / per_octave)
    inf = torch.tensor([float("inf")], dtype=torch.float64)
    return torch.cat([torch.zeros(1, dtype=torch.float64), inner, inf])


def quantile_from_hist(hist, q):
    """The upper edge of the bin where the cumulative share of counts reaches
    ``q``: at least a fraction ``q`` of the |D| values are <= the result."""
    q = checks.number("q", q, 0.0, 1.0)
    counts = hist.detach().double().cpu().cumsum(0)
    total = counts[-1].item()
    if total == 0:
        return 0.0
    b = int(torch.searchsorted(counts, q * total).item())
    return float(hist_edges()[min(b, HIST_BINS - 1) + 1])


def hist_bins(d):
    """Bin index of each |d| (read off the float32 bits, as every kernel does)."""
    bits = d.detach().float().abs().contiguous().view(torch.int32)
    return ((bits >> HIST_SHIFT) - HIST_OFFSET).clamp_(0, HIST_BINS - 1)


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
    grads_clean = checks.tensor_list("grads_clean", grads_clean)
    count = len(grads_clean)
    grads_destr = checks.tensor_list("grads_destr", grads_destr, count)
    curvature = checks.tensor_list("curvature", curvature, count)
    if probe is not None:
        probe = checks.tensor_list("probe", probe, count)
    beta = checks.number("beta", beta, 0.0, 1.0, high_open=True)
    tau = checks.number("tau", tau, 0.0)
    checks.choice("mode", mode, MODES)
    device = grads_clean[0].device if count else None
    for i in range(count):
        named = [("grads_clean", grads_clean[i]), ("grads_destr", grads_destr[i]), ("curvature", curvature[i])]
        if probe is not None:
            named.append(("probe", probe[i]))
        checks.parameter_tensors(i, named, device)
        for name, tensor in named[:2]:
            if tensor.dtype not in checks.GRAD_DTYPES:
                raise TypeError(f"{name}[{i}]: expected float32, bfloat16 or float16, got {tensor.dtype}")
        if grads_destr[i].dtype != grads_clean[i].dtype:
            checks.fail(f"grads_destr[{i}]", f"{grads_clean[i].dtype} like grads_clean[{i}]", grads_destr[i].dtype,
                        TypeError)
        for name, tensor in named[2:]:
            if tensor.dtype != torch.float32:
                raise TypeError(f"{name}[{i}]: expected float32, got {tensor.dtype}")
    _library.check_writable("grads_clean", grads_clean, "curvature_mask_")
    _library.check_writable("curvature", curvature, "curvature_mask_")
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
        As with an in-place PyTorch op, a written tensor may not require grad
        (``RuntimeError``, in grad mode), and each one's version counter goes up.
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
    else:
        op = triton_op if impl == "triton" else compiled_op
        stats, hist = op(grads_clean, grads_destr, curvature, probe, beta, tau, soft)
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


def _triton_kernel(grads_clean, grads_destr, curvature, probe, beta, tau, soft):
    from ..kernels import curvature_mask as kernel

    return kernel.curvature_mask(grads_clean, grads_destr, curvature, probe, beta, tau, soft)


# stats = float64[3] (masked count, sum g_d^2, sum (M g_d)^2), hist = int64[HIST_BINS]
SCHEMA = ("(Tensor(a!)[] grads_clean, Tensor[] grads_destr, Tensor(b!)[] curvature, Tensor[]? probe, "
          "float beta, float tau, bool soft) -> (Tensor stats, Tensor hist)")
compiled_op = _library.define("curvature_mask", SCHEMA, _fake)  # csrc/cpu/, csrc/cuda/curvature_mask.*
triton_op = _library.define("curvature_mask_triton", SCHEMA, _fake, kernel=_triton_kernel)  # kernels/
