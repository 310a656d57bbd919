"""Every flag of every `tpo-fast` subcommand reaches what it sets, and every count flag is refused below its minimum.

Each subcommand's heavy parts (model loading, training, the searches, the evaluation) are replaced by recorders,
so a test runs the real command line (`main`) to the point where a flag's value is handed over, and compares
what was handed over with values written here. Non-default values for every flag, then the defaults.
"""

from __future__ import annotations

import contextlib
import json
import re
from types import SimpleNamespace

import pytest
import torch
from test_csr import _Saved

from tpo_fast.cli import SUBCOMMANDS, build_parser, main

# The kernels' modules imported now, under the suite's TRITON_INTERPRET=1 (tests/conftest.py): Triton picks a kernel's
# interpreted or compiled form when its module is imported, and the tests below that unset TRITON_INTERPRET and ask
# for the triton backend import them otherwise; compiled kernels then failed every later Triton test on the CPU ("0
# active drivers") where one of these tests came first.
with contextlib.suppress(ImportError):
    import tpo_fast.ops.triton_impl  # noqa: F401


def _recorder(calls: list, name: str, returns=None):
    def record(*args, **kwargs):
        calls.append((name, args, kwargs))
        return returns

    return record


# ---- train and povid ---------------------------------------------------------------------------------------

@pytest.fixture
def train_run(monkeypatch, tmp_path, model_dir):
    """Runs `main(argv)` for train/povid with the trainer, model, processor and data loading recorded."""
    import transformers

    import tpo_fast.trainer.config as config
    import tpo_fast.trainer.data as data
    import tpo_fast.trainer.trainer as trainer_module

    calls = []
    processor = _Saved()

    class Trainer:
        world_zero = True

        def __init__(self, model, **kwargs):
            calls.append(("TPOTrainer", (model,), kwargs))

        def train(self, **kwargs):
            calls.append(("train", (), kwargs))

        def save_model(self, path):
            calls.append(("save_model", (path,), {}))

        def is_world_process_zero(self):
            return Trainer.world_zero

    monkeypatch.setattr(config, "TPOConfig", lambda **kw: SimpleNamespace(**kw))
    monkeypatch.setattr(data.PreferenceDataset, "from_file", _recorder(calls, "from_file", "dataset"))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", _recorder(calls, "AutoProcessor", processor))
    monkeypatch.setattr(trainer_module, "load_llava", _recorder(calls, "load_llava", "model"))
    monkeypatch.setattr(trainer_module, "TPOTrainer", Trainer)
    (tmp_path / "pairs.jsonl").write_text("")

    def run(*flags, command="train"):
        calls.clear()
        argv = [command, "--model", str(model_dir), "--data", str(tmp_path / "pairs.jsonl"), "--output-dir",
                str(tmp_path / "out"), *flags]
        assert main(argv) == 0
        return {name: (args, kwargs) for name, args, kwargs in calls}, processor

    run.Trainer = Trainer
    return run


TRAIN_DEFAULTS = dict(
    objective="tpo", povid_noise_weight=0.5, beta=0.1, offset=0.5, detach_weights=False, loss_backend="auto",
    loss_grad_mode="auto", shared_prefix=True, freeze_vision_tower=True, padding_free=None, loss_type="sigmoid",
    reference="auto",
    precompute_reference=False, num_train_epochs=1.0, max_steps=-1, per_device_train_batch_size=2,
    gradient_accumulation_steps=1, learning_rate=5e-7, warmup_steps=0, lr_scheduler_type="cosine", bf16=False,
    gradient_checkpointing=False, noise_step=500, noise_seed=0, noise_overflow="wrap", corrupted_cache_dir=None,
    max_length=None, bad_records="skip", logging_steps=10, save_steps=500, deepspeed=None, seed=42, use_cpu=True,
    report_to="none",
)


