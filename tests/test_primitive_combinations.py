"""`token_stats` on random combinations of its inputs and kernel options, against plain autograd.

Each seed draws N, D, V (small, odd), the logit scale, a bias, the corrupted branch, `ignore_index` (-100, -1,
or 0, a real token id), the share of ignored rows (none, some, all), which inputs require grad, `return_argmax`,
on the torch backend the rows of its chunk loop (one, three, or its default: all of them here), on the triton
backend the backward (split or atomic), the tiles (the interpreter's one vocabulary tile here, or 16 / 32 wide:
several), the split backward's vocabulary chunk (all of it, or two 16-wide tiles) and the loads (TMA or
plain). A random linear combination of every differentiable output (log-probs, target logits, logsumexp,
corrupted target logits) is differentiated; outputs and gradients must match the reference backend
(materialized logits, torch autograd) in fp32 on the same values. A failure names its seed and what it drew.
"""

from __future__ import annotations

import random

import pytest
import torch
from _device import backend_device

import tpo_fast
from tpo_fast.ops import torch_chunked
from tpo_fast.ops.options import kernel_options

INPUTS = ("weight", "hidden", "corrupted_hidden", "bias")
OUTPUTS = ("logprobs", "target_logits", "lse", "corrupted_target_logits")


def draw(seed: int, backend: str) -> dict:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    n, d, v = rng.randint(1, 40), rng.randint(1, 20), rng.randint(2, 90)
    scale = rng.choice([0.1, 1.0, 5.0])
    hidden = torch.randn(n, d, generator=g)
    ignore = rng.choice([-100, -1, 0])
    targets = torch.randint(0, v, (n,), generator=g)
    ignored_share = rng.choice([0.0, 0.3, 1.0])
    targets[torch.rand(n, generator=g) < ignored_share] = ignore
    tensors = {
        "weight": torch.randn(v, d, generator=g) * scale, "hidden": hidden,
        "corrupted_hidden": hidden + torch.randn(n, d, generator=g) * 0.5 if rng.random() < 0.6 else None,
        "bias": torch.randn(v, generator=g) if rng.random() < 0.4 else None,
    }
    options = {"backward": rng.choice(["split", "atomic"])} if backend == "triton" else {}
    case = {
        "tensors": tensors, "targets": targets, "ignore": ignore, "argmax": rng.random() < 0.4,
        "grad": {k: rng.random() < 0.7 for k in INPUTS}, "options": options,
        "chunk_rows": rng.choice([1, 3, None]) if backend == "torch" else None,
        "coefficients": torch.randn(len(OUTPUTS), generator=g),
        "about": f"N={n} D={d} V={v} scale={scale} ignore_index={ignore} ignored={ignored_share}",
    }
    if backend == "triton":
        options["tiles"] = rng.choice([None, (16, 16, 16, 4, 1), (16, 32, 16, 4, 1, 2)])
        if rng.random() < 0.5:  # two 16-wide tiles per chunk of the split backward's (N, chunk) gradient buffer
            options["chunk_mb"] = n * 4 * 32 / 2**20
        options["tma"] = rng.choice(["auto", "1"])  # TMA descriptor loads, as on a Hopper GPU, or plain ones
    return case


def evaluate(case: dict, device: torch.device, backend: str, dtype: torch.dtype, upcast: bool = False):
    """(TokenStats, {input: gradient}) on fresh leaves: the inputs rounded to `dtype` (with `upcast`, widened back)."""
    x = {}
    for k, t in case["tensors"].items():
        if t is not None:
            t = t.to(device=device, dtype=dtype, copy=True)
            t = (t.float() if upcast else t).requires_grad_(case["grad"][k])
        x[k] = t
    with kernel_options(**case["options"]):
        stats = tpo_fast.token_stats(x["hidden"], x["weight"], case["targets"].to(device), bias=x["bias"],
                                     corrupted_hidden=x["corrupted_hidden"], ignore_index=case["ignore"],
                                     return_argmax=case["argmax"], backend=backend)
    total = sum((getattr(stats, k).float() * c).sum() for k, c in zip(OUTPUTS, case["coefficients"], strict=True)
                if getattr(stats, k) is not None)
    if total.requires_grad:
        total.backward()
    return stats, {k: t.grad for k, t in x.items() if t is not None and t.requires_grad}


