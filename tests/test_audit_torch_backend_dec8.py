"""Adversarial audit of the `torch` backend's GEMM routes and the kernel options (2026-12-08).

The routes of `torch_chunked` (fp32 GEMMs of fp32 copies; bf16 operands on a CPU with bf16 units; cuBLAS's bf16
products with fp32 results on CUDA, run here through `gemm` with widened operands) are forced by patching the
feature checks. Every oracle is float64 PyTorch written from docs/math.md (full logits, `log_softmax`, a gather),
never the library's reference backend.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

import tpo_fast
from tpo_fast.loss.dpo import dpo_loss
from tpo_fast.ops import torch_chunked
from tpo_fast.ops.options import ENV_VARS, KernelOptions, current_options, kernel_options

N, D, V = 29, 24, 40
IGNORED = [2, 9, 10, 27]
# unit roundoff of the gradients' dtype, doubled (the rounded dZ and the rounded result, see the bound below)
UNIT = {torch.float32: 2.0**-20, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)


def _route(monkeypatch, route: str) -> None:
    """Force one of the torch backend's GEMM routes on this CPU."""
    monkeypatch.setattr(torch_chunked, "cpu_has_bf16_units", lambda: route in ("cpu_bf16_units", "cuda_products"))
    if route == "cuda_products":  # the bf16 weight itself into `gemm.mm_f32`, no fp32 copy, as on CUDA
        monkeypatch.setattr(torch_chunked, "needs_fp32_weight", lambda hidden, bf16: not bf16)
    monkeypatch.setattr(torch_chunked, "_chunk_rows", lambda v: 7)  # 25 target rows in 4 chunks


def _inputs(dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = (3 * torch.randn(N, D, generator=g)).to(dtype)
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    corrupted = (hidden.float() + 0.2 * torch.randn(N, D, generator=g)).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[IGNORED] = -100
    upstream = [torch.randn(N, generator=g) for _ in range(4)]  # on logp, z, lse, z~
    return hidden, weight, bias, corrupted, targets, upstream


@pytest.mark.parametrize(
    ("dtype", "route"),
    [(torch.float32, "plain"), (torch.float16, "plain"), (torch.bfloat16, "plain"),
     (torch.bfloat16, "cpu_bf16_units"), (torch.bfloat16, "cuda_products")],
    ids=["fp32", "fp16", "bf16-widened", "bf16-cpu-units", "bf16-cuda-products"],
)
def test_every_gemm_route_against_float64(monkeypatch, dtype, route):
    """Every route, with a bias, a corrupted branch, upstream gradients on all four outputs, ignored rows and
    several chunks: the statistics to fp32 accuracy (every route's logits are fp32 sums of exact products), and
    each gradient within the bound of its route. A 16-bit route rounds dZ once (target entries excluded) and, on a
    CPU with bf16 units, each chunk's product once, then the gradient once to its dtype: 2^-8 of |dZ| |W| (|dZ|^T |H|,
    the corrupted rows' |g~| |H~| for dW) and 2^-8 of the gradient, doubled as headroom (`UNIT`)."""
    _route(monkeypatch, route)
    hidden, weight, bias, corrupted, targets, up = _inputs(dtype)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias, corrupted)]
    st = tpo_fast.token_stats(leaves[0], leaves[1], targets, bias=leaves[2], corrupted_hidden=leaves[3],
                              backend="torch")
    outs = (st.logprobs, st.target_logits, st.lse, st.corrupted_target_logits)
    gh, gw, gb, ghc = torch.autograd.grad(sum((u * o).sum() for u, o in zip(up, outs, strict=True)), leaves)

    # float64 from the definition
    h, w, b, c = (t.double() for t in (hidden, weight, bias, corrupted))
    valid = (targets != -100).double()
    y = targets.clamp(min=0)
    logits = h @ w.t() + b
    lse = torch.logsumexp(logits, -1)
    z = logits.gather(1, y[:, None]).squeeze(1)
    zc = (c * w[y]).sum(-1) + b[y]
    for got, exp in zip(outs, (z - lse, z, lse, zc), strict=True):
        torch.testing.assert_close(got.double(), exp * valid, rtol=1e-6, atol=1e-5)
    g_logp, g_z, g_lse, g_zc = (u.double() * valid for u in up)
    onehot = torch.nn.functional.one_hot(y, V).double()
    dz = (g_lse - g_logp)[:, None] * torch.softmax(logits, -1) + (g_logp + g_z)[:, None] * onehot
    dzc = g_zc[:, None] * onehot
    u = UNIT[dtype]
    for got, exp, scale in (
        (gh, dz @ w, dz.abs() @ w.abs()),
        (gw, dz.t() @ h + dzc.t() @ c, dz.abs().t() @ h.abs() + dzc.abs().t() @ c.abs()),
        (gb, dz.sum(0) + dzc.sum(0), dz.abs().sum(0) + dzc.abs().sum(0)),
        (ghc, dzc @ w, dzc.abs() @ w.abs()),
    ):
        err, bound = (got.double() - exp).abs(), u * (scale + exp.abs())
        assert (err <= bound).all(), float((err / bound.clamp_min(1e-300)).max())


