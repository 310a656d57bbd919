"""The contender interface and the small helpers every family shares."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
from _workloads import IGNORE_INDEX, flops, pg_loss


@dataclass
class Contender:
    """A competitor. `workloads` maps each supported workload to a short note on what it runs."""

    name: str
    kind: str  # "baseline" | "peer" | "ours" | "floor" | "selftest"
    label: str
    workloads: dict[str, str] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # per-workload label, where it differs
    family = "loss"  # "loss": the loss workloads on hidden states / logits; "step": whole training steps

    def label_for(self, workload: str) -> str:
        return self.labels.get(workload, self.label)

    def availability(self, device: str, workload: str | None = None) -> str | None:
        """None when it can run `workload` (any, when None) on `device`, else the reason it cannot."""
        return None

    def setup(self, device: str) -> None:
        """Imports and one-off configuration, inside the measuring process."""

    def run(self, workload: str, inp: dict) -> torch.Tensor:
        raise NotImplementedError

    def executed_flops(self, case, workload: str, mode: str, inp: dict) -> float | None:
        """FLOPs credited to one call (None for the memory-bound `logits`): see `_workloads.flops`."""
        return flops(case, workload, mode, self.kind == "floor")

    def step(self, workload: str, inp: dict, backward: bool) -> torch.Tensor:
        """One timed call: forward, and with `backward` the backward of the loss (or of
        `(logprobs * grad_logprobs).sum()` for the primitive). Returns the forward output."""
        out = self.run(workload, inp)
        if backward:
            obj = out if out.dim() == 0 else (out * inp["grad_logprobs"]).sum()
            obj.backward()
        return out


def missing(module: str, pip_name: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"not installed: pip install {pip_name}"
    return None


def rows(inp: dict, name: str) -> torch.Tensor:
    x = inp[name]
    return x.reshape(-1, x.shape[-1])


def visual_score(h: torch.Tensor, hc: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TPO's visual score `z[y] - z~[y] = (h - h~) . W[y]` in fp32 for valid rows, O(N*D), by one gather of W[y] (two,
    one per branch, cost a peer a second (V, D) gradient of the gather in backward)."""
    return ((h.float() - hc.float()) * w[y].float()).sum(-1)


def scatter(vals: torch.Tensor, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    out = vals.new_zeros(shape.numel())
    return out.index_put((rows,), vals).view(shape)


def fisao_from_logp(logp: torch.Tensor, inp: dict) -> torch.Tensor:
    y = inp["targets"]
    return pg_loss(logp, inp["old_logprobs"], inp["ref_logprobs"], inp["advantages"], y != IGNORE_INDEX)


NO_LOGITS_INPUT = "takes hidden states and the lm_head weight, not materialized logits"
NO_ARGMAX = "no argmax output (POVID's noisy sequence needs the corrupted branch's argmax)"
