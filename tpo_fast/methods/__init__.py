"""The other seed methods on the same primitives (docs/math.md): POVID, CSR and FiSAO.

- `povid_loss` / `POVIDLoss` / `povid_step`: POVID stage 2 (stage 1 is `tpo_fast.loss.dpo_loss`);
  train it with `TPOTrainer` and `TPOConfig(objective="povid")` (`tpo-fast train --objective povid`).
- `token_pg_loss`, `VisionEncoderVerifier`, `TokenVerifier`, `fisao_step`: FiSAO's token-level
  verifier rewards and clipped policy gradient with a KL to the reference.
- `run_csr`, `CLIPScorer`, `sentence_beam_search`, `mix_rewards`: CSR's self-rewarding data loop.
- `evaluate`, `EvalOptions`, `pope_probes`, `pope_metrics`, `chair`, `load_objects`, `make_eval_set`:
  the object-hallucination check (POPE yes/no probing, CHAIR captions) on images with known objects
  (docs/eval.md).

The command line is `tpo_fast/cli/` (one module per subcommand: `tpo-fast povid`, `csr`, `fisao`, `eval`),
which sits above this layer. Model-level helpers import `tpo_fast.trainer` (transformers) lazily, so
importing the losses stays light.
"""

from tpo_fast.methods.csr import CLIPScorer, CSROptions, mix_rewards, run_csr, sentence_beam_search
from tpo_fast.methods.fisao import (
    TokenVerifier,
    VisionEncoderVerifier,
    fisao_step,
    token_advantages,
    token_pg_loss,
)
from tpo_fast.methods.hallucination import (
    EvalOptions,
    HallucinationReport,
    chair,
    evaluate,
    load_objects,
    make_eval_set,
    pope_metrics,
    pope_probes,
)
from tpo_fast.methods.povid import POVIDLoss, povid_loss, povid_reference_scores, povid_step

__all__ = [
    "CLIPScorer",
    "CSROptions",
    "EvalOptions",
    "HallucinationReport",
    "POVIDLoss",
    "TokenVerifier",
    "VisionEncoderVerifier",
    "chair",
    "evaluate",
    "fisao_step",
    "load_objects",
    "make_eval_set",
    "mix_rewards",
    "povid_loss",
    "povid_reference_scores",
    "pope_metrics",
    "pope_probes",
    "povid_step",
    "run_csr",
    "sentence_beam_search",
    "token_advantages",
    "token_pg_loss",
]
