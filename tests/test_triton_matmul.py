"""The Triton GEMM of the fused-gradient losses (`kernels/matmul.py`, `triton_fused.triton_mm`) and the
losses run with it (`KernelOptions.grad_gemm = "triton"`).

Oracles: fp64 `torch.mm` of the same (already rounded) operands, and the losses' plain-autograd reference
(`backend="reference"`, materialized logits). Operands take any strides: dZ as a strided view (16-bit rows
at stride 2V inside an fp32 buffer), transposed for dW. Shapes are odd and larger than one tile in every
dimension under the interpreter (its tiles: up to 64 rows, 512 columns, 128 inner), so that the edge masks
and the inner loop over K run more than once.
"""

from __future__ import annotations

import pytest
import torch

from tpo_fast.loss import dpo_loss, povid_loss, tpo_loss
from tpo_fast.ops import triton_fused
from tpo_fast.ops.options import kernel_options

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.double() @ b.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m, n, k", [(70, 33, 300), (1, 5, 17), (65, 530, 9)])
def test_triton_mm_matches_fp64(dtype, m, n, k):
    g = torch.Generator().manual_seed(m + n + k)
    a = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(k, n, generator=g).to(dtype).to(DEVICE)
    out = triton_fused.triton_mm(a, b, torch.empty(m, n, device=DEVICE))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _exact(a, b), rtol=1e-5, atol=1e-4)


def test_triton_mm_reads_strided_operands_and_accumulates_once_rounded():
    """dW's product: dZ^T of a strided bf16 dZ (row stride 2V, a view into an fp32 buffer), into a bf16 dW
    that already holds a value: the old value joins the fp32 sum, then one rounding."""
    r, v, d = 37, 300, 40
    g = torch.Generator().manual_seed(1)
    buf = torch.randn(r, v, generator=g).to(DEVICE)
    dz = buf.view(torch.bfloat16)[:, :v]  # rows 2v elements apart: every stride must be honored
    dz.copy_(torch.randn(r, v, generator=g).to(torch.bfloat16))
    assert dz.stride() == (2 * v, 1)
    h = torch.randn(r, d, generator=g).to(torch.bfloat16).to(DEVICE)
    gw = torch.randn(v, d, generator=g).to(torch.bfloat16).to(DEVICE)
    want = (_exact(dz.t(), h) + gw.double()).to(torch.bfloat16)  # fp64 sum, one rounding
    triton_fused.triton_mm(dz.t(), h, gw, accumulate=True)
    # fp32 accumulation differs from fp64 far below one bf16 ulp: at most a one-ulp flip of a tie
    ulp = want.double().abs().clamp(min=1e-3) * 2.0**-7
    assert ((gw.double() - want.double()).abs() <= ulp).all()
    dh = triton_fused.triton_mm(dz, torch.randn(v, d, generator=g).to(torch.bfloat16).to(DEVICE),
                                torch.empty(r, d, device=DEVICE))
    assert dh.shape == (r, d) and torch.isfinite(dh).all()


def test_triton_mm_edges_and_bad_shapes():
    a, b = torch.randn(4, 0, device=DEVICE), torch.randn(0, 3, device=DEVICE)
    assert not triton_fused.triton_mm(a, b, torch.full((4, 3), 7.0, device=DEVICE)).any()  # K = 0: zeros
    kept = torch.full((4, 3), 7.0, device=DEVICE)
    assert (triton_fused.triton_mm(a, b, kept, accumulate=True) == 7.0).all()  # += nothing
    with pytest.raises(ValueError, match=r"triton_mm: \(4, 5\)"):
        triton_fused.triton_mm(torch.randn(4, 5), torch.randn(4, 3), torch.empty(4, 3))


B, T, D, V = 3, 9, 24, 70
IGNORE = -100


