"""Edge cases of the shared-prefix and padding-free packed step (tpo_fast/trainer/packing.py, row_attention.py)
against independent oracles, beyond tests/test_packing.py.

- Random batches (one-token responses, chosen equal to rejected, one response a prefix of the other, responses
  that start alike, unequal prompts): the packing's index maps, positions and attention (per-sequence SDPA, the
  dense mask, `twice`) against causal attention over the padded rows, in float64; the varlen layout against the
  per-sequence SDPA calls on random spans.
- The packed step on a tiny fp32 LLaVA against the plain padded step (shared_prefix=False, padding_free=False):
  loss, reference scores, metrics and every parameter gradient, for TPO, DPO and POVID, on hand-built edge pairs,
  responses cut to one token by max_length, the loss options, gradient checkpointing (both kinds) and two
  optimizer steps of TPOTrainer with gradient accumulation.
- A language model whose attention soft-caps its scores is not switched from flash attention to the packed SDPA
  attention (which has no soft-cap); eager attention packs it exactly.
"""

import copy
import itertools
import logging
import os
import random
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from tiny_setup import state_of, tiny_data, tiny_model, tiny_processor  # noqa: E402

from tpo_fast.trainer import packing, row_attention  # noqa: E402
from tpo_fast.trainer.collator import TPOCollator  # noqa: E402
from tpo_fast.trainer.model import StepOptions, policy_loss, sequence_reference_scores  # noqa: E402
from tpo_fast.trainer.packing import (  # noqa: E402
    pack_batch,
    packed_attention_mask,
    packing_mode,
    packing_support,
    response_window,
    shift_labels,
)
from tpo_fast.trainer.row_attention import SEGMENT_ATTENTION, segment_attention  # noqa: E402

X = -100
OBJECTIVES = ["tpo", "dpo", "povid"]


# ----- index maps and attention against the padded rows, on random batches -----------------------------------


def _random_rows(rng: random.Random, pairs: int):
    """(ids, attention_mask, labels) of `pairs` random pairs over 4 token ids, each pair of a random edge kind."""
    def words(lo, hi):
        return [rng.randint(1, 4) for _ in range(rng.randint(lo, hi))]

    chosen, rejected = [], []
    for _ in range(pairs):
        prompt, c = words(1, 6), words(1, 6)
        kind = rng.choice(["other", "same", "prefix", "one", "start-alike"])
        r = {"other": words(1, 6), "same": list(c), "prefix": c + words(0, 3), "one": words(1, 1),
             "start-alike": c[: rng.randint(0, len(c))] + words(1, 4)}[kind]
        c = c[:1] if kind == "one" else c
        c, r = (r, c) if rng.random() < 0.5 else (c, r)
        chosen.append((prompt, c))
        rejected.append((prompt, r))
    rows = chosen + rejected
    width = max(len(p) + len(x) for p, x in rows) + rng.randint(0, 2)
    ids, labels = torch.zeros(len(rows), width, dtype=torch.long), torch.full((len(rows), width), X)
    for i, (p, x) in enumerate(rows):
        ids[i, : len(p) + len(x)] = torch.tensor(p + x)
        labels[i, len(p) : len(p) + len(x)] = torch.tensor(x)
    return ids, (ids != 0).long(), labels


def _qkv(x, weights, heads=2):
    return [(x @ w).unflatten(-1, (heads, -1)).transpose(1, 2) for w in weights]


def test_random_packings_attend_as_the_padded_rows():
    """Each packing (shared prefix or not, one row or one per sequence, stacked `twice`) of 40 random batches: its
    embeddings at its position ids, attended sequence by sequence (`segment_attention` on one row, the dense mask
    otherwise) and gathered into the response grid, equal causal attention over the padded rows at every target."""
    gen = torch.Generator().manual_seed(0)
    dim = 8
    table, positions = torch.randn(5, dim, generator=gen, dtype=torch.double), torch.randn(32, dim, dtype=torch.double)
    weights = torch.randn(3, dim, dim, generator=gen, dtype=torch.double) / dim**0.5
    for trial in range(40):
        rng = random.Random(trial)
        ids, mask, labels = _random_rows(rng, rng.randint(1, 4))
        targets = shift_labels(labels)
        has, window = targets != X, response_window(targets)
        rows, width = ids.shape
        x = table[ids] + positions[:width]
        causal = torch.ones(width, width, dtype=torch.bool).tril() & mask.bool()[:, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(*_qkv(x, weights), attn_mask=causal[:, None])
        expected = out.transpose(1, 2).flatten(2)[:, window]
        for paired, padding_free, twice in itertools.product([True, False], repeat=3):
            p = pack_batch(ids, mask, has, window, paired=paired, padding_free=padding_free,
                           implementation=SEGMENT_ATTENTION)
            copies = 2 if twice else 1
            p = p.twice(ids.numel()) if twice else p
            real = p.group >= 0
            assert torch.equal(p.position_ids[real], (p.source % width)[real])  # a token's column is its position
            emb = table[ids.repeat(copies, 1).flatten()[p.source]] + positions[p.position_ids]
            assert torch.equal(emb[real], x.repeat(copies, 1, 1).flatten(0, 1)[p.source][real])
            q, k, v = _qkv(emb, weights)
            if padding_free:
                got, _ = segment_attention(None, q, k, v, None, tpo_fast_spans=p.spans)
            else:
                got = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=packed_attention_mask(p, emb.dtype)).transpose(1, 2)
            grid = p.responses(got.flatten(2))
            cells = has[:, window].repeat(copies, 1)
            torch.testing.assert_close(grid[cells], expected.repeat(copies, 1, 1)[cells], rtol=0, atol=1e-12,
                                       msg=f"trial {trial}: paired={paired} padding_free={padding_free} twice={twice}")
            assert not grid[~cells].any()


