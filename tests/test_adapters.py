"""The reference pass's adapter switch (tpo_fast/trainer/adapters.py) against peft's own `disable_adapter()`.

On a tiny LLaVA with LoRA (and a `modules_to_save` projector): the same forward as peft's switch and as the base
model, bit for bit; every layer's own flag back on exit, an exception included; peft's model-wide status never
built; peft's context where flags are not the whole switch.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from tiny_setup import tiny_model, tiny_processor  # noqa: E402

from tpo_fast.trainer.adapters import adapters_disabled, switchable_layers  # noqa: E402

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def _peft_model(processor, **config):
    base = tiny_model(processor)
    torch.manual_seed(0)
    options = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=0.0,
                   init_lora_weights=False, modules_to_save=["multi_modal_projector"])
    model = peft.get_peft_model(base, peft.LoraConfig(**{**options, **config}))
    with torch.no_grad():  # the saved copy of the projector differs from the original
        for p in model.base_model.model.model.multi_modal_projector.modules_to_save.parameters():
            p.add_(0.1)
    return model.eval()


def _inputs(processor):
    torch.manual_seed(1)
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    ids = torch.randint(5, len(processor.tokenizer), (2, 24))
    ids[ids == image] = 5
    ids[:, 1:17] = image  # 16 image tokens: 28-pixel images in patches of 7
    size = processor.image_processor.crop_size["height"]
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(2, 3, size, size))


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_the_forward_is_peft_switchs_and_flags_come_back(processor, monkeypatch):
    model = _peft_model(processor)
    inputs = _inputs(processor)
    layers = switchable_layers(model)
    kinds = {type(m).__name__ for m in layers}
    assert "ModulesToSaveWrapper" in kinds and any(k.endswith("Linear") for k in kinds), kinds
    adapted = _logits(model, inputs)
    with model.disable_adapter():
        by_peft = _logits(model, inputs)
    assert not torch.equal(adapted, by_peft)  # the adapters and the saved projector change the output
    monkeypatch.setattr(type(model), "get_model_status", lambda self: pytest.fail("peft's status walk ran"))
    with adapters_disabled(model):
        assert all(m.disable_adapters for m in layers) and model._adapters_disabled
        ours = _logits(model, inputs)
    assert torch.equal(ours, by_peft)
    assert not any(m.disable_adapters for m in layers) and not model._adapters_disabled
    assert torch.equal(_logits(model, inputs), adapted)
    # the adapters keep requires_grad (the pass runs without gradient; peft turns them off and on)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with adapters_disabled(model):
        assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_each_layer_keeps_its_own_flag(processor):
    """A layer switched off before stays off after (peft's context would switch every layer on), also when the
    pass raises."""
    model = _peft_model(processor)
    layers = switchable_layers(model)
    layers[1].enable_adapters(False)
    before = [m.disable_adapters for m in layers]
    assert before.count(True) == 1
    with pytest.raises(RuntimeError, match="^inside$"), adapters_disabled(model):
        assert all(m.disable_adapters for m in layers)
        raise RuntimeError("inside")
    assert [m.disable_adapters for m in layers] == before


def test_peft_switch_where_flags_are_not_all(processor, monkeypatch):
    """A bias trained with the adapter: peft's own context runs (and warns that the base output is not restored);
    a model with only a `disable_adapter` context: that context; nothing to disable: a clear error."""
    model = _peft_model(processor, bias="all")
    assert switchable_layers(model) is None
    entered = []
    original = type(model).disable_adapter

    def spy(self):
        entered.append(1)
        return original(self)

    monkeypatch.setattr(type(model), "disable_adapter", spy)
    with pytest.warns(UserWarning, match="disabling adapter layers with bias"), adapters_disabled(model):
        pass
    assert entered == [1]

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def disable_adapter(self):
            self.calls += 1
            return torch.no_grad()

    wrapped = Wrapped()
    with adapters_disabled(wrapped):
        pass
    assert wrapped.calls == 1
    with pytest.raises(ValueError, match="^Linear has no adapters to disable \\(a PEFT model has\\)$"):
        with adapters_disabled(torch.nn.Linear(2, 2)):
            pass


def test_which_adapter_configs_the_flags_switch(processor):
    """The decision alone, per adapter config: flags switch LoRA-like adapters (a config with no `bias` field, like
    IA3's, included); prompt learning, adaption prompts (LLaMA-Adapter: its own forward) and a trained bias go
    through peft's context."""
    import types

    model = _peft_model(processor)
    layers = switchable_layers(model)
    assert layers and all(isinstance(m._disable_adapters, bool) for m in layers)
    lora = model.peft_config["default"]
    cases = [
        (types.SimpleNamespace(is_prompt_learning=False), True),  # neither `bias` nor `is_adaption_prompt`
        (types.SimpleNamespace(is_prompt_learning=False, is_adaption_prompt=False, bias="none"), True),
        (types.SimpleNamespace(is_prompt_learning=True, is_adaption_prompt=False, bias="none"), False),
        (types.SimpleNamespace(is_prompt_learning=False, is_adaption_prompt=True, bias="none"), False),
        (types.SimpleNamespace(is_prompt_learning=False, bias="lora_only"), False),
    ]
    try:
        for config, switchable in cases:
            model.peft_config["default"] = config
            assert (switchable_layers(model) == layers if switchable else switchable_layers(model) is None), config
    finally:
        model.peft_config["default"] = lora
