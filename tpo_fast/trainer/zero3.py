"""DeepSpeed ZeRO-3 partitioned parameters, gathered where the trainer uses them outside a DeepSpeed engine's hooks.

Under ZeRO-3 a parameter is a 0-element placeholder (its shard in `ds_tensor`) except while it is gathered. A
DeepSpeed engine gathers a module's parameters around its forward. Two places need it without one:

- `lm_head.weight` inside the forward: the fused loss reads the weight itself, never calling `lm_head`, so the loss
  gathers it (`gathered`);
- a model loaded under `deepspeed.zero.Init` (a ZeRO-3 config active at `from_pretrained`, as `tpo-fast train
  --deepspeed` does) is partitioned before any engine wraps it: scoring the reference at `TPOTrainer` init with the
  policy's adapter switched off runs its forward with `module_forwards_gathered`.

Each gather is a collective: every rank must gather the same parameters in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def is_zero3(param: torch.Tensor | None) -> bool:
    """Whether `param` is a ZeRO-3 partitioned parameter (DeepSpeed gave it an id)."""
    return param is not None and hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor | None]) -> Iterator[None]:
    """The partitioned ones of `params` gathered whole inside the block, released after it (read-only).

    Only shards: a parameter below ZeRO-3's persistence threshold, or one a module hook has already fetched, is
    available as is, and DeepSpeed refuses to release it from here."""
    params = [p for p in params if is_zero3(p) and p.ds_status.name == "NOT_AVAILABLE"]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


@contextlib.contextmanager
def module_forwards_gathered(model: torch.nn.Module) -> Iterator[bool]:
    """Inside the block, each module of `model` that owns partitioned parameters has them gathered for its own
    forward and released when it returns (or raises), as an engine's hooks would: forward passes of a model that
    `deepspeed.zero.Init` partitioned and no engine wraps yet hold whole only the parameters of the modules whose
    forward is running, never the whole model. For forwards without gradient (a backward would need the released
    parameters again). A model without partitioned parameters gets no hook. Yields whether any module was hooked."""
    owned = {}
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if is_zero3(p)]
        if own:
            owned[module] = own
    if not owned:
        yield False
        return
    open_gathers: dict[torch.nn.Module, list[contextlib.AbstractContextManager]] = {}

    def before(module, args):
        gather = gathered(owned[module])
        gather.__enter__()
        open_gathers.setdefault(module, []).append(gather)

    def after(module, args, output):  # also when the forward raised (`always_call`)
        stack = open_gathers.get(module)
        if stack:  # empty where the gather itself failed
            stack.pop().__exit__(None, None, None)

    handles = []
    try:
        for module in owned:
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after, always_call=True))
        yield True
    finally:
        for handle in handles:
            handle.remove()