def test_every_train_flag_reaches_the_trainer(train_run, tmp_path, model_dir):
    from tpo_fast.trainer.packing import may_pack

    (tmp_path / "images").mkdir()
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "trainer_state.json").write_text("{}")
    (tmp_path / "ck" / "adapter_config.json").write_text('{"r": 4}')  # a LoRA run's, as this one (--lora-r 4)
    (tmp_path / "ds.json").write_text("{}")
    out, cache, ck, ds = (str(tmp_path / n) for n in ("out", "cache", "ck", "ds.json"))
    calls, processor = train_run(
        "--image-folder", str(tmp_path / "images"), "--backend", "torch", "--lr", "0.003", "--batch-size", "3",
        "--seed", "7", "--objective", "dpo", "--povid-noise-weight", "0.25", "--beta", "0.2", "--offset", "0.3",
        "--detach-weights", "--grad-mode", "recompute", "--no-shared-prefix", "--train-vision-tower", "--padding-free",
        "on",
        "--loss-type", "hinge", "--reference", "model", "--precompute-reference", "--epochs", "2.5",
        "--max-steps", "9", "--grad-accum", "4", "--warmup-steps", "5", "--scheduler", "linear", "--bf16",
        "--gradient-checkpointing", "--attn-implementation", "eager", "--lora-r", "4", "--lora-alpha", "16",
        "--lora-targets", " q_proj, ,v_proj", "--noise-step", "300", "--noise-seed", "11", "--noise-overflow",
        "clamp", "--corrupted-cache", cache, "--max-length", "64", "--bad-records", "error", "--logging-steps", "3",
        "--save-steps", "6", "--resume", ck, "--deepspeed", ds, "--cpu",
    )
    (model,), kwargs = calls["TPOTrainer"]
    assert model == "model" and kwargs["train_dataset"] == "dataset" and kwargs["processing_class"] is processor
    assert vars(kwargs["args"]) == dict(
        output_dir=out, objective="dpo", povid_noise_weight=0.25, beta=0.2, offset=0.3, detach_weights=True,
        loss_backend="torch", loss_grad_mode="recompute", shared_prefix=False, freeze_vision_tower=False,
        padding_free=True, loss_type="hinge",
        reference="model", precompute_reference=True, num_train_epochs=2.5, max_steps=9,
        per_device_train_batch_size=3, gradient_accumulation_steps=4, learning_rate=0.003, warmup_steps=5,
        lr_scheduler_type="linear", bf16=True, gradient_checkpointing=True, noise_step=300, noise_seed=11,
        noise_overflow="clamp", corrupted_cache_dir=cache, max_length=64, bad_records="error", logging_steps=3,
        save_steps=6, deepspeed=ds, seed=7, use_cpu=True, report_to="none")
    assert calls["from_file"] == ((str(tmp_path / "pairs.jsonl"), str(tmp_path / "images")), dict(
        noise_step=300, noise_seed=11, overflow="clamp", corrupted_cache_dir=cache, on_bad="error"))
    # bf16 with LoRA (or DeepSpeed) loads bf16 weights; the packed step needs its attention registered
    assert calls["load_llava"] == ((str(model_dir), torch.bfloat16, "eager"), dict(packed=may_pack(False, True)))
    lora = kwargs["peft_config"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, set(lora.target_modules)) == (4, 16, 0.0, {"q_proj", "v_proj"})
    assert calls["train"] == ((), dict(resume_from_checkpoint=ck)) and calls["save_model"] == ((out,), {})
    assert processor.saved == [out]


def test_train_defaults(train_run, tmp_path, model_dir):
    calls, processor = train_run()
    (_, kwargs) = calls["TPOTrainer"]
    assert vars(kwargs["args"]) == dict(TRAIN_DEFAULTS, output_dir=str(tmp_path / "out"))
    assert kwargs["peft_config"] is None
    assert calls["from_file"] == ((str(tmp_path / "pairs.jsonl"), None), dict(
        noise_step=500, noise_seed=0, overflow="wrap", corrupted_cache_dir=None, on_bad="skip"))
    assert calls["load_llava"] == ((str(model_dir), torch.float32, None), dict(packed=True))  # full fine-tuning: fp32
    assert calls["train"] == ((), dict(resume_from_checkpoint=None))
    assert calls["AutoProcessor"] == ((str(model_dir),), {})
    # the weights' dtype: bf16 loads bf16 weights under LoRA (of any rank) or DeepSpeed, fp32 for full fine-tuning;
    # a shared prefix packs whatever --padding-free says
    (tmp_path / "ds.json").write_text("{}")
    for flags, dtype, lora in (([], torch.float32, None), (["--lora-r", "1"], torch.bfloat16, 1),
                               (["--deepspeed", str(tmp_path / "ds.json")], torch.bfloat16, None)):
        calls, _ = train_run("--bf16", "--padding-free", "off", *flags)
        assert calls["load_llava"] == ((str(model_dir), dtype, None), dict(packed=True)), flags
        assert getattr(calls["TPOTrainer"][1]["peft_config"], "r", None) == lora
    # LoRA's alpha defaults to twice its rank and trains the attention projections; noise seed -1: fresh noise
    calls, _ = train_run("--lora-r", "3", "--noise-seed", "-1", "--no-shared-prefix", "--padding-free", "off")
    lora = calls["TPOTrainer"][1]["peft_config"]
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (3, 6, {"q_proj", "k_proj", "v_proj", "o_proj"})
    assert vars(calls["TPOTrainer"][1]["args"])["noise_seed"] is None
    assert calls["from_file"][1]["noise_seed"] is None
    assert calls["load_llava"][0][1] is None and calls["load_llava"][1] == dict(packed=False)  # LoRA: as saved
    # only the main process saves the processor
    train_run.Trainer.world_zero = False
    processor.saved.clear()
    train_run()
    assert processor.saved == []


def test_povid_is_train_with_the_povid_objective(train_run):
    calls, _ = train_run(command="povid")
    assert vars(calls["TPOTrainer"][1]["args"])["objective"] == "povid"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["povid", "--model", "m", "--data", "d", "--output-dir", "o", "--objective", "dpo"])


@pytest.mark.parametrize("cuda, flags, use_cpu", [(True, [], False), (True, ["--cpu"], True), (False, [], True)])
def test_train_uses_the_gpu_unless_told(train_run, monkeypatch, cuda, flags, use_cpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    calls, _ = train_run(*flags)
    assert vars(calls["TPOTrainer"][1]["args"])["use_cpu"] is use_cpu


def test_lora_alpha_is_twice_the_rank_only_when_absent(train_run, monkeypatch):
    """`--lora-alpha` left out is 2 x --lora-r; a value given is handed to peft's LoraConfig as it is (`alpha or 2 r`
    replaced a 0 by 2 r: now check() refuses alpha < 1, and run() keeps what it is given)."""
    import peft

    seen = []
    monkeypatch.setattr(peft, "LoraConfig", lambda **kw: seen.append(kw) or "lora")
    for flags, alpha in ((["--lora-r", "3"], 6), (["--lora-r", "3", "--lora-alpha", "5"], 5),
                         (["--lora-r", "4", "--lora-alpha", "1"], 1)):
        seen.clear()
        calls, _ = train_run(*flags)
        assert calls["TPOTrainer"][1]["peft_config"] == "lora"
        assert [(kw["r"], kw["lora_alpha"]) for kw in seen] == [(int(flags[1]), alpha)], flags
    seen.clear()
    args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--output-dir", "o", "--lora-r", "2",
                                      "--lora-alpha", "0"])  # past check(), which refuses it: kept, not replaced
    SUBCOMMANDS["train"].run(args)
    assert [kw["lora_alpha"] for kw in seen] == [0]


