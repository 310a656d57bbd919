"""The roofline contender: bare lm_head GEMMs (hidden-state workloads) or a bare memory pass (logits)."""

from __future__ import annotations

import torch
from _workloads import IGNORE_INDEX

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
            z = self.rows(inp, a) @ inp[b].detach().t()
            del z
        h, w = self.rows(inp, hn), inp[wn].detach()
        z = h @ w.t()  # [N, V] in the input dtype
        if backward:
            # Any (N, V) tensor in the input dtype serves as the logits' gradient: only the shapes matter.
            gh, gw = z @ w, z.t() @ h
            del gh, gw
        return z

    def rows(self, inp: dict, name: str) -> torch.Tensor:
        """The (rows, D) hidden states one GEMM runs on: all of them."""
        return rows(inp, name).detach()


def _valid(inp: dict, name: str) -> torch.Tensor:
    """Indices of the valid rows of input `name`: its rows are the first rows of the flat targets
    (POVID's corrupted hidden states are the B chosen sequences)."""
    n = rows(inp, name).shape[0]
    return (inp["targets"].flatten()[:n] != IGNORE_INDEX).nonzero().squeeze(1)


class FloorValid(Floor):
    """The same bare GEMMs over the valid (non-ignored) rows only: what a contender that skips padding
    could at best reach. The row gather is timed with them."""

    def __init__(self):
        super().__init__()
        self.name, self.label, self.labels = "floor-valid", "matmul floor, valid rows", {}
        self.workloads = {
            w: n.replace("bare GEMMs:", "bare GEMMs over valid rows only:")
            for w, n in self.workloads.items()
            if w != "logits"
        }
        self.not_applicable = {"logits": "the memory floor reads whole (N, V) tensors: no valid-rows variant"}

    def rows(self, inp, name):
        return rows(inp, name).detach()[_valid(inp, name)]

    def executed_flops(self, case, workload, mode, inp):
        """2·rows·D·V per forward GEMM, 6·rows·D·V for the branch with gradient in fwd+bwd, valid rows."""
        (hn, _), *others = FLOOR_GEMMS[workload]
        per_row = 2 * case.d * case.v
        fwd = sum(len(_valid(inp, a)) for a, _ in others) * per_row
        return fwd + len(_valid(inp, hn)) * per_row * (1 if mode == "fwd" else 3)
