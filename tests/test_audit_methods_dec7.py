"""Audit of the CSR loop, the FiSAO rollout / loss and the hallucination check (Dec 7).

Each test's oracle is written here in plain PyTorch / Python from SPEC.md and the docstrings, not by calling
the code under test.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image

from tpo_fast.methods.hallucination_data import chair, load_objects, vocabulary

WORDS = [f"w{i}" for i in range(100)]  # a vocabulary of 114 tokens: well over Hugging Face's default top_k of 50


@pytest.fixture(scope="module")
def ordered_model():
    """A tiny LLaVA whose next-token logits ignore the input: token v has logit -0.01 v (a near-uniform, strictly
    ordered distribution, so that any top-k truncation changes which token a seeded draw picks)."""
    from tpo_fast.trainer.tiny import build_tiny_llava, build_tiny_processor

    processor = build_tiny_processor(WORDS)
    vocab = len(processor.tokenizer)
    model = build_tiny_llava(vocab, seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.lm_head.bias = torch.nn.Parameter(-0.01 * torch.arange(vocab, dtype=torch.float32))
    return model, processor


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_rollout_samples_from_the_whole_policy_not_the_top_50(ordered_model, temperature):
    """`rollout(do_sample=True)` samples from softmax(z / temperature) (top_p 1 keeps every token), with only the
    image placeholder and pad tokens suppressed. Hugging Face's global default top_k=50 used to truncate it
    silently: with this model (114 tokens, mass spread evenly) about half of the policy's draws are tokens ranked
    below 50, and the rollout never produced one: the FiSAO policy gradient was estimated from a truncated policy.

    Oracle: the token `torch.multinomial` draws from the full tempered softmax under the same seed (generate's
    sampler draws once, with torch.multinomial, per new token)."""
    from tpo_fast.methods.fisao import rollout

    model, processor = ordered_model
    image = Image.new("RGB", (28, 28), (200, 10, 10))
    vocab = len(processor.tokenizer)
    logits = -0.01 * torch.arange(vocab, dtype=torch.float64)
    tok = processor.tokenizer
    for banned in (model.config.image_token_id, tok.pad_token_id):
        logits[banned] = -float("inf")
    probs = (logits / temperature).softmax(-1).float()
    got, want = [], []
    for seed in range(12):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ro = rollout(model, processor, [image], ["describe"], max_new_tokens=1, temperature=temperature)
        got.append(int(ro.response_ids[0][0]))
        torch.manual_seed(seed)
        want.append(int(torch.multinomial(probs, 1)))
    assert max(want) >= 50  # the oracle's draws include tokens a top-50 truncation can never give
    assert got == want


def _image(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    return "a.png"


@pytest.mark.parametrize("objects", [
    [{"colour": "dark red", "shape": "circle"}],
    ["light-blue square"],
    [{"colour": "red", "shape": "traffic light"}],
    ["r2d2 robot"],
])
def test_object_words_chair_cannot_read_are_refused_when_loaded(tmp_path, objects):
    """CHAIR reads a caption's words as runs of the letters a-z; an object whose colour or shape is not one such word
    ("dark red", "light-blue", "traffic light", "r2d2") can never be matched, and its parts that are other colours
    ("red", "blue") were counted as hallucinated. `load_objects` accepted such a record; now it refuses it."""
    name = _image(tmp_path)
    path = tmp_path / "o.json"
    path.write_text(json.dumps([{"image": name, "objects": objects}]))
    with pytest.raises(ValueError, match=r"o\.json: record #0: .*one word of the letters a-z"):
        load_objects(path, tmp_path)


def test_chair_of_a_correct_caption_with_one_word_objects_is_zero(tmp_path):
    """The record the refused ones should be written as ("darkred" / "lightblue" as one word each) is read, and a
    caption naming exactly the image's objects has every CHAIR rate 0 (it was 0.5 / 1.0 / 1.0 for "dark red")."""
    name = _image(tmp_path)
    path = tmp_path / "o.json"
    path.write_text(json.dumps([{"image": name, "objects": [{"colour": "darkred", "shape": "circle"},
                                                            "lightblue square"]}]))
    (item,) = load_objects(path, tmp_path)
    colours, shapes = vocabulary([item])
    rates = chair(["a darkred circle and a lightblue square"], [item.objects], colours, shapes)
    assert rates == {"chair_i": 0.0, "chair_pairs": 0.0, "chair_s": 0.0, "mentions": 4, "pair_mentions": 2,
                     "captions": 1, "silent": 0}


FISAO_WORDS = ["a", "dog", "cat", "on", "the", "mat", "is", "there", "describe", "image", "red", "and", "bus", "."]