# ---- csr, fisao, eval, demo ---------------------------------------------------------------------------------

class _Clip:
    def __init__(self, path):
        self.path = path
        self.model = SimpleNamespace(to=lambda device: setattr(self, "device", device))


def _prompt_files(tmp_path):
    (tmp_path / "prompts.jsonl").write_text("")
    (tmp_path / "images").mkdir(exist_ok=True)
    return str(tmp_path / "prompts.jsonl"), str(tmp_path / "images")


def _patch_loading(monkeypatch, calls, model, processor):
    import tpo_fast.cli._common as common

    monkeypatch.setattr(common, "load_model", _recorder(calls, "load_model", (model, processor)))


def test_every_csr_flag_reaches_the_loop(monkeypatch, tmp_path, model_dir, capsys):
    import tpo_fast.methods.csr as csr

    calls = []
    model, processor = _Saved(), _Saved()
    _patch_loading(monkeypatch, calls, model, processor)
    monkeypatch.setattr(csr, "CLIPScorer", _Clip)
    monkeypatch.setattr(csr, "read_prompts", _recorder(calls, "read_prompts", ["p"]))
    summaries = [{"iteration": 1, "pairs": 2, "loss": 0.5}, {"iteration": 2, "pairs": 0, "loss": None}]
    monkeypatch.setattr(csr, "run_csr", _recorder(calls, "run_csr", summaries))
    prompts, images = _prompt_files(tmp_path)
    out = tmp_path / "a" / "b"  # created, parents too
    base = ["csr", "--model", str(model_dir), "--prompts", prompts, "--clip", str(model_dir), "--output-dir", str(out)]
    assert main([*base, "--image-folder", images, "--backend", "torch", "--lr", "0.01", "--batch-size", "3",
                 "--seed", "5", "--iterations", "2", "--lam", "0.7", "--mix", "rank", "--no-length-normalize",
                 "--num-beams", "6", "--candidates", "5", "--max-sentences", "3", "--max-sentence-tokens", "9",
                 "--beta", "0.4", "--epochs", "2"]) == 0
    (name, args, kwargs), = [c for c in calls if c[0] == "run_csr"]
    assert args[:4] == (model, processor, args[2], ["p"]) and args[2].path == str(model_dir)
    assert args[2].device == torch.device("cpu") and args[4] == str(out)  # CLIP on the model's device
    assert kwargs == dict(iterations=2, options=csr.CSROptions(
        lam=0.7, mix="rank", length_normalize=False, num_beams=6, candidates=5, max_sentences=3,
        max_sentence_tokens=9, backend="torch"), beta=0.4, lr=0.01, batch_size=3, epochs=2, seed=5)
    assert ("read_prompts", (prompts, images), {}) in calls and ("load_model", (str(model_dir),), {}) in calls
    assert (out / "csr_summary.json").read_text() == json.dumps(summaries, indent=1)
    assert capsys.readouterr().out.splitlines() == ["csr iteration 1: 2 pairs, dpo loss 0.5",
                                                    "csr iteration 2: 0 pairs, dpo loss None"]
    calls.clear()
    assert main(base) == 0
    (_, _, kwargs), = [c for c in calls if c[0] == "run_csr"]
    assert kwargs == dict(iterations=3, options=csr.CSROptions(), beta=0.1, lr=1e-6, batch_size=2, epochs=1, seed=0)


