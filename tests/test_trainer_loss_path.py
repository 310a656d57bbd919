"""`policy_loss`, `sequence_reference_scores` and `response_branches` (tpo_fast/trainer/model.py) on a tiny
random LLaVA: the paths mutation testing of model.py found unguarded.

- an lm_head bias reaches every objective's loss, gradient and reference scores;
- the ZeRO-3 branch (`_Zero3GatheredLoss`), reached in-process by marking the lm_head as an already
  gathered ZeRO-3 parameter, gives the plain step's loss, metrics and gradients;
- `ignore_index`, `backend`, `grad_mode`, `average_log_prob` and `padding_free` reach the losses and the trunk;
- a one-token response's averaged DPO reference score; the batch keys each objective needs; the errors;
- the lm_head is cast to the dtype of the hidden states (bf16 trunk, fp32 lm_head).

Oracles materialize full fp32 logits with the ordinary LLaVA forward (so the lm_head and its bias run as
`nn.Linear`) and shift the labels themselves, never through the library's `shift_labels`.
"""

import copy
import os
import re
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from _spies import record_calls, watch_device_reads  # noqa: E402
from loss_reference import token_terms, weighted_scores  # noqa: E402
from methods_reference import dpo_losses, povid_scores_from_logits  # noqa: E402
from tiny_setup import tiny_data, tiny_model, tiny_processor  # noqa: E402

import tpo_fast  # noqa: E402
from tpo_fast.trainer import model as model_module  # noqa: E402
from tpo_fast.trainer.collator import TPOCollator  # noqa: E402
from tpo_fast.trainer.model import (  # noqa: E402
    StepOptions,
    policy_loss,
    response_branches,
    sequence_reference_scores,
)

OBJECTIVES = ("tpo", "dpo", "povid")
BETA = 0.5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return tiny_data(str(folder), num_images=4), tiny_processor()


@pytest.fixture
def batch(setup):
    ds, proc = setup
    return TPOCollator(proc)([ds[0], ds[1], ds[2]])  # 3 pairs, responses of unequal lengths


