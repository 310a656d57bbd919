"""`tpo-fast demo`: TPO on a tiny random LLaVA and generated shapes, on CPU; keeps the model and data, and
reports object hallucination (POPE, CHAIR) on new shapes-world images before and after training."""

from __future__ import annotations

import argparse
import os

from tpo_fast.cli._common import OBJECTIVES, need_at_least, need_output_dir, need_seed

# The demo logs every 20 steps; shorter runs log twice (first and last window), the least its summary reads.
LOGGING_STEPS = 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=200,
                   help="training steps of 8 pairs (well under a second each on CPU); at least 2")
    p.add_argument("--objective", choices=OBJECTIVES, default="tpo", help="tpo, dpo or povid")
    p.add_argument("--output-dir", "--output", dest="output_dir", default=None, metavar="DIR",
                   help="keep the trained model (DIR/model) and the data (DIR/data) here (none: a temporary folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the data and the noise")
    p.add_argument("--eval-images", type=int, default=48,
                   help="new shapes-world images (written to DIR/eval) for the before/after hallucination check; "
                        "0 skips it")
    p.add_argument("--eval-captions", type=int, default=8, help="greedy captions of those for the CHAIR rates")


def check(a: argparse.Namespace) -> None:
    need_at_least(steps=(a.steps, 2), eval_images=(a.eval_images, 0), eval_captions=(a.eval_captions, 0))
    need_seed(a.seed)
    need_output_dir(a.output_dir)


def run(a: argparse.Namespace) -> int:
    from tpo_fast.trainer.demo import run_demo

    logging_steps = min(LOGGING_STEPS, a.steps // 2)  # at least two logged windows: the before and the after
    r = run_demo(a.output_dir, max_steps=a.steps, objective=a.objective, seed=a.seed, logging_steps=logging_steps)
    print(f"\n{'step':>6} {'loss':>8} {'reward acc':>11} {'margin':>8}")
    for h in r.history:
        print(f"{h['step']:>6} {h['loss']:>8.4f} {h['rewards/accuracies']:>11.3f} {h['rewards/margins']:>8.3f}")
    print(f"\nloss {r.first_loss:.4f} -> {r.last_loss:.4f}, "
          f"reward accuracy {r.first_accuracy:.3f} -> {r.last_accuracy:.3f}")
    if a.eval_images > 0:
        from tpo_fast.methods.hallucination import EvalOptions, compare_tables, demo_before_after

        eval_dir = os.path.join(os.path.dirname(r.model_dir), "eval")
        reports = demo_before_after(r.model_dir, eval_dir, seed=a.seed, num_images=a.eval_images,
                                    options=EvalOptions(captions=a.eval_captions))
        print(f"\nobject hallucination on {a.eval_images} new images (docs/eval.md):")
        print(compare_tables(reports))
        for c in reports["after"].captions[:3]:
            print(f"  after, {os.path.basename(c['image'])}: {c['caption']!r}")
        print(f"again: tpo-fast eval --model {r.model_dir} --image-folder {eval_dir}/images "
              f"--objects {eval_dir}/objects.jsonl --captions {a.eval_captions}")
    print(f"\nmodel and processor: {r.model_dir}\npairs: {r.data_file}\nimages: {r.image_folder}")
    print(f"go on with: tpo-fast train --model {r.model_dir} --data {r.data_file} --image-folder {r.image_folder} "
          "--output-dir run --max-steps 20 --lr 1e-3")
    return 0
