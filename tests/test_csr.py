"""CSR (tpo_fast.methods.csr): reward mixing, R_text on the primitive, and the `csr` CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

from tpo_fast.methods.csr import CLIPScorer, CSROptions, mix_rewards, sentence_beam_search, sentence_log_probs

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


def make_tiny_llava_dir(root):
    from tpo_fast.trainer.tiny import build_tiny_llava, build_tiny_processor

    processor = build_tiny_processor(WORDS)
    model = build_tiny_llava(len(processor.tokenizer), seed=3)
    model.save_pretrained(root / "llava")
    processor.save_pretrained(root / "llava")
    return model, processor


def make_tiny_clip_dir(root):
    """A random tiny CLIPModel with a character-level CLIP tokenizer, saved offline."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor
    folder = root / "clip"
    folder.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz.,?!'-":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=7),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("csr")
    model, processor = make_tiny_llava_dir(root)
    clip = make_tiny_clip_dir(root)
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
    with pytest.raises(ValueError, match="needs an image path"):
        main(["csr", "--model", str(root / "llava"), "--prompts", str(bad), "--clip", str(clip),
              "--output-dir", str(tmp_path / "o")])


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
