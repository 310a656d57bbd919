"""`tpo-fast eval`: object hallucination of a LLaVA model on images whose objects are known (POPE, CHAIR)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tpo_fast.cli._common import (
    BACKENDS,
    UsageError,
    data_error,
    need_backend,
    need_dir,
    need_file,
    need_model,
    need_valid,
)

# The POPE splits of tpo_fast.methods.hallucination.SPLITS, named here so that a bad --split is found
# without importing torch (tests/test_eval.py checks that the two agree).
SPLITS = ("random", "popular", "adversarial")
OBJECTS_HELP = ".json or .jsonl file, one {\"image\": PATH, \"objects\": [\"red circle\", ...]} record per image"

EPILOG = """\
example, on CPU, after `tpo-fast demo --output-dir demo` (which also writes new shapes-world images to demo/eval):
  tpo-fast eval --model demo/model --image-folder demo/eval/images --objects demo/eval/objects.jsonl --captions 8

The answers are read from next-token probabilities: yes when p("yes") > p("no") after the question;
for a tokenizer without those words (the demo's), the share of "there is a {object}" among every
colour x shape of the vocabulary, yes above the uniform share. See docs/eval.md.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="local folder of a LLaVA model and its processor (save_pretrained; nothing is downloaded)")
    p.add_argument("--image-folder", "--images", dest="image_folder", required=True, metavar="DIR",
                   help="folder that the object file's image paths are relative to")
    p.add_argument("--objects", required=True, metavar="FILE", help=OBJECTS_HELP)
    p.add_argument("--split", default=",".join(SPLITS),
                   help="comma-separated POPE negative rules: random, popular, adversarial")
    p.add_argument("--captions", type=int, default=16,
                   help="greedy captions (of the first images) for the CHAIR rates; 0 skips them")
    p.add_argument("--max-new-tokens", type=int, default=16, help="longest caption in tokens")
    p.add_argument("--answer-mode", choices=("auto", "yes-no", "statement"), default="auto",
                   help="how a probe is answered: 'yes-no' compares p(yes) and p(no) after the question, "
                        "'statement' the share of 'there is a {object}' among all objects, 'auto' takes "
                        "'yes-no' when the tokenizer has both words")
    p.add_argument("--question", default="is there a {object} in the image ?",
                   help="yes/no question template; {object} is 'colour shape'")
    p.add_argument("--caption-prompt", default="describe the image .", help="prompt of the captions")
    p.add_argument("--backend", "--loss-backend", dest="backend", default="auto", choices=BACKENDS,
                   help="backend of the log-prob primitive (statement answers)")
    p.add_argument("--batch-size", type=int, default=16, help="yes/no probes per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the random negatives and of tie-breaks")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the report (metrics, captions) as JSON here (none: print only)")


def _splits(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def check(a: argparse.Namespace) -> None:
    need_model(a.model)
    need_dir(a.image_folder, "--image-folder", "pass the folder that the object file's image paths are relative to")
    need_file(a.objects, "--objects", f"pass a {OBJECTS_HELP}")
    bad = [s for s in _splits(a.split) if s not in SPLITS]
    if bad or not _splits(a.split):
        raise UsageError(f"--split {a.split}: unknown split {', '.join(bad) or '(none)'}; "
                         f"pass some of {','.join(SPLITS)}")
    need_backend(a.backend)
    if a.captions < 0 or a.max_new_tokens < 1 or a.batch_size < 1:
        raise UsageError("--captions must be >= 0, --max-new-tokens and --batch-size >= 1; pass counts in range")
    if a.json is not None and not Path(a.json).resolve().parent.is_dir():
        raise UsageError(f"--json {a.json}: its folder does not exist; create it or pass a path in an existing one")
    if a.json is not None and Path(a.json).is_dir():
        raise UsageError(f"--json {a.json}: is a folder, not a file; pass a file path for the report, e.g. "
                         f"{Path(a.json) / 'report.json'}")
    if a.json is not None:  # found now, not when the report is written after the whole evaluation
        target = Path(a.json) if Path(a.json).exists() else Path(a.json).resolve().parent
        if not os.access(target, os.W_OK):
            raise UsageError(f"--json {a.json}: {'' if target == Path(a.json) else f'{target} '}is not writable; "
                             "pass a path this user can write to")
    from tpo_fast.methods.hallucination import check_object_template  # EvalOptions' own rule for the question

    need_valid(f"--question {a.question!r}", lambda: check_object_template("question", a.question),
               "pass a yes/no question with {object} in it, e.g. 'is there a {object} in the image ?'")


def run(a: argparse.Namespace) -> int:
    from tpo_fast.cli._common import load_model
    from tpo_fast.methods.hallucination import EvalOptions, answer_token_ids, evaluate, load_objects

    try:
        items = load_objects(a.objects, a.image_folder)
    except ValueError as e:
        return data_error("eval", e, "fix the record or pass another --objects file")
    options = EvalOptions(splits=_splits(a.split), captions=a.captions, max_new_tokens=a.max_new_tokens,
                          question=a.question, caption_prompt=a.caption_prompt, answer_mode=a.answer_mode,
                          seed=a.seed, batch_size=a.batch_size, backend=a.backend)
    model, processor = load_model(a.model)
    if a.answer_mode == "yes-no" and answer_token_ids(processor.tokenizer) is None:
        print("tpo-fast eval: error: --answer-mode yes-no: \"yes\" and \"no\" are not single tokens of this "
              "model's tokenizer; pass --answer-mode statement (or auto)", file=sys.stderr)
        return 2
    report = evaluate(model, processor, items, options)
    print(report.table())
    for c in report.captions[:4]:
        print(f"  {Path(c['image']).name} [{', '.join(c['objects'])}]: {c['caption']!r}")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, **report.to_dict()}, indent=1), encoding="utf-8")
        print(f"report: {a.json}")
    return 0
