"""`gw[y[i]] += g[i] * x[i]` for a 16-bit `gw`: each touched row gets the fp32 sum of its contributions, rounded once.

The corrupted-image branch's weight gradient is rank-1 per row (`dW[y] += g h~`). Adding the rows one at a
time into a 16-bit tensor would round once per repeat of a token (bf16 drops 1 + 2**-8 back to 1); in
PyTorch the sync-free way to sum first is about twenty kernels over R x D fp32 buffers (sort, slot ids, an
fp32 index_add_, a gather, a cast, an index_put_). Here the rows come sorted by target: program (p, d)
sums the run of equal targets that starts at sorted position p, over one block of columns, in fp32, and
adds it to its weight row once. Programs at a position that does not start a run do nothing.
"""

import triton
import triton.language as tl

from tpo_fast.kernels._cast import round_to


@triton.jit
def scatter_rows_kernel(
    GW, IDS, ORDER,  # [V, D] 16-bit gradient (updated in place), [R] sorted targets, [R] the row of each
    FIRST, STOP,  # [R] each sorted position's run of equal targets, [FIRST, STOP)
    G, X,  # [R] fp32 coefficients, [R, D] rows (any float dtype)
    D, stride_gw, stride_x,
    INTERPRET: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = offs < D
    starts = tl.load(FIRST + p) == p  # a run of equal targets starts at sorted position p
    stop = tl.where(starts, tl.load(STOP + p), p)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for q in range(p, stop):
        r = tl.load(ORDER + q)
        x = tl.load(X + r * stride_x + offs, mask=cols, other=0.0).to(tl.float32)
        acc += tl.load(G + r) * x
    write = offs < tl.where(starts, D, 0)  # only the run's first program touches the row
    row = GW + tl.load(IDS + p) * stride_gw + offs
    old = tl.load(row, mask=write, other=0.0).to(tl.float32)
    tl.store(row, round_to(old + acc, GW.dtype.element_ty, INTERPRET), mask=write)
