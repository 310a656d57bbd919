"""FiSAO (tpo_fast.methods.fisao): verifier, token-level clipped PG loss, rollout-then-update step."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from _device import backend_device, moved
from _spies import record_calls
from methods_reference import pg_loss_reference

from tpo_fast.methods.fisao import (
    TokenVerifier,
    VisionEncoderVerifier,
    check_thresholds,
    fisao_step,
    is_object_word,
    load_calibration,
    rewards_to_grid,
    token_advantages,
    token_pg_loss,
    token_word,
)

R, T, D, V = 3, 6, 20, 77


def make(bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(R, T, D, generator=g).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D**0.5).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).requires_grad_() if bias else None
    y = torch.randint(0, V, (R, T), generator=g)
    y[:, :1] = -100
    y[1, 4:] = -100
    y[2, :] = -100  # a row without response tokens
    with torch.no_grad():
        logp = F.linear(h, w, b).log_softmax(-1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    # Old and reference log-probs near the current ones, so some ratios clip and some do not.
    old = logp + 0.3 * torch.randn(R, T, generator=g)
    ref = logp + 0.5 * torch.randn(R, T, generator=g)
    adv = torch.randn(R, T, generator=g)
    return h, w, b, y, old, ref, adv


CASES = {
    "k3-token": dict(),
    "k1-seq": dict(kl_estimator="k1", aggregation="seq_mean"),
    "k2-asym": dict(kl_estimator="k2", clip_eps=0.1, clip_eps_high=0.3),
    "nokl": dict(kl_coef=0.0),
}


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_pg_loss_matches_reference(backend, bias, case):
    opts = dict(CASES[case])
    h, w, b, y, old, ref, adv = moved(backend_device(backend), *make(bias))
    out = token_pg_loss(w, h, y, b, advantages=adv, old_logprobs=old, ref_logprobs=ref, backend=backend, **opts)
    g = torch.randn(())
    (out.loss * g).backward()
    h2, w2, b2 = (None if t is None else t.detach().clone().requires_grad_() for t in (h, w, b))
    ref_opts = {"kl_coef": 0.05, **opts}
    want = pg_loss_reference(h2, y, w2, b2, old, ref, adv, **ref_opts)
    (want * g).backward()
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    for name, a, e in (("hidden", h.grad, h2.grad), ("weight", w.grad, w2.grad)) + (
        (("bias", b.grad, b2.grad),) if bias else ()
    ):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"grad of {n}: {m}")
    assert 0 < out.metrics["pg/clip_frac"] < 1


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_per_sequence_advantages_reach_each_response_token(aggregation):
    # (R,) advantages: the oracle gets the (R, T) grid with each row's value written out by hand.
    h, w, b, y, old, ref, _ = make(True, seed=2)
    seq_adv = torch.tensor([0.7, -1.3, 2.0])
    grid = torch.tensor([[0.7] * T, [-1.3] * T, [2.0] * T])
    out = token_pg_loss(w, h, y, b, advantages=seq_adv, old_logprobs=old, ref_logprobs=ref, aggregation=aggregation,
                        backend="torch")
    out.loss.backward()
    h2, w2, b2 = (t.detach().clone().requires_grad_() for t in (h, w, b))
    want = pg_loss_reference(h2, y, w2, b2, old, ref, grid, kl_coef=0.05, aggregation=aggregation)
    want.backward()
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-6)
    mask = y != -100
    assert out.metrics["advantages/mean"].item() == pytest.approx((grid[mask]).mean().item(), abs=1e-6)


def test_on_policy_is_plain_policy_gradient():
    # old_logprobs=None: ratio 1, nothing clipped, gradient = -sum(A dlogp) / tokens.
    h, w, b, y, _, _, adv = make(False, seed=1)
    out = token_pg_loss(w, h, y, advantages=adv, kl_coef=0.0, backend="torch")
    out.loss.backward()
    mask = y != -100
    w2 = w.detach().clone().requires_grad_()
    logp = F.linear(h.detach(), w2).log_softmax(-1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    (-(adv * logp * mask).sum() / mask.sum()).backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-7)
    assert out.metrics["pg/clip_frac"] == 0 and out.metrics["pg/ratio_mean"] == 1


def test_pg_errors():
    h, w, b, y, old, ref, adv = make(False)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        token_pg_loss(w, h, y, advantages=adv)
    with pytest.raises(ValueError, match="advantages must have"):
        token_pg_loss(w, h, y, advantages=adv[:1], kl_coef=0)
    with pytest.raises(ValueError, match="clip_eps must be"):
        token_pg_loss(w, h, y, advantages=adv, kl_coef=0, clip_eps=1.5)
    with pytest.raises(ValueError, match="kl_estimator"):
        token_pg_loss(w, h, y, advantages=adv, ref_logprobs=ref, kl_estimator="k4")
    with pytest.raises(ValueError, match="hidden must be"):
        token_pg_loss(w, h[:, :2], y, advantages=adv, kl_coef=0)


def test_token_advantages():
    r = torch.tensor([[1.0, 0.0, 2.0, 5.0], [0.0, -1.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]]).bool()
    torch.testing.assert_close(token_advantages(r, m), torch.tensor([[1.0, 0, 2, 0], [0, -1, 0, 0]]))
    ret = token_advantages(r, m, mode="return", gamma=0.5)
    torch.testing.assert_close(ret, torch.tensor([[1 + 0 + 0.5, 0 + 1.0, 2, 0], [0, -1, 0, 0]]))
    white = token_advantages(r, m, whiten=True)
    assert abs(float(white[m].mean())) < 1e-6 and abs(float(white[m].std(unbiased=False)) - 1) < 1e-5
    with pytest.raises(ValueError, match="advantage mode"):
        token_advantages(r, m, mode="gae")


def test_object_words():
    assert token_word("▁Dogs") == "dogs" and token_word("Ġcat") == "cat"
    assert token_word("▁dog,") == "dog" and token_word("Ġ(cat).") == "cat" and token_word("▁.") == ""
    objs = frozenset({"dog", "bus"})
    assert is_object_word("dogs", objs) and is_object_word("buses", objs) and not is_object_word("the", objs)
    # the default objects: COCO's head nouns, not the modifiers of its two-word categories; irregular plurals
    from tpo_fast.methods.fisao import COCO_OBJECTS

    for word in ("hydrant", "sign", "meter", "bear", "dog", "men", "women", "children", "dryer", "people"):
        assert is_object_word(word, COCO_OBJECTS), word
    for word in ("hot", "stop", "fire", "parking", "teddy", "traffic", "light"):
        assert not is_object_word(word, COCO_OBJECTS), word
    # the irregular plurals the comment above COCO_OBJECTS promises; "es" only after s, x, z, ch, sh
    for word in ("knives", "mice", "ski", "skis", "sheep", "buses", "glasses", "benches", "sandwiches", "couches",
                 "toothbrushes", "cars", "cakes", "ties"):
        assert is_object_word(word, COCO_OBJECTS), word
    for word in ("cares", "manes", "cates"):
        assert not is_object_word(word, COCO_OBJECTS), word


WORDS = ["a", "dog", "cat", "on", "the", "mat", "is", "there", "describe", "image", "red", "and", "bus", "."]


@pytest.fixture(scope="module")
def tiny():
    from PIL import Image

    from tpo_fast.trainer.tiny import build_tiny_llava, build_tiny_processor

    processor = build_tiny_processor(WORDS)
    model = build_tiny_llava(len(processor.tokenizer), seed=2)
    g = torch.Generator().manual_seed(1)
    images = [Image.fromarray((torch.rand(28, 28, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(2)]
    return model, processor, images


def test_vision_verifier_similarity_and_rewards(tiny):
    model, processor, images = tiny
    tok = processor.tokenizer
    verifier = VisionEncoderVerifier(model, processor.image_processor, objects=["dog", "cat", "bus", "mat"])
    assert isinstance(verifier, TokenVerifier)
    ids = [torch.tensor(tok.convert_tokens_to_ids(["a", "dog", "on", "the", "mat"])),
           torch.tensor(tok.convert_tokens_to_ids(["cats", "bus", "."]))]
    sims = verifier.similarities(images, ids)
    # Reference: cosine of the token embedding to every projected patch, max over patches.
    with torch.no_grad():
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        feats = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        emb = model.get_input_embeddings().weight
        want = torch.cat([F.cosine_similarity(emb[i][:, None, :], feats[r][None], dim=-1).amax(-1)
                          for r, i in enumerate(ids)])
    torch.testing.assert_close(sims, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="not calibrated"):
        verifier.token_rewards(images, ids, tok)
    verifier.low, verifier.high = float(sims.min()) + 0.01, float(sims.max()) - 0.01
    rewards = verifier.token_rewards(images, ids, tok)
    objects = torch.tensor([0, 1, 0, 0, 1, 0, 1, 0]).bool()  # "cats" is unknown to the tokenizer: <unk>
    assert rewards.shape == (8,)
    assert (rewards[~objects] == 0).all()
    lin = ((2 * sims - verifier.high - verifier.low) / (verifier.high - verifier.low)).clamp(-1, 1)
    torch.testing.assert_close(rewards[objects], lin[objects])
    # Step mode, thresholds at the least and the most similar of the 3 object tokens: +1 at or above `high`,
    # -1 at or below `low`, 0 between and for every other token.
    verifier.mode = "step"
    positions = objects.nonzero().squeeze(1)
    order = positions[sims[positions].argsort()]
    verifier.low, verifier.high = float(sims[order[0]]), float(sims[order[-1]])
    want_step = torch.zeros(8)
    want_step[order[0]], want_step[order[-1]] = -1.0, 1.0
    assert torch.equal(verifier.token_rewards(images, ids, tok), want_step)


@pytest.mark.parametrize("mode", ["linear", "step"])
def test_rewards_from_similarity_exact_values(tiny, mode):
    """Hand-computed rewards for thresholds low = 0.3, high = 0.7 (a non-object token always gets 0)."""
    model, processor, _ = tiny
    verifier = VisionEncoderVerifier(model, processor.image_processor, low=0.3, high=0.7, mode=mode)
    sims = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.3, 0.6, 0.95])
    is_object = torch.tensor([1, 1, 1, 1, 1, 1, 0]).bool()
    want = {"linear": [1.0, -1.0, 0.0, 1.0, -1.0, 0.5, 0.0], "step": [1.0, -1.0, 0.0, 1.0, -1.0, 0.0, 0.0]}[mode]
    torch.testing.assert_close(verifier.rewards_from_similarity(sims, is_object), torch.tensor(want))


def test_vision_verifier_calibration(tiny):
    model, processor, images = tiny
    tok = processor.tokenizer
    verifier = VisionEncoderVerifier(model, processor.image_processor, objects=["dog", "cat", "bus", "mat"])
    ids = {w: torch.tensor([tok.convert_tokens_to_ids(w)]) for w in ("dog", "cat", "bus", "mat")}
    sims = {w: verifier.similarities(images[:1], [i]).item() for w, i in ids.items()}
    ranked = sorted(sims, key=sims.get)
    low, high = verifier.calibrate(images[:1], [ranked[2:]], [ranked[:2]], tok)
    assert low == pytest.approx((sims[ranked[0]] + sims[ranked[1]]) / 2, abs=1e-6)
    assert high == pytest.approx((sims[ranked[2]] + sims[ranked[3]]) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="does not separate"):
        verifier.calibrate(images[:1], [ranked[:2]], [ranked[2:]], tok)
    with pytest.raises(ValueError, match="high > low"):
        VisionEncoderVerifier(model, processor.image_processor, low=0.5, high=0.1)


def test_vision_verifier_needs_finite_thresholds(tiny):
    """An infinite threshold made the linear reward NaN (inf / inf), and the update trained on NaN."""
    model, processor, _ = tiny
    for low, high in ((-math.inf, 0.1), (0.0, math.inf), (math.nan, 0.5)):
        with pytest.raises(ValueError, match=re.escape(f"the calibration thresholds must be finite numbers, got "
                                                       f"low={low}, high={high}")):
            VisionEncoderVerifier(model, processor.image_processor, low=low, high=high)
    with pytest.raises(ValueError, match="^the calibration thresholds need high > low, got low=0.5, high=0.1$"):
        check_thresholds(0.5, 0.1)
    check_thresholds(-1, 1)


def test_calibration_file_errors_name_the_file_and_record(tmp_path):
    good = {"image": "a.png", "correct": ["dog"], "hallucinated": ["cat"]}
    cases = [
        ("{bad", "not valid JSON (Expecting property name enclosed in double quotes at line 1, column 2)"),
        ("[]", "must hold a non-empty JSON list of records, got an empty list"),
        ('{"image": "a.png"}', "must hold a non-empty JSON list of records, got dict"),
        (json.dumps([good, 3]), "record #1: not an object but int"),
        (json.dumps([{"correct": [], "hallucinated": []}]), "record #0: needs \"image\" (a path), got keys "
         "['correct', 'hallucinated']"),
        (json.dumps([good, {"image": "0000_red_square.png"}]), "record #1: needs \"correct\" (a list of words), got "
         "no such key"),
        (json.dumps([{**good, "hallucinated": "cat"}]), "record #0: needs \"hallucinated\" (a list of words), got "
         "'cat'"),
    ]
    path = tmp_path / "cal.json"
    for text, want in cases:
        path.write_text(text)
        with pytest.raises(ValueError) as e:
            load_calibration(path)
        assert str(e.value) == f"{path}: {want}", text
    path.write_text(json.dumps([good]))
    assert load_calibration(path) == [good]


def test_rewards_to_grid_checks_counts():
    targets = torch.tensor([[-100, 5, 6, -100], [-100, 7, -100, -100]])
    grid = rewards_to_grid(torch.tensor([1.0, 2.0, 3.0]), [torch.tensor([5, 6]), torch.tensor([7])], targets)
    torch.testing.assert_close(grid, torch.tensor([[0.0, 1, 2, 0], [0, 3, 0, 0]]))
    with pytest.raises(ValueError, match=r"\(N,\) = \(3,\)"):
        rewards_to_grid(torch.ones(2), [torch.tensor([5, 6]), torch.tensor([7])], targets)


class FixedVerifier:
    """Rewards +1 on every "dog" token and -1 on every "cat" token: a verifier the policy can learn from."""

    def __init__(self, dog: int, cat: int):
        self.dog, self.cat = dog, cat

    def token_rewards(self, images, token_ids, tokenizer):
        flat = torch.cat(list(token_ids))
        return (flat == self.dog).float() - (flat == self.cat).float()


def _full_logits_logps(model, batch):
    """(R, L - 1) log-probs of `labels[:, 1:]` from the model's ordinary forward (shifted here), and their mask."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"][batch["image_index"]]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1), targets != -100


