"""Plain DPO (Rafailov et al. 2023) on the fused primitives: TPO without token weights or corrupted branch.

POVID's first stage and CSR train with it. `S(y) = sum_t m_t logp_t`; the rest is `tpo_loss`.
"""

from __future__ import annotations

import torch

from tpo_fast.loss._checks import LossOutput
from tpo_fast.loss.tpo import tpo_loss


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
    grad_mode: str = "auto",
) -> LossOutput:
    """Plain DPO (`S = sum_t m_t logp_t`, no token weights, no corrupted branch), as POVID trains.

    Same shapes, reference forms and options as `tpo_loss` with `weighting="none"` (`grad_mode`
    "fused", the default, or "recompute"); metrics have no visual-score entries.
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
        grad_mode=grad_mode,
    )