def _model(proc, bias=True, seed=0):
    """A tiny LLaVA with a sharper lm_head (margins of order 1) and, by default, a large lm_head bias."""
    model = tiny_model(proc, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    if bias:
        gen = torch.Generator().manual_seed(seed + 100)
        model.lm_head.bias = torch.nn.Parameter(2.0 * torch.randn(model.lm_head.out_features, generator=gen))
    return model


def _ref_scores(batch, objective):
    """Fixed reference scores ((2B,), or (3B,) for POVID), as a reference model or a cache would give."""
    n = batch["image_index"].shape[0] * (3 if objective == "povid" else 2)
    return -20.0 + 3.0 * torch.randn(n, generator=torch.Generator().manual_seed(7))


def _relabel(batch, ignore_index):
    """The batch with its ignored labels (-100) written as `ignore_index`."""
    labels = batch["labels"]
    return dict(batch, labels=labels.masked_fill(labels == -100, ignore_index))


def _shifted(labels, ignore_index=-100):
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    return targets


def _logits(model, batch, pixel_values, rows):
    """fp32 logits (rows, T, V) of the ordinary LLaVA forward over the first `rows` rows."""
    image = batch["image_index"].repeat(2)[:rows]
    out = model(input_ids=batch["input_ids"][:rows], attention_mask=batch["attention_mask"][:rows],
                pixel_values=pixel_values[image])
    return out.logits.float()


def _oracle_scores(model, batch, objective, average=False):
    """The sequence scores policy_loss / sequence_reference_scores compute, from full logits.

    TPO: (2B,) `sum_t m_t (logp_t + log c_t)`; DPO: (2B,) `sum_t m_t logp_t`; POVID: (3B,) `(S_w, S_l, S_n)`.
    """
    targets = _shifted(batch["labels"])
    rows = targets.shape[0]
    logits = _logits(model, batch, batch["pixel_values"], rows)
    if objective == "povid":
        with torch.no_grad():  # the noisy sequence is an argmax: no gradient
            corrupted = _logits(model, batch, batch["corrupted_pixel_values"], rows // 2)
        return torch.cat(povid_scores_from_logits(logits, corrupted, targets, average))
    corrupted = _logits(model, batch, batch["corrupted_pixel_values"], rows) if objective == "tpo" else None
    logp, s, mask = token_terms(logits, corrupted, targets, -100)
    return weighted_scores(logp, s, mask, "tpo" if objective == "tpo" else "none", 0.5, average)


def _oracle_loss(scores, ref, objective, noise_weight=0.5):
    if objective == "povid":
        (s_w, s_l, s_n), (r_w, r_l, r_n) = scores.chunk(3), ref.chunk(3)
        noisy, halluc = dpo_losses(s_w, s_n, r_w, r_n, BETA)[0], dpo_losses(s_w, s_l, r_w, r_l, BETA)[0]
        return (noise_weight * noisy + (1 - noise_weight) * halluc).mean()
    (s_w, s_l), (r_w, r_l) = scores.chunk(2), ref.chunk(2)
    return dpo_losses(s_w, s_l, r_w, r_l, BETA)[0].mean()


def _without_bias(model):
    twin = copy.deepcopy(model)
    twin.lm_head.bias = None
    return twin


# -- the lm_head bias --------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_lm_head_bias_reaches_the_policy_loss_and_its_gradient(setup, batch, objective):
    _, proc = setup
    model = _model(proc)
    oracle = copy.deepcopy(model)
    ref = _ref_scores(batch, objective)
    out = policy_loss(model, batch, StepOptions(objective=objective, beta=BETA, backend="torch"), ref)
    out["loss"].backward()

    want = _oracle_loss(_oracle_scores(oracle, batch, objective), ref, objective)
    want.backward()
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the bias changes the loss: the case tests something
        unbiased = _oracle_loss(_oracle_scores(_without_bias(oracle), batch, objective), ref, objective)
    assert abs(float(unbiased) - float(want.detach())) > 1e-2
    grads = dict(oracle.named_parameters())
    names = ("lm_head.bias", "lm_head.weight", "model.language_model.layers.1.mlp.down_proj.weight",
             "model.language_model.embed_tokens.weight")  # the last: both image branches' token embeddings
    for name in names:
        got = dict(model.named_parameters())[name].grad
        assert got is not None, name
        torch.testing.assert_close(got, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_one_token_embedding_lookup_per_step(setup, batch, objective):
    """The clean and corrupted branches share one lookup of the token embeddings (they differ only at the
    image placeholders), so the step's backward builds one embedding gradient, not one per branch."""
    _, proc = setup
    model = _model(proc)
    calls = []
    embed = model.model.language_model.embed_tokens
    handle = embed.register_forward_hook(lambda mod, args, out: calls.append(tuple(args[0].shape)))
    try:
        out = policy_loss(model, batch, StepOptions(objective=objective, beta=BETA, backend="torch"),
                          _ref_scores(batch, objective))
    finally:
        handle.remove()
    assert calls == [tuple(batch["input_ids"].shape)]
    out["loss"].backward()
    assert embed.weight.grad is not None


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_lm_head_bias_reaches_the_reference_scores(setup, batch, objective):
    _, proc = setup
    model = _model(proc)
    opts = StepOptions(objective=objective, backend="torch")
    got = sequence_reference_scores(model, batch, opts)
    with torch.no_grad():
        want = _oracle_scores(model, batch, objective)
        unbiased = _oracle_scores(_without_bias(model), batch, objective)
    assert (want - unbiased).abs().max() > 1e-1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_dpo_reference_scores_average_a_one_token_response(setup, batch):
    """average_log_prob divides each row by its own token count, one for a one-token response."""
    _, proc = setup
    labels = batch["labels"].clone()
    cols = (labels[1] != -100).nonzero().flatten()
    labels[1, cols[1] :] = -100  # pair 1's chosen response keeps its first token only
    batch = dict(batch, labels=labels)
    model = _model(proc)
    got = sequence_reference_scores(model, batch, StepOptions(objective="dpo", average_log_prob=True, backend="torch"))
    with torch.no_grad():
        want = _oracle_scores(model, batch, "dpo", average=True)
        summed = _oracle_scores(model, batch, "dpo")
    assert (_shifted(labels) != -100).sum(-1)[1] == 1
    torch.testing.assert_close(want[1], summed[1])  # the mean of one token is that token's log-prob
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- the ZeRO-3 branch, in process ---------------------------------------------------------------------------


def _mark_zero3(model):
    """Mark the lm_head as ZeRO-3 parameters a module hook has already gathered (nothing to gather here)."""
    for p in (model.lm_head.weight, model.lm_head.bias):
        if p is None:
            continue
        p.ds_id = 0
        p.ds_status = types.SimpleNamespace(name="AVAILABLE")


@pytest.mark.parametrize("grad_mode", ["fused", "recompute"])
def test_zero3_branch_gives_the_plain_step(setup, batch, monkeypatch, grad_mode):
    _, proc = setup
    plain = _model(proc)
    marked = copy.deepcopy(plain)
    _mark_zero3(marked)

    applied, loss_calls = [], []
    apply, tpo_loss = model_module._Zero3GatheredLoss.apply, model_module.tpo_loss

    def counted_apply(*args):
        applied.append(len(args))
        return apply(*args)

    def counted_loss(*args, **kwargs):
        loss_calls.append(torch.is_grad_enabled())
        return tpo_loss(*args, **kwargs)

    monkeypatch.setattr(model_module._Zero3GatheredLoss, "apply", counted_apply)
    monkeypatch.setattr(model_module, "tpo_loss", counted_loss)
    opts = StepOptions(beta=BETA, backend="torch", grad_mode=grad_mode)
    ref = _ref_scores(batch, "tpo")
    runs = {}
    for name, model in (("plain", plain), ("zero3", marked)):
        loss_calls.clear()
        out = policy_loss(model, batch, opts, ref)
        out["loss"].backward()
        runs[name] = out, list(loss_calls)
    assert applied == [7]  # the marked model, and only it, went through _Zero3GatheredLoss
    (out0, calls0), (out1, calls1) = runs["plain"], runs["zero3"]
    assert calls0 == [True]
    # fused: the gradient is computed in the (gathered) forward, once; recompute: the forward runs without
    # gradient and the backward computes the loss again
    assert calls1 == ([True] if grad_mode == "fused" else [False, True])

    torch.testing.assert_close(out1["loss"], out0["loss"], rtol=1e-6, atol=1e-7)
    assert sorted(out1["metrics"]) == sorted(out0["metrics"]) and len(out0["metrics"]) == 8
    for key, value in out0["metrics"].items():
        torch.testing.assert_close(out1["metrics"][key], value, rtol=1e-6, atol=1e-6, msg=key)
    assert out1["tokens"] == out0["tokens"]
    grads0 = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    grads1 = {n: p.grad for n, p in marked.named_parameters() if p.grad is not None}
    assert set(grads1) == set(grads0) and {"lm_head.weight", "lm_head.bias"} < set(grads0)
    scale = max(float(g.abs().max()) for g in grads0.values())
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("grad_mode", ["fused", "recompute"])
@pytest.mark.parametrize("variant", ["no-bias", "frozen-head", "no-grad", "upstream"])
def test_zero3_branch_variants(setup, batch, grad_mode, variant):
    """The ZeRO-3 branch against the plain step where its gradient bookkeeping differs: an lm_head without bias
    (a None input), a frozen lm_head (LoRA: inputs that need no gradient), no gradient at all (evaluation) and
    an upstream gradient other than 1 (loss scaling, accumulation)."""
    _, proc = setup
    plain = _model(proc, bias=variant != "no-bias")
    if variant == "frozen-head":
        for p in plain.lm_head.parameters():
            p.requires_grad_(False)
    marked = copy.deepcopy(plain)
    _mark_zero3(marked)
    opts = StepOptions(beta=BETA, backend="torch", grad_mode=grad_mode)
    ref = _ref_scores(batch, "tpo")
    outs = []
    for model in (plain, marked):
        if variant == "no-grad":
            with torch.no_grad():
                outs.append(policy_loss(model, batch, opts, ref))
            continue
        out = policy_loss(model, batch, opts, ref)
        (out["loss"] * (2.5 if variant == "upstream" else 1.0)).backward()
        outs.append(out)
    torch.testing.assert_close(outs[1]["loss"], outs[0]["loss"], rtol=1e-6, atol=1e-7)
    for key, value in outs[0]["metrics"].items():
        torch.testing.assert_close(outs[1]["metrics"][key], value, rtol=1e-6, atol=1e-6, msg=key)
    grads0 = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    grads1 = {n: p.grad for n, p in marked.named_parameters() if p.grad is not None}
    assert set(grads1) == set(grads0)
    if variant == "no-grad":
        assert not grads0 and not outs[1]["loss"].requires_grad
        return
    assert grads0 and ("lm_head.weight" in grads0) == (variant != "frozen-head")
    scale = max(float(g.abs().max()) for g in grads0.values())
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-6 * scale, msg=name)


# -- options reaching the losses and the trunk ------------------------------------------------------------


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_another_ignore_index_gives_the_same_step(setup, batch, objective):
    """Labels written with ignore_index=-1 and StepOptions(ignore_index=-1): the default step, exactly."""
    _, proc = setup
    model = _model(proc)
    kw = dict(objective=objective, beta=BETA, backend="torch")
    default, other = StepOptions(**kw), StepOptions(ignore_index=-1, **kw)
    relabeled = _relabel(batch, -1)
    assert int((relabeled["labels"] == -1).sum()) > 0 and int((relabeled["labels"] == -100).sum()) == 0

    with torch.no_grad():
        h0, hc0, t0 = response_branches(model, batch, default)
        h1, hc1, t1 = response_branches(model, relabeled, other)
    torch.testing.assert_close(h1, h0, rtol=0, atol=0)  # same window, same rows
    torch.testing.assert_close(hc1, hc0, rtol=0, atol=0)
    assert torch.equal(t1, t0.masked_fill(t0 == -100, -1))
    assert -100 not in t1

    ref0 = sequence_reference_scores(model, batch, default)
    ref1 = sequence_reference_scores(model, relabeled, other)
    torch.testing.assert_close(ref1, ref0, rtol=1e-6, atol=1e-6)
    out0, out1 = policy_loss(model, batch, default, ref0), policy_loss(model, relabeled, other, ref0)
    torch.testing.assert_close(out1["loss"], out0["loss"], rtol=1e-6, atol=1e-7)
    for key, value in out0["metrics"].items():
        torch.testing.assert_close(out1["metrics"][key], value, rtol=1e-6, atol=1e-6, msg=key)
    assert out1["tokens"] == out0["tokens"] == int((batch["labels"][:, 1:] != -100).sum())


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_options_reach_the_loss_functions(setup, batch, monkeypatch, objective):
    """backend and grad_mode change no value on a CPU: check that they (and the rest) are passed on."""
    _, proc = setup
    calls = []
    record_calls(monkeypatch, model_module,
                 ("tpo_loss", "dpo_loss", "povid_loss", "reference_sequence_scores", "povid_reference_scores"), calls)
    record_calls(monkeypatch, tpo_fast, ("token_stats",), calls)  # model.py imports it from tpo_fast when it runs
    model = _model(proc)
    opts = StepOptions(objective=objective, beta=BETA, backend="reference", grad_mode="recompute", ignore_index=-1,
                       average_log_prob=True)
    batch = _relabel(batch, -1)
    ref = sequence_reference_scores(model, batch, opts)
    policy_loss(model, batch, opts, ref)["loss"].backward()

    reference = {"tpo": "reference_sequence_scores", "dpo": "token_stats", "povid": "povid_reference_scores"}
    assert [name for name, _ in calls] == [reference[objective], f"{objective}_loss"]
    for name, args in calls:
        assert args["backend"] == "reference", name
        assert args["ignore_index"] == -1, name
        assert args["bias"] is model.lm_head.bias, name
        if name != "token_stats":
            assert args["average_log_prob"] is True, name
        if name.endswith("_loss"):
            assert args["grad_mode"] == "recompute", name
            assert args["beta"] == BETA and args["ref_seq_scores"] is ref, name


def test_padding_free_reaches_the_trunk(setup, batch):
    """padding_free=True without a shared prefix: the trunk runs one row of the batch's kept tokens, no padding."""
    _, proc = setup
    model = _model(proc, bias=False)
    seen = []
    model.model.language_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    kw = dict(objective="dpo", reference="none", backend="torch", shared_prefix=False)
    packed = policy_loss(model, batch, StepOptions(padding_free=True, **kw))
    padded = policy_loss(model, batch, StepOptions(padding_free=False, **kw))
    # A row keeps its tokens up to the last one that predicts a label: as many as the column of its last label.
    labels = batch["labels"]
    last_label = torch.stack([(row != -100).nonzero().max() for row in labels])
    assert bool((last_label < batch["attention_mask"].sum(1)).all())
    assert seen == [(1, int(last_label.sum())), tuple(labels.shape)]
    torch.testing.assert_close(packed["loss"], padded["loss"], rtol=1e-5, atol=1e-6)


# -- required keys and errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["tpo", "povid"])
def test_corrupted_objectives_need_corrupted_pixel_values(setup, batch, objective):
    _, proc = setup
    model = _model(proc, bias=False)
    del batch["corrupted_pixel_values"]
    # the policy's pass and the reference's scoring alike (the latter once skipped the check, a bare KeyError)
    for step in (response_branches, sequence_reference_scores):
        with pytest.raises(KeyError) as error:
            step(model, batch, StepOptions(objective=objective, backend="torch"))
        message = str(error.value)
        assert f"a {objective} batch needs 'corrupted_pixel_values'" in message and "TPOCollator" in message
    del batch["labels"]  # before the host copy reads it
    with pytest.raises(KeyError, match="batch needs 'labels'"):
        sequence_reference_scores(model, batch, StepOptions(objective=objective, backend="torch"))


@pytest.mark.parametrize("objective", ["tpo", "dpo"])
def test_rows_and_images_that_disagree_are_named(setup, batch, objective):
    """A hand-built batch whose image_index does not match its rows ran the first rows only (or paired the
    wrong ones) and failed later with an unrelated shape or image-feature message."""
    _, proc = setup
    model = _model(proc, bias=False)
    opts = StepOptions(objective=objective, backend="torch")
    short = {**batch, "image_index": batch["image_index"][:2]}  # 3 pairs, 2 entries
    with pytest.raises(ValueError, match=r"the batch has 6 rows and an image_index of shape \(2,\)"):
        response_branches(model, short, opts)
    odd = {k: (v[:5] if k in ("input_ids", "attention_mask", "labels") else v) for k, v in batch.items()}
    with pytest.raises(ValueError, match="the batch has 5 rows"):
        response_branches(model, odd, opts)
    far = {**batch, "image_index": torch.tensor([0, 1, 3])}  # 3 images in the batch
    with pytest.raises(ValueError, match=r"image_index holds \[0, 1, 3\], but pixel_values has 3 images"):
        response_branches(model, far, opts)


def test_an_adapter_on_lm_head_is_refused_and_modules_to_save_trains(setup, batch):
    """LoRA in lm_head's place: PEFT's `lm_head.weight` is the frozen base weight, so the fused loss left the
    adapter out silently (loss of the base head, no gradient for lora_A/B). It is refused; a trained copy
    (modules_to_save) is the head the loss sees, and the adapter reference (adapters disabled) is fine."""
    peft = pytest.importorskip("peft")
    _, proc = setup
    opts = StepOptions(objective="dpo", backend="torch", reference="none")
    lora = peft.get_peft_model(_model(proc, bias=False), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0, init_lora_weights=False))
    llava = lora.base_model.model
    with pytest.raises(ValueError, match="lm_head carries an active PEFT adapter .*modules_to_save=\\['lm_head'\\]"):
        policy_loss(llava, batch, opts)
    with lora.disable_adapter():  # the adapter reference: the base head, as the loss reads it
        sequence_reference_scores(llava, batch, opts)
    saved = peft.get_peft_model(_model(proc, bias=False), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"], lora_dropout=0.0))
    llava = saved.base_model.model
    trained = llava.lm_head.modules_to_save["default"].weight
    with torch.no_grad():
        trained.add_(0.5)  # the trained copy now differs from the original head
    policy_loss(llava, batch, opts)["loss"].backward()
    assert trained.grad is not None and trained.grad.abs().max() > 0


def test_adapters_on_lm_head_other_than_active_lora(setup, batch):
    """A merged LoRA head is the weight the loss reads (allowed, and the merged head's loss); any other adapter kind
    on lm_head (IA3 here: a wrapper without lora_A) is refused like an active LoRA."""
    peft = pytest.importorskip("peft")
    _, proc = setup
    opts = StepOptions(objective="dpo", backend="torch", reference="none")
    lora = peft.get_peft_model(_model(proc, bias=False), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["lm_head"], lora_dropout=0.0, init_lora_weights=False))
    llava = lora.base_model.model
    lora.merge_adapter()
    merged = policy_loss(llava, batch, opts)["loss"]
    plain = _model(proc, bias=False)
    with torch.no_grad():
        plain.lm_head.weight.copy_(llava.lm_head.base_layer.weight)  # the merged weight
    torch.testing.assert_close(merged, policy_loss(plain, batch, opts)["loss"], rtol=1e-6, atol=1e-6)
    ia3 = peft.get_peft_model(_model(proc, bias=False), peft.IA3Config(target_modules=["lm_head"],
                                                                       feedforward_modules=[]))
    with pytest.raises(ValueError, match=r"lm_head carries an active PEFT adapter \(Linear\)"):
        policy_loss(ia3.base_model.model, batch, opts)


def test_llava_found_inside_wrappers_and_other_models_refused(setup):
    """unwrap_llava: through PEFT and DDP-style `.module` wrappers, nested; a causal LM without a vision backbone
    (an `lm_head` but no `get_image_features`) and a bare module are refused, by name."""
    _, proc = setup
    llava = _model(proc, bias=False)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert model_module.unwrap_llava(Wrapper(Wrapper(llava))) is llava
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(llava, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert model_module.unwrap_llava(Wrapper(lora)) is llava
    text_only = types.SimpleNamespace(lm_head=torch.nn.Linear(2, 2), model=torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"expected a LLaVA-style model .*, got SimpleNamespace$"):
        model_module.unwrap_llava(text_only)
    with pytest.raises(TypeError, match=r", got Linear$"):
        model_module.unwrap_llava(torch.nn.Linear(2, 2))


def test_models_whose_images_need_more_than_pixel_values_are_refused_by_name():
    """LLaVA-NeXT's `get_image_features` needs `image_sizes` (tiled images) and Qwen2-VL's takes `image_grid_thw`:
    the step passes pixel values alone, so both are refused up front, by name, pointing to the loss API."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=7, projection_dim=16)
    text = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    tiled = LlavaNextForConditionalGeneration(
        LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=4, image_grid_pinpoints=[[28, 28]]))
    refused = (r"^LlavaNextForConditionalGeneration is not a model the trainer can step: `get_image_features` "
               r"needs image_sizes \(tiled images .*tpo_fast\.loss\.tpo_loss")
    with pytest.raises(TypeError, match=refused):
        model_module.unwrap_llava(tiled)

    class GridVision(torch.nn.Module):
        def get_image_features(self, pixel_values, image_grid_thw=None, **kwargs):
            raise AssertionError("never called")

    class GridModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.lm_head = GridVision(), torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match=r"^GridModel is not a model .*: its images carry image_grid_thw "
                                        r"\(Qwen2-VL-style models"):
        model_module.unwrap_llava(GridModel())

    class Optional(GridVision):  # options with defaults, and **kwargs, are what LLaVA-1.5's own method has
        def get_image_features(self, pixel_values, vision_feature_layer=None, image_sizes=None, **kwargs):
            raise AssertionError("never called")

    plain = GridModel()
    plain.model = Optional()
    assert model_module.unwrap_llava(plain) is plain


def test_a_step_under_an_older_transformers_stops_at_the_model_saying_what_to_install(setup, monkeypatch):
    import transformers

    _, proc = setup
    llava = _model(proc, bias=False)
    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    with pytest.raises(ImportError, match=r"needs transformers >= 5\.17\.0 .* found 4\.57\.1"):
        model_module.unwrap_llava(llava)


def test_image_token_mask_from_the_config_where_the_model_has_no_helper():
    """Transformers versions whose LLaVA model has no `get_placeholder_mask`: the placeholders are the config's
    image token (`image_token_id`, or the older `image_token_index`), checked against the number of features."""
    ids = torch.tensor([[5, 7, 7, 9], [7, 7, 1, 2]])
    embeds = torch.zeros(2, 4, 3)
    features = torch.ones(4 * 3)
    for config in (types.SimpleNamespace(image_token_id=7), types.SimpleNamespace(image_token_index=7)):
        mask = model_module._image_token_mask(types.SimpleNamespace(config=config), ids, embeds, features)
        assert mask.shape == (2, 4, 1) and mask[..., 0].tolist() == (ids == 7).tolist()
    backbone = types.SimpleNamespace(config=types.SimpleNamespace(image_token_id=7))
    with pytest.raises(ValueError, match="^image features and image tokens do not match: 4 tokens, 3 features$"):
        model_module._image_token_mask(backbone, ids, embeds, torch.ones(3 * 3))


@pytest.mark.parametrize("objective", ["tpo", "dpo", "povid"])
@pytest.mark.parametrize("shared_prefix", [True, False], ids=["shared", "padded"])
def test_a_step_plans_its_trunk_passes_with_one_read_of_the_batch(setup, batch, monkeypatch, objective,
                                                                  shared_prefix):
    """On CUDA every read of a device value waits for the queue to drain, and the host stops running ahead of the
    device. A step's trunk pass (images' bounds, response window, packing, image placeholders) read the batch
    back about fifteen times, and the reference's scoring once more, which made the host wait for the reference's
    whole pass before it could issue the policy's. Now the step reads the batch once: one host copy of its integer
    tensors, shared by both passes, from which the host plans everything, the reference scoring's rows included
    (POVID's reference still counts its own: one more). The hidden states and scores are those of the oracle
    tests of this file."""

    _, proc = setup
    model, ref = _model(proc, bias=False), _model(proc, bias=False, seed=1)
    opts = StepOptions(objective=objective, backend="torch", shared_prefix=shared_prefix)
    response_branches(model, batch, opts)  # once first: the packing switches the attention once, logs once
    response_branches(ref, batch, opts)
    model_module._LAST_HOST.clear()  # a batch the step has not seen
    mode = watch_device_reads(monkeypatch, batch)
    with torch.no_grad(), mode:
        sequence_reference_scores(ref, batch, opts)
        response_branches(model, batch, opts)
    assert mode.seen == ["host_copy"] + (["tolist"] if objective == "povid" else []), mode.seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's own detector of synchronizing calls")
@pytest.mark.parametrize("objective", ["tpo", "dpo"])
def test_a_cuda_step_synchronizes_once(setup, batch, objective):
    """The GPU counterpart of the read counts above: a step with its host copy seeded (as `TPOTrainer._prepare_inputs`
    does), the reference's scores, the policy's loss and backward, in bf16 under `set_sync_debug_mode("warn")`,
    synchronizes once, at the policy loss's plan; a failure names each synchronizing line."""
    import warnings

    _, proc = setup
    model = _model(proc, bias=False).cuda().to(torch.bfloat16)
    ref = _model(proc, bias=False, seed=1).cuda().to(torch.bfloat16)
    opts = StepOptions(objective=objective, backend="triton")

    def step():
        cuda = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        cuda["pixel_values"] = cuda["pixel_values"].to(torch.bfloat16)
        if "corrupted_pixel_values" in cuda:
            cuda["corrupted_pixel_values"] = cuda["corrupted_pixel_values"].to(torch.bfloat16)
        model_module.seed_host_batch(cuda, batch, opts.ignore_index)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                scores = sequence_reference_scores(ref, cuda, opts)
                policy_loss(model, cuda, opts, scores)["loss"].backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return [f"{w.filename}:{w.lineno}" for w in seen if "synchroniz" in str(w.message).lower()]

    step()  # compiles the kernels, probes the varlen call, switches the attention
    syncs = step()
    assert len(syncs) == 1 and "fused_pairs" in syncs[0], syncs


def test_the_host_copy_is_shared_only_by_the_same_unchanged_batch(batch):
    """The step's two passes share one host copy; another batch, an in-place change of one of its tensors or another
    ignore_index gets a fresh copy, whose values are the batch's own."""
    model_module._LAST_HOST.clear()
    first = model_module.host_batch(batch, -100)
    assert model_module.host_batch(batch, -100) is first
    assert model_module.host_batch(dict(batch), -100) is first  # the same tensors in another dict (a wrapper's)
    assert model_module.host_batch(batch, 0) is not first
    other = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    assert model_module.host_batch(other, -100) is not model_module.host_batch(batch, -100)
    again = model_module.host_batch(batch, -100)
    batch["labels"][0, -1] = 7  # in place: its version moves on
    fresh = model_module.host_batch(batch, -100)
    assert fresh is not again and fresh.targets[0, -2] == 7 and again.targets[0, -2] != 7
    for name in ("input_ids", "attention_mask", "image_index"):
        assert torch.equal(getattr(fresh, name), batch[name])


def test_reference_scoring_checks_the_targets_range_on_the_host(setup, batch):
    """The reference's scoring takes its rows from the host copy and no longer reads the device for the range check:
    the host copy checks it, with the message the primitive gives."""
    _, proc = setup
    ref = _model(proc, bias=False)
    vocab = ref.lm_head.weight.shape[0]
    bad = dict(batch, labels=batch["labels"].clone())
    row, col = (bad["labels"] != -100).nonzero()[0].tolist()
    bad["labels"][row, col] = vocab + 3
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, V\) = \[0, {vocab}\) or equal "
                                         rf"ignore_index=-100; targets\[\d+\] = {vocab + 3}"):
        sequence_reference_scores(ref, bad, StepOptions(objective="tpo", backend="torch"))


