"""The hallucination check's data side: object lists, POPE probes and metrics, CHAIR on captions.

No model here: `tpo_fast.methods.hallucination` asks the model and re-exports these names.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from tpo_fast.trainer.synthetic import COLOURS, SHAPES, draw_shape, shapes_scenes

SPLITS = ("random", "popular", "adversarial")
ANSWER_MODES = ("auto", "yes-no", "statement")
YES_SPELLINGS = ("yes", "Yes", "YES")
NO_SPELLINGS = ("no", "No", "NO")


class Obj(NamedTuple):
    """One object: a colour and a shape."""

    colour: str
    shape: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class ImageObjects:
    """One image (a path) and the objects in it."""

    image: str
    objects: frozenset[Obj]


# What CHAIR reads as one word of a caption (`caption_mentions`): a colour or a shape must be one such word.
_CHAIR_WORD = re.compile(r"[a-z]+")


def _parse_object(value: Any, where: str) -> Obj:
    obj = None
    if isinstance(value, dict):
        colour, shape = value.get("colour", value.get("color")), value.get("shape")
        if isinstance(colour, str) and isinstance(shape, str) and colour.strip() and shape.strip():
            obj = Obj(colour.strip().lower(), shape.strip().lower())
    elif isinstance(value, str) and len(value.split()) == 2:
        obj = Obj(*value.lower().split())
    if obj is None:
        raise ValueError(f"{where}: an object is \"colour shape\" or {{\"colour\": ..., \"shape\": ...}}, "
                         f"got {value!r}")
    # CHAIR splits captions into runs of a-z: "dark red" or "light-blue" could never be matched, and their "red" or
    # "blue" would be counted as hallucinated colours; "r2d2" would never be seen at all.
    bad = [w for w in obj if not _CHAIR_WORD.fullmatch(w)]
    if bad:
        raise ValueError(f"{where}: an object's colour and shape must each be one word of the letters a-z (CHAIR reads "
                         f"captions as such words), got {bad[0]!r} in {value!r}")
    return obj


def load_objects(path: str | os.PathLike, image_folder: str | os.PathLike) -> list[ImageObjects]:
    """The records of an object file (.json or .jsonl: `{"image", "objects"}`), image paths resolved
    against `image_folder`; a bad record raises ValueError naming the file and the record's index."""
    from tpo_fast.trainer.data import read_records

    items = []
    for i, record in enumerate(read_records(path)):
        where = f"{path}: record #{i}"
        if not isinstance(record, dict) or "__error__" in record:
            raise ValueError(f"{where}: {record.get('__error__') if isinstance(record, dict) else 'not an object'}")
        image, objects = record.get("image"), record.get("objects")
        if not isinstance(image, str) or not isinstance(objects, list):
            raise ValueError(f"{where}: needs \"image\" (a path) and \"objects\" (a list), got keys {sorted(record)}")
        full = Path(image) if Path(image).is_absolute() else Path(image_folder) / image
        if not full.is_file():
            raise ValueError(f"{where}: image {full} not found; image paths are relative to the image folder")
        items.append(ImageObjects(str(full), frozenset(_parse_object(o, where) for o in objects)))
    if not items:
        raise ValueError(f"{path}: no records; one {{\"image\", \"objects\"}} record per image")
    return items


