"""FiSAO-style token-level alignment (arXiv 2410.14148, ICLR 2025) on the fused token primitive.

No official code exists. tpo_fast treats FiSAO as (docs/math.md): a per-token reward `r_t` from a
pluggable verifier, plus a token-level policy-gradient objective with a KL to the reference,
trained by rollout-then-update. The choices made here, where the paper leaves room:

Verifier (`VisionEncoderVerifier`, the default `TokenVerifier`):
- The similarity of a token to the image uses the *model's own* vision encoder and projector:
  the image's projected patch features (`get_image_features`, already in the language model's
  embedding space) against the token's input embedding, cosine similarity, maximum over patches
  (an object appears in some region, not everywhere).
- Only *object tokens* are scored: tokens whose text (tokenizer markers such as "▁" / "Ġ" / "##"
  stripped, lower-cased) is in an object vocabulary (the 80 COCO categories' head nouns, their common
  synonyms and their irregular plurals by default), or is a regular plural of one (`is_object_word`:
  "es" after s, x, z, ch, sh as in "buses", "boxes", "benches", else "s": "cares" is not "car"). Every
  other token gets 0.
  Multi-token object words are not matched; LLaMA-family tokenizers keep the common nouns whole.
- Calibration: `calibrate` measures the similarity of known-correct and known-hallucinated object
  words for a set of images and sets `low` = mean hallucinated similarity, `high` = mean correct
  similarity (it fails when they do not separate, `high <= low`). An object token's reward is
  `clamp((2 s - high - low) / (high - low), -1, 1)` (`mode="linear"`: -1 at `low`, +1 at `high`) or
  `+1 / 0 / -1` above `high`, between, below `low` (`mode="step"`).

Objective: `token_pg_loss` (a clipped token policy gradient with a KL to the reference), which
lives in the loss layer, `tpo_fast.loss.fisao`, and is re-exported here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from tpo_fast.loss._checks import real_scalar
from tpo_fast.loss.fisao import (  # noqa: F401  (the loss lives in the loss layer; re-exported here)
    ADVANTAGES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    check_advantage_options,
    check_pg_options,
    token_advantages,
    token_pg_loss,
)
from tpo_fast.ops import token_stats
from tpo_fast.ops._validate import _desc as _shape  # what an error says was given
from tpo_fast.trainer.adapters import adapters_disabled

logger = logging.getLogger("tpo_fast")

REWARD_MODES = ("linear", "step")

# Head nouns of the 80 COCO categories and common synonyms (the objects hallucination benchmarks count), one
# token-sized word each: a two-word category contributes its noun ("fire hydrant" -> "hydrant", "hot dog" -> "dog",
# "teddy bear" -> "bear"), never its modifier ("hot", "stop", "fire", "parking", "teddy" are no objects). "traffic
# light" is left out: "light" is mostly an adjective ("light blue"). The irregular plurals, which `is_object_word`'s
# "s" / "es" rule does not reach, are listed: men, women, children, people, knives, mice (sheep, skis and scissors
# are their own plurals; "ski" is the singular of "skis").
COCO_OBJECTS = frozenset("""
person man men woman women boy girl child children people bicycle bike car motorcycle airplane plane bus train
truck boat hydrant sign meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella
handbag tie suitcase frisbee ski skis snowboard ball kite bat glove skateboard surfboard racket bottle glass cup fork
knife knives spoon bowl banana apple sandwich orange broccoli carrot pizza donut cake chair couch sofa plant bed table
toilet tv television laptop mouse mice remote keyboard phone microwave oven toaster sink refrigerator fridge book
clock vase scissors toothbrush drier dryer
""".split())
# Endings after which English spells the plural "-es" (bus -> buses, box -> boxes, bench -> benches); after any other
# ending the plural is "-s", so "cares" is "care" + "s", not "car" + "es".
ES_PLURAL_AFTER = ("s", "x", "z", "ch", "sh")


@runtime_checkable
class TokenVerifier(Protocol):
    """A source of per-token rewards for FiSAO.

    `token_rewards(images, token_ids, tokenizer)`: `images` a sequence of R images (PIL), `token_ids`
    a sequence of R 1-D int64 tensors (the response tokens of each rollout), `tokenizer` the
    model's tokenizer. Returns an fp32 (N,) tensor, N = the total number of tokens, the rows'
    tokens concatenated in order. 0 means "no opinion".
    """

    def token_rewards(self, images: Sequence[Any], token_ids: Sequence[torch.Tensor], tokenizer: Any) -> torch.Tensor:
        ...


def token_word(token: str) -> str:
    """A token's text as a lower-case word: tokenizer space markers, then surrounding whitespace and ASCII
    punctuation stripped ("▁Dog," -> "dog"; a punctuation-only token gives "")."""
    return re.sub(r"^(▁|Ġ|##)+", "", token).strip().strip(string.punctuation).lower()


def is_object_word(word: str, objects: frozenset[str] | set[str]) -> bool:
    """True when `word` is in `objects` or is the regular plural of a word in it: "es" after s, x, z, ch or sh
    ("buses", "boxes", "benches"), else "s" ("dogs"). Irregular plurals ("mice", "knives") must be in `objects`
    themselves, as they are in `COCO_OBJECTS`; "cares" is not a plural of "car", nor "manes" of "man"."""
    if not word:
        return False
    if word in objects:
        return True
    stem = word[:-2]
    if word.endswith("es") and stem.endswith(ES_PLURAL_AFTER) and stem in objects:
        return True
    return word.endswith("s") and word[:-1] in objects


def check_thresholds(low: float, high: float) -> None:
    """Raise ValueError unless the calibration thresholds are finite numbers with `high > low`: an infinite one makes
    the linear reward (2 s - high - low) / (high - low) NaN, and the update trains on NaN."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"the calibration thresholds must be finite numbers, got low={low}, high={high}")
    if not high > low:
        raise ValueError(f"the calibration thresholds need high > low, got low={low}, high={high}")


