"""Pair reductions shared by the DPO-family losses: token weights, sequence scores, the pair loss.

Layout of every batch: `2B` sequences, the `B` chosen ones first, then the `B` rejected ones in the
same pair order. The math is written out in docs/math.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tpo_fast.loss._checks import (
    WEIGHTINGS,
    LossOutput,
    _shape,
    as_scores,
    check_flags,
    check_label_smoothing,
    check_loss_options,
    check_offset,
    check_real,
    check_tensors,
    num_pairs,
    real_scalar,
    same_device,
)


def log_token_weights(visual_scores: torch.Tensor, offset: float = 0.5) -> torch.Tensor:
    """fp32 `log c_t` for a (2B, T) tensor of visual scores `s_t`, chosen rows first.

    Chosen rows: `log(a + sigmoid(s))`; rejected rows: `log(a + 1 - sigmoid(s)) = log(a + sigmoid(-s))`.
    Written as `logaddexp(log a, logsigmoid(+-s))`, finite for any finite s even when a = 0 (where
    `log(sigmoid(s))` would round to log(0) for s below about -88 in fp32).
    """
    offset = check_offset(offset)
    check_tensors(visual_scores=visual_scores)
    check_real(visual_scores=visual_scores)
    num_pairs(visual_scores.shape[0], "visual_scores")
    return _log_token_weights(visual_scores, float(offset))


def _log_token_weights(visual_scores: torch.Tensor, offset: float) -> torch.Tensor:
    """`log_token_weights` without its checks, for callers that checked `offset` and built the (2B, T) tensor."""
    n_pairs = visual_scores.shape[0] // 2
    s = visual_scores.float()
    log_sig = F.logsigmoid(torch.cat([s[:n_pairs], -s[n_pairs:]]))  # +s for the chosen rows, -s for the rejected
    if offset == 0:
        return log_sig
    return torch.logaddexp(torch.full_like(log_sig, math.log(offset)), log_sig)


def token_mask(mask: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """`mask` as bool, after checks against the (2B, T) tensor `like` (named `name`): a tensor of its shape and
    device, bool or holding only 0 and 1. Any other value is refused (one read-back, for non-bool masks only): `bool()`
    would count the labels' -100 and every token id but 0 as response tokens, and a weight of 0.5 as a whole token."""
    if not isinstance(mask, torch.Tensor) or mask.shape != like.shape:
        raise ValueError(f"mask must have the shape (2B, T) = {tuple(like.shape)} of {name}, "
                         f"got {_shape(mask)}")
    same_device("mask", mask, like.device)
    if mask.dtype != torch.bool and mask.device.type != "meta":
        bad = (mask != 0) & (mask != 1)  # also NaN
        if bad.any():
            raise ValueError(
                f"mask must be bool (True at response tokens) or hold only 0 and 1, got {_shape(mask)} holding "
                f"{mask[bad][0].item()!r}; were labels or token ids passed in its place? e.g. mask = labels != -100"
            )
    return mask.bool()


