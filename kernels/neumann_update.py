"""Triton kernel of the fused Neumann update (docs/hypergrad.md).

Multi-tensor: one launch per vector dtype covers every parameter, through the
pointer table of kernels/_multi_tensor.py (lists v, p, w), cached so that a
loop over the same tensors (and a CUDA graph capturing it) issues no
host-to-device copy after the first call.
"""

import torch
import triton
import triton.language as tl

from ..ops.constants import CHUNK
from ._multi_tensor import address, cached, chunk_bounds, groups_by_dtype, pointer_table

BLOCK = 4096
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _neumann_update_kernel(
    table_ptr, num_tensors, partial_ptr, alpha_ptr, damping_ptr,
    DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t, start, length = chunk_bounds(table_ptr, num_tensors, 3, CHUNK)
    v_ptr = address(table_ptr, t, 0, 3, DTYPE)
    p_ptr = address(table_ptr, t, 1, 3, DTYPE)
    w_ptr = address(table_ptr, t, 2, 3, DTYPE)
    alpha = tl.load(alpha_ptr).to(DTYPE)
    delta = tl.load(damping_ptr).to(DTYPE)

    sq = tl.zeros([BLOCK], DTYPE)
    dot = tl.zeros([BLOCK], DTYPE)
    for offset in range(0, length, BLOCK):
        idx = start + offset + tl.arange(0, BLOCK)
        valid = idx < start + length
        v = tl.load(v_ptr + idx, mask=valid, other=0.0)
        p = tl.load(p_ptr + idx, mask=valid, other=0.0)
        u = tl.load(w_ptr + idx, mask=valid, other=0.0) + delta * v
        dot += v * u
        v = v - alpha * u
        tl.store(v_ptr + idx, v, mask=valid)
        tl.store(p_ptr + idx, p + v, mask=valid)
        sq += v * v
    tl.store(partial_ptr + 2 * pid, tl.sum(sq))
    tl.store(partial_ptr + 2 * pid + 1, tl.sum(dot))


def _device_scalar(value, device):
    """``value`` as a float64 0-dim tensor on ``device`` (Triton float arguments are float32)."""
    return cached(("scalar", device, value), lambda: torch.tensor(value, dtype=torch.float64, device=device))


def neumann_update(v, p, w, alpha, damping):
    """Runs the kernel in place; returns float64[2] = (||v_new||^2, <v_old, w + damping v_old>)."""
    device = v[0].device
    stats = torch.zeros(2, dtype=torch.float64, device=device)
    for dtype, members in groups_by_dtype(v).items():
        table, programs = pointer_table([v, p, w], members)
        if programs == 0:
            continue
        partial = torch.empty(programs, 2, dtype=dtype, device=device)
        _neumann_update_kernel[(programs,)](
            table, len(members), partial, alpha, _device_scalar(damping, device),
            DTYPE=_TL_DTYPES[dtype], CHUNK=CHUNK, BLOCK=BLOCK, num_warps=8,
        )
        stats += partial.sum(0, dtype=torch.float64)
    return stats


def aot_specs():
    """(kernel, signature, constexprs, options) of every specialisation, for compiling ahead of
    time for GPU targets without a GPU (tests/test_triton_aot.py)."""
    specs = []
    for dtype, name in ((tl.float32, "fp32"), (tl.float64, "fp64")):
        signature = {"table_ptr": "*i64", "num_tensors": "i32", "partial_ptr": f"*{name}",
                     "alpha_ptr": "*fp64", "damping_ptr": "*fp64"}
        specs.append((_neumann_update_kernel, signature, {"DTYPE": dtype, "CHUNK": CHUNK, "BLOCK": BLOCK},
                      {"num_warps": 8}))
    return specs
