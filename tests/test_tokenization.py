"""Responses are labelled with the tokens they get inside the whole conversation.

A Llama SentencePiece tokenizer whose `tokenizer.json` prepends "▁" to every text it encodes (the legacy
normalizer, as Llama-2's has it) turns a response " Yes" tokenized alone into ["▁", "▁Yes"]; inside the
conversation it is ["▁Yes"]. These tests build such tokenizers offline (BPE merges learnt within words, as
SentencePiece does) and check the collator's labels and the statement scorer's candidates token by token.
"""

import logging

import pytest
import torch
from PIL import Image

import tpo_fast.trainer.collator as collator_mod
from tpo_fast.trainer.collator import TPOCollator, continuation_ids

CORPUS = [
    "USER: what is in the image? ASSISTANT: Yes, there is a red circle.",
    "No, a blue square and a green cat. There is a cat.",
] * 40


def _tokenizer(style: str):
    """A Llama-family fast tokenizer: 'legacy' (Prepend + Replace normalizer, Llama-2's tokenizer.json),
    'metaspace' (Metaspace pre-tokenizer, prepend_scheme="first", today's conversion), or 'merging' (BPE
    merges across words: the prompt's last token can merge with the response's first)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    if style != "merging":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<s>", "</s>", "<image>"],
                                  initial_alphabet=["▁"])
    tok.train_from_iterator(CORPUS, trainer)
    if style == "legacy":
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    elif style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<unk>", additional_special_tokens=["<image>"])
    return tokenizer


PROMPT = "USER: what is in the image? ASSISTANT:"


def _tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def test_legacy_tokenizer_puts_a_lone_prefix_token_before_a_response_tokenized_alone():
    # The premise of the fix: without it, the response's first label is a lone "▁".
    tok = _tokenizer("legacy")
    alone = tok(" Yes, there", add_special_tokens=False)["input_ids"]
    assert _tokens(tok, alone) == ["▁", "▁Yes,", "▁there"]


@pytest.mark.parametrize("style", ["legacy", "metaspace"])
def test_continuation_ids_are_the_response_tokens_of_the_whole_conversation(style):
    tok = _tokenizer(style)
    prompt_ids = tok(PROMPT)["input_ids"]
    ids = continuation_ids(tok, PROMPT, prompt_ids, " Yes, there is a red circle.")
    assert _tokens(tok, ids) == ["▁Yes,", "▁there", "▁is", "▁a", "▁red", "▁circle."]
    assert prompt_ids + ids == tok(PROMPT + " Yes, there is a red circle.")["input_ids"]


def test_continuation_ids_fall_back_with_a_warning_when_the_tokenizer_merges_across_the_boundary(caplog,
                                                                                               monkeypatch):
    tok = _tokenizer("merging")
    prompt_ids = tok(PROMPT)["input_ids"]
    joint = tok(PROMPT + " Yes, there")["input_ids"]
    assert joint[: len(prompt_ids)] != prompt_ids  # this tokenizer does merge "ASSISTANT:" with " Yes"
    monkeypatch.setattr(collator_mod, "_warned_split", False)
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        ids = continuation_ids(tok, PROMPT, prompt_ids, " Yes, there")
        continuation_ids(tok, PROMPT, prompt_ids, " No, a")
    assert ids == tok(" Yes, there", add_special_tokens=False)["input_ids"]
    assert sum("merges the prompt's last token" in r.message for r in caplog.records) == 1


def _processor(style: str):
    from transformers import LlavaProcessor

    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor
    image_processor = CLIPImageProcessor(size={"shortest_edge": 14}, crop_size={"height": 14, "width": 14})
    return LlavaProcessor(image_processor=image_processor, tokenizer=_tokenizer(style), patch_size=7,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")


def _item() -> dict:
    """One preference item on a 14 x 14 red image (clean and corrupted alike)."""
    image = Image.new("RGB", (14, 14), (200, 10, 10))
    return {"prompt": "<image>\nwhat is in the image?", "chosen": "Yes, there is a red circle.",
            "rejected": "No, a blue square.", "image": image, "corrupted_image": image, "image_key": "a", "index": 0}


@pytest.mark.parametrize("style", ["legacy", "metaspace"])
def test_collator_labels_each_response_as_the_conversation_tokenizes_it(style):
    processor = _processor(style)
    tok = processor.tokenizer
    item = _item()
    batch = TPOCollator(processor)([item])
    want = {
        0: ["▁Yes,", "▁there", "▁is", "▁a", "▁red", "▁circle.", "</s>"],
        1: ["▁No,", "▁a", "▁blue", "▁square", ".", "</s>"],
    }
    for row, tokens in want.items():
        labels = batch["labels"][row]
        assert _tokens(tok, labels[labels != -100].tolist()) == tokens
        # the prompt part of the row is the prompt alone, with the image expanded to 4 tokens (2x2 patches)
        n_prompt = int((labels == -100).logical_and(batch["attention_mask"][row] == 1).sum())
        prompt = "USER: " + "<image>" * 4 + "\nwhat is in the image? ASSISTANT:"
        assert batch["input_ids"][row, :n_prompt].tolist() == tok(prompt)["input_ids"]


def test_a_tokenizer_without_an_eos_token_ends_each_response_on_its_last_word():
    """With no EOS token (eos_token_id None) nothing is appended: each response's labels are its own tokens, and
    the row holds no None or stray id in its place."""
    processor = _processor("metaspace")
    tok = processor.tokenizer
    tok.eos_token = None
    assert tok.eos_token_id is None
    item = _item()
    batch = TPOCollator(processor)([item])
    want = {0: ["▁Yes,", "▁there", "▁is", "▁a", "▁red", "▁circle."], 1: ["▁No,", "▁a", "▁blue", "▁square", "."]}
    for row, tokens in want.items():
        labels = batch["labels"][row]
        assert _tokens(tok, labels[labels != -100].tolist()) == tokens
        real = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
        assert _tokens(tok, real[-len(tokens):]) == tokens


def test_a_tokenizer_that_adds_bos_gives_each_row_one_at_its_start(monkeypatch, caplog):
    """Llama's tokenizer.json adds "<s>" to every text it encodes with special tokens: the prompt (the row's start)
    gets it, the responses (continuations of the prompt) do not, and they are labelled as without it; the
    conversation starts with the prompt's tokens, "<s>" included, so nothing falls back to tokenizing alone."""
    from tokenizers.processors import TemplateProcessing

    monkeypatch.setattr(collator_mod, "_warned_split", False)

    plain = _processor("metaspace")
    processor = _processor("metaspace")
    tok = processor.tokenizer
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("ASSISTANT:")["input_ids"][0] == tok.bos_token_id
    item = _item()
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        batch, without = TPOCollator(processor)([item]), TPOCollator(plain)([item])
    assert "merges the prompt's last token" not in caplog.text
    for row in range(2):
        ids = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
        assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
        assert ids[1:] == without["input_ids"][row][without["attention_mask"][row] == 1].tolist()
        labels, plain_labels = batch["labels"][row], without["labels"][row]
        assert labels[labels != -100].tolist() == plain_labels[plain_labels != -100].tolist()
    # where the conversation does not start with the prompt's tokens (a merge across the boundary; here forced by
    # context ids that cannot match), the response is tokenized alone: without "<s>" either
    alone = continuation_ids(tok, "ASSISTANT:", [tok.unk_token_id], " Yes, there is")
    assert alone and tok.bos_token_id not in alone


