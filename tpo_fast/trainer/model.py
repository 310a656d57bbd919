"""One TPO / DPO / POVID step on a Hugging Face LLaVA model, from final hidden states, without logits.

The step runs *inside the model's forward*: `route_forward(model, options)` patches the
instance's `forward` so that `model(tpo_batch=batch)` computes the whole loss (images encoded once,
one trunk forward for TPO's clean and corrupted branches together, the fused loss on the lm_head weight)
and returns it, while any other call
falls through to the original forward. Inside the forward is where DDP's reducer, DeepSpeed
ZeRO-3's parameter gathering and FSDP2's unsharding are active, so the loss sees the same
parameters the trunk used:

- ZeRO-3: `lm_head.weight` is a 0-element shard outside its module's forward, and the lm_head
  module never runs (its weight goes straight to the fused loss). The loss is computed by
  `_Zero3GatheredLoss`, which gathers the weight in forward (`zero3.gathered`) and there computes the
  gradients too (the fused-gradient losses), or, with `grad_mode="recompute"`, gathers it again in backward
  to recompute the (cheap) loss, because the gathered storage is released in between.
- FSDP2: inside the root's forward the root group's parameters (lm_head with them) are unsharded
  plain tensors, and FSDP reduce-scatters their gradients after backward; the weight is cast to
  the compute dtype of the hidden states. Without gradient a `DTensor` weight is gathered with
  `full_tensor()`.
"""

from __future__ import annotations

import contextlib
import inspect
import types
import weakref
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from tpo_fast.loss import check_loss_options, dpo_loss, reference_sequence_scores, tpo_loss
from tpo_fast.loss._checks import check_kernel_options
from tpo_fast.loss.povid import check_povid_options, povid_loss, povid_reference_scores
from tpo_fast.ops._validate import check_target_range
from tpo_fast.ops.fused_pairs import take_stored_grads, uses_fused_gradient
from tpo_fast.ops.token_logprobs import valid_row_index
from tpo_fast.trainer._versions import require_transformers
from tpo_fast.trainer.activations import shared_lora_inputs
from tpo_fast.trainer.adapters import adapters_disabled
from tpo_fast.trainer.packing import (
    Packing,
    PackingMode,
    check_targets,
    host_copy,
    packing_mode,
    response_window,
    shift_labels,
)
from tpo_fast.trainer.zero3 import gathered, is_zero3

OBJECTIVES = ("tpo", "dpo", "povid")
# Which rows each objective runs on the corrupted image: TPO all 2B (its token weights), POVID the
# B chosen rows (their argmax is the noisy sequence), DPO none.
CORRUPTED_ROWS = {"tpo": "all", "dpo": None, "povid": "chosen"}
REFERENCE_MODES = ("model", "adapter", "precomputed", "none")


@dataclass(frozen=True)
class StepOptions:
    """What one step computes (a subset of `TPOConfig`; see there for the meaning of each field)."""

    objective: str = "tpo"
    beta: float = 0.1
    weighting: str = "tpo"
    offset: float = 0.5
    detach_weights: bool = False
    noise_weight: float = 0.5
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    average_log_prob: bool = False
    reference: str = "model"
    ignore_index: int = -100
    backend: str = "auto"
    grad_mode: str = "auto"
    shared_prefix: bool = True
    padding_free: bool | None = None
    lean_activations: bool = True

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        check_povid_options(self.noise_weight)
        # the loss layer's own domains (grad_mode's too), at construction rather than at the first step
        check_loss_options(self.beta, self.weighting, self.offset, self.loss_type, self.label_smoothing)
        check_kernel_options(self.grad_mode, self.backend, self.ignore_index)

    @property
    def corrupted_rows(self) -> str | None:
        """"all", "chosen" or None: the rows that run on the corrupted image."""
        return CORRUPTED_ROWS[self.objective]

    @property
    def corrupted_grad(self) -> bool:
        """Whether the corrupted branch carries gradient (TPO without `detach_weights`; POVID's argmax never)."""
        return self.objective == "tpo" and not self.detach_weights


