"""A 16-bit lm_head weight gradient that takes both image branches: each row's clean target term and the corrupted
branch's `g~ h~` are summed in fp32 before one rounding.

In TPO the weight row of a target token gets `(coef_p p_y + coef_y) h` from the clean image and `g~ h~` from the
corrupted one; with the visual-anchored weights these nearly cancel where the two images' hidden states are close.
The triton backend (its per-token backward and its fused-gradient path) rounded dW, or the dZ entry, to bf16 before
the corrupted rows were added, and the torch backend's fused path rounded the dZ entry in its bf16 GEMMs: the larger
term's rounding error stayed behind, 16% of the weight gradient's norm in the case below (corrupted hidden states
within 1% of the clean ones), where one rounding of the exact sum is 0.16%. Now the target entries leave the
16-bit buffers in fp32 (`SPLIT_TARGET` in kernels/softmax_grad.py and kernels/softmax_grad_inplace.py) and meet
the corrupted rows in one fp32 sum per weight row (`scatter_rows_kernel` with two sources).

Oracles: float64 autograd of the full logits, written from docs/math.md; bounds: a small multiple of the error of
the exact gradient rounded once to the dtype (each test was checked to fail on the code before the change).
"""

from __future__ import annotations

import pytest
import torch
from _device import backend_device

import tpo_fast
from tpo_fast.ops import torch_chunked, triton_impl
from tpo_fast.ops.fused_pairs import fused_pair_loss
from tpo_fast.ops.options import kernel_options

IGNORE = -100
VISUAL = 0.01  # the weight of logp beside the visual term z - z~: the clean and corrupted target terms nearly cancel