@pytest.fixture(scope="module")
def tiny():
    from tpo_fast.trainer.tiny import build_tiny_llava, build_tiny_processor

    processor = build_tiny_processor(FISAO_WORDS)
    return build_tiny_llava(len(processor.tokenizer), seed=2), processor


class OneRewardVerifier:
    """Reward `value` on the first response token, 0 on every other."""

    def __init__(self, value):
        self.value = value

    def token_rewards(self, images, token_ids, tokenizer):
        rewards = torch.zeros(sum(int(t.numel()) for t in token_ids))
        rewards[0] = self.value
        return rewards


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_reward_is_refused_before_the_update(tiny, value):
    """One NaN or inf token reward from the verifier used to make the loss NaN (or -inf) and, after the optimizer
    step, every parameter of the policy NaN, silently (fisao_step returned metrics). Now it raises before the
    first update, and the policy's parameters are exactly as they were."""
    import copy

    from tpo_fast.methods.fisao import fisao_step

    model, processor = tiny
    policy = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    image = Image.new("RGB", (28, 28), (200, 10, 10))
    with pytest.raises(ValueError, match=r"returned 1 non-finite reward\(s\): the first, .* token 0 \(row 0\)"):
        fisao_step(policy, None, processor, OneRewardVerifier(value), opt, [image], ["describe the image ."],
                   kl_coef=0.0, max_new_tokens=3, backend="torch")
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())


def test_rewards_to_grid_names_the_row_of_a_bad_reward_and_refuses_non_tensors():
    from tpo_fast.methods.fisao import rewards_to_grid

    targets = torch.tensor([[-100, 5, 6, -100], [-100, 7, 8, 9]])
    ids = [torch.tensor([5, 6]), torch.tensor([7, 8, 9])]
    with pytest.raises(ValueError, match=r"2 non-finite reward\(s\): the first, nan, at token 3 \(row 1\)"):
        rewards_to_grid(torch.tensor([0.0, 1.0, 2.0, float("nan"), float("inf")]), ids, targets)
    with pytest.raises(TypeError, match=r"a real tensor of \(N,\) = \(5,\) rewards, got list"):
        rewards_to_grid([0.0] * 5, ids, targets)
    with pytest.raises(TypeError, match=r"got bool of shape \(5,\)"):
        rewards_to_grid(torch.ones(5, dtype=torch.bool), ids, targets)
    grid = rewards_to_grid(torch.tensor([1, 2, 3, 4, 5], dtype=torch.float64), ids, targets)  # finite: scattered
    assert torch.equal(grid, torch.tensor([[0.0, 1, 2, 0], [0, 3, 4, 5]]))


@pytest.mark.parametrize("gamma", [float("nan"), -0.5, 1.5])
def test_return_advantages_need_a_discount_in_0_1(gamma):
    """gamma = NaN made every "return" advantage NaN (and the update NaN), silently; a negative gamma flipped the sign
    of every other future reward (returns 3, -1, 1 for three rewards of 1 at gamma -2). Refused now, by
    token_advantages and by fisao_step before it rolls out."""
    from tpo_fast.methods.fisao import fisao_step, token_advantages

    with pytest.raises(ValueError, match=r"gamma \(the discount of the \"return\" advantage\) must lie in \[0, 1\]"):
        token_advantages(torch.ones(1, 3), torch.ones(1, 3), "return", gamma=gamma)
    with pytest.raises(ValueError, match=r"gamma .* must lie in \[0, 1\]"):  # before any use of the model
        fisao_step(None, None, None, None, None, [], [], advantage="return", gamma=gamma)


