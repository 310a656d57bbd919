"""The `povid` workload: POVID stage 2 (tpo_fast's POVID loss), its extra inputs and fp32 oracle.

DPO of the chosen rows against the hallucinated rows and against the argmax tokens of the chosen rows
on the corrupted image, scored on the clean image; the reference with its own argmax; gradients for
hidden and weight.
"""

from __future__ import annotations

import torch

from .common import (
    Draw,
    backprop,
    branch_stats,
    gather,
    logits_of,
    povid_loss_from_scores,
    scatter,
    scatter_grad,
    scatter_rows,
    valid_rows,
)
from .preference import add_reference

# POVID's corrupted hidden states get a component along W[a] that lifts logit a by ARGMAX_LIFT above
# its own value (the corrupted-image model is confident in a token), so the argmax is a clear one and
# rounding cannot flip it.
ARGMAX_LIFT = 20.0


def inputs(draw: Draw, inp: dict, hidden32: torch.Tensor, weight32: torch.Tensor) -> None:
    add_reference(draw, inp, hidden32, weight32)
    n_seq, t, d, v = draw.case.n_seq, draw.case.seq_len, draw.case.d, draw.case.v
    b = n_seq // 2
    chosen = inp["targets"][:b].clamp(min=0)
    # The corrupted-image model is confident: half the positions in the chosen token, half in another.
    keep = draw.rand(b, t) < 0.5
    planted = torch.where(keep, chosen, draw.randint(0, v, (b, t)))
    w_a = weight32[planted]  # [B, T, D]
    lift = ARGMAX_LIFT * w_a / (w_a * w_a).sum(-1, keepdim=True)
    corrupted = hidden32[:b] + draw.randn(b, t, d, scale=0.5) + lift
    inp["corrupted_hidden"] = corrupted.to(draw.dtype)  # argmax only: no gradient (as the official code)
    inp["ref_corrupted_hidden"] = (corrupted + draw.randn(b, t, d, scale=0.1)).to(draw.dtype)


def _argmax(h, w, chunk, round_to):
    """Per-row argmax of h @ w.T, row chunk by row chunk (no N x V tensor)."""
    return torch.cat([logits_of(h[s : s + chunk], w, round_to).argmax(-1) for s in range(0, h.shape[0], chunk)])


def oracle(inp, round_to, chunk):
    """POVID stage 2 in two passes: per-token statistics and argmaxes without autograd, then the loss on
    per-token leaves gives upstream gradients, backpropagated through rebuilt logits chunks."""
    y, rows, yv = valid_rows(inp)
    n_pairs, t = y.shape[0] // 2, y.shape[1]
    d = inp["hidden"].shape[-1]
    chosen = rows < n_pairs * t  # compact rows that belong to chosen sequences
    crows = rows[chosen]

    def rows_of(name, sel):
        return inp[name].detach().reshape(-1, d)[sel]

    def scores(h_name, hc_name, w_name):
        h, w = rows_of(h_name, rows), inp[w_name].detach()
        logp, z = branch_stats(h, w, yv, chunk, round_to)
        argmax = _argmax(rows_of(hc_name, crows), w, chunk, round_to)
        logp_noisy = gather(h[chosen], w, argmax, round_to) - (z - logp)[chosen]
        return h, w, logp, logp_noisy, argmax

    with torch.no_grad():
        _, _, r_logp, r_noisy, _ = scores("ref_hidden", "ref_corrupted_hidden", "ref_weight")
        ref_s = scatter(r_logp, rows, y.shape).sum(-1)
        ref_sn = scatter(r_noisy, crows, torch.Size((n_pairs, t))).sum(-1)
        h, w, logp, logp_noisy, argmax = scores("hidden", "corrupted_hidden", "weight")
    logp_l = logp.clone().requires_grad_(True)
    noisy_l = logp_noisy.clone().requires_grad_(True)
    s = scatter_grad(logp_l, rows, y.shape).sum(-1)
    sn = scatter_grad(noisy_l, crows, torch.Size((n_pairs, t))).sum(-1)
    loss = povid_loss_from_scores(s, sn, ref_s, ref_sn)
    g_logp, g_noisy = torch.autograd.grad(loss, (logp_l, noisy_l))
    idx_noisy = torch.zeros_like(yv).masked_scatter(chosen, argmax)
    g_noisy_all = torch.zeros_like(g_logp).masked_scatter(chosen, g_noisy)
    gh, gw = backprop(h, w, [(yv, g_logp), (idx_noisy, g_noisy_all)], -(g_logp + g_noisy_all), chunk, round_to)
    return {"out": loss.detach(), "hidden": scatter_rows(gh, rows, inp["hidden"]), "weight": gw}
