"""Preference losses on the fused token primitive: TPO (token-weighted DPO) and plain DPO.

TPO here is *Token Preference Optimization* (arXiv 2412.14487, github alibaba/TPO), not TRL's
`TPOTrainer`, which is *Triple* Preference Optimization (a different method that shares the acronym).

Layout of every batch: `2B` sequences, the `B` chosen ones first, then the `B` rejected ones in the
same pair order (the concatenated batch of TRL's DPO trainer). Targets are already shifted: hidden
row `t` of a sequence predicts `targets[:, t]`; `ignore_index` marks prompt, image and padding.

The math (SPEC.md), per response token with mask `m_t`:

    s_t = z_t[y_t] - z~_t[y_t]                     visual score (raw logits, clean minus corrupted)
    c_t = a + sigmoid(s_t)      (chosen)           self-calibrated token weight, offset a = 0.5
    c_t = a + 1 - sigmoid(s_t)  (rejected)
    S(y) = sum_t m_t (logp_t + log c_t)            (weighting="tpo"; "none" drops log c: plain DPO)
    l = (S_pi(y^w) - S_pi(y^l)) - (S_ref(y^w) - S_ref(y^l))
    loss = mean over pairs of -log sigmoid(beta * l)   (or hinge / ipo, with label smoothing)

Everything is plain PyTorch on the per-token outputs of `tpo_fast.token_stats`, which computes the
clean branch and the corrupted branch's gathered logit in one call without N x V logits. The
math lives in one place, `tpo_loss_from_logprobs`; `tpo_loss` and `dpo_loss` feed it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tpo_fast.ops import token_stats

WEIGHTINGS = ("tpo", "none")
LOSS_TYPES = ("sigmoid", "hinge", "ipo")


class LossOutput(NamedTuple):
    """What every loss returns.

    loss: fp32 scalar, the mean over pairs (differentiable).
    metrics: detached fp32 scalars keyed like TRL's DPO trainer logs ("rewards/chosen", ...).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _shape(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} of shape {tuple(t.shape)}"


