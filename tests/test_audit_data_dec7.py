"""Audit of the data path (data.py, collator.py) as real LLaVA-1.5 preference data meets it.

The tokenizers are Llama-family fast tokenizers built offline (BPE merges learnt within words, as SentencePiece does),
with a "<s>" BOS token added to every encoded text as Llama's tokenizer.json does, "<image>" and "<pad>" as special
tokens (llava-hf's ids 32000 and 32001); the processor is LLaVA-1.5's (336 px images, 14 px patches, "default"
feature selection: 576 image tokens). Oracles are hand-written token lists, the tokenizer's own decoding,
`LlavaProcessor`'s own expansion of the conversation, and numpy arithmetic on the image file's values.
"""

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

import tpo_fast.trainer.collator as collator_mod
from tpo_fast.trainer.collator import TPOCollator
from tpo_fast.trainer.data import PreferenceDataset, load_preference_records

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CORPUS = [
    "USER: what is in the image? ASSISTANT: Yes, there is a red circle.",
    "No, a blue square and a green cat. There is a cat. Use the <s> tag / and the > sign, or pad it.",
] * 40
PROMPT = "what is in the image?"


def _tokenizer(style: str = "legacy", eos_too: bool = False):
    """'legacy': Prepend + Replace normalizer (Llama-2's tokenizer.json, LLaVA-1.5's); 'metaspace': Metaspace
    pre-tokenizer with prepend_scheme "first" (today's conversion). "<s> $A" post-processor, or "<s> $A </s>" with
    `eos_too` (Llama's add_eos_token=True)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=["▁", "<", ">", "/", "\n"])
    tok.train_from_iterator(CORPUS, trainer)
    if style == "legacy":
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    single = "<s> $A </s>" if eos_too else "<s> $A"
    tok.post_processor = TemplateProcessing(single=single, special_tokens=[("<s>", 1), ("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})
    return tokenizer


def _processor(style: str = "legacy", eos_too: bool = False, size: int = 336, patch: int = 14):
    from transformers import LlavaProcessor

    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=_tokenizer(style, eos_too), patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")


def _item(chosen="Yes, there is a red circle.", rejected="No, a blue square.", index=0):
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    return {"prompt": "<image>\n" + PROMPT, "chosen": chosen, "rejected": rejected, "image": image,
            "corrupted_image": image, "image_key": "a", "index": index}


def _row(batch, row):
    """(the row's real ids, its labelled ids)."""
    ids = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
    labels = batch["labels"][row]
    return ids, labels[labels != -100].tolist()


# -- the whole conversation as LLaVA-1.5's processor writes it -------------------------------------------------------


@pytest.mark.parametrize("style", ["legacy", "metaspace"])
@pytest.mark.parametrize("eos_too", [False, True], ids=["bos", "bos+eos"])
def test_each_row_is_the_conversation_the_llava_processor_writes_plus_eos(style, eos_too, monkeypatch, caplog):
    """Each row is exactly `LlavaProcessor(text=prompt + " " + response)`'s ids (576 image tokens, one "<s>") and
    one EOS, and its labels are the ids after the prompt's. A tokenizer that appends "</s>" to every text it encodes
    (Llama's add_eos_token=True) put it after the prompt: every row read "... ASSISTANT:</s> Yes ...", the response
    was tokenized apart from the prompt (a lone "▁" label first, with the legacy normalizer) and a misleading
    warning blamed a merge across the boundary."""
    monkeypatch.setattr(collator_mod, "_warned_split", False)
    processor = _processor(style, eos_too)
    tok = processor.tokenizer
    item = _item()
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        batch = TPOCollator(processor)([item])
    assert "merges the prompt's last token" not in caplog.text
    prompt = "USER: <image>\n" + PROMPT + " ASSISTANT:"
    image_id = tok.convert_tokens_to_ids("<image>")
    for row, text in ((0, item["chosen"]), (1, item["rejected"])):
        whole = processor(text=prompt + " " + text, images=item["image"])["input_ids"][0]
        whole = list(whole)[:-1] if eos_too else list(whole)  # the processor's own text ends with the appended "</s>"
        alone = list(processor(text=prompt, images=item["image"])["input_ids"][0])
        alone = alone[:-1] if eos_too else alone
        ids, labels = _row(batch, row)
        assert ids == whole + [tok.eos_token_id]
        assert ids.count(image_id) == 576 and ids.count(tok.bos_token_id) == 1
        assert ids.count(tok.eos_token_id) == 1 and labels == whole[len(alone):] + [tok.eos_token_id]
    want = ["▁Yes,", "▁there", "▁is", "▁a", "▁red", "▁circle.", "</s>"]
    assert tok.convert_ids_to_tokens(_row(batch, 0)[1]) == want


# -- special tokens written as text in a response --------------------------------------------------------------------


@pytest.mark.parametrize("style", ["legacy", "metaspace"])
@pytest.mark.parametrize("written", ["</s>", "<pad>", "<s>"])
def test_a_special_token_written_in_a_response_is_trained_as_its_characters(style, written, caplog):
    """A response holding "</s>" as text (a decoding artefact of generated responses, or a mention of the tag) was
    read as the EOS token: its labels held the EOS id mid-response (2 EOS targets among 8 labels), "<pad>"
    gave the pad id as a target. Now the labels decode to the response's own text with one EOS at the end and no
    other special id, the tokens before the mention are those of the clean conversation, and one warning names
    the record."""
    processor = _processor(style, size=28)
    tok = processor.tokenizer
    chosen = f"Yes {written} there is"
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        batch = TPOCollator(processor)([_item(chosen=chosen, index=7), _item(chosen=f"Yes {written} a", index=8)])
    _, labels = _row(batch, 0)
    special = set(tok.all_special_ids)
    assert labels[-1] == tok.eos_token_id and not special & set(labels[:-1]), tok.convert_ids_to_tokens(labels)
    assert tok.decode(labels[:-1]).strip() == chosen
    prompt = "USER: " + "<image>" * 4 + f"\n{PROMPT} ASSISTANT:"  # 2 x 2 patches of 14 px
    n_prompt = len(tok(prompt)["input_ids"])
    clean = tok(prompt + " Yes")["input_ids"][n_prompt:]  # "Yes" in the conversation without the mention
    assert len(clean) >= 1 and labels[: len(clean)] == clean
    assert batch["input_ids"][0, n_prompt : n_prompt + len(clean)].tolist() == clean
    assert caplog.text.count(f"record #7: the chosen response holds {written!r}, written as text") == 1
    assert "record #8" not in caplog.text  # warned once


# -- multi-turn and system prompts -----------------------------------------------------------------------------------


def _write_image(folder):
    os.makedirs(folder, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(os.path.join(folder, "red.png"))


def test_a_prompt_conversation_whose_earlier_messages_hold_text_is_a_bad_record(tmp_path):
    """Only a chat list's last message is kept: a system message or the earlier turns of a multi-turn prompt were
    dropped without a word (record 1 trained on "Q2" alone, "Q1" and "A1" lost), and a prompt ending with the
    assistant's message was taken as the question. Such records are bad, with a reason naming the messages; a
    single-turn conversation, an empty system message and a response chat that repeats its prompt still load."""
    _write_image(tmp_path / "img")
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}
    base = {"image": "red.png", "chosen": "A cat.", "rejected": "A dog."}
    rows = [
        dict(base, prompt=[user]),  # 0: fine
        dict(base, prompt=[{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                           {"role": "user", "content": "Q2"}]),  # 1
        dict(base, prompt=[{"role": "system", "content": "Answer in French."}, user]),  # 2
        dict(base, prompt=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "It is"}]),  # 3
        dict(base, prompt=[{"role": "system", "content": " "}, user]),  # 4: fine, the system message holds no text
        dict(base, prompt="Q", chosen=[{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A cat."}]),
        dict(base, prompt="Q", rejected=[{"role": "user", "content": "A dog."}]),  # 6
    ]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    records, bad = load_preference_records(tmp_path / "p.json", tmp_path / "img")
    assert [(r["index"], r["prompt"], r["chosen"]) for r in records] == [(0, "Q", "A cat."), (4, "Q", "A cat."),
                                                                        (5, "Q", "A cat.")]
    assert [(b.index, b.reason) for b in bad] == [
        (1, "prompt: a conversation of 3 messages (roles ['user', 'assistant', 'user']) of which only the last is "
            "kept: the text of message(s) [0, 1] would be dropped, as the prompt template holds one user turn; "
            "write a system text or earlier turns into that one message"),
        (2, "prompt: a conversation of 2 messages (roles ['system', 'user']) of which only the last is kept: the "
            "text of message(s) [0] would be dropped, as the prompt template holds one user turn; write a system "
            "text or earlier turns into that one message"),
        (3, "prompt: its last message is the assistant's, not the user's question"),
        (6, "rejected response: its last message is the user's, not the assistant's answer"),
    ]


# -- images ----------------------------------------------------------------------------------------------------------


def test_a_16_bit_greyscale_image_is_scaled_to_8_bits_not_clipped(tmp_path):
    """A 16-bit greyscale PNG (medical and scientific images) was converted by clipping each value at 255: a
    gradient over 0..65535 became white in all but its first pixel (63 of 64 pixels 255). Now each value v is
    round(v * 255 / 65535), clean and corrupted images alike come from it; 8-bit images are unchanged."""
    _write_image(tmp_path / "img")
    values = (np.arange(64, dtype=np.int64).reshape(8, 8) * 1040).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "img" / "deep.png")
    assert Image.open(tmp_path / "img" / "deep.png").mode.startswith("I")
    rows = [{"image": name, "question": "q", "chosen": "a", "rejected": "b"} for name in ("deep.png", "red.png")]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    ds = PreferenceDataset.from_file(tmp_path / "p.json", tmp_path / "img")
    want = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    got = np.asarray(ds[0]["image"])
    assert ds[0]["image"].mode == "RGB" and got.shape == (8, 8, 3)
    for channel in range(3):
        np.testing.assert_array_equal(got[..., channel], want)
    assert ds[1]["image"].getpixel((0, 0)) == (200, 10, 10)


def test_the_corrupted_image_cache_names_entries_by_the_decoding(tmp_path, monkeypatch):
    """A corrupted-image cache filled before 16-bit images were scaled holds entries made from the white (clipped)
    image: the decoding version is part of each entry's name, so such an entry is never read again."""
    import tpo_fast.trainer.data as data_mod

    _write_image(tmp_path / "img")
    rows = [{"image": "red.png", "question": "q", "chosen": "a", "rejected": "b"}]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    cache = tmp_path / "cc"
    ds = PreferenceDataset.from_file(tmp_path / "p.json", tmp_path / "img", corrupted_cache_dir=cache)
    first = np.asarray(ds[0]["corrupted_image"])
    assert len(list(cache.glob("*.png"))) == 1
    monkeypatch.setattr(data_mod, "DECODE_VERSION", data_mod.DECODE_VERSION + 1)
    again = PreferenceDataset.from_file(tmp_path / "p.json", tmp_path / "img", corrupted_cache_dir=cache)
    np.testing.assert_array_equal(np.asarray(again[0]["corrupted_image"]), first)  # the same seeded noise
    assert len(list(cache.glob("*.png"))) == 2  # written under a new name, not read from the old entry


# -- the processor's image geometry ----------------------------------------------------------------------------------


def test_a_processor_without_patch_size_is_refused_when_the_collator_is_built():
    """An older llava-hf processor_config.json has no patch_size: the first batch died with "unsupported operand
    type(s) for //: 'int' and 'NoneType'" deep in the collator. Now building the collator says what to set."""
    processor = _processor(size=28)
    processor.patch_size = None
    with pytest.raises(ValueError, match=r"^the processor's patch_size is None, so the number of image tokens per "
                                         r"image is unknown; set processor\.patch_size = "
                                         r"model\.config\.vision_config\.patch_size and "):
        TPOCollator(processor)
    processor.patch_size = 14
    assert TPOCollator(processor)([_item()])["input_ids"].shape[0] == 2


# -- pairs without a preference --------------------------------------------------------------------------------------


def test_records_whose_chosen_equals_rejected_are_named_in_a_warning(tmp_path, caplog):
    """A pair whose two responses are the same text (up to the whitespace at their ends, which the collator strips)
    gives the same rows: zero gradient, and never a right pair in the reward accuracy. It was loaded without a
    word; now one warning lists its index (the records are kept: POVID's noisy-image term still uses them)."""
    _write_image(tmp_path / "img")
    rows = [
        {"image": "red.png", "question": "q", "chosen": "A cat.", "rejected": "A dog."},
        {"image": "red.png", "question": "q", "chosen": "A cat.", "rejected": " A cat.\n"},
        {"image": "red.png", "question": "q", "chosen": "A  cat.", "rejected": "A cat."},  # inner spaces differ
        {"image": "red.png", "question": "q", "chosen": "B", "rejected": "B"},
    ]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        records, bad = load_preference_records(tmp_path / "p.json", tmp_path / "img")
    assert len(records) == 4 and not bad
    assert "2 preference record(s) have the same chosen and rejected response (up to the whitespace at their ends, " \
           "which the collator strips): #1, #3. Such a pair carries no preference" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        (tmp_path / "q.json").write_text(json.dumps(rows[:1]))
        load_preference_records(tmp_path / "q.json", tmp_path / "img")
    assert "same chosen and rejected" not in caplog.text
    # the collator's rows of record #1 are indeed the same
    ds = PreferenceDataset(records, tmp_path / "img")
    batch = TPOCollator(_processor(size=28))([ds[1]])
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])


