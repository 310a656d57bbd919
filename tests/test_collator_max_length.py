"""`TPOCollator(max_length=...)` where a prompt alone fills the row: the prompt (with its image tokens) is never cut,
so each response keeps its first token and the row is longer than max_length. The warning said "responses cut to
fit max_length", which was not so; it now says what the row holds and what to do."""

import logging
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from tiny_setup import tiny_data, tiny_processor  # noqa: E402

from tpo_fast.trainer.collator import TPOCollator  # noqa: E402


def test_a_prompt_over_max_length_keeps_one_token_of_each_response_and_says_so(tmp_path, caplog):
    ds = tiny_data(str(tmp_path / "d"), num_images=2)
    whole = TPOCollator(tiny_processor())([ds[0]])
    prompt = int((whole["labels"][0] != -100).nonzero()[0])  # the first response token's position (unshifted)
    assert prompt > 16  # 16 image tokens and the question
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        batch = TPOCollator(tiny_processor(), max_length=prompt - 1)([ds[0], ds[1]])
    assert ((batch["labels"] != -100).sum(1) == 1).all()  # one target per response
    assert batch["input_ids"].shape[1] >= prompt + 1  # longer than max_length: the prompt is whole
    assert f"record #0: its prompt is {prompt} tokens with the image, and max_length={prompt - 1} leaves its " \
           "responses no room: the row keeps the whole prompt and the first token of each response " \
           f"({prompt + 1} tokens), so a pair whose responses begin alike carries no preference; raise max_length " \
           "above the longest prompt" in caplog.text
    assert "responses cut to fit" not in caplog.text and caplog.text.count("leaves its responses no room") == 1
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        caplog.clear()
        TPOCollator(tiny_processor(), max_length=prompt + 2)([ds[0]])  # room for two tokens: the old warning
    assert "responses cut to fit max_length=" in caplog.text and "no room" not in caplog.text
    assert torch.equal(whole["input_ids"][0, :prompt], batch["input_ids"][0, :prompt])