def load_calibration(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a calibration file: a JSON list of `{"image": PATH, "correct": [words], "hallucinated":
    [words]}` (the images are not opened). A bad file or record raises ValueError naming the file and the record's
    index."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read ({e})") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: must hold a non-empty JSON list of records, got "
                         f"{'an empty list' if data == [] else type(data).__name__}")
    for i, record in enumerate(data):
        where = f"{path}: record #{i}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: not an object but {type(record).__name__}")
        if not isinstance(record.get("image"), str):
            raise ValueError(f"{where}: needs \"image\" (a path), got keys {sorted(record)}")
        for key in ("correct", "hallucinated"):
            words = record.get(key)
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise ValueError(f"{where}: needs \"{key}\" (a list of words), got "
                                 f"{'no such key' if key not in record else repr(words)}")
    return data


class VisionEncoderVerifier:
    """The default `TokenVerifier`: object tokens against the image in the LLaVA model's own embedding space.

    Args:
        model: a LLaVA-style model (`.model.get_image_features`, input embeddings); a frozen copy (the
            reference) keeps the rewards fixed while the policy trains.
        image_processor: turns PIL images into the model's `pixel_values` (the processor's
            `image_processor`).
        objects: the object vocabulary (default `COCO_OBJECTS`).
        low, high: calibration thresholds (see `calibrate`); both or neither, finite, `high > low`.
        mode: "linear" (default) or "step", see the module docstring.
    """

    def __init__(
        self,
        model: nn.Module,
        image_processor: Any,
        objects: Sequence[str] | None = None,
        low: float | None = None,
        high: float | None = None,
        mode: str = "linear",
    ) -> None:
        from tpo_fast.trainer.model import unwrap_llava

        if mode not in REWARD_MODES:
            raise ValueError(f"mode must be one of {REWARD_MODES}, got {mode!r}")
        if (low is None) != (high is None):
            raise ValueError("pass both calibration thresholds low and high, or neither (then call calibrate)")
        if low is not None:
            check_thresholds(low, high)
        self.llava = unwrap_llava(model)
        self.image_processor = image_processor
        self.objects = frozenset(w.lower() for w in (COCO_OBJECTS if objects is None else objects))
        self.low, self.high = low, high
        self.mode = mode

    @torch.no_grad()
    def image_features(self, images: Sequence[Any]) -> torch.Tensor:
        """(R, P, D) projected patch features of R images."""
        from tpo_fast.trainer.model import encode_images

        param = next(self.llava.parameters())
        pixels = self.image_processor(list(images), return_tensors="pt")["pixel_values"]
        return encode_images(self.llava, pixels.to(device=param.device, dtype=param.dtype)).float()

    @torch.no_grad()
    def similarities(self, images: Sequence[Any], token_ids: Sequence[torch.Tensor]) -> torch.Tensor:
        """fp32 (N,) cosine similarity of every token's input embedding to its image (max over patches)."""
        if len(images) != len(token_ids):
            raise ValueError(f"got {len(images)} images for {len(token_ids)} token sequences; give one image per row")
        feats = nn.functional.normalize(self.image_features(images), dim=-1)  # [R, P, D]
        embed = self.llava.get_input_embeddings()
        out = []
        for r, ids in enumerate(token_ids):
            e = nn.functional.normalize(embed(ids.to(embed.weight.device).long()).float(), dim=-1)  # [n, D]
            out.append((e @ feats[r].t()).amax(-1))
        return torch.cat(out) if out else torch.zeros(0)

    def object_mask(self, token_ids: Sequence[torch.Tensor], tokenizer: Any) -> torch.Tensor:
        """bool (N,): which tokens are object words."""
        flags = []
        for ids in token_ids:
            tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
            flags.extend(is_object_word(token_word(t), self.objects) for t in tokens)
        return torch.tensor(flags, dtype=torch.bool)

    def _word_token(self, word: str, tokenizer: Any) -> int | None:
        for text in (" " + word, word):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
                return ids[0]
        return None

    def calibrate(
        self,
        images: Sequence[Any],
        correct_objects: Sequence[Sequence[str]],
        hallucinated_objects: Sequence[Sequence[str]],
        tokenizer: Any,
    ) -> tuple[float, float]:
        """Set and return `(low, high)` = mean similarity of hallucinated / correct object words.

        `correct_objects[i]` lists objects present in `images[i]`, `hallucinated_objects[i]` objects
        absent from it. Words that are not a single known token are skipped (with a warning).
        """
        if not len(images) == len(correct_objects) == len(hallucinated_objects):
            raise ValueError("calibrate needs one list of correct and one of hallucinated objects per image")
        sims = {}
        skipped = set()
        for name, lists in (("correct", correct_objects), ("hallucinated", hallucinated_objects)):
            rows, row_images = [], []
            for image, words in zip(images, lists, strict=True):
                ids = []
                for word in words:
                    tok = self._word_token(word, tokenizer)
                    if tok is None:
                        skipped.add(word)
                    else:
                        ids.append(tok)
                if ids:
                    rows.append(torch.tensor(ids))
                    row_images.append(image)
            if not rows:
                raise ValueError(f"no {name} object word is a single token of this tokenizer; cannot calibrate")
            sims[name] = self.similarities(row_images, rows)
        if skipped:
            logger.warning("calibrate: skipped words that are not one token: %s", sorted(skipped))
        low, high = float(sims["hallucinated"].mean()), float(sims["correct"].mean())
        if not high > low:
            raise ValueError(
                f"the verifier does not separate correct from hallucinated objects (mean similarity {high:.4f} vs "
                f"{low:.4f}); use more calibration data, another encoder, or pass low/high yourself"
            )
        self.low, self.high = low, high
        return low, high

    def rewards_from_similarity(self, sims: torch.Tensor, object_mask: torch.Tensor) -> torch.Tensor:
        """Calibrated fp32 rewards in [-1, 1] for object tokens, 0 elsewhere."""
        if self.low is None:
            raise RuntimeError("the verifier is not calibrated: call calibrate(...) or pass low and high")
        if self.mode == "linear":
            r = ((2 * sims - self.high - self.low) / (self.high - self.low)).clamp(-1, 1)
        else:
            r = (sims >= self.high).float() - (sims <= self.low).float()
        return torch.where(object_mask.to(r.device), r, torch.zeros((), device=r.device))

    def token_rewards(self, images: Sequence[Any], token_ids: Sequence[torch.Tensor], tokenizer: Any) -> torch.Tensor:
        """fp32 (N,) rewards of the concatenated tokens (see `TokenVerifier`)."""
        if self.low is None:
            raise RuntimeError("the verifier is not calibrated: call calibrate(...) or pass low and high")
        sims = self.similarities(images, token_ids)
        return self.rewards_from_similarity(sims, self.object_mask(token_ids, tokenizer)).cpu()


