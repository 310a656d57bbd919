"""Options of the loss layer: defaults, scalar types, list inputs and validation at every entry point.

Oracles are written out in the test (the pair-loss formulas of docs/math.md on a handful of numbers).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tpo_fast.loss import (
    DPOLoss,
    POVIDLoss,
    TPOLoss,
    log_token_weights,
    pair_losses,
    preference_loss_from_sequence_scores,
    sequence_scores,
    tpo_loss,
)

POLICY = torch.tensor([1.0, -0.5, 0.2, 0.3])  # (2B,) with B = 2: chosen 1.0, -0.5; rejected 0.2, 0.3
REF = torch.tensor([0.4, 0.1, -0.2, 0.6])


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _margins(policy=POLICY, ref=REF):
    return [(policy[i] - policy[i + 2] - (ref[i] - ref[i + 2])).item() for i in range(2)]


def test_preference_loss_defaults_are_sigmoid_beta_0_1_no_smoothing():
    out = preference_loss_from_sequence_scores(POLICY, REF)
    expected = sum(-_logsigmoid(0.1 * m) for m in _margins()) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert pair_losses(POLICY, REF, 0.1).tolist() == pytest.approx([-_logsigmoid(0.1 * m) for m in _margins()])


@pytest.mark.parametrize(
    ("loss_type", "smoothing", "per_pair"),
    [
        ("sigmoid", 0.2, lambda m: -0.8 * _logsigmoid(0.5 * m) - 0.2 * _logsigmoid(-0.5 * m)),
        ("hinge", 0.0, lambda m: max(0.0, 1 - 0.5 * m)),
        ("ipo", 0.0, lambda m: (m - 1 / (2 * 0.5)) ** 2),
    ],
)
def test_pair_loss_types(loss_type, smoothing, per_pair):
    out = preference_loss_from_sequence_scores(POLICY, REF, beta=0.5, loss_type=loss_type, label_smoothing=smoothing)
    assert out.loss.item() == pytest.approx(sum(per_pair(m) for m in _margins()) / 2, rel=1e-6)


def test_reward_accuracy_counts_strict_wins_only():
    # pair 0: chosen reward equals rejected reward (a tie is not a win); pair 1: chosen wins
    policy = torch.tensor([1.0, 2.0, 1.0, 0.0])
    out = preference_loss_from_sequence_scores(policy, torch.zeros(4))
    assert out.metrics["rewards/accuracies"].item() == 0.5
    assert out.metrics["rewards/margins"].item() == pytest.approx(0.1, rel=1e-6)


def test_sequence_score_and_weight_defaults():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])
    s = torch.tensor([[0.3, -1.2], [2.0, 0.1]])
    mask = torch.tensor([[True, True], [True, False]])
    sig = torch.sigmoid
    # chosen row 0: log(0.5 + sig(s)); rejected row 1: log(0.5 + 1 - sig(s)); mask drops (1, 1)
    expected = [
        -3.0 + math.log(0.5 + sig(s[0, 0]).item()) + math.log(0.5 + sig(s[0, 1]).item()),
        -0.5 + math.log(1.5 - sig(s[1, 0]).item()),
    ]
    assert sequence_scores(logp, s, mask).tolist() == pytest.approx(expected, rel=1e-6)
    assert log_token_weights(s)[0, 0].item() == pytest.approx(math.log(0.5 + sig(s[0, 0]).item()), rel=1e-6)
    averaged = sequence_scores(logp, None, mask, "none", average_log_prob=True)
    assert averaged.tolist() == pytest.approx([-1.5, -0.5])


@pytest.mark.parametrize("beta", [np.float32(0.25), np.float64(0.25), torch.tensor(0.25), np.array(0.25), 0.25])
def test_beta_accepts_any_real_scalar(beta):
    out = preference_loss_from_sequence_scores(POLICY, REF, beta=beta)
    assert out.loss.item() == pytest.approx(preference_loss_from_sequence_scores(POLICY, REF, beta=0.25).loss.item())
    assert TPOLoss(beta=beta).beta is beta


@pytest.mark.parametrize(("beta", "error", "match"), [
    ("0.1", TypeError, "beta must be a real number"),
    (True, TypeError, "beta must be a real number"),
    (torch.tensor([0.1, 0.2]), TypeError, "beta must be a real number"),
    (complex(0.1, 0), TypeError, "beta must be a real number"),
    (float("nan"), ValueError, "beta must be a finite number > 0"),
    (np.float32(-1), ValueError, "beta must be a finite number > 0"),
])
def test_beta_rejects_the_rest(beta, error, match):
    with pytest.raises(error, match=match):
        preference_loss_from_sequence_scores(POLICY, REF, beta=beta)
    with pytest.raises(error, match=match):
        DPOLoss(beta=beta)


def test_options_are_checked_at_every_entry_point():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        preference_loss_from_sequence_scores(POLICY, REF, loss_type="kto")
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 0.5\]"):
        preference_loss_from_sequence_scores(POLICY, REF, label_smoothing=0.6)
    with pytest.raises(ValueError, match="backend must be one of"):
        POVIDLoss(backend="bogus")
    with pytest.raises(ValueError, match="grad_mode must be one of"):
        DPOLoss(grad_mode="fast")
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        TPOLoss(ignore_index=-100.0)


def test_sequence_scores_accept_a_list_or_say_so():
    as_list = preference_loss_from_sequence_scores(POLICY, REF.tolist())
    assert as_list.loss.item() == preference_loss_from_sequence_scores(POLICY, REF).loss.item()
    with pytest.raises(TypeError, match="ref_seq_scores must be a tensor or a list of 4 numbers"):
        preference_loss_from_sequence_scores(POLICY, ["a", 1, 2, 3])
    with pytest.raises(TypeError, match=r"ref_seq_scores must be a tensor \(or a list of numbers\)"):
        preference_loss_from_sequence_scores(POLICY, np.zeros(4))
    with pytest.raises(ValueError, match=r"ref_seq_scores must be of shape \(2B,\) = \(4,\)"):
        preference_loss_from_sequence_scores(POLICY, [0.0, 1.0])
    w, h = torch.randn(11, 8), torch.randn(4, 3, 8)
    y = torch.randint(0, 11, (4, 3))
    listed = tpo_loss(w, h, h + 0.1, y, ref_seq_scores=REF.tolist())
    tensor = tpo_loss(w, h, h + 0.1, y, ref_seq_scores=REF)
    assert listed.loss.item() == tensor.loss.item()


def test_non_tensor_scores_get_a_value_error():
    with pytest.raises(ValueError, match=r"policy_seq_scores must be a 1-D \(2B,\) tensor"):
        preference_loss_from_sequence_scores([1.0, 2.0, 3.0, 4.0], REF)
    with pytest.raises(ValueError, match="logprobs must be 2-D"):
        sequence_scores([[0.0, 1.0]], None, torch.ones(1, 2, dtype=torch.bool), "none")
