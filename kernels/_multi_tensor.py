"""Multi-tensor launches for Triton: a packed pointer table per tensor list.

Layout of the int64 table for T tensors, K lists and C chunks:
``[address of list k, tensor t at t*K + k] [numel of tensor t at T*K + t]
[(tensor, first element) of chunk c at T*(K+1) + 2c]``. One program handles one
chunk; it reads its addresses from the table and casts them to typed pointers.
Tables are cached by the addresses and lengths they hold (their whole content),
so repeated calls on the same tensors, and CUDA graphs capturing them, issue no
host-to-device copy after the first call.
"""

import torch
import triton
import triton.language as tl

from ..ops.constants import CHUNK

_CACHE_SIZE = 16
_cache = {}


def cached(key, make):
    """``make()`` memoised under ``key`` (a few entries, oldest evicted first)."""
    if key not in _cache:
        if len(_cache) >= _CACHE_SIZE:
            _cache.pop(next(iter(_cache)))
        _cache[key] = make()
    return _cache[key]


def groups_by_dtype(tensors):
    """Indices of ``tensors`` grouped by dtype (one launch per group)."""
    groups = {}
    for t, tensor in enumerate(tensors):
        groups.setdefault(tensor.dtype, []).append(t)
    return groups


def pointer_table(lists, members):
    """(table on the tensors' device, number of chunks) for tensors ``members`` of each list."""
    rows = [[tensors[t] for tensors in lists] for t in members]
    key = (rows[0][0].device, tuple((tuple(x.data_ptr() for x in row), row[0].numel()) for row in rows))

    def make():
        addresses = [x.data_ptr() for row in rows for x in row]
        numel = [row[0].numel() for row in rows]
        chunks = [v for t, n in enumerate(numel) for start in range(0, n, CHUNK) for v in (t, start)]
        table = torch.tensor(addresses + numel + chunks, dtype=torch.int64)
        return table.to(rows[0][0].device, non_blocking=True), len(chunks) // 2

    return cached(key, make)


@triton.jit
def chunk_bounds(table_ptr, num_tensors, DEPTH: tl.constexpr, CHUNK: tl.constexpr):
    """(tensor index, first element, element count) of this program's chunk."""
    pid = tl.program_id(0)
    chunk = table_ptr + (DEPTH + 1) * num_tensors + 2 * pid
    t = tl.load(chunk)
    start = tl.load(chunk + 1)
    n = tl.load(table_ptr + DEPTH * num_tensors + t)
    return t, start, tl.minimum(n - start, CHUNK)


@triton.jit
def address(table_ptr, t, k, DEPTH: tl.constexpr, DTYPE: tl.constexpr):
    """Typed pointer to tensor ``t`` of list ``k``."""
    return tl.load(table_ptr + DEPTH * t + k).to(tl.pointer_type(DTYPE))
