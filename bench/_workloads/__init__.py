"""Benchmark cases, their random inputs, the loss math for peers (docs/math.md), and the fp32 oracle.

A case is one lm_head shape (D, V) and N rows per clean branch, where N = 2B * T: B chosen and
B rejected responses of T positions each (chosen first), the tail of every row padded with
`ignore_index` like a real right-padded batch. Every contender of a case gets the same inputs,
drawn from the same seed on the same device.

Workloads, one module each (`preference` holds the three that share one oracle):
  primitive  per-token log-probs of one branch, fwd and fwd+bwd with a fixed random upstream
             gradient on the (N,) log-probs; gradients for hidden and weight.
  dpo        DPO loss (docs/math.md): policy clean branch with gradient, reference clean branch without.
  tpo        TPO loss (docs/math.md): policy clean + corrupted branches with gradient, reference clean +
             corrupted without; gradients for hidden, corrupted hidden and weight.
  logits     the logits-input op on materialized (N, V) clean and corrupted logits (`logits.py`).
  povid      POVID stage 2: DPO of the chosen rows against the hallucinated rows and against the
             corrupted image's argmax tokens (`povid.py`).
  fisao      FiSAO's token-level clipped policy-gradient loss with a k3 KL (`fisao.py`).
  step       one whole training step (forward, backward, optimizer) of a random LLaVA-shaped model on
             shapes-world pairs (`step.py`); its cases are `StepCase`s and its contenders whole trainers.
"""

from __future__ import annotations

import torch

from . import fisao, logits, povid, preference
from .cases import CASES, GPU_TOKENS, LOGITS_TENSORS, MODELS, PRESETS, Case, flops, traffic
from .cases import parse_cases as _parse_loss_cases
from .common import (
    BETA,
    CLIP_EPS,
    IGNORE_INDEX,
    KL_COEF,
    NOISE_WEIGHT,
    OFFSET,
    Draw,
    pg_loss,
    povid_loss_from_scores,
    preference_loss,
    sequence_score,
)
from .logits import logits_errors
from .step import STEP_CASES, STEP_PRESETS, StepCase

WORKLOADS = ("primitive", "tpo", "dpo", "logits", "povid", "fisao", "step")
LOSS_WORKLOADS = WORKLOADS[:-1]  # the loss family: inputs are hidden states (or logits) and a weight
DEFAULT_WORKLOADS = LOSS_WORKLOADS  # `step` trains whole models for minutes: only when asked for
HIDDEN_WORKLOADS = ("primitive", "tpo", "dpo", "povid", "fisao")  # inputs are hidden states and a weight
GRAD_INPUTS = {
    "primitive": ("hidden", "weight"),
    "dpo": ("hidden", "weight"),
    "tpo": ("hidden", "corrupted_hidden", "weight"),
    "logits": ("logits", "corrupted_logits"),
    "povid": ("hidden", "weight"),
    "fisao": ("hidden", "weight"),
}
# What each hidden-state workload adds to the shared hidden states, weight and targets, in draw order.
_EXTRA_INPUTS = {
    "primitive": preference.primitive_inputs,
    "dpo": preference.add_reference,
    "tpo": preference.tpo_inputs,
    "povid": povid.inputs,
    "fisao": fisao.inputs,
}

__all__ = [
    "BETA",
    "CASES",
    "DEFAULT_WORKLOADS",
    "CLIP_EPS",
    "GPU_TOKENS",
    "GRAD_INPUTS",
    "HIDDEN_WORKLOADS",
    "IGNORE_INDEX",
    "KL_COEF",
    "LOGITS_TENSORS",
    "LOSS_WORKLOADS",
    "MODELS",
    "NOISE_WEIGHT",
    "OFFSET",
    "PRESETS",
    "STEP_CASES",
    "STEP_PRESETS",
    "WORKLOADS",
    "Case",
    "StepCase",
    "family",
    "flops",
    "logits_errors",
    "make_inputs",
    "oracle",
    "parse_cases",
    "pg_loss",
    "povid_loss_from_scores",
    "preference_loss",
    "sequence_score",
    "traffic",
]


def family(workload_or_case) -> str:
    """"step" for the step workload and the step cases, "loss" for the others: each runs only with its own."""
    return "step" if workload_or_case == "step" or isinstance(workload_or_case, StepCase) else "loss"


def parse_cases(spec: str) -> list:
    """Comma list of loss cases (see `cases.parse_cases`) and step cases (`STEP_CASES`, `STEP_PRESETS`)."""
    out: list = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item in STEP_PRESETS:
            out += [STEP_CASES[name] for name in STEP_PRESETS[item]]
        elif item in STEP_CASES:
            out.append(STEP_CASES[item])
        else:
            try:
                out += _parse_loss_cases(item)
            except ValueError as e:
                raise ValueError(f"{e}; step cases: {', '.join(STEP_CASES)}") from None
    return out


@torch.no_grad()
def make_inputs(case: Case, workload: str, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random inputs of one workload, identical for every contender (same seed, same device).

    Logits come out with a standard deviation near 2; corrupted and reference hidden states are
    correlated perturbations of the clean ones, as they are in a real model.
    """
    draw = Draw(case, device, dtype, seed)
    if workload == "logits":
        return logits.inputs(draw)
    hidden32 = draw.randn(case.n_seq, case.seq_len, case.d)
    weight32 = draw.randn(case.v, case.d, scale=2.0 / case.d**0.5)
    targets = draw.padded_targets()
    inp = {"targets": targets, "hidden": draw.leaf(hidden32), "weight": draw.leaf(weight32)}
    _EXTRA_INPUTS[workload](draw, inp, hidden32, weight32)
    return inp


def oracle(workload: str, inp: dict, round_to: torch.dtype | None = None, chunk: int = 1024) -> dict:
    """The reference result of one workload: {"out": loss or (N,) log-probs, "<grad input>": grad}.

    Exact fp32 when `round_to` is None, computed in two passes so it fits wherever the inputs do:
    per-token statistics without autograd, then the loss on those as leaves gives per-token upstream
    gradients, and every row chunk's logits are rebuilt under plain autograd to backpropagate them.
    Gradients are accumulated in fp32. With `round_to=dtype` the logits are computed in that dtype
    instead, which measures what plain PyTorch in that dtype achieves.
    """
    if workload == "logits":
        return logits.oracle(inp, round_to, chunk)
    if workload == "povid":
        return povid.oracle(inp, round_to, chunk)
    if workload == "fisao":
        return fisao.oracle(inp, round_to, chunk)
    return preference.oracle(workload, inp, round_to, chunk)