def unwrap_llava(model: torch.nn.Module) -> torch.nn.Module:
    """The `LlavaForConditionalGeneration` inside DDP / DeepSpeed / PEFT wrappers."""
    # Unwrap first: PEFT forwards unknown attributes to the base model, so a PeftModel looks
    # like it has `.lm_head` and `.model` too.
    for _ in range(8):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        else:
            break
    if hasattr(model, "lm_head") and hasattr(getattr(model, "model", None), "get_image_features"):
        require_transformers()
        _check_image_inputs(type(model).__name__, model.model.get_image_features)
        return model
    raise TypeError(
        f"expected a LLaVA-style model (a `.model` with `get_image_features` and an `.lm_head`), "
        f"got {type(model).__name__}"
    )


# What the step hands the vision side: pixel values alone, a fixed number of image tokens per image.
_LAYOUT_INPUTS = {"image_grid_thw": "Qwen2-VL-style models (image grids, multimodal rotary positions)"}


def _check_image_inputs(name: str, get_image_features) -> None:
    """Refuse, by name, a model whose `get_image_features` needs more than `pixel_values`: tiled images of variable
    size (LLaVA-NeXT, LLaVA-OneVision, Mistral3: `image_sizes`) or Qwen2-VL's grids, which the step does not pass,
    so the model would fail deep inside its forward or attend its images wrongly."""
    try:
        params = inspect.signature(get_image_features).parameters
    except (TypeError, ValueError):  # a builtin or a wrapper without a signature: nothing to read
        return
    free = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    needed = [p for p, v in params.items()
              if p not in ("self", "pixel_values") and v.kind not in free and v.default is inspect.Parameter.empty]
    layout = [p for p in params if p in _LAYOUT_INPUTS]
    if needed or layout:
        why = (f"`get_image_features` needs {', '.join(needed)} (tiled images of variable size, as LLaVA-NeXT, "
               f"LLaVA-OneVision and Mistral3 use)" if needed else
               f"its images carry {', '.join(layout)} ({_LAYOUT_INPUTS[layout[0]]})")
        raise TypeError(
            f"{name} is not a model the trainer can step: {why}, which the trainer does not pass. It trains "
            f"LLaVA-1.5-style models (`LlavaForConditionalGeneration`: pixel values alone, a fixed number of image "
            f"tokens per image). For this model, compute the final hidden states with its own forward and call "
            f"tpo_fast.loss.tpo_loss (or dpo_loss, povid_loss) on them and its lm_head weight"
        )


def encode_images(llava: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(U, C, H, W) images -> (U, image_tokens, D) projected features: the vision tower runs once per image."""
    out = llava.model.get_image_features(pixel_values=pixel_values, return_dict=True)
    features = out.pooler_output
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


def image_token_id(backbone: torch.nn.Module) -> int:
    """The config's image placeholder token (`image_token_id`, or the older `image_token_index`)."""
    token_id = getattr(backbone.config, "image_token_id", None)
    return backbone.config.image_token_index if token_id is None else token_id


def _image_token_mask(
    backbone: torch.nn.Module, input_ids: torch.Tensor, embeds: torch.Tensor, features: torch.Tensor,
    image_tokens: int | None = None,
) -> torch.Tensor:
    """(R, T, 1) mask of the image placeholder positions, checked against the number of features.

    `image_tokens`: their count, when the caller counted them on a host copy of the ids: then nothing is read back
    from the device (Hugging Face's `get_placeholder_mask` reads back twice, each a wait on CUDA)."""
    if image_tokens is None and hasattr(backbone, "get_placeholder_mask"):
        return backbone.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=features)
    mask = input_ids == image_token_id(backbone)
    n_tokens = int(mask.sum()) if image_tokens is None else image_tokens
    if n_tokens * embeds.shape[-1] != features.numel():
        raise ValueError(
            f"image features and image tokens do not match: {n_tokens} tokens, "
            f"{features.numel() // embeds.shape[-1]} features"
        )
    return mask.unsqueeze(-1).to(embeds.device)


