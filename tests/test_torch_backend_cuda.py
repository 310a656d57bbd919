"""The torch backend's bf16 GEMMs on CUDA: cuBLAS products of the bf16 operands with fp32 results.

With bf16 hidden states and weight on a GPU the torch backend's logits GEMM is one `gemm.mm_f32` of the bf16
operands (fp32 accumulation and result: exact products, as the fp32 GEMM of widened copies gives), and its
gradient GEMMs take dZ rounded once to bf16, as the triton backend's do, with fp32 results; no fp32 copy of the
weight is made. Before, it widened the weight and ran fp32 GEMMs (176 ms for the TPO loss at LLaVA-7B's head
on an H200, against 13 ms on the triton backend).

On a CPU these tests run the CUDA branches on tensors that say they are on CUDA (`CudaLooking`), with
cuBLAS's call (`gemm.mm_f32_cuda`) faked by a widened fp32 product that records its operands' dtypes, and a
weight that refuses to be widened whole. Oracles: float64 math on the same bf16 values. The last tests need a
GPU (the device run's kernel-tests part): the fused losses on CUDA against the reference backend.
"""

from __future__ import annotations

import pytest
import torch
from _spies import CudaLooking

from tpo_fast.ops import gemm, torch_chunked
from tpo_fast.ops.fused_chunk import TorchChunk
from tpo_fast.ops.fused_pairs import TORCH_CHUNK_BYTES, chunk_cap_bytes, default_chunk_bytes
from tpo_fast.ops.options import kernel_options

R, D, V = 21, 12, 70  # rows, hidden, vocabulary: R != V, so a gathered (R, D) is never taken for the weight


class WholeWeightStaysBf16(CudaLooking):
    """A CUDA-looking weight whose whole-tensor `.float()` fails: the bf16 GEMMs on CUDA take it as it is."""

    def float(self, *args, **kwargs):
        assert tuple(self.shape) not in ((V, D), (D, V)), "the (V, D) weight was widened to fp32"
        return super().float(*args, **kwargs)


@pytest.fixture
def cublas(monkeypatch):
    """`gemm.mm_f32_cuda` and `gemm.addmm_f32_cuda_` faked: a widened fp32 product (the values cuBLAS's fp32
    accumulation gives, up to the order of the sums); records each call's operand dtypes and shapes."""
    seen: list[tuple[torch.dtype, torch.dtype, tuple[int, ...], tuple[int, ...]]] = []

    def fake(a, b, out):
        seen.append((a.dtype, b.dtype, tuple(a.shape), tuple(b.shape)))
        res = torch.mm(a.to(torch.float32), b.to(torch.float32)).as_subclass(CudaLooking)  # a CUDA result
        return res if out is None else out.copy_(res)

    def fake_addmm(acc, a, b):  # cuBLAS's GEMM into the fp32 sum: the same record
        assert acc.dtype == torch.float32
        return acc.add_(fake(a, b, None))

    monkeypatch.setattr(gemm, "mm_f32_cuda", fake)
    monkeypatch.setattr(gemm, "addmm_f32_cuda_", fake_addmm)
    monkeypatch.setattr(torch_chunked, "cpu_has_bf16_units", lambda: False)  # CUDA does not ask the CPU
    return seen


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(R, D, generator=g) * 2).bfloat16()
    hc = (torch.randn(R, D, generator=g) * 2).bfloat16()
    w = (torch.randn(V, D, generator=g) * 0.5).bfloat16()
    y = torch.randint(0, V, (R,), generator=g)
    return h, hc, w, y


def _cuda(t: torch.Tensor, cls=CudaLooking) -> torch.Tensor:
    return t.as_subclass(cls)


def test_bf16_on_cuda_needs_no_bf16_units(monkeypatch):
    """bf16 inputs on CUDA take the bf16 GEMMs whatever the CPU has; fp32 and fp16 ones, or mixed dtypes, do not;
    only the bf16 GEMMs on CUDA go without the weight's fp32 copy."""
    monkeypatch.setattr(torch_chunked, "cpu_has_bf16_units", lambda: False)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    h = _cuda(torch.zeros(2, 3, dtype=torch.bfloat16))
    assert torch_chunked.uses_bf16_gemms(h, torch.bfloat16)
    assert not torch_chunked.uses_bf16_gemms(h, torch.float32)
    assert not torch_chunked.uses_bf16_gemms(_cuda(torch.zeros(2, 3)), torch.bfloat16)
    assert not torch_chunked.uses_bf16_gemms(_cuda(torch.zeros(2, 3, dtype=torch.float16)), torch.float16)
    assert not torch_chunked.uses_bf16_gemms(torch.zeros(2, 3, dtype=torch.bfloat16), torch.bfloat16)  # that CPU
    assert not torch_chunked.needs_fp32_weight(h, True)
    assert torch_chunked.needs_fp32_weight(h, False)
    assert torch_chunked.needs_fp32_weight(torch.zeros(2, 3, dtype=torch.bfloat16), True)  # the CPU's bf16 mode


