"""CSR (tpo_fast.methods.csr): reward mixing, R_text on the primitive, the loop's parts (search results to pairs,
iterations, the DPO step) and the `csr` CLI end to end."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from tpo_fast.methods.csr import (  # noqa: E402
    CLIPScorer,
    CSROptions,
    mix_rewards,
    sentence_beam_search,
    sentence_log_probs,
)

WORDS = ["a", "dog", "cat", "on", "the", "mat", "is", "there", "describe", "image", "red", "and", "bus", "what"]


def test_raw_mix_is_the_papers_formula():
    r_img = torch.tensor([20.0, 25.0, 22.0])
    r_txt = torch.tensor([-1.0, -3.0, -0.5])
    torch.testing.assert_close(mix_rewards(r_img, r_txt), 0.9 * r_img + 0.1 * r_txt)


def test_rank_mix_is_the_official_rule():
    # Official calculate_ranks: descending sort, best = 1/n; construct.py: (1-a) rank + a clip_rank, lower better.
    r_img = torch.tensor([20.0, 25.0, 22.0])  # clip ranks: 3/3, 1/3, 2/3
    r_txt = torch.tensor([-1.0, -3.0, -0.5])  # text ranks: 2/3, 3/3, 1/3
    want = -torch.tensor([0.9 * 3 + 0.1 * 2, 0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 1]) / 3
    torch.testing.assert_close(mix_rewards(r_img, r_txt, mix="rank"), want)
    with pytest.raises(ValueError, match="mix must be one of"):
        mix_rewards(r_img, r_txt, mix="sum")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        CSROptions(lam=2.0)
    with pytest.raises(ValueError, match="num_beams must be >= 2"):
        CSROptions(num_beams=1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from PIL import Image

    from tpo_fast.cli._common import load_model
    from tpo_fast.trainer.tiny import save_tiny_clip, save_tiny_llava

    root = tmp_path_factory.mktemp("csr")
    model, processor = load_model(str(save_tiny_llava(root / "llava", WORDS, seed=3)))
    clip = save_tiny_clip(root / "clip")  # a random tiny CLIPModel with a character-level tokenizer
    g = torch.Generator().manual_seed(0)
    for name in ("a.png", "b.png"):
        Image.fromarray((torch.rand(30, 34, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / name)
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in (
        {"image": "a.png", "question": "describe the image ."}, {"image": "b.png", "prompt": "what is there ?"})))
    return root, model, processor, clip, prompts


def test_sentence_log_probs_match_full_logits(workdir):
    root, model, processor, _, _ = workdir
    from PIL import Image

    tok = processor.tokenizer
    inputs = processor(text=["USER: <image>\ndescribe the image . ASSISTANT:"], images=[Image.open(root / "a.png")],
                       return_tensors="pt")
    prefix = tok.convert_tokens_to_ids(["a", "dog", "."])
    cands = [tok.convert_tokens_to_ids(["the", "cat", "."]), tok.convert_tokens_to_ids(["red", "."])]
    got = sentence_log_probs(model, inputs["input_ids"][0], inputs["pixel_values"], prefix, cands, backend="torch")
    want = []
    with torch.no_grad():
        for cand in cands:
            ids = torch.cat([inputs["input_ids"][0], torch.tensor(prefix + cand)])[None]
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0].float()
            n = len(cand)
            logp = logits[-n - 1 : -1].log_softmax(-1).gather(-1, torch.tensor(cand)[:, None]).squeeze(-1)
            want.append(logp.mean())
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)
    # a LoRA adapter on lm_head: the primitive reads the head's base weight, so the scores would leave the adapter
    # out; refused, where a LoRA on the text layers is scored with it (equal to the adapted model's full logits)
    import copy

    from peft import LoraConfig, get_peft_model

    head_lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, init_lora_weights=False,
                                                                target_modules=["lm_head"]))
    with pytest.raises(ValueError, match=r"lm_head carries an active PEFT adapter"):
        sentence_log_probs(head_lora, inputs["input_ids"][0], inputs["pixel_values"], prefix, cands, backend="torch")
    with head_lora.disable_adapter():  # a disabled adapter (the adapter reference) is the base head
        torch.testing.assert_close(sentence_log_probs(head_lora, inputs["input_ids"][0], inputs["pixel_values"],
                                                      prefix, cands, backend="torch"), got, rtol=1e-5, atol=1e-5)


def test_csr_cli_end_to_end(workdir, monkeypatch):
    from tpo_fast.cli import main
    from tpo_fast.methods import csr
    from tpo_fast.trainer.data import load_preference_records

    root, _, _, clip, prompts = workdir
    out = root / "run"
    found, search = [], csr.sentence_beam_search
    monkeypatch.setattr(csr, "sentence_beam_search", lambda *a, **k: found.append(search(*a, **k)) or found[-1])
    rc = main(["csr", "--model", str(root / "llava"), "--prompts", str(prompts), "--image-folder", str(root),
               "--clip", str(clip), "--iterations", "3", "--output-dir", str(out), "--num-beams", "2",
               "--candidates", "3", "--max-sentences", "2", "--max-sentence-tokens", "4", "--lr", "1e-3",
               "--backend", "torch"])
    assert rc == 0
    summary = json.loads((out / "csr_summary.json").read_text())
    assert [s["iteration"] for s in summary] == [1, 2, 3]
    assert all(s["pairs"] >= 1 and s["loss"] is not None for s in summary)
    records, bad = load_preference_records(out / "iter_1" / "preferences.json")
    assert not bad and len(records) == summary[0]["pairs"]
    pairs = json.loads((out / "iter_1" / "preferences.json").read_text())
    # Each pair is the best and the worst path of its search, scored by the mean of its sentence values.
    paths = [f for f in found[:2] if f is not None]  # iteration 1: one search per prompt
    assert len(paths) == len(pairs) >= 1
    for p, (best, worst) in zip(pairs, paths, strict=True):
        assert (p["chosen"], p["rejected"]) == (" ".join(best.sentences), " ".join(worst.sentences))
        assert p["chosen"] != p["rejected"]
        assert p["chosen_score"] == pytest.approx(sum(best.values) / len(best.values), abs=1e-6)
        assert p["rejected_score"] == pytest.approx(sum(worst.values) / len(worst.values), abs=1e-6)
    # Each iteration trains away from the previous one: the saved weights differ.
    from safetensors.torch import load_file

    w1 = load_file(out / "iter_1" / "model" / "model.safetensors")
    w3 = load_file(out / "iter_3" / "model" / "model.safetensors")
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)


def test_csr_cli_errors(workdir, tmp_path, capsys):
    from tpo_fast.cli import main

    root, _, _, clip, prompts = workdir
    assert main(["csr", "--model", str(tmp_path / "nope"), "--prompts", str(prompts), "--clip", str(clip),
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"tpo-fast csr: error: --model {tmp_path / 'nope'}: no such folder; " \
        "pass a local folder saved with save_pretrained holding a LLaVA model and its processor (nothing is " \
        "downloaded); `tpo-fast demo --output-dir DIR` saves a tiny model in DIR/model and pairs in DIR/data\n"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "no image"}]))
    # a bad prompt file is a bad command line too: one line, exit code 2, read before the model loads
    assert main(["csr", "--model", str(root / "llava"), "--prompts", str(bad), "--clip", str(clip),
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"tpo-fast csr: error: {bad}: record #0 needs an image path (one of " \
        "['image', 'image_path', 'img_path', 'images']) and a prompt (one of ['prompt', 'question', 'query']); " \
        "pass a .json or .jsonl file of {image, prompt} records whose images exist (relative to --image-folder)\n"


def test_sentences_end_at_their_stop_token_whatever_the_padding(workdir, monkeypatch):
    """Beam search pads the rows that stopped early with eos when the pad id is 0 (the tiny tokenizer's; LLaMA's
    unk-as-pad): a sentence that stopped at "." must stay open (expanded at the next depth, its ids ending at the
    "."), not end the path with an eos the model never produced."""
    from PIL import Image

    root, model, processor, clip_dir, _ = workdir
    tok = processor.tokenizer
    the, cat, dot, eos = tok.convert_tokens_to_ids(["the", "cat", "."]) + [tok.eos_token_id]
    assert tok.pad_token_id == 0 and eos != 0
    # what beam search returns with pad id 0: rows that stopped at "." padded with eos; one row ends itself
    rows = [[the, dot, eos, eos], [cat, the, dot, eos], [the, cat, the, eos], [cat, dot, eos, eos]]
    inputs_seen = []

    def generate(input_ids, num_return_sequences, **kw):
        inputs_seen.append(input_ids[0].tolist())
        return torch.cat([input_ids.expand(num_return_sequences, -1), torch.tensor(rows[:num_return_sequences])], 1)

    monkeypatch.setattr(model, "generate", generate)
    opts = CSROptions(num_beams=2, candidates=4, max_sentences=2, max_sentence_tokens=4, backend="torch")
    best, worst = sentence_beam_search(model, processor, CLIPScorer(str(clip_dir)), Image.open(root / "a.png"),
                                       "describe the image .", opts)
    # depth 0 expands the prompt; the paths kept (num_beams of the three that stopped at ".", the one that ended
    # with its own eos is finished) are expanded again at depth 1, each after its sentence and nothing more
    prompt = len(inputs_seen[0])
    continued = [ids[prompt:] for ids in inputs_seen[1:]]
    assert len(continued) == 2, continued
    assert all(ids in ([the, dot], [cat, the, dot], [cat, dot]) for ids in continued), continued
    for path in (best, worst):
        assert eos not in path.ids[:-1], path
    assert max(len(best.sentences), len(worst.sentences)) == 2


def test_prompts_with_a_missing_image_fail_when_read(tmp_path, monkeypatch):
    """A missing image is found when the prompts are read, naming the record, not midway through a search."""
    from tpo_fast.methods.csr import read_prompts

    (tmp_path / "a.png").write_bytes(b"")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"image": name, "prompt": "p"}) for name in ("a.png", "b.png")))
    with pytest.raises(ValueError, match=f"record #1's image {tmp_path / 'b.png'} does not exist$"):
        read_prompts(prompts, tmp_path)
    monkeypatch.chdir(tmp_path / "..")  # relative paths without an image folder: read from the working folder
    with pytest.raises(ValueError, match="record #0's image a.png does not exist \\(relative paths are read from"):
        read_prompts(prompts)
    prompts.write_text(json.dumps({"image": "a.png", "prompt": "p"}))
    assert [r["image"] for r in read_prompts(prompts, tmp_path)] == [str((tmp_path / "a.png").resolve())]


def test_reward_and_option_bounds():
    """lambda's bounds are inclusive (0: the text reward alone); rewards must be two (K,) vectors; every count >= 1."""
    r = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(mix_rewards(r, -r, lam=0.0), -r)
    torch.testing.assert_close(mix_rewards(r, -r, lam=1.0), r)
    with pytest.raises(ValueError, match=r"^lambda \(the image reward's share\) must lie in \[0, 1\], got 1.5$"):
        mix_rewards(r, r, lam=1.5)
    with pytest.raises(ValueError, match=r"^r_image and r_text must both be \(K,\), got \(2, 1\) and \(2, 1\)$"):
        mix_rewards(r[:, None], r[:, None])
    with pytest.raises(ValueError, match=r"^r_image and r_text must both be \(K,\), got \(2,\) and \(3,\)$"):
        mix_rewards(r, torch.ones(3))
    assert CSROptions(lam=0.0).lam == 0.0
    with pytest.raises(ValueError, match=r"^mix must be one of \('raw', 'rank'\), got 'sum'$"):
        CSROptions(mix="sum")
    for name in ("num_beams", "candidates", "max_sentences", "max_sentence_tokens", "max_response_tokens"):
        for bad in (0, 2.0):
            with pytest.raises(ValueError, match=rf"^{name} must be an int >= 1, got {bad!r}$"):
                CSROptions(**{name: bad})
    with pytest.raises(ValueError, match="^num_beams must be >= 2: the search keeps the best and the worst paths$"):
        CSROptions(num_beams=1)


