"""How a packed row attends: sequence by sequence, never across sequences or from a second response to the first.

A padding-free row (`tpo_fast.trainer.packing`) holds whole sequences `[prefix | first response | second
response]`, one after another. An sdpa language model is switched to `SEGMENT_ATTENTION`, whose attention
function (`segment_attention`) reads the row's spans and attends each sequence on its own, with no (L, L) mask:

    prefix + first response   causal                                   one SDPA call (is_causal)
    second response           over the prefix and itself, causal       one SDPA call (bottom-right causal)
                              aligned to the bottom right

On CUDA in 16 bits the whole row is instead one flash-attention varlen call per layer (`VarlenLayout`,
`torch.nn.attention.varlen`), guarded by a one-time probe (`varlen_failure`) that checks the call's
forward and backward against float64 attention before the first use and falls back to the SDPA calls
with one warning where it fails. `TPO_FAST_VARLEN=0` keeps the SDPA calls.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import math
import threading
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from tpo_fast.ops.options import current_options

logger = logging.getLogger("tpo_fast")

# The attention implementation an sdpa language model is switched to for padding-free rows: sdpa for every
# call, except that a packed row's attention runs sequence by sequence (`segment_attention`).
SEGMENT_ATTENTION = "tpo_fast_sdpa"

def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    tpo_fast_spans: tuple[tuple[int, int, int, int], ...] | None = None,
    tpo_fast_varlen: VarlenLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function of `SEGMENT_ATTENTION` (transformers' attention interface signature).

    Without `tpo_fast_spans` it is transformers' sdpa. With them (a padding-free packed row, query and
    key (1, heads, L, head_dim)), each sequence `(start, prefix, first, second)` attends only within
    itself, as the packed mask says (`allowed_attention`): prefix + first response causally, then the second
    response's queries over the prefix and its own keys (never the first response). With `tpo_fast_varlen` (the
    row's `VarlenLayout`, on CUDA in 16 bits) that is one flash-attention varlen call for the whole row;
    otherwise two SDPA calls per sequence (`is_causal` for the first piece, which skips the upper blocks). No
    (L, L) mask is built, and the work is per sequence, not quadratic in the micro-batch. Returns
    ((1, L, heads, head_dim), None) like sdpa.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if tpo_fast_spans is None:
        if attention_mask is not None and attention_mask.numel() == 0:
            # e.g. StableLM, Falcon and Nemotron decoder layers call their attention without the keyword arguments
            raise RuntimeError(f"a padding-free packed row reached the attention ({type(module).__name__}) without "
                               "its spans: the model's decoder layers (or this transformers version) do not pass "
                               "the model's keyword arguments on to the attention; set padding_free=False")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"segment attention runs on one packed row, got a batch of {query.shape[0]}")
    offset = 0
    for start, *lengths in tpo_fast_spans:
        if start != offset:
            raise ValueError(f"the spans must tile the row in order: a span starts at {start}, not at {offset}")
        offset += sum(lengths)
    if offset != query.shape[2]:
        raise ValueError(f"the spans cover {offset} of the row's {query.shape[2]} tokens")
    if tpo_fast_varlen is not None and not varlen_usable(query, dropout, scaling):
        tpo_fast_varlen = None
    # Under autograd the row's attention is checkpointed: backward reruns its forward (about 2% of a layer's
    # forward FLOPs at LLaVA-1.5-7B shapes) instead of keeping what its pieces make, which only this per-sequence
    # layout adds to a layer's activations: each piece's output besides their joined copy (the o_proj input),
    # the second responses' copies of the prefix's keys and values (the varlen call's gathered keys and values),
    # and grouped-query attention's repeated keys and values. Autograd keeps the row's q, k and v, as for plain SDPA.
    args = (query, key, value, tpo_fast_spans, dropout, scaling, tpo_fast_varlen)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return checkpoint(_row_attention, *args, use_reentrant=False), None
    return _row_attention(*args), None


@dataclass(frozen=True)
class VarlenLayout:
    """A padding-free row's attention as one varlen (flash-attention) call over its pieces.

    Every sequence `(start, prefix, first, second)` of the row gives one piece, prefix + first response, whose
    queries see its keys causally, and, with a second response, a second piece: the second response's queries
    over the prefix's keys followed by its own, causal aligned to the bottom right (query i sees the prefix and
    its own keys 0..i). The pieces' queries are the row's tokens in order, so the queries need no gather; the
    keys (and values) are gathered once per layer: `key_index` (T_k,) holds the row position of each, piece
    after piece. `cu_q`, `cu_k` (P + 1,) int32: the pieces' cumulative query and key counts; `max_q`, `max_k`:
    the longest piece's.
    """

    key_index: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


def varlen_layout(spans: tuple[tuple[int, int, int, int], ...], device: torch.device | str = "cpu") -> VarlenLayout:
    """The `VarlenLayout` of a padding-free row's spans, its tensors on `device` (copied from pinned memory without
    waiting on the device, so that building it never stalls the host)."""
    keys, q_lens, k_lens = [], [], []
    for start, prefix, first, second in spans:
        head = prefix + first
        keys.append(torch.arange(start, start + head))
        q_lens.append(head)
        k_lens.append(head)
        if second:
            keys += [torch.arange(start, start + prefix), torch.arange(start + head, start + head + second)]
            q_lens.append(second)
            k_lens.append(prefix + second)
    if not q_lens:
        raise ValueError("a varlen layout needs at least one span")
    key_index = torch.cat(keys)
    cu = torch.zeros(2, len(q_lens) + 1, dtype=torch.int32)
    cu[0, 1:] = torch.tensor(q_lens).cumsum(0)
    cu[1, 1:] = torch.tensor(k_lens).cumsum(0)
    device = torch.device(device)
    if device.type == "cuda":
        key_index, cu = (t.pin_memory().to(device, non_blocking=True) for t in (key_index, cu))
    else:
        key_index, cu = key_index.to(device), cu.to(device)
    return VarlenLayout(key_index, cu[0], cu[1], max(q_lens), max(k_lens))


@functools.cache
def varlen_api() -> tuple | None:
    """(varlen_attn, its causal keyword arguments, whether it takes `scale`) of this torch, or None where it has none.

    `torch.nn.attention.varlen.varlen_attn` took `is_causal` when it appeared and takes `window_size=(-1, 0)`
    for causal attention since; flash attention's causal mask is aligned to the bottom right either way."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "scale" in params


