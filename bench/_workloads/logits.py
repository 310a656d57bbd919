"""The `logits` workload: the logits-input op on materialized (N, V) clean and corrupted logits.

Per-token log-probs and the visual score z[y] - z~[y] in the case dtype; fwd+bwd with a fixed random
upstream gradient on both (2N,) outputs; gradients for both logits tensors. Memory-bound: its floor
is the memory roofline (one read of each logits tensor, one gradient write).
"""

from __future__ import annotations

import math

import torch

from .common import IGNORE_INDEX, Draw


@torch.no_grad()
def inputs(draw: Draw) -> dict:
    """(N, V) logits with the same standard deviation as the lm_head's; the corrupted ones correlated.
    Drawn in row blocks straight into the case dtype: no fp32 (N, V) tensor at the GPU shapes."""
    n, v = draw.case.n, draw.case.v
    targets = draw.padded_targets()
    logits = torch.empty(n, v, dtype=draw.dtype, device=draw.device)
    corrupted = torch.empty_like(logits)
    step = max(1, (1 << 24) // v)
    for s in range(0, n, step):
        block = draw.randn(min(step, n - s), v, scale=2.0)
        logits[s : s + step] = block
        corrupted[s : s + step] = block + draw.randn(*block.shape)
    return {
        "targets": targets.flatten(),
        "logits": logits.requires_grad_(True),
        "corrupted_logits": corrupted.requires_grad_(True),
        "grad_logprobs": draw.randn(2 * n),
    }


def _chunks(inp, chunk):
    """Row chunks (s, e, logp, visual, d logits, d corrupted logits) of the exact `logits` workload, in fp32.

    Outputs `cat(logp, z - z~)` and their gradients under the upstream `grad_logprobs`, from fp32
    copies of `chunk` rows at a time: never an fp32 (N, V) tensor.
    """
    x, xc = inp["logits"].detach(), inp["corrupted_logits"].detach()
    y, g = inp["targets"], inp["grad_logprobs"].float()
    n = x.shape[0]
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        xf = x[s:e].float().requires_grad_(True)
        xcf = xc[s:e].float().requires_grad_(True)
        valid = y[s:e] != IGNORE_INDEX
        safe = y[s:e].clamp(min=0)[:, None]
        with torch.enable_grad():
            z = xf.gather(1, safe).squeeze(1)
            logp = torch.where(valid, z - torch.logsumexp(xf, -1), 0.0)
            visual = torch.where(valid, z - xcf.gather(1, safe).squeeze(1), 0.0)
            obj = (logp * g[s:e]).sum() + (visual * g[n + s : n + e]).sum()
            dx, dxc = torch.autograd.grad(obj, (xf, xcf))
        yield s, e, logp.detach(), visual.detach(), dx, dxc


def oracle(inp, round_to, chunk):
    """Exact (2N,) outputs `cat(logp, z - z~)` and both logits gradients as full fp32 tensors (small cases;
    the guard uses `logits_errors`, which streams). With `round_to` the gradients are rounded to that
    dtype once, as the naive fp32 path's are."""
    x = inp["logits"]
    n = x.shape[0]
    out = torch.zeros(2 * n, dtype=torch.float32, device=x.device)
    gx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    gxc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for s, e, logp, visual, dx, dxc in _chunks(inp, chunk):
        out[s:e], out[n + s : n + e] = logp, visual
        gx[s:e], gxc[s:e] = dx, dxc
    if round_to is not None:
        gx, gxc = gx.to(round_to).float(), gxc.to(round_to).float()
    return {"out": out, "logits": gx, "corrupted_logits": gxc}


def logits_errors(inp: dict, got: dict, round_to: torch.dtype | None, chunk: int = 1024) -> dict:
    """The guard's errors for `logits`, chunk by chunk: {name: (rel. error of got, rel. error of the
    gradients rounded once to `round_to`, or 0)}, each relative to the reference's largest magnitude.

    Same measure as comparing with `oracle("logits", ...)`, without two fp32 (N, V) gradients in memory.
    """
    n = inp["logits"].shape[0]
    out = torch.zeros(2 * n, dtype=torch.float32, device=inp["logits"].device)
    acc = {k: [0.0, 0.0, 0.0] for k in ("logits", "corrupted_logits")}  # max |diff|, max |ref|, max |yard diff|
    for s, e, logp, visual, dx, dxc in _chunks(inp, chunk):
        out[s:e], out[n + s : n + e] = logp, visual
        for k, ref in (("logits", dx), ("corrupted_logits", dxc)):
            a = acc[k]
            a[1] = max(a[1], ref.abs().max().item())
            if got[k] is not None:  # a NaN chunk is an infinite error (Python's max would keep the finite one)
                diff = (got[k][s:e].float() - ref).abs().max().item()
                a[0] = max(a[0], diff) if math.isfinite(diff) else math.inf
            if round_to is not None:
                a[2] = max(a[2], (ref.to(round_to).float() - ref).abs().max().item())
    scale_out = max(out.abs().max().item(), 1e-30)
    errors = {"out": ((got["out"].detach().float() - out).abs().max().item() / scale_out, 0.0)}
    for k, (diff, scale, yard) in acc.items():
        err = diff / max(scale, 1e-30) if got[k] is not None else math.inf
        errors[k] = (err if math.isfinite(err) else math.inf, yard / max(scale, 1e-30))
    return errors
