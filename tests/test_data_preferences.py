"""Preference data: loading JSON / JSONL / parquet, bad records, image corruption, the collator."""

import io
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from tiny_setup import tiny_data, tiny_processor  # noqa: E402

from tpo_fast.trainer.collator import TPOCollator  # noqa: E402
from tpo_fast.trainer.corruption import add_diffusion_noise, diffusion_coefficients  # noqa: E402
from tpo_fast.trainer.data import PreferenceDataset, load_preference_records  # noqa: E402


def _write_images(folder):
    os.makedirs(folder, exist_ok=True)
    Image.new("RGB", (20, 16), (200, 10, 10)).save(os.path.join(folder, "red.png"))
    Image.new("RGB", (20, 16), (10, 10, 200)).save(os.path.join(folder, "blue.png"))
    with open(os.path.join(folder, "broken.png"), "wb") as f:
        f.write(b"not a png")


GOOD = [
    {"image": "red.png", "question": "what colour ?", "chosen": "red", "rejected": "blue"},
    {"image": "blue.png", "prompt": "what colour ?", "chosen": "blue", "rejected": "red"},
]
BAD = [
    {"image": "red.png", "question": "what colour ?", "chosen": "red"},  # 2: no rejected
    {"image": "broken.png", "question": "q", "chosen": "a", "rejected": "b"},  # 3: unreadable image
    {"image": "missing.png", "question": "q", "chosen": "a", "rejected": "b"},  # 4: no such file
    {"image": "red.png", "question": "q", "chosen": "   ", "rejected": "b"},  # 5: empty chosen
    {"question": "q", "chosen": "a", "rejected": "b"},  # 6: no image
]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_load_formats_and_skip_bad_records(tmp_path, fmt, caplog):
    _write_images(tmp_path / "img")
    rows = GOOD + BAD
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        keys = sorted({k for r in rows for k in r})  # from_pylist takes its columns from the first row
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    with caplog.at_level("WARNING", logger="tpo_fast"):
        records, bad = load_preference_records(path, tmp_path / "img", on_bad="skip")
    assert [r["index"] for r in records] == [0, 1]
    assert records[1]["prompt"] == "what colour ?"
    expected = [2, 3, 4, 5, 6] + ([7] if fmt == "jsonl" else [])
    assert [b.index for b in bad] == expected
    reasons = {b.index: b.reason for b in bad}
    assert "missing rejected" in reasons[2] and "unreadable image" in reasons[3]
    assert "unreadable image" in reasons[4] and "empty chosen" in reasons[5] and "missing image" in reasons[6]
    assert "#3" in caplog.text and "skipped" in caplog.text


def test_bad_records_error_lists_every_index(tmp_path):
    _write_images(tmp_path / "img")
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(GOOD + BAD))
    with pytest.raises(ValueError, match=r"5 bad preference record.*#2: .*#6: .*--bad-records skip"):
        load_preference_records(path, tmp_path / "img", on_bad="error")


