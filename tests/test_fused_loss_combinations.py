"""The fused-gradient pair losses on random combinations of their options, against plain autograd.

The parametrized tests in test_fused_loss.py vary one thing at a time; a bug may need two (a frozen weight
with a bias and a model reference split over chunks, say). Each case here draws, from its seed: the loss (TPO,
DPO, POVID), B, T, D, V (odd, small), a bias, which inputs require grad, a target mask (random holes, prompts,
a sequence without response tokens, none), the logit scale, every loss option (loss type, label smoothing,
beta, averaging, TPO's weighting, offset and detached weights, POVID's noise weight), the reference form
(a model with or without its corrupted branch, sequence scores, token log-probs, none), the chunk budget
(one pair's rows or less up to all rows), the upstream gradient and, for the triton backend, its tiles (16 or
32 wide: several vocabulary tiles), loads (TMA or plain) and gradient GEMMs (torch or Triton); fp32, and bf16
on the same values. The fused path's loss, metrics and every
gradient must match the same loss on the reference backend with `grad_mode="recompute"`: autograd through
materialized logits, none of the fused code (chunk plan, stored statistics, in-place dZ, gathered corrupted
branch, Triton kernels). The seeds are fixed: a failure names its seed and every drawn option.
"""

from __future__ import annotations

import random

import pytest
import torch
from _device import backend_device

from tpo_fast.loss import dpo_loss, povid_loss, tpo_loss
from tpo_fast.ops.options import kernel_options

LOSSES = {"tpo": tpo_loss, "dpo": dpo_loss, "povid": povid_loss}
INPUTS = ("weight", "bias", "hidden", "corrupted_hidden")


