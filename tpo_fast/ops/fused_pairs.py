"""Fused-gradient pair losses: the loss and its exact gradient from one pass, chunk by chunk of whole pairs.

When a scalar preference loss is the last consumer of the per-token log-probs, its gradient can be
finished inside the forward: each chunk's logits are computed once (2NDV), turned in place into the
logit gradient dZ, and multiplied back into dH = dZ W (2NDV) and dW += dZ^T H (2NDV). No logits are
recomputed in backward (the per-token primitive's path costs 8NDV), and only rows with a target
(response tokens) ever reach a GEMM. Backward only scales the stored gradients by `grad_output`.

Precision of the stored gradients: they are computed at `grad_output = 1` and kept in fp32 until
backward, which multiplies them by `grad_output` in fp32 and casts once to the input's dtype, so a
16-bit input gets `(fp32 gradient * grad_output).to(dtype)`, as the recomputing path gives it: a loss
scale beyond fp16's range (GradScaler's 65536) or a `grad_output` bf16 cannot hold (1/3) is used
exactly. Memory: for 16-bit inputs dH and dH~ are kept for the target-carrying rows only (R x D fp32,
usually less than the N x D 16-bit tensor they scatter into); for fp32 inputs they are the (N, D)
gradients themselves, written row by row as before. dW (torch backend) and db are the fp32 accumulators
themselves. The exception is the Triton backend's dW of a 16-bit weight, which accumulates in the
weight's dtype by design (no V x D fp32 buffer): it is scaled in fp32 and cast once, but was rounded
once per chunk before. The Triton backend also feeds its GEMMs a 16-bit dZ, computed before any
loss scale is known: fine in bf16, not in fp16, which the losses therefore send to the recomputing
path (`uses_fused_gradient`; docs/loss.md, mixed precision).

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

import logging
import math
import numbers
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tpo_fast.ops._compile import eager_under_compile
from tpo_fast.ops._validate import (
    _desc,
    check_primitive_inputs,
    is_token_id_dtype,
    out_of_range,
    raise_out_of_range,
)
from tpo_fast.ops.fused_chunk import make_core
from tpo_fast.ops.options import FUSED_CHUNK_MB, current_options
from tpo_fast.ops.token_logprobs import resolve_backend, valid_row_index
from tpo_fast.ops.torch_chunked import autocast_off

logger = logging.getLogger("tpo_fast")
_ANNOUNCED: set[str] = set()


def uses_fused_gradient(grad_mode: str, backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a loss called with `grad_mode` runs this module's fused-gradient path (else the recomputing one).

    "auto" (the losses' default) is "fused", the faster of the two as measured on the CPU and on CUDA (see
    below). "fused" runs it on the torch and triton backends wherever it is exact: not on the reference
    backend (plain autograd), and not for fp16 on the triton backend, whose GEMMs take a 16-bit dZ computed
    at `grad_output = 1`, before any loss scale is known, so that fp16's range (entries below 2^-24 flush to
    0) would drop the small gradients that GradScaler's scale exists to keep; the recomputing path forms dZ
    in backward, scale included. That switch is logged once. `dtype`: the lm_head weight's, the dZ dtype.
    """
    if grad_mode == "auto":
        # Measured, fwd+bwd, fused against recomputing: H200, bf16, N=8192, D=4096, V=32000 (2026-12-04, 1024 MiB
        # chunks): TPO 13.0 vs 14.6 ms, DPO 11.7 vs 13.3 ms; CPU, fp32, d1024-v32000-n2048: TPO 2.27 vs 2.87 s.
        grad_mode = "fused"
    if grad_mode != "fused":
        return False
    resolved = resolve_backend(backend, device)
    if resolved == "reference":
        return False
    if resolved == "triton" and dtype == torch.float16:
        if "fp16" not in _ANNOUNCED:
            _ANNOUNCED.add("fp16")
            logger.info("tpo_fast: fp16 on the triton backend computes the loss's gradient in backward "
                        "(grad_mode='recompute'): the fused path's 16-bit dZ would be rounded before the loss scale")
        return False
    return True


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
    With a `reference` branch, `ref_logprobs`, `ref_target_logits` and `ref_corrupted_target_logits` are
    the same statistics of the reference model (no gradient; None without it, the last without its
    corrupted branch). A chunk of every pair sees the batch's own grids (views, no copy): read them,
    never write them in place.
    """

    first: int
    stop: int
    n_pairs: int
    logprobs: torch.Tensor
    target_logits: torch.Tensor
    corrupted_target_logits: torch.Tensor | None
    second_logprobs: torch.Tensor | None
    mask: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    ref_target_logits: torch.Tensor | None = None
    ref_corrupted_target_logits: torch.Tensor | None = None

    def rows_of(self, t: torch.Tensor) -> torch.Tensor:
        """The entries of a per-sequence tensor `t` (2B, ...) that belong to this chunk, in its grids' order."""
        return pair_range_rows(t, self.first, self.stop, self.n_pairs)


