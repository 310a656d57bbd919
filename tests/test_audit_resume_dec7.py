"""Audit of 2026-12-07: resuming from a checkpoint, and when a precomputed reference cache may be reused.

Each test's oracle is independent of the code it checks: a resumed run against the uninterrupted run, a reused
reference table against the table scored from scratch (into a cache file of its own) under the new settings.
"""

import copy
import logging
import os
import sys

import pytest
import torch
from torch.utils.data import Dataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from test_trainer import _args, _losses  # noqa: E402
from tiny_setup import state_of, tiny_data, tiny_model, tiny_processor  # noqa: E402

from tpo_fast.trainer import reference_cache as rc  # noqa: E402
from tpo_fast.trainer.data import PreferenceDataset  # noqa: E402
from tpo_fast.trainer.trainer import TPOTrainer  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_NOT_LOGGED = ("tokens_per_second", "peak_memory_mb", "train_runtime", "train_samples_per_second",
               "train_steps_per_second", "train_loss", "total_flos")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit_resume")
    return tiny_data(str(root / "data"), num_images=8, seed=0), tiny_processor()


def _table(tmp_path, run, model, proc, ds, cache, **kw):
    """The train table a trainer built with `cache` as its reference cache holds (scored, or reused)."""
    args = _args(tmp_path / run, precompute_reference=True, reference_cache=str(cache), **kw)
    trainer = TPOTrainer(model, args=args, train_dataset=ds, processing_class=proc)
    return trainer._ref_tables["train"].scores.clone()


def _step_logs(trainer):
    return [{k: v for k, v in h.items() if k not in _NOT_LOGGED} for h in trainer.state.log_history]


# -- resuming -----------------------------------------------------------------------------------------------------


