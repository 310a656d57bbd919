"""Object hallucination on images whose contents are known: POPE-style yes/no probing and CHAIR-style
caption rates (docs/eval.md).

An object is a colour and a shape ("red circle"); the vocabulary is the shapes world of
`tpo_fast.trainer.synthetic` plus every colour and shape the object file names.

POPE (Li et al., arXiv 2305.10355): for every image, its objects (up to `max_positives`) are asked
about, and as many absent objects, chosen by one of three rules:

- `random`: drawn uniformly from the absent objects;
- `popular`: the absent objects that are in the most images of the file;
- `adversarial`: the absent objects that co-occur most (in the same image, over the file) with the
  image's objects. Ties (all of them where every image holds one object) go first to an object that
  shares a colour or a shape with one in the image (the near miss: what a rejected shapes-world caption
  names), then to the more frequent one; ties that remain, in all three rules, in a seeded random order.

The model answers yes or no by one of two readings (`answer_mode`):

- `"yes-no"`: the question ("is there a red circle in the image ?") in the LLaVA-1.5 prompt; yes when
  the next-token probability of "yes" (summed over its spellings "yes", "Yes", "YES" that are one token)
  exceeds that of "no". No text is generated, so no parsing of free answers, and a tiny model that never
  learnt to stop still answers.
- `"statement"`: for tokenizers without a "yes" and a "no" token (the demo's word-level one): the
  answer "there is a {object}" to "what is in the image ?" is scored for every object of the
  vocabulary (the sum of its tokens' log-probabilities); yes when the object's softmax share over the
  vocabulary exceeds the uniform share 1/K. A model that sees one red circle and puts its mass there
  says yes to it and no to the rest; one that has learnt nothing says yes to about half.

`"auto"` picks "yes-no" when the tokenizer has both words as single tokens, else "statement".

CHAIR (Rohrbach et al., arXiv 1809.02156), on greedy captions of the first `captions` images: every
distinct colour word and shape word a caption names is a mention (plural shapes count; a word repeated
is one mention, as CHAIR counts the set of objects a caption names), hallucinated when no
object in the image has that colour or shape; a colour word followed by a shape word also names a
pair, hallucinated when that exact object is absent (a "red square" next to a red circle and a blue
square). CHAIR_i = hallucinated word mentions / word mentions; CHAIR_pairs the same over pairs;
CHAIR_s = captions with any hallucinated word or pair / captions. Captions that name nothing are
counted (`silent`) and make no mention; a rate over zero mentions is 0.

The object file (.json list or .jsonl, one record per image; paths relative to the image folder):

    {"image": "0000.png", "objects": ["red circle", "blue square"]}

an object is "colour shape" or {"colour": ..., "shape": ...} ("color" also reads); `make_eval_set`
writes such a file with its images.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
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


def _parse_object(value: Any, where: str) -> Obj:
    if isinstance(value, dict):
        colour, shape = value.get("colour", value.get("color")), value.get("shape")
        if isinstance(colour, str) and isinstance(shape, str) and colour.strip() and shape.strip():
            return Obj(colour.strip().lower(), shape.strip().lower())
    elif isinstance(value, str) and len(value.split()) == 2:
        colour, shape = value.lower().split()
        return Obj(colour, shape)
    raise ValueError(f"{where}: an object is \"colour shape\" or {{\"colour\": ..., \"shape\": ...}}, got {value!r}")


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
        positives = present if len(present) <= max_positives else sorted(rng.sample(present, max_positives))
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


@dataclass(frozen=True)
class EvalOptions:
    """What `evaluate` asks and how.

    splits: POPE negative rules to run. captions: images (the first ones) captioned for CHAIR; 0 skips it.
    max_new_tokens: greedy caption length. question / statement / statement_prompt / caption_prompt:
    the texts (`{object}` is "colour shape"). answer_mode: "auto", "yes-no" or "statement" (module
    docstring). max_positives: objects asked about per image. batch_size: yes/no probes per forward.
    backend: of the log-prob primitive (statement scoring).
    """

    splits: tuple[str, ...] = SPLITS
    captions: int = 16
    max_new_tokens: int = 16
    question: str = "is there a {object} in the image ?"
    statement_prompt: str = "what is in the image ?"
    statement: str = "there is a {object}"
    caption_prompt: str = "describe the image ."
    answer_mode: str = "auto"
    max_positives: int = 3
    seed: int = 0
    batch_size: int = 16
    backend: str = "auto"

    def __post_init__(self):
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ValueError(f"splits must be some of {', '.join(SPLITS)}, got {', '.join(self.splits) or 'none'}")
        if self.answer_mode not in ANSWER_MODES:
            raise ValueError(f"answer_mode must be one of {', '.join(ANSWER_MODES)}, got {self.answer_mode!r}")
        for name, low in (("captions", 0), ("max_new_tokens", 1), ("max_positives", 1), ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


@dataclass
class HallucinationReport:
    """POPE metrics per split, CHAIR rates, the captions, and how the answers were read."""

    answer_mode: str
    images: int
    pope: dict[str, dict[str, float]]
    chair: dict[str, float] | None
    captions: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The report as text: one POPE row per split, then the CHAIR line."""
        return compare_tables({"": self})


POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def compare_tables(reports: dict[str, HallucinationReport]) -> str:
    """Text table of one or more reports of the same probes, each cell "first -> second -> ..." in the
    order of `reports` (e.g. {"before": ..., "after": ...})."""
    first = next(iter(reports.values()))
    names = " -> ".join(n for n in reports if n)
    width = max(9, 9 * len(reports) - 4)
    lines = [f"POPE on {first.images} images, {first.answer_mode} answers" + (f" ({names})" if names else ""),
             f"{'split':<12} " + " ".join(f"{m:>{width}}" for m in POPE_METRICS)]
    for split in first.pope:
        cells = (" -> ".join(f"{r.pope[split][m]:.3f}" for r in reports.values()) for m in POPE_METRICS)
        lines.append(f"{split:<12} " + " ".join(f"{c:>{width}}" for c in cells))
    if first.chair is not None:
        rates = {k: " -> ".join(f"{r.chair[k]:.3f}" if isinstance(r.chair[k], float) else str(r.chair[k])
                                for r in reports.values()) for k in first.chair}
        lines.append(f"CHAIR on {first.chair['captions']} greedy captions: CHAIR_i {rates['chair_i']} "
                     f"(colour/shape words named: {rates['mentions']}), CHAIR_pairs {rates['chair_pairs']} "
                     f"(pairs: {rates['pair_mentions']}), CHAIR_s {rates['chair_s']}, "
                     f"captions naming nothing: {rates['silent']}")
    return "\n".join(lines)


def answer_token_ids(tokenizer: Any) -> tuple[list[int], list[int]] | None:
    """The single-token ids of "yes" and of "no" (their spellings), or None when either has none."""
    def ids(spellings: Sequence[str]) -> list[int]:
        found = []
        for word in spellings:
            toks = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(toks) == 1 and toks[0] != tokenizer.unk_token_id and toks[0] not in found:
                found.append(toks[0])
        return found

    yes, no = ids(YES_SPELLINGS), ids(NO_SPELLINGS)
    return (yes, no) if yes and no and not set(yes) & set(no) else None


def _images(items: Sequence[ImageObjects]) -> list[Image.Image]:
    from tpo_fast.trainer.data import open_image

    return [open_image(item.image, None) for item in items]


@torch.no_grad()
def yes_no_answers(
    model: torch.nn.Module, processor: Any, images: Sequence[Image.Image], questions: Sequence[str],
    ids: tuple[list[int], list[int]], batch_size: int = 16,
) -> list[bool]:
    """Yes when p(yes) > p(no) at the first answer token, for each (image, question); left-padded batches
    with positions counted from each row's first real token, so a row's answer does not depend on its batch."""
    from tpo_fast.methods.fisao import format_prompt

    tokenizer, device = processor.tokenizer, next(model.parameters()).device
    yes, no = (torch.tensor(i, device=device) for i in ids)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers = []
    try:
        for s in range(0, len(questions), batch_size):
            texts = [format_prompt(processor, q) for q in questions[s:s + batch_size]]
            inputs = processor(text=texts, images=list(images[s:s + batch_size]), padding=True,
                               return_tensors="pt").to(device)
            positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            logits = model(**inputs, position_ids=positions, logits_to_keep=1).logits[:, -1].float()
            probs = logits.softmax(-1)
            answers += (probs[:, yes].sum(-1) > probs[:, no].sum(-1)).tolist()
    finally:
        tokenizer.padding_side = side
    return answers


