"""Audit of 2026-12-08: the public loss API as a researcher calls it (`tpo_loss`, `dpo_loss`, `povid_loss`,
`tpo_loss_from_logprobs`, `preference_loss_from_sequence_scores`, `pair_losses`, the modules).

Each oracle is written here from docs/math.md in float64, independently of the code under test."""

from __future__ import annotations

import math

import pytest
import torch

from tpo_fast.loss import (
    DPOLoss,
    POVIDLoss,
    TPOLoss,
    pair_losses,
    sequence_scores,
    tpo_loss,
    tpo_loss_from_logprobs,
)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _tpo_oracle(logp, vis, mask, ref_logp, ref_vis, beta=0.1, offset=0.5) -> float:
    """float64 TPO loss from nested lists: S = sum_t m (logp + log c), c = a + sigmoid(+-s), -log sigmoid(beta l)."""
    n = len(logp) // 2

    def score(lp, s, row):
        total = 0.0
        for t, keep in enumerate(mask[row]):
            if keep:
                sig = 1 / (1 + math.exp(-s[row][t]))
                total += lp[row][t] + math.log(offset + (sig if row < n else 1 - sig))
        return total

    losses = []
    for i in range(n):
        margin = (score(logp, vis, i) - score(logp, vis, n + i)) - (score(ref_logp, ref_vis, i)
                                                                     - score(ref_logp, ref_vis, n + i))
        losses.append(-_log_sigmoid(beta * margin))
    return sum(losses) / n


def _per_token():
    g = torch.Generator().manual_seed(11)
    logp = -3 * torch.rand(4, 5, generator=g)
    vis = 2 * torch.randn(4, 5, generator=g)
    ref_logp = -3 * torch.rand(4, 5, generator=g)
    ref_vis = torch.randn(4, 5, generator=g)
    labels = torch.randint(0, 50, (4, 5), generator=g)
    labels[:, :2] = -100
    labels[1, 4] = -100
    return logp, vis, ref_logp, ref_vis, labels


def test_a_mask_of_labels_or_weights_is_refused_not_read_as_true():
    """`mask` was turned into bool with `.bool()`: the labels themselves (-100 and token ids) counted the prompt as
    response tokens (loss 0.8598 where the labels' response mask gives 0.8353), and a float mask of 0.5 counted as
    whole tokens. Non-bool masks must hold only 0 and 1; such a mask gives the bool mask's loss."""
    logp, vis, ref_logp, ref_vis, labels = _per_token()
    mask = labels != -100
    want = _tpo_oracle(logp.tolist(), vis.tolist(), mask.tolist(), ref_logp.tolist(), ref_vis.tolist())
    for ok in (mask, mask.long(), mask.float(), mask.to(torch.uint8)):
        got = tpo_loss_from_logprobs(logp, vis, ok, ref_logp, ref_vis).loss
        assert got.item() == pytest.approx(want, rel=1e-6)
    for bad, value in ((labels, "-100"), (0.5 * mask.float(), "0.5"), (torch.where(mask, 1.0, math.nan), "nan")):
        with pytest.raises(ValueError, match=f"mask must be bool \\(True at response tokens\\) or hold only 0 and 1, "
                                             f".* holding {value}; were labels or token ids passed in its place"):
            tpo_loss_from_logprobs(logp, vis, bad, ref_logp, ref_vis)
    with pytest.raises(ValueError, match="mask must be bool .* holding -100"):
        sequence_scores(logp, vis, labels)


def test_pair_losses_refuses_options_it_would_drop_or_misread():
    """`pair_losses` (public) returned the hinge loss unsmoothed for label_smoothing=0.3, a flipped-label loss for
    label_smoothing=0.7 (outside [0, 0.5]), inf for beta=inf and read beta="0.1" as a number; each is refused now
    with the messages of the losses' own checks. label_smoothing=0.5 still gives the conservative-DPO value."""
    policy, ref = torch.tensor([1.0, 0.0, -2.0, 0.0]), torch.zeros(4)  # margins 3 and 0 (pairs (1, -2), (0, 0))
    with pytest.raises(ValueError, match="label_smoothing only applies to loss_type='sigmoid' .* got "
                                         "loss_type='hinge' with label_smoothing=0.3; set label_smoothing=0.0"):
        pair_losses(policy, ref, 0.1, "hinge", 0.3)
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 0.5\] .* got 0.7"):
        pair_losses(policy, ref, 0.1, "sigmoid", 0.7)
    with pytest.raises(ValueError, match="beta must be a finite number > 0 \\(DPO uses 0.1\\), got inf"):
        pair_losses(policy, ref, math.inf)
    with pytest.raises(TypeError, match="beta must be a real number"):
        pair_losses(policy, ref, "0.1")
    got = pair_losses(policy, ref, 0.5, "sigmoid", 0.5).tolist()
    want = [-0.5 * _log_sigmoid(0.5 * m) - 0.5 * _log_sigmoid(-0.5 * m) for m in (3.0, 0.0)]
    assert got == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("module", [TPOLoss, DPOLoss, POVIDLoss])
