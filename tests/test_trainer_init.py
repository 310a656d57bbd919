"""tpo_fast/trainer/trainer.py where `TPOTrainer` is set up, each piece against what its docstring promises.

A mutation run of trainer.py (docs/testing.md) found these untested by the fast trainer tests: every `TPOConfig` loss
and packing option reaching the step (`StepOptions`) and the collator; the reference chosen for a `PeftModel` passed
as the model; the default and wrong `args`; what identifies a reference-cache table (processor, corruption settings,
size, the reference's weights through a wrapper, LoRA factors left out); a cache reused as is not being rewritten;
the warnings for datasets built with other settings and for low-precision trainable weights; the ZeRO-3 reload of
the policy's copy; and an evaluation's log inside a training window, which must not close that window.
"""

import logging
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from test_trainer import _args, _losses  # noqa: E402
from tiny_setup import lora_config, tiny_data, tiny_model, tiny_processor  # noqa: E402

from tpo_fast.trainer import trainer as trainer_mod  # noqa: E402
from tpo_fast.trainer.collator import TPOCollator  # noqa: E402
from tpo_fast.trainer.config import DEFAULT_PROMPT_TEMPLATE, TPOConfig  # noqa: E402
from tpo_fast.trainer.data import PreferenceDataset  # noqa: E402
from tpo_fast.trainer.model import StepOptions  # noqa: E402
from tpo_fast.trainer.reference_cache import config_digest, processor_identity, weights_digest  # noqa: E402
from tpo_fast.trainer.trainer import TPOTrainer, copy_of_policy  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    return tiny_data(str(root / "data"), num_images=4, seed=0), tiny_processor()


# -- the config reaches the step and the collator ----------------------------------------------------------


def test_every_step_option_of_the_config_reaches_the_step_and_the_collator(setup, tmp_path):
    """Each TPOConfig field the step reads, set away from StepOptions' default, is what the trainer's step uses;
    max_length and prompt_template reach the default collator."""
    ds, proc = setup
    template = "SYSTEM: answer briefly. " + DEFAULT_PROMPT_TEMPLATE
    args = _args(tmp_path, objective="povid", beta=0.25, weighting="none", offset=0.125, detach_weights=True,
                 povid_noise_weight=0.75, loss_type="ipo", label_smoothing=0.0, average_log_prob=True,
                 reference="none", loss_grad_mode="recompute", shared_prefix=False, padding_free=False,
                 lean_activations=False, max_length=300, prompt_template=template)
    trainer = TPOTrainer(tiny_model(proc), args=args, train_dataset=ds, processing_class=proc)
    want = StepOptions(objective="povid", beta=0.25, weighting="none", offset=0.125, detach_weights=True,
                       noise_weight=0.75, loss_type="ipo", label_smoothing=0.0, average_log_prob=True, reference="none",
                       backend="torch", grad_mode="recompute", shared_prefix=False, padding_free=False,
                       lean_activations=False)
    assert trainer.step_options == want
    defaults = StepOptions()
    for name in ("objective", "beta", "weighting", "offset", "detach_weights", "noise_weight", "loss_type",
                 "average_log_prob", "reference", "backend", "grad_mode", "shared_prefix", "padding_free",
                 "lean_activations"):
        assert getattr(want, name) != getattr(defaults, name), f"{name} is at its default: the case tests nothing"
    smoothing = TPOTrainer(tiny_model(proc), args=_args(tmp_path, label_smoothing=0.2), train_dataset=ds,
                           processing_class=proc)
    assert smoothing.step_options.label_smoothing == 0.2
    collator = trainer.data_collator
    assert isinstance(collator, TPOCollator) and collator.processor is proc
    assert (collator.max_length, collator.prompt_template) == (300, template)
    assert trainer.processing_class is proc


def test_args_none_gives_the_default_config_and_other_args_are_refused(setup, tmp_path, monkeypatch):
    from transformers import TrainerCallback, TrainingArguments

    ds, proc = setup
    monkeypatch.chdir(tmp_path)
    trainer = TPOTrainer(tiny_model(proc), train_dataset=ds, processing_class=proc)
    assert isinstance(trainer.args, TPOConfig) and trainer.args.output_dir == "tpo-output"
    with pytest.raises(TypeError, match=r"^args must be a TPOConfig, got TrainingArguments$"):
        TPOTrainer(tiny_model(proc), args=TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True),
                   train_dataset=ds, processing_class=proc)
    with pytest.raises(ValueError, match=r"^pass processing_class \(the LlavaProcessor\) or a data_collator$"):
        TPOTrainer(tiny_model(proc), args=_args(tmp_path), train_dataset=ds)
    with pytest.raises(ValueError, match=r"^precompute_reference=True needs a train_dataset$"):
        TPOTrainer(tiny_model(proc), args=_args(tmp_path, precompute_reference=True), processing_class=proc)

    class Marker(TrainerCallback):
        pass

    marker = Marker()
    with_callback = TPOTrainer(tiny_model(proc), args=_args(tmp_path), train_dataset=ds, processing_class=proc,
                               callbacks=[marker])
    assert marker in with_callback.callback_handler.callbacks


