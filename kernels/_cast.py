"""The one rounding into a 16-bit store dtype, the same under Triton's CPU interpreter as on a GPU.

On a GPU `x.to(tl.bfloat16)` rounds to nearest, ties to even. The interpreter (numpy has no bf16) drops the
low 16 bits instead, and mangles subnormals, so a CPU test would check a different rounding than the GPU
runs. Under INTERPRET=True the bf16 bits are formed by integer arithmetic on the fp32 bits instead (add
0x7FFF plus the lowest kept bit, keep the high 16 bits; a NaN keeps its sign and becomes a quiet NaN) and
bitcast, with no float conversion left to the interpreter. fp16 and fp32 stores it rounds correctly already.
"""

import triton
import triton.language as tl


@triton.jit
def round_to(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 `x` rounded once, to nearest even, into DTYPE."""
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        high = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN: quiet, whatever its payload
        return high.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(DTYPE)
