"""The fused-gradient losses' logit gradient, written in place over the forward's stored exponentials.

The forward (`token_lse_partial_kernel` with STORE_EXP) leaves, for each row and vocabulary tile s of width
TILE_V, `P = exp(z - shift_s)` in the buffer's dtype and the tile max `m_s` (`shift_s` is `m_s`, or 0 where the
tile is all -inf). Then `softmax(z) = P * exp(shift_s - lse)`, and

    dZ = coef_p * P * exp(shift_s - lse) + coef_y * onehot(y) [+ coef_y2 * onehot(y2)]

formed in fp32 and rounded once into the buffer's dtype, over the same entries it read (one read, one write,
no second R x V allocation). `exp(shift_s - lse)` is at most 1 (the tile max is at most the logsumexp), so an
entry of P too small for its dtype stands for a softmax entry smaller still. Where `shift_s == lse == +inf` (a
+inf logit in the tile) the factor is 1, not NaN, so that only the +inf entry's gradient is NaN (exp(inf - inf)),
as in `exp(z - lse)`.

With SPLIT_TARGET each row's target entry is written as 0, after every term: the launcher forms it in fp32 from
the forward's target logit and adds it as a rank-1 term, with the corrupted rows' `g~ h~` into a 16-bit dW before
one rounding (see `softmax_grad.py`).
"""

import triton
import triton.language as tl

from tpo_fast.kernels._cast import round_to


@triton.jit
def softmax_grad_inplace_kernel(
    P,  # [R, V] (row stride V) exp(z - shift) per tile in; dZ out, same dtype
    M_PART,  # [R, S] fp32 tile maxima (S = cdiv(V, TILE_V))
    LSE, COEF_P, Y, COEF_Y, Y2, COEF_Y2,  # [R] fp32, fp32, int64, fp32, int64 (-1: none), fp32
    R, V, S,
    HAS_Y2: tl.constexpr,
    SPLIT_TARGET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILE_V: tl.constexpr,  # the forward's vocabulary tile: one shift per row and tile
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
    for s in range(0, S):
        cols = s * TILE_V + tl.arange(0, TILE_V)
        mask = row_mask[:, None] & (cols < V)[None, :]
        m = tl.load(M_PART + rows64 * S + s, mask=row_mask, other=0.0)
        shift = tl.where(m == float("-inf"), 0.0, m)
        scale = tl.where(shift == lse, 1.0, tl.exp(shift - lse)) * coef_p
        ptrs = P + rows64[:, None] * V + cols[None, :]
        dz = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * scale[:, None]
        if not SPLIT_TARGET:
            dz += tl.where(cols[None, :] == y[:, None], coef_y[:, None], 0.0)
        if HAS_Y2:
            dz += tl.where(cols[None, :] == y2[:, None], coef_y2[:, None], 0.0)
        if SPLIT_TARGET:  # the launcher adds the whole target entry (a y2 on it too), rank-1
            dz = tl.where(cols[None, :] == y[:, None], 0.0, dz)
        tl.store(ptrs, round_to(dz, P.dtype.element_ty, INTERPRET), mask=mask)