# -- which reference -------------------------------------------------------------------------------------


def test_reference_mode_follows_the_model_and_the_config(setup, tmp_path):
    """auto: the policy with its adapter disabled for a LoRA policy, whether given as peft_config or as a PeftModel;
    a frozen model otherwise (a copy of the policy, or the ref_model given, which then wins over the adapter)."""
    from peft import get_peft_model

    ds, proc = setup

    def make(model, **kw):
        return TPOTrainer(model, args=_args(tmp_path, reference=kw.pop("reference", "auto")), train_dataset=ds,
                          processing_class=proc, **kw)

    assert make(tiny_model(proc), peft_config=lora_config()).reference_mode == "adapter"
    given = make(get_peft_model(tiny_model(proc), lora_config()))  # a PeftModel, no peft_config
    assert given.reference_mode == "adapter" and given.ref_model is None
    ref = tiny_model(proc, seed=3)
    chosen = make(tiny_model(proc), peft_config=lora_config(), ref_model=ref)
    assert chosen.reference_mode == "model" and chosen.ref_model is ref
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    plain = make(tiny_model(proc))
    assert plain.reference_mode == "model" and plain.ref_model is not None
    assert make(tiny_model(proc), reference="none").ref_model is None
    with pytest.raises(ValueError, match=r"^reference='adapter' needs a LoRA adapter: pass peft_config or a "
                                         r"PeftModel$"):
        make(tiny_model(proc), reference="adapter")


def test_copy_of_a_zero3_policy_is_loaded_again_from_its_folder(setup, tmp_path):
    """Under ZeRO-3 (parameters carrying `ds_id`) the reference is a second load of the policy's folder, in the
    policy's dtype and attention implementation; without a folder the error says what to pass."""
    from transformers import LlavaForConditionalGeneration

    _, proc = setup
    folder = str(tmp_path / "policy")
    tiny_model(proc, seed=5).save_pretrained(folder)
    policy = LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").to(torch.bfloat16)
    for p in policy.parameters():
        p.ds_id = 0
    copy = copy_of_policy(policy)
    assert copy is not policy and copy.dtype == torch.bfloat16
    assert copy.config._attn_implementation == "eager"
    mine, theirs = policy.state_dict(), copy.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    for own, config in (("", folder), (folder, "")):  # the folder from either attribute
        policy.name_or_path, policy.config._name_or_path = own, config
        assert copy_of_policy(policy).dtype == torch.bfloat16
    policy.name_or_path = ""
    policy.config._name_or_path = str(tmp_path / "gone")
    with pytest.raises(ValueError, match=r"^under DeepSpeed ZeRO-3 the policy's weights are partitioned"):
        copy_of_policy(policy)
    plain = tiny_model(proc)
    copied = copy_of_policy(plain)  # no ZeRO-3: a deep copy
    assert copied is not plain
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), copied.state_dict().values(),
                                                 strict=True))


# -- what identifies a reference-cache table ---------------------------------------------------------------


def test_cache_settings_name_the_processor_and_the_collator_options(setup, tmp_path):
    ds, proc = setup
    args = _args(tmp_path, max_length=300, prompt_template="Q: <image>{prompt} A:")
    trainer = TPOTrainer(tiny_model(proc), args=args, train_dataset=ds, processing_class=proc)
    settings = trainer._cache_settings()
    assert settings["processor"] == processor_identity(proc) != processor_identity(None)
    assert (settings["max_length"], settings["prompt_template"]) == (300, "Q: <image>{prompt} A:")
    assert (settings["response_prefix"], settings["ignore_index"]) == (" ", -100)
    assert settings["collator"] == "tpo_fast.trainer.collator.TPOCollator"
    # without processing_class, the collator's processor identifies the table
    by_collator = TPOTrainer(tiny_model(proc), args=_args(tmp_path), train_dataset=ds, data_collator=TPOCollator(proc))
    assert by_collator._cache_settings()["processor"] == processor_identity(proc)
    # a collator given by the caller: its own settings, not the config's
    own = TPOCollator(proc, prompt_template="Q: <image>{prompt}\nA:", response_prefix="", max_length=28,
                      ignore_index=-1)
    mine = TPOTrainer(tiny_model(proc), args=args, train_dataset=ds, processing_class=proc, data_collator=own)
    got = mine._cache_settings()
    assert {k: got[k] for k in ("max_length", "prompt_template", "response_prefix", "ignore_index", "processor")} \
        == {"max_length": 28, "prompt_template": "Q: <image>{prompt}\nA:", "response_prefix": "", "ignore_index": -1,
            "processor": processor_identity(proc)}

    def bare_collator(items):
        return TPOCollator(proc)(items)

    # any other collator cannot be fingerprinted: a value new on every call, so its tables never match
    bare = TPOTrainer(tiny_model(proc), args=_args(tmp_path), train_dataset=ds, data_collator=bare_collator)
    one, two = bare._cache_settings(), bare._cache_settings()
    assert one["processor"] == processor_identity(None) and "max_length" not in one
    assert one["collator"] == f"{__name__}.test_cache_settings_name_the_processor_and_the_collator_options" \
        ".<locals>.bare_collator"
    assert one["unfingerprinted_collator"] != two["unfingerprinted_collator"]