def backbone_hidden(
    llava: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_features: torch.Tensor,
    packing: Packing | None = None, token_embeds: torch.Tensor | None = None, image_tokens: int | None = None,
) -> torch.Tensor:
    """(R, T, D) final hidden states (after the last norm) from the backbone `llava.model`, no lm_head.

    `image_features` (R, image_tokens, D) are the precomputed features of each row's image, so the
    vision tower is not run again here. They are scattered into the token embeddings at the image
    placeholders, as `LlavaModel.forward` does, and the backbone runs on `inputs_embeds`, a path every
    transformers version takes the same way. (Precomputed features cannot be handed to the backbone
    itself: `mm_encoder_outputs` only exists from transformers 5.2x on, and older 5.x versions swallow
    it into `**kwargs` and silently leave the placeholder embeddings in place.) With a `packing`
    (trainer/packing.py) the embeddings are gathered into its (N, L) rows: (N, L, D) out.
    `token_embeds`: the input embeddings of `input_ids`, when the caller already looked them up (two image
    branches over the same ids share one lookup, so their backward builds one embedding gradient, not two).
    `image_tokens`: the number of image placeholders in `input_ids`, counted on the host (no read-back).
    """
    backbone = llava.model
    embeds = backbone.get_input_embeddings()(input_ids) if token_embeds is None else token_embeds
    features = image_features.reshape(-1, image_features.shape[-1]).to(embeds.device, embeds.dtype)
    mask = _image_token_mask(backbone, input_ids, embeds, features, image_tokens)
    embeds = embeds.masked_scatter(mask, features)
    inputs = dict(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=None)
    if packing is not None:
        inputs = packing.inputs(embeds)
    out = backbone(**inputs, use_cache=False, return_dict=True)
    return out.last_hidden_state