def _expected_update_metrics(template, forward_state, rollout_state, ref, ro, rewards, kl_coef=0.05, eps=0.2):
    """FiSAO's metrics of one update, from full logits: the policy as it was at the update's forward
    (`forward_state`), the rollout policy (`rollout_state`) for the ratio, the reference for the k3 KL."""
    twin = copy.deepcopy(template).eval()
    batch = ro.batch()
    twin.load_state_dict(forward_state)
    logp, mask = _full_logits_logps(twin, batch)
    twin.load_state_dict(rollout_state)
    old, _ = _full_logits_logps(twin, batch)
    ref_logp, _ = _full_logits_logps(ref, batch)
    adv = torch.zeros_like(logp)
    offset = 0
    for i, ids in enumerate(ro.response_ids):  # response tokens fill the masked positions in order
        adv[i, mask[i]] = rewards[offset:offset + ids.numel()]
        offset += ids.numel()
    ratio = torch.exp(logp - old)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    diff = ref_logp - logp
    kl = diff.exp() - diff - 1
    n = mask.sum()
    return {"loss": float(((-surrogate + kl_coef * kl) * mask).sum() / n), "kl/mean": float((kl * mask).sum() / n),
            "pg/ratio_mean": float((ratio * mask).sum() / n), "reward/mean": float(rewards.mean()),
            "tokens": float(rewards.numel())}