def _case(dtype=torch.bfloat16, n=24, d=32, v=80, seed=0, bias=False):
    """Rows whose corrupted hidden states lie within 1% of the clean ones; targets from 12 ids (repeats: runs of
    equal targets in the scatter); a few ignored rows."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, d, generator=g).to(dtype)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    corrupted = (hidden.float() + 0.01 * torch.randn(n, d, generator=g)).to(dtype)
    targets = torch.randint(0, 12, (n,), generator=g)
    targets[[3, n - 1]] = IGNORE
    b = (0.1 * torch.randn(v, generator=g)).to(dtype) if bias else None
    return hidden, corrupted, weight, b, targets


def _oracle(hidden, corrupted, weight, bias, targets, second=None):
    """float64 gradients of `sum over valid rows of VISUAL * logp + z - z~ [+ VISUAL * logp2]` from the full logits."""
    h, hc, w = (t.double().requires_grad_() for t in (hidden, corrupted, weight))
    b = None if bias is None else bias.double().requires_grad_()
    valid = targets != IGNORE
    y = targets[valid]
    logits = h[valid] @ w.t() + (0 if b is None else b)
    logp = torch.log_softmax(logits, -1)
    zc = (hc[valid] * w[y]).sum(-1) + (0 if b is None else b[y])
    loss = (VISUAL * logp.gather(1, y[:, None]).squeeze(1) + logits.gather(1, y[:, None]).squeeze(1) - zc).sum()
    if second is not None:
        y2 = second[valid]
        has = y2 != IGNORE
        loss = loss + VISUAL * logp[has].gather(1, y2[has][:, None]).sum()
    return torch.autograd.grad(loss, [t for t in (h, hc, w, b) if t is not None])


def _rel(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got.double().cpu() - exact).norm() / exact.norm())


def _assert_near_one_rounding(got, exact, dtype, factor=2.0):
    """`got` within `factor` times the error of the exact gradient rounded once to `dtype` (relative norms)."""
    floor = _rel(exact.to(dtype), exact)
    assert _rel(got, exact) <= factor * floor, (_rel(got, exact), floor)


def _bf16_gemms(monkeypatch, gemms):
    """The torch backend's bf16 GEMM paths on this CPU: oneDNN's (a CPU with bf16 units), or CUDA's cuBLAS products
    (run through `gemm` with widened operands, the same values)."""
    monkeypatch.setattr(torch_chunked, "cpu_has_bf16_units", lambda: True)
    if gemms == "cuda_bf16_products":
        monkeypatch.setattr(torch_chunked, "needs_fp32_weight", lambda hidden, bf16: not bf16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("chunks", [1, 3], ids=["one_vocab_chunk", "three_vocab_chunks"])
def test_triton_primitive_weight_gradient_of_both_branches_is_rounded_once(dtype, bias, chunks):
    """`token_stats(..., corrupted_hidden=...)` on triton (the split backward): dW within twice one rounding of the
    exact sum (it was 100x that), dH, dH~ and db too. With three vocabulary chunks (16-wide tiles, 32-wide chunks)
    the rows' target entries fall in different chunks' kernels."""
    hidden, corrupted, weight, b, targets = _case(dtype, bias=bias)
    dev = backend_device("triton")  # a GPU's compiled kernels where there is one
    h, hc, w = (t.to(dev).requires_grad_() for t in (hidden, corrupted, weight))
    bb = None if b is None else b.to(dev).requires_grad_()
    opts = {} if chunks == 1 else dict(tiles=(16, 16, 16, 4, 1, 2), chunk_mb=hidden.shape[0] * 2 * 32 / 2**20)
    with kernel_options(**opts):
        st = tpo_fast.token_stats(h, w, targets.to(dev), bias=bb, corrupted_hidden=hc, backend="triton")
        loss = (VISUAL * st.logprobs + st.target_logits - st.corrupted_target_logits).sum()
        got = torch.autograd.grad(loss, [t for t in (h, hc, w, bb) if t is not None])
    exact = _oracle(hidden, corrupted, weight, b, targets)
    for g, e in zip(got, exact, strict=True):
        _assert_near_one_rounding(g, e, dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_primitive_without_weight_gradient_keeps_the_hidden_gradients(backend):
    """A frozen lm_head (LoRA): no dW, so no target entries leave the GEMMs; dH and dH~ as before, near one rounding."""
    hidden, corrupted, weight, _, targets = _case()
    dev = backend_device(backend)
    h, hc = hidden.to(dev).requires_grad_(), corrupted.to(dev).requires_grad_()
    st = tpo_fast.token_stats(h, weight.to(dev), targets.to(dev), corrupted_hidden=hc, backend=backend)
    got = torch.autograd.grad((VISUAL * st.logprobs + st.target_logits - st.corrupted_target_logits).sum(), (h, hc))
    exact = _oracle(hidden, corrupted, weight, None, targets)
    for g, e in zip(got, exact[:2], strict=True):
        _assert_near_one_rounding(g, e, torch.bfloat16)


def _fused(hidden, corrupted, weight, b, targets, backend, pairs_per_chunk, second=None):
    """fused_pair_loss over (2B, T) targets, the chunk loss the oracle's: gradients of (h, h~, W[, b])."""
    dev = backend_device(backend)  # triton: a GPU's compiled kernels where there is one
    h, hc, w = (t.to(dev).requires_grad_() for t in (hidden, corrupted, weight))
    bb = None if b is None else b.to(dev).requires_grad_()
    grid = targets.view(6, -1).to(dev)  # 3 pairs

    def chunk_loss(c):
        m = c.mask.float()
        out = ((VISUAL * c.logprobs + c.target_logits - c.corrupted_target_logits) * m).sum()
        return out if c.second_logprobs is None else out + VISUAL * c.second_logprobs.sum()

    row_bytes = 4 * weight.shape[0] * 2 * grid.shape[1]  # one pair's rows of fp32 logits
    out = fused_pair_loss(h, w, grid, chunk_loss, bias=bb, corrupted_hidden=hc, backend=backend,
                          chunk_bytes=pairs_per_chunk * row_bytes,
                          second_targets=None if second is None else second.view(6, -1).to(dev),
                          second_ignore_index=IGNORE)
    return torch.autograd.grad(out.loss, [t for t in (h, hc, w, bb) if t is not None])


