"""The vision tower out of training, as in the official TPO recipe (`TPOConfig.freeze_vision_tower`, default True).

The official TPO code fine-tunes LLaVA-1.5's language model and projector and keeps the CLIP vision tower frozen
(docs/math.md, "Official TPO training set-up"). Training it as well changes the recipe, and costs the tower's
gradients and optimizer state, and its backward through both the clean and the corrupted image of every pair.

- A full fine-tune: the tower's parameters get `requires_grad=False` (`freeze_vision_tower`).
- A LoRA adapter the trainer adds (`peft_config`): the adapter leaves the tower's modules out
  (`lora_config_without_vision_tower`), so the common targets (`q_proj`, `k_proj`, `v_proj`, which CLIP's
  attention also names so) adapt the language model only.
- A `PeftModel` given as the model: its adapters are the caller's choice and stay as they are.
"""

from __future__ import annotations

import copy
import logging
import re

import torch

logger = logging.getLogger(__name__)


def vision_tower_name(model: torch.nn.Module, llava: torch.nn.Module) -> str | None:
    """The qualified name, within `model`, of the vision tower of the LLaVA model `llava` (`model` itself, or a
    wrapper of it), or None where the model has none at `llava.model.vision_tower`."""
    tower = getattr(getattr(llava, "model", None), "vision_tower", None)
    if not isinstance(tower, torch.nn.Module):
        return None
    return next((name for name, module in model.named_modules() if module is tower), None)


def freeze_vision_tower(model: torch.nn.Module, llava: torch.nn.Module) -> int:
    """Turn off `requires_grad` on the vision tower's parameters; returns how many were trainable (0 where the
    model has no vision tower, which is logged)."""
    name = vision_tower_name(model, llava)
    if name is None:
        logger.warning("freeze_vision_tower: %s has no vision tower at .model.vision_tower; nothing frozen",
                       type(llava).__name__)
        return 0
    params = list(model.get_submodule(name).parameters())
    trainable = sum(p.requires_grad for p in params)
    for p in params:
        p.requires_grad_(False)
    return trainable


def lora_config_without_vision_tower(peft_config, model: torch.nn.Module, llava: torch.nn.Module):
    """A copy of `peft_config` whose `exclude_modules` also holds every module of the vision tower (by its whole
    name, so that a target such as `q_proj` still matches the language model's layers); the config itself where the
    model has no vision tower or the config cannot exclude modules (peft before 0.14: then logged)."""
    name = vision_tower_name(model, llava)
    if name is None:
        return peft_config
    if not hasattr(peft_config, "exclude_modules"):
        logger.warning("freeze_vision_tower: this peft's %s has no exclude_modules; the adapter may reach the "
                       "vision tower", type(peft_config).__name__)
        return peft_config
    tower = [f"{name}.{sub}" if sub else name for sub, _ in model.get_submodule(name).named_modules()]
    config = copy.copy(peft_config)
    given = peft_config.exclude_modules
    if isinstance(given, str):  # a regular expression of the whole name: the tower's names join it as a prefix
        config.exclude_modules = rf"(?:{given})|(?:{re.escape(name)}(?:\..*)?)"
    else:
        config.exclude_modules = sorted(set(given or ()) | set(tower))
    return config

