"""Forward of the token primitive, vocabulary part: per-tile logsumexp partials, GEMM-shaped.

One program per (row block, vocabulary tile), like one output tile of `H @ W.T`: it accumulates its
`[BLOCK_N, BLOCK_V]` logits tile over the hidden dimension in fp32 on chip and writes only the
tile's row max, its sum of `exp(z - max)` and (optionally) the first index of the max. `lse_combine_kernel`
combines the `cdiv(V, BLOCK_V)` partials per row into the logsumexp (the launcher the argmax): a few bytes per
row and tile leave the chip, never the logits. With GATHER the raw target logit `z[y]` of each row (and
`z[y2]`) is stored in fp32 by the one program whose tile holds it (the corrupted branch's `h~ . W[y]` is
`indexed_dot.py`'s gather). The fused-gradient losses also ask for STORE_EXP: the tile's `exp(z - shift)` in
their buffer's dtype (what the tile sum is made of, `shift` the tile max: values in [0, 1], so a bf16 buffer
keeps 8 significant bits of every entry), which `softmax_grad_inplace.py` later turns into the gradient in
place. Programs are visited in groups of GROUP_N row blocks so that the `W` tiles a wave of programs reads
stay in L2.
"""

import triton
import triton.language as tl

from tpo_fast.kernels._cast import round_to
from tpo_fast.kernels._dot import mma
from tpo_fast.kernels._grid import grouped_tile


@triton.jit
def _gather_target(logits, Y, ZY, rows, row_mask, vcols, v0, BLOCK_V: tl.constexpr):
    """ZY[r] = logits[r, Y[r]] for the rows whose target lies in this tile [v0, v0 + BLOCK_V)."""
    y = tl.load(Y + rows, mask=row_mask, other=-1).to(tl.int32)  # ids < V < 2**31; half the registers
    z = tl.sum(tl.where(vcols[None, :] == y[:, None], logits, 0.0), axis=1)
    tl.store(ZY + rows, z, mask=row_mask & (y >= v0) & (y < v0 + BLOCK_V))


@triton.jit
def token_lse_partial_kernel(
    H, W, B,  # inputs: [N, D], [V, D], [V]
    H_DESC, W_DESC,  # TMA descriptors of H ([BLOCK_N, BLOCK_D] boxes) and W ([BLOCK_V, BLOCK_D]) when USE_TMA
    M_PART, S_PART, ARG_PART,  # outputs: [N, S] fp32, [N, S] fp32, [N, S] int32 (S = cdiv(V, BLOCK_V))
    N, V, D, S,
    HAS_BIAS: tl.constexpr,
    WANT_ARGMAX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
    P_OUT=None,  # STORE_EXP: [N, V] output (row stride V), exp(z - shift) of each tile in P_OUT's dtype
    Y=None, ZY=None,  # GATHER >= 1: [N] int64 target ids, [N] fp32 output z[y] (a row whose y is in no tile: kept)
    Y2=None, ZY2=None,  # GATHER == 2: the same for second targets (-1: none)
    STORE_EXP: tl.constexpr = False,
    GATHER: tl.constexpr = 0,
):
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), S, GROUP_N)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    vcols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = vcols < V
    vcols64 = vcols.to(tl.int64)

    logits = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        if USE_TMA:  # bulk tensor copies; the copy engine zero-fills rows and columns past the edges
            h = H_DESC.load([pid_n * BLOCK_N, d0])
            w = W_DESC.load([pid_v * BLOCK_V, d0])
        else:
            cols = d0 + tl.arange(0, BLOCK_D)
            c_mask = cols < D
            h = tl.load(H + rows64[:, None] * D + cols[None, :], mask=row_mask[:, None] & c_mask[None, :], other=0.0)
            w = tl.load(W + vcols64[:, None] * D + cols[None, :], mask=v_mask[:, None] & c_mask[None, :], other=0.0)
        logits = mma(h, tl.trans(w), logits, DOT_PRECISION, INTERPRET)  # [BLOCK_N, BLOCK_V]
    if HAS_BIAS:
        logits += tl.load(B + vcols, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    logits = tl.where(v_mask[None, :], logits, float("-inf"))
    # the target logits first: then exp(z - shift) can take the logits' registers (one live tile, not two)
    if GATHER >= 1:
        _gather_target(logits, Y, ZY, rows, row_mask, vcols, pid_v * BLOCK_V, BLOCK_V)
    if GATHER == 2:
        _gather_target(logits, Y2, ZY2, rows, row_mask, vcols, pid_v * BLOCK_V, BLOCK_V)

    tile_max = tl.max(logits, axis=1)
    # a tile whose logits are all -inf (masked vocabulary) contributes a zero sum, not NaN
    shift = tl.where(tile_max == float("-inf"), 0.0, tile_max)
    e = tl.exp(logits - shift[:, None])
    tile_sum = tl.sum(e, axis=1)
    if STORE_EXP:
        p_ptrs = P_OUT + rows64[:, None] * V + vcols64[None, :]
        tl.store(p_ptrs, round_to(e, P_OUT.dtype.element_ty, INTERPRET), mask=row_mask[:, None] & v_mask[None, :])
    out = rows64 * S + pid_v
    tl.store(M_PART + out, tile_max, mask=row_mask)
    tl.store(S_PART + out, tile_sum, mask=row_mask)
    if WANT_ARGMAX:
        # first maximal index within the tile; the launcher keeps the first maximal tile, as torch.argmax
        tl.store(ARG_PART + out, (tl.argmax(logits, axis=1) + pid_v * BLOCK_V).to(tl.int32), mask=row_mask)


@triton.jit
def lse_combine_kernel(
    M_PART, S_PART, LSE,  # [N, S] fp32 tile maxima and sums of exp(z - tile max) (token_lse_partial_kernel's), [N] out
    N, S,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Per row, the logsumexp from its S tile partials: `m + log(sum_s S_s exp(M_s - m))`, m the row's largest
    tile max (shifted by 0 where it is not finite). A +inf max gives +inf, a NaN one NaN, as torch.logsumexp."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    base = rows.to(tl.int64)[:, None] * S
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    nan = tl.zeros([BLOCK_N], dtype=tl.int32)
    for s0 in range(0, S, BLOCK_S):
        cols = s0 + tl.arange(0, BLOCK_S)
        mask = row_mask[:, None] & (cols < S)[None, :]
        mp = tl.load(M_PART + base + cols[None, :], mask=mask, other=float("-inf"))
        m = tl.maximum(m, tl.max(mp, axis=1))
        nan = tl.maximum(nan, tl.max((mp != mp).to(tl.int32), axis=1))  # a max reduction may drop NaN: count it
    shift = tl.where((m == float("inf")) | (m == float("-inf")), 0.0, m)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        cols = s0 + tl.arange(0, BLOCK_S)
        mask = row_mask[:, None] & (cols < S)[None, :]
        mp = tl.load(M_PART + base + cols[None, :], mask=mask, other=float("-inf"))
        sp = tl.load(S_PART + base + cols[None, :], mask=mask, other=0.0)
        total += tl.sum(sp * tl.exp(mp - shift[:, None]), axis=1)
    total = tl.where(row_mask, total, 1.0)  # rows past N: no log(0) (the interpreter's numpy would warn)
    lse = tl.log(total) + shift
    lse = tl.where(m == float("inf"), m, lse)
    lse = tl.where(nan > 0, float("nan"), lse)
    tl.store(LSE + rows, lse, mask=row_mask)
