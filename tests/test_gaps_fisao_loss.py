"""`tpo_fast.loss.fisao` edges that mutation testing found unguarded (docs/testing.md): every input error with its
whole message; option-domain boundaries (0, 1, negative, NaN, non-numbers); reward-to-go and whitening values worked
out by hand (last token included, one and two valid values, equal values); metrics over exactly one response token;
hidden as (R, T, D) and (R*T, D); the default backend, the backend and ignore_index reaching the primitive; results
on the inputs' device and in fp32 whatever torch's default device and dtype are.

Expected messages are written out literally; expected values are computed here from full logits, sharing no code
with tpo_fast.

Equivalent mutants left alive: `continue` -> `break` for clip_eps_high=None (the last item of the loop); whitening's
`numel() > 1` -> `>= 1` / `or True` (std(unbiased=False) of one value is already 0); `zero` built without dtype
(a 0-d tensor does not promote the fp32 operands of torch.where); `sum(+1)` for `sum(-1)` on (R, T).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from tpo_fast.loss import check_pg_options, token_advantages, token_pg_loss

R, T, D, V = 2, 3, 4, 5
POS = "must be a finite number > 0 (PPO uses 0.2), got "
KL_NEEDS_REF = "kl_coef > 0 needs ref_logprobs (R, T) from the reference model; or set kl_coef=0"
TARGETS_2D = "targets must be a 2-D (R, T) tensor of sampled response tokens (shifted)"


def batch(seed=0, ign=-100):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, D, generator=g)
    b = torch.randn(V, generator=g) * 0.3
    h = torch.randn(R, T, D, generator=g)
    y = torch.randint(0, V, (R, T), generator=g)
    y[0, 0] = ign
    y[1, 2] = ign
    lp = oracle_logp(w, b, h, y, ign)
    old = lp + 0.4 * torch.randn(R, T, generator=g)
    ref = lp + 0.5 * torch.randn(R, T, generator=g)
    adv = torch.randn(R, T, generator=g)
    return w, b, h, y, old, ref, adv


def oracle_logp(w, b, h, y, ign=-100):
    mask = y != ign
    full = F.linear(h.double(), w.double(), b.double()).log_softmax(-1)
    return (full.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).float()


def oracle(w, b, h, y, old, ref, adv, clip_eps=0.2, clip_eps_high=None, kl_coef=0.05, aggregation="token_mean",
           ign=-100):
    """k3 loss and the metrics, written out per token in float64."""
    mask = (y != ign).double()
    lp = oracle_logp(w, b, h, y, ign).double()
    old = old.double() * mask if old is not None else lp
    adv = adv.double() * mask
    ratio = torch.exp((lp - old) * mask)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + high) * adv)
    diff = (ref.double() - lp) * mask if ref is not None else torch.zeros_like(lp)
    kl = torch.exp(diff) - diff - 1
    per = (-surr + kl_coef * kl) * mask
    n = mask.sum()
    if aggregation == "token_mean":
        loss = per.sum() / n
    else:
        has = mask.any(-1)  # the sequences with response tokens; an empty one has no token mean
        loss = (per.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / has.sum().clamp(min=1)
    metrics = {
        "pg/loss": (-surr * mask).sum() / n,
        "pg/ratio_mean": (ratio * mask).sum() / n,
        "kl/mean": (kl * mask).sum() / n,
        "advantages/mean": adv.sum() / n,
        "logps/mean": (lp * mask).sum() / n,
    }
    return loss.float(), {k: v.float() for k, v in metrics.items()}


def _call(**kw):
    w, b, h, y, old, ref, adv = batch()
    args = dict(advantages=adv, old_logprobs=old, ref_logprobs=ref, backend="torch")
    args.update(kw)
    hidden = args.pop("hidden", h)
    targets = args.pop("targets", y)
    return lambda: token_pg_loss(w, hidden, targets, b, **args)


def _opts(**kw):
    args = dict(clip_eps=0.2, clip_eps_high=None, kl_coef=0.05, kl_estimator="k3", aggregation="token_mean")
    args.update(kw)
    return lambda: check_pg_options(**args)


_Z = torch.zeros(2, 3)
ERRORS = [
    ("clip_eps-0", _opts(clip_eps=0), "clip_eps " + POS + "0"),
    ("clip_eps-0.0", _opts(clip_eps=0.0), "clip_eps " + POS + "0.0"),
    ("clip_eps-neg", _opts(clip_eps=-0.5), "clip_eps " + POS + "-0.5"),
    ("clip_eps-nan", _opts(clip_eps=float("nan")), "clip_eps " + POS + "nan"),
    ("clip_eps-inf", _opts(clip_eps=float("inf")), "clip_eps " + POS + "inf"),
    ("clip_eps-1", _opts(clip_eps=1), "clip_eps must be < 1 (the ratio is clipped to [1 - clip_eps, ...]), got 1"),
    ("clip_eps-1.5", _opts(clip_eps=1.5),
     "clip_eps must be < 1 (the ratio is clipped to [1 - clip_eps, ...]), got 1.5"),
    ("clip_eps_high-0", _opts(clip_eps_high=0), "clip_eps_high " + POS + "0"),
    ("clip_eps_high-neg", _opts(clip_eps_high=-0.1), "clip_eps_high " + POS + "-0.1"),
    ("clip_eps_high-nan", _opts(clip_eps_high=float("nan")), "clip_eps_high " + POS + "nan"),
    ("kl_coef-neg", _opts(kl_coef=-0.1), "kl_coef must be a finite number >= 0, got -0.1"),
    ("kl_coef-nan", _opts(kl_coef=float("nan")), "kl_coef must be a finite number >= 0, got nan"),
    ("kl_coef-inf", _opts(kl_coef=float("inf")), "kl_coef must be a finite number >= 0, got inf"),
    ("kl_estimator", _opts(kl_estimator="k4"), "kl_estimator must be one of ('k1', 'k2', 'k3'), got 'k4'"),
    ("aggregation", _opts(aggregation="sum"), "aggregation must be one of ('token_mean', 'seq_mean'), got 'sum'"),
    ("adv-mode", lambda: token_advantages(_Z, _Z, mode="gae"),
     "advantage mode must be one of ('reward', 'return'), got 'gae'"),
    ("adv-shapes", lambda: token_advantages(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool)),
     "rewards and mask must both be (R, T), got float32 of shape (2, 3) and bool of shape (2, 4)"),
    ("adv-3d", lambda: token_advantages(torch.zeros(2, 3, 1), torch.ones(2, 3, 1, dtype=torch.bool)),
     "rewards and mask must both be (R, T), got float32 of shape (2, 3, 1) and bool of shape (2, 3, 1)"),
    ("adv-1d", lambda: token_advantages(torch.zeros(3), torch.ones(3)),
     "rewards and mask must both be (R, T), got float32 of shape (3,) and float32 of shape (3,)"),
    ("loss-clip_eps_high", _call(clip_eps_high=0), "clip_eps_high " + POS + "0"),
    ("loss-clip_eps", _call(clip_eps=1.0),
     "clip_eps must be < 1 (the ratio is clipped to [1 - clip_eps, ...]), got 1.0"),
    ("targets-1d", _call(targets=torch.zeros(6, dtype=torch.long)), TARGETS_2D),
    ("targets-3d", _call(targets=torch.zeros(2, 3, 1, dtype=torch.long)), TARGETS_2D),
    ("targets-list", _call(targets=[[0, 1, 2], [0, 1, 2]]), TARGETS_2D),
    ("hidden-2d-rows", _call(hidden=torch.zeros(5, D)),
     "hidden must be (2, 3, D) or (6, D) to match targets, got float32 of shape (5, 4)"),
    ("hidden-3d-rows", _call(hidden=torch.zeros(3, 2, D)),
     "hidden must be (2, 3, D) or (6, D) to match targets, got float32 of shape (3, 2, 4)"),
    ("hidden-3d-flat", _call(hidden=torch.zeros(6, D, 1)),
     "hidden must be (2, 3, D) or (6, D) to match targets, got float32 of shape (6, 4, 1)"),
    ("hidden-1d", _call(hidden=torch.zeros(6)),
     "hidden must be (2, 3, D) or (6, D) to match targets, got float32 of shape (6,)"),
    ("advantages-shape", _call(advantages=torch.zeros(3, 2)),
     "advantages must have the (R, T) = (2, 3) shape of targets (or (R,) = (2,), one per sequence), got float32 of "
     "shape (3, 2)"),
    ("advantages-rows", _call(advantages=torch.zeros(3)),
     "advantages must have the (R, T) = (2, 3) shape of targets (or (R,) = (2,), one per sequence), got float32 of "
     "shape (3,)"),
    ("old-shape", _call(old_logprobs=torch.zeros(2, 4)),
     "old_logprobs must have the (R, T) = (2, 3) shape of targets, got float32 of shape (2, 4)"),
    ("ref-shape", _call(ref_logprobs=torch.zeros(6, dtype=torch.float64)),
     "ref_logprobs must have the (R, T) = (2, 3) shape of targets, got float64 of shape (6,)"),
    ("kl-needs-ref", _call(ref_logprobs=None), KL_NEEDS_REF),
    ("backend", _call(backend="nope"),
     "backend must be one of ('auto', 'triton', 'torch', 'reference'), got 'nope'"),
]


@pytest.mark.parametrize("call,expected", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_whole_message(call, expected):
    with pytest.raises(ValueError, match="^" + re.escape(expected) + "$"):
        call()


@pytest.mark.parametrize(("name", "value"), [("clip_eps", "0.2"), ("clip_eps", None), ("clip_eps_high", "x"),
                                             ("kl_coef", "0.1"), ("kl_coef", True)])
def test_options_that_are_not_real_numbers(name, value):
    """Strings, None and bools are no numbers: a TypeError, as for the other losses' options (`real_scalar`)."""
    with pytest.raises(TypeError, match=f"^{name} must be a real number \\(int, float, NumPy scalar or 0-d tensor\\)"):
        _opts(**{name: value})()