def _oracle(h, hc, w, y, coef_p, coef_y, g):
    """float64 (lse, z[y], z~[y], dZ, dH, dW, dH~) of the chunk's rows on the same bf16 values."""
    h64, hc64, w64 = h.double(), hc.double(), w.double()
    logits = h64 @ w64.t()
    lse = logits.logsumexp(-1)
    z = logits.gather(1, y[:, None]).squeeze(1)
    zc = (hc64 * w64[y]).sum(-1)
    dz = coef_p.double()[:, None] * torch.softmax(logits, -1)
    dz[torch.arange(R), y] += coef_y.double()
    dh = dz @ w64
    dw = dz.t() @ h64
    dw.index_add_(0, y, g.double()[:, None] * hc64)
    return lse, z, zc, dz, dh, dw, g.double()[:, None] * w64[y]


def test_the_fused_chunk_core_takes_the_bf16_weight_on_cuda(cublas):
    """`TorchChunk` on CUDA with bf16 inputs: every GEMM a cuBLAS call of bf16 operands (the logits, dW, dH, and
    the reference branch's logits), no fp32 copy of the weight; statistics at fp32 accuracy, gradients within
    dZ's one rounding to bf16 (2^-9 of each |dZ| term, doubled for fp32's own sums)."""
    h, hc, w, y = _inputs()
    g = torch.Generator().manual_seed(5)
    coef_p, coef_y, gc = (torch.randn(R, generator=g) for _ in range(3))
    core = TorchChunk(_cuda(w, WholeWeightStaysBf16), None, need_w=True, need_b=False)
    lse, z, z2 = core.stats(_cuda(h), y, None)
    ref_lse, ref_z, ref_zc, dz64, dh64, dw64, dhc64 = _oracle(h, hc, w, y, coef_p, coef_y, gc)
    assert z2 is None and lse.dtype == z.dtype == torch.float32
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(z.double(), ref_z, rtol=1e-6, atol=1e-5)
    dz = core.logit_grad(coef_p, y, coef_y, None, None)
    dh = core.backprop(dz, _cuda(h), need_h=True)
    zc = core.gather(_cuda(hc), y)
    torch.testing.assert_close(zc.double(), ref_zc, rtol=1e-6, atol=1e-5)
    dhc = core.gather_backward(_cuda(hc), y, gc, need_hc=True)
    f_lse, f_z, f_zc = core.forward_stats(_cuda(h), _cuda(hc), y)
    assert core._w32 is None
    bf, f32 = torch.bfloat16, torch.float32
    assert cublas == [(bf, bf, (R, D), (D, V)), (bf, bf, (V, R), (R, D)), (bf, bf, (R, V), (V, D)),
                      (bf, bf, (R, D), (D, V))]
    assert dh.dtype == core.gw.dtype == dhc.dtype == f32
    bound_h = 2**-8 * (dz64.abs() @ w.double().abs()) + 1e-6
    assert ((dh.double() - dh64).abs() <= bound_h).all()
    bound_w = 2**-8 * (dz64.abs().t() @ h.double().abs()) + 1e-5 * dw64.abs() + 1e-6
    assert ((core.gw.double() - dw64).abs() <= bound_w).all()
    torch.testing.assert_close(dhc.double(), dhc64, rtol=1e-6, atol=1e-6)
    for got, want in ((f_lse, ref_lse), (f_z, ref_z), (f_zc, ref_zc)):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)


def test_a_second_chunk_accumulates_its_weight_gradient(cublas):
    """Two chunks' dW: the first written by its GEMM, the second added to it (`gemm.addmm_f32_`)."""
    h, _, w, y = _inputs(1)
    coef_p, coef_y = -torch.ones(R), torch.ones(R)
    core = TorchChunk(_cuda(w, WholeWeightStaysBf16), None, need_w=True, need_b=False)
    halves = (slice(0, 9), slice(9, R))
    for rows in halves:
        core.stats(_cuda(h[rows]), y[rows], None)
        dz = core.logit_grad(coef_p[rows], y[rows], coef_y[rows], None, None)
        assert core.backprop(dz, _cuda(h[rows]), need_h=False) is None
    oracle = _oracle(h, h, w, y, coef_p, coef_y, torch.zeros(R))
    dz64, dw64 = oracle[3], oracle[5]
    assert [shape for _, _, shape, _ in cublas] == [(9, D), (V, 9), (R - 9, D), (V, R - 9)]
    bound = 2**-8 * (dz64.abs().t() @ h.double().abs()) + 1e-5 * dw64.abs() + 1e-6
    assert ((core.gw.double() - dw64).abs() <= bound).all()


