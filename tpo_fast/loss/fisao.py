"""FiSAO's token-level objective (arXiv 2410.14148): a clipped policy gradient with a KL to the reference.

The verifier that produces the token rewards and the rollout loop are recipes
(`tpo_fast.methods.fisao`); this module is the loss they train with.

Objective (`token_pg_loss`), per response token with mask `m_t`:
    ratio_t = exp(logp_t - logp_old_t)
    surr_t  = min(ratio_t A_t, clip(ratio_t, 1 - eps, 1 + eps_high) A_t)        (PPO clipped surrogate)
    kl_t    = k3: exp(ref_t - logp_t) - (ref_t - logp_t) - 1  (default; k1: logp - ref, k2: (logp - ref)^2 / 2)
    loss    = mean over tokens of (-surr_t + kl_coef kl_t)       ("token_mean"; "seq_mean" averages per sequence)
The KL sits in the loss (GRPO-style) rather than in the reward, so token rewards stay the
verifier's. Advantages default to the token's own reward (`A_t = r_t`: the verifier already assigns
credit per token, there is no value model); `advantage="return"` uses the discounted reward-to-go.
`logp_t` comes from `tpo_fast.token_stats`: no N x V tensor, gradient through the primitive.
"""

from __future__ import annotations

import math

import torch

from tpo_fast.loss._checks import LossOutput, _shape, integer_targets, real_scalar
from tpo_fast.ops import token_stats

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean")
ADVANTAGES = ("reward", "return")


def check_pg_options(clip_eps: float, clip_eps_high: float | None, kl_coef: float, kl_estimator: str,
                     aggregation: str) -> tuple[float, float | None, float]:
    """(clip_eps, clip_eps_high, kl_coef) as floats: real scalars (int, float, NumPy scalar, 0-d tensor; not bool,
    else TypeError) in their domains (else ValueError), as the other losses check theirs."""
    raw = {"clip_eps": clip_eps, "clip_eps_high": clip_eps_high, "kl_coef": kl_coef}  # as given, for the messages
    clip_eps = real_scalar("clip_eps", clip_eps)
    clip_eps_high = None if clip_eps_high is None else real_scalar("clip_eps_high", clip_eps_high)
    kl_coef = real_scalar("kl_coef", kl_coef)
    for name, value in (("clip_eps", clip_eps), ("clip_eps_high", clip_eps_high)):
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise ValueError(f"{name} must be a finite number > 0 (PPO uses 0.2), got {raw[name]!r}")
    if clip_eps >= 1:
        raise ValueError(f"clip_eps must be < 1 (the ratio is clipped to [1 - clip_eps, ...]), got {raw['clip_eps']}")
    if not math.isfinite(kl_coef) or kl_coef < 0:
        raise ValueError(f"kl_coef must be a finite number >= 0, got {raw['kl_coef']!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    return clip_eps, clip_eps_high, kl_coef


def check_advantage_options(mode: str, gamma: float) -> float:
    """`gamma` as a float: a real scalar (else TypeError) in [0, 1] (else ValueError, as for a NaN, which would make
    every "return" advantage NaN); ValueError for an unknown `mode`."""
    if mode not in ADVANTAGES:
        raise ValueError(f"advantage mode must be one of {ADVANTAGES}, got {mode!r}")
    value = real_scalar("gamma", gamma)
    if not 0 <= value <= 1:  # also refuses NaN
        raise ValueError(f"gamma (the discount of the \"return\" advantage) must lie in [0, 1], got {gamma!r}")
    return value


def token_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, mode: str = "reward", gamma: float = 1.0, whiten: bool = False
) -> torch.Tensor:
    """fp32 (R, T) advantages from (R, T) token rewards; 0 at masked positions.

    mode "reward": `A_t = r_t`; "return": `A_t = sum_{k >= t} gamma^(k - t) m_k r_k`, gamma in [0, 1]. `whiten`
    normalises over the response tokens: mean 0, std 1 (when they are all equal: all 0, centred but not scaled).
    """
    gamma = check_advantage_options(mode, gamma)
    if rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(f"rewards and mask must both be (R, T), got {_shape(rewards)} and {_shape(mask)}")
    m = mask.bool()
    r = torch.where(m, rewards.float(), torch.zeros((), device=rewards.device))
    if mode == "return":
        out = torch.zeros_like(r)
        running = torch.zeros(r.shape[0], device=r.device)
        for t in range(r.shape[1] - 1, -1, -1):
            running = r[:, t] + gamma * running
            out[:, t] = running
        r = torch.where(m, out, torch.zeros((), device=r.device))
    if whiten and m.any():
        vals = r[m]
        std = vals.std(unbiased=False) if vals.numel() > 1 else vals.new_zeros(())
        r = torch.where(m, (r - vals.mean()) / std if std > 0 else r - vals.mean(), torch.zeros((), device=r.device))
    return r


