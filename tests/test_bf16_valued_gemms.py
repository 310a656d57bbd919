"""The torch backend's bf16-valued logits GEMM on a CPU (`torch_chunked.bf16_valued_gemms`).

With bf16 hidden states and weight, the fp32 logits GEMM may run on the CPU's bf16 units: oneDNN
rounds each operand to bf16, which changes nothing when every value already is a bf16 number, and
accumulates in fp32. These tests pin the three things that make that safe: the setting is on only
for bf16 x bf16 logits GEMMs (never with an fp32 or fp16 operand, never for the dZ GEMMs), it is
restored afterwards (also after an error), and the results keep fp32 accuracy against a float64
oracle computed here from the same bf16 values.
"""

from __future__ import annotations

import pytest
import torch

import tpo_fast
from tpo_fast.loss import tpo_loss
from tpo_fast.ops import torch_chunked

N, D, V = 40, 24, 300
HAS_SETTING = hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision")


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, D, generator=g) * 2).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[0, 7, 8, N - 1]] = -100
    return hidden, weight, targets


@pytest.fixture
def calls(monkeypatch):
    """The `enabled` argument of every `bf16_valued_gemms` region the backend opens, and the setting
    seen inside it."""
    seen: list[tuple[bool, str | None]] = []
    real = torch_chunked.bf16_valued_gemms

    def spy(enabled):
        cm = real(enabled)

        class Recorded:
            def __enter__(self):
                cm.__enter__()
                inside = torch.backends.mkldnn.matmul.fp32_precision if HAS_SETTING else None
                seen.append((enabled, inside))

            def __exit__(self, *exc):
                return cm.__exit__(*exc)

        return Recorded()

    monkeypatch.setattr(torch_chunked, "bf16_valued_gemms", spy)
    return seen


@pytest.mark.skipif(not HAS_SETTING, reason="this torch has no torch.backends.mkldnn.matmul.fp32_precision")
def test_setting_is_scoped_and_restored():
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    with torch_chunked.bf16_valued_gemms(True):
        assert matmul.fp32_precision == "bf16"
    assert matmul.fp32_precision == before
    with pytest.raises(RuntimeError, match="boom"), torch_chunked.bf16_valued_gemms(True):
        raise RuntimeError("boom")
    assert matmul.fp32_precision == before
    with torch_chunked.bf16_valued_gemms(False):
        assert matmul.fp32_precision == before


def test_only_bf16_times_bf16_on_a_cpu():
    h = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert torch_chunked.bf16_values(h, torch.bfloat16)
    assert not torch_chunked.bf16_values(h, torch.float32)
    assert not torch_chunked.bf16_values(h.float(), torch.bfloat16)
    assert not torch_chunked.bf16_values(h.half(), torch.float16)
    assert not torch_chunked.bf16_values(h.to("meta"), torch.bfloat16)  # not a CPU tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_token_stats_forward_and_backward(calls, monkeypatch, dtype):
    monkeypatch.setattr(torch_chunked, "_chunk_rows", lambda v: 16)  # 36 valid rows in 3 chunks
    hidden, weight, targets = _inputs(dtype)
    hidden.requires_grad_()
    weight.requires_grad_()
    out = tpo_fast.token_stats(hidden, weight, targets, backend="torch")
    out.logprobs.sum().backward()
    on = dtype == torch.bfloat16
    assert [e for e, _ in calls] == [on] * 6  # 3 forward chunks, 3 recomputed in backward
    if HAS_SETTING:
        assert all((inside == "bf16") == on for _, inside in calls)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_loss_policy_and_reference_branches(calls, dtype):
    g = torch.Generator().manual_seed(3)
    b, t = 2, 9
    weight = (torch.randn(V, D, generator=g) * 0.5).to(dtype).requires_grad_()
    hidden = torch.randn(2 * b, t, D, generator=g).to(dtype).requires_grad_()
    corrupted = torch.randn(2 * b, t, D, generator=g).to(dtype)
    ref_hidden = torch.randn(2 * b, t, D, generator=g).to(dtype)
    targets = torch.randint(0, V, (2 * b, t), generator=g)
    targets[:, :3] = -100
    out = tpo_loss(weight, hidden, corrupted, targets, ref_hidden=ref_hidden, ref_corrupted_hidden=corrupted,
                   backend="torch", grad_mode="fused")
    out.loss.backward()
    # one policy chunk (stats) and one reference forward chunk, each a bf16 x bf16 GEMM with bf16 inputs
    assert [e for e, _ in calls] == [dtype == torch.bfloat16] * 2


def test_bf16_results_keep_fp32_accuracy(monkeypatch):
    """logp and the hidden gradient of bf16 inputs against float64 math on the same bf16 values: the
    bound is fp32's (a GEMM that rounded its logits, or an fp32-valued operand, to bf16 misses it by
    orders of magnitude)."""
    hidden, weight, targets = _inputs(torch.bfloat16, seed=1)
    hidden.requires_grad_()
    monkeypatch.setattr(torch_chunked, "_chunk_rows", lambda v: 16)
    out = tpo_fast.token_stats(hidden, weight, targets, backend="torch")
    coef = torch.linspace(-1, 1, N)
    (out.logprobs * coef).sum().backward()
    h64, w64 = hidden.detach().double(), weight.double()
    valid = targets != -100
    logits = h64 @ w64.t()
    logp = torch.log_softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1) * valid
    assert (out.logprobs.double() - logp).abs().max() < 2e-5
    # d(sum coef * logp)/dh = coef * (W[y] - softmax @ W) on valid rows
    grad = (coef.double() * valid)[:, None] * (w64[targets.clamp(min=0)] - torch.softmax(logits, -1) @ w64)
    # the gradient comes back in bf16 (the input's dtype): compare within one bf16 rounding of it
    assert torch.allclose(hidden.grad.double(), grad, rtol=2**-8, atol=1e-6)
