"""Preference losses on the fused token primitives: TPO, the DPO family, POVID and FiSAO's objective.

One module per loss family, above `tpo_fast.ops` and below the trainer:

- `tpo.py`: `tpo_loss` (Token Preference Optimization, arXiv 2412.14487), `tpo_loss_from_logprobs`,
  `reference_sequence_scores`.
- `dpo.py`: `dpo_loss` (plain DPO; sigmoid, hinge, IPO, conservative label smoothing).
- `povid.py`: `povid_loss` (POVID stage 2), `povid_reference_scores`.
- `fisao.py`: `token_pg_loss`, `token_advantages` (FiSAO's clipped token policy gradient).
- `pairs.py`: the shared pair reductions (token weights, sequence scores, the pair loss).
- `modules.py`: `TPOLoss`, `DPOLoss`, `POVIDLoss`.

TPO, DPO and POVID take `grad_mode="fused"` (gradient computed in the forward, chunk by chunk of whole
pairs, no logits recompute), `"recompute"` (the per-token primitive's backward) or `"auto"` (default:
fused, measured the faster on the CPU and on an H200; recompute for fp16 on the triton backend).
The math is in docs/math.md.
"""

from tpo_fast.loss._checks import GRAD_MODES, LOSS_TYPES, WEIGHTINGS, LossOutput, check_loss_options
from tpo_fast.loss.dpo import dpo_loss
from tpo_fast.loss.fisao import check_pg_options, token_advantages, token_pg_loss
from tpo_fast.loss.modules import DPOLoss, POVIDLoss, TPOLoss
from tpo_fast.loss.pairs import (
    log_token_weights,
    pair_losses,
    preference_loss_from_sequence_scores,
    sequence_scores,
)
from tpo_fast.loss.povid import check_povid_options, povid_loss, povid_reference_scores, povid_sequence_scores
from tpo_fast.loss.tpo import reference_sequence_scores, tpo_loss, tpo_loss_from_logprobs

__all__ = [
    "DPOLoss",
    "GRAD_MODES",
    "LOSS_TYPES",
    "LossOutput",
    "POVIDLoss",
    "TPOLoss",
    "WEIGHTINGS",
    "check_loss_options",
    "check_pg_options",
    "check_povid_options",
    "dpo_loss",
    "log_token_weights",
    "pair_losses",
    "povid_loss",
    "povid_reference_scores",
    "povid_sequence_scores",
    "preference_loss_from_sequence_scores",
    "reference_sequence_scores",
    "sequence_scores",
    "token_advantages",
    "token_pg_loss",
    "tpo_loss",
    "tpo_loss_from_logprobs",
]
