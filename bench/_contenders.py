"""The contenders: what each one runs on a workload's inputs, and whether it can run here.

Every contender maps (workload, inputs) to one output tensor: the scalar loss for `tpo`, `dpo`,
`povid` and `fisao`, the (N,) fp32 per-token log-probs (0 on padded rows) for `primitive`, and
`cat(logp, z[y] - z~[y])` (2N,) for `logits`. The harness does the backward itself, so all contenders
are timed and checked the same way.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch
from _workloads import (
    BETA,
    CLIP_EPS,
    HIDDEN_WORKLOADS,
    IGNORE_INDEX,
    KL_COEF,
    NOISE_WEIGHT,
    WORKLOADS,
    pg_loss,
    povid_loss_from_scores,
    preference_loss,
)


@dataclass
class Contender:
    """A competitor. `workloads` maps each supported workload to a short note on what it runs."""

    name: str
    kind: str  # "baseline" | "peer" | "ours" | "floor" | "selftest"
    label: str
    workloads: dict[str, str] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # per-workload label, where it differs

    def label_for(self, workload: str) -> str:
        return self.labels.get(workload, self.label)

    def availability(self, device: str, workload: str | None = None) -> str | None:
        """None when it can run `workload` (any, when None) on `device`, else the reason it cannot."""
        return None

    def setup(self, device: str) -> None:
        """Imports and one-off configuration, inside the measuring process."""

    def run(self, workload: str, inp: dict) -> torch.Tensor:
        raise NotImplementedError

    def step(self, workload: str, inp: dict, backward: bool) -> torch.Tensor:
        """One timed call: forward, and with `backward` the backward of the loss (or of
        `(logprobs * grad_logprobs).sum()` for the primitive). Returns the forward output."""
        out = self.run(workload, inp)
        if backward:
            obj = out if out.dim() == 0 else (out * inp["grad_logprobs"]).sum()
            obj.backward()
        return out


def _missing(module: str, pip_name: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"not installed: pip install {pip_name}"
    return None


def _rows(inp: dict, name: str) -> torch.Tensor:
    x = inp[name]
    return x.reshape(-1, x.shape[-1])


def _gather_logit(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Raw target logit `h . W[y]` in fp32 for valid rows, O(N*D): what peers may use for TPO's z and z~."""
    return (h.float() * w[y].float()).sum(-1)


