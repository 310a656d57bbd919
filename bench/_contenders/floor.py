"""The roofline contender: bare lm_head GEMMs (hidden-state workloads) or a bare memory pass (logits)."""

from __future__ import annotations

import torch

from .base import Contender, rows

# The lm_head GEMMs the floor runs per hidden-state workload: (hidden, weight) input names; the
# first pair is the branch with gradient, whose (N, V) logits stand in for the logits' gradient.
FLOOR_GEMMS = {
    "primitive": [("hidden", "weight")],
    "fisao": [("hidden", "weight")],
    "tpo": [("hidden", "weight"), ("ref_hidden", "ref_weight")],
    "dpo": [("hidden", "weight"), ("ref_hidden", "ref_weight")],
    "povid": [
        ("hidden", "weight"),
        ("corrupted_hidden", "weight"),
        ("ref_hidden", "ref_weight"),
        ("ref_corrupted_hidden", "ref_weight"),
    ],
}


class Floor(Contender):
    """The roofline, not a loss (no correctness check): the bare lm_head GEMMs over all N rows for the
    hidden-state workloads, a bare memory pass over the logits for `logits`."""

    def __init__(self):
        note = "bare GEMMs: 2NDV per clean forward, +4NDV (dH = G W, dW = G^T H) for the branch with gradient"
        mem = (
            "bare memory pass: a row sum of each (N, V) logits tensor (one read); fwd+bwd also writes one "
            "(N, V) zero tensor per logits tensor (the gradient's write)"
        )
        super().__init__(
            "floor",
            "floor",
            "matmul floor",
            {
                **{w: note for w in FLOOR_GEMMS},
                "povid": note + "; + NDV for the corrupted chosen rows",
                "logits": mem,
            },
            labels={"logits": "memory floor"},
        )

    def run(self, workload, inp):
        return self.step(workload, inp, False)

    def step(self, workload, inp, backward):
        if workload == "logits":
            out = [inp[k].detach().sum(-1) for k in ("logits", "corrupted_logits")]
            if backward:
                grads = [torch.zeros_like(inp[k]) for k in ("logits", "corrupted_logits")]
                del grads
            return out[0]
        (hn, wn), *others = FLOOR_GEMMS[workload]
        for a, b in others:  # forward-only branches, freed at once: one (rows, V) tensor at a time
            z = rows(inp, a).detach() @ inp[b].detach().t()
            del z
        h, w = rows(inp, hn).detach(), inp[wn].detach()
        z = h @ w.t()  # [N, V] in the input dtype
        if backward:
            # Any (N, V) tensor in the input dtype serves as the logits' gradient: only the shapes matter.
            gh, gw = z @ w, z.t() @ h
            del gh, gw
        return z