def _spy_rollouts(monkeypatch):
    import tpo_fast.methods.fisao as fisao_mod

    rollouts = []
    real = fisao_mod.rollout

    def spy(*args, **kwargs):
        rollouts.append(real(*args, **kwargs))
        return rollouts[-1]

    monkeypatch.setattr(fisao_mod, "rollout", spy)
    return rollouts


def _snapshots_before_steps(opt, model):
    """The model's state before every optimizer step: what each update's forward saw."""
    states = []
    opt.register_step_pre_hook(
        lambda *_: states.append({k: v.detach().clone() for k, v in model.state_dict().items()}))
    return states


def test_fisao_step_rollout_then_update(tiny, monkeypatch):
    model, processor, images = tiny
    tok = processor.tokenizer
    policy = copy.deepcopy(model)
    ref = copy.deepcopy(model).eval()
    verifier = FixedVerifier(tok.convert_tokens_to_ids("dog"), tok.convert_tokens_to_ids("cat"))
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    rollouts, states = _spy_rollouts(monkeypatch), _snapshots_before_steps(opt, policy)
    torch.manual_seed(0)
    m = fisao_step(policy, ref, processor, verifier, opt, images, ["describe the image .", "what is there ?"],
                   ppo_epochs=2, max_new_tokens=6, backend="torch")
    (ro,) = rollouts
    assert len(states) == 2
    rewards = verifier.token_rewards(ro.images, ro.response_ids, tok)
    # The second epoch is off the rollout policy (ratio != 1) and away from the reference (KL > 0).
    want = _expected_update_metrics(model, states[1], states[0], ref, ro, rewards)
    for key, value in want.items():
        assert m[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert m["kl/mean"] > 1e-6 and m["pg/ratio_mean"] != pytest.approx(1.0, abs=1e-6)
    changed = [n for n, p in policy.named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in changed
    assert all(p.grad is None for p in ref.parameters())
    with pytest.raises(ValueError, match="needs a reference"):
        fisao_step(policy, None, processor, verifier, opt, images, ["a ?", "b ?"], max_new_tokens=2)


class ParityVerifier:
    """Rewards +1 / -1 / 0 by token id modulo 3: every rollout gets non-zero rewards of both signs."""

    def token_rewards(self, images, token_ids, tokenizer):
        flat = torch.cat(list(token_ids))
        return (flat % 3 == 0).float() - (flat % 3 == 1).float()


def test_fisao_step_takes_reference_logprobs_from_the_reference_model(tiny, monkeypatch):
    """With a reference distinct from the policy, one on-policy update's KL is the k3 estimate against the
    reference's log-probs (computed here from its full logits); from the policy itself it would be 0."""
    model, processor, images = tiny
    policy = copy.deepcopy(model)
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    rollouts, states = _spy_rollouts(monkeypatch), _snapshots_before_steps(opt, policy)
    m = fisao_step(policy, ref, processor, ParityVerifier(), opt, images, ["describe the image .", "what is there ?"],
                   ppo_epochs=1, max_new_tokens=5, do_sample=False, kl_coef=0.5, backend="torch")
    (ro,) = rollouts
    rewards = ParityVerifier().token_rewards(None, ro.response_ids, None)
    assert (rewards != 0).any()
    want = _expected_update_metrics(model, states[0], states[0], ref, ro, rewards, kl_coef=0.5)
    assert want["kl/mean"] > 1e-4
    for key, value in want.items():
        assert m[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert m["pg/ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # on-policy: the rollout policy is the policy


def test_rollout_without_a_pad_token(tiny):
    """A tokenizer without a pad token (LLaMA's own) used to crash the rollout's padded batch (torch.full of None);
    now the padding slots take the eos id, masked out of attention and labels."""
    from tpo_fast.methods.fisao import rollout

    model, processor, images = tiny
    tok = processor.tokenizer
    saved = tok.pad_token
    tok.pad_token = None
    try:
        assert tok.pad_token_id is None
        ro = rollout(model, processor, images, ["describe the image .", "what is there ?"], max_new_tokens=4)
    finally:
        tok.pad_token = saved
    mask = ro.attention_mask.bool()
    assert (ro.input_ids[~mask] == tok.eos_token_id).all() and (ro.labels[~mask] == -100).all()
    for i, response in enumerate(ro.response_ids):  # the labels are the sampled tokens
        assert ro.labels[i][ro.labels[i] != -100].tolist() == response.tolist()


def test_fisao_update_matches_full_logits(tiny):
    # One update on a fixed rollout, fused path vs full logits from the model's own forward.
    from tpo_fast.methods.fisao import response_hidden, rollout, token_logprobs_of

    model, processor, images = tiny
    torch.manual_seed(1)
    ro = rollout(model, processor, images, ["describe the image .", "what is there ?"], max_new_tokens=5)
    batch = ro.batch()
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    old = token_logprobs_of(model, batch)
    hidden, targets, weight, bias = response_hidden(policy, batch)
    adv = torch.randn(targets.shape) * (targets != -100)
    out = token_pg_loss(weight, hidden, targets, bias, advantages=adv, old_logprobs=old, ref_logprobs=old,
                        backend="torch")
    out.loss.backward()
    twin = copy.deepcopy(policy)
    twin.zero_grad(set_to_none=True)
    logits = twin(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits[:, :-1]
    full_targets = batch["labels"][:, 1:]
    start = (full_targets != -100).any(0).nonzero()[0].item()
    logits, full_targets = logits[:, start:], full_targets[:, start:]
    mask = full_targets != -100
    logp = logits.float().log_softmax(-1).gather(-1, full_targets.clamp(min=0)[..., None]).squeeze(-1) * mask
    n = targets.shape[1]
    ratio = torch.exp(logp[:, :n] - old)
    surr = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    diff = old - logp[:, :n]
    per = (-surr + 0.05 * (diff.exp() - diff - 1)) * mask[:, :n]
    want = per.sum() / mask.sum()
    want.backward()
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    twin_params = dict(twin.named_parameters())
    for name, p in policy.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, twin_params[name].grad, rtol=1e-3, atol=1e-6,
                                       msg=lambda m, k=name: f"{k}: {m}")


@pytest.fixture(scope="module")
def fisao_dir(tmp_path_factory):
    """A saved tiny LLaVA folder (model + processor), two images, prompts, an object list and a calibration file."""
    import json

    from PIL import Image

    from tpo_fast.trainer.tiny import build_tiny_llava, build_tiny_processor

    root = tmp_path_factory.mktemp("fisao")
    processor = build_tiny_processor(WORDS)
    model = build_tiny_llava(len(processor.tokenizer), seed=3)
    model.save_pretrained(root / "llava")
    processor.save_pretrained(root / "llava")
    g = torch.Generator().manual_seed(0)
    for name in ("a.png", "b.png"):
        Image.fromarray((torch.rand(30, 34, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / name)
    (root / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"image": "a.png", "question": "describe the image ."}, {"image": "b.png", "prompt": "what is there ?"})))
    objects = ["dog", "cat", "bus", "mat"]
    (root / "objects.txt").write_text("\n".join(objects))
    # Calibration the verifier can pass: the two objects most similar to image a are "correct", the two
    # least similar "hallucinated"; the thresholds are then the means of each pair.
    verifier = VisionEncoderVerifier(model, processor.image_processor, objects=objects)
    image = Image.open(root / "a.png").convert("RGB")
    tok = processor.tokenizer
    sims = {w: verifier.similarities([image], [torch.tensor([tok.convert_tokens_to_ids(w)])]).item() for w in objects}
    ranked = sorted(sims, key=sims.get)
    (root / "calibration.json").write_text(json.dumps([{"image": "a.png", "correct": ranked[2:],
                                                         "hallucinated": ranked[:2]}]))
    low, high = (sims[ranked[0]] + sims[ranked[1]]) / 2, (sims[ranked[2]] + sims[ranked[3]]) / 2
    return root, low, high


def _oracle_rewards(model, processor, ro, objects, low, high):
    """fp32 (N,) linear rewards of a rollout's tokens: cosine of the token embedding to the image's projected
    patches (max), for object words only, mapped to [-1, 1] between the thresholds."""
    tok = processor.tokenizer
    with torch.no_grad():
        pixels = processor.image_processor(ro.images, return_tensors="pt")["pixel_values"]
        feats = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        emb = model.get_input_embeddings().weight
        out = []
        for r, ids in enumerate(ro.response_ids):
            sim = F.cosine_similarity(emb[ids][:, None, :], feats[r][None], dim=-1).amax(-1)
            is_object = torch.tensor([w in objects for w in tok.convert_ids_to_tokens(ids.tolist())])
            out.append(torch.where(is_object, ((2 * sim - high - low) / (high - low)).clamp(-1, 1), 0.0))
    return torch.cat(out)


def test_fisao_cli_end_to_end(fisao_dir, capsys, monkeypatch):
    """`tpo-fast fisao`: calibrate from a file, roll out, reward object tokens, update, save a loadable model."""
    import json

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tpo_fast.cli import main

    root, low, high = fisao_dir
    out = root / "run"
    rollouts = _spy_rollouts(monkeypatch)
    rc = main(["fisao", "--model", str(root / "llava"), "--prompts", str(root / "prompts.jsonl"), "--image-folder",
               str(root), "--calibration", str(root / "calibration.json"), "--objects", str(root / "objects.txt"),
               "--iterations", "2", "--batch-size", "2", "--ppo-epochs", "2", "--max-new-tokens", "8", "--lr", "1e-2",
               "--backend", "torch", "--output-dir", str(out)])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"fisao: calibrated thresholds low={low:.4f} high={high:.4f}" in lines
    steps = [json.loads(line) for line in lines if line.startswith("{")]
    assert [s["iteration"] for s in steps] == [1, 2]  # 2 prompts, batch 2: one step per iteration
    # The rewards come from the frozen initial model (the reference), whatever the policy became.
    initial = LlavaForConditionalGeneration.from_pretrained(root / "llava").eval()
    processor = AutoProcessor.from_pretrained(root / "llava")
    objects = set((root / "objects.txt").read_text().split())
    assert len(rollouts) == len(steps)
    for s, ro in zip(steps, rollouts, strict=True):
        assert all(torch.isfinite(torch.tensor(v)) for v in s.values())
        rewards = _oracle_rewards(initial, processor, ro, objects, low, high)
        assert s["tokens"] == rewards.numel() > 0
        assert s["reward/mean"] == pytest.approx(float(rewards.mean()), abs=1e-5)
        assert s["reward/nonzero"] == pytest.approx(float((rewards != 0).float().mean()), abs=1e-6)
    assert any(s["reward/nonzero"] > 0 for s in steps)  # the verifier scored some sampled object tokens
    # The saved folder is a complete model + processor, and training moved the weights.
    AutoProcessor.from_pretrained(out)
    before = LlavaForConditionalGeneration.from_pretrained(root / "llava").state_dict()
    after = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    assert before.keys() == after.keys()
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])


def test_fisao_cli_errors(fisao_dir, tmp_path, capsys):
    from tpo_fast.cli import main

    root, low, high = fisao_dir
    common = ["fisao", "--prompts", str(root / "prompts.jsonl"), "--image-folder", str(root), "--output-dir",
              str(tmp_path / "o"), "--backend", "torch"]
    assert main(common + ["--model", str(tmp_path / "nope"), "--low", "0.1", "--high", "0.2"]) == 2
    assert capsys.readouterr().err.startswith(f"tpo-fast fisao: error: --model {tmp_path / 'nope'}: no such folder")
    assert main(common + ["--model", str(root / "llava")]) == 2
    assert "needs calibrated thresholds; pass --calibration FILE, or both --low and --high" in capsys.readouterr().err
    # found before the model loads: one line, exit code 2 (it used to be the verifier's ValueError after loading)
    assert main(common + ["--model", str(root / "llava"), "--low", "0.3", "--high", "0.2"]) == 2
    assert "--low 0.3 --high 0.2: the hallucinated objects' threshold must be below" in capsys.readouterr().err


# ---- wiring found untested by a mutation run of methods/fisao.py ------------------------------------------------


def test_plural_rule_needs_the_singular_in_the_objects_and_grid_rows_follow_in_order():
    """A word ending in "es" or "s" is an object word only when its stem is an object ("yes" is not); the rewards of
    the third row start after the first two rows' tokens, not after the second's alone."""
    objs = frozenset({"dog", "box"})
    assert not is_object_word("yes", objs) and not is_object_word("cats", objs) and is_object_word("boxes", objs)
    targets = torch.tensor([[5, 6, -100], [7, -100, -100], [-100, 8, 9]])
    ids = [torch.tensor([5, 6]), torch.tensor([7]), torch.tensor([8, 9])]
    grid = rewards_to_grid(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), ids, targets)
    torch.testing.assert_close(grid, torch.tensor([[1.0, 2, 0], [3, 0, 0], [0, 4, 5]]))
    with pytest.raises(ValueError, match=r"^row 1: 2 target positions for 1 response tokens$"):
        rewards_to_grid(torch.ones(5), ids, torch.tensor([[5, 6, -100], [7, 1, -100], [-100, 8, 9]]))
    # another ignore index: -1 marks the non-target positions
    other = rewards_to_grid(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), ids, targets.masked_fill(targets == -100, -1),
                            ignore_index=-1)
    torch.testing.assert_close(other, grid)


