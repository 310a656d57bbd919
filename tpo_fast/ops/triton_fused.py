"""Launchers of the fused-gradient pair losses' Triton path (`fused_chunk.TritonChunk` calls these).

Per chunk of rows: the GEMM-shaped forward kernel stores each logits tile's `exp(z - tile max)` in the
weight's dtype while it reduces their logsumexp partials (one write of the buffer; for a bf16 model half
the bytes of fp32 logits) and takes the target logits from the tiles that hold them;
`softmax_grad_inplace_kernel` turns the buffer into dZ in place (one read, one write); cuBLAS runs
`dH = dZ W` and `dW += dZ^T H` (torch.mm; on the CPU its own GEMM), or with
`KernelOptions.grad_gemm = "triton"` (TPO_FAST_GRAD_GEMM=triton) `matmul_kernel` with the vocabulary
kernels' tiles, so that the two can be measured against each other.

Where a 16-bit weight gradient also takes the corrupted rows, the dZ pass writes 0 at each row's target
(`split_target`); `triton_impl.target_entries` forms those entries in fp32 from the forward's target logits and
`scatter_dw` adds them to dW with the corrupted rows, in one fp32 sum per weight row (fused_chunk.py says why).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from tpo_fast.kernels.matmul import matmul_kernel
from tpo_fast.kernels.scale import scale_kernel
from tpo_fast.kernels.softmax_grad_inplace import softmax_grad_inplace_kernel
from tpo_fast.kernels.token_stats_fwd import token_lse_partial_kernel
from tpo_fast.ops import gemm, triton_impl
from tpo_fast.ops.options import current_options
from tpo_fast.ops.triton_impl import _device_guard, _dot_precision, _tma_descriptors, interpreter_enabled, tile_config


class StoredChunk(NamedTuple):
    """What the forward keeps of one chunk of rows for its gradient (`exp_tiles_and_lse`)."""

    exp: torch.Tensor  # [R, V] exp(z - tile shift) in the weight's dtype, later overwritten with dZ
    tile_max: torch.Tensor  # [R, S] fp32, S = cdiv(V, tile_v)
    tile_v: int  # the forward's vocabulary tile
    lse: torch.Tensor  # [R] fp32
    z: torch.Tensor  # [R] fp32 raw target logits z[y]
    z2: torch.Tensor | None  # [R] fp32 z[y2] (0 where y2 < 0), or None without second targets


def exp_tiles_and_lse(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, y2: torch.Tensor | None = None
) -> StoredChunk:
    """One pass of the forward kernel over the chunk's rows: their logsumexp and target logits, and per vocabulary
    tile `exp(z - shift)` in the weight's dtype (half the bytes of fp32 logits for a 16-bit model), from which
    `softmax_grad_inplace` forms the gradient. y: [R] int64 targets in range; y2: [R] int64 or -1 (none).
    The losses take this path for fp32 and bf16 weights (fp16 recomputes its gradient in backward, and an fp16
    buffer would lose entries below 2**-24 before their scaling)."""
    (r, d), v = h.shape, weight.shape[0]
    f32 = dict(dtype=torch.float32, device=h.device)
    cfg = tile_config(max(r, 1), v, d, h.dtype)
    n_tiles = triton.cdiv(v, cfg.block_v)
    exp = torch.empty((r, v), dtype=weight.dtype, device=h.device)
    m_part = torch.empty((r, n_tiles), **f32)
    z = torch.empty(r, **f32)
    z2 = None if y2 is None else torch.zeros(r, **f32)  # rows without a second target keep 0
    if r == 0:
        return StoredChunk(exp, m_part, cfg.block_v, torch.empty(0, **f32), z, z2)
    s_part = torch.empty((r, n_tiles), **f32)
    h_desc, w_desc, use_tma = _tma_descriptors(h, weight, cfg)
    with _device_guard(h):
        token_lse_partial_kernel[(triton.cdiv(r, cfg.block_n) * n_tiles,)](
            h, weight, bias if bias is not None else h, h_desc, w_desc, m_part, s_part, m_part,
            r, v, d, n_tiles,
            HAS_BIAS=bias is not None, WANT_ARGMAX=False,
            DOT_PRECISION=_dot_precision(h.dtype), INTERPRET=interpreter_enabled(), USE_TMA=use_tma,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
            P_OUT=exp, Y=y, ZY=z, Y2=y2 if y2 is not None else y, ZY2=z2 if z2 is not None else z,
            STORE_EXP=True, GATHER=1 if y2 is None else 2,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    lse, _ = triton_impl.combine_lse_partials(m_part, s_part, None)
    return StoredChunk(exp, m_part, cfg.block_v, lse, z, z2)


def softmax_grad_launch(tile_v: int) -> tuple[int, int]:
    """(rows per program, warps) of `softmax_grad_inplace_kernel` on a GPU: rows x one forward tile per step,
    8 entries a thread (16-byte accesses in bf16). Compiled for sm_90 with the default 256-wide tiles: 4 rows,
    4 warps, 39 registers (16 rows and 8 warps took 204: one block per SM for a memory-bound kernel)."""
    block_n = max(1, min(16, 1024 // tile_v))
    return block_n, max(1, min(8, block_n * tile_v // 256))


def softmax_grad_inplace(
    stored: StoredChunk,
    coef_p: torch.Tensor,
    y: torch.Tensor,
    coef_y: torch.Tensor,
    y2: torch.Tensor | None,
    coef_y2: torch.Tensor | None,
    split_target: bool = False,
) -> torch.Tensor:
    """dZ [R, V] = coef_p * softmax + coef_y * onehot(y) [+ coef_y2 * onehot(y2)] in the stored buffer's dtype,
    written over `stored.exp` (which it returns). With `split_target` each row's target entry is 0 there instead
    (`triton_impl.target_entries` of the stored target logits gives it)."""
    buf = stored.exp
    r, v = buf.shape
    if r > 0:
        interp = interpreter_enabled()
        tile_v = stored.tile_v
        block_n, warps = (16, 4) if interp else softmax_grad_launch(tile_v)
        with _device_guard(buf):
            softmax_grad_inplace_kernel[(triton.cdiv(r, block_n),)](
                buf, stored.tile_max, stored.lse, coef_p, y, coef_y,
                y2 if y2 is not None else y, coef_y2 if coef_y2 is not None else coef_y,
                r, v, stored.tile_max.shape[1],
                HAS_Y2=y2 is not None, SPLIT_TARGET=split_target, BLOCK_N=block_n, TILE_V=tile_v,
                INTERPRET=interp, num_warps=warps,
            )
    return buf


def triton_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """`out = a @ b` (or `out += a @ b`) with `matmul_kernel`: fp32 products summed on chip, one rounding
    into out's dtype. a, b: 2-D, any strides, one dtype; out: (M, N) fp32 or that dtype."""
    (m, k), n = a.shape, b.shape[1]
    if b.shape[0] != k or out.shape != (m, n) or a.dtype != b.dtype:
        raise ValueError(f"triton_mm: {tuple(a.shape)} {a.dtype} @ {tuple(b.shape)} {b.dtype} into "
                         f"{tuple(out.shape)}")
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out if accumulate else out.zero_()
    cfg = tile_config(m, n, k, a.dtype)  # the vocabulary kernels' tiles: rows x columns, inner block
    with _device_guard(out):
        matmul_kernel[(triton.cdiv(m, cfg.block_n) * triton.cdiv(n, cfg.block_v),)](
            a, b, out, m, n, k, *a.stride(), *b.stride(), *out.stride(),
            ACCUMULATE=accumulate, DOT_PRECISION=_dot_precision(a.dtype), INTERPRET=interpreter_enabled(),
            BLOCK_M=cfg.block_n, BLOCK_N=cfg.block_v, BLOCK_K=cfg.block_d, GROUP_M=cfg.group_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out


def mm_f32(dz: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 `dz @ weight` (fp32 accumulation, one rounding for 16-bit operands), into `out` when given."""
    if current_options().grad_gemm != "triton":
        return gemm.mm_f32(dz, weight, out)
    if out is None:
        out = torch.empty((dz.shape[0], weight.shape[1]), dtype=torch.float32, device=dz.device)
    return triton_mm(dz, weight, out)


def accumulate_dw(gw: torch.Tensor | None, dz: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`gw + dz^T h` in the weight's dtype: fp32 products, one rounding per chunk (None: the first chunk)."""
    if current_options().grad_gemm == "triton":
        if gw is None:
            return triton_mm(dz.t(), h, torch.empty(weight.shape, dtype=weight.dtype, device=weight.device))
        return triton_mm(dz.t(), h, gw, accumulate=True)
    if gw is None:
        gw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        gemm.mm_into(dz.t(), h, out=gw)
    elif gw.dtype == torch.float32:
        gemm.addmm_f32_(gw, dz.t(), h)
    elif gw.is_cuda:
        gw.addmm_(dz.t(), h)  # cuBLAS: fp32 accumulation of the products and of the old value
    else:
        gw.copy_(torch.addmm(gw.float(), dz.t().float(), h.float()))
    return gw


def scatter_dw(
    gw: torch.Tensor | None,
    y: torch.Tensor,
    g: torch.Tensor,
    hc: torch.Tensor,
    weight: torch.Tensor,
    clean: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`gw[y[i]] += g[i] * hc[i]` (the corrupted rows' rank-1 weight gradient) `[+ tgt[i] * h[i]]` for
    `clean = (tgt, h)`, the clean rows' target terms on the same targets: fp32 sums, one rounding per row."""
    if gw is None:
        gw = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    if clean is None:
        triton_impl._scatter_rows_(gw, y, g, hc)
    else:
        triton_impl._scatter_rows_(gw, y, clean[0], clean[1], (g, hc))
    return gw


def scale_(g: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """`g *= factor` in place for a contiguous 16-bit `g` and an fp32 0-d `factor` on its device: the product in
    fp32, one rounding (`kernels/scale.py`); no host sync."""
    if g.dtype not in (torch.bfloat16, torch.float16) or not g.is_contiguous():
        raise ValueError(f"scale_ takes a contiguous 16-bit tensor, got {g.dtype} (contiguous={g.is_contiguous()})")
    n = g.numel()
    if n:
        s = factor.detach().to(device=g.device, dtype=torch.float32).reshape(1)
        block = 1024 if interpreter_enabled() else 4096
        with _device_guard(g):
            scale_kernel[(triton.cdiv(n, block),)](g, s, n, INTERPRET=interpreter_enabled(), BLOCK=block, num_warps=8)
    return g
