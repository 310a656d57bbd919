"""Test oracle for tpo_fast.loss, written straight from docs/math.md and independent of tpo_fast.

Like the official TPO code it materializes full fp32 logits (2B x T x V) for all four branches
(policy and reference, clean and corrupted image): the lm_head runs in the input dtype, then the
logits are cast to fp32, as `model(...).logits.to(torch.float32)` does in the official trainer.
Only for tiny shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def branch_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Full fp32 logits (2B, T, V) from hidden (2B, T, D)."""
    return F.linear(hidden, weight, bias).float()


def token_terms(
    logits: torch.Tensor, corrupted_logits: torch.Tensor | None, targets: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per token (logp, s or None, mask), each (2B, T); masked positions hold 0."""
    mask = targets != ignore_index
    labels = torch.where(mask, targets, torch.zeros_like(targets))[..., None]
    logp = torch.gather(logits.log_softmax(-1), 2, labels).squeeze(2) * mask
    s = None
    if corrupted_logits is not None:
        z = torch.gather(logits, 2, labels).squeeze(2)
        z_corrupted = torch.gather(corrupted_logits, 2, labels).squeeze(2)
        s = (z - z_corrupted) * mask
    return logp, s, mask


def weighted_scores(
    logp: torch.Tensor,
    s: torch.Tensor | None,
    mask: torch.Tensor,
    weighting: str,
    offset: float,
    average_log_prob: bool,
) -> torch.Tensor:
    """S(y) = sum_t m_t (logp_t + log c_t) per sequence (2B,), chosen sequences first."""
    n_pairs = logp.shape[0] // 2
    per_token = logp
    if weighting == "tpo":
        sig = torch.sigmoid(s)
        c = torch.cat([offset + sig[:n_pairs], offset + 1 - sig[n_pairs:]])
        per_token = per_token + torch.log(c)
    m = mask.float()
    total = (per_token * m).sum(-1)
    if average_log_prob:
        count = m.sum(-1)
        total = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return total


def reference_scores(
    weight,
    hidden,
    corrupted_hidden,
    targets,
    bias,
    weighting,
    offset,
    average_log_prob,
    ignore_index,
    detach_weights=False,
):
    """(S, logps without log c, per-sequence mean visual score or None), each (2B,)."""
    logits = branch_logits(hidden, weight, bias)
    corrupted_logits = None if corrupted_hidden is None else branch_logits(corrupted_hidden, weight, bias)
    logp, s, mask = token_terms(logits, corrupted_logits, targets, ignore_index)
    s_used = s.detach() if (s is not None and detach_weights) else s
    scores = weighted_scores(logp, s_used, mask, weighting, offset, average_log_prob)
    logps = weighted_scores(logp.detach(), None, mask, "none", offset, average_log_prob)
    vis = None
    if s is not None:
        vis = (s.detach() * mask).sum(-1) / (mask.sum(-1) + 1e-8)
    return scores, logps, vis


def reference_loss(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    corrupted_hidden: torch.Tensor | None,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_corrupted_hidden: torch.Tensor | None = None,
    beta: float = 0.1,
    weighting: str = "tpo",
    offset: float = 0.5,
    detach_weights: bool = False,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    average_log_prob: bool = False,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, metrics) of TPO / DPO for hidden (2B, T, D), weight (V, D), targets (2B, T)."""
    n_pairs = targets.shape[0] // 2
    pi, logps, vis = reference_scores(
        weight,
        hidden,
        corrupted_hidden,
        targets,
        bias,
        weighting,
        offset,
        average_log_prob,
        ignore_index,
        detach_weights,
    )
    if reference_free:
        ref = torch.zeros_like(pi)
    else:
        with torch.no_grad():
            ref, _, _ = reference_scores(
                weight if ref_weight is None else ref_weight,
                ref_hidden,
                ref_corrupted_hidden,
                targets,
                bias if ref_bias is None else ref_bias,
                weighting,
                offset,
                average_log_prob,
                ignore_index,
            )
    logits = (pi[:n_pairs] - pi[n_pairs:]) - (ref[:n_pairs] - ref[n_pairs:])
    if loss_type == "sigmoid":
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(loss_type)
    chosen = beta * (pi[:n_pairs] - ref[:n_pairs]).detach()
    rejected = beta * (pi[n_pairs:] - ref[n_pairs:]).detach()
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "logps/chosen": logps[:n_pairs].mean(),
        "logps/rejected": logps[n_pairs:].mean(),
    }
    if vis is not None:
        metrics["visual_score/chosen"] = vis[:n_pairs].mean()
        metrics["visual_score/rejected"] = vis[n_pairs:].mean()
    return losses.mean(), metrics
