"""tpo_fast/trainer/config.py: `TPOConfig`'s option checks one by one (every documented value accepted, one
outside refused by name), its defaults (non-reentrant checkpointing, CPU without an accelerator, bf16 off where
the device lacks it), and the device probes behind them."""

import logging
import re
import types
import warnings

import pytest
import torch

from tpo_fast.trainer import config as config_module
from tpo_fast.trainer.config import TPOConfig


def _config(tmp_path, **kw):
    return TPOConfig(output_dir=str(tmp_path), report_to="none", **kw)


CHOICES = {
    "objective": ("tpo", "dpo", "povid"),
    "reference": ("auto", "model", "adapter", "none"),
    "loss_type": ("sigmoid", "hinge", "ipo"),
    "noise_overflow": ("wrap", "clamp"),
    "bad_records": ("skip", "error"),
    "loss_grad_mode": ("auto", "fused", "recompute"),
}


@pytest.mark.parametrize("name", list(CHOICES))
def test_each_choice_takes_its_values_and_refuses_others(tmp_path, name):
    for value in CHOICES[name]:
        assert getattr(_config(tmp_path, **{name: value}), name) == value
    with pytest.raises(ValueError, match="^" + re.escape(f"TPOConfig.{name} must be one of {CHOICES[name]!r}, got "
                                                         "'other'") + "$"):
        _config(tmp_path, **{name: "other"})


def test_flags_must_be_booleans(tmp_path):
    for name in ("shared_prefix", "lean_activations", "detach_weights", "average_log_prob", "precompute_reference"):
        for value in (True, False):
            assert getattr(_config(tmp_path, **{name: value}), name) is value
        with pytest.raises(ValueError, match=rf"^TPOConfig\.{name} must be True or False, got 1$"):
            _config(tmp_path, **{name: 1})
    for value in (None, True, False):
        assert _config(tmp_path, padding_free=value).padding_free is value
    with pytest.raises(ValueError, match=r"^TPOConfig\.padding_free must be None, True or False, got 'auto'$"):
        _config(tmp_path, padding_free="auto")


def test_reference_options_that_contradict_each_other(tmp_path, caplog):
    with pytest.raises(ValueError, match=r"^precompute_reference=True needs a reference; reference='none' has none$"):
        _config(tmp_path, precompute_reference=True, reference="none")
    assert _config(tmp_path, precompute_reference=True, reference="model").precompute_reference
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        _config(tmp_path, reference_cache=str(tmp_path / "c.pt"))
        _config(tmp_path, reference_cache=str(tmp_path / "d.pt"), precompute_reference=True)
        _config(tmp_path, detach_weights=True, objective="dpo")
        _config(tmp_path, detach_weights=True, objective="tpo")
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        f"TPOConfig.reference_cache={str(tmp_path / 'c.pt')!r} is unused without precompute_reference=True",
        "TPOConfig.detach_weights=True has no effect with objective='dpo' (TPO only: DPO has no corrupted branch, "
        "POVID's never carries gradient)",
    ]


def test_checkpointing_defaults_to_non_reentrant_unless_set(tmp_path):
    # transformers 5 renamed the field
    fields = TPOConfig.__dataclass_fields__
    name = "activation_checkpointing_kwargs" if "activation_checkpointing_kwargs" in fields else (
        "gradient_checkpointing_kwargs")
    assert getattr(_config(tmp_path), name) == {"use_reentrant": False}
    assert getattr(_config(tmp_path, **{name: {"use_reentrant": True}}), name) == {"use_reentrant": True}


NEW_NAMES = "activation_checkpointing" in TPOConfig.__dataclass_fields__  # transformers 5.2x renamed the fields


