"""The tiny models of the demo, the tests and the docs (tpo_fast/trainer/tiny.py): the word-level tokenizer's ids, the
processor's image tokens, the model's sizes and image-token count, and the saved folders loading back as checkpoints."""

from __future__ import annotations

import json

import torch

from tpo_fast.trainer.tiny import (
    PROMPT_WORDS,
    SPECIAL_TOKENS,
    build_tiny_llava,
    build_tiny_processor,
    build_tiny_tokenizer,
    save_tiny_clip,
    save_tiny_llava,
    words_of,
)


def test_words_are_split_as_the_tokenizer_splits_them():
    assert words_of(["a red-dog, on it.", "USER: it's"]) == ["'", ",", "-", ".", ":", "USER", "a", "dog", "it", "on",
                                                              "red", "s"]


def test_the_tokenizer_numbers_special_tokens_then_prompt_words_then_words():
    tok = build_tiny_tokenizer(["red", "dog", ".", "red"])
    vocab = tok.get_vocab()
    order = [*SPECIAL_TOKENS, *PROMPT_WORDS, "red", "dog"]  # "." is a prompt word already; duplicates once
    assert vocab == {w: i for i, w in enumerate(order)}
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids("<image>") == 4 and tok.padding_side == "right"
    ids = tok("USER: red dog cat .", add_special_tokens=False)["input_ids"]
    assert ids == [vocab["USER"], vocab[":"], vocab["red"], vocab["dog"], 1, vocab["."]]  # cat: unknown
    assert tok.decode([vocab["red"], vocab["dog"]]) == "red dog"


def test_the_processor_and_model_agree_on_the_image_tokens():
    processor = build_tiny_processor(["red"], image_size=21, patch_size=7)
    assert processor.image_processor.crop_size == {"height": 21, "width": 21} and processor.patch_size == 7
    from PIL import Image

    inputs = processor(text=["<image> red"], images=[Image.new("RGB", (30, 40))], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 21, 21)
    assert int((inputs["input_ids"] == 4).sum()) == 9  # (21 // 7) ** 2 patch tokens, the CLS feature dropped
    model = build_tiny_llava(len(processor.tokenizer), image_size=21, patch_size=7, text_hidden=32, num_layers=1,
                             seed=5)
    c = model.config
    assert (c.image_token_id, c.text_config.vocab_size, c.text_config.hidden_size, c.text_config.num_hidden_layers,
            c.vision_config.image_size, c.vision_config.patch_size, c.vision_config.hidden_size) == (
        4, len(processor.tokenizer), 32, 1, 21, 7, 32)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
    same = build_tiny_llava(len(processor.tokenizer), image_size=21, patch_size=7, text_hidden=32, num_layers=1,
                            seed=5)
    other = build_tiny_llava(len(processor.tokenizer), image_size=21, patch_size=7, text_hidden=32, num_layers=1,
                             seed=6)
    weights = dict(model.named_parameters())
    assert all(torch.equal(p, weights[n]) for n, p in same.named_parameters())
    assert not all(torch.equal(p, weights[n]) for n, p in other.named_parameters())


def test_saved_folders_load_as_checkpoints(tmp_path):
    from transformers import AutoProcessor

    from tpo_fast.methods.csr import CLIPScorer
    from tpo_fast.trainer.synthetic import vocabulary
    from tpo_fast.trainer.trainer import load_llava

    folder = save_tiny_llava(tmp_path / "llava", seed=2, num_layers=1)
    model, processor = load_llava(str(folder)), AutoProcessor.from_pretrained(folder)
    assert set(vocabulary()) <= set(processor.tokenizer.get_vocab())  # the default words: the shapes world's
    assert model.config.text_config.num_hidden_layers == 1
    # other sizes reach both the processor and the model
    small = save_tiny_llava(tmp_path / "small", ["red"], image_size=21, patch_size=7, num_layers=1)
    small_model, small_processor = load_llava(str(small)), AutoProcessor.from_pretrained(small)
    assert (small_model.config.vision_config.image_size, small_model.config.vision_config.patch_size) == (21, 7)
    assert small_processor.image_processor.crop_size == {"height": 21, "width": 21} and small_processor.patch_size == 7
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    built = build_tiny_llava(len(processor.tokenizer), num_layers=1, seed=2)
    weights = dict(model.named_parameters())
    assert all(torch.equal(p, weights[n]) for n, p in built.named_parameters())
    from PIL import Image

    clip = CLIPScorer(save_tiny_clip(tmp_path / "new" / "clip", seed=1))  # the folder and its parents made
    # a character-level tokenizer: each letter its own token, a word's last one marked as its end
    vocab = json.loads((tmp_path / "new" / "clip" / "vocab.json").read_text())
    assert clip.processor.tokenizer("dog.")["input_ids"] == [
        vocab["<|startoftext|>"], vocab["d"], vocab["o"], vocab["g</w>"], vocab[".</w>"], vocab["<|endoftext|>"]]
    assert len(vocab) == 2 + 2 * len("abcdefghijklmnopqrstuvwxyz.,?!'-") and (vocab["<|startoftext|>"],
                                                                                vocab["<|endoftext|>"]) == (0, 1)
    save_tiny_clip(tmp_path / "new" / "clip", seed=1)  # again into the same folder
    scores = clip(Image.new("RGB", (28, 28), (200, 10, 10)), ["a red dog.", "a cat, on it!"])
    assert scores.shape == (2,) and scores.dtype == torch.float32 and bool(torch.isfinite(scores).all())
    again = CLIPScorer(save_tiny_clip(tmp_path / "clip2", seed=1))
    assert torch.equal(again(Image.new("RGB", (28, 28), (200, 10, 10)), ["a red dog.", "a cat, on it!"]), scores)
