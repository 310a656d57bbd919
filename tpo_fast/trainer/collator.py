"""Collate preference pairs into one TPO batch: chosen and rejected rows, clean and corrupted images."""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger("tpo_fast")

DEFAULT_PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"

_warned_split = False


def special_suffix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer appends to every text it encodes with special tokens: none for Llama's
    tokenizer.json, [eos] where `add_eos_token=True` or a post-processor like "<s> $A </s>" appends the EOS token."""
    probe = "a"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            suffix = with_special[start + len(plain):]
            return suffix if all(t in special for t in suffix) else []
    return []


def special_token_texts(tokenizer: Any, text: str) -> list[str]:
    """The special tokens of `tokenizer` ("</s>", "<pad>", ...) written as text in `text`, which the tokenizer would
    read as those tokens, not as characters."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    contents = {t.content for t in decoder.values() if getattr(t, "special", False) and t.content}
    contents.update(t for t in (getattr(tokenizer, "all_special_tokens", ()) or ()) if t)
    return sorted(t for t in contents if t in text)


def strip_suffix(ids: list[int], suffix: list[int]) -> list[int]:
    """`ids` without a trailing `suffix` (the special tokens `special_suffix` names), when they end with it."""
    return ids[: len(ids) - len(suffix)] if suffix and ids[-len(suffix):] == suffix else ids


def continuation_ids(tokenizer: Any, context: str, context_ids: list[int], text: str,
                     suffix: list[int] | None = None) -> list[int]:
    """The token ids `text` gets when it follows `context`, as a tokenizer splits `context + text` at once.

    `context_ids` are `tokenizer(context)`'s ids (special tokens included). Tokenizing `text` alone is not the
    same: a Llama SentencePiece tokenizer with the legacy prefix normalizer (Llama-2's) turns a response
    " Yes" alone into ["▁", "▁Yes"], where the whole conversation has ["▁Yes"]: the lone "▁" would become a
    trained target that generation never produces. When the joint ids do not start with `context_ids` (the
    tokenizer merged the context's last token with the text's first), the text is tokenized alone, with a
    warning the first time.

    Special tokens the tokenizer appends to every text (an EOS token with `add_eos_token=True`) end neither the
    context nor the continuation: they are not part of the text. A special token written as text inside `text`
    ("</s>", "<pad>") is read as its characters, never as the token: it is tokenized with special tokens split,
    as the continuation of the context after its last special token (the text a tokenizer normalizes together
    with `text`). `suffix`: `special_suffix(tokenizer)`, when the caller has it.
    """
    global _warned_split
    suffix = special_suffix(tokenizer) if suffix is None else suffix
    context_ids = strip_suffix(context_ids, suffix)
    split = bool(special_token_texts(tokenizer, text))
    if split:
        # The context after its last special token: what the tokenizer normalizes together with `text`.
        cut = 0
        for token in special_token_texts(tokenizer, context):
            cut = max(cut, context.rfind(token) + len(token))
        context = context[cut:]
        context_ids = strip_suffix(
            tokenizer(context, add_special_tokens=True, split_special_tokens=True)["input_ids"], suffix)
    kwargs = {"split_special_tokens": True} if split else {}
    joint = strip_suffix(tokenizer(context + text, add_special_tokens=True, **kwargs)["input_ids"], suffix)
    if joint[: len(context_ids)] == context_ids:
        return joint[len(context_ids):]
    if not _warned_split:
        logger.warning(
            "the tokenizer merges the prompt's last token with the response's first (prompt ends %r, response "
            "starts %r); responses are tokenized apart from the prompt", context[-12:], text[:12],
        )
        _warned_split = True
    return tokenizer(text, add_special_tokens=False, **kwargs)["input_ids"]