@functools.lru_cache(maxsize=8)
def _takes_gqa(fn) -> bool:
    """Whether the varlen call `fn` takes `enable_gqa` (torch 2.13 does; its first form did not)."""
    try:
        return "enable_gqa" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def varlen_wanted(device: torch.device) -> bool:
    """Whether a packed row on `device` gets a `VarlenLayout`: CUDA, a torch with varlen attention, and the kernel
    option `varlen` on (`TPO_FAST_VARLEN` not "0", or `kernel_options(varlen=False)`: tpo_fast.ops.options).
    Whether the call then uses it is `varlen_usable`'s decision (dtype, head size)."""
    return device.type == "cuda" and current_options().varlen and varlen_api() is not None


def varlen_usable(query: torch.Tensor, dropout: float, scaling: float | None) -> bool:
    """Whether this layer's attention can be the varlen call: flash attention on CUDA (compute capability 8.0 on,
    not turned off by `torch.backends.cuda.enable_flash_sdp(False)` or an `sdpa_kernel` context without it),
    fp16 or bf16 queries, a head size that is a multiple of 8 up to 256, no attention dropout, and a scale the
    call can take. Otherwise the row is attended sequence by sequence with SDPA, which picks its own kernel."""
    head = query.shape[-1]
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16) or dropout:
        return False
    api = varlen_api()
    if api is None or head % 8 or head > 256 or not torch.backends.cuda.flash_sdp_enabled():
        return False
    if not api[2] and scaling is not None and not math.isclose(scaling, head**-0.5, rel_tol=1e-6):
        return False
    if torch.cuda.get_device_capability(query.device) < (8, 0):
        return False
    return varlen_failure(query.dtype, head, query.device) is None


# A probe's pieces (query count, key count): a causal square and a second response's bottom-right causal piece.
_PROBE_PIECES = ((5, 5), (3, 7))
# Query heads, and key heads of the grouped-query form: query heads 0-1 read key head 0, 2-3 key head 1.
_PROBE_HEADS, _PROBE_KV_HEADS_GQA = 4, 2
# On outputs and gradients of order 1: attention computed in bf16 throughout errs by up to 0.025 there, fp16 by 0.006;
# a causal mask aligned to the top left, by more than 2.
_PROBE_TOLERANCE = 0.1


