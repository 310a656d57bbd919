"""Trainer defects found in review, each against an exact oracle: the precomputed reference of eval datasets,
the reference-cache fingerprint, the corrupted-image cache key, dataset and config validation, the noise fields
TPOTrainer does not use, records without "index", TRL conversational records and `weights_digest`."""

import copy
import json
import logging
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from test_trainer import _args  # noqa: E402
from tiny_setup import tiny_data, tiny_model, tiny_processor  # noqa: E402

from tpo_fast.trainer.collator import TPOCollator  # noqa: E402
from tpo_fast.trainer.config import TPOConfig  # noqa: E402
from tpo_fast.trainer.corruption import add_diffusion_noise, example_seed  # noqa: E402
from tpo_fast.trainer.data import PreferenceDataset, load_preference_records, validate_record  # noqa: E402
from tpo_fast.trainer.reference_cache import weights_digest  # noqa: E402
from tpo_fast.trainer.synthetic import make_shapes_dataset  # noqa: E402
from tpo_fast.trainer.trainer import TPOTrainer  # noqa: E402

LOG2 = math.log(2.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 4-record train set, two other files of 4 and 6 records (indices 0.. again; other pictures and
    texts), all with noise_seed=0, and the processor."""
    root = tmp_path_factory.mktemp("review")
    train = tiny_data(str(root / "train"), num_images=4, seed=0)

    def other(name: str, n: int, seed: int) -> PreferenceDataset:
        path = make_shapes_dataset(str(root / name), num_images=n, image_size=28, seed=seed)
        return PreferenceDataset.from_file(path, str(root / name / "images"), noise_seed=0)

    return train, other("eval4", 4, 7), other("eval6", 6, 11), tiny_processor()


def _trainer(proc, tmp_path, train, eval_dataset=None, model=None, **kw):
    args = _args(tmp_path, per_device_eval_batch_size=2, per_device_train_batch_size=2, **kw)
    return TPOTrainer(model if model is not None else tiny_model(proc), args=args, train_dataset=train,
                      eval_dataset=eval_dataset, processing_class=proc)


# -- 1. precomputed reference and eval datasets ------------------------------------------------------------


def test_precomputed_eval_datasets_get_their_own_reference_tables(data, tmp_path):
    """policy == reference (untrained): every eval loss is exactly log 2, with one eval set, a dict of two (one
    larger than the train set), and predict(); before, eval records read the train table by index."""
    train, eval4, eval6, proc = data
    single = _trainer(proc, tmp_path / "single", train, eval4, precompute_reference=True)
    assert single.reference_mode == "precomputed"
    assert single.evaluate()["eval_loss"] == pytest.approx(LOG2, abs=1e-6)
    assert single.predict(eval4).metrics["test_loss"] == pytest.approx(LOG2, abs=1e-6)
    assert single.evaluate(eval_dataset=train)["eval_loss"] == pytest.approx(LOG2, abs=1e-6)  # the train table

    several = _trainer(proc, tmp_path / "dict", train, {"a": eval4, "b": eval6, "t": train}, precompute_reference=True)
    metrics = several.evaluate()
    for key in ("eval_a_loss", "eval_b_loss", "eval_t_loss"):
        assert metrics[key] == pytest.approx(LOG2, abs=1e-6), (key, metrics)
    assert several.evaluate(eval_dataset="b")["eval_loss"] == pytest.approx(LOG2, abs=1e-6)
    logged = {k for h in several.state.log_history for k in h}
    assert {"eval_a_rewards/margins", "eval_b_rewards/margins", "eval_rewards/margins"} <= logged
    cache = torch.load(tmp_path / "dict" / "out" / "reference_scores.pt", weights_only=True)
    assert sorted(cache["eval_tables"]) == ["eval/a", "eval/b"]  # the train set ("t") is scored once, as train
    evals = cache["eval_tables"]
    assert [len(t["index"]) for t in (cache, evals["eval/a"], evals["eval/b"])] == [4, 4, 6]
    assert cache["eval_tables"]["eval/a"]["fingerprint"]["records"] != cache["fingerprint"]["records"]


def test_evaluation_during_training_matches_a_live_reference(data, tmp_path):
    """Evaluations run by train() (eval_strategy="steps") with a precomputed reference give the eval losses of the
    same run with a frozen reference model scoring every batch."""
    train, eval4, eval6, proc = data
    history = {}
    for name, kw in (("live", dict(reference="model")), ("cached", dict(precompute_reference=True))):
        trainer = _trainer(proc, tmp_path / name, train, {"a": eval4, "b": eval6}, max_steps=2, eval_strategy="steps",
                           eval_steps=1, **kw)
        trainer.train()
        history[name] = [(h["step"], k, h[k]) for h in trainer.state.log_history for k in ("eval_a_loss", "eval_b_loss")
                         if k in h]
    assert [(s, k) for s, k, _ in history["cached"]] == [(1, "eval_a_loss"), (1, "eval_b_loss"), (2, "eval_a_loss"),
                                                          (2, "eval_b_loss")]
    assert history["cached"][-1][2] != pytest.approx(LOG2, abs=1e-3)  # the policy has moved: the reference matters
    assert [v for *_, v in history["cached"]] == pytest.approx([v for *_, v in history["live"]], rel=1e-5, abs=1e-6)


def test_precomputed_reference_lookup_errors_say_what_to_do(data, tmp_path):
    train, eval4, eval6, proc = data
    trainer = _trainer(proc, tmp_path, train, eval4, precompute_reference=True)
    with pytest.raises(ValueError, match="was not scored by the reference.*pass it to TPOTrainer as eval_dataset"):
        trainer.evaluate(eval_dataset=eval6)
    grown = PreferenceDataset(eval6.records, eval6.image_folder)
    trainer = _trainer(proc, tmp_path / "grown", train, grown, precompute_reference=True)
    grown.records.append({**eval6.records[0], "index": 10})  # a record added after the reference was scored
    with pytest.raises(ValueError, match=r"records \[10\] are not in the reference cache's 'eval' table"):
        trainer.evaluate()


# -- 2. reference-cache fingerprint -------------------------------------------------------------------------


def test_reference_cache_is_not_reused_for_other_records_of_the_same_size(data, tmp_path, caplog):
    train, eval4, _, proc = data
    cache = str(tmp_path / "shared.pt")

    def table(ds, run, path=cache):
        return _trainer(proc, tmp_path / run, ds, precompute_reference=True, reference_cache=path)._ref_table

    first = table(train, "a")
    got = table(eval4, "b")  # same size, same model, same settings: only the records differ
    fresh = table(eval4, "fresh", str(tmp_path / "fresh.pt"))
    assert not torch.allclose(first, fresh)
    assert torch.equal(got, fresh)
    with caplog.at_level(logging.INFO, logger="tpo_fast"):
        again = table(eval4, "again")  # same data: reused
    assert torch.equal(again, fresh) and "reference scores of the train dataset loaded from" in caplog.text


def test_reference_cache_made_when_responses_were_tokenized_alone_is_scored_again(data, tmp_path):
    """A table from before responses were labelled as continuations of their prompt has no 'response_tokens'
    in its fingerprint: its scores may cover other tokens, so it is not reused."""
    train, _, _, proc = data
    cache = str(tmp_path / "old.pt")
    fresh = _trainer(proc, tmp_path / "a", train, precompute_reference=True, reference_cache=cache)._ref_table.clone()
    stored = torch.load(cache, weights_only=False)
    assert stored["fingerprint"].pop("response_tokens") == "continuation"
    stored["scores"] = stored["scores"] + 1.0  # what the old tokens scored: anything else
    torch.save(stored, cache)
    got = _trainer(proc, tmp_path / "b", train, precompute_reference=True, reference_cache=cache)._ref_table
    assert torch.equal(got, fresh)


def test_dataset_digest_covers_the_records(data, tmp_path):
    from tpo_fast.trainer.reference_cache import dataset_digest

    train, _, _, _ = data
    base = dataset_digest(train)
    assert dataset_digest(PreferenceDataset(train.records, train.image_folder)) == base
    edited = [dict(r) for r in train.records]
    edited[2]["chosen"] += " ."
    assert dataset_digest(PreferenceDataset(edited, train.image_folder)) != base
    assert dataset_digest(PreferenceDataset(train.records, str(tmp_path))) != base  # same names, other folder
    subset = torch.utils.data.Subset(torch.utils.data.Subset(train, [3, 1, 2]), [2, 0])
    assert dataset_digest(subset) == dataset_digest(PreferenceDataset([train.records[i] for i in (2, 3)],
                                                                      train.image_folder))
    items = [train[i] for i in range(len(train))]  # a dataset without records: its items are digested
    assert dataset_digest(items) == dataset_digest([train[i] for i in range(len(train))])
    assert dataset_digest(items[:3]) != dataset_digest(items)
    twice = PreferenceDataset(train.records[:2] + [dict(train.records[0])], train.image_folder)
    with pytest.raises(ValueError, match=r"share the index values \[0\].*must be unique"):
        dataset_digest(twice)


def test_processor_identity_tells_tokenizers_apart():
    from tpo_fast.trainer.reference_cache import processor_identity
    from tpo_fast.trainer.synthetic import vocabulary
    from tpo_fast.trainer.tiny import build_tiny_processor

    one, two = tiny_processor(), tiny_processor()
    assert processor_identity(one) == processor_identity(two)
    assert processor_identity(one)["vocab_size"] == len(one.tokenizer)
    other = build_tiny_processor(vocabulary() + ["zebra"], image_size=28, patch_size=7)
    assert processor_identity(other)["vocab"] != processor_identity(one)["vocab"]
    bigger = build_tiny_processor(vocabulary(), image_size=56, patch_size=7)
    assert processor_identity(bigger)["image_processor"] != processor_identity(one)["image_processor"]
    two.tokenizer.name_or_path = "somewhere/else"
    assert processor_identity(two) != processor_identity(one)


# -- 3. corrupted-image cache key ---------------------------------------------------------------------------


def _one_image_set(root, name: str, colour) -> str:
    os.makedirs(root / name / "images")
    Image.new("RGB", (28, 28), colour).save(root / name / "images" / "img.png")
    (root / name / "pairs.jsonl").write_text(
        json.dumps({"image": "img.png", "prompt": "what ?", "chosen": "red", "rejected": "blue"}) + "\n"
    )
    return str(root / name)


def test_corrupted_cache_keys_the_image_file_not_its_relative_name(tmp_path):
    cache = tmp_path / "corrupted"
    sets = {n: _one_image_set(tmp_path, n, c) for n, c in (("a", (255, 0, 0)), ("b", (0, 0, 255)))}
    ds = {n: PreferenceDataset.from_file(f"{d}/pairs.jsonl", f"{d}/images", corrupted_cache_dir=cache)
          for n, d in sets.items()}

    def own(d):  # the corruption of the dataset's own image, computed without any cache
        return np.asarray(add_diffusion_noise(d[0]["image"], 500, seed=example_seed(0, "img.png")))

    first = {n: np.asarray(d[0]["corrupted_image"]) for n, d in ds.items()}
    for n, d in ds.items():
        np.testing.assert_array_equal(first[n], own(d))
        np.testing.assert_array_equal(np.asarray(d[0]["corrupted_image"]), own(d))  # now read from the cache
    assert len(os.listdir(cache)) == 2
    # The same file replaced in place (another picture, another modification time) gets its own entry.
    path = os.path.join(sets["a"], "images", "img.png")
    Image.new("RGB", (28, 28), (0, 255, 0)).save(path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    np.testing.assert_array_equal(np.asarray(ds["a"][0]["corrupted_image"]), own(ds["a"]))
    assert len(os.listdir(cache)) == 3


# -- 4, 5. validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kw", "message"), [
    (dict(noise_step=1000), r"noise_step must be an int in \[0, 999\].*got 1000"),
    (dict(noise_step=-1), r"noise_step must be an int in \[0, 999\]"),
    (dict(noise_step=500.0), r"noise_step must be an int"),
    (dict(overflow="bogus"), r"overflow must be one of \('wrap', 'clamp'\).*got 'bogus'"),
    (dict(noise_seed="0"), r"noise_seed must be an int, or None"),
])
def test_dataset_rejects_bad_noise_options_at_construction(data, kw, message):
    train = data[0]
    with pytest.raises(ValueError, match=message):
        PreferenceDataset(train.records, train.image_folder, **kw)


@pytest.mark.parametrize(("kw", "message"), [
    (dict(beta=0.0), r"^invalid TPOConfig: beta must be a finite number > 0"),
    (dict(beta=-1.0), r"beta must be a finite number > 0.*got -1.0"),
    (dict(label_smoothing=0.7), r"label_smoothing must lie in \[0, 0.5\]"),
    (dict(label_smoothing=-0.1), r"label_smoothing must lie in \[0, 0.5\]"),
    (dict(loss_type="hinge", label_smoothing=0.1), r"label_smoothing only applies to loss_type='sigmoid'"),
    (dict(weighting="bogus"), r"weighting must be one of \('tpo', 'none'\)"),
    (dict(offset=float("nan")), r"offset must be a finite number >= 0"),
    (dict(loss_backend="bogus"), r"^invalid TPOConfig.loss_backend: backend must be one of"),
    (dict(povid_noise_weight=1.5), r"^invalid TPOConfig.povid_noise_weight: noise_weight must lie in \[0, 1\]"),
    (dict(noise_step=5000), r"^invalid TPOConfig: noise_step must be an int in \[0, 999\]"),
    (dict(noise_step=-3), r"noise_step must be an int in \[0, 999\]"),
    (dict(noise_overflow="bogus"), r"TPOConfig.noise_overflow must be one of"),
    (dict(max_length=0), r"TPOConfig.max_length must be None \(no limit\) or an int >= 1"),
    (dict(max_length=-5), r"TPOConfig.max_length must be None"),
    (dict(prompt_template="no placeholders"), r"TPOConfig.prompt_template must be a format string with '\{prompt\}'"),
    (dict(prompt_template="{prompt} {other}"), r"TPOConfig.prompt_template must be a format string"),
    (dict(average_log_prob="yes"), r"TPOConfig.average_log_prob must be True or False"),
    (dict(detach_weights=1), r"TPOConfig.detach_weights must be True or False"),
    (dict(noise_seed=None, corrupted_cache_dir="/tmp/x"), r"corrupted_cache_dir needs a seeded noise"),
    (dict(noise_seed=None, precompute_reference=True), r"precompute_reference=True needs seeded corruption"),
])
def test_config_rejects_nonsense_with_a_message_that_says_what_to_fix(kw, message):
    with pytest.raises(ValueError, match=message):
        TPOConfig(output_dir="unused", report_to="none", use_cpu=True, **kw)


def test_config_accepts_the_edges_of_each_domain():
    for kw in (dict(beta=1e-6), dict(label_smoothing=0.5), dict(offset=0.0), dict(noise_step=0), dict(noise_step=999),
               dict(max_length=1), dict(noise_seed=None), dict(loss_type="ipo"), dict(loss_backend="torch"),
               dict(prompt_template="Q {prompt} <image> A:")):
        TPOConfig(output_dir="unused", report_to="none", use_cpu=True, **kw)


# -- 6. the config's dataset fields are not applied by TPOTrainer: it says so -----------------------------


def test_trainer_warns_when_a_given_dataset_differs_from_the_config(data, tmp_path, caplog):
    train, eval4, _, proc = data
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        _trainer(proc, tmp_path / "same", train, eval4)
    assert "built with other settings" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        trainer = _trainer(proc, tmp_path / "other", train, {"x": eval4}, noise_step=999, noise_overflow="clamp",
                           bad_records="error", corrupted_cache_dir=str(tmp_path / "never"))
    messages = [r.getMessage() for r in caplog.records if "built with other settings" in r.getMessage()]
    assert len(messages) == 2 and "the train dataset" in messages[0] and "the eval/x dataset" in messages[1]
    for part in ("noise_step=999 (dataset: noise_step=500)", "noise_overflow='clamp' (dataset: overflow='wrap')",
                 "bad_records='error' (dataset: on_bad='skip')", "(dataset: corrupted_cache_dir=None)",
                 "TPOTrainer uses the dataset as it was built"):
        assert part in messages[0], part
    assert (trainer.train_dataset.noise_step, trainer.train_dataset.overflow) == (500, "wrap")  # used as built
    assert not os.path.exists(tmp_path / "never")


# -- 7. records without "index" -----------------------------------------------------------------------------


def test_records_without_index_are_numbered_by_position(tmp_path):
    Image.new("RGB", (28, 28), (255, 0, 0)).save(tmp_path / "a.png")
    records = [{"image": "a.png", "prompt": "what ?", "chosen": c, "rejected": "blue"} for c in ("red", "crimson")]
    ds = PreferenceDataset(records, tmp_path)
    assert [ds[i]["index"] for i in range(2)] == [0, 1] and ds[1]["chosen"] == "crimson"
    assert "index" not in records[0]  # the caller's records are left as they were
    broken = PreferenceDataset([{**records[0], "image": "gone.png"}], tmp_path, on_bad="error")
    with pytest.raises(RuntimeError, match="preference record #0 failed to load"):
        broken[0]
    with pytest.raises(RuntimeError, match="no preference record can be loaded any more: #0 failed with"):
        PreferenceDataset([{**records[0], "image": "gone.png"}], tmp_path)[0]
    with pytest.raises(ValueError, match=r"record 0 lacks \['prompt'\].*PreferenceDataset.from_file"):
        PreferenceDataset([{"image": "a.png", "question": "q", "chosen": "a", "rejected": "b"}], tmp_path)


# -- 8. TRL conversational records --------------------------------------------------------------------------

TRL_RECORD = {
    "images": ["img.png"],
    "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the image ?"}]}],
    "chosen": [{"role": "assistant",
                "content": [{"type": "text", "text": "a red"}, {"type": "text", "text": "circle ."}]}],
    "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "a blue square ."}]}],
}


def test_trl_conversational_records_are_read_like_plain_ones(tmp_path):
    fields, why = validate_record(TRL_RECORD, None, check_images=False)
    assert why is None
    assert fields == {"image": "img.png", "prompt": "what is in the image ?", "chosen": "a red circle .",
                      "rejected": "a blue square ."}
    # Through the collator: the same batch as the plain record with the image placeholder in its prompt.
    Image.new("RGB", (28, 28), (255, 0, 0)).save(tmp_path / "img.png")
    plain = {"image": "img.png", "question": "<image>\nwhat is in the image ?", "chosen": "a red circle .",
             "rejected": "a blue square ."}
    batches = []
    for name, record in (("trl", TRL_RECORD), ("plain", plain)):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(record) + "\n")
        records, bad = load_preference_records(tmp_path / f"{name}.jsonl", tmp_path, on_bad="error")
        batches.append(TPOCollator(tiny_processor())([PreferenceDataset(records, tmp_path)[0]]))
    for key in batches[1]:
        assert torch.equal(batches[0][key], batches[1][key]), key


def test_trl_parts_that_are_not_text_or_image_are_rejected_with_the_accepted_forms():
    record = copy.deepcopy(TRL_RECORD)
    record["prompt"][0]["content"].append({"type": "video"})
    fields, why = validate_record(record, None, check_images=False)
    assert fields is None
    assert "{'type': 'text', 'text': ...} / {'type': 'image'} parts" in why and "'video'" in why
    only_image = copy.deepcopy(TRL_RECORD)
    only_image["chosen"][0]["content"] = [{"type": "image"}]
    assert validate_record(only_image, None, check_images=False)[0] is None


# -- weights_digest -----------------------------------------------------------------------------------------


def test_weights_digest_sees_permuted_rows_and_columns_not_a_copy():
    """Swapping two rows (or columns) of lm_head keeps the sum and sum of squares: the position-weighted sum sees it."""
    model = tiny_model(tiny_processor())
    digest = weights_digest(model.named_parameters())
    assert weights_digest(copy.deepcopy(model).named_parameters()) == digest
    for index in ((slice(None),), ()):
        other = copy.deepcopy(model)
        with torch.no_grad():
            w = other.lm_head.weight
            where_a, where_b = (*index, [0, 1]), (*index, [1, 0])
            w[where_a] = w[where_b].clone()
        assert not torch.equal(other.lm_head.weight, model.lm_head.weight)
        assert weights_digest(other.named_parameters()) != digest, index


# -- evaluation metrics, the best model, tokens/s (a second review) ------------------------------------------


def _ref_trainer(proc, tmp_path, train, eval_dataset=None, **kw):
    """A trainer whose reference differs from the policy (seed 1), so that the rewards metrics are not all 0."""
    args = _args(tmp_path, per_device_eval_batch_size=2, per_device_train_batch_size=2, **kw)
    return TPOTrainer(tiny_model(proc), ref_model=tiny_model(proc, seed=1), args=args, train_dataset=train,
                      eval_dataset=eval_dataset, processing_class=proc)


def test_each_evaluation_reports_its_own_step_metrics_under_its_prefix(data, tmp_path):
    """predict() used to leave its step metrics to be averaged into the next evaluate() (and report none itself);
    evaluate(metric_key_prefix="val") reported them under "eval_"."""
    train, eval4, eval6, proc = data
    tr = _ref_trainer(proc, tmp_path, train)
    keys = ("rewards/accuracies", "rewards/margins", "logps/chosen")
    a = tr.evaluate(eval4)
    b = tr.evaluate(eval6)
    predicted = tr.predict(eval4).metrics
    assert {k: predicted[f"test_{k}"] for k in keys} == {k: a[f"eval_{k}"] for k in keys}
    again = tr.evaluate(eval6)
    assert {k: again[f"eval_{k}"] for k in keys} == {k: b[f"eval_{k}"] for k in keys}
    val = tr.evaluate(eval6, metric_key_prefix="val")
    assert {k: val[f"val_{k}"] for k in keys} == {k: b[f"eval_{k}"] for k in keys}
    assert not [k for k in val if k.startswith("eval_")], sorted(val)


def test_load_best_model_at_end_loads_the_best_checkpoint(data, tmp_path):
    """The base Trainer loaded the best checkpoint's legacy-keyed state dict as is and silently kept the last
    weights; the best checkpoint's weights must be the model's at the end."""
    from transformers import LlavaForConditionalGeneration

    train, eval4, _, proc = data
    tr = _ref_trainer(proc, tmp_path, train, eval4, max_steps=3, eval_strategy="steps", eval_steps=1,
                      save_strategy="steps", save_steps=1, load_best_model_at_end=True,
                      metric_for_best_model="eval_loss", greater_is_better=False, learning_rate=0.2,
                      detach_weights=True)
    tr.train()
    losses = [h["eval_loss"] for h in tr.state.log_history if "eval_loss" in h]
    best = tr.state.best_model_checkpoint
    assert best.endswith(f"checkpoint-{1 + losses.index(min(losses))}")
    final = dict(tr.model.state_dict())
    saved = LlavaForConditionalGeneration.from_pretrained(best).state_dict()
    assert max(float((final[k] - saved[k]).abs().max()) for k in saved) == 0
    assert best != str(tmp_path / "out" / "checkpoint-3")  # at this learning rate the last step overshoots
    last = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out" / "checkpoint-3").state_dict()
    assert max(float((final[k] - last[k]).abs().max()) for k in last) > 0


def test_tokens_per_second_counts_training_time_only(data, tmp_path, monkeypatch):
    """The clock of tokens/s started at the first compute_loss in any mode (an evaluate() before train() counted
    its time, and the wait after it); an evaluation inside a logging window is no training time either."""
    import tpo_fast.trainer.trainer as trainer_mod

    train, eval4, _, proc = data
    tr = _ref_trainer(proc, tmp_path, train)
    tr.evaluate(eval4)
    assert tr._time_of_log is None  # evaluation starts no training clock
    clock = iter([10.0, 25.0])  # the evaluation below starts at 10 and ends at 25 on a fake clock
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: next(clock))
    tr._time_of_log = 4.0  # a training window open since t = 4
    with tr._evaluation("eval"):
        pass
    assert tr._time_of_log == 4.0 + 15.0


def test_the_step_leaves_metrics_and_token_counts_on_the_device(data, tmp_path):
    """compute_loss read each metric (float()) and the token count (int()) back every step: on a GPU the host then
    waits for the forward to finish before it can queue the backward. Now they stay device tensors until a log
    averages them (one read-back per log); the logged means are the steps' own values."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    train, _, _, proc = data
    tr = _ref_trainer(proc, tmp_path, train)
    batch = tr._prepare_inputs(tr.data_collator([train[i] for i in range(2)]))

    class ReadsInTrainer(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] == "_local_scalar_dense":
                frames = [f for f in traceback.extract_stack() if "/tpo_fast/" in f.filename]
                if frames and frames[-1].filename.endswith("trainer/trainer.py"):
                    self.seen.append(f"{frames[-1].name}:{frames[-1].lineno}")
            return func(*args, **(kwargs or {}))

    tr.model.train()
    seen = []
    for _ in range(2):
        with ReadsInTrainer() as mode:
            tr.compute_loss(tr.model, batch)
        seen += mode.seen
    assert seen == []
    stored = tr._stored_metrics["train"]
    assert all(isinstance(v, torch.Tensor) and len(vs) == 2 for vs in stored.values() for v in vs)
    logs = tr._pop_metric_means("train", "")
    for key in ("rewards/margins", "logps/chosen"):
        assert logs[key] == pytest.approx(round(float(torch.stack(stored[key]).mean()), 6), abs=1e-6)
    assert int(tr._tokens_since_log) == 2 * int(batch["attention_mask"].sum())
