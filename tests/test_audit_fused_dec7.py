"""Audit of the fused-gradient pair losses (2026-12-07): `tpo_loss`, `dpo_loss`, `povid_loss`, their modules and
`tpo_fast.ops.fused_pair_loss`, on the torch and triton backends (the interpreter on a CPU).

The oracle is written here from docs/math.md alone, in float64 with the full (N, V) logits and plain autograd: none
of `tests/loss_reference.py`, `tpo_fast/ops/reference.py` or the loss layer (`pairs.py`), which the reference
backend that the other fused-loss tests compare with shares with the code under test. Loss, every metric and the
gradients of weight, bias, hidden and corrupted hidden states are held to it, over chunk budgets that split at
every pair boundary (a chunk per pair, chunks of no rows), `ignore_index` a real token id, a masked vocabulary
(-inf bias columns), every reference form and an upstream gradient other than 1.

Findings, each with its test: a chunk loss that was not a scalar summed into a vector "loss" (or crashed inside
autograd); a chunk loss depending on a trainable tensor of its own (a temperature) whose gradient was dropped
silently; integer or bool tensors taken as log-probabilities (targets passed as `ref_token_logprobs` gave a loss);
`POVIDLoss` ignoring its options set after construction (`loss.beta = 0.2`), which `TPOLoss` and `DPOLoss` honour.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from _device import backend_device

from tpo_fast.loss import (
    DPOLoss,
    POVIDLoss,
    TPOLoss,
    dpo_loss,
    povid_loss,
    preference_loss_from_sequence_scores,
    sequence_scores,
    tpo_loss,
    tpo_loss_from_logprobs,
)
from tpo_fast.ops import fused_pairs
from tpo_fast.ops.fused_pairs import fused_pair_loss
from tpo_fast.ops.options import kernel_options

B, T, D, V = 3, 5, 16, 40
ROW_MB = 4 * V / 2**20  # chunk_mb of a budget of one fp32 logits row
TILES = "16,16,16,4,1"  # several vocabulary tiles on the triton backend


# ---------------------------------------------------------------------------------------------------------------
# The oracle (docs/math.md), float64, on the CPU
# ---------------------------------------------------------------------------------------------------------------

def _grid(values, index, shape):
    return torch.zeros(shape[0] * shape[1], dtype=torch.float64).index_put((index,), values).view(shape)


def _clean(w, b, h, y, ign):
    """(logp, z[y], lse) grids of the rows with a target, from the full logits; ignored rows are never computed."""
    index = (y != ign).reshape(-1).nonzero().squeeze(1)
    z = h.reshape(-1, h.shape[-1])[index] @ w.t() + (0 if b is None else b)
    lse = torch.logsumexp(z, -1)
    zy = z.gather(1, y.reshape(-1)[index][:, None]).squeeze(1)
    return _grid(zy - lse, index, y.shape), _grid(zy, index, y.shape), _grid(lse, index, y.shape)


def _gathered(w, b, h, y, ign):
    """z[y] of other hidden states at the same targets (TPO's corrupted branch)."""
    index = (y != ign).reshape(-1).nonzero().squeeze(1)
    t = y.reshape(-1)[index]
    z = (h.reshape(-1, h.shape[-1])[index] * w[t]).sum(-1) + (0 if b is None else b[t])
    return _grid(z, index, y.shape)


def _scores(logp, s, m, offset, average):
    """S = sum_t m (logp + log c), c = a + sigmoid(+-s), log c = logaddexp(log a, logsigmoid(+-s)); s None: no c."""
    per = logp
    if s is not None:
        n = s.shape[0] // 2
        log_sig = F.logsigmoid(torch.cat([s[:n], -s[n:]]))
        log_c = log_sig if offset == 0 else torch.logaddexp(torch.full_like(log_sig, math.log(offset)), log_sig)
        per = per + log_c
    total = torch.where(m, per, torch.zeros_like(per)).sum(-1)
    return total / m.sum(-1).clamp(min=1) if average else total


def _pair(pol, ref, beta, loss_type, eps):
    n = pol.shape[0] // 2
    margin = (pol[:n] - pol[n:]) - (ref[:n] - ref[n:])
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(beta * margin) - eps * F.logsigmoid(-beta * margin)
    if loss_type == "hinge":
        return (1 - beta * margin).clamp(min=0)
    return (margin - 1 / (2 * beta)) ** 2


def _rewards(pol, ref, beta, prefix="rewards/"):
    n = pol.shape[0] // 2
    r = beta * (pol - ref)
    chosen, rejected = r[:n], r[n:]
    return {prefix + "chosen": chosen.mean(), prefix + "rejected": rejected.mean(),
            prefix + "margins": (chosen - rejected).mean(), prefix + "accuracies": (chosen > rejected).double().mean()}


def oracle_tpo(w, b, h, hc, y, ref, *, beta=0.1, weighting="tpo", offset=0.5, detach_weights=False,
               loss_type="sigmoid", label_smoothing=0.0, average=False, ign=-100):
    """TPO (weighting "tpo") or DPO ("none"); `ref`: (2B,) scores, None (reference-free) or a model (w, b, h, hc)."""
    m = y != ign
    logp, z, _ = _clean(w, b, h, y, ign)
    s = None if hc is None else z - _gathered(w, b, hc, y, ign)
    s_w = None if weighting == "none" else (s.detach() if detach_weights else s)
    pol = _scores(logp, s_w, m, offset, average)
    if isinstance(ref, tuple):
        rw, rb, rh, rhc = ref
        with torch.no_grad():
            rlogp, rz, _ = _clean(rw, rb, rh, y, ign)
            rs = None if weighting == "none" else rz - _gathered(rw, rb, rhc, y, ign)
            ref = _scores(rlogp, rs, m, offset, average)
    ref = torch.zeros_like(pol) if ref is None else ref.double()
    loss = _pair(pol, ref, beta, loss_type, label_smoothing).mean()
    metrics = _rewards(pol.detach(), ref, beta)
    n = y.shape[0] // 2
    logps = _scores(logp.detach(), None, m, offset, average)
    metrics.update({"logps/chosen": logps[:n].mean(), "logps/rejected": logps[n:].mean()})
    if s is not None:
        visual = torch.where(m, s.detach(), torch.zeros_like(s)).sum(-1) / (m.sum(-1) + 1e-8)
        metrics.update({"visual_score/chosen": visual[:n].mean(), "visual_score/rejected": visual[n:].mean()})
    return loss, metrics


def oracle_povid(w, b, h, hc, y, ref, *, beta=0.1, noise_weight=0.5, loss_type="sigmoid", label_smoothing=0.0,
                 average=False, ign=-100):
    """POVID stage 2; hc: (B, T, D) corrupted chosen rows; `ref`: (3B,) scores, None or a model (w, b, h, hc)."""
    n = y.shape[0] // 2

    def scores(w, b, h, hc):
        m = y != ign
        logp, _, lse = _clean(w, b, h, y, ign)
        noisy = (hc.detach() @ w.detach().t() + (0 if b is None else b.detach())).argmax(-1)  # (B, T)
        index = m[:n].reshape(-1).nonzero().squeeze(1)
        a = noisy.reshape(-1)[index]
        z_a = (h[:n].reshape(-1, h.shape[-1])[index] * w[a]).sum(-1) + (0 if b is None else b[a])
        logp_a = _grid(z_a - lse[:n].reshape(-1)[index], index, (n, y.shape[1]))
        s = torch.where(m, logp, torch.zeros_like(logp)).sum(-1)
        s_a = logp_a.sum(-1)
        if average:
            count = m.sum(-1).clamp(min=1)
            s, s_a = s / count, s_a / count[:n]
        return torch.cat([s, s_a]), noisy

    pol, noisy = scores(w, b, h, hc)
    if isinstance(ref, tuple):
        with torch.no_grad():
            ref = scores(*ref)[0]
    ref = torch.zeros_like(pol) if ref is None else ref.double()
    (s_w, s_l, s_n), (r_w, r_l, r_n) = pol.split(n), ref.split(n)
    opts = (beta, loss_type, label_smoothing)
    loss = (noise_weight * _pair(torch.cat([s_w, s_n]), torch.cat([r_w, r_n]), *opts)
            + (1 - noise_weight) * _pair(torch.cat([s_w, s_l]), torch.cat([r_w, r_l]), *opts)).mean()
    d = pol.detach()
    metrics = _rewards(torch.cat([d[:n], d[n:2 * n]]), torch.cat([r_w, r_l]), beta)
    metrics.update(_rewards(torch.cat([d[:n], d[2 * n:]]), torch.cat([r_w, r_n]), beta, "rewards_noisy/"))
    metrics.update({"logps/chosen": d[:n].mean(), "logps/rejected": d[n:2 * n].mean(), "logps/noisy": d[2 * n:].mean()})
    valid = y[:n] != ign
    metrics["noisy/argmax_match"] = ((noisy == y[:n]) & valid).sum() / valid.sum().clamp(min=1)
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------------
# The inputs
# ---------------------------------------------------------------------------------------------------------------

def make(seed, ign=-100, empty=(), bias=True, masked_vocab=False):
    """fp32 CPU tensors: weight, bias, hidden and corrupted hidden (2B, T, D), targets with prompts and unequal
    responses, `empty` sequences without any response token; `masked_vocab`: -inf bias over one whole vocabulary
    tile and part of another, never a target."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, D, generator=g) * 0.4
    b = torch.randn(V, generator=g) * 0.3 if bias or masked_vocab else None
    h, hc = torch.randn(2 * B, T, D, generator=g), torch.randn(2 * B, T, D, generator=g)
    y = torch.randint(0, V, (2 * B, T), generator=g)
    for i in range(2 * B):
        start = int(torch.randint(0, 3, (1,), generator=g))
        stop = start + int(torch.randint(1, T - start + 1, (1,), generator=g))
        y[i, :start], y[i, stop:] = ign, ign
    for i in empty:
        y[i] = ign
    if masked_vocab:
        b[16:32], b[36:] = float("-inf"), float("-inf")
        y = torch.where((y != ign) & (((y >= 16) & (y < 32)) | (y >= 36)), torch.full_like(y, 3), y)
    return w, b, h, hc, y


# (loss, options, reference form, chunk budget in rows, ignore_index, empty sequences, masked vocabulary, upstream)
CASES = [
    ("tpo", {}, "scores", 1, -100, (), False, 1.0),
    ("tpo", dict(loss_type="hinge", offset=0.0, beta=2.0), "model", 2, 0, (0, 3), False, -0.7),
    ("tpo", dict(loss_type="ipo", average_log_prob=True, offset=3.0), "free", 5, 7, (1,), True, 2.5),
    ("tpo", dict(label_smoothing=0.3, detach_weights=True), "model", 1, -100, (0, 3), False, 1.0),
    ("tpo", dict(weighting="none", beta=5.0), "scores", 1000, -1, (), True, 1.0),
    ("dpo", dict(loss_type="ipo", average_log_prob=True), "model", 1, 0, (2,), False, 2.5),
    ("dpo", dict(label_smoothing=0.5), "free", 2, -100, (0, 3), True, -0.7),
    ("povid", {}, "model", 1, -100, (), False, 1.0),
    ("povid", dict(noise_weight=1.0, loss_type="hinge", average_log_prob=True), "scores", 2, 0, (0, 3), True, 2.5),
    ("povid", dict(noise_weight=0.3, label_smoothing=0.2, beta=3.0), "free", 1000, 7, (1,), False, -0.7),
]


def _call(loss, opts, form, tensors, y, ign, backend, device):
    """The library's loss, metrics and gradients (of every tensor of `tensors` that requires grad)."""
    w, b, h, hc = tensors
    if form == "scores":
        g = torch.Generator().manual_seed(1)
        ref = {"ref_seq_scores": (torch.randn((3 if loss == "povid" else 2) * B, generator=g) * 3).to(device)}
    elif form == "model":
        ref = {"ref_hidden": (h.detach() * 0.9).to(device), "ref_weight": (w.detach() + 0.05).to(device)}
        if b is not None:
            ref["ref_bias"] = (b.detach() + 0.1).to(device)
        if loss != "dpo":
            ref["ref_corrupted_hidden"] = (hc.detach() * 1.1).to(device)
    else:
        ref = {"reference_free": True}
    common = dict(ignore_index=ign, backend=backend, **ref, **opts)
    y = y.to(device)
    if loss == "tpo":
        return tpo_loss(w, h, hc, y, b, **common), ref
    if loss == "dpo":
        return dpo_loss(w, h, y, b, **common), ref
    return povid_loss(w, h, hc, y, b, **common), ref


def _oracle(loss, opts, ref, tensors, y, ign):
    w, b, h, hc = tensors
    if "ref_seq_scores" in ref:
        ref = ref["ref_seq_scores"].cpu().double()
    elif "ref_hidden" in ref:
        ref = tuple(None if ref.get(k) is None else ref[k].cpu().double()
                    for k in ("ref_weight", "ref_bias", "ref_hidden", "ref_corrupted_hidden"))
    else:
        ref = None
    keys = {"average_log_prob": "average"}
    kw = {keys.get(k, k): v for k, v in opts.items()}
    if loss == "povid":
        return oracle_povid(w, b, h, hc, y, ref, ign=ign, **kw)
    if loss == "dpo":
        kw["weighting"] = "none"
        hc = None
    return oracle_tpo(w, b, h, hc, y, ref, ign=ign, **kw)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{c[2]}-rows{c[3]}-ign{c[4]}" for c in CASES])
def test_losses_match_a_float64_oracle(backend, case, monkeypatch):
    """Loss, every metric and every gradient of the fused path against the float64 oracle, in several chunks."""
    loss, opts, form, rows, ign, empty, masked, upstream = CASES[case]
    device = backend_device(backend)
    w, b, h, hc, y = make(case, ign, empty, bias=case % 2 == 0, masked_vocab=masked)
    if loss == "povid":
        hc = hc[:B]
    plans = []
    real_plan = fused_pairs.plan_chunks
    monkeypatch.setattr(fused_pairs, "plan_chunks", lambda *a: plans.append(real_plan(*a)) or plans[-1])
    leaves = [None if t is None else t.to(device, copy=True).requires_grad_() for t in (w, b, h, hc)]
    kernels = {"tiles": TILES} if backend == "triton" else {}
    with kernel_options(chunk_mb=rows * ROW_MB, **kernels):
        out, ref = _call(loss, opts, form, leaves, y, ign, backend, device)
    wanted = [t for t in leaves if t is not None and not (loss == "dpo" and t is leaves[3])]
    grads = torch.autograd.grad(out.loss * upstream, wanted, allow_unused=True)
    n_chunks = len(plans[-1])
    assert n_chunks > 1 if rows < 1000 else n_chunks == 1, plans

    expected_tensors = [None if t is None else t.double().requires_grad_() for t in (w, b, h, hc)]
    expected, metrics = _oracle(loss, opts, ref, expected_tensors, y, ign)
    dpo_hc = expected_tensors[3] if loss == "dpo" else None  # DPO takes no corrupted branch
    wanted_expected = [t for t in expected_tensors if t is not None and t is not dpo_hc]
    expected_grads = torch.autograd.grad(expected * upstream, wanted_expected, allow_unused=True)

    def close(actual, want, what):
        want = torch.zeros(()) if want is None else want
        actual = torch.zeros(()) if actual is None else actual.cpu()
        assert torch.isfinite(actual).all(), what
        err = (actual.double() - want).abs().max().item()
        assert err <= 2e-5 * max(1.0, want.abs().max().item()), f"{what}: {actual} vs {want}"

    close(out.loss, expected, "loss")
    assert set(out.metrics) == set(metrics)
    for k, v in metrics.items():
        close(out.metrics[k], v, k)
    for t, g, e in zip(wanted, grads, expected_grads, strict=True):
        close(g, e, f"gradient of a {tuple(t.shape)} input")


# ---------------------------------------------------------------------------------------------------------------
# Findings
# ---------------------------------------------------------------------------------------------------------------

CHUNK_LOSS_ERROR = ("chunk_loss must return a 0-d floating-point tensor (the chunk's part of the batch loss, e.g. "
                    "per_pair.sum() / chunk.n_pairs), got {}")


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("chunk_loss, got", [
    (lambda c: c.logprobs.sum(-1), "float32 of shape (2,)"),  # per sequence, not summed
    (lambda c: float(c.logprobs.detach().sum()), "float"),
    (lambda c: (c.mask.sum() > 0).long(), "int64 of shape ()"),
])
def test_a_chunk_loss_that_is_not_a_scalar_is_refused(chunk_loss, got, grad):
    """A (2P,) chunk loss was summed entry by entry over the chunks into a (2,)-vector "loss" under no_grad (and
    crashed inside autograd with one); a float crashed with an AttributeError. Now: a TypeError that says what."""
    w, _, h, _, y = make(0)
    hidden = h.reshape(-1, D).requires_grad_(grad)
    expected = "^" + re.escape(CHUNK_LOSS_ERROR.format(got)) + "$"
    with torch.set_grad_enabled(grad), pytest.raises(TypeError, match=expected):
        fused_pair_loss(hidden, w, y, chunk_loss, backend="torch", chunk_bytes=4 * V)  # a chunk per pair


def _real_error(name, t):
    return re.escape(f"{name} must be a floating-point tensor (log-probabilities or scores), got "
                     f"{str(t.dtype).replace('torch.', '')} of shape {tuple(t.shape)}; were token ids or a mask "
                     "passed in its place?")


def test_token_ids_passed_as_log_probabilities_are_refused():
    """Targets (int64, the (2B, T) shape of the log-probabilities) passed as `ref_token_logprobs` gave a loss, the
    token ids summed as reference log-probabilities; bool and int sequence scores were used as numbers likewise."""
    w, b, h, hc, y = make(0)
    logp = -torch.rand(2 * B, T)
    mask = y != -100
    with pytest.raises(TypeError, match="^" + _real_error("ref_token_logprobs", y) + "$"):
        dpo_loss(w, h, y, b, ref_token_logprobs=y, backend="torch")
    with pytest.raises(TypeError, match="^" + _real_error("ref_token_logprobs", y) + "$"):
        tpo_loss(w, h, hc, y, b, ref_token_logprobs=y, ref_visual_scores=logp, backend="torch")
    with pytest.raises(TypeError, match="^" + _real_error("ref_visual_scores", mask) + "$"):
        tpo_loss(w, h, hc, y, b, ref_token_logprobs=logp, ref_visual_scores=mask, backend="torch")
    with pytest.raises(TypeError, match="^" + _real_error("policy_logprobs", y) + "$"):
        tpo_loss_from_logprobs(y, logp, mask, ref_seq_scores=torch.zeros(2 * B))
    with pytest.raises(TypeError, match="^" + _real_error("ref_logprobs", y) + "$"):
        tpo_loss_from_logprobs(logp, logp, mask, y, logp)
    with pytest.raises(TypeError, match="^" + _real_error("logprobs", y) + "$"):
        sequence_scores(y, None, mask, weighting="none")
    with pytest.raises(TypeError, match="^" + _real_error("policy_seq_scores", mask[:, 0]) + "$"):
        preference_loss_from_sequence_scores(mask[:, 0], torch.zeros(2 * B))
    # float64 tables (a cache) stay accepted, and give the float64 oracle's loss
    ref64 = -torch.rand(2 * B, T, dtype=torch.float64)
    out = dpo_loss(w, h, y, b, ref_token_logprobs=ref64, backend="torch")
    expected, _ = oracle_tpo(w.double(), b.double(), h.double(), None, y,
                             torch.where(mask, ref64, 0.0).sum(-1), weighting="none")
    assert abs(out.loss.item() - expected.item()) <= 1e-6


@pytest.mark.parametrize("module, function, oracle, extra", [
    (POVIDLoss, povid_loss, oracle_povid, {}),
    (TPOLoss, tpo_loss, oracle_tpo, {}),
    (DPOLoss, dpo_loss, oracle_tpo, {"weighting": "none"}),
])
def test_options_set_on_a_loss_module_reach_the_loss(module, function, oracle, extra):
    """`POVIDLoss` kept its options in a dict: `loss.beta = 0.5` (a beta schedule) created an attribute no call
    read, and training went on with the old options (loss 0.5605 where the oracle gives 4.4483 below). TPOLoss and
    DPOLoss held attributes already; now all three do."""
    w, b, h, hc, y = make(4)
    hc = hc[:B] if module is POVIDLoss else hc
    loss = module(beta=0.1, reference_free=True, backend="torch")
    loss.beta, loss.average_log_prob, loss.loss_type = 0.5, True, "ipo"
    args = (w, h, y, b) if module is DPOLoss else (w, h, hc, y, b)
    got = loss(*args).loss
    doubles = [t.double() for t in (w, b, h, hc)]
    if module is DPOLoss:
        doubles[3] = None
    expected, _ = oracle(*doubles, y, None, beta=0.5, average=True, loss_type="ipo", **extra)
    assert abs(got.item() - expected.item()) <= 1e-5 * max(1.0, abs(expected.item())), (got, expected)
    assert loss.extra_repr().startswith("beta=0.5")
    if module is POVIDLoss:
        assert loss.options["beta"] == 0.5 and "loss_type='ipo'" in repr(loss)


OUTSIDE_ERROR = ("chunk_loss depends on tensors that require grad besides the chunk's grids (a parameter or another "
                 "model's output?): the fused pass differentiates the grids only, so their gradient would be lost; "
                 "detach them, or add the terms that need a gradient outside chunk_loss")


def test_a_chunk_loss_with_a_trainable_parameter_of_its_own_is_refused():
    """A chunk loss scaled by a trainable temperature: the fused pass returned the loss (-161.95 here) and left the
    temperature without a gradient (None; d loss / d temperature = sum of the log-probs = -80.98), silently. Now an
    error; a detached temperature still gives loss and hidden-state gradient of the float64 oracle."""
    w, _, h, _, y = make(6)
    hidden = h.reshape(-1, D).clone().requires_grad_()
    temperature = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(ValueError, match="^" + re.escape(OUTSIDE_ERROR) + "$"):
        fused_pair_loss(hidden, w, y, lambda c: c.logprobs.sum() * temperature, backend="torch", chunk_bytes=4 * V)
    out = fused_pair_loss(hidden, w, y, lambda c: c.logprobs.sum() * temperature.detach(), backend="torch",
                          chunk_bytes=4 * V)
    (grad,) = torch.autograd.grad(out.loss, hidden)
    h64 = h.double().requires_grad_()
    logp, _, _ = _clean(w.double(), None, h64, y, -100)
    expected = 2.0 * logp.sum()
    (expected_grad,) = torch.autograd.grad(expected, h64)
    assert abs(out.loss.item() - expected.item()) <= 1e-5 * abs(expected.item())
    assert (grad.double().view_as(expected_grad) - expected_grad).abs().max().item() <= 1e-5


def test_check_graph_false_skips_the_walk_and_the_library_losses_pass_it(monkeypatch):
    """`check_graph=False` (the library's own losses, whose chunk losses see detached reference scores only) makes no
    walk: the same trainable temperature then goes through without an error and without a gradient, as documented.
    tpo_loss, dpo_loss and povid_loss walk no graph (a spy counts the walks)."""
    w, _, h, hc, y = make(6)
    hidden = h.reshape(-1, D).clone().requires_grad_()
    temperature = torch.tensor(2.0, requires_grad=True)
    out = fused_pair_loss(hidden, w, y, lambda c: c.logprobs.sum() * temperature, backend="torch", chunk_bytes=4 * V,
                          check_graph=False)
    out.loss.backward()
    assert temperature.grad is None and hidden.grad is not None
    walks = []
    real = fused_pairs._reaches_other_leaves
    monkeypatch.setattr(fused_pairs, "_reaches_other_leaves", lambda *a: walks.append(1) or real(*a))
    weight = w.clone().requires_grad_()
    ref = dict(ref_seq_scores=torch.zeros(y.shape[0]))
    tpo_loss(weight, h, hc, y, backend="torch", **ref).loss.backward()
    dpo_loss(weight, h, y, backend="torch", **ref).loss.backward()
    n = y.shape[0] // 2
    povid_loss(weight, h, hc[:n], y, backend="torch", ref_seq_scores=torch.zeros(3 * n)).loss.backward()
    assert walks == []
    fused_pair_loss(hidden, w, y, lambda c: c.logprobs.sum(), backend="torch", chunk_bytes=4 * V)
    assert walks == [1]  # the default walks, once per call (the first chunk only)
