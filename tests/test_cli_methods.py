"""`tpo-fast fisao`, `csr`, `eval`, `demo` and `train`: command lines that used to pass the check and fail after the
model loaded (or train on NaN) are one line on stderr and exit code 2, before run() where check() can tell, else
before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tpo_fast.cli import SUBCOMMANDS, build_parser, main

OUT_HINT = "pass a folder (it is created when missing)"
PG_HINT = "pass --clip-eps in (0, 1), e.g. 0.2, and a finite --kl-coef >= 0, e.g. 0.05"
CAL_HINT = "pass a JSON list of {image, correct: [words], hallucinated: [words]} records"
PROMPTS_HINT = ("pass a .json or .jsonl file of {image, prompt} records whose images exist (relative to "
                "--image-folder)")
QUESTION = ("question must hold the field {{object}} and no other (it is filled by .format(object=...); a literal "
            "brace is written {{{{ or }}}}), got {!r}; pass a yes/no question with {{object}} in it, e.g. 'is there "
            "a {{object}} in the image ?'")


@pytest.fixture
def paths(tmp_path, model_dir):
    """The files of good command lines: prompts (one record, its image present), a calibration file, a file
    where a folder is wanted, an object file for eval."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")  # only its existence is checked before the model loads
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"image": "a.png", "prompt": "describe"}) + "\n")
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps([{"image": "a.png", "correct": ["dog"], "hallucinated": ["cat"]}]))
    (tmp_path / "afile").write_text("")
    (tmp_path / "objects.jsonl").write_text("")
    return dict(model=str(model_dir), prompts=str(prompts), images=str(tmp_path / "images"), cal=str(cal),
                afile=str(tmp_path / "afile"), objects=str(tmp_path / "objects.jsonl"), tmp=tmp_path)


def _fisao(p, *flags):
    return ["fisao", "--model", p["model"], "--prompts", p["prompts"], "--image-folder", p["images"], "--output-dir",
            str(p["tmp"] / "out"), *flags]


def _csr(p, *flags):
    return ["csr", "--model", p["model"], "--prompts", p["prompts"], "--image-folder", p["images"], "--clip",
            p["model"], "--output-dir", str(p["tmp"] / "out"), *flags]


def _eval(p, *flags):
    return ["eval", "--model", p["model"], "--image-folder", p["images"], "--objects", p["objects"], *flags]


def _train(p, *flags):
    return ["train", "--model", p["model"], "--data", p["prompts"], "--output-dir", str(p["tmp"] / "out"), *flags]