def test_the_token_primitive_forward_and_backward_on_cuda(cublas):
    """`torch_chunked.forward` and `backward` (the recomputing path) with bf16 inputs on CUDA, in 3 chunks: the
    bf16 weight in every GEMM, with or without a bias and a corrupted branch."""
    h, hc, w, y = _inputs(2)
    bias = torch.linspace(-1, 1, V).bfloat16()
    g = torch.Generator().manual_seed(6)
    coef_p, coef_y, gc = -torch.rand(R, generator=g), torch.rand(R, generator=g), torch.randn(R, generator=g)
    hh, ww, hcc = _cuda(h), _cuda(w, WholeWeightStaysBf16), _cuda(hc)
    torch_chunked_rows = torch_chunked._chunk_rows
    try:
        torch_chunked._chunk_rows = lambda v: 8  # 21 rows: chunks of 8, 8 and 5
        lse, z, zc, am = torch_chunked.forward(hh, ww, bias, hcc, y, True)
        gh, gw, gb, ghc = torch_chunked.backward(hh, ww, bias, hcc, y, lse, coef_p, coef_y, gc,
                                                 (True, True, True, True))
    finally:
        torch_chunked._chunk_rows = torch_chunked_rows
    logits = h.double() @ w.double().t() + bias.double()
    torch.testing.assert_close(lse.double(), logits.logsumexp(-1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(z.double(), logits.gather(1, y[:, None]).squeeze(1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(zc.double(), (hc.double() * w.double()[y]).sum(-1) + bias.double()[y],
                               rtol=1e-6, atol=1e-5)
    assert torch.equal(am, logits.argmax(-1))
    dz = coef_p.double()[:, None] * torch.softmax(logits, -1)
    dz[torch.arange(R), y] += coef_y.double()
    bound = 2**-8 * (dz.abs() @ w.double().abs()) + 1e-6
    assert ((gh.double() - dz @ w.double()).abs() <= bound).all()
    want_w = dz.t() @ h.double()
    want_w.index_add_(0, y, gc.double()[:, None] * hc.double())
    assert ((gw.double() - want_w).abs() <= 2**-8 * (dz.abs().t() @ h.double().abs()) + 1e-5).all()
    want_b = dz.sum(0).index_add_(0, y, gc.double())
    torch.testing.assert_close(gb.double(), want_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ghc.double(), gc.double()[:, None] * w.double()[y], rtol=1e-6, atol=1e-6)
    bf = torch.bfloat16
    # forward: 3 logits GEMMs; backward: 3 more, and per chunk dW (first written, then added) and dH
    assert [(a, b) for a, b, _, _ in cublas] == [(bf, bf)] * 12
    assert [sa[0] for _, _, sa, _ in cublas] == [8, 8, 5, 8, V, 8, 8, V, 8, 5, V, 5]


def test_the_torch_backend_keeps_its_small_chunk_on_the_cpu_only():
    """A fused call without `chunk_bytes` on the torch backend: the options' budget on CUDA, as on the triton
    backend, and at most `TORCH_CHUNK_BYTES` on a CPU."""
    h = torch.zeros(2, 3, dtype=torch.bfloat16)
    with kernel_options(chunk_mb=512):
        assert default_chunk_bytes("torch", _cuda(h)) == default_chunk_bytes("triton", _cuda(h)) == 512 * 2**20
        assert default_chunk_bytes("torch", h) == TORCH_CHUNK_BYTES == 128 * 2**20
    with kernel_options(chunk_mb=64):
        assert default_chunk_bytes("torch", h) == default_chunk_bytes("torch", _cuda(h)) == 64 * 2**20
    # the cap alone, as bench/profile_loss.py lists its budgets from it
    assert chunk_cap_bytes("torch", False) == 128 * 2**20
    assert chunk_cap_bytes("torch", True) is None
    assert chunk_cap_bytes("triton", False) is None and chunk_cap_bytes("triton", True) is None


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the real cuBLAS calls")


@CUDA
@pytest.mark.parametrize("seed", range(100, 130))
def test_fused_losses_on_cuda_against_the_reference(seed):
    """The random cases of test_fused_loss_combinations in bf16 on the GPU, torch backend: loss, metrics and
    every gradient against the reference backend in fp32 on the same values, within the triton backend's bf16
    bound."""
    from test_fused_loss_combinations import check

    check(seed, "torch", torch.bfloat16, 1.5e-2, device=torch.device("cuda"))


@CUDA
def test_the_cublas_products_run_on_cuda():
    """On the GPU the bf16 GEMMs take cuBLAS's 16-bit x 16-bit -> fp32 product where torch has it (else widened
    operands), and the chunk core makes no fp32 copy of the weight."""
    h, _, w, y = (t.cuda() for t in _inputs(3))
    core = TorchChunk(w, None, need_w=True, need_b=False)
    lse, _, _ = core.stats(h, y, None)
    torch.testing.assert_close(lse.double().cpu(), (h.double() @ w.double().t()).logsumexp(-1).cpu(),
                               rtol=1e-6, atol=1e-5)
    core.backprop(core.logit_grad(-torch.ones(R, device="cuda"), y, torch.ones(R, device="cuda"), None, None), h,
                  need_h=True)
    assert core._w32 is None and gemm._MM_OUT_DTYPE is not None