def test_return_advantages_at_the_ends_of_0_1():
    """gamma 0: each token's own reward; gamma 1: the plain reward-to-go (hand-computed, masked position skipped)."""
    from tpo_fast.methods.fisao import token_advantages

    rewards = torch.tensor([[1.0, 2.0, 4.0, 8.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    assert torch.equal(token_advantages(rewards, mask, "return", gamma=0), torch.tensor([[1.0, 2.0, 4.0, 0.0]]))
    assert torch.equal(token_advantages(rewards, mask, "return", gamma=1), torch.tensor([[7.0, 6.0, 4.0, 0.0]]))


class RecordingVerifier:
    """Reward 1 on every response token; keeps the rollout's response ids."""

    def token_rewards(self, images, token_ids, tokenizer):
        self.token_ids = [t.clone() for t in token_ids]
        return torch.ones(sum(int(t.numel()) for t in token_ids))


def _tempered_logprobs(model, processor, image, prompt, response, temperature):
    """float64 log softmax(logits / T) of `response`'s tokens after (image, prompt), from the model's full logits."""
    from tpo_fast.methods.fisao import format_prompt

    inputs = processor(text=[format_prompt(processor, prompt)], images=[image], return_tensors="pt")
    p = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"][0], response])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"]).logits
    logp = (logits[0, p - 1 : p - 1 + response.numel()].double() / temperature).log_softmax(-1)
    return logp.gather(1, response[:, None]).squeeze(1)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_fisao_scores_the_tempered_policy_it_samples_from(tiny, temperature):
    """With `temperature` T the rollout samples from softmax(z / T); the old, reference and current log-probs (the
    ratio, the KL and the gradient) were those of softmax(z), another policy: at T = 0.5 the logged mean log-prob
    was the untempered one's. Oracle: the model's full logits before the step, divided by T, in float64."""
    import copy

    from tpo_fast.methods.fisao import fisao_step

    model, processor = tiny
    policy = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        torch.manual_seed(5)
        for p in ref.model.language_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = copy.deepcopy(policy).eval()
    image, prompt = Image.new("RGB", (28, 28), (20, 200, 10)), "describe the image ."
    verifier = RecordingVerifier()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = fisao_step(policy, ref, processor, verifier, torch.optim.SGD(policy.parameters(), lr=0.0),
                             [image], [prompt], kl_coef=0.05, max_new_tokens=6, temperature=temperature,
                             backend="torch")
    response = verifier.token_ids[0]
    logp = _tempered_logprobs(before, processor, image, prompt, response, temperature)
    ref_logp = _tempered_logprobs(ref.eval(), processor, image, prompt, response, temperature)
    d = ref_logp - logp
    assert metrics["logps/mean"] == pytest.approx(float(logp.mean()), rel=1e-5, abs=1e-6)
    assert metrics["kl/mean"] == pytest.approx(float((d.exp() - d - 1).mean()), rel=1e-4, abs=1e-7)
    assert metrics["pg/ratio_mean"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_fisao_refuses_a_temperature_that_is_no_sampling_policy(temperature):
    from tpo_fast.methods.fisao import fisao_step, rollout

    with pytest.raises(ValueError, match=r"temperature must be finite and > 0 \(1: the policy itself\), got"):
        fisao_step(None, None, None, None, None, [], [], temperature=temperature)
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0"):
        rollout(None, None, [None], ["x"], temperature=temperature)
    with pytest.raises(TypeError,
                       match=r"temperature must be a real number \(int, float, NumPy scalar or 0-d tensor\), got str"):
        fisao_step(None, None, None, None, None, [], [], temperature="1")


def _path(text: str, values: list[float]):
    from tpo_fast.methods.csr import SearchPath

    return SearchPath(sentences=text.split("|"), values=values, done=True)


def test_csr_pairs_the_best_answer_with_the_worst_different_one():
    """The worst finished path can give the best's answer (the same sentences); the search then returned no pair
    although another answer existed. Now the rejected response is the worst path whose answer differs."""
    from tpo_fast.methods.csr import best_and_worst

    best, middle, other = _path("a dog.|on a mat.", [-0.1, -0.2]), _path("a cat.", [-0.5]), _path("a bus.", [-0.4])
    same_as_best = _path("a dog.|on a mat.", [-0.9, -0.9])  # the lowest score, the best's text
    pair = best_and_worst([middle, same_as_best, best, other], length_normalize=True)
    assert pair is not None and (pair[0], pair[1]) == (best, middle)  # -0.15 best; -0.9 skipped; -0.5 < -0.4
    assert best_and_worst([best, same_as_best], True) is None  # one answer only
    assert best_and_worst([best], True) is None and best_and_worst([], True) is None
    # unnormalised sums rank the two-sentence path lower: -0.3 against -0.4 and -0.5, so "a cat." is still the worst
    assert best_and_worst([middle, best, other], False) == (best, middle)
    assert best_and_worst([middle, best, other, _path("x.|y.|z.", [-0.3, -0.3, -0.3])], False)[1].sentences == [
        "x.", "y.", "z."]


def test_csr_prompts_refuse_a_conversation_they_would_cut_to_its_last_message(tmp_path):
    """A chat-list prompt with a system message was cut to its last message without a word (the search then answered
    another question than the record's); now it is refused naming the record, as the trainer's data refuses it."""
    from tpo_fast.methods.csr import read_prompts

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    chat = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "What is this?"}]
    (tmp_path / "p.json").write_text(json.dumps([{"image": "a.png", "prompt": "ok?"}, {"image": "a.png",
                                                                                      "prompt": chat}]))
    with pytest.raises(ValueError, match=r"p\.json: record #1's prompt: a conversation of 2 messages \(roles "
                                         r"\['system', 'user'\]\) of which only the last is kept"):
        read_prompts(tmp_path / "p.json", tmp_path)
    chat[0]["content"] = ""  # an empty system message loses nothing
    (tmp_path / "p.json").write_text(json.dumps([{"image": "a.png", "prompt": chat}]))
    assert read_prompts(tmp_path / "p.json", tmp_path)[0]["prompt"] == "What is this?"