def test_generation_stops_at_eos_and_at_a_period_the_vocabulary_has():
    from types import SimpleNamespace

    from tpo_fast.methods.csr import _generation_ids

    model = SimpleNamespace(config=SimpleNamespace(image_token_id=9))

    def tokenizer(period):
        return SimpleNamespace(eos_token_id=2, unk_token_id=1, pad_token_id=0,
                               convert_tokens_to_ids=lambda token: {".": period}[token])

    assert _generation_ids(model, tokenizer(5)) == ([2, 5], [0, 9])
    assert _generation_ids(model, tokenizer(1)) == ([2], [0, 9])  # "." is unknown: no sentence stop
    assert _generation_ids(model, tokenizer(None)) == ([2], [0, 9])


def test_prompt_files_that_hold_no_usable_record(tmp_path):
    from tpo_fast.methods.csr import read_prompts

    path = tmp_path / "p.jsonl"
    for text, message in (('"just text"', "record #0 is not a JSON object"),
                          ("{not json", "record #0 is not a JSON object"),
                          ("", "no prompt records")):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"^{path}: {message}$"):
            read_prompts(path)
    path.write_text(json.dumps({"image": "a.png", "prompt": "p"}))
    with pytest.raises(ValueError, match=r"^.*record #0's image a.png does not exist \(relative paths are read from "
                                         r"the working folder: pass the image folder\)$"):
        read_prompts(path)


