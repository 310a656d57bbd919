"""The one rounding into a 16-bit store dtype, the same under Triton's CPU interpreter as on a GPU.

On a GPU `x.to(tl.bfloat16)` rounds to nearest, ties to even. The interpreter (numpy has no bf16) drops the
low 16 bits instead, so a CPU test would check a different rounding than the GPU runs. Under INTERPRET=True
the fp32 value is first rounded to the nearest bf16-representable fp32 by integer arithmetic on its bits
(add 0x7FFF plus the lowest kept bit, clear the low 16 bits; NaN kept as is), after which the truncating
cast is exact. fp16 and fp32 stores are rounded correctly by the interpreter already.
"""

import triton
import triton.language as tl


@triton.jit
def round_to(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 `x` rounded once, to nearest even, into DTYPE."""
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(DTYPE)
