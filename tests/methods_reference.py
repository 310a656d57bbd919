"""Test oracles for tpo_fast.methods (POVID, FiSAO), written from docs/math.md, independent of tpo_fast.

Like the official code they materialize full fp32 logits (rows x V) and use `log_softmax`,
`argmax` and `gather`. Only for tiny shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logits_of(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Full fp32 logits (..., V), the lm_head in the input dtype then a cast, as `model(...).logits.float()`."""
    return F.linear(hidden, weight, bias).float()


def masked_gather(logprobs: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`logprobs[..., index]` per position, 0 where `mask` is False."""
    safe = torch.where(mask, index, torch.zeros_like(index))
    return torch.gather(logprobs, -1, safe.unsqueeze(-1)).squeeze(-1) * mask


def dpo_losses(pi_w, pi_l, ref_w, ref_l, beta, loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair DPO losses (docs/math.md, DPO), plus the chosen and rejected rewards."""
    logits = (pi_w - pi_l) - (ref_w - ref_l)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(loss_type)
    return losses, beta * (pi_w - ref_w).detach(), beta * (pi_l - ref_l).detach()


def povid_scores_from_logits(logits, corrupted_logits, targets, average_log_prob=False, ignore_index=-100):
    """(S_w, S_l, S_n), each (B,), as the official `_get_batch_logps` / `_get_noisy_batch_logps`.

    logits (2B, T, V) on the clean image, chosen rows first; corrupted_logits (B, T, V) of the
    chosen rows on the corrupted image; targets (2B, T) already shifted.
    """
    n_pairs = targets.shape[0] // 2
    mask = targets != ignore_index
    logsm = logits.float().log_softmax(-1)
    logp = masked_gather(logsm, targets, mask)
    noisy_argmax = corrupted_logits.argmax(-1)  # [B, T]
    logp_noisy = masked_gather(logsm[:n_pairs], noisy_argmax, mask[:n_pairs])
    scores = logp.sum(-1)
    s_n = logp_noisy.sum(-1)
    if average_log_prob:
        counts = mask.sum(-1).clamp(min=1)
        scores = scores / counts
        s_n = s_n / counts[:n_pairs]
    return scores[:n_pairs], scores[n_pairs:], s_n


def povid_scores(hidden, corrupted_hidden, targets, weight, bias, average_log_prob=False, ignore_index=-100):
    """`povid_scores_from_logits` on the logits of hidden (2B, T, D) and corrupted_hidden (B, T, D)."""
    return povid_scores_from_logits(
        logits_of(hidden, weight, bias), logits_of(corrupted_hidden, weight, bias), targets,
        average_log_prob, ignore_index,
    )


def povid_loss_reference(
    hidden, corrupted_hidden, targets, weight, bias,
    ref_hidden, ref_corrupted_hidden, ref_weight, ref_bias,
    beta=0.1, noise_weight=0.5, loss_type="sigmoid", label_smoothing=0.0, average_log_prob=False,
):
    """POVID stage 2: mean over pairs of `w DPO(w vs noisy) + (1 - w) DPO(w vs hallucinated)`."""
    s_w, s_l, s_n = povid_scores(hidden, corrupted_hidden, targets, weight, bias, average_log_prob)
    with torch.no_grad():
        r_w, r_l, r_n = povid_scores(ref_hidden, ref_corrupted_hidden, targets, ref_weight, ref_bias, average_log_prob)
    noisy, _, _ = dpo_losses(s_w, s_n, r_w, r_n, beta, loss_type, label_smoothing)
    halluc, chosen_r, rejected_r = dpo_losses(s_w, s_l, r_w, r_l, beta, loss_type, label_smoothing)
    loss = (noise_weight * noisy + (1 - noise_weight) * halluc).mean()
    return loss, {"rewards/chosen": chosen_r.mean(), "rewards/rejected": rejected_r.mean(),
                  "logps/noisy": s_n.detach().mean()}


def pg_loss_reference(
    hidden, targets, weight, bias, old_logprobs, ref_logprobs, advantages,
    clip_eps=0.2, clip_eps_high=None, kl_coef=0.05, kl_estimator="k3", aggregation="token_mean", ignore_index=-100,
):
    """Token-level PPO-style clipped surrogate with a KL penalty to the reference (FiSAO), from full logits.

    Per token (mask m): ratio = exp(logp - old), surrogate = min(ratio A, clip(ratio, 1 - e, 1 + e_high) A),
    kl: k1 = logp - ref, k2 = (logp - ref)^2 / 2, k3 = exp(ref - logp) - (ref - logp) - 1;
    per-token loss = -surrogate + kl_coef kl; "token_mean" averages over all response tokens,
    "seq_mean" over each sequence's tokens then over the sequences that have tokens. hidden (R, T, D), rest (R, T).
    """
    mask = targets != ignore_index
    logp = masked_gather(logits_of(hidden, weight, bias).log_softmax(-1), targets, mask)
    ratio = torch.exp(logp - old_logprobs)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - clip_eps, 1 + high) * advantages)
    diff = ref_logprobs - logp
    if kl_estimator == "k1":
        kl = -diff
    elif kl_estimator == "k2":
        kl = 0.5 * diff**2
    else:
        kl = torch.exp(diff) - diff - 1
    per_token = (-surrogate + kl_coef * kl) * mask
    if aggregation == "token_mean":
        return per_token.sum() / mask.sum().clamp(min=1)
    seq_means = [per_token[i].sum() / mask[i].sum() for i in range(mask.shape[0]) if mask[i].any()]
    return torch.stack(seq_means).mean() if seq_means else per_token.sum() * 0