def test_clip_scorer_arguments(workdir, tmp_path):
    clip_dir = workdir[3]
    with pytest.raises(FileNotFoundError, match=r"^CLIP model folder '.*nope' does not exist \(nothing is downloaded"):
        CLIPScorer(str(tmp_path / "nope"))
    scorer = CLIPScorer(str(clip_dir))
    assert CLIPScorer(str(clip_dir), processor=scorer.processor).processor is scorer.processor  # given, not reloaded
    with pytest.raises(ValueError, match="^a CLIPModel instance needs its processor$"):
        CLIPScorer(scorer.model)


class _Saved(torch.nn.Linear):
    """A stand-in model (or processor) that records where it was saved."""

    def __init__(self):
        super().__init__(1, 1)
        self.saved = []

    def save_pretrained(self, path):
        self.saved.append(path)


def _finished(sentences, values):
    from tpo_fast.methods.csr import SearchPath

    return SearchPath(sentences=sentences, values=values, done=True)


def test_build_preferences_writes_found_pairs_and_skips_the_rest(tmp_path, monkeypatch, caplog):
    from PIL import Image

    from tpo_fast.methods import csr

    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    prompts = [{"image": str(tmp_path / "x.png"), "prompt": f"q{i}", "index": 10 + i} for i in range(3)]
    found = {"q0": (_finished(["a", "b"], [1.0, 3.0]), _finished(["c"], [-1.0])), "q1": None,
             "q2": (_finished(["d"], [4.0]), _finished(["e", "f"], [0.0, -2.0]))}
    seen_modes = []

    def search(model, processor, clip, image, prompt, options):
        seen_modes.append(model.training)
        return found[prompt]

    monkeypatch.setattr(csr, "sentence_beam_search", search)
    model = _Saved().train()
    out = tmp_path / "sub" / "pairs.json"
    with caplog.at_level("WARNING", logger="tpo_fast"):
        assert csr.build_preferences(model, None, None, prompts, out) == 2
    assert seen_modes == [False] * 3 and model.training  # searched in eval mode, the mode restored after
    assert [r.getMessage() for r in caplog.records] == ["CSR: prompt #11 gave no two distinct answers; skipped"]
    image = str(tmp_path / "x.png")
    want = [
        {"image": image, "prompt": "q0", "chosen": "a b", "rejected": "c", "chosen_score": 2.0,
         "rejected_score": -1.0, "iteration": 0, "source_index": 10},
        {"image": image, "prompt": "q2", "chosen": "d", "rejected": "e f", "chosen_score": 4.0,
         "rejected_score": -1.0, "iteration": 0, "source_index": 12},
    ]
    assert out.read_text() == json.dumps(want, indent=1)
    options = CSROptions(length_normalize=False)
    assert csr.build_preferences(model.eval(), None, None, prompts[2:], out, options, iteration=3) == 1
    assert not model.training
    assert json.loads(out.read_text()) == [{**want[1], "rejected_score": -2.0, "iteration": 3}]