def _png_bytes(colour) -> bytes:
    """An 8 x 8 PNG of one colour, as inline image bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_inline_image_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"image": {"bytes": _png_bytes((1, 2, 3)), "path": None}, "question": "q", "chosen": "a", "rejected": "b"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    records, bad = load_preference_records(tmp_path / "p.parquet")
    item = PreferenceDataset(records)[0]
    assert not bad and item["image"].getpixel((0, 0)) == (1, 2, 3)


def test_file_vanishing_mid_epoch_is_replaced_not_fatal(tmp_path, caplog):
    _write_images(tmp_path / "img")
    (tmp_path / "p.json").write_text(json.dumps(GOOD))
    ds = PreferenceDataset.from_file(tmp_path / "p.json", tmp_path / "img")
    os.remove(tmp_path / "img" / "red.png")
    with caplog.at_level("WARNING", logger="tpo_fast"):
        item = ds[0]
    assert item["index"] == 1 and "#0 failed to load" in caplog.text
    strict = PreferenceDataset(ds.records, tmp_path / "img", on_bad="error")
    with pytest.raises(RuntimeError, match="record #0 failed to load"):
        strict[0]


def test_diffusion_noise_matches_the_official_formula():
    a, b = diffusion_coefficients(500)
    assert a == pytest.approx(0.86302, abs=1e-5) and b == pytest.approx(0.50517, abs=1e-5)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8))
    x0 = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    official = ((a * x0 + b * eps) * 255).to(torch.int64).remainder(256)  # mul(255).byte(), no clamp
    wrapped = np.asarray(add_diffusion_noise(image, 500, seed=7))
    assert image.size == (11, 9)
    np.testing.assert_array_equal(wrapped, official.numpy().astype(np.uint8))
    clamped = np.asarray(add_diffusion_noise(image, 500, seed=7, overflow="clamp")).astype(np.int64)
    expected = ((a * x0 + b * eps) * 255).clamp(0, 255).to(torch.int64).numpy()
    np.testing.assert_array_equal(clamped, expected)
    assert (wrapped != clamped).mean() > 0.1  # a noticeable share wraps at t=500


def test_seeded_noise_reproduces_and_fresh_noise_does_not(tmp_path):
    ds = tiny_data(str(tmp_path / "d"), num_images=2)
    a, b = np.asarray(ds[0]["corrupted_image"]), np.asarray(ds[0]["corrupted_image"])
    np.testing.assert_array_equal(a, b)
    other = PreferenceDataset(ds.records, ds.image_folder, noise_seed=1)
    assert (np.asarray(other[0]["corrupted_image"]) != a).any()
    fresh = PreferenceDataset(ds.records, ds.image_folder, noise_seed=None)
    assert (np.asarray(fresh[0]["corrupted_image"]) != np.asarray(fresh[0]["corrupted_image"])).any()
    cached = PreferenceDataset(ds.records, ds.image_folder, corrupted_cache_dir=tmp_path / "cache")
    first = np.asarray(cached[0]["corrupted_image"])
    assert len(os.listdir(tmp_path / "cache")) == 1
    np.testing.assert_array_equal(first, a)
    np.testing.assert_array_equal(np.asarray(cached[0]["corrupted_image"]), a)
    with pytest.raises(ValueError, match="needs a seeded noise"):
        PreferenceDataset(ds.records, ds.image_folder, noise_seed=None, corrupted_cache_dir=tmp_path / "c2")


def test_collator_shares_an_image_slot_only_for_the_same_file_and_noise(tmp_path):
    """Two data sets whose folders both hold an image named as the other's: a combined batch must give each
    pair its own image (the slot was keyed by the name as written, so the second pair got the first's)."""
    records = [{"index": 0, "image": "0000.png", "prompt": "what colour ?", "chosen": "red", "rejected": "blue"}]
    for folder, colour in (("a", (200, 10, 10)), ("b", (10, 10, 200))):
        os.makedirs(tmp_path / folder)
        Image.new("RGB", (28, 28), colour).save(tmp_path / folder / "0000.png")
    first = PreferenceDataset(records, str(tmp_path / "a"), noise_seed=0)
    second = PreferenceDataset(records, str(tmp_path / "b"), noise_seed=0)
    collate = TPOCollator(tiny_processor())
    mixed = collate([first[0], torch.utils.data.ConcatDataset([first, second])[1]])
    assert mixed["image_index"].tolist() == [0, 1]
    own = collate([second[0]])
    torch.testing.assert_close(mixed["pixel_values"][1], own["pixel_values"][0], rtol=0, atol=0)
    torch.testing.assert_close(mixed["corrupted_pixel_values"][1], own["corrupted_pixel_values"][0], rtol=0, atol=0)
    assert collate([first[0], first[0]])["image_index"].tolist() == [0, 0]  # the same file and noise: one slot
    other_noise = PreferenceDataset(records, str(tmp_path / "a"), noise_seed=0, noise_step=100)
    assert collate([first[0], other_noise[0]])["image_index"].tolist() == [0, 1]


def test_a_response_with_the_image_placeholder_is_a_bad_record(tmp_path):
    _write_images(tmp_path / "img")
    rows = GOOD + [{"image": "red.png", "question": "q", "chosen": "a <image> b", "rejected": "c"}]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(rows))
    records, bad = load_preference_records(path, tmp_path / "img", on_bad="skip")
    assert [r["index"] for r in records] == [0, 1]
    assert len(bad) == 1 and "the chosen response holds the image placeholder '<image>'" in str(bad)
    # records built in Python skip that check: the collator names the record
    ds = PreferenceDataset([{**GOOD[0], "prompt": "q", "rejected": "x <image>", "index": 7}], tmp_path / "img")
    with pytest.raises(ValueError, match="record #7: the rejected response holds the image token '<image>'"):
        TPOCollator(tiny_processor())([ds[0]])