def _varlen_oracle(q, k, v, cu_q, cu_k, max_q, max_k, window_size=None, scale=None):
    """flash attention's varlen call in plain SDPA: per piece, causal aligned to the bottom right."""
    assert window_size == (-1, 0)
    out = []
    for (q0, q1), (k0, k1) in zip(itertools.pairwise(cu_q.tolist()), itertools.pairwise(cu_k.tolist()), strict=True):
        assert q1 - q0 <= max_q and k1 - k0 <= max_k
        allowed = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool).tril(k1 - k0 - (q1 - q0))
        out.append(torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(0, 1) for t in (q[q0:q1], k[k0:k1], v[k0:k1])), attn_mask=allowed, scale=scale))
    return torch.cat(out, 1).transpose(0, 1)


def test_varlen_layout_of_random_spans_is_the_sdpa_attention(monkeypatch):
    """The one varlen call of a row (`VarlenLayout`, keys gathered piece after piece) equals the two SDPA calls per
    sequence on 100 random rows of spans with an empty prefix, an empty first or second response, grouped heads."""
    monkeypatch.setattr(row_attention, "varlen_api", lambda: (_varlen_oracle, {"window_size": (-1, 0)}, True))
    for trial in range(100):
        rng = random.Random(trial)
        spans, start = [], 0
        for _ in range(rng.randint(1, 4)):
            prefix = rng.randint(0, 5)
            first, second = rng.randint(0 if prefix else 1, 4), rng.randint(0, 4)
            spans.append((start, prefix, first, second))
            start += prefix + first + second
        gen = torch.Generator().manual_seed(trial)
        q = torch.randn(1, 4, start, 8, generator=gen, dtype=torch.double)
        k, v = (torch.randn(1, 2, start, 8, generator=gen, dtype=torch.double) for _ in range(2))
        sdpa = row_attention._row_attention(q, k, v, tuple(spans), 0.0, None)
        varlen = row_attention._varlen_row_attention(q, k, v, row_attention.varlen_layout(tuple(spans)), None)
        torch.testing.assert_close(varlen, sdpa, rtol=0, atol=1e-12, msg=str(spans))


# ----- the packed step against the padded step on a tiny LLaVA ------------------------------------------------


@pytest.fixture(scope="module")
def proc():
    return tiny_processor()


def _batch(proc, pairs, seed=0):
    """A collated-like batch of hand-made pairs `(prompt words, chosen ids, rejected ids)` (ids >= 5), each prompt
    `<s> <image> x 16 words`; one image per pair. A rejected `prompt` may differ from its chosen one: `(chosen
    prompt, rejected prompt)`."""
    image = proc.tokenizer.convert_tokens_to_ids("<image>")
    rows = [(p[0] if isinstance(p, tuple) else p, c) for p, c, _ in pairs]
    rows += [(p[1] if isinstance(p, tuple) else p, r) for p, _, r in pairs]
    rows = [([2] + [image] * 16 + list(p), list(x)) for p, x in rows]
    width = max(len(p) + len(x) for p, x in rows)
    ids, labels = torch.zeros(len(rows), width, dtype=torch.long), torch.full((len(rows), width), X)
    mask = torch.zeros_like(ids)
    for i, (p, x) in enumerate(rows):
        ids[i, : len(p) + len(x)] = torch.tensor(p + x)
        labels[i, len(p) : len(p) + len(x)] = torch.tensor(x)
        mask[i, : len(p) + len(x)] = 1
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(pairs), 3, 28, 28, generator=gen)
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels,
                corrupted_pixel_values=pixels + 0.5 * torch.randn(pixels.shape, generator=gen),
                image_index=torch.arange(len(pairs)), index=torch.arange(len(pairs)))