def _check_cases(p):
    """(argv, the whole error line after "tpo-fast <command>: error: ")."""
    bad_cal, bad_json = p["tmp"] / "badcal.json", p["tmp"] / "badjson.json"
    bad_cal.write_text('[{"image": "0000_red_square.png"}]')
    bad_json.write_text("{bad")
    thresholds = ("--low", "0.1", "--high", "0.2")
    sub = f"{p['afile']}/sub"
    return [
        # 1: what the loss refused after the model loaded
        (_fisao(p, *thresholds, "--clip-eps", "1.5"), "--clip-eps 1.5 --kl-coef 0.05: clip_eps must be < 1 (the ratio "
         f"is clipped to [1 - clip_eps, ...]), got 1.5; {PG_HINT}"),
        (_fisao(p, *thresholds, "--clip-eps", "inf"), "--clip-eps inf --kl-coef 0.05: clip_eps must be a finite "
         f"number > 0 (PPO uses 0.2), got inf; {PG_HINT}"),
        (_fisao(p, *thresholds, "--kl-coef", "inf"), "--clip-eps 0.2 --kl-coef inf: kl_coef must be a finite number "
         f">= 0, got inf; {PG_HINT}"),
        # 4: thresholds the calibration overwrote without a word
        (_fisao(p, "--calibration", p["cal"], "--low", "0.1"), "--low 0.1 with --calibration: the calibration sets "
         "both thresholds (these would be ignored); pass --calibration FILE, or --low and --high without it"),
        (_fisao(p, "--calibration", p["cal"], "--high", "0.1"), "--high 0.1 with --calibration: the calibration sets "
         "both thresholds (these would be ignored); pass --calibration FILE, or --low and --high without it"),
        (_fisao(p, "--calibration", p["cal"], "--low", "-5", "--high", "5"), "--low -5.0 --high 5.0 with "
         "--calibration: the calibration sets both thresholds (these would be ignored); pass --calibration FILE, or "
         "--low and --high without it"),
        # 2: an infinite threshold trained on NaN rewards
        (_fisao(p, "--low=-inf", "--high", "0.1"), "--low -inf --high 0.1: the calibration thresholds must be finite "
         "numbers, got low=-inf, high=0.1; pass finite thresholds, e.g. --low 0.1 --high 0.3"),
        (_fisao(p, "--low", "0", "--high", "inf"), "--low 0.0 --high inf: the calibration thresholds must be finite "
         "numbers, got low=0.0, high=inf; pass finite thresholds, e.g. --low 0.1 --high 0.3"),
        # 3: a malformed calibration file was a KeyError / JSONDecodeError after the model loaded
        (_fisao(p, "--calibration", str(bad_cal)), f"--calibration: {bad_cal}: record #0: needs \"correct\" (a list "
         f"of words), got no such key; {CAL_HINT}"),
        (_fisao(p, "--calibration", str(bad_json)), f"--calibration: {bad_json}: not valid JSON (Expecting property "
         f"name enclosed in double quotes at line 1, column 2); {CAL_HINT}"),
        # 6: the whole beam search ran before the DPO config refused beta
        (_csr(p, "--beta", "inf"), "--beta inf: beta must be a finite number > 0 (TPO and DPO use 0.1), got inf; pass "
         "the DPO loss's inverse temperature, e.g. 0.1"),
        # 7: an output folder that is a file failed when the run saved, after all its work
        (_fisao(p, *thresholds, "--output-dir", p["afile"]), f"--output-dir {p['afile']}: is a file, not a folder; "
         f"{OUT_HINT}"),
        (_csr(p, "--output-dir", p["afile"]), f"--output-dir {p['afile']}: is a file, not a folder; {OUT_HINT}"),
        (["demo", "--output-dir", p["afile"]], f"--output-dir {p['afile']}: is a file, not a folder; {OUT_HINT}"),
        (_train(p, "--output-dir", p["afile"]), f"--output-dir {p['afile']}: is a file, not a folder; {OUT_HINT}"),
        (_train(p, "--output-dir", sub), f"--output-dir {sub}: {p['afile']} is a file, not a folder; {OUT_HINT}"),
        (["povid", *_train(p, "--output-dir", p["afile"])[1:]], f"--output-dir {p['afile']}: is a file, not a folder; "
         f"{OUT_HINT}"),
        # 8: eval's report path and question template
        (_eval(p, "--json", str(p["tmp"])), f"--json {p['tmp']}: is a folder, not a file; pass a file path for the "
         f"report, e.g. {p['tmp'] / 'report.json'}"),
        (_eval(p, "--question", "is there a {obj} ?"), "--question 'is there a {obj} ?': " +
         QUESTION.format("is there a {obj} ?")),
        (_eval(p, "--question", "is there a {0} ?"), "--question 'is there a {0} ?': " +
         QUESTION.format("is there a {0} ?")),
        (_eval(p, "--question", "is it there ?"), "--question 'is it there ?': " + QUESTION.format("is it there ?")),
    ]


def _never_run(monkeypatch):
    def never(args):
        raise AssertionError("the subcommand ran despite a bad command line")

    for name, cmd in SUBCOMMANDS.items():
        monkeypatch.setitem(SUBCOMMANDS, name, type(cmd)(cmd.description, cmd.add_arguments, never, cmd.check))


def test_bad_values_are_refused_by_check(paths, monkeypatch, capsys):
    _never_run(monkeypatch)
    for argv, want in _check_cases(paths):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == "", argv
        assert captured.err.splitlines() == [f"tpo-fast {argv[0]}: error: {want}"], argv
        assert "; " in want


