"""`tpo-fast fisao`: roll out, reward object tokens with the vision-encoder verifier, clipped policy-gradient update."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tpo_fast.cli._common import (
    UsageError,
    add_prompt_run_arguments,
    check_prompt_run,
    need_at_least,
    need_file,
    need_valid,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_prompt_run_arguments(p, output_help="output folder: the trained model and its processor",
                             batch_help="prompts per rollout and update")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="JSON list of {image, correct: [words], hallucinated: [words]} to fit the thresholds")
    p.add_argument("--low", type=float, default=None,
                   help="verifier threshold: similarity of a hallucinated object (reward -1); with --high, without "
                        "--calibration")
    p.add_argument("--high", type=float, default=None,
                   help="verifier threshold: similarity of a present object (reward +1); with --low, without "
                        "--calibration")
    p.add_argument("--objects", default=None, metavar="FILE",
                   help="file of object words, whitespace-separated (none: the COCO categories)")
    p.add_argument("--reward-mode", choices=["linear", "step"], default="linear",
                   help="object-token reward: linear between the thresholds, or step (+1 / 0 / -1)")
    p.add_argument("--iterations", type=int, default=1, help="passes over the prompts")
    p.add_argument("--ppo-epochs", type=int, default=1, help="updates per rollout")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens sampled per rollout")
    p.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip range of the probability ratio")
    p.add_argument("--kl-coef", type=float, default=0.05, help="weight of the KL to the reference")
    p.add_argument("--kl-estimator", choices=["k1", "k2", "k3"], default="k3", help="per-token KL estimator")


def read_objects(path: str) -> list[str]:
    """The whitespace-separated object words of an `--objects` file."""
    return Path(path).read_text(encoding="utf-8-sig").split()


CALIBRATION_HINT = "pass a JSON list of {image, correct: [words], hallucinated: [words]} records"


def check(a: argparse.Namespace) -> None:
    check_prompt_run(a)
    need_file(a.calibration, "--calibration", "pass a JSON list of {image, correct, hallucinated} records")
    need_file(a.objects, "--objects", "pass a text file of object words, or leave it out for the COCO categories")
    try:
        words = None if a.objects is None else read_objects(a.objects)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--objects {a.objects}: cannot be read as UTF-8 text ({e}); pass a text file of object "
                         "words") from None
    if words == []:
        raise UsageError(f"--objects {a.objects}: no object words in this file (the verifier would reward no token); "
                         "pass a file of whitespace-separated object words, or leave it out for the COCO categories")
    if a.calibration is None and (a.low is None or a.high is None):
        raise UsageError("the verifier needs calibrated thresholds; pass --calibration FILE, or both --low and --high")
    if a.calibration is not None and (a.low is not None or a.high is not None):
        given = " ".join(f"--{n} {v}" for n, v in (("low", a.low), ("high", a.high)) if v is not None)
        raise UsageError(f"{given} with --calibration: the calibration sets both thresholds (these would be "
                         "ignored); pass --calibration FILE, or --low and --high without it")
    if (a.low is None) != (a.high is None):
        given = f"--low {a.low}" if a.high is None else f"--high {a.high}"
        raise UsageError(f"{given} alone: the verifier takes both thresholds or neither; pass both --low and --high, "
                         "or neither with --calibration FILE")
    if a.low is not None and a.high is not None and not a.low < a.high:
        raise UsageError(f"--low {a.low} --high {a.high}: the hallucinated objects' threshold must be below the "
                         f"present objects'; pass --low < --high")
    need_at_least(batch_size=(a.batch_size, 1), iterations=(a.iterations, 1), ppo_epochs=(a.ppo_epochs, 1),
                  max_new_tokens=(a.max_new_tokens, 1), clip_eps=(a.clip_eps, 0), kl_coef=(a.kl_coef, 0))
    if a.clip_eps == 0:
        raise UsageError("--clip-eps 0: the clipped ratio would never move; pass a clip range > 0, e.g. 0.2")
    check_library_options(a)


def check_library_options(a: argparse.Namespace) -> None:
    """What the verifier and the loss would refuse after the model loaded, by their own checks, and the calibration
    file's records (a small JSON file: read here, its images are opened by run())."""
    from tpo_fast.loss import check_pg_options
    from tpo_fast.methods.fisao import check_thresholds, load_calibration

    if a.low is not None:
        need_valid(f"--low {a.low} --high {a.high}", lambda: check_thresholds(a.low, a.high),
                   "pass finite thresholds, e.g. --low 0.1 --high 0.3")
    need_valid(f"--clip-eps {a.clip_eps} --kl-coef {a.kl_coef}",
               lambda: check_pg_options(a.clip_eps, None, a.kl_coef, a.kl_estimator, "token_mean"),
               "pass --clip-eps in (0, 1), e.g. 0.2, and a finite --kl-coef >= 0, e.g. 0.05")
    if a.calibration is not None:
        need_valid("--calibration", lambda: load_calibration(a.calibration), CALIBRATION_HINT)


def run(a: argparse.Namespace) -> int:
    import copy

    import torch

    from tpo_fast.cli._common import data_error, load_model, read_prompt_records
    from tpo_fast.methods.fisao import VisionEncoderVerifier, fisao_step, load_calibration
    from tpo_fast.trainer.data import open_image

    prompts = read_prompt_records(a, "fisao")
    if prompts is None:
        return 2
    cal = load_calibration(a.calibration) if a.calibration else None  # check() read it; its images before the model
    cal_images = None
    if cal is not None:
        try:
            cal_images = [open_image(c["image"], a.image_folder) for c in cal]
        except (OSError, ValueError) as e:  # missing, unreadable or not an image
            return data_error("fisao", f"--calibration {a.calibration}: {e}",
                              "fix the record's image path (relative to --image-folder) or pass another --calibration")
    torch.manual_seed(a.seed)
    model, processor = load_model(a.model)
    model = model.train()  # from_pretrained returns eval mode; the updates train
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    objects = None
    if a.objects:
        objects = read_objects(a.objects)
    verifier = VisionEncoderVerifier(ref_model, processor.image_processor, objects=objects, low=a.low,
                                     high=a.high, mode=a.reward_mode)
    if cal is not None:
        low, high = verifier.calibrate(cal_images, [c["correct"] for c in cal], [c["hallucinated"] for c in cal],
                                       processor.tokenizer)
        print(f"fisao: calibrated thresholds low={low:.4f} high={high:.4f}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr)
    for it in range(a.iterations):
        for start in range(0, len(prompts), a.batch_size):
            chunk = prompts[start : start + a.batch_size]
            images = [open_image(r["image"], None) for r in chunk]
            metrics = fisao_step(
                model, ref_model, processor, verifier, optimizer, images, [r["prompt"] for r in chunk],
                ppo_epochs=a.ppo_epochs, max_new_tokens=a.max_new_tokens, clip_eps=a.clip_eps,
                kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, backend=a.backend,
            )
            print(json.dumps({"iteration": it + 1, **metrics}))
    model.save_pretrained(a.output_dir)
    processor.save_pretrained(a.output_dir)
    return 0