def _kl(diff: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate from `diff = ref_logp - logp` (Schulman's k1, k2, k3)."""
    if estimator == "k1":
        return -diff
    if estimator == "k2":
        return 0.5 * diff**2
    return torch.exp(diff) - diff - 1


def _pg_metrics(mask, surrogate, ratio, adv, kl, logp) -> dict[str, torch.Tensor]:
    zero = torch.zeros((), dtype=torch.float32, device=mask.device)
    count = mask.sum().clamp(min=1)
    is_clipped = (surrogate != ratio * adv) & mask
    return {
        "pg/loss": torch.where(mask, -surrogate, zero).sum() / count,
        "pg/clip_frac": is_clipped.sum().float() / count,
        "pg/ratio_mean": torch.where(mask, ratio, zero).sum() / count,
        "kl/mean": torch.where(mask, kl, zero).sum() / count,
        "advantages/mean": adv.sum() / count,
        "logps/mean": torch.where(mask, logp, zero).sum() / count,
    }


def token_pg_loss(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.05,
    kl_estimator: str = "k3",
    aggregation: str = "token_mean",
    ignore_index: int = -100,
    backend: str = "auto",
) -> LossOutput:
    """Token-level PPO-style clipped policy-gradient loss with a KL to the reference (FiSAO objective).

    Args:
        weight: (V, D) lm_head weight; bias: optional (V,).
        hidden: (R, T, D) or (R*T, D) policy hidden states at the positions predicting `targets`.
        targets: (R, T) the sampled response tokens (shifted), `ignore_index` elsewhere.
        advantages: (R, T) per-token advantages (see `token_advantages`), or (R,) one per sequence, given to
            each of its response tokens; no gradient.
        old_logprobs: (R, T) log-probs of the rollout policy; None = on-policy (the current
            log-probs, detached: ratio 1, the plain policy gradient).
        ref_logprobs: (R, T) reference log-probs; required when `kl_coef > 0`.
        clip_eps: 0.2; clip_eps_high: upper clip (default = clip_eps).
        kl_coef: 0.05 (0: the KL is a metric only); kl_estimator: "k3" (default), "k1" or "k2".
        aggregation: "token_mean" (over every response token) or "seq_mean" (each sequence's token mean, then
            the mean over the sequences that have response tokens).
        ignore_index: -100. backend: primitive backend ("auto", "triton", "torch", "reference").

    Returns:
        `LossOutput(loss, metrics)` with "pg/loss", "pg/clip_frac", "pg/ratio_mean", "kl/mean",
        "advantages/mean", "logps/mean" (all over response tokens).
    """
    clip_eps, clip_eps_high, kl_coef = check_pg_options(clip_eps, clip_eps_high, kl_coef, kl_estimator, aggregation)
    for name, t in (("advantages", advantages), ("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs),
                    ("hidden", hidden), ("weight", weight)):
        if not (isinstance(t, torch.Tensor) or (t is None and name in ("old_logprobs", "ref_logprobs"))):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
        raise ValueError("targets must be a 2-D (R, T) tensor of sampled response tokens (shifted)")
    integer_targets(targets, "(R, T)")
    n_seq, n_tok = targets.shape
    if hidden.dim() == 3 and hidden.shape[:2] == (n_seq, n_tok):
        h = hidden.flatten(0, 1)
    elif hidden.dim() == 2 and hidden.shape[0] == n_seq * n_tok:
        h = hidden
    else:
        raise ValueError(f"hidden must be ({n_seq}, {n_tok}, D) or ({n_seq * n_tok}, D) to match targets, "
                         f"got {_shape(hidden)}")
    if advantages.shape == (n_seq,):  # one advantage per sequence (as GRPO's), on each of its response tokens
        advantages = advantages[:, None].expand(n_seq, n_tok)
    for name, t in (("advantages", advantages), ("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None and t.shape != targets.shape:
            also = f" (or (R,) = ({n_seq},), one per sequence)" if name == "advantages" else ""
            raise ValueError(
                f"{name} must have the (R, T) = {tuple(targets.shape)} shape of targets{also}, got {_shape(t)}"
            )
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (R, T) from the reference model; or set kl_coef=0")

    mask = targets != ignore_index
    zero = torch.zeros((), dtype=torch.float32, device=h.device)
    stats = token_stats(h, weight, targets.reshape(-1), bias=bias, ignore_index=ignore_index, backend=backend)
    logp = stats.logprobs.view(n_seq, n_tok)
    old = logp.detach() if old_logprobs is None else torch.where(mask, old_logprobs.detach().float(), zero)
    adv = torch.where(mask, advantages.detach().float(), zero)
    log_ratio = torch.where(mask, logp - old, zero)
    ratio = torch.exp(log_ratio)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + high)
    surrogate = torch.minimum(ratio * adv, clipped * adv)
    per_token = -surrogate
    kl = torch.zeros_like(logp)
    if ref_logprobs is not None:
        kl = _kl(torch.where(mask, ref_logprobs.detach().float() - logp, zero), kl_estimator)
        if kl_coef > 0:  # at 0 the KL is a metric only: an infinite k3 (ref - logp > 88) must not give 0 * inf
            per_token = per_token + kl_coef * kl
    per_token = torch.where(mask, per_token, zero)
    count = mask.sum().clamp(min=1)
    if aggregation == "token_mean":
        loss = per_token.sum() / count
    else:
        # the mean over the sequences that have response tokens (an empty one has no token mean)
        has = mask.any(-1)
        loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / has.sum().clamp(min=1)
    with torch.no_grad():
        metrics = _pg_metrics(mask, surrogate, ratio, adv, kl, logp)
    return LossOutput(loss, {k: v.detach() for k, v in metrics.items()})
