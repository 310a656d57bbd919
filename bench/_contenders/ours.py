"""tpo_fast itself, through its public API, one contender per backend."""

from __future__ import annotations

import importlib.util

import torch
from _workloads import BETA, CLIP_EPS, HIDDEN_WORKLOADS, KL_COEF, NOISE_WEIGHT, WORKLOADS

from .base import Contender, rows


class TpoFast(Contender):
    """tpo_fast's public API on one backend: token_logprobs / tpo_loss / dpo_loss / povid_loss /
    token_pg_loss (hidden-state backends) and logits_logprobs (logits backends)."""

    def __init__(self, backend):
        from tpo_fast.ops.logits import LOGITS_BACKENDS

        hidden = backend != "cpp"  # the compiled extension has the logits-input op only
        on_logits = backend in LOGITS_BACKENDS
        notes = {
            "primitive": f"tpo_fast.token_logprobs(backend='{backend}')",
            "tpo": f"tpo_fast.loss.tpo_loss(backend='{backend}')",
            "dpo": f"tpo_fast.loss.dpo_loss(backend='{backend}')",
            "logits": f"tpo_fast.logits_logprobs(logits, targets, corrupted_logits=..., backend='{backend}')",
            "povid": f"tpo_fast.methods.povid.povid_loss(backend='{backend}')",
            "fisao": f"tpo_fast.methods.fisao.token_pg_loss(backend='{backend}')",
        }
        why_not = {
            w: "the compiled extension (cpp) takes materialized logits only: see the logits workload"
            for w in HIDDEN_WORKLOADS
        }
        why_not["logits"] = f"logits_logprobs has no '{backend}' backend (backends: {', '.join(LOGITS_BACKENDS)})"
        keep = [w for w in WORKLOADS if (w == "logits" and on_logits) or (w != "logits" and hidden)]
        super().__init__(
            f"tpo_fast-{backend}",
            "ours",
            f"tpo_fast [{backend}]",
            {w: notes[w] for w in keep},
            {w: why_not[w] for w in WORKLOADS if w not in keep},
        )
        self.backend = backend

    def availability(self, device, workload=None):
        if workload == "logits":
            return self._logits_availability(device)
        from tpo_fast.ops import BACKENDS

        if self.backend not in BACKENDS:
            return (
                f"not built: tpo_fast has no '{self.backend}' backend yet (backends: {', '.join(BACKENDS)})"
            )
        return self._device_reason(device)

    def _device_reason(self, device):
        if self.backend == "triton" and device != "cuda":
            return "needs CUDA (the CPU Triton interpreter is far too slow to time)"
        if self.backend == "cuda" and device != "cuda":
            return "needs CUDA"
        if self.backend == "cpp" and device != "cpu":
            return "CPU only (on CUDA the extension's backend is 'cuda')"
        if self.backend == "triton" and importlib.util.find_spec("triton") is None:
            return "not installed: pip install triton"
        return None

    def _logits_availability(self, device):
        from tpo_fast import _ext

        if reason := self._device_reason(device):
            return reason
        if self.backend == "cpp" and not _ext.HAS_CPU_EXT:
            return f"not built: tpo_fast._C is missing ({_ext.IMPORT_ERROR}); pip install --no-build-isolation -e ."
        if self.backend == "cuda" and not _ext.HAS_CUDA_EXT:
            return "not built: tpo_fast._C has no CUDA kernels (needs a CUDA torch and nvcc at install time)"
        return None

    def setup(self, device):
        import tpo_fast.loss
        import tpo_fast.methods.fisao
        import tpo_fast.methods.povid

        self._mod = tpo_fast

    def run(self, workload, inp):
        return getattr(self, f"_{workload}")(inp)

    def _logits(self, inp):
        tf = self._mod
        r = tf.logits_logprobs(
            inp["logits"], inp["targets"], corrupted_logits=inp["corrupted_logits"], backend=self.backend
        )
        return torch.cat([r.logprobs, r.target_logits - r.corrupted_target_logits])

    def _primitive(self, inp):
        return self._mod.token_logprobs(
            rows(inp, "hidden"), inp["weight"], inp["targets"].flatten(), backend=self.backend
        )

    def _dpo(self, inp):
        args, ref = _loss_args(inp, False)
        return self._mod.loss.dpo_loss(*args, **ref, beta=BETA, backend=self.backend).loss

    def _tpo(self, inp):
        args, ref = _loss_args(inp, True)
        return self._mod.loss.tpo_loss(*args, **ref, beta=BETA, backend=self.backend).loss

    def _povid(self, inp):
        args, ref = _loss_args(inp, True)
        return self._mod.methods.povid.povid_loss(
            *args, **ref, beta=BETA, noise_weight=NOISE_WEIGHT, backend=self.backend
        ).loss

    def _fisao(self, inp):
        return self._mod.methods.fisao.token_pg_loss(
            inp["weight"],
            inp["hidden"],
            inp["targets"],
            advantages=inp["advantages"],
            old_logprobs=inp["old_logprobs"],
            ref_logprobs=inp["ref_logprobs"],
            clip_eps=CLIP_EPS,
            kl_coef=KL_COEF,
            kl_estimator="k3",
            aggregation="token_mean",
            backend=self.backend,
        ).loss


def _loss_args(inp: dict, corrupted: bool) -> tuple[tuple, dict]:
    """Positional (weight, hidden, [corrupted_hidden,] targets) and the reference keywords of a loss."""
    args = (inp["weight"], inp["hidden"], *((inp["corrupted_hidden"],) if corrupted else ()), inp["targets"])
    return args, {k: inp[k] for k in ("ref_hidden", "ref_corrupted_hidden", "ref_weight") if k in inp}
