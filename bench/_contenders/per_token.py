"""Peers that give per-token log-probs from hidden states (TRL's chunked head, Cut Cross-Entropy);
the losses are then combined in PyTorch with the same formulas as the oracle (docs/math.md)."""

from __future__ import annotations

import torch
from _workloads import IGNORE_INDEX, preference_loss

from .base import NO_ARGMAX, NO_LOGITS_INPUT, Contender, fisao_from_logp, missing, rows, scatter, visual_score


class _PerTokenPeer(Contender):
    """A peer that gives per-token log-probs of valid rows; losses are combined in PyTorch (docs/math.md)."""

    def logprobs(self, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run(self, workload, inp):
        y = inp["targets"]
        mask = y != IGNORE_INDEX
        valid = mask.flatten().nonzero().squeeze(1)
        yv = y.flatten()[valid]
        h = rows(inp, "hidden")[valid]
        logp = scatter(self.logprobs(h, inp["weight"], yv), valid, y.shape)
        if workload == "primitive":
            return logp.flatten()
        if workload == "fisao":
            return fisao_from_logp(logp, inp)
        with torch.no_grad():
            rh = rows(inp, "ref_hidden")[valid]
            ref_logp = scatter(self.logprobs(rh, inp["ref_weight"], yv), valid, y.shape)
        visual = ref_visual = None
        if workload == "tpo":
            hc = rows(inp, "corrupted_hidden")[valid]
            w = inp["weight"]
            visual = scatter(visual_score(h, hc, w, yv), valid, y.shape)
            with torch.no_grad():
                rhc = rows(inp, "ref_corrupted_hidden")[valid]
                rw = inp["ref_weight"]
                ref_visual = scatter(visual_score(rh, rhc, rw, yv), valid, y.shape)
        return preference_loss(logp, ref_logp, mask, visual, ref_visual)


class TRLChunked(_PerTokenPeer):
    """TRL's chunked log-prob head (`add_fused_lm_head`, on by default in its DPOTrainer)."""

    def __init__(self):
        note = "trl.kernels.ChunkedLogProbFunction on valid rows (outputs=('log_probs',))"
        tpo = note + "; z - z~ by one fp32 gather (h - h~).W[y]; TPO weights in PyTorch"
        super().__init__(
            "trl",
            "peer",
            "TRL chunked log-prob head",
            {"primitive": note, "dpo": note + "; DPO in PyTorch", "tpo": tpo, "fisao": note + "; PG loss in PyTorch"},
            {"logits": NO_LOGITS_INPUT, "povid": NO_ARGMAX},
        )

    def availability(self, device, workload=None):
        return missing("trl", "trl")

    def setup(self, device):
        from trl.kernels import ChunkedLogProbFunction

        try:  # the vocabulary tile TRL's fused head uses; private, so fall back to its current value
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
        except ImportError:
            chunk = 32768
        self._fn, self._chunk = ChunkedLogProbFunction, chunk

    def logprobs(self, h, w, y):
        return self._fn.apply(h, w, None, y, 1.0, self._chunk, None, 1.0, ("log_probs",))[0]


CCE_NAMES = ("cce", "cce-exact")  # CCE's contenders: on a CPU each runs only when named (`allow_cpu`)


class CCE(_PerTokenPeer):
    """Apple's Cut Cross-Entropy: `linear_cross_entropy(..., reduction="none")` is -logp per token. Its default
    gradient filtering skips softmax entries below bf16's resolution (an approximation by design, which can miss the
    oracle check); `exact=True` (`cce-exact`) passes `filter_eps=None`, its exact gradient."""

    def __init__(self, allow_cpu=False, exact=False):
        self.extra = {"filter_eps": None} if exact else {}
        note = f"-linear_cross_entropy(reduction='none'{', filter_eps=None' if exact else ''}) per token"
        super().__init__(
            "cce-exact" if exact else "cce",
            "peer",
            "Cut Cross-Entropy, exact gradient" if exact else "Cut Cross-Entropy",
            {
                "primitive": note,
                "dpo": note + "; DPO in PyTorch",
                "tpo": note + "; z - z~ by one fp32 gather (h - h~).W[y]; TPO weights in PyTorch",
                "fisao": note + "; PG loss in PyTorch",
            },
            {"logits": NO_LOGITS_INPUT, "povid": NO_ARGMAX},
        )
        self.allow_cpu = allow_cpu
        self.impl = "cce"

    def availability(self, device, workload=None):
        if reason := missing("cut_cross_entropy", "cut-cross-entropy"):
            return reason
        if device != "cuda" and not self.allow_cpu:
            return (
                "needs CUDA for its Triton kernels (on CPU, --contenders cce runs its torch_compile impl, "
                "which materializes N x V logits and compiles for ~30 s)"
            )
        return None

    def setup(self, device):
        from cut_cross_entropy import linear_cross_entropy

        self._lce = linear_cross_entropy
        if device != "cuda":
            self.impl = "torch_compile"
            self.label += " (torch_compile impl: materializes logits)"

    def logprobs(self, h, w, y):
        return -self._lce(h, w, y, reduction="none", impl=self.impl, **self.extra).float()
