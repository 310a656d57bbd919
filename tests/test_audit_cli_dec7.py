"""Audit of the `tpo-fast` command line (2026-12-07): flag values that crashed deep inside numpy, transformers or torch
after the model had loaded are refused by the pre-flight check (one line on stderr, exit code 2), and the numbers
`tpo-fast eval` prints equal an independent float64 recomputation from the saved model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tpo_fast.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> str:
    from tpo_fast.trainer.tiny import save_tiny_llava

    return str(save_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava", seed=3))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    from tpo_fast.trainer.tiny import save_tiny_clip

    return str(save_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip", seed=3))


@pytest.fixture
def command_argv(tmp_path, tiny_llava, tiny_clip):
    """Command lines of eval, csr and fisao that run on the shipped examples (small searches and rollouts)."""
    from tpo_fast.methods import make_eval_set

    images = ["--image-folder", str(EXAMPLES / "images")]
    prompts = ["--model", tiny_llava, "--prompts", str(EXAMPLES / "prompts.jsonl"), *images, "--output-dir",
               str(tmp_path / "out")]

    def argv(command):
        if command == "eval":
            return ["eval", "--model", tiny_llava, "--image-folder", str(tmp_path / "set" / "images"), "--objects",
                    str(make_eval_set(tmp_path / "set", 1)), "--captions", "0"]
        if command == "csr":
            return ["csr", *prompts, "--clip", tiny_clip, "--iterations", "1", "--num-beams", "2", "--candidates",
                    "1", "--max-sentences", "1", "--max-sentence-tokens", "2"]
        return ["fisao", *prompts, "--low", "0.1", "--high", "0.2", "--max-new-tokens", "2"]

    return argv


@pytest.fixture
def train_argv(tmp_path, tiny_llava):
    """A `train` command line that trains one step on the shipped examples: the flags under test must stop it at
    the check (before the fixes, it ran into the crash each test names)."""
    return ["train", "--model", tiny_llava, "--data", str(EXAMPLES / "rlhf-v.jsonl"), "--image-folder",
            str(EXAMPLES / "images"), "--output-dir", str(tmp_path / "out"), "--max-steps", "1"]


def _refused(argv, capsys) -> str:
    """The one stderr line of a command line refused with exit code 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


@pytest.mark.parametrize("command", ["train", "demo"])
@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_numpy_refuses_is_refused_before_the_run(command, seed, train_argv, capsys, tmp_path):
    """The Hugging Face Trainer seeds NumPy with --seed: -1 raised "ValueError: Seed must be between 0 and 2**32 - 1"
    from numpy after the model had loaded (train) or the data had been written (demo)."""
    argv = train_argv if command == "train" else ["demo", "--output-dir", str(tmp_path / "demo")]
    assert _refused([*argv, "--seed", seed], capsys) == (
        f"tpo-fast {command}: error: --seed {seed}: must be in [0, 2**32 - 1] (NumPy's seed range); pass a seed in "
        "range, e.g. 0")


