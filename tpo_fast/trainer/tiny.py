"""Tiny random LLaVA models and processors built from configs, for the demo, tests, docs and benchmarks.

Nothing is downloaded: the tokenizer is a word-level `tokenizers` model over a given word list,
the image processor a `CLIPImageProcessor` from arguments, the model a `LlavaForConditionalGeneration`
with a small CLIP vision tower and a small Llama text model.

`save_tiny_llava(folder)` writes such a model and its processor as a model folder that
`TPOTrainer(folder)`, `AutoProcessor.from_pretrained(folder)` and `tpo-fast train --model folder`
load like any LLaVA checkpoint; `save_tiny_clip(folder)` writes a tiny CLIP model for CSR's image
reward. Both take a few seconds on a CPU and under 1 MB on disk.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PROMPT_WORDS = ("USER", "ASSISTANT", ":", ".", ",", "?", "!", "'", "-")


def words_of(texts: Iterable[str]) -> list[str]:
    """The sorted distinct words and punctuation marks of `texts`, as the tiny tokenizer splits them."""
    found = set()
    for text in texts:
        found.update(re.findall(r"\w+|[^\w\s]", text))
    return sorted(found)


def build_tiny_tokenizer(words: Iterable[str]):
    """A word-level `PreTrainedTokenizerFast` over `words` plus the special tokens and prompt words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in list(PROMPT_WORDS) + list(words):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.padding_side = "right"
    return tokenizer


def build_tiny_processor(words: Iterable[str], image_size: int = 28, patch_size: int = 7):
    """A `LlavaProcessor` (tiny tokenizer + `CLIPImageProcessor`) for images of `image_size` pixels."""
    from transformers import LlavaProcessor

    try:  # the PIL backend needs no torchvision (transformers >= 5)
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tiny_tokenizer(words),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )


def build_tiny_llava(
    vocab_size: int,
    *,
    image_token_id: int = 4,
    pad_token_id: int = 0,
    image_size: int = 28,
    patch_size: int = 7,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    num_layers: int = 2,
    attn_implementation: str = "sdpa",
    seed: int = 0,
):
    """A randomly initialised tiny `LlavaForConditionalGeneration` (fp32, CPU).

    `(image_size // patch_size) ** 2` image tokens per image (16 at the defaults).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=num_layers,
        num_attention_heads=2, image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, pad_token_id=pad_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token_id,
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


def save_tiny_llava(
    folder: str | os.PathLike, words: Iterable[str] | None = None, *, image_size: int = 28, patch_size: int = 7,
    seed: int = 0, **model_kwargs,
) -> Path:
    """Build a tiny random LLaVA and its processor and save both to `folder`; returns the folder.

    `words`: the tokenizer's word list (default: the shapes-world vocabulary of `synthetic.py`, which
    covers `examples/`). `model_kwargs` go to `build_tiny_llava` (`text_hidden`, `num_layers`, ...).
    """
    if words is None:
        from tpo_fast.trainer.synthetic import vocabulary

        words = vocabulary()
    processor = build_tiny_processor(words, image_size=image_size, patch_size=patch_size)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    model = build_tiny_llava(
        len(processor.tokenizer), image_token_id=image_token_id, image_size=image_size, patch_size=patch_size,
        seed=seed, **model_kwargs,
    )
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_clip(folder: str | os.PathLike, *, image_size: int = 28, patch_size: int = 7, seed: int = 0) -> Path:
    """Save a tiny random `CLIPModel` and its processor (character-level tokenizer) to `folder`.

    The image-text scorer of CSR (`tpo-fast csr --clip folder`, `CLIPScorer(folder)`); returns the folder.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    try:  # the PIL backend needs no torchvision (transformers >= 5)
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz.,?!'-":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
