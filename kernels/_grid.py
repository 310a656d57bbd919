"""Program order of the GEMM-shaped kernels: GROUP_N row blocks per vocabulary tile, so that the
programs of one wave share the `W` tiles they read in L2 (the grouped order of Triton's matmul tutorial)."""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, n_row_blocks, n_col_tiles, GROUP_N: tl.constexpr):
    """(row block, vocabulary tile) of program `pid`."""
    per_group = GROUP_N * n_col_tiles
    first_row_block = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(n_row_blocks - first_row_block, GROUP_N)
    pid_n = first_row_block + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows
    return pid_n, pid_v
