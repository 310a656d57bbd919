"""tpo_fast/trainer/reference_cache.py: what identifies a precomputed reference cache, against oracles written from
its documentation (a wrongly reused cache trains against the wrong reference scores, silently).

The trainer-level behaviour (a cache reused, recomputed, refused) is in test_trainer_review.py and
test_gaps_trainer.py; here each identity piece on its own: `weights_digest` as its documented formula (chunked,
positions past the prime, ZeRO-3 partitions), `dataset_digest` on inline image bytes and on datasets without
records, `processor_identity` field by field, and the tables' reading and lookup.
"""

import hashlib
import json
import logging
import os
import re
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from tiny_setup import tiny_processor  # noqa: E402

from tpo_fast.trainer import reference_cache as rc  # noqa: E402
from tpo_fast.trainer.data import PreferenceDataset  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _digest_oracle(named: list[tuple[str, torch.Tensor]]) -> str:
    """weights_digest's docstring, in NumPy: sha256 of "name:shape" lines, then per parameter the float64 sum, sum of
    squares and sum of x[i] * (i mod 65521 + 1), hashed as float32."""
    h = hashlib.sha256("\n".join(f"{n}:{tuple(p.shape)}" for n, p in named).encode())
    rows = []
    for _, p in named:
        x = p.detach().numpy().astype(np.float64).ravel()
        i = np.arange(x.size, dtype=np.int64)
        rows.append([x.sum(), (x * x).sum(), (x * (i % 65521 + 1)).sum()])
    h.update(np.asarray(rows, dtype=np.float64).reshape(-1, 3).astype(np.float32).tobytes())
    return h.hexdigest()


def _params():
    gen = torch.Generator().manual_seed(0)
    # 70000 elements: positions past the prime 65521 (their weights wrap around to 1, 2, ...)
    return [("a.weight", torch.randn(3, 4, generator=gen)), ("b", torch.randn(70000, generator=gen)),
            ("c.bias", torch.randn(5, generator=gen))]


def test_weights_digest_is_its_documented_formula(monkeypatch):
    named = _params()
    assert rc.weights_digest(named) == _digest_oracle(named)
    monkeypatch.setattr(rc, "_DIGEST_CHUNK", 7)  # many chunks, the last one partial: the same sums
    assert rc.weights_digest(named) == _digest_oracle(named)
    assert rc.weights_digest([]) == hashlib.sha256(b"").hexdigest()  # nothing to hash: names and values empty


def test_position_weighted_sum_adds_up_over_partitions(monkeypatch):
    """ZeRO-3 ranks each reduce their partition with its flat start: the partial sums add up to the whole's, in one
    chunk or many."""
    x = _params()[1][1]
    whole = float(rc._position_weighted_sum(x, 0))
    i = np.arange(x.numel(), dtype=np.int64)
    assert whole == pytest.approx(float((x.double().numpy() * (i % 65521 + 1)).sum()), rel=1e-12)
    for chunk in (rc._DIGEST_CHUNK, 9):
        monkeypatch.setattr(rc, "_DIGEST_CHUNK", chunk)
        parts = sum(float(rc._position_weighted_sum(x[lo:hi], lo)) for lo, hi in ((0, 40000), (40000, 70000)))
        assert parts == pytest.approx(whole, rel=1e-12)


def test_weights_digest_of_a_zero3_parameter_reads_its_partition():
    """A DeepSpeed ZeRO-3 parameter holds an empty placeholder; its partition is `ds_tensor` and its shape
    `ds_shape`. On one rank (no process group: partition start 0) the digest is the whole parameter's."""
    named = _params()
    partitioned = []
    for name, p in named:
        placeholder = torch.nn.Parameter(torch.empty(0))
        placeholder.ds_tensor, placeholder.ds_shape = p.reshape(-1).clone(), p.shape
        partitioned.append((name, placeholder))
    assert rc.weights_digest(partitioned) == rc.weights_digest(named)


