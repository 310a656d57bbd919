"""`gw[y[i]] += g[i] * x[i]` for a 16-bit `gw`: each touched row gets the fp32 sum of its contributions, rounded once.

The corrupted-image branch's weight gradient is rank-1 per row (`dW[y] += g h~`). Adding the rows one at a
time into a 16-bit tensor would round once per repeat of a token (bf16 drops 1 + 2**-8 back to 1); in
PyTorch the sync-free way to sum first is about twenty kernels over R x D fp32 buffers (sort, slot ids, an
fp32 index_add_, a gather, a cast, an index_put_). Here the rows come sorted by target: program (p, d)
sums the run of equal targets that starts at sorted position p, over one block of columns, in fp32, and
adds it to its weight row once. Programs at a position that does not start a run do nothing.

A run is read BLOCK_R rows per step: its loads are independent of one another, so a frequent token (a run of a
few hundred rows of real text: ".", "the") costs about run / BLOCK_R memory round trips, not one per row, and
its program no longer outlasts the whole rest of the grid.

With HAS_X2 the rows come from two tensors on the same targets (ORDER's entries below N1 index X, the others X2 at
entry - N1): the clean branch's target rows `tgt h` and the corrupted branch's `g~ h~`, which nearly cancel, are
summed in fp32 before the weight row's one rounding.
"""

import triton
import triton.language as tl

from tpo_fast.kernels._cast import round_to


@triton.jit
def scatter_rows_kernel(
    GW, IDS, ORDER,  # [V, D] 16-bit gradient (updated in place), [R] sorted targets, [R] the row of each
    FIRST, STOP,  # [R] each sorted position's run of equal targets, [FIRST, STOP)
    G, X, X2,  # [R] fp32 coefficients, [N1, D] rows (any float dtype), [R - N1, D] rows (HAS_X2)
    N1, D, stride_gw, stride_x, stride_x2,
    HAS_X2: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = offs < D
    starts = tl.load(FIRST + p) == p  # a run of equal targets starts at sorted position p
    stop = tl.where(starts, tl.load(STOP + p), p)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for q0 in range(p, stop, BLOCK_R):
        q = q0 + tl.arange(0, BLOCK_R)
        in_run = q < stop
        r = tl.load(ORDER + q, mask=in_run, other=0)
        g = tl.load(G + r, mask=in_run, other=0.0)
        if HAS_X2:
            in_x = r < N1
            x = tl.load(X + r[:, None] * stride_x + offs[None, :],
                        mask=(in_run & in_x)[:, None] & cols[None, :], other=0.0).to(tl.float32)
            x2 = tl.load(X2 + (r - N1)[:, None] * stride_x2 + offs[None, :],
                         mask=(in_run & ~in_x)[:, None] & cols[None, :], other=0.0).to(tl.float32)
            x = tl.where(in_x[:, None], x, x2)
        else:
            x = tl.load(X + r[:, None] * stride_x + offs[None, :], mask=in_run[:, None] & cols[None, :], other=0.0)
        acc += g[:, None] * x.to(tl.float32)
    total = tl.sum(acc, axis=0)
    write = offs < tl.where(starts, D, 0)  # only the run's first program touches the row
    row = GW + tl.load(IDS + p) * stride_gw + offs
    old = tl.load(row, mask=write, other=0.0).to(tl.float32)
    tl.store(row, round_to(old + total, GW.dtype.element_ty, INTERPRET), mask=write)
