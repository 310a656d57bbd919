"""Fused-gradient pair losses: the loss and its exact gradient from one pass, chunk by chunk of whole pairs.

When a scalar preference loss is the last consumer of the per-token log-probs, its gradient can be
finished inside the forward: each chunk's logits are computed once (2NDV), turned in place into the
logit gradient dZ, and multiplied back into dH = dZ W (2NDV) and dW += dZ^T H (2NDV). No logits are
recomputed in backward (the per-token primitive's path costs 8NDV), and only rows with a target
(response tokens) ever reach a GEMM. Backward only scales the stored gradients by `grad_output`.

A chunk holds whole pairs (chosen sequence p and rejected sequence B + p, and their corrupted-image
rows), so every sequence-level term of a pair (its summed, weighted log-probs, the sigmoid / hinge /
IPO term, the TPO token weights) is known inside the chunk. The loss itself is supplied by the loss
layer as `chunk_loss(PairChunk) -> scalar`, a differentiable function of the chunk's small per-token
grids (2P, T); its gradient with respect to those grids (plain autograd, O(P T)) gives the per-row
coefficients of dZ. The logit gradient of a row is

    dZ = -(g_logp + g_logp2) softmax(z) + (g_logp + g_z) onehot(y) + g_logp2 onehot(y2)

and the corrupted row's is `g_zc onehot(y)`, a gather on W[y]: never a vocabulary sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tpo_fast.ops._validate import check_primitive_inputs, check_target_range
from tpo_fast.ops.fused_chunk import make_core
from tpo_fast.ops.options import current_options
from tpo_fast.ops.token_logprobs import resolve_backend

# The torch backend's chunk budget cap, the fp32 logits chunk of `torch_chunked` (32 Mi elements).
TORCH_CHUNK_BYTES = 128 * 2**20

NO_SECOND_ORDER = (
    "a fused-gradient loss computes its gradient in the forward and has no second-order gradient; "
    "pass grad_mode='recompute' with backend='reference' for double backward (create_graph=True)"
)


class PairChunk(NamedTuple):
    """What `chunk_loss` sees: pairs [first, stop) of a batch of `n_pairs`, as (2P, T) fp32 grids.

    Rows 0..P-1 are the chunk's chosen sequences, rows P..2P-1 its rejected ones, in pair order.
    Grids are 0 where `mask` is False. `target_logits` is the raw clean `z[y]`, `logprobs` is
    `z[y] - lse`, `corrupted_target_logits` the corrupted branch's `h~ . W[y]` (None without it),
    `second_logprobs` `z[y2] - lse` for the second targets (None without them; 0 where y2 is ignored).
    """

    first: int
    stop: int
    n_pairs: int
    logprobs: torch.Tensor
    target_logits: torch.Tensor
    corrupted_target_logits: torch.Tensor | None
    second_logprobs: torch.Tensor | None
    mask: torch.Tensor


class FusedPairOutput(NamedTuple):
    """The loss (fp32 scalar, differentiable) and the detached (2B, T) grids of the whole batch."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    target_logits: torch.Tensor
    corrupted_target_logits: torch.Tensor | None
    second_logprobs: torch.Tensor | None


@dataclass(frozen=True)
class _Spec:
    targets: torch.Tensor  # (2B, T) int64
    second_targets: torch.Tensor | None  # (2B, T) int64, ignore_index where none
    chunk_loss: Callable[[PairChunk], torch.Tensor]
    ignore_index: int
    backend: str
    chunk_bytes: int


def plan_chunks(pair_rows: list[int], budget_rows: int) -> list[tuple[int, int]]:
    """Consecutive pair ranges [first, stop) whose valid rows fit `budget_rows`; a larger pair goes alone."""
    chunks, first, rows = [], 0, 0
    for p, n in enumerate(pair_rows):
        if p > first and rows + n > budget_rows:
            chunks.append((first, p))
            first, rows = p, 0
        rows += n
    if pair_rows:
        chunks.append((first, len(pair_rows)))
    return chunks


class _Grids:
    """The batch's (2B, T) fp32 grids, filled chunk by chunk (detached: they feed the metrics)."""

    def __init__(self, targets: torch.Tensor, has_zc: bool, has_y2: bool) -> None:
        def zeros():
            return torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)

        self.logp, self.z = zeros(), zeros()
        self.zc = zeros() if has_zc else None
        self.logp2 = zeros() if has_y2 else None

    def put(self, seqs: torch.Tensor, chunk: PairChunk) -> None:
        for full, part in ((self.logp, chunk.logprobs), (self.z, chunk.target_logits),
                           (self.zc, chunk.corrupted_target_logits), (self.logp2, chunk.second_logprobs)):
            if full is not None:
                full[seqs] = part.detach()


def _grid(mask: torch.Tensor, rows: torch.Tensor | None, grad: bool) -> torch.Tensor | None:
    if rows is None:
        return None
    g = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    g[mask] = rows
    return g.requires_grad_(grad)


def _row_grad(g: torch.Tensor | None, mask: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float32, device=like.device) if g is None else g[mask]


