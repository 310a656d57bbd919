"""The `primitive`, `dpo` and `tpo` workloads: their extra inputs and their fp32 oracle.

primitive: per-token log-probs of one branch, fwd+bwd with a fixed random upstream gradient.
dpo: policy clean branch with gradient, reference clean branch without.
tpo: policy clean + corrupted branches with gradient, reference clean + corrupted without.
"""

from __future__ import annotations

import torch

from .common import (
    IGNORE_INDEX,
    Draw,
    branch_stats,
    gather,
    logits_of,
    preference_loss,
    scatter,
    scatter_grad,
    scatter_rows,
    valid_rows,
)


def primitive_inputs(draw: Draw, inp: dict, hidden32: torch.Tensor, weight32: torch.Tensor) -> None:
    inp["grad_logprobs"] = draw.randn(draw.case.n)


def add_reference(draw: Draw, inp: dict, hidden32: torch.Tensor, weight32: torch.Tensor) -> None:
    """The reference model: hidden states and weight close to the policy's (no gradient)."""
    n_seq, t, d, v = draw.case.n_seq, draw.case.seq_len, draw.case.d, draw.case.v
    inp["ref_hidden"] = (hidden32 + draw.randn(n_seq, t, d, scale=0.1)).to(draw.dtype)
    inp["ref_weight"] = (weight32 + draw.randn(v, d, scale=0.1 / d**0.5)).to(draw.dtype)


def tpo_inputs(draw: Draw, inp: dict, hidden32: torch.Tensor, weight32: torch.Tensor) -> None:
    """Reference, then the corrupted-image hidden states: correlated perturbations of the clean ones."""
    add_reference(draw, inp, hidden32, weight32)
    n_seq, t, d = draw.case.n_seq, draw.case.seq_len, draw.case.d
    noise = draw.randn(n_seq, t, d, scale=0.5)
    inp["corrupted_hidden"] = draw.leaf(hidden32 + noise)
    inp["ref_corrupted_hidden"] = (hidden32 + noise + draw.randn(n_seq, t, d, scale=0.1)).to(draw.dtype)


@torch.no_grad()
def _token_stats(workload, inp, rows_of, yv, rows, chunk, round_to):
    """Per-token statistics without autograd: policy (logp, z, z~) and the reference's (logp, visual)."""
    y = inp["targets"]
    h, w = rows_of("hidden"), inp["weight"].detach()
    logp, z = branch_stats(h, w, yv, chunk, round_to)
    zc = gather(rows_of("corrupted_hidden"), w, yv, round_to) if workload == "tpo" else None
    ref_logp = ref_visual = None
    if workload != "primitive":
        rw = inp["ref_weight"]
        ref_logp, ref_z = branch_stats(rows_of("ref_hidden"), rw, yv, chunk, round_to)
        if workload == "tpo":
            ref_visual = scatter(ref_z - gather(rows_of("ref_corrupted_hidden"), rw, yv, round_to), rows, y.shape)
        ref_logp = scatter(ref_logp, rows, y.shape)
    return logp, z, zc, ref_logp, ref_visual


def _upstream(workload, inp, stats, rows):
    """(out, g_logp, g_z, g_zc): the loss (or log-probs) and the upstream gradient of each statistic."""
    logp, z, zc, ref_logp, ref_visual = stats
    y = inp["targets"]
    flat = y.flatten()
    if workload == "primitive":
        return scatter(logp, rows, flat.shape), inp["grad_logprobs"].float()[rows], None, None
    logp_l = logp.clone().requires_grad_(True)
    z_l = z.clone().requires_grad_(workload == "tpo")
    zc_l = zc.clone().requires_grad_(True) if zc is not None else None
    visual = None if zc_l is None else scatter_grad(z_l - zc_l, rows, y.shape)
    loss = preference_loss(scatter_grad(logp_l, rows, y.shape), ref_logp, y != IGNORE_INDEX, visual, ref_visual)
    wanted = [t for t in (logp_l, z_l, zc_l) if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(loss, wanted))
    g_logp = next(grads)
    g_z = next(grads) if workload == "tpo" else None
    g_zc = next(grads) if workload == "tpo" else None
    return loss.detach(), g_logp, g_z, g_zc


def oracle(workload: str, inp: dict, round_to: torch.dtype | None, chunk: int) -> dict:
    """Reference result of `primitive`, `dpo` or `tpo`: per-token statistics, then the loss on them
    as leaves gives per-token upstream gradients, and every row chunk's logits are rebuilt under
    plain autograd to backpropagate them (see `_workloads.oracle`)."""
    y, rows, yv = valid_rows(inp)
    d = inp["hidden"].shape[-1]

    def rows_of(name):
        return inp[name].detach().reshape(-1, d)[rows]

    h, w = rows_of("hidden"), inp["weight"].detach()
    stats = _token_stats(workload, inp, rows_of, yv, rows, chunk, round_to)
    out, g_logp, g_z, g_zc = _upstream(workload, inp, stats, rows)
    leaf_dtype = torch.float32 if round_to is None else round_to
    gh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    wl = w.to(leaf_dtype).requires_grad_(True)
    for s in range(0, h.shape[0], chunk):
        hc = h[s : s + chunk].to(leaf_dtype).requires_grad_(True)
        with torch.enable_grad():
            logits = logits_of(hc, wl, round_to)
            zt = logits.gather(1, yv[s : s + chunk, None]).squeeze(1)
            obj = ((zt - torch.logsumexp(logits, -1)) * g_logp[s : s + chunk]).sum()
            if g_z is not None:
                obj = obj + (zt * g_z[s : s + chunk]).sum()
            dh, dw = torch.autograd.grad(obj, (hc, wl))
        gh[s : s + chunk] = dh.float()
        gw += dw.float()
    result = {"out": out, "hidden": scatter_rows(gh, rows, inp["hidden"])}
    if g_zc is not None:
        hcor = rows_of("corrupted_hidden").to(leaf_dtype).requires_grad_(True)
        with torch.enable_grad():
            dhc, dw = torch.autograd.grad((gather(hcor, wl, yv, round_to) * g_zc).sum(), (hcor, wl))
        gw += dw.float()
        result["corrupted_hidden"] = scatter_rows(dhc.float(), rows, inp["corrupted_hidden"])
    result["weight"] = gw
    return result
