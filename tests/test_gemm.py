"""`tpo_fast.ops.gemm`: fp32 results of 16-bit operands on any device, as both backends use them.

The CUDA helper's `out_dtype` protocol (tried once, then kept or dropped) runs on CPU tensors with `torch.mm`
faked; the CUDA branches of the other helpers run on a CPU tensor that says it is on CUDA (`CudaLooking`).
Oracles: float64 products of the same operands.
"""

from __future__ import annotations

import pytest
import torch
from _spies import CudaLooking

from tpo_fast.ops import gemm


class _MmSpy:
    """torch.mm with an optional fake `out_dtype` kernel (CPU torch has none), recording the keywords seen."""

    def __init__(self, real, supports: bool, error: type[BaseException] | None = None):
        self.real, self.supports, self.error, self.calls = real, supports, error, []

    def __call__(self, a, b, *, out=None, out_dtype=None):
        self.calls.append(out_dtype)
        if out_dtype is not None:
            if self.error is not None:
                raise self.error("no kernel")
            if not self.supports:
                raise TypeError("mm() got an unexpected keyword argument 'out_dtype'")
            assert a.dtype == b.dtype == torch.bfloat16 and out_dtype == torch.float32
            res = self.real(a.float(), b.float())
            return res if out is None else out.copy_(res)
        return self.real(a, b) if out is None else self.real(a, b, out=out)


def _ab(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, generator=g).bfloat16(), torch.randn(5, 4, generator=g).bfloat16()


@pytest.mark.parametrize("with_out", [False, True], ids=["new", "out"])
def test_mm_f32_cuda_out_dtype_protocol(monkeypatch, with_out):
    """The first success fixes `_MM_OUT_DTYPE = True` (a later failure then raises); a TypeError or
    RuntimeError on the first try fixes it False (widened operands from then on, no more tries)."""
    a, b = _ab()
    want = a.double() @ b.double()
    real = torch.mm

    def call():
        out = torch.full((3, 4), float("nan")) if with_out else None
        res = gemm.mm_f32_cuda(a, b, out)
        assert res.dtype == torch.float32 and res.shape == (3, 4)
        if with_out:
            assert res.data_ptr() == out.data_ptr()
        torch.testing.assert_close(res.double(), want, rtol=1e-6, atol=1e-6)

    monkeypatch.setattr(gemm, "_MM_OUT_DTYPE", None)
    spy = _MmSpy(real, supports=True)
    monkeypatch.setattr(torch, "mm", spy)
    call()
    assert gemm._MM_OUT_DTYPE is True and spy.calls == [torch.float32]
    monkeypatch.setattr(torch, "mm", _MmSpy(real, supports=True, error=RuntimeError))
    with pytest.raises(RuntimeError, match="^no kernel$"):
        gemm.mm_f32_cuda(a, b, None)

    for error in (None, RuntimeError):
        monkeypatch.setattr(gemm, "_MM_OUT_DTYPE", None)
        spy = _MmSpy(real, supports=False, error=error)
        monkeypatch.setattr(torch, "mm", spy)
        call()
        assert gemm._MM_OUT_DTYPE is False and spy.calls == [torch.float32, None]
        call()
        assert spy.calls == [torch.float32, None, None]  # no second try

    monkeypatch.setattr(gemm, "_MM_OUT_DTYPE", None)
    monkeypatch.setattr(torch, "mm", _MmSpy(real, supports=True, error=torch.OutOfMemoryError))
    with pytest.raises(torch.OutOfMemoryError):
        gemm.mm_f32_cuda(a, b, None)
    assert gemm._MM_OUT_DTYPE is None  # out of memory says nothing about the keyword