def close(actual, expected, name: str, about: str, tol: float) -> None:
    assert (actual is None) == (expected is None), f"{name}: {actual} vs {expected}; {about}"
    if expected is None:
        return
    actual, expected = actual.cpu().double(), expected.cpu().double()
    assert torch.equal(actual.isfinite(), expected.isfinite()), f"{name}: not finite at other entries; {about}"
    finite = expected.isfinite()  # where both are finite (the line above: the same entries)
    a, e = actual[finite], expected[finite]
    bound = tol * max(1.0, e.abs().max().item()) if e.numel() else 0.0
    assert torch.allclose(a, e, rtol=1e-4, atol=bound), f"{name}: max |diff| {(a - e).abs().max().item():.3g}; {about}"


def check(monkeypatch, seed: int, backend: str, dtype: torch.dtype = torch.float32, grad_tol: float = 2e-5) -> None:
    case = draw(seed, backend)
    about = (f"seed {seed}: {case['about']}, grad={case['grad']}, argmax={case['argmax']}, {case['options']}, "
             f"chunk rows {case['chunk_rows']}")
    with monkeypatch.context() as m:
        if case["chunk_rows"]:
            m.setattr(torch_chunked, "_chunk_rows", lambda v, rows=case["chunk_rows"]: rows)
        stats, grads = evaluate(case, backend_device(backend), backend, dtype)
    want, want_grads = evaluate(case, torch.device("cpu"), "reference", dtype, upcast=True)
    for k in OUTPUTS:
        close(getattr(stats, k), getattr(want, k), k, about, 2e-5)
    if case["argmax"]:
        assert torch.equal(stats.argmax.cpu(), want.argmax), about
    for k in set(grads) | set(want_grads):
        got, expected = grads.get(k), want_grads.get(k)
        if got is None or expected is None:  # an input whose gradient one side never formed: zero on the other
            other = expected if got is None else got
            assert other is None or not other.any(), f"gradient of {k}: one side has none; {about}"
            continue
        assert got.dtype == dtype, f"gradient of {k} in {got.dtype}; {about}"
        close(got, expected, f"gradient of {k}", about, grad_tol)


@pytest.mark.parametrize("seed", range(60))
def test_torch_backend(monkeypatch, seed):
    check(monkeypatch, seed, "torch")


@pytest.mark.parametrize("seed", range(1000, 1040))
def test_triton_backend(monkeypatch, seed):
    check(monkeypatch, seed, "triton")


# bf16: the gradients are rounded once into bf16 (2**-8 of their largest entry), the triton backend's GEMMs also
# take the logits' gradient rounded to bf16.
@pytest.mark.parametrize("seed", range(100, 130))
def test_torch_backend_bf16(monkeypatch, seed):
    check(monkeypatch, seed, "torch", torch.bfloat16, 8e-3)


@pytest.mark.parametrize("seed", range(1100, 1130))
def test_triton_backend_bf16(monkeypatch, seed):
    check(monkeypatch, seed, "triton", torch.bfloat16, 1.5e-2)


def test_the_draws_cover_every_option():
    cases = [draw(s, "torch") for s in range(60)] + [draw(s, "triton") for s in range(1000, 1040)]
    assert {c["ignore"] for c in cases} == {-100, -1, 0}
    assert {c["argmax"] for c in cases} == {False, True}
    assert {c["options"].get("backward") for c in cases} == {None, "split", "atomic"}
    assert {c["options"].get("tma") for c in cases} == {None, "auto", "1"}
    tiled = [c for c in cases if c["options"].get("tiles") and c["tensors"]["weight"].shape[0] > 32]
    assert len(tiled) >= 10 and any("chunk_mb" in c["options"] and c["options"]["backward"] == "split" for c in tiled)
    assert {c["chunk_rows"] for c in cases} == {None, 1, 3}
    for k in ("corrupted_hidden", "bias"):
        assert {c["tensors"][k] is None for c in cases} == {False, True}
    assert any((c["targets"] == c["ignore"]).all() for c in cases)
    assert {c["grad"]["weight"] for c in cases} == {False, True}