def _scatter(vals: torch.Tensor, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    out = vals.new_zeros(shape.numel())
    return out.index_put((rows,), vals).view(shape)


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


def _fisao_from_logp(logp, inp):
    y = inp["targets"]
    return pg_loss(logp, inp["old_logprobs"], inp["ref_logprobs"], inp["advantages"], y != IGNORE_INDEX)


def _naive_fisao(inp):
    logp, _ = Naive._logp_and_z(inp["hidden"], inp["weight"], inp["targets"])
    return _fisao_from_logp(logp, inp)


_NAIVE_EXTRA = {"logits": _naive_logits, "povid": _naive_povid, "fisao": _naive_fisao}
_NO_LOGITS_INPUT = "takes hidden states and the lm_head weight, not materialized logits"
_NO_ARGMAX = "no argmax output (POVID's noisy sequence needs the corrupted branch's argmax)"


class _PerTokenPeer(Contender):
    """A peer that gives per-token log-probs of valid rows; losses are combined in PyTorch (SPEC.md)."""

    def logprobs(self, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run(self, workload, inp):
        y = inp["targets"]
        mask = y != IGNORE_INDEX
        rows = mask.flatten().nonzero().squeeze(1)
        yv = y.flatten()[rows]
        h = _rows(inp, "hidden")[rows]
        logp = _scatter(self.logprobs(h, inp["weight"], yv), rows, y.shape)
        if workload == "primitive":
            return logp.flatten()
        if workload == "fisao":
            return _fisao_from_logp(logp, inp)
        with torch.no_grad():
            rh = _rows(inp, "ref_hidden")[rows]
            ref_logp = _scatter(self.logprobs(rh, inp["ref_weight"], yv), rows, y.shape)
        visual = ref_visual = None
        if workload == "tpo":
            hc = _rows(inp, "corrupted_hidden")[rows]
            w = inp["weight"]
            visual = _scatter(_gather_logit(h, w, yv) - _gather_logit(hc, w, yv), rows, y.shape)
            with torch.no_grad():
                rhc = _rows(inp, "ref_corrupted_hidden")[rows]
                rw = inp["ref_weight"]
                ref_visual = _scatter(_gather_logit(rh, rw, yv) - _gather_logit(rhc, rw, yv), rows, y.shape)
        return preference_loss(logp, ref_logp, mask, visual, ref_visual)


class TRLChunked(_PerTokenPeer):
    """TRL's chunked log-prob head (`add_fused_lm_head`, on by default in its DPOTrainer)."""

    def __init__(self):
        note = "trl.kernels.ChunkedLogProbFunction on valid rows (outputs=('log_probs',))"
        tpo = note + "; z and z~ by an fp32 gather h.W[y]; TPO weights in PyTorch"
        super().__init__(
            "trl",
            "peer",
            "TRL chunked log-prob head",
            {"primitive": note, "dpo": note + "; DPO in PyTorch", "tpo": tpo, "fisao": note + "; PG loss in PyTorch"},
            {"logits": _NO_LOGITS_INPUT, "povid": _NO_ARGMAX},
        )

    def availability(self, device, workload=None):
        return _missing("trl", "trl")

    def setup(self, device):
        from trl.kernels import ChunkedLogProbFunction

        try:  # the vocabulary tile TRL's fused head uses; private, so fall back to its current value
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
        except ImportError:
            chunk = 32768
        self._fn, self._chunk = ChunkedLogProbFunction, chunk

    def logprobs(self, h, w, y):
        return self._fn.apply(h, w, None, y, 1.0, self._chunk, None, 1.0, ("log_probs",))[0]


class CCE(_PerTokenPeer):
    """Apple's Cut Cross-Entropy: `linear_cross_entropy(..., reduction="none")` is -logp per token."""

    def __init__(self, allow_cpu=False):
        note = "-linear_cross_entropy(reduction='none') per token"
        super().__init__(
            "cce",
            "peer",
            "Cut Cross-Entropy",
            {
                "primitive": note,
                "dpo": note + "; DPO in PyTorch",
                "tpo": note + "; z and z~ by an fp32 gather h.W[y]; TPO weights in PyTorch",
                "fisao": note + "; PG loss in PyTorch",
            },
            {"logits": _NO_LOGITS_INPUT, "povid": _NO_ARGMAX},
        )
        self.allow_cpu = allow_cpu
        self.impl = "cce"

    def availability(self, device, workload=None):
        missing = _missing("cut_cross_entropy", "cut-cross-entropy")
        if missing:
            return missing
        if device != "cuda" and not self.allow_cpu:
            return (
                "needs CUDA (Triton kernels); its torch_compile impl materializes N x V logits and "
                "compiles for ~30 s on CPU: ask for it with --contenders cce"
            )
        return None

    def setup(self, device):
        from cut_cross_entropy import linear_cross_entropy

        self._lce = linear_cross_entropy
        if device != "cuda":
            self.impl = "torch_compile"
            self.label = "Cut Cross-Entropy (torch_compile impl: materializes logits)"

    def logprobs(self, h, w, y):
        return -self._lce(h, w, y, reduction="none", impl=self.impl).float()


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
                "logits": _NO_LOGITS_INPUT,
                "povid": "DPO only: no second (noisy) rejected sequence from an argmax",
                "fisao": "DPO only: no per-token policy-gradient loss",
            },
        )

    def availability(self, device, workload=None):
        return _missing("liger_kernel", "liger-kernel")

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
        tf = self._mod
        y = inp["targets"]
        if workload == "logits":
            r = tf.logits_logprobs(inp["logits"], y, corrupted_logits=inp["corrupted_logits"], backend=self.backend)
            return torch.cat([r.logprobs, r.target_logits - r.corrupted_target_logits])
        if workload == "primitive":
            return tf.token_logprobs(_rows(inp, "hidden"), inp["weight"], y.flatten(), backend=self.backend)
        if workload == "dpo":
            return tf.loss.dpo_loss(
                inp["weight"],
                inp["hidden"],
                y,
                ref_hidden=inp["ref_hidden"],
                ref_weight=inp["ref_weight"],
                beta=BETA,
                backend=self.backend,
            ).loss
        if workload == "povid":
            return tf.methods.povid.povid_loss(
                inp["weight"],
                inp["hidden"],
                inp["corrupted_hidden"],
                y,
                ref_hidden=inp["ref_hidden"],
                ref_corrupted_hidden=inp["ref_corrupted_hidden"],
                ref_weight=inp["ref_weight"],
                beta=BETA,
                noise_weight=NOISE_WEIGHT,
                backend=self.backend,
            ).loss
        if workload == "fisao":
            return tf.methods.fisao.token_pg_loss(
                inp["weight"],
                inp["hidden"],
                y,
                advantages=inp["advantages"],
                old_logprobs=inp["old_logprobs"],
                ref_logprobs=inp["ref_logprobs"],
                clip_eps=CLIP_EPS,
                kl_coef=KL_COEF,
                kl_estimator="k3",
                aggregation="token_mean",
                backend=self.backend,
            ).loss
        return tf.loss.tpo_loss(
            inp["weight"],
            inp["hidden"],
            inp["corrupted_hidden"],
            y,
            ref_hidden=inp["ref_hidden"],
            ref_corrupted_hidden=inp["ref_corrupted_hidden"],
            ref_weight=inp["ref_weight"],
            beta=BETA,
            backend=self.backend,
        ).loss


