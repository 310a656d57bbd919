"""tpo_fast.loss against the materialized-logits oracle in tests/loss_reference.py.

Tiny shapes (B=2 pairs, T=7, D=24, V=67): the whole file must run in well under a minute on CPU,
also with the Triton backend under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import importlib.util
import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from _device import backend_device
from loss_reference import reference_loss, reference_scores

import tpo_fast
from tpo_fast.loss import (
    DPOLoss,
    LossOutput,
    TPOLoss,
    dpo_loss,
    log_token_weights,
    povid_loss,
    preference_loss_from_sequence_scores,
    reference_sequence_scores,
    sequence_scores,
    token_pg_loss,
    tpo_loss,
    tpo_loss_from_logprobs,
)

N_PAIRS, T, D, V = 2, 7, 24, 67
IGNORE = -100


def _has_triton_backend() -> bool:
    return importlib.util.find_spec("triton") is not None and (
        importlib.util.find_spec("tpo_fast.ops.triton_impl") is not None
    )


TRITON = pytest.param(
    "triton",
    marks=pytest.mark.skipif(not _has_triton_backend(), reason="tpo_fast.ops.triton_impl not available"),
)
BACKENDS = ["torch", "reference", TRITON]

METRIC_KEYS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
}
VISUAL_KEYS = {"visual_score/chosen", "visual_score/rejected"}


def make_batch(dtype=torch.float32, bias=True, all_padding=(), seed=0, device="cpu"):
    """Policy and reference inputs; sequences 0..B-1 chosen, B..2B-1 rejected.

    Every sequence has a masked prompt prefix and some have trailing padding; indices listed in
    `all_padding` have no response token at all. `device`: see `_device.backend_device`.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    weight = randn(V, D, scale=0.3)
    b = randn(V, scale=0.5) if bias else None
    hidden = randn(2 * N_PAIRS, T, D)
    # A corrupted image moves the hidden states a little: visual scores of order 1.
    corrupted = (hidden.float() + randn(2 * N_PAIRS, T, D, scale=0.5).float()).to(dtype)
    targets = torch.randint(0, V, (2 * N_PAIRS, T), generator=g)
    prompt = [2, 1, 3, 2]
    length = [T, T - 2, T - 1, T]
    for i in range(2 * N_PAIRS):
        targets[i, : prompt[i]] = IGNORE
        targets[i, length[i] :] = IGNORE
    for i in all_padding:
        targets[i] = IGNORE
    batch = {
        "weight": weight,
        "bias": b,
        "hidden": hidden,
        "corrupted_hidden": corrupted,
        "targets": targets,
        "ref_weight": (weight.float() + randn(V, D, scale=0.05).float()).to(dtype),
        "ref_bias": None if b is None else (b.float() + randn(V, scale=0.05).float()).to(dtype),
        "ref_hidden": (hidden.float() + randn(2 * N_PAIRS, T, D, scale=0.2).float()).to(dtype),
        "ref_corrupted_hidden": (corrupted.float() + randn(2 * N_PAIRS, T, D, scale=0.2).float()).to(dtype),
    }
    batch = {k: None if v is None else v.to(device) for k, v in batch.items()}
    for v in batch.values():
        if v is not None and v.dtype.is_floating_point:
            v.requires_grad_(True)
    return batch


POLICY_LEAVES = ("weight", "bias", "hidden", "corrupted_hidden")
REF_LEAVES = ("ref_weight", "ref_bias", "ref_hidden", "ref_corrupted_hidden")


def run_fused(batch, options, backend="torch", hidden_2d=False, ref_mode="hidden", upstream=1.7):
    """(LossOutput, {leaf name: grad or None}) of tpo_loss on `batch`."""
    flat = (lambda t: t.flatten(0, 1)) if hidden_2d else (lambda t: t)
    ref = {}
    if options.get("reference_free"):
        pass
    elif ref_mode == "hidden":
        ref = {
            "ref_hidden": flat(batch["ref_hidden"]),
            "ref_corrupted_hidden": flat(batch["ref_corrupted_hidden"]),
            "ref_weight": batch["ref_weight"],
            "ref_bias": batch["ref_bias"],
        }
    elif ref_mode == "seq":
        ref = {
            "ref_seq_scores": reference_sequence_scores(
                batch["ref_weight"],
                flat(batch["ref_hidden"]),
                flat(batch["ref_corrupted_hidden"]),
                batch["targets"],
                batch["ref_bias"],
                weighting=options.get("weighting", "tpo"),
                offset=options.get("offset", 0.5),
                average_log_prob=options.get("average_log_prob", False),
                backend=backend,
            )
        }
    elif ref_mode == "token":
        stats = tpo_fast.token_stats(
            batch["ref_hidden"].detach().flatten(0, 1),
            batch["ref_weight"].detach(),
            batch["targets"].flatten(),
            bias=None if batch["ref_bias"] is None else batch["ref_bias"].detach(),
            corrupted_hidden=batch["ref_corrupted_hidden"].detach().flatten(0, 1),
            backend=backend,
        )
        ref = {
            "ref_token_logprobs": stats.logprobs.view(batch["targets"].shape),
            "ref_visual_scores": (stats.target_logits - stats.corrupted_target_logits).view(
                batch["targets"].shape
            ),
        }
    else:
        raise AssertionError(ref_mode)
    out = tpo_loss(
        batch["weight"],
        flat(batch["hidden"]),
        flat(batch["corrupted_hidden"]),
        batch["targets"],
        batch["bias"],
        backend=backend,
        **ref,
        **options,
    )
    return out, _grads(out.loss * upstream, batch)


