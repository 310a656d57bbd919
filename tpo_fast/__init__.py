"""tpo_fast: fused kernels, losses and a trainer for token-level preference optimization of LVLMs.

The primitives (`token_logprobs`, `target_logits`, `token_stats`) go from final hidden states and
the lm_head weight to per-token log-probs without ever materializing N x V logits.
"""

from tpo_fast.ops import BACKENDS, TokenStats, target_logits, token_logprobs, token_stats
from tpo_fast.ops.logits import LOGITS_BACKENDS, LogitsLogprobs, logits_logprobs

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "LOGITS_BACKENDS",
    "LogitsLogprobs",
    "TokenStats",
    "logits_logprobs",
    "target_logits",
    "token_logprobs",
    "token_stats",
    "__version__",
]
