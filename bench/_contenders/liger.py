"""Liger-Kernel's fused linear DPO loss: a DPO-only peer."""

from __future__ import annotations

from .base import NO_LOGITS_INPUT, Contender, missing


class Liger(Contender):
    """Liger-Kernel's LigerFusedLinearDPOLoss (chunked PyTorch, torch.compile on CUDA)."""

    def __init__(self):
        super().__init__(
            "liger",
            "peer",
            "Liger LigerFusedLinearDPOLoss",
            {"dpo": "LigerFusedLinearDPOLoss (gradients computed inside forward; all rows, padding too)"},
            {
                "tpo": "no per-token weights (DPO only)",
                "primitive": "no per-token log-prob output",
                "logits": NO_LOGITS_INPUT,
                "povid": "DPO only: no second (noisy) rejected sequence from an argmax",
                "fisao": "DPO only: no per-token policy-gradient loss",
            },
        )

    def availability(self, device, workload=None):
        return missing("liger_kernel", "liger-kernel")

    def setup(self, device):
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        # On CPU torch.compile would add minutes of compilation to a two-minute run: eager there.
        compiled = device == "cuda"
        self._loss = LigerFusedLinearDPOLoss(
            beta=0.1, compiled=compiled, use_ref_model=True, average_log_prob=False, compute_nll_loss=False
        )
        if not compiled:
            self.label += " (compiled=False on CPU)"

    def run(self, workload, inp):
        out = self._loss(
            inp["weight"],
            inp["hidden"],
            inp["targets"],
            ref_input=inp["ref_hidden"],
            ref_weight=inp["ref_weight"],
        )
        return out[0]
