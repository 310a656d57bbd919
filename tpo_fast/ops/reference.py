"""Reference implementation of the token primitives: materializes the (N, V) fp32 logits.

Written straight from docs/math.md, differentiable through plain autograd (so it also supports
second-order gradients, which the fused backends do not). It is the test oracle, the `reference`
backend and the benchmark's exact baseline. Never use it for large N x V.

Ignored rows (targets == ignore_index) are zeroed before any arithmetic, not only masked after it:
`0 * nan` is nan, so a NaN or inf left in an ignored row of `hidden` would otherwise reach the
weight gradient through the matmul's backward, while the fused backends never read those rows.
"""

from __future__ import annotations

import torch


def _valid_rows(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """fp32 `hidden` with the ignored rows replaced by zeros (whatever they held; no gradient reaches them)."""
    return torch.where(valid[:, None], hidden.float(), torch.zeros((), dtype=torch.float32, device=hidden.device))


def reference_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    corrupted_hidden: torch.Tensor | None = None,
    ignore_index: int = -100,
    return_argmax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-row (logp, target_logit, lse, corrupted_target_logit, argmax), all fp32 but argmax (int64).

    Ignored rows (targets == ignore_index) give 0 everywhere (argmax -1) and no gradient.
    """
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    # one fp32 copy of weight and bias for both branches: each `.float()` of a 16-bit tensor rounds its own gradient
    # back to 16 bits, so two copies would add the branches' gradients after two roundings (and a clean and a
    # corrupted term that nearly cancel would keep the rounding error of each)
    w = weight.float()
    b32 = None if bias is None else bias.float()
    logits = _valid_rows(hidden, valid) @ w.t()  # [N, V]
    if b32 is not None:
        logits = logits + b32
    lse = torch.logsumexp(logits, dim=-1)
    z = logits.gather(1, safe[:, None]).squeeze(1)
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
    logp = torch.where(valid, z - lse, zero)
    z_out = torch.where(valid, z, zero)
    lse_out = torch.where(valid, lse, zero)
    zc = None
    if corrupted_hidden is not None:
        zc = reference_target_logits(corrupted_hidden, w, targets, b32, ignore_index)
    argmax = None
    if return_argmax:
        argmax = torch.where(valid, logits.detach().argmax(-1), torch.full_like(safe, -1))
    return logp, z_out, lse_out, zc, argmax


def reference_target_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """fp32 `hidden[i] . weight[targets[i]] (+ bias[targets[i]])`, 0 on ignored rows; plain autograd."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    z = (_valid_rows(hidden, valid) * weight.float()[safe]).sum(-1)
    if bias is not None:
        z = z + bias.float()[safe]
    return torch.where(valid, z, torch.zeros((), dtype=torch.float32, device=z.device))
