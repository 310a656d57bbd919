"""`tpo_fast.ops.triton_fused` launchers called directly, at the edges mutation testing found unguarded
(docs/testing.md): a chunk of one row and an empty chunk, the bulk-tensor-copy (TMA) loads, the 16-bit gradient
view, the first chunk's weight-gradient buffers, and the outputs' dtype and device under a float64 default dtype
and a `meta` default device (the buffers must follow the inputs, not torch's defaults).

Oracles are independent of the launchers: materialized `h @ W.T + b`, `torch.logsumexp`, `torch.softmax`,
`one_hot`, fp64 matrix products. Triton runs under its CPU interpreter here (conftest.py); shapes are tiny.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from tpo_fast.ops import triton_fused
from tpo_fast.ops.options import kernel_options

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU edges (default device, CPU branches)")

D, V = 8, 20  # D * 4 bytes is a multiple of 16: describable by TMA


def _inputs(r: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, D, generator=g), torch.randn(V, D, generator=g), torch.randn(V, generator=g)


def _check_logits(h, w, b, buf, lse):
    want = h.double() @ w.double().t() + (0 if b is None else b.double())
    assert buf.dtype == torch.float32 and lse.dtype == torch.float32
    assert buf.shape == (h.shape[0], V) and lse.shape == (h.shape[0],)
    torch.testing.assert_close(buf.double(), want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lse.double(), want.logsumexp(-1), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_logits_and_lse_one_row_and_a_few(r, with_bias):
    """A chunk of one row runs the kernel too (not the empty-chunk early return)."""
    h, w, b = _inputs(r)
    b = b if with_bias else None
    _check_logits(h, w, b, *triton_fused.logits_and_lse(h, w, b))


def test_logits_and_lse_through_tma_descriptors(monkeypatch):
    """TPO_FAST_TMA=1: the interpreter loads through host-side tensor descriptors built from the chunk's tiles."""
    used = []
    real = triton_fused._tma_descriptors
    monkeypatch.setattr(triton_fused, "_tma_descriptors", lambda *a: used.append(real(*a)) or used[-1])
    h, w, b = _inputs(5, seed=1)
    with kernel_options(tma="1"):
        buf, lse = triton_fused.logits_and_lse(h, w, b)
    assert [u[2] for u in used] == [True]
    _check_logits(h, w, b, buf, lse)


def test_empty_chunk():
    h, w, b = _inputs(0)
    buf, lse = triton_fused.logits_and_lse(h, w, b)
    assert buf.shape == (0, V) and buf.dtype == torch.float32
    assert lse.shape == (0,) and lse.dtype == torch.float32
    dz = triton_fused.softmax_grad_inplace(buf, lse, lse, torch.zeros(0, dtype=torch.long), lse, None, None,
                                           torch.bfloat16)
    assert dz.shape == (0, V) and dz.dtype == torch.bfloat16


