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
"""

from __future__ import annotations

import torch

from . import fisao, logits, povid, preference
from .cases import CASES, GPU_TOKENS, LOGITS_TENSORS, MODELS, PRESETS, Case, flops, parse_cases, traffic
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

WORKLOADS = ("primitive", "tpo", "dpo", "logits", "povid", "fisao")
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
    "CLIP_EPS",
    "GPU_TOKENS",
    "GRAD_INPUTS",
    "HIDDEN_WORKLOADS",
    "IGNORE_INDEX",
    "KL_COEF",
    "LOGITS_TENSORS",
    "MODELS",
    "NOISE_WEIGHT",
    "OFFSET",
    "PRESETS",
    "WORKLOADS",
    "Case",
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
