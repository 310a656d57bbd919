"""`tpo_fast.loss.povid` edges that mutation testing found unguarded (docs/testing.md): every input error with its
whole message, raised through the public functions of `tpo_fast.loss`; values against the full-logits oracle of
tests/methods_reference.py (custom ignore_index, a separate ref_bias, reference-free, exact argmax grids and the
argmax-match metric); the backend and ignore_index reaching the primitives; fp32 results on the inputs' device
whatever torch's default dtype and device are.

Expected messages are written out literally; expected values come from tests/methods_reference.py, which shares
no code with tpo_fast.
"""

from __future__ import annotations

import re

import pytest
import torch
from _spies import record_calls
from methods_reference import dpo_losses, logits_of, povid_scores

import tpo_fast.loss.povid as povid_module
from tpo_fast.loss import check_povid_options, povid_loss, povid_reference_scores, povid_sequence_scores

B, T, D, V = 2, 4, 5, 7
TWO_D = "targets must be 2-D (2B, T): B chosen rows, then B hallucinated (rejected) rows, got"
ONE_REF = (
    "give exactly one reference: ref_hidden with ref_corrupted_hidden (the reference takes its own argmax), or "
    "ref_seq_scores (3B,) from povid_reference_scores, or set reference_free=True; got "
)
REAL = "must be a real number (int, float, NumPy scalar or 0-d tensor), got"
HC_HINT = "; corrupted hidden states cover the B chosen rows only"