def test_every_fisao_flag_reaches_the_step(monkeypatch, tmp_path, model_dir, capsys):
    import tpo_fast.methods.csr as csr
    import tpo_fast.methods.fisao as fisao
    import tpo_fast.trainer.data as data

    calls = []
    model = _Saved()
    processor = _Saved()
    processor.image_processor, processor.tokenizer = "image-processor", "tokenizer"

    class Verifier:
        def __init__(self, ref_model, image_processor, **kwargs):
            calls.append(("verifier", (ref_model, image_processor), kwargs))
            self.ref_model = ref_model
            assert ref_model is not model and not ref_model.training
            assert not any(p.requires_grad for p in ref_model.parameters())

        def calibrate(self, images, correct, hallucinated, tokenizer):
            calls.append(("calibrate", (images, correct, hallucinated, tokenizer), {}))
            return 0.125, 0.625

    def step(model_, ref_model, processor_, verifier, optimizer, images, prompts, **kwargs):
        calls.append(("step", (images, prompts), dict(kwargs, lr=optimizer.param_groups[0]["lr"])))
        assert model_ is model and model_.training and processor_ is processor
        assert isinstance(verifier, Verifier) and ref_model is verifier.ref_model
        return {"loss": 1.5}

    _patch_loading(monkeypatch, calls, model, processor)
    monkeypatch.setattr(fisao, "VisionEncoderVerifier", Verifier)
    monkeypatch.setattr(fisao, "fisao_step", step)
    monkeypatch.setattr(data, "open_image", lambda path, folder: f"{folder}:{path}")
    monkeypatch.setattr(csr, "read_prompts", _recorder(calls, "read_prompts", [{"image": f"i{k}", "prompt": f"p{k}"}
                                                                               for k in range(5)]))
    prompts, images = _prompt_files(tmp_path)
    (tmp_path / "objects.txt").write_text("  dog cat\n\n bus ")
    (tmp_path / "cal.json").write_text(json.dumps([{"image": "c.png", "correct": ["dog"], "hallucinated": ["cat"]}]))
    out = str(tmp_path / "out")
    model.eval()
    assert main(["fisao", "--model", str(model_dir), "--prompts", prompts, "--output-dir", out, "--image-folder",
                 images, "--backend", "torch", "--lr", "0.01", "--batch-size", "2", "--seed", "3", "--calibration",
                 str(tmp_path / "cal.json"), "--objects",
                 str(tmp_path / "objects.txt"),
                 "--reward-mode", "step", "--iterations", "2", "--ppo-epochs", "3", "--max-new-tokens", "8",
                 "--clip-eps", "0.3", "--kl-coef", "0.2", "--kl-estimator", "k2"]) == 0
    (_, (_, image_processor), kwargs), = [c for c in calls if c[0] == "verifier"]
    assert image_processor == "image-processor"
    assert ("read_prompts", (prompts, images), {}) in calls and ("load_model", (str(model_dir),), {}) in calls
    assert kwargs == dict(objects=["dog", "cat", "bus"], low=None, high=None, mode="step")
    assert [c for c in calls if c[0] == "calibrate"] == [
        ("calibrate", ([f"{images}:c.png"], [["dog"]], [["cat"]], "tokenizer"), {})]
    steps = [c for c in calls if c[0] == "step"]
    # two iterations over 5 prompts in batches of 2: 2 + 2 + 1, twice
    assert [c[1] for c in steps] == 2 * [(["None:i0", "None:i1"], ["p0", "p1"]), (["None:i2", "None:i3"], ["p2", "p3"]),
                                         (["None:i4"], ["p4"])]
    assert all(c[2] == dict(ppo_epochs=3, max_new_tokens=8, clip_eps=0.3, kl_coef=0.2, kl_estimator="k2",
                            backend="torch", lr=0.01) for c in steps)
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["fisao: calibrated thresholds low=0.1250 high=0.6250"] + \
        [json.dumps({"iteration": it, "loss": 1.5}) for it in (1, 1, 1, 2, 2, 2)]
    assert model.saved == processor.saved == [out]
    # the defaults: one pass, no calibration, the COCO categories
    calls.clear()
    assert main(["fisao", "--model", str(model_dir), "--prompts", prompts, "--output-dir", out, "--low", "0.2",
                 "--high", "0.4"]) == 0
    assert [c[2] for c in calls if c[0] == "verifier"] == [dict(objects=None, low=0.2, high=0.4, mode="linear")]
    steps = [c for c in calls if c[0] == "step"]
    assert [len(c[1][1]) for c in steps] == [2, 2, 1]
    assert steps[0][2] == dict(ppo_epochs=1, max_new_tokens=32, clip_eps=0.2, kl_coef=0.05, kl_estimator="k3",
                               backend="auto", lr=1e-6)


def test_every_eval_flag_reaches_the_check(monkeypatch, tmp_path, model_dir, capsys):
    import tpo_fast.methods.hallucination as hallucination
    from tpo_fast.methods.hallucination import EvalOptions, HallucinationReport, make_eval_set

    calls = []
    objects = make_eval_set(tmp_path / "set", 2, image_size=8)
    m = dict(accuracy=1.0, precision=1.0, recall=1.0, f1=1.0, yes_ratio=0.5)
    report = HallucinationReport("yes-no", 2, {"random": m}, None, [
        {"image": str(tmp_path / "set" / "images" / f"{i}.png"), "objects": ["red circle", "blue square"],
         "caption": f"caption {i}"} for i in range(5)])
    _patch_loading(monkeypatch, calls, "model", "processor")
    monkeypatch.setattr(hallucination, "evaluate", _recorder(calls, "evaluate", report))
    out = tmp_path / "report.json"
    base = ["eval", "--model", str(model_dir), "--image-folder", str(tmp_path / "set" / "images"), "--objects",
            str(objects)]
    assert main([*base, "--split", " popular ,random", "--captions", "3", "--max-new-tokens", "5", "--answer-mode",
                 "statement", "--question", "any {object} ?", "--caption-prompt", "say .", "--backend", "torch",
                 "--batch-size", "4", "--seed", "9", "--json", str(out)]) == 0
    (_, (model, processor, items, options), _), = [c for c in calls if c[0] == "evaluate"]
    assert (model, processor, len(items)) == ("model", "processor", 2)
    assert options == EvalOptions(splits=("popular", "random"), captions=3, max_new_tokens=5, question="any {object} ?",
                                  caption_prompt="say .", answer_mode="statement", seed=9, batch_size=4,
                                  backend="torch")
    assert ("load_model", (str(model_dir),), {}) in calls
    lines = capsys.readouterr().out.splitlines()
    assert lines[-5:] == [f"  {i}.png [red circle, blue square]: 'caption {i}'" for i in range(4)] + [
        f"report: {out}"]  # four captions shown
    assert "\n".join(lines[:-5]) == report.table()
    assert out.read_text(encoding="utf-8") == json.dumps({"model": str(model_dir), **report.to_dict()}, indent=1)
    calls.clear()
    assert main(base) == 0
    (_, (_, _, _, options), _), = [c for c in calls if c[0] == "evaluate"]
    assert options == EvalOptions(captions=16, max_new_tokens=16, batch_size=16, seed=0, answer_mode="auto")
    assert "report:" not in capsys.readouterr().out


