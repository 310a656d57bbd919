"""The baseline: the official TPO (and POVID) code's way, full fp32 logits per branch; and the guard's
self-test, the same scaled by 1.1."""

from __future__ import annotations

import torch
from _workloads import IGNORE_INDEX, povid_loss_from_scores, preference_loss

from .base import Contender, fisao_from_logp


class Naive(Contender):
    """The official TPO code's way: full fp32 (rows, V) logits per branch, log_softmax, gather."""

    def __init__(self, name="naive", scale=1.0, kind="baseline", label="naive (official TPO code)"):
        notes = "fp32 N x V logits per branch, log_softmax + gather (all rows, padding included)"
        super().__init__(
            name,
            kind,
            label,
            {
                **{w: notes for w in ("primitive", "tpo", "dpo")},
                "logits": "log_softmax(logits.float()) + gather, z[y] - z~[y] from fp32 copies, plain autograd",
                "povid": "the official POVID trainer's way: fp32 N x V logits, log_softmax + gather for chosen, "
                "hallucinated and corrupted-argmax tokens; argmax of fp32 corrupted logits",
                "fisao": "fp32 N x V logits, log_softmax + gather, PPO clip + k3 KL in PyTorch",
            },
            labels={
                "logits": "naive (fp32 log_softmax + gather)",
                "povid": "naive (official POVID code)",
                "fisao": "naive (full fp32 logits)",
            },
        )
        self.scale = scale

    @staticmethod
    def _logp_and_z(h, w, y):
        logits = (h @ w.t()).float()  # [rows, V]: the official code's `.to(torch.float32)` logits
        safe = y.clamp(min=0)[..., None]
        return torch.log_softmax(logits, -1).gather(-1, safe).squeeze(-1), logits.gather(-1, safe).squeeze(-1)

    def run(self, workload, inp):
        if workload in _NAIVE_EXTRA:
            return _NAIVE_EXTRA[workload](inp) * self.scale
        y = inp["targets"]
        mask = y != IGNORE_INDEX
        logp, z = self._logp_and_z(inp["hidden"], inp["weight"], y)
        if workload == "primitive":
            return (logp * mask).flatten() * self.scale
        with torch.no_grad():
            ref_logp, ref_z = self._logp_and_z(inp["ref_hidden"], inp["ref_weight"], y)
        visual = ref_visual = None
        if workload == "tpo":
            safe = y.clamp(min=0)[..., None]
            zc = (inp["corrupted_hidden"] @ inp["weight"].t()).float().gather(-1, safe).squeeze(-1)
            visual = z - zc
            with torch.no_grad():
                ref_zc = (
                    (inp["ref_corrupted_hidden"] @ inp["ref_weight"].t()).float().gather(-1, safe).squeeze(-1)
                )
                ref_visual = ref_z - ref_zc
        return preference_loss(logp, ref_logp, mask, visual, ref_visual) * self.scale


def _naive_logits(inp):
    """The naive logits path: fp32 copies of both (N, V) tensors, log_softmax, gather."""
    y = inp["targets"]
    valid = y != IGNORE_INDEX
    safe = y.clamp(min=0)[:, None]
    x = inp["logits"].float()
    z = x.gather(1, safe).squeeze(1)
    logp = torch.log_softmax(x, -1).gather(1, safe).squeeze(1)
    zc = inp["corrupted_logits"].float().gather(1, safe).squeeze(1)
    return torch.cat([torch.where(valid, logp, 0.0), torch.where(valid, z - zc, 0.0)])


def _naive_povid(inp):
    """The official `_get_batch_logps` / `_get_noisy_batch_logps` on full fp32 logits, then the two DPO terms."""
    y = inp["targets"]
    b = y.shape[0] // 2
    mask = y != IGNORE_INDEX
    safe = y.clamp(min=0)

    def scores(h, hc, w):
        logsm = (h @ w.t()).float().log_softmax(-1)  # [2B, T, V]
        s = (logsm.gather(-1, safe[..., None]).squeeze(-1) * mask).sum(-1)
        argmax = (hc @ w.t()).float().argmax(-1)  # [B, T]: the corrupted image's argmax, no gradient
        s_noisy = (logsm[:b].gather(-1, argmax[..., None]).squeeze(-1) * mask[:b]).sum(-1)
        return s, s_noisy

    s, s_noisy = scores(inp["hidden"], inp["corrupted_hidden"], inp["weight"])
    with torch.no_grad():
        ref_s, ref_noisy = scores(inp["ref_hidden"], inp["ref_corrupted_hidden"], inp["ref_weight"])
    return povid_loss_from_scores(s, s_noisy, ref_s, ref_noisy)


def _naive_fisao(inp):
    logp, _ = Naive._logp_and_z(inp["hidden"], inp["weight"], inp["targets"])
    return fisao_from_logp(logp, inp)


_NAIVE_EXTRA = {"logits": _naive_logits, "povid": _naive_povid, "fisao": _naive_fisao}


class Broken(Naive):
    """Self-test of the correctness guard: naive with every output scaled by 1.1. Must be rejected."""

    def __init__(self):
        super().__init__("broken", 1.1, "selftest", "guard self-test (naive x 1.1)")
        self.labels = {}
