"""tpo_fast itself, through its public API: one contender per backend, plus one per hidden-state backend
that runs the pair losses with `grad_mode="recompute"` (the per-token primitive's backward)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect

import torch
from _workloads import BETA, CLIP_EPS, HIDDEN_WORKLOADS, KL_COEF, LOSS_WORKLOADS, NOISE_WEIGHT

from .base import Contender, rows

# The public function each workload calls, and the modules it may live in, newest home first
# (povid_loss and token_pg_loss moved from tpo_fast.methods to tpo_fast.loss).
ENTRY = {
    "primitive": ("token_logprobs", ("tpo_fast",)),
    "tpo": ("tpo_loss", ("tpo_fast.loss",)),
    "dpo": ("dpo_loss", ("tpo_fast.loss",)),
    "povid": ("povid_loss", ("tpo_fast.loss", "tpo_fast.methods")),
    "fisao": ("token_pg_loss", ("tpo_fast.loss", "tpo_fast.methods")),
    "logits": ("logits_logprobs", ("tpo_fast",)),
}
PAIR_LOSSES = ("tpo", "dpo", "povid")  # the losses with a fused-gradient path (grad_mode)
BUILD = "pip install --no-build-isolation -e . (or python -c 'from tpo_fast import _ext; _ext.load_jit()')"


def entry(workload: str):
    """(qualified name, function) of the tpo_fast function `workload` calls."""
    name, homes = ENTRY[workload]
    for home in homes:
        fn = getattr(importlib.import_module(home), name, None)
        if fn is not None:
            return f"{home}.{name}", fn
    raise ImportError(f"none of {', '.join(f'{h}.{name}' for h in homes)} exists")


def grad_mode_default(workload: str) -> str | None:
    """The loss's default `grad_mode`, or None when this tpo_fast's loss has no such parameter."""
    param = inspect.signature(entry(workload)[1]).parameters.get("grad_mode")
    return None if param is None else param.default


def hidden_backends() -> tuple[str, ...]:
    from tpo_fast import BACKENDS

    return tuple(BACKENDS)


def logits_backends() -> tuple[str, ...]:
    from tpo_fast.ops.logits import LOGITS_BACKENDS

    return tuple(LOGITS_BACKENDS)


def extension_reason(backend: str) -> str | None:
    """Why the compiled extension's `cpp` / `cuda` backend cannot run, or None.

    `tpo_fast._ext.IMPORT_ERROR` is no use for this: the extension is imported while the `tpo_fast`
    package itself is still initializing, so a missing `_C` reads "cannot import name '_C' from
    partially initialized module 'tpo_fast' (most likely due to a circular import)". Asking for the
    module's file, and importing it again now that the package is complete, gives the real cause.
    """
    from tpo_fast import _ext

    if backend == "cpp" and _ext.HAS_CPU_EXT or backend == "cuda" and _ext.HAS_CUDA_EXT:
        return None
    if importlib.util.find_spec("tpo_fast._C") is None:
        return f"not built: tpo_fast._C is missing; run `{BUILD}` to build"
    try:
        importlib.import_module("tpo_fast._C")
    except ImportError as e:
        return f"tpo_fast._C does not load: {str(e).splitlines()[0]}"
    if backend == "cpp":
        return "tpo_fast._C loads now but did not when tpo_fast was imported; run again"
    return f"not built: tpo_fast._C has no CUDA kernels; run `{BUILD}` with a CUDA torch and nvcc to build"


class TpoFast(Contender):
    """tpo_fast's public API on one backend: token_logprobs / tpo_loss / dpo_loss / povid_loss /
    token_pg_loss (hidden-state backends) and logits_logprobs (logits backends). With
    `grad_mode="recompute"`: the pair losses only, on their per-token recompute path."""

    def __init__(self, backend: str, grad_mode: str | None = None, grad_gemm: str | None = None):
        runs, why_not = self._plan(backend, grad_mode)
        suffix = (f"-{grad_mode}" if grad_mode else "") + ("-tgemm" if grad_gemm == "triton" else "")
        if grad_gemm:  # the fused path's two gradient GEMMs (KernelOptions.grad_gemm), whatever TPO_FAST_GRAD_GEMM says
            runs = {w: f"{call}, under kernel_options(grad_gemm='{grad_gemm}')" for w, call in runs.items()}
        super().__init__(
            f"tpo_fast-{backend}{suffix}",
            "ours",
            f"tpo_fast [{backend}]" + (f" {grad_mode}" if grad_mode else "")
            + (", triton gradient GEMMs" if grad_gemm == "triton" else ""),
            runs,
            why_not,
        )
        self.backend, self.grad_mode, self.grad_gemm = backend, grad_mode, grad_gemm
        if grad_mode is None:  # name the path the default runs, where the loss has a choice
            for w in runs:
                if w in PAIR_LOSSES and (mode := grad_mode_default(w)):
                    self.labels[w] = f"{self.label} {mode}"

    @staticmethod
    def _plan(backend: str, grad_mode: str | None) -> tuple[dict[str, str], dict[str, str]]:
        """({workload: what it runs}, {workload: why it does not apply})."""
        hidden, logits = hidden_backends(), logits_backends()
        runs, why_not = {}, {}
        for w in LOSS_WORKLOADS:
            fn = ENTRY[w][0]
            if grad_mode and w not in PAIR_LOSSES:
                why_not[w] = f"{fn} has no grad_mode: only the pair losses (tpo, dpo, povid) have a fused path"
            elif w in HIDDEN_WORKLOADS and backend not in hidden:
                why_not[w] = f"not a backend of this workload ({fn} backends: {', '.join(hidden)})"
            elif w == "logits" and backend not in logits:
                why_not[w] = f"not a backend of this workload ({fn} backends: {', '.join(logits)})"
            else:
                call = f"backend='{backend}'" + (f", grad_mode='{grad_mode}'" if grad_mode else "")
                runs[w] = f"{_qualified(w)}({call})"
                if not grad_mode and w in PAIR_LOSSES and (mode := grad_mode_default(w)):
                    runs[w] += f", default grad_mode='{mode}'"
        return runs, why_not

    def availability(self, device, workload=None):
        if self.grad_mode and workload in PAIR_LOSSES and grad_mode_default(workload) is None:
            return (
                f"this tpo_fast's {ENTRY[workload][0]} has no grad_mode: its one path is the recompute "
                f"one, timed as tpo_fast [{self.backend}]"
            )
        if reason := self._device_reason(device):
            return reason
        if self.backend in ("cpp", "cuda"):
            return extension_reason(self.backend)
        return None

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

    def setup(self, device):
        self._fn = {w: entry(w)[1] for w in self.workloads}
        self._mode = {"grad_mode": self.grad_mode} if self.grad_mode else {}

    def run(self, workload, inp):
        from tpo_fast.ops.options import kernel_options

        # the fused path runs its gradient GEMMs in the forward, so the scope covers them
        scope = contextlib.nullcontext() if self.grad_gemm is None else kernel_options(grad_gemm=self.grad_gemm)
        with scope:
            return getattr(self, f"_{workload}")(self._fn[workload], inp)

    def _logits(self, fn, inp):
        r = fn(inp["logits"], inp["targets"], corrupted_logits=inp["corrupted_logits"], backend=self.backend)
        return torch.cat([r.logprobs, r.target_logits - r.corrupted_target_logits])

    def _primitive(self, fn, inp):
        return fn(rows(inp, "hidden"), inp["weight"], inp["targets"].flatten(), backend=self.backend)

    def _dpo(self, fn, inp):
        args, ref = _loss_args(inp, False)
        return fn(*args, **ref, beta=BETA, backend=self.backend, **self._mode).loss

    def _tpo(self, fn, inp):
        args, ref = _loss_args(inp, True)
        return fn(*args, **ref, beta=BETA, backend=self.backend, **self._mode).loss

    def _povid(self, fn, inp):
        args, ref = _loss_args(inp, True)
        return fn(*args, **ref, beta=BETA, noise_weight=NOISE_WEIGHT, backend=self.backend, **self._mode).loss

    def _fisao(self, fn, inp):
        return fn(
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


def _qualified(workload: str) -> str:
    try:
        return entry(workload)[0]
    except ImportError:
        return ENTRY[workload][0]


def _loss_args(inp: dict, corrupted: bool) -> tuple[tuple, dict]:
    """Positional (weight, hidden, [corrupted_hidden,] targets) and the reference keywords of a loss."""
    args = (inp["weight"], inp["hidden"], *((inp["corrupted_hidden"],) if corrupted else ()), inp["targets"])
    return args, {k: inp[k] for k in ("ref_hidden", "ref_corrupted_hidden", "ref_weight") if k in inp}