@pytest.mark.parametrize("backend", ["triton", "torch_cpu_bf16_units", "torch_cuda_bf16_products"])
@pytest.mark.parametrize("pairs_per_chunk", [1, 3], ids=["chunk_per_pair", "one_chunk"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_fused_pair_loss_weight_gradient_of_both_branches_is_rounded_once(monkeypatch, backend, pairs_per_chunk,
                                                                          bias):
    """The fused-gradient path: the triton backend (in-place dZ; dW in bf16 across chunks) and the torch backend
    through its bf16 GEMMs, one chunk or a chunk per pair: dW within twice one rounding of the exact sum."""
    if backend != "triton":
        _bf16_gemms(monkeypatch, backend.split("_", 1)[1])
    hidden, corrupted, weight, b, targets = _case(bias=bias)
    got = _fused(hidden, corrupted, weight, b, targets, backend.split("_")[0], pairs_per_chunk)
    exact = _oracle(hidden, corrupted, weight, b, targets)
    for g, e in zip(got, exact, strict=True):
        _assert_near_one_rounding(g, e, torch.bfloat16)


@pytest.mark.parametrize("backend", ["triton", "torch_cuda_bf16_products"])
def test_fused_second_targets_on_the_first_target_stay_in_the_target_entry(monkeypatch, backend):
    """POVID-like second targets, some equal to the row's target (its whole dZ entry, both one-hot terms, leaves
    the buffer in fp32), some elsewhere, some absent."""
    if backend != "triton":
        _bf16_gemms(monkeypatch, "cuda_bf16_products")
    hidden, corrupted, weight, b, targets = _case()
    second = torch.where(torch.arange(targets.numel()) % 3 == 0, targets, (targets + 5) % 80)
    second[1::4] = IGNORE
    second[targets == IGNORE] = IGNORE
    got = _fused(hidden, corrupted, weight, b, targets, backend.split("_")[0], 1, second)
    exact = _oracle(hidden, corrupted, weight, b, targets, second)
    for g, e in zip(got, exact, strict=True):
        _assert_near_one_rounding(g, e, torch.bfloat16)


def test_fused_fp32_gradients_are_unchanged_by_the_split():
    """fp32 weights keep the target entries in dZ (no rounding to avoid): the triton and torch fused paths equal
    the float64 oracle to fp32 accuracy."""
    hidden, corrupted, weight, b, targets = _case(torch.float32, bias=True)
    exact = _oracle(hidden, corrupted, weight, b, targets)
    for backend in ("triton", "torch"):
        got = _fused(hidden, corrupted, weight, b, targets, backend, 1)
        for g, e in zip(got, exact, strict=True):
            assert _rel(g, e) < 1e-5, backend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_scatter_rows_of_two_sources_sum_in_fp32_before_one_rounding(dtype):
    """`_scatter_rows_(gw, y, g, x, (g2, x2))`: each touched row gets old + sum g x + sum g2 x2, in fp32, rounded
    once. The values are small multiples of powers of two, so the fp32 sums are exact and the result is the exact sum
    rounded once: equal, not close. A cancelling pair (+1 x, -1 x2 with x2 = x) leaves only the other rows' terms,
    which a rounding of either half alone would lose. Rows' sources swapped (x for x2) would give other values."""
    torch.manual_seed(0)
    r, d, v = 9, 40, 7
    device = backend_device("triton")
    y = torch.tensor([2, 5, 2, 2, 0, 5, 6, 2, 0], device=device)
    x = (torch.randint(-64, 64, (r, d)) * 2.0**-4).to(dtype).to(device)
    x2 = (torch.randint(-64, 64, (r, d)) * 2.0**-10).to(dtype).to(device)
    x2[0] = x[0]  # cancels x[0] below: + 1 * x[0] - 1 * x2[0]
    g = torch.tensor([1.0, 0.5, -2.0, 0.25, 1.0, -1.0, 2.0, 0.5, 4.0], device=device)
    g2 = torch.tensor([-1.0, 3.0, 0.5, -0.25, 2.0, 1.0, -2.0, 1.5, 0.125], device=device)
    old = (torch.randint(-64, 64, (v, d)) * 2.0**-3).to(dtype).to(device)
    exact = old.double().index_add(0, y, g.double()[:, None] * x.double())
    exact = exact.index_add(0, y, g2.double()[:, None] * x2.double())
    gw = old.clone()
    triton_impl._scatter_rows_(gw, y, g, x, (g2, x2))
    assert torch.equal(gw, exact.to(dtype))
    gw32 = old.float()
    triton_impl._scatter_rows_(gw32, y, g, x, (g2, x2))
    assert torch.equal(gw32.double(), exact)