def batch(seed=0, ign=-100):
    """(2B, T) = (4, 4) targets; the chosen rows hit their corrupted argmax at 3 of their 5 response tokens."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, D, generator=g)
    bias = torch.randn(V, generator=g) * 0.5
    h = torch.randn(2 * B, T, D, generator=g)
    hc = torch.randn(B, T, D, generator=g)
    y = torch.randint(0, V, (2 * B, T), generator=g)
    am = logits_of(hc, w, bias).argmax(-1)
    y[:B] = (am + 1) % V  # no accidental match
    y[0, 1], y[1, 2], y[1, 3] = am[0, 1], am[1, 2], am[1, 3]
    y[:, 0] = ign
    y[0, 3] = ign
    y[3, 2:] = ign
    ref_h = h + 0.3 * torch.randn(2 * B, T, D, generator=g)
    ref_hc = hc + 0.3 * torch.randn(B, T, D, generator=g)
    ref_w = w + 0.2 * torch.randn(V, D, generator=g)
    ref_b = torch.randn(V, generator=g)
    return dict(w=w, bias=bias, h=h, hc=hc, y=y, ref_h=ref_h, ref_hc=ref_hc, ref_w=ref_w, ref_b=ref_b, ign=ign)


def oracle_scores(w, h, hc, y, bias, average_log_prob=False, ign=-100):
    return torch.cat(povid_scores(h, hc, y, w, bias, average_log_prob, ign))


def oracle_argmax(w, hc, y, bias):
    valid = y[:B] != -100
    return logits_of(hc, w, bias).argmax(-1).masked_fill(~valid, -1)


def oracle_loss(pol, ref, beta=0.1, noise_weight=0.5, loss_type="sigmoid", label_smoothing=0.0):
    s_w, s_l, s_n = pol.split(B)
    r_w, r_l, r_n = (torch.zeros(B),) * 3 if ref is None else ref.split(B)
    noisy, n_c, n_r = dpo_losses(s_w, s_n, r_w, r_n, beta, loss_type, label_smoothing)
    halluc, h_c, h_r = dpo_losses(s_w, s_l, r_w, r_l, beta, loss_type, label_smoothing)
    loss = (noise_weight * noisy + (1 - noise_weight) * halluc).mean()
    metrics = {
        "rewards/chosen": h_c.mean(), "rewards/rejected": h_r.mean(), "rewards/margins": (h_c - h_r).mean(),
        "rewards/accuracies": (h_c > h_r).float().mean(),
        "rewards_noisy/chosen": n_c.mean(), "rewards_noisy/rejected": n_r.mean(),
        "rewards_noisy/margins": (n_c - n_r).mean(), "rewards_noisy/accuracies": (n_c > n_r).float().mean(),
        "logps/chosen": s_w.mean(), "logps/rejected": s_l.mean(), "logps/noisy": s_n.mean(),
    }
    return loss, metrics


def match_fraction(w, hc, y, bias, ign):
    valid = y[:B] != ign
    am = logits_of(hc, w, bias).argmax(-1)
    return ((am == y[:B]) & valid).sum().float() / valid.sum().clamp(min=1)


def _close(got, want):
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=got.dtype), rtol=1e-5, atol=1e-5)


def _check_metrics(metrics, want, match):
    assert set(metrics) == set(want) | {"noisy/argmax_match"}
    for k, v in want.items():
        _close(metrics[k], v)
    _close(metrics["noisy/argmax_match"], match)


# ---------------------------------------------------------------------------------------------------------
# Every raise, whole message.

_B = batch()
W, BIAS, H, HC, Y = _B["w"], _B["bias"], _B["h"], _B["hc"], _B["y"]
RSEQ = torch.tensor([-1.0, -2.0, -3.0, -1.5, -2.5, -0.5])


def _loss(weight=W, hidden=H, corrupted_hidden=HC, targets=Y, **kwargs):
    kwargs.setdefault("backend", "torch")
    if not {"ref_hidden", "ref_seq_scores", "reference_free"} & set(kwargs):
        kwargs["ref_seq_scores"] = RSEQ
    return lambda: povid_loss(weight, hidden, corrupted_hidden, targets, **kwargs)


def _seq(weight=W, hidden=H, corrupted_hidden=HC, targets=Y, **kwargs):
    return lambda: povid_sequence_scores(weight, hidden, corrupted_hidden, targets, backend="torch", **kwargs)


def _ref(weight=W, hidden=H, corrupted_hidden=HC, targets=Y, **kwargs):
    return lambda: povid_reference_scores(weight, hidden, corrupted_hidden, targets, backend="torch", **kwargs)


MESSAGES = [
    # ---- targets
    pytest.param(_loss(targets=Y.tolist()), TypeError, "targets must be a torch.Tensor, got list", id="targets-list"),
    pytest.param(_seq(targets=None), TypeError, "targets must be a torch.Tensor, got NoneType", id="seq-targets-none"),
    pytest.param(_loss(targets=Y[:3]), ValueError, f"{TWO_D} int64 of shape (3, 4)", id="targets-odd"),
    pytest.param(_ref(targets=Y[:1]), ValueError, f"{TWO_D} int64 of shape (1, 4)", id="ref-targets-one-row"),
    pytest.param(_loss(targets=Y[:0]), ValueError, f"{TWO_D} int64 of shape (0, 4)", id="targets-empty"),
    pytest.param(_seq(targets=Y[:, 0]), ValueError, f"{TWO_D} int64 of shape (4,)", id="targets-1d-even"),
    pytest.param(_seq(targets=Y[:, :3].T), ValueError, f"{TWO_D} int64 of shape (3, 4)", id="targets-odd-T"),
    pytest.param(_loss(targets=Y[None]), ValueError, f"{TWO_D} int64 of shape (1, 4, 4)", id="targets-3d"),
    # ---- hidden / corrupted_hidden
    pytest.param(_loss(hidden=H.tolist()), TypeError, "hidden must be a torch.Tensor, got list", id="hidden-list"),
    pytest.param(_loss(hidden=H[:, :3]), ValueError,
                 "hidden must be (2B, T, D) = (4, 4, D) or (2B*T, D) = (16, D) to match the targets, "
                 "got float32 of shape (4, 3, 5)", id="hidden-shape"),
    pytest.param(_seq(hidden=H.double()[:2]), ValueError,
                 "hidden must be (2B, T, D) = (4, 4, D) or (2B*T, D) = (16, D) to match the targets, "
                 "got float64 of shape (2, 4, 5)", id="seq-hidden-shape"),
    pytest.param(_loss(corrupted_hidden=None), TypeError, "corrupted_hidden must be a torch.Tensor, got NoneType",
                 id="corrupted-none"),
    pytest.param(_loss(corrupted_hidden=H), ValueError,
                 "corrupted_hidden must be (B, T, D) = (2, 4, D) or (B*T, D) = (8, D) to match the targets, "
                 f"got float32 of shape (4, 4, 5){HC_HINT}", id="corrupted-all-rows"),
    pytest.param(_ref(corrupted_hidden=HC.flatten(0, 1)[:7]), ValueError,
                 "corrupted_hidden must be (B, T, D) = (2, 4, D) or (B*T, D) = (8, D) to match the targets, "
                 f"got float32 of shape (7, 5){HC_HINT}", id="ref-corrupted-2d"),
    pytest.param(_loss(corrupted_hidden=HC[..., :3]), ValueError,
                 "corrupted_hidden must have the weight's hidden size D = 5 (weight is float32 of shape (7, 5)), "
                 "got float32 of shape (2, 4, 3)",
                 id="corrupted-hidden-size"),
    pytest.param(_loss(hidden=H[..., :3]), ValueError,
                 "hidden must have the weight's hidden size D = 5 (weight is float32 of shape (7, 5)), got float32 "
                 "of shape (4, 4, 3)", id="hidden-size"),
    pytest.param(_seq(hidden=H.flatten(0, 1), corrupted_hidden=torch.zeros(8, 6, dtype=torch.float64)), ValueError,
                 "corrupted_hidden must have the weight's hidden size D = 5 (weight is float32 of shape (7, 5)), "
                 "got float64 of shape (8, 6)",
                 id="seq-corrupted-hidden-size-2d"),
    # ---- options
    pytest.param(lambda: check_povid_options("0.5"), TypeError, f"noise_weight {REAL} str", id="noise-str"),
    pytest.param(_loss(noise_weight=None), TypeError, f"noise_weight {REAL} NoneType", id="loss-noise-none"),
    pytest.param(lambda: check_povid_options(1.5), ValueError,
                 "noise_weight must lie in [0, 1] (the official POVID uses 0.5; 0 is plain DPO), got 1.5",
                 id="noise-high"),
    pytest.param(_loss(noise_weight=float("nan")), ValueError,
                 "noise_weight must lie in [0, 1] (the official POVID uses 0.5; 0 is plain DPO), got nan",
                 id="loss-noise-nan"),
    pytest.param(_loss(beta="0.1"), TypeError, f"beta {REAL} str", id="beta-str"),
    pytest.param(_loss(loss_type="dpo"), ValueError, "loss_type must be one of ('sigmoid', 'hinge', 'ipo'), got 'dpo'",
                 id="loss-type"),
    pytest.param(_loss(label_smoothing=0.7), ValueError,
                 "label_smoothing must lie in [0, 0.5] (the assumed probability that a pair's label is flipped), "
                 "got 0.7", id="label-smoothing"),
    pytest.param(_loss(loss_type="hinge", label_smoothing=0.2), ValueError,
                 "label_smoothing only applies to loss_type='sigmoid' (conservative DPO), got loss_type='hinge' "
                 "with label_smoothing=0.2; set label_smoothing=0.0", id="label-smoothing-hinge"),
    pytest.param(_loss(grad_mode="two-pass"), ValueError,
                 "grad_mode must be one of ('auto', 'fused', 'recompute') ('auto': fused, except fp16 on triton; "
                 "'fused': gradient computed in the forward, no logits recompute; 'recompute': the per-token "
                 "primitive's backward), got 'two-pass'", id="grad-mode"),
    pytest.param(_loss(backend="cuda"), ValueError,
                 "backend must be one of ('auto', 'triton', 'torch', 'reference'), got 'cuda'", id="backend"),
    pytest.param(_loss(ignore_index=-1.0), TypeError, "ignore_index must be an int (default -100), got -1.0",
                 id="ignore-index"),
    # ---- the reference
    pytest.param(_loss(ref_corrupted_hidden=HC, ref_seq_scores=RSEQ), ValueError,
                 "ref_corrupted_hidden was given without ref_hidden; pass both", id="ref-corrupted-alone"),
    pytest.param(_loss(ref_weight=W, ref_seq_scores=RSEQ), ValueError,
                 "ref_weight/ref_bias only apply to ref_hidden; drop them when passing ref_seq_scores",
                 id="ref-weight-with-scores"),
    pytest.param(_loss(ref_bias=BIAS, ref_seq_scores=RSEQ), ValueError,
                 "ref_weight/ref_bias only apply to ref_hidden; drop them when passing ref_seq_scores",
                 id="ref-bias-with-scores"),
    pytest.param(_loss(ref_seq_scores=RSEQ, reference_free=True), ValueError,
                 "reference_free=True but reference inputs were given (ref_seq_scores); drop them or set "
                 "reference_free=False", id="free-with-scores"),
    pytest.param(_loss(ref_hidden=H, ref_corrupted_hidden=HC, ref_seq_scores=RSEQ, reference_free=True), ValueError,
                 "reference_free=True but reference inputs were given (ref_hidden, ref_seq_scores); drop them or set "
                 "reference_free=False", id="free-with-both"),
    pytest.param(_loss(reference_free=False), ValueError, ONE_REF + "none", id="no-reference"),
    pytest.param(_loss(ref_hidden=H, ref_corrupted_hidden=HC, ref_seq_scores=RSEQ), ValueError,
                 ONE_REF + "['ref_hidden', 'ref_seq_scores']", id="two-references"),
    pytest.param(_loss(ref_seq_scores=RSEQ[:4]), ValueError,
                 "ref_seq_scores must be of shape (3B,) = (6,), got float32 of shape (4,)", id="ref-scores-shape"),
    pytest.param(_loss(ref_seq_scores="scores"), TypeError,
                 "ref_seq_scores must be a tensor (or a list of numbers) of shape (3B,) = (6,), got str",
                 id="ref-scores-str"),
    pytest.param(_loss(ref_seq_scores=["a"] * 6), TypeError, "ref_seq_scores must be a tensor or a list of 6 numbers",
                 id="ref-scores-list-str"),
    pytest.param(_loss(ref_hidden=H), ValueError,
                 "ref_hidden needs ref_corrupted_hidden: the reference scores its own noisy argmax",
                 id="ref-hidden-alone"),
    pytest.param(_loss(ref_hidden=H, ref_corrupted_hidden=HC, ref_weight=W[:, :4]), ValueError,
                 "ref_weight must have the (V, D) shape of weight (7, 5), got float32 of shape (7, 4)",
                 id="ref-weight-shape"),
    pytest.param(_loss(ref_hidden=H, ref_corrupted_hidden=HC, ref_weight=W.T), ValueError,
                 "ref_weight must have the (V, D) shape of weight (7, 5), got float32 of shape (5, 7)",
                 id="ref-weight-transposed"),
]


@pytest.mark.parametrize(("call", "exc", "expected"), MESSAGES)
def test_whole_messages(call, exc, expected):
    with pytest.raises(exc, match="^" + re.escape(expected) + "$"):
        call()


@pytest.mark.parametrize("grad_mode", ["fused", "recompute"])
@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"loss_type": "dpo"}, "loss_type must be one of ('sigmoid', 'hinge', 'ipo'), got 'dpo'"),
        ({"label_smoothing": 0.7},
         "label_smoothing must lie in [0, 0.5] (the assumed probability that a pair's label is flipped), got 0.7"),
        ({"loss_type": "ipo", "label_smoothing": 0.1},
         "label_smoothing only applies to loss_type='sigmoid' (conservative DPO), got loss_type='ipo' "
         "with label_smoothing=0.1; set label_smoothing=0.0"),
    ],
)
def test_options_are_checked_before_any_vocabulary_sweep(monkeypatch, grad_mode, options, expected):
    def no_sweep(*args, **kwargs):
        raise AssertionError("a primitive ran before the options were checked")

    for name in ("token_stats", "target_logits", "fused_pair_loss"):
        monkeypatch.setattr(povid_module, name, no_sweep)
    with pytest.raises(ValueError, match="^" + re.escape(expected) + "$"):
        povid_loss(W, H, HC, Y, BIAS, ref_seq_scores=RSEQ, backend="torch", grad_mode=grad_mode, **options)


# ---------------------------------------------------------------------------------------------------------
# Values against the full-logits oracle.


def test_sequence_scores_defaults_and_argmax_grid():
    """Default keywords (summed log-probs, backend "auto"); argmax = corrupted argmax, -1 where ignored."""
    b = batch(seed=1)
    args = (b["w"], b["h"], b["hc"], b["y"], b["bias"])
    scores, extras = povid_sequence_scores(*args)
    _close(scores, oracle_scores(*args))
    assert scores.dtype == torch.float32
    assert set(extras) == {"argmax"}
    want = oracle_argmax(b["w"], b["hc"], b["y"], b["bias"])
    assert extras["argmax"].tolist() == want.tolist()
    assert extras["argmax"][0].tolist()[0] == -1 and extras["argmax"][0].tolist()[3] == -1
    _close(povid_reference_scores(*args), oracle_scores(*args))
    avg, _ = povid_sequence_scores(*args, average_log_prob=True, backend="torch")
    _close(avg, oracle_scores(*args, average_log_prob=True))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_custom_ignore_index(backend):
    """ignore_index=-1 (a negative target the primitives must not read) reaches every primitive call."""
    b = batch(seed=2, ign=-1)
    args = (b["w"], b["h"], b["hc"], b["y"], b["bias"])
    want = oracle_scores(*args, ign=-1)
    scores, extras = povid_sequence_scores(*args, ignore_index=-1, backend=backend)
    _close(scores, want)
    valid = b["y"][:B] != -1
    am = logits_of(b["hc"], b["w"], b["bias"]).argmax(-1).masked_fill(~valid, -1)
    assert extras["argmax"].tolist() == am.tolist()
    _close(povid_reference_scores(*args, ignore_index=-1, backend=backend), want)
    ref = oracle_scores(b["w"], b["ref_h"], b["ref_hc"], b["y"], b["bias"], ign=-1)
    loss, metrics = oracle_loss(want, ref)
    for grad_mode in ("fused", "recompute"):
        out = povid_loss(*args, ref_hidden=b["ref_h"], ref_corrupted_hidden=b["ref_hc"], ignore_index=-1,
                         backend=backend, grad_mode=grad_mode)
        _close(out.loss, loss)
        _check_metrics(out.metrics, metrics, match_fraction(b["w"], b["hc"], b["y"], b["bias"], -1))


@pytest.mark.parametrize("grad_mode", ["fused", "recompute"])
def test_in_model_reference_with_its_own_weight_and_bias(grad_mode):
    b = batch(seed=3)
    w, h = b["w"].clone().requires_grad_(), b["h"].clone().requires_grad_()
    args = (w, h, b["hc"], b["y"], b["bias"])
    ref = oracle_scores(b["ref_w"], b["ref_h"], b["ref_hc"], b["y"], b["ref_b"])
    opts = dict(beta=0.3, noise_weight=0.25, loss_type="sigmoid", label_smoothing=0.2)
    loss, metrics = oracle_loss(oracle_scores(*args), ref, **opts)
    out = povid_loss(*args, ref_hidden=b["ref_h"], ref_corrupted_hidden=b["ref_hc"], ref_weight=b["ref_w"],
                     ref_bias=b["ref_b"], backend="torch", grad_mode=grad_mode, **opts)
    _close(out.loss, loss)
    _check_metrics(out.metrics, metrics, match_fraction(b["w"], b["hc"], b["y"], b["bias"], -100))
    for got, want in zip(torch.autograd.grad(out.loss, (w, h)), torch.autograd.grad(loss, (w, h)), strict=True):
        _close(got, want)
    # ref_bias alone (ref_weight defaults to weight), and no ref_bias (defaults to bias)
    ref_b_only = oracle_scores(b["w"], b["ref_h"], b["ref_hc"], b["y"], b["ref_b"])
    out = povid_loss(*args, ref_hidden=b["ref_h"], ref_corrupted_hidden=b["ref_hc"], ref_bias=b["ref_b"],
                     backend="torch", grad_mode=grad_mode, loss_type="hinge", beta=0.5)
    loss, metrics = oracle_loss(oracle_scores(*args), ref_b_only, beta=0.5, loss_type="hinge")
    _close(out.loss, loss)
    _check_metrics(out.metrics, metrics, match_fraction(b["w"], b["hc"], b["y"], b["bias"], -100))
    ref_default = oracle_scores(b["w"], b["ref_h"], b["ref_hc"], b["y"], b["bias"])
    out = povid_loss(*args, ref_hidden=b["ref_h"], ref_corrupted_hidden=b["ref_hc"], backend="torch",
                     grad_mode=grad_mode)
    _close(out.loss, oracle_loss(oracle_scores(*args), ref_default)[0])


@pytest.mark.parametrize("grad_mode", ["fused", "recompute"])
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_reference_free_and_precomputed_scores(grad_mode, average_log_prob):
    b = batch(seed=4)
    args = (b["w"], b["h"], b["hc"], b["y"], b["bias"])
    pol = oracle_scores(*args, average_log_prob=average_log_prob)
    match = match_fraction(b["w"], b["hc"], b["y"], b["bias"], -100)
    out = povid_loss(*args, reference_free=True, beta=0.2, noise_weight=0.7, average_log_prob=average_log_prob,
                     backend="torch", grad_mode=grad_mode)
    loss, metrics = oracle_loss(pol, None, beta=0.2, noise_weight=0.7)
    _close(out.loss, loss)
    _check_metrics(out.metrics, metrics, match)
    ref = torch.tensor([-3.0, -6.0, -2.0, -4.0, -5.0, -9.0])
    out = povid_loss(*args, ref_seq_scores=ref, loss_type="ipo", beta=0.4, noise_weight=1.0,
                     average_log_prob=average_log_prob, backend="torch", grad_mode=grad_mode)
    loss, metrics = oracle_loss(pol, ref, beta=0.4, noise_weight=1.0, loss_type="ipo")
    _close(out.loss, loss)
    _check_metrics(out.metrics, metrics, match)


@pytest.mark.parametrize("grad_mode", ["fused", "recompute"])
def test_argmax_match_with_a_single_chosen_token(grad_mode):
    """Exactly one valid chosen token, equal to its corrupted argmax: the match fraction is 1."""
    b = batch(seed=5)
    y = torch.full((2 * B, T), -100)
    am = logits_of(b["hc"], b["w"], b["bias"]).argmax(-1)
    y[1, 2] = am[1, 2]
    y[2, 1], y[3, 0] = 3, 4
    out = povid_loss(b["w"], b["h"], b["hc"], y, b["bias"], ref_seq_scores=RSEQ, backend="torch",
                     grad_mode=grad_mode)
    _close(out.metrics["noisy/argmax_match"], 1.0)
    _close(out.loss, oracle_loss(oracle_scores(b["w"], b["h"], b["hc"], y, b["bias"]), RSEQ)[0])


def test_empty_responses():
    """T = 0 is a valid (2B, 0) batch: zero scores, an empty argmax grid."""
    scores, extras = povid_sequence_scores(W, H[:, :0], HC[:, :0], Y[:, :0], backend="torch")
    assert scores.tolist() == [0.0] * 6
    assert extras["argmax"].shape == (B, 0)
    out = povid_loss(W, H[:, :0], HC[:, :0], Y[:, :0], reference_free=True, backend="torch")
    _close(out.loss, torch.log(torch.tensor(2.0)))
    _close(out.metrics["noisy/argmax_match"], 0.0)


# ---------------------------------------------------------------------------------------------------------
# backend, ignore_index and grad_mode reach the primitives.


def test_recording_the_lower_layer(monkeypatch):
    calls = []
    record_calls(monkeypatch, povid_module, ("token_stats", "target_logits", "fused_pair_loss"), calls)

    def seen():  # (function, backend, ignore_index) of each call since the last look
        out = [(name, a["backend"], a["ignore_index"]) for name, a in calls]
        calls.clear()
        return out

    b = batch(seed=6, ign=-7)
    args = (b["w"], b["h"], b["hc"], b["y"], b["bias"])
    seq = [("token_stats", "torch", -7), ("token_stats", "torch", -7), ("target_logits", "torch", -7)]
    povid_sequence_scores(*args, ignore_index=-7, backend="torch")
    assert seen() == seq
    povid_reference_scores(*args, ignore_index=-7, backend="reference")
    assert seen() == [(n, "reference", -7) for n, _, _ in seq]
    povid_loss(*args, ref_hidden=b["ref_h"], ref_corrupted_hidden=b["ref_hc"], ignore_index=-7, backend="torch")
    assert seen() == seq + [("token_stats", "torch", -7), ("fused_pair_loss", "torch", -7)]
    povid_loss(*args, ref_seq_scores=RSEQ, ignore_index=-7, backend="torch", grad_mode="recompute")
    assert seen() == seq
    povid_loss(*args, ref_seq_scores=RSEQ, ignore_index=-7, backend="reference", grad_mode="fused")
    assert seen() == [(n, "reference", -7) for n, _, _ in seq]


def test_recompute_on_the_reference_backend_allows_double_backward():
    b = batch(seed=7)
    h = b["h"].clone().requires_grad_()
    out = povid_loss(b["w"], h, b["hc"], b["y"], b["bias"], ref_seq_scores=RSEQ, backend="reference",
                     grad_mode="recompute")
    (g,) = torch.autograd.grad(out.loss, h, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), h)
    assert torch.isfinite(gg).all() and gg.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# What the loss builds itself follows its inputs, not torch's default device or dtype.


@pytest.mark.parametrize("grad_mode", ["fused", "recompute"])
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_default_device_is_not_used(grad_mode, average_log_prob):
    b = batch(seed=8)
    args = (b["w"], b["h"], b["hc"], b["y"], b["bias"])
    want = oracle_scores(*args, average_log_prob=average_log_prob)
    ref = [-1.0, -2.0, -3.0, -1.5, -2.5, -0.5]
    loss, metrics = oracle_loss(want, torch.tensor(ref))
    with torch.device("meta"):  # a default device other than the inputs' (e.g. torch.set_default_device("cuda"))
        scores, extras = povid_sequence_scores(*args, average_log_prob=average_log_prob, backend="torch")
        out = povid_loss(*args, ref_seq_scores=ref, average_log_prob=average_log_prob, backend="torch",
                         grad_mode=grad_mode)
    assert scores.device == extras["argmax"].device == out.loss.device == torch.device("cpu")
    _close(scores, want)
    _close(out.loss, loss)
    _check_metrics(out.metrics, metrics, match_fraction(b["w"], b["hc"], b["y"], b["bias"], -100))


def test_default_dtype_is_not_used():
    b = batch(seed=9)
    args = (b["w"], b["h"], b["hc"], b["y"], b["bias"])
    want = oracle_scores(*args)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        scores, _ = povid_sequence_scores(*args, backend="torch")
        out = povid_loss(*args, reference_free=True, backend="torch", grad_mode="recompute")
    finally:
        torch.set_default_dtype(old)
    assert scores.dtype == out.loss.dtype == torch.float32
    _close(scores, want)
    _close(out.loss, oracle_loss(want, None)[0])
