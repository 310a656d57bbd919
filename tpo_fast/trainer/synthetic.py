"""A synthetic preference set of simple shapes and colours, generated on the fly (no download).

Each image is one coloured shape on a light background. The chosen caption names the true colour
and shape; the rejected one names a colour or a shape that is not in the image (a hallucination),
the shape of RLHF-V / POVID pairs.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "middle")
QUESTIONS = ("what is in the image ?", "describe the image .", "what do you see ?")


def draw_shape(shape: str, colour: str, position: str, size: int = 56) -> Image.Image:
    """One `size` x `size` RGB image of a `colour` `shape` at `position`."""
    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    r = size // 4
    cx, cy = {"left": (r + 2, size // 2), "right": (size - r - 2, size // 2), "top": (size // 2, r + 2),
              "bottom": (size // 2, size - r - 2), "middle": (size // 2, size // 2)}[position]
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def vocabulary() -> list[str]:
    """Every word the synthetic prompts and captions use (for the tiny word-level tokenizer)."""
    words = set(COLOURS) | set(SHAPES) | set(POSITIONS) | {"a", "on", "the", "there", "is", "in", "image", "?", "."}
    for q in QUESTIONS:
        words.update(q.split())
    return sorted(words)


@dataclass(frozen=True)
class Scene:
    """One generated image: its file name, what is in it, and its preference pairs (image-relative)."""

    name: str
    colour: str
    shape: str
    position: str
    pairs: tuple[dict[str, str], ...]


def shapes_scenes(num_images: int = 48, pairs_per_image: int = 1, seed: int = 0) -> list[Scene]:
    """The scenes `make_shapes_dataset` draws: the same for the same arguments, on any machine."""
    rng = random.Random(seed)
    scenes = []
    for i in range(num_images):
        colour, shape, position = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(POSITIONS)
        name = f"{i:04d}_{colour}_{shape}.png"
        pairs = []
        for _ in range(pairs_per_image):
            if rng.random() < 0.5:
                wrong = f"a {rng.choice([c for c in COLOURS if c != colour])} {shape}"
            else:
                wrong = f"a {colour} {rng.choice([s for s in SHAPES if s != shape])}"
            pairs.append({
                "image": name,
                "question": rng.choice(QUESTIONS),
                "chosen": f"there is a {colour} {shape} on the {position} .",
                "rejected": f"there is {wrong} on the {position} .",
            })
        scenes.append(Scene(name, colour, shape, position, tuple(pairs)))
    return scenes


def make_shapes_dataset(
    folder: str | os.PathLike, num_images: int = 48, pairs_per_image: int = 1, image_size: int = 56, seed: int = 0
) -> Path:
    """Write `num_images` PNG images under `folder/images` and their pairs to `folder/pairs.jsonl`.

    Returns the path of the JSONL file; its image paths are relative to `folder/images`.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for scene in shapes_scenes(num_images, pairs_per_image, seed):
            draw_shape(scene.shape, scene.colour, scene.position, image_size).save(folder / "images" / scene.name)
            for pair in scene.pairs:
                f.write(json.dumps(pair) + "\n")
    return path