def test_run_csr_gives_each_iteration_the_previous_model_as_reference(tmp_path, monkeypatch, caplog):
    from tpo_fast.methods import csr

    calls = []
    pairs = {1: 2, 2: 0, 3: 1}

    def build(model, processor, clip, prompts, out_file, options, iteration=0):
        calls.append(("build", iteration, out_file, options, prompts, clip))
        return pairs[iteration]

    def train(model, ref_model, processor, pref_file, output_dir, **kw):
        calls.append(("dpo", float(ref_model.weight.detach()), pref_file, output_dir, kw))
        assert ref_model is not model
        with torch.no_grad():
            model.weight.add_(1.0)  # this iteration's training
        return 0.25 * len(calls)

    monkeypatch.setattr(csr, "build_preferences", build)
    monkeypatch.setattr(csr, "dpo_train", train)
    model, processor = _Saved(), _Saved()
    with torch.no_grad():
        model.weight.fill_(0.0)
    options, prompts, clip = CSROptions(backend="torch"), [{"prompt": "p"}], object()
    with caplog.at_level("INFO", logger="tpo_fast"):
        summaries = csr.run_csr(model, processor, clip, prompts, tmp_path, iterations=3, options=options, beta=0.3,
                                lr=0.01, batch_size=5, epochs=2, seed=7)
    it = [tmp_path / f"iter_{k}" for k in (1, 2, 3)]
    want = [
        {"iteration": 1, "pairs": 2, "preferences": str(it[0] / "preferences.json"), "loss": 0.5,
         "model": str(it[0] / "model")},
        {"iteration": 2, "pairs": 0, "preferences": str(it[1] / "preferences.json"), "loss": None,
         "model": str(it[1] / "model")},
        {"iteration": 3, "pairs": 1, "preferences": str(it[2] / "preferences.json"), "loss": 1.25,
         "model": str(it[2] / "model")},
    ]
    assert summaries == want
    kw = dict(beta=0.3, lr=0.01, batch_size=5, epochs=2, backend="torch")
    assert calls == [
        ("build", 1, it[0] / "preferences.json", options, prompts, clip),
        ("dpo", 0.0, it[0] / "preferences.json", it[0] / "dpo", {**kw, "seed": 8}),
        ("build", 2, it[1] / "preferences.json", options, prompts, clip),  # no pairs: no training
        ("build", 3, it[2] / "preferences.json", options, prompts, clip),
        ("dpo", 1.0, it[2] / "preferences.json", it[2] / "dpo", {**kw, "seed": 10}),  # the model after iteration 1
    ]
    assert model.saved == processor.saved == [folder / "model" for folder in it]
    assert [r.getMessage() for r in caplog.records] == [
        f"CSR iteration 1: {want[0]}", "CSR iteration 2: no preference pairs; the model is left unchanged",
        f"CSR iteration 2: {want[1]}", f"CSR iteration 3: {want[2]}",
    ]
    # the defaults: 3 iterations (the paper's), beta 0.1, lr 1e-6, 2 pairs a step, 1 epoch, seeds 1, 2, 3; saved
    calls.clear()
    pairs.update({2: 4})
    summaries = csr.run_csr(_Saved(), _Saved(), clip, prompts, tmp_path / "d")
    assert [c[-1] for c in calls if c[0] == "dpo"] == [
        dict(beta=0.1, lr=1e-6, batch_size=2, epochs=1, backend="auto", seed=k) for k in (1, 2, 3)]
    assert all("model" in s for s in summaries)
    calls.clear()
    model = _Saved()
    assert [s["iteration"] for s in csr.run_csr(model, _Saved(), clip, prompts, tmp_path / "n", iterations=1,
                                                save=False)] == [1]
    assert model.saved == [] and "model" not in csr.run_csr(model, _Saved(), clip, prompts, tmp_path / "n",
                                                            iterations=1, save=False)[0]
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match=rf"^iterations must be an int >= 1, got {bad!r}$"):
            csr.run_csr(model, _Saved(), clip, prompts, tmp_path / "n", iterations=bad)