@torch.no_grad()
def statement_shares(
    model: torch.nn.Module, processor: Any, image: Image.Image, prompt: str, statements: Sequence[str],
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax over `statements` of their summed token log-probabilities as answers to `prompt` on
    `image`, fp32 (K,)."""
    from tpo_fast.methods.csr import sentence_log_probs
    from tpo_fast.methods.fisao import format_prompt

    device = next(model.parameters()).device
    inputs = processor(text=[format_prompt(processor, prompt)], images=[image], return_tensors="pt").to(device)
    cands = [processor.tokenizer(" " + s, add_special_tokens=False)["input_ids"] for s in statements]
    mean = sentence_log_probs(model, inputs["input_ids"][0], inputs["pixel_values"], [], cands, backend)
    return (mean * torch.tensor([len(c) for c in cands], dtype=torch.float32)).softmax(-1)


@torch.no_grad()
def greedy_captions(
    model: torch.nn.Module, processor: Any, images: Sequence[Image.Image], prompt: str, max_new_tokens: int
) -> list[str]:
    from tpo_fast.methods.fisao import rollout

    out = rollout(model, processor, images, [prompt] * len(images), max_new_tokens=max_new_tokens, do_sample=False)
    return [processor.tokenizer.decode(r, skip_special_tokens=True).strip() for r in out.response_ids]


def evaluate(
    model: torch.nn.Module, processor: Any, items: Sequence[ImageObjects], options: EvalOptions = EvalOptions()
) -> HallucinationReport:
    """POPE on every split of `options` and CHAIR on the first `options.captions` images, in eval mode (the
    model's mode is restored after)."""
    ids = answer_token_ids(processor.tokenizer)
    mode = options.answer_mode
    if mode == "auto":
        mode = "yes-no" if ids is not None else "statement"
    elif mode == "yes-no" and ids is None:
        raise ValueError("answer_mode='yes-no' needs \"yes\" and \"no\" to be single tokens of the tokenizer; "
                         "use answer_mode='statement' (or 'auto')")
    colours, shapes = vocabulary(items)
    candidates = [Obj(c, s) for c in colours for s in shapes]
    images = _images(items)
    was_training = model.training
    model.eval()
    try:
        probes = {split: pope_probes(items, split, seed=options.seed, max_positives=options.max_positives,
                                     candidates=candidates) for split in options.splits}
        asked = sorted({(p.image, p.obj) for ps in probes.values() for p in ps})
        if mode == "yes-no":
            said = yes_no_answers(model, processor, [images[i] for i, _ in asked],
                                  [options.question.format(object=o.name) for _, o in asked], ids, options.batch_size)
            answer = dict(zip(asked, said, strict=True))
        else:
            answer = {}
            statements = [options.statement.format(object=o.name) for o in candidates]
            for i in sorted({i for i, _ in asked}):
                share = statement_shares(model, processor, images[i], options.statement_prompt, statements,
                                         options.backend)
                answer.update({(i, o): bool(share[k] > 1 / len(candidates)) for k, o in enumerate(candidates)})
        pope = {split: pope_metrics([p.present for p in ps], [answer[p.image, p.obj] for p in ps])
                for split, ps in probes.items()}
        chair_rates, captions = None, []
        n = min(options.captions, len(items))
        if n:
            texts = greedy_captions(model, processor, images[:n], options.caption_prompt, options.max_new_tokens)
            chair_rates = chair(texts, [items[i].objects for i in range(n)], colours, shapes)
            captions = [{"image": items[i].image, "objects": sorted(o.name for o in items[i].objects),
                         "caption": texts[i]} for i in range(n)]
    finally:
        model.train(was_training)
    return HallucinationReport(mode, len(items), pope, chair_rates, captions)



def demo_before_after(
    model_dir: str | os.PathLike, eval_folder: str | os.PathLike, *, seed: int = 0, num_images: int = 48,
    options: EvalOptions = EvalOptions(captions=8),
) -> dict[str, HallucinationReport]:
    """{"before": ..., "after": ...}: the demo's model (`tpo_fast.trainer.demo.run_demo`) before training,
    rebuilt from `seed` as the demo builds it, and after, loaded from `model_dir`; both on `num_images`
    new shapes-world images (seed `seed + 1`) written to `eval_folder`."""
    from transformers import AutoProcessor

    from tpo_fast.trainer.tiny import build_tiny_llava
    from tpo_fast.trainer.trainer import load_llava

    processor = AutoProcessor.from_pretrained(model_dir)
    trained = load_llava(str(model_dir))
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    initial = build_tiny_llava(len(processor.tokenizer), image_token_id=image_token_id, seed=seed)
    shapes = {k: tuple(v.shape) for k, v in initial.state_dict().items()}
    if shapes != {k: tuple(v.shape) for k, v in trained.state_dict().items()}:
        raise RuntimeError(f"{model_dir} is not the demo's tiny model (its weights differ in names or shapes from "
                           "build_tiny_llava's); evaluate it with `tpo-fast eval` instead")
    items = load_objects(make_eval_set(eval_folder, num_images, seed=seed + 1), Path(eval_folder) / "images")
    return {"before": evaluate(initial, processor, items, options),
            "after": evaluate(trained, processor, items, options)}