def test_the_good_command_lines_pass_the_check(paths):
    """The fixtures' command lines themselves pass: each case above fails for its one flag."""
    for argv in (_fisao(paths, "--low", "0.1", "--high", "0.2"), _fisao(paths, "--calibration", paths["cal"]),
                 _csr(paths), _train(paths), _eval(paths, "--json", str(paths["tmp"] / "r.json")),
                 ["demo", "--output-dir", str(paths["tmp"] / "new" / "demo")],
                 _eval(paths, "--question", "{{really}} a {object} ?")):
        SUBCOMMANDS[argv[0]].check(build_parser().parse_args(argv))


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the bad data files are found before."""
    import transformers

    import tpo_fast.cli._common as common
    import tpo_fast.trainer.trainer as trainer_module

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded despite a bad data file")

    monkeypatch.setattr(common, "load_model", never)
    monkeypatch.setattr(trainer_module, "load_llava", never)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", never)


def test_bad_prompt_files_are_one_line_before_the_model_loads(paths, no_model, capsys):
    """csr and fisao read the prompts with the method's reader (a record's image missing, no records): the ValueError
    was a traceback, after the model loaded (fisao: after the calibration too)."""
    missing = paths["tmp"] / "missing.jsonl"
    missing.write_text(json.dumps({"image": "nope.png", "prompt": "hi"}) + "\n")
    empty = paths["tmp"] / "empty.jsonl"
    empty.write_text("")
    image = paths["tmp"] / "images" / "nope.png"
    cases = [
        (_csr(paths, "--prompts", str(missing)), f"{missing}: record #0's image {image} does not exist"),
        (_fisao(paths, "--low", "0", "--high", "1", "--prompts", str(empty)), f"{empty}: no prompt records"),
        (_fisao(paths, "--calibration", paths["cal"], "--prompts", str(missing)),
         f"{missing}: record #0's image {image} does not exist"),
    ]
    for argv, want in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.err.splitlines() == [f"tpo-fast {argv[0]}: error: {want}; {PROMPTS_HINT}"], argv


def test_calibration_images_are_opened_before_the_model_loads(paths, no_model, capsys):
    """fisao's calibration images were opened after the model loaded (and its reference copy was made): a missing or
    unreadable one was a traceback then. Now one line, before."""
    missing = paths["tmp"] / "cal_missing.json"
    missing.write_text(json.dumps([{"image": "nope.png", "correct": ["dog"], "hallucinated": ["cat"]}]))
    hint = "fix the record's image path (relative to --image-folder) or pass another --calibration"
    image = paths["tmp"] / "images"
    for cal, why in ((missing, f"[Errno 2] No such file or directory: '{image / 'nope.png'}'"),
                     (paths["cal"], f"cannot identify image file '{image / 'a.png'}'")):  # a.png: 0 bytes
        assert main(_fisao(paths, "--calibration", str(cal))) == 2
        assert capsys.readouterr().err.splitlines() == [f"tpo-fast fisao: error: --calibration {cal}: {why}; {hint}"]


@pytest.mark.parametrize("command", ["train", "povid"])
def test_data_without_a_usable_record_is_one_line_before_the_model_loads(command, paths, no_model, capsys):
    data = paths["tmp"] / "pairs.jsonl"
    data.write_text(json.dumps({"image": "a.png", "prompt": "q"}) + "\n")  # no chosen / rejected answers
    argv = [command, *_train(paths, "--data", str(data))[1:]]
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"tpo-fast {command}: error: {data}: no usable preference records (1 bad); pass --bad-records error to list "
        "why each is bad, or pass another --data file"]
    assert main([*argv, "--bad-records", "error"]) == 2
    line, = capsys.readouterr().err.splitlines()
    assert line.startswith(f"tpo-fast {command}: error: {data}: 1 bad preference record(s): #0: ") and \
        line.endswith("Fix them or pass on_bad='skip' (CLI: --bad-records skip) to leave them out; or pass another "
                      "--data file"), line


def test_an_output_folder_that_cannot_be_written_is_refused_by_check(paths, monkeypatch, capsys):
    """A read-only output folder (or read-only nearest parent of a new one) failed when the run saved, after all its
    work. `os.access` answers as it would for a user without write permission (tests may run as root, whom the
    modes do not stop)."""
    import tpo_fast.cli._common as common

    ro = paths["tmp"] / "ro"
    ro.mkdir()
    monkeypatch.setattr(common.os, "access", lambda p, mode: Path(p) != ro)
    _never_run(monkeypatch)
    for out, where in ((ro, ""), (ro / "new" / "run", f"{ro} ")):
        for argv in (_train(paths, "--output-dir", str(out)), ["demo", "--output-dir", str(out)]):
            assert main(argv) == 2, argv
            assert capsys.readouterr().err.splitlines() == [
                f"tpo-fast {argv[0]}: error: --output-dir {out}: {where}is not writable; pass a folder this user can "
                "write to"], argv
    # a writable folder beside it passes
    SUBCOMMANDS["train"].check(build_parser().parse_args(_train(paths, "--output-dir", str(paths["tmp"] / "w"))))


def test_lora_targets_and_peft_are_checked_before_the_model_loads(paths, monkeypatch, capsys):
    """A --lora-targets name that matches no module of the saved model (a typo), or only the frozen vision tower's,
    and --lora-r without peft installed, failed inside peft after the whole model had loaded. The module names come
    from the safetensors headers (no tensor read): one file, or a sharded checkpoint's index."""
    import importlib.util

    import torch
    from safetensors.torch import save_file

    model = paths["tmp"] / "saved"
    model.mkdir()
    (model / "config.json").write_text("{}")
    keys = ["language_model.model.layers.0.self_attn.q_proj.weight",
            "language_model.model.layers.0.mlp.up_proj.weight",
            "vision_tower.vision_model.encoder.layers.0.self_attn.out_proj.weight",
            "multi_modal_projector.linear_1.bias"]
    save_file({k: torch.zeros(1) for k in keys}, str(model / "model.safetensors"))
    _never_run(monkeypatch)

    def train(*flags):
        return ["train", "--model", str(model), *_train(paths, *flags)[3:]]

    hint = "pass names of its linear layers, e.g. q_proj,k_proj,v_proj,o_proj"
    tower = ("names only modules of the vision tower, which stays frozen; target the language model's layers, or pass "
             "--train-vision-tower")
    cases = [
        (train("--lora-r", "4", "--lora-targets", "q_proj,vproj"), f"--lora-targets q_proj,vproj: vproj names no "
         f"module of the model in {model}; {hint}"),
        (train("--lora-r", "4", "--lora-targets", "self_attn.k_proj"), f"--lora-targets self_attn.k_proj: "
         f"self_attn.k_proj names no module of the model in {model}; {hint}"),
        (train("--lora-r", "4", "--lora-targets", "out_proj"), f"--lora-targets out_proj: out_proj {tower}"),
    ]
    for argv, want in cases:
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.splitlines() == [f"tpo-fast train: error: {want}"], argv
    for ok in (train("--lora-r", "4", "--lora-targets", "q_proj,mlp.up_proj,linear_1"),
               train("--lora-r", "4", "--lora-targets", "out_proj", "--train-vision-tower")):
        SUBCOMMANDS["train"].check(build_parser().parse_args(ok))
    # a sharded checkpoint: its index's names, the shards not opened
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {keys[0]: "x", keys[2]: "x"}}))
    assert main(train("--lora-r", "4", "--lora-targets", "up_proj")) == 2
    assert "up_proj names no module" in capsys.readouterr().err
    # no peft
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    assert main(train("--lora-r", "4")) == 2
    assert capsys.readouterr().err.splitlines() == [
        "tpo-fast train: error: --lora-r 4: LoRA needs the peft package, which is not installed; run: pip install peft "
        "(or pip install 'tpo-fast[train]'), or drop --lora-r for a full fine-tune"]