# The lm_head GEMMs the floor runs per hidden-state workload: (hidden, weight) input names; the
# first pair is the branch with gradient, whose (N, V) logits stand in for the logits' gradient.
_FLOOR_GEMMS = {
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
                **{w: note for w in _FLOOR_GEMMS},
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
        (hn, wn), *others = _FLOOR_GEMMS[workload]
        for a, b in others:  # forward-only branches, freed at once: one (rows, V) tensor at a time
            z = _rows(inp, a).detach() @ inp[b].detach().t()
            del z
        h, w = _rows(inp, hn).detach(), inp[wn].detach()
        z = h @ w.t()  # [N, V] in the input dtype
        if backward:
            # Any (N, V) tensor in the input dtype serves as the logits' gradient: only the shapes matter.
            gh, gw = z @ w, z.t() @ h
            del gh, gw
        return z


class Broken(Naive):
    """Self-test of the correctness guard: naive with every output scaled by 1.1. Must be rejected."""

    def __init__(self):
        super().__init__("broken", 1.1, "selftest", "guard self-test (naive x 1.1)")
        self.labels = {}


def all_contenders(backends: tuple[str, ...]) -> dict[str, Contender]:
    """Every contender by CLI name, in table order. `backends`: tpo_fast backends to list."""
    out: dict[str, Contender] = {"naive": Naive(), "liger": Liger(), "trl": TRLChunked(), "cce": CCE()}
    for b in backends:
        out[f"tpo_fast-{b}"] = TpoFast(b)
    out["floor"] = Floor()
    out["broken"] = Broken()
    return out


def tpo_fast_backends() -> tuple[str, ...]:
    """tpo_fast's backends worth timing: the GPU ones always (listed with a reason where they cannot
    run), the compiled extension's CPU backend `cpp` (logits input), plus whatever else
    `tpo_fast.ops.BACKENDS` offers, but not `auto` or the materializing `reference`."""
    from tpo_fast.ops import BACKENDS

    names = [
        "triton",
        "cuda",
        "cpp",
        *(b for b in BACKENDS if b not in ("auto", "reference", "triton", "cuda", "cpp", "torch")),
    ]
    return (*names, "torch")


TPO_FAST_BACKENDS = tpo_fast_backends()
DEFAULT = ("naive", "liger", "trl", "cce", *(f"tpo_fast-{b}" for b in TPO_FAST_BACKENDS), "floor")
