"""The `fisao` workload: FiSAO's token-level clipped policy-gradient loss with a k3 KL
(tpo_fast.methods.fisao), rollout and reference log-probs given as inputs; gradients for hidden and weight.
"""

from __future__ import annotations

import torch

from .common import IGNORE_INDEX, Draw, backprop, branch_stats, pg_loss, scatter, scatter_grad, scatter_rows, valid_rows

# The rollout log-probs differ from the current ones by +-PG_SHIFT_SMALL or +-PG_SHIFT_LARGE (half the
# tokens each), well inside or well outside the clip range.
PG_SHIFT_SMALL, PG_SHIFT_LARGE = 0.05, 0.6


def _exact_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(2B, T) fp32 log-probs of the given (rounded) inputs, 0 on ignored rows: FiSAO's rollout log-probs."""
    flat = targets.flatten()
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    h = hidden.detach().reshape(-1, hidden.shape[-1])[rows]
    logp, _ = branch_stats(h, weight.detach(), flat[rows], 1024, None)
    return scatter(logp, rows, targets.shape)


def inputs(draw: Draw, inp: dict, hidden32: torch.Tensor, weight32: torch.Tensor) -> None:
    n_seq, t = draw.case.n_seq, draw.case.seq_len
    targets = inp["targets"]
    mask = targets != IGNORE_INDEX
    base = _exact_logprobs(inp["hidden"], inp["weight"], targets)
    small = draw.rand(n_seq, t) < 0.5
    sign = draw.randint(0, 2, (n_seq, t)) * 2 - 1
    shift = sign * torch.where(small, PG_SHIFT_SMALL, PG_SHIFT_LARGE)
    inp["advantages"] = draw.randn(n_seq, t) * mask
    inp["old_logprobs"] = (base + shift) * mask
    # The reference a log-prob apart (k3 about 0.65 per token): the KL term, KL_COEF * k3, is then well above the
    # bf16 check tolerance, so a contender that drops it fails the check (at 0.2 it hid inside the tolerance).
    inp["ref_logprobs"] = (base + draw.randn(n_seq, t, scale=1.0)) * mask


def oracle(inp, round_to, chunk):
    """FiSAO's token loss: per-token log-probs without autograd, the loss on them as leaves, then backprop."""
    y, rows, yv = valid_rows(inp)
    d = inp["hidden"].shape[-1]
    h, w = inp["hidden"].detach().reshape(-1, d)[rows], inp["weight"].detach()
    with torch.no_grad():
        logp, _ = branch_stats(h, w, yv, chunk, round_to)
    logp_l = logp.clone().requires_grad_(True)
    loss = pg_loss(
        scatter_grad(logp_l, rows, y.shape),
        inp["old_logprobs"].float(),
        inp["ref_logprobs"].float(),
        inp["advantages"].float(),
        y != IGNORE_INDEX,
    )
    (g_logp,) = torch.autograd.grad(loss, (logp_l,))
    gh, gw = backprop(h, w, [(yv, g_logp)], -g_logp, chunk, round_to)
    return {"out": loss.detach(), "hidden": scatter_rows(gh, rows, inp["hidden"]), "weight": gw}