@dataclass
class Rollout:
    """Sampled responses, laid out for teacher-forced scoring.

    input_ids, attention_mask, labels: (R, L) right-padded prompt + response rows; labels hold the
    response tokens (unshifted, the Hugging Face convention), `ignore_index` elsewhere.
    pixel_values: (R, C, H, W). image_index: (R,) = arange(R). response_ids: R 1-D tensors (the
    response tokens, eos included when generated). images: the R PIL images.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    image_index: torch.Tensor
    response_ids: list[torch.Tensor]
    images: list[Any]

    def batch(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels,
                "pixel_values": self.pixel_values, "image_index": self.image_index}


def format_prompt(processor: Any, prompt: str, template: str = "USER: <image>\n{prompt} ASSISTANT:") -> str:
    """The LLaVA-1.5 prompt for one question (an image placeholder inside the question is removed)."""
    image_token = getattr(processor, "image_token", "<image>")
    return template.format(prompt=prompt.replace(image_token, "").strip())


def no_sample_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Token ids a rollout must never produce: the image placeholder (it would need image features) and padding."""
    ids = {getattr(model.config, "image_token_id", None), getattr(model.config, "image_token_index", None)}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        ids.add(tokenizer.pad_token_id)
    return sorted(i for i in ids if i is not None)