@functools.cache
def varlen_failure(dtype: torch.dtype, head: int, device: torch.device, gqa: bool = False) -> str | None:
    """Why this torch's varlen call cannot attend packed rows of `dtype` and head size `head` on `device`, or None;
    with `gqa`, why its grouped-query form (`enable_gqa=True`, fewer key and value heads than query heads) cannot.

    Checked once per process and (dtype, head, device, gqa): one tiny call over a causal piece and a second
    response's piece (fewer queries than keys, so its causal mask must be aligned to the bottom right), forward and
    backward, against plain attention in float64. It runs in a thread of its own, outside the caller's autocast, grad
    mode and saved-tensor hooks (a layer under gradient checkpointing must not record it). A failure (the call
    raises, has no backward on this build, or masks or groups the heads otherwise) is logged once as a warning; the
    packed rows are then attended with two SDPA calls per pair, as with `TPO_FAST_VARLEN=0`, or, where only the
    grouped-query form failed, by the plain call on keys and values repeated to every query head."""
    found: list[str | None] = []
    thread = threading.Thread(target=lambda: found.append(_probe_varlen(dtype, head, torch.device(device), gqa)))
    thread.start()
    thread.join()
    why = found[0] if found else "the probe's thread ended without a result"
    if why is not None:
        what, instead = (("grouped-query form (enable_gqa) of the varlen attention call",
                          "keys and values are repeated to every query head instead") if gqa else
                         ("varlen attention call", "packed rows are attended with two SDPA calls per pair instead"))
        logger.warning("tpo_fast: the %s is not used for %s, head size %d, on %s: %s; %s (TPO_FAST_VARLEN=0 skips this "
                       "check)", what, str(dtype).replace("torch.", ""), head, device, why, instead)
    return why


def _probe_varlen(dtype: torch.dtype, head: int, device: torch.device, gqa: bool = False) -> str | None:
    api = varlen_api()
    if api is None:
        return "this torch has no torch.nn.attention.varlen"
    fn, causal, _ = api
    causal = {**causal, "enable_gqa": True} if gqa else causal
    gen = torch.Generator().manual_seed(0)
    n_q, n_k = (sum(p[i] for p in _PROBE_PIECES) for i in (0, 1))
    kv_heads = _PROBE_KV_HEADS_GQA if gqa else _PROBE_HEADS
    q = torch.randn(n_q, _PROBE_HEADS, head, generator=gen)
    k, v = (torch.randn(n_k, kv_heads, head, generator=gen) for _ in range(2))
    grad_out = torch.randn(n_q, _PROBE_HEADS, head, generator=gen)
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(p[i] for p in _PROBE_PIECES)], dtype=torch.int32)
                  for i in (0, 1))
    max_q, max_k = (max(p[i] for p in _PROBE_PIECES) for i in (0, 1))
    try:
        with contextlib.ExitStack() as stack:
            if device.type == "cuda":
                stack.enter_context(torch.cuda.device(device))
            leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
            out = fn(*leaves, cu_q.to(device), cu_k.to(device), max_q, max_k, **causal)
            out = out[0] if isinstance(out, tuple) else out
            if out.shape != grad_out.shape:
                return f"its output has the shape {tuple(out.shape)}, not {tuple(grad_out.shape)}"
            out.backward(grad_out.to(device, dtype))
            got = [out.detach().float().cpu()] + [t.grad.float().cpu() for t in leaves]
    except Exception as e:  # noqa: BLE001 - whatever the call raises, the SDPA path remains
        return f"the call raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    want = _probe_reference(q, k, v, grad_out, cu_q.tolist(), cu_k.tolist())
    for name, a, b in zip(("output", "query gradient", "key gradient", "value gradient"), got, want, strict=True):
        err = (a - b).abs().max().item()
        if not err <= _PROBE_TOLERANCE:
            groups = ", query head h reading key head h // (query heads / key heads)" if gqa else ""
            return (f"its {name} differs from plain causal attention (bottom-right aligned for a piece with more keys "
                    f"than queries{groups}) by {err:.3g}")
    return None