def test_word_tokens_prompts_and_suppressed_ids(tiny):
    """A calibration word is one known token (a word the tokenizer does not know is its unk token: refused, and the
    calibration names it); the prompt drops the processor's own image token; rollouts never sample the image token or
    a pad token distinct from EOS."""
    import types

    from tpo_fast.methods.fisao import format_prompt, no_sample_ids

    model, processor, images = tiny
    tok = processor.tokenizer
    verifier = VisionEncoderVerifier(model, processor.image_processor, objects=["dog", "cat"])
    assert verifier._word_token("dog", tok) == tok.convert_tokens_to_ids("dog")
    assert verifier._word_token("zebra", tok) is None  # unknown: the unk token
    assert format_prompt(types.SimpleNamespace(image_token="<img>"), "<img> what is there ?") == (
        "USER: <image>\nwhat is there ? ASSISTANT:")
    assert format_prompt(object(), "<image>\nwhat ?", template="Q: {prompt}") == "Q: what ?"
    config = types.SimpleNamespace(image_token_id=None, image_token_index=31)
    fake = types.SimpleNamespace(config=config)
    assert no_sample_ids(fake, types.SimpleNamespace(pad_token_id=3, eos_token_id=2)) == [3, 31]
    assert no_sample_ids(fake, types.SimpleNamespace(pad_token_id=2, eos_token_id=2)) == [31]  # pad is EOS: allowed
    assert no_sample_ids(fake, types.SimpleNamespace(pad_token_id=None, eos_token_id=2)) == [31]
    config.image_token_id, config.image_token_index = 30, None
    assert no_sample_ids(fake, types.SimpleNamespace(pad_token_id=None, eos_token_id=2)) == [30]