def check_temperature(temperature: float) -> float:
    """A sampling temperature as a float: finite and > 0 (ValueError), a real scalar (TypeError: the loss options'
    rule, `real_scalar`)."""
    temperature = real_scalar("temperature", temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0 (1: the policy itself), got {temperature!r}")
    return float(temperature)


@torch.no_grad()
def rollout(
    model: nn.Module,
    processor: Any,
    images: Sequence[Any],
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    ignore_index: int = -100,
) -> Rollout:
    """Sample one response per (image, prompt) with Hugging Face `generate` (one row at a time: no padding games).

    `do_sample`: from softmax(logits / temperature), nucleus-truncated by `top_p` (1: every token), never top-k
    truncated (`top_k=0`, over Hugging Face's default of 50); only the image placeholder and the pad token
    (`no_sample_ids`) are suppressed. Otherwise greedy."""
    if len(images) != len(prompts) or not prompts:
        raise ValueError(f"rollout needs as many images as prompts (and at least one), got {len(images)} and "
                         f"{len(prompts)}")
    if do_sample:
        temperature = check_temperature(temperature)
    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    rows, responses, pixels = [], [], []
    for image, prompt in zip(images, prompts, strict=True):
        inputs = processor(text=[format_prompt(processor, prompt)], images=[image], return_tensors="pt").to(device)
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
            # no top-k: Hugging Face's global default top_k=50 would truncate the policy the gradient is taken of
            top_k=0 if do_sample else None,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            suppress_tokens=no_sample_ids(model, tokenizer),
        )
        prompt_ids = inputs["input_ids"][0]
        response = out[0, prompt_ids.numel():]
        if tokenizer.eos_token_id is not None:
            hits = (response == tokenizer.eos_token_id).nonzero()
            if hits.numel():
                response = response[: int(hits[0]) + 1]
        rows.append((prompt_ids, response))
        responses.append(response.cpu())
        pixels.append(inputs["pixel_values"][0])
    length = max(p.numel() + r.numel() for p, r in rows)
    n = len(rows)
    # padding slots are masked out of attention and labels: any id will do where the tokenizer has no pad token
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids = torch.full((n, length), pad, dtype=torch.long, device=device)
    labels = torch.full((n, length), ignore_index, dtype=torch.long, device=device)
    attention_mask = torch.zeros((n, length), dtype=torch.long, device=device)
    for i, (p, r) in enumerate(rows):
        ids = torch.cat([p, r])
        input_ids[i, : ids.numel()] = ids
        labels[i, p.numel() : ids.numel()] = r
        attention_mask[i, : ids.numel()] = 1
    return Rollout(input_ids, attention_mask, labels, torch.stack(pixels), torch.arange(n, device=device),
                   responses, list(images))


