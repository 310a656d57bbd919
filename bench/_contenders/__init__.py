"""The contenders: what each one runs on a workload's inputs, and whether it can run here.

Every contender maps (workload, inputs) to one output tensor: the scalar loss for `tpo`, `dpo`,
`povid` and `fisao`, the (N,) fp32 per-token log-probs (0 on padded rows) for `primitive`, and
`cat(logp, z[y] - z~[y])` (2N,) for `logits`. The harness does the backward itself, so all contenders
are timed and checked the same way. One module per family: `naive` (baseline and guard self-test),
`per_token` (TRL, CCE), `liger`, `ours` (tpo_fast), `floor`.
"""

from __future__ import annotations

from .base import Contender
from .floor import Floor, FloorValid
from .liger import Liger
from .naive import Broken, Naive
from .ours import TpoFast, hidden_backends
from .per_token import CCE, CCE_NAMES, TRLChunked
from .step import StepContender, step_contenders

__all__ = [
    "CCE",
    "CCE_NAMES",
    "DEFAULT",
    "TPO_FAST_BACKENDS",
    "Broken",
    "Contender",
    "Floor",
    "FloorValid",
    "Liger",
    "Naive",
    "StepContender",
    "TRLChunked",
    "TpoFast",
    "all_contenders",
    "tpo_fast_backends",
]


def all_contenders(backends: tuple[str, ...]) -> dict[str, Contender]:
    """Every contender by CLI name, in table order. `backends`: tpo_fast backends to list; each
    hidden-state one also gets its `tpo_fast-<backend>-fused` and `-recompute` contenders (the plain one runs
    the losses' default, "auto"), and triton `tpo_fast-triton-fused-tgemm` (its gradient GEMMs by Triton).
    The `step` workload's contenders (`_contenders/step.py`) are listed too; each family only runs its own
    workloads."""
    out: dict[str, Contender] = {"naive": Naive(), "liger": Liger(), "trl": TRLChunked(), "cce": CCE(),
                                 "cce-exact": CCE(exact=True)}
    for b in backends:
        out[f"tpo_fast-{b}"] = TpoFast(b)
    for b in backends:
        if b in hidden_backends():
            # triton: the gradient GEMMs pinned to cuBLAS, so that -fused against -fused-tgemm compares the two
            out[f"tpo_fast-{b}-fused"] = TpoFast(b, "fused", grad_gemm="torch" if b == "triton" else None)
            out[f"tpo_fast-{b}-recompute"] = TpoFast(b, "recompute")
            if b == "triton":  # its gradient GEMMs by Triton instead of cuBLAS (TPO_FAST_GRAD_GEMM=triton)
                out[f"tpo_fast-{b}-fused-tgemm"] = TpoFast(b, "fused", grad_gemm="triton")
    out["floor"] = Floor()
    out["floor-valid"] = FloorValid()
    out.update(step_contenders())  # the `step` workload's (family "step"): whole training steps
    out["broken"] = Broken()
    return out


def tpo_fast_backends() -> tuple[str, ...]:
    """tpo_fast's backends worth timing: the GPU ones always (listed with a reason where they cannot
    run), the compiled extension's CPU backend `cpp` (logits input), plus whatever else
    `tpo_fast.BACKENDS` offers, but not `auto` or the materializing `reference`."""
    from tpo_fast import BACKENDS

    names = [
        "triton",
        "cuda",
        "cpp",
        *(b for b in BACKENDS if b not in ("auto", "reference", "triton", "cuda", "cpp", "torch")),
    ]
    return (*names, "torch")


TPO_FAST_BACKENDS = tpo_fast_backends()
# Without `-fused`: the plain tpo_fast contender runs the losses' default, "auto", which is the fused path on both
# hidden-state backends (fp16 on triton recomputes either way), so the two rows would time the same code twice.
# Named, `-fused` runs (it pins triton's gradient GEMMs to cuBLAS, the A/B against `-fused-tgemm`).
DEFAULT = tuple(n for n in all_contenders(TPO_FAST_BACKENDS) if n != "broken" and not n.endswith("-fused"))