def test_fisao_step_passes_every_option_to_its_parts(tiny, monkeypatch):
    """Each option of fisao_step reaches the rollout, the advantages, the loss and the clipping as given (spies
    around the real functions), and ppo_epochs updates run."""
    import tpo_fast.methods.fisao as fisao_mod

    model, processor, images = tiny
    tok = processor.tokenizer
    recorded = []
    record_calls(monkeypatch, fisao_mod, ("rollout", "token_advantages", "token_pg_loss"), recorded)
    record_calls(monkeypatch, torch.nn.utils, ("clip_grad_norm_",), recorded)

    def calls(name):
        return [arguments for called, arguments in recorded if called == name]

    policy, ref = copy.deepcopy(model), copy.deepcopy(model).eval()
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    verifier = FixedVerifier(tok.convert_tokens_to_ids("dog"), tok.convert_tokens_to_ids("cat"))
    # prompts of unequal lengths: the response window holds ignored positions, where the ignore index matters
    fisao_step(policy, ref, processor, verifier, opt, images, ["a ?", "describe the image ."], ppo_epochs=3,
               max_new_tokens=3, do_sample=True, temperature=0.7, advantage="return", gamma=0.9, whiten=True,
               clip_eps=0.1, clip_eps_high=0.3, kl_coef=0.2, kl_estimator="k2", aggregation="seq_mean",
               max_grad_norm=0.5, ignore_index=-7, backend="torch")
    (roll,) = calls("rollout")
    assert (roll["max_new_tokens"], roll["do_sample"], roll["temperature"], roll["ignore_index"]) == (3, True, 0.7, -7)
    assert len(calls("token_advantages")) == len(calls("token_pg_loss")) == len(calls("clip_grad_norm_")) == 3
    adv = calls("token_advantages")[0]
    assert (adv["mode"], adv["gamma"], adv["whiten"]) == ("return", 0.9, True)
    kw = calls("token_pg_loss")[0]
    assert kw["bias"] is None  # the tiny LLaVA's lm_head has no bias
    assert {k: kw[k] for k in ("clip_eps", "clip_eps_high", "kl_coef", "kl_estimator", "aggregation", "ignore_index",
                               "backend")} == dict(clip_eps=0.1, clip_eps_high=0.3, kl_coef=0.2, kl_estimator="k2",
                                                   aggregation="seq_mean", ignore_index=-7, backend="torch")
    assert kw["ref_logprobs"] is not None and kw["old_logprobs"] is not None
    # computed once, before the updates
    assert all(kw["old_logprobs"] is k["old_logprobs"] for k in calls("token_pg_loss"))
    assert calls("clip_grad_norm_")[0]["max_norm"] == 0.5
    recorded.clear()
    fisao_step(policy, None, processor, verifier, opt, images, ["a ?", "b ?"], max_new_tokens=2, kl_coef=0.0,
               max_grad_norm=None, backend="torch")
    assert calls("clip_grad_norm_") == [] and calls("token_pg_loss")[-1]["ref_logprobs"] is None  # no clip, no ref


