"""`tpo-fast demo`: TPO on a tiny random LLaVA and generated shapes, on CPU; keeps the model and data."""

from __future__ import annotations

import argparse

from tpo_fast.cli._common import OBJECTIVES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=200, help="training steps of 8 pairs (well under a second each on CPU)")
    p.add_argument("--objective", choices=OBJECTIVES, default="tpo", help="tpo, dpo or povid")
    p.add_argument("--output-dir", "--output", dest="output_dir", default=None, metavar="DIR",
                   help="keep the trained model (DIR/model) and the data (DIR/data) here (none: a temporary folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the data and the noise")


def run(a: argparse.Namespace) -> int:
    from tpo_fast.trainer.demo import run_demo

    r = run_demo(a.output_dir, max_steps=a.steps, objective=a.objective, seed=a.seed)
    print(f"\n{'step':>6} {'loss':>8} {'reward acc':>11} {'margin':>8}")
    for h in r.history:
        print(f"{h['step']:>6} {h['loss']:>8.4f} {h['rewards/accuracies']:>11.3f} {h['rewards/margins']:>8.3f}")
    print(f"\nloss {r.first_loss:.4f} -> {r.last_loss:.4f}, "
          f"reward accuracy {r.first_accuracy:.3f} -> {r.last_accuracy:.3f}")
    print(f"\nmodel and processor: {r.model_dir}\npairs: {r.data_file}\nimages: {r.image_folder}")
    print(f"go on with: tpo-fast train --model {r.model_dir} --data {r.data_file} --image-folder {r.image_folder} "
          "--output-dir run --max-steps 20 --lr 1e-3")
    return 0