def _zero3_digest_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank of a gloo group: every parameter ZeRO-3 style, its flat values padded with zeros to a multiple of
    the world size and this rank's slice in `ds_tensor`; writes the digest it computes."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        partitioned = []
        for name, p in _params():
            size = -(-p.numel() // world)
            flat = torch.cat([p.reshape(-1), torch.zeros(size * world - p.numel())])
            placeholder = torch.nn.Parameter(torch.empty(0))
            placeholder.ds_tensor, placeholder.ds_shape = flat[rank * size:(rank + 1) * size].clone(), p.shape
            partitioned.append((name, placeholder))
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(rc.weights_digest(partitioned))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_weights_digest_under_zero3_is_the_whole_parameters_on_every_rank(tmp_path, world):
    """Each rank reduces its own partition (b's 70000 elements split across the prime 65521, c's 5 padded) and the
    all-reduce adds the partial sums: every rank gets the one-process digest of the whole parameters."""
    torch.multiprocessing.spawn(_zero3_digest_worker, args=(world, str(tmp_path / "init"), str(tmp_path)),
                                nprocs=world, join=True)
    digests = [(tmp_path / f"rank{r}.txt").read_text() for r in range(world)]
    assert digests == [_digest_oracle(_params())] * world


def _records(images):
    return [dict(image=image, prompt="what is it?", chosen="a red circle .", rejected="a blue square .", index=i)
            for i, image in enumerate(images)]


def test_dataset_digest_sees_inline_image_bytes_and_image_keys(tmp_path):
    """Records with inline image bytes (parquet sets ship them) differ only there: their digests differ, and the
    same bytes give the same digest. A dataset without records is digested item by item, its `image_key` too."""
    one = rc.dataset_digest(PreferenceDataset(_records([b"\x89PNG one", b"\x89PNG two"]), str(tmp_path)))
    assert one == rc.dataset_digest(PreferenceDataset(_records([b"\x89PNG one", b"\x89PNG two"]), str(tmp_path)))
    assert one != rc.dataset_digest(PreferenceDataset(_records([b"\x89PNG one", b"\x89PNG 2"]), str(tmp_path)))
    # the same record as a path to an image file named like the bytes: another image
    assert one != rc.dataset_digest(PreferenceDataset(_records(["\x89PNG one", b"\x89PNG two"]), str(tmp_path)))
    items = [dict(r, image_key=f"img{i}") for i, r in enumerate(_records(["x", "y"]))]
    moved = [dict(items[0]), dict(items[1], image_key="img9")]
    assert rc.dataset_digest(items) != rc.dataset_digest(moved)
    # a dataset without an image folder: no folder path in the digest, nothing refused
    assert rc.dataset_digest(PreferenceDataset(_records(["/abs/a.png"]))) != rc.dataset_digest(
        PreferenceDataset(_records(["/abs/b.png"])))


def test_processor_identity_field_by_field():
    proc = tiny_processor()
    tok = proc.tokenizer
    vocab = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()
    image = hashlib.sha256(proc.image_processor.to_json_string().encode()).hexdigest()
    assert rc.processor_identity(proc) == {
        "class": type(proc).__name__, "tokenizer": type(tok).__name__, "name_or_path": str(tok.name_or_path),
        "vocab_size": len(tok), "vocab": vocab, "image_processor": image}
    # a bare tokenizer is its own tokenizer (its vocabulary identifies it); no processor at all: only its absence
    assert rc.processor_identity(tok) == {
        "class": type(tok).__name__, "tokenizer": type(tok).__name__, "name_or_path": str(tok.name_or_path),
        "vocab_size": len(tok), "vocab": vocab}
    assert rc.processor_identity(None) == {"class": None}


def test_score_tables_and_their_lookup(tmp_path):
    entry = {"index": torch.tensor([3, 0, 2]), "scores": torch.tensor([[1.0, 2.0], [5.0, 6.0], [7.0, 8.0]])}
    table = rc.score_table(entry)
    assert table.scores.dtype == torch.float64 and table.index.tolist() == [0, 2, 3]
    assert table.scores.tolist() == [[5.0, 6.0], [7.0, 8.0], [1.0, 2.0]]  # in index order
    assert rc.lookup_scores(table, torch.tensor([3, 0, 3]), "train", "c.pt").tolist() == [[1, 2], [5, 6], [1, 2]]
    empty = rc.score_table({"index": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0, 2)})
    assert empty.scores.shape == (0, 2)
    with pytest.raises(ValueError, match=re.escape("records [0] are not in the reference cache's 'train' table (c.pt, "
                                                   "0 records scored at TPOTrainer init)")):
        rc.lookup_scores(empty, torch.tensor([0]), "train", "c.pt")
    # unscored, past the end (exactly at the largest index + 1 too) and negative: one error naming them all
    for index in ([1, 0], [4], [7, -1]):
        missing = [i for i in index if i not in (0, 2, 3)]
        with pytest.raises(ValueError, match=re.escape(f"records {missing} are not in the reference cache's 'eval/x' "
                                                      "table (c.pt, 3 records scored at TPOTrainer init)")):
            rc.lookup_scores(table, torch.tensor(index), "eval/x", "c.pt")