def sequence_scores(
    logprobs: torch.Tensor,
    visual_scores: torch.Tensor | None,
    mask: torch.Tensor,
    weighting: str = "tpo",
    offset: float = 0.5,
    average_log_prob: bool = False,
) -> torch.Tensor:
    """Per-sequence fp32 score `S(y) = sum_t m_t (logp_t + log c_t)`, shape (2B,).

    logprobs, visual_scores, mask: (2B, T), chosen sequences first. `weighting="none"` drops the
    `log c` term (plain DPO; visual_scores may then be None). With `average_log_prob` the sum is
    divided by the number of response tokens; a sequence without any gives 0, never NaN. Values at
    masked positions are ignored (also non-finite ones) and receive no gradient.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    check_flags(average_log_prob=average_log_prob)
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 2:
        raise ValueError(f"logprobs must be 2-D (2B, T), got {_shape(logprobs)}")
    m = token_mask(mask, logprobs, "logprobs")
    check_tensors(visual_scores=visual_scores)
    check_real(logprobs=logprobs, visual_scores=visual_scores if weighting == "tpo" else None)
    if weighting == "tpo":
        if visual_scores is None:
            raise ValueError(
                "weighting='tpo' needs visual scores (the corrupted branch); pass them or use 'none'"
            )
        if visual_scores.shape != logprobs.shape:
            raise ValueError(
                f"visual_scores must have the shape of logprobs {tuple(logprobs.shape)}, "
                f"got {_shape(visual_scores)}"
            )
        same_device("visual_scores", visual_scores, logprobs.device)
        num_pairs(logprobs.shape[0], "visual_scores")
        offset = check_offset(offset)
    return scores_of(logprobs, visual_scores, m, weighting, offset, average_log_prob)


def scores_of(logprobs: torch.Tensor, visual_scores: torch.Tensor | None, mask: torch.Tensor, weighting: str,
              offset: float, average_log_prob: bool) -> torch.Tensor:
    """`sequence_scores` without its checks: for a loss's own grids (a chunk's, inside the fused pass), whose
    options the loss checked once per call. `mask` is bool; `visual_scores` is given when `weighting="tpo"`."""
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)
    # where() before any arithmetic so that garbage at masked positions cannot leak NaN gradients.
    per_token = torch.where(mask, logprobs.float(), zero)
    if weighting == "tpo":
        s = torch.where(mask, visual_scores.float(), zero)
        per_token = per_token + torch.where(mask, _log_token_weights(s, offset), zero)
    total = per_token.sum(-1)
    if average_log_prob:
        total = total / mask.sum(-1).clamp(min=1)
    return total


def mean_visual_score(visual_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # The official metric: per sequence sum_t m s / (sum_t m + 1e-8).
    s = torch.where(mask, visual_scores.detach().float(), torch.zeros((), device=mask.device))
    return s.sum(-1) / (mask.sum(-1, dtype=torch.float32) + 1e-8)


def preference_loss_from_sequence_scores(
    policy_seq_scores: torch.Tensor,
    ref_seq_scores: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> LossOutput:
    """DPO-family loss from per-sequence scores, shape (2B,) each (chosen first, then rejected).

    `l = (S_pi(w) - S_pi(l)) - (S_ref(w) - S_ref(l))` (reference terms 0 when `reference_free`), then
    per pair `sigmoid`: `-logsigmoid(beta l)(1 - ls) - logsigmoid(-beta l) ls`, `hinge`: `relu(1 - beta l)`,
    `ipo`: `(l - 1/(2 beta))^2`; the loss is the mean over pairs. Metrics "rewards/chosen",
    "rewards/rejected" (`beta (S_pi - S_ref)`, batch means), "rewards/margins", "rewards/accuracies".
    """
    check_loss_options(beta, loss_type=loss_type, label_smoothing=label_smoothing)
    check_flags(reference_free=reference_free)
    beta = real_scalar("beta", beta)
    if not isinstance(policy_seq_scores, torch.Tensor) or policy_seq_scores.dim() != 1:
        raise ValueError(f"policy_seq_scores must be a 1-D (2B,) tensor, got {_shape(policy_seq_scores)}")
    check_real(policy_seq_scores=policy_seq_scores)
    n_pairs = num_pairs(policy_seq_scores.shape[0], "policy_seq_scores")
    policy = policy_seq_scores.float()
    if reference_free:
        if ref_seq_scores is not None:
            raise ValueError(
                "reference_free=True but ref_seq_scores was given; drop it or set reference_free=False"
            )
        ref = torch.zeros_like(policy)
    else:
        if ref_seq_scores is None:
            raise ValueError("ref_seq_scores (2B,) is required unless reference_free=True")
        ref = as_scores("ref_seq_scores", ref_seq_scores, 2 * n_pairs, policy.device)
    losses = pair_losses(policy, ref, beta, loss_type, label_smoothing)
    return LossOutput(losses.mean(), reward_metrics(policy, ref, beta))


REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def reward_metrics(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """The batch means of the implicit rewards `beta (S_pi - S_ref)` from (2B,) scores (chosen first): "rewards/chosen",
    "rewards/rejected", "rewards/margins" and "rewards/accuracies" (the fraction of pairs whose chosen reward is the
    larger), detached fp32 0-d tensors, reduced together (one mean, not four: each is a kernel on a GPU)."""
    n_pairs = policy.shape[0] // 2
    with torch.no_grad():
        rewards = float(beta) * (policy.float() - ref.float())
        chosen, rejected = rewards[:n_pairs], rewards[n_pairs:]
        means = torch.stack([chosen, rejected, chosen - rejected, (chosen > rejected).float()]).mean(1)
    return dict(zip(REWARD_METRICS, means.unbind(), strict=True))


def pair_losses(
    policy: torch.Tensor, ref: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-pair fp32 losses (B,) from (2B,) policy and reference scores (chosen first).

    `preference_loss_from_sequence_scores` checks every option with its messages; here each option's domain too, as
    plain float comparisons (this runs once per chunk of a fused loss): an unknown `loss_type` (ValueError, never a
    silent IPO), `beta` not a finite number > 0 (the IPO target 1 / (2 beta)), `label_smoothing` outside [0, 0.5]
    or given with another loss than "sigmoid" (which would drop it silently), and scores that are not two (2B,)
    tensors (an odd count would pair a chosen score with a chosen one)."""
    check_tensors(policy=policy, ref=ref)
    if policy is None or ref is None or policy.dim() != 1 or ref.shape != policy.shape:
        raise ValueError(f"policy and ref must be 1-D (2B,) scores of one shape, got {_shape(policy)} and "
                         f"{_shape(ref)}")
    n_pairs = num_pairs(policy.shape[0], "policy")
    beta = real_scalar("beta", beta)
    if loss_type not in ("sigmoid", "hinge", "ipo"):
        raise ValueError(f"loss_type must be 'sigmoid', 'hinge' or 'ipo', got {loss_type!r}")
    if not 0 < beta < math.inf:
        raise ValueError(f"beta must be a finite number > 0 (DPO uses 0.1), got {beta}")
    label_smoothing = check_label_smoothing(label_smoothing, loss_type)
    logits = (policy[:n_pairs] - policy[n_pairs:]) - (ref[:n_pairs] - ref[n_pairs:])
    if loss_type == "sigmoid":
        if label_smoothing == 0:  # the default: no second term (nor its NaN, 0 * inf, at an infinite margin)
            return -F.logsigmoid(beta * logits)
        return (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    return (logits - 1 / (2 * beta)) ** 2
