"""A plain GEMM, `C (+)= A @ B`, for the fused-gradient losses' two gradient products on Triton.

`dH = dZ @ W` ([R, V] x [V, D]) and `dW += dZ^T @ H` ([V, R] x [R, D]) read the chunk's dZ where
`softmax_grad_inplace.py` wrote it and, for dW^T's operand, transposed (a strided view), so the kernel
takes every stride. One program per [BLOCK_M, BLOCK_N] output tile, visited in groups of GROUP_M row
blocks (`_grid.py`); products accumulate in fp32 on chip;
ACCUMULATE adds the old C in fp32 before the one rounding into C's dtype. The alternative to cuBLAS that
`KernelOptions.grad_gemm = "triton"` (TPO_FAST_GRAD_GEMM) selects, so the two can be measured.
"""

import triton
import triton.language as tl

from tpo_fast.kernels._cast import round_to
from tpo_fast.kernels._dot import mma
from tpo_fast.kernels._grid import grouped_tile


@triton.jit
def matmul_kernel(
    A, B, C,  # [M, K], [K, N] (any strides, same dtype), [M, N] (fp32 or A's dtype)
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    ACCUMULATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < M
    col_mask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_mask = ks < K
        a = tl.load(A + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(B + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = mma(a, b, acc, DOT_PRECISION, INTERPRET)
    c_ptrs = C + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    mask = row_mask[:, None] & col_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, round_to(acc, C.dtype.element_ty, INTERPRET), mask=mask)