def _probe_reference(q, k, v, grad_out, cu_q: list[int], cu_k: list[int]) -> list[torch.Tensor]:
    """Output and q, k, v gradients of causal attention per piece (query i of a piece of s queries and t keys sees
    keys 0..t - s + i), in float64 on the CPU, with `grad_out` as the output's gradient. With fewer key heads than
    query heads, query head h reads key head h // (query heads / key heads)."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    keys, values = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    pieces = []
    for (q0, q1), (k0, k1) in zip(itertools.pairwise(cu_q), itertools.pairwise(cu_k), strict=True):
        s, t = q1 - q0, k1 - k0
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1], keys[k0:k1]) * q.shape[-1] ** -0.5
        allowed = torch.arange(t)[None, :] <= torch.arange(s)[:, None] + (t - s)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        pieces.append(torch.einsum("hqk,khd->qhd", weights, values[k0:k1]))
    out = torch.cat(pieces)
    out.backward(grad_out.double())
    return [out.detach().float()] + [t.grad.float() for t in (q, k, v)]


def _row_attention(query, key, value, spans: tuple[tuple[int, int, int, int], ...], dropout: float,
                   scaling: float | None, varlen: VarlenLayout | None = None) -> torch.Tensor:
    """`segment_attention` of one packed row: (1, heads, L, dim) q and (1, kv heads, L, dim) k, v -> (1, L, heads,
    dim): one varlen call with `varlen`, else two SDPA calls per sequence of `spans`."""
    from transformers.integrations.sdpa_attention import repeat_kv

    if varlen is not None:
        return _varlen_row_attention(query, key, value, varlen, scaling)
    repeats = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, repeats), repeat_kv(value, repeats)
    # One split per tensor into (prefix + first response, second response) pieces: its backward joins the pieces'
    # gradients into one row-sized buffer. Slicing the row per sequence instead gave every slice a row-sized
    # zero-filled gradient in backward (`slice_backward`), summed one by one: work quadratic in the micro-batch.
    sizes = [n for _, prefix, first, second in spans for n in (prefix + first, second)]
    queries, keys, values = (t.split(sizes, 2) for t in (query, key, value))
    pieces = []
    for i, (_, prefix, _first, second) in enumerate(spans):
        head_keys, head_values = keys[2 * i], values[2 * i]
        pieces.append(torch.nn.functional.scaled_dot_product_attention(
            queries[2 * i], head_keys, head_values, dropout_p=dropout, scale=scaling, is_causal=True))
        if second:
            pieces.append(_second_response(queries[2 * i + 1], head_keys[:, :, :prefix], head_values[:, :, :prefix],
                                           keys[2 * i + 1], values[2 * i + 1], dropout, scaling))
    return torch.cat(pieces, 2).transpose(1, 2).contiguous()


def _varlen_row_attention(query, key, value, varlen: VarlenLayout, scaling: float | None) -> torch.Tensor:
    """One varlen call for a packed row: (1, heads, L, dim) q and (1, kv heads, L, dim) k, v -> (1, L, heads, dim).
    The queries are the row's tokens as they are (L, heads, dim); the keys and values are gathered into the pieces'
    order (`VarlenLayout`). Grouped-query keys and values go to the call as they are (`enable_gqa`) where it takes
    that form and its probe passed, else repeated to every query head first."""
    from transformers.integrations.sdpa_attention import repeat_kv

    fn, causal, takes_scale = varlen_api()
    extra = {"scale": scaling} if takes_scale else {}
    repeats = query.shape[1] // key.shape[1]
    if repeats > 1:
        if _takes_gqa(fn) and varlen_failure(query.dtype, query.shape[-1], query.device, gqa=True) is None:
            extra["enable_gqa"] = True
        else:
            key, value = repeat_kv(key, repeats), repeat_kv(value, repeats)
    q = query[0].transpose(0, 1).contiguous()
    k = key[0].transpose(0, 1).index_select(0, varlen.key_index)
    v = value[0].transpose(0, 1).index_select(0, varlen.key_index)
    out = fn(q, k, v, varlen.cu_q, varlen.cu_k, varlen.max_q, varlen.max_k, **causal, **extra)
    if isinstance(out, tuple):  # a torch whose varlen_attn returns its log-sum-exp too
        out = out[0]
    return out.unsqueeze(0)


def _second_response(query, prefix_keys, prefix_values, keys, values, dropout: float, scaling: float | None):
    """SDPA of a second response's queries (1, heads, s, dim) over the prefix's keys and its own: query i sees
    the prefix and its own keys 0..i, causal aligned to the bottom right. On CUDA as a CausalBias, which runs
    flash (or memory-efficient) attention with no mask tensor; elsewhere that bias would materialize the same
    boolean mask after a warning per call."""
    from torch.nn.attention.bias import causal_lower_right

    prefix, second = prefix_keys.shape[2], keys.shape[2]
    tail_keys, tail_values = torch.cat([prefix_keys, keys], 2), torch.cat([prefix_values, values], 2)
    if query.is_cuda:
        mask = causal_lower_right(second, prefix + second)
    else:
        mask = torch.ones(second, prefix + second, dtype=torch.bool, device=query.device).tril(prefix)
    return torch.nn.functional.scaled_dot_product_attention(query, tail_keys, tail_values, attn_mask=mask,
                                                            dropout_p=dropout, scale=scaling)


def use_segment_attention(language_model: torch.nn.Module) -> None:
    """Switch an sdpa language model to `SEGMENT_ATTENTION` (registered with transformers on first use): sdpa
    for every call (masks built by transformers' sdpa mask), per-sequence attention for packed rows."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if SEGMENT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
        AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)
    language_model.config._attn_implementation = SEGMENT_ATTENTION
