"""Backward of the token primitive for one vocabulary chunk: `dZ = coef_p * softmax(z) + coef_y * onehot(y)`.

One program per (row block, vocabulary tile) of the chunk `[V0, V0 + VC)`, GEMM-shaped like the
forward: it recomputes its logits tile in fp32 on chip, turns it into the gradient tile and stores
it (in the input dtype) into the chunk buffer `DZ[N, VC]`. The launcher then finishes the chunk with
two dense GEMMs, `dW[V0:V0+VC] = dZ.T @ H` and `dH += dZ @ W[V0:V0+VC]`: the split-reduction
backward, deterministic and free of atomics. Column sums of the fp32 tile (the bias gradient) go
to one partial row per row block, summed by the launcher. The one-hot term is added to the fp32 tile
before its one rounding, so `softmax - 1` never cancels in low precision.

With SPLIT_TARGET each row's target entry is written as 0 instead (and left out of the bias partials): the
launcher forms it in fp32 from the forward's target logit, `coef * exp(z_y - lse) + coef_y`, and adds it as a
rank-1 term. It asks for this where a 16-bit weight gradient also takes the corrupted rows `g~ h~`: summed in fp32
with them before one rounding, the clean target term, which they nearly cancel, leaves no rounding error of its own
in dW. (Storing the entry from here instead cost the 16-bit tile 800 bytes of register spills on sm_90.)
"""

import triton
import triton.language as tl

from tpo_fast.kernels._cast import round_to
from tpo_fast.kernels._dot import mma
from tpo_fast.kernels._grid import grouped_tile


@triton.jit
def softmax_grad_kernel(
    H, W, B, LSE, COEF, Y, COEF_Y,  # inputs: [N, D], [V, D], [V], [N] fp32, [N] fp32, [N] int64, [N] fp32
    H_DESC, W_DESC,  # TMA descriptors of H ([BLOCK_N, BLOCK_D] boxes) and W ([BLOCK_V, BLOCK_D]) when USE_TMA
    DZ, GB_PART,  # outputs: [N, VC] (row stride stride_dz) in W's dtype, [cdiv(N, BLOCK_N), V] fp32
    N, V, D, V0, VC, stride_dz,
    HAS_BIAS: tl.constexpr,
    HAS_ONEHOT: tl.constexpr,
    NEED_B: tl.constexpr,
    SPLIT_TARGET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(VC, BLOCK_V), GROUP_N)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column inside the chunk
    vcols = V0 + local
    v_mask = (local < VC) & (vcols < V)
    vcols64 = vcols.to(tl.int64)

    # 1. recompute the logits tile
    logits = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        if USE_TMA:  # bulk tensor copies; the copy engine zero-fills rows and columns past the edges
            h = H_DESC.load([pid_n * BLOCK_N, d0])
            w = W_DESC.load([V0 + pid_v * BLOCK_V, d0])
        else:
            cols = d0 + tl.arange(0, BLOCK_D)
            c_mask = cols < D
            h = tl.load(H + rows64[:, None] * D + cols[None, :], mask=row_mask[:, None] & c_mask[None, :], other=0.0)
            w = tl.load(W + vcols64[:, None] * D + cols[None, :], mask=v_mask[:, None] & c_mask[None, :], other=0.0)
        logits = mma(h, tl.trans(w), logits, DOT_PRECISION, INTERPRET)
    if HAS_BIAS:
        logits += tl.load(B + vcols, mask=v_mask, other=0.0).to(tl.float32)[None, :]

    # 2. gradient tile in fp32; rows and columns outside the problem give 0
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    coef = tl.load(COEF + rows, mask=row_mask, other=0.0)
    valid = row_mask[:, None] & v_mask[None, :]
    dz = tl.exp(logits - lse[:, None]) * coef[:, None]
    if HAS_ONEHOT or SPLIT_TARGET:
        y = tl.load(Y + rows, mask=row_mask, other=-1).to(tl.int32)  # ids < V < 2**31: 32-bit compares
        if SPLIT_TARGET:  # the launcher adds the whole target entry, rank-1
            dz = tl.where(vcols[None, :] == y[:, None], 0.0, dz)
        else:
            coef_y = tl.load(COEF_Y + rows, mask=row_mask, other=0.0)
            dz += tl.where(vcols[None, :] == y[:, None], coef_y[:, None], 0.0)
    dz = tl.where(valid, dz, 0.0)
    dz_store = round_to(dz, DZ.dtype.element_ty, INTERPRET)
    tl.store(DZ + rows64[:, None] * stride_dz + local[None, :], dz_store, mask=valid)
    if NEED_B:
        tl.store(GB_PART + pid_n.to(tl.int64) * V + vcols, tl.sum(dz, axis=0), mask=v_mask)