def _run(spec: _Spec, hidden, weight, bias, corrupted_hidden, needs):
    """The chunk loop. Returns (loss, grids, (gh, gw, gb, ghc)); gradients only where `needs` says."""
    need_h, need_w, need_b, need_hc = needs
    want_grad = any(needs)
    targets, y2_all = spec.targets, spec.second_targets
    n_seq, n_tok = targets.shape
    n_pairs = n_seq // 2
    valid = targets != spec.ignore_index
    per_seq = valid.sum(1)
    pair_rows = (per_seq[:n_pairs] + per_seq[n_pairs:]).tolist()  # one host sync
    v = weight.shape[0]
    chunks = plan_chunks(pair_rows, max(1, spec.chunk_bytes // (4 * v)))
    core = make_core(spec.backend, weight, bias, need_w, need_b and bias is not None)
    grids = _Grids(targets, corrupted_hidden is not None, y2_all is not None)
    gh = torch.zeros_like(hidden) if need_h else None
    ghc = torch.zeros_like(corrupted_hidden) if need_hc else None
    offsets = torch.arange(n_tok, device=targets.device)

    def one_chunk(first: int, stop: int) -> torch.Tensor:
        # Its own frame: the chunk's logits / dZ buffer and its row copies die on return, before the
        # next chunk allocates its own (a loop variable would keep them alive through the next GEMM).
        pairs = torch.arange(first, stop, device=targets.device)
        seqs = torch.cat([pairs, pairs + n_pairs])
        m = valid[seqs]
        rows = (seqs[:, None] * n_tok + offsets)[m]  # the chunk's target-carrying rows of `hidden`
        h, y = hidden.index_select(0, rows), targets[seqs][m]
        y2 = None
        if y2_all is not None:
            y2 = y2_all[seqs][m]
            y2 = torch.where(y2 == spec.ignore_index, torch.full_like(y2, -1), y2)
        # the corrupted gather first: its temporaries are gone before the logits buffer exists
        hc = None if corrupted_hidden is None else corrupted_hidden.index_select(0, rows)
        zc = None if hc is None else core.gather(hc, y)
        lse, z, z2 = core.stats(h, y, y2)
        logp2 = None if z2 is None else torch.where(y2 >= 0, z2 - lse, torch.zeros_like(z2))
        chunk = PairChunk(
            first, stop, n_pairs, _grid(m, z - lse, want_grad), _grid(m, z, want_grad),
            _grid(m, zc, want_grad), _grid(m, logp2, want_grad), m,
        )
        with torch.enable_grad() if want_grad else torch.no_grad():
            loss = spec.chunk_loss(chunk)
        grids.put(seqs, chunk)
        if want_grad:
            leaves = [chunk.logprobs, chunk.target_logits, chunk.corrupted_target_logits, chunk.second_logprobs]
            used = [t for t in leaves if t is not None]
            grads = iter(torch.autograd.grad(loss, used, allow_unused=True) if loss.requires_grad else [None] * 4)
            g_logp, g_z, g_zc, g_logp2 = (next(grads) if t is not None else None for t in leaves)
            n = rows.numel()
            g_logp, g_z = _row_grad(g_logp, m, n, h), _row_grad(g_z, m, n, h)
            if need_h or need_w or need_b:
                g_logp2_r = None
                if logp2 is not None:  # rows without a second target hold a constant 0: no gradient
                    g_logp2_r = torch.where(y2 >= 0, _row_grad(g_logp2, m, n, h), 0.0)
                coef_p = -g_logp if g_logp2_r is None else -(g_logp + g_logp2_r)
                dz = core.logit_grad(coef_p.contiguous(), y, (g_logp + g_z).contiguous(), y2, g_logp2_r)
                gh_rows = core.backprop(dz, h, need_h)
                del dz  # the logits buffer, now dZ: `release` frees it before the corrupted branch's temporaries
                if gh is not None:
                    gh.index_copy_(0, rows, gh_rows.to(gh.dtype))
        core.release()
        if want_grad and hc is not None and (need_hc or need_w or need_b):
            ghc_rows = core.gather_backward(hc, y, _row_grad(g_zc, m, n, h).contiguous(), need_hc)
            if ghc is not None:
                ghc.index_copy_(0, rows, ghc_rows.to(ghc.dtype))
        return loss.detach().float()

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for first, stop in chunks:
        total = total + one_chunk(first, stop)
    gw = None if core.gw is None else core.gw.to(weight.dtype)
    gb = None if core.gb is None else core.gb.to(bias.dtype)
    return total, grids, (gh, gw, gb, ghc)


class _FusedPairLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, corrupted_hidden, spec: _Spec):
        needs = tuple(ctx.needs_input_grad[:4])
        loss, grids, grads = _run(spec, hidden, weight, bias, corrupted_hidden, needs)
        ctx.grads = grads
        extra = [grids.logp, grids.z]
        extra += [t if t is not None else torch.empty(0, device=hidden.device) for t in (grids.zc, grids.logp2)]
        ctx.mark_non_differentiable(*extra)
        return (loss, *extra)

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        return (*take_stored_grads(ctx, grad_loss), None)


def take_stored_grads(ctx, grad_loss: torch.Tensor) -> list[torch.Tensor | None]:
    """The gradients a fused-gradient forward stored on `ctx.grads`, scaled by `grad_loss` in place and
    released: once per forward, never under `create_graph` (the backward of every fused-gradient Function)."""
    if torch.is_grad_enabled():
        raise RuntimeError(NO_SECOND_ORDER)
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        raise RuntimeError(
            "backward ran twice through a fused-gradient loss, whose stored gradients are used once; "
            "recompute the loss for each backward, or pass grad_mode='recompute'"
        )
    return [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]


def fused_pair_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_loss: Callable[[PairChunk], torch.Tensor],
    bias: torch.Tensor | None = None,
    corrupted_hidden: torch.Tensor | None = None,
    second_targets: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_bytes: int | None = None,
) -> FusedPairOutput:
    """A pair loss and its gradient in one pass over the vocabulary, chunk by chunk of whole pairs.

    Args:
        hidden: (2B*T, D) clean-branch hidden states, the B chosen sequences first, then the B rejected.
        weight: (V, D) lm_head weight (same dtype as hidden); bias: optional (V,).
        targets: (2B, T) integer ids, already shifted; `ignore_index` rows cost nothing.
        chunk_loss: `f(PairChunk) -> scalar`, the loss contribution of the chunk's pairs such that the
            batch loss is the sum over chunks (e.g. a mean over pairs scaled by P / B). Differentiable
            in the chunk's grids; called under `torch.enable_grad()` when a gradient is wanted.
        corrupted_hidden: optional (2B*T, D) hidden states of the same tokens on the corrupted image:
            only their gathered target logit is computed (gradient by gather, no vocabulary sweep).
        second_targets: optional (2B, T) second target ids scored against the same clean softmax
            (POVID's noisy argmax); `ignore_index` where a row has none.
        backend: "auto", "triton" or "torch" (the reference backend has no fused path).
        chunk_bytes: budget of one chunk's fp32 logits buffer (rows x V x 4 B); default the kernel
            options' `chunk_mb` (TPO_FAST_CHUNK_MB, 256 MiB), at most 128 MiB on the torch backend.
            A single pair with more rows than the budget is processed alone (its buffer is then
            larger than the budget).

    Returns:
        `FusedPairOutput`. The loss's backward scales the gradients stored in the forward by
        `grad_output`; it runs once per forward and has no second-order gradient. Under
        `torch.no_grad()`, or when no input requires grad, no gradient work is done at all.
    """
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2 or targets.shape[0] % 2 or targets.shape[0] == 0:
        raise ValueError(
            f"targets must be a 2-D (2B, T) tensor with 2B > 0 sequences (B chosen, then B rejected), got "
            f"{getattr(targets, 'shape', type(targets).__name__)}"
        )
    flat = targets.reshape(-1)
    check_primitive_inputs(hidden, weight, flat, bias, corrupted_hidden)
    backend = resolve_backend(backend, hidden.device)
    if backend == "reference":
        raise ValueError("the reference backend has no fused-gradient path; use grad_mode='recompute' with it")
    targets = targets.long()
    check_target_range(flat.long(), flat != ignore_index, weight.shape[0], ignore_index)
    if second_targets is not None:
        if second_targets.shape != targets.shape:
            raise ValueError(f"second_targets must have the shape of targets {tuple(targets.shape)}, "
                             f"got {tuple(second_targets.shape)}")
        second_targets = second_targets.long()
        s_flat = second_targets.reshape(-1)
        check_target_range(s_flat, s_flat != ignore_index, weight.shape[0], ignore_index)
    if chunk_bytes is None:
        # The torch backend keeps its own 128 MiB chunk (as its recomputing backward does): on a CPU a
        # larger buffer buys no GEMM speed and only raises the peak.
        chunk_bytes = current_options().chunk_bytes
        if backend == "torch":
            chunk_bytes = min(chunk_bytes, TORCH_CHUNK_BYTES)
    budget = int(chunk_bytes)
    if budget <= 0:
        raise ValueError(f"chunk_bytes must be a positive number of bytes, got {chunk_bytes!r}")
    spec = _Spec(targets, second_targets, chunk_loss, ignore_index, backend, budget)
    hidden = hidden.contiguous()
    inputs = (hidden, weight.contiguous(), None if bias is None else bias.contiguous(),
              None if corrupted_hidden is None else corrupted_hidden.contiguous())
    # Autocast must not touch the kernels' own precision choices (fp32 logits and statistics, GEMMs in
    # the inputs' dtype): inside, every op runs as written, whatever the caller's autocast region says.
    with torch.autocast(hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
            loss, logp, z, zc, logp2 = _FusedPairLossFunction.apply(*inputs, spec)
        else:
            with torch.no_grad():
                loss, grids, _ = _run(spec, *inputs, (False, False, False, False))
            logp, z, zc, logp2 = grids.logp, grids.z, grids.zc, grids.logp2
    has_zc, has_y2 = corrupted_hidden is not None, second_targets is not None
    return FusedPairOutput(loss, logp, z, zc if has_zc else None, logp2 if has_y2 else None)