def test_image_tokens_per_image_follow_the_processor():
    """Patches per side squared, plus the processor's extra tokens (CLS), minus one where the model drops CLS
    ("default" strategy); no extra tokens counted when the processor names none."""
    import types

    collator = TPOCollator(_processor("metaspace"))
    px = torch.zeros(1, 3, 28, 21)  # 4 x 3 patches of 7
    for extra, strategy, want in [(1, "default", 12), (1, "full", 13), (0, "full", 12), (None, "full", 12),
                                  (0, "default", 11)]:
        collator.processor = types.SimpleNamespace(patch_size=7, num_additional_image_tokens=extra,
                                                   vision_feature_select_strategy=strategy)
        assert collator._num_image_tokens(px) == want, (extra, strategy)


def test_statement_candidates_are_scored_as_continuations_of_the_question(monkeypatch):
    import tpo_fast.methods.csr as csr
    from tpo_fast.methods.hallucination import statement_shares

    processor = _processor("legacy")
    tok = processor.tokenizer
    seen = {}

    def fake_sentence_log_probs(model, prompt_ids, pixel_values, prefix_ids, cands, backend):
        seen["cands"] = cands
        return torch.zeros(len(cands))

    monkeypatch.setattr(csr, "sentence_log_probs", fake_sentence_log_probs)
    image = Image.new("RGB", (14, 14), (200, 10, 10))
    statement_shares(torch.nn.Linear(1, 1), processor, image, "what is in the image?",
                     ["There is a red circle.", "There is a cat."])
    assert [_tokens(tok, c) for c in seen["cands"]] == [
        ["▁There", "▁is", "▁a", "▁red", "▁circle."], ["▁There", "▁is", "▁a", "▁cat."],
    ]
