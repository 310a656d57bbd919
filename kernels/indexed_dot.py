"""Gathered target logits `h . W[y] (+ b[y])` and their rank-1 backward, O(N * D).

This is all a TPO corrupted branch needs, and the one-hot part of the token primitive's backward.
"""

import triton
import triton.language as tl


@triton.jit
def indexed_dot_fwd_kernel(
    H, W, B, Y, Z,  # [N, D], [V, D], [V], [N] -> [N] fp32
    N, D,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    y = tl.load(Y + rows, mask=row_mask, other=0).to(tl.int64)
    z = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m2 = row_mask[:, None] & (cols < D)[None, :]
        w_y = tl.load(W + y[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        h = tl.load(H + rows64[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        z += tl.sum(h * w_y, axis=1)
    if HAS_BIAS:
        z += tl.load(B + y, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(Z + rows, z, mask=row_mask)


@triton.jit
def indexed_dot_bwd_kernel(
    H, HC, W, Y, G, GC,  # [N, D], [N, D], [V, D], [N], [N] fp32, [N] fp32
    GH, GHC, GW, GB,  # fp32 outputs: [N, D], [N, D], [V, D] (atomic), [V] (atomic)
    N, D,
    HAS_SECOND: tl.constexpr,  # a second (hidden, grad) pair on the same targets: the corrupted branch
    ACCUM_H: tl.constexpr,  # add into GH (which already holds the softmax part) instead of overwriting
    NEED_H: tl.constexpr,
    NEED_HC: tl.constexpr,
    NEED_W: tl.constexpr,
    NEED_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    y = tl.load(Y + rows, mask=row_mask, other=0).to(tl.int64)
    g = tl.load(G + rows, mask=row_mask, other=0.0)
    gc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_SECOND:
        gc = tl.load(GC + rows, mask=row_mask, other=0.0)
    if NEED_B:
        tl.atomic_add(GB + y, g + gc, mask=row_mask)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m2 = row_mask[:, None] & (cols < D)[None, :]
        offs = rows64[:, None] * D + cols[None, :]
        w_y = tl.load(W + y[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        if NEED_H:
            gh = g[:, None] * w_y
            if ACCUM_H:
                gh += tl.load(GH + offs, mask=m2, other=0.0)
            tl.store(GH + offs, gh, mask=m2)
        if NEED_HC:
            tl.store(GHC + offs, gc[:, None] * w_y, mask=m2)
        if NEED_W:
            gw = g[:, None] * tl.load(H + offs, mask=m2, other=0.0).to(tl.float32)
            if HAS_SECOND:
                gw += gc[:, None] * tl.load(HC + offs, mask=m2, other=0.0).to(tl.float32)
            tl.atomic_add(GW + y[:, None] * D + cols[None, :], gw, mask=m2)