def test_a_score_table_holds_only_the_indices_present():
    """Record indices as large as corpus ids (3e9) cost one row each, not (largest index + 1) rows."""
    big = 3_000_000_000
    table = rc.score_table({"index": torch.tensor([big, 7]), "scores": torch.tensor([[1.0, 2.0], [3.0, 4.0]])})
    assert table.index.tolist() == [7, big] and table.scores.shape == (2, 2)
    got = rc.lookup_scores(table, torch.tensor([big, 7, big]), "train", "c.pt")
    assert got.tolist() == [[1, 2], [3, 4], [1, 2]]
    for absent in (big - 1, big + 1, 8, 0):
        with pytest.raises(ValueError, match=re.escape(f"records [{absent}] are not in the reference cache's 'train' "
                                                      "table (c.pt, 2 records scored at TPOTrainer init)")):
            rc.lookup_scores(table, torch.tensor([absent]), "train", "c.pt")


def test_read_reference_cache_returns_every_table(tmp_path):
    path = str(tmp_path / "cache.pt")
    assert rc.read_reference_cache(path) == {}
    train = {"fingerprint": "f0", "index": torch.tensor([0]), "scores": torch.ones(1, 2)}
    evals = {"eval": {"fingerprint": "f1", "index": torch.tensor([0]), "scores": torch.zeros(1, 2)}}
    torch.save({**train, "eval_tables": evals}, path)
    tables = rc.read_reference_cache(path)
    assert sorted(tables) == ["eval", "train"]
    assert tables["train"]["fingerprint"] == "f0" and tables["eval"]["fingerprint"] == "f1"
    torch.save({"eval_tables": evals}, path)  # eval tables only (the train table not scored yet)
    assert sorted(rc.read_reference_cache(path)) == ["eval"]
    torch.save(train, path)  # a train table only, as a cache without eval sets always had it
    assert sorted(rc.read_reference_cache(path)) == ["train"]


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 half a zip", b"not a cache"])
def test_an_unreadable_cache_file_reads_as_no_tables_with_a_warning(tmp_path, caplog, content):
    path = tmp_path / "cache.pt"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        assert rc.read_reference_cache(str(path)) == {}
    assert re.search(rf"reference cache {re.escape(str(path))} cannot be read \(\w+: .*\); ignoring it and "
                     "recomputing every table", caplog.text, re.DOTALL)
    torch.save([1, 2], path)  # readable, but not a cache's dict
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        assert rc.read_reference_cache(str(path)) == {}
    assert f"reference cache {path} cannot be read (TypeError: holds a list, not a dict of tables); ignoring it " \
        "and recomputing every table" in caplog.text