@pytest.mark.parametrize("kw", [
    dict(kl_coef=0), dict(kl_coef=0.0), dict(clip_eps=0.999), dict(clip_eps=1e-9), dict(clip_eps_high=5.0),
    dict(clip_eps_high=None), dict(clip_eps_high=1e-9),
], ids=str)
def test_options_accepted(kw):
    _opts(**kw)()


def test_kl_coef_zero_needs_no_reference():
    w, b, h, y, old, ref, adv = batch()
    out = token_pg_loss(w, h, y, b, advantages=adv, old_logprobs=old, kl_coef=0, backend="torch")
    exp, _ = oracle(w, b, h, y, old, None, adv, kl_coef=0.0)
    torch.testing.assert_close(out.loss, exp, rtol=1e-5, atol=1e-6)


# --- token_advantages -----------------------------------------------------------------------------------------

MASK = torch.tensor([[True, True, True], [True, True, False]])
REW = torch.tensor([[1.0, 2.0, 4.0], [3.0, -1.0, 7.0]])


def test_return_default_gamma_is_one_and_includes_last_token():
    out = token_advantages(REW, MASK, mode="return")
    torch.testing.assert_close(out, torch.tensor([[7.0, 6.0, 4.0], [2.0, -1.0, 0.0]]))


def test_return_with_gamma_half():
    out = token_advantages(REW, MASK, mode="return", gamma=0.5)
    torch.testing.assert_close(out, torch.tensor([[3.0, 4.0, 4.0], [2.5, -1.0, 0.0]]))


