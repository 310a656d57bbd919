"""In-place `g *= s` for a 16-bit gradient, the product in fp32 and rounded once: one read, one write.

The fused-gradient losses store dW of a 16-bit weight in the weight's dtype at `grad_output = 1`; backward
scales it by the fp32 `grad_output` (read from device memory, never rounded to 16 bits, never read back by
the host). In PyTorch that is a pass to fp32, a multiply and a pass back per slice (three kernels per slice
of a V x D tensor); here it is one kernel, which reads and writes nothing when the factor is exactly 1.
"""

import triton
import triton.language as tl

from tpo_fast.kernels._cast import round_to


@triton.jit
def scale_kernel(
    G, S,  # [N] 16-bit values (scaled in place), [1] fp32 factor
    N,
    INTERPRET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(S)
    # a factor of exactly 1 (a plain `loss.backward()`) leaves every value as it is: no read, no write
    mask = offs < tl.where(s == 1.0, 0, N)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(G + offs, round_to(g * s, G.dtype.element_ty, INTERPRET), mask=mask)