def pair_range_rows(t: torch.Tensor, first: int, stop: int, n_pairs: int) -> torch.Tensor:
    """Rows of a per-sequence tensor `t` (2B, ...) of pairs [first, stop): their chosen sequences, then their
    rejected ones (two slices, one copy; no index tensor). Every pair: `t`'s own rows in order, detached, no copy
    (a chunk of the whole batch)."""
    if first == 0 and stop == n_pairs:
        return t.detach()
    return torch.cat([t[first:stop], t[n_pairs + first:n_pairs + stop]])


class PairBranch(NamedTuple):
    """A second model's branch over the same targets, scored without gradient inside the chunk loop: the
    reference of a DPO / TPO loss. `hidden` (and `corrupted_hidden`) (2B*T, D) like the policy's,
    `weight` (V, D), `bias` (V,) or None. Its chunks reuse the policy's rows and its one host read-back.
    `names`: what the caller calls these four inputs (keys "hidden", "weight", "bias", "corrupted_hidden"), so
    that an input error names the argument its user passed (a loss's `ref_hidden`); without it, errors begin
    "the reference's inputs: "."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    corrupted_hidden: torch.Tensor | None = None
    names: Mapping[str, str] | None = None


class FusedPairOutput(NamedTuple):
    """The loss (fp32 scalar, differentiable) and the detached (2B, T) grids of the whole batch (the
    reference's too when one was given)."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    target_logits: torch.Tensor
    corrupted_target_logits: torch.Tensor | None
    second_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None = None
    ref_target_logits: torch.Tensor | None = None
    ref_corrupted_target_logits: torch.Tensor | None = None


@dataclass(frozen=True)
class _Spec:
    targets: torch.Tensor  # (2B, T) int64
    second_targets: torch.Tensor | None  # (2B, T) int64, second_ignore_index where none
    chunk_loss: Callable[[PairChunk], torch.Tensor]
    ignore_index: int
    second_ignore_index: int
    backend: str
    chunk_bytes: int
    reference: PairBranch | None = None
    # (flat targets, their out-of-range mask, ignore value, name): counted in the plan's one read-back
    range_checks: tuple[tuple[torch.Tensor, torch.Tensor, int, str], ...] = ()
    rows_per_sequence: tuple[int, ...] | None = None  # the caller's read-back (then the plan makes none)
    check_graph: bool = True  # walk the first chunk loss's graph for other tensors that require grad


# Elements scaled per step when a 16-bit stored gradient is multiplied in fp32 (16 MiB of fp32 at a time).
_SCALE_STEP = 1 << 22


def _scale_(g: torch.Tensor, grad_output: torch.Tensor, triton_kernel: bool = False) -> torch.Tensor:
    """`g` times the fp32 scalar `grad_output` in place: in fp32, then one rounding into g's dtype.

    A 16-bit `g` goes through fp32 a slice at a time (no full-size fp32 copy), so neither the product's
    range (fp16 overflows at 65504) nor a rounding of `grad_output` to g's dtype enters the result. With
    `triton_kernel` (the triton backend's own gradients), a contiguous CUDA `g` takes one kernel instead, one
    read and one write (`kernels/scale.py`); other backends never need Triton here.
    """
    if g.dtype == torch.float32:
        return g.mul_(grad_output)
    if not g.is_contiguous():
        return g.copy_(g.float().mul_(grad_output))
    if triton_kernel and g.is_cuda:
        from tpo_fast.ops import triton_fused  # one kernel, where the slices below take three per 16 MiB

        return triton_fused.scale_(g, grad_output)
    flat = g.view(-1)
    for start in range(0, flat.numel(), _SCALE_STEP):
        part = flat[start:start + _SCALE_STEP]
        part.copy_(part.float().mul_(grad_output))
    return g


class StoredGrad:
    """A gradient a fused-gradient forward computed at `grad_output = 1`, kept until backward scales it.

    `value` is fp32 (or, for the Triton backend's dW of a 16-bit weight, already in `dtype`); `scaled`
    returns `(value * grad_output).to(dtype)` with the product in fp32 and one rounding. With `rows`,
    `value` holds only those rows of an (n_rows, D) gradient; the others are 0. `triton_kernel`: the triton
    backend's gradient, which on CUDA its own scaling kernel may scale.
    """

    def __init__(self, value: torch.Tensor, dtype: torch.dtype, rows: torch.Tensor | None = None,
                 n_rows: int = 0, triton_kernel: bool = False) -> None:
        self.value, self.dtype, self.rows, self.n_rows = value, dtype, rows, n_rows
        self.triton_kernel = triton_kernel

    def scaled(self, grad_output: torch.Tensor) -> torch.Tensor:
        """The gradient times `grad_output` (a 0-d tensor) in `dtype`; consumes `value`.

        An fp32 `value` of a 16-bit gradient: one multiply whose fp32 product is rounded once as it is
        stored (`out=` in `dtype`); otherwise `value` is scaled in place (`_scale_`)."""
        if self.value.dtype == torch.float32 and self.dtype != torch.float32:
            g = torch.mul(self.value, grad_output, out=torch.empty(self.value.shape, dtype=self.dtype,
                                                                  device=self.value.device))
        else:
            g = _scale_(self.value, grad_output, self.triton_kernel).to(self.dtype)
        self.value = None
        if self.rows is None:
            return g
        out = torch.zeros((self.n_rows, *g.shape[1:]), dtype=self.dtype, device=g.device)
        return out.index_copy_(0, self.rows, g)


def _rows_out(g: torch.Tensor | None, at: int, n: int, full: bool) -> torch.Tensor | None:
    """Where a chunk's row gradients are written: the slice [at, at + n) of a stored buffer of target rows in
    chunk order (16-bit inputs: the GEMM or product writes there, no copy), or None for a full (N, D) one."""
    return None if g is None or full else g[at:at + n]


def _put_rows(g: torch.Tensor | None, g_rows: torch.Tensor | None, rows: torch.Tensor, full: bool) -> None:
    """A chunk's row gradients into a full (N, D) stored buffer, by row index (the sliced ones are written)."""
    if g is not None and full:
        g.index_copy_(0, rows, g_rows)


def default_chunk_bytes(backend: str, hidden: torch.Tensor) -> int:
    """The chunk budget of a call that gives none: the kernel options' `chunk_mb` (`FUSED_CHUNK_MB` unless
    TPO_FAST_CHUNK_MB says otherwise); on a CPU the torch backend keeps at most `TORCH_CHUNK_BYTES`, as its
    recomputing backward does (a larger buffer buys no GEMM speed there and only raises the peak). On a GPU small
    chunks leave the device waiting for the host (the triton backend's 256 MiB chunks did on an H200)."""
    budget = current_options().chunk_bytes(FUSED_CHUNK_MB)
    cap = chunk_cap_bytes(backend, hidden.is_cuda)
    return budget if cap is None else min(budget, cap)


def chunk_cap_bytes(backend: str, on_cuda: bool) -> int | None:
    """The most bytes a fused chunk's buffer takes on `backend` whatever the options say: `TORCH_CHUNK_BYTES` for
    the torch backend off CUDA, None (no cap) elsewhere (`default_chunk_bytes`)."""
    return TORCH_CHUNK_BYTES if backend == "torch" and not on_cuda else None


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


def count_rows_per_sequence(valid: torch.Tensor, vocab_size: int, range_checks=()) -> list[int]:
    """Each sequence's count of target-carrying rows (`valid`: (S, T) bool), read back once with the counts of the
    `range_checks` (flat targets, their out-of-range mask, ignore value, name), a non-zero one of which raises
    naming its first bad target. The one read-back of a fused call (`_Plan`), or of a caller's (POVID's), which
    then hands the counts to `fused_pair_loss(rows_per_sequence=)`."""
    counts = [valid.sum(1)] + [bad.sum().view(1) for _, bad, _, _ in range_checks]
    read = torch.cat(counts).tolist()  # the one host sync
    for (targets, bad, ignore, name), n_bad in zip(range_checks, read[valid.shape[0]:], strict=True):
        if n_bad:
            raise_out_of_range(targets, bad, vocab_size, ignore, name)
    return read[: valid.shape[0]]


class _Plan:
    """Where each chunk's rows are, computed once per call (one host sync), so that no chunk needs another.

    Sequence s (chosen p, rejected B + p) owns the slice [start[s], start[s + 1]) of `index`, the flat
    indices into `hidden` of the batch's target-carrying rows. A chunk of pairs [f, g) is the rows of its
    chosen sequences f..g-1, then of its rejected ones: two slices, never a boolean mask.
    `range_checks`: (flat targets, out-of-range mask, ignore value, name); their counts come back in the
    same read-back, and a non-zero one raises before any kernel indexes the weight with them.
    """

    def __init__(self, valid: torch.Tensor, budget_rows: int, vocab_size: int, range_checks=(),
                 per_seq: tuple[int, ...] | None = None) -> None:
        n_seq, self.n_tok = valid.shape
        self.n_pairs = n_seq // 2
        if per_seq is None:  # else the caller read the counts back and checked the range
            per_seq = count_rows_per_sequence(valid, vocab_size, range_checks)
        self.start = [0]
        for n in per_seq:
            self.start.append(self.start[-1] + n)
        b = self.n_pairs
        self.pair_rows = [per_seq[p] + per_seq[b + p] for p in range(b)]
        self.chunks = plan_chunks(self.pair_rows, budget_rows)
        self.index = valid_row_index(valid, self.start[-1])
        self.valid = valid

    def rows(self, first: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat row indices into `hidden`, the same rows' indices into the chunk's flattened (2P, T) grid)."""
        b, t, p = self.n_pairs, self.n_tok, stop - first
        chosen = self.index[self.start[first]:self.start[stop]]
        rejected = self.index[self.start[b + first]:self.start[b + stop]]
        rows = torch.cat([chosen, rejected])
        local = torch.cat([chosen - first * t, rejected - (b + first - p) * t])
        return rows, local

    def mask(self, first: int, stop: int) -> torch.Tensor:
        return pair_range_rows(self.valid, first, stop, self.n_pairs)


class _Grids:
    """The batch's (2B, T) fp32 grids, filled chunk by chunk (detached: they feed the metrics)."""

    def __init__(self, targets: torch.Tensor, has_zc: bool, has_y2: bool, reference: PairBranch | None) -> None:
        has_ref = reference is not None
        wanted = [True, True, has_zc, has_y2, has_ref, has_ref, has_ref and reference.corrupted_hidden is not None]
        # one zero fill for all of them (one launch on a GPU, not seven)
        block = iter(torch.zeros((sum(wanted), *targets.shape), dtype=torch.float32, device=targets.device))
        self.logp, self.z, self.zc, self.logp2, self.ref_logp, self.ref_z, self.ref_zc = (
            next(block) if want else None for want in wanted)

    @staticmethod
    def _put(rows: torch.Tensor, *pairs) -> None:
        for full, part in pairs:
            if full is not None:
                full.view(-1).index_copy_(0, rows, part)

    def put(self, rows: torch.Tensor, logp, z, zc, logp2) -> None:
        """The chunk's per-row values at their flat positions `rows`."""
        self._put(rows, (self.logp, logp), (self.z, z), (self.zc, zc), (self.logp2, logp2))

    def put_reference(self, rows: torch.Tensor, logp, z, zc) -> None:
        """The reference's per-row values of the chunk at their flat positions `rows`."""
        self._put(rows, (self.ref_logp, logp), (self.ref_z, z), (self.ref_zc, zc))

    @staticmethod
    def chunk(grid: torch.Tensor | None, plan: _Plan, first: int, stop: int, grad: bool):
        """The chunk's (2P, T) copy of `grid` (0 at ignored rows), a leaf that requires grad when `grad`."""
        if grid is None:
            return None
        return pair_range_rows(grid, first, stop, plan.n_pairs).requires_grad_(grad)


def _reaches_other_leaves(loss: torch.Tensor, grids: list[torch.Tensor]) -> bool:
    """Whether the chunk loss's graph reaches a tensor that requires grad other than the chunk's `grids`, whose
    gradient the fused pass would drop (it differentiates the grids only). A host-side walk of a graph of a few dozen
    nodes: no device work."""
    ours = {id(t) for t in grids}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        leaf = getattr(fn, "variable", None)  # an AccumulateGrad node: a leaf that requires grad
        if leaf is not None and id(leaf) not in ours:
            return True
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return False


def _row_grad(g: torch.Tensor | None, local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The chunk rows' entries of a (2P, T) grid gradient (0 where autograd gave none)."""
    if g is None:
        return torch.zeros(local.shape[0], dtype=torch.float32, device=like.device)
    return g.reshape(-1).index_select(0, local)


def _run(spec: _Spec, hidden, weight, bias, corrupted_hidden, needs):
    """The chunk loop. Returns (loss, grids, (gh, gw, gb, ghc)); gradients only where `needs` says.

    Host syncs: one for the plan (the rows per sequence); the chunks themselves index with precomputed
    integer slices and never read a device value back, so on CUDA the host runs ahead of the GPU.
    """
    need_h, need_w, need_b, need_hc = needs
    want_grad = any(needs)
    targets, y2_all, ref = spec.targets, spec.second_targets, spec.reference
    v = weight.shape[0]
    plan = _Plan(targets != spec.ignore_index, max(1, spec.chunk_bytes // (4 * v)), v, spec.range_checks,
                 spec.rows_per_sequence)
    flat_y = targets.reshape(-1)
    flat_y2 = None
    if y2_all is not None:
        # -1 inside, the cores' "no second target" (whatever marker the caller used)
        flat_y2 = torch.where(y2_all == spec.second_ignore_index, torch.full_like(y2_all, -1), y2_all).reshape(-1)
    core = make_core(spec.backend, weight, bias, need_w, need_b and bias is not None)
    ref_core = None if ref is None else make_core(spec.backend, ref.weight, ref.bias, False, False)
    grids = _Grids(targets, corrupted_hidden is not None, y2_all is not None, ref)
    # dH and dH~ in fp32 until backward scales them (see the module doc). fp32 inputs: the full (N, D)
    # gradients themselves, written row by row (no second buffer, no scatter in backward). 16-bit inputs:
    # fp32 rows of the target-carrying tokens in chunk order, their indices into `hidden` in `row_index`,
    # scattered into the input dtype in backward.
    full = hidden.dtype == torch.float32
    n_rows = hidden.shape[0] if full else plan.start[-1]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    # 16-bit: every chunk writes its rows' slice (dH~'s zeroed where no gradient reached it), so no zero fill
    alloc = torch.zeros if full else torch.empty
    gh = alloc((n_rows, hidden.shape[1]), **f32) if need_h else None
    ghc = alloc((n_rows, hidden.shape[1]), **f32) if need_hc else None
    row_index = None if full or not (need_h or need_hc) else torch.empty(n_rows, dtype=torch.long, device=hidden.device)

    def one_chunk(first: int, stop: int, at: int) -> torch.Tensor:
        # Its own frame: the chunk's logits / dZ buffer and its row copies die on return, before the
        # next chunk allocates its own (a loop variable would keep them alive through the next GEMM).
        rows, local = plan.rows(first, stop)  # the chunk's target-carrying rows of `hidden`
        y = flat_y.index_select(0, rows)
        if ref is not None:  # the reference first: its row copies are gone before the policy's buffer exists
            r_hc = None if ref.corrupted_hidden is None else ref.corrupted_hidden.index_select(0, rows)
            r_lse, r_z, r_zc = ref_core.forward_stats(ref.hidden.index_select(0, rows), r_hc, y)
            grids.put_reference(rows, r_z - r_lse, r_z, r_zc)
            del r_hc
        h = hidden.index_select(0, rows)
        y2 = None if flat_y2 is None else flat_y2.index_select(0, rows)
        # the corrupted gather first: its temporaries are gone before the logits buffer exists
        hc = None if corrupted_hidden is None else corrupted_hidden.index_select(0, rows)
        zc = None if hc is None else core.gather(hc, y)
        lse, z, z2 = core.stats(h, y, y2)
        logp2 = None if z2 is None else torch.where(y2 >= 0, z2 - lse, torch.zeros_like(z2))
        grids.put(rows, z - lse, z, zc, logp2)
        chunk = PairChunk(
            first, stop, plan.n_pairs, grids.chunk(grids.logp, plan, first, stop, want_grad),
            grids.chunk(grids.z, plan, first, stop, want_grad), grids.chunk(grids.zc, plan, first, stop, want_grad),
            grids.chunk(grids.logp2, plan, first, stop, want_grad), plan.mask(first, stop),
            *(grids.chunk(g, plan, first, stop, False) for g in (grids.ref_logp, grids.ref_z, grids.ref_zc)),
        )
        with torch.enable_grad() if want_grad else torch.no_grad():
            loss = spec.chunk_loss(chunk)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
            # a (P,) loss would be summed chunk by chunk entry by entry (under no_grad) into a meaningless vector
            raise TypeError(f"chunk_loss must return a 0-d floating-point tensor (the chunk's part of the batch "
                            f"loss, e.g. per_pair.sum() / chunk.n_pairs), got {_desc(loss)}")
        n = rows.numel()
        g_zc = None
        if want_grad:
            leaves = [chunk.logprobs, chunk.target_logits, chunk.corrupted_target_logits, chunk.second_logprobs]
            used = [t for t in leaves if t is not None]
            # checked on the first chunk (about 0.1 ms of host work): every chunk runs the same chunk_loss
            if spec.check_graph and first == 0 and loss.requires_grad and _reaches_other_leaves(loss, used):
                raise ValueError(
                    "chunk_loss depends on tensors that require grad besides the chunk's grids (a parameter or "
                    "another model's output?): the fused pass differentiates the grids only, so their gradient "
                    "would be lost; detach them, or add the terms that need a gradient outside chunk_loss"
                )
            grads = iter(torch.autograd.grad(loss, used, allow_unused=True) if loss.requires_grad else [None] * 4)
            g_logp, g_z, g_zc, g_logp2 = (next(grads) if t is not None else None for t in leaves)
            g_logp, g_z = _row_grad(g_logp, local, h), _row_grad(g_z, local, h)
            if row_index is not None:
                row_index[at:at + n] = rows
            if need_h or need_w or need_b:
                g_logp2_r = None
                if logp2 is not None:  # rows without a second target hold a constant 0: no gradient
                    g_logp2_r = torch.where(y2 >= 0, _row_grad(g_logp2, local, h), 0.0)
                coef_p = -g_logp if g_logp2_r is None else -(g_logp + g_logp2_r)
                # a 16-bit dW that takes the corrupted rows too: the target entries stay fp32 (fused_chunk.py)
                split = need_w and g_zc is not None and hc is not None and weight.dtype != torch.float32
                dz = core.logit_grad(coef_p.contiguous(), y, (g_logp + g_z).contiguous(), y2, g_logp2_r, split)
                gh_rows = core.backprop(dz, h, need_h, _rows_out(gh, at, n, full))
                del dz  # the logits buffer, now dZ: `release` frees it before the corrupted branch's temporaries
                _put_rows(gh, gh_rows, rows, full)
        core.release()
        # No gradient reached the corrupted grid (weighting="none", detached weights): skip its backward
        # entirely, or a non-finite corrupted row would put 0 * inf = NaN into dW and db.
        if g_zc is not None and hc is not None and (need_hc or need_w or need_b):
            ghc_rows = core.gather_backward(hc, y, _row_grad(g_zc, local, h).contiguous(), need_hc,
                                            _rows_out(ghc, at, n, full))
            _put_rows(ghc, ghc_rows, rows, full)
        elif ghc is not None and not full:
            ghc[at:at + n].zero_()
        return loss.detach().float()

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for first, stop in plan.chunks:
        b = plan.n_pairs  # rows before the chunk: its predecessors' chosen and rejected ones
        total = total + one_chunk(first, stop, plan.start[first] + plan.start[b + first] - plan.start[b])
    n_all = hidden.shape[0]
    grads = (
        None if gh is None else StoredGrad(gh, hidden.dtype, row_index, n_all),
        None if core.gw is None else StoredGrad(core.gw, weight.dtype, triton_kernel=spec.backend == "triton"),
        None if core.gb is None else StoredGrad(core.gb, bias.dtype),
        None if ghc is None else StoredGrad(ghc, corrupted_hidden.dtype, row_index, n_all),
    )
    return total, grids, grads


class _FusedPairLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, corrupted_hidden, spec: _Spec):
        needs = tuple(ctx.needs_input_grad[:4])
        loss, grids, grads = _run(spec, hidden, weight, bias, corrupted_hidden, needs)
        ctx.grads = grads
        # the grids never take a gradient: autograd need not zero-fill one for each of them in backward
        ctx.set_materialize_grads(False)
        extra = [grids.logp, grids.z]
        extra += [t if t is not None else torch.empty(0, device=hidden.device)
                  for t in (grids.zc, grids.logp2, grids.ref_logp, grids.ref_z, grids.ref_zc)]
        ctx.mark_non_differentiable(*extra)
        return (loss, *extra)

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        if grad_loss is None:  # no gradient reached the loss (grads are not materialized): nothing flows back
            ctx.grads = None
            return None, None, None, None, None
        return (*take_stored_grads(ctx, grad_loss), None)


def take_stored_grads(ctx, grad_loss: torch.Tensor) -> list[torch.Tensor | None]:
    """The gradients a fused-gradient forward stored on `ctx.grads`, scaled by `grad_loss` and released:
    once per forward, never under `create_graph` (the backward of every fused-gradient Function).

    Entries are `StoredGrad` (fp32 until here: `(g * grad_loss).to(dtype)`, one rounding) or plain
    tensors, scaled in place with the product taken in fp32 and rounded once into their dtype (never
    `grad_loss` rounded to a 16-bit dtype, never a 16-bit product that overflows).
    """
    if torch.is_grad_enabled():
        raise RuntimeError(NO_SECOND_ORDER)
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        raise RuntimeError(
            "backward ran twice through a fused-gradient loss, whose stored gradients are used once; "
            "recompute the loss for each backward, or pass grad_mode='recompute'"
        )
    scale = grad_loss.detach().float()
    with autocast_off():
        return [None if g is None else g.scaled(scale) if isinstance(g, StoredGrad) else _scale_(g, scale)
                for g in grads]


@eager_under_compile
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
    second_ignore_index: int | None = None,
    reference: PairBranch | None = None,
    rows_per_sequence: Sequence[int] | None = None,
    check_graph: bool = True,
) -> FusedPairOutput:
    """A pair loss and its gradient in one pass over the vocabulary, chunk by chunk of whole pairs.

    Args:
        hidden: (2B*T, D) clean-branch hidden states, the B chosen sequences first, then the B rejected.
        weight: (V, D) lm_head weight (same dtype as hidden); bias: optional (V,).
        targets: (2B, T) integer ids, already shifted; `ignore_index` rows cost nothing.
        chunk_loss: `f(PairChunk) -> scalar`, the loss contribution of the chunk's pairs such that the
            batch loss is the sum over chunks (e.g. a mean over pairs scaled by P / B): a 0-d floating-point
            tensor, differentiable in the chunk's grids and in nothing else that requires grad (the pass
            differentiates the grids only; TypeError / ValueError otherwise); called under
            `torch.enable_grad()` when a gradient is wanted.
        corrupted_hidden: optional (2B*T, D) hidden states of the same tokens on the corrupted image:
            only their gathered target logit is computed (gradient by gather, no vocabulary sweep).
        second_targets: optional (2B, T) integer second target ids scored against the same clean
            softmax (POVID's noisy argmax); `second_ignore_index` where a row has none.
        backend: "auto", "triton" or "torch" (the reference backend has no fused path).
        chunk_bytes: budget of one chunk's logits buffer, counted as fp32 (rows x V x 4 B; the triton
            backend's buffer of a 16-bit weight holds those rows in half the bytes); default the kernel
            options' `chunk_mb` (TPO_FAST_CHUNK_MB; unset: `FUSED_CHUNK_MB`, 1024 MiB), at most 128 MiB
            on the torch backend on a CPU (`default_chunk_bytes`).
            A single pair with more rows than the budget is processed alone (its buffer is then
            larger than the budget).
        second_ignore_index: the `second_targets` value of rows without a second target; default
            `ignore_index`. Pass a negative one (POVID passes -1) when `ignore_index` is a real token
            id (>= 0) that a second target may equal.
        reference: optional `PairBranch`, a reference model's hidden states (and corrupted ones) and
            lm_head on the same targets: scored chunk by chunk without gradient (its `PairChunk.ref_*`
            grids), on the policy's rows, so that the whole call reads the device back once.
        rows_per_sequence: optional 2B ints, each sequence's number of targets that are not `ignore_index`, with
            every target and second target already checked in range, from a read-back the caller made (POVID's,
            shared with its argmax pass). The call then reads nothing back from the device. They must be exactly
            those counts: checking that would take the read-back they spare.
        check_graph: walk the first chunk loss's autograd graph (host work, about 0.1 ms) and raise the ValueError
            above when it reaches a tensor that requires grad besides the grids. The library's own losses pass
            False: their chunk losses see detached reference scores only.

    Returns:
        `FusedPairOutput`. The loss's backward scales the gradients stored in the forward by
        `grad_output` (in fp32, one rounding into the input's dtype); it runs once per forward and
        has no second-order gradient. Under `torch.no_grad()`, or when no input requires grad, no
        gradient work is done at all. Autocast regions do not change what is computed.
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
    if reference is not None:
        _check_reference(reference, hidden, weight, flat)
    targets = targets.long()
    flat = flat.long()
    # counted in the plan's read-back, the call's only one (each check of its own would stall the GPU once)
    checked = rows_per_sequence is not None  # by the caller's read-back, which also counted the rows
    checks = [] if checked else [(flat, out_of_range(flat, flat != ignore_index, weight.shape[0]), ignore_index,
                                  "targets")]
    second_ignore = ignore_index if second_ignore_index is None else second_ignore_index
    if second_targets is not None:
        if not isinstance(second_targets, torch.Tensor):
            raise TypeError(f"second_targets must be a torch.Tensor, got {type(second_targets).__name__}")
        dtype = second_targets.dtype
        if not is_token_id_dtype(dtype):
            raise TypeError(
                f"second_targets must be an integer tensor (int64) of shape (2B, T) = {tuple(targets.shape)}, "
                f"got {str(dtype).replace('torch.', '')} of shape {tuple(second_targets.shape)}"
            )
        if second_targets.shape != targets.shape:
            raise ValueError(f"second_targets must have the shape of targets {tuple(targets.shape)}, "
                             f"got {tuple(second_targets.shape)}")
        if second_targets.device != targets.device:
            raise ValueError(f"second_targets must be on the device of targets ({targets.device}), "
                             f"got {second_targets.device}")
        second_targets = second_targets.long()
        s_flat = second_targets.reshape(-1)
        if not checked:
            checks.append((s_flat, out_of_range(s_flat, s_flat != second_ignore, weight.shape[0]), second_ignore,
                           "second_targets"))
    if chunk_bytes is None:
        chunk_bytes = default_chunk_bytes(backend, hidden)
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, numbers.Real) or not math.isfinite(chunk_bytes) \
            or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive number of bytes, got {chunk_bytes!r}; pass an int >= 1 "
                         f"(or None for the backend's default budget)")
    budget = int(chunk_bytes)
    if reference is not None:
        reference = PairBranch(*(None if t is None else t.contiguous() for t in reference[:4]))
    if rows_per_sequence is not None:
        rows_per_sequence = tuple(operator.index(n) for n in rows_per_sequence)  # ints, never a 2.5
        if len(rows_per_sequence) != targets.shape[0] or not all(0 <= n <= targets.shape[1] for n in rows_per_sequence):
            raise ValueError(f"rows_per_sequence must hold {targets.shape[0]} counts in [0, {targets.shape[1]}], "
                             f"one per sequence of targets, got {rows_per_sequence}")
    spec = _Spec(targets, second_targets, chunk_loss, ignore_index, int(second_ignore), backend, budget, reference,
                 tuple(checks), rows_per_sequence, bool(check_graph))
    hidden = hidden.contiguous()
    inputs = (hidden, weight.contiguous(), None if bias is None else bias.contiguous(),
              None if corrupted_hidden is None else corrupted_hidden.contiguous())
    # Autocast must not touch the kernels' own precision choices (fp32 logits and statistics, GEMMs in
    # the inputs' dtype): inside, every op runs as written, whatever the caller's autocast region says.
    with autocast_off():
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
            loss, logp, z, zc, logp2, ref_logp, ref_z, ref_zc = _FusedPairLossFunction.apply(*inputs, spec)
        else:
            with torch.no_grad():
                loss, grids, _ = _run(spec, *inputs, (False, False, False, False))
            logp, z, zc, logp2 = grids.logp, grids.z, grids.zc, grids.logp2
            ref_logp, ref_z, ref_zc = grids.ref_logp, grids.ref_z, grids.ref_zc
    has_zc, has_y2 = corrupted_hidden is not None, second_targets is not None
    has_ref = reference is not None
    has_ref_zc = has_ref and reference.corrupted_hidden is not None
    return FusedPairOutput(loss, logp, z, zc if has_zc else None, logp2 if has_y2 else None,
                           ref_logp if has_ref else None, ref_z if has_ref else None, ref_zc if has_ref_zc else None)


def _check_reference(reference, hidden: torch.Tensor, weight: torch.Tensor, flat_targets: torch.Tensor) -> None:
    """The reference branch's shapes against the policy's, then its own input checks (devices against the policy's
    targets among them), named by the branch's `names` (or prefixed "the reference's inputs: " without them)."""
    if not isinstance(reference, PairBranch):
        raise TypeError(f"reference must be a tpo_fast.ops.fused_pairs.PairBranch, got {type(reference).__name__}")
    names = reference.names
    prefix = "" if names else "the reference's inputs: "
    hid, wt = (f"the reference's {k}" if not names else names.get(k, k) for k in ("hidden", "weight"))
    rh, rw = reference.hidden, reference.weight
    if isinstance(rh, torch.Tensor) and rh.shape != hidden.shape:
        raise ValueError(f"{hid} must have the policy's shape {tuple(hidden.shape)}, got {tuple(rh.shape)}")
    if isinstance(rw, torch.Tensor) and (rw.dim() != 2 or rw.shape[0] != weight.shape[0]):
        raise ValueError(f"{wt} must have the policy's vocabulary size {weight.shape[0]}, got {tuple(rw.shape)}")
    try:
        check_primitive_inputs(rh, rw, flat_targets, reference.bias, reference.corrupted_hidden, names=names)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{prefix}{e}") from None
