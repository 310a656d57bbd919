"""The `tpo-fast` command line: one table of subcommands, help for every flag, one spelling of each
flag, and a one-line error (exit code 2) for a missing path before anything heavy is loaded."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

import pytest

from tpo_fast.cli import SUBCOMMANDS, build_parser, main

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_is_in_the_table_with_a_description():
    subs = _subparsers()
    assert set(subs) == set(SUBCOMMANDS) >= {"train", "povid", "demo", "csr", "fisao"}
    for name, p in subs.items():
        assert p.description and p.description == SUBCOMMANDS[name].description, name
    top = build_parser().format_help()
    for name, cmd in SUBCOMMANDS.items():
        assert name in top and cmd.description.split()[0] in top


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_flag_has_help_and_shows_its_default(command):
    p = _subparsers()[command]
    text = " ".join(p.format_help().split())
    for action in p._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flags = ", ".join(action.option_strings)
        assert action.help and len(action.help) > 8, f"{command} {flags}: no help text"
        shown = p.formatter_class(prog="x")._get_help_string(action)
        assert "(required)" in shown or "(default: " in shown or "(none:" in shown, f"{command} {flags}: {shown}"
        assert " ".join(shown.replace("%(default)s", str(action.default)).split()) in text


@pytest.mark.parametrize("command", ["train", "povid", "csr", "fisao"])
def test_one_spelling_of_each_flag_and_the_old_ones_as_aliases(command):
    """`--output-dir`, `--image-folder`, `--backend` everywhere; `--output`, `--images`, `--loss-backend`
    (the train spellings before) still parse to the same values."""
    p = _subparsers()[command]
    extra = {"train": ["--data", "d"], "povid": ["--data", "d"], "csr": ["--prompts", "p", "--clip", "c"],
             "fisao": ["--prompts", "p"]}[command]
    new = p.parse_args(["--model", "m", "--output-dir", "o", "--image-folder", "i", "--backend", "torch", *extra])
    old = p.parse_args(["--model", "m", "--output", "o", "--images", "i", "--loss-backend", "torch", *extra])
    assert new == old
    assert (new.output_dir, new.image_folder, new.backend) == ("o", "i", "torch")


def test_demo_output_spellings():
    p = _subparsers()["demo"]
    assert p.parse_args(["--output", "x"]).output_dir == p.parse_args(["--output-dir", "x"]).output_dir == "x"


MODEL_HINT = ("pass a local folder saved with save_pretrained holding a LLaVA model and its processor (nothing is "
              "downloaded); `tpo-fast demo --output-dir DIR` saves a tiny model in DIR/model and pairs in DIR/data")
DATA_HINT = ("pass a .json, .jsonl or .parquet file of preference records; `tpo-fast demo --output-dir DIR` saves a "
             "tiny model in DIR/model and pairs in DIR/data")
RESUME_HINT = "pass a checkpoint-N folder written by an earlier run, or --resume alone for the last one in --output-dir"
NOISE_SEED = ("--noise-seed -1 (fresh noise at every load) with {}: cached scores or images would not match the images "
              "trained on; pass a seed >= 0")


def _bad_commands(tmp_path, model_dir):
    """(argv, the whole error line after "tpo-fast <command>: error: ")."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("")
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-3").write_text("")  # a file, not a checkpoint folder
    (out / "checkpoint-x").mkdir()  # not checkpoint-N
    train = ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out)]
    fisao = ["--model", str(model_dir), "--prompts", str(data), "--output-dir", "o"]
    csr = [*fisao, "--clip", str(model_dir)]
    return [
        (["train", "--model", str(tmp_path / "nope"), *train[3:]], f"--model {tmp_path / 'nope'}: no such folder; "
         f"{MODEL_HINT}"),
        (["train", "--model", str(tmp_path), *train[3:]], f"--model {tmp_path}: no config.json in this folder; "
         f"{MODEL_HINT}"),
        (["train", "--model", str(data), *train[3:]], f"--model {data}: is a file, not a folder; {MODEL_HINT}"),
        ([*train[:3], "--data", str(tmp_path / "x.jsonl"), *train[5:]], f"--data {tmp_path / 'x.jsonl'}: no such "
         f"file; {DATA_HINT}"),
        ([*train[:3], "--data", str(tmp_path), *train[5:]], f"--data {tmp_path}: is a folder, not a file; {DATA_HINT}"),
        ([*train, "--image-folder", str(tmp_path / "imgs")], f"--image-folder {tmp_path / 'imgs'}: no such folder; "
         "pass the folder that the records' image paths are relative to"),
        ([*train, "--resume"], f"--resume: no checkpoint-N folder in --output-dir {out}; drop --resume to start a new "
         "run, or pass --resume CHECKPOINT_DIR"),
        ([*train[:5], "--output-dir", str(tmp_path / "new"), "--resume"], f"--resume: no checkpoint-N folder in "
         f"--output-dir {tmp_path / 'new'}; drop --resume to start a new run, or pass --resume CHECKPOINT_DIR"),
        ([*train, "--resume", str(tmp_path / "ck")], f"--resume {tmp_path / 'ck'}: no such folder; {RESUME_HINT}"),
        ([*train, "--resume", str(model_dir)], f"--resume {model_dir}: not a checkpoint (no trainer_state.json); "
         f"{RESUME_HINT}"),
        ([*train, "--deepspeed", str(tmp_path / "zero3.json")], f"--deepspeed {tmp_path / 'zero3.json'}: no such "
         "file; pass a DeepSpeed JSON config file"),
        (["povid", *train[1:3], "--data", str(tmp_path / "povid.jsonl"), *train[5:]], f"--data "
         f"{tmp_path / 'povid.jsonl'}: no such file; {DATA_HINT}"),
        (["csr", "--model", str(model_dir), "--prompts", str(data), "--clip", str(tmp_path / "clip"),
          "--output-dir", "o"], f"--clip {tmp_path / 'clip'}: no such folder; pass a local folder saved with "
         "save_pretrained holding a CLIPModel and its processor (nothing is downloaded)"),
        (["csr", "--model", str(model_dir), "--prompts", str(tmp_path / "prompts.jsonl"), "--clip", str(model_dir),
          "--output-dir", "o"], f"--prompts {tmp_path / 'prompts.jsonl'}: no such file; pass a .json or .jsonl file "
         "of {image, prompt} records"),
        (["csr", *csr, "--image-folder", str(data)], f"--image-folder {data}: is a file, not a folder; pass the folder "
         "that the prompts' image paths are relative to"),
        (["fisao", "--model", str(model_dir), "--prompts", str(data), "--output-dir", "o", "--calibration",
          str(tmp_path / "cal.json")], f"--calibration {tmp_path / 'cal.json'}: no such file; pass a JSON list of "
         "{image, correct, hallucinated} records"),
        (["fisao", *fisao, "--low", ".1", "--high", ".5", "--objects", str(tmp_path)], f"--objects {tmp_path}: is a "
         "folder, not a file; pass a text file of object words, or leave it out for the COCO categories"),
        (["fisao", "--model", str(model_dir), "--prompts", str(data), "--output-dir", "o", "--low", "0.1"],
         "the verifier needs calibrated thresholds; pass --calibration FILE, or both --low and --high"),
        (["fisao", *fisao, "--low", "0.5", "--high", "0.2"], "--low 0.5 --high 0.2: the hallucinated objects' "
         "threshold must be below the present objects'; pass --low < --high"),
        (["fisao", *fisao, "--low", ".1", "--high", ".5", "--batch-size", "0"], "--batch-size 0: must be >= 1; pass a "
         "value in range"),
        (["fisao", *fisao, "--low", ".1", "--high", ".5", "--iterations", "-1"], "--iterations -1: must be >= 1; pass "
         "a value in range"),
        (["fisao", *fisao, "--low", ".1", "--high", ".5", "--clip-eps", "0"], "--clip-eps 0: the clipped ratio would "
         "never move; pass a clip range > 0, e.g. 0.2"),
        (["csr", *csr, "--lr", "0"], "--lr 0.0: must be a finite number > 0; pass a learning rate, e.g. 1e-6"),
        (["fisao", *fisao, "--low", ".1", "--high", ".5", "--lr", "-1"], "--lr -1.0: must be a finite number > 0; "
         "pass a learning rate, e.g. 1e-6"),
        (["csr", *csr, "--num-beams", "1"], "--num-beams 1: must be >= 2; pass a value in range"),
        (["csr", *csr, "--iterations", "0"], "--iterations 0: must be >= 1; pass a value in range"),
        (["csr", *csr, "--lam", "1.5"], "--beta 0.1 --lam 1.5: out of range; pass --beta > 0 and --lam in [0, 1]"),
        ([*train, "--batch-size", "0"], "--batch-size 0: must be >= 1; pass a value in range"),
        ([*train, "--grad-accum", "0"], "--grad-accum 0: must be >= 1; pass a value in range"),
        ([*train, "--max-length", "-5"], "--max-length -5: must be >= 1; pass a value in range"),
        ([*train, "--noise-step", "1000"], "--noise-step 1000: the diffusion schedule has steps 0 to 999; pass one of "
         "those"),
        ([*train, "--beta", "0"], "--beta 0.0: must be > 0; pass the preference loss's inverse temperature, e.g. 0.1"),
        ([*train, "--noise-seed", "-1", "--precompute-reference"], NOISE_SEED.format("--precompute-reference")),
        ([*train, "--noise-seed", "-1", "--corrupted-cache", str(tmp_path / "cc")],
         NOISE_SEED.format("--corrupted-cache")),
        (["demo", "--steps", "1"], "--steps 1: must be >= 2; pass a value in range"),
        (["demo", "--eval-captions", "-1"], "--eval-captions -1: must be >= 0; pass a value in range"),
    ]