def response_hidden(
    model: nn.Module, batch: dict[str, torch.Tensor], ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`(hidden (R, T', D), targets (R, T'), weight, bias)` of a batch's response window, for the primitive.

    Gradient flows when enabled. Rows use `pixel_values[image_index]`. An lm_head with an active, unmerged PEFT
    adapter raises ValueError (its `weight` is the frozen base weight: the adapter would be silently left out).
    """
    from tpo_fast.trainer.model import (
        backbone_hidden,
        encode_images,
        plain_lm_head,
        response_window,
        shift_labels,
        unwrap_llava,
    )

    llava = unwrap_llava(model)
    head = plain_lm_head(llava)  # an active PEFT adapter on lm_head would be left out: refused
    targets = shift_labels(batch["labels"], ignore_index)
    window = response_window(targets, ignore_index)
    feats = encode_images(llava, batch["pixel_values"])
    hidden = backbone_hidden(llava, batch["input_ids"], batch["attention_mask"], feats[batch["image_index"]])
    return hidden[:, window], targets[:, window].contiguous(), head.weight, head.bias


def token_logprobs_of(
    model: nn.Module, batch: dict[str, torch.Tensor], ignore_index: int = -100, backend: str = "auto",
    temperature: float = 1.0,
) -> torch.Tensor:
    """(R, T') fp32 per-token log-probs of the batch's responses under `model`, no gradient; with `temperature`
    those of softmax(logits / temperature), the policy a rollout at that temperature samples from."""
    with torch.no_grad():
        hidden, targets, weight, bias = tempered(*response_hidden(model, batch, ignore_index), temperature)
        stats = token_stats(hidden.flatten(0, 1), weight, targets.reshape(-1), bias=bias,
                            ignore_index=ignore_index, backend=backend)
        return stats.logprobs.view(targets.shape)


def tempered(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`response_hidden`'s output with the logits divided by `temperature`: `(h / T) W^T + b / T` (differentiable
    in `hidden`; the weight is left as is, so its gradient is the one of the tempered policy). T = 1: unchanged."""
    if temperature == 1.0:
        return hidden, targets, weight, bias
    return hidden / temperature, targets, weight, None if bias is None else bias / temperature


def rewards_to_grid(rewards: torch.Tensor, response_ids: Sequence[torch.Tensor], targets: torch.Tensor,
                    ignore_index: int = -100) -> torch.Tensor:
    """Scatter the verifier's (N,) rewards onto the (R, T') target grid, row by row in token order.

    Rewards that are not a real tensor, or not finite, raise: one NaN or inf reward makes the loss, every gradient
    and, after the optimizer step, every parameter NaN."""
    expected = sum(int(r.numel()) for r in response_ids)
    if not isinstance(rewards, torch.Tensor) or rewards.dtype == torch.bool or rewards.is_complex():
        raise TypeError(f"the verifier must return a real tensor of (N,) = ({expected},) rewards, "
                        f"got {_shape(rewards)}")
    if rewards.dim() != 1 or rewards.numel() != expected:
        raise ValueError(f"the verifier must return (N,) = ({expected},) rewards, one per response token, "
                         f"got {_shape(rewards)}")
    bad = (~torch.isfinite(rewards.float())).nonzero()
    if bad.numel():
        i, row, end = int(bad[0]), 0, int(response_ids[0].numel())
        while i >= end:
            row += 1
            end += int(response_ids[row].numel())
        raise ValueError(f"the verifier returned {bad.numel()} non-finite reward(s): the first, {float(rewards[i])}, "
                         f"at token {i} (row {row}); rewards must be finite fp32 numbers")
    grid = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
    offset = 0
    for i, ids in enumerate(response_ids):
        cols = (targets[i] != ignore_index).nonzero().squeeze(1)
        if cols.numel() != ids.numel():
            raise ValueError(f"row {i}: {cols.numel()} target positions for {ids.numel()} response tokens")
        grid[i, cols] = rewards[offset : offset + ids.numel()].to(grid.device).float()
        offset += ids.numel()
    return grid


def fisao_step(
    model: nn.Module,
    ref_model: nn.Module | None,
    processor: Any,
    verifier: TokenVerifier,
    optimizer: torch.optim.Optimizer,
    images: Sequence[Any],
    prompts: Sequence[str],
    *,
    ppo_epochs: int = 1,
    max_new_tokens: int = 32,
    do_sample: bool = True,
    temperature: float = 1.0,
    advantage: str = "reward",
    gamma: float = 1.0,
    whiten: bool = False,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.05,
    kl_estimator: str = "k3",
    aggregation: str = "token_mean",
    max_grad_norm: float | None = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
) -> dict[str, float]:
    """One FiSAO iteration: roll out, score every token with `verifier`, then `ppo_epochs` updates.

    The rollout policy's log-probs (`old_logprobs`) and the reference's are computed once, before the
    first update. `ref_model=None` with `kl_coef > 0` uses the PEFT model with its adapters
    disabled. With `do_sample`, every log-prob (the rollout policy's, the reference's and the current
    policy's) is one of softmax(logits / `temperature`), the policy the rollout samples from. Returns the
    metrics of the last update plus "reward/mean" and "reward/nonzero" (the fraction of tokens the verifier
    scored).
    """
    if not isinstance(ppo_epochs, int) or ppo_epochs < 1:
        raise ValueError(f"ppo_epochs must be an int >= 1, got {ppo_epochs!r}")
    check_pg_options(clip_eps, clip_eps_high, kl_coef, kl_estimator, aggregation)
    check_advantage_options(advantage, gamma)  # before the rollout, not after it
    # the policy the rollout samples from, softmax(logits / T), is the one whose log-probs the ratio, the KL and
    # the gradient use (greedy decoding: T plays no part)
    temperature = check_temperature(temperature) if do_sample else 1.0
    was_training = model.training
    model.eval()
    ro = rollout(model, processor, images, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample,
                 temperature=temperature, ignore_index=ignore_index)
    rewards = verifier.token_rewards(ro.images, ro.response_ids, processor.tokenizer)
    batch = ro.batch()
    old = token_logprobs_of(model, batch, ignore_index, backend, temperature)
    ref = None
    if kl_coef > 0:
        if ref_model is not None:
            ref = token_logprobs_of(ref_model, batch, ignore_index, backend, temperature)
        elif hasattr(model, "disable_adapter"):
            with adapters_disabled(model):
                ref = token_logprobs_of(model, batch, ignore_index, backend, temperature)
        else:
            raise ValueError("kl_coef > 0 needs a reference: pass ref_model, use a PEFT model, or set kl_coef=0")
    model.train(was_training)
    out = None
    for _ in range(ppo_epochs):
        hidden, targets, weight, bias = tempered(*response_hidden(model, batch, ignore_index), temperature)
        grid = rewards_to_grid(rewards, ro.response_ids, targets, ignore_index)
        adv = token_advantages(grid, targets != ignore_index, advantage, gamma, whiten)
        out = token_pg_loss(
            weight, hidden, targets, bias, advantages=adv, old_logprobs=old, ref_logprobs=ref, clip_eps=clip_eps,
            clip_eps_high=clip_eps_high, kl_coef=kl_coef, kl_estimator=kl_estimator, aggregation=aggregation,
            ignore_index=ignore_index, backend=backend,
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
        optimizer.step()
    metrics = {k: float(v) for k, v in out.metrics.items()}
    metrics["loss"] = float(out.loss.detach())
    metrics["reward/mean"] = float(rewards.float().mean()) if rewards.numel() else 0.0
    metrics["reward/nonzero"] = float((rewards != 0).float().mean()) if rewards.numel() else 0.0
    metrics["tokens"] = float(rewards.numel())
    return metrics