@pytest.mark.parametrize("name", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_on_the_cpu_is_refused(name, train_argv, capsys):
    """On the CPU, transformers raised "ImportError: FlashAttention2 has been toggled on, but it cannot be used" from
    from_pretrained: a traceback after the data had been read."""
    assert _refused([*train_argv, "--attn-implementation", name, "--cpu"], capsys) == (
        f"tpo-fast train: error: --attn-implementation {name}: the flash kernels run on CUDA only, and the run trains "
        "on the CPU (with --cpu); pass sdpa or eager")


def test_flex_attention_without_a_cpu_backward_is_refused(train_argv, capsys):
    """torch 2.13 has no FlexAttention backward on the CPU: the first training step raised NotImplementedError."""
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
    except NotImplementedError:
        pass
    else:
        pytest.skip("this torch has a FlexAttention backward on the CPU: the flag trains there")
    line = _refused([*train_argv, "--attn-implementation", "flex_attention", "--cpu"], capsys)
    assert line.startswith("tpo-fast train: error: --attn-implementation flex_attention: the run trains on the CPU "
                           "(with --cpu), and this torch has no FlexAttention backward there (")
    assert line.endswith("); pass sdpa or eager")


@pytest.mark.parametrize(("text", "what"), [
    ("{not json", "not a JSON file (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ("[1, 2]", "holds a JSON list, not an object of DeepSpeed settings"),
])
def test_a_deepspeed_file_that_is_not_a_json_object_is_refused(text, what, train_argv, capsys, tmp_path):
    """transformers read the file when the model loaded: JSONDecodeError, or "'list' object has no attribute 'get'"."""
    (tmp_path / "ds.json").write_text(text)
    assert _refused([*train_argv, "--deepspeed", str(tmp_path / "ds.json")], capsys) == (
        f"tpo-fast train: error: --deepspeed {tmp_path / 'ds.json'}: {what}; pass a DeepSpeed JSON config, e.g. "
        "examples/deepspeed/zero3.json")


@pytest.mark.parametrize("command", ["train", "eval", "fisao"])
@pytest.mark.parametrize(("config", "what"), [
    ("{bad", "its config.json is not a JSON object (a damaged or partial save)"),
    ('{"model_type": "clip"}', "its config.json is a 'clip' model, not a LLaVA one (LlavaForConditionalGeneration)"),
])
def test_a_model_folder_that_is_no_llava_is_refused(command, config, what, tmp_path, capsys):
    """A CLIP folder as --model raised "AttributeError: 'CLIPTextConfig' object has no attribute
    'tie_word_embeddings'" from from_pretrained; a damaged config.json a JSONDecodeError."""
    from tpo_fast.methods import make_eval_set

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(config)
    images = ["--image-folder", str(EXAMPLES / "images")]
    argv = {"train": ["train", "--data", str(EXAMPLES / "rlhf-v.jsonl"), *images, "--output-dir", str(tmp_path / "o"),
                      "--max-steps", "1"],
            "eval": ["eval", "--image-folder", str(tmp_path / "set" / "images"), "--objects",
                     str(make_eval_set(tmp_path / "set", 1)), "--captions", "0"],
            "fisao": ["fisao", "--prompts", str(EXAMPLES / "prompts.jsonl"), *images, "--output-dir",
                      str(tmp_path / "o"), "--low", "0.1", "--high", "0.2", "--max-new-tokens", "2"]}[command]
    line = _refused([*argv, "--model", str(model)], capsys)
    assert line.startswith(f"tpo-fast {command}: error: --model {model}: {what}; pass a local folder saved with "
                           "save_pretrained holding a LLaVA model")


def test_a_llava_config_still_passes(train_argv, model_dir, tmp_path):
    """The check reads only the model type: a LLaVA config, or one without a type, passes; so does a DeepSpeed
    object."""
    from tpo_fast.cli import SUBCOMMANDS, build_parser

    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 3}}')
    for config in ('{"model_type": "llava"}', "{}"):
        (model_dir / "config.json").write_text(config)
        args = build_parser().parse_args([*train_argv, "--model", str(model_dir), "--deepspeed",
                                          str(tmp_path / "ds.json"), "--seed", str(2**32 - 1),
                                          "--attn-implementation", "sdpa", "--cpu"])
        SUBCOMMANDS["train"].check(args)