def run_reference(batch, options, upstream=1.7, upcast=False):
    """(loss, metrics, grads) of the oracle; `upcast` runs it in fp32 on the same values (the truth)."""
    if upcast:
        batch = {
            k: None
            if v is None
            else (v.detach().float().requires_grad_(True) if v.dtype.is_floating_point else v)
            for k, v in batch.items()
        }
    loss, metrics = reference_loss(
        batch["weight"],
        batch["hidden"],
        batch["corrupted_hidden"],
        batch["targets"],
        batch["bias"],
        ref_weight=batch["ref_weight"],
        ref_bias=batch["ref_bias"],
        ref_hidden=batch["ref_hidden"],
        ref_corrupted_hidden=batch["ref_corrupted_hidden"],
        **options,
    )
    return loss, metrics, _grads(loss * upstream, batch)


def _grads(loss, batch):
    names = [k for k in POLICY_LEAVES + REF_LEAVES if batch[k] is not None]
    grads = torch.autograd.grad(loss, [batch[k] for k in names], allow_unused=True)
    return dict(zip(names, grads, strict=True))


def assert_close(actual, expected, rtol, atol, name):
    """Elementwise |a - e| <= atol * max(1, max |e|) + rtol |e|, reporting the worst element on failure.

    atol scales with the tensor's largest element: fp32 accumulation-order error in a gradient is
    relative to the largest terms summed, not to each (possibly near-zero) element.
    """
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values {actual}"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    excess = (actual - expected).abs() - (atol * scale + rtol * expected.abs())
    if (excess > 0).any():
        i = int(excess.flatten().argmax())
        a, e = actual.flatten()[i].item(), expected.flatten()[i].item()
        raise AssertionError(f"{name}: worst element {i}: {a!r} vs expected {e!r} (|diff| {abs(a - e):.3g})")


def assert_grad_equal(actual, expected, rtol, atol, name):
    """None and an all-zero gradient are the same thing."""
    if actual is None and expected is None:
        return
    if actual is None:
        actual = torch.zeros_like(expected)
    if expected is None:
        expected = torch.zeros_like(actual)
    assert_close(actual, expected, rtol, atol, f"grad {name}")


def compare(fused_out, fused_grads, ref_loss, ref_metrics, ref_grads, rtol=1e-5, atol=1e-6):
    assert_close(fused_out.loss, ref_loss, rtol, atol, "loss")
    assert set(fused_out.metrics) == set(ref_metrics), (set(fused_out.metrics), set(ref_metrics))
    for key, value in ref_metrics.items():
        assert not fused_out.metrics[key].requires_grad, key
        assert fused_out.metrics[key].shape == (), key
        assert_close(fused_out.metrics[key], value, rtol, atol, key)
    for name in POLICY_LEAVES:
        if name in ref_grads:
            assert_grad_equal(fused_grads[name], ref_grads[name], rtol, atol, name)
    for name in REF_LEAVES:
        assert fused_grads.get(name) is None, f"{name} must get no gradient"


def _cases():
    cases = []
    for weighting, loss_type, average, reference_free in itertools.product(
        ("tpo", "none"), ("sigmoid", "hinge", "ipo"), (False, True), (False, True)
    ):
        for detach in (False, True) if weighting == "tpo" else (False,):
            for ls in (0.0, 0.2) if loss_type == "sigmoid" else (0.0,):
                opts = dict(
                    weighting=weighting,
                    loss_type=loss_type,
                    average_log_prob=average,
                    reference_free=reference_free,
                    detach_weights=detach,
                    label_smoothing=ls,
                )
                case_id = "-".join(
                    [weighting, loss_type]
                    + [
                        k
                        for k, on in (
                            ("avg", average),
                            ("reffree", reference_free),
                            ("detach", detach),
                            ("ls", ls > 0),
                        )
                        if on
                    ]
                )
                cases.append(pytest.param(opts, id=case_id))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", _cases())