class TPOCollator:
    """Turn `PreferenceDataset` items into model inputs.

    The batch (B pairs, U distinct images, T the padded length):

    - `input_ids`, `attention_mask`, `labels`: (2B, T), the B chosen rows first, then the B
      rejected rows in the same order. `labels` are the input ids (unshifted, the Hugging Face
      convention) with `ignore_index` on image, prompt and padding positions.
    - `pixel_values`, `corrupted_pixel_values`: (U, C, H, W), each distinct image once (pairs that
      share an image and its seeded noise share one entry), so the vision tower runs once per image.
    - `image_index`: (B,) which of the U images each pair uses.
    - `index`: (B,) the records' indices in the source file (key of a cached reference).

    Args:
        processor: a `LlavaProcessor` (tokenizer + image processor + image-token expansion).
        prompt_template: format string with `{prompt}` and the image placeholder (default
            LLaVA-1.5's "USER: <image>\\n{prompt} ASSISTANT:"); an image placeholder inside the
            record's prompt is removed, the template places the image.
        response_prefix: prepended to every response (a space, as LLaVA-1.5's template expects). Each
            response is tokenized as the continuation of its prompt (`continuation_ids`), as in the whole
            conversation, so a SentencePiece tokenizer adds no lone "▁" token before it. A special token written
            as text in a response ("</s>") is trained as its characters (warned once), and an EOS token the
            tokenizer appends to every text (add_eos_token=True) never ends the prompt.
        max_length: longest row; responses are cut to fit, prompts (which carry the image tokens)
            never are: a prompt at or over max_length keeps one token of each response (warned once). None: no
            limit.
        ignore_index: label of positions without a target (default -100).
    """

    def __init__(
        self,
        processor,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        response_prefix: str = " ",
        max_length: int | None = None,
        ignore_index: int = -100,
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.image_token = getattr(processor, "image_token", "<image>")
        if "{prompt}" not in prompt_template or self.image_token not in prompt_template:
            raise ValueError(
                f"prompt_template must contain '{{prompt}}' and the image token {self.image_token!r}, "
                f"got {prompt_template!r}"
            )
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos or unk token)")
        self.prompt_template = prompt_template
        self.response_prefix = response_prefix
        self.max_length = max_length
        self.ignore_index = ignore_index
        self._warned_truncation = False
        self._warned_long_prompt = False
        self._warned_special_text = False
        self._warned_cut_alike = False
        self._suffix = special_suffix(self.tokenizer)  # what the tokenizer appends to every text: probed once
        patch_size = getattr(processor, "patch_size", None)
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(
                f"the processor's patch_size is {patch_size!r}, so the number of image tokens per image is unknown; "
                "set processor.patch_size = model.config.vision_config.patch_size and "
                "processor.vision_feature_select_strategy = model.config.vision_feature_select_strategy (an older "
                "llava-hf processor_config.json holds neither)"
            )

    def _num_image_tokens(self, pixel_values: torch.Tensor) -> int:
        p = self.processor
        height, width = pixel_values.shape[-2:]
        n = (height // p.patch_size) * (width // p.patch_size) + (p.num_additional_image_tokens or 0)
        if p.vision_feature_select_strategy == "default":
            n -= 1
        return n

    def _encode_pair(self, item: dict[str, Any], n_image_tokens: int) -> tuple[list[int], list[int], list[int]]:
        question = item["prompt"].replace(self.image_token, "").strip()
        prompt = self.prompt_template.format(prompt=question)
        prompt = prompt.replace(self.image_token, self.image_token * n_image_tokens)
        # An EOS token the tokenizer appends to every text (add_eos_token=True) would end the prompt, before the
        # response: the prompt is the start of the row, not a whole text.
        prompt_ids = strip_suffix(self.tokenizer(prompt, add_special_tokens=True)["input_ids"], self._suffix)
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        responses = []
        for name, text in (("chosen", item["chosen"]), ("rejected", item["rejected"])):
            if self.image_token in text:
                raise ValueError(
                    f"record #{item['index']}: the {name} response holds the image token {self.image_token!r}, "
                    "which the model would take for an image position; remove it from the response"
                )
            written = special_token_texts(self.tokenizer, text)
            if written and not self._warned_special_text:
                logger.warning(
                    "record #%s: the %s response holds %s, written as text: it is trained as those characters, not "
                    "as the tokenizer's special token%s (a decoding artefact in the data? remove it)",
                    item["index"], name, ", ".join(repr(t) for t in written), "s" if len(written) > 1 else "",
                )
                self._warned_special_text = True
            ids = continuation_ids(self.tokenizer, prompt, prompt_ids, self.response_prefix + text.strip(),
                                   self._suffix) + eos
            if self.max_length is not None and len(prompt_ids) + len(ids) > self.max_length:
                keep = max(1, self.max_length - len(prompt_ids))
                if keep == 1 and len(prompt_ids) >= self.max_length:
                    if not self._warned_long_prompt:
                        logger.warning(
                            "record #%d: its prompt is %d tokens with the image, and max_length=%d leaves its "
                            "responses no room: the row keeps the whole prompt and the first token of each response "
                            "(%d tokens), so a pair whose responses begin alike carries no preference; raise "
                            "max_length above the longest prompt", item["index"], len(prompt_ids), self.max_length,
                            len(prompt_ids) + 1,
                        )
                        self._warned_long_prompt = True
                elif not self._warned_truncation:
                    logger.warning(
                        "responses cut to fit max_length=%d (prompt of record #%d is %d tokens with the image); "
                        "raise max_length to train on whole responses", self.max_length, item["index"], len(prompt_ids),
                    )
                    self._warned_truncation = True
                ids = ids[:keep]
            responses.append(ids)
        if (self.max_length is not None and responses[0] == responses[1] and item["chosen"].strip() !=
                item["rejected"].strip() and not self._warned_cut_alike):
            logger.warning(
                "record #%s: its chosen and rejected responses are the same %d tokens once cut to max_length=%d "
                "(they differ only later): the pair carries no preference (a constant loss, zero gradient); raise "
                "max_length", item["index"], len(responses[0]), self.max_length,
            )
            self._warned_cut_alike = True
        return prompt_ids, responses[0], responses[1]

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        # Distinct images: same key and same (seeded) noise. Fresh noise makes every item distinct.
        slots: dict[Any, int] = {}
        clean, corrupted, image_index = [], [], []
        for i, item in enumerate(items):
            key = item.get("dedupe_key", item["image_key"])
            key = ("item", i) if key is None else key
            if key not in slots:
                slots[key] = len(clean)
                clean.append(item["image"])
                corrupted.append(item["corrupted_image"])
            image_index.append(slots[key])
        pixels = self.image_processor(clean + corrupted, return_tensors="pt")["pixel_values"]
        n_images = len(clean)
        n_image_tokens = self._num_image_tokens(pixels)

        rows_chosen, rows_rejected = [], []
        for item in items:
            prompt_ids, chosen_ids, rejected_ids = self._encode_pair(item, n_image_tokens)
            rows_chosen.append((prompt_ids, chosen_ids))
            rows_rejected.append((prompt_ids, rejected_ids))
        rows = rows_chosen + rows_rejected
        length = max(len(p) + len(r) for p, r in rows)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), self.ignore_index, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, (prompt_ids, response_ids) in enumerate(rows):
            ids = prompt_ids + response_ids
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, len(prompt_ids) : len(ids)] = torch.tensor(response_ids)
            attention_mask[r, : len(ids)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": pixels[:n_images],
            "corrupted_pixel_values": pixels[n_images:],
            "image_index": torch.tensor(image_index, dtype=torch.long),
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        }
