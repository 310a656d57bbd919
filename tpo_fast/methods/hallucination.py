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

an object is "colour shape" or {"colour": ..., "shape": ...} ("color" also reads), each one word of the letters
a-z (the words CHAIR reads in a caption: "dark red" or "light-blue" would be read as the colour "red" or "blue",
so they are refused; write "darkred"); `make_eval_set`
writes such a file with its images.
"""

from __future__ import annotations

import os
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tpo_fast.methods.hallucination_data import (  # noqa: F401  (re-exported: the public names of the check)
    ANSWER_MODES,
    NO_SPELLINGS,
    SPLITS,
    YES_SPELLINGS,
    ImageObjects,
    Obj,
    Probe,
    caption_mentions,
    chair,
    load_objects,
    make_eval_set,
    pope_metrics,
    pope_probes,
    vocabulary,
)


def check_object_template(name: str, template: str) -> None:
    """Raise ValueError unless `template` names the object as `{object}` and has no other field: it is filled by
    `template.format(object="red circle")` (a `{obj}` or `{0}` would fail there, mid-evaluation)."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        if fields == {"object"}:
            template.format(object="red circle")
            return
    except (ValueError, KeyError, IndexError, AttributeError):
        pass
    raise ValueError(f"{name} must hold the field {{object}} and no other (it is filled by .format(object=...); a "
                     f"literal brace is written {{{{ or }}}}), got {template!r}")


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
        check_object_template("question", self.question)
        check_object_template("statement", self.statement)
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
    from tpo_fast.trainer.collator import continuation_ids

    device = next(model.parameters()).device
    text = format_prompt(processor, prompt)
    inputs = processor(text=[text], images=[image], return_tensors="pt").to(device)
    text_ids = processor.tokenizer(text, add_special_tokens=True)["input_ids"]
    cands = [continuation_ids(processor.tokenizer, text, text_ids, " " + s) for s in statements]
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