def _batch(dtype):
    g = torch.Generator().manual_seed(5)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE).requires_grad_()

    y = torch.randint(0, V, (2 * B, T), generator=g)
    y[:, :2] = IGNORE
    y[1, 6:] = IGNORE  # unequal lengths
    return dict(w=leaf(V, D, scale=0.3), b=leaf(V, scale=0.2), h=leaf(2 * B, T, D), hc=leaf(2 * B, T, D),
                y=y.to(DEVICE), ref=torch.randn(2 * B, generator=g).to(DEVICE))


CALLS = {
    "tpo": lambda x, **kw: tpo_loss(x["w"], x["h"], x["hc"], x["y"], x["b"], ref_seq_scores=x["ref"], **kw),
    "dpo": lambda x, **kw: dpo_loss(x["w"], x["h"], x["y"], x["b"], ref_seq_scores=x["ref"], **kw),
    "povid": lambda x, **kw: povid_loss(x["w"], x["h"], x["hc"][:B], x["y"], x["b"], reference_free=True, **kw),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss", list(CALLS))
def test_losses_with_triton_gradient_gemms_match_autograd(monkeypatch, dtype, loss):
    """grad_gemm="triton": the fused path's dH and dW come from matmul_kernel (a spy counts its calls, more
    than one chunk), and every gradient matches plain autograd on materialized logits."""
    calls = []
    original = triton_fused.triton_mm
    monkeypatch.setattr(triton_fused, "triton_mm", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    x = _batch(dtype)
    leaves = [x[k] for k in ("w", "b", "h", "hc") if not (loss == "dpo" and k == "hc")]
    if loss == "povid":
        leaves = leaves[:3]
    with kernel_options(grad_gemm="triton", chunk_mb=12 * 4 * V / 2**20):  # 12 rows: several chunks
        out = CALLS[loss](x, backend="triton", grad_mode="fused")
        got = torch.autograd.grad(out.loss * 1.7, leaves)
    assert len(calls) >= 4  # dH and dW per chunk, two chunks at least
    ref = CALLS[loss](x, backend="reference", grad_mode="recompute")
    want = torch.autograd.grad(ref.loss * 1.7, leaves)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.loss.double(), ref.loss.double(), rtol=tol, atol=tol)
    for a, e in zip(got, want, strict=True):
        err = (a.double() - e.double()).norm() / e.double().norm().clamp(min=1e-12)
        assert err <= tol, float(err)


def test_triton_gradient_gemms_agree_with_torch_gemms():
    """The two choices of grad_gemm give the same gradients (bf16: the same fp32 sums up to order)."""
    x = _batch(torch.bfloat16)
    results = []
    for choice in ("torch", "triton"):
        with kernel_options(grad_gemm=choice, chunk_mb=12 * 4 * V / 2**20):
            out = CALLS["tpo"](x, backend="triton", grad_mode="fused")
            results.append(torch.autograd.grad(out.loss, [x["w"], x["h"]]))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-3)


def test_torch_backend_ignores_grad_gemm(monkeypatch):
    """The option is the triton backend's: the torch backend's fused path keeps its own fp32 GEMMs."""
    monkeypatch.setattr(triton_fused, "triton_mm", lambda *a, **kw: pytest.fail("triton_mm on the torch backend"))
    x = _batch(torch.float32)
    with kernel_options(grad_gemm="triton"):
        CALLS["dpo"](x, backend="torch", grad_mode="fused").loss.backward()
    assert x["w"].grad is not None


def test_bf16_store_rounds_to_nearest_even_as_on_a_gpu():
    """K = 1: every output is one fp32 product, so the only rounding left is the store's into bf16, which must be
    round-to-nearest-even (the GPU's, and torch's `.bfloat16()`), also under the interpreter, whose own cast
    truncates (kernels/_cast.py). Half of random values would differ by one ulp under truncation."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(64, 1, generator=g).to(DEVICE), torch.randn(1, 48, generator=g).to(DEVICE)
    out = triton_fused.triton_mm(a, b, torch.empty(64, 48, dtype=torch.bfloat16, device=DEVICE))
    assert torch.equal(out, (a @ b).bfloat16())
