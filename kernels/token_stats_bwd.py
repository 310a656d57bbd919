"""Backward of the token primitive, softmax part, fully fused: the gradient-filtering path.

One program per (row block, vocabulary tile) recomputes its logits tile, turns it into the
gradient tile `coef_p * softmax(z)` in fp32 on chip, and accumulates `dH += dZ @ W_tile` and
`dW_tile += dZ.T @ H` with fp32 atomics (as Cut Cross-Entropy does). Nothing of size N x V is
stored, and with FILTER (Cut Cross-Entropy's gradient filtering) tiles of negligible softmax skip
both GEMMs. The exact default backward is `softmax_grad.py` plus two dense GEMMs; this kernel is
used when TPO_FAST_GRAD_FILTER_EPS > 0 (or TPO_FAST_BACKWARD=atomic). The one-hot part of the
gradient is rank-1 per row and handled by `indexed_dot.py`, and so is each row's target entry: the program
whose tile holds it stores its fp32 value `coef * p_y` to TGT and leaves it out of the tile's GEMMs, so that the
launcher adds it to the one-hot coefficient before any rounding. Rounded to 16 bits on its own and added to the
one-hot term's `-W[y]` after the GEMM, `p_y - 1` would cancel: a confident row (p_y near 1) would keep the
rounding error of its whole softmax term (bf16: 20% of the hidden gradient). The filter decides on the other entries.
"""

import triton
import triton.language as tl

from tpo_fast.kernels._cast import round_to
from tpo_fast.kernels._dot import mma


@triton.jit
def token_stats_bwd_kernel(
    H, W, B, LSE, COEF, Y,  # inputs: [N, D], [V, D], [V], [N] fp32, [N] fp32, [N] int64 targets
    GH, GW, GB,  # fp32 outputs, accumulated atomically: [N, D], [V, D], [V]
    TGT,  # fp32 output [N]: coef * softmax(z)[y], the target entry this kernel leaves out
    N, V, D,
    FILTER_EPS,  # fp32; used only with FILTER
    HAS_BIAS: tl.constexpr,
    NEED_H: tl.constexpr,
    NEED_W: tl.constexpr,
    NEED_B: tl.constexpr,
    FILTER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    vcols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = vcols < V
    vcols64 = vcols.to(tl.int64)

    # 1. recompute the logits tile
    logits = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_mask = cols < D
        h = tl.load(H + rows64[:, None] * D + cols[None, :], mask=row_mask[:, None] & c_mask[None, :], other=0.0)
        w = tl.load(W + vcols64[:, None] * D + cols[None, :], mask=v_mask[:, None] & c_mask[None, :], other=0.0)
        logits = mma(h, tl.trans(w), logits, DOT_PRECISION, INTERPRET)
    if HAS_BIAS:
        logits += tl.load(B + vcols, mask=v_mask, other=0.0).to(tl.float32)[None, :]

    # 2. gradient tile in fp32: coef_p * softmax; rows and columns outside the problem give 0
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    coef = tl.load(COEF + rows, mask=row_mask, other=0.0)
    valid = row_mask[:, None] & v_mask[None, :]
    dz = tl.where(valid, tl.exp(logits - lse[:, None]) * coef[:, None], 0.0)  # [BLOCK_N, BLOCK_V]
    y = tl.load(Y + rows, mask=row_mask, other=-1).to(tl.int32)  # ids < V < 2**31
    is_y = vcols[None, :] == y[:, None]
    v0 = pid_v * BLOCK_V
    tl.store(TGT + rows, tl.sum(tl.where(is_y, dz, 0.0), axis=1), mask=row_mask & (y >= v0) & (y < v0 + BLOCK_V))
    dz = tl.where(is_y, 0.0, dz)
    if NEED_B:
        tl.atomic_add(GB + vcols, tl.sum(dz, axis=0), mask=v_mask)
    dz_in = round_to(dz, W.dtype.element_ty, INTERPRET)

    # 3. accumulate dH and dW over hidden-dimension chunks. Gradient filtering (opt-in, inexact):
    #    a tile whose every entry is below FILTER_EPS in magnitude skips both GEMMs and their atomics.
    d_end = D
    if FILTER:
        d_end = tl.where(tl.max(tl.max(tl.abs(dz), axis=1), axis=0) < FILTER_EPS, 0, D)
    for d0 in range(0, d_end, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_mask = cols < D
        if NEED_H:
            w = tl.load(W + vcols64[:, None] * D + cols[None, :], mask=v_mask[:, None] & c_mask[None, :], other=0.0)
            gh = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            gh = mma(dz_in, w, gh, DOT_PRECISION, INTERPRET)  # [BLOCK_N, BLOCK_D]
            tl.atomic_add(GH + rows64[:, None] * D + cols[None, :], gh, mask=row_mask[:, None] & c_mask[None, :])
        if NEED_W:
            h = tl.load(H + rows64[:, None] * D + cols[None, :], mask=row_mask[:, None] & c_mask[None, :], other=0.0)
            gw = tl.zeros([BLOCK_V, BLOCK_D], dtype=tl.float32)
            gw = mma(tl.trans(dz_in), h, gw, DOT_PRECISION, INTERPRET)  # [BLOCK_V, BLOCK_D]
            tl.atomic_add(GW + vcols64[:, None] * D + cols[None, :], gw, mask=v_mask[:, None] & c_mask[None, :])
