"""Recording stand-ins for the functions a module calls, to check which options reach the layer below, and a
watch on what a step reads back from the device, and a CPU tensor that says it is on CUDA."""

from __future__ import annotations

import inspect

import torch


def record_calls(monkeypatch, owner, names, calls: list) -> None:
    """Wrap each `owner.<name>` so that a call appends `(name, arguments)` to `calls` (the arguments by parameter
    name, defaults filled in) and then calls through to the original."""
    for name in names:
        fn = getattr(owner, name)
        monkeypatch.setattr(owner, name, _recorder(name, fn, inspect.signature(fn), calls))


def _recorder(name, fn, signature, calls):
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append((name, dict(bound.arguments)))
        return fn(*args, **kwargs)

    return wrapper


class DeviceReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Every read of a value computed from the batch (what would wait for a CUDA device): `.item()`, `bool()`,
    `nonzero`, boolean-mask indexing, `.tolist()`, `.cpu()`. A tensor is the batch's if an op made it from one
    (identity, through every op); a CPU machine cannot tell a host copy from the device tensor it copies, so the
    test names the copies: what `host_copy` returns is the host's, and its one `.cpu()` counts as one read."""

    READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero"}

    def __init__(self, roots):
        super().__init__()
        self.batch_made = {id(t): t for t in roots}
        self.seen = []

    def made_from_batch(self, t):
        return isinstance(t, torch.Tensor) and id(t) in self.batch_made

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        from_batch = any(self.made_from_batch(t) for t in inputs)
        name = func.__name__.split(".")[0]
        if from_batch and name in self.READS:
            self.seen.append(name)
        if from_batch and name in ("index", "index_put", "index_put_") and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            self.seen.append(f"{name} with a boolean mask")
        out = func(*args, **kwargs)
        if from_batch:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.batch_made[id(t)] = t
        return out


def watch_device_reads(monkeypatch, batch: dict) -> DeviceReads:
    """A `DeviceReads` over the batch's tensors, with `.tolist()` and `.cpu()` watched too and the trainer's host copy
    (`host_copy` of a batch's tensors: one read, named "host_copy") returning fresh host tensors. Enter it around
    the code to watch; `seen` lists the reads in order."""
    from tpo_fast.trainer import model as model_module
    from tpo_fast.trainer import packing as packing_module

    mode = DeviceReads([t for t in batch.values() if isinstance(t, torch.Tensor)])
    copy = packing_module.host_copy

    def named_host_copy(*tensors):
        if any(mode.made_from_batch(t) for t in tensors):  # (pack_batch copies host tensors: no device read)
            mode.seen.append("host_copy")
        with torch.utils._python_dispatch._disable_current_modes():
            return [t.clone() for t in copy(*tensors)]  # fresh tensors: the host's, not the batch's

    def watched(original):
        def read(t, *args, **kwargs):
            if mode.made_from_batch(t):
                mode.seen.append(original.__name__)
            return original(t, *args, **kwargs)
        return read

    monkeypatch.setattr(model_module, "host_copy", named_host_copy)
    monkeypatch.setattr(packing_module, "host_copy", named_host_copy)
    monkeypatch.setattr(torch.Tensor, "tolist", watched(torch.Tensor.tolist))
    monkeypatch.setattr(torch.Tensor, "cpu", watched(torch.Tensor.cpu))
    return mode


class CudaLooking(torch.Tensor):
    """A CPU tensor that says it is on CUDA: the code's `is_cuda` branches run on the CPU (torch's own ops run on
    the CPU; the CUDA-only calls in those branches are faked by the tests)."""

    @property
    def is_cuda(self):
        return True