def _models(proc, **kw):
    model = tiny_model(proc, **kw)
    with torch.no_grad():  # away from the reference
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, tiny_model(proc, seed=1, **kw)


def _step(model, ref, batch, opts):
    ref_scores = None if opts.reference == "none" else sequence_reference_scores(ref, batch, opts)
    out = policy_loss(model, batch, opts, ref_scores)
    out["loss"].backward()
    return out, ref_scores, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_packed_is_padded(model, ref, batch, packed=None, **kw):
    """The packed step (`packed`: shared_prefix / padding_free, default both on) has the padded step's loss, reference
    scores, metrics and parameter gradients."""
    padded = StepOptions(backend="torch", shared_prefix=False, padding_free=False, **kw)
    opts = StepOptions(backend="torch", **{**kw, **(packed or {})})
    out0, ref0, grads0 = _step(copy.deepcopy(model), ref, batch, padded)
    out1, ref1, grads1 = _step(copy.deepcopy(model), ref, batch, opts)
    if ref0 is not None:
        torch.testing.assert_close(ref1, ref0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out1["loss"], out0["loss"], rtol=1e-5, atol=1e-6)
    for key, value in out0["metrics"].items():
        torch.testing.assert_close(out1["metrics"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert out1["tokens"] == out0["tokens"] and set(grads1) == set(grads0)
    scale = max(float(g.abs().max()) for g in grads0.values())
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-4, atol=1e-5 * scale, msg=name)


EDGE_PAIRS = {
    "one-token-responses": [([10, 11], [20], [21]), ([12], [22], [23])],
    "chosen-equals-rejected": [([10, 11], [20, 21, 22], [20, 21, 22]), ([12], [22, 25], [23])],
    "one-a-prefix-of-the-other": [([10, 11], [20, 21], [20, 21, 22, 23]), ([12], [22, 23, 24], [22])],
    "long-and-short": [([10, 11], list(range(12, 30)), [21]), ([12] * 7, [22], list(range(8, 30)))],
    "unequal-prompts": [([10], [20, 21], [25]), (list(range(10, 35)), [22], [23, 24]), ([11] * 3, [30, 31], [30])],
    "a-pair-whose-prompts-differ": [(([10, 11, 12], [10, 13, 12]), [20, 21], [20, 22]), ([12], [22], [23, 24])],
}


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("case", list(EDGE_PAIRS))
def test_packed_step_on_edge_pairs(proc, case, objective):
    """One-token responses (the prefix's last position predicts both), identical responses and one response a prefix
    of the other (a response with no tokens of its own), lengths 1 vs 22, prompts of 1 to 25 words, and a hand-made
    pair whose rows differ inside the prompt (the shared prefix ends there)."""
    model, ref = _models(proc)
    _assert_packed_is_padded(model, ref, _batch(proc, EDGE_PAIRS[case]), objective=objective, reference="model")


def test_packed_step_on_one_row_per_pair_and_without_a_shared_prefix(proc):
    """The other two packings (one row per pair with the dense mask; one padding-free row of whole rows) on the edge
    pairs whose sequences have empty response segments."""
    model, ref = _models(proc)
    batch = _batch(proc, EDGE_PAIRS["chosen-equals-rejected"] + EDGE_PAIRS["one-a-prefix-of-the-other"])
    for packed in (dict(padding_free=False), dict(shared_prefix=False, padding_free=True)):
        _assert_packed_is_padded(model, ref, batch, packed, objective="tpo", reference="model")


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_packed_step_when_max_length_cuts_responses_to_one_token(proc, tmp_path, objective):
    """TPOCollator with a max_length at or under the prompts: every row keeps its whole prompt and one response
    token; where both responses begin alike the shared prefix covers it, and the grid reads the prompt's last
    position for both."""
    ds = tiny_data(str(tmp_path), num_images=4)
    items = [dict(ds[0], chosen="a red circle .", rejected="there is a blue square ."),
             dict(ds[1], chosen="there is a red circle", rejected="there is a blue square"), ds[2]]
    batch = TPOCollator(proc, max_length=20)(items)
    assert (batch["labels"] != X).sum(1).tolist() == [1] * 6
    model, ref = _models(proc)
    _assert_packed_is_padded(model, ref, batch, objective=objective, reference="model")


@pytest.mark.parametrize("options", [dict(average_log_prob=True), dict(loss_type="ipo"), dict(loss_type="hinge"),
                                     dict(label_smoothing=0.1), dict(reference="none")],
                         ids=["average_log_prob", "ipo", "hinge", "label_smoothing", "reference-free"])
def test_packed_step_with_the_loss_options(proc, options):
    model, ref = _models(proc)
    batch = _batch(proc, EDGE_PAIRS["one-a-prefix-of-the-other"] + EDGE_PAIRS["long-and-short"][:1])
    for objective in ("tpo", "povid"):
        _assert_packed_is_padded(model, ref, batch, objective=objective, **{"reference": "model", **options})


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_packed_step_under_gradient_checkpointing(proc, reentrant):
    """Full fine-tuning with gradient checkpointing of either kind: the spans reach the attention through the
    checkpointed layers, and its own checkpoint nests in theirs."""
    model, ref = _models(proc)
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    assert model.model.language_model.gradient_checkpointing
    batch = _batch(proc, EDGE_PAIRS["unequal-prompts"])
    for objective in OBJECTIVES:
        _assert_packed_is_padded(model, ref, batch, objective=objective, reference="model")


def test_trainer_steps_packed_equal_padded(proc, tmp_path):
    """Two SGD steps of TPOTrainer (collator, host copy of the batch, separate reference model, gradient accumulation
    of two micro-batches, max_length cutting some responses) end at the padded run's weights, with its losses."""
    from tpo_fast.trainer.config import TPOConfig
    from tpo_fast.trainer.trainer import TPOTrainer

    ds = tiny_data(str(tmp_path / "data"), num_images=8)

    def train(**kw):
        args = TPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         max_steps=2, learning_rate=1e-2, optim="sgd", lr_scheduler_type="constant", logging_steps=1,
                         save_strategy="no", report_to=[], seed=0, max_length=30, **kw)
        trainer = TPOTrainer(tiny_model(proc), ref_model=tiny_model(proc, seed=1), args=args, train_dataset=ds,
                             processing_class=proc)
        trainer.train()
        return state_of(trainer.model), [h["loss"] for h in trainer.state.log_history if "loss" in h]

    weights0, losses0 = train(shared_prefix=False, padding_free=False)
    weights1, losses1 = train()
    torch.testing.assert_close(losses1, losses0, rtol=1e-5, atol=1e-6)
    for name, w in weights0.items():
        torch.testing.assert_close(weights1[name], w, rtol=1e-5, atol=1e-7, msg=name)


