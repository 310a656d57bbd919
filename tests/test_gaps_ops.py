"""The Triton split backward's 16-bit path over several vocabulary chunks (issue 17).

`_split_backward` accumulates the hidden gradient chunk by chunk in fp32 (`_addmm_f32_`); for fp16 and bf16
inputs on a GPU that is cuBLAS's 16-bit x 16-bit -> fp32 product, a branch no CPU run reaches. This test
shrinks the chunk budget so that the vocabulary spans several chunks, runs on CUDA when there is one
(compiled kernels; the interpreter on CPU), and holds the gradients to fp32 truth within a bound relative
to what plain PyTorch achieves in the same dtype (err <= 2 * pytorch_err + atol). scripts/gpu_check.sh runs it.
"""

from __future__ import annotations

import pytest
import torch
from _device import backend_device

import tpo_fast
from tpo_fast.ops import triton_impl

ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _worst(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_split_backward_accumulates_16bit_chunks(monkeypatch, dtype):
    monkeypatch.setenv("TPO_FAST_BACKWARD", "split")
    monkeypatch.setenv("TPO_FAST_CHUNK_MB", "0.01")  # 10 KiB: a few hundred vocabulary columns per chunk
    calls = []
    real = triton_impl._addmm_f32_
    monkeypatch.setattr(triton_impl, "_addmm_f32_", lambda acc, a, b: calls.append(a.dtype) or real(acc, a, b))

    device = backend_device("triton")
    g = torch.Generator().manual_seed(7)
    n, d, v = 24, 32, 1500  # V not a multiple of any tile
    h32 = torch.randn(n, d, generator=g) * 2
    w32 = torch.randn(v, d, generator=g) / d**0.5
    b32 = torch.randn(v, generator=g) * 0.1
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -100
    upstream = torch.randn(n, generator=g)
    h, w, b = (t.to(device, dtype).requires_grad_() for t in (h32, w32, b32))
    (tpo_fast.token_logprobs(h, w, y.to(device), bias=b, backend="triton") * upstream.to(device)).sum().backward()
    assert len(calls) >= 2 and set(calls) == {dtype}, calls  # the gradient spans 3 or more chunks

    # fp32 truth on the same (rounded) inputs, and plain PyTorch in the input dtype.
    exact = [t.detach().cpu().float().requires_grad_() for t in (h, w, b)]
    valid = y != -100
    logits = exact[0] @ exact[1].t() + exact[2]
    (logits.log_softmax(-1).gather(-1, y.clamp(min=0)[:, None]).squeeze(-1) * valid * upstream).sum().backward()
    naive = [t.detach().cpu().to(dtype).requires_grad_() for t in (h, w, b)]
    logits16 = naive[0] @ naive[1].t() + naive[2]
    (logits16.log_softmax(-1).gather(-1, y.clamp(min=0)[:, None]).squeeze(-1) * valid * upstream.to(dtype)).sum() \
        .backward()
    for name, t, e, p in zip(("hidden", "weight", "bias"), (h, w, b), exact, naive, strict=True):
        assert t.grad.dtype == dtype
        err, bound = _worst(t.grad.cpu(), e.grad), 2 * _worst(p.grad, e.grad) + ATOL[dtype]
        assert err <= bound, f"grad {name}: worst error {err:.3g} > {bound:.3g}"
