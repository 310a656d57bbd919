"""GEMMs with fp32 results of 16-bit operands, on any device; shared by the `torch` and `triton` backends.

On CUDA a 16-bit x 16-bit product runs on cuBLAS with fp32 accumulation and an fp32 result
(`torch.mm(..., out_dtype=torch.float32)`, where this torch has it): each product of two bf16 or fp16 numbers
is exact in fp32, so the result is what the fp32 GEMM of the widened operands gives, at the 16-bit rate and
without a widened copy of either operand. Without that call, and on the CPU (which has no mixed-dtype product),
the operands are widened (exact) and multiplied in fp32. A sum of such products (dW over chunks) runs as one
cuBLAS GEMM into its fp32 accumulator where this torch takes one (`addmm_f32_cuda_`), so no temporary the size
of the sum is made. Pure PyTorch: no Triton import.
"""

from __future__ import annotations

import torch

# Whether this torch has cuBLAS's 16-bit x 16-bit -> fp32 product (`torch.mm(..., out_dtype=)`, CUDA
# only); None until the first try. Without it the operands are widened (exact, slower).
_MM_OUT_DTYPE: bool | None = None
# Whether this torch's cuBLAS product with an fp32 result also takes an fp32 accumulator as its C operand
# (`torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`: newer versions; older ones want C in the
# operands' dtype); None until the first try. Without it the product is formed apart and added.
_ADDMM_OUT_DTYPE: bool | None = None


def _first_try_decides(flag: str, call):
    """`call()`, a cuBLAS call that this torch may lack, unless the module flag `flag` says it refused before:
    the first success sets the flag True (a later failure then raises), the first refusal (TypeError: no such
    keyword; RuntimeError: no kernel for these dtypes) sets it False and gives None, as does every call after it.
    Out of memory says nothing about the call and is raised as it is."""
    if globals()[flag] is False:
        return None
    try:
        result = call()
    except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError since torch 2.5, the same class
        raise
    except (TypeError, RuntimeError):
        if globals()[flag]:
            raise
        globals()[flag] = False
        return None
    globals()[flag] = True
    return result


def mm_f32_cuda(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """fp32 `a @ b` of 16-bit CUDA operands (into `out` when given): `out_dtype` where it works, else widened."""
    if out is None:
        res = _first_try_decides("_MM_OUT_DTYPE", lambda: torch.mm(a, b, out_dtype=torch.float32))
    else:
        res = _first_try_decides("_MM_OUT_DTYPE", lambda: torch.mm(a, b, out_dtype=torch.float32, out=out))
    return torch.mm(a.float(), b.float(), out=out) if res is None else res


def addmm_f32_cuda_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc (fp32) += a @ b of 16-bit CUDA operands, in one cuBLAS GEMM that reads and writes `acc` where this torch
    allows it (no temporary the size of `acc`, no second pass over it), else the product apart, then added.
    Tried once, as `mm_f32_cuda` does: the first success or refusal decides for the process."""
    if _first_try_decides("_ADDMM_OUT_DTYPE", lambda: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)) is None:
        acc.add_(mm_f32_cuda(a, b, None))
    return acc


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 `a @ b` (into `out` when given, which it returns): fp32 accumulation, one rounding for 16-bit
    operands. `a` and `b` share a dtype."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        if a.shape[1] == 0 or a.shape[0] == 0 or b.shape[1] == 0:
            # no entries, or empty sums (dW = dZ^T H of a chunk of no rows): zeros, not cuBLAS's word for them
            return a.new_zeros((a.shape[0], b.shape[1]), dtype=torch.float32) if out is None else out.zero_()
        return mm_f32_cuda(a, b, out)
    # the CPU has no mixed-dtype mm: widen (exact) and multiply in fp32
    return torch.mm(a.float(), b.float(), out=out)


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc (fp32) += a @ b, the product with fp32 accumulation; returns acc."""
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    if a.is_cuda:
        return acc if 0 in (a.shape[0], a.shape[1], b.shape[1]) else addmm_f32_cuda_(acc, a, b)
    return acc.addmm_(a.float(), b.float())


def mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = a @ b in out's dtype (fp32 accumulation, one rounding); returns out."""
    if out.dtype == torch.float32:
        return mm_f32(a, b, out)
    if a.is_cuda:
        return torch.mm(a, b, out=out)  # cuBLAS accumulates 16-bit products in fp32
    return out.copy_(torch.mm(a.float(), b.float()))