def test_dpo_train_is_dpo_against_the_reference_it_is_given(tmp_path, built_trainers):
    """`dpo_train`'s mean step loss is the DPO loss of the full-logits oracle against the given reference (lr 0
    keeps both models fixed), over every pair once per epoch, with the trainer set as its docstring says."""
    from test_gaps_trainer import _sequence_logps
    from tiny_setup import tiny_model, tiny_processor

    from tpo_fast.methods.csr import dpo_train
    from tpo_fast.trainer.synthetic import make_shapes_dataset

    data = make_shapes_dataset(str(tmp_path / "data"), num_images=3, image_size=28, seed=0)
    records = [json.loads(line) for line in open(data)]
    for r in records:  # CSR's preference files name their images by absolute path
        r["image"] = str(tmp_path / "data" / "images" / r["image"])
    pref_file = tmp_path / "preferences.json"
    pref_file.write_text(json.dumps(records))
    processor = tiny_processor()
    policy, ref = tiny_model(processor), tiny_model(processor, seed=1)
    with torch.no_grad():
        policy.lm_head.weight.mul_(5.0)  # margins of order 1
    loss = dpo_train(policy, ref, processor, pref_file, tmp_path / "run", beta=0.5, lr=0.0, batch_size=1, epochs=2,
                     backend="torch", seed=3)
    (trainer,) = built_trainers
    a = trainer.args
    assert (a.objective, a.reference, a.beta, a.learning_rate, a.per_device_train_batch_size, a.num_train_epochs,
            a.lr_scheduler_type, a.warmup_steps, a.max_grad_norm, a.save_strategy, a.report_to, a.logging_steps,
            a.seed, a.loss_backend, a.disable_tqdm, a.dataloader_num_workers, a.use_cpu, a.output_dir) == (
        "dpo", "model", 0.5, 0.0, 1, 2, "constant", 0, 0.0, "no", [], 1, 3, "torch", True, 0, True,
        str(tmp_path / "run"))
    assert trainer.ref_model is ref and trainer.state.global_step == 6  # 3 pairs, one a step, two epochs
    with torch.no_grad():
        margins = []
        for i in range(len(records)):
            batch = trainer.data_collator([trainer.train_dataset[i]])
            pi, rf = _sequence_logps(policy, batch, False), _sequence_logps(ref, batch, False)
            margins.append((pi[0] - pi[1]) - (rf[0] - rf[1]))
        want = -torch.nn.functional.logsigmoid(0.5 * torch.stack(margins)).mean()
    assert loss == pytest.approx(float(want), rel=1e-5)
    assert not any(p.name.startswith("checkpoint") for p in (tmp_path / "run").iterdir())  # nothing saved
    # called alone, it trains as one iteration of the loop does by default (the trainer is stopped once built)
    built_trainers.stop = True
    with pytest.raises(built_trainers.Stopped):
        dpo_train(policy, ref, processor, pref_file, tmp_path / "run2")
    a = built_trainers[-1].args
    assert (a.beta, a.learning_rate, a.per_device_train_batch_size, a.num_train_epochs, a.loss_backend, a.seed) == (
        0.1, 1e-6, 2, 1, "auto", 0)
