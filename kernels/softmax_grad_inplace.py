"""The fused-gradient losses' logit gradient, written over the stored logits of one row chunk.

`dZ = coef_p * exp(z - lse) + coef_y * onehot(y) [+ coef_y2 * onehot(y2)]`, formed in fp32 and rounded
once into the gradient dtype. One program owns a block of whole rows and sweeps the vocabulary in
increasing order, so the gradient can share the logits' storage even when it is narrower: a 16-bit
gradient row `r` is written at element offsets `[0, V)` of the bytes of fp32 row `r`, i.e. over fp32
columns `[0, V/2)`: tile `[v0, v0 + BV)` writes fp32 columns below `(v0 + BV) / 2 <= v0 + BV`, which
this program has read by then (a barrier between each tile's load and store covers the threads), and no
later tile reads below `v0 + BV`. One read and one write of the buffer, no second N x V allocation.
"""

import triton
import triton.language as tl

from tpo_fast.kernels._cast import round_to


@triton.jit
def softmax_grad_inplace_kernel(
    Z, DZ,  # [R, V] fp32 logits (row stride stride_z); DZ: the same storage in the gradient dtype (stride_dz)
    LSE, COEF_P, Y, COEF_Y, Y2, COEF_Y2,  # [R] fp32, fp32, int64, fp32, int64 (-1: none), fp32
    R, V, stride_z, stride_dz,
    HAS_Y2: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    INTERPRET: tl.constexpr = False,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < R
    rows64 = rows.to(tl.int64)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    coef_p = tl.load(COEF_P + rows, mask=row_mask, other=0.0)
    y = tl.load(Y + rows, mask=row_mask, other=-1)
    coef_y = tl.load(COEF_Y + rows, mask=row_mask, other=0.0)
    if HAS_Y2:
        y2 = tl.load(Y2 + rows, mask=row_mask, other=-1)
        coef_y2 = tl.load(COEF_Y2 + rows, mask=row_mask, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols < V)[None, :]
        # [BLOCK_N, BLOCK_V] fp32 logits
        z = tl.load(Z + rows64[:, None] * stride_z + cols[None, :], mask=mask, other=float("-inf"))
        # every thread has read this tile (and so all earlier ones) before any thread overwrites it
        tl.debug_barrier()
        dz = tl.exp(z - lse[:, None]) * coef_p[:, None]
        dz += tl.where(cols[None, :] == y[:, None], coef_y[:, None], 0.0)
        if HAS_Y2:
            dz += tl.where(cols[None, :] == y2[:, None], coef_y2[:, None], 0.0)
        dz = round_to(dz, DZ.dtype.element_ty, INTERPRET)
        tl.store(DZ + rows64[:, None] * stride_dz + cols[None, :], dz, mask=mask)
