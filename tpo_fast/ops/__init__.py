"""Launchers and autograd functions of the token primitives (backends: triton, torch, reference)."""

from tpo_fast.ops.token_logprobs import (
    BACKENDS,
    TokenStats,
    resolve_backend,
    target_logits,
    token_logprobs,
    token_stats,
)

__all__ = ["BACKENDS", "TokenStats", "resolve_backend", "target_logits", "token_logprobs", "token_stats"]
