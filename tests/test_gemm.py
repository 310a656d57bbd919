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


class _AddmmSpy:
    """torch.addmm with a fake `out_dtype` kernel that takes an fp32 accumulator, or refuses it as older torch
    versions do (C must be in the operands' dtype), recording the keywords seen."""

    def __init__(self, real, takes_fp32_c: bool, error: type[BaseException] = RuntimeError):
        self.real, self.takes_fp32_c, self.error, self.calls = real, takes_fp32_c, error, []

    def __call__(self, c, a, b, *, out_dtype=None, out=None):
        self.calls.append(out_dtype)
        assert out_dtype == torch.float32 and out is c and a.dtype == b.dtype == torch.bfloat16
        if not self.takes_fp32_c:
            raise self.error("self and mat2 must have the same dtype, but got Float and BFloat16")
        return out.copy_(self.real(c, a.float(), b.float()))


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


def test_addmm_f32_cuda_protocol(monkeypatch):
    """One GEMM into the fp32 accumulator where torch takes it (the first success fixes `_ADDMM_OUT_DTYPE =
    True`, a later failure then raises); a refusal on the first try (RuntimeError, or TypeError without the
    keyword) fixes it False: the product apart (`mm_f32_cuda`), then added, with no more tries. Out of memory
    decides nothing."""
    a, b = _ab(5)
    want = a.double() @ b.double() + 1
    real_addmm, real_mm = torch.addmm, torch.mm
    products = []

    def fake_mm_f32_cuda(x, y, out):
        products.append((x, y, out))
        return real_mm(x.float(), y.float())

    monkeypatch.setattr(gemm, "mm_f32_cuda", fake_mm_f32_cuda)

    def call():
        acc = torch.ones(3, 4)
        assert gemm.addmm_f32_cuda_(acc, a, b) is acc
        torch.testing.assert_close(acc.double(), want, rtol=1e-6, atol=1e-6)

    monkeypatch.setattr(gemm, "_ADDMM_OUT_DTYPE", None)
    spy = _AddmmSpy(real_addmm, takes_fp32_c=True)
    monkeypatch.setattr(torch, "addmm", spy)
    call()
    call()
    assert gemm._ADDMM_OUT_DTYPE is True and spy.calls == [torch.float32] * 2 and products == []
    monkeypatch.setattr(torch, "addmm", _AddmmSpy(real_addmm, takes_fp32_c=False))
    with pytest.raises(RuntimeError, match="same dtype"):
        gemm.addmm_f32_cuda_(torch.ones(3, 4), a, b)

    for error in (RuntimeError, TypeError):
        monkeypatch.setattr(gemm, "_ADDMM_OUT_DTYPE", None)
        spy = _AddmmSpy(real_addmm, takes_fp32_c=False, error=error)
        monkeypatch.setattr(torch, "addmm", spy)
        products.clear()
        call()
        assert gemm._ADDMM_OUT_DTYPE is False and spy.calls == [torch.float32]
        assert len(products) == 1 and products[0][0] is a and products[0][1] is b and products[0][2] is None
        call()
        assert spy.calls == [torch.float32] and len(products) == 2  # no second try

    monkeypatch.setattr(gemm, "_ADDMM_OUT_DTYPE", None)
    monkeypatch.setattr(torch, "addmm", _AddmmSpy(real_addmm, takes_fp32_c=False, error=torch.OutOfMemoryError))
    with pytest.raises(torch.OutOfMemoryError):
        gemm.addmm_f32_cuda_(torch.ones(3, 4), a, b)
    assert gemm._ADDMM_OUT_DTYPE is None


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
    """16-bit operands on CUDA: `mm_f32` and `addmm_f32_` go through `mm_f32_cuda` and `addmm_f32_cuda_` with
    their own operands and output, `mm_into` a 16-bit output through one `torch.mm(a, b, out=out)` (cuBLAS
    accumulates in fp32)."""
    a, b = _ab(6)
    ac = a.as_subclass(CudaLooking)
    want = a.double() @ b.double()
    calls = []

    def fake_mm_f32_cuda(x, y, out):
        calls.append((x, y, out))
        res = torch.mm(x.float(), y.float())
        return res if out is None else out.copy_(res)

    def fake_addmm_f32_cuda_(acc, x, y):
        calls.append((acc, x, y))
        return acc.add_(torch.mm(x.float(), y.float()))

    monkeypatch.setattr(gemm, "mm_f32_cuda", fake_mm_f32_cuda)
    monkeypatch.setattr(gemm, "addmm_f32_cuda_", fake_addmm_f32_cuda_)
    out = torch.full((3, 4), float("nan"))
    gemm.mm_f32(ac, b, out)
    assert len(calls) == 1 and calls[0][0] is ac and calls[0][1] is b and calls[0][2] is out
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    acc = torch.ones(3, 4)
    assert gemm.addmm_f32_(acc, ac, b).data_ptr() == acc.data_ptr()
    assert len(calls) == 2 and calls[1][0] is acc and calls[1][1] is ac and calls[1][2] is b
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
    monkeypatch.setattr(gemm, "addmm_f32_cuda_", lambda acc, a, b: pytest.fail("cuBLAS asked for an empty product"))
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



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the real cuBLAS calls")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_the_cublas_products_on_cuda(monkeypatch, dtype):
    """On a GPU, with this torch's own answer to each `out_dtype` try and with both refused: `mm_f32` (new and
    into `out`) and `addmm_f32_` (the dW sum: a transposed operand, an accumulator holding a first product) equal
    the float64 products of the same 16-bit operands up to fp32 accumulation."""
    g = torch.Generator().manual_seed(11)
    dz = torch.randn(96, 300, generator=g).to(dtype).cuda()  # (rows, V): dW = dz^T h is (V, D)
    h = torch.randn(96, 64, generator=g).to(dtype).cuda()
    h2 = torch.randn(96, 64, generator=g).to(dtype).cuda()
    want1 = dz.double().t() @ h.double()
    want2 = want1 + dz.double().t() @ h2.double()
    scale = dz.double().abs().t() @ (h.double().abs() + h2.double().abs())
    for forced in (None, False):
        monkeypatch.setattr(gemm, "_MM_OUT_DTYPE", forced)
        monkeypatch.setattr(gemm, "_ADDMM_OUT_DTYPE", forced)
        # fp32 sums of at most 192 exact products: within 192 roundings of 2**-24 of the sum of magnitudes
        gw = gemm.mm_f32(dz.t(), h)
        assert gw.dtype == torch.float32 and ((gw.double() - want1).abs() <= 2e-5 * scale).all()
        out = torch.full((300, 64), float("nan"), device="cuda")
        assert gemm.mm_f32(dz.t(), h, out) is out
        assert ((out.double() - want1).abs() <= 2e-5 * scale).all()
        assert gemm.addmm_f32_(gw, dz.t(), h2) is gw
        assert ((gw.double() - want2).abs() <= 2e-5 * scale).all(), f"forced={forced}"
        # a dropped or replaced first product would be off by about its own size, far above that bound
        assert ((want2 - want1).abs() > 1e-3 * scale).float().mean() > 0.5
        if forced is None:
            print(f"cuBLAS out_dtype: mm {gemm._MM_OUT_DTYPE}, addmm into fp32 {gemm._ADDMM_OUT_DTYPE}")
