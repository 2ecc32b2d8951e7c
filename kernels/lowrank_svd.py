"""Triton kernels of the batched low-rank SVD (docs/ops/lowrank_svd.md).

The tall-skinny products of the subspace iteration, each fused with the Gram
matrix of its result: a program owns one block of rows of the output, so it
holds a finished block Y_b and adds Y_b^T Y_b to a per-block partial Gram
matrix (summed afterwards in a fixed order: the result is deterministic).
In A^T (A Z) only the outer product's Gram matrix is used: the inner product is
compiled without it (WITH_GRAM=False).

One kernel serves Y = A Z (programs over row blocks of A) and W = A^T X
(programs over column blocks of A, read through swapped strides).

The sketch width q is padded to a power of two >= 16 inside the kernels
(masked loads), and fp32 products use IEEE precision (no TF32).
"""

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 64
BLOCK_INNER = 64


@triton.jit
def _product_gram_kernel(m_ptr, x_ptr, y_ptr, g_ptr, rows, inner, q, stride_row, stride_inner, stride_batch,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, QP: tl.constexpr, WITH_GRAM: tl.constexpr):
    """Y = M X for M = A (rows over n) or M = A^T (rows over d, through strides); one row block per program.
    With WITH_GRAM, also the block's partial Gram matrix Y_b^T Y_b."""
    b = tl.program_id(0)
    blk = tl.program_id(1)
    r = blk * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, QP)
    m_base = m_ptr + b.to(tl.int64) * stride_batch
    x_base = x_ptr + b.to(tl.int64) * inner * q
    acc = tl.zeros([BLOCK_R, QP], dtype=tl.float32 if m_ptr.dtype.element_ty != tl.float64 else tl.float64)
    for k0 in range(0, inner, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        m = tl.load(m_base + r[:, None] * stride_row + kk[None, :] * stride_inner,
                    mask=(r[:, None] < rows) & (kk[None, :] < inner), other=0.0)
        x = tl.load(x_base + kk[:, None] * q + cols[None, :], mask=(kk[:, None] < inner) & (cols[None, :] < q),
                    other=0.0)
        acc += tl.dot(m, x, input_precision="ieee")
    tl.store(y_ptr + b.to(tl.int64) * rows * q + r[:, None] * q + cols[None, :], acc,
             mask=(r[:, None] < rows) & (cols[None, :] < q))
    if WITH_GRAM:
        gram = tl.dot(tl.trans(acc), acc, input_precision="ieee")
        g_base = g_ptr + (b * tl.num_programs(1) + blk).to(tl.int64) * QP * QP
        tl.store(g_base + cols[:, None] * QP + cols[None, :], gram)


def _product_gram(A, X, transpose, with_gram=True):
    """(M X, (M X)^T (M X)) with M = A^T when ``transpose`` else A; the Gram matrix is None
    without ``with_gram``."""
    b, n, d = A.shape
    rows, inner, stride_row, stride_inner = (d, n, 1, d) if transpose else (n, d, d, 1)
    q = X.shape[-1]
    qp = max(16, triton.next_power_of_2(q))
    blocks = triton.cdiv(rows, BLOCK_ROWS)
    out = torch.empty(b, rows, q, dtype=A.dtype, device=A.device)
    partial = torch.empty(b, blocks, qp, qp, dtype=A.dtype, device=A.device) if with_gram else out
    _product_gram_kernel[(b, blocks)](A, X, out, partial, rows, inner, q, stride_row, stride_inner, n * d,
                                      BLOCK_ROWS, BLOCK_INNER, qp, with_gram)
    return out, (partial.sum(1)[:, :q, :q] if with_gram else None)


def products(A, Z, mode):
    """(Y, Y^T Y) for mode 0: Y = A Z, 1: Y = A^T Z, 2: Y = A^T (A Z); (b, ., .) inputs."""
    A, Z = A.contiguous(), Z.contiguous()
    if mode == 0:
        return _product_gram(A, Z, transpose=False)
    if mode == 2:  # only the outer product's Gram matrix is used
        Z, _ = _product_gram(A, Z, transpose=False, with_gram=False)
    return _product_gram(A, Z, transpose=True)


def aot_specs():
    """(kernel, signature, constexprs, options) of the specialisations to compile ahead of
    time for GPU targets without a GPU (tests/test_triton_aot.py)."""
    specs = []
    for dtype, widths in (("fp32", (16, 32, 64)), ("fp64", (16,))):
        pointer = f"*{dtype}"
        signature = {"m_ptr": pointer, "x_ptr": pointer, "y_ptr": pointer, "g_ptr": pointer, "rows": "i32",
                     "inner": "i32", "q": "i32", "stride_row": "i32", "stride_inner": "i32", "stride_batch": "i32"}
        for qp in widths:
            for with_gram in (False, True):
                constexprs = {"BLOCK_R": BLOCK_ROWS, "BLOCK_K": BLOCK_INNER, "QP": qp, "WITH_GRAM": with_gram}
                specs.append((_product_gram_kernel, signature, constexprs, {"num_warps": 4}))
    return specs
