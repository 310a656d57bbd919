"""Write the shipped example data of `examples/`: shapes-world images and their records in each format.

    python examples/make_examples.py                 # rewrites the files next to this script
    python examples/make_examples.py --output DIR    # somewhere else

Deterministic: the same files on every run (tests/test_docs.py checks that the shipped ones are
what this script writes). The scenes are those of `tpo_fast.trainer.synthetic` (a coloured shape
on a light background; the chosen answer is true, the rejected one names a colour or shape that is
not in the image). The accelerate / DeepSpeed / FSDP2 configs beside them are written by hand.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tpo_fast.trainer.synthetic import COLOURS, SHAPES, draw_shape, shapes_scenes

NUM_IMAGES = 16
SEED = 6  # a seed whose first scenes differ (seed 0 starts with three yellow squares)
IMAGE_SIZE = 56
NUM_PROMPTS = 4  # CSR and FiSAO run a beam search or rollout per prompt: keep the example short


def _hallucinated(scene) -> str:
    """POVID's rejected answer: the true sentence plus an object that is not there (co-occurrence)."""
    other_colour = sorted(c for c in COLOURS if c != scene.colour)[len(scene.name) % 3]
    other_shape = sorted(s for s in SHAPES if s != scene.shape)[len(scene.name) % 2]
    where = "top" if scene.position != "top" else "bottom"
    return f"there is a {scene.colour} {scene.shape} on the {scene.position} . there is a {other_colour} " \
           f"{other_shape} on the {where} ."


def write_examples(out: Path) -> list[Path]:
    """Write every generated example file under `out`; returns their paths."""
    scenes = shapes_scenes(NUM_IMAGES, pairs_per_image=1, seed=SEED)
    (out / "images").mkdir(parents=True, exist_ok=True)
    written = []
    for scene in scenes:
        path = out / "images" / scene.name
        draw_shape(scene.shape, scene.colour, scene.position, IMAGE_SIZE).save(path)
        written.append(path)

    def dump(name: str, text: str) -> None:
        (out / name).write_text(text, encoding="utf-8")
        written.append(out / name)

    # RLHF-V / RLAIF-V field names, one JSON object per line.
    dump("rlhf-v.jsonl", "".join(
        json.dumps({"idx": i, "ds_name": "shapes-world", "image_path": s.name, "question": p["question"],
                    "chosen": p["chosen"], "rejected": p["rejected"]}) + "\n"
        for i, s in enumerate(scenes) for p in s.pairs
    ))
    # POVID: one JSON list; the rejected answer is the ground truth with a hallucinated object injected.
    dump("povid.json", json.dumps([
        {"id": f"shapes-{i:04d}", "image": s.name, "prompt": "describe the image .", "chosen": s.pairs[0]["chosen"],
         "rejected": _hallucinated(s)}
        for i, s in enumerate(scenes)
    ], indent=1) + "\n")
    # CSR and FiSAO: prompts only; the model writes the answers.
    dump("prompts.jsonl", "".join(
        json.dumps({"image": s.name, "prompt": "describe the image ."}) + "\n" for s in scenes[:NUM_PROMPTS]
    ))
    # FiSAO: the objects that are and are not in each image, to fit the verifier's thresholds.
    dump("calibration.json", json.dumps([
        {"image": s.name, "correct": [s.colour, s.shape],
         "hallucinated": [c for c in sorted(COLOURS) if c != s.colour][:1] + [h for h in SHAPES if h != s.shape][:1]}
        for s in scenes[:NUM_PROMPTS]
    ], indent=1) + "\n")
    dump("objects.txt", "\n".join(sorted(COLOURS) + list(SHAPES)) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent,
                        help="folder to write into (default: the folder of this script)")
    out = parser.parse_args(argv).output
    paths = write_examples(out)
    print(f"wrote {len(paths)} files under {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
