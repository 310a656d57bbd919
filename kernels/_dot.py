"""`tl.dot` with one workaround: Triton's CPU interpreter mis-computes bf16 dots (numpy has no bf16),
so under TRITON_INTERPRET=1 both operands are widened to fp32 first. Widening is exact, so the
interpreter still checks the same rounding the GPU path does (operands rounded before the dot)."""

import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    if INTERPRET:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out