def branch_hidden(
    llava: torch.nn.Module, batch: dict[str, torch.Tensor], corrupted_rows: str | None, corrupted_grad: bool,
    host: HostBatch, window: slice, packing: PackingMode | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Response grids (rows, T', D) of chosen+rejected on the clean image and (optionally) on the corrupted image.

    `corrupted_rows`: None (no corrupted branch), "all" (the 2B rows, TPO) or "chosen" (the B
    chosen rows, POVID). One vision call for every distinct image, clean and corrupted together when both
    branches run with gradient or both without. TPO's two branches (the same rows) then also share one trunk
    call, their rows stacked (one packed row twice as long, or twice the rows), so that every layer's
    launches and host work cover both branches' tokens at once. A corrupted branch without gradient while
    the clean one has it runs on its own under `no_grad`, keeping no activations. The grids hold the
    `window` columns; with `packing` each branch runs packed and its grid is gathered back (zero where
    `host.has_target` (2B, T) is False). Everything planned on the host is planned from `host`, the batch's
    host copy, so that no step of the plan waits for the device.
    """
    if corrupted_rows not in (None, "all", "chosen"):
        raise ValueError(f"corrupted_rows must be None, 'all' or 'chosen', got {corrupted_rows!r}")
    index = batch["image_index"]
    rows = index.repeat(2)  # chosen rows, then rejected rows: same images
    clean_px = batch["pixel_values"]
    # Both branches with gradient, or both without (a reference, no_grad): one vision call, and for TPO one trunk call.
    same_grad = corrupted_rows is not None and (corrupted_grad or not torch.is_grad_enabled())
    corrupted_feats = None
    if same_grad:
        feats = encode_images(llava, torch.cat([clean_px, batch["corrupted_pixel_values"]]))
        clean_feats, corrupted_feats = feats[: len(clean_px)], feats[len(clean_px) :]
    else:
        clean_feats = encode_images(llava, clean_px)
    placeholders = _image_placeholders(host.input_ids, image_token_id(llava.model), clean_feats)

    packs = {}  # by row count: TPO's corrupted branch reuses the clean branch's packing
    # One token-embedding lookup for both branches (they differ only at the image placeholders, which each
    # branch fills with its own features): one embedding gradient in backward instead of one per branch.
    embeds = llava.model.get_input_embeddings()(batch["input_ids"]) if corrupted_rows is not None else None

    def run(n: int, feats: torch.Tensor, second: torch.Tensor | None = None):
        """The grid of the first n rows on the images `feats`; with `second`, the grids on both images from one
        trunk call (the rows stacked: a second padded batch after the first)."""
        ids, mask = batch["input_ids"][:n], batch["attention_mask"][:n]
        if packing is not None and n not in packs:
            packs[n] = packing.pack(host.input_ids[:n], host.attention_mask[:n], host.has_target[:n], window,
                                    pairs=n == len(rows), device=ids.device)
        pack = packs.get(n)
        image_tokens = int(placeholders[:n].sum())  # host tensors: no wait
        tokens = None if embeds is None else embeds[:n]
        feats = feats[rows[:n]]
        if second is not None:
            if pack is not None:
                pack = pack.twice(ids.numel())
            ids, mask = ids.repeat(2, 1), mask.repeat(2, 1)
            tokens = None if tokens is None else tokens.repeat(2, 1, 1)
            feats = torch.cat([feats, second[rows[:n]]])
            image_tokens *= 2
        hidden = backbone_hidden(llava, ids, mask, feats, pack, tokens, image_tokens)
        grid = hidden[:, window] if pack is None else pack.responses(hidden)
        return grid if second is None else grid.chunk(2)

    if corrupted_rows == "all" and same_grad:
        hidden, corrupted_hidden = run(len(rows), clean_feats, corrupted_feats)
        return hidden, corrupted_hidden
    hidden = run(len(rows), clean_feats)
    corrupted_hidden = None
    if corrupted_rows is not None:
        with torch.no_grad() if not corrupted_grad else contextlib.nullcontext():
            if corrupted_feats is None:
                corrupted_feats = encode_images(llava, batch["corrupted_pixel_values"])
            corrupted_hidden = run(len(rows) if corrupted_rows == "all" else len(index), corrupted_feats)
    return hidden, corrupted_hidden


def _image_placeholders(input_ids: torch.Tensor, token_id: int, features: torch.Tensor) -> torch.Tensor:
    """(2B,) image placeholders of each row of the (2B, T) host `input_ids`, after checking that every row holds one
    image's (`features`: (U, image_tokens, D)): the features are scattered into the placeholders in order, so a row
    with more placeholders would silently take the next row's image features, where the total still matches."""
    counts = (input_ids == token_id).sum(1)
    if features.dim() != 3:
        return counts
    bad = (counts != features.shape[1]).nonzero().flatten().tolist()
    if bad:
        r, pairs = bad[0], input_ids.shape[0] // 2
        raise ValueError(
            f"pair {r % pairs}'s {'chosen' if r < pairs else 'rejected'} row holds {int(counts[r])} image placeholders "
            f"(token id {token_id}), where each row holds its pair's one image: {features.shape[1]} placeholders, as "
            f"TPOCollator writes them"
        )
    return counts


class HostBatch(NamedTuple):
    """A host copy of a batch's integer tensors, from one device-to-host copy (one wait on CUDA): everything the
    step plans on the host (the images' bounds, the response window, the packing) reads these."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_index: torch.Tensor
    has_target: torch.Tensor  # (R, T) bool: the shifted labels are not ignore_index
    targets: torch.Tensor  # (R, T) the shifted labels


HOST_KEYS = ("input_ids", "attention_mask", "labels", "image_index")
# The last batch's host copy, by the identity and version of its tensors: the reference pass and the policy pass of
# one step read the same batch, and the second read would wait for the first pass's whole trunk on the device.
_LAST_HOST: list = []


def host_batch(batch: dict[str, torch.Tensor], ignore_index: int) -> HostBatch:
    """The batch's `HostBatch`: one device-to-host copy, or none when the step's other pass already made it (the same
    tensors, none modified in place since)."""
    if _LAST_HOST:
        (*refs, ignore), host = _LAST_HOST
        if ignore == ignore_index and all(r() is batch[k] and v == batch[k]._version
                                          for (r, v), k in zip(refs, HOST_KEYS, strict=True)):
            return host
    return _remember(batch, host_copy(*(batch[k] for k in HOST_KEYS)), ignore_index)


def seed_host_batch(batch: dict[str, torch.Tensor], host_tensors: dict[str, torch.Tensor], ignore_index: int) -> None:
    """Record `host_tensors` (the CPU tensors a batch was moved to the device from: `TPOTrainer._prepare_inputs`) as
    the host copy of `batch`, so that the step reads nothing back to plan (copies: the caller keeps its own)."""
    _remember(batch, [host_tensors[k].clone() for k in HOST_KEYS], ignore_index)


def _remember(batch: dict[str, torch.Tensor], host_tensors: list[torch.Tensor], ignore_index: int) -> HostBatch:
    """The `HostBatch` of `host_tensors` (the batch's `HOST_KEYS`, on the host), kept as the copy of `batch`'s
    tensors, by their identity and version."""
    ids, mask, labels, index = host_tensors
    targets = shift_labels(labels, ignore_index)
    host = HostBatch(ids, mask, index, targets != ignore_index, targets)
    if any(batch[k].is_inference() for k in HOST_KEYS):
        # tensors made under torch.inference_mode track no version, so an in-place change could not be seen: not kept
        _LAST_HOST.clear()
        return host
    _LAST_HOST[:] = [[(weakref.ref(batch[k]), batch[k]._version) for k in HOST_KEYS] + [ignore_index], host]
    return host


def grid_rows(
    targets: torch.Tensor, host: HostBatch, window: slice, vocab_size: int, ignore_index: int
) -> torch.Tensor:
    """The flat indices of the response grid's target-carrying rows (`targets`: the (R, T') grid on the device), with
    their count and range check taken from the host copy: a primitive given them (`valid_rows`) reads nothing
    back."""
    host_grid = host.targets[:, window]
    valid = host_grid != ignore_index
    check_target_range(host_grid, valid, vocab_size, ignore_index)  # host tensors: no wait
    return valid_row_index(targets.reshape(-1) != ignore_index, int(valid.sum()))


def check_batch_images(batch: dict[str, torch.Tensor], image_index: torch.Tensor | None = None) -> None:
    """A batch's rows and images agree: 2B rows (B chosen, then B rejected) for the B pairs of `image_index`,
    each of which names one of the `pixel_values` (and `corrupted_pixel_values`) images. `image_index`: a host
    copy of the batch's, read without waiting for the device."""
    rows = batch["input_ids"].shape[0]
    index = batch["image_index"] if image_index is None else image_index
    if index.dim() != 1 or rows != 2 * index.numel():
        raise ValueError(
            f"the batch has {rows} rows and an image_index of shape {tuple(index.shape)}: TPOCollator's layout is "
            "2B rows (the B chosen rows, then the B rejected rows) and image_index (B,), one image per pair"
        )
    if not index.numel():
        return
    low, high = torch.stack(torch.aminmax(index)).tolist()  # one read of the bounds (one host sync on CUDA)
    for key in ("pixel_values", "corrupted_pixel_values"):
        if key in batch and not 0 <= low <= high < len(batch[key]):
            raise ValueError(
                f"image_index holds {index.tolist()}, but {key} has {len(batch[key])} images: each pair's entry "
                f"must index one of them"
            )


def response_branches(
    llava: torch.nn.Module, batch: dict[str, torch.Tensor], options: StepOptions
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`(hidden, corrupted_hidden, targets)` of a batch cut to its response window, for the fused losses.

    hidden: (2B, T', D) on the clean image; corrupted_hidden: the rows `options.corrupted_rows`
    names on the corrupted image (None for DPO), with gradient only when `options.corrupted_grad`
    and gradient is enabled; targets: (2B, T') shifted labels. Prompt and image columns before the
    first response token are dropped (the lm_head work only ever sees response positions). The trunk
    runs packed per `options.shared_prefix` / `padding_free` where the model allows (`packing_mode`).
    """
    hidden, corrupted_hidden, targets, _, _ = _response_branches(llava, batch, options)
    return hidden, corrupted_hidden, targets


def _response_branches(llava, batch, options: StepOptions):
    """`response_branches`, plus the batch's host copy and the response window (for `grid_rows`)."""
    needed = ["input_ids", "attention_mask", "labels", "pixel_values", "image_index"]
    if options.corrupted_rows is not None:
        needed.append("corrupted_pixel_values")
    for key in needed:
        if key not in batch:
            raise KeyError(
                f"a {options.objective} batch needs {key!r} (build it with TPOCollator over a PreferenceDataset)"
            )
    host = host_batch(batch, options.ignore_index)  # the plan's one read-back (none for the step's second pass)
    check_batch_images(batch, host.image_index)
    window = response_window(host.targets, options.ignore_index)
    # every step, packed or not: a padded step would score an empty response 0, a label on padding at a padding
    # position, silently
    check_targets(host.attention_mask, host.has_target, paired=True)
    hidden, corrupted_hidden = branch_hidden(llava, batch, options.corrupted_rows, options.corrupted_grad, host,
                                             window, packing_mode(llava, options.shared_prefix, options.padding_free))
    targets = shift_labels(batch["labels"], options.ignore_index)
    return hidden, corrupted_hidden, targets[:, window].contiguous(), host, window


def plain_lm_head(llava: torch.nn.Module) -> torch.nn.Module:
    """`llava.lm_head`, whose `weight` and `bias` the fused losses read directly, refused where those are not
    what the head computes: an lm_head with an active, unmerged PEFT adapter (LoRA in `target_modules`) would
    have its adapter silently left out (PEFT's `weight` is the frozen base weight). Disabled adapters (the
    adapter reference) and `modules_to_save` (a trained copy: its `weight` is the active copy's) are fine."""
    head = llava.lm_head
    adapters = [a for a in getattr(head, "active_adapters", None) or [] if a in (getattr(head, "lora_A", None) or {})]
    other = hasattr(head, "base_layer") and not hasattr(head, "lora_A")
    if (adapters or other) and not getattr(head, "merged", False) and not getattr(head, "disable_adapters", False):
        raise ValueError(
            f"lm_head carries an active PEFT adapter ({type(head).__name__}), which the fused losses cannot see: "
            "they take the lm_head weight itself. Leave lm_head out of the adapter's target_modules (train it "
            "whole with modules_to_save=['lm_head'] if it must change), or merge the adapter first"
        )
    return head


def _full(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The lm_head weight (or bias) as a plain tensor in the compute dtype of the hidden states.

    Under FSDP2 the weight is already unsharded here when the lm_head belongs to the root's
    `fully_shard` group (the loss runs inside the root's forward). A weight that is still a
    `DTensor` means lm_head is its own `fully_shard` unit, whose forward never runs: its
    gradient would skip FSDP's reduce-scatter, so that is refused while training; without
    gradient (reference scores) its full tensor is gathered.
    """
    if t is None:
        return None
    if hasattr(t, "full_tensor"):
        if torch.is_grad_enabled() and t.requires_grad:
            raise RuntimeError(
                "lm_head.weight is a sharded DTensor inside the forward: lm_head was given its own fully_shard "
                "unit, whose forward never runs with a fused loss. Shard lm_head with the root module "
                "(fully_shard(model) after the decoder layers, not fully_shard(model.lm_head))."
            )
        t = t.full_tensor()
    return t if t.dtype == dtype else t.to(dtype)


class _Zero3GatheredLoss(torch.autograd.Function):
    """The fused loss on a ZeRO-3 partitioned lm_head, applied while the weight is gathered (so autograd
    records its full shape). With `grad_mode="fused"` the gradients are computed in the forward, while
    the weight is gathered anyway, and backward only scales them: one gather, no recompute. With
    "recompute" the forward runs without gradient and backward gathers again and differentiates.

    Returns the loss and the metric values stacked (not differentiable); their names are appended to
    the list `keys`.
    """

    @staticmethod
    def forward(ctx, loss_fn, keys, fused, weight, bias, hidden, corrupted_hidden):
        need = ctx.needs_input_grad[3:7]
        ctx.loss_fn, ctx.weight, ctx.bias, ctx.fused, ctx.grads = loss_fn, weight, bias, fused, None
        if fused:
            out, ctx.grads = _loss_and_grads(loss_fn, (weight, bias, hidden, corrupted_hidden), need, None)
        else:
            with torch.no_grad():
                out = loss_fn(weight.detach(), None if bias is None else bias.detach(), hidden, corrupted_hidden)
            ctx.save_for_backward(hidden, corrupted_hidden)
        keys.extend(sorted(out.metrics))
        metrics = torch.stack([out.metrics[k].detach().float().reshape(()) for k in keys])
        ctx.mark_non_differentiable(metrics)
        return out.loss.detach(), metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        if ctx.fused:
            return (None, None, None, *take_stored_grads(ctx, grad_loss))
        hidden, corrupted_hidden = ctx.saved_tensors
        with gathered([ctx.weight, ctx.bias]):
            _, grads = _loss_and_grads(ctx.loss_fn, (ctx.weight, ctx.bias, hidden, corrupted_hidden),
                                       ctx.needs_input_grad[3:7], grad_loss)
        return (None, None, None, *grads)


def _loss_and_grads(loss_fn, inputs, need, grad_loss):
    """loss_fn's output on detached copies of (weight, bias, hidden, corrupted_hidden) and the gradients
    of its loss (scaled by grad_loss, or 1) with respect to those flagged in `need`; fresh tensors that
    outlive a gathered weight's storage."""
    with torch.enable_grad():
        leaves = [None if x is None else x.detach().requires_grad_(bool(n)) for x, n in zip(inputs, need, strict=True)]
        out = loss_fn(*leaves)
        wanted = [x for x in leaves if x is not None and x.requires_grad]
        grads = iter(torch.autograd.grad(out.loss, wanted, grad_loss, allow_unused=True) if wanted else ())
        return out, [next(grads) if x is not None and x.requires_grad else None for x in leaves]


def sequence_reference_scores(
    llava: torch.nn.Module, batch: dict[str, torch.Tensor], options: StepOptions
) -> torch.Tensor:
    """Reference sequence scores S_ref of the batch under `llava` (no gradient).

    TPO: (2B,) `sum_t m_t (logp_t + log c_t)` with the model's own clean and corrupted branches;
    DPO: (2B,) `sum_t m_t logp_t`; POVID: (3B,) `(S_w, S_l, S_n)` with the model's own corrupted-image
    argmax (`povid_reference_scores`). Averages instead of sums with `average_log_prob`.
    """
    with torch.no_grad():
        hidden, corrupted_hidden, targets, host, window = _response_branches(llava, batch, options)
        lm_head = plain_lm_head(llava)
        opts = dict(average_log_prob=options.average_log_prob, ignore_index=options.ignore_index,
                    backend=options.backend)
        with gathered([lm_head.weight, lm_head.bias]):
            weight = _full(lm_head.weight, hidden.dtype)
            bias = _full(lm_head.bias, hidden.dtype)
            if options.objective == "povid":
                return povid_reference_scores(weight, hidden, corrupted_hidden, targets, bias, **opts)
            # counted on the host: the scoring reads nothing back, so the host goes on to the policy's pass while
            # the device still runs the reference's
            rows = grid_rows(targets, host, window, weight.shape[0], options.ignore_index)
            if options.objective == "tpo":
                return reference_sequence_scores(
                    weight, hidden, corrupted_hidden, targets, bias, weighting=options.weighting,
                    offset=options.offset, valid_rows=rows, check_rows=False, **opts,
                )
            from tpo_fast import token_stats

            flat = targets.reshape(-1)
            stats = token_stats(hidden.reshape(flat.numel(), -1), weight, flat, bias, None,
                                options.ignore_index, backend=options.backend, valid_rows=rows, check_rows=False)
            mask = (targets != options.ignore_index).float()
            scores = (stats.logprobs.view(targets.shape) * mask).sum(-1)
            return scores / mask.sum(-1).clamp_min(1) if options.average_log_prob else scores


def policy_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    options: StepOptions,
    ref_seq_scores: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The loss of one batch under the policy `model` (a LLaVA model, possibly inside PEFT).

    `ref_seq_scores` ((2B,), or (3B,) for POVID) come from a separate reference model or a cache;
    with `options.reference == "adapter"` they are computed here with the LoRA adapter disabled.
    Returns `{"loss": scalar, "metrics": {name: scalar tensor}, "tokens": response tokens}`.
    """
    llava = unwrap_llava(model)
    if options.reference == "adapter":
        if not hasattr(model, "disable_adapter"):
            raise ValueError("reference='adapter' needs a PEFT model (pass peft_config or a PeftModel)")
        with adapters_disabled(model):
            ref_seq_scores = sequence_reference_scores(llava, batch, options)
    if options.reference != "none" and ref_seq_scores is None:
        raise ValueError(f"reference={options.reference!r} needs reference scores for the batch; none were given")

    device_type = batch["input_ids"].device.type
    with shared_lora_inputs(llava, device_type) if options.lean_activations else contextlib.nullcontext():
        hidden, corrupted_hidden, targets = response_branches(llava, batch, options)
    common = dict(
        ref_seq_scores=ref_seq_scores, beta=options.beta, loss_type=options.loss_type,
        label_smoothing=options.label_smoothing, reference_free=options.reference == "none",
        average_log_prob=options.average_log_prob, ignore_index=options.ignore_index, backend=options.backend,
        grad_mode=options.grad_mode,
    )

    def loss_fn(weight, bias, h, hc):
        if options.objective == "tpo":
            return tpo_loss(
                weight, h, hc, targets, bias, weighting=options.weighting, offset=options.offset,
                detach_weights=options.detach_weights, **common,
            )
        if options.objective == "povid":
            return povid_loss(weight, h, hc, targets, bias, noise_weight=options.noise_weight, **common)
        return dpo_loss(weight, h, targets, bias, **common)

    lm_head = plain_lm_head(llava)
    if is_zero3(lm_head.weight):
        keys: list[str] = []
        fused = uses_fused_gradient(options.grad_mode, options.backend, hidden.device, lm_head.weight.dtype)
        with gathered([lm_head.weight, lm_head.bias]):
            loss, values = _Zero3GatheredLoss.apply(
                loss_fn, keys, fused, lm_head.weight, lm_head.bias, hidden, corrupted_hidden
            )
        metrics = dict(zip(keys, values.unbind(0), strict=False))
    else:
        out = loss_fn(_full(lm_head.weight, hidden.dtype), _full(lm_head.bias, hidden.dtype), hidden, corrupted_hidden)
        loss, metrics = out.loss, {k: v.detach() for k, v in out.metrics.items()}
    tokens = (targets != options.ignore_index).sum()
    return {"loss": loss, "metrics": metrics, "tokens": tokens}


def _routed_signature(original) -> inspect.Signature | None:
    """The class forward's signature plus the keyword-only `tpo_*` arguments.

    `generate` checks its inputs (`pixel_values`, ...) against `inspect.signature(model.forward)`, so
    a routed model must keep advertising the original arguments to generate after training.
    """
    try:
        sig = inspect.signature(original)
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    var_kw = [p for p in params if p.kind is p.VAR_KEYWORD]
    head = [p for p in params if p.kind is not p.VAR_KEYWORD and not p.name.startswith("tpo_")]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
        for name, default in (("tpo_batch", None), ("tpo_mode", "policy"), ("tpo_ref_scores", None))
    ]
    try:
        return sig.replace(parameters=head + extra + var_kw)
    except ValueError:
        return None


def route_forward(model: torch.nn.Module, options: StepOptions) -> torch.nn.Module:
    """Patch `model.forward` (this instance only) so that the TPO step runs inside the forward.

    After patching, `model(tpo_batch=batch)` returns `policy_loss(...)`'s dict (with
    `tpo_ref_scores=...` passed through), `model(tpo_batch=batch, tpo_mode="reference")` returns
    `sequence_reference_scores(...)`, and every other call reaches the original forward. Wrappers
    applied afterwards (DDP, a DeepSpeed engine, FSDP2's `fully_shard`, accelerate's autocast)
    call this forward through their own, so their hooks run around the step. Idempotent; the
    options can be replaced by calling it again.
    """
    model._tpo_step_options = options
    if getattr(model, "_tpo_routed", False):
        return model
    def forward(self, *args, tpo_batch=None, tpo_mode="policy", tpo_ref_scores=None, **kwargs):
        if tpo_batch is None:
            # The class's forward, not a captured bound method: a deep copy of the model stays
            # bound to itself.
            return type(self).forward(self, *args, **kwargs)
        opts = self._tpo_step_options
        if tpo_mode == "reference":
            return sequence_reference_scores(unwrap_llava(self), tpo_batch, opts)
        if tpo_mode != "policy":
            raise ValueError(f"tpo_mode must be 'policy' or 'reference', got {tpo_mode!r}")
        return policy_loss(self, tpo_batch, opts, tpo_ref_scores)

    forward.__signature__ = _routed_signature(type(model).forward)
    model.forward = types.MethodType(forward, model)
    model._tpo_routed = True
    return model
