"""The `triton` backend: launchers for the kernels in `tpo_fast.kernels`.

Same contract as `torch_chunked.py`: rows are compacted (every target valid) and contiguous;
outputs are fp32; gradients come back as fp32 buffers the autograd function casts. No N x V
tensor is ever allocated here: the forward writes per-tile partials (N x V/BLOCK_V), the exact
backward one N x chunk gradient buffer (`KernelOptions.chunk_mb`), the filtering backward nothing.

Kernel behaviour (tiles, TMA, chunk budget, TF32, backward mode, gradient filtering) comes from a
`KernelOptions` (tpo_fast/ops/options.py): `forward`/`backward` take one, else use `current_options()`.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import triton

from tpo_fast.kernels.indexed_dot import indexed_dot_bwd_kernel, indexed_dot_fwd_kernel
from tpo_fast.kernels.scatter_rows import scatter_rows_kernel
from tpo_fast.kernels.softmax_grad import softmax_grad_kernel
from tpo_fast.kernels.token_stats_bwd import token_stats_bwd_kernel
from tpo_fast.kernels.token_stats_fwd import lse_combine_kernel, token_lse_partial_kernel
from tpo_fast.ops import gemm
from tpo_fast.ops.options import SPLIT_CHUNK_MB, KernelOptions, current_options, interpreter_enabled


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int = 8
    num_stages: int = 3
    group_n: int = 8


def _p2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


# GEMM-shaped kernels (forward partials, softmax gradient) on a GPU, by input dtype. fp32 inputs take
# exact fp32 products (no tensor cores), so their tiles are smaller.
# bf16/fp16: the fastest of bench/gpu_tune.py's sweep on an H200 at N=8192, D=4096, V=32000, with TMA
# loads (2026-11-26; bench/TUNING.md has the table).
_GPU_TILES = {
    torch.bfloat16: TileConfig(128, 256, 64, num_warps=8, num_stages=3),
    torch.float16: TileConfig(128, 256, 64, num_warps=8, num_stages=3),
    torch.float32: TileConfig(64, 64, 32, num_warps=4, num_stages=3),
}
# The fused atomic backward (gradient filtering) holds a logits tile and two GEMM operands at once.
_GPU_ATOMIC_TILES = TileConfig(64, 128, 64, num_warps=8, num_stages=3)
# Rows of a run of equal targets that `scatter_rows_kernel` loads per step (a [4, 1024] tile over 128 threads:
# four independent row loads in flight, few enough registers that the grid's many empty programs still pack the SMs).
_SCATTER_ROWS = 4


def tile_config(
    n: int, v: int, d: int, dtype: torch.dtype = torch.bfloat16, atomic: bool = False,
    options: KernelOptions | None = None,
) -> TileConfig:
    """Tiles of the vocabulary kernels: `options.tiles` (TPO_FAST_TILES) or the tuned defaults, never wider
    than the problem. The interpreter runs one Python step per tile, so there the default tiles are large;
    tiles set explicitly hold there too (16-wide ones put a small test vocabulary in several tiles, as a
    GPU's 256-wide ones do V=32000). The atomic kernel's are fixed."""
    tiles = (options or current_options()).tiles
    if interpreter_enabled() and (atomic or not tiles):  # the interpreter's own, unless tiles were set
        return TileConfig(_p2(n, 16, 64), _p2(v, 16, 512), _p2(d, 16, 128), group_n=4)
    if atomic:
        base = _GPU_ATOMIC_TILES
    else:
        base = TileConfig(*tiles) if tiles else _GPU_TILES.get(dtype, _GPU_TILES[torch.float32])
    # never wider than the problem (a 16-row batch gets 16-row tiles)
    return TileConfig(
        _p2(n, 16, base.block_n), _p2(v, 16, base.block_v), _p2(d, 16, base.block_d),
        base.num_warps, base.num_stages, base.group_n,
    )


def _dot_precision(dtype: torch.dtype, options: KernelOptions | None = None) -> str:
    # fp32 inputs get exact fp32 products unless the user opts into TF32 (about 1e-3 relative error).
    if dtype == torch.float32 and not (options or current_options()).allow_tf32:
        return "ieee"
    return "tf32"


def chunk_bytes(options: KernelOptions | None = None) -> int:
    """Budget of the split backward's gradient chunk buffer, `options.chunk_mb` (TPO_FAST_CHUNK_MB; unset:
    `SPLIT_CHUNK_MB`, 256 MiB)."""
    return (options or current_options()).chunk_bytes(SPLIT_CHUNK_MB)


def _tma_descriptors(hidden: torch.Tensor, weight: torch.Tensor, cfg: TileConfig, options: KernelOptions | None = None):
    """(H descriptor, W descriptor, True) when the GEMM-shaped kernels load through the bulk tensor copy
    engine (TMA: Hopper and newer), else (hidden, weight, False). `options.tma` (TPO_FAST_TMA): `auto`
    (default: on where the GPU has it and the rows are 16-byte aligned), `0` (never), `1` (also under the
    interpreter; an input it cannot describe falls back to plain loads)."""
    setting = (options or current_options()).tma
    if setting == "0":
        return hidden, weight, False
    if interpreter_enabled():
        usable = setting == "1"
    else:
        usable = hidden.is_cuda and torch.cuda.get_device_capability(hidden.device)[0] >= 9
    d = hidden.shape[1]
    aligned = all(
        t.stride(1) == 1 and t.stride(0) == d and t.data_ptr() % 16 == 0 and (d * t.element_size()) % 16 == 0
        for t in (hidden, weight)
    )
    if not (usable and aligned):
        return hidden, weight, False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # a Triton without host-side descriptors
        return hidden, weight, False
    return (
        TensorDescriptor.from_tensor(hidden, [cfg.block_n, cfg.block_d]),
        TensorDescriptor.from_tensor(weight, [cfg.block_v, cfg.block_d]),
        True,
    )


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def combine_lse_partials(
    m_part: torch.Tensor, s_part: torch.Tensor, arg_part: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row: logsumexp from per-tile (max, sum of exp(z - max)) (`lse_combine_kernel`, one launch), and the
    first index of the max."""
    n, n_tiles = m_part.shape
    lse = torch.empty(n, dtype=torch.float32, device=m_part.device)
    if n:
        block_s = min(triton.next_power_of_2(max(n_tiles, 1)), 128)
        with _device_guard(m_part):
            lse_combine_kernel[(triton.cdiv(n, 16),)](
                m_part.contiguous(), s_part.contiguous(), lse, n, n_tiles, BLOCK_N=16, BLOCK_S=block_s, num_warps=4,
            )
    argmax = None
    if arg_part is not None:
        argmax = arg_part.gather(1, m_part.argmax(dim=1, keepdim=True)).squeeze(1).to(torch.int64)
    return lse, argmax


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    corrupted_hidden: torch.Tensor | None,
    targets: torch.Tensor,
    want_argmax: bool,
    options: KernelOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Return (lse, target_logit, corrupted_target_logit | None, argmax | None) for compacted rows.

    `options`: the kernel options (default: `current_options()`, read once per call)."""
    (n, d), v = hidden.shape, weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    if n == 0:
        lse = torch.empty(0, **f32)
        argmax = torch.empty(0, dtype=torch.int64, device=hidden.device) if want_argmax else None
        zc = torch.empty(0, **f32) if corrupted_hidden is not None else None
        return lse, torch.empty(0, **f32), zc, argmax
    opts = options or current_options()
    cfg = tile_config(n, v, d, hidden.dtype, options=opts)
    n_tiles = triton.cdiv(v, cfg.block_v)
    m_part = torch.empty((n, n_tiles), **f32)
    s_part = torch.empty((n, n_tiles), **f32)
    arg_part = torch.empty((n, n_tiles), dtype=torch.int32, device=hidden.device) if want_argmax else None
    z = torch.empty(n, **f32)  # the target logits, taken by the sweep from the tile that holds each one
    h_desc, w_desc, use_tma = _tma_descriptors(hidden, weight, cfg, opts)
    with _device_guard(hidden):
        token_lse_partial_kernel[(triton.cdiv(n, cfg.block_n) * n_tiles,)](
            hidden, weight, bias if bias is not None else hidden, h_desc, w_desc,
            m_part, s_part, arg_part if arg_part is not None else m_part,
            n, v, d, n_tiles,
            HAS_BIAS=bias is not None, WANT_ARGMAX=want_argmax,
            DOT_PRECISION=_dot_precision(hidden.dtype, opts), INTERPRET=interpreter_enabled(), USE_TMA=use_tma,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
            Y=targets, ZY=z, GATHER=1,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    lse, argmax = combine_lse_partials(m_part, s_part, arg_part)
    zc = gather_logits(corrupted_hidden, weight, bias, targets) if corrupted_hidden is not None else None
    return lse, z, zc, argmax


def _split_backward(
    hidden, weight, bias, targets, lse, coef_p, coef_y, gh, gw, gb, opts: KernelOptions, split_target: bool = False
) -> None:
    """The clean rows' gradient, chunk by chunk over the vocabulary: a Triton kernel writes the chunk's
    `dZ = coef_p * softmax + coef_y * onehot` (input dtype, one rounding of an fp32 value), then
    `dW[chunk] = dZ.T @ H` (straight into `gw`, in its dtype) and `dH += dZ @ W[chunk]` (fp32) run as
    dense GEMMs (cuBLAS on a GPU). Deterministic; memory is one chunk buffer of at most `opts.chunk_mb`.
    `split_target`: each row's target entry is 0 in dZ and in the bias gradient (the caller adds it, rank-1)."""
    (n, d), v = hidden.shape, weight.shape[0]
    cfg = tile_config(n, v, d, hidden.dtype, options=opts)
    elem = hidden.element_size()
    vc = (chunk_bytes(opts) // max(1, n * elem)) // cfg.block_v * cfg.block_v
    vc = min(max(vc, cfg.block_v), triton.cdiv(v, cfg.block_v) * cfg.block_v)
    dz = torch.empty((n, vc), dtype=hidden.dtype, device=hidden.device)
    n_row_blocks = triton.cdiv(n, cfg.block_n)
    gb_part = torch.empty((n_row_blocks, v), dtype=torch.float32, device=hidden.device) if gb is not None else None
    h_desc, w_desc, use_tma = _tma_descriptors(hidden, weight, cfg, opts)
    for v0 in range(0, v, vc):
        width = min(vc, v - v0)
        with _device_guard(hidden):
            softmax_grad_kernel[(n_row_blocks * triton.cdiv(width, cfg.block_v),)](
                hidden, weight, bias if bias is not None else lse, lse, coef_p, targets,
                coef_y if coef_y is not None else lse, h_desc, w_desc,
                dz, gb_part if gb_part is not None else lse,
                n, v, d, v0, width, dz.stride(0),
                HAS_BIAS=bias is not None, HAS_ONEHOT=coef_y is not None, NEED_B=gb is not None,
                SPLIT_TARGET=split_target,
                DOT_PRECISION=_dot_precision(hidden.dtype, opts), INTERPRET=interpreter_enabled(), USE_TMA=use_tma,
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_N=cfg.group_n,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        chunk = dz[:, :width]
        if gw is not None:
            gemm.mm_into(chunk.t(), hidden, out=gw[v0:v0 + width])
        if gh is not None:
            if v0 == 0:
                gemm.mm_f32(chunk, weight[:width], out=gh)
            else:
                gemm.addmm_f32_(gh, chunk, weight[v0:v0 + width])
    if gb is not None:
        gb.copy_(gb_part.sum(dim=0))


def target_entries(
    z: torch.Tensor, lse: torch.Tensor, coef_p: torch.Tensor, coef_y: torch.Tensor | None
) -> torch.Tensor:
    """[R] fp32 dZ[y], the target entries a `SPLIT_TARGET` gradient kernel leaves out, from the forward's fp32 target
    logits `z` and logsumexp: coef_p * exp(z - lse) (+ coef_y, every one-hot term on y)."""
    tgt = torch.exp(z - lse).mul_(coef_p)
    return tgt if coef_y is None else tgt.add_(coef_y)


def _scatter_rows_(
    gw: torch.Tensor,
    targets: torch.Tensor,
    g: torch.Tensor,
    x: torch.Tensor,
    second: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """gw[targets[i]] += g[i] * x[i] (+ g2[i] * x2[i] for `second = (g2, x2)`, rows on the same targets), summed
    in fp32 and rounded once into gw's dtype.

    An fp32 gw takes `index_add_`. A 16-bit gw takes `scatter_rows_kernel` (`kernels/scatter_rows.py`): the
    rows sorted by target, one program per run of equal targets and block of columns, reading the run
    `_SCATTER_ROWS` rows at a time, its fp32 sum added to the weight row once. Without a host sync:
    `torch.unique` would read its output size back from the GPU (once per fused-loss chunk); the runs are
    found by `searchsorted` on the sorted targets instead. With `second`, the clean rows' target terms and the
    corrupted rows', which nearly cancel, meet in that fp32 sum.
    """
    if gw.dtype == torch.float32:
        gw.index_add_(0, targets, g[:, None] * x.float())
        if second is not None:
            gw.index_add_(0, targets, second[0][:, None] * second[1].float())
        return
    r, d = x.shape
    if r == 0 or d == 0:
        return
    x2 = None
    if second is not None:
        g = torch.cat((g.float(), second[0].float()))
        targets = torch.cat((targets, targets))
        x2 = second[1].contiguous() if second[1].stride(1) != 1 else second[1]
    ids, order = targets.sort(stable=True)  # equal ids form one run, summed in row order: deterministic
    first = torch.searchsorted(ids, ids)  # each sorted position's run: [first, stop)
    stop = torch.searchsorted(ids, ids, right=True)
    x = x.contiguous() if x.stride(1) != 1 else x
    block_d = min(triton.next_power_of_2(d), 1024)
    with _device_guard(gw):
        scatter_rows_kernel[(ids.shape[0], triton.cdiv(d, block_d))](
            gw, ids, order, first, stop, g.float().contiguous(), x, x2 if x2 is not None else x,
            r, d, gw.stride(0), x.stride(0), x2.stride(0) if x2 is not None else x.stride(0),
            HAS_X2=x2 is not None, INTERPRET=interpreter_enabled(), BLOCK_R=_SCATTER_ROWS, BLOCK_D=block_d,
            num_warps=4,
        )


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
    options: KernelOptions | None = None,
    target_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients for (hidden, weight, bias, corrupted_hidden); see `torch_chunked.backward`.

    `target_logits`: the forward's fp32 `z[y]`, from which a 16-bit weight gradient that also takes the corrupted
    rows forms each row's target entry (gathered again when None).

    fp32 buffers the autograd function casts, except the weight gradient of the split backward,
    which its GEMMs write in the weight's own dtype (one rounding; no V x D fp32 buffer).

    `options.backward` picks the split or the fused atomic backward; `options.grad_filter_eps` > 0
    (gradient filtering, opt-in) runs the atomic kernel and skips every (row block, vocabulary tile)
    whose softmax gradient is below eps everywhere: most tiles of a peaked softmax (each row's target entry, which
    the rank-1 pass adds with the one-hot term so that `p_y - 1` never cancels, is dropped alone where below eps).
    The dropped mass per tile is below eps times its size, so the gradient is no longer exact; forward values and
    the loss are unaffected."""
    need_h, need_w, need_b, need_hc = needs
    (n, d), v = hidden.shape, weight.shape[0]
    dev = hidden.device
    opts = options or current_options()
    eps = opts.grad_filter_eps
    softmax_part = coef_p is not None and (need_h or need_w or need_b) and n > 0
    fused = softmax_part and (eps > 0 or opts.backward == "atomic")
    split = softmax_part and not fused
    has_second = g_zc is not None and corrupted_hidden is not None
    if split:  # every entry of gh and gw is written by the GEMMs
        gh = torch.empty((n, d), dtype=torch.float32, device=dev) if need_h else None
        gw = torch.empty((v, d), dtype=weight.dtype, device=dev) if need_w else None
    else:
        gh = torch.zeros((n, d), dtype=torch.float32, device=dev) if need_h else None
        gw = torch.zeros((v, d), dtype=torch.float32, device=dev) if need_w else None
    gb = torch.zeros(v, dtype=torch.float32, device=dev) if need_b else None
    ghc = torch.empty((n, d), dtype=torch.float32, device=dev) if (need_hc and has_second) else None
    if n == 0:
        return gh, gw, gb, ghc
    with _device_guard(hidden):
        if split:
            # A 16-bit dW that also takes the corrupted rows: each row's target entry leaves the GEMMs and joins
            # them, in fp32, in one sum per weight row (`_scatter_rows_`), as they nearly cancel; added after the
            # GEMM's rounding instead, the rows kept the rounding error of the larger term.
            split_target = has_second and gw is not None and gw.dtype != torch.float32
            _split_backward(hidden, weight, bias, targets, lse, coef_p, coef_y, gh, gw, gb, opts, split_target)
            if split_target:
                z = target_logits if target_logits is not None else gather_logits(hidden, weight, bias, targets)
                tgt = target_entries(z, lse, coef_p, coef_y)
                if gh is not None or ghc is not None:  # gh += tgt W[y], ghc = g_zc W[y]: one gather of W[y]
                    _launch_indexed_bwd(hidden, corrupted_hidden, weight, targets, tgt, g_zc, gh, ghc, None, None,
                                        accum_h=True)
                _scatter_rows_(gw, targets, tgt, hidden, (g_zc, corrupted_hidden))
                if gb is not None:
                    gb.index_add_(0, targets, tgt)
            elif has_second:  # the corrupted rows' logit gradient is g_zc * onehot(y): rank-1 per row
                if ghc is not None:
                    torch.mul(g_zc[:, None], weight[targets].float(), out=ghc)
                if gw is not None:
                    _scatter_rows_(gw, targets, g_zc, corrupted_hidden)
            if has_second and gb is not None:
                gb.index_add_(0, targets, g_zc)
            return gh, gw, gb, ghc
        if fused:
            _refuse_nondeterministic(
                f"the atomic backward (backward={opts.backward!r}, grad_filter_eps={eps})",
                "use backward='split' (the default) with grad_filter_eps=0, which is deterministic")
            cfg = tile_config(n, v, d, hidden.dtype, atomic=True, options=opts)
            dummy = lse
            grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(v, cfg.block_v))
            # each row's target entry coef_p * p_y, in fp32, which the kernel leaves to the rank-1 pass below
            target_part = torch.empty(n, dtype=torch.float32, device=dev)
            token_stats_bwd_kernel[grid](
                hidden, weight, bias if bias is not None else dummy, lse, coef_p, targets,
                gh if gh is not None else dummy, gw if gw is not None else dummy,
                gb if gb is not None else dummy, target_part,
                n, v, d, eps,
                HAS_BIAS=bias is not None, NEED_H=need_h, NEED_W=need_w, NEED_B=need_b, FILTER=eps > 0,
                DOT_PRECISION=_dot_precision(hidden.dtype, opts), INTERPRET=interpreter_enabled(),
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            if eps > 0:  # filtered as every other entry: dropped where below eps
                target_part = torch.where(target_part.abs() < eps, 0.0, target_part)
            coef_y = target_part if coef_y is None else target_part.add_(coef_y)
        if coef_y is not None or has_second:
            _launch_indexed_bwd(
                hidden, corrupted_hidden if has_second else None, weight, targets,
                coef_y if coef_y is not None else torch.zeros(n, dtype=torch.float32, device=dev),
                g_zc if has_second else None,
                gh, ghc, gw, gb, accum_h=True,
            )
    return gh, gw, gb, ghc


def _indexed_tiles(n: int, d: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D) of the gather kernels (`kernels/indexed_dot.py`). On a GPU 4 rows per program, D in
    256-wide steps: a memory-bound row gather needs many programs (at 64 rows a program, the first H200
    profile had 25 programs for a 1575-row chunk, 129 us where its 26 MB take about 6 us); the interpreter
    runs one Python step per tile, so there tiles are large."""
    if interpreter_enabled():
        return _p2(n, 16, 64), _p2(d, 16, 128)
    return 4, _p2(d, 16, 256)


def _refuse_nondeterministic(what: str, instead: str) -> None:
    """PyTorch's rule for an operation with no deterministic implementation: under
    `torch.use_deterministic_algorithms(True)` a RuntimeError naming it, with `warn_only=True` a warning."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (f"tpo_fast: {what} sums with atomic adds, whose order (and so whose fp32 rounding) changes from "
               f"run to run, and torch.use_deterministic_algorithms(True) is set; {instead}")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)


def _launch_indexed_bwd(hidden, second_hidden, weight, targets, g, g_second, gh, ghc, gw, gb, accum_h):
    """The gathered logits' rank-1 backward: `gh (+)= g W[y]`, `ghc = g2 W[y]`, `gw[y] += g h (+ g2 h2)`, `gb[y] +=
    g (+ g2)`. The kernel adds the rows of `gw` and `gb` with atomics (rows sharing a target); under
    `torch.use_deterministic_algorithms(True)` they go through `index_add_` instead (fp32 `gw`, `gb`: deterministic
    on CUDA in that mode)."""
    if (gw is not None or gb is not None) and torch.are_deterministic_algorithms_enabled():
        if gh is not None or ghc is not None:
            _launch_indexed_bwd(hidden, second_hidden, weight, targets, g, g_second, gh, ghc, None, None, accum_h)
        for x, coef in ((hidden, g), (second_hidden, g_second)):
            if x is not None and coef is not None:
                if gw is not None:
                    gw.index_add_(0, targets, coef[:, None] * x.float())
                if gb is not None:
                    gb.index_add_(0, targets, coef)
        return
    n, d = hidden.shape
    block_n, block_d = _indexed_tiles(n, d)
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
    block_n, block_d = _indexed_tiles(n, d)
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
