"""The torch backend's bf16 GEMMs on a CPU (`torch_chunked.bf16_gemms`, `torch_chunked.gradient_gemms`).

With bf16 hidden states and weight on a CPU with bf16 units (AMX or AVX512-BF16), the backend's GEMMs run
on them. The logits GEMM runs in oneDNN's bf16 mode (`bf16_gemms`: each fp32 operand rounded to bf16, fp32
accumulation and results), where that rounding changes nothing (every operand value already is a bf16 number).
The gradient GEMMs (`gradient_gemms`) take dZ rounded once to bf16 in its own buffer (`narrow_to_bf16`), as
the triton backend does, and run as native bf16 products. These tests pin what makes that safe: the mode is
on only with bf16 inputs (never with fp32 or fp16 ones, nor without bf16 units), it is restored afterwards (also
after an error), the logits keep fp32 accuracy, the narrowing equals a cast, and the gradients stay within one
bf16 rounding of dZ and one of their own of float64 math, computed here from the same bf16 values. The tests
answer the bf16-units check themselves, so that they test the same on every host (a host without bf16 units runs
the mode's GEMMs in fp32, and the native bf16 products without the units' speed).
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


@pytest.fixture(autouse=True)
def bf16_units(monkeypatch):
    """The bf16-units check, answered True unless a test says otherwise."""
    monkeypatch.setattr(torch_chunked, "cpu_has_bf16_units", lambda: True)


@pytest.fixture
def calls(monkeypatch):
    """The `enabled` argument of every `bf16_gemms` region the backend opens, and the setting seen inside."""
    seen: list[tuple[bool, str | None]] = []
    real = torch_chunked.bf16_gemms

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

    monkeypatch.setattr(torch_chunked, "bf16_gemms", spy)
    return seen


@pytest.fixture
def mms(monkeypatch):
    """The operand dtypes and the first operand's shape of every `torch.mm` (the gradient GEMMs; the logits GEMM
    is a `@`)."""
    seen: list[tuple[torch.dtype, torch.dtype, tuple[int, ...]]] = []
    real = torch.mm

    def spy(a, b, **kw):
        seen.append((a.dtype, b.dtype, tuple(a.shape)))
        return real(a, b, **kw)

    monkeypatch.setattr(torch, "mm", spy)
    return seen



@pytest.fixture
def keep_legacy_precision():
    legacy = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(legacy)


@pytest.mark.skipif(not HAS_SETTING, reason="this torch has no torch.backends.mkldnn.matmul.fp32_precision")
@pytest.mark.parametrize("user", [None, "high", "medium"], ids=["default", "high", "medium"])
def test_setting_is_scoped_and_restored(keep_legacy_precision, user):
    if user is not None:  # a user's own global setting, through the legacy API
        torch.set_float32_matmul_precision(user)
    matmul = torch.backends.mkldnn.matmul
    before, before_legacy = matmul.fp32_precision, torch.get_float32_matmul_precision()
    with torch_chunked.bf16_gemms(True):
        assert matmul.fp32_precision == "bf16"
    assert matmul.fp32_precision == before
    with pytest.raises(RuntimeError, match="boom"), torch_chunked.bf16_gemms(True):
        raise RuntimeError("boom")
    assert matmul.fp32_precision == before
    with torch_chunked.bf16_gemms(False):
        assert matmul.fp32_precision == before
    # the legacy API still reads (and so still works) after the region
    assert torch.get_float32_matmul_precision() == before_legacy


def test_only_bf16_inputs_on_a_cpu_with_bf16_units(monkeypatch):
    h = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert torch_chunked.uses_bf16_gemms(h, torch.bfloat16)
    monkeypatch.setattr(torch_chunked, "cpu_has_bf16_units", lambda: False)
    assert not torch_chunked.uses_bf16_gemms(h, torch.bfloat16)
    monkeypatch.setattr(torch_chunked, "cpu_has_bf16_units", lambda: True)
    assert not torch_chunked.uses_bf16_gemms(h, torch.float32)
    assert not torch_chunked.uses_bf16_gemms(h.float(), torch.bfloat16)
    assert not torch_chunked.uses_bf16_gemms(h.half(), torch.float16)
    assert not torch_chunked.uses_bf16_gemms(h.to("meta"), torch.bfloat16)  # not a CPU tensor
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # a torch built without oneDNN
    assert not torch_chunked.uses_bf16_gemms(h, torch.bfloat16)


@pytest.mark.parametrize("amx,avx512_bf16,expected", [(True, False, True), (False, True, True), (True, True, True),
                                                     (False, False, False)])
def test_the_bf16_units_check_asks_torch(monkeypatch, amx, avx512_bf16, expected):
    """AMX tiles or AVX512-BF16, each asked of torch; neither (an AVX2 CPU) keeps fp32."""
    monkeypatch.undo()  # the real check, not the fixture's answer
    real = torch_chunked.cpu_has_bf16_units
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert real() is expected


def test_the_bf16_units_check_without_an_answer(monkeypatch):
    """A torch without a probe, or a probe that fails (cpuinfo), counts as no bf16 units; the other probe still
    answers."""
    monkeypatch.undo()
    real = torch_chunked.cpu_has_bf16_units
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert real() is False  # a torch without the probes: fp32

    def fails():
        raise RuntimeError("cpuinfo failed")

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", fails, raising=False)
    assert real() is False
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert real() is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_token_stats_forward_and_backward(calls, mms, monkeypatch, dtype):
    monkeypatch.setattr(torch_chunked, "_chunk_rows", lambda v: 16)  # 36 valid rows in 3 chunks
    hidden, weight, targets = _inputs(dtype)
    hidden.requires_grad_()
    weight.requires_grad_()
    out = tpo_fast.token_stats(hidden, weight, targets, backend="torch")
    out.logprobs.sum().backward()
    on = dtype == torch.bfloat16
    # the logits GEMM in the mode: 3 forward chunks, and the 3 recomputed in backward
    assert [e for e, _ in calls] == [on] * 6
    if HAS_SETTING:
        assert all((inside == "bf16") == on for _, inside in calls)
    # per backward chunk the two gradient GEMMs: native bf16 with bf16 units; else fp32, where dW's later chunks
    # accumulate in place (`addmm_`, not a `torch.mm`)
    dtypes = [(a, b) for a, b, _ in mms]
    if on:
        assert dtypes == [(torch.bfloat16, torch.bfloat16)] * 6
    else:
        assert dtypes == [(torch.float32, torch.float32)] * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_loss_policy_and_reference_branches(calls, mms, dtype):
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
    # the logits GEMMs of one policy chunk and one reference forward chunk in the mode; the policy chunk's two
    # gradient GEMMs native bf16 with bf16 units
    assert [e for e, _ in calls] == [dtype == torch.bfloat16] * 2
    assert [(a, b) for a, b, _ in mms] == [(dtype, dtype)] * 2


def _oracle(hidden, weight, targets, coef):
    """float64 logp and d(sum coef * logp)/dh on the same (bf16) values."""
    h64, w64 = hidden.detach().double(), weight.detach().double()
    valid = targets != -100
    logits = h64 @ w64.t()
    y = targets.clamp(min=0)
    logp = torch.log_softmax(logits, -1).gather(1, y[:, None]).squeeze(1) * valid
    grad = (coef.double() * valid)[:, None] * (w64[y] - torch.softmax(logits, -1) @ w64)
    return logp, grad


@pytest.mark.parametrize("seed", [1, 2])
def test_bf16_results_against_float64(monkeypatch, seed):
    """logp keeps fp32 accuracy (a GEMM that rounded its logits to bf16 misses the bound by orders of
    magnitude); the hidden gradient, returned in bf16, is within one rounding of dZ and its own rounding
    of float64 math."""
    hidden, weight, targets = _inputs(torch.bfloat16, seed=seed)
    hidden.requires_grad_()
    monkeypatch.setattr(torch_chunked, "_chunk_rows", lambda v: 16)
    out = tpo_fast.token_stats(hidden, weight, targets, backend="torch")
    coef = torch.linspace(-1, 1, N)
    (out.logprobs * coef).sum().backward()
    logp, grad = _oracle(hidden, weight, targets, coef)
    assert (out.logprobs.double() - logp).abs().max() < 2e-5
    # dZ rounded once: 2^-9 of each softmax term, which sum to |coef| per row, each times |W[v, d]|; and
    # the gradient's own rounding to bf16 (2^-9, doubled for the accumulations in fp32)
    bound = 2**-9 * coef.abs()[:, None] * weight.double().abs().max() + 2**-8 * grad.abs()
    err = (hidden.grad.double() - grad).abs()
    assert (err <= bound).all(), float((err / bound).max())


def test_a_cpu_without_bf16_units_keeps_fp32(calls, monkeypatch):
    monkeypatch.setattr(torch_chunked, "cpu_has_bf16_units", lambda: False)
    monkeypatch.setattr(torch_chunked, "_chunk_rows", lambda v: 16)
    hidden, weight, targets = _inputs(torch.bfloat16)
    hidden.requires_grad_()
    tpo_fast.token_stats(hidden, weight, targets, backend="torch").logprobs.sum().backward()
    assert [e for e, _ in calls] == [False] * 6


@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 7), (2, 3), (3, 5), (5, 300), (17, 31), (64, 9), (0, 4), (3, 0)])
def test_narrowing_equals_a_cast_in_the_same_memory(rows, cols):
    """Every row block, row 0 (whose bf16 half lies inside itself) included, bit for bit as `.bfloat16()`:
    NaN, infinities, a value that rounds to bf16's infinity, and ties of the round-to-nearest-even."""
    g = torch.Generator().manual_seed(rows * 100 + cols)
    x = torch.randn(rows, cols, generator=g) * 30
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0])
    flat = x.view(-1)
    flat[: min(flat.numel(), special.numel())] = special[: flat.numel()]
    if flat.numel() > 20:
        flat[-3:] = special[:3]  # in the last row block too
    expected = x.bfloat16()
    out = torch_chunked.narrow_to_bf16(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, cols)
    assert out.numel() == 0 or out.data_ptr() == x.data_ptr()  # no second buffer
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("bad", ["bf16", "fp64", "strided"])
def test_narrowing_refuses_what_it_cannot_overwrite(bad):
    x = {"bf16": torch.zeros(3, 4, dtype=torch.bfloat16), "fp64": torch.zeros(3, 4, dtype=torch.float64),
         "strided": torch.zeros(4, 3).t()}[bad]
    with pytest.raises(ValueError, match="narrow_to_bf16 needs a contiguous float32 buffer"):
        torch_chunked.narrow_to_bf16(x)


