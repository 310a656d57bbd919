"""Per-token log-probs, visual-score target logits and their gradients straight from materialized logits.

For users who already hold `(N, V)` or `(B, T, V)` logits. Each logits tensor is read once in forward
(online max / sum-exp per row, fp32 accumulation, never an fp32 copy of the whole tensor) and once
in backward, which writes `g_logp * (onehot - softmax) + g_z * onehot (+ g_lse * softmax)` per row,
optionally into the logits buffer itself (`inplace_backward=True`).

Backends: "cuda" / "cpp" (the compiled extension `tpo_fast._C`, csrc/), "triton" (the twin in
kernels/logits_logprobs.py), "torch" (row-chunked PyTorch, fp32 per chunk only), "reference"
(naive fp32 `log_softmax` + `gather`, plain autograd). "auto" picks the extension, then Triton
(CUDA only), then torch, and logs which one it used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tpo_fast import _ext
from tpo_fast.ops._compile import eager_under_compile
from tpo_fast.ops._validate import _desc, check_float, check_ignore_index, check_same_device, is_token_id_dtype
from tpo_fast.ops.options import TRITON_MISSING, current_options, interpreter_enabled, triton_installed

logger = logging.getLogger("tpo_fast")

LOGITS_BACKENDS = ("auto", "cuda", "cpp", "triton", "torch", "reference")

# Rows per torch-backend chunk are sized so that one fp32 chunk holds about this many logits.
_TORCH_CHUNK_ELEMS = 1 << 23


class LogitsLogprobs(NamedTuple):
    """Outputs of `logits_logprobs`, fp32, each of the targets' shape ((N,), (B, T), or (B, T-1) with shift).

    logprobs: `log_softmax(logits)[y]`.  target_logits: the raw logit `logits[y]` (visual score input).
    lse: `logsumexp(logits)`.  corrupted_logprobs / corrupted_target_logits: the same for
    `corrupted_logits`, or None when it was not given. Rows whose target is `ignore_index` hold 0
    everywhere and pass no gradient. All five are differentiable, with upstream gradients allowed on
    any of them at once (the visual score `target_logits - corrupted_target_logits` needs two).
    """

    logprobs: torch.Tensor
    target_logits: torch.Tensor
    lse: torch.Tensor
    corrupted_logprobs: torch.Tensor | None
    corrupted_target_logits: torch.Tensor | None


@dataclass(frozen=True)
class _Params:
    backend: str
    ignore_index: int
    inplace_backward: bool


# Backend implementations: forward(x, t, ignore_index) -> (lse, z); backward(...) -> grad (x's dtype).
# x is (N, V) with unit column stride and non-overlapping rows, t is int64 (N,) contiguous.


class _ExtImpl:
    @staticmethod
    def forward(x, t, ignore_index):
        lse, z = _ext.logits_forward(x, t, ignore_index)
        return lse, z

    @staticmethod
    def backward(x, t, lse, coef_p, coef_y, ignore_index, inplace):
        return _ext.logits_backward(x, t, lse, coef_p, coef_y, ignore_index, inplace)


# Vocabulary tile caps of the Triton twin; the interpreter pays per tile, not per element.
_TRITON_MAX_BLOCK_V = 4096
_TRITON_INTERPRET_MAX_BLOCK_V = 16384


def _triton_block_v(v: int) -> int:
    import triton

    cap = _TRITON_INTERPRET_MAX_BLOCK_V if interpreter_enabled() else _TRITON_MAX_BLOCK_V
    return min(triton.next_power_of_2(v), cap)


class _TritonImpl:
    @staticmethod
    def forward(x, t, ignore_index):
        from tpo_fast.kernels.logits_logprobs import logits_forward_kernel
        from tpo_fast.ops.triton_impl import _device_guard

        n, v = x.shape
        lse = torch.empty(n, dtype=torch.float32, device=x.device)
        z = torch.empty(n, dtype=torch.float32, device=x.device)
        if n:
            block = _triton_block_v(v)
            with _device_guard(x):  # Triton launches on the current device, not the tensor's (cuda:1 under cuda:0)
                logits_forward_kernel[(n,)](
                    x, x.stride(0), t, lse, z, v, ignore_index, BLOCK_V=block, num_warps=8 if block >= 2048 else 4
                )
        return lse, z

    @staticmethod
    def backward(x, t, lse, coef_p, coef_y, ignore_index, inplace):
        from tpo_fast.kernels.logits_logprobs import logits_backward_kernel
        from tpo_fast.ops.triton_impl import _device_guard

        n, v = x.shape
        g = x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
        if n:
            block = _triton_block_v(v)
            with _device_guard(x):
                logits_backward_kernel[(n,)](
                    x, x.stride(0), g, g.stride(0), t, lse, coef_p, coef_y, v, ignore_index,
                    BLOCK_V=block, INTERPRET=interpreter_enabled(), num_warps=8 if block >= 2048 else 4,
                )
        return g


class _TorchImpl:
    """Row-chunked PyTorch: only one chunk of rows is ever held in fp32."""

    @staticmethod
    def _chunks(n: int, v: int):
        step = max(1, _TORCH_CHUNK_ELEMS // max(v, 1))
        for i in range(0, n, step):
            yield i, min(n, i + step)

    @staticmethod
    def forward(x, t, ignore_index):
        n, v = x.shape
        lse = torch.zeros(n, dtype=torch.float32, device=x.device)
        z = torch.zeros(n, dtype=torch.float32, device=x.device)
        valid = t != ignore_index
        safe = torch.where(valid, t, torch.zeros_like(t))
        for i, j in _TorchImpl._chunks(n, v):
            xf = x[i:j].float()  # [rows, V]
            lse[i:j] = torch.where(valid[i:j], torch.logsumexp(xf, -1), 0.0)
            z[i:j] = torch.where(valid[i:j], xf.gather(1, safe[i:j, None]).squeeze(1), 0.0)
        return lse, z

    @staticmethod
    def backward(x, t, lse, coef_p, coef_y, ignore_index, inplace):
        n, v = x.shape
        g = x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
        valid = t != ignore_index
        safe = torch.where(valid, t, torch.zeros_like(t))
        # No softmax term where its coefficient is 0 (only target_logits got a gradient), as in the compiled and
        # Triton kernels: on a row whose softmax is undefined (NaN, +inf, all -inf; lse not finite) 0 * exp(nan)
        # would put NaN where d target_logit / d logits is the one-hot. Finite rows keep the product (and with it
        # d/dcoef_p under create_graph=True).
        softmax_rows = (valid & ((coef_p != 0) | torch.isfinite(lse)))[:, None]
        for i, j in _TorchImpl._chunks(n, v):
            # fp32 throughout; the one-hot term is added before rounding to the logits dtype.
            gf = torch.exp(x[i:j].float() - lse[i:j, None]) * coef_p[i:j, None]  # [rows, V]
            gf = torch.where(softmax_rows[i:j], gf, 0.0)
            gf.scatter_add_(1, safe[i:j, None], coef_y[i:j, None])
            g[i:j] = torch.where(valid[i:j, None], gf, 0.0)
        return g


_IMPLS = {"cuda": _ExtImpl, "cpp": _ExtImpl, "triton": _TritonImpl, "torch": _TorchImpl}


# Backend selection


_announced: set[tuple[str, str]] = set()
_jit_tried = False


def _maybe_jit() -> None:
    """With `KernelOptions.jit` (TPO_FAST_JIT=1), `auto` builds the extension once (minutes) when the
    install has none, into `KernelOptions.ext_cache` (TPO_FAST_EXT_CACHE)."""
    global _jit_tried
    if _jit_tried or _ext.HAS_CPU_EXT:
        return
    opts = current_options()
    if not opts.jit:
        return
    _jit_tried = True
    try:
        _ext.load_jit(cache_root=opts.ext_cache)
    except Exception as e:  # noqa: BLE001 - a failed build only means a fallback backend
        logger.warning("tpo_fast: TPO_FAST_JIT=1 but building tpo_fast._C failed (%s)", e)


def _announce(device: torch.device, chosen: str, reason: str) -> None:
    key = (device.type, chosen)
    if key in _announced:
        return
    _announced.add(key)
    level = logging.WARNING if reason else logging.INFO
    logger.log(level, "tpo_fast.logits_logprobs: backend='auto' uses %r on %s%s", chosen, device.type, reason)


def resolve_logits_backend(backend: str, device: torch.device) -> str:
    """Map a backend name to the one that runs on `device`; `auto` logs its choice once per device type.

    auto on CUDA: "cuda" (extension built with CUDA) > "triton" > "torch"; on CPU: "cpp" > "torch".
    """
    if backend not in LOGITS_BACKENDS:
        raise ValueError(f"backend must be one of {LOGITS_BACKENDS}, got {backend!r}")
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors, got {device}; use 'cuda' or 'triton' on GPU")
        if not _ext.HAS_CPU_EXT:
            raise RuntimeError(
                "backend='cpp' needs the compiled extension tpo_fast._C, which is not built "
                f"({_ext.IMPORT_ERROR}); run `pip install --no-build-isolation -e .` with a C++ compiler "
                "present, or call tpo_fast._ext.load_jit()"
            )
        return backend
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {device}; use 'cpp' or 'torch' on CPU")
        if not _ext.HAS_CUDA_EXT:
            raise RuntimeError(
                "backend='cuda' needs tpo_fast._C built with CUDA (a CUDA torch and nvcc at install time, "
                "or tpo_fast._ext.load_jit(with_cuda=True)); it is "
                + ("built for CPU only" if _ext.HAS_CPU_EXT else "not built")
            )
        return backend
    if backend == "triton":
        if not triton_installed():
            raise ValueError(f"{TRITON_MISSING}, or use backend='cpp' or 'torch'")
        if device.type != "cuda" and not interpreter_enabled():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1 for the "
                "CPU interpreter; use backend='cpp' or 'torch' on CPU"
            )
        return backend
    if backend != "auto":
        return backend
    _maybe_jit()
    if device.type == "cuda":
        if _ext.HAS_CUDA_EXT:
            _announce(device, "cuda", "")
            return "cuda"
        missing = "tpo_fast._C has no CUDA kernels" if _ext.HAS_CPU_EXT else "tpo_fast._C is not built"
        if triton_installed():
            _announce(device, "triton", f" ({missing}; falling back to the Triton twin)")
            return "triton"
        _announce(device, "torch", f" ({missing} and Triton is not installed; falling back to PyTorch)")
        return "torch"
    if device.type == "cpu" and _ext.HAS_CPU_EXT:
        _announce(device, "cpp", "")
        return "cpp"
    reason = " (tpo_fast._C is not built; falling back to PyTorch)" if device.type == "cpu" else ""
    _announce(device, "torch", reason)
    return "torch"


# Autograd


def _coefs(g_logp, g_z, g_lse, like):
    """Per-row coefficients of softmax and of the one-hot in dz (fp32), or None if no gradient arrived.

    dz = g_logp * (onehot - p) + g_z * onehot + g_lse * p = (g_lse - g_logp) * p + (g_logp + g_z) * onehot
    """
    if g_logp is None and g_z is None and g_lse is None:
        return None
    zero = torch.zeros_like(like)
    g_logp = zero if g_logp is None else g_logp.float()
    g_z = zero if g_z is None else g_z.float()
    g_lse = zero if g_lse is None else g_lse.float()
    return (g_lse - g_logp).contiguous(), (g_logp + g_z).contiguous()


def _logp(z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """log_softmax at the target, z - lse: NaN where lse is +inf (a +inf logit), as torch.log_softmax gives over such a
    row (z - lse alone would be -inf at a finite target)."""
    return torch.where(lse == float("inf"), float("nan"), z - lse)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of two (N, V) row tensors (unit column stride) intersect."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        start = t.data_ptr()
        return start, start + ((t.shape[0] - 1) * t.stride(0) + t.shape[1]) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _bump_version(t: torch.Tensor) -> None:
    # After an in-place backward, autograd nodes that saved the logits must fail loudly, not read gradients.
    inc = getattr(torch.autograd.graph, "increment_version", None)
    if inc is not None:
        inc(t)


class _LogitsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, corrupted, targets, params: _Params):
        impl = _IMPLS[params.backend]
        lse, z = impl.forward(logits, targets, params.ignore_index)
        if corrupted is not None:
            lse_c, z_c = impl.forward(corrupted, targets, params.ignore_index)
        else:
            lse_c = z_c = torch.empty(0, dtype=torch.float32, device=logits.device)
        ctx.params = params
        # Unused outputs then arrive as None: a branch without upstream gradient costs nothing.
        ctx.set_materialize_grads(False)
        # lse_c is an output too (the public API drops it): a saved output carries its graph into a double backward
        # (create_graph=True), where a saved intermediate would be a constant and drop d lse_c / d corrupted.
        ctx.save_for_backward(logits, corrupted, targets, lse, lse_c)
        return _logp(z, lse), z, lse, _logp(z_c, lse_c), z_c, lse_c

    @staticmethod
    def backward(ctx, g_logp, g_z, g_lse, g_logp_c, g_z_c, g_lse_c):
        logits, corrupted, targets, lse, lse_c = ctx.saved_tensors
        p: _Params = ctx.params
        if torch.is_grad_enabled() and (p.backend != "torch" or p.inplace_backward):
            # create_graph=True: only the torch backend's backward is plain differentiable torch (and lse, a saved
            # output, carries its own graph); the compiled and Triton ones would silently drop second-order terms.
            what = "inplace_backward=True" if p.inplace_backward else f"the {p.backend!r} backend"
            raise RuntimeError(
                f"tpo_fast.logits_logprobs: second-order gradients (create_graph=True) are not supported with {what}, "
                "whose backward is written by hand; pass backend='torch' (or 'reference') and inplace_backward=False"
            )
        impl = _IMPLS[p.backend]

        def branch(x, lse_x, g_lp, g_zz, g_l, inplace=True):
            coefs = _coefs(g_lp, g_zz, g_l, lse_x)
            if coefs is None:
                return None
            inplace = inplace and p.inplace_backward
            g = impl.backward(x, targets, lse_x, coefs[0], coefs[1], p.ignore_index, inplace)
            if inplace:
                _bump_version(x)
            return g

        # corrupted_logits sharing memory with logits (the same tensor twice, overlapping views): its gradient is
        # computed first and out of place, before the logits' in-place gradient overwrites what it reads.
        want_c = corrupted is not None and ctx.needs_input_grad[1]
        alias = p.inplace_backward and want_c and ctx.needs_input_grad[0] and _overlap(logits, corrupted)
        grad_c = branch(corrupted, lse_c, g_logp_c, g_z_c, g_lse_c, inplace=not alias) if want_c else None
        grad = branch(logits, lse, g_logp, g_z, g_lse) if ctx.needs_input_grad[0] else None
        return grad, grad_c, None, None


# Reference and public API


def reference_logits_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    corrupted_logits: torch.Tensor | None = None,
) -> LogitsLogprobs:
    """The naive path, differentiable through plain autograd: fp32 copies of (N, V) logits.

    logits (N, V), targets (N,) int64; `LogitsLogprobs` of (N,) fp32 tensors. Test oracle and
    benchmark baseline; never use it for large N x V.
    """
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    zero = torch.zeros((), dtype=torch.float32, device=logits.device)

    def branch(x):
        # Ignored rows are zeroed before any reduction: their gradient is then exactly 0, even where they hold
        # NaN or inf (log_softmax's backward would give 0 * NaN = NaN there), as on the other backends.
        xf = torch.where(valid[:, None], x.float(), 0.0)
        logp_all = torch.log_softmax(xf, dim=-1)  # [N, V]
        logp = logp_all.gather(1, safe[:, None]).squeeze(1)
        z = xf.gather(1, safe[:, None]).squeeze(1)
        lse = torch.logsumexp(xf, dim=-1)
        return torch.where(valid, logp, zero), torch.where(valid, z, zero), torch.where(valid, lse, zero)

    logp, z, lse = branch(logits)
    logp_c = z_c = None
    if corrupted_logits is not None:
        logp_c, z_c, _ = branch(corrupted_logits)
    return LogitsLogprobs(logp, z, lse, logp_c, z_c)


def _check_inputs(logits, targets, corrupted_logits, shift: bool) -> None:
    check_float("logits", logits)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (N, V) or (B, T, V), got {_desc(logits)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have at least one vocabulary column, got {_desc(logits)}")
    if shift and logits.dim() != 3:
        raise ValueError(
            f"shift=True needs (B, T, V) logits with (B, T) labels, got logits {_desc(logits)}; "
            "for (N, V) logits pass already-shifted targets and shift=False"
        )
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    want = tuple(logits.shape[:-1])
    names = "(N,)" if logits.dim() == 2 else "(B, T)"
    if not is_token_id_dtype(targets.dtype):
        raise TypeError(f"targets must be an integer tensor (int64) of shape {names} = {want}, got {_desc(targets)}")
    if tuple(targets.shape) != want:
        raise ValueError(
            f"targets must be of shape {names} = {want} to match logits {tuple(logits.shape)}, got {_desc(targets)}"
        )
    devices = {"logits": logits.device, "targets": targets.device}
    if corrupted_logits is not None:
        check_float("corrupted_logits", corrupted_logits)
        if corrupted_logits.shape != logits.shape:
            raise ValueError(
                f"corrupted_logits must have the shape of logits {tuple(logits.shape)}, got {_desc(corrupted_logits)}"
            )
        if corrupted_logits.dtype != logits.dtype:
            raise TypeError(
                f"corrupted_logits must have the dtype of logits ({logits.dtype}), got {_desc(corrupted_logits)}"
            )
        devices["corrupted_logits"] = corrupted_logits.device
    check_same_device(devices)


def _check_target_range(targets: torch.Tensor, vocab_size: int, ignore_index: int, shift: bool) -> None:
    """Raise if a used, non-ignored target lies outside [0, V). One host sync."""
    used = targets[:, 1:] if shift else targets
    bad = (used != ignore_index) & ((used < 0) | (used >= vocab_size))
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        if shift:
            first[1] += 1
        where = ", ".join(str(i) for i in first)
        raise ValueError(
            f"targets must lie in [0, V) = [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"targets[{where}] = {int(targets[tuple(first)])}"
        )


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, V) rows with unit column stride and non-overlapping rows; a view whenever possible."""
    v = x.shape[-1]
    rows = x.reshape(-1, v)
    if rows.shape[0] > 1 and (rows.stride(1) != 1 or rows.stride(0) < v):
        # not .contiguous(): torch calls an (N, 1) column with any column stride contiguous and keeps that stride
        rows = rows.clone(memory_format=torch.contiguous_format)
    elif rows.shape[0] == 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