def test_dpo_needs_no_corrupted_pixel_values(setup, batch):
    _, proc = setup
    model = _model(proc, bias=False)
    opts = StepOptions(objective="dpo", backend="torch")
    with torch.no_grad():
        h0, hc0, t0 = response_branches(model, batch, opts)
        del batch["corrupted_pixel_values"]
        h1, hc1, t1 = response_branches(model, batch, opts)
    assert hc0 is None and hc1 is None
    torch.testing.assert_close(h1, h0, rtol=0, atol=0)
    assert torch.equal(t1, t0)


def test_adapter_reference_needs_a_peft_model(setup, batch):
    _, proc = setup
    message = "reference='adapter' needs a PEFT model (pass peft_config or a PeftModel)"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        policy_loss(_model(proc, bias=False), batch, StepOptions(reference="adapter", backend="torch"))


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_reference_scores_are_required(setup, batch, reference):
    _, proc = setup
    message = f"reference={reference!r} needs reference scores for the batch; none were given"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        policy_loss(_model(proc, bias=False), batch, StepOptions(reference=reference, backend="torch"))


# -- dtype -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_lm_head_is_cast_to_the_dtype_of_the_hidden_states(setup, batch, objective):
    """A bf16 trunk under an fp32 lm_head (weight and bias): the step is the one of the lm_head cast to bf16,
    bit for bit, and the fp32 parameters get the bf16 gradients."""
    _, proc = setup
    mixed = _model(proc)
    head = {k: v.detach().clone() for k, v in mixed.lm_head.state_dict().items()}
    mixed.to(torch.bfloat16)
    mixed.lm_head.float().load_state_dict(head)  # fp32 values a bf16 cast rounds
    assert mixed.lm_head.weight.dtype == mixed.lm_head.bias.dtype == torch.float32
    cast = copy.deepcopy(mixed)
    cast.lm_head.to(torch.bfloat16)
    for name in ("weight", "bias"):
        assert not torch.equal(getattr(cast.lm_head, name).float(), head[name]), name

    opts = StepOptions(objective=objective, beta=BETA, backend="torch")
    ref = _ref_scores(batch, objective)
    runs = []
    for model in (mixed, cast):
        scores = sequence_reference_scores(model, batch, opts)
        out = policy_loss(model, batch, opts, ref)
        out["loss"].backward()
        runs.append((scores, out["loss"]))
    (scores0, loss0), (scores1, loss1) = runs
    torch.testing.assert_close(scores0, scores1, rtol=0, atol=0)
    torch.testing.assert_close(loss0, loss1, rtol=0, atol=0)
    for name in ("weight", "bias"):
        got, want = getattr(mixed.lm_head, name).grad, getattr(cast.lm_head, name).grad
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.float(), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("options", "error", "message"), [
    (dict(beta=0.0), ValueError, "beta must be a finite number > 0 (TPO and DPO use 0.1), got 0.0"),
    (dict(weighting="tokens"), ValueError, "weighting must be one of ('tpo', 'none')"),
    (dict(offset=-0.5), ValueError, "offset must be a finite number >= 0"),
    (dict(loss_type="kto"), ValueError, "loss_type must be one of ('sigmoid', 'hinge', 'ipo'), got 'kto'"),
    (dict(loss_type="hinge", label_smoothing=0.1), ValueError, "label_smoothing only applies to loss_type='sigmoid'"),
    (dict(backend="cuda"), ValueError, "backend must be one of ('auto', 'triton', 'torch', 'reference'), got 'cuda'"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int (default -100), got 1.5"),
    (dict(grad_mode="fast"), ValueError, "grad_mode must be one of ('auto', 'fused', 'recompute') ('auto': fused"),
])
def test_step_options_refuse_a_bad_option_when_built(options, error, message):
    """A StepOptions with an option outside the loss's domain fails when it is made, with the loss layer's message,
    not at the first step (TPOConfig checks the same domains)."""
    with pytest.raises(error, match="^" + re.escape(message)):
        StepOptions(**options)
