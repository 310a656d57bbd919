"""The shapes world (tpo_fast/trainer/synthetic.py), the demo's data: each picture against its geometry written out
here, captions whose rejected side is a real hallucination, the word list the tiny tokenizer is built from, and the
files `make_shapes_dataset` writes."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image, ImageChops

from tpo_fast.trainer.synthetic import (
    COLOURS,
    POSITIONS,
    QUESTIONS,
    SHAPES,
    draw_shape,
    make_shapes_dataset,
    shapes_scenes,
    vocabulary,
)

BACKGROUND = (245, 245, 240)
# centre of the shape at each position for a 56-pixel image: a quarter of the side (14) as radius, 2 pixels of margin
CENTRES_56 = {"left": (16, 28), "right": (40, 28), "top": (28, 16), "bottom": (28, 40), "middle": (28, 28)}


def _filled(image: Image.Image) -> set[tuple[int, int]]:
    w, h = image.size
    return {(x, y) for x in range(w) for y in range(h) if image.getpixel((x, y)) != BACKGROUND}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("position", POSITIONS)
def test_each_shape_sits_at_its_position(shape, position):
    image = draw_shape(shape, "blue", position)
    assert image.size == (56, 56) and image.mode == "RGB"
    cx, cy = CENTRES_56[position]
    r = 14
    blank = Image.new("RGB", (56, 56), BACKGROUND)
    assert ImageChops.difference(image, blank).getbbox() == (cx - r, cy - r, cx + r + 1, cy + r + 1)
    filled = _filled(image)
    assert {image.getpixel(p) for p in filled} == {COLOURS["blue"]}  # one colour, the shape's
    if shape == "square":
        assert filled == {(x, y) for x in range(cx - r, cx + r + 1) for y in range(cy - r, cy + r + 1)}
    elif shape == "circle":  # every pixel well inside the circle, none well outside
        near = {(x, y) for x in range(56) for y in range(56) if abs(math.hypot(x - cx, y - cy) - r) <= 1}
        inside = {(x, y) for x in range(56) for y in range(56) if math.hypot(x - cx, y - cy) < r - 1}
        assert inside <= filled and filled <= inside | near
        assert (cx - r + 1, cy - r + 1) not in filled  # the box's corner is outside the circle
    else:  # apex up: the base row full, the top corners empty, each row at most as wide as the one below
        assert {(x, cy + r) for x in range(cx - r, cx + r + 1)} <= filled
        assert (cx - r, cy - r) not in filled and (cx + r, cy - r) not in filled and (cx, cy - r) in filled
        width = [sum((x, y) in filled for x in range(56)) for y in range(cy - r, cy + r + 1)]
        assert width == sorted(width)


def test_a_smaller_picture_scales_the_geometry():
    image = draw_shape("square", "red", "right", size=28)  # radius 7, centre (28 - 7 - 2, 14)
    assert _filled(image) == {(x, y) for x in range(12, 27) for y in range(7, 22)}
    assert image.getpixel((0, 0)) == BACKGROUND and image.getpixel((19, 14)) == COLOURS["red"]
    # an odd side: whole pixels, radius 31 // 4 = 7, centres at 31 // 2 = 15
    centres = {"left": (9, 15), "right": (22, 15), "top": (15, 9), "bottom": (15, 22), "middle": (15, 15)}
    for position, (cx, cy) in centres.items():
        filled = _filled(draw_shape("square", "green", position, size=31))
        assert filled == {(x, y) for x in range(cx - 7, cx + 8) for y in range(cy - 7, cy + 8)}, position


@pytest.mark.parametrize("seed", [0, 1])
def test_rejected_captions_name_what_is_not_in_the_picture(seed):
    scenes = shapes_scenes(120, pairs_per_image=3, seed=seed)
    assert [s.name for s in scenes] == [f"{i:04d}_{s.colour}_{s.shape}.png" for i, s in enumerate(scenes)]
    swaps = {"colour": 0, "shape": 0}
    for s in scenes:
        assert s.colour in COLOURS and s.shape in SHAPES and s.position in POSITIONS and len(s.pairs) == 3
        for pair in s.pairs:
            assert pair["image"] == s.name and pair["question"] in QUESTIONS
            assert pair["chosen"] == f"there is a {s.colour} {s.shape} on the {s.position} ."
            start, end = "there is a ", f" on the {s.position} ."
            assert pair["rejected"].startswith(start) and pair["rejected"].endswith(end)
            colour, shape = pair["rejected"][len(start):-len(end)].split()
            assert (colour, shape) != (s.colour, s.shape) and colour in COLOURS and shape in SHAPES
            assert colour == s.colour or shape == s.shape  # one word wrong: a near miss
            swaps["colour" if colour != s.colour else "shape"] += 1
    assert swaps["colour"] > 100 and swaps["shape"] > 100  # both kinds of hallucination, about half each
    assert shapes_scenes(120, 3, seed) == scenes and shapes_scenes(120, 3, seed + 2) != scenes


def test_the_vocabulary_is_every_word_the_data_uses():
    used = set()
    for s in shapes_scenes(400, pairs_per_image=2, seed=5):
        for pair in s.pairs:
            for text in (pair["question"], pair["chosen"], pair["rejected"]):
                used.update(text.split())
    assert vocabulary() == sorted(used)


def test_the_dataset_files(tmp_path):
    path = make_shapes_dataset(tmp_path / "d", num_images=5, pairs_per_image=2, image_size=28, seed=3)
    scenes = shapes_scenes(5, 2, 3)
    assert path == tmp_path / "d" / "pairs.jsonl"
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == [
        p for s in scenes for p in s.pairs]
    assert sorted(p.name for p in (tmp_path / "d" / "images").iterdir()) == [s.name for s in scenes]
    for s in scenes:
        saved = Image.open(tmp_path / "d" / "images" / s.name)
        assert saved.tobytes() == draw_shape(s.shape, s.colour, s.position, 28).tobytes()
    make_shapes_dataset(tmp_path / "d", num_images=5, pairs_per_image=2, image_size=28, seed=3)  # again: rewritten
    # the defaults: 48 pictures of 56 pixels, one pair each, seed 0
    path = make_shapes_dataset(tmp_path / "defaults")
    assert [json.loads(line) for line in path.read_text().splitlines()] == [p for s in shapes_scenes() for p in s.pairs]
    assert len(shapes_scenes()) == 48 and shapes_scenes() == shapes_scenes(48, 1, 0)
    assert Image.open(tmp_path / "defaults" / "images" / shapes_scenes()[0].name).size == (56, 56)