def test_a_resumed_run_is_the_uninterrupted_run_with_accumulation_a_schedule_and_a_precomputed_reference(
        setup, tmp_path):
    """Interrupted after 2 of 6 optimizer steps (3 epochs of 2 steps, 2 micro-batches each, shuffled, AdamW, linear
    warmup and decay, a precomputed reference): the resumed run logs the same step metrics and losses, and ends with
    the same weights, optimizer state and learning rate, bit for bit on the CPU."""
    ds, proc = setup

    def run(name):
        args = _args(tmp_path / name, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=-1,
                     num_train_epochs=3, lr_scheduler_type="linear", warmup_steps=2, save_strategy="steps",
                     save_steps=2, precompute_reference=True, reference_cache=str(tmp_path / "ref.pt"))
        return TPOTrainer(tiny_model(proc), args=args, train_dataset=ds, processing_class=proc)

    full = run("full")
    full.train()
    resumed = run("resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))
    assert resumed.state.global_step == full.state.global_step == 6
    assert _step_logs(resumed) == _step_logs(full)
    want = state_of(full.model)
    for name, value in state_of(resumed.model).items():
        assert torch.equal(value, want[name]), name
    got, expected = resumed.optimizer.state_dict()["state"], full.optimizer.state_dict()["state"]
    assert got.keys() == expected.keys()
    for key in expected:
        for field, value in expected[key].items():
            assert torch.equal(got[key][field], value), (key, field)
    assert resumed.lr_scheduler.state_dict() == full.lr_scheduler.state_dict()


def test_resuming_a_model_with_a_bf16_tower_and_fp32_language_model_keeps_the_fp32_weights(setup, tmp_path):
    """A full fine-tune with its frozen vision tower kept in bf16 (memory) and the rest in fp32: the checkpoint was
    loaded in the dtype of the model's first parameter (the tower's bf16), rounding every fp32 weight to bf16 on
    resume, and the resumed run drifted from the uninterrupted one (weights 3e-3 apart after 3 more steps)."""
    ds, proc = setup

    def model():
        m = tiny_model(proc)
        m.model.vision_tower.to(torch.bfloat16)
        return m

    args = _args(tmp_path, per_device_train_batch_size=2, max_steps=4, save_strategy="steps", save_steps=2,
                 bf16=True)
    full = TPOTrainer(model(), args=args, train_dataset=ds, processing_class=proc)
    full.train()
    resumed = TPOTrainer(model(), args=args, train_dataset=ds, processing_class=proc)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert _losses(resumed) == _losses(full)
    want = state_of(full.model)
    for name, value in state_of(resumed.model).items():
        assert torch.equal(value, want[name]), name
    assert {p.dtype for p in resumed.model.model.vision_tower.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in resumed.model.model.language_model.parameters()} == {torch.float32}


# -- when a cached reference table is reused ------------------------------------------------------------------------


def _eos_is_a_period(proc):
    proc.tokenizer.eos_token = "."


def _adds_a_bos_token(proc):
    proc.tokenizer.add_bos_token = True


@pytest.mark.parametrize("change", [_eos_is_a_period, _adds_a_bos_token], ids=["eos-token", "add-bos-token"])
def test_a_cache_is_not_reused_when_the_tokenizer_encodes_otherwise(setup, tmp_path, change):
    """The same vocabulary, name and class (`processor_identity`) but another eos token (the collator ends every
    response with it) or a bos token added to every row: other rows, other scores (by up to 0.46 and 0.08); the cached
    table was reused."""
    ds, proc = setup
    cache = tmp_path / "ref.pt"
    before = _table(tmp_path, "a", tiny_model(proc), proc, ds, cache)
    other = tiny_processor()
    change(other)
    assert rc.processor_identity(other) == rc.processor_identity(proc)
    want = _table(tmp_path, "fresh", tiny_model(proc), other, ds, tmp_path / "fresh.pt")
    assert not torch.equal(want, before)
    assert torch.equal(_table(tmp_path, "b", tiny_model(proc), other, ds, cache), want)


def test_a_cache_is_not_reused_for_the_same_weights_in_another_dtype(setup, tmp_path):
    """A reference whose fp32 weights are bf16 values, cast with `.to(torch.bfloat16)` (its config's dtype does not
    follow): the weights digest and config digest are the same, the scores are not (bf16 compute)."""
    ds, proc = setup
    fp32 = tiny_model(proc).to(torch.bfloat16).to(torch.float32)  # values a bf16 model holds exactly
    cache = tmp_path / "ref.pt"
    before = _table(tmp_path, "a", copy.deepcopy(fp32), proc, ds, cache)
    want = _table(tmp_path, "fresh", copy.deepcopy(fp32).to(torch.bfloat16), proc, ds, tmp_path / "fresh.pt")
    assert not torch.equal(want, before)
    assert torch.equal(_table(tmp_path, "b", copy.deepcopy(fp32).to(torch.bfloat16), proc, ds, cache), want)


class _Wrapped(Dataset):
    """A dataset of `PreferenceDataset` items that is neither one nor a Subset / ConcatDataset of one (a user's
    filtering or augmenting wrapper): no `records`, no image folder or noise settings the fingerprint can read."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return self.inner[i]


def test_a_cache_of_a_wrapped_dataset_is_not_reused_for_another_corruption(setup, tmp_path):
    """The same records under a wrapper, corrupted with another noise seed: other corrupted images, other scores;
    the digest of such a dataset read the items' text and image names only, and the cached table was reused."""
    ds, proc = setup
    seeded = {seed: _Wrapped(PreferenceDataset(ds.records, ds.image_folder, noise_seed=seed)) for seed in (0, 1)}
    cache = tmp_path / "ref.pt"
    before = _table(tmp_path, "a", tiny_model(proc), proc, seeded[0], cache)
    want = _table(tmp_path, "fresh", tiny_model(proc), proc, seeded[1], tmp_path / "fresh.pt")
    assert not torch.equal(want, before)
    assert torch.equal(_table(tmp_path, "b", tiny_model(proc), proc, seeded[1], cache), want)


def test_a_cache_whose_scores_changed_on_disk_is_scored_again(setup, tmp_path, caplog):
    """torch.load checks no checksum: a cache file whose bytes changed after it was written (one byte of a score
    here, the sign of the first score) was read as scores. The table's checksum tells it: it is scored again, with
    a warning."""
    ds, proc = setup
    cache = tmp_path / "ref.pt"
    want = _table(tmp_path, "a", tiny_model(proc), proc, ds, cache)
    stored = torch.load(cache, weights_only=True)
    first = stored["scores"][torch.argsort(stored["index"])[0], 0]
    raw = bytearray(cache.read_bytes())
    position = raw.find(stored["scores"].contiguous().numpy().tobytes())
    assert position > 0 and raw.count(stored["scores"].contiguous().numpy().tobytes()) == 1
    item = stored["scores"].element_size()
    row = int(torch.argsort(stored["index"])[0])
    raw[position + row * stored["scores"].shape[1] * item + item - 1] ^= 0x80  # the sign bit (little-endian)
    cache.write_bytes(bytes(raw))
    assert torch.load(cache, weights_only=True)["scores"][row, 0] == -first  # read back as is, without an error
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        got = _table(tmp_path, "b", tiny_model(proc), proc, ds, cache)
    assert torch.equal(got, want)
    assert f"reference cache {cache}: the train table's scores do not match the checksum written with them" \
        in caplog.text


def test_the_step_masks_with_the_collators_ignore_index(setup, tmp_path):
    """A TPOCollator(ignore_index=-1) labels prompt and padding positions with -1; the step masked with -100, read
    those labels as targets and failed on the first batch ("labels on padding positions"). The step now takes the
    collator's ignore_index: the run is the default collator's run, loss for loss and metric for metric."""
    from tpo_fast.trainer.collator import TPOCollator

    ds, proc = setup
    logs = []
    for collator in (None, TPOCollator(proc, ignore_index=-1)):
        torch.manual_seed(0)
        trainer = TPOTrainer(model=tiny_model(proc), args=_args(tmp_path, max_steps=2), train_dataset=ds,
                             processing_class=proc, data_collator=collator)
        trainer.train()
        logs.append([{k: v for k, v in entry.items() if k not in ("tokens_per_second", "peak_memory_mb")}
                     for entry in trainer.state.log_history if "loss" in entry])
    assert trainer.step_options.ignore_index == -1
    assert len(logs[0]) == 2 and logs[0] == logs[1]
