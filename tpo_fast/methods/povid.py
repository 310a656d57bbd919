"""POVID (arXiv 2402.11411, github YiyangZhou/POVID) on the fused token primitive.

Stage 1 is plain DPO on (ground truth, hallucination-injected answer): `tpo_fast.loss.dpo_loss`.
Stage 2, as the official trainer (`tool/dpo_trainer_inherent.py`) computes it, adds a second
dispreferred sequence made by the model itself. For the chosen text teacher-forced on the
**corrupted** image it takes per position the argmax token

    a_t = argmax_v z~_t[v]

and scores that token sequence under the **clean** image, with the same logsumexp as the chosen
log-probs (the official gathers `a_t` from `chosen_logits.log_softmax(-1)`):

    logp(a_t) = z_t[a_t] - lse_t,      S_n = sum_t m_t logp(a_t)     (m_t: the chosen tokens' mask)
    loss = w * DPO(S_w vs S_n) + (1 - w) * DPO(S_w vs S_l),          w = noise_weight = 0.5

The reference computes its own argmax on its own corrupted branch. Nothing of size N x V exists:
the argmax comes from the primitive's vocabulary sweep over the corrupted rows (no gradient, the
official's `torch.max` has none either), `z_t[a_t]` is the O(N D) gather `target_logits`, and
`lse_t` is the differentiable logsumexp returned by the same `token_stats` call that gives the
chosen log-probs. Like the official code, `a_t` may equal the chosen token `y_t`.

Metrics: "rewards/*" come from the hallucinated pair (what the official logs), "rewards_noisy/*"
from the noisy pair; "logps/{chosen,rejected,noisy}" and "noisy/argmax_match" (the fraction of
chosen tokens whose corrupted-image argmax is the chosen token itself).

Training: `TPOTrainer` with `TPOConfig(objective="povid", povid_noise_weight=0.5)` runs `povid_loss`
inside the wrapped model's forward (`tpo_fast.trainer.model.policy_loss`); `povid_step` is that same
step for one batch, `povid_model_reference_scores` the reference's (3B,) scores.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tpo_fast.loss import LossOutput, check_loss_options, preference_loss_from_sequence_scores
from tpo_fast.ops import target_logits, token_stats


def _shape(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} of shape {tuple(t.shape)}"


def _check_targets(targets: object) -> tuple[int, int]:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dim() != 2 or targets.shape[0] % 2 != 0 or targets.shape[0] == 0:
        raise ValueError(
            f"targets must be 2-D (2B, T): B chosen rows, then B hallucinated (rejected) rows, got {_shape(targets)}"
        )
    return targets.shape[0] // 2, targets.shape[1]


def _rows(name: str, t: object, n_seq: int, n_tok: int) -> torch.Tensor:
    """(R, T, D) or (R*T, D) -> (R*T, D)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 3 and t.shape[:2] == (n_seq, n_tok):
        return t.flatten(0, 1)
    if t.dim() == 2 and t.shape[0] == n_seq * n_tok:
        return t
    raise ValueError(
        f"{name} must be ({n_seq}, {n_tok}, D) or ({n_seq * n_tok}, D) to match the targets, got {_shape(t)}"
        + ("; corrupted hidden states cover the B chosen rows only" if "corrupted" in name else "")
    )


def check_povid_options(noise_weight: float) -> None:
    """Raise ValueError unless `noise_weight` lies in [0, 1]."""
    if not isinstance(noise_weight, (int, float)) or not math.isfinite(noise_weight) or not 0 <= noise_weight <= 1:
        raise ValueError(
            f"noise_weight must lie in [0, 1] (the official POVID uses 0.5; 0 is plain DPO), got {noise_weight!r}"
        )


