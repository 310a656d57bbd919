"""The `torch` backend: the fused primitive in chunked pure PyTorch (the CPU fallback).

Same contract as the Triton launchers in `triton_impl.py`: rows are already compacted (every
target valid), forward returns per-row statistics only, and backward recomputes the logits
chunk by chunk. Memory is O(chunk x V) fp32, never N x V. All math in fp32, with autocast off
(`autocast_off`): a caller's autocast region would otherwise run the logits GEMM in 16 bits.

With bf16 hidden states and weight on a GPU, or on a CPU with bf16 units (AMX or AVX512-BF16), the GEMMs run on
bf16 operands (`uses_bf16_gemms`). The logits GEMM keeps fp32 accumulation and an fp32 result, and equals an fp32
GEMM of the same values, as every operand value is a bf16 number, so each product is exact in fp32: on CUDA one
cuBLAS product of the bf16 operands (`gemm.mm_f32`, no fp32 copy of the weight), on the CPU oneDNN's bf16 mode
(`bf16_gemms`). The gradient GEMMs (`gradient_gemms`) take the logit gradient dZ rounded once to bf16, as the
triton backend does with 16-bit inputs (dZ is formed in fp32 first: the triton backend folds the one-hot terms in
before the rounding; here the target entries, `softmax - 1` formed in fp32, leave the GEMMs and are added apart,
rank-1, so it never cancels after a rounding). On CUDA their results are fp32 (cuBLAS accumulates and returns
fp32); on the CPU they run as native bf16 products (fp32 accumulation, one rounding of each result to bf16): dH is
returned in bf16 anyway, and dW rounds once per chunk before its fp32 sum. The CPU's bf16 mode would keep fp32
results, at about twice the time (an AMD EPYC with AVX512-BF16, 824 rows, D=1024, V=32000: dH 279 against 144 ms,
dW 326 against 155 ms). fp16 inputs, and bf16 on a CPU without bf16 units, run fp32 GEMMs of widened copies.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from tpo_fast.ops import gemm


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """A region (or, as `@autocast_off()`, a function) where CPU and CUDA autocast are off.

    The primitives choose their own precision (fp32 logits and statistics); an enclosing
    `torch.autocast` region, e.g. a trainer's bf16 autocast, must not turn their matmuls into 16-bit
    ones. Used around every forward and hand-written backward of the primitives and fused losses.
    """
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


# The `bf16_gemms` regions open in any thread, and the setting the first of them found, which the last to close
# restores. A region that restored what it found itself left "bf16" on for good where two threads' regions overlapped
# (the second found the first's "bf16" and put it back after the first had restored the user's setting): every later
# fp32 GEMM of the process, the user's own included, then rounded its operands to bf16 on a CPU with bf16 units.
_REGIONS_LOCK = threading.Lock()
_regions_open = 0
_regions_before: str | None = None


@contextlib.contextmanager
def bf16_gemms(enabled: bool) -> Iterator[None]:
    """A region where CPU fp32 GEMMs run on bf16 units: oneDNN rounds each fp32 operand to bf16 and
    accumulates in fp32 (`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`).

    Exact for operands that hold bf16 values (upcast bf16 tensors), one rounding for any other, so the
    backend enables it only with bf16 inputs on a CPU with bf16 units (`uses_bf16_gemms`). A CPU without them,
    and a torch without this setting, run the usual fp32 GEMM. The setting found before the first open region comes
    back when the last one closes (regions of several threads may overlap), also after an error. The setting is
    process-wide: an fp32 GEMM that another Python thread runs inside the region gets it too (the backend's own
    calls are the only GEMMs of its thread while it is open), and while it is open the legacy
    `torch.get_float32_matmul_precision()` raises (PyTorch refuses to mix its two APIs); after it, both read as
    before.
    """
    global _regions_open, _regions_before
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if not enabled or not hasattr(matmul, "fp32_precision"):
        yield
        return
    with _REGIONS_LOCK:
        if _regions_open == 0:
            _regions_before = matmul.fp32_precision
            matmul.fp32_precision = "bf16"
        _regions_open += 1
    try:
        yield
    finally:
        with _REGIONS_LOCK:
            _regions_open -= 1
            if _regions_open == 0:
                matmul.fp32_precision = _regions_before


def cpu_has_bf16_units() -> bool:
    """Whether this CPU has bf16 dot-product units, AMX tiles (Intel Sapphire Rapids and later) or AVX512-BF16
    (AMD Zen 4 and later, Intel Cooper Lake), on which oneDNN's bf16 mode runs the backend's GEMMs faster than
    fp32. Measured on 2-core hosts, an 824-832 x 1024 x 32000 logits product: 102 against 181 ms on a Xeon with
    AMX; 285 against 316 ms on an AMD EPYC with AVX512-BF16 only, where the fused bf16 TPO loss (8 x 256 rows,
    D=1024, V=32000, fwd+bwd) took 2.72-2.83 s against 3.11-3.19 s in fp32, and 2.17 s in a bench run with the
    gradient GEMMs as native bf16 products (`gradient_gemms`). A CPU with neither (AVX2 only)
    would emulate the mode, so it keeps fp32. False where torch cannot tell."""
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:
            continue
    return False


def uses_bf16_gemms(hidden: torch.Tensor, weight_dtype: torch.dtype) -> bool:
    """Whether the GEMMs of `hidden` and a weight of `weight_dtype` run on bf16 operands (`_logits`,
    `gradient_gemms`): bf16 inputs on CUDA, or on a CPU with bf16 units (`cpu_has_bf16_units`) in a torch built
    with oneDNN (without either, the CPU would emulate them, slower than fp32)."""
    if hidden.dtype != torch.bfloat16 or weight_dtype != torch.bfloat16:
        return False
    if hidden.is_cuda:
        return True
    return hidden.device.type == "cpu" and torch.backends.mkldnn.is_available() and cpu_has_bf16_units()


def needs_fp32_weight(hidden: torch.Tensor, bf16: bool) -> bool:
    """Whether the GEMMs of `hidden` take the weight's fp32 copy: all but the bf16 ones on CUDA (`uses_bf16_gemms`
    gave `bf16`), which take the bf16 weight itself."""
    return not (bf16 and hidden.is_cuda)


def narrow_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """`x` (R, V), a contiguous fp32 buffer, rounded to bf16 in its own memory: a bf16 (R, V) view of its first
    half, equal to `x.bfloat16()`, with no second buffer. `x` is consumed (its values are overwritten).

    Rows go in blocks [a, 2a): a block's bf16 bytes [2aV, 4aV) end where its fp32 source begins, so no copy
    reads what another has written; row 0, whose bf16 half lies inside its own fp32 row, goes through a copy.
    """
    r, v = x.shape
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"narrow_to_bf16 needs a contiguous float32 buffer, got {x.dtype} with strides {x.stride()}")
    out = x.view(torch.bfloat16).view(-1)[: r * v].view(r, v)
    if r == 0 or v == 0:
        return out
    out[0] = x[0].clone()
    a = 1
    while a < r:
        b = min(2 * a, r)
        out[a:b] = x[a:b]
        a = b
    return out


# The bf16 dW product's block of vocabulary rows, in bytes of its fp32 result (see `gradient_gemms`).
DW_BLOCK_BYTES = 8 * 2**20


def gradient_gemms(
    dz: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    w32: torch.Tensor | None,
    bf16: bool,
    gw: torch.Tensor | None,
    need_w: bool,
    need_h: bool,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`dW += dZ^T H` (fp32 `gw`, allocated when None and `need_w`) and `dH = dZ W` (fp32, into `out` when given,
    None unless `need_h`) of one chunk; returns (gw, dH).

    `dz` is the chunk's fp32 logit gradient (R, V), `h` its rows in the input dtype, `weight` the lm_head weight in
    its own dtype and `w32` its fp32 copy (None where `needs_fp32_weight` says no). `bf16` (`uses_bf16_gemms`): dZ
    is rounded to bf16 in its own buffer (`narrow_to_bf16`: `dz` is consumed); on CUDA both products are cuBLAS
    GEMMs of the bf16 operands with fp32 results (`_cuda_bf16_gradient_gemms`), on the CPU they run natively in
    bf16, each result rounded once, dW's by blocks of vocabulary rows (`DW_BLOCK_BYTES` of fp32 result each).
    Otherwise fp32 GEMMs; `dz` is kept."""
    if bf16:
        dz16 = narrow_to_bf16(dz)
        if not needs_fp32_weight(h, bf16):
            return _cuda_bf16_gradient_gemms(dz16, h, weight, gw, need_w, need_h, out)
        if need_w:
            first = gw is None
            if first:
                gw = torch.empty(weight.shape, dtype=torch.float32, device=h.device)
            # by blocks of vocabulary rows: oneDNN's bf16 product holds an fp32 copy of its whole result besides
            # the bf16 one (187 MiB at once for V=32000, D=1024, 824 rows; blocks of 2048 rows: 12 MiB, as fast)
            step = max(1, DW_BLOCK_BYTES // (4 * max(1, weight.shape[1])))
            for s in range(0, weight.shape[0], step):
                part = torch.mm(dz16[:, s:s + step].t(), h)  # (block, D) bf16
                (gw[s:s + step].copy_ if first else gw[s:s + step].add_)(part)
        if not need_h:
            return gw, None
        dh = torch.mm(dz16, weight)
        return gw, (dh.float() if out is None else out.copy_(dh))
    if need_w:
        h32 = h.float()
        gw = torch.mm(dz.t(), h32) if gw is None else gw.addmm_(dz.t(), h32)
    return gw, (torch.mm(dz, w32, out=out) if need_h else None)


def _cuda_bf16_gradient_gemms(
    dz16: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    gw: torch.Tensor | None,
    need_w: bool,
    need_h: bool,
    out: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`gradient_gemms`' bf16 products on CUDA, from the chunk's bf16 dZ: `dW += dZ^T H` and `dH = dZ W` as
    `gemm.mm_f32` GEMMs (cuBLAS: bf16 operands, fp32 accumulation and results, no widened copies). Written
    against `gemm`, so the CPU runs it too (widened operands, the same values)."""
    if need_w:
        gw = gemm.mm_f32(dz16.t(), h) if gw is None else gemm.addmm_f32_(gw, dz16.t(), h)
    return gw, (gemm.mm_f32(dz16, weight, out) if need_h else None)


# Rows per chunk: chunk * V fp32 logits live at a time (4096 * 32000 * 4 B = 500 MiB at most).
DEFAULT_CHUNK_ROWS = 1024


def _chunk_rows(n_vocab: int) -> int:
    # Keep one chunk of fp32 logits near 128 MiB, whatever V is.
    return max(16, min(DEFAULT_CHUNK_ROWS, (32 * 1024 * 1024) // max(n_vocab, 1)))


def _logits(
    h: torch.Tensor, weight: torch.Tensor, b32: torch.Tensor | None, bf16: bool, w32: torch.Tensor | None
) -> torch.Tensor:
    """fp32 logits of the rows `h` against `weight` (its own dtype). `bf16` (`uses_bf16_gemms`): on CUDA one
    cuBLAS GEMM of the bf16 operands with an fp32 result (`gemm.mm_f32`), on the CPU the fp32 GEMM of `w32`, the
    weight's fp32 copy, in `bf16_gemms`; otherwise an fp32 GEMM of `w32` (None only where `needs_fp32_weight`
    says no)."""
    if not needs_fp32_weight(h, bf16):
        z = gemm.mm_f32(h, weight.t())
    else:
        with bf16_gemms(bf16):
            z = h.float() @ w32.t()
    if b32 is not None:
        z += b32
    return z


@autocast_off()
def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    corrupted_hidden: torch.Tensor | None,
    targets: torch.Tensor,
    want_argmax: bool,
    w32: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Return (lse, target_logit, corrupted_target_logit | None, argmax | None) for compacted rows.

    `w32`: the weight's fp32 copy where the caller holds one (made here once when the GEMMs need it).
    """
    n, v = hidden.shape[0], weight.shape[0]
    bf16 = uses_bf16_gemms(hidden, weight.dtype)
    if w32 is None and needs_fp32_weight(hidden, bf16):
        w32 = weight.float()
    b32 = None if bias is None else bias.float()
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    z = torch.empty_like(lse)
    argmax = torch.empty(n, dtype=torch.int64, device=hidden.device) if want_argmax else None

    def one_chunk(s: int, e: int) -> None:
        # Its own frame: the chunk's logits buffer dies on return, before the next chunk's GEMM allocates
        # its own (a loop variable would keep it alive through that GEMM: two chunk x V buffers at the peak).
        logits = _logits(hidden[s:e], weight, b32, bf16, w32)  # [chunk, V]
        z[s:e] = logits.gather(1, targets[s:e, None]).squeeze(1)
        if argmax is not None:
            argmax[s:e] = logits.argmax(-1)
        # logsumexp in place: torch.logsumexp allocates two more chunk x V buffers on CPU
        m = logits.amax(dim=-1, keepdim=True)
        m.masked_fill_(~torch.isfinite(m), 0.0)  # all -inf rows, or inf/NaN: let them propagate
        lse[s:e] = logits.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(1))

    step = _chunk_rows(v)
    for s in range(0, n, step):
        one_chunk(s, min(n, s + step))
    zc = None
    if corrupted_hidden is not None:
        zc = gather_logits(corrupted_hidden, weight, b32, targets)
    return lse, z, zc, argmax


