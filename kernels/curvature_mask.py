"""Triton kernel of the fused curvature mask (docs/ops/curvature_mask.md).

Multi-tensor: one launch per gradient dtype covers every parameter, through
the pointer table of kernels/_multi_tensor.py (lists g_c, g_d, D, probe).
"""

import torch
import triton
import triton.language as tl

from ..ops.constants import CHUNK, HIST_BINS, HIST_OFFSET, HIST_SHIFT
from ._multi_tensor import address, chunk_bounds, groups_by_dtype, pointer_table

BLOCK = 4096

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _curvature_mask_kernel(
    table_ptr, num_tensors, partial_ptr, hist_ptr, beta, one_minus_beta, tau,
    GRAD_DTYPE: tl.constexpr, HAS_PROBE: tl.constexpr, SOFT: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, HIST_BINS: tl.constexpr, HIST_SHIFT: tl.constexpr,
    HIST_OFFSET: tl.constexpr,
):
    pid = tl.program_id(0)
    t, start, length = chunk_bounds(table_ptr, num_tensors, 4, CHUNK)
    gc_ptr = address(table_ptr, t, 0, 4, GRAD_DTYPE)
    gd_ptr = address(table_ptr, t, 1, 4, GRAD_DTYPE)
    d_ptr = address(table_ptr, t, 2, 4, tl.float32)
    probe_ptr = address(table_ptr, t, 3, 4, tl.float32)

    masked = tl.zeros([BLOCK], tl.float32)
    destr_sq = tl.zeros([BLOCK], tl.float32)
    kept_sq = tl.zeros([BLOCK], tl.float32)
    hist = tl.zeros([HIST_BINS], tl.int32)
    for offset in range(0, length, BLOCK):
        idx = start + offset + tl.arange(0, BLOCK)
        valid = idx < start + length
        gc = tl.load(gc_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        gd = tl.load(gd_ptr + idx, mask=valid, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + idx, mask=valid, other=0.0)
        if HAS_PROBE:
            probe = tl.load(probe_ptr + idx, mask=valid, other=0.0)
            d = beta * d + one_minus_beta * probe
            tl.store(d_ptr + idx, d, mask=valid)
        abs_d = tl.abs(d)
        # agree or flat (a zero counts as agreement), decided on signs
        agree = (gc == 0.0) | (gd == 0.0) | ((gc > 0.0) == (gd > 0.0))
        keep = agree | (abs_d <= tau)
        if SOFT:
            m = tl.where(keep, 1.0, tau / tl.where(keep, 1.0, abs_d))  # |D| > tau >= 0 where blocked
        else:
            m = tl.where(keep, 1.0, 0.0)
        kept = m * gd
        tl.store(gc_ptr + idx, (gc + kept).to(GRAD_DTYPE), mask=valid)
        masked += tl.where(valid & (m < 1.0), 1.0, 0.0)
        destr_sq += gd * gd
        kept_sq += kept * kept
        bins = (abs_d.to(tl.int32, bitcast=True) >> HIST_SHIFT) - HIST_OFFSET
        bins = tl.minimum(tl.maximum(bins, 0), HIST_BINS - 1)
        hist += tl.histogram(tl.where(valid, bins, 0), HIST_BINS)
    # the padding lanes of the last block were binned to 0: take them back out
    padding = tl.cdiv(length, BLOCK) * BLOCK - length
    hist -= tl.where(tl.arange(0, HIST_BINS) == 0, padding, 0)
    tl.store(partial_ptr + 3 * pid, tl.sum(masked))
    tl.store(partial_ptr + 3 * pid + 1, tl.sum(destr_sq))
    tl.store(partial_ptr + 3 * pid + 2, tl.sum(kept_sq))
    tl.atomic_add(hist_ptr + tl.arange(0, HIST_BINS), hist.to(tl.int64))


def curvature_mask(grads_clean, grads_destr, curvature, probe, beta, tau, soft):
    """Runs the kernel in place; returns (stats float64[3], hist int64[256])."""
    device = grads_clean[0].device
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    hist = torch.zeros(HIST_BINS, dtype=torch.int64, device=device)
    lists = [grads_clean, grads_destr, curvature, probe if probe is not None else curvature]
    for dtype, members in groups_by_dtype(grads_clean).items():
        table, programs = pointer_table(lists, members)
        if programs == 0:
            continue
        partial = torch.empty(programs, 3, dtype=torch.float32, device=device)
        _curvature_mask_kernel[(programs,)](
            table, len(members), partial, hist, beta, 1.0 - beta, tau,
            GRAD_DTYPE=_TL_DTYPES[dtype], HAS_PROBE=probe is not None, SOFT=soft,
            CHUNK=CHUNK, BLOCK=BLOCK, HIST_BINS=HIST_BINS, HIST_SHIFT=HIST_SHIFT, HIST_OFFSET=HIST_OFFSET,
            num_warps=8,
        )
        stats += partial.sum(0, dtype=torch.float64)
    return stats, hist


def aot_specs():
    """(kernel, signature, constexprs) of every specialisation, for compiling ahead of time
    for GPU targets without a GPU (tests/test_triton_aot.py)."""
    signature = {"table_ptr": "*i64", "num_tensors": "i32", "partial_ptr": "*fp32", "hist_ptr": "*i64",
                 "beta": "fp32", "one_minus_beta": "fp32", "tau": "fp32"}
    fixed = {"CHUNK": CHUNK, "BLOCK": BLOCK, "HIST_BINS": HIST_BINS, "HIST_SHIFT": HIST_SHIFT,
             "HIST_OFFSET": HIST_OFFSET}
    return [
        (_curvature_mask_kernel, signature,
         {"GRAD_DTYPE": dtype, "HAS_PROBE": probe, "SOFT": soft, **fixed}, {"num_warps": 8})
        for dtype in _TL_DTYPES.values() for probe in (False, True) for soft in (False, True)
    ]