def test_a_cache_is_not_reused_with_a_collator_it_cannot_fingerprint(setup, tmp_path, caplog):
    """A collator that is not a TPOCollator: every run scores its tables again, with a warning saying why; a
    TPOCollator with another max_length than the cached table's is another table."""
    ds, proc = setup
    cache = str(tmp_path / "ref.pt")

    def run(collator):
        args = _args(tmp_path / "out", precompute_reference=True, reference_cache=cache)
        return TPOTrainer(tiny_model(proc), args=args, train_dataset=ds, processing_class=proc,
                          data_collator=collator)

    run(TPOCollator(proc))
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        run(TPOCollator(proc, max_length=28))
        assert f"reference cache {cache}: the train table was made with other settings or data; recomputing it" \
            in caplog.text
        caplog.clear()
        for _ in range(2):
            run(lambda items: TPOCollator(proc)(items))
            assert f"reference cache {cache}: the data_collator ({__name__}." in caplog.text
            assert ") is not a TPOCollator, whose settings the cache's fingerprint cannot see: every table is scored " \
                "again and never reused" in caplog.text
            assert "the train table was made with other settings or data; recomputing it" in caplog.text
            caplog.clear()


def test_dataset_fingerprint_holds_the_corruption_settings_and_size(setup, tmp_path):
    """noise_step, noise_seed and overflow of the dataset (under Subsets), its size and its records' digest."""
    ds, _ = setup
    other = PreferenceDataset(ds.records, ds.image_folder, noise_step=123, noise_seed=7, overflow="clamp")
    sub = torch.utils.data.Subset(other, [2, 0, 1])
    got = TPOTrainer._dataset_fingerprint(sub)
    assert {k: got[k] for k in ("noise_step", "noise_seed", "overflow", "size")} == dict(
        noise_step=123, noise_seed=7, overflow="clamp", size=3)
    base = TPOTrainer._dataset_fingerprint(ds)
    assert (base["noise_step"], base["noise_seed"], base["overflow"], base["size"]) == (500, 0, "wrap", len(ds))
    assert got["records"] != base["records"]
    plain = TPOTrainer._dataset_fingerprint([ds[0], ds[1]])
    assert (plain["noise_step"], plain["noise_seed"], plain["overflow"], plain["size"]) == (None, None, None, 2)
    # a ConcatDataset (under a Subset, holding Subsets): each dataset's settings, in order, and the records'
    # digest of the same records in one dataset when the parts are one dataset's
    first = PreferenceDataset(ds.records[:2], ds.image_folder, noise_step=100, noise_seed=3)
    second = PreferenceDataset(ds.records[2:], ds.image_folder, noise_step=200, noise_seed=4, overflow="clamp")
    concat = torch.utils.data.ConcatDataset([torch.utils.data.Subset(first, [0, 1]), second])
    got = TPOTrainer._dataset_fingerprint(torch.utils.data.Subset(concat, [0, 1, 2, 3]))
    assert {k: got[k] for k in ("noise_step", "noise_seed", "overflow", "size")} == dict(
        noise_step=[100, 200], noise_seed=[3, 4], overflow=["wrap", "clamp"], size=4)
    assert got["records"] == base["records"]
    same = torch.utils.data.ConcatDataset([PreferenceDataset(ds.records[:2], ds.image_folder, noise_step=123),
                                           PreferenceDataset(ds.records[2:], ds.image_folder, noise_step=123)])
    got = TPOTrainer._dataset_fingerprint(same)
    assert (got["noise_step"], got["noise_seed"], got["overflow"]) == ([123, 123], [0, 0], ["wrap", "wrap"])