def test_fisao_reference_of_a_peft_policy_is_its_base_model(tiny, monkeypatch):
    """ref_model=None on a PEFT policy: the reference log-probs are the policy's with its adapter disabled (the base
    model's), not the adapted policy's. A LoRA adapter on lm_head is refused: the loss reads the head's weight, which
    is PEFT's frozen base weight, so the adapter would have been left out of the update and the ratios silently."""
    from peft import LoraConfig, get_peft_model

    import tpo_fast.methods.fisao as fisao_mod

    model, processor, images = tiny
    tok = processor.tokenizer
    base = copy.deepcopy(model).eval()
    torch.manual_seed(0)
    policy = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                             target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    losses = []
    record_calls(monkeypatch, fisao_mod, ("token_pg_loss",), losses)
    rollouts = _spy_rollouts(monkeypatch)
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0)
    verifier = FixedVerifier(tok.convert_tokens_to_ids("dog"), tok.convert_tokens_to_ids("cat"))
    fisao_step(policy, None, processor, verifier, opt, images, ["a ?", "b ?"], max_new_tokens=3, do_sample=False,
               kl_coef=0.1, backend="torch")
    (ro,) = rollouts
    batch = ro.batch()
    want, mask = _full_logits_logps(base, batch)
    adapted, _ = _full_logits_logps(policy, batch)
    ref = losses[0][1]["ref_logprobs"]  # over the response window: the columns holding any response token
    columns = mask.any(0).nonzero().squeeze(1)
    window = slice(int(columns.min()), int(columns.max()) + 1)
    tokens = mask[:, window]
    torch.testing.assert_close(ref[tokens], want[:, window][tokens], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref[tokens], adapted[:, window][tokens], atol=1e-3)
    head_lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                target_modules=["lm_head"]))
    with pytest.raises(ValueError, match=r"lm_head carries an active PEFT adapter"):
        fisao_step(head_lora, None, processor, verifier, opt, images, ["a ?", "b ?"], max_new_tokens=2,
                   do_sample=False, kl_coef=0.1, backend="torch")