def test_mm_into_and_addmm_f32_on_cpu():
    a, b = _ab(4)
    want = a.double() @ b.double()
    out = torch.full((3, 4), float("nan"))
    gemm.mm_f32(a, b, out)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    acc = torch.ones(3, 4)
    gemm.addmm_f32_(acc, a, b)
    torch.testing.assert_close(acc.double(), want + 1, rtol=1e-6, atol=1e-6)
    acc32 = torch.ones(3, 4)
    gemm.addmm_f32_(acc32, a.float(), b.float())
    torch.testing.assert_close(acc32.double(), want + 1, rtol=1e-6, atol=1e-6)
    o16 = torch.zeros(3, 4, dtype=torch.bfloat16)
    gemm.mm_into(a, b, o16)
    assert torch.equal(o16, (a.float() @ b.float()).bfloat16())
    o32 = torch.full((3, 4), float("nan"))
    gemm.mm_into(a, b, o32)
    torch.testing.assert_close(o32.double(), want, rtol=1e-6, atol=1e-6)



def test_cuda_branches_of_the_mm_helpers(monkeypatch):
    """16-bit operands on CUDA: `mm_f32` and `addmm_f32_` go through `mm_f32_cuda` with their own operands and
    output, `mm_into` a 16-bit output through one `torch.mm(a, b, out=out)` (cuBLAS accumulates in fp32)."""
    a, b = _ab(6)
    ac = a.as_subclass(CudaLooking)
    want = a.double() @ b.double()
    calls = []

    def fake_mm_f32_cuda(x, y, out):
        calls.append((x, y, out))
        res = torch.mm(x.float(), y.float())
        return res if out is None else out.copy_(res)

    monkeypatch.setattr(gemm, "mm_f32_cuda", fake_mm_f32_cuda)
    out = torch.full((3, 4), float("nan"))
    gemm.mm_f32(ac, b, out)
    assert len(calls) == 1 and calls[0][0] is ac and calls[0][1] is b and calls[0][2] is out
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    acc = torch.ones(3, 4)
    gemm.addmm_f32_(acc, ac, b)
    assert len(calls) == 2 and calls[1][0] is ac and calls[1][1] is b and calls[1][2] is None
    torch.testing.assert_close(acc.double(), want + 1, rtol=1e-6, atol=1e-6)
    o16 = torch.zeros(3, 4, dtype=torch.bfloat16)
    gemm.mm_into(ac, b, o16)
    assert len(calls) == 2 and torch.equal(o16, torch.mm(a, b))


@pytest.mark.parametrize("with_out", [False, True], ids=["new", "out"])
@pytest.mark.parametrize("m,k,n", [(5, 0, 3), (0, 4, 3), (5, 4, 0), (0, 0, 0)])
def test_empty_products_on_cuda_are_zeros_without_cublas(monkeypatch, with_out, m, k, n):
    """A product over an empty inner dimension (dW = dZ^T H of a chunk of no rows) is zeros, one without entries is
    empty, and `addmm_f32_` leaves the sum as it was; none asks cuBLAS's mixed-dtype call (a fake that fails)."""
    monkeypatch.setattr(gemm, "mm_f32_cuda", lambda a, b, out: pytest.fail("cuBLAS asked for an empty product"))
    a = torch.zeros(m, k, dtype=torch.bfloat16).as_subclass(CudaLooking)
    b = torch.zeros(k, n, dtype=torch.bfloat16)
    out = torch.full((m, n), float("nan")) if with_out else None
    res = gemm.mm_f32(a, b, out)
    assert res.dtype == torch.float32 and res.shape == (m, n) and torch.equal(res, torch.zeros(m, n))
    if with_out:
        assert res.data_ptr() == out.data_ptr()
    acc = torch.full((m, n), 2.0)
    assert gemm.addmm_f32_(acc, a, b) is acc and torch.equal(acc, torch.full((m, n), 2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_mm_f32_without_out_on_the_cpu(dtype):
    """A new fp32 result (fp32 operands as they are, 16-bit ones widened), equal to the float64 product's
    rounding."""
    g = torch.Generator().manual_seed(8)
    a, b = torch.randn(3, 5, generator=g).to(dtype), torch.randn(5, 4, generator=g).to(dtype)
    res = gemm.mm_f32(a, b)
    assert res.dtype == torch.float32 and res.shape == (3, 4)
    torch.testing.assert_close(res.double(), a.double() @ b.double(), rtol=1e-6, atol=1e-6)