def test_fresh_noise_under_a_concat_dataset_is_refused_and_its_settings_warn(setup, tmp_path, caplog):
    """precompute_reference=True refuses noise_seed=None in any dataset under a ConcatDataset (nested, in a Subset),
    as it does for a PreferenceDataset; the settings warning reads each of them."""
    ds, proc = setup
    fresh = PreferenceDataset(ds.records[2:], ds.image_folder, noise_seed=None)
    inner = torch.utils.data.ConcatDataset([torch.utils.data.Subset(fresh, [1, 0])])
    concat = torch.utils.data.ConcatDataset([PreferenceDataset(ds.records[:2], ds.image_folder), inner])
    args = _args(tmp_path, precompute_reference=True, reference_cache=str(tmp_path / "ref.pt"))
    with caplog.at_level(logging.WARNING, logger="tpo_fast"), pytest.raises(ValueError, match=re.escape(
            "precompute_reference=True needs seeded corruption (the train dataset's noise_seed must not be None): "
            "with fresh noise every load the cached reference would not match the corrupted image trained on")):
        TPOTrainer(tiny_model(proc), args=args, train_dataset=torch.utils.data.Subset(concat, [3, 0]),
                   processing_class=proc)
    assert "the train dataset was built with other settings than TPOConfig's noise_seed=0 (dataset: " \
        "noise_seed=None); TPOTrainer uses the dataset as it was built" in caplog.text


def test_reference_digest_reads_the_reference_and_leaves_lora_factors_out(setup, tmp_path):
    """reference='model': the reference's weights (inside a wrapper's `.module`, as a DeepSpeed engine holds them);
    reference='adapter': the policy's weights without its LoRA factors, so training the adapter keeps the digest and
    a changed base weight changes it."""
    ds, proc = setup
    ref = tiny_model(proc, seed=2)
    trainer = TPOTrainer(tiny_model(proc), ref_model=ref, args=_args(tmp_path), train_dataset=ds,
                         processing_class=proc)
    assert trainer._reference_digest() == weights_digest(ref.named_parameters())

    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    trainer.ref_model = Engine(ref)
    assert trainer._reference_digest() == weights_digest(ref.named_parameters())
    # the reference's config too: the same weights under another config score otherwise
    first = trainer._cache_settings()["reference_config"]
    assert first == config_digest(ref.config)
    ref.config.vision_feature_layer = -1 if ref.config.vision_feature_layer != -1 else -2
    assert trainer._cache_settings()["reference_config"] == config_digest(ref.config) != first
    assert trainer._reference_digest() == weights_digest(ref.named_parameters())

    lora = TPOTrainer(tiny_model(proc), peft_config=lora_config(), args=_args(tmp_path), train_dataset=ds,
                      processing_class=proc)
    named = dict(lora.model.named_parameters())
    base = [(n, p) for n, p in named.items() if "lora_" not in n]
    assert len(base) < len(named)
    before = lora._reference_digest()
    assert before == weights_digest(base)
    with torch.no_grad():
        next(p for n, p in named.items() if "lora_B" in n).add_(1.0)
        assert lora._reference_digest() == before
        next(p for n, p in base if "embed_tokens" in n).mul_(2.0)
    assert lora._reference_digest() != before
    assert lora._cache_settings()["reference_config"] == config_digest(lora.model.get_base_model().config)


