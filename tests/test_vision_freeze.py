"""tpo_fast/trainer/vision.py: the official TPO recipe keeps the vision tower out of training
(`TPOConfig.freeze_vision_tower`, default True). A full fine-tune freezes the tower's parameters and a step leaves
them as they were; a LoRA adapter from `peft_config` leaves the tower's modules out, the caller's own exclusions
kept; a `PeftModel` given as the model keeps its adapters; False trains what the model leaves trainable."""

import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from test_trainer import _args  # noqa: E402
from tiny_setup import tiny_data, tiny_model, tiny_processor  # noqa: E402

from tpo_fast.trainer.config import TPOConfig  # noqa: E402
from tpo_fast.trainer.trainer import TPOTrainer  # noqa: E402
from tpo_fast.trainer.vision import freeze_vision_tower, lora_config_without_vision_tower  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOWER = "model.vision_tower."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_data(str(tmp_path_factory.mktemp("vision") / "data"), num_images=4, seed=0), tiny_processor()


def _trainer(setup, tmp_path, **kw):
    ds, proc = setup
    peft_config = kw.pop("peft_config", None)
    model = kw.pop("model", None) or tiny_model(proc)
    return TPOTrainer(model, args=_args(tmp_path, max_steps=1, **kw), train_dataset=ds, processing_class=proc,
                      peft_config=peft_config)


def _lora(**kw):
    from peft import LoraConfig

    return LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"], **kw)


def _adapted(model) -> set[str]:
    """The modules (names without peft's prefix) that carry a LoRA A factor."""
    return {n.removeprefix("base_model.model.").split(".lora_A")[0] for n, _ in model.named_parameters()
            if ".lora_A." in n}


def test_a_full_fine_tune_trains_all_but_the_vision_tower(setup, tmp_path, caplog):
    proc = setup[1]
    tower_tensors = sum(1 for n, _ in tiny_model(proc).named_parameters() if n.startswith(TOWER))
    with caplog.at_level(logging.INFO, logger="tpo_fast"):
        trainer = _trainer(setup, tmp_path)
    frozen = {n for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in trainer.model.named_parameters() if n.startswith(TOWER)} and tower_tensors > 0
    assert f"vision tower frozen (the official TPO recipe): {tower_tensors} parameter tensors" in caplog.text
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not any(n.startswith(TOWER) for n in changed)
    assert "model.multi_modal_projector.linear_1.weight" in changed and "lm_head.weight" in changed
    everything = _trainer(setup, tmp_path, freeze_vision_tower=False)
    assert all(p.requires_grad for p in everything.model.parameters())


def test_a_lora_adapter_leaves_the_vision_tower_out_and_keeps_the_callers_exclusions(setup, tmp_path):
    with_tower = _adapted(_trainer(setup, tmp_path, peft_config=_lora(), freeze_vision_tower=False).model)
    text = {m for m in with_tower if not m.startswith(TOWER)}
    assert text and with_tower - text  # CLIP's attention has q_proj, k_proj and v_proj too
    given = _lora()
    assert _adapted(_trainer(setup, tmp_path, peft_config=given).model) == text
    assert given.exclude_modules is None  # the caller's config is not changed
    first_layer = {m for m in text if ".layers.0." in m}
    assert first_layer and text - first_layer
    listed = _lora(exclude_modules=sorted(first_layer))
    assert _adapted(_trainer(setup, tmp_path, peft_config=listed).model) == text - first_layer
    pattern = _lora(exclude_modules=r".*language_model\.layers\.0\..*")
    assert _adapted(_trainer(setup, tmp_path, peft_config=pattern).model) == text - first_layer


def test_a_peft_model_given_keeps_its_adapters(setup, tmp_path):
    from peft import get_peft_model

    proc = setup[1]
    model = get_peft_model(tiny_model(proc), _lora())
    adapted = _adapted(model)
    assert any(m.startswith(TOWER) for m in adapted)
    assert _adapted(_trainer(setup, tmp_path, model=model).model) == adapted


def test_a_model_without_a_vision_tower_is_left_as_it_is(caplog):
    class NoTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(2, 2)

    model, config = NoTower(), _lora()
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        assert freeze_vision_tower(model, model) == 0
    assert "NoTower has no vision tower at .model.vision_tower; nothing frozen" in caplog.text
    assert all(p.requires_grad for p in model.parameters())
    assert lora_config_without_vision_tower(config, model, model) is config


def test_the_option_is_a_flag(tmp_path):
    assert TPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none").freeze_vision_tower is True
    with pytest.raises(ValueError, match=r"^TPOConfig.freeze_vision_tower must be True or False, got 'no'$"):
        TPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", freeze_vision_tower="no")


def test_resuming_with_another_trainable_set_says_what_to_match(setup, tmp_path):
    """A checkpoint of a run that trained the vision tower (freeze_vision_tower=False, and every full fine-tune before
    the option) resumed with the tower frozen: torch only said that a parameter group's size did not match."""
    common = dict(save_strategy="steps", save_steps=1)
    _trainer(setup, tmp_path, freeze_vision_tower=False, **common).train()
    checkpoint = str(tmp_path / "out" / "checkpoint-1")
    frozen = _trainer(setup, tmp_path, **common)
    frozen.args.max_steps = 2
    with pytest.raises(ValueError, match=r"checkpoint-1: its optimizer state is for other trainable parameters than "
                                         r"this run's \(loaded state dict contains a parameter group that doesn't "
                                         r"match the size of optimizer's group\); resume with the settings of the run "
                                         r"that wrote it: freeze_vision_tower"):
        frozen.train(resume_from_checkpoint=checkpoint)
    same = _trainer(setup, tmp_path, freeze_vision_tower=False, **common)
    same.args.max_steps = 2
    same.train(resume_from_checkpoint=checkpoint)
    assert same.state.global_step == 2