@pytest.mark.skipif(not hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"),
                    reason="this torch has no torch.backends.mkldnn.matmul.fp32_precision")
def test_overlapping_bf16_regions_give_back_the_setting_they_found():
    """Two threads' bf16 logits GEMMs (`bf16_gemms`) overlap: the second region found the first's "bf16" and put it
    back on exit, after the first had restored the user's setting, so oneDNN's bf16 mode stayed on for the rest of
    the process (two threads calling `token_stats` on bf16 inputs 30 times each left it on in 3 runs of 3): every
    later fp32 GEMM, the user's own model included, rounded its operands to bf16 on a CPU with bf16 units. The
    regions are entered and left here in the order two threads can take."""
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    assert before != "bf16"
    first, second = torch_chunked.bf16_gemms(True), torch_chunked.bf16_gemms(True)
    try:
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert matmul.fp32_precision == "bf16"  # the second thread's GEMM still runs in the mode
        second.__exit__(None, None, None)
        assert matmul.fp32_precision == before
    finally:
        matmul.fp32_precision = before  # never left on for the tests after this one


@pytest.mark.parametrize("value", ["1e-7", "1e308"], ids=["zero-bytes", "overflow"])
def test_a_chunk_budget_the_loss_cannot_use_names_the_variable(monkeypatch, value):
    """TPO_FAST_CHUNK_MB=1e-7 passed the check, was 0 bytes as an int and stopped the fused losses with "chunk_bytes
    must be a positive number of bytes, got 0", an argument the caller never passed; 1e308 passed too and crashed
    in `KernelOptions.chunk_bytes` with "OverflowError: cannot convert float infinity to integer". Both are now
    refused where the variable is read, naming it."""
    monkeypatch.setenv("TPO_FAST_CHUNK_MB", value)
    hidden, weight, _, _, targets, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"TPO_FAST_CHUNK_MB must be a positive, finite number of MiB, got '"
                                         + value + r"': a budget from one byte \(2\*\*-20 MiB\) to 1e\+300 MiB"):
        dpo_loss(weight.requires_grad_(), hidden[:28].view(4, 7, D), targets[:28].view(4, 7),
                 ref_seq_scores=torch.zeros(4), backend="torch")


def test_the_smallest_and_largest_chunk_budgets_give_the_oracle_loss():
    """One byte (each chunk one pair, the fewest whole pairs) and 1e300 MiB (one chunk) give the float64 DPO loss
    (sigmoid, beta 0.1, S = sum of the response tokens' log-probs) and its weight gradient."""
    hidden, weight, _, _, targets, _ = _inputs(torch.float32, seed=1)
    h3, t2 = hidden[:28].view(4, 7, D), targets[:28].view(4, 7)
    ref = torch.tensor([0.3, -0.2, 0.1, 0.4])
    w64 = weight.double().requires_grad_()
    logp = torch.log_softmax(h3.double() @ w64.t(), -1).gather(-1, t2.clamp(min=0)[..., None]).squeeze(-1)
    s = (logp * (t2 != -100)).sum(-1) - ref.double()
    expected = -torch.nn.functional.logsigmoid(0.1 * (s[:2] - s[2:])).mean()
    (expected_gw,) = torch.autograd.grad(expected, w64)
    for mb in (2.0**-20, 1e300):
        w = weight.clone().requires_grad_()
        with kernel_options(chunk_mb=mb):
            assert current_options().chunk_bytes(1.0) == int(mb * 2**20)
            loss = dpo_loss(w, h3, t2, ref_seq_scores=ref, backend="torch").loss
        (gw,) = torch.autograd.grad(loss, w)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gw.double(), expected_gw, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [5, b"/tmp/ext"], ids=["int", "bytes"])
def test_ext_cache_must_be_a_folder(bad):
    """A number stopped in `os.fspath` without naming the field; bytes passed and would fail only inside the
    extension's build (`pathlib.Path(b"...")`)."""
    with pytest.raises(TypeError, match=r"ext_cache must be a folder \(a str or a pathlib.Path\) or None, got "):
        KernelOptions(ext_cache=bad)
    assert KernelOptions(ext_cache=pathlib.Path("/tmp/ext")).ext_cache == "/tmp/ext"


@pytest.mark.parametrize("bad", [{"backward": "atomic"}, "atomic", KernelOptions], ids=["dict", "str", "class"])
def test_kernel_options_takes_keywords(bad):
    """`kernel_options({"backward": "atomic"})` (fields given as a dict) said only "replace() should be called on
    dataclass instances"."""
    with pytest.raises(TypeError, match=r"kernel_options takes a KernelOptions \(or None\) and fields as keywords"):
        with kernel_options(bad):
            pass
    with kernel_options(KernelOptions(backward="atomic"), grad_filter_eps=1e-6) as opts:
        assert (opts.backward, opts.grad_filter_eps) == ("atomic", 1e-6)