def _dz_oracle(z, coef_p, y, coef_y, y2=None, coef_y2=None):
    z = z.double()
    dz = coef_p.double()[:, None] * torch.softmax(z, -1) + coef_y.double()[:, None] * F.one_hot(y, V)
    if y2 is not None:
        dz = dz + coef_y2.double()[:, None] * F.one_hot(y2, V)
    return dz


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("r, second", [(1, False), (1, True), (3, True)], ids=["one-row", "one-row-y2", "rows-y2"])
def test_softmax_grad_inplace(dtype, r, second):
    """dZ over the stored logits; a 16-bit dZ is a strided view into the first half of each fp32 row."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(r, V, generator=g) * 3
    lse = z.double().logsumexp(-1).float()
    coef_p, coef_y, coef_y2 = (torch.randn(r, generator=g) for _ in range(3))
    y = torch.randint(0, V, (r,), generator=g)
    y2 = (y + 1 + torch.randint(0, V - 1, (r,), generator=g)) % V if second else None
    buf = z.clone()
    dz = triton_fused.softmax_grad_inplace(buf, lse, coef_p, y, coef_y, y2, coef_y2 if second else None, dtype)
    assert dz.dtype == dtype and dz.shape == (r, V)
    assert dz.data_ptr() == buf.data_ptr()  # in place: no second buffer
    want = _dz_oracle(z, coef_p, y, coef_y, y2, coef_y2 if second else None)
    if dtype == torch.float32:
        torch.testing.assert_close(dz.double(), want, rtol=1e-5, atol=1e-6)
    else:  # the fp32 value rounded to bf16 (the interpreter's conversion may land one ulp off the nearest)
        torch.testing.assert_close(dz.double(), want, rtol=2**-7, atol=1e-6)


def test_mm_f32_shape_and_no_resize():
    g = torch.Generator().manual_seed(3)
    dz, w = torch.randn(3, V, generator=g), torch.randn(V, D, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an `out=` of the wrong shape is resized with a warning
        out = triton_fused.mm_f32(dz, w)
    assert out.shape == (3, D) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), dz.double() @ w.double(), rtol=1e-6, atol=1e-5)


def _dw_inputs(dtype):
    g = torch.Generator().manual_seed(4)
    dz, h, w = torch.randn(3, V, generator=g), torch.randn(3, D, generator=g), torch.randn(V, D, generator=g)
    return dz.to(dtype), h.to(dtype), w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_accumulate_dw_first_chunk_then_next(dtype):
    """The first chunk allocates dW in the weight's dtype; the next one adds to it (one rounding per chunk)."""
    dz, h, w = _dw_inputs(dtype)
    gw = triton_fused.accumulate_dw(None, dz, h, w)
    first = (dz.double().t() @ h.double()).float().to(dtype)
    assert gw.dtype == dtype and gw.shape == (V, D)
    torch.testing.assert_close(gw, first, rtol=0 if dtype != torch.float32 else 1e-6, atol=1e-6)
    again = triton_fused.accumulate_dw(gw, dz, h, w)
    assert again.data_ptr() == gw.data_ptr()
    want = (first.double() + dz.double().t() @ h.double()).float().to(dtype)
    torch.testing.assert_close(again, want, rtol=0 if dtype != torch.float32 else 1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scatter_dw_without_a_buffer(dtype):
    """The corrupted rows' rank-1 dW when no chunk has allocated dW yet (repeated targets sum in fp32)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(V, D, generator=g).to(dtype)
    hc = torch.randn(4, D, generator=g).to(dtype)
    gz = torch.randn(4, generator=g)
    y = torch.tensor([3, 7, 3, 19])
    gw = triton_fused.scatter_dw(None, y, gz, hc, w)
    want = torch.zeros(V, D, dtype=torch.float64).index_add_(0, y, gz.double()[:, None] * hc.double())
    assert gw.dtype == dtype and gw.shape == (V, D)
    torch.testing.assert_close(gw, want.float().to(dtype), rtol=0 if dtype != torch.float32 else 1e-6, atol=1e-6)


def test_buffers_fp32_under_float64_default(default_float64):
    h, w, b = (t.float() for t in _inputs(3))
    _check_logits(h, w, b, *triton_fused.logits_and_lse(h, w, b))
    _, lse0 = triton_fused.logits_and_lse(h[:0], w, b)
    assert lse0.dtype == torch.float32
    assert triton_fused.mm_f32(torch.randn(3, V).float(), w).dtype == torch.float32
    dz, hh, wb = _dw_inputs(torch.bfloat16)
    assert triton_fused.accumulate_dw(None, dz, hh, wb).dtype == torch.bfloat16
    assert triton_fused.scatter_dw(None, torch.tensor([1]), torch.ones(1).float(), hh[:1], wb).dtype == torch.bfloat16


def test_buffers_on_the_inputs_device_under_meta_default():
    h, w, b = _inputs(3)
    dz, hh, wb = _dw_inputs(torch.float32)
    y, gz = torch.tensor([1, 2]), torch.ones(2)
    with torch.device("meta"):
        buf, lse = triton_fused.logits_and_lse(h, w, b)
        buf0, lse0 = triton_fused.logits_and_lse(h[:0], w, b)
        mm = triton_fused.mm_f32(dz, wb)
        gw = triton_fused.accumulate_dw(None, dz, hh, wb)
        gs = triton_fused.scatter_dw(None, y, gz, hh[:2], wb)
    assert {t.device.type for t in (buf, lse, buf0, lse0, mm, gw, gs)} == {"cpu"}
    _check_logits(h, w, b, buf, lse)
    torch.testing.assert_close(gs.double(), torch.zeros(V, D, dtype=torch.float64).index_add_(
        0, y, gz.double()[:, None] * hh[:2].double()).float().double(), rtol=1e-6, atol=1e-6)