def test_a_reused_cache_is_not_written_again_and_only_a_stale_table_warns(setup, tmp_path, monkeypatch, caplog):
    """The first run scores and writes without a staleness warning; a run with the same settings loads the table and
    writes nothing; a run with another offset warns that the table is recomputed, and writes. A dataset that is a
    plain list of items (no noise_seed attribute) is accepted and scored like the dataset it came from."""
    ds, proc = setup
    cache = str(tmp_path / "ref.pt")
    saves = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, path, *a, **k: (saves.append(path), real_save(obj, path, *a, **k)))

    def run(name, dataset=ds, **kw):
        args = _args(tmp_path / name, precompute_reference=True, reference_cache=cache, **kw)
        return TPOTrainer(tiny_model(proc), args=args, train_dataset=dataset, processing_class=proc)

    with caplog.at_level(logging.INFO, logger="tpo_fast"):
        first = run("a")._ref_table.clone()
        # written into a temporary file beside the cache, then renamed over it (none left behind)
        assert [os.path.dirname(p) for p in saves] == [str(tmp_path)] and saves[0] != cache
        assert sorted(os.listdir(tmp_path)) == ["a", "ref.pt"] and "recomputing it" not in caplog.text
        caplog.clear()
        again = run("b")._ref_table
        assert len(saves) == 1 and torch.equal(again, first)
        assert "loaded from" in caplog.text and "recomputing it" not in caplog.text
        cached = run("b2")
        run("c", offset=0.25)
        assert len(saves) == 2
        assert f"reference cache {cache}: the train table was made with other settings or data; recomputing it" \
            in caplog.text
    listed = TPOTrainer(tiny_model(proc), args=_args(tmp_path / "d", precompute_reference=True,
                                                     reference_cache=str(tmp_path / "list.pt")),
                        train_dataset=[ds[i] for i in range(len(ds))], processing_class=proc)
    torch.testing.assert_close(listed._ref_table, first, rtol=1e-6, atol=1e-6)
    # a training batch's reference scores: float32, the chosen rows' then the rejected rows', by record index
    batch = cached.data_collator([ds[3], ds[1]])
    scores = cached._reference_scores(batch)
    assert scores.dtype == torch.float32 and scores.device == batch["input_ids"].device
    assert torch.equal(scores, first[[3, 1]].t().reshape(-1).float())
    batch["index"] = torch.tensor([3, 99])
    with pytest.raises(ValueError, match=re.escape(f"records [99] are not in the reference cache's 'train' table "
                                                   f"({cache}, 4 records scored at TPOTrainer init)")):
        cached._reference_scores(batch)
    with pytest.raises(ValueError, match=re.escape("precompute_reference=True: no reference table for this evaluation; "
                                                   "evaluate through trainer.evaluate() / trainer.predict() on a "
                                                   "dataset given to TPOTrainer (train or eval_dataset)")):
        cached._reference_scores(batch, training=False)  # an eval batch outside evaluate() / predict()


def test_records_indexed_by_large_ids_are_scored_and_looked_up(setup, tmp_path):
    """Record indices as large as corpus ids (3e9): the reference table holds the records present, and a batch's
    reference scores are those of a run over the same records indexed 0, 1."""
    ds, proc = setup
    records = [dict(ds.records[0], index=3_000_000_000), dict(ds.records[1], index=7)]

    def run(name, recs):
        args = _args(tmp_path / name, precompute_reference=True, reference_cache=str(tmp_path / f"{name}.pt"))
        return TPOTrainer(tiny_model(proc), args=args, train_dataset=PreferenceDataset(recs, ds.image_folder),
                          processing_class=proc)

    big = run("big", records)
    small = run("small", [dict(r, index=i) for i, r in enumerate(records)])
    assert big._ref_table.shape == (2, 2)
    items = [big.train_dataset[1], big.train_dataset[0]]
    torch.testing.assert_close(big._reference_scores(big.data_collator(items)),
                               small._reference_scores(small.data_collator([small.train_dataset[1],
                                                                            small.train_dataset[0]])))


