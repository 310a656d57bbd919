"""The fused token primitives: per-token log-probs, target logits and the corrupted-branch gather.

`token_stats` is the one entry point the losses use; `token_logprobs` and `target_logits` are
its two public faces from docs/math.md. Rows whose target is `ignore_index` are compacted away
before any backend runs (they cost no vocabulary work) and scattered back as zeros.

Every backend's forward, and the hand-written backwards, run with autocast off (`autocast_off`):
an enclosing `torch.autocast` region does not change what the primitives compute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tpo_fast.ops import torch_chunked
from tpo_fast.ops._compile import eager_under_compile
from tpo_fast.ops._validate import (
    _desc,
    check_ignore_index,
    check_primitive_inputs,
    check_target_range,
    out_of_range,
    raise_out_of_range,
)
from tpo_fast.ops.options import TRITON_MISSING, current_options, triton_installed
from tpo_fast.ops.reference import reference_target_logits, reference_token_stats
from tpo_fast.ops.torch_chunked import autocast_off

logger = logging.getLogger("tpo_fast")

BACKENDS = ("auto", "triton", "torch", "reference")


class TokenStats(NamedTuple):
    """Per-row outputs of `token_stats`, each (N,); ignored rows hold 0 (argmax -1).

    logprobs: fp32 `log softmax(z)[y]`. target_logits: fp32 raw `z[y]`. lse: fp32 logsumexp of z.
    corrupted_target_logits: fp32 `h~ . W[y] (+ b[y])` when `corrupted_hidden` was given, else None.
    argmax: int64 `argmax_v z[v]` when `return_argmax=True`, else None (never differentiable).
    """

    logprobs: torch.Tensor
    target_logits: torch.Tensor
    lse: torch.Tensor
    corrupted_target_logits: torch.Tensor | None
    argmax: torch.Tensor | None


def valid_row_index(valid: torch.Tensor, n_valid: int) -> torch.Tensor:
    """The flat indices of the True entries of `valid`, in order, given their count: no host sync.

    `nonzero` (or boolean-mask indexing) must read the count back from the device before it can
    allocate its output, a `cudaStreamSynchronize` each time; with the count already known on the
    host (from the caller's one read-back), a cumulative sum places every index without one.
    """
    flat = valid.reshape(-1)
    slot = torch.cumsum(flat, 0) - 1
    slot = torch.where(flat, slot, torch.full_like(slot, n_valid))  # invalid entries land in a spare slot
    out = torch.empty(n_valid + 1, dtype=torch.long, device=valid.device)
    out.scatter_(0, slot, torch.arange(flat.numel(), device=valid.device))
    return out[:n_valid]


class _Compaction:
    """The rows that carry a target: kernels see only those, results go back in place.

    One host read-back per call, which also checks the targets' range: the count of target-carrying
    rows and of out-of-range targets come back together (on CUDA a read-back waits for the GPU to drain,
    so two checks in a row would stall the launches twice).
    """

    def __init__(self, targets: torch.Tensor, valid: torch.Tensor, vocab_size: int, ignore_index: int,
                 valid_rows: torch.Tensor | None = None, check_rows: bool = False) -> None:
        self.n = valid.shape[0]
        if valid_rows is not None:  # the caller's own read-back found these rows, their targets in range
            if check_rows:
                _assert_rows(targets, valid, valid_rows, vocab_size)
            self.active = valid_rows.numel() != self.n
            self.rows = valid_rows if self.active else None
            return
        bad = out_of_range(targets, valid, vocab_size)
        n_valid, n_bad = torch.stack([valid.sum(), bad.sum()]).tolist()
        if n_bad:
            raise_out_of_range(targets, bad, vocab_size, ignore_index)
        self.active = n_valid != self.n
        self.rows = valid_row_index(valid, n_valid) if self.active else None

    def take(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """The target-carrying rows of `t`, contiguous."""
        if t is None:
            return None
        return (t.index_select(0, self.rows) if self.active else t).contiguous()

    def put(self, x: torch.Tensor | None, fill: float = 0.0) -> torch.Tensor | None:
        """`x` of the kept rows scattered back to all N rows, `fill` elsewhere (differentiable)."""
        if x is None or not self.active:
            return x
        return torch.full((self.n,), fill, dtype=x.dtype, device=x.device).index_copy(0, self.rows, x)


def _prepare(hidden, weight, targets, bias, corrupted_hidden, ignore_index, backend):
    """Shared prologue of the primitives: validate the inputs (the target range is checked by `_Compaction`,
    or here on the reference backend, which compacts nothing), pick the backend, int64 targets and their mask."""
    check_primitive_inputs(hidden, weight, targets, bias, corrupted_hidden)
    check_ignore_index(ignore_index)
    backend = resolve_backend(backend, hidden.device)
    targets = targets.long()
    valid = targets != ignore_index
    if backend == "reference":
        check_target_range(targets, valid, weight.shape[0], ignore_index)
    return backend, targets, valid


def _check_valid_rows(valid_rows: object, n_rows: int, device: torch.device) -> None:
    """Host-side checks of a caller's `valid_rows` (what is checked without reading the device back)."""
    if not isinstance(valid_rows, torch.Tensor) or valid_rows.dtype != torch.int64 or valid_rows.dim() != 1:
        what = _desc(valid_rows) if isinstance(valid_rows, torch.Tensor) else type(valid_rows).__name__
        raise TypeError(f"valid_rows must be a 1-D int64 tensor of row indices, got {what}")
    if valid_rows.device != device:
        raise ValueError(f"valid_rows must be on the device of hidden ({device}), got {valid_rows.device}")
    if valid_rows.numel() > n_rows:
        raise ValueError(f"valid_rows holds {valid_rows.numel()} indices for {n_rows} rows")


ROWS_CONTRACT = ("valid_rows must be the ascending indices of exactly the rows whose target is not ignore_index, "
                 "each target in [0, V); pass valid_row_index(targets != ignore_index, count) of these targets")


def _assert_rows(targets: torch.Tensor, valid: torch.Tensor, valid_rows: torch.Tensor, vocab_size: int) -> None:
    """A caller's `valid_rows` checked without reading the device back (`torch._assert_async`: on the CPU an error
    at once, on CUDA a device-side assert at the next synchronization, instead of kernels that read and write out
    of bounds): in [0, N), strictly ascending, as many as the target-carrying rows, each of them one, its target
    in [0, V). About a dozen small kernels over N and K entries."""
    n = valid.shape[0]
    in_range = ((valid_rows >= 0) & (valid_rows < n)).all()
    rows = valid_rows.clamp(0, max(n - 1, 0))
    y = targets.index_select(0, rows)
    ok = in_range & (valid.sum() == valid_rows.numel()) & valid.index_select(0, rows).all()
    ok = ok & ((y >= 0) & (y < vocab_size)).all() & (rows[1:] > rows[:-1]).all()
    torch._assert_async(ok, f"tpo_fast: {ROWS_CONTRACT}")


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


@dataclass(frozen=True)
class _Params:
    backend: str
    want_argmax: bool
    has_corrupted: bool


def _impl(backend: str):
    if backend == "triton":
        from tpo_fast.ops import triton_impl

        return triton_impl
    return torch_chunked


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map `auto` to a concrete backend: `triton` on CUDA (when Triton imports), else `torch`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        if backend == "triton" and not triton_installed():
            raise ValueError(f"{TRITON_MISSING}, or use backend='torch'")
        if backend == "triton" and device.type != "cuda":
            from tpo_fast.ops.triton_impl import interpreter_enabled

            if not interpreter_enabled():
                raise ValueError(
                    f"backend='triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1 for the "
                    "CPU interpreter; use backend='torch' on CPU"
                )
        return backend
    if device.type == "cuda":
        if triton_installed():
            return "triton"
        logger.warning("tpo_fast: Triton is not installed; falling back to the torch backend on CUDA")
    return "torch"


def _refuse_double_backward(name: str, backend: str) -> None:
    """Raise when backward runs with create_graph=True: the hand-written backward is not differentiable.

    Autograd runs a backward in grad mode exactly when the caller asked for `create_graph=True`.
    Failing here, at the first backward, beats a graph that silently lacks the second-order terms.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"tpo_fast.{name}: second-order gradients (backward or autograd.grad with create_graph=True) are not "
            f"supported by the {backend!r} backend, whose backward is written by hand. Pass backend='reference' "
            "(plain autograd over materialized N x V logits, so O(N V) memory), which supports double backward."
        )


class _TokenStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, corrupted_hidden, targets, params: _Params):
        impl = _impl(params.backend)
        # The kernel options current now govern this call's backward too, wherever that runs: a scope around
        # the forward alone (a loss computed in one place, backward called by a trainer elsewhere) is enough.
        ctx.options = {"options": current_options()} if params.backend == "triton" else {}
        lse, z, zc, argmax = impl.forward(hidden, weight, bias, corrupted_hidden, targets, params.want_argmax,
                                          **ctx.options)
        ctx.params = params
        # Unused outputs then arrive as None, so backward skips the vocabulary sweep when only the
        # gathered logits carry gradient.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, corrupted_hidden, targets, lse, z)
        logp = z - lse
        if argmax is None:
            argmax = torch.empty(0, dtype=torch.int64, device=hidden.device)
        if zc is None:
            zc = torch.empty(0, dtype=torch.float32, device=hidden.device)
        ctx.mark_non_differentiable(argmax)
        return logp, z, lse, zc, argmax

    @staticmethod
    @autocast_off()
    def backward(ctx, g_logp, g_z, g_lse, g_zc, _g_argmax):
        params: _Params = ctx.params
        _refuse_double_backward("token_stats (token_logprobs, the losses)", params.backend)
        hidden, weight, bias, corrupted_hidden, targets, lse, z = ctx.saved_tensors
        need_h, need_w, need_b, need_hc = ctx.needs_input_grad[:4]
        # dz = g_logp * (onehot - p) + g_z * onehot + g_lse * p
        #    = (g_lse - g_logp) * p + (g_logp + g_z) * onehot
        coef_p = None
        if g_logp is not None or g_lse is not None:
            coef_p = (g_lse if g_lse is not None else 0) - (g_logp if g_logp is not None else 0)
            coef_p = coef_p.float().contiguous()
        coef_y = None
        if g_logp is not None or g_z is not None:
            coef_y = (g_logp if g_logp is not None else 0) + (g_z if g_z is not None else 0)
            coef_y = coef_y.float().contiguous()
        g_zc = g_zc.float().contiguous() if (params.has_corrupted and g_zc is not None) else None
        impl = _impl(params.backend)
        extra = {**ctx.options, "target_logits": z} if params.backend == "triton" else {}
        gh, gw, gb, ghc = impl.backward(
            hidden, weight, bias, corrupted_hidden, targets, lse, coef_p, coef_y, g_zc,
            (need_h, need_w, need_b and bias is not None, need_hc and corrupted_hidden is not None), **extra,
        )

        def cast(g, like):
            return None if g is None else g.to(like.dtype)

        return (
            cast(gh, hidden),
            cast(gw, weight),
            cast(gb, bias) if bias is not None else None,
            cast(ghc, corrupted_hidden) if corrupted_hidden is not None else None,
            None,
            None,
        )


@eager_under_compile
def token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    corrupted_hidden: torch.Tensor | None = None,
    ignore_index: int = -100,
    return_argmax: bool = False,
    backend: str = "auto",
    valid_rows: torch.Tensor | None = None,
    check_rows: bool = True,
) -> TokenStats:
    """Every per-token statistic TPO, DPO and POVID need, from one sweep over the vocabulary.

    Args:
        hidden: (N, D) final hidden states of the clean branch (fp32, fp16 or bf16).
        weight: (V, D) lm_head weight, same dtype as `hidden`.
        targets: (N,) integer target ids; `ignore_index` marks rows without a target.
        bias: optional (V,) lm_head bias.
        corrupted_hidden: optional (N, D) hidden states of the corrupted-image branch for the
            same targets; only its gathered target logit `h~ . W[y]` is computed (no vocabulary sweep).
        ignore_index: target value of rows to skip (0 output, no gradient, no vocabulary work).
        return_argmax: also return the per-row argmax of the clean logits (POVID).
        backend: "auto" (triton on CUDA, torch on CPU), "triton", "torch" or "reference".
        valid_rows: optional (K,) int64 ascending indices of exactly the rows whose target is not
            `ignore_index`, their targets already checked in range, from a read-back the caller made once for
            several calls (`valid_row_index`). The call then reads nothing back from the device (on CUDA a
            read-back waits for the GPU to drain); without it, the call counts the rows and checks the range in
            one read-back of its own. They must be exactly those rows (the reference backend, which compacts
            nothing, ignores them).
        check_rows: check `valid_rows` on the device without a read-back (`torch._assert_async`, about a dozen
            small kernels: on the CPU an error naming the contract, on CUDA a device-side assert at the next
            synchronization, where a wrong list would make the triton kernels read and write out of bounds).
            The library's own callers, whose rows come from `valid_row_index` of the same targets, pass False.

    Returns:
        `TokenStats` of (N,) tensors; `logprobs`, `target_logits`, `lse` and
        `corrupted_target_logits` are differentiable with respect to hidden, weight, bias and
        corrupted_hidden, with upstream gradients allowed on any of them at once.

    Never allocates an N x V tensor except on the `reference` backend. Non-finite inputs give
    non-finite outputs on the rows they touch (as plain PyTorch would); they are not checked.
    An enclosing autocast region changes nothing (autocast is off inside; the `reference` backend's
    plain-autograd backward follows autocast like any PyTorch graph if backward itself runs in one).
    """
    with autocast_off():
        return _token_stats(hidden, weight, targets, bias, corrupted_hidden, ignore_index, return_argmax, backend,
                            valid_rows, check_rows)


def _token_stats(hidden, weight, targets, bias, corrupted_hidden, ignore_index, return_argmax, backend,
                 valid_rows, check_rows) -> TokenStats:
    """`token_stats` itself, run by it inside an autocast-free region."""
    backend, targets, valid = _prepare(hidden, weight, targets, bias, corrupted_hidden, ignore_index, backend)
    if valid_rows is not None:
        _check_valid_rows(valid_rows, targets.shape[0], hidden.device)
    if backend == "reference":
        return TokenStats(
            *reference_token_stats(hidden, weight, targets, bias, corrupted_hidden, ignore_index, return_argmax)
        )
    rows = _Compaction(targets, valid, weight.shape[0], ignore_index, valid_rows, check_rows)
    params = _Params(backend=backend, want_argmax=return_argmax, has_corrupted=corrupted_hidden is not None)
    logp, z, lse, zc, argmax = _TokenStatsFunction.apply(
        rows.take(hidden), weight.contiguous(), _contiguous(bias), rows.take(corrupted_hidden), rows.take(targets),
        params,
    )
    zc = rows.put(zc) if corrupted_hidden is not None else None
    argmax = rows.put(argmax, -1) if return_argmax else None
    logp, z, lse = rows.put(logp), rows.put(z), rows.put(lse)
    return TokenStats(logp, z, lse, zc, argmax)


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    return_target_logit: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """fp32 `log_softmax(hidden @ weight.T + bias)[i, targets[i]]` per row, without N x V logits.

    hidden (N, D), weight (V, D), targets (N,) int64, bias (V,) or None. Rows whose target is
    `ignore_index` give 0 and no gradient. With `return_target_logit` and/or `return_lse`, returns
    the tuple `(logprobs, [target_logit], [lse])` in that order, all from the same sweep; gradients
    may flow into all of them. See `token_stats` for the backends.
    """
    stats = token_stats(hidden, weight, targets, bias=bias, ignore_index=ignore_index, backend=backend)
    if not (return_target_logit or return_lse):
        return stats.logprobs
    out = [stats.logprobs]
    if return_target_logit:
        out.append(stats.target_logits)
    if return_lse:
        out.append(stats.lse)
    return tuple(out)


class _TargetLogitsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, backend: str):
        impl = _impl(backend)
        ctx.backend = backend
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, bias, targets)
        return impl.gather_logits(hidden, weight, bias, targets)

    @staticmethod
    @autocast_off()
    def backward(ctx, g):
        if g is None:
            return None, None, None, None, None
        _refuse_double_backward("target_logits", ctx.backend)
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh, gw, gb = _impl(ctx.backend).gather_backward(
            hidden, weight, targets, g.float().contiguous(), (need_h, need_w, need_b and bias is not None)
        )
        return (
            None if gh is None else gh.to(hidden.dtype),
            None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype),
            None,
            None,
        )


@eager_under_compile
def target_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    valid_rows: torch.Tensor | None = None,
    check_rows: bool = True,
) -> torch.Tensor:
    """The gathered logit alone, fp32 `hidden[i] . weight[targets[i]] (+ bias[targets[i]])`, O(N * D).

    This is all a TPO corrupted-image branch needs. hidden (N, D), weight (V, D), targets (N,).
    Rows whose target is `ignore_index` give 0 and no gradient. The backward is rank-1:
    `d hidden[i] = g[i] * weight[targets[i]]`, `d weight[targets[i]] += g[i] * hidden[i]`.
    Autocast is off inside, and `valid_rows` spares the call its read-back, as for `token_stats` (`check_rows`
    too).
    """
    with autocast_off():
        backend, targets, valid = _prepare(hidden, weight, targets, bias, None, ignore_index, backend)
        if valid_rows is not None:
            _check_valid_rows(valid_rows, targets.shape[0], hidden.device)
        if backend == "reference":
            return reference_target_logits(hidden, weight, targets, bias, ignore_index)
        rows = _Compaction(targets, valid, weight.shape[0], ignore_index, valid_rows, check_rows)
        z = _TargetLogitsFunction.apply(
            rows.take(hidden), weight.contiguous(), _contiguous(bias), rows.take(targets), backend
        )
        return rows.put(z)