def test_collator_layout(tmp_path):
    ds = tiny_data(str(tmp_path / "d"), num_images=3)
    proc = tiny_processor()
    collate = TPOCollator(proc)
    items = [ds[0], ds[1], ds[0]]  # pairs 0 and 2 share an image
    batch = collate(items)
    assert batch["input_ids"].shape[0] == 6 and batch["labels"].shape == batch["input_ids"].shape
    assert batch["pixel_values"].shape == (2, 3, 28, 28) == batch["corrupted_pixel_values"].shape
    assert batch["image_index"].tolist() == [0, 1, 0]
    assert batch["index"].tolist() == [0, 1, 0]
    assert not torch.equal(batch["pixel_values"], batch["corrupted_pixel_values"])
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    tok = proc.tokenizer
    for row in range(6):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        assert int((ids == image_id).sum()) == 16  # (28 / 7) ** 2 patches, CLS dropped
        assert (labels[ids == image_id] == -100).all() and (labels[mask == 0] == -100).all()
        response = labels[labels != -100]
        item = items[row % 3]
        text = item["chosen"] if row < 3 else item["rejected"]
        assert response.tolist() == tok(" " + text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        # The labelled positions are one contiguous run right after the prompt.
        pos = (labels != -100).nonzero().squeeze(1)
        assert pos.tolist() == list(range(int(pos[0]), int(pos[-1]) + 1))
        assert ids[int(pos[0]) - 1] == tok.convert_tokens_to_ids(":")  # "... ASSISTANT:" ends the prompt
    # chosen row i and rejected row B + i share the prompt
    for i in range(3):
        start = int((batch["labels"][i] != -100).nonzero()[0])
        assert torch.equal(batch["input_ids"][i, :start], batch["input_ids"][3 + i, :start])


def test_collator_truncates_responses_only(tmp_path):
    ds = tiny_data(str(tmp_path / "d"), num_images=2)
    batch = TPOCollator(tiny_processor(), max_length=30)([ds[0], ds[1]])
    assert batch["input_ids"].shape[1] <= 30
    assert ((batch["labels"] != -100).sum(1) >= 1).all()
    image_id = 4
    assert ((batch["input_ids"] == image_id).sum(1) == 16).all()


def test_file_shapes_and_their_errors(tmp_path):
    """A .json file may wrap its list as {"data": [...]}; a .jsonl file may hold blank lines anywhere, and a line
    that is not JSON is a bad record that names its line; other shapes and file types are refused by name."""
    _write_images(tmp_path / "img")
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": GOOD, "version": 1}))
    assert [r["chosen"] for r in load_preference_records(tmp_path / "wrapped.json", tmp_path / "img")[0]] == [
        "red", "blue"]
    (tmp_path / "p.jsonl").write_text(f"\n{json.dumps(GOOD[0])}\n\n{{oops\n   \n{json.dumps(GOOD[1])}\n")
    records, bad = load_preference_records(tmp_path / "p.jsonl", tmp_path / "img")
    assert [r["chosen"] for r in records] == ["red", "blue"] and [r["index"] for r in records] == [0, 2]
    assert [(b.index, b.reason.split(" (")[0]) for b in bad] == [(1, "line 4 is not valid JSON")]
    (tmp_path / "dict.json").write_text(json.dumps({"records": GOOD}))
    with pytest.raises(ValueError, match=r"dict\.json: a \.json preference file must hold a list of records, "
                                         r"got dict$"):
        load_preference_records(tmp_path / "dict.json")
    (tmp_path / "p.csv").write_text("image,prompt\n")
    with pytest.raises(ValueError, match=r"p\.csv: unsupported preference file type '\.csv'; use \.json, \.jsonl or "
                                         r"\.parquet$"):
        load_preference_records(tmp_path / "p.csv")


def test_a_file_with_a_byte_order_mark_loses_no_record(tmp_path):
    """Editors on Windows write UTF-8 with a byte order mark: the first .jsonl record was a bad one ("Unexpected
    UTF-8 BOM") and a .json file was refused."""
    _write_images(tmp_path / "img")
    (tmp_path / "p.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in GOOD).encode())
    (tmp_path / "p.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode())
    for name in ("p.jsonl", "p.json"):
        records, bad = load_preference_records(tmp_path / name, tmp_path / "img")
        assert [r["chosen"] for r in records] == ["red", "blue"] and not bad, name


def test_image_fields_of_every_shape(tmp_path):
    """An image as a path, a parquet struct with only a path, TRL's one-image list; a list of two images is a bad
    record (one image per pair); a grayscale or RGBA file is loaded as RGB; with check_images=False a missing file
    is only found when the item loads."""
    _write_images(tmp_path / "img")
    Image.new("L", (8, 8), 77).save(tmp_path / "img" / "gray.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(tmp_path / "img" / "alpha.png")
    base = {"question": "q", "chosen": "a", "rejected": "b"}
    rows = [dict(base, image={"bytes": None, "path": "red.png"}), dict(base, images=["blue.png"]),
            dict(base, images=["red.png", "blue.png"]), dict(base, image="gray.png"), dict(base, image="alpha.png")]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    records, bad = load_preference_records(tmp_path / "p.json", tmp_path / "img")
    assert [r["image"] for r in records] == ["red.png", "blue.png", "gray.png", "alpha.png"]
    assert [(b.index, b.reason) for b in bad] == [(2, "2 images; a preference pair has one image (TPO corrupts "
                                                     "that one)")]
    ds = PreferenceDataset(records, tmp_path / "img")
    assert [ds[i]["image"].mode for i in range(4)] == ["RGB"] * 4
    assert ds[2]["image"].getpixel((0, 0)) == (77, 77, 77) and ds[3]["image"].getpixel((0, 0)) == (1, 2, 3)
    (tmp_path / "q.json").write_text(json.dumps([dict(base, image="missing.png"), dict(base, image="red.png")]))
    unchecked, none_bad = load_preference_records(tmp_path / "q.json", tmp_path / "img", check_images=False)
    assert [r["image"] for r in unchecked] == ["missing.png", "red.png"] and not none_bad


def test_noise_options_reach_the_corruption(tmp_path):
    """noise_step and overflow are the ones add_diffusion_noise gets, seeded per image key; from_file passes its
    options on (and on_bad, for the records it loads)."""
    from tpo_fast.trainer.corruption import example_seed

    _write_images(tmp_path / "img")
    (tmp_path / "p.json").write_text(json.dumps(GOOD + BAD[:1]))
    for step, overflow in ((200, "clamp"), (900, "wrap")):
        ds = PreferenceDataset.from_file(tmp_path / "p.json", tmp_path / "img", noise_step=step, noise_seed=3,
                                         overflow=overflow)
        assert (ds.noise_step, ds.noise_seed, ds.overflow, len(ds)) == (step, 3, overflow, 2)
        item = ds[0]
        want = add_diffusion_noise(item["image"], step, seed=example_seed(3, "red.png"), overflow=overflow)
        assert np.array_equal(np.asarray(item["corrupted_image"]), np.asarray(want))
    other = add_diffusion_noise(item["image"], 900, seed=example_seed(3, "red.png"), overflow="clamp")
    assert not np.array_equal(np.asarray(item["corrupted_image"]), np.asarray(other))  # overflow matters here
    with pytest.raises(ValueError, match="1 bad preference record"):
        PreferenceDataset.from_file(tmp_path / "p.json", tmp_path / "img", on_bad="error")


def test_a_broken_record_is_replaced_by_the_next_loadable_one(tmp_path, caplog):
    """Records 1 and 2 of 4 break after loading: record 1 is served by record 3 (the next that loads, not the
    previous one), with a warning naming both; when every record breaks, one error says so."""
    _write_images(tmp_path / "img")
    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "img" / f"{name}.png")
    rows = [{"image": f"{n}.png", "question": "q", "chosen": "a", "rejected": "b"} for n in "abcd"]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    ds = PreferenceDataset.from_file(tmp_path / "p.json", tmp_path / "img")
    os.remove(tmp_path / "img" / "b.png")
    os.remove(tmp_path / "img" / "c.png")
    with caplog.at_level("WARNING", logger="tpo_fast"):
        assert ds[1]["index"] == 3 and ds[2]["index"] == 3
    assert "preference record #1 failed to load (FileNotFoundError: " in caplog.text and "b.png" in caplog.text
    assert "used record #3 in its place" in caplog.text
    for name in "ad":
        os.remove(tmp_path / "img" / f"{name}.png")
    with pytest.raises(RuntimeError, match=r"no preference record can be loaded any more: #0 failed with "
                                           r"FileNotFoundError: .*, and so did every other record"):
        ds[0]


def test_record_indices_and_long_bad_record_lists(tmp_path):
    """An index must be an int >= 0 (not a bool, a string or a negative number), by record position; more than 20
    bad records are listed 20 at a time with the count of the rest."""
    rec = {"image": "red.png", "prompt": "q", "chosen": "a", "rejected": "b"}
    for index in (True, -1, "3", 2.0):
        with pytest.raises(ValueError, match=rf"^record 1 has index {index!r}; an index must be an int >= 0 "):
            PreferenceDataset([rec, dict(rec, index=index)])
    assert [r["index"] for r in PreferenceDataset([dict(rec, index=np.int64(5)), rec]).records] == [5, 1]
    _write_images(tmp_path / "img")
    (tmp_path / "p.json").write_text(json.dumps(GOOD + [BAD[0]] * 25))
    with pytest.raises(ValueError, match=r": 25 bad preference record\(s\): #2: [^#]*(; #\d+: [^#]*){19} \(and 5 "
                                         r"more\)\. Fix them"):
        load_preference_records(tmp_path / "p.json", tmp_path / "img", on_bad="error")
    # exactly 20 are all listed, with no count of the rest; 21 list 20 and count the 21st as "1 more"
    listing = "; ".join(f"#{i}: missing rejected response ('rejected')" for i in range(2, 22))  # records #2..#21
    for n, more in ((20, ""), (21, " (and 1 more)")):
        (tmp_path / "p.json").write_text(json.dumps(GOOD + [BAD[0]] * n))
        with pytest.raises(ValueError, match=re.escape(f": {n} bad preference record(s): {listing}{more}. Fix them")):
            load_preference_records(tmp_path / "p.json", tmp_path / "img", on_bad="error")


def test_relative_paths_without_a_folder_and_inline_bytes_in_the_cache(tmp_path, monkeypatch):
    """Without an image folder a relative path is relative to the working directory. Inline image bytes go
    through the corrupted-image cache (named by their digest; the cache folder and its parents are created) and
    read back the same; fresh noise (noise_seed=None) gives no dedupe key, so no two pairs share its image slot."""
    _write_images(tmp_path / "img")
    monkeypatch.chdir(tmp_path / "img")
    rec = {"image": "red.png", "prompt": "q", "chosen": "a", "rejected": "b"}
    assert PreferenceDataset([rec])[0]["image"].getpixel((0, 0)) == (200, 10, 10)
    cache = tmp_path / "deep" / "cache"
    ds = PreferenceDataset([dict(rec, image=_png_bytes((1, 2, 3)))], corrupted_cache_dir=cache)
    first = np.asarray(ds[0]["corrupted_image"])
    assert len(list(cache.glob("*.png"))) == 1
    assert np.array_equal(np.asarray(ds[0]["corrupted_image"]), first)
    assert ds[0]["dedupe_key"] is not None and PreferenceDataset([rec], noise_seed=None)[0]["dedupe_key"] is None


def test_collator_limits_templates_and_image_slots(tmp_path):
    """max_length: a row that fits exactly is not cut, one token more cuts the longer response to the limit, and a
    prompt that alone fills it keeps one response token; a template needs both '{prompt}' and the image token;
    items without a dedupe key (other datasets) share an image slot by their image key."""
    import copy

    ds = tiny_data(str(tmp_path / "d"), num_images=2)
    proc = tiny_processor()
    full = TPOCollator(proc)([ds[0]])
    lengths = full["attention_mask"].sum(1).tolist()
    prompt = int(((full["labels"][0] == -100) & (full["attention_mask"][0] == 1)).sum())
    longest = max(lengths)
    exact = TPOCollator(proc, max_length=longest)([ds[0]])
    assert torch.equal(exact["input_ids"], full["input_ids"]) and torch.equal(exact["labels"], full["labels"])
    cut = TPOCollator(proc, max_length=longest - 1)([ds[0]])
    assert cut["attention_mask"].sum(1).tolist() == [min(n, longest - 1) for n in lengths]
    tight = TPOCollator(proc, max_length=prompt)([ds[0]])  # the prompt alone fills it
    assert ((tight["labels"] != -100).sum(1) == 1).all()
    for template in ("USER: {prompt} ASSISTANT:", "USER: <image> ASSISTANT:"):
        with pytest.raises(ValueError, match="prompt_template must contain '{prompt}' and the image token '<image>'"):
            TPOCollator(proc, prompt_template=template)
    a, b = copy.copy(ds[0]), copy.copy(ds[1])
    for item in (a, b):
        item.pop("dedupe_key")
    b["image_key"] = a["image_key"]
    assert TPOCollator(proc)([a, b])["image_index"].tolist() == [0, 0]
    b["image_key"] = "another"
    assert TPOCollator(proc)([a, b])["image_index"].tolist() == [0, 1]
    fresh = PreferenceDataset(ds.records, ds.image_folder, noise_seed=None)  # fresh noise: no load shares a slot
    assert TPOCollator(proc)([fresh[0], fresh[0]])["image_index"].tolist() == [0, 1]


def test_a_failing_corrupted_image_cache_keeps_the_record_and_warns_once(tmp_path, monkeypatch, caplog):
    """A damaged cache entry (an empty file) and a cache folder that cannot be written: every record is loaded as
    itself, never replaced by another, with the corrupted image an uncached dataset computes; one warning names
    the cache folder. The damaged entry is written again."""
    import logging

    ds = tiny_data(str(tmp_path / "d"), num_images=2)
    want = [np.asarray(ds[i]["corrupted_image"]) for i in range(2)]
    folder = tmp_path / "cache"
    PreferenceDataset(ds.records, ds.image_folder, corrupted_cache_dir=folder)[0]
    (entry,) = folder.iterdir()
    entry.write_bytes(b"")
    damaged = PreferenceDataset(ds.records, ds.image_folder, corrupted_cache_dir=folder)
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        for _ in range(2):
            item = damaged[0]
            assert item["index"] == ds.records[0]["index"]
            np.testing.assert_array_equal(np.asarray(item["corrupted_image"]), want[0])
    assert caplog.text.count(f"corrupted-image cache {folder}: cannot read {entry.name} (") == 1
    assert "; corrupted images are computed from their seeded noise instead (the same images; warned once)" \
        in caplog.text and "used record" not in caplog.text
    np.testing.assert_array_equal(np.asarray(Image.open(entry).convert("RGB")), want[0])  # rewritten

    def refused(self, fp, *args, **kwargs):
        raise PermissionError(13, "Read-only file system", str(fp))

    monkeypatch.setattr(Image.Image, "save", refused)
    caplog.clear()
    unwritable = PreferenceDataset(ds.records, ds.image_folder, corrupted_cache_dir=tmp_path / "ro")
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        for i in (0, 1, 0, 1):
            item = unwritable[i]
            assert item["index"] == ds.records[i]["index"]
            np.testing.assert_array_equal(np.asarray(item["corrupted_image"]), want[i])
    assert caplog.text.count(f"corrupted-image cache {tmp_path / 'ro'}: cannot write ") == 1
    assert "(PermissionError: [Errno 13] Read-only file system: " in caplog.text and "used record" not in caplog.text
    assert list((tmp_path / "ro").iterdir()) == []