@pytest.mark.parametrize("seed,block_rows", [(3, None), (4, 7), (5, 1)])
def test_bf16_weight_gradient_against_float64(monkeypatch, mms, seed, block_rows):
    """The weight gradient of 3 chunks, each chunk's native bf16 product rounded once and summed in fp32, in one
    block of vocabulary rows or several (7 rows: 43 blocks, the last one short): within the rounding of dZ and of
    each chunk's product (2^-9 of the |softmax| terms each, doubled for fp32's own error) and the gradient's own
    rounding of float64 math. A chunk's product that replaced the sum, a block left out or a dZ narrowed wrongly
    is off by whole entries."""
    hidden, weight, targets = _inputs(torch.bfloat16, seed=seed)
    weight.requires_grad_()
    monkeypatch.setattr(torch_chunked, "_chunk_rows", lambda v: 16)  # 36 valid rows in 3 chunks
    if block_rows is not None:
        monkeypatch.setattr(torch_chunked, "DW_BLOCK_BYTES", 4 * D * block_rows)
    out = tpo_fast.token_stats(hidden, weight, targets, backend="torch")
    coef = torch.linspace(-1, 1, N)
    (out.logprobs * coef).sum().backward()
    h64, w64 = hidden.double(), weight.detach().double()
    valid = (targets != -100).double()
    soft = torch.softmax(h64 @ w64.t(), -1)
    onehot = torch.nn.functional.one_hot(targets.clamp(min=0), V).double()
    c = (coef.double() * valid)[:, None]
    grad = (c * (onehot - soft)).t() @ h64
    bound = 2**-7 * (c.abs() * soft).t() @ h64.abs() + 2**-8 * grad.abs()
    err = (weight.grad.double() - grad).abs()
    assert (err <= bound).all(), float((err / bound).max())
    # the dW products (dZ^T blocks: (block, rows)), never more vocabulary rows at once than a block holds
    blocks = [shape[0] for _, _, shape in mms if shape[1] != V]
    step = V if block_rows is None else block_rows
    per_chunk = [step] * (V // step) + ([V % step] if V % step else [])
    assert blocks == per_chunk * 3