def povid_sequence_scores(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    corrupted_hidden: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sequence scores `(S_w, S_l, S_n)` stacked as one fp32 (3B,) tensor, differentiable.

    Args:
        weight: (V, D) lm_head weight; bias: optional (V,).
        hidden: (2B, T, D) or (2B*T, D) hidden states on the clean image, B chosen rows then B
            hallucinated rows.
        corrupted_hidden: (B, T, D) or (B*T, D) hidden states of the B chosen rows on the corrupted
            image (only their per-row argmax is used: no gradient reaches them).
        targets: (2B, T) shifted targets, `ignore_index` outside the responses.
        average_log_prob: divide each score by its number of response tokens (official: False).

    Returns:
        (scores, extras): scores = cat(S_w (B,), S_l (B,), S_n (B,)); extras holds the detached
        per-token "argmax" (B, T) (-1 at ignored positions) for diagnostics.
    """
    n_pairs, n_tok = _check_targets(targets)
    h = _rows("hidden", hidden, 2 * n_pairs, n_tok)
    hc = _rows("corrupted_hidden", corrupted_hidden, n_pairs, n_tok)
    if hc.shape[1] != h.shape[1]:
        raise ValueError(f"corrupted_hidden must have the hidden size {h.shape[1]} of hidden, got {_shape(hc)}")
    flat = targets.reshape(-1).long()
    n_chosen = n_pairs * n_tok
    chosen_flat = flat[:n_chosen]
    valid = (targets != ignore_index)

    # Clean branch, chosen and hallucinated rows: logp and the differentiable lse in one sweep.
    stats = token_stats(h, weight, flat, bias=bias, ignore_index=ignore_index, backend=backend)
    # Corrupted branch: argmax only, from one no-grad sweep over the chosen rows.
    with torch.no_grad():
        argmax = token_stats(
            hc.detach(), weight.detach(), chosen_flat, bias=None if bias is None else bias.detach(),
            ignore_index=ignore_index, return_argmax=True, backend=backend,
        ).argmax
    chosen_valid = chosen_flat != ignore_index
    noisy_targets = torch.where(chosen_valid, argmax, torch.full_like(argmax, ignore_index))
    # Second gather from the same lse: logp(a_t) = z_t[a_t] - lse_t under the clean image.
    z_noisy = target_logits(h[:n_chosen], weight, noisy_targets, bias=bias, ignore_index=ignore_index, backend=backend)
    zero = torch.zeros((), dtype=torch.float32, device=h.device)
    logp_noisy = torch.where(chosen_valid, z_noisy - stats.lse[:n_chosen], zero)

    logp = torch.where(valid.reshape(-1), stats.logprobs, zero).view(2 * n_pairs, n_tok)
    logp_noisy = logp_noisy.view(n_pairs, n_tok)
    scores = torch.cat([logp.sum(-1), logp_noisy.sum(-1)])
    if average_log_prob:
        counts = valid.sum(-1)
        counts = torch.cat([counts, counts[:n_pairs]]).clamp(min=1)
        scores = scores / counts
    extras = {"argmax": noisy_targets.view(n_pairs, n_tok).masked_fill(~valid[:n_pairs], -1)}
    return scores, extras


def povid_reference_scores(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    corrupted_hidden: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """The reference's (3B,) `(S_w, S_l, S_n)` under `no_grad`, with its own argmax; pass as `ref_seq_scores`.

    Same inputs as `povid_sequence_scores`. Caching these is exact only when the corrupted image is
    seeded per example (the official draws fresh noise at every load).
    """
    with torch.no_grad():
        scores, _ = povid_sequence_scores(
            weight, hidden, corrupted_hidden, targets, bias,
            average_log_prob=average_log_prob, ignore_index=ignore_index, backend=backend,
        )
    return scores


def povid_loss(
    weight: torch.Tensor,
    hidden: torch.Tensor,
    corrupted_hidden: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ref_hidden: torch.Tensor | None = None,
    ref_corrupted_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_seq_scores: torch.Tensor | None = None,
    beta: float = 0.1,
    noise_weight: float = 0.5,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
) -> LossOutput:
    """POVID stage-2 loss: `w DPO(chosen vs noisy argmax) + (1 - w) DPO(chosen vs hallucinated)`.

    Args:
        weight: (V, D) policy lm_head weight; bias: optional (V,).
        hidden: (2B, T, D) or (2B*T, D) policy hidden states on the clean image: B chosen rows, then
            B hallucinated rows in the same pair order.
        corrupted_hidden: (B, T, D) or (B*T, D) policy hidden states of the chosen rows on the
            corrupted image (argmax only: they receive no gradient).
        targets: (2B, T) shifted targets; `ignore_index` (-100) on prompt, image and padding.
        Reference, exactly one form unless `reference_free` (no gradient either way):
          - ref_hidden (shape of hidden) and ref_corrupted_hidden (shape of corrupted_hidden), with
            ref_weight / ref_bias defaulting to weight / bias (LoRA);
          - ref_seq_scores: (3B,) precomputed `(S_w, S_l, S_n)`, see `povid_reference_scores`.
        beta: 0.1. noise_weight: `w` = 0.5 (official); 0 gives plain DPO.
        loss_type, label_smoothing, reference_free, average_log_prob: as for `tpo_fast.loss.dpo_loss`
            (the official uses "sigmoid" or "hinge", no smoothing, summed log-probs).
        ignore_index: -100. backend: primitive backend ("auto", "triton", "torch", "reference").

    Returns:
        `LossOutput(loss, metrics)`; see the module docstring for the metric names.
    """
    check_loss_options(beta, loss_type=loss_type, label_smoothing=label_smoothing)
    check_povid_options(noise_weight)
    n_pairs, n_tok = _check_targets(targets)
    given = [n for n, t in (("ref_hidden", ref_hidden), ("ref_seq_scores", ref_seq_scores)) if t is not None]
    if ref_corrupted_hidden is not None and ref_hidden is None:
        raise ValueError("ref_corrupted_hidden was given without ref_hidden; pass both")
    if (ref_weight is not None or ref_bias is not None) and ref_hidden is None:
        raise ValueError("ref_weight/ref_bias only apply to ref_hidden; drop them when passing ref_seq_scores")
    if reference_free and given:
        raise ValueError(
            f"reference_free=True but reference inputs were given ({', '.join(given)}); "
            "drop them or set reference_free=False"
        )
    if not reference_free and len(given) != 1:
        raise ValueError(
            "give exactly one reference: ref_hidden with ref_corrupted_hidden (the reference takes its own "
            "argmax), or ref_seq_scores (3B,) from povid_reference_scores, or set reference_free=True; "
            f"got {given or 'none'}"
        )
    opts = dict(average_log_prob=average_log_prob, ignore_index=ignore_index, backend=backend)

    ref_scores = None
    if ref_hidden is not None:
        if ref_corrupted_hidden is None:
            raise ValueError("ref_hidden needs ref_corrupted_hidden: the reference scores its own noisy argmax")
        ref_w = weight if ref_weight is None else ref_weight
        ref_b = bias if ref_bias is None else ref_bias
        if ref_w.shape != weight.shape:
            raise ValueError(
                f"ref_weight must have the (V, D) shape of weight {tuple(weight.shape)}, got {_shape(ref_w)}"
            )
        ref_scores = povid_reference_scores(ref_w, ref_hidden, ref_corrupted_hidden, targets, ref_b, **opts)
    elif ref_seq_scores is not None:
        if ref_seq_scores.shape != (3 * n_pairs,):
            raise ValueError(
                f"ref_seq_scores must be (3B,) = ({3 * n_pairs},): S_ref of the chosen, hallucinated and noisy "
                f"sequences (povid_reference_scores), got {_shape(ref_seq_scores)}"
            )
        ref_scores = ref_seq_scores.detach().float()

    scores, extras = povid_sequence_scores(weight, hidden, corrupted_hidden, targets, bias, **opts)
    s_w, s_l, s_n = scores.split(n_pairs)
    dpo = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, reference_free=reference_free)
    if ref_scores is None:
        ref_noisy = ref_halluc = None
    else:
        r_w, r_l, r_n = ref_scores.split(n_pairs)
        ref_noisy, ref_halluc = torch.cat([r_w, r_n]), torch.cat([r_w, r_l])
    noisy = preference_loss_from_sequence_scores(torch.cat([s_w, s_n]), ref_noisy, **dpo)
    halluc = preference_loss_from_sequence_scores(torch.cat([s_w, s_l]), ref_halluc, **dpo)
    loss = noise_weight * noisy.loss + (1 - noise_weight) * halluc.loss

    metrics = dict(halluc.metrics)
    metrics.update({k.replace("rewards/", "rewards_noisy/"): v for k, v in noisy.metrics.items()})
    with torch.no_grad():
        metrics["logps/chosen"] = s_w.detach().mean()
        metrics["logps/rejected"] = s_l.detach().mean()
        metrics["logps/noisy"] = s_n.detach().mean()
        chosen_targets = targets[:n_pairs]
        valid = chosen_targets != ignore_index
        match = (extras["argmax"] == chosen_targets) & valid
        metrics["noisy/argmax_match"] = match.sum().float() / valid.sum().clamp(min=1)
    return LossOutput(loss, metrics)


class POVIDLoss(nn.Module):
    """`povid_loss` with its options held by the module (validated at construction).

    forward(weight, hidden, corrupted_hidden, targets, bias=None, *, ref_hidden=None,
    ref_corrupted_hidden=None, ref_weight=None, ref_bias=None, ref_seq_scores=None) -> LossOutput.
    """

    def __init__(
        self,
        beta: float = 0.1,
        noise_weight: float = 0.5,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        reference_free: bool = False,
        average_log_prob: bool = False,
        ignore_index: int = -100,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_loss_options(beta, loss_type=loss_type, label_smoothing=label_smoothing)
        check_povid_options(noise_weight)
        self.options = dict(
            beta=beta, noise_weight=noise_weight, loss_type=loss_type, label_smoothing=label_smoothing,
            reference_free=reference_free, average_log_prob=average_log_prob, ignore_index=ignore_index,
            backend=backend,
        )

    def forward(
        self,
        weight: torch.Tensor,
        hidden: torch.Tensor,
        corrupted_hidden: torch.Tensor,
        targets: torch.Tensor,
        bias: torch.Tensor | None = None,
        **ref_inputs: torch.Tensor | None,
    ) -> LossOutput:
        return povid_loss(weight, hidden, corrupted_hidden, targets, bias, **ref_inputs, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def _step_options(
    reference: str, *, beta: float = 0.1, noise_weight: float = 0.5, loss_type: str = "sigmoid",
    label_smoothing: float = 0.0, average_log_prob: bool = False, ignore_index: int = -100, backend: str = "auto",
):
    from tpo_fast.trainer.model import StepOptions

    return StepOptions(
        objective="povid", beta=beta, noise_weight=noise_weight, loss_type=loss_type,
        label_smoothing=label_smoothing, average_log_prob=average_log_prob, reference=reference,
        ignore_index=ignore_index, backend=backend,
    )


def povid_model_reference_scores(
    ref_model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """(3B,) reference `(S_w, S_l, S_n)` of a batch under `ref_model` (its own argmax), no gradient.

    The trainer's `sequence_reference_scores` with `objective="povid"`.
    """
    from tpo_fast.trainer.model import sequence_reference_scores, unwrap_llava

    options = _step_options("model", average_log_prob=average_log_prob, ignore_index=ignore_index, backend=backend)
    return sequence_reference_scores(unwrap_llava(ref_model), batch, options)


def povid_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    ref_model: nn.Module | None = None,
    ref_seq_scores: torch.Tensor | None = None,
    beta: float = 0.1,
    noise_weight: float = 0.5,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    average_log_prob: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
) -> LossOutput:
    """The POVID stage-2 loss of one batch under a LLaVA `model` (call `.backward()` on `.loss`).

    `batch` is a `tpo_fast.trainer.collator.TPOCollator` batch (chosen rows first, clean and
    corrupted images, `image_index`). This is the trainer's step (`tpo_fast.trainer.model.policy_loss`
    with `objective="povid"`): the clean trunk runs over the 2B rows, the corrupted trunk over the B
    chosen rows without gradient (only its argmax is used), the vision tower once per distinct image,
    no logits. For training loops prefer `TPOTrainer` with `TPOConfig(objective="povid")`.

    Reference: `ref_model` (a frozen copy), or `ref_seq_scores` (3B,) from a cache, or neither for a
    PEFT model, whose adapters are then disabled to score the reference; `reference_free` uses none.
    """
    from tpo_fast.trainer.model import policy_loss

    if ref_model is not None and ref_seq_scores is not None:
        raise ValueError("pass ref_model or ref_seq_scores, not both")
    opts = dict(average_log_prob=average_log_prob, ignore_index=ignore_index, backend=backend)
    if reference_free:
        reference = "none"
    elif ref_seq_scores is not None:
        reference = "precomputed"
    elif ref_model is not None:
        reference = "precomputed"
        ref_seq_scores = povid_model_reference_scores(ref_model, batch, **opts)
    elif hasattr(model, "disable_adapter"):
        reference = "adapter"
    else:
        raise ValueError(
            "no reference: pass ref_model (a frozen copy of the starting model), ref_seq_scores, a PEFT "
            "model (its adapters are disabled for the reference), or reference_free=True"
        )
    options = _step_options(
        reference, beta=beta, noise_weight=noise_weight, loss_type=loss_type, label_smoothing=label_smoothing, **opts
    )
    out = policy_loss(model, batch, options, ref_seq_scores)
    return LossOutput(out["loss"], out["metrics"])