def make_eval_set(
    folder: str | os.PathLike, num_images: int = 48, *, seed: int = 1, max_objects: int = 1, image_size: int = 56
) -> Path:
    """Write `num_images` shapes-world images to `folder/images` and their objects to `folder/objects.jsonl`
    (returned). One object per image: the training distribution of the demo (`shapes_scenes`, another
    seed). `max_objects` > 1: 1 to `max_objects` distinct objects, one per quadrant of a 2 x 2 grid."""
    if not 1 <= max_objects <= 4:
        raise ValueError(f"max_objects must be 1 to 4 (one per quadrant), got {max_objects}")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    every = [Obj(c, s) for c in COLOURS for s in SHAPES]
    records = []
    for i, scene in enumerate(shapes_scenes(num_images, seed=seed)):
        if max_objects == 1:
            objects = [Obj(scene.colour, scene.shape)]
            image = draw_shape(scene.shape, scene.colour, scene.position, image_size)
        else:
            objects = rng.sample(every, rng.randint(1, max_objects))
            half = image_size // 2
            image = Image.new("RGB", (2 * half, 2 * half), (245, 245, 240))
            for obj, corner in zip(objects, rng.sample(range(4), len(objects)), strict=True):
                tile = draw_shape(obj.shape, obj.colour, "middle", half)
                image.paste(tile, ((corner % 2) * half, (corner // 2) * half))
        name = f"{i:04d}_" + "_".join(f"{o.colour}_{o.shape}" for o in objects) + ".png"
        image.save(folder / "images" / name)
        records.append({"image": name, "objects": [o.name for o in objects]})
    path = folder / "objects.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def vocabulary(items: Iterable[ImageObjects] = ()) -> tuple[list[str], list[str]]:
    """(colours, shapes): the shapes world's and every one the items name, sorted."""
    colours, shapes = set(COLOURS), set(SHAPES)
    for item in items:
        colours.update(o.colour for o in item.objects)
        shapes.update(o.shape for o in item.objects)
    return sorted(colours), sorted(shapes)


@dataclass(frozen=True)
class Probe:
    """One POPE question: image `image` (an index into the items), object `obj`, and whether it is there."""

    image: int
    obj: Obj
    present: bool


def _ranked(candidates: Sequence[Obj], key, rng: random.Random) -> list[Obj]:
    """`candidates` by ascending `key`, exact ties in a seeded random order."""
    shuffled = list(candidates)
    rng.shuffle(shuffled)
    return sorted(shuffled, key=key)


def pope_probes(
    items: Sequence[ImageObjects], split: str, *, seed: int = 0, max_positives: int = 3,
    candidates: Sequence[Obj] | None = None,
) -> list[Probe]:
    """The probes of one split: per image its objects (at most `max_positives`, drawn when more), then as
    many absent ones from `candidates` (default: every colour x shape of `vocabulary(items)`) by the
    split's rule (module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if candidates is None:
        colours, shapes = vocabulary(items)
        candidates = [Obj(c, s) for c in colours for s in shapes]
    freq = Counter(o for item in items for o in item.objects)
    cooc = Counter((a, b) for item in items for a in item.objects for b in item.objects if a != b)
    rng = random.Random(f"{seed}-{split}")
    probes = []
    for i, item in enumerate(items):
        present = sorted(item.objects)
        # The same present objects in every split (POPE: only the absent ones follow the split's rule), drawn
        # from a generator of the image alone, so that recall compares across splits.
        positives = present if len(present) <= max_positives else sorted(
            random.Random(f"{seed}-positives-{i}").sample(present, max_positives))
        absent = [o for o in sorted(candidates) if o not in item.objects]
        k = min(len(positives), len(absent))
        if split == "random":
            negatives = rng.sample(absent, k)
        elif split == "popular":
            negatives = _ranked(absent, lambda o: -freq[o], rng)[:k]
        else:
            negatives = _ranked(absent, lambda o, present=present: (
                -sum(cooc[p, o] for p in present),
                -any(o.colour == p.colour or o.shape == p.shape for p in present),
                -freq[o],
            ), rng)[:k]
        probes += [Probe(i, o, True) for o in positives] + [Probe(i, o, False) for o in negatives]
    return probes


def pope_metrics(truth: Sequence[bool], answers: Sequence[bool]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (yes is the positive class) and the share of yes answers, with the
    confusion counts; precision is 0 when nothing was answered yes, F1 0 when precision + recall is 0."""
    if len(truth) != len(answers):
        raise ValueError(f"truth and answers must have the same length, got {len(truth)} and {len(answers)}")
    pairs = list(zip(truth, answers, strict=True))
    tp = sum(bool(t and a) for t, a in pairs)
    fp = sum(bool(a and not t) for t, a in pairs)
    fn = sum(bool(t and not a) for t, a in pairs)
    tn = len(truth) - tp - fp - fn
    n = max(len(truth), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "n": len(truth), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def _singular(word: str, shapes: set[str]) -> str:
    for stem in (word[:-2], word[:-1]) if word.endswith("es") else (word[:-1],) if word.endswith("s") else ():
        if stem in shapes:
            return stem
    return word


def caption_mentions(caption: str, colours: Iterable[str], shapes: Iterable[str]) -> tuple[list[str], list[Obj]]:
    """The distinct colour and shape words a caption names, and the distinct pairs it names (a colour word
    followed by a shape word), in order of first mention: a word said twice is one mention, as in CHAIR."""
    colours, shapes = set(colours), set(shapes)
    words = [_singular(w, shapes) for w in re.findall(r"[a-z]+", caption.lower())]
    named = [w for w in words if w in colours or w in shapes]
    pairs = [Obj(a, b) for a, b in zip(words[:-1], words[1:], strict=True) if a in colours and b in shapes]
    return list(dict.fromkeys(named)), list(dict.fromkeys(pairs))


def chair(
    captions: Sequence[str], objects: Sequence[Iterable[Obj]], colours: Iterable[str] = tuple(COLOURS),
    shapes: Iterable[str] = SHAPES,
) -> dict[str, float]:
    """CHAIR_i, CHAIR_pairs and CHAIR_s of `captions` against the objects of their images (module docstring)."""
    if len(captions) != len(objects):
        raise ValueError(f"one object list per caption: got {len(captions)} captions and {len(objects)} lists")
    colours, shapes = set(colours), set(shapes)
    words = bad_words = pairs = bad_pairs = bad_captions = silent = 0
    for caption, present in zip(captions, objects, strict=True):
        present = set(present)
        named, named_pairs = caption_mentions(caption, colours, shapes)
        there = {o.colour for o in present} | {o.shape for o in present}
        wrong = sum(w not in there for w in named) + sum(p not in present for p in named_pairs)
        words += len(named)
        bad_words += sum(w not in there for w in named)
        pairs += len(named_pairs)
        bad_pairs += sum(p not in present for p in named_pairs)
        bad_captions += wrong > 0
        silent += not named
    return {"chair_i": bad_words / words if words else 0.0, "chair_pairs": bad_pairs / pairs if pairs else 0.0,
            "chair_s": bad_captions / len(captions) if captions else 0.0, "mentions": words, "pair_mentions": pairs,
            "captions": len(captions), "silent": silent}