@eager_under_compile
def logits_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    corrupted_logits: torch.Tensor | None = None,
    *,
    shift: bool = False,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> LogitsLogprobs:
    """Per-token log-probs (and TPO's target logits) from materialized logits, one read per tensor.

    Args:
        logits: (N, V) or (B, T, V) logits in fp32, fp16 or bf16 (never upcast as a whole).
        targets: integer target ids of shape logits.shape[:-1]; `ignore_index` marks rows without a
            target (0 output, no gradient, no vocabulary work on the compiled and Triton backends).
        ignore_index: target value of ignored rows, default -100.
        corrupted_logits: optional logits of the corrupted-image branch, same shape and dtype; its
            log-probs and target logits of the same targets are returned too (TPO's visual score is
            `target_logits - corrupted_target_logits`).
        shift: for (B, T, V) logits with (B, T) labels, apply the causal shift: logits[:, :-1]
            predict labels[:, 1:]; outputs are then (B, T-1). No copy of the logits is made.
        inplace_backward: write the gradient into the logits buffer(s) instead of a new tensor, saving
            one logits-sized allocation. **The logits are destroyed by backward**: do not use them
            afterwards, nor with `retain_graph=True`; an autograd node that saved them raises.
            Ignored by the "reference" backend.
        backend: "auto", "cuda", "cpp", "triton", "torch" or "reference" (see the module docstring).

    Returns:
        `LogitsLogprobs` of fp32 tensors shaped like the (shifted) targets; every field is
        differentiable w.r.t. logits and corrupted_logits. Gradients arrive in the logits' dtype,
        computed in fp32. A NaN in a row of logits gives NaN in that row only; -inf entries (masked
        vocabulary) are fine; a row that is -inf everywhere gives NaN log-probs; a +inf logit gives lse
        +inf and NaN log-probs (torch.logsumexp / log_softmax). On such rows a gradient through
        target_logits alone is still the one-hot.
        inplace_backward with corrupted_logits in memory shared with logits computes the corrupted
        gradient out of place.
    """
    _check_inputs(logits, targets, corrupted_logits, shift)
    ignore_index = check_ignore_index(ignore_index)
    backend = resolve_logits_backend(backend, logits.device)
    targets = targets.long()
    _check_target_range(targets, logits.shape[-1], ignore_index, shift)
    out_shape = tuple(targets.shape)
    if shift:
        pad = targets.new_full((targets.shape[0], 1), ignore_index)
        # the last position predicts nothing; [:, :T] keeps T = 0 at no rows (the pad would make one)
        targets = torch.cat([targets[:, 1:], pad], dim=1)[:, : out_shape[1]]
    rows_t = targets.reshape(-1).contiguous()
    x = _as_rows(logits)
    xc = None if corrupted_logits is None else _as_rows(corrupted_logits)
    if backend == "reference":
        outs = list(reference_logits_logprobs(x, rows_t, ignore_index, xc))
    else:
        params = _Params(backend=backend, ignore_index=ignore_index, inplace_backward=inplace_backward)
        outs = list(_LogitsFunction.apply(x, xc, rows_t, params))[:5]
        if xc is None:
            outs[3] = outs[4] = None

    def shape(o):
        if o is None:
            return None
        o = o.reshape(out_shape)
        return o[:, :-1] if shift else o

    return LogitsLogprobs(*(shape(o) for o in outs))
