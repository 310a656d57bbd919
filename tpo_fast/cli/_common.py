"""What every `tpo-fast` subcommand shares: the help format, the shared flags and the path checks.

Flag spellings are the same in every subcommand: `--output-dir`, `--image-folder`, `--backend`
(the older `--output`, `--images`, `--loss-backend` still parse, as aliases).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BACKENDS = ("auto", "triton", "torch", "reference")
OBJECTIVES = ("tpo", "dpo", "povid")
# Where a newcomer gets a model and data to try a command on (the demo keeps both).
DEMO_HINT = "`tpo-fast demo --output-dir DIR` saves a tiny model in DIR/model and pairs in DIR/data"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default (or says what none means), or says it is required; epilogs
    keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if not action.option_strings:  # positionals: the subcommand list
            return action.help or ""
        if action.required:
            return f"{action.help} (required)"
        if action.default is None:  # the help says what none means, or the default is said to be none
            return action.help if "(none:" in action.help else f"{action.help} (default: none)"
        return super()._get_help_string(action)


class UsageError(Exception):
    """A command line that cannot work, found before anything is loaded: one line on stderr, exit code 2."""


@dataclass(frozen=True)
class Subcommand:
    """One row of the subcommand table: its one-line description, flags, pre-flight check and body."""

    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    check: Callable[[argparse.Namespace], None] = lambda args: None
    epilog: str | None = None


def add_run_arguments(
    p: argparse.ArgumentParser, *, output_help: str, lr: float, batch_size: int, seed: int, batch_help: str
) -> None:
    """The flags of every training subcommand, in one spelling."""
    p.add_argument("--model", required=True, metavar="DIR",
                   help="local folder of a LLaVA model and its processor (save_pretrained; nothing is downloaded)")
    p.add_argument("--output-dir", "--output", dest="output_dir", required=True, metavar="DIR", help=output_help)
    p.add_argument("--image-folder", "--images", dest="image_folder", default=None, metavar="DIR",
                   help="folder that relative image paths in the data are resolved against (none: as written)")
    p.add_argument("--backend", "--loss-backend", dest="backend", default="auto", choices=BACKENDS,
                   help="backend of the fused log-prob kernels (auto: triton on CUDA, torch on CPU)")
    p.add_argument("--lr", type=float, default=lr, help="learning rate")
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--seed", type=int, default=seed, help="random seed")


def _need(path: str | None, flag: str, what: str, folder: bool) -> None:
    if path is None:
        return
    kind, other = ("folder", "file") if folder else ("file", "folder")
    if not Path(path).exists():
        raise UsageError(f"{flag} {path}: no such {kind}; {what}")
    if Path(path).is_dir() != folder:
        raise UsageError(f"{flag} {path}: is a {other}, not a {kind}; {what}")


def need_file(path: str | None, flag: str, what: str) -> None:
    """Raise UsageError unless `path` (when given) is an existing file; `what` says what to pass instead."""
    _need(path, flag, what, folder=False)


def need_dir(path: str | None, flag: str, what: str) -> None:
    """Raise UsageError unless `path` (when given) is an existing folder."""
    _need(path, flag, what, folder=True)


def need_output_dir(path: str | None, flag: str = "--output-dir") -> None:
    """Raise UsageError when the output folder (when given), or the nearest of its parents that exists, is a file
    or cannot be written: the run would fail when it saves, after all its work. A folder that does not exist yet is
    created."""
    if path is None:
        return
    for p in (Path(path), *Path(path).absolute().parents):
        if p.exists():
            where = "" if p == Path(path) else f"{p} "
            if not p.is_dir():
                raise UsageError(f"{flag} {path}: {where}is a file, not a folder; pass a folder (it is created when "
                                 "missing)")
            if not os.access(p, os.W_OK | os.X_OK):
                raise UsageError(f"{flag} {path}: {where}is not writable; pass a folder this user can write to")
            return


def data_error(command: str, error: object, what: str) -> int:
    """A bad data file found by run() (read there, not in check(), when reading it needs the method's own reader):
    one line on stderr, as check()'s errors are printed, and exit code 2 for `main` to return."""
    print(f"tpo-fast {command}: error: {error}; {what}", file=sys.stderr)
    return 2


def need_at_least(**minimums: tuple[float | None, float]) -> None:
    """Raise UsageError for the first flag below its minimum: `need_at_least(batch_size=(a.batch_size, 1))` checks
    `--batch-size` >= 1. A value of None (an unset optional flag) passes; NaN fails."""
    for name, (value, minimum) in minimums.items():
        if value is not None and not value >= minimum:
            flag = "--" + name.replace("_", "-")
            what = "a number " if value != value else ""  # NaN: not below the minimum, no number at all
            raise UsageError(f"{flag} {value}: must be {what}>= {minimum:g}; pass a value in range")


def need_seed(seed: int) -> None:
    """Raise UsageError unless `--seed` is one NumPy takes (the Hugging Face Trainer seeds NumPy with it): 0 to
    2**32 - 1."""
    if not 0 <= seed < 2**32:
        raise UsageError(f"--seed {seed}: must be in [0, 2**32 - 1] (NumPy's seed range); pass a seed in range, e.g. 0")


def need_learning_rate(lr: float, example: str) -> None:
    """Raise UsageError unless `--lr` is a finite number > 0 (0 would save the untrained model); `example` is the
    command's default, named in the hint."""
    if not 0 < lr < math.inf:
        raise UsageError(f"--lr {lr}: must be a finite number > 0; pass a learning rate, e.g. {example}")


def need_backend(backend: str, cpu: bool = False) -> None:
    """Raise UsageError when `--backend` cannot run where the command runs (CUDA when there is one, unless `cpu`):
    triton without CUDA or the interpreter (TRITON_INTERPRET=1). Imports torch only for triton."""
    if backend != "triton":
        return
    import torch

    from tpo_fast.ops.token_logprobs import resolve_backend

    device = torch.device("cpu" if cpu or not torch.cuda.is_available() else "cuda")
    need_valid(f"--backend {backend}" + (" --cpu" if cpu else ""), lambda: resolve_backend(backend, device))


def need_valid(given: str, check: Callable[[], object], what: str | None = None) -> None:
    """Raise UsageError when the library's own validator refuses a flag's value, so that each rule is written once:
    `check()` runs it, `given` is the flag and value as passed (what is wrong), the validator's message says why, and
    `what` what to pass instead (None: the validator's message says it)."""
    try:
        check()
    except (TypeError, ValueError) as e:
        raise UsageError(f"{given}: {e}" + (f"; {what}" if what else "")) from None


PROMPTS_HELP = ".json or .jsonl file of {image, prompt} records"


def add_prompt_run_arguments(p: argparse.ArgumentParser, *, output_help: str, batch_help: str) -> None:
    """The flags of the subcommands that generate from prompts (csr, fisao)."""
    add_run_arguments(p, output_help=output_help, lr=1e-6, batch_size=2, seed=0, batch_help=batch_help)
    p.add_argument("--prompts", required=True, metavar="FILE", help=PROMPTS_HELP)


def check_prompt_run(a: argparse.Namespace) -> None:
    need_model(a.model)
    need_output_dir(a.output_dir)
    need_learning_rate(a.lr, "1e-6")
    need_seed(a.seed)
    need_backend(a.backend)
    need_file(a.prompts, "--prompts", f"pass a {PROMPTS_HELP}")
    need_dir(a.image_folder, "--image-folder", "pass the folder that the prompts' image paths are relative to")


def need_model(path: str, flag: str = "--model", kind: str = "a LLaVA model and its processor") -> None:
    """A local model folder: exists and holds a config.json (from_pretrained would try the hub otherwise)."""
    what = f"pass a local folder saved with save_pretrained holding {kind} (nothing is downloaded)"
    if flag == "--model":
        what += f"; {DEMO_HINT}"
    need_dir(path, flag, what)
    config = Path(path) / "config.json"
    if not config.is_file():
        raise UsageError(f"{flag} {path}: no config.json in this folder; {what}")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8-sig")).get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):  # unreadable, not JSON, or not a JSON object
        raise UsageError(f"{flag} {path}: its config.json is not a JSON object (a damaged or partial save); "
                         f"{what}") from None
    expected = {"--model": ("llava", "a LLaVA one (LlavaForConditionalGeneration)"),
                "--clip": ("clip", "a CLIP one (CLIPModel)")}.get(flag)
    if expected and isinstance(model_type, str) and expected[0] not in model_type:
        raise UsageError(f"{flag} {path}: its config.json is a {model_type!r} model, not {expected[1]}; {what}")


_CHECKPOINT = re.compile(r"^checkpoint-\d+$")


def need_checkpoint(resume: str | bool | None, output_dir: str) -> Path | None:
    """`--resume` alone needs a checkpoint-N folder in the output folder; `--resume DIR` a checkpoint there. Returns
    the checkpoint the run goes on from (alone: the highest N, as the Hugging Face Trainer picks), or None."""
    if resume is None:
        return None
    if resume is True:
        out = Path(output_dir)
        found = [p for p in out.iterdir() if _CHECKPOINT.match(p.name) and p.is_dir()] if out.is_dir() else []
        if not found:
            raise UsageError(f"--resume: no checkpoint-N folder in --output-dir {output_dir}; "
                             "drop --resume to start a new run, or pass --resume CHECKPOINT_DIR")
        return max(found, key=lambda p: int(p.name.split("-")[1]))
    what = "pass a checkpoint-N folder written by an earlier run, or --resume alone for the last one in --output-dir"
    need_dir(resume, "--resume", what)
    if not (Path(resume) / "trainer_state.json").is_file():
        raise UsageError(f"--resume {resume}: not a checkpoint (no trainer_state.json); {what}")
    return Path(resume)


def read_prompt_records(a: argparse.Namespace, command: str) -> list | None:
    """The `--prompts` records (`tpo_fast.methods.csr.read_prompts`: every image must exist), or None after one line
    on stderr when the file is bad; read before the model is loaded."""
    from tpo_fast.methods.csr import read_prompts

    try:
        return read_prompts(a.prompts, a.image_folder)
    except ValueError as e:
        data_error(command, e, f"pass a {PROMPTS_HELP} whose images exist (relative to --image-folder)")
        return None


def load_model(path: str):
    """(model, processor) from a checked local folder; the model on CUDA when there is one."""
    import torch
    from transformers import AutoProcessor

    from tpo_fast.trainer.trainer import load_llava

    model = load_llava(path)
    return (model.to("cuda") if torch.cuda.is_available() else model), AutoProcessor.from_pretrained(path)
