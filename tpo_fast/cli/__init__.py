"""The `tpo-fast` command line: every subcommand registered in one table, `SUBCOMMANDS`.

The CLI is the top layer (docs/architecture.md): it imports the trainer and the recipes, and
nothing in tpo_fast imports it. Each subcommand module (`train.py`, `demo.py`, `csr.py`, `fisao.py`)
gives `add_arguments(parser)`, `check(args)` (paths and flag combinations, before anything heavy is
imported: a problem is one line on stderr and exit code 2) and `run(args) -> exit code`; adding a
subcommand is adding its module and one row below.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys

from tpo_fast.cli import csr, demo, fisao, train
from tpo_fast.cli import eval as eval_cmd
from tpo_fast.cli._common import HelpFormatter, Subcommand, UsageError

SUBCOMMANDS: dict[str, Subcommand] = {
    "train": Subcommand("TPO, DPO or POVID training of a local LLaVA model on a file of preference pairs",
                        train.add_arguments, train.run, train.check, epilog=train.EPILOG),
    "povid": Subcommand("POVID stage 2: `train --objective povid` (DPO vs the hallucinated answer and vs the "
                        "noisy-image argmax)", functools.partial(train.add_arguments, objective="povid"),
                        train.run, train.check),
    "demo": Subcommand("train a tiny random LLaVA on generated shapes, on CPU, no download; keeps model and data",
                       demo.add_arguments, demo.run, demo.check),
    "csr": Subcommand("calibrated self-rewarding: sentence beam search + CLIP reward + DPO, iterated",
                      csr.add_arguments, csr.run, csr.check),
    "fisao": Subcommand("FiSAO: vision-encoder token rewards + clipped token-level policy gradient",
                        fisao.add_arguments, fisao.run, fisao.check),
    "eval": Subcommand("object hallucination on images with known objects: POPE yes/no probing and CHAIR captions",
                       eval_cmd.add_arguments, eval_cmd.run, eval_cmd.check, epilog=eval_cmd.EPILOG),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpo-fast", description="Token-level preference optimization (TPO, arXiv 2412.14487) and its peers",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=cmd.description, description=cmd.description, epilog=cmd.epilog,
                           formatter_class=HelpFormatter)
        cmd.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, check, run; returns the exit code (2: a bad command line, said in one line on stderr)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    cmd = SUBCOMMANDS[args.command]
    try:
        cmd.check(args)
    except UsageError as e:
        print(f"tpo-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    code = cmd.run(args)
    end_distributed()
    return code


def end_distributed() -> None:
    """Destroy the default process group a run under torchrun left behind (the Hugging Face Trainer never does), while
    the interpreter is whole: left to the interpreter's teardown, a gloo group's worker threads can still hold work
    whose tensors need the interpreter, and the rank aborts after a run that succeeded ("terminate called without
    an active exception", exit -6, which torchrun reports as a failed run). A no-op where torch was never imported
    or no group is up."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
