"""What every workload shares: the loss constants, the seeded input draw, the loss formulas (docs/math.md)
that peers and the oracle use, and the chunked fp32 helpers the oracles are built from."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cases import TARGET_LAWS, ZIPF_EXPONENT, ZIPF_SHIFT, Case

IGNORE_INDEX = -100
BETA = 0.1
OFFSET = 0.5
NOISE_WEIGHT = 0.5  # POVID's w: w DPO(chosen vs noisy) + (1 - w) DPO(chosen vs hallucinated), official 0.5
CLIP_EPS = 0.2  # FiSAO / PPO clip range and KL coefficient (tpo_fast.methods.fisao defaults)
KL_COEF = 0.05


class Draw:
    """The seeded random stream of one case's inputs: every contender draws the same tensors."""

    def __init__(self, case: Case, device: str, dtype: torch.dtype, seed: int):
        self.case, self.device, self.dtype = case, device, dtype
        self.g = torch.Generator(device=device).manual_seed(seed)

    def randn(self, *shape, scale=1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g, device=self.device, dtype=torch.float32) * scale

    def rand(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.g, device=self.device)

    def randint(self, low, high, shape) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.g, device=self.device)

    def padded_targets(self) -> torch.Tensor:
        """(2B, T) random targets, the tail of each row (0-40% of it) set to IGNORE_INDEX. Uniform over the
        vocabulary, or for a "zipf" case drawn from the Zipf-Mandelbrot law (`cases.ZIPF_EXPONENT`), its ranks
        given to token ids in a random order (frequent tokens are not the low ids)."""
        n_seq, t, v = self.case.n_seq, self.case.seq_len, self.case.v
        if self.case.targets == "zipf":
            ranks = torch.arange(1, v + 1, dtype=torch.float64, device=self.device)
            law = (ranks + ZIPF_SHIFT).pow(-ZIPF_EXPONENT)
            drawn = torch.multinomial(law / law.sum(), n_seq * t, replacement=True, generator=self.g)
            token_of_rank = torch.randperm(v, generator=self.g, device=self.device)
            targets = token_of_rank[drawn].view(n_seq, t)
        elif self.case.targets == "uniform":
            targets = self.randint(0, v, (n_seq, t))
        else:
            raise ValueError(f"case {self.case.name}: targets must be one of {TARGET_LAWS}, got {self.case.targets!r}")
        lengths = self.randint((6 * t) // 10, t + 1, (n_seq,))
        pad = torch.arange(t, device=self.device)[None, :] >= lengths[:, None]
        return targets.masked_fill(pad, IGNORE_INDEX)

    def leaf(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype, copy=True).requires_grad_(True)


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
    """docs/math.md's DPO (visual None) or TPO loss, sigmoid type, mean over pairs, from per-token tensors.

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


def branch_stats(h, w, y, chunk, round_to):
    """fp32 (logp, z) for rows h (M, D) with targets y (M,), row chunk by chunk."""
    logp, z = [], []
    for s in range(0, h.shape[0], chunk):
        logits = logits_of(h[s : s + chunk], w, round_to)
        zt = logits.gather(1, y[s : s + chunk, None]).squeeze(1)
        logp.append(zt - torch.logsumexp(logits, -1))
        z.append(zt)
    return torch.cat(logp), torch.cat(z)


def logits_of(h, w, round_to):
    # round_to=None: exact fp32. round_to=dtype: what plain PyTorch does in that dtype (the official
    # code's `(h @ W.T).float()`), the yardstick for the tolerance.
    if round_to is None:
        return h.float() @ w.float().t()
    return (h.to(round_to) @ w.to(round_to).t()).float()


def gather(h, w, y, round_to):
    if round_to is None:
        return (h.float() * w.float()[y]).sum(-1)
    return (h.to(round_to) * w.to(round_to)[y]).sum(-1, dtype=torch.float32)


@torch.no_grad()
def scatter(vals, rows, shape):
    return (
        torch.zeros(shape.numel(), dtype=torch.float32, device=vals.device)
        .index_copy(0, rows, vals)
        .view(shape)
    )


def scatter_grad(vals, rows, shape):
    """Differentiable scatter of compact rows into a zero (2B, T) tensor."""
    return (
        torch.zeros(shape.numel(), dtype=vals.dtype, device=vals.device).index_put((rows,), vals).view(shape)
    )


def scatter_rows(g, rows, like):
    d = like.shape[-1]
    full = torch.zeros(like.numel() // d, d, dtype=torch.float32, device=g.device)
    return full.index_copy(0, rows, g).view(like.shape)


def valid_rows(inp):
    """(targets, flat indices of the valid rows, their targets)."""
    y = inp["targets"]
    flat = y.flatten()
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    return y, rows, flat[rows]


def backprop(h, w, gathers, g_lse, chunk, round_to):
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
            logits = logits_of(hc, wl, round_to)
            obj = (torch.logsumexp(logits, -1) * g_lse[s : s + chunk]).sum()
            for idx, coef in gathers:
                obj = obj + (logits.gather(1, idx[s : s + chunk, None]).squeeze(1) * coef[s : s + chunk]).sum()
            dh, dw = torch.autograd.grad(obj, (hc, wl))
        gh[s : s + chunk] = dh.float()
        gw += dw.float()
    return gh, gw