def check_loss_options(
    beta: float,
    weighting: str = "tpo",
    offset: float = 0.5,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> None:
    """Raise ValueError for an option outside its domain; the message says what to pass instead."""
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0 (TPO and DPO use 0.1), got {beta!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(
            f"weighting must be one of {WEIGHTINGS} ('tpo': token-weighted TPO, 'none': plain DPO), "
            f"got {weighting!r}"
        )
    if not isinstance(offset, (int, float)) or not math.isfinite(offset) or offset < 0:
        raise ValueError(
            f"offset must be a finite number >= 0 (the paper uses 0.5, ablating 0, 0.5, 1), got {offset!r}"
        )
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(
            f"label_smoothing must lie in [0, 0.5] (the assumed probability that a pair's label is flipped), "
            f"got {label_smoothing!r}"
        )
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ValueError(
            f"label_smoothing only applies to loss_type='sigmoid' (conservative DPO), "
            f"got loss_type={loss_type!r} "
            f"with label_smoothing={label_smoothing}; set label_smoothing=0.0"
        )


def _num_pairs(n_seq: int, what: str) -> int:
    if n_seq % 2 != 0 or n_seq == 0:
        raise ValueError(
            f"{what} must hold an even, non-zero number of sequences 2B (B chosen, then B rejected), "
            f"got {n_seq}"
        )
    return n_seq // 2


def log_token_weights(visual_scores: torch.Tensor, offset: float = 0.5) -> torch.Tensor:
    """fp32 `log c_t` for a (2B, T) tensor of visual scores `s_t`, chosen rows first.

    Chosen rows: `log(a + sigmoid(s))`; rejected rows: `log(a + 1 - sigmoid(s)) = log(a + sigmoid(-s))`.
    Written as `logaddexp(log a, logsigmoid(+-s))`, finite for any finite s even when a = 0 (where
    `log(sigmoid(s))` would round to log(0) for s below about -88 in fp32).
    """
    n_pairs = _num_pairs(visual_scores.shape[0], "visual_scores")
    s = visual_scores.float()
    sign = torch.ones(2 * n_pairs, 1, dtype=s.dtype, device=s.device)
    sign[n_pairs:] = -1.0
    log_sig = F.logsigmoid(sign * s)
    if offset == 0:
        return log_sig
    return torch.logaddexp(torch.full_like(log_sig, math.log(offset)), log_sig)


def _mask_tokens(mask: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    if mask.shape != shape:
        raise ValueError(f"mask must have the shape (2B, T) = {tuple(shape)} of {name}, got {_shape(mask)}")
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
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be 2-D (2B, T), got {_shape(logprobs)}")
    m = _mask_tokens(mask, logprobs.shape, "logprobs")
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)
    # where() before any arithmetic so that garbage at masked positions cannot leak NaN gradients.
    per_token = torch.where(m, logprobs.float(), zero)
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
        s = torch.where(m, visual_scores.float(), zero)
        per_token = per_token + torch.where(m, log_token_weights(s, offset), zero)
    total = per_token.sum(-1)
    if average_log_prob:
        total = total / m.sum(-1).clamp(min=1)
    return total


def _mean_visual_score(visual_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # The official metric: per sequence sum_t m s / (sum_t m + 1e-8).
    m = mask.float()
    s = torch.where(mask, visual_scores.detach().float(), torch.zeros((), device=m.device))
    return s.sum(-1) / (m.sum(-1) + 1e-8)


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
    if policy_seq_scores.dim() != 1:
        raise ValueError(f"policy_seq_scores must be 1-D (2B,), got {_shape(policy_seq_scores)}")
    n_pairs = _num_pairs(policy_seq_scores.shape[0], "policy_seq_scores")
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
        if ref_seq_scores.shape != policy.shape:
            raise ValueError(
                f"ref_seq_scores must have the shape of policy_seq_scores {tuple(policy.shape)}, "
                f"got {_shape(ref_seq_scores)}"
            )
        ref = ref_seq_scores.detach().float()
    pi_chosen, pi_rejected = policy[:n_pairs], policy[n_pairs:]
    ref_chosen, ref_rejected = ref[:n_pairs], ref[n_pairs:]
    logits = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (pi_chosen - ref_chosen).detach()
    rejected_rewards = beta * (pi_rejected - ref_rejected).detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
    }
    return LossOutput(losses.mean(), metrics)


def tpo_loss_from_logprobs(
    policy_logprobs: torch.Tensor,
    policy_visual_scores: torch.Tensor | None,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    ref_visual_scores: torch.Tensor | None = None,
    *,
    ref_seq_scores: torch.Tensor | None = None,
    beta: float = 0.1,
    weighting: str = "tpo",
    offset: float = 0.5,
    detach_weights: bool = False,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    average_log_prob: bool = False,
) -> LossOutput:
    """TPO (or, with `weighting="none"`, DPO) from precomputed per-token tensors.

    Args:
        policy_logprobs: (2B, T) `logp_t` of the policy on the clean image, chosen sequences first.
        policy_visual_scores: (2B, T) `s_t = z_t[y_t] - z~_t[y_t]` of the policy (raw logits), or None
            when `weighting="none"` (the visual-score metrics are then left out).
        mask: (2B, T) bool, True at response tokens.
        ref_logprobs, ref_visual_scores: (2B, T) the same for the reference model (no gradient), or
        ref_seq_scores: (2B,) its precomputed `S_ref` (e.g. from `reference_sequence_scores`);
            exactly one of the two forms unless `reference_free`.
        beta: 0.1. weighting: "tpo" (default) or "none". offset: `a` = 0.5.
        detach_weights: False (SPEC: gradients flow through `c`); True detaches `s`.
        loss_type: "sigmoid" (default), "hinge" or "ipo". label_smoothing: 0.0, in [0, 0.5], sigmoid only.
        reference_free: False; True sets the reference terms to 0.
        average_log_prob: False; True divides each `S` by its number of response tokens.

    Returns:
        `LossOutput(loss, metrics)`; metrics: "rewards/{chosen,rejected,margins,accuracies}" (rewards
        include the `log c` terms), "logps/{chosen,rejected}" (policy `sum_t m logp`, averaged over
        tokens when `average_log_prob`, no `log c`), and "visual_score/{chosen,rejected}" (the
        official per-sequence `sum m s / (sum m + 1e-8)`, batch mean) when policy visual scores exist.
    """
    check_loss_options(beta, weighting, offset, loss_type, label_smoothing)
    if policy_logprobs.dim() != 2:
        raise ValueError(f"policy_logprobs must be 2-D (2B, T), got {_shape(policy_logprobs)}")
    n_pairs = _num_pairs(policy_logprobs.shape[0], "policy_logprobs")
    m = _mask_tokens(mask, policy_logprobs.shape, "policy_logprobs")
    if weighting == "tpo" and policy_visual_scores is None:
        raise ValueError(
            "weighting='tpo' needs policy_visual_scores (2B, T) from the corrupted-image branch; "
            "pass them or use weighting='none' (plain DPO)"
        )
    if policy_visual_scores is not None and policy_visual_scores.shape != policy_logprobs.shape:
        raise ValueError(
            f"policy_visual_scores must have the shape of policy_logprobs {tuple(policy_logprobs.shape)}, "
            f"got {_shape(policy_visual_scores)}"
        )

    has_tokens = ref_logprobs is not None or ref_visual_scores is not None
    if reference_free:
        if has_tokens or ref_seq_scores is not None:
            raise ValueError(
                "reference_free=True but reference inputs were given; drop them or set reference_free=False"
            )
        ref_scores = None
    elif has_tokens and ref_seq_scores is not None:
        raise ValueError(
            "ambiguous reference: give either ref_seq_scores (2B,) or per-token "
            "ref_logprobs/ref_visual_scores (2B, T), not both"
        )
    elif has_tokens:
        if ref_logprobs is None:
            raise ValueError("ref_visual_scores was given without ref_logprobs; pass both (2B, T) tensors")
        if ref_logprobs.shape != policy_logprobs.shape:
            raise ValueError(
                f"ref_logprobs must have the shape of policy_logprobs {tuple(policy_logprobs.shape)}, "
                f"got {_shape(ref_logprobs)}"
            )
        if ref_visual_scores is not None and ref_visual_scores.shape != policy_logprobs.shape:
            raise ValueError(
                f"ref_visual_scores must have the shape of policy_logprobs {tuple(policy_logprobs.shape)}, "
                f"got {_shape(ref_visual_scores)}"
            )
        if weighting == "tpo" and ref_visual_scores is None:
            raise ValueError(
                "weighting='tpo' needs ref_visual_scores (2B, T) with ref_logprobs: "
                "the reference weights its tokens with its own c^ref"
            )
        with torch.no_grad():
            ref_scores = sequence_scores(
                ref_logprobs.detach(),
                None if ref_visual_scores is None else ref_visual_scores.detach(),
                m,
                weighting,
                offset,
                average_log_prob,
            )
    elif ref_seq_scores is not None:
        if ref_seq_scores.shape != (2 * n_pairs,):
            raise ValueError(
                f"ref_seq_scores must be of shape (2B,) = ({2 * n_pairs},), got {_shape(ref_seq_scores)}"
            )
        ref_scores = ref_seq_scores
    else:
        raise ValueError(
            "reference inputs are missing: pass ref_seq_scores (2B,), or ref_logprobs and ref_visual_scores "
            "(2B, T), or set reference_free=True"
        )

    s = policy_visual_scores
    if s is not None and detach_weights:
        s = s.detach()
    policy_scores = sequence_scores(policy_logprobs, s, m, weighting, offset, average_log_prob)
    out = preference_loss_from_sequence_scores(
        policy_scores,
        ref_scores,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
    )
    metrics = out.metrics
    with torch.no_grad():
        logps = sequence_scores(policy_logprobs.detach(), None, m, "none", average_log_prob=average_log_prob)
        metrics["logps/chosen"] = logps[:n_pairs].mean()
        metrics["logps/rejected"] = logps[n_pairs:].mean()
        if policy_visual_scores is not None:
            vis = _mean_visual_score(policy_visual_scores, m)
            metrics["visual_score/chosen"] = vis[:n_pairs].mean()
            metrics["visual_score/rejected"] = vis[n_pairs:].mean()
    return LossOutput(out.loss, metrics)


def _rows(name: str, t: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(2B, T, D) or (2B*T, D) -> (2B*T, D), checked against targets (2B, T)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    n_seq, n_tok = targets.shape
    if t.dim() == 3 and t.shape[:2] == (n_seq, n_tok):
        return t.flatten(0, 1)
    if t.dim() == 2 and t.shape[0] == n_seq * n_tok:
        return t
    raise ValueError(
        f"{name} must be (2B, T, D) = ({n_seq}, {n_tok}, D) or (2B*T, D) = ({n_seq * n_tok}, D) to match "
        f"targets of shape {tuple(targets.shape)}, got {_shape(t)}; targets must be shifted so that hidden "
        "row t predicts targets[:, t]"
    )


def _check_targets(targets: object) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dim() != 2:
        raise ValueError(
            f"targets must be 2-D (2B, T) (chosen sequences first, then rejected), got {_shape(targets)}"
        )
    _num_pairs(targets.shape[0], "targets")
    return targets


def _branch_stats(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    corrupted_hidden: torch.Tensor | None,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(2B, T) fp32 logp and visual score `z - z~` (None without corrupted hidden) from one call."""
    stats = token_stats(
        hidden,
        weight,
        targets.flatten(),
        bias=bias,
        corrupted_hidden=corrupted_hidden,
        ignore_index=ignore_index,
        backend=backend,
    )
    logp = stats.logprobs.view(targets.shape)
    s = None
    if stats.corrupted_target_logits is not None:
        s = (stats.target_logits - stats.corrupted_target_logits).view(targets.shape)
    return logp, s


def reference_sequence_scores(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    corrupted_hidden: torch.Tensor | None,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    weighting: str = "tpo",
    offset: float = 0.5,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """The reference model's `S_ref` per sequence, fp32 (2B,), under `torch.no_grad()`.

    What a trainer computes once and caches (exact when the corrupted image is seeded per example),
    then passes as `ref_seq_scores`. Same inputs and options as the policy side of `tpo_loss`:
    weight (V, D), hidden and corrupted_hidden (2B, T, D) or (2B*T, D), targets (2B, T), bias (V,).
    `corrupted_hidden` may be None only when `weighting="none"`.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not isinstance(offset, (int, float)) or not math.isfinite(offset) or offset < 0:
        raise ValueError(f"offset must be a finite number >= 0, got {offset!r}")
    targets = _check_targets(targets)
    h = _rows("hidden", hidden, targets)
    hc = None
    if weighting == "tpo":
        if corrupted_hidden is None:
            raise ValueError(
                "corrupted_hidden is required when weighting='tpo' (only 'none' runs without it)"
            )
        hc = _rows("corrupted_hidden", corrupted_hidden, targets)
        if hc.shape != h.shape:
            raise ValueError(
                f"corrupted_hidden must have the shape of hidden {tuple(hidden.shape)}, "
                f"got {_shape(corrupted_hidden)}"
            )
    with torch.no_grad():
        logp, s = _branch_stats(weight, h, hc, targets, bias, ignore_index, backend)
        return sequence_scores(logp, s, targets != ignore_index, weighting, offset, average_log_prob)


def tpo_loss(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    corrupted_hidden: torch.Tensor | None,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_corrupted_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_seq_scores: torch.Tensor | None = None,
    ref_token_logprobs: torch.Tensor | None = None,
    ref_visual_scores: torch.Tensor | None = None,
    beta: float = 0.1,
    weighting: str = "tpo",
    offset: float = 0.5,
    detach_weights: bool = False,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
) -> LossOutput:
    """Token Preference Optimization loss (arXiv 2412.14487) from final hidden states and the lm_head.

    Args:
        weight: (V, D) policy lm_head weight; bias: optional (V,).
        hidden: (2B, T, D) or (2B*T, D) policy hidden states on the clean image, B chosen sequences
            first, then B rejected. corrupted_hidden: the same on the corrupted image; None only when
            `weighting="none"` (when given there, it only feeds the visual-score metrics).
        targets: (2B, T) integer ids, already shifted (row t predicts targets[:, t]); `ignore_index`
            (-100) marks prompt, image and padding positions.
        Reference, exactly one form unless `reference_free` (all under `torch.no_grad()`):
          - ref_hidden and ref_corrupted_hidden (shapes of hidden; the corrupted one only for "tpo"),
            with ref_weight (defaults to `weight`, as with LoRA) and ref_bias (defaults to `bias`);
          - ref_seq_scores: (2B,) precomputed `S_ref` (see `reference_sequence_scores`);
          - ref_token_logprobs and ref_visual_scores: (2B, T) precomputed per-token tensors.
        beta, weighting, offset, detach_weights, loss_type, label_smoothing, reference_free,
        average_log_prob: see `tpo_loss_from_logprobs` (defaults 0.1, "tpo", 0.5, False, "sigmoid",
            0.0, False, False).
        ignore_index: -100. backend: primitive backend, "auto" (triton on CUDA, torch on CPU),
            "triton", "torch" or "reference".

    Returns:
        `LossOutput(loss, metrics)`, see `tpo_loss_from_logprobs`. With `detach_weights=False`
        gradients reach weight, bias, hidden and corrupted_hidden; the reference gets none.
    """
    check_loss_options(beta, weighting, offset, loss_type, label_smoothing)
    targets = _check_targets(targets)
    h = _rows("hidden", hidden, targets)
    if weighting == "tpo" and corrupted_hidden is None:
        raise ValueError(
            "corrupted_hidden is required when weighting='tpo' (hidden states of the same sequences on the "
            "corrupted image); use weighting='none' or dpo_loss for plain DPO"
        )
    hc = None
    if corrupted_hidden is not None:
        hc = _rows("corrupted_hidden", corrupted_hidden, targets)
        if hc.shape != h.shape:
            raise ValueError(
                f"corrupted_hidden must have the shape of hidden {tuple(hidden.shape)}, "
                f"got {_shape(corrupted_hidden)}"
            )

    given = [
        name
        for name, t in (
            ("ref_hidden", ref_hidden),
            ("ref_seq_scores", ref_seq_scores),
            ("ref_token_logprobs", ref_token_logprobs),
        )
        if t is not None
    ]
    for name, t in (("ref_token_logprobs", ref_token_logprobs), ("ref_visual_scores", ref_visual_scores)):
        if t is not None and t.shape != targets.shape:
            raise ValueError(f"{name} must be (2B, T) = {tuple(targets.shape)} like targets, got {_shape(t)}")
    if ref_visual_scores is not None and ref_token_logprobs is None:
        raise ValueError("ref_visual_scores was given without ref_token_logprobs; pass both (2B, T) tensors")
    if ref_corrupted_hidden is not None and ref_hidden is None:
        raise ValueError("ref_corrupted_hidden was given without ref_hidden; pass both")
    if (ref_weight is not None or ref_bias is not None) and ref_hidden is None:
        raise ValueError(
            "ref_weight/ref_bias only apply to ref_hidden; drop them when passing precomputed scores"
        )
    if reference_free:
        if given:
            raise ValueError(
                f"reference_free=True but reference inputs were given ({', '.join(given)}); "
                "drop them or set reference_free=False"
            )
    elif len(given) > 1:
        raise ValueError(
            f"ambiguous reference: got {', '.join(given)}; give exactly one of ref_hidden "
            "(+ ref_corrupted_hidden), ref_seq_scores, or ref_token_logprobs (+ ref_visual_scores)"
        )
    elif not given:
        raise ValueError(
            "reference inputs are missing: pass ref_hidden (+ ref_corrupted_hidden for weighting='tpo'), "
            "ref_seq_scores (2B,), or ref_token_logprobs (+ ref_visual_scores), or set reference_free=True"
        )

    ref_logprobs, ref_scores_tok = ref_token_logprobs, ref_visual_scores
    if ref_hidden is not None:
        ref_w = weight if ref_weight is None else ref_weight
        ref_b = bias if ref_bias is None else ref_bias
        if ref_w.shape != weight.shape:
            raise ValueError(
                f"ref_weight must have the (V, D) shape of weight {tuple(weight.shape)}, got {_shape(ref_w)}"
            )
        rh = _rows("ref_hidden", ref_hidden, targets)
        if rh.shape != h.shape:
            raise ValueError(
                f"ref_hidden must have the shape of hidden {tuple(hidden.shape)}, got {_shape(ref_hidden)}"
            )
        rhc = None
        if weighting == "tpo":
            if ref_corrupted_hidden is None:
                raise ValueError(
                    "weighting='tpo' needs ref_corrupted_hidden with ref_hidden: "
                    "the reference weights its tokens with its own c^ref"
                )
            rhc = _rows("ref_corrupted_hidden", ref_corrupted_hidden, targets)
            if rhc.shape != h.shape:
                raise ValueError(
                    f"ref_corrupted_hidden must have the shape of hidden {tuple(hidden.shape)}, "
                    f"got {_shape(ref_corrupted_hidden)}"
                )
        with torch.no_grad():
            ref_logprobs, ref_scores_tok = _branch_stats(
                ref_w, rh, rhc, targets, ref_b, ignore_index, backend
            )

    if hc is not None and (weighting == "none" or detach_weights):
        # Out of the graph entirely: corrupted_hidden gets no gradient (None, not a zero buffer) and
        # the primitive's backward skips the corrupted gather.
        hc = hc.detach()
    policy_logprobs, policy_s = _branch_stats(weight, h, hc, targets, bias, ignore_index, backend)
    return tpo_loss_from_logprobs(
        policy_logprobs,
        policy_s,
        targets != ignore_index,
        ref_logprobs,
        ref_scores_tok,
        ref_seq_scores=ref_seq_scores,
        beta=beta,
        weighting=weighting,
        offset=offset,
        detach_weights=detach_weights,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
        average_log_prob=average_log_prob,
    )


def dpo_loss(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_seq_scores: torch.Tensor | None = None,
    ref_token_logprobs: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
) -> LossOutput:
    """Plain DPO (`S = sum_t m_t logp_t`, no token weights, no corrupted branch), as POVID trains.

    Same shapes, reference forms and options as `tpo_loss` with `weighting="none"`; metrics have no
    visual-score entries.
    """
    return tpo_loss(
        weight,
        hidden,
        None,
        targets,
        bias,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
        ref_seq_scores=ref_seq_scores,
        ref_token_logprobs=ref_token_logprobs,
        beta=beta,
        weighting="none",
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
        average_log_prob=average_log_prob,
        ignore_index=ignore_index,
        backend=backend,
    )


class TPOLoss(nn.Module):
    """`tpo_loss` with its options held by the module (validated at construction).

    forward(weight, hidden, corrupted_hidden, targets, bias=None, *, ref_hidden=None,
    ref_corrupted_hidden=None, ref_weight=None, ref_bias=None, ref_seq_scores=None,
    ref_token_logprobs=None, ref_visual_scores=None) -> LossOutput. Token *Preference* Optimization,
    not TRL's Triple Preference Optimization `TPOTrainer`.
    """

    def __init__(
        self,
        beta: float = 0.1,
        weighting: str = "tpo",
        offset: float = 0.5,
        detach_weights: bool = False,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        reference_free: bool = False,
        average_log_prob: bool = False,
        ignore_index: int = -100,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_loss_options(beta, weighting, offset, loss_type, label_smoothing)
        self.beta = beta
        self.weighting = weighting
        self.offset = offset
        self.detach_weights = detach_weights
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.reference_free = reference_free
        self.average_log_prob = average_log_prob
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(
        self,
        weight: torch.Tensor,
        hidden: torch.Tensor,
        corrupted_hidden: torch.Tensor | None,
        targets: torch.Tensor,
        bias: torch.Tensor | None = None,
        **ref_inputs: torch.Tensor | None,
    ) -> LossOutput:
        return tpo_loss(
            weight,
            hidden,
            corrupted_hidden,
            targets,
            bias,
            **ref_inputs,
            beta=self.beta,
            weighting=self.weighting,
            offset=self.offset,
            detach_weights=self.detach_weights,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            reference_free=self.reference_free,
            average_log_prob=self.average_log_prob,
            ignore_index=self.ignore_index,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, weighting={self.weighting!r}, offset={self.offset}, "
            f"detach_weights={self.detach_weights}, loss_type={self.loss_type!r}, backend={self.backend!r}"
        )


class DPOLoss(nn.Module):
    """`dpo_loss` with its options held by the module (validated at construction).

    forward(weight, hidden, targets, bias=None, *, ref_hidden=None, ref_weight=None, ref_bias=None,
    ref_seq_scores=None, ref_token_logprobs=None) -> LossOutput.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        reference_free: bool = False,
        average_log_prob: bool = False,
        ignore_index: int = -100,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_loss_options(beta, loss_type=loss_type, label_smoothing=label_smoothing)
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.reference_free = reference_free
        self.average_log_prob = average_log_prob
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(
        self,
        weight: torch.Tensor,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        bias: torch.Tensor | None = None,
        **ref_inputs: torch.Tensor | None,
    ) -> LossOutput:
        return dpo_loss(
            weight,
            hidden,
            targets,
            bias,
            **ref_inputs,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            reference_free=self.reference_free,
            average_log_prob=self.average_log_prob,
            ignore_index=self.ignore_index,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, loss_type={self.loss_type!r}, backend={self.backend!r}"