def test_an_unreadable_cache_file_is_recomputed_with_a_warning_naming_it(setup, tmp_path, caplog):
    """A cache file left empty or truncated (a run killed while writing it) is ignored with a warning naming it: the
    tables are scored again, equal to a fresh run's, and the file replaced by a readable one."""
    ds, proc = setup
    cache = tmp_path / "ref.pt"

    def run():
        args = _args(tmp_path / "out", precompute_reference=True, reference_cache=str(cache))
        return TPOTrainer(tiny_model(proc), args=args, train_dataset=ds, processing_class=proc)._ref_table

    first = run().clone()
    whole = cache.read_bytes()
    for content in (b"", whole[: len(whole) // 2]):
        cache.write_bytes(content)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tpo_fast"):
            assert torch.equal(run(), first)
        assert f"reference cache {cache} cannot be read (" in caplog.text
        assert "); ignoring it and recomputing every table" in caplog.text
        assert cache.read_bytes() != content and torch.load(cache, weights_only=True)["index"].numel() == len(ds)


# -- warnings --------------------------------------------------------------------------------------------


def test_dataset_settings_warning_compares_cache_folders_as_paths_and_checks_every_dataset(setup, tmp_path,
                                                                                           monkeypatch, caplog):
    ds, proc = setup
    monkeypatch.chdir(tmp_path)
    cached = PreferenceDataset(ds.records, ds.image_folder, noise_seed=0, corrupted_cache_dir="noisy")

    def warnings(train, eval_dataset=None, **kw):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tpo_fast"):
            TPOTrainer(tiny_model(proc), args=_args(tmp_path, **kw), train_dataset=train, eval_dataset=eval_dataset,
                       processing_class=proc)
        return [r.getMessage() for r in caplog.records if "was built with other settings" in r.getMessage()]

    assert warnings(cached, corrupted_cache_dir=str(tmp_path / "noisy")) == []  # the same folder, written two ways
    other = warnings(cached, corrupted_cache_dir=str(tmp_path / "elsewhere"))
    assert len(other) == 1 and f"corrupted_cache_dir={str(tmp_path / 'elsewhere')!r}" in other[0]
    # a train set that is no PreferenceDataset does not stop the eval set's check
    seeded = PreferenceDataset(ds.records, ds.image_folder, noise_seed=9)
    got = warnings([ds[0]], seeded)
    assert len(got) == 1 and got[0].startswith("the eval dataset was built with other settings than TPOConfig's "
                                               "noise_seed=0 (dataset: noise_seed=9)")


def test_low_precision_trainable_weights_warn_with_their_dtype(setup, tmp_path, caplog):
    ds, proc = setup
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        TPOTrainer(tiny_model(proc).to(torch.bfloat16), args=_args(tmp_path), train_dataset=ds, processing_class=proc)
    assert "trainable weights are bfloat16 and the optimizer updates them in place" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        TPOTrainer(tiny_model(proc), args=_args(tmp_path), train_dataset=ds, processing_class=proc)
    assert "trainable weights are" not in caplog.text


# -- logging windows -------------------------------------------------------------------------------------


def test_an_evaluation_log_inside_a_training_window_leaves_the_window_open(setup, tmp_path, monkeypatch):
    """tokens/s and peak memory go into training logs only: an eval log while a training window is open neither
    reports them nor resets the window's token count and start; the next training log reports and resets both."""
    ds, proc = setup
    trainer = TPOTrainer(tiny_model(proc), args=_args(tmp_path), train_dataset=ds, processing_class=proc)
    monkeypatch.setattr(trainer_mod, "peak_memory_mb", lambda: 123.456)
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: 1000.3)
    trainer._time_of_log, trainer._tokens_since_log = 1000.0, torch.tensor(100)
    trainer.log({"eval_loss": 0.5})
    assert "tokens_per_second" not in trainer.state.log_history[-1]
    assert trainer._time_of_log == 1000.0 and int(trainer._tokens_since_log) == 100
    trainer.log({"loss": 0.7})
    logged = trainer.state.log_history[-1]
    assert (logged["tokens_per_second"], logged["peak_memory_mb"]) == (round(100 / 0.3, 2), 123.5)  # 333.33
    assert trainer._time_of_log == 1000.3 and trainer._tokens_since_log == 0


def test_logs_reduce_tokens_and_metric_means_over_ranks(setup, tmp_path, monkeypatch):
    """With several processes the window's token count is summed over ranks and each metric's mean averaged over
    ranks (accelerate's reduce, here standing in for two ranks that saw the same values)."""
    ds, proc = setup
    trainer = TPOTrainer(tiny_model(proc), args=_args(tmp_path), train_dataset=ds, processing_class=proc)
    calls = []

    def reduce(tensor, reduction="sum"):
        calls.append(reduction)
        return tensor * 2 if reduction == "sum" else tensor + 1  # what two ranks give: a sum, a mean (here shifted)

    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    monkeypatch.setattr(trainer.accelerator, "reduce", reduce)
    monkeypatch.setattr(trainer_mod.time, "perf_counter", lambda: 1000.5)
    trainer._time_of_log, trainer._tokens_since_log = 1000.0, torch.tensor(100)
    trainer._stored_metrics["train"]["rewards/margins"] += [torch.tensor(0.25), torch.tensor(0.75)]
    trainer.log({"loss": 0.7})
    logged = trainer.state.log_history[-1]
    assert sorted(calls) == ["mean", "sum"]
    assert logged["tokens_per_second"] == 400.0 and logged["rewards/margins"] == 1.5


def test_evaluate_with_a_dict_scores_the_datasets_given_and_compute_loss_can_return_its_outputs(setup, tmp_path):
    """evaluate(eval_dataset={...}) evaluates that dict, not the trainer's own; compute_loss(return_outputs=True)
    gives the loss with the step's outputs."""
    ds, proc = setup
    trainer = TPOTrainer(tiny_model(proc), args=_args(tmp_path), train_dataset=ds,
                         eval_dataset={"a": ds, "b": torch.utils.data.Subset(ds, [0, 1])}, processing_class=proc)
    metrics = trainer.evaluate(eval_dataset={"c": torch.utils.data.Subset(ds, [2, 3])})
    assert "eval_c_loss" in metrics and not any(k.startswith(("eval_a_", "eval_b_")) for k in metrics)
    batch = trainer.data_collator([ds[0], ds[1]])
    loss, out = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    assert loss is out["loss"] and loss.ndim == 0 and "rewards/margins" in out["metrics"]
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(loss.item(), rel=1e-6)


def test_a_model_path_loads_in_the_training_dtype_and_the_log_names_the_trunk_forwards(setup, tmp_path, caplog):
    """A folder path is loaded with `training_weight_dtype`: a bf16 base under a LoRA adapter with bf16=True, fp32
    weights for full fine-tuning; the init log says whether the trunk forwards share the prefix and drop padding."""
    ds, proc = setup
    folder = str(tmp_path / "policy")
    tiny_model(proc).save_pretrained(folder)
    with caplog.at_level(logging.INFO, logger="tpo_fast"):
        lora = TPOTrainer(folder, peft_config=lora_config(), args=_args(tmp_path, bf16=True), train_dataset=ds,
                          processing_class=proc)
    dtypes = {n: p.dtype for n, p in lora.model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert "trunk forwards: shared_prefix=True, padding_free=True" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tpo_fast"):
        full = TPOTrainer(folder, args=_args(tmp_path, bf16=True, shared_prefix=False, padding_free=False),
                          train_dataset=ds, processing_class=proc)
    assert {p.dtype for p in full.model.parameters()} == {torch.float32}
    assert "trunk forwards: shared_prefix=False, padding_free=False" in caplog.text


# -- module-level helpers --------------------------------------------------------------------------------


def test_default_attention_is_flash_attention_only_on_cuda_with_flash_attn_and_unpacked(monkeypatch):
    import types

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert trainer_mod.default_attn_implementation() == "flash_attention_2"
    assert trainer_mod.default_attn_implementation(packed=True) == "sdpa"  # a packed step needs a 4D mask
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    assert trainer_mod.default_attn_implementation() == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert trainer_mod.default_attn_implementation() == "sdpa"


def test_submodel_classes_are_looked_up_for_the_text_and_vision_configs(setup, tmp_path, monkeypatch):
    """The lazy model mapping is asked for the class of each sub-config (which imports its module) before a ZeRO-3
    load; a config without a vision part asks for the text model's only."""
    from transformers.models.auto import modeling_auto

    _, proc = setup
    folder = str(tmp_path / "llava")
    model = tiny_model(proc)
    model.save_pretrained(folder)
    asked = []

    class Mapping(dict):
        def __getitem__(self, key):
            asked.append(key.__name__)
            return object

    mapping = Mapping({type(model.config.text_config): 1, type(model.config.vision_config): 2})
    monkeypatch.setattr(modeling_auto, "MODEL_MAPPING", mapping)
    trainer_mod.import_submodel_classes(folder)
    assert asked == [type(model.config.text_config).__name__, type(model.config.vision_config).__name__]
    asked.clear()
    text_folder = str(tmp_path / "text")
    model.config.text_config.save_pretrained(text_folder)
    trainer_mod.import_submodel_classes(text_folder)  # a text config: no text_config / vision_config inside
    assert asked == []


def test_peak_memory_on_the_cpu_is_the_resident_high_water_mark_in_mib():
    with open("/proc/self/status") as f:
        vm_hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    assert trainer_mod.peak_memory_mb() == pytest.approx(vm_hwm_kib / 1024, rel=0.02)


def test_load_best_model_at_end_with_a_lora_adapter_loads_the_best_adapter(setup, tmp_path):
    """A PEFT model keeps the base Trainer's loading of the best checkpoint (adapter files only, no full model to
    load through from_pretrained): at the end the adapter's weights are the best checkpoint's."""
    from safetensors.torch import load_file

    ds, proc = setup
    args = _args(tmp_path, max_steps=3, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                 load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
                 learning_rate=0.05, logging_steps=1, detach_weights=True)
    trainer = TPOTrainer(tiny_model(proc), peft_config=lora_config(), args=args, train_dataset=ds, eval_dataset=ds,
                         processing_class=proc)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert best.endswith(f"checkpoint-{1 + losses.index(min(losses))}")
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    final = {n.replace(".default", ""): p.detach() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in saved)


def test_resuming_a_lora_run_continues_from_the_checkpoints_adapter(setup, tmp_path):
    """A PEFT checkpoint holds the adapter only: resuming goes through the base Trainer's loading (not the full-model
    `from_pretrained` path), and the resumed run's second step and final adapter are the uninterrupted run's."""
    ds, proc = setup
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, learning_rate=0.05, logging_steps=1,
                 detach_weights=True)

    def adapter(trainer):
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}

    torch.manual_seed(0)
    full = TPOTrainer(tiny_model(proc), peft_config=lora_config(), args=args, train_dataset=ds, processing_class=proc)
    full.train()
    torch.manual_seed(1)  # another random adapter: the checkpoint's must replace it
    resumed = TPOTrainer(tiny_model(proc), peft_config=lora_config(), args=args, train_dataset=ds,
                         processing_class=proc)
    assert not all(torch.equal(a, b) for a, b in zip(adapter(resumed).values(), adapter(full).values(), strict=True))
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    assert _losses(resumed) == pytest.approx(_losses(full), rel=1e-5)
    want = adapter(full)
    for name, value in adapter(resumed).items():
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_training_weight_dtype_keeps_fp32_where_no_master_weights_exist():
    """Full fine-tuning without DeepSpeed: fp32 whatever bf16 says; LoRA or DeepSpeed: bf16 with bf16=True, else the
    checkpoint's dtype (None)."""
    f32, b16 = torch.float32, torch.bfloat16
    got = {(bf16, lora, ds): trainer_mod.training_weight_dtype(bf16, lora, ds)
           for bf16 in (False, True) for lora in (False, True) for ds in (False, True)}
    assert got == {(False, False, False): f32, (True, False, False): f32, (False, True, False): None,
                   (True, True, False): b16, (False, False, True): None, (True, False, True): b16,
                   (False, True, True): None, (True, True, True): b16}


