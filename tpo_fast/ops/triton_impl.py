"""The `triton` backend: launchers for the kernels in `tpo_fast.kernels`.

Same contract as `torch_chunked.py`: rows are compacted (every target valid) and contiguous;
outputs are fp32; gradients come back as fp32 buffers the autograd function casts. No N x V
tensor is ever allocated here.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton

from tpo_fast.kernels.indexed_dot import indexed_dot_bwd_kernel, indexed_dot_fwd_kernel
from tpo_fast.kernels.token_stats_bwd import token_stats_bwd_kernel
from tpo_fast.kernels.token_stats_fwd import token_stats_fwd_kernel


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int = 8
    num_stages: int = 3


def _p2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def tile_config(n: int, v: int, d: int) -> TileConfig:
    """Fixed default tiles. The interpreter runs one Python step per tile, so there tiles are large."""
    if interpreter_enabled():
        return TileConfig(_p2(n, 16, 64), _p2(v, 16, 512), _p2(d, 16, 128))
    return TileConfig(_p2(n, 16, 64), _p2(v, 16, 128), _p2(d, 16, 64))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products unless the user opts into TF32 (about 1e-3 relative error).
    if dtype == torch.float32 and os.environ.get("TPO_FAST_ALLOW_TF32", "0") in ("", "0"):
        return "ieee"
    return "tf32"


def grad_filter_eps() -> float:
    """Gradient filtering threshold from TPO_FAST_GRAD_FILTER_EPS (unset or 0: exact, the default).

    With eps > 0 the backward skips every (row block, vocabulary tile) whose softmax gradient is
    below eps in magnitude everywhere: the two gradient GEMMs of such a tile are dropped, which is
    most tiles of a peaked softmax. The dropped mass per tile is below eps times its size, so the
    gradient is no longer exact; the forward values and the loss are unaffected.
    """
    raw = os.environ.get("TPO_FAST_GRAD_FILTER_EPS", "")
    try:
        eps = float(raw) if raw else 0.0
    except ValueError:
        raise ValueError(f"TPO_FAST_GRAD_FILTER_EPS must be a number >= 0, got {raw!r}") from None
    if not eps >= 0.0:
        raise ValueError(f"TPO_FAST_GRAD_FILTER_EPS must be a number >= 0, got {raw!r}")
    return eps


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    corrupted_hidden: torch.Tensor | None,
    targets: torch.Tensor,
    want_argmax: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Return (lse, target_logit, corrupted_target_logit | None, argmax | None) for compacted rows."""
    (n, d), v = hidden.shape, weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lse, z = torch.empty(n, **f32), torch.empty(n, **f32)
    zc = torch.empty(n, **f32) if corrupted_hidden is not None else None
    argmax = torch.empty(n, dtype=torch.int64, device=hidden.device) if want_argmax else None
    if n == 0:
        return lse, z, zc, argmax
    cfg = tile_config(n, v, d)
    with _device_guard(hidden):
        token_stats_fwd_kernel[(triton.cdiv(n, cfg.block_n),)](
            hidden, weight, bias if bias is not None else hidden,
            corrupted_hidden if corrupted_hidden is not None else hidden, targets,
            lse, z, zc if zc is not None else z, argmax if argmax is not None else targets,
            n, v, d,
            HAS_BIAS=bias is not None,
            HAS_CORRUPTED=corrupted_hidden is not None,
            WANT_ARGMAX=want_argmax,
            DOT_PRECISION=_dot_precision(hidden.dtype), INTERPRET=interpreter_enabled(),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return lse, z, zc, argmax


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    corrupted_hidden: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    coef_p: torch.Tensor | None,
    coef_y: torch.Tensor | None,
    g_zc: torch.Tensor | None,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """fp32 gradients for (hidden, weight, bias, corrupted_hidden); see `torch_chunked.backward`."""
    need_h, need_w, need_b, need_hc = needs
    (n, d), v = hidden.shape, weight.shape[0]
    dev = hidden.device
    gh = torch.zeros((n, d), dtype=torch.float32, device=dev) if need_h else None
    gw = torch.zeros((v, d), dtype=torch.float32, device=dev) if need_w else None
    gb = torch.zeros(v, dtype=torch.float32, device=dev) if need_b else None
    has_second = g_zc is not None and corrupted_hidden is not None
    ghc = torch.empty((n, d), dtype=torch.float32, device=dev) if (need_hc and has_second) else None
    if n == 0:
        return gh, gw, gb, ghc
    cfg = tile_config(n, v, d)
    dummy = lse
    eps = grad_filter_eps()
    with _device_guard(hidden):
        if coef_p is not None and (need_h or need_w or need_b):
            grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(v, cfg.block_v))
            token_stats_bwd_kernel[grid](
                hidden, weight, bias if bias is not None else dummy, lse, coef_p,
                gh if gh is not None else dummy, gw if gw is not None else dummy, gb if gb is not None else dummy,
                n, v, d, eps,
                HAS_BIAS=bias is not None, NEED_H=need_h, NEED_W=need_w, NEED_B=need_b, FILTER=eps > 0,
                DOT_PRECISION=_dot_precision(hidden.dtype), INTERPRET=interpreter_enabled(),
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        if coef_y is not None or has_second:
            _launch_indexed_bwd(
                hidden, corrupted_hidden if has_second else None, weight, targets,
                coef_y if coef_y is not None else torch.zeros(n, dtype=torch.float32, device=dev),
                g_zc if has_second else None,
                gh, ghc, gw, gb, accum_h=True,
            )
    return gh, gw, gb, ghc


def _launch_indexed_bwd(hidden, second_hidden, weight, targets, g, g_second, gh, ghc, gw, gb, accum_h):
    n, d = hidden.shape
    block_n, block_d = _p2(n, 16, 64), _p2(d, 16, 128 if interpreter_enabled() else 64)
    dummy = g
    indexed_dot_bwd_kernel[(triton.cdiv(n, block_n),)](
        hidden, second_hidden if second_hidden is not None else hidden, weight, targets,
        g, g_second if g_second is not None else g,
        gh if gh is not None else dummy, ghc if ghc is not None else dummy,
        gw if gw is not None else dummy, gb if gb is not None else dummy,
        n, d,
        HAS_SECOND=second_hidden is not None, ACCUM_H=accum_h,
        NEED_H=gh is not None, NEED_HC=ghc is not None, NEED_W=gw is not None, NEED_B=gb is not None,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )


def gather_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """fp32 `hidden[i] . weight[targets[i]] (+ bias[targets[i]])` for compacted rows."""
    n, d = hidden.shape
    z = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return z
    block_n, block_d = _p2(n, 16, 64), _p2(d, 16, 128 if interpreter_enabled() else 64)
    with _device_guard(hidden):
        indexed_dot_fwd_kernel[(triton.cdiv(n, block_n),)](
            hidden, weight, bias if bias is not None else z, targets, z, n, d,
            HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
        )
    return z


def gather_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    g: torch.Tensor,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Rank-1 backward of `gather_logits`: fp32 gradients for (hidden, weight, bias)."""
    need_h, need_w, need_b = needs
    (n, d), v = hidden.shape, weight.shape[0]
    dev = hidden.device
    gh = torch.empty((n, d), dtype=torch.float32, device=dev) if need_h else None
    gw = torch.zeros((v, d), dtype=torch.float32, device=dev) if need_w else None
    gb = torch.zeros(v, dtype=torch.float32, device=dev) if need_b else None
    if n > 0:
        with _device_guard(hidden):
            _launch_indexed_bwd(hidden, None, weight, targets, g, None, gh, None, gw, gb, accum_h=False)
    return gh, gw, gb