def test_a_cache_is_written_atomically(tmp_path, monkeypatch):
    """write_reference_cache writes what read_reference_cache reads; a write that fails half-way (a killed run)
    leaves the previous file as it was and no temporary file beside it."""
    path = str(tmp_path / "sub" / "cache.pt")
    train = {"fingerprint": "f0", "index": torch.tensor([0]), "scores": torch.ones(1, 2)}
    evals = {"eval": {"fingerprint": "f1", "index": torch.tensor([0]), "scores": torch.zeros(1, 2)}}
    rc.write_reference_cache(path, {"train": train, **evals})
    tables = rc.read_reference_cache(path)
    assert sorted(tables) == ["eval", "train"] and tables["eval"]["fingerprint"] == "f1"
    before = open(path, "rb").read()
    real_save = torch.save

    def killed(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        rc.write_reference_cache(path, {"train": {**train, "fingerprint": "f2"}})
    assert open(path, "rb").read() == before and os.listdir(tmp_path / "sub") == ["cache.pt"]


def test_dataset_digest_names_the_image_file_a_relative_path_opens(tmp_path, monkeypatch):
    """Without an image folder a relative image path opens the working directory's file: the digest is that of the
    same records naming the file by its absolute path, so runs from two folders (other images under the same
    names) are two datasets, and a run from the first folder again is the same one."""
    for folder in ("A", "B"):
        (tmp_path / folder / "imgs").mkdir(parents=True)
    relative = PreferenceDataset(_records(["imgs/0.png", "imgs/1.png"]))
    monkeypatch.chdir(tmp_path / "A")
    from_a = rc.dataset_digest(relative)
    assert from_a == rc.dataset_digest(PreferenceDataset(_records([str(tmp_path / "A/imgs/0.png"),
                                                                   str(tmp_path / "A/imgs/1.png")])))
    monkeypatch.chdir(tmp_path / "B")
    assert rc.dataset_digest(relative) != from_a
    assert rc.dataset_digest(relative) == rc.dataset_digest(PreferenceDataset(_records([
        str(tmp_path / "B/imgs/0.png"), str(tmp_path / "B/imgs/1.png")])))


def test_config_digest_sees_what_scores_and_not_the_bookkeeping():
    """The same weights under another config score otherwise: vision_feature_layer, the text model's RMSNorm epsilon
    or the dtype change the digest; where the model was loaded from, the transformers version, the architectures,
    initializer_range and use_cache (at the top and in the sub-configs) do not."""
    from tiny_setup import tiny_model

    config = tiny_model(tiny_processor()).config
    before = rc.config_digest(config)
    fields = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "architectures"):
        fields.pop(key, None)
    for sub in ("text_config", "vision_config"):
        for key in ("_name_or_path", "architectures", "initializer_range", "use_cache"):
            fields[sub].pop(key, None)
    assert before == hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    config._name_or_path, config.transformers_version, config.architectures = "/elsewhere", "0.0.1", ["Other"]
    config.text_config.initializer_range, config.text_config.use_cache = 0.5, not config.text_config.use_cache
    assert rc.config_digest(config) == before
    for name, value in (("vision_feature_layer", -1 if config.vision_feature_layer != -1 else -2),
                        ("text_config.rms_norm_eps", 0.125), ("dtype", "float16")):
        changed = tiny_model(tiny_processor()).config
        owner, attr = (changed.text_config, "rms_norm_eps") if name.startswith("text_config") else (changed, name)
        setattr(owner, attr, value)
        assert rc.config_digest(changed) != before, name
    assert rc.config_digest(None) == hashlib.sha256(b"null").hexdigest()


def test_dataset_digest_reads_the_records_under_concat_datasets(tmp_path, monkeypatch):
    """A ConcatDataset of PreferenceDatasets (and Subsets) is digested from its records, as the one dataset of the
    same records in the same order, without loading an item; another order or another folder is another digest."""
    records = _records(["0.png", "1.png", "2.png"])
    whole = rc.dataset_digest(PreferenceDataset(records, str(tmp_path)))
    monkeypatch.setattr(PreferenceDataset, "__getitem__", lambda self, i: pytest.fail("an item was loaded"))
    parts = [PreferenceDataset(records[:1], str(tmp_path)), PreferenceDataset(records[1:], str(tmp_path))]
    concat = torch.utils.data.ConcatDataset([parts[0], torch.utils.data.Subset(parts[1], [0, 1])])
    assert rc.dataset_digest(concat) == whole
    nested = torch.utils.data.Subset(torch.utils.data.ConcatDataset([concat]), [0, 1, 2])
    assert rc.dataset_digest(nested) == whole
    assert rc.dataset_digest(torch.utils.data.ConcatDataset(parts[::-1])) != whole
    moved = PreferenceDataset(records[1:], str(tmp_path / "other"))
    assert rc.dataset_digest(torch.utils.data.ConcatDataset([parts[0], moved])) != whole
    assert rc.leaf_datasets(nested) == [parts[0], parts[1]]


def test_a_dataset_listing_a_record_twice_is_told_to_list_it_once(tmp_path):
    """A Subset repeating a record was refused with advice for hand-built records only."""
    ds = PreferenceDataset(_records([b"\x89PNG one", b"\x89PNG two"]), str(tmp_path))
    with pytest.raises(ValueError) as refused:
        rc.dataset_digest(torch.utils.data.Subset(ds, [0, 0, 1]))
    assert str(refused.value) == (
        "records share the index values [0]: with precompute_reference=True the reference cache is keyed by each "
        "record's 'index', which must be unique within a dataset: list each record once (a Subset or ConcatDataset "
        "may repeat one), and drop the 'index' keys of hand-built records whose indices repeat to number them by "
        "position")
