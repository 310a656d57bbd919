"""Benchmark cases (one lm_head shape and N rows per clean branch), named presets, and the FLOPs and
bytes each workload is credited with."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

# lm_head shapes of the models TPO is trained on (hidden size D, vocabulary V).
MODELS = {
    "llava7b": (4096, 32000),  # LLaVA-1.5-7B (Vicuna-7B)
    "llava13b": (5120, 32000),  # LLaVA-1.5-13B (Vicuna-13B)
    "qwen2vl7b": (3584, 152064),  # Qwen2-VL-7B
}
GPU_TOKENS = (2048, 8192, 32768)
# Zipf-Mandelbrot law of the "-zipf" cases: P(rank k) proportional to 1 / (k + ZIPF_SHIFT)**ZIPF_EXPONENT, ranks
# 1..V. s = 1, q = 2.7 puts the most frequent token near 3% of the targets at V = 32000, as in tokenized English.
ZIPF_EXPONENT = 1.0
ZIPF_SHIFT = 2.7
TARGET_LAWS = ("uniform", "zipf")


@dataclass(frozen=True)
class Case:
    """One benchmark shape. `n` rows per clean branch = `2 * pairs * seq_len`."""

    name: str
    d: int
    v: int
    n: int
    model: str = "custom"
    # How the targets are drawn: "uniform" over the vocabulary, or "zipf" (`ZIPF`: a text-like frequency law,
    # where a few tokens repeat hundreds of times per batch, as ".", "the" and "</s>" do in real responses).
    targets: str = "uniform"

    @property
    def seq_len(self) -> int:
        return min(512, self.n // 4)

    @property
    def n_seq(self) -> int:
        return self.n // self.seq_len

    def as_dict(self) -> dict:
        return {**asdict(self), "seq_len": self.seq_len, "n_seq": self.n_seq}


def _case(model: str, n: int) -> Case:
    d, v = MODELS[model]
    return Case(f"{model}-n{n}", d, v, n, model)


# Named cases. The CPU default is small enough for two busy cores; the GPU set is the grid.
CASES: dict[str, Case] = {
    "cpu-tiny": Case("cpu-tiny", 64, 512, 64, "tiny"),
    "cpu-small": Case("cpu-small", 256, 4096, 512, "cpu-small"),
    "cpu-n256": Case("cpu-n256", 256, 4096, 256, "cpu-small"),
    "cpu-n1024": Case("cpu-n1024", 256, 4096, 1024, "cpu-small"),
    **{f"{m}-n{n}": _case(m, n) for m in MODELS for n in GPU_TOKENS},
}
PRESETS = {
    "cpu": ["cpu-small"],
    "cpu-sweep": ["cpu-n256", "cpu-small", "cpu-n1024"],
    "gpu": [f"{m}-n{n}" for m in MODELS for n in GPU_TOKENS],
    "gpu-target": ["llava7b-n8192"],
    "gpu-sweep": [f"llava7b-n{n}" for n in (1024, 2048, 4096, 8192, 16384, 32768)],
}
_CUSTOM = re.compile(r"^d(\d+)-v(\d+)-n(\d+)$")


def parse_cases(spec: str) -> list[Case]:
    """Comma list of case names, presets (`cpu`, `gpu`, `gpu-target`, ...) or `d{D}-v{V}-n{N}`; a "-zipf" suffix
    on any of them draws the targets from the Zipf-Mandelbrot law (`ZIPF_EXPONENT`) instead of uniformly."""
    out: list[Case] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item.endswith("-zipf"):
            base = item.removesuffix("-zipf")
            out += [replace(c, name=f"{c.name}-zipf", targets="zipf") for c in parse_cases(base)]
            continue
        if item in PRESETS:
            out += [parse_cases(c)[0] for c in PRESETS[item]]
        elif item in CASES:
            out.append(CASES[item])
        elif m := _CUSTOM.match(item):
            d, v, n = (int(x) for x in m.groups())
            out.append(Case(item, d, v, n, f"d{d}-v{v}"))
        elif m := re.match(r"^(\w+)-n(\d+)$", item):
            if m.group(1) not in MODELS:
                raise ValueError(
                    f"unknown model {m.group(1)!r} in case {item!r}; models: {', '.join(MODELS)}"
                )
            out.append(_case(m.group(1), int(m.group(2))))
        else:
            raise ValueError(
                f"unknown case {item!r}: use a name ({', '.join(CASES)}), a preset ({', '.join(PRESETS)}), "
                "'<model>-n<N>' or 'd<D>-v<V>-n<N>', each with an optional '-zipf' suffix"
            )
    for c in out:
        if min(c.d, c.v) < 1 or c.n < 4:  # below N = 4 a row has min(512, N // 4) = 0 positions
            raise ValueError(f"case {c.name}: D={c.d} and V={c.v} must be at least 1 and N={c.n} at least 8")
        if c.n % c.seq_len or c.n_seq % 2 or c.n < 8:
            raise ValueError(f"case {c.name}: N={c.n} must split into an even number of rows of {c.seq_len}")
    return out


# FLOPs per call in units of N*D*V: (fwd, fwd+bwd credited, fwd+bwd the floor executes).
_NDV = {
    "primitive": (2, 8, 6),
    "fisao": (2, 8, 6),
    "tpo": (4, 10, 8),
    "dpo": (4, 10, 8),
    # POVID: clean 2B*T = N rows, corrupted argmax over the B*T = N/2 chosen rows, both for policy and reference.
    "povid": (6, 12, 10),
}
# Logits tensors of the `logits` workload (clean + corrupted), each read once and given one gradient.
LOGITS_TENSORS = 2


def flops(case: Case, workload: str, mode: str, executed_floor: bool = False) -> float | None:
    """FLOPs counted for one call, on all N rows of each clean branch (corrupted gathers are O(N*D)).

    Contenders are credited with the exact O(N)-memory kernel's work: 2*N*D*V per clean forward,
    8*N*D*V per clean branch with gradient (forward, recomputed logits, two gradient GEMMs), N*D*V
    for POVID's argmax sweep over the N/2 corrupted chosen rows. The floor is credited with what it
    executes: 6*N*D*V for a branch with gradient. None for `logits` (memory-bound: see `traffic`).
    """
    if workload not in _NDV:
        return None
    fwd, full, floor_full = _NDV[workload]
    return case.n * case.d * case.v * (fwd if mode == "fwd" else floor_full if executed_floor else full)


def traffic(case: Case, workload: str, mode: str, elem_bytes: int) -> float | None:
    """Bytes the memory roofline must move for one `logits` call (None for other workloads).

    fwd: each (N, V) logits tensor read once; fwd+bwd: that plus its (N, V) gradient written once.
    """
    if workload != "logits":
        return None
    once = LOGITS_TENSORS * case.n * case.v * elem_bytes
    return once if mode == "fwd" else 2 * once