def test_missing_paths_give_one_line_and_exit_code_2(tmp_path, model_dir, capsys, monkeypatch):
    def never(args):
        raise AssertionError("the subcommand ran despite a bad command line")

    for name, cmd in SUBCOMMANDS.items():
        monkeypatch.setitem(SUBCOMMANDS, name, type(cmd)(cmd.description, cmd.add_arguments, never, cmd.check))
    for argv, want in _bad_commands(tmp_path, model_dir):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == "", argv
        lines = captured.err.splitlines()
        assert lines == [f"tpo-fast {argv[0]}: error: {want}"], captured.err
        assert "; " in want, f"no hint of what to do: {want}"  # "<what is wrong>; <what to do>"


def test_entry_point_exits_2_before_importing_transformers(tmp_path):
    """`python -m tpo_fast.cli` (the `tpo-fast` script runs the same `main`): exit code 2, one line, and
    neither transformers nor a model was loaded."""
    probe = ("import runpy, sys\n"
             "try:\n    runpy.run_module('tpo_fast.cli', run_name='__main__')\n"
             "except SystemExit as e:\n    print(e.code, 'transformers' in sys.modules)\n")
    argv = ["train", "--model", str(tmp_path / "m"), "--data", "d.jsonl", "--output-dir", str(tmp_path / "o")]
    r = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.stdout.split() == ["2", "False"], (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and f"--model {tmp_path / 'm'}: no such folder" in r.stderr, r.stderr


@pytest.mark.parametrize("steps, logging_steps", [(2, 1), (3, 1), (39, 19), (40, 20), (200, 20)])
def test_demo_logs_at_least_twice(monkeypatch, steps, logging_steps):
    """A short demo (`--steps` under twice the 20-step logging window) used to train, then fail for want of a
    second logged window; now its window shrinks so that it logs twice."""
    import tpo_fast.trainer.demo as demo_mod

    seen = {}

    class Stop(Exception):
        pass

    def record(output_dir, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(demo_mod, "run_demo", record)
    with pytest.raises(Stop):
        main(["demo", "--steps", str(steps)])
    assert seen["max_steps"] == steps and seen["logging_steps"] == logging_steps
    assert steps // seen["logging_steps"] >= 2


@pytest.mark.slow
def test_demo_keeps_a_model_that_train_goes_on_from(tmp_path, monkeypatch, capsys):
    """`tpo-fast demo --output DIR` saves a loadable model and processor and prints the `train` command to
    go on with; that command runs as printed (here on a shortened demo)."""
    import tpo_fast.trainer.demo as demo_mod

    real = demo_mod.run_demo

    def short_demo(output_dir, **kw):
        kw.update(max_steps=2, logging_steps=1, num_images=8, batch_size=4)
        return real(output_dir, **kw)

    monkeypatch.setattr(demo_mod, "run_demo", short_demo)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--output", "demo", "--eval-images", "6", "--eval-captions", "2"]) == 0
    out = capsys.readouterr().out
    # the printed eval command repeats the after half: the same captions (it used eval's default of 16)
    again = shlex.split(next(line for line in out.splitlines() if line.startswith("again: ")).removeprefix("again: "))
    assert again[:2] == ["tpo-fast", "eval"]
    assert main([*again[1:], "--json", "again.json"]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["chair"]["captions"] == 2
    capsys.readouterr()
    assert "model and processor: demo/model" in out
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    AutoProcessor.from_pretrained("demo/model")
    LlavaForConditionalGeneration.from_pretrained("demo/model")
    command = next(line for line in out.splitlines() if line.startswith("go on with: "))
    argv = shlex.split(command.removeprefix("go on with: "))
    assert argv[:2] == ["tpo-fast", "train"]
    argv = [*argv[1:], "--max-steps", "2", "--batch-size", "2", "--logging-steps", "1", "--backend", "torch"]
    assert main(argv) == 0
    assert (tmp_path / "run" / "model.safetensors").exists() and (tmp_path / "run" / "processor_config.json").exists()
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    assert len([h for h in state["log_history"] if "loss" in h]) == 2


def test_train_grad_mode_reaches_the_config(tmp_path, model_dir, monkeypatch):
    """`--grad-mode` (default auto) is `TPOConfig.loss_grad_mode`; anything else does not parse."""
    import tpo_fast.trainer.config as config

    p = _subparsers()["train"]
    base = ["--model", str(model_dir), "--data", "d", "--output-dir", str(tmp_path / "o")]
    assert p.parse_args(base).grad_mode == "auto"
    with pytest.raises(SystemExit):
        p.parse_args([*base, "--grad-mode", "atomic"])
    seen = {}

    class Stop(Exception):
        pass

    def capture(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(config, "TPOConfig", capture)
    with pytest.raises(Stop):
        SUBCOMMANDS["train"].run(p.parse_args([*base, "--grad-mode", "recompute"]))
    assert seen["loss_grad_mode"] == "recompute"


@pytest.mark.parametrize(
    ("flags", "shared", "padding_free"),
    [([], True, None), (["--no-shared-prefix"], False, None), (["--padding-free", "on"], True, True),
     (["--no-shared-prefix", "--padding-free", "off"], False, False)],
)
def test_train_packing_flags_reach_the_config(tmp_path, model_dir, monkeypatch, flags, shared, padding_free):
    """`--no-shared-prefix` and `--padding-free auto|on|off` are TPOConfig's shared_prefix / padding_free."""
    import tpo_fast.trainer.config as config

    p = _subparsers()["train"]
    base = ["--model", str(model_dir), "--data", "d", "--output-dir", str(tmp_path / "o")]
    seen = {}

    class Stop(Exception):
        pass

    def capture(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(config, "TPOConfig", capture)
    with pytest.raises(Stop):
        SUBCOMMANDS["train"].run(p.parse_args([*base, *flags]))
    assert (seen["shared_prefix"], seen["padding_free"]) == (shared, padding_free)


def test_the_command_is_required_and_the_hub_is_off_by_default(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(SystemExit) as stop:
        main([])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: tpo-fast [-h] COMMAND ...\n")
    assert err.endswith("tpo-fast: error: the following arguments are required: COMMAND\n")
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set before anything could reach the hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a user's own setting is kept
    assert main(["demo", "--steps", "1"]) == 2
    assert os.environ["HF_HUB_OFFLINE"] == "0"


def test_help_shows_the_examples_and_what_none_means():
    from tpo_fast.cli._common import HelpFormatter

    top = build_parser().format_help()
    assert top.startswith("usage: tpo-fast") and "Token-level preference optimization (TPO, arXiv 2412.14487)" in top
    for name in ("train", "eval"):
        assert SUBCOMMANDS[name].epilog.splitlines()[1] in _subparsers()[name].format_help()
    p = argparse.ArgumentParser()
    said = p.add_argument("--a", default=None, help="x (none: nothing)")
    unsaid = p.add_argument("--b", default=None, help="y")
    given = p.add_argument("--c", default=3, help="z")
    needed = p.add_argument("--d", required=True, help="w")
    shown = HelpFormatter(prog="x")._get_help_string
    assert [shown(a) for a in (said, unsaid, given, needed)] == [
        "x (none: nothing)", "y (default: none)", "z (default: %(default)s)", "w (required)"]


def test_the_command_reference_is_up_to_date():
    """docs/cli.md is every subcommand's --help (scripts/cli_reference.py writes it): a flag, default or help text
    changed without it fails here."""
    if sys.version_info[:2] != (3, 11):
        pytest.skip("argparse lays help out differently by Python version; docs/cli.md is written with Python 3.11")
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))
    try:
        import cli_reference
    finally:
        sys.path.pop(0)
    text = cli_reference.render()
    assert cli_reference.REFERENCE.read_text(encoding="utf-8") == text, (
        "docs/cli.md is out of date: run python scripts/cli_reference.py")
    for name, cmd in SUBCOMMANDS.items():  # every subcommand, with its description
        assert f"## `tpo-fast {name}`\n\n```text\nusage: tpo-fast {name} " in text and cmd.description[:40] in text


def test_a_run_under_torchrun_leaves_no_process_group(tmp_path, monkeypatch):
    """The process group a run set up (the Hugging Face Trainer does, under torchrun, and never destroys it) is
    destroyed when the subcommand returns, before the interpreter's teardown (where a gloo group's threads can
    abort a rank that succeeded), and the subcommand's exit code is kept."""
    import torch.distributed as dist

    seen = []

    def run_with_a_group(args):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        seen.append(dist.is_initialized())
        return 3

    cmd = SUBCOMMANDS["demo"]
    monkeypatch.setitem(SUBCOMMANDS, "demo", type(cmd)(cmd.description, cmd.add_arguments, run_with_a_group,
                                                        cmd.check))
    try:
        assert main(["demo"]) == 3
        assert seen == [True]
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert main(["demo"]) == 3  # a second run's group: set up and destroyed again
    assert seen == [True, True] and not dist.is_initialized()
