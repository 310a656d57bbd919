"""Adversarial audit of 2026-12-07: the packed trunk forward (tpo_fast/trainer/packing.py, row_attention.py) on
language models beyond the Llama family, against the ordinary Hugging Face forward of the padded rows.

- A language model whose attention is bidirectional (`is_causal` False: Gemma3 with `use_bidirectional_attention`,
  BERT-style models that are no decoder) attends its padded rows both ways; a packed row's mask is causal and hides
  the first response from the second, so packing silently changed every hidden state (0.37 relative on the tiny
  Gemma3 below). Such a model is no longer packed (one warning, the padded rows); a causal Gemma3 still packs.

The oracle is the model's own forward: full logits of the padded rows (each row with its pair's image), labels
shifted as `labels[:, 1:]` against `logits[:, :-1]`, the reference-free DPO loss written out (float64 from the
log-softmax on).
"""

import copy
import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from tiny_setup import tiny_data, tiny_model, tiny_processor  # noqa: E402

from tpo_fast.trainer import packing  # noqa: E402
from tpo_fast.trainer.collator import TPOCollator  # noqa: E402
from tpo_fast.trainer.model import StepOptions, policy_loss  # noqa: E402
from tpo_fast.trainer.packing import packing_mode  # noqa: E402
from tpo_fast.trainer.row_attention import SEGMENT_ATTENTION  # noqa: E402

X = -100
BETA = 0.1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_data(str(tmp_path_factory.mktemp("data")), num_images=8), tiny_processor()


def _batch(ds, proc):
    """Two pairs with responses of unequal lengths (one pair's chosen response 12 words longer than its rejected)."""
    items = [ds[0], ds[1]]
    items[0] = dict(items[0], chosen="there is a yellow square on the left . the square is yellow .",
                    rejected="a blue circle .")
    return TPOCollator(proc)(items)


def _gemma3_llava(proc, bidirectional: bool):
    """`tiny_model`'s LLaVA with a two-layer Gemma3 language model (full attention in both layers)."""
    from transformers import Gemma3TextConfig, LlavaConfig, LlavaForConditionalGeneration

    base = tiny_model(proc).config
    t = base.text_config
    text = Gemma3TextConfig(vocab_size=t.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                            pad_token_id=t.pad_token_id, tie_word_embeddings=False,
                            layer_types=["full_attention"] * 2, use_bidirectional_attention=bidirectional)
    config = LlavaConfig(vision_config=base.vision_config, text_config=text, image_token_id=base.image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config)


def _hf_dpo_loss(model, batch):
    """Reference-free DPO loss of the batch from the model's own forward on the padded rows, in float64."""
    rows = batch["image_index"].repeat(2)  # chosen rows, then rejected rows, each with its pair's image
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"][rows]).logits
    labels = batch["labels"][:, 1:]
    keep = labels != X
    logp = logits[:, :-1].double().log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    scores = torch.where(keep, logp, 0).sum(-1)
    pairs = len(rows) // 2
    return -torch.nn.functional.logsigmoid(BETA * (scores[:pairs] - scores[pairs:])).mean()


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_a_bidirectional_language_model_is_not_packed(setup, caplog, monkeypatch, bidirectional):
    """The default step (shared prefix, padding-free) on a Gemma3 LLaVA has the loss and every parameter gradient of
    the model's own forward: packed where the attention is causal, on the padded rows where it is bidirectional
    (packed, its chosen log-probabilities summed to -45.442 against the model's -45.531, the rejected ones to -27.256
    against -27.386, and the gradient of a layer's k_norm weight was 4.3 times its own size off)."""
    monkeypatch.setattr(packing, "_WARNED", set())  # whatever an earlier test of this process logged
    ds, proc = setup
    batch = _batch(ds, proc)
    model = _gemma3_llava(proc, bidirectional)
    oracle_model, step_model = copy.deepcopy(model), copy.deepcopy(model)

    expected = _hf_dpo_loss(oracle_model, batch)
    expected.backward()
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        mode = packing_mode(step_model, True, None)
        out = policy_loss(step_model, batch, StepOptions(objective="dpo", beta=BETA, reference="none",
                                                         backend="torch"))
    out["loss"].backward()

    torch.testing.assert_close(out["loss"].double(), expected, rtol=1e-5, atol=1e-7)
    grads = {n: p.grad for n, p in oracle_model.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in step_model.named_parameters() if p.grad is not None}
    assert set(got) == set(grads) and grads
    scale = max(float(g.abs().max()) for g in grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6 * scale, msg=name)
    if bidirectional:
        assert mode is None
        assert any("its attention is bidirectional (Gemma3Attention.is_causal is False" in r.message
                   for r in caplog.records), [r.message for r in caplog.records]
    else:
        assert (mode.shared_prefix, mode.padding_free, mode.implementation) == (True, True, SEGMENT_ATTENTION)