@autocast_off()
def gather_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """hidden[i] . weight[targets[i]] (+ bias[targets[i]]) in fp32, O(N * D)."""
    out = torch.einsum("nd,nd->n", hidden.float(), weight[targets].float())
    if bias is not None:
        out += bias[targets].float()
    return out


@autocast_off()
def gather_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    g: torch.Tensor,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Rank-1 backward of `gather_logits`: fp32 gradients for (hidden, weight, bias)."""
    need_h, need_w, need_b = needs
    gh = g[:, None] * weight[targets].float() if need_h else None
    gw = gb = None
    if need_w:
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        gw.index_add_(0, targets, g[:, None] * hidden.float())
    if need_b:
        gb = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device).index_add_(0, targets, g)
    return gh, gw, gb


@autocast_off()
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
    """Gradients for (hidden, weight, bias, corrupted_hidden), fp32.

    Per row the logit gradient is `coef_p * softmax(z) + coef_y * onehot(y)` on the clean rows and
    `g_zc * onehot(y)` on the corrupted rows. `needs` says which gradients to build. Where the softmax part is
    swept, each row's target entry `coef_p * p_y + coef_y` is formed in fp32 and taken out of the chunk's dZ, and
    added apart (rank-1) with the one-hot terms: the GEMMs, which may round dZ and their results to bf16, see only
    the other entries. Added to a rounded product instead, `softmax - 1` cancelled after the rounding: a confident
    row (p_y near 1) kept the rounding error of its whole softmax term (bf16: 25% of the hidden gradient).
    """
    need_h, need_w, need_b, need_hc = needs
    n, v = hidden.shape[0], weight.shape[0]
    bf16 = uses_bf16_gemms(hidden, weight.dtype)
    w32 = weight.float() if needs_fp32_weight(hidden, bf16) else None
    b32 = None if bias is None else bias.float()
    gh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
    gw = gb = None

    def one_chunk(s: int, e: int, gw: torch.Tensor | None, gb: torch.Tensor | None):
        # Its own frame: the chunk's logits / dS buffer dies on return, before the next chunk's GEMM allocates
        # its own (loop variables would keep it alive through that GEMM: two chunk x V buffers at the peak).
        logits = _logits(hidden[s:e], weight, b32, bf16, w32)
        ds = torch.exp_(logits.sub_(lse[s:e, None])).mul_(coef_p[s:e, None])  # [chunk, V]
        y = targets[s:e, None]
        target_coef[s:e] = ds.gather(1, y).squeeze(1)  # fp32; the one-hot term joins it below
        ds.scatter_(1, y, 0.0)
        if need_b:  # first: the GEMMs may consume ds (bf16 inputs)
            gb = ds.sum(0) if gb is None else gb.add_(ds.sum(0))
        gw, _ = gradient_gemms(ds, hidden[s:e], weight, w32, bf16, gw, need_w, gh is not None,
                               None if gh is None else gh[s:e])
        return gw, gb

    if coef_p is not None and (need_h or need_w or need_b):
        target_coef = torch.empty(n, dtype=torch.float32, device=hidden.device)  # the dZ entries of the targets
        step = _chunk_rows(v)
        for s in range(0, n, step):
            gw, gb = one_chunk(s, min(n, s + step), gw, gb)
        coef_y = target_coef if coef_y is None else target_coef.add_(coef_y)
    if need_w and gw is None:
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    if need_b and gb is None:
        gb = torch.zeros(v, dtype=torch.float32, device=weight.device)
    # The one-hot terms are rank-1 per row: gathered, never expanded to V.
    w_y = None
    if coef_y is not None or g_zc is not None:
        w_y = weight[targets].float()  # [N, D]
    if coef_y is not None:
        if gh is not None:
            gh += coef_y[:, None] * w_y
        if gw is not None:
            gw.index_add_(0, targets, coef_y[:, None] * hidden.float())
        if gb is not None:
            gb.index_add_(0, targets, coef_y)
    ghc = None
    if g_zc is not None:
        if need_hc:
            ghc = g_zc[:, None] * w_y
        if gw is not None:
            gw.index_add_(0, targets, g_zc[:, None] * corrupted_hidden.float())
        if gb is not None:
            gb.index_add_(0, targets, g_zc)
    # corrupted_hidden without an upstream gradient on its logit gets None: no gradient, no buffer
    return gh, gw, gb, ghc
