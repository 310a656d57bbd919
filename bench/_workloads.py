"""Benchmark cases, their random inputs, the SPEC.md loss math for peers, and the fp32 oracle.

A case is one lm_head shape (D, V) and N rows per clean branch, where N = 2B * T: B chosen and
B rejected responses of T positions each (chosen first), the tail of every row padded with
`ignore_index` like a real right-padded batch. Every contender of a case gets the same inputs,
drawn from the same seed on the same device.

Workloads:
  primitive  per-token log-probs of one branch, fwd and fwd+bwd with a fixed random upstream
             gradient on the (N,) log-probs; gradients for hidden and weight.
  dpo        DPO loss (SPEC.md): policy clean branch with gradient, reference clean branch without.
  tpo        TPO loss (SPEC.md): policy clean + corrupted branches with gradient, reference clean +
             corrupted without; gradients for hidden, corrupted hidden and weight.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

WORKLOADS = ("primitive", "tpo", "dpo")
IGNORE_INDEX = -100
BETA = 0.1
OFFSET = 0.5

# lm_head shapes of the models TPO is trained on (hidden size D, vocabulary V).
MODELS = {
    "llava7b": (4096, 32000),  # LLaVA-1.5-7B (Vicuna-7B)
    "llava13b": (5120, 32000),  # LLaVA-1.5-13B (Vicuna-13B)
    "qwen2vl7b": (3584, 152064),  # Qwen2-VL-7B
}
GPU_TOKENS = (2048, 8192, 32768)


@dataclass(frozen=True)
class Case:
    """One benchmark shape. `n` rows per clean branch = `2 * pairs * seq_len`."""

    name: str
    d: int
    v: int
    n: int
    model: str = "custom"

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
    """Comma list of case names, presets (`cpu`, `gpu`, `gpu-target`, ...) or `d{D}-v{V}-n{N}`."""
    out: list[Case] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
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
                "'<model>-n<N>' or 'd<D>-v<V>-n<N>'"
            )
    for c in out:
        if c.n % c.seq_len or c.n_seq % 2 or c.n < 8:
            raise ValueError(f"case {c.name}: N={c.n} must split into an even number of rows of {c.seq_len}")
    return out


def flops(case: Case, workload: str, mode: str, executed_floor: bool = False) -> float:
    """FLOPs counted for one call, on all N rows of each clean branch (corrupted gathers are O(N*D)).

    Contenders are credited with the exact O(N)-memory kernel's work: 2*N*D*V per clean forward,
    8*N*D*V per clean branch with gradient (forward, recomputed logits, two gradient GEMMs). The
    floor is credited with what it executes: 6*N*D*V for a branch with gradient.
    """
    ndv = case.n * case.d * case.v
    grad_branch = 6 if executed_floor else 8
    if workload == "primitive":
        return ndv * (2 if mode == "fwd" else grad_branch)
    return ndv * (4 if mode == "fwd" else grad_branch + 2)


@torch.no_grad()
def make_inputs(case: Case, workload: str, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random inputs of one workload, identical for every contender (same seed, same device).

    Logits come out with a standard deviation near 2; corrupted and reference hidden states are
    correlated perturbations of the clean ones, as they are in a real model.
    """
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale

    n_seq, t, d, v = case.n_seq, case.seq_len, case.d, case.v
    hidden32 = randn(n_seq, t, d)
    weight32 = randn(v, d, scale=2.0 / d**0.5)
    targets = torch.randint(0, v, (n_seq, t), generator=g, device=device)
    lengths = torch.randint((6 * t) // 10, t + 1, (n_seq,), generator=g, device=device)
    pad = torch.arange(t, device=device)[None, :] >= lengths[:, None]
    targets = targets.masked_fill(pad, IGNORE_INDEX)

    def leaf(x):
        return x.to(dtype, copy=True).requires_grad_(True)

    inp = {"targets": targets, "hidden": leaf(hidden32), "weight": leaf(weight32)}
    if workload == "primitive":
        inp["grad_logprobs"] = randn(case.n)
        return inp
    inp["ref_hidden"] = (hidden32 + randn(n_seq, t, d, scale=0.1)).to(dtype)
    inp["ref_weight"] = (weight32 + randn(v, d, scale=0.1 / d**0.5)).to(dtype)
    if workload == "tpo":
        noise = randn(n_seq, t, d, scale=0.5)
        inp["corrupted_hidden"] = leaf(hidden32 + noise)
        inp["ref_corrupted_hidden"] = (hidden32 + noise + randn(n_seq, t, d, scale=0.1)).to(dtype)
    return inp


GRAD_INPUTS = {
    "primitive": ("hidden", "weight"),
    "dpo": ("hidden", "weight"),
    "tpo": ("hidden", "corrupted_hidden", "weight"),
}


def sequence_score(logp: torch.Tensor, mask: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
    """S(y) per sequence (2B,) from (2B, T) fp32 token tensors; TPO weights when `visual` is given."""
    if visual is None:
        return (logp * mask).sum(-1)
    b = logp.shape[0] // 2
    sig = torch.sigmoid(visual)
    c = torch.cat([OFFSET + sig[:b], OFFSET + 1.0 - sig[b:]])  # chosen rows first
    return ((logp + torch.log(c)) * mask).sum(-1)


def preference_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    visual: torch.Tensor | None = None,
    ref_visual: torch.Tensor | None = None,
) -> torch.Tensor:
    """SPEC.md's DPO (visual None) or TPO loss, sigmoid type, mean over pairs, from per-token tensors.

    logp, ref_logp: (2B, T) fp32 log-probs (anything at masked positions); visual, ref_visual:
    (2B, T) fp32 raw-logit visual scores `z - z~`. Peers and the oracle share this one formula.
    """
    mask = mask.float()
    s_pi = sequence_score(logp, mask, visual)
    s_ref = sequence_score(ref_logp, mask, ref_visual)
    b = s_pi.shape[0] // 2
    logits = (s_pi[:b] - s_pi[b:]) - (s_ref[:b] - s_ref[b:])
    return -F.logsigmoid(BETA * logits).mean()


def _branch_stats(h, w, y, chunk, round_to):
    """fp32 (logp, z) for rows h (M, D) with targets y (M,), row chunk by chunk."""
    logp, z = [], []
    for s in range(0, h.shape[0], chunk):
        logits = _logits(h[s : s + chunk], w, round_to)
        zt = logits.gather(1, y[s : s + chunk, None]).squeeze(1)
        logp.append(zt - torch.logsumexp(logits, -1))
        z.append(zt)
    return torch.cat(logp), torch.cat(z)


def _logits(h, w, round_to):
    # round_to=None: exact fp32. round_to=dtype: what plain PyTorch does in that dtype (the official
    # code's `(h @ W.T).float()`), the yardstick for the tolerance.
    if round_to is None:
        return h.float() @ w.float().t()
    return (h.to(round_to) @ w.to(round_to).t()).float()


def _gather(h, w, y, round_to):
    if round_to is None:
        return (h.float() * w.float()[y]).sum(-1)
    return (h.to(round_to) * w.to(round_to)[y]).sum(-1, dtype=torch.float32)


@torch.no_grad()
def _scatter(vals, rows, shape):
    return (
        torch.zeros(shape.numel(), dtype=torch.float32, device=vals.device)
        .index_copy(0, rows, vals)
        .view(shape)
    )


def oracle(workload: str, inp: dict, round_to: torch.dtype | None = None, chunk: int = 1024) -> dict:
    """The reference result of one workload: {"out": loss or (N,) log-probs, "<grad input>": grad}.

    Exact fp32 when `round_to` is None, computed in two passes so it fits wherever the inputs do:
    per-token statistics without autograd, then the loss on those as leaves gives per-token upstream
    gradients, and every row chunk's logits are rebuilt under plain autograd to backpropagate them.
    Gradients are accumulated in fp32. With `round_to=dtype` the logits are computed in that dtype
    instead, which measures what plain PyTorch in that dtype achieves.
    """
    y = inp["targets"]
    flat = y.flatten()
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    yv = flat[rows]
    d = inp["hidden"].shape[-1]

    def rows_of(name):
        return inp[name].detach().reshape(-1, d)[rows]

    h, w = rows_of("hidden"), inp["weight"].detach()
    with torch.no_grad():
        logp, z = _branch_stats(h, w, yv, chunk, round_to)
        zc = _gather(rows_of("corrupted_hidden"), w, yv, round_to) if workload == "tpo" else None
        if workload != "primitive":
            rw = inp["ref_weight"]
            ref_logp, ref_z = _branch_stats(rows_of("ref_hidden"), rw, yv, chunk, round_to)
            ref_visual = None
            if workload == "tpo":
                ref_visual = _scatter(
                    ref_z - _gather(rows_of("ref_corrupted_hidden"), rw, yv, round_to), rows, y.shape
                )
            ref_logp = _scatter(ref_logp, rows, y.shape)

    # Upstream gradient of every per-token statistic.
    logp_l = logp.clone().requires_grad_(True)
    z_l = z.clone().requires_grad_(workload == "tpo")
    zc_l = zc.clone().requires_grad_(True) if zc is not None else None
    if workload == "primitive":
        g_out = inp["grad_logprobs"].float()[rows]
        out = _scatter(logp, rows, flat.shape)
        g_logp, g_z, g_zc = g_out, None, None
    else:
        visual = None if zc_l is None else _scatter_grad(z_l - zc_l, rows, y.shape)
        loss = preference_loss(
            _scatter_grad(logp_l, rows, y.shape), ref_logp, y != IGNORE_INDEX, visual, ref_visual
        )
        wanted = [t for t in (logp_l, z_l, zc_l) if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(loss, wanted))
        g_logp = next(grads)
        g_z = next(grads) if workload == "tpo" else None
        g_zc = next(grads) if workload == "tpo" else None
        out = loss.detach()

    leaf_dtype = torch.float32 if round_to is None else round_to
    gh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    wl = w.to(leaf_dtype).requires_grad_(True)
    for s in range(0, h.shape[0], chunk):
        hc = h[s : s + chunk].to(leaf_dtype).requires_grad_(True)
        with torch.enable_grad():
            logits = _logits(hc, wl, round_to)
            zt = logits.gather(1, yv[s : s + chunk, None]).squeeze(1)
            obj = ((zt - torch.logsumexp(logits, -1)) * g_logp[s : s + chunk]).sum()
            if g_z is not None:
                obj = obj + (zt * g_z[s : s + chunk]).sum()
            dh, dw = torch.autograd.grad(obj, (hc, wl))
        gh[s : s + chunk] = dh.float()
        gw += dw.float()
    result = {"out": out, "hidden": _scatter_rows(gh, rows, inp["hidden"])}
    if g_zc is not None:
        hcor = rows_of("corrupted_hidden").to(leaf_dtype).requires_grad_(True)
        with torch.enable_grad():
            dhc, dw = torch.autograd.grad((_gather(hcor, wl, yv, round_to) * g_zc).sum(), (hcor, wl))
        gw += dw.float()
        result["corrupted_hidden"] = _scatter_rows(dhc.float(), rows, inp["corrupted_hidden"])
    result["weight"] = gw
    return result


def _scatter_grad(vals, rows, shape):
    # Differentiable scatter of compact rows into a zero (2B, T) tensor.
    return (
        torch.zeros(shape.numel(), dtype=vals.dtype, device=vals.device).index_put((rows,), vals).view(shape)
    )


def _scatter_rows(g, rows, like):
    d = like.shape[-1]
    full = torch.zeros(like.numel() // d, d, dtype=torch.float32, device=g.device)
    return full.index_copy(0, rows, g).view(like.shape)