def test_every_demo_flag_reaches_the_demo(monkeypatch, tmp_path, capsys):
    import tpo_fast.methods.hallucination as hallucination
    import tpo_fast.trainer.demo as demo_module
    from tpo_fast.methods.hallucination import EvalOptions, HallucinationReport, compare_tables

    calls = []
    run_dir = tmp_path / "d"
    result = SimpleNamespace(
        history=[{"step": 2, "loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.01},
                 {"step": 4, "loss": 0.3, "rewards/accuracies": 1.0, "rewards/margins": 1.25}],
        first_loss=0.69, last_loss=0.3, first_accuracy=0.5, last_accuracy=1.0, model_dir=str(run_dir / "model"),
        data_file=str(run_dir / "data" / "pairs.jsonl"), image_folder=str(run_dir / "data" / "images"))
    m = dict(accuracy=0.5, precision=0.5, recall=1.0, f1=0.6, yes_ratio=1.0)
    captions = [{"image": f"/x/{i}.png", "objects": [], "caption": f"c{i}"} for i in range(4)]
    reports = {"before": HallucinationReport("statement", 3, {"random": m}, None),
               "after": HallucinationReport("statement", 3, {"random": m}, None, captions)}
    monkeypatch.setattr(demo_module, "run_demo", _recorder(calls, "run_demo", result))
    monkeypatch.setattr(hallucination, "demo_before_after", _recorder(calls, "before_after", reports))
    assert main(["demo", "--steps", "5", "--objective", "dpo", "--output-dir", str(run_dir), "--seed", "4",
                 "--eval-images", "3", "--eval-captions", "2"]) == 0
    assert calls[0] == ("run_demo", (str(run_dir),), dict(max_steps=5, objective="dpo", seed=4, logging_steps=2))
    eval_dir = str(run_dir / "eval")
    assert calls[1] == ("before_after", (str(run_dir / "model"), eval_dir),
                        dict(seed=4, num_images=3, options=EvalOptions(captions=2)))
    model, data = result.model_dir, result.data_file
    assert capsys.readouterr().out == (
        "\n  step     loss  reward acc   margin\n"
        "     2   0.6900       0.500    0.010\n"
        "     4   0.3000       1.000    1.250\n"
        "\nloss 0.6900 -> 0.3000, reward accuracy 0.500 -> 1.000\n"
        "\nobject hallucination on 3 new images (docs/eval.md):\n"
        f"{compare_tables(reports)}\n"
        "  after, 0.png: 'c0'\n  after, 1.png: 'c1'\n  after, 2.png: 'c2'\n"
        f"again: tpo-fast eval --model {model} --image-folder {eval_dir}/images --objects {eval_dir}/objects.jsonl "
        "--captions 2\n"
        f"\nmodel and processor: {model}\npairs: {data}\nimages: {result.image_folder}\n"
        f"go on with: tpo-fast train --model {model} --data {data} --image-folder {result.image_folder} "
        "--output-dir run --max-steps 20 --lr 1e-3\n")
    calls.clear()
    assert main(["demo", "--eval-images", "0"]) == 0  # no check; the defaults otherwise
    assert calls == [("run_demo", (None,), dict(max_steps=200, objective="tpo", seed=0, logging_steps=20))]
    assert "object hallucination" not in capsys.readouterr().out
    calls.clear()
    assert main(["demo", "--eval-images", "1"]) == 0
    assert calls[1][2] == dict(seed=0, num_images=1, options=EvalOptions(captions=8))


# ---- the minimum of every count ----------------------------------------------------------------------------

MINIMUMS = {  # subcommand -> {flag: minimum}; a value one below is refused, the minimum passes the check
    "train": {"--batch-size": 1, "--grad-accum": 1, "--max-length": 1, "--logging-steps": 1, "--save-steps": 1,
              "--warmup-steps": 0, "--lora-r": 0, "--lora-alpha": 1, "--noise-step": 0},
    "csr": {"--batch-size": 1, "--iterations": 1, "--num-beams": 2, "--candidates": 1, "--max-sentences": 1,
            "--max-sentence-tokens": 1, "--epochs": 1, "--lam": 0},
    "fisao": {"--batch-size": 1, "--iterations": 1, "--ppo-epochs": 1, "--max-new-tokens": 1, "--kl-coef": 0},
    "demo": {"--steps": 2, "--eval-images": 0, "--eval-captions": 0},
}


# flags that only count next to another: --lora-alpha without --lora-r is refused (tests/test_audit_cli_dec7.py)
COMPANIONS = {"--lora-alpha": ["--lora-r", "1"]}


def _base_argv(command, tmp_path, model_dir):
    prompts, _ = _prompt_files(tmp_path)
    return {
        "train": ["train", "--model", str(model_dir), "--data", prompts, "--output-dir", str(tmp_path / "o")],
        "csr": ["csr", "--model", str(model_dir), "--prompts", prompts, "--clip", str(model_dir), "--output-dir", "o"],
        "fisao": ["fisao", "--model", str(model_dir), "--prompts", prompts, "--output-dir", "o", "--low", "0.1",
                  "--high", "0.5"],
        "demo": ["demo"],
    }[command]


@pytest.mark.parametrize("command", list(MINIMUMS))
def test_every_count_is_refused_below_its_minimum(command, tmp_path, model_dir, capsys):
    for flag, minimum in MINIMUMS[command].items():
        base = _base_argv(command, tmp_path, model_dir) + COMPANIONS.get(flag, [])
        low = minimum - 1
        args = build_parser().parse_args([*base, flag, str(low)])
        with pytest.raises(Exception) as refused:
            SUBCOMMANDS[command].check(args)
        value = getattr(args, flag[2:].replace("-", "_"))
        assert str(refused.value) == f"{flag} {value}: must be >= {minimum:g}; pass a value in range", flag
        SUBCOMMANDS[command].check(build_parser().parse_args([*base, flag, str(minimum)]))


TRITON_ON_CPU = ("backend='triton' needs CUDA tensors (got cpu) or TRITON_INTERPRET=1 for the CPU interpreter; use "
                 "backend='torch' on CPU")
# (flags after a good train command line, the whole error line after "tpo-fast train: error: "); CUDA is absent.
TRAIN_BAD_FLAGS = [
    (["--povid-noise-weight", "2"], "--povid-noise-weight 2.0: noise_weight must lie in [0, 1] (the official POVID "
     "uses 0.5; 0 is plain DPO), got 2.0; pass POVID's weight w of the noisy-argmax term, in [0, 1]"),
    (["--objective", "povid", "--noise-weight", "-0.5"], "--povid-noise-weight -0.5: noise_weight must lie in [0, 1] "
     "(the official POVID uses 0.5; 0 is plain DPO), got -0.5; pass POVID's weight w of the noisy-argmax term, in "
     "[0, 1]"),
    (["--offset", "-1"], "--offset -1.0: offset must be a finite number >= 0 (the paper uses 0.5, ablating 0, 0.5, "
     "1), got -1.0; pass TPO's token-weight offset a, e.g. 0.5"),
    (["--offset", "inf"], "--offset inf: offset must be a finite number >= 0 (the paper uses 0.5, ablating 0, 0.5, "
     "1), got inf; pass TPO's token-weight offset a, e.g. 0.5"),
    (["--beta", "inf"], "--beta inf: beta must be a finite number > 0 (TPO and DPO use 0.1), got inf; pass the "
     "preference loss's inverse temperature, e.g. 0.1"),
    (["--reference", "adapter"], "--reference adapter: the reference is the base model under a LoRA adapter, and "
     "there is no adapter without --lora-r; pass --lora-r R, or --reference auto or model"),
    (["--reference", "none", "--precompute-reference"], "--precompute-reference with --reference none: there is no "
     "reference to score; drop --precompute-reference, or pass --reference auto"),
    (["--lora-r", "4", "--lora-targets", "lm_head"], "--lora-targets lm_head: an adapter on lm_head would be left out "
     "of the loss (the fused losses read the lm_head weight itself); leave lm_head out of --lora-targets"),
    (["--lora-r", "4", "--lora-targets", "q_proj, language_model.lm_head"], "--lora-targets q_proj, "
     "language_model.lm_head: an adapter on language_model.lm_head would be left out of the loss (the fused losses "
     "read the lm_head weight itself); leave lm_head out of --lora-targets"),
    (["--lora-r", "4", "--lora-targets", " , "], "--lora-targets ' , ': no module names; pass comma-separated module "
     "names, e.g. q_proj,v_proj"),
    (["--backend", "triton"], f"--backend triton: {TRITON_ON_CPU}"),
    (["--backend", "triton", "--cpu"], f"--backend triton --cpu: {TRITON_ON_CPU}"),
    (["--lr", "-1"], "--lr -1.0: must be a finite number > 0; pass a learning rate, e.g. 5e-7"),
    (["--lr", "0"], "--lr 0.0: must be a finite number > 0; pass a learning rate, e.g. 5e-7"),
    (["--lr", "nan"], "--lr nan: must be a finite number > 0; pass a learning rate, e.g. 5e-7"),
    (["--lora-r", "4", "--lora-alpha", "0"], "--lora-alpha 0: must be >= 1; pass a value in range"),
    (["--lora-alpha", "-2"], "--lora-alpha -2: must be >= 1; pass a value in range"),
    (["--epochs", "0"], "--epochs 0.0: must be a finite number > 0 when --max-steps is -1 (the epochs decide the "
     "run's length); pass a number of passes, e.g. 1, or --max-steps N"),
    (["--epochs", "inf"], "--epochs inf: must be a finite number > 0 when --max-steps is -1 (the epochs decide the "
     "run's length); pass a number of passes, e.g. 1, or --max-steps N"),
    (["--epochs", "-1", "--max-steps", "5"], "--epochs -1.0: must be >= 0; pass a value in range"),
    (["--epochs", "nan", "--max-steps", "5"], "--epochs nan: must be a number >= 0; pass a value in range"),
    (["--max-steps", "0"], "--max-steps 0: must be >= 1, or -1 to train --epochs passes; pass a value in range"),
    (["--max-steps", "-2"], "--max-steps -2: must be >= 1, or -1 to train --epochs passes; pass a value in range"),
    (["--noise-seed", "-2"], "--noise-seed -2: must be >= 0, or -1 for fresh noise at every load; pass a seed in "
     "range"),
]


def _never_run(monkeypatch):
    def never(args):
        raise AssertionError("the subcommand ran despite a bad command line")

    for name in ("train", "povid"):
        cmd = SUBCOMMANDS[name]
        monkeypatch.setitem(SUBCOMMANDS, name, type(cmd)(cmd.description, cmd.add_arguments, never, cmd.check))


@pytest.mark.parametrize("command", ["train", "povid"])
@pytest.mark.parametrize("flags, want", TRAIN_BAD_FLAGS, ids=[" ".join(f) for f, _ in TRAIN_BAD_FLAGS])
def test_train_flags_out_of_range_give_one_line_and_exit_code_2(command, flags, want, tmp_path, model_dir,
                                                                 monkeypatch, capsys):
    """What the trainer, its config or its first step would refuse after the model loaded (a traceback, exit code
    1), refused by check() before anything is loaded: one line, exit code 2, and run() never reached."""
    if command == "povid" and flags[:2] == ["--objective", "povid"]:
        flags = flags[2:]
    _never_run(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    prompts, _ = _prompt_files(tmp_path)
    argv = [command, "--model", str(model_dir), "--data", prompts, "--output-dir", str(tmp_path / "o"), *flags]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"tpo-fast {command}: error: {want}"]
    assert "; " in want


@pytest.mark.parametrize("flag, choices", [
    ("--scheduler", "'linear', 'cosine', 'cosine_with_restarts', 'polynomial', 'constant', 'constant_with_warmup', "
                    "'inverse_sqrt'"),
    ("--attn-implementation", "'sdpa', 'eager', 'flex_attention', 'flash_attention_2', 'flash_attention_3'"),
], ids=["scheduler", "attn-implementation"])
def test_train_choices_are_refused_by_the_parser(flag, choices, tmp_path, model_dir, monkeypatch, capsys):
    """A scheduler or attention name transformers does not know was taken, and failed once the model loaded."""
    _never_run(monkeypatch)
    argv = ["train", "--model", str(model_dir), "--data", "d", "--output-dir", "o", flag, "bogus"]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("usage: tpo-fast train ")
    assert err[-1] in (f"tpo-fast train: error: argument {flag}: invalid choice: 'bogus' (choose from {choices})",
                       f"tpo-fast train: error: argument {flag}: invalid choice: 'bogus' (choose from "
                       f"{choices.replace(chr(39), '')})")  # Python 3.12.8+ and 3.13 drop the quotes


@pytest.mark.parametrize("cuda, interpret, flags, refused", [
    (True, None, [], False), (True, None, ["--cpu"], True), (False, None, [], True), (False, "0", [], True),
    (False, "1", [], False), (True, None, ["--backend", "torch", "--cpu"], False), (False, None, ["--backend", "auto"],
                                                                                   False)])
def test_the_triton_backend_needs_the_run_on_cuda(cuda, interpret, flags, refused, tmp_path, model_dir, monkeypatch):
    """--backend triton trains where run() puts the model: CUDA when there is one and --cpu is not given; on the CPU
    only under Triton's interpreter (TRITON_INTERPRET set, not to 0). The first step refused it before."""
    from tpo_fast.cli._common import UsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if interpret == "1":
        pytest.importorskip("triton")  # the interpreter's
    if interpret is not None:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    args = build_parser().parse_args([*_base_argv("train", tmp_path, model_dir), "--backend", "triton", *flags])
    if refused:
        with pytest.raises(UsageError, match="^--backend triton.*: backend='triton' needs CUDA tensors"):
            SUBCOMMANDS["train"].check(args)
    else:
        SUBCOMMANDS["train"].check(args)


def test_the_train_choices_are_those_transformers_takes():
    """--scheduler: every SchedulerType of the installed transformers that builds without lr_scheduler_kwargs or an
    evaluation strategy (tpo-fast train sets neither), and no other; --attn-implementation: names it takes."""
    from transformers import SchedulerType, TrainingArguments
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.optimization import get_scheduler

    from tpo_fast.cli.train import ATTN_IMPLEMENTATIONS, SCHEDULERS

    def builds(name):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        try:
            args = TrainingArguments(output_dir="o", lr_scheduler_type=name, use_cpu=True, report_to="none",
                                     max_steps=10)
            get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=10,
                          scheduler_specific_kwargs=args.lr_scheduler_kwargs)
        except (TypeError, ValueError):
            return False
        return True

    assert set(SCHEDULERS) == {s.value for s in SchedulerType if builds(s.value)}
    assert set(ATTN_IMPLEMENTATIONS) <= {"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()}


def test_range_checks_at_their_edges(tmp_path, model_dir):
    from tpo_fast.cli._common import UsageError

    def check(command, *flags):
        SUBCOMMANDS[command].check(build_parser().parse_args([*_base_argv(command, tmp_path, model_dir), *flags]))

    check("train", "--noise-step", "999")
    check("train", "--noise-seed", "0", "--precompute-reference", "--corrupted-cache", str(tmp_path / "c"))
    for command, flag, value in (("csr", "--beta", "-1"), ("fisao", "--clip-eps", "-0.5")):
        with pytest.raises(UsageError, match=f"^{flag} {float(value)}: must be >= 0; pass a value in range$"):
            check(command, flag, value)
    (tmp_path / "o" / "checkpoint-2").mkdir(parents=True)
    check("train", "--resume")  # the last checkpoint-N folder of the output folder
    with pytest.raises(UsageError, match=r"^--noise-step 1000: the diffusion schedule has steps 0 to 999; pass one of "
                                         r"those$"):
        check("train", "--noise-step", "1000")
    check("train", "--beta", "1")
    # the train edges that pass: the loss layer's domains, the run's length, the reference and the adapter
    for flags in (["--offset", "0"], ["--povid-noise-weight", "0"], ["--povid-noise-weight", "1"], ["--beta", "1e9"],
                  ["--lr", "1e-12"], ["--epochs", "0", "--max-steps", "3"], ["--epochs", "0.5"], ["--max-steps", "1"],
                  ["--epochs", "inf", "--max-steps", "1"], ["--reference", "adapter", "--lora-r", "1"],
                  ["--reference", "none"], ["--reference", "model", "--precompute-reference"],
                  ["--lora-targets", "lm_head"], ["--lora-r", "2", "--lora-targets", "lm_head_proj, q_proj"],
                  ["--scheduler", "linear", "--attn-implementation", "eager"]):
        check("train", *flags)
    check("csr", "--lam", "1")
    check("csr", "--beta", "1")
    with pytest.raises(UsageError, match=r"^--beta 0.0 --lam 0.9: out of range; pass --beta > 0 and --lam in "
                                         r"\[0, 1\]$"):
        check("csr", "--beta", "0")
    with pytest.raises(UsageError, match=r"^--low 0.5 --high 0.5: the hallucinated objects' threshold must be below "
                                         r"the present objects'; pass --low < --high$"):
        check("fisao", "--low", "0.5", "--high", "0.5")
    with pytest.raises(UsageError, match=r"^--clip-eps 0: the clipped ratio would never move; pass a clip range > 0, "
                                         r"e.g. 0.2$"):
        check("fisao", "--clip-eps", "0")
    with pytest.raises(UsageError, match=r"^the verifier needs calibrated thresholds; pass --calibration FILE, or both "
                                         r"--low and --high$"):
        SUBCOMMANDS["fisao"].check(build_parser().parse_args(_base_argv("fisao", tmp_path, model_dir)[:7]))


def test_eval_checks_its_counts_splits_and_paths(tmp_path, model_dir):
    from tpo_fast.cli._common import UsageError

    (tmp_path / "images").mkdir()
    (tmp_path / "objects.jsonl").write_text("")
    base = ["eval", "--model", str(model_dir), "--image-folder", str(tmp_path / "images"), "--objects",
            str(tmp_path / "objects.jsonl")]

    def check(*flags):
        SUBCOMMANDS["eval"].check(build_parser().parse_args([*base, *flags]))

    check("--captions", "0", "--max-new-tokens", "1", "--batch-size", "1", "--split", "adversarial")
    counts = "--captions must be >= 0, --max-new-tokens and --batch-size >= 1; pass counts in range"
    for flag in ("--captions -1", "--max-new-tokens 0", "--batch-size 0"):
        with pytest.raises(UsageError, match=f"^{counts}$"):
            check(*flag.split())
    for split, bad in (("random,hard,easy", "hard, easy"), (" , ", "(none)")):
        with pytest.raises(UsageError, match=rf"^--split {split}: unknown split {re.escape(bad)}; pass some of "
                                             "random,popular,adversarial$"):
            check("--split", split)
    with pytest.raises(UsageError, match=f"^--image-folder {tmp_path / 'objects.jsonl'}: is a file, not a folder; "
                                         "pass the folder that the object file's image paths are relative to$"):
        SUBCOMMANDS["eval"].check(build_parser().parse_args([*base[:3], "--image-folder", base[6], *base[5:]]))
    with pytest.raises(UsageError, match=re.escape(f"--objects {tmp_path}: is a folder, not a file; pass a .json or "
                                                   '.jsonl file, one {"image": PATH, "objects": ["red circle", ...]} '
                                                   "record per image")):
        SUBCOMMANDS["eval"].check(build_parser().parse_args([*base[:5], "--objects", str(tmp_path)]))


def test_a_checkpoint_goes_on_with_the_kind_of_run_that_wrote_it(tmp_path, model_dir):
    """A LoRA checkpoint resumed without --lora-r failed after the model loaded (missing and unexpected keys in a
    state dict), a full one with --lora-r in the optimizer (its group sizes): now refused before anything loads,
    and a rank that differs from the adapter's too. --resume alone reads the highest checkpoint-N, as the Trainer."""
    from tpo_fast.cli._common import UsageError

    def check(*flags):
        SUBCOMMANDS["train"].check(build_parser().parse_args([*_base_argv("train", tmp_path, model_dir), *flags]))

    out = tmp_path / "o"
    for n in (2, 10, 9):
        (out / f"checkpoint-{n}").mkdir(parents=True)
        (out / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    full, lora = out / "checkpoint-9", out / "checkpoint-10"
    (lora / "adapter_config.json").write_text('{"r": 4, "peft_type": "LORA"}')
    check("--resume", str(full))
    check("--resume", str(lora), "--lora-r", "4")
    check("--resume", "--lora-r", "4")  # checkpoint-10, not checkpoint-9 (nor checkpoint-2 by name order)
    cases = [
        (["--resume", str(full), "--lora-r", "4"], f"--lora-r 4 with --resume {full}: the checkpoint holds the full "
         "model, not a LoRA adapter; drop --lora-r to go on with the full fine-tune that wrote it"),
        (["--resume"], f"--resume {lora}: the checkpoint holds a LoRA adapter (adapter_config.json); pass the "
         "--lora-r and --lora-targets of the run that wrote it"),
        (["--resume", str(lora), "--lora-r", "8"], f"--lora-r 8 with --resume {lora}: the checkpoint's adapter has "
         "rank 4; pass --lora-r 4"),
    ]
    for flags, message in cases:
        with pytest.raises(UsageError) as refused:
            check(*flags)
        assert str(refused.value) == message
    (lora / "adapter_config.json").write_text("not json")  # unreadable: left to the Trainer, which says so
    check("--resume", str(lora), "--lora-r", "8")
