"""The reference pass of a LoRA policy: its adapters switched off by their flags, without peft's status walk.

With a PEFT policy the reference is the policy with its adapters off (`TPOConfig` `reference="adapter"`), and
every training step opens with that pass. peft's own switch, `PeftModel.disable_adapter()`, first builds the
whole model's adapter status (`get_model_status`: every layer's adapters, devices and `requires_grad` flags, to
warn when the layers disagree), then walks the modules twice, turning every adapter parameter's
`requires_grad` off and back on. With LoRA on every text linear layer of a 32-layer LLaVA (about 3000
modules) that is some 35 ms of host time a step, spent while the device waits for the step's first kernels.

`adapters_disabled` sets each adapter layer's disable flag, the one its forward reads, and restores each
layer's own flag on exit: one walk over the modules. The forward is the same as under peft's switch: each
LoRA layer returns its base layer's output. The adapter parameters keep `requires_grad`; the reference pass
runs under `torch.no_grad()`, and elsewhere a disabled adapter takes no part in the forward, so it gets no
gradient either way. Where flags alone are not the whole switch, peft's own context runs instead: a model
that is not a `PeftModel`, prompt learning and adaption prompts (which swap the forward), and a bias trained
with the adapter (`bias="all"` or `"lora_only"`, for which peft warns that the base model's output is not
restored).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def switchable_layers(model: torch.nn.Module) -> list[torch.nn.Module] | None:
    """The adapter layers of `model` that its disable flags switch off, or None where peft's context must run
    (see the module's docstring), or where peft is not installed."""
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    if not isinstance(model, PeftModel):
        return None
    for config in model.peft_config.values():
        if config.is_prompt_learning or getattr(config, "is_adaption_prompt", False):
            return None
        if getattr(config, "bias", "none") != "none":
            return None
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper  # modules_to_save, trainable tokens

        kinds: tuple[type, ...] = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    except ImportError:
        kinds = (BaseTunerLayer,)
    layers = [m for m in model.modules() if isinstance(m, kinds)]
    if not all(isinstance(getattr(m, "_disable_adapters", None), bool) for m in layers):
        return None  # a peft version whose layers keep their switch elsewhere
    return layers


@contextlib.contextmanager
def layer_flags(layers: list[torch.nn.Module], name: str, value: bool) -> Iterator[None]:
    """Within: the attribute `name` is `value` on every one of `layers`; on exit each layer gets its own value back."""
    before = [getattr(m, name) for m in layers]
    for m in layers:
        setattr(m, name, value)
    try:
        yield
    finally:
        for m, flag in zip(layers, before, strict=True):
            setattr(m, name, flag)


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Within: `model`'s adapters are off (the base model's forward), as under `model.disable_adapter()`, with
    each layer's own flag restored on exit (a layer disabled before stays disabled). `model` is a PEFT model, or
    anything with a `disable_adapter()` context, which then runs."""
    layers = switchable_layers(model)
    if layers is None:
        if not hasattr(model, "disable_adapter"):
            raise ValueError(f"{type(model).__name__} has no adapters to disable (a PEFT model has)")
        with model.disable_adapter():
            yield
        return
    # peft's own switch also sets the model's `_adapters_disabled`, where its version has one
    marked = [model] if isinstance(getattr(model, "_adapters_disabled", None), bool) else []
    with layer_flags(layers, "_disable_adapters", True), layer_flags(marked, "_adapters_disabled", True):
        yield