def test_calibration_skips_words_that_are_not_one_token_and_says_which(tiny, caplog):
    """Unknown words are left out of the means and named once in a warning; a side with no known word at all, or
    lists that do not pair with the images, is refused with what to fix."""
    import logging

    model, processor, images = tiny
    tok = processor.tokenizer
    verifier = VisionEncoderVerifier(model, processor.image_processor, objects=["dog", "cat", "bus", "mat"])
    sims = {w: verifier.similarities(images[:1], [torch.tensor([tok.convert_tokens_to_ids(w)])]).item()
            for w in ("dog", "cat", "bus", "mat")}
    hi, lo = max(sims, key=sims.get), min(sims, key=sims.get)
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        low, high = verifier.calibrate(images[:1], [[hi, "zebra"]], [["giraffe", lo, "zebra"]], tok)
    assert (low, high) == (pytest.approx(sims[lo], abs=1e-6), pytest.approx(sims[hi], abs=1e-6))
    assert "calibrate: skipped words that are not one token: ['giraffe', 'zebra']" in caplog.text
    with pytest.raises(ValueError, match=r"^no hallucinated object word is a single token of this tokenizer"):
        verifier.calibrate(images[:1], [[hi]], [["zebra"]], tok)
    with pytest.raises(ValueError, match=r"^calibrate needs one list of correct and one of hallucinated objects"):
        verifier.calibrate(images, [[hi]], [[lo]], tok)
