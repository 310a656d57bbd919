"""Forward of the token primitive: one sweep over vocabulary tiles per block of rows.

Per row it produces the logsumexp of `z = h @ W.T (+ b)` (online max / sum-exp, fp32), the raw
target logit `h . W[y] (+ b[y])`, optionally the corrupted-branch target logit `h~ . W[y]` from the
same loaded `W[y]` rows, and optionally the argmax. Only (N,) statistics are written.
"""

import triton
import triton.language as tl

from tpo_fast.kernels._dot import mma


@triton.jit
def token_stats_fwd_kernel(
    H, W, B, HC, Y,  # inputs: [N, D], [V, D], [V], [N, D], [N]
    LSE, Z, ZC, ARGMAX,  # outputs: [N] fp32, [N] fp32, [N] fp32, [N] int64
    N, V, D,
    HAS_BIAS: tl.constexpr,
    HAS_CORRUPTED: tl.constexpr,
    WANT_ARGMAX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    y = tl.load(Y + rows, mask=row_mask, other=0).to(tl.int64)

    # 1. gathered target logits; the W[y] rows serve the clean and the corrupted branch alike
    z = tl.zeros([BLOCK_N], dtype=tl.float32)
    zc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m2 = row_mask[:, None] & (cols < D)[None, :]
        w_y = tl.load(W + y[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
        h = tl.load(H + rows64[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        z += tl.sum(h * w_y, axis=1)
        if HAS_CORRUPTED:
            hc = tl.load(HC + rows64[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            zc += tl.sum(hc * w_y, axis=1)
    if HAS_BIAS:
        b_y = tl.load(B + y, mask=row_mask, other=0.0).to(tl.float32)
        z += b_y
        zc += b_y

    # 2. online logsumexp (and argmax) over vocabulary tiles, fp32 throughout
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int64)
    for v0 in range(0, V, BLOCK_V):
        vcols = v0 + tl.arange(0, BLOCK_V)  # [BLOCK_V]
        v_mask = vcols < V
        vcols64 = vcols.to(tl.int64)
        logits = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            c_mask = cols < D
            h = tl.load(H + rows64[:, None] * D + cols[None, :], mask=row_mask[:, None] & c_mask[None, :], other=0.0)
            w = tl.load(W + vcols64[:, None] * D + cols[None, :], mask=v_mask[:, None] & c_mask[None, :], other=0.0)
            logits = mma(h, tl.trans(w), logits, DOT_PRECISION, INTERPRET)  # [BLOCK_N, BLOCK_V]
        if HAS_BIAS:
            logits += tl.load(B + vcols, mask=v_mask, other=0.0).to(tl.float32)[None, :]
        logits = tl.where(v_mask[None, :], logits, float("-inf"))
        tile_max = tl.max(logits, axis=1)
        m_new = tl.maximum(m, tile_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
        if WANT_ARGMAX:
            # strictly greater keeps the first maximal index, as torch.argmax does
            tile_arg = tl.argmax(logits, axis=1).to(tl.int64) + v0
            better = tile_max > best
            best_idx = tl.where(better, tile_arg, best_idx)
            best = tl.where(better, tile_max, best)

    # 3. epilogue: only (N,) statistics leave the chip
    tl.store(LSE + rows, m + tl.log(s), mask=row_mask)
    tl.store(Z + rows, z, mask=row_mask)
    if HAS_CORRUPTED:
        tl.store(ZC + rows, zc, mask=row_mask)
    if WANT_ARGMAX:
        tl.store(ARGMAX + rows, best_idx, mask=row_mask)
