"""POVID as a recipe (arXiv 2402.11411): the stage-2 step of one batch under a LLaVA model.

The loss itself (`povid_loss`, `POVIDLoss`, `povid_reference_scores`) lives in `tpo_fast.loss.povid`
and is re-exported here; this module adds the model-level step on top of the trainer's forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tpo_fast.loss import LossOutput
from tpo_fast.loss.modules import POVIDLoss  # noqa: F401  (re-exported)
from tpo_fast.loss.povid import (  # noqa: F401  (re-exported)
    check_povid_options,
    povid_loss,
    povid_reference_scores,
    povid_sequence_scores,
)


def _step_options(reference: str, **keywords: Any):
    """The trainer's step options for POVID: `povid_step`'s keywords, the rest at `StepOptions`' defaults."""
    from tpo_fast.trainer.model import StepOptions

    return StepOptions(objective="povid", reference=reference, **keywords)


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
    if reference_free and (ref_model is not None or ref_seq_scores is not None):
        raise ValueError("reference_free=True uses no reference: drop ref_model / ref_seq_scores, or reference_free")
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