def test_a_rank_without_a_record_of_its_own_scores_as_many_batches_as_the_others(setup, tmp_path, monkeypatch):
    """Precomputing the reference with fewer records than ranks (a 1-record eval dataset on 2 processes): the rank
    past the last record scores that record again, so every rank runs the same number of batches (ZeRO-3's gathers
    are collectives) and none fails on an empty share. A dataset without records is a clear error."""
    ds, proc = setup
    trainer = TPOTrainer(tiny_model(proc), args=_args(tmp_path), train_dataset=ds, processing_class=proc)
    one = torch.utils.data.Subset(ds, [2])
    scored = []

    def score(batch):
        scored.append(batch["index"].tolist())
        return torch.arange(2.0 * batch["index"].numel())  # (2B,): chosen, then rejected

    monkeypatch.setattr(trainer, "_reference_scorer", lambda: score)
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    monkeypatch.setattr(type(trainer.accelerator), "process_index", property(lambda self: 1))
    monkeypatch.setattr(trainer.accelerator, "gather", lambda t: torch.cat([t, t]))  # rank 0 scored the same record
    table = trainer._score_dataset(one)
    record = ds[2]["index"]
    assert scored == [[record]]
    assert table["index"].tolist() == [record, record] and table["scores"].tolist() == [[0.0, 1.0]] * 2
    with pytest.raises(ValueError, match="the train dataset has no records to score"):
        TPOTrainer(tiny_model(proc), args=_args(tmp_path, precompute_reference=True),
                   train_dataset=torch.utils.data.Subset(ds, []), processing_class=proc)


