"""Packing a preference batch for the trunk: one shared prompt prefix per pair, and padding-free rows.

The collator's batch is padded: (2B, T) rows, the B chosen rows first, then the B rejected rows,
each row `[prompt with image tokens, response, padding]`. The chosen and rejected rows of a pair
start with the same tokens (image and prompt), so the trunk can run them once:

    shared prefix:  [prefix | chosen response | rejected response]   one sequence per pair
                    positions 0..p-1 | p..      | p..                 (both responses continue from p)
                    the rejected tokens see the prefix and themselves, never the chosen tokens

and with `padding_free` every pair's sequence goes into one row (block-diagonal attention across
pairs), so no padding token reaches the trunk or the lm_head. One row pays off where the attention
skips the masked blocks: FlexAttention's block mask, and `segment_attention` (trainer/row_attention.py), which an
sdpa model is switched to (`SEGMENT_ATTENTION`): every projection and MLP runs on the packed row, and the
attention runs per sequence, as flash-attn's varlen kernels do: one varlen call per layer on CUDA in 16 bits,
otherwise two SDPA calls per pair (prefix + first response, causal; second response over prefix and itself).
Eager attends over the dense (L, L) mask, quadratic in the whole micro-batch, which costs more than the
padding of per-pair rows saves, so by default (`padding_free=None`) it keeps one row per pair, as sdpa
does with a sliding window. Tokens are also cut after each row's last position that predicts a target
(the final response token predicts nothing).

A packing is only index maps: which padded (row, column) each packed token comes from, its
position id, which sequence (`group`) and which part of it (`segment`: 0 prefix, 1 first response,
2 second) it belongs to, and where each needed hidden state goes in the (R, T') response grid the
losses take. So the embeddings (image features scattered in) are built on the padded batch as
before and gathered, and gradients flow back through the gathers: the prefix gets the sum of
both responses' gradients, once.

The prefix of a pair is the longest common prefix of its two rows (up to the first token either row
does not keep): it always holds the image and the prompt, and any identical first response tokens.
Its last position predicts the first response token of both responses.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import weakref
from dataclasses import dataclass

import torch

from tpo_fast.trainer.row_attention import SEGMENT_ATTENTION, use_segment_attention, varlen_layout, varlen_wanted

logger = logging.getLogger("tpo_fast")

# Attention implementations that take a prepared 4D mask (returned as is by transformers' mask builders).
MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", SEGMENT_ATTENTION)
# Those whose cost follows the mask's non-empty blocks, not L^2: where one padding-free row pays off (as it
# does on sdpa through SEGMENT_ATTENTION, see `packing_mode`).
BLOCK_SPARSE_IMPLEMENTATIONS = ("flex_attention",)
# flash-attn's implementations take no 4D mask; a packed step switches their language model to SEGMENT_ATTENTION
# (SDPA, which runs PyTorch's own flash-attention kernels on CUDA), so that the trainer's default attention on a
# CUDA machine with flash-attn installed (`default_attn_implementation`) still trains packed.
FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class Packing:
    """Index maps from a padded (R, T) batch to N packed rows of length L and back.

    source: (N, L) flat index `row * T + column` into the padded batch of each packed token
        (0 on padding slots). position_ids: (N, L) the token's column in its padded row (0 on padding).
    group: (N, L) the packed sequence (pair, or single row) of each token, -1 on padding.
    segment: (N, L) 0 for the prefix, 1 and 2 for the chosen and rejected responses of a pair.
    grid_source, grid_target: (K,) for every response-grid cell with a target, its flat index
        into the packed (N * L) hidden states and into the (R * T') grid.
    grid_shape: (R, T'), the padded rows by the response window's width.
    implementation, sliding_window: the attention the mask is built for (see `packed_attention_mask`).
    spans: for a one-row (padding-free) packing, per sequence `(start, prefix, first, second)`: its first
        column and the lengths of its prefix and of its two responses (0, 0 for a single row, all prefix);
        `segment_attention` attends within them. Empty for one row per sequence.
    """

    source: torch.Tensor
    position_ids: torch.Tensor
    group: torch.Tensor
    segment: torch.Tensor
    grid_source: torch.Tensor
    grid_target: torch.Tensor
    grid_shape: tuple[int, int]
    implementation: str = "sdpa"
    sliding_window: int | None = None
    spans: tuple[tuple[int, int, int, int], ...] = ()

    @property
    def tokens(self) -> int:
        """Tokens the trunk runs on, padding slots excluded."""
        return int((self.group >= 0).sum())

    def inputs(self, embeds: torch.Tensor) -> dict[str, object]:
        """(R, T, D) padded input embeddings -> the trunk's keyword arguments: `inputs_embeds`, `attention_mask`,
        `position_ids`, and for `SEGMENT_ATTENTION` on one row the spans its attention reads (`tpo_fast_spans`),
        and on CUDA their `VarlenLayout` (`tpo_fast_varlen`: built once here for every layer of the call)."""
        packed = embeds.flatten(0, 1)[self.source]
        out = dict(inputs_embeds=packed, attention_mask=packed_attention_mask(self, packed.dtype),
                   position_ids=self.position_ids)
        if self.implementation == SEGMENT_ATTENTION and self.spans:
            out["tpo_fast_spans"] = self.spans
            if varlen_wanted(packed.device):
                out["tpo_fast_varlen"] = varlen_layout(self.spans, packed.device)
        return out

    def twice(self, batch_tokens: int) -> Packing:
        """This packing applied to two (R, T) batches stacked into one (2R, T) batch (`batch_tokens` = R * T): the
        same sequences twice, the second copy reading the second batch. A one-row (padding-free) packing
        grows along its row, its spans repeated after the first copy's; one row per sequence gets twice the
        rows. The second copy's sequences are other groups, so neither copy attends to the other, and
        `responses` returns the (2R, T') grid: the first batch's rows, then the second's."""
        one_row = bool(self.spans)
        dim = 1 if one_row else 0
        sequences = len(self.spans) if one_row else self.source.shape[0]
        rows, width = self.grid_shape
        length = self.source.shape[1]
        return dataclasses.replace(
            self,
            source=torch.cat([self.source, self.source + batch_tokens], dim),
            position_ids=torch.cat([self.position_ids, self.position_ids], dim),
            group=torch.cat([self.group, torch.where(self.group >= 0, self.group + sequences, self.group)], dim),
            segment=torch.cat([self.segment, self.segment], dim),
            grid_source=torch.cat([self.grid_source, self.grid_source + self.source.numel()]),
            grid_target=torch.cat([self.grid_target, self.grid_target + rows * width]),
            grid_shape=(2 * rows, width),
            spans=self.spans + tuple((start + length, *rest) for start, *rest in self.spans),
        )

    def responses(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, L, D) packed hidden states -> the (R, T', D) response grid (`gather_responses`)."""
        return gather_responses(hidden, self)


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(R, T) labels -> (R, T) targets: the hidden state at position t predicts targets[:, t] = labels[:, t + 1]."""
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    return targets


def response_window(targets: torch.Tensor, ignore_index: int = -100) -> slice:
    """The column range holding every target (prompt and image columns before it are dropped). One read-back
    (on CUDA one wait for the device; `nonzero` and two reads of its ends were three)."""
    has = (targets != ignore_index).any(0)
    width = has.numel()
    cols = torch.arange(width, device=has.device)
    first, last = (torch.stack([torch.where(has, cols, width).min(), torch.where(has, cols, -1).max()]).tolist()
                   if width else (0, -1))
    if last < 0:
        raise ValueError("the batch has no response tokens (every label is ignore_index)")
    return slice(first, last + 1)


def host_copy(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """CPU copies of integer or bool `tensors` from one device-to-host copy (on CUDA each copy waits for the device
    to drain: one wait, not one per tensor)."""
    flat = torch.cat([t.detach().reshape(-1).long() for t in tensors]).cpu()
    return [part.to(t.dtype) for part, t in zip(_views(flat, tensors), tensors, strict=True)]


def _views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """`flat` cut into consecutive views of the shapes of `like` (what `torch.cat` of their flattenings made)."""
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in like]), like, strict=True)]


def host_to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """CPU `tensors` of one dtype on `device` from one host-to-device copy, views of one buffer. On CUDA from pinned
    memory without waiting (a copy from pageable memory waits for the device to drain, the host then idle)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    flat = flat.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else flat.to(device)
    return _views(flat, tensors)


def check_targets(attention_mask: torch.Tensor, targets_valid: torch.Tensor, paired: bool) -> None:
    """Raise ValueError for a row without any target (an empty response) or a target on padding, in any padding
    layout. `attention_mask`, `targets_valid`: (R, T) bool host tensors (`targets_valid`: the shifted labels are
    not ignore_index); `paired`: the rows are B chosen, then B rejected rows (named as a pair's in the error)."""
    rows = targets_valid.shape[0]
    empty = (~targets_valid.any(1)).nonzero().flatten().tolist()
    if empty:
        r = empty[0]
        what = (f"pair {r % (rows // 2)}'s {'chosen' if r < rows // 2 else 'rejected'}" if paired else f"row {r}'s")
        raise ValueError(
            f"{what} response is empty (no label other than ignore_index after the first position); "
            f"drop the record, or give it at least one response token"
        )
    # Position t's target is the label of position t + 1: both must be real tokens.
    real = attention_mask.bool()
    label_real = torch.zeros_like(real)
    label_real[:, :-1] = real[:, 1:]
    if bool((targets_valid & ~(real & label_real)).any()):
        raise ValueError("labels on padding positions (attention_mask 0); the collator masks padding with ignore_index")


def _row_lengths(attention_mask: torch.Tensor, targets_valid: torch.Tensor, paired: bool) -> torch.Tensor:
    """(R,) tokens each row keeps: up to and including its last position with a target."""
    width = targets_valid.shape[1]
    lengths = attention_mask.sum(1)
    if not bool((attention_mask == (torch.arange(width) < lengths[:, None])).all()):
        raise ValueError("packing needs right-padded rows (attention_mask 1...1 0...0); "
                         "set shared_prefix=False and padding_free=False for other layouts")
    check_targets(attention_mask, targets_valid, paired)
    last = width - 1 - targets_valid.flip(1).int().argmax(1)
    return last + 1


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


def _sequence(ids: torch.Tensor, kept: list[int], rows: tuple[int, ...], width: int):
    """One packed sequence: the rows' common prefix (taken from the first row), then each row's own tokens.

    Returns (sources, positions, segments, {row: (prefix length, offset of the row's own tokens)}).
    A single row is all prefix.
    """
    first = rows[0]
    prefix = kept[first]
    for r in rows[1:]:
        prefix = min(prefix, _common_prefix(ids[first, : kept[first]], ids[r, : kept[r]]))
    cols = [torch.arange(prefix)]
    srcs = [first * width + cols[0]]
    segs = [torch.zeros(prefix, dtype=torch.long)]
    where = {}
    offset = prefix
    for s, r in enumerate(rows, start=1):
        where[r] = (prefix, offset)
        if len(rows) > 1:
            own = torch.arange(prefix, kept[r])
            cols.append(own)
            srcs.append(r * width + own)
            segs.append(torch.full((len(own),), s, dtype=torch.long))
            offset += len(own)
    return torch.cat(srcs), torch.cat(cols), torch.cat(segs), where


def pack_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    has_target: torch.Tensor,
    window: slice,
    *,
    paired: bool,
    padding_free: bool,
    implementation: str = "sdpa",
    sliding_window: int | None = None,
    device: torch.device | None = None,
) -> Packing:
    """The packing of a right-padded (R, T) batch whose response grid is `targets[:, window]`.

    `has_target`: (R, T) bool, `targets != ignore_index` for the shifted labels (`shift_labels`:
    position t predicts `targets[:, t]`); only those positions' hidden states reach the grid.
    `paired`: rows i and R/2 + i are a pair's chosen and rejected rows and share their common
    prefix; otherwise every row is its own sequence. `padding_free`: all sequences in one row
    (N = 1); otherwise one sequence per row, padded to the longest (N = B pairs or R rows).
    Raises ValueError for a row without any target (an empty response) or a left-padded row.
    `device`: where the maps go (default: the device of `input_ids`, which may be a host copy: then nothing is
    read back from the device).
    """
    device = input_ids.device if device is None else torch.device(device)
    ids, mask, valid = host_copy(input_ids, attention_mask, has_target)  # the one read-back of the call
    mask, valid = mask.bool(), valid.bool()
    rows, width = valid.shape
    if paired and rows % 2:
        raise ValueError(f"paired packing needs chosen and rejected rows (an even count), got {rows} rows")
    kept = _row_lengths(mask, valid, paired).tolist()
    members = [(i, rows // 2 + i) for i in range(rows // 2)] if paired else [(r,) for r in range(rows)]

    sequences = [_sequence(ids, kept, group_rows, width) for group_rows in members]
    sizes = [len(s[0]) for s in sequences]
    n_rows, length = (1, sum(sizes)) if padding_free else (len(sequences), max(sizes))
    source = torch.zeros(n_rows * length, dtype=torch.long)
    position = torch.zeros_like(source)
    group = torch.full_like(source, -1)
    segment = torch.zeros_like(source)
    start = 0
    row_start = {}  # padded row -> (flat start of its sequence, prefix length, offset of its own tokens)
    spans = []
    for g, ((src, pos, seg, where), size) in enumerate(zip(sequences, sizes, strict=True)):
        if not padding_free:
            start = g * length
        span = slice(start, start + size)
        source[span], position[span], segment[span], group[span] = src, pos, seg, g
        for r, (prefix, offset) in where.items():
            row_start[r] = (start, prefix, offset)
        if padding_free:
            spans.append((start, *(int((seg == s).sum()) for s in range(3))))
        start += size

    # Response grid: cell (r, t - window.start) for every position t with a target.
    grid_width = window.stop - window.start
    grid_rows, cols = valid.nonzero(as_tuple=True)
    if len(cols) and (int(cols.min()) < window.start or int(cols.max()) >= window.stop):
        raise ValueError(f"targets outside the response window {window}")
    starts = torch.tensor([row_start[r] for r in range(rows)], dtype=torch.long).view(rows, 3)
    base, prefix, offset = starts[grid_rows].unbind(1)
    local = torch.where(cols < prefix, cols, offset + cols - prefix)
    # Packing's first six fields, in their order: source, position_ids, group, segment, grid_source, grid_target
    maps = [t.view(n_rows, length) for t in (source, position, group, segment)]
    maps += [base + local, grid_rows * grid_width + cols - window.start]
    return Packing(
        *host_to_device(maps, device),
        grid_shape=(rows, grid_width),
        implementation=implementation,
        sliding_window=sliding_window,
        spans=tuple(spans),
    )


def allowed_attention(packing: Packing, sliding_window: int | None = None) -> torch.Tensor:
    """(N, L, L) bool: query token q may attend key token k.

    Same sequence, k not after q, and k in the prefix or in q's own segment (the rejected response
    never sees the chosen one); with `sliding_window`, `position(q) - position(k) < sliding_window`.
    Padding slots attend only to themselves (a fully masked row gives NaN in SDPA); no real token
    sees them.
    """
    g, s, pos = packing.group, packing.segment, packing.position_ids
    n = g.shape[1]
    idx = torch.arange(n, device=g.device)
    allowed = (g[:, :, None] == g[:, None, :]) & (g[:, :, None] >= 0)
    allowed &= idx[:, None] >= idx[None, :]
    allowed &= (s[:, None, :] == 0) | (s[:, :, None] == s[:, None, :])
    if sliding_window is not None:
        allowed &= (pos[:, :, None] - pos[:, None, :]) < sliding_window
    return allowed | torch.eye(n, dtype=torch.bool, device=g.device)


def _block_mask(packing: Packing, sliding_window: int | None):
    from torch.nn.attention.flex_attention import create_block_mask

    g, s, pos = packing.group, packing.segment, packing.position_ids

    def mask_mod(b, h, q, k):
        ok = (g[b, q] == g[b, k]) & (g[b, q] >= 0) & (q >= k) & ((s[b, k] == 0) | (s[b, q] == s[b, k]))
        if sliding_window is not None:
            ok = ok & (pos[b, q] - pos[b, k] < sliding_window)
        return ok | (q == k)

    n, length = g.shape
    return create_block_mask(mask_mod, B=n, H=None, Q_LEN=length, KV_LEN=length, device=g.device)


def packed_attention_mask(packing: Packing, dtype: torch.dtype):
    """The 4D attention mask of a packing for its attention implementation (`packing.implementation`).

    "sdpa" (and `SEGMENT_ATTENTION` on one row per sequence): (N, 1, L, L) bool, True = attend;
    `SEGMENT_ATTENTION` on a padding-free row: an empty (1, 1, 0, 0) placeholder (the spans say it all);
    "eager": the dense mask as an additive float mask in `dtype` (0 or the dtype's minimum);
    "flex_attention": a `BlockMask`, whose empty blocks (other pairs, the rejected-to-chosen block) are
    skipped rather than masked.
    """
    implementation, sliding_window = packing.implementation, packing.sliding_window
    if implementation == "flex_attention":
        return _block_mask(packing, sliding_window)
    if implementation == SEGMENT_ATTENTION and packing.spans:
        if sliding_window is not None:
            raise ValueError(f"{SEGMENT_ATTENTION} attends whole sequences; a sliding window needs the dense mask "
                             f"(implementation 'sdpa')")
        # Unused by `segment_attention`; an empty mask so that any other attention fails at once, never silently.
        return torch.zeros(packing.source.shape[0], 1, 0, 0, dtype=torch.bool, device=packing.source.device)
    allowed = allowed_attention(packing, sliding_window)[:, None]
    if implementation in ("sdpa", SEGMENT_ATTENTION):
        return allowed
    if implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    raise ValueError(f"no packed mask for attention {implementation!r}; use one of {MASK_IMPLEMENTATIONS}")


def gather_responses(hidden: torch.Tensor, packing: Packing) -> torch.Tensor:
    """(N, L, D) packed hidden states -> (R, T', D) response grid; zeros where there is no target."""
    d = hidden.shape[-1]
    rows, width = packing.grid_shape
    picked = hidden.reshape(-1, d).index_select(0, packing.grid_source)
    return hidden.new_zeros(rows * width, d).index_copy(0, packing.grid_target, picked).view(rows, width, d)


def _sliding_window(config) -> tuple[bool, int | None]:
    """(supported, window) of a text config: one attention kind for every layer, its window if sliding."""
    kinds = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    if kinds - {"full_attention", "sliding_attention"} or len(kinds) > 1:
        return False, None
    if kinds == {"full_attention"} or getattr(config, "use_sliding_window", True) is False:
        return True, None
    return True, window


# language model -> `_bidirectional_attention`'s answer: walking a LoRA 7B model's 2,700 modules takes tens of ms, and
# `packing_mode` runs at every step
_BIDIRECTIONAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bidirectional_attention(language_model: torch.nn.Module) -> str | None:
    """The class name of an attention module of `language_model` that attends both ways (`is_causal` False: Gemma3
    with `use_bidirectional_attention`, BERT-style models that are no decoder), or None when all are causal."""
    if not isinstance(language_model, torch.nn.Module):
        return None
    if language_model not in _BIDIRECTIONAL:
        _BIDIRECTIONAL[language_model] = next(
            (type(m).__name__ for m in language_model.modules() if getattr(m, "is_causal", True) is False), None)
    return _BIDIRECTIONAL[language_model]


def packing_support(llava: torch.nn.Module) -> tuple[str | None, str, int | None]:
    """(reason, implementation, sliding_window) of a LLaVA model's language model: why it cannot run a
    packed batch (None when it can), its attention implementation, and the sliding window the packed
    mask must apply (None: full attention)."""
    language_model = getattr(getattr(llava, "model", None), "language_model", None)
    if language_model is None:
        return "the model has no `.model.language_model`", "", None
    config = language_model.config
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in MASK_IMPLEMENTATIONS + FLASH_IMPLEMENTATIONS:
        return (f"its attention implementation {implementation!r} takes no 4D attention mask "
                f"(load the model with attn_implementation='sdpa', 'eager' or 'flex_attention')"), implementation, None
    try:
        params = inspect.signature(language_model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "position_ids" not in params:
        return f"{type(language_model).__name__}.forward takes no position_ids", implementation, None
    bidirectional = _bidirectional_attention(language_model)
    if bidirectional is not None:
        # a packed row's mask is causal (and hides the first response from the second): it would silently change
        # what every token of such a model sees, its padded rows being attended both ways
        return (f"its attention is bidirectional ({bidirectional}.is_causal is False, e.g. "
                f"use_bidirectional_attention=True or is_decoder=False), which a packed row's causal mask would "
                f"silently change"), implementation, None
    ok, window = _sliding_window(config)
    if not ok:
        return ("its layers mix attention kinds (full and sliding window), which one 4D mask cannot describe",
                implementation, None)
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None and implementation in FLASH_IMPLEMENTATIONS:
        # a packed flash model is switched to SEGMENT_ATTENTION (SDPA), which has no logit soft-cap: silently other
        # attention scores than the model's own (eager and flex_attention apply it, with the packed mask)
        return (f"its attention soft-caps its scores (attn_logit_softcapping={softcap}), which the SDPA attention a "
                f"packed {implementation} model is switched to ({SEGMENT_ATTENTION!r}) cannot (load the model with "
                f"attn_implementation='eager' to train packed)"), implementation, None
    return None, implementation, window


@dataclass(frozen=True)
class PackingMode:
    """How a step packs its batch on a given model (see `packing_mode`)."""

    shared_prefix: bool
    padding_free: bool
    implementation: str
    sliding_window: int | None

    def pack(self, input_ids, attention_mask, has_target, window: slice, *, pairs: bool,
             device: torch.device | None = None) -> Packing:
        """`pack_batch` of these rows; `pairs`: the rows are the chosen and rejected rows of whole pairs,
        which share their prefix when `shared_prefix` (the chosen-only POVID branch is packed row by row)."""
        return pack_batch(
            input_ids, attention_mask, has_target, window, paired=self.shared_prefix and pairs,
            padding_free=self.padding_free, implementation=self.implementation, sliding_window=self.sliding_window,
            device=device,
        )


_WARNED: set[str] = set()


def may_pack(shared_prefix: bool, padding_free: bool | None) -> bool:
    """Whether these options can pack a batch at all (`packing_mode` returns None when not): the model then
    needs an attention that takes a 4D mask."""
    return shared_prefix or padding_free is not False


def packing_mode(llava: torch.nn.Module, shared_prefix: bool, padding_free: bool | None = None) -> PackingMode | None:
    """The packing this model runs with, or None for the padded rows.

    `padding_free=None` packs a micro-batch into one row only where the attention skips the blocks its
    mask removes: flex_attention, and sdpa without a sliding window, which is switched to
    `SEGMENT_ATTENTION` (`use_segment_attention`: the language model's config names it from then on).
    With eager (or a sliding window) the dense (L, L) mask of one row costs more attention than the
    padding it saves, so each pair keeps its own row. A flash-attn model (`FLASH_IMPLEMENTATIONS`) is
    switched to `SEGMENT_ATTENTION` whenever it packs (logged once) and then packs as sdpa does. None is
    also returned (logged once per reason) when the model cannot take a packed batch.
    """
    if not may_pack(shared_prefix, padding_free):
        return None
    reason, implementation, window = packing_support(llava)
    flash = implementation in FLASH_IMPLEMENTATIONS
    segments = (flash or implementation in ("sdpa", SEGMENT_ATTENTION)) and window is None
    if padding_free is None:
        padding_free = implementation in BLOCK_SPARSE_IMPLEMENTATIONS or segments
    if not (shared_prefix or padding_free):
        return None
    if reason is not None:
        _log_once(logging.WARNING, f"shared_prefix / padding_free are off, the step runs on padded rows: {reason}")
        return None
    if flash:
        _log_once(logging.WARNING, f"the language model's attention {implementation!r} takes no 4D mask: switched "
                                   f"to {SEGMENT_ATTENTION!r} (SDPA, flash kernels on CUDA) for packed batches "
                                   f"(shared_prefix / padding_free); set both off to keep {implementation!r}")
        use_segment_attention(llava.model.language_model)
        implementation = SEGMENT_ATTENTION if window is None else "sdpa"  # a window needs sdpa's dense mask
    elif padding_free and segments:
        use_segment_attention(llava.model.language_model)
        implementation = SEGMENT_ATTENTION
    elif implementation == SEGMENT_ATTENTION and window is not None:
        implementation = "sdpa"  # switched by an earlier call (a flash model): a window still needs the dense mask
    return PackingMode(shared_prefix, padding_free, implementation, window)


def _log_once(level: int, message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.log(level, message)