def test_a_pair_cut_to_the_same_tokens_by_max_length_is_named(caplog):
    """Two responses that share their first tokens and are cut to them by max_length become the same row: a pair
    without a preference, which only the generic truncation warning hinted at. Now a warning names the record."""
    processor = _processor(size=28)
    full = TPOCollator(processor)([_item("Yes, there is a red circle.", "Yes, there is a blue square.")])
    prompt_len = int((full["labels"][0] != -100).nonzero()[0])  # the prompt's positions: before the first label
    shared = 4  # "▁Yes", ",", "▁there", "▁is": the tokens the two responses share
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        cut = TPOCollator(processor, max_length=prompt_len + shared)(
            [_item("Yes, there is a red circle.", "Yes, there is a blue square.", index=7)])
    rows = [cut["labels"][r][cut["labels"][r] != -100].tolist() for r in range(2)]
    assert rows[0] == rows[1] and len(rows[0]) == shared
    named = [r.getMessage() for r in caplog.records if "carries no preference" in r.getMessage()]
    assert named == [f"record #7: its chosen and rejected responses are the same {shared} tokens once cut to "
                     f"max_length={prompt_len + shared} (they differ only later): the pair carries no preference (a "
                     "constant loss, zero gradient); raise max_length"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):  # one token more: they differ, no such warning
        TPOCollator(processor, max_length=prompt_len + shared + 1)(
            [_item("Yes, there is a red circle.", "Yes, there is a blue square.")])
    assert not [r for r in caplog.records if "carries no preference" in r.getMessage()]