# ----- soft-capped attention ----------------------------------------------------------------------------------


def _gemma2_llava(proc, seed, implementation):
    """`tiny_model` with a Gemma2 language model of full attention in every layer whose attention scores are
    soft-capped (`attn_logit_softcapping`, applied by its eager and flash attention, not by SDPA)."""
    from transformers import Gemma2Config, LlavaConfig, LlavaForConditionalGeneration

    base = tiny_model(proc).config
    t = base.text_config
    text = Gemma2Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        query_pre_attn_scalar=16, attn_logit_softcapping=0.05, layer_types=["full_attention"] * 2,
                        max_position_embeddings=512, pad_token_id=0, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=base.vision_config, text_config=text, image_token_id=base.image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.config._attn_implementation = implementation
    return model


def test_soft_capped_attention_is_not_switched_from_flash_to_sdpa(proc, caplog, monkeypatch):
    """Bug: a flash_attention_2 model whose attention soft-caps its scores (Gemma2's attn_logit_softcapping) was
    switched to the packed step's SDPA attention, which has no soft-cap: reference scores, loss and gradients were
    silently another model's. It now keeps its flash attention on padded rows (logged once, with why); with eager
    attention, which applies the soft-cap and takes the packed mask, it packs and equals the padded step."""
    monkeypatch.setattr(packing, "_WARNED", set())
    flash = _gemma2_llava(proc, 0, "flash_attention_2")
    assert packing_support(flash)[0].startswith("its attention soft-caps its scores (attn_logit_softcapping=0.05)")
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        assert packing_mode(flash, True, None) is None
        assert packing_mode(flash, False, True) is None
    assert flash.model.language_model.config._attn_implementation == "flash_attention_2"
    assert len([r for r in caplog.records if "soft-caps" in r.message]) == 1
    fake = types.SimpleNamespace(model=types.SimpleNamespace(language_model=types.SimpleNamespace(
        config=types.SimpleNamespace(_attn_implementation="flash_attention_3", attn_logit_softcapping=50.0),
        forward=lambda inputs_embeds=None, attention_mask=None, position_ids=None: None)))
    assert packing_mode(fake, True, True) is None

    model, ref = _gemma2_llava(proc, 0, "eager"), _gemma2_llava(proc, 1, "eager")
    for packed in (dict(), dict(padding_free=True)):
        assert packing_mode(copy.deepcopy(model), True, packed.get("padding_free")).implementation == "eager"
        _assert_packed_is_padded(model, ref, _batch(proc, EDGE_PAIRS["unequal-prompts"]), packed, objective="tpo",
                                 reference="model")