def draw(seed: int) -> dict:
    """One case: tensors on the CPU (the loss's positional inputs, reference keywords) and options."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    loss = rng.choice(list(LOSSES))
    b, t, d, v = rng.randint(1, 4), rng.randint(1, 9), rng.randint(1, 17), rng.randint(2, 70)
    n = 2 * b * t
    targets = torch.randint(0, v, (2 * b, t), generator=g)
    mask = rng.choice(["holes", "prompts", "a sequence without response", "none"])
    if mask == "holes":
        targets[torch.rand(2 * b, t, generator=g) < 0.4] = -100
    elif mask == "prompts":
        for s in range(2 * b):
            targets[s, :rng.randint(0, t)] = -100
    elif mask == "a sequence without response":
        targets[rng.randrange(2 * b)] = -100
    scale = rng.choice([0.1, 1.0, 5.0])

    def randn(*shape, s=1.0):
        return torch.randn(*shape, generator=g) * s

    hidden = randn(n, d)
    n_corrupted = b * t if loss == "povid" else n  # POVID's corrupted branch: the chosen sequences only
    tensors = {
        "weight": randn(v, d, s=scale), "hidden": hidden,
        "corrupted_hidden": hidden[:n_corrupted] + randn(n_corrupted, d, s=rng.choice([0.01, 1.0])),
        "bias": randn(v) if rng.random() < 0.3 else None, "targets": targets,
    }
    grad = {k: rng.random() < 0.75 for k in INPUTS}
    grad["hidden"] = grad["hidden"] or not any(grad.values())
    opts = {"beta": rng.choice([0.1, 0.5, 2.0]), "loss_type": rng.choice(["sigmoid", "hinge", "ipo"]),
            "average_log_prob": rng.random() < 0.3}
    opts["label_smoothing"] = rng.choice([0.0, 0.0, 0.2]) if opts["loss_type"] == "sigmoid" else 0.0
    if loss == "tpo":
        opts.update(weighting=rng.choice(["tpo", "tpo", "none"]), offset=rng.choice([0.0, 0.5, 1.0]),
                    detach_weights=rng.random() < 0.3)
    if loss == "povid":
        opts["noise_weight"] = rng.choice([0.0, 0.5, 1.0])
    forms = ["model", "scores", "none"] + (["token log-probs"] if loss != "povid" else [])
    form = rng.choice(forms)
    ref: dict = {}
    if form == "model":
        ref = {"ref_hidden": randn(n, d), "ref_weight": randn(v, d, s=scale)}
        if tensors["bias"] is not None and rng.random() < 0.5:
            ref["ref_bias"] = randn(v)
        if loss == "povid" or loss == "tpo" and (opts["weighting"] == "tpo" or rng.random() < 0.5):
            ref["ref_corrupted_hidden"] = ref["ref_hidden"][:n_corrupted] + randn(n_corrupted, d, s=0.3)
    elif form == "scores":
        ref = {"ref_seq_scores": randn((3 if loss == "povid" else 2) * b, s=3.0)}
    elif form == "none":
        ref = {"reference_free": True}
    else:
        ref = {"ref_token_logprobs": -torch.rand(2 * b, t, generator=g) * 3}
        if loss == "tpo" and opts["weighting"] == "tpo":
            ref["ref_visual_scores"] = randn(2 * b, t)
    chunk_rows, upstream = rng.choice([1, 3, 8, 1000]), rng.choice([1.0, -0.7, 3.0])
    # the triton backend's tiles: the interpreter's default (one vocabulary tile here) or 16 / 32 wide (several)
    tiles = rng.choice([None, (16, 16, 16, 4, 1), (16, 32, 16, 4, 1, 2)])
    # and its loads (TMA descriptors, as on a Hopper GPU, or plain) and its two gradient GEMMs (torch or Triton)
    kernels = {"tiles": tiles, "tma": rng.choice(["auto", "1"]), "grad_gemm": rng.choice(["torch", "triton"])}
    return {
        "loss": loss, "tensors": tensors, "grad": grad, "opts": opts, "ref": ref, "v": v,
        "chunk_rows": chunk_rows, "upstream": upstream, "kernels": kernels,
        "about": f"{loss} B={b} T={t} D={d} V={v} mask={mask} scale={scale} reference={form} grad={grad} {opts}",
    }


MODEL_TENSORS = ("weight", "bias", "hidden", "corrupted_hidden", "ref_hidden", "ref_weight", "ref_bias",
                 "ref_corrupted_hidden")  # what a model in `dtype` gives; targets and precomputed scores stay as drawn


def evaluate(case: dict, device: torch.device, backend: str, grad_mode: str, dtype: torch.dtype, upcast: bool = False):
    """(loss, metrics, {input: gradient}) of one call, on fresh leaves (copies: two calls never share a `.grad`).

    The model's tensors are rounded to `dtype`; with `upcast`, then widened back to fp32 (the oracle's inputs: the
    same values, fp32 arithmetic)."""

    def cast(k, t):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.to(device, copy=True)
        if k in MODEL_TENSORS:
            t = t.to(dtype)
            t = t.float() if upcast else t
        return t

    x = {k: cast(k, t) for k, t in case["tensors"].items()}
    for k in INPUTS:
        if x[k] is not None and case["grad"][k]:
            x[k].requires_grad_()
    ref = {k: cast(k, r) for k, r in case["ref"].items()}
    corrupted = () if case["loss"] == "dpo" else (x["corrupted_hidden"],)
    budget = case["chunk_rows"] * 4 * case["v"] / 2**20  # MiB of `chunk_rows` fp32 logits rows
    with kernel_options(chunk_mb=budget, **case["kernels"]):
        out = LOSSES[case["loss"]](x["weight"], x["hidden"], *corrupted, x["targets"], x["bias"], **ref,
                                   **case["opts"], backend=backend, grad_mode=grad_mode)
    if out.loss.requires_grad:
        (out.loss * case["upstream"]).backward()
    grads = {k: x[k].grad for k in INPUTS if x[k] is not None and x[k].requires_grad}
    return out.loss.detach(), {k: m.detach() for k, m in out.metrics.items()}, grads


def close(actual: torch.Tensor | None, expected: torch.Tensor | None, name: str, about: str, tol: float = 2e-5) -> None:
    """`actual` within `tol` of the largest of `expected` (or of 1), entry by entry; NaN where `expected` has it."""
    if actual is None or expected is None:  # no gradient on one side: the other's must be zero
        other = expected if actual is None else actual
        assert other is None or not other.any(), f"{name}: one side has no gradient; {about}"
        return
    expected, actual = expected.cpu().double(), actual.cpu().double()
    tol = tol * max(1.0, expected.abs().max().item()) if expected.numel() else 0.0
    assert torch.allclose(actual, expected, rtol=1e-4, atol=tol, equal_nan=True), (
        f"{name}: max |diff| {(actual - expected).abs().max().item():.3g}; {about}")


def check(seed: int, backend: str, dtype: torch.dtype = torch.float32, grad_tol: float = 2e-5,
          device: torch.device | None = None) -> None:
    """The fused path in `dtype` (on `device`, by default the backend's test device) against the reference backend
    in fp32 on the same (rounded) values: loss and metrics within 2e-5 (both take fp32 statistics of the same
    logits), gradients within `grad_tol`."""
    case = draw(seed)
    about = (f"seed {seed}: {case['about']}, chunk rows {case['chunk_rows']}, upstream {case['upstream']}, "
             f"kernels {case['kernels']}")
    loss, metrics, grads = evaluate(case, device or backend_device(backend), backend, "fused", dtype)
    ref_loss, ref_metrics, ref_grads = evaluate(case, torch.device("cpu"), "reference", "recompute", dtype, True)
    close(loss, ref_loss, "loss", about)
    assert metrics.keys() == ref_metrics.keys(), about
    for k in ref_metrics:
        close(metrics[k], ref_metrics[k], f"metric {k}", about)
    assert grads.keys() == ref_grads.keys(), about
    for k in ref_grads:
        assert grads[k] is None or grads[k].dtype == dtype, f"gradient of {k} in {grads[k].dtype}; {about}"
        close(grads[k], ref_grads[k], f"gradient of {k}", about, grad_tol)


@pytest.mark.parametrize("seed", range(100))
def test_torch_backend(seed):
    check(seed, "torch")


@pytest.mark.parametrize("seed", range(1000, 1080))
def test_triton_backend(seed):
    check(seed, "triton")


# bf16: one rounding of each gradient (2**-8 of its largest entry, 3.9e-3), and the gradient GEMMs' inputs: the triton
# backend's take dZ rounded to bf16 and round its 16-bit dW once per chunk; so do the torch backend's on a CPU with
# bf16 units (AMX or AVX512-BF16: native bf16 products, each chunk's dW rounded once before an fp32 sum), and
# elsewhere its GEMMs take fp32 dZ. The largest errors over these seeds, all on a weight gradient: torch 9.1e-3 with
# bf16 units (seed 121, chunks of 8 rows), 4.5e-3 without; triton 6.1e-3 (9.1e-3 at seed 1026).
@pytest.mark.parametrize("seed", range(100, 160))
def test_torch_backend_bf16(seed):
    check(seed, "torch", torch.bfloat16, 1.5e-2)


@pytest.mark.parametrize("seed", range(1100, 1140))
def test_triton_backend_bf16(seed):
    check(seed, "triton", torch.bfloat16, 1.5e-2)


def test_the_draws_cover_every_option():
    """The seeds above reach every value of every option, so the combinations are not all of one kind."""
    cases = [draw(s) for seeds in (range(100), range(1000, 1080)) for s in seeds]
    seen = {(k, repr(v)) for c in cases for k, v in c["opts"].items()}
    for key, values in {"loss_type": ["sigmoid", "hinge", "ipo"], "label_smoothing": [0.0, 0.2],
                        "weighting": ["tpo", "none"], "offset": [0.0, 0.5, 1.0], "detach_weights": [False, True],
                        "average_log_prob": [False, True], "noise_weight": [0.0, 0.5, 1.0]}.items():
        assert {(key, repr(v)) for v in values} <= seen, key
    assert {c["loss"] for c in cases} == set(LOSSES)
    assert {c["chunk_rows"] for c in cases} == {1, 3, 8, 1000}
    kernels = [c["kernels"] for c in cases[100:] if c["kernels"]["tiles"] and c["v"] > c["kernels"]["tiles"][1]]
    assert len(kernels) >= 20 and {k["tiles"][1] for k in kernels} == {16, 32}  # several vocabulary tiles
    assert {(k["tma"], k["grad_gemm"]) for k in kernels} == {("auto", "torch"), ("1", "torch"), ("auto", "triton"),
                                                             ("1", "triton")}
    forms = {tuple(sorted(c["ref"])) for c in cases}
    assert {("ref_hidden", "ref_weight"), ("ref_corrupted_hidden", "ref_hidden", "ref_weight"), ("ref_seq_scores",),
            ("reference_free",), ("ref_token_logprobs",), ("ref_token_logprobs", "ref_visual_scores")} <= forms
    assert any(not c["grad"]["weight"] for c in cases) and any(c["tensors"]["bias"] is not None for c in cases)