def test_an_option_passed_to_a_module_call_names_where_it_belongs(module):
    """`TPOLoss()(..., beta=0.2)` failed with Python's "got multiple values for keyword argument 'beta'"; the
    module now says that the option is held by the module and how to set it."""
    w, h, y = torch.randn(7, 4), torch.randn(2, 3, 4), torch.randint(0, 7, (2, 3))
    args = (w, h, y) if module is DPOLoss else (w, h, h[:1] if module is POVIDLoss else h, y)
    name = module.__name__
    with pytest.raises(TypeError, match=f"beta is an option of {name}, held by the module, not passed to its "
                                        f"call: set it on the module \\(loss_fn.beta = ...\\) or build it with "
                                        f"{name}\\(beta=...\\)"):
        module(backend="torch")(*args, beta=0.2)
    with pytest.raises(TypeError, match=f"beta, reference_free are options of {name}"):
        module(backend="torch")(*args, beta=0.2, reference_free=True)


def _tpo_hidden_oracle(w, b, h, hc, y, rh, rhc, beta=0.1) -> float:
    """float64 TPO from full logits (ignore_index -100): visual score from raw logits, as docs/math.md."""
    def per_token(hid, cor):
        z = hid.double() @ w.double().T + b.double()
        zc = cor.double() @ w.double().T + b.double()
        yy = y.clamp(min=0)[..., None]
        zy = z.gather(-1, yy)[..., 0]
        return (zy - z.logsumexp(-1)).tolist(), (zy - zc.gather(-1, yy)[..., 0]).tolist()

    logp, vis = per_token(h, hc)
    ref_logp, ref_vis = per_token(rh, rhc)
    return _tpo_oracle(logp, vis, (y != -100).tolist(), ref_logp, ref_vis, beta)


@pytest.mark.parametrize("grad_mode", ["fused", "recompute"])
@pytest.mark.parametrize("case", ["pair_without_tokens", "no_tokens_at_all", "no_positions", "identical_pair",
                                  "nan_off_the_response"])
def test_tpo_loss_edge_batches_match_the_oracle(case, grad_mode):
    """Real data's edge batches on both grad modes: a pair whose responses are both empty (its margin 0), a batch
    without response tokens (log 2), T = 0, a pair whose chosen and rejected rows are identical, NaN and inf on
    prompt positions of every branch (never read). Loss against the float64 oracle, every gradient finite."""
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(9, 6, generator=g), torch.randn(9, generator=g)
    h, hc, rh, rhc = (torch.randn(4, 4, 6, generator=g) for _ in range(4))
    y = torch.randint(0, 9, (4, 4), generator=g)
    y[:, 0] = -100
    if case == "pair_without_tokens":
        y[1] = y[3] = -100
    elif case == "no_tokens_at_all":
        y[:] = -100
    elif case == "no_positions":
        h, hc, rh, rhc, y = h[:, :0], hc[:, :0], rh[:, :0], rhc[:, :0], y[:, :0]
    elif case == "identical_pair":
        for t in (h, hc, rh, rhc, y):
            t[2] = t[0]
    else:
        for t, v in zip((h, hc, rh, rhc), (math.nan, math.inf, -math.inf, math.nan), strict=True):
            t[:, 0] = v
    want = math.log(2) if case == "no_tokens_at_all" else None
    oracle = _tpo_hidden_oracle(w, b, torch.nan_to_num(h), torch.nan_to_num(hc), y, torch.nan_to_num(rh),
                                torch.nan_to_num(rhc))
    if want is not None:
        assert oracle == pytest.approx(want)
    wg, hg, hcg = (t.clone().requires_grad_() for t in (w, h, hc))
    out = tpo_loss(wg, hg, hcg, y, b, ref_hidden=rh, ref_corrupted_hidden=rhc, backend="torch", grad_mode=grad_mode)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(oracle, rel=1e-5)
    assert all(t.grad.isfinite().all() for t in (wg, hg, hcg))
    assert all(v.isfinite() for v in out.metrics.values())