def test_matches_reference_fp32(options, backend):
    batch = make_batch(device=backend_device(backend))
    out, grads = run_fused(batch, options, backend)
    assert isinstance(out, LossOutput)
    assert set(out.metrics) == METRIC_KEYS | VISUAL_KEYS
    compare(out, grads, *run_reference(batch, options))
    if options["weighting"] == "tpo" and not options["detach_weights"]:
        assert grads["corrupted_hidden"].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden_2d", [False, True], ids=["hidden3d", "hidden2d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layouts_and_bias(hidden_2d, bias, backend):
    options = dict(weighting="tpo", offset=0.5)
    batch = make_batch(bias=bias, device=backend_device(backend))
    out, grads = run_fused(batch, options, backend, hidden_2d=hidden_2d)
    compare(out, grads, *run_reference(batch, options))


@pytest.mark.parametrize("offset", [0.0, 1.0, 2.5])
def test_offsets(offset):
    options = dict(weighting="tpo", offset=offset)
    batch = make_batch()
    out, grads = run_fused(batch, options)
    compare(out, grads, *run_reference(batch, options))


def test_shared_reference_head_lora():
    """ref_weight and ref_bias default to the policy's head; it then gets gradient from the policy only."""
    options = dict(weighting="tpo")
    batch = make_batch()
    batch["ref_weight"], batch["ref_bias"] = None, None
    out = tpo_loss(
        batch["weight"],
        batch["hidden"],
        batch["corrupted_hidden"],
        batch["targets"],
        batch["bias"],
        ref_hidden=batch["ref_hidden"],
        ref_corrupted_hidden=batch["ref_corrupted_hidden"],
    )
    grads = _grads(out.loss * 1.7, batch)
    ref_loss, ref_metrics = reference_loss(
        batch["weight"],
        batch["hidden"],
        batch["corrupted_hidden"],
        batch["targets"],
        batch["bias"],
        ref_hidden=batch["ref_hidden"],
        ref_corrupted_hidden=batch["ref_corrupted_hidden"],
        **options,
    )
    compare(out, grads, ref_loss, ref_metrics, _grads(ref_loss * 1.7, batch))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("average", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("weighting", ["tpo", "none"])
def test_all_padding_sequence(weighting, average, backend):
    """A chosen and a rejected sequence without response tokens: S = 0, finite loss, no gradient there."""
    options = dict(weighting=weighting, average_log_prob=average)
    batch = make_batch(all_padding=(1, 2), device=backend_device(backend))
    out, grads = run_fused(batch, options, backend)
    compare(out, grads, *run_reference(batch, options))
    for name in ("hidden", "corrupted_hidden"):
        if grads[name] is not None:
            assert torch.all(grads[name][1:3] == 0), name
    scores = reference_sequence_scores(
        batch["weight"],
        batch["hidden"],
        batch["corrupted_hidden"],
        batch["targets"],
        batch["bias"],
        weighting=weighting,
        average_log_prob=average,
        backend=backend,
    )
    assert torch.all(scores[1:3] == 0)
    assert torch.isfinite(scores).all()


def _bf16_cases():
    return [
        pytest.param(dict(weighting="tpo"), id="tpo"),
        pytest.param(dict(weighting="tpo", detach_weights=True, average_log_prob=True), id="tpo-detach-avg"),
        pytest.param(dict(weighting="tpo", loss_type="ipo", average_log_prob=True), id="tpo-ipo-avg"),
        pytest.param(dict(weighting="none", label_smoothing=0.1), id="none-ls"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", _bf16_cases())
def test_matches_reference_bf16(options, backend):
    """bf16 inputs: fused error vs the fp32 truth <= 2 x the error of the official-style bf16 reference.

    The truth is the oracle in fp32 on the same (bf16-representable) values. The bf16 oracle, like the
    official code, runs the lm_head matmul in bf16 before casting logits to fp32: that error is the
    yardstick (flash-attn's `err <= 2 * pytorch_err + atol`). The fused path accumulates in fp32 and
    only rounds the returned gradients to bf16, so it must stay within that bound.
    """
    batch = make_batch(dtype=torch.bfloat16, all_padding=(3,), device=backend_device(backend))
    out, grads = run_fused(batch, options, backend)
    true_loss, true_metrics, true_grads = run_reference(batch, options, upcast=True)
    bf_loss, bf_metrics, bf_grads = run_reference(batch, options)

    def check(name, fused, truth, bf16_ref):
        truth = truth.detach().double()
        fused_err = (fused.detach().double() - truth).abs().max().item()
        ref_err = (bf16_ref.detach().double() - truth).abs().max().item()
        # atol: fp32 accumulation-order noise plus one bf16 rounding of the largest element.
        atol = 1e-6 + 2.0**-8 * truth.abs().max().item() * (fused.dtype == torch.bfloat16)
        assert fused_err <= 2 * ref_err + atol, (
            f"{name}: fused err {fused_err:.3g}, bf16 reference err {ref_err:.3g}"
        )

    check("loss", out.loss, true_loss, bf_loss)
    for key in true_metrics:
        check(key, out.metrics[key], true_metrics[key], bf_metrics[key])
    for name in POLICY_LEAVES:
        if true_grads.get(name) is None:
            assert grads[name] is None or torch.all(grads[name] == 0), name
            continue
        assert grads[name].dtype == torch.bfloat16
        check(f"grad {name}", grads[name], true_grads[name], bf_grads[name])
    # The yardstick is real: the bf16 oracle's loss is measurably off while the fused one is not.
    assert (bf_loss.double() - true_loss.double()).abs() > 10 * (out.loss.double() - true_loss.double()).abs()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("average", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("weighting", ["tpo", "none"])
def test_precomputed_reference_equals_reference_from_hidden(weighting, average, backend):
    options = dict(weighting=weighting, average_log_prob=average)
    batch = make_batch(device=backend_device(backend))
    base, base_grads = run_fused(batch, options, backend, ref_mode="hidden")
    for mode in ("seq", "token"):
        out, grads = run_fused(batch, options, backend, ref_mode=mode)
        compare(out, grads, base.loss, base.metrics, base_grads, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", ["tpo", "none"])
def test_reference_sequence_scores(weighting, backend):
    batch = make_batch(all_padding=(0,), device=backend_device(backend))
    for average in (False, True):
        scores = reference_sequence_scores(
            batch["ref_weight"],
            batch["ref_hidden"],
            batch["ref_corrupted_hidden"],
            batch["targets"],
            batch["ref_bias"],
            weighting=weighting,
            offset=0.7,
            average_log_prob=average,
            backend=backend,
        )
        assert scores.shape == (2 * N_PAIRS,) and scores.dtype == torch.float32 and not scores.requires_grad
        expected, _, _ = reference_scores(
            batch["ref_weight"],
            batch["ref_hidden"],
            batch["ref_corrupted_hidden"],
            batch["targets"],
            batch["ref_bias"],
            weighting,
            0.7,
            average,
            IGNORE,
        )
        assert_close(scores, expected, 1e-5, 1e-6, f"S_ref average={average}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_weighting_none_is_textbook_dpo(loss_type, backend):
    batch = make_batch(device=backend_device(backend))
    beta, targets = 0.3, batch["targets"]
    out = dpo_loss(
        batch["weight"],
        batch["hidden"],
        targets,
        batch["bias"],
        ref_hidden=batch["ref_hidden"],
        ref_weight=batch["ref_weight"],
        ref_bias=batch["ref_bias"],
        beta=beta,
        loss_type=loss_type,
        backend=backend,
    )
    same = tpo_loss(
        batch["weight"],
        batch["hidden"],
        None,
        targets,
        batch["bias"],
        ref_hidden=batch["ref_hidden"],
        ref_weight=batch["ref_weight"],
        ref_bias=batch["ref_bias"],
        beta=beta,
        loss_type=loss_type,
        weighting="none",
        backend=backend,
    )
    assert torch.equal(out.loss, same.loss)
    assert set(out.metrics) == METRIC_KEYS

    def logps(w, b, h):
        logits = (h @ w.T + b).float()
        mask = targets != IGNORE
        lp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        return (lp * mask).sum(-1)

    pi = logps(batch["weight"], batch["bias"], batch["hidden"])
    with torch.no_grad():
        ref = logps(batch["ref_weight"], batch["ref_bias"], batch["ref_hidden"])
    pi_logratios = pi[:N_PAIRS] - pi[N_PAIRS:]
    ref_logratios = ref[:N_PAIRS] - ref[N_PAIRS:]
    logits = pi_logratios - ref_logratios
    expected = {
        "sigmoid": -F.logsigmoid(beta * logits),
        "hinge": torch.relu(1 - beta * logits),
        "ipo": (logits - 1 / (2 * beta)) ** 2,
    }[loss_type].mean()
    assert_close(out.loss, expected, 1e-5, 1e-6, "loss")
    assert_close(
        out.metrics["rewards/chosen"], beta * (pi - ref)[:N_PAIRS].mean(), 1e-5, 1e-6, "rewards/chosen"
    )
    assert_close(out.metrics["logps/rejected"], pi[N_PAIRS:].mean(), 1e-5, 1e-6, "logps/rejected")
    names = ["weight", "bias", "hidden"]
    g_fused = torch.autograd.grad(out.loss, [batch[k] for k in names])
    g_expected = torch.autograd.grad(expected, [batch[k] for k in names])
    for name, a, e in zip(names, g_fused, g_expected, strict=True):
        assert_close(a, e, 1e-5, 1e-6, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_detach_weights_gradient_into_corrupted_branch(backend):
    batch = make_batch(device=backend_device(backend))
    live, live_grads = run_fused(batch, dict(detach_weights=False), backend)
    _, _, ref_grads = run_reference(batch, dict(detach_weights=False))
    assert live_grads["corrupted_hidden"] is not None and live_grads["corrupted_hidden"].abs().max() > 1e-4
    assert_close(
        live_grads["corrupted_hidden"], ref_grads["corrupted_hidden"], 1e-5, 1e-6, "grad corrupted_hidden"
    )
    detached, det_grads = run_fused(batch, dict(detach_weights=True), backend)
    gc = det_grads["corrupted_hidden"]
    assert gc is None or torch.all(gc == 0)
    # Same loss value, different gradient: the weights still enter, but as constants.
    assert torch.allclose(detached.loss, live.loss, rtol=0, atol=0)
    assert not torch.allclose(det_grads["hidden"], live_grads["hidden"])


def test_weighting_none_ignores_corrupted_for_gradient():
    """With weighting='none' a given corrupted_hidden only feeds the visual-score metrics."""
    batch = make_batch()
    out, grads = run_fused(batch, dict(weighting="none"))
    assert set(out.metrics) == METRIC_KEYS | VISUAL_KEYS
    assert grads["corrupted_hidden"] is None
    plain = dpo_loss(
        batch["weight"],
        batch["hidden"],
        batch["targets"],
        batch["bias"],
        ref_hidden=batch["ref_hidden"],
        ref_weight=batch["ref_weight"],
        ref_bias=batch["ref_bias"],
    )
    assert torch.equal(out.loss, plain.loss)


@pytest.mark.parametrize("offset", [0.0, 0.5, 1.0])
def test_log_token_weights_stable(offset):
    """log c in fp32 matches float64 truth for |s| up to 300, with the gradient k / c from docs/math.md."""
    s = torch.tensor([[-300.0, -90.0, -20.0, -1.0, 0.0], [0.0, 1.0, 20.0, 90.0, 300.0]])
    s = torch.cat([s, s.flip(1)]).requires_grad_(True)  # rows 0-1 chosen, 2-3 rejected
    log_c = log_token_weights(s, offset)
    s64 = s.detach().double()
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)[:, None]
    sig = torch.sigmoid(sign * s64)
    truth = F.logsigmoid(sign * s64) if offset == 0 else torch.log(offset + sig)
    assert log_c.dtype == torch.float32
    assert_close(log_c, truth, 1e-6, 1e-6, "log c")
    (grad,) = torch.autograd.grad(log_c.sum(), s)
    k = sig * (1 - sig)
    grad_truth = sign * k / (offset + sig)
    assert_close(grad, grad_truth, 1e-5, 1e-6, "d log c / d s")
    zero = torch.zeros(4, 3)
    at_zero = torch.log(torch.tensor(offset + 0.5))  # s = 0 on both sides: c = a + 1/2
    assert torch.allclose(log_token_weights(zero, offset), at_zero, rtol=1e-6, atol=0)


def test_from_logprobs_matches_reference_and_ignores_masked_garbage():
    """The functional form on per-token tensors; NaN/inf at masked positions change nothing."""
    batch = make_batch(all_padding=(2,))
    options = dict(weighting="tpo", average_log_prob=True)
    ref_loss, ref_metrics = reference_loss(
        batch["weight"],
        batch["hidden"],
        batch["corrupted_hidden"],
        batch["targets"],
        batch["bias"],
        ref_weight=batch["ref_weight"],
        ref_bias=batch["ref_bias"],
        ref_hidden=batch["ref_hidden"],
        ref_corrupted_hidden=batch["ref_corrupted_hidden"],
        **options,
    )
    mask = batch["targets"] != IGNORE
    flat_t = batch["targets"].flatten()
    stats = tpo_fast.token_stats(
        batch["hidden"].flatten(0, 1),
        batch["weight"],
        flat_t,
        bias=batch["bias"],
        corrupted_hidden=batch["corrupted_hidden"].flatten(0, 1),
        backend="reference",
    )
    ref_stats = tpo_fast.token_stats(
        batch["ref_hidden"].flatten(0, 1),
        batch["ref_weight"],
        flat_t,
        bias=batch["ref_bias"],
        corrupted_hidden=batch["ref_corrupted_hidden"].flatten(0, 1),
        backend="reference",
    )
    shape = batch["targets"].shape
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(shape.numel())[: shape.numel()]
    garbage = garbage.view(shape)

    def poisoned(x):
        return torch.where(mask, x.view(shape), garbage)

    logp = poisoned(stats.logprobs)
    s = poisoned(stats.target_logits - stats.corrupted_target_logits)
    out = tpo_loss_from_logprobs(
        logp,
        s,
        mask,
        poisoned(ref_stats.logprobs.detach()),
        poisoned((ref_stats.target_logits - ref_stats.corrupted_target_logits).detach()),
        **options,
    )
    assert_close(out.loss, ref_loss, 1e-5, 1e-6, "loss")
    for key, value in ref_metrics.items():
        assert_close(out.metrics[key], value, 1e-5, 1e-6, key)
    grads = torch.autograd.grad(out.loss, [batch["weight"], batch["hidden"], batch["corrupted_hidden"]])
    assert all(torch.isfinite(g).all() for g in grads)


def test_sequence_scores_and_preference_loss_helpers():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0], [-3.0, -1.0, -1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    s = torch.tensor([[0.0, 2.0, 5.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    plain = sequence_scores(logp, None, mask, "none")
    assert torch.allclose(plain, torch.tensor([-3.0, -0.5, -5.0, 0.0]))
    avg = sequence_scores(logp, None, mask, "none", average_log_prob=True)
    assert torch.allclose(avg, torch.tensor([-1.5, -0.5, -5.0 / 3, 0.0]))
    sig = torch.sigmoid
    one = torch.tensor(1.0)
    expected = torch.stack(
        [
            -3.0 + torch.log(0.5 + sig(torch.tensor(0.0))) + torch.log(0.5 + sig(torch.tensor(2.0))),
            -0.5 + torch.log(0.5 + sig(one)),
            -5.0
            + torch.log(1.5 - sig(-one))
            + torch.log(1.5 - sig(torch.tensor(0.0)))
            + torch.log(1.5 - sig(3 * one)),
            torch.tensor(0.0),
        ]
    )
    assert torch.allclose(sequence_scores(logp, s, mask, "tpo", 0.5), expected)

    pol = torch.tensor([-3.0, -1.0, -5.0, -2.0], requires_grad=True)
    ref = torch.tensor([-4.0, -1.0, -4.0, -1.0])
    out = preference_loss_from_sequence_scores(pol, ref, beta=0.5)
    logits = torch.tensor([(-3 + 5) - (-4 + 4), (-1 + 2) - (-1 + 1)])
    assert torch.allclose(out.loss, -F.logsigmoid(0.5 * logits).mean())
    assert torch.allclose(out.metrics["rewards/chosen"], torch.tensor(0.25))
    assert torch.allclose(out.metrics["rewards/rejected"], torch.tensor(-0.5))
    assert torch.allclose(out.metrics["rewards/margins"], torch.tensor(0.75))
    assert out.metrics["rewards/accuracies"].item() == 1.0
    free = preference_loss_from_sequence_scores(
        pol, None, beta=0.5, reference_free=True, label_smoothing=0.25
    )
    lf = torch.tensor([2.0, 1.0])
    assert torch.allclose(free.loss, (-0.75 * F.logsigmoid(0.5 * lf) - 0.25 * F.logsigmoid(-0.5 * lf)).mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_equal_functional(backend):
    batch = make_batch(device=backend_device(backend))
    kw = dict(beta=0.2, offset=1.0, loss_type="hinge", average_log_prob=True, backend=backend)
    module = TPOLoss(**kw)
    ref = dict(
        ref_hidden=batch["ref_hidden"],
        ref_corrupted_hidden=batch["ref_corrupted_hidden"],
        ref_weight=batch["ref_weight"],
        ref_bias=batch["ref_bias"],
    )
    a = module(
        batch["weight"], batch["hidden"], batch["corrupted_hidden"], batch["targets"], batch["bias"], **ref
    )
    b = tpo_loss(
        batch["weight"],
        batch["hidden"],
        batch["corrupted_hidden"],
        batch["targets"],
        batch["bias"],
        **ref,
        **kw,
    )
    assert torch.equal(a.loss, b.loss) and a.metrics.keys() == b.metrics.keys()
    assert "weighting='tpo'" in repr(module)
    dkw = dict(beta=0.2, label_smoothing=0.1, backend=backend)
    dref = dict(ref_hidden=batch["ref_hidden"], ref_weight=batch["ref_weight"], ref_bias=batch["ref_bias"])
    c = DPOLoss(**dkw)(batch["weight"], batch["hidden"], batch["targets"], batch["bias"], **dref)
    d = dpo_loss(batch["weight"], batch["hidden"], batch["targets"], batch["bias"], **dref, **dkw)
    assert torch.equal(c.loss, d.loss)


def _error_cases():
    def bad(**changes):
        return changes

    b = N_PAIRS * 2
    return [
        pytest.param(
            bad(targets=torch.zeros(3, T, dtype=torch.long), hidden=torch.zeros(3, T, D)),
            ValueError,
            "even, non-zero number of sequences",
            id="odd-sequences",
        ),
        pytest.param(
            bad(corrupted_hidden=torch.zeros(b, T - 1, D)),
            ValueError,
            r"corrupted_hidden must be \(2B, T, D\)",
            id="corrupted-rows",
        ),
        pytest.param(
            bad(corrupted_hidden=torch.zeros(b, T, D + 1)),
            ValueError,
            "corrupted_hidden must have the weight's hidden size D",
            id="corrupted-width",
        ),
        pytest.param(
            bad(ref_hidden=torch.zeros(b, T, D + 1)),
            ValueError,
            "ref_hidden must have the shape of hidden",
            id="ref-hidden-shape",
        ),
        pytest.param(
            bad(ref_corrupted_hidden=torch.zeros(b * T, D + 2)),
            ValueError,
            "ref_corrupted_hidden must have the weight's hidden size D",
            id="ref-corrupted-shape",
        ),
        pytest.param(
            bad(hidden=torch.zeros(b, T + 1, D)),
            ValueError,
            r"hidden must be \(2B, T, D\) = \(4, 7, D\) or \(2B\*T, D\) = \(28, D\)",
            id="targets-vs-hidden",
        ),
        pytest.param(
            bad(targets=torch.zeros(b * T, dtype=torch.long)),
            ValueError,
            r"targets must be 2-D \(2B, T\)",
            id="targets-1d",
        ),
        pytest.param(bad(targets=[1, 2]), TypeError, "targets must be a torch.Tensor", id="targets-type"),
        pytest.param(bad(beta=0.0), ValueError, "beta must be a finite number > 0", id="beta-zero"),
        pytest.param(bad(beta=-0.1), ValueError, "beta must be a finite number > 0", id="beta-negative"),
        pytest.param(bad(weighting="paper"), ValueError, "weighting must be one of", id="weighting"),
        pytest.param(bad(loss_type="kto"), ValueError, "loss_type must be one of", id="loss-type"),
        pytest.param(bad(offset=-0.5), ValueError, "offset must be a finite number >= 0", id="offset"),
        pytest.param(
            bad(label_smoothing=0.6), ValueError, r"label_smoothing must lie in \[0, 0.5\]", id="ls-high"
        ),
        pytest.param(
            bad(label_smoothing=-0.1), ValueError, r"label_smoothing must lie in \[0, 0.5\]", id="ls-neg"
        ),
        pytest.param(
            bad(label_smoothing=0.1, loss_type="hinge"),
            ValueError,
            "label_smoothing only applies to loss_type='sigmoid'",
            id="ls-hinge",
        ),
        pytest.param(
            bad(corrupted_hidden=None),
            ValueError,
            "corrupted_hidden is required when weighting='tpo'",
            id="no-corrupted",
        ),
        pytest.param(
            bad(ref_hidden=None, ref_corrupted_hidden=None, ref_weight=None, ref_bias=None),
            ValueError,
            "reference inputs are missing",
            id="ref-missing",
        ),
        pytest.param(
            bad(ref_seq_scores=torch.zeros(b)),
            ValueError,
            "ambiguous reference: got ref_hidden, ref_seq",
            id="ref-ambiguous",
        ),
        pytest.param(
            bad(reference_free=True),
            ValueError,
            "reference_free=True but reference inputs were given",
            id="ref-free-with-ref",
        ),
        pytest.param(
            bad(ref_corrupted_hidden=None),
            ValueError,
            "needs ref_corrupted_hidden with ref_hidden",
            id="ref-corrupted-missing",
        ),
        pytest.param(
            bad(ref_weight=torch.zeros(V + 1, D)),
            ValueError,
            r"ref_weight must have the \(V, D\) shape",
            id="ref-weight-vocab",
        ),
        pytest.param(
            bad(ref_weight=torch.zeros(V, D + 1)),
            ValueError,
            r"ref_weight must have the \(V, D\) shape",
            id="ref-weight-width",
        ),
        pytest.param(
            bad(ref_hidden=None, ref_corrupted_hidden=None, ref_seq_scores=torch.zeros(b)),
            ValueError,
            "ref_weight/ref_bias only apply to ref_hidden",
            id="ref-weight-without-hidden",
        ),
        pytest.param(
            bad(
                ref_hidden=None,
                ref_corrupted_hidden=None,
                ref_weight=None,
                ref_bias=None,
                ref_visual_scores=torch.zeros(b, T),
            ),
            ValueError,
            "ref_visual_scores was given without ref_token_logprobs",
            id="ref-visual-alone",
        ),
        pytest.param(
            bad(
                ref_hidden=None,
                ref_corrupted_hidden=None,
                ref_weight=None,
                ref_bias=None,
                ref_token_logprobs=torch.zeros(b, T),
            ),
            ValueError,
            "weighting='tpo' needs ref_visual_scores",
            id="ref-token-no-visual",
        ),
        pytest.param(
            bad(
                ref_hidden=None,
                ref_corrupted_hidden=None,
                ref_weight=None,
                ref_bias=None,
                ref_seq_scores=torch.zeros(b + 1),
            ),
            ValueError,
            r"ref_seq_scores must be of shape \(2B,\) = \(4,\)",
            id="ref-seq-shape",
        ),
        pytest.param(
            bad(
                ref_hidden=None,
                ref_corrupted_hidden=None,
                ref_weight=None,
                ref_bias=None,
                ref_token_logprobs=torch.zeros(b, T + 1),
                ref_visual_scores=torch.zeros(b, T + 1),
            ),
            ValueError,
            r"ref_token_logprobs must be \(2B, T\) = \(4, 7\)",
            id="ref-token-shape",
        ),
    ]


@pytest.mark.parametrize(("changes", "error", "match"), _error_cases())
def test_errors_say_what_to_fix(changes, error, match):
    batch = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in make_batch().items()}
    kwargs = dict(
        ref_hidden=batch["ref_hidden"],
        ref_corrupted_hidden=batch["ref_corrupted_hidden"],
        ref_weight=batch["ref_weight"],
        ref_bias=batch["ref_bias"],
    )
    args = dict(
        weight=batch["weight"],
        hidden=batch["hidden"],
        corrupted_hidden=batch["corrupted_hidden"],
        targets=batch["targets"],
        bias=batch["bias"],
    )
    for key, value in changes.items():
        (args if key in args else kwargs)[key] = value
    with pytest.raises(error, match=match):
        tpo_loss(**args, **kwargs)


def test_module_and_helper_errors():
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        TPOLoss(beta=0)
    with pytest.raises(ValueError, match="weighting must be one of"):
        TPOLoss(weighting="token")
    with pytest.raises(ValueError, match="offset must be a finite number >= 0"):
        TPOLoss(offset=-1)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        DPOLoss(loss_type="robust")
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 0.5\]"):
        DPOLoss(label_smoothing=1.0)
    lp = torch.zeros(4, 3)
    mask = torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="weighting='tpo' needs policy_visual_scores"):
        tpo_loss_from_logprobs(lp, None, mask, reference_free=True)
    with pytest.raises(ValueError, match=r"mask must have the shape \(2B, T\)"):
        tpo_loss_from_logprobs(lp, lp, mask[:, :2], reference_free=True)
    with pytest.raises(ValueError, match="even, non-zero number of sequences"):
        tpo_loss_from_logprobs(lp[:3], lp[:3], mask[:3], reference_free=True)
    with pytest.raises(ValueError, match="ambiguous reference"):
        tpo_loss_from_logprobs(lp, lp, mask, lp, lp, ref_seq_scores=torch.zeros(4))
    with pytest.raises(ValueError, match="ref_seq_scores .* is required unless reference_free"):
        preference_loss_from_sequence_scores(torch.zeros(4))
    with pytest.raises(ValueError, match="corrupted_hidden is required when weighting='tpo'"):
        reference_sequence_scores(
            torch.zeros(V, D), torch.zeros(4, T, D), None, torch.zeros(4, T, dtype=torch.long)
        )
    with pytest.raises(ValueError, match=r"hidden must be \(2B, T, D\)"):
        dpo_loss(
            torch.zeros(V, D),
            torch.zeros(4, T - 1, D),
            torch.zeros(4, T, dtype=torch.long),
            reference_free=True,
        )


def _loss_calls(targets: torch.Tensor, device: str = "cpu") -> dict:
    """Each loss of `tpo_fast.loss` that takes token targets, on a 2-pair batch with the given targets."""
    w, h = torch.zeros(V, D, device=device), torch.zeros(4, T, D, device=device)
    return {
        "tpo_loss": lambda: tpo_loss(w, h, h, targets, reference_free=True),
        "dpo_loss": lambda: dpo_loss(w, h, targets, reference_free=True),
        "povid_loss": lambda: povid_loss(w, h, h[:2], targets, reference_free=True),
        "token_pg_loss": lambda: token_pg_loss(w, h, targets, advantages=torch.zeros(4, T, device=device),
                                               kl_coef=0.0),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
@pytest.mark.parametrize("loss", ["tpo_loss", "dpo_loss", "povid_loss", "token_pg_loss"])
def test_targets_that_are_not_token_ids_are_named_in_their_own_shape(loss, dtype):
    """Float or bool targets fail in the loss's own check, which names the (2B, T) or (R, T) shape given,
    not in the primitive below it with the flattened (N,) shape the caller never passed."""
    shape = "(R, T)" if loss == "token_pg_loss" else "(2B, T)"
    name = str(dtype).replace("torch.", "")
    expected = (f"targets must be an integer tensor (int64) of token ids, shape {shape}, got {name} of shape "
                f"(4, {T}); e.g. targets.long()")
    with pytest.raises(TypeError, match="^" + re.escape(expected) + "$"):
        _loss_calls(torch.zeros(4, T, dtype=dtype))[loss]()


@pytest.mark.parametrize("loss", ["tpo_loss", "dpo_loss", "povid_loss", "token_pg_loss"])
def test_integer_targets_of_any_width_pass_the_check(loss):
    """int32 (and int64) token ids are accepted, with the same loss."""
    y = torch.full((4, T), 2)
    y[:, 0] = -100
    losses = [_loss_calls(y.to(dt))[loss]().loss for dt in (torch.int64, torch.int32)]
    assert torch.isfinite(losses[0])
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["tpo_loss", "dpo_loss", "povid_loss", "token_pg_loss"])
def test_inputs_on_the_meta_device_are_refused_before_any_work(loss):
    """Tensors with shapes and no values (a model built on the meta device and not loaded) get an error that
    says so, not PyTorch's `Cannot copy out of meta tensor` from inside the kernels."""
    y = torch.full((4, T), 2, device="meta")
    expected = ("the inputs are on the meta device, which holds shapes but no values; materialize them (e.g. "
                "model.to_empty(device=...), then load the weights) before computing log-probs or a loss")
    with pytest.raises(ValueError, match="^" + re.escape(expected) + "$"):
        _loss_calls(y, device="meta")[loss]()