@pytest.mark.parametrize("value", [True, False])
def test_gradient_checkpointing_keeps_its_name_without_a_deprecation_warning(tmp_path, value):
    """The documented `gradient_checkpointing(_kwargs)` work on every transformers: where it has the new
    `activation_checkpointing(_kwargs)` names, the values move there (what transformers' alias does), with none
    of its FutureWarnings, and both names read the value."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = _config(tmp_path, gradient_checkpointing=value, gradient_checkpointing_kwargs={"use_reentrant": True})
    assert [str(w.message) for w in caught if "checkpointing" in str(w.message)] == []
    assert (a.gradient_checkpointing, a.gradient_checkpointing_kwargs) == (value, {"use_reentrant": True})
    if NEW_NAMES:
        assert (a.activation_checkpointing, a.activation_checkpointing_kwargs) == (value, {"use_reentrant": True})


@pytest.mark.skipif(not NEW_NAMES, reason="this transformers has no activation_checkpointing field")
def test_a_value_under_the_new_name_wins_as_in_transformers(tmp_path):
    a = _config(tmp_path, gradient_checkpointing=True, activation_checkpointing=False,
                gradient_checkpointing_kwargs={"use_reentrant": True})
    assert (a.activation_checkpointing, a.gradient_checkpointing) == (False, False)
    assert a.activation_checkpointing_kwargs == a.gradient_checkpointing_kwargs == {"use_reentrant": True}
    b = _config(tmp_path, activation_checkpointing=True)
    assert (b.activation_checkpointing, b.gradient_checkpointing) == (True, True)
    assert b.activation_checkpointing_kwargs == {"use_reentrant": False}


def test_device_defaults(tmp_path, monkeypatch, caplog):
    """No accelerator: the CPU, with bf16 kept (CPU autocast has it). An accelerator without bf16: bf16 off with a
    warning, on the accelerator; with it, bf16 kept. `ACCELERATE_USE_CPU` counts as the CPU."""
    monkeypatch.setattr(config_module, "has_accelerator", lambda: False)
    cpu = _config(tmp_path, bf16=True)
    assert cpu.use_cpu and cpu.bf16
    monkeypatch.setattr(config_module, "has_accelerator", lambda: True)
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_torch_bf16_gpu_available", lambda: False)
    assert config_module.bf16_supported(False) is False and config_module.bf16_supported(True) is True
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert config_module._env_cpu()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "0")
    assert not config_module._env_cpu()
    monkeypatch.setattr(transformers.utils, "is_torch_bf16_gpu_available", lambda: True)
    assert config_module.bf16_supported(False) is True
    # the config on a machine with an accelerator that lacks bf16 (TrainingArguments' own device checks skipped)
    monkeypatch.setattr(transformers.utils, "is_torch_bf16_gpu_available", lambda: False)
    monkeypatch.setattr(config_module.TrainingArguments, "__post_init__", lambda self: None)
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        gpu = _config(tmp_path, bf16=True, bf16_full_eval=True)
    assert (gpu.use_cpu, gpu.bf16, gpu.bf16_full_eval) == (False, False, False)
    assert "bf16=True but this GPU does not support bf16: training in fp32" in caplog.text


def test_has_accelerator_asks_torch_accelerator_then_cuda(monkeypatch):
    monkeypatch.setattr(torch, "accelerator", types.SimpleNamespace(is_available=lambda: True), raising=False)
    assert config_module.has_accelerator() is True
    monkeypatch.setattr(torch, "accelerator", types.SimpleNamespace(is_available=lambda: False), raising=False)
    assert config_module.has_accelerator() is False
    monkeypatch.setattr(torch, "accelerator", types.SimpleNamespace(), raising=False)  # an older torch's module
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert config_module.has_accelerator() is True
    monkeypatch.delattr(torch, "accelerator")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert config_module.has_accelerator() is False


def test_data_and_loss_options_are_checked_where_they_are_set(tmp_path):
    """The options the trainer hands to the data, the collator and the loss, refused at construction with the
    reason, not at the first step."""
    cache = str(tmp_path / "corrupted")
    assert _config(tmp_path, corrupted_cache_dir=cache, noise_seed=3).corrupted_cache_dir == cache
    with pytest.raises(ValueError, match=r"^TPOConfig\.corrupted_cache_dir needs a seeded noise"):
        _config(tmp_path, corrupted_cache_dir=cache, noise_seed=None)
    assert _config(tmp_path, noise_seed=None).noise_seed is None  # fresh noise alone is fine
    with pytest.raises(ValueError, match=r"^TPOConfig\.precompute_reference=True needs seeded corruption"):
        _config(tmp_path, precompute_reference=True, noise_seed=None)
    with pytest.raises(ValueError, match=r"^invalid TPOConfig: noise_seed must be an int"):
        _config(tmp_path, noise_seed=True)
    for length in (None, 1, 512):
        assert _config(tmp_path, max_length=length).max_length == length
    for length in (0, -3, True, 2.5, "8"):
        with pytest.raises(ValueError, match=rf"^TPOConfig\.max_length must be None \(no limit\) or an int >= 1 "
                                             rf"\(tokens per row\), got {length!r}$"):
            _config(tmp_path, max_length=length)
    assert _config(tmp_path, prompt_template="Q: <image> {prompt} A:").prompt_template == "Q: <image> {prompt} A:"
    for template in ("Q: <image> A:", "Q: <image> {prompt} {other} A:", "Q: {0} {prompt}", "{prompt", 7):
        with pytest.raises(ValueError, match=r"^TPOConfig\.prompt_template must be a format string with '\{prompt\}'"):
            _config(tmp_path, prompt_template=template)
    with pytest.raises(ValueError, match=r"^invalid TPOConfig: "):
        _config(tmp_path, label_smoothing=0.7)
    with pytest.raises(ValueError, match=r"^invalid TPOConfig: "):
        _config(tmp_path, beta=0.0)