def test_return_single_token_row():
    out = token_advantages(torch.tensor([[5.0]]), torch.tensor([[True]]), mode="return", gamma=0.9)
    torch.testing.assert_close(out, torch.tensor([[5.0]]))


def test_whiten_two_values():
    rew = torch.tensor([[0.0, 4.0, 9.0]])
    mask = torch.tensor([[True, True, False]])
    out = token_advantages(rew, mask, whiten=True)
    torch.testing.assert_close(out, torch.tensor([[-1.0, 1.0, 0.0]]))


def test_whiten_three_values():
    rew = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[True, True], [True, False]])
    s = math.sqrt(2 / 3)
    out = token_advantages(rew, mask, whiten=True)
    torch.testing.assert_close(out, torch.tensor([[-1 / s, 0.0], [1 / s, 0.0]]))


def test_whiten_single_value_is_zero():
    out = token_advantages(torch.tensor([[3.0, 8.0]]), torch.tensor([[False, True]]), whiten=True)
    torch.testing.assert_close(out, torch.zeros(1, 2), rtol=0, atol=0)


def test_whiten_equal_values_are_zero_not_nan():
    out = token_advantages(torch.tensor([[2.5, 2.5], [2.5, -4.0]]), torch.tensor([[True, True], [True, False]]),
                           whiten=True)
    torch.testing.assert_close(out, torch.zeros(2, 2), rtol=0, atol=0)


def test_whiten_return_equal_values():
    out = token_advantages(torch.tensor([[0.0, 3.0]]), torch.tensor([[True, True]]), mode="return", whiten=True)
    torch.testing.assert_close(out, torch.zeros(1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["reward", "return"])
@pytest.mark.parametrize("whiten", [False, True])
def test_advantages_on_input_device_under_meta_default(mode, whiten):
    expected = token_advantages(REW, MASK, mode=mode, gamma=0.5, whiten=whiten)
    with torch.device("meta"):
        out = token_advantages(REW, MASK, mode=mode, gamma=0.5, whiten=whiten)
    assert out.device == REW.device
    torch.testing.assert_close(out, expected)


def test_advantages_equal_values_under_meta_default():
    rew, mask = torch.tensor([[2.0, 2.0]]), torch.tensor([[True, True]])
    with torch.device("meta"):
        out = token_advantages(rew, mask, whiten=True)
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, torch.zeros(1, 2), rtol=0, atol=0)


# --- token_pg_loss values and metrics --------------------------------------------------------------------------