def test_the_seed_decides_a_lora_adapters_initial_weights(setup, tmp_path):
    """The adapter is added before the base Trainer's own seeding: its A factors followed whatever the process's
    generator held (two runs of one command trained different adapters, and the reference modes, equal at the first
    step, differed in their gradient norms). Now `args.seed` decides them, whatever was drawn before."""
    ds, proc = setup

    def lora_a(seed, draw):
        torch.manual_seed(draw)
        torch.rand(7)  # the process's generator somewhere else
        trainer = TPOTrainer(tiny_model(proc), args=_args(tmp_path, seed=seed), peft_config=lora_config(),
                             train_dataset=ds, processing_class=proc)
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n}

    first, again, other = lora_a(1, draw=11), lora_a(1, draw=12), lora_a(2, draw=11)
    assert first and set(first) == set(again) == set(other)
    for name, value in first.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=0)
    assert any(not torch.equal(other[name], value) for name, value in first.items())


def test_a_language_model_without_sdpa_loads_eager_by_default(tmp_path, caplog):
    """A LLaVA whose language model has no SDPA attention (Gemma2, whose scores are soft-capped) failed to load by
    path under the default attention, "sdpa" (`tpo-fast train --model DIR`); it now loads eager, with a warning (eager
    packs it exactly, the soft cap applied under the packed mask: tests/test_packing_edges.py). An implementation the
    caller names is not replaced: transformers' error stands."""
    from transformers import CLIPVisionConfig, Gemma2Config, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, attn_logit_softcapping=0.5,
                        layer_types=["full_attention"] * 2)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14)
    LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=63)
                                  ).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        model = trainer_mod.load_llava(str(tmp_path), packed=True)
    assert model.config.text_config._attn_implementation == "eager"
    assert "does not support an attention implementation through torch.nn.functional.scaled_dot_product_attention" \
        in caplog.text and "trying attn_implementation='eager'" in caplog.text
    with pytest.raises(ValueError, match="does not support"):
        trainer_mod.load_llava(str(tmp_path), attn_implementation="sdpa")
