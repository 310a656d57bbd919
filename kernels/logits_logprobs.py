"""Triton twin of the csrc/ logits kernels: per-row (lse, target logit) and the logits gradient.

One program per row, sweeping the vocabulary in BLOCK_V tiles with an online max / sum-exp in fp32.
Rows whose target is `ignore_index` do no vocabulary work in forward (the loop bound is 0).
"""

import triton
import triton.language as tl

from tpo_fast.kernels._cast import round_to


@triton.jit
def logits_forward_kernel(
    X, stride_x, T, LSE, Z, V, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(T + row)
    valid = t != ignore_index
    x_row = X + row * stride_x
    n_cols = tl.where(valid, V, 0)
    cols = tl.arange(0, BLOCK_V)
    # 1. online max / sum-exp; `shift` keeps exp(-inf - -inf) out of rows that are -inf so far, and a value equal to
    # the shift counts exp(0) = 1 even when both are +inf (torch.logsumexp's +inf for a row with a +inf logit; the
    # plain difference would be exp(inf - inf) = NaN)
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK_V):
        x = tl.load(x_row + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)  # [BLOCK_V]
        m_new = tl.maximum(m, tl.max(x, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(tl.where(m == shift, 0.0, m - shift))
        s = s * scale + tl.sum(tl.exp(tl.where(x == shift, 0.0, x - shift)), 0)
        m = m_new
    # 2. target logit; ignored rows give 0
    z = tl.where(valid, tl.load(x_row + tl.where(valid, t, 0)).to(tl.float32), 0.0)
    lse = tl.where(valid, m + tl.log(tl.where(valid, s, 1.0)), 0.0)
    tl.store(LSE + row, lse)
    tl.store(Z + row, z)


@triton.jit
def logits_backward_kernel(
    X, stride_x, G, stride_g, T, LSE, CP, CY, V, ignore_index,
    BLOCK_V: tl.constexpr,
    INTERPRET: tl.constexpr = False,
):
    # G may alias X (in-place backward): each tile is loaded before it is stored.
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(T + row)
    valid = t != ignore_index
    cp = tl.where(valid, tl.load(CP + row), 0.0)
    cy = tl.where(valid, tl.load(CY + row), 0.0)
    lse = tl.where(valid, tl.load(LSE + row), 0.0)
    x_row = X + row * stride_x
    g_row = G + row * stride_g
    # ignored rows write zeros without reading; so do rows without a softmax term (cp = 0: only target_logits got a
    # gradient), whose gradient is the one-hot even where the softmax is NaN (0 * exp(nan) would be NaN), as in csrc/
    softmax = valid & (cp != 0.0)
    n_read = tl.where(softmax, V, 0)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(x_row + start + cols, mask=start + cols < n_read, other=float("-inf")).to(tl.float32)  # [BLOCK_V]
        g = tl.where(softmax, cp * tl.exp(x - lse), 0.0)
        # the one-hot term is folded in fp32, before rounding (bf16 `p - 1` would cancel)
        g = g + tl.where(start + cols == t, cy, 0.0)
        tl.store(g_row + start + cols, round_to(g, G.dtype.element_ty, INTERPRET), mask=mask)