def _check(out, exp_loss, exp_metrics):
    torch.testing.assert_close(out.loss, exp_loss, rtol=1e-5, atol=1e-6)
    for k, v in exp_metrics.items():
        torch.testing.assert_close(out.metrics[k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("flat", [False, True], ids=["RTD", "flatD"])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_loss_and_metrics_exact(flat, aggregation):
    w, b, h, y, old, ref, adv = batch()
    hidden = h.reshape(R * T, D) if flat else h
    out = token_pg_loss(w, hidden, y, b, advantages=adv, old_logprobs=old, ref_logprobs=ref, aggregation=aggregation,
                        backend="torch")
    assert set(out.metrics) == {"pg/loss", "pg/clip_frac", "pg/ratio_mean", "kl/mean", "advantages/mean",
                                "logps/mean"}
    _check(out, *oracle(w, b, h, y, old, ref, adv, aggregation=aggregation))


def test_flat_hidden_with_d_equal_to_rows():
    """(R*T, D) with D == R*T: the row count, not the width, is checked."""
    g = torch.Generator().manual_seed(3)
    w, h = torch.randn(V, R * T, generator=g), torch.randn(R * T, R * T, generator=g)
    b = torch.zeros(V)
    y = torch.randint(0, V, (R, T), generator=g)
    adv = torch.randn(R, T, generator=g)
    out = token_pg_loss(w, h, y, advantages=adv, kl_coef=0.0, backend="torch")
    _check(out, *oracle(w, b, h.view(R, T, -1), y, None, None, adv, kl_coef=0.0))


def test_default_backend_auto():
    w, b, h, y, old, ref, adv = batch()
    out = token_pg_loss(w, h, y, b, advantages=adv, old_logprobs=old, ref_logprobs=ref)
    _check(out, *oracle(w, b, h, y, old, ref, adv))


def test_custom_ignore_index_reaches_primitive():
    w, b, h, y, old, ref, adv = batch(ign=-1)
    out = token_pg_loss(w, h, y, b, advantages=adv, old_logprobs=old, ref_logprobs=ref, ignore_index=-1,
                        backend="torch")
    _check(out, *oracle(w, b, h, y, old, ref, adv, ign=-1))


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_one_response_token(aggregation):
    w, b, h, y, old, ref, adv = batch()
    y = torch.full_like(y, -100)
    y[1, 1] = 2
    out = token_pg_loss(w, h, y, b, advantages=adv, old_logprobs=old, ref_logprobs=ref, aggregation=aggregation,
                        backend="torch")
    exp_loss, exp_metrics = oracle(w, b, h, y, old, ref, adv, aggregation=aggregation)
    _check(out, exp_loss, exp_metrics)
    torch.testing.assert_close(out.metrics["advantages/mean"], adv[1, 1])


def test_seq_mean_rows_with_one_and_two_tokens():
    w, b, h, y, old, ref, adv = batch()
    y[0] = torch.tensor([-100, 1, -100])
    y[1] = torch.tensor([0, 3, -100])
    out = token_pg_loss(w, h, y, b, advantages=adv, old_logprobs=old, ref_logprobs=ref, aggregation="seq_mean",
                        backend="torch")
    _check(out, *oracle(w, b, h, y, old, ref, adv, aggregation="seq_mean"))


def test_on_policy_metrics_exact():
    w, b, h, y, old, ref, adv = batch()
    out = token_pg_loss(w, h, y, b, advantages=adv, ref_logprobs=ref, backend="torch")
    _check(out, *oracle(w, b, h, y, None, ref, adv))
    torch.testing.assert_close(out.metrics["pg/ratio_mean"], torch.tensor(1.0))


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_on_input_device_under_meta_default(aggregation):
    w, b, h, y, old, ref, adv = batch()
    expected = oracle(w, b, h, y, old, ref, adv, aggregation=aggregation)
    with torch.device("meta"):
        out = token_pg_loss(w, h, y, b, advantages=adv, old_logprobs=old, ref_logprobs=ref, aggregation=aggregation,
                            backend="torch")
    assert out.loss.device.type == "cpu"
    assert all(v.device.type == "cpu" for v in out.metrics.values())
    _check(out, *expected)


def test_fp32_under_float64_default():
    w, b, h, y, old, ref, adv = batch()
    expected = oracle(w, b, h, y, old, ref, adv)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = token_pg_loss(w, h, y, b, advantages=adv, old_logprobs=old, ref_logprobs=ref, backend="torch")
        adv_out = token_advantages(REW, MASK, mode="return", whiten=True)
    finally:
        torch.set_default_dtype(prev)
    assert out.loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out.metrics.values())
    assert adv_out.dtype == torch.float32
    _check(out, *expected)
