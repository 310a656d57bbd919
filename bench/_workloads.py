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
  logits     the logits-input op: per-token log-probs and the visual score z[y] - z~[y] straight from
             materialized (N, V) clean and corrupted logits in the case dtype; fwd+bwd with a fixed random
             upstream gradient on both (2N,) outputs; gradients for both logits tensors. Memory-bound:
             its floor is the memory roofline (one read of each logits tensor, one gradient write).
  povid      POVID stage 2 (tpo_fast/methods/povid.py): DPO of the chosen rows against the hallucinated
             rows and against the argmax tokens of the chosen rows on the corrupted image, scored on the
             clean image; reference with its own argmax; gradients for hidden and weight.
  fisao      FiSAO's token-level clipped policy-gradient loss with a k3 KL (tpo_fast/methods/fisao.py),
             rollout and reference log-probs given as inputs; gradients for hidden and weight.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

WORKLOADS = ("primitive", "tpo", "dpo", "logits", "povid", "fisao")
HIDDEN_WORKLOADS = ("primitive", "tpo", "dpo", "povid", "fisao")  # inputs are hidden states and a weight
IGNORE_INDEX = -100
BETA = 0.1
OFFSET = 0.5
NOISE_WEIGHT = 0.5  # POVID's w: w DPO(chosen vs noisy) + (1 - w) DPO(chosen vs hallucinated), official 0.5
CLIP_EPS = 0.2  # FiSAO / PPO clip range and KL coefficient (tpo_fast.methods.fisao defaults)
KL_COEF = 0.05
# Input generation: POVID's corrupted hidden states get a component along W[a] that lifts logit a by
# ARGMAX_LIFT above its own value (the corrupted-image model is confident in a token), so the argmax is
# a clear one and rounding cannot flip it; FiSAO's rollout log-probs differ from the current ones by
# +-PG_SHIFT_SMALL or +-PG_SHIFT_LARGE (half the tokens each), well inside or well outside the clip range.
ARGMAX_LIFT = 20.0
PG_SHIFT_SMALL, PG_SHIFT_LARGE = 0.05, 0.6

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

    def padded_targets():
        targets = torch.randint(0, v, (n_seq, t), generator=g, device=device)
        lengths = torch.randint((6 * t) // 10, t + 1, (n_seq,), generator=g, device=device)
        pad = torch.arange(t, device=device)[None, :] >= lengths[:, None]
        return targets.masked_fill(pad, IGNORE_INDEX)

    def leaf(x):
        return x.to(dtype, copy=True).requires_grad_(True)

    if workload == "logits":
        # (N, V) logits with the same standard deviation as the lm_head's; the corrupted ones correlated.
        # Drawn in row blocks straight into the case dtype: no fp32 (N, V) tensor at the GPU shapes.
        targets = padded_targets()
        logits = torch.empty(case.n, v, dtype=dtype, device=device)
        corrupted = torch.empty_like(logits)
        step = max(1, (1 << 24) // v)
        for s in range(0, case.n, step):
            block = randn(min(step, case.n - s), v, scale=2.0)
            logits[s : s + step] = block
            corrupted[s : s + step] = block + randn(*block.shape)
        return {
            "targets": targets.flatten(),
            "logits": logits.requires_grad_(True),
            "corrupted_logits": corrupted.requires_grad_(True),
            "grad_logprobs": randn(2 * case.n),
        }
    hidden32 = randn(n_seq, t, d)
    weight32 = randn(v, d, scale=2.0 / d**0.5)
    targets = padded_targets()
    inp = {"targets": targets, "hidden": leaf(hidden32), "weight": leaf(weight32)}
    if workload == "primitive":
        inp["grad_logprobs"] = randn(case.n)
        return inp
    if workload == "fisao":
        mask = targets != IGNORE_INDEX
        base = _exact_logprobs(inp["hidden"], inp["weight"], targets)
        small = torch.rand(n_seq, t, generator=g, device=device) < 0.5
        sign = torch.randint(0, 2, (n_seq, t), generator=g, device=device) * 2 - 1
        shift = sign * torch.where(small, PG_SHIFT_SMALL, PG_SHIFT_LARGE)
        inp["advantages"] = randn(n_seq, t) * mask
        inp["old_logprobs"] = (base + shift) * mask
        inp["ref_logprobs"] = (base + randn(n_seq, t, scale=0.2)) * mask
        return inp
    inp["ref_hidden"] = (hidden32 + randn(n_seq, t, d, scale=0.1)).to(dtype)
    inp["ref_weight"] = (weight32 + randn(v, d, scale=0.1 / d**0.5)).to(dtype)
    if workload == "tpo":
        noise = randn(n_seq, t, d, scale=0.5)
        inp["corrupted_hidden"] = leaf(hidden32 + noise)
        inp["ref_corrupted_hidden"] = (hidden32 + noise + randn(n_seq, t, d, scale=0.1)).to(dtype)
    if workload == "povid":
        b = n_seq // 2
        chosen = targets[:b].clamp(min=0)
        # The corrupted-image model is confident: half the positions in the chosen token, half in another.
        keep = torch.rand(b, t, generator=g, device=device) < 0.5
        planted = torch.where(keep, chosen, torch.randint(0, v, (b, t), generator=g, device=device))
        w_a = weight32[planted]  # [B, T, D]
        lift = ARGMAX_LIFT * w_a / (w_a * w_a).sum(-1, keepdim=True)
        corrupted = hidden32[:b] + randn(b, t, d, scale=0.5) + lift
        inp["corrupted_hidden"] = corrupted.to(dtype)  # argmax only: no gradient (as the official code)
        inp["ref_corrupted_hidden"] = (corrupted + randn(b, t, d, scale=0.1)).to(dtype)
    return inp


def _exact_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(2B, T) fp32 log-probs of the given (rounded) inputs, 0 on ignored rows: FiSAO's rollout log-probs."""
    flat = targets.flatten()
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    h = hidden.detach().reshape(-1, hidden.shape[-1])[rows]
    logp, _ = _branch_stats(h, weight.detach(), flat[rows], 1024, None)
    return _scatter(logp, rows, targets.shape)


GRAD_INPUTS = {
    "primitive": ("hidden", "weight"),
    "dpo": ("hidden", "weight"),
    "tpo": ("hidden", "corrupted_hidden", "weight"),
    "logits": ("logits", "corrupted_logits"),
    "povid": ("hidden", "weight"),
    "fisao": ("hidden", "weight"),
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


def _dpo(chosen, rejected, ref_chosen, ref_rejected):
    return -F.logsigmoid(BETA * ((chosen - rejected) - (ref_chosen - ref_rejected))).mean()


def povid_loss_from_scores(
    s: torch.Tensor, s_noisy: torch.Tensor, ref_s: torch.Tensor, ref_s_noisy: torch.Tensor
) -> torch.Tensor:
    """POVID stage 2 from sequence scores: s (2B,) chosen then hallucinated, s_noisy (B,) the argmax rows.

    `w DPO(chosen vs noisy) + (1 - w) DPO(chosen vs hallucinated)`, sigmoid DPO, mean over pairs.
    """
    b = s_noisy.shape[0]
    noisy = _dpo(s[:b], s_noisy, ref_s[:b], ref_s_noisy)
    halluc = _dpo(s[:b], s[b:], ref_s[:b], ref_s[b:])
    return NOISE_WEIGHT * noisy + (1 - NOISE_WEIGHT) * halluc


def pg_loss(
    logp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """FiSAO's token loss from (R, T) fp32 log-probs: -min(r A, clip(r) A) + KL_COEF * k3, token mean.

    r = exp(logp - old), k3 = exp(ref - logp) - (ref - logp) - 1; the same formula as
    `tpo_fast.methods.fisao.token_pg_loss` with its defaults.
    """
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    ratio = torch.exp(torch.where(mask, logp - old, zero))
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - CLIP_EPS, 1 + CLIP_EPS) * adv)
    diff = torch.where(mask, ref - logp, zero)
    per_token = torch.where(mask, -surrogate + KL_COEF * (torch.exp(diff) - diff - 1), zero)
    return per_token.sum() / mask.sum().clamp(min=1)


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
    if workload in _ORACLES:
        return _ORACLES[workload](inp, round_to, chunk)
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


def _argmax(h, w, chunk, round_to):
    """Per-row argmax of h @ w.T, row chunk by row chunk (no N x V tensor)."""
    return torch.cat([_logits(h[s : s + chunk], w, round_to).argmax(-1) for s in range(0, h.shape[0], chunk)])


def _backprop(h, w, gathers, g_lse, chunk, round_to):
    """fp32 gradients (dh, dw) of `sum_r g_lse[r] lse_r + sum_k coef_k[r] z_r[idx_k[r]]`, z = h w^T.

    gathers: list of (idx (M,), coef (M,)); the logits of each row chunk are rebuilt under autograd.
    """
    leaf_dtype = torch.float32 if round_to is None else round_to
    gh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    wl = w.to(leaf_dtype).requires_grad_(True)
    for s in range(0, h.shape[0], chunk):
        hc = h[s : s + chunk].to(leaf_dtype).requires_grad_(True)
        with torch.enable_grad():
            logits = _logits(hc, wl, round_to)
            obj = (torch.logsumexp(logits, -1) * g_lse[s : s + chunk]).sum()
            for idx, coef in gathers:
                obj = obj + (logits.gather(1, idx[s : s + chunk, None]).squeeze(1) * coef[s : s + chunk]).sum()
            dh, dw = torch.autograd.grad(obj, (hc, wl))
        gh[s : s + chunk] = dh.float()
        gw += dw.float()
    return gh, gw


def _logits_chunks(inp, chunk):
    """Row chunks (s, e, logp, visual, d logits, d corrupted logits) of the exact `logits` workload, in fp32.

    Outputs `cat(logp, z - z~)` and their gradients under the upstream `grad_logprobs`, from fp32
    copies of `chunk` rows at a time: never an fp32 (N, V) tensor.
    """
    x, xc = inp["logits"].detach(), inp["corrupted_logits"].detach()
    y, g = inp["targets"], inp["grad_logprobs"].float()
    n = x.shape[0]
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        xf = x[s:e].float().requires_grad_(True)
        xcf = xc[s:e].float().requires_grad_(True)
        valid = y[s:e] != IGNORE_INDEX
        safe = y[s:e].clamp(min=0)[:, None]
        with torch.enable_grad():
            z = xf.gather(1, safe).squeeze(1)
            logp = torch.where(valid, z - torch.logsumexp(xf, -1), 0.0)
            visual = torch.where(valid, z - xcf.gather(1, safe).squeeze(1), 0.0)
            obj = (logp * g[s:e]).sum() + (visual * g[n + s : n + e]).sum()
            dx, dxc = torch.autograd.grad(obj, (xf, xcf))
        yield s, e, logp.detach(), visual.detach(), dx, dxc


def _oracle_logits(inp, round_to, chunk):
    """Exact (2N,) outputs `cat(logp, z - z~)` and both logits gradients as full fp32 tensors (small cases;
    the guard uses `logits_errors`, which streams). With `round_to` the gradients are rounded to that
    dtype once, as the naive fp32 path's are."""
    x = inp["logits"]
    n = x.shape[0]
    out = torch.zeros(2 * n, dtype=torch.float32, device=x.device)
    gx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    gxc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for s, e, logp, visual, dx, dxc in _logits_chunks(inp, chunk):
        out[s:e], out[n + s : n + e] = logp, visual
        gx[s:e], gxc[s:e] = dx, dxc
    if round_to is not None:
        gx, gxc = gx.to(round_to).float(), gxc.to(round_to).float()
    return {"out": out, "logits": gx, "corrupted_logits": gxc}


def logits_errors(inp: dict, got: dict, round_to: torch.dtype | None, chunk: int = 1024) -> dict:
    """The guard's errors for `logits`, chunk by chunk: {name: (rel. error of got, rel. error of the
    gradients rounded once to `round_to`, or 0)}, each relative to the reference's largest magnitude.

    Same measure as comparing with `oracle("logits", ...)`, without two fp32 (N, V) gradients in memory.
    """
    n = inp["logits"].shape[0]
    out = torch.zeros(2 * n, dtype=torch.float32, device=inp["logits"].device)
    acc = {k: [0.0, 0.0, 0.0] for k in ("logits", "corrupted_logits")}  # max |diff|, max |ref|, max |yard diff|
    for s, e, logp, visual, dx, dxc in _logits_chunks(inp, chunk):
        out[s:e], out[n + s : n + e] = logp, visual
        for k, ref in (("logits", dx), ("corrupted_logits", dxc)):
            a = acc[k]
            a[1] = max(a[1], ref.abs().max().item())
            if got[k] is not None:
                a[0] = max(a[0], (got[k][s:e].float() - ref).abs().max().item())
            if round_to is not None:
                a[2] = max(a[2], (ref.to(round_to).float() - ref).abs().max().item())
    scale_out = max(out.abs().max().item(), 1e-30)
    errors = {"out": ((got["out"].detach().float() - out).abs().max().item() / scale_out, 0.0)}
    for k, (diff, scale, yard) in acc.items():
        err = diff / max(scale, 1e-30) if got[k] is not None else math.inf
        errors[k] = (err if math.isfinite(err) else math.inf, yard / max(scale, 1e-30))
    return errors


def _valid_rows(inp):
    y = inp["targets"]
    flat = y.flatten()
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    return y, rows, flat[rows]


def _oracle_povid(inp, round_to, chunk):
    """POVID stage 2 in two passes: per-token statistics and argmaxes without autograd, then the loss on
    per-token leaves gives upstream gradients, backpropagated through rebuilt logits chunks."""
    y, rows, yv = _valid_rows(inp)
    n_pairs, t = y.shape[0] // 2, y.shape[1]
    d = inp["hidden"].shape[-1]
    chosen = rows < n_pairs * t  # compact rows that belong to chosen sequences
    crows = rows[chosen]

    def rows_of(name, sel):
        return inp[name].detach().reshape(-1, d)[sel]

    def scores(h_name, hc_name, w_name):
        h, w = rows_of(h_name, rows), inp[w_name].detach()
        logp, z = _branch_stats(h, w, yv, chunk, round_to)
        argmax = _argmax(rows_of(hc_name, crows), w, chunk, round_to)
        logp_noisy = _gather(h[chosen], w, argmax, round_to) - (z - logp)[chosen]
        return h, w, logp, logp_noisy, argmax

    with torch.no_grad():
        _, _, r_logp, r_noisy, _ = scores("ref_hidden", "ref_corrupted_hidden", "ref_weight")
        ref_s = _scatter(r_logp, rows, y.shape).sum(-1)
        ref_sn = _scatter(r_noisy, crows, torch.Size((n_pairs, t))).sum(-1)
        h, w, logp, logp_noisy, argmax = scores("hidden", "corrupted_hidden", "weight")
    logp_l = logp.clone().requires_grad_(True)
    noisy_l = logp_noisy.clone().requires_grad_(True)
    s = _scatter_grad(logp_l, rows, y.shape).sum(-1)
    sn = _scatter_grad(noisy_l, crows, torch.Size((n_pairs, t))).sum(-1)
    loss = povid_loss_from_scores(s, sn, ref_s, ref_sn)
    g_logp, g_noisy = torch.autograd.grad(loss, (logp_l, noisy_l))
    idx_noisy = torch.zeros_like(yv).masked_scatter(chosen, argmax)
    g_noisy_all = torch.zeros_like(g_logp).masked_scatter(chosen, g_noisy)
    gh, gw = _backprop(h, w, [(yv, g_logp), (idx_noisy, g_noisy_all)], -(g_logp + g_noisy_all), chunk, round_to)
    return {"out": loss.detach(), "hidden": _scatter_rows(gh, rows, inp["hidden"]), "weight": gw}


def _oracle_fisao(inp, round_to, chunk):
    """FiSAO's token loss: per-token log-probs without autograd, the loss on them as leaves, then backprop."""
    y, rows, yv = _valid_rows(inp)
    d = inp["hidden"].shape[-1]
    h, w = inp["hidden"].detach().reshape(-1, d)[rows], inp["weight"].detach()
    with torch.no_grad():
        logp, _ = _branch_stats(h, w, yv, chunk, round_to)
    logp_l = logp.clone().requires_grad_(True)
    loss = pg_loss(
        _scatter_grad(logp_l, rows, y.shape),
        inp["old_logprobs"].float(),
        inp["ref_logprobs"].float(),
        inp["advantages"].float(),
        y != IGNORE_INDEX,
    )
    (g_logp,) = torch.autograd.grad(loss, (logp_l,))
    gh, gw = _backprop(h, w, [(yv, g_logp)], -g_logp, chunk, round_to)
    return {"out": loss.detach(), "hidden": _scatter_rows(gh, rows, inp["hidden"]), "weight": gw}


_ORACLES = {"logits": _oracle_logits, "povid": _oracle_povid, "fisao": _oracle_fisao}