def test_eval_prints_the_pope_metrics_of_an_independent_float64_computation(tmp_path, capsys, tiny_llava):
    """`tpo-fast eval` on a tiny random LLaVA (statement answers): each probe recomputed from the saved model in
    float64 with plain full logits (sum of the statement's token log-probs, softmax over every colour x shape, yes
    above 1/K), and the confusion counts and rates of every split compared with the --json report."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tpo_fast.methods import make_eval_set
    from tpo_fast.methods.hallucination_data import Obj, load_objects, pope_probes, vocabulary

    model_dir = tiny_llava
    objects = make_eval_set(tmp_path / "set", 3, max_objects=2)
    assert main(["eval", "--model", model_dir, "--image-folder", str(tmp_path / "set" / "images"), "--objects",
                 str(objects), "--captions", "0", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["answer_mode"] == "statement"

    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval().double()
    items = load_objects(objects, tmp_path / "set" / "images")
    colours, shapes = vocabulary(items)
    candidates = [Obj(c, s) for c in colours for s in shapes]
    prompt = "USER: <image>\nwhat is in the image ? ASSISTANT:"
    said = {}
    with torch.no_grad():
        for i, item in enumerate(items):
            image = Image.open(item.image).convert("RGB")
            n0 = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
            sums = []
            for o in candidates:
                inputs = processor(text=[f"{prompt} there is a {o.name}"], images=[image], return_tensors="pt")
                ids = inputs["input_ids"][0]
                logp = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             pixel_values=inputs["pixel_values"].double()).logits[0].log_softmax(-1)
                sums.append(sum(logp[t - 1, ids[t]] for t in range(n0, len(ids))))
            share = torch.stack(sums).softmax(-1)
            said.update({(i, o): bool(share[k] > 1 / len(candidates)) for k, o in enumerate(candidates)})
    for split in ("random", "popular", "adversarial"):
        probes = pope_probes(items, split, seed=0, max_positives=3, candidates=candidates)
        tp = sum(p.present and said[p.image, p.obj] for p in probes)
        fp = sum(not p.present and said[p.image, p.obj] for p in probes)
        tn = sum(not p.present and not said[p.image, p.obj] for p in probes)
        fn = len(probes) - tp - fp - tn
        got = report["pope"][split]
        assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (tp, fp, tn, fn), split
        precision, recall = tp / (tp + fp) if tp + fp else 0.0, tp / (tp + fn) if tp + fn else 0.0
        assert got["accuracy"] == pytest.approx((tp + tn) / len(probes), abs=1e-12)
        assert got["precision"] == pytest.approx(precision, abs=1e-12)
        assert got["recall"] == pytest.approx(recall, abs=1e-12)
        assert got["yes_ratio"] == pytest.approx((tp + fp) / len(probes), abs=1e-12)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert got["f1"] == pytest.approx(f1, abs=1e-12)
    table = capsys.readouterr().out
    assert f"random{'':<7}{report['pope']['random']['accuracy']:>9.3f}" in table


@pytest.mark.parametrize("command", ["eval", "csr", "fisao"])
def test_the_triton_backend_without_cuda_is_refused_by_every_command(command, command_argv, monkeypatch, capsys):
    """`train` refused --backend triton where it cannot run; eval, csr and fisao raised the primitive's ValueError
    ("backend='triton' needs CUDA tensors") from their first scoring, after the model had loaded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _refused([*command_argv(command), "--backend", "triton"], capsys) == (
        f"tpo-fast {command}: error: --backend triton: backend='triton' needs CUDA tensors (got cpu) or "
        "TRITON_INTERPRET=1 for the CPU interpreter; use backend='torch' on CPU")


@pytest.mark.parametrize("command", ["csr", "fisao"])
@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_csr_and_fisao_take_the_seeds_of_train(command, seed, command_argv, capsys):
    """2**64 raised "ValueError: Overflow when unpacking long long" from torch.manual_seed after the prompts were read;
    -1 passed. The seeds are now those of train and demo."""
    assert _refused([*command_argv(command), "--seed", seed], capsys) == (
        f"tpo-fast {command}: error: --seed {seed}: must be in [0, 2**32 - 1] (NumPy's seed range); pass a seed in "
        "range, e.g. 0")


def test_a_llava_folder_as_the_clip_model_is_refused(command_argv, tiny_llava, capsys):
    """`--clip` a LLaVA folder raised "The total number of <image> tokens in the prompts should be the same as the
    number of images passed" from CLIP's scoring, after the whole first beam search."""
    line = _refused([*command_argv("csr"), "--clip", tiny_llava], capsys)
    assert line.startswith(f"tpo-fast csr: error: --clip {tiny_llava}: its config.json is a 'llava' model, not a "
                           "CLIP one (CLIPModel); pass a local folder saved with save_pretrained holding a CLIPModel")


@pytest.mark.parametrize(("text", "what"), [
    (b" \n\t\n", "no object words in this file (the verifier would reward no token); pass a file of "
                  "whitespace-separated object words, or leave it out for the COCO categories"),
    (b"\xffcircle", "cannot be read as UTF-8 text ('utf-8' codec can't decode byte 0xff in position 0: invalid start "
                   "byte); pass a text file of object words"),
])
def test_an_objects_file_without_words_is_refused_by_fisao(text, what, command_argv, tmp_path, capsys):
    """An empty --objects file trained with exit code 0 and a verifier that names no object: every token's reward 0,
    so the update was the KL term alone, silently; an undecodable one raised UnicodeDecodeError after the model
    loaded."""
    (tmp_path / "objects.txt").write_bytes(text)
    assert _refused([*command_argv("fisao"), "--objects", str(tmp_path / "objects.txt")], capsys) == (
        f"tpo-fast fisao: error: --objects {tmp_path / 'objects.txt'}: {what}")


def test_lora_alpha_without_lora_r_is_refused(train_argv, capsys):
    """`--lora-alpha 16` without `--lora-r` ran a full fine-tune and ignored the flag, silently."""
    assert _refused([*train_argv, "--lora-alpha", "16"], capsys) == (
        "tpo-fast train: error: --lora-alpha 16 without --lora-r: the run would be a full fine-tune and ignore it; "
        "pass --lora-r R for LoRA, or drop --lora-alpha")
