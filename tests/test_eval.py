"""The hallucination check (tpo_fast/methods/hallucination.py, `tpo-fast eval`): POPE metrics and CHAIR
rates against hand-counted oracles, POPE's negative rules on a hand-made object list, yes/no answers
that do not depend on the batch, and the command on a tiny model with its one-line errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tpo_fast.cli import main
from tpo_fast.methods.hallucination import (
    SPLITS,
    EvalOptions,
    ImageObjects,
    Obj,
    caption_mentions,
    chair,
    load_objects,
    make_eval_set,
    pope_metrics,
    pope_probes,
)


def O(name: str) -> Obj:  # noqa: E743
    colour, shape = name.split()
    return Obj(colour, shape)


def _items(*images: tuple[str, ...]) -> list[ImageObjects]:
    return [ImageObjects(f"{i}.png", frozenset(O(n) for n in names)) for i, names in enumerate(images)]


# ---- metrics -----------------------------------------------------------------------------------------

def test_pope_metrics_on_counted_answers():
    truth = [True] * 4 + [False] * 6
    answers = [True, True, True, False] + [True, False, False, False, True, False]
    # tp 3, fn 1, fp 2, tn 4
    m = pope_metrics(truth, answers)
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["n"]) == (3, 1, 2, 4, 10)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    assert m["yes_ratio"] == pytest.approx(5 / 10)


def test_pope_metrics_edges():
    never = pope_metrics([True, False, False], [False, False, False])
    assert (never["precision"], never["recall"], never["f1"], never["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)
    assert never["accuracy"] == pytest.approx(2 / 3)
    always = pope_metrics([True, False, False, False], [True] * 4)
    assert (always["precision"], always["recall"], always["yes_ratio"]) == (0.25, 1.0, 1.0)
    with pytest.raises(ValueError, match="same length"):
        pope_metrics([True], [True, False])


def test_chair_on_fixed_captions():
    captions = [
        "there is a red circle on the left .",   # red, circle: fine; pair red circle: fine
        "a blue circle and a blue square",       # blue (once), circle, square: blue and square wrong; both pairs wrong
        "two circles .",                         # circle (plural): fine
        "nothing here",                          # names nothing
        "a red square",                          # red, square each there, but not as one object: the pair is wrong
    ]
    objects = [{O("red circle")}, {O("red circle")}, {O("red circle"), O("green square")}, {O("red circle")},
               {O("red circle"), O("blue square")}]
    c = chair(captions, objects)
    assert (c["mentions"], c["pair_mentions"], c["captions"], c["silent"]) == (8, 4, 5, 1)
    assert c["chair_i"] == pytest.approx(2 / 8)
    assert c["chair_pairs"] == pytest.approx(3 / 4)
    assert c["chair_s"] == pytest.approx(2 / 5)
    assert caption_mentions("Blue blue circles, a blue circle", ["blue"], ["circle"]) == (
        ["blue", "circle"], [O("blue circle")])
    assert chair([], [])["chair_i"] == 0.0


def test_pope_metrics_where_counts_tie_or_vanish():
    """One probe (accuracy over 1, not 2); tp equal to fp and to fn (precision, recall and F1 of 1/2, where a
    difference in place of a sum would read 0); no positive probe at all (recall 0, defined)."""
    one = pope_metrics([True], [True])
    assert (one["accuracy"], one["precision"], one["recall"], one["f1"], one["yes_ratio"]) == (1.0, 1.0, 1.0, 1.0, 1.0)
    tied = pope_metrics([True, True, False], [True, False, True])  # tp 1, fn 1, fp 1, tn 0
    assert (tied["tp"], tied["fn"], tied["fp"], tied["tn"]) == (1, 1, 1, 0)
    assert (tied["precision"], tied["recall"], tied["f1"]) == (0.5, 0.5, 0.5)
    assert tied["accuracy"] == pytest.approx(1 / 3) and tied["yes_ratio"] == pytest.approx(2 / 3)
    none_there = pope_metrics([False, False], [True, False])
    assert (none_there["precision"], none_there["recall"], none_there["f1"], none_there["accuracy"]) == (
        0.0, 0.0, 0.0, 0.5)


def test_chair_counts_a_caption_wrong_by_its_pair_alone_and_defines_empty_rates():
    """A caption whose colour and shape words are each in the image but not as one object is a hallucinating
    caption (CHAIR_s); one that names the object right is not. No pairs named: CHAIR_pairs 0; no captions: 0."""
    two = {O("red circle"), O("blue square")}
    assert chair(["a red circle"], [two])["chair_s"] == 0.0
    wrong_pair = chair(["a red square"], [two])
    assert (wrong_pair["chair_i"], wrong_pair["chair_pairs"], wrong_pair["chair_s"]) == (0.0, 1.0, 1.0)
    words_only = chair(["red and circle"], [two])
    assert (words_only["pair_mentions"], words_only["chair_pairs"], words_only["chair_s"]) == (0, 0.0, 0.0)
    empty = chair([], [])
    assert (empty["chair_i"], empty["chair_pairs"], empty["chair_s"], empty["captions"]) == (0.0, 0.0, 0.0, 0)
    with pytest.raises(ValueError, match=r"^one object list per caption: got 1 captions and 2 lists$"):
        chair(["a red circle"], [two, two])


def test_plural_shape_words_are_named_by_their_singular():
    """"-es" plurals ("boxes": stem without "es") and "-s" plurals ("stars") of any shape vocabulary; a word that
    merely starts with a shape ("start") or ends in "s" without being a plural ("glass") is left as it is."""
    named, pairs = caption_mentions("We START with two red Boxes, three stars, a glass and one BOX .",
                                    ["red"], ["box", "star"])
    assert named == ["red", "box", "star"] and pairs == [O("red box")]
    assert caption_mentions("a start", ["red"], ["star"]) == ([], [])
    assert caption_mentions("circles and squares", [], ["circle", "square"])[0] == ["circle", "square"]


# ---- POPE's negative rules -----------------------------------------------------------------------------

# red circle in 4 images, green triangle in 3, blue square and yellow square in 2 each; red circle and
# blue square co-occur twice, green triangle and yellow square twice.
ITEMS = _items(("red circle", "blue square"), ("red circle", "blue square"), ("green triangle", "yellow square"),
               ("green triangle", "yellow square"), ("green triangle",), ("red circle",), ("red circle",))


def _negatives(split: str, seed: int = 0, items=ITEMS) -> dict[int, list[Obj]]:
    found: dict[int, list[Obj]] = {}
    for p in pope_probes(items, split, seed=seed):
        if not p.present:
            found.setdefault(p.image, []).append(p.obj)
    return found


def test_popular_negatives_are_the_most_frequent_absent_objects():
    neg = _negatives("popular")
    assert neg[0] == [O("green triangle"), O("yellow square")]
    assert neg[4] == [O("red circle")]  # 4 images, the most frequent
    assert neg[5] == [O("green triangle")]  # red circle is there; green triangle (3) next


def test_adversarial_negatives_co_occur_with_the_present_objects():
    neg = _negatives("adversarial")
    assert neg[4] == [O("yellow square")]  # co-occurs twice with green triangle (popular says red circle)
    assert neg[5] == [O("blue square")]  # co-occurs twice with red circle
    # Image 0: nothing co-occurs with red circle or blue square but each other; the near miss (a shared
    # colour or shape) comes first, the most frequent of them: yellow square (a square, in 2 images), not
    # the more frequent but unrelated green triangle.
    assert neg[0][0] == O("yellow square") and O("green triangle") not in neg[0]


def test_random_negatives_are_absent_balanced_and_seeded():
    items = _items(*[("red circle",)] * 30)
    neg = _negatives("random", items=items)
    drawn = {o for objs in neg.values() for o in objs}
    assert O("red circle") not in drawn and len(drawn) > 3  # not stuck on the popular or near ones
    # unrelated objects too (sharing neither colour nor shape), which the adversarial rule ranks after near misses
    assert any(o.colour != "red" and o.shape != "circle" for o in drawn)
    assert neg == _negatives("random", items=items) and neg != _negatives("random", seed=1, items=items)
    for split in SPLITS:
        probes = pope_probes(ITEMS, split)
        assert sum(p.present for p in probes) == sum(not p.present for p in probes) == 11
        assert all((p.obj in ITEMS[p.image].objects) == p.present for p in probes)


def test_the_same_present_objects_in_every_split():
    """POPE's splits differ only in their absent objects: with more objects per image than `max_positives`, each
    split used to draw its own present ones (from the split's generator), so recall did not compare across splits."""
    objects = ("red circle", "blue square", "green triangle", "yellow circle", "red square")
    items = _items(*[objects] * 6)
    for seed in (0, 1, 2):
        asked = {split: sorted((p.image, p.obj) for p in pope_probes(items, split, seed=seed, max_positives=3)
                               if p.present) for split in SPLITS}
        assert asked["random"] == asked["popular"] == asked["adversarial"], (seed, asked)
        assert len(asked["random"]) == 6 * 3
        assert len({frozenset(o for i, o in asked["random"] if i == k) for k in range(6)}) > 1  # drawn per image


def test_at_most_max_positives_per_image_and_bad_split():
    items = _items(("red circle", "blue square", "green triangle", "yellow circle"))
    probes = pope_probes(items, "popular", max_positives=3)
    assert sum(p.present for p in probes) == 3 == sum(not p.present for p in probes)
    with pytest.raises(ValueError, match="split must be one of"):
        pope_probes(items, "hard")
    with pytest.raises(ValueError, match="splits must be some of"):
        EvalOptions(splits=("hard",))


def test_cli_splits_are_the_recipes():
    from tpo_fast.cli.eval import SPLITS as CLI_SPLITS

    assert CLI_SPLITS == SPLITS


def test_pope_probes_default_to_seed_0_and_three_positives():
    items = _items(*[("red circle", "blue square", "green triangle", "yellow circle")] * 4, ("red square",))
    for split in SPLITS:
        assert pope_probes(items, split) == pope_probes(items, split, seed=0, max_positives=3)
        assert pope_probes(items, split) != pope_probes(items, split, seed=1)
        assert sum(p.present for p in pope_probes(items, split)) == 4 * 3 + 1


# ---- data ---------------------------------------------------------------------------------------------

def _eval_set(folder, *args, **kwargs) -> list[ImageObjects]:
    """`make_eval_set(folder, ...)` written, then loaded back with its images."""
    return load_objects(make_eval_set(folder, *args, **kwargs), folder / "images")


def test_eval_set_round_trip_and_bad_records(tmp_path):
    path = make_eval_set(tmp_path / "set", 6, seed=3, max_objects=3)
    items = load_objects(path, tmp_path / "set" / "images")
    assert len(items) == 6 and all(1 <= len(i.objects) <= 3 for i in items)
    again = _eval_set(tmp_path / "again", 6, seed=3, max_objects=3)
    assert [i.objects for i in items] == [i.objects for i in again]
    single = _eval_set(tmp_path / "one", 4, seed=1)
    assert all(len(i.objects) == 1 for i in single)
    bad = tmp_path / "bad.json"
    image = items[0].image
    for records, want in [([{"image": image}], "record #0: needs \"image\""),
                          ([{"image": image, "objects": ["red"]}], "record #0: an object is"),
                          ([{"image": image, "objects": [{"color": "red", "shape": "circle"}]},
                            {"image": "nope.png", "objects": []}], "record #1: image"),
                          ([], "no records")]:
        bad.write_text(json.dumps(records))
        with pytest.raises(ValueError, match=want):
            load_objects(bad, tmp_path)


def test_object_records_accept_either_spelling_and_normalise_case_and_spaces(tmp_path):
    """Objects as "colour shape" strings or {"colour"/"color", "shape"} dicts, lower-cased and stripped; an empty or
    non-string field is refused by name; a record that is not an object, or a line that is not JSON, names its
    index; an absolute image path is kept as it is."""
    path = make_eval_set(tmp_path / "set", 2, seed=1)
    image = str(load_objects(path, tmp_path / "set" / "images")[0].image)  # absolute
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"image": image, "objects": ["Red Circle", {"colour": " Blue ", "shape": "SQUARE "},
                                                             {"color": "green", "shape": "triangle"}]}]))
    (item,) = load_objects(good, tmp_path / "elsewhere")
    assert item.image == image
    assert item.objects == {O("red circle"), O("blue square"), O("green triangle")}
    bad = tmp_path / "bad.json"
    for objects in ([{"colour": " ", "shape": "circle"}], [{"colour": "red", "shape": ""}],
                    [{"colour": 3, "shape": "circle"}], [{"shape": "circle"}], ["red big circle"], [7]):
        bad.write_text(json.dumps([{"image": image, "objects": objects}]))
        with pytest.raises(ValueError, match=r"record #0: an object is \"colour shape\" or "):
            load_objects(bad, tmp_path)
    bad.write_text(json.dumps([{"image": image, "objects": []}, [1, 2]]))
    with pytest.raises(ValueError, match=r"bad\.json: record #1: not an object$"):
        load_objects(bad, tmp_path)
    lines = tmp_path / "bad.jsonl"
    lines.write_text(json.dumps({"image": image, "objects": []}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: record #1: line 2 is not valid JSON"):
        load_objects(lines, tmp_path)


def test_eval_set_scenes_put_each_object_in_its_own_quadrant(tmp_path):
    """max_objects > 1: 1 to max_objects distinct objects of the shapes world, each drawn in the middle of its own
    quadrant (the quadrant's centre has the object's colour), the other quadrants background; one object per image
    at max_objects=1, drawn at image_size; the defaults are 48 images of 56 pixels from seed 1; the folder may be
    written again; max_objects outside 1..4 is refused."""
    from PIL import Image

    from tpo_fast.trainer.synthetic import COLOURS, POSITIONS, SHAPES, draw_shape

    background = (245, 245, 240)
    items = _eval_set(tmp_path / "four", 8, seed=5, max_objects=4)
    assert sorted({len(i.objects) for i in items}) == [1, 2, 3, 4]
    for item in items:
        assert all(o.colour in COLOURS and o.shape in SHAPES for o in item.objects)
        image = Image.open(item.image)
        assert image.size == (56, 56)
        centres = [image.getpixel(((q % 2) * 28 + 14, (q // 2) * 28 + 14)) for q in range(4)]
        assert sorted(c for c in centres if c != background) == sorted(COLOURS[o.colour] for o in item.objects)
        assert centres.count(background) == 4 - len(item.objects)
        # each drawn quadrant is the shapes world's drawing of one of the image's objects, each object once
        tiles = [image.crop(((q % 2) * 28, (q // 2) * 28, (q % 2) * 28 + 28, (q // 2) * 28 + 28)).tobytes()
                 for q in range(4) if centres[q] != background]
        drawn = sorted(draw_shape(o.shape, o.colour, "middle", 28).tobytes() for o in item.objects)
        assert sorted(tiles) == drawn
    two = _eval_set(tmp_path / "two", 8, seed=5, max_objects=2)
    assert sorted({len(i.objects) for i in two}) == [1, 2]
    small = _eval_set(tmp_path / "small", 3, seed=1, image_size=40)
    assert [Image.open(i.image).size for i in small] == [(40, 40)] * 3 and all(len(i.objects) == 1 for i in small)
    for item in small:
        (obj,) = item.objects
        assert obj.colour in COLOURS and obj.shape in SHAPES
        picture = Image.open(item.image).convert("RGB").tobytes()
        assert any(picture == draw_shape(obj.shape, obj.colour, where, 40).tobytes() for where in POSITIONS)
    other_seed = _eval_set(tmp_path / "seed2", 3, seed=2, image_size=40)
    assert [i.objects for i in other_seed] != [i.objects for i in small]
    default = make_eval_set(tmp_path / "default")
    assert default.name == "objects.jsonl"
    assert default.read_text() == make_eval_set(tmp_path / "seeded", 48, seed=1).read_text()
    defaults = load_objects(default, tmp_path / "default" / "images")
    assert len(defaults) == 48 and Image.open(defaults[0].image).size == (56, 56)
    assert make_eval_set(tmp_path / "default").read_text() == default.read_text()  # written again in place
    for bad in (0, 5):
        with pytest.raises(ValueError, match=rf"^max_objects must be 1 to 4 \(one per quadrant\), got {bad}$"):
            make_eval_set(tmp_path / "bad", 2, max_objects=bad)


# ---- on a tiny model ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaVA whose tokenizer knows "yes" and "no", and a set of 6 images of 1 to 2 objects."""
    from tpo_fast.trainer.synthetic import vocabulary
    from tpo_fast.trainer.tiny import save_tiny_llava

    root = tmp_path_factory.mktemp("eval")
    model = save_tiny_llava(root / "model", [*vocabulary(), "yes", "no"])
    objects = make_eval_set(root / "set", 6, seed=2, max_objects=2)
    return root, model, objects


def test_yes_no_answers_do_not_depend_on_the_batch(tiny):
    from tpo_fast.cli._common import load_model
    from tpo_fast.methods.hallucination import answer_token_ids, yes_no_answers
    from tpo_fast.trainer.data import open_image

    root, model_dir, objects = tiny
    model, processor = load_model(str(model_dir))
    ids = answer_token_ids(processor.tokenizer)
    assert ids is not None
    items = load_objects(objects, root / "set" / "images")
    rng = random.Random(0)
    questions = [f"is there a {rng.choice(['red', 'blue'])} circle {'in the image ' * rng.randint(0, 3)}?"
                 for _ in items]
    images = [open_image(i.image, None) for i in items]
    alone = [yes_no_answers(model, processor, [im], [q], ids)[0] for im, q in zip(images, questions, strict=True)]
    assert yes_no_answers(model, processor, images, questions, ids, batch_size=4) == alone
    assert processor.tokenizer.padding_side == "right"  # restored


def test_eval_command_on_a_tiny_model(tiny, tmp_path, capsys):
    root, model_dir, objects = tiny
    out = tmp_path / "report.json"
    argv = ["eval", "--model", str(model_dir), "--images", str(root / "set" / "images"), "--objects", str(objects),
            "--captions", "2", "--max-new-tokens", "4", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "POPE on 6 images, yes-no answers" in text and "CHAIR on 2 greedy captions" in text
    report = json.loads(out.read_text())
    assert report["answer_mode"] == "yes-no" and list(report["pope"]) == list(SPLITS)
    for m in report["pope"].values():
        assert m["tp"] + m["fn"] == m["fp"] + m["tn"] == m["n"] // 2 and 0 <= m["accuracy"] <= 1
    assert len(report["captions"]) == report["chair"]["captions"] == 2
    # the same model read by statements, one split, no captions
    assert main([*argv[:7], "--answer-mode", "statement", "--split", "adversarial", "--captions", "0"]) == 0
    text = capsys.readouterr().out
    assert "statement answers" in text and "adversarial" in text and "random" not in text and "CHAIR" not in text


def test_yes_no_mode_needs_the_words(tmp_path, capsys):
    from tpo_fast.trainer.tiny import save_tiny_llava

    model = save_tiny_llava(tmp_path / "model")  # the demo's vocabulary: no "yes", no "no"
    objects = make_eval_set(tmp_path / "set", 2)
    argv = ["eval", "--model", str(model), "--image-folder", str(tmp_path / "set" / "images"), "--objects",
            str(objects), "--answer-mode", "yes-no", "--captions", "0"]
    capsys.readouterr()  # the saves' progress lines
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1:] == [
        "tpo-fast eval: error: --answer-mode yes-no: \"yes\" and \"no\" are not single tokens of this model's "
        "tokenizer; pass --answer-mode statement (or auto)"]


def test_eval_errors_are_one_line_before_loading(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # passes the check; never loaded below
    images = tmp_path / "images"
    images.mkdir()
    objects = tmp_path / "objects.jsonl"
    objects.write_text(json.dumps({"image": "missing.png", "objects": ["red circle"]}) + "\n")
    ok = ["eval", "--model", str(model), "--image-folder", str(images), "--objects", str(objects)]
    cases = [
        (["eval", "--model", str(tmp_path / "nope"), *ok[3:]], f"--model {tmp_path / 'nope'}: no such folder"),
        ([*ok[:3], "--image-folder", str(tmp_path / "imgs"), *ok[5:]], f"--image-folder {tmp_path / 'imgs'}: no such"),
        ([*ok[:5], "--objects", str(tmp_path / "o.jsonl")], f"--objects {tmp_path / 'o.jsonl'}: no such file"),
        ([*ok, "--split", "random,hard"], "--split random,hard: unknown split hard"),
        ([*ok, "--json", str(tmp_path / "no" / "r.json")], "its folder does not exist"),
        ([*ok, "--captions", "-1"], "--captions must be >= 0"),
        (ok, f"{objects}: record #0: image {images / 'missing.png'} not found; image paths are relative to the image "
             "folder; fix the record or pass another --objects file"),
    ]
    for argv, want in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert captured.out == "" and len(lines) == 1 and lines[0].startswith("tpo-fast eval: error: "), captured
        assert want in lines[0] and "; " in lines[0], (want, lines[0])


def test_eval_refuses_a_report_path_it_cannot_write_before_loading(tmp_path, monkeypatch, capsys):
    """`--json` in a read-only folder, or an existing read-only file, failed after the whole evaluation. `os.access`
    answers as for a user without write permission (tests may run as root)."""
    import tpo_fast.cli.eval as eval_cli

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "images").mkdir()
    objects = tmp_path / "objects.jsonl"
    objects.write_text("")
    ro, ro_file = tmp_path / "ro", tmp_path / "old.json"
    ro.mkdir()
    ro_file.write_text("{}")
    monkeypatch.setattr(eval_cli.os, "access", lambda p, mode: Path(p) not in (ro, ro_file))
    ok = ["eval", "--model", str(model), "--image-folder", str(tmp_path / "images"), "--objects", str(objects)]
    for path, where in ((ro / "r.json", f"{ro} "), (ro_file, "")):
        assert main([*ok, "--json", str(path)]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"tpo-fast eval: error: --json {path}: {where}is not writable; pass a path this user can write to"]


@pytest.mark.slow
def test_demo_before_is_the_demos_initial_model(tmp_path):
    """With a zero learning rate the demo's saved model is its initial one, so the rebuilt "before" model
    must score exactly as the loaded "after" one."""
    from tpo_fast.methods.hallucination import demo_before_after
    from tpo_fast.trainer.demo import run_demo

    r = run_demo(str(tmp_path), max_steps=2, logging_steps=1, num_images=8, batch_size=4, learning_rate=0.0,
                 quiet=True, seed=1)
    reports = demo_before_after(r.model_dir, tmp_path / "eval", seed=1, num_images=6, options=EvalOptions(captions=2))
    assert reports["before"].to_dict() == reports["after"].to_dict()
    assert (reports["before"].answer_mode, reports["before"].images) == ("statement", 6)
    # on new images: the eval set of seed + 1, not the demo's training images (seed)
    written = (tmp_path / "eval" / "objects.jsonl").read_text()
    assert written == make_eval_set(tmp_path / "seed2", 6, seed=2).read_text()
    assert written != make_eval_set(tmp_path / "seed1", 6, seed=1).read_text()


def test_before_and_after_needs_the_demos_model(tmp_path):
    from tpo_fast.methods.hallucination import demo_before_after
    from tpo_fast.trainer.tiny import save_tiny_llava

    model = save_tiny_llava(tmp_path / "model", num_layers=3)  # one layer more than the demo's
    with pytest.raises(RuntimeError, match=f"^{model} is not the demo's tiny model \\(its weights differ in names or "
                                           "shapes from build_tiny_llava's\\); evaluate it with `tpo-fast eval` "
                                           "instead$"):
        demo_before_after(model, tmp_path / "eval", num_images=2)


# ---- evaluate's wiring, with stand-ins for the model's answers ------------------------------------------

class _Tokenizer:
    """Word -> id; unknown words are unk (0); adds a BOS (1) unless told not to, as LLaMA's does."""

    unk_token_id = 0

    def __init__(self, ids: dict[str, int]):
        self.ids = ids

    def __call__(self, word, add_special_tokens=True):
        return {"input_ids": [1] * add_special_tokens + [self.ids.get(word, 0)]}


def _processor(ids: dict[str, int]):
    from types import SimpleNamespace

    return SimpleNamespace(tokenizer=_Tokenizer(ids))


def _scripted_items(folder) -> list[ImageObjects]:
    """Three blank images of sizes 2, 3, 4 (to tell them apart), naming a colour and a shape the shapes world lacks."""
    from PIL import Image

    (folder / "images").mkdir()
    records = [["red circle", "blue hexagon"], ["green square"], ["purple hexagon"]]
    for i in range(3):
        Image.new("RGB", (i + 2, i + 2)).save(folder / "images" / f"{i}.png")
    (folder / "objects.json").write_text(json.dumps([{"image": f"{i}.png", "objects": r}
                                                     for i, r in enumerate(records)]))
    return load_objects(folder / "objects.json", folder / "images")


def test_answer_words_are_single_distinct_tokens_without_special_ones():
    from tpo_fast.methods.hallucination import answer_token_ids

    assert answer_token_ids(_Tokenizer({"yes": 5, "Yes": 6, "no": 7, "NO": 7})) == ([5, 6], [7])
    assert answer_token_ids(_Tokenizer({"yes": 5})) is None  # no "no"
    assert answer_token_ids(_Tokenizer({"no": 5})) is None
    assert answer_token_ids(_Tokenizer({"yes": 5, "no": 5})) is None  # one token for both


def test_evaluate_asks_each_probe_once_and_scores_its_answer(tmp_path, monkeypatch):
    import torch

    from tpo_fast.methods import hallucination
    from tpo_fast.methods.hallucination import evaluate, vocabulary

    items = _scripted_items(tmp_path)
    seen = {}

    def yes_no(model, processor, images, questions, ids, batch_size=16):
        seen.update(training=model.training, sizes=[im.size for im in images], questions=list(questions), ids=ids,
                    batch_size=batch_size)
        return ["red" in q or "hexagon" in q for q in questions]

    def captions(model, processor, images, prompt, max_new_tokens):
        seen.update(captioned=([im.size for im in images], prompt, max_new_tokens, model.training))
        return ["a purple hexagon", "a red square ."]

    monkeypatch.setattr(hallucination, "yes_no_answers", yes_no)
    monkeypatch.setattr(hallucination, "greedy_captions", captions)
    model = torch.nn.Linear(1, 1)
    options = EvalOptions(splits=("adversarial", "random"), captions=2, max_new_tokens=7, question="any {object} ?",
                          caption_prompt="say .", max_positives=1, seed=4, batch_size=3)
    report = evaluate(model, _processor({"yes": 5, "Yes": 6, "no": 7}), items, options)
    colours, shapes = vocabulary(items)
    candidates = [Obj(c, s) for c in colours for s in shapes]
    probes = {s: pope_probes(items, s, seed=4, max_positives=1, candidates=candidates) for s in options.splits}
    for other in (dict(seed=0, max_positives=1), dict(seed=4, max_positives=3)):  # the options change the probes
        assert probes != {s: pope_probes(items, s, candidates=candidates, **other) for s in options.splits}
    asked = sorted({(p.image, p.obj) for ps in probes.values() for p in ps})
    assert seen["questions"] == [f"any {o.name} ?" for _, o in asked]  # each (image, object) once
    assert seen["sizes"] == [(i + 2, i + 2) for i, _ in asked]
    assert (seen["ids"], seen["batch_size"], seen["training"]) == (([5, 6], [7]), 3, False)
    assert model.training  # restored
    assert (report.answer_mode, report.images) == ("yes-no", 3)
    assert list(report.pope) == ["adversarial", "random"]
    for split, ps in probes.items():
        assert report.pope[split] == pope_metrics([p.present for p in ps],
                                                  ["red" in p.obj.name or "hexagon" in p.obj.name for p in ps])
    # CHAIR on the first two images, with the file's own colours and shapes ("purple", "hexagon")
    assert seen["captioned"] == ([(2, 2), (3, 3)], "say .", 7, False)
    assert report.chair == chair(["a purple hexagon", "a red square ."], [items[0].objects, items[1].objects],
                                 colours, shapes)
    assert report.chair != chair(["a purple hexagon", "a red square ."], [items[0].objects, items[1].objects])
    assert report.captions == [
        {"image": items[0].image, "objects": ["blue hexagon", "red circle"], "caption": "a purple hexagon"},
        {"image": items[1].image, "objects": ["green square"], "caption": "a red square ."},
    ]


def test_evaluate_by_statements_says_yes_above_the_uniform_share(tmp_path, monkeypatch):
    import torch

    from tpo_fast.methods import hallucination
    from tpo_fast.methods.hallucination import evaluate, vocabulary

    items = _scripted_items(tmp_path)
    colours, shapes = vocabulary(items)
    candidates = [Obj(c, s) for c in colours for s in shapes]
    k = len(candidates)
    times_uniform = {O("red circle"): 1.5, O("purple hexagon"): 2.5, O("green square"): 1.0}  # 1.0: not above
    calls = []

    def shares(model, processor, image, prompt, statements, backend="auto"):
        calls.append((image.size, prompt, list(statements), backend))
        return torch.tensor([times_uniform.get(o, 0.5) / k for o in candidates])

    monkeypatch.setattr(hallucination, "statement_shares", shares)
    options = EvalOptions(splits=("popular",), captions=0, statement="{object} here", statement_prompt="look .",
                          backend="torch")
    report = evaluate(torch.nn.Linear(1, 1), _processor({"yes": 5}), items, options)  # auto: no "no", statements
    (ps,) = [pope_probes(items, "popular", candidates=candidates)]
    assert calls == [((i + 2, i + 2), "look .", [f"{o.name} here" for o in candidates], "torch")
                     for i in sorted({p.image for p in ps})]
    assert report.answer_mode == "statement" and report.chair is None and report.captions == []
    assert report.pope == {"popular": pope_metrics([p.present for p in ps],
                                                   [times_uniform.get(p.obj, 0) > 1 for p in ps])}
    calls.clear()
    explicit = evaluate(torch.nn.Linear(1, 1), _processor({}), items, EvalOptions(**{**options.__dict__,
                                                                                     "answer_mode": "statement"}))
    assert explicit == report
    with pytest.raises(ValueError, match="^answer_mode='yes-no' needs \"yes\" and \"no\" to be single tokens of the "
                                         "tokenizer; use answer_mode='statement' \\(or 'auto'\\)$"):
        evaluate(torch.nn.Linear(1, 1), _processor({}), items, EvalOptions(answer_mode="yes-no"))


def test_eval_options_are_checked():
    # the question and the statement are filled by .format(object=...): a {obj} or {0} failed mid-evaluation
    for name, bad in (("question", "is there a {obj} ?"), ("question", "is there a {0} ?"), ("question", "any ?"),
                      ("statement", "there is {object} {x}"), ("question", "a {object:d}"), ("question", "a {")):
        with pytest.raises(ValueError) as e:
            EvalOptions(**{name: bad})
        assert str(e.value) == (f"{name} must hold the field {{object}} and no other (it is filled by "
                                f".format(object=...); a literal brace is written {{{{ or }}}}), got {bad!r}")
    EvalOptions(question="{{is}} there a {object} ? {object}", statement="{object}")
    with pytest.raises(ValueError, match="^splits must be some of random, popular, adversarial, got random, hard$"):
        EvalOptions(splits=("random", "hard"))
    with pytest.raises(ValueError, match="^splits must be some of random, popular, adversarial, got none$"):
        EvalOptions(splits=())
    with pytest.raises(ValueError, match="^answer_mode must be one of auto, yes-no, statement, got 'maybe'$"):
        EvalOptions(answer_mode="maybe")
    for name, low in (("captions", 0), ("max_new_tokens", 1), ("max_positives", 1), ("batch_size", 1)):
        EvalOptions(**{name: low})
        for bad in (low - 1, float(low + 1)):
            with pytest.raises(ValueError, match=f"^{name} must be an int >= {low}, got {bad!r}$"):
                EvalOptions(**{name: bad})


def test_report_tables_side_by_side():
    from tpo_fast.methods.hallucination import HallucinationReport, compare_tables

    m = dict(accuracy=0.75, precision=2 / 3, recall=1.0, f1=0.8, yes_ratio=0.75)
    rates = dict(chair_i=0.25, chair_pairs=0.5, chair_s=1 / 3, mentions=8, pair_mentions=4, captions=3, silent=1)
    before = HallucinationReport("yes-no", 4, {"random": m, "adversarial": {**m, "accuracy": 0.5}}, rates)
    after = HallucinationReport("yes-no", 4, {"random": {**m, "f1": 0.125}, "adversarial": m},
                                dict(rates, chair_i=0.0, chair_pairs=0.0, chair_s=0.0, mentions=5, pair_mentions=2,
                                     silent=0))
    assert before.table() == (
        "POPE on 4 images, yes-no answers\n"
        "split         accuracy precision    recall        f1 yes_ratio\n"
        "random           0.750     0.667     1.000     0.800     0.750\n"
        "adversarial      0.500     0.667     1.000     0.800     0.750\n"
        "CHAIR on 3 greedy captions: CHAIR_i 0.250 (colour/shape words named: 8), CHAIR_pairs 0.500 (pairs: 4), "
        "CHAIR_s 0.333, captions naming nothing: 1")
    assert compare_tables({"before": before, "after": after}) == (
        "POPE on 4 images, yes-no answers (before -> after)\n"
        "split              accuracy      precision         recall             f1      yes_ratio\n"
        "random       0.750 -> 0.750 0.667 -> 0.667 1.000 -> 1.000 0.800 -> 0.125 0.750 -> 0.750\n"
        "adversarial  0.500 -> 0.750 0.667 -> 0.667 1.000 -> 1.000 0.800 -> 0.800 0.750 -> 0.750\n"
        "CHAIR on 3 greedy captions: CHAIR_i 0.250 -> 0.000 (colour/shape words named: 8 -> 5), CHAIR_pairs "
        "0.500 -> 0.000 (pairs: 4 -> 2), CHAIR_s 0.333 -> 0.000, captions naming nothing: 1 -> 0")
    assert HallucinationReport("statement", 4, {"random": m}, None).table() == (
        "POPE on 4 images, statement answers\n"
        "split         accuracy precision    recall        f1 yes_ratio\n"
        "random           0.750     0.667     1.000     0.800     0.750")
