"""The other seed methods on the same primitives (docs/math.md): POVID, CSR and FiSAO.

- `povid_loss` / `POVIDLoss` / `povid_step`: POVID stage 2 (stage 1 is `tpo_fast.loss.dpo_loss`);
  train it with `TPOTrainer` and `TPOConfig(objective="povid")` (`tpo-fast train --objective povid`).
- `token_pg_loss`, `VisionEncoderVerifier`, `TokenVerifier`, `fisao_step`: FiSAO's token-level
  verifier rewards and clipped policy gradient with a KL to the reference.
- `run_csr`, `CLIPScorer`, `sentence_beam_search`, `mix_rewards`: CSR's self-rewarding data loop.

The CLI entries live in `tpo_fast.methods.cli` (`register(subparsers)`). Model-level helpers import
`tpo_fast.trainer` (transformers) lazily, so importing the losses stays light.
"""

from tpo_fast.methods.csr import CLIPScorer, CSROptions, mix_rewards, run_csr, sentence_beam_search
from tpo_fast.methods.fisao import (
    TokenVerifier,
    VisionEncoderVerifier,
    fisao_step,
    token_advantages,
    token_pg_loss,
)
from tpo_fast.methods.povid import POVIDLoss, povid_loss, povid_reference_scores, povid_step

__all__ = [
    "CLIPScorer",
    "CSROptions",
    "POVIDLoss",
    "TokenVerifier",
    "VisionEncoderVerifier",
    "fisao_step",
    "mix_rewards",
    "povid_loss",
    "povid_reference_scores",
    "povid_step",
    "run_csr",
    "sentence_beam_search",
    "token_advantages",
    "token_pg_loss",
]
