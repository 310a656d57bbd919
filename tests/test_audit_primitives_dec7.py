"""Adversarial audit of the per-token primitives (2026-12-07): `token_stats`, `target_logits` and their backends.

Every oracle here is float64 PyTorch written from docs/math.md (full logits, `log_softmax`, a gather), never the
library's reference backend.
"""

from __future__ import annotations

import pytest
import torch
from _device import backend_device

import tpo_fast
from tpo_fast.ops import torch_chunked
from tpo_fast.ops.options import kernel_options


def _confident_bf16(seed: int = 0, n: int = 8, d: int = 32, v: int = 64):
    """bf16 rows whose softmax puts 0.993 to 1 - 1e-12 on the target: the one-hot and softmax terms of dZ cancel."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, d, generator=g).bfloat16()
    targets = torch.randint(0, v, (n,), generator=g)
    hidden = (weight[targets].float() + 0.05 * torch.randn(n, d, generator=g)).bfloat16()
    return hidden, weight, targets


def _assert_confident_gradients(hidden, weight, targets, gh, gw) -> None:
    """gh, gw of `logp.sum()` within one rounding of the folded dZ (2^-9 of |onehot - softmax|, doubled for fp32
    accumulation), the fp32 logits' error and the result's own rounding, against float64 from the definition."""
    h64, w64 = hidden.double(), weight.double()
    logits = h64 @ w64.t()
    soft = torch.softmax(logits, -1)
    assert soft.gather(1, targets[:, None]).min() > 0.99
    dz = torch.nn.functional.one_hot(targets, weight.shape[0]).double() - soft  # d logp / d logits
    exp_gh, exp_gw = dz @ w64, dz.t() @ h64
    # the fp32 logits' own error shifts each softmax entry by a few fp32 ulps of the row's largest logit
    fp32 = 2**-20 * logits.abs().amax(1, keepdim=True) * soft
    bound_h = 2**-8 * dz.abs() @ w64.abs() + fp32 @ w64.abs() + 2**-8 * exp_gh.abs()
    bound_w = 2**-8 * dz.abs().t() @ h64.abs() + fp32.t() @ h64.abs() + 2**-8 * exp_gw.abs()
    err_h, err_w = (gh.double() - exp_gh).abs(), (gw.double() - exp_gw).abs()
    assert (err_h <= bound_h).all(), float((err_h / bound_h).max())
    assert (err_w <= bound_w).all(), float((err_w / bound_w).max())


@pytest.mark.parametrize("gemms", ["cpu_bf16_units", "cuda_bf16_products"])
def test_torch_backend_bf16_gradient_of_confident_rows(monkeypatch, gemms):
    """The torch backend's bf16 gradient GEMMs (a CPU with bf16 units; on CUDA, here run through `gemm` with widened
    operands) took dZ without its one-hot term and added `-W[y]` (`-h` for dW) after the product, whose result (or
    dZ's softmax term) was already rounded to bf16: for a confident row `softmax W - W[y]` cancelled, and the error
    of 2^-9 |W[y]| stayed in a gradient of size (1 - p_y) |W|. The hidden gradient was 25% off (relative norm), the
    weight gradient 43% (CUDA products: 20%, 17%), where the triton backend is 0.18% and 0.11% off. Bound: one
    rounding of the folded dZ (2^-9 of |onehot - softmax|, doubled for fp32 accumulation), the fp32 logits' error
    and the result's own rounding."""
    monkeypatch.setattr(torch_chunked, "cpu_has_bf16_units", lambda: True)
    if gemms == "cuda_bf16_products":
        monkeypatch.setattr(torch_chunked, "needs_fp32_weight", lambda hidden, bf16: not bf16)
    hidden, weight, targets = _confident_bf16()
    assert torch_chunked.uses_bf16_gemms(hidden, weight.dtype)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = tpo_fast.token_stats(h, w, targets, backend="torch").logprobs
    gh, gw = torch.autograd.grad(logp.sum(), (h, w))

    _assert_confident_gradients(hidden, weight, targets, gh, gw)


@pytest.mark.parametrize("options", [dict(backward="atomic"), dict(backward="split", grad_filter_eps=1e-30)],
                         ids=["atomic", "filtering"])
def test_triton_atomic_backward_bf16_gradient_of_confident_rows(options):
    """The triton backend's fused atomic backward (backward="atomic", or gradient filtering) rounded each row's
    softmax entry `p_y` to bf16 with the rest of the tile and added the one-hot `-W[y]` apart, after the GEMM: for
    a confident row the two cancelled, and the hidden gradient was 20% off (relative norm), the weight gradient 17%,
    where the split backward (which folds the one-hot term into dZ before its rounding) is 0.18% and 0.11% off.
    Same bound as the torch backend's test above."""
    hidden, weight, targets = _confident_bf16(seed=0)
    dev = backend_device("triton")
    h, w = hidden.to(dev, copy=True).requires_grad_(), weight.to(dev, copy=True).requires_grad_()
    with kernel_options(**options):
        logp = tpo_fast.token_stats(h, w, targets.to(dev), backend="triton").logprobs
    gh, gw = torch.autograd.grad(logp.sum(), (h, w))
    _assert_confident_gradients(hidden, weight, targets, gh.cpu(), gw.cpu())


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_nan_upstream_gradient_on_ignored_rows_does_not_leak(backend):
    """Upstream gradients that are NaN on the ignored rows (a masked loss that divides by a zero count there) reach
    no gradient: every gradient equals float64 autograd over the kept rows alone, on all four outputs at once."""
    g = torch.Generator().manual_seed(5)
    n, d, v = 9, 16, 45
    hidden, corrupted = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    weight, bias = torch.randn(v, d, generator=g), torch.randn(v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[[0, 4, 8]] = -100
    keep = targets != -100
    ups = torch.randn(4, n, generator=g)
    ups[:, ~keep] = float("nan")
    dev = backend_device(backend)
    leaves = [t.to(dev, copy=True).requires_grad_() for t in (hidden, weight, bias, corrupted)]
    st = tpo_fast.token_stats(leaves[0], leaves[1], targets.to(dev), bias=leaves[2], corrupted_hidden=leaves[3],
                              backend=backend)
    outs = (st.logprobs, st.target_logits, st.lse, st.corrupted_target_logits)
    grads = torch.autograd.grad(outs, leaves, [u.to(dev) for u in ups])

    h64, w64, b64, c64 = (t.double().requires_grad_() for t in (hidden, weight, bias, corrupted))
    y = targets[keep]
    logits = h64[keep] @ w64.t() + b64
    lse = logits.logsumexp(-1)
    z = logits.gather(1, y[:, None]).squeeze(1)
    zc = (c64[keep] * w64[y]).sum(-1) + b64[y]
    u = ups[:, keep].double()
    total = (u[0] * (z - lse)).sum() + (u[1] * z).sum() + (u[2] * lse).sum() + (u[3] * zc).sum()
    expected = torch.autograd.grad(total, (h64, w64, b64, c64), allow_unused=True)
    for name, got, exp in zip(("hidden", "weight", "bias", "corrupted_hidden"), grads, expected, strict=True):
        exp = torch.zeros_like(got, dtype=torch.float64) if exp is None else exp
        torch.testing.assert_close(got.cpu().double(), exp, atol=1e-5, rtol=1e-5, msg=name)


def test_reference_backend_sums_clean_and_corrupted_weight_gradients_before_rounding():
    """The reference backend (the project's exact baseline) cast a 16-bit weight and bias to fp32 twice, once per
    branch: autograd rounded each branch's gradient to bf16 before adding them. TPO sends `g_z` to the clean target
    logit and `-g_z` to the corrupted one, whose hidden states are nearly equal, so the two nearly cancel: the
    weight gradient was 11% off (relative norm), where one rounding of the exact sum is 0.16%. Now within one bf16
    rounding of float64 math (plus fp32 accumulation) on every entry, for the weight and the bias."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 8, 32, 64
    weight, bias = torch.randn(v, d, generator=g).bfloat16(), torch.randn(v, generator=g).bfloat16()
    targets = torch.arange(n) * 3
    hidden = torch.randn(n, d, generator=g).bfloat16()
    corrupted = (hidden.float() + 0.01 * torch.randn(n, d, generator=g)).bfloat16()
    g_logp, g_z = torch.full((n,), 0.01), torch.ones(n)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    st = tpo_fast.token_stats(hidden, w, targets, bias=b, corrupted_hidden=corrupted, backend="reference")
    gw, gb = torch.autograd.grad([st.logprobs, st.target_logits, st.corrupted_target_logits], (w, b),
                                 [g_logp, g_z, -g_z])

    h64, w64, c64 = hidden.double(), weight.double(), corrupted.double()
    soft = torch.softmax(h64 @ w64.t() + bias.double(), -1)
    onehot = torch.nn.functional.one_hot(targets, v).double()
    dz = g_logp.double()[:, None] * (onehot - soft) + g_z.double()[:, None] * onehot
    exp_w = dz.t() @ h64 - (g_z.double()[:, None] * onehot).t() @ c64
    exp_b = dz.sum(0) - g_z.double() @ onehot
    bound_w = 2**-8 * exp_w.abs() + 2**-20 * (dz.abs().t() @ h64.abs() + onehot.t() @ c64.abs())
    bound_b = 2**-8 * exp_b.abs() + 2**-20 * (dz.abs().sum(0) + onehot.sum(0))
    err_w, err_b = (gw.double() - exp_w).abs(), (gb.double() - exp_b).abs()
    assert (err_w <= bound_w).all(), float((err_w / bound_w).max())
    assert (err_b <= bound_b).all(), float((err_b / bound_b).max())
