"""`tpo_fast.trainer.zero3.module_forwards_gathered`: a model that ZeRO-3 partitioned before any DeepSpeed engine
wraps it gathers each module's own parameters around that module's forward, and releases them after it, also when the
forward raises. DeepSpeed's gather is replaced by a recording one here; tests/test_trainer_dist.py runs the real one
(a ZeRO-3 LoRA run that precomputes its reference at init)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from tpo_fast.trainer import zero3


class Block(torch.nn.Module):
    def __init__(self, fail: bool = False):
        super().__init__()
        self.inner = torch.nn.Linear(3, 3)
        self.scale = torch.nn.Parameter(torch.ones(3))  # the block's own parameter, used in its own forward
        self.fail = fail

    def forward(self, x):
        if self.fail:
            raise RuntimeError("boom")
        return self.inner(x) * self.scale


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = Block(), Block()
        self.plain = torch.nn.Linear(3, 3)  # not partitioned: no hook

    def forward(self, x):
        return self.plain(self.b(self.a(x)))


@pytest.fixture
def recorded(monkeypatch):
    """`zero3.gathered` replaced by a recorder of ("gather" | "release", parameter names)."""
    events = []

    @contextlib.contextmanager
    def fake(params):
        names = tuple(p._name for p in params)
        events.append(("gather", names))
        try:
            yield
        finally:
            events.append(("release", names))

    monkeypatch.setattr(zero3, "gathered", fake)
    return events


def _partition(net: Net, skip=("plain",)) -> None:
    for name, p in net.named_parameters():
        p._name = name
        if not name.startswith(skip):
            p.ds_id = id(p)  # what DeepSpeed's partitioning adds


def test_each_module_gathers_its_own_parameters_around_its_forward(recorded):
    net = Net()
    _partition(net)
    x = torch.ones(2, 3)
    with torch.no_grad(), zero3.module_forwards_gathered(net) as hooked:
        assert hooked is True
        net(x)
        assert recorded == [
            ("gather", ("a.scale",)), ("gather", ("a.inner.weight", "a.inner.bias")),
            ("release", ("a.inner.weight", "a.inner.bias")), ("release", ("a.scale",)),
            ("gather", ("b.scale",)), ("gather", ("b.inner.weight", "b.inner.bias")),
            ("release", ("b.inner.weight", "b.inner.bias")), ("release", ("b.scale",)),
        ]
        net.a(x)  # a module called again gathers again
        assert recorded[8:] == [("gather", ("a.scale",)), ("gather", ("a.inner.weight", "a.inner.bias")),
                                ("release", ("a.inner.weight", "a.inner.bias")), ("release", ("a.scale",))]
    recorded.clear()
    net(x)  # the hooks are gone with the block
    assert recorded == []
    assert not net.a._forward_pre_hooks and not net.a._forward_hooks and not net.a.inner._forward_hooks


def test_a_forward_that_raises_releases_what_it_gathered(recorded):
    """At once, inside the block (a caller that catches the error and goes on holds nothing gathered), and the
    block still ends cleanly."""
    net = Net()
    net.b.fail = True
    _partition(net)
    with zero3.module_forwards_gathered(net):
        with pytest.raises(RuntimeError, match="boom"):
            net(torch.ones(2, 3))
        assert recorded[-2:] == [("gather", ("b.scale",)), ("release", ("b.scale",))]
        gathers = [names for kind, names in recorded if kind == "gather"]
        releases = [names for kind, names in recorded if kind == "release"]
        assert sorted(gathers) == sorted(releases)
    assert len(recorded) == 6


def test_a_gather_that_fails_is_the_error_the_caller_sees(monkeypatch, recwarn):
    """A failed gather (DeepSpeed raising in the pre-hook) reaches the caller as it is; the release hook, which runs
    on errors too, finds nothing of that module's to release and raises nothing (torch would silence it with a
    warning)."""
    net = Net()
    _partition(net)

    @contextlib.contextmanager
    def failing(params):
        if params[0]._name == "b.scale":
            raise RuntimeError("gather failed")
        yield

    monkeypatch.setattr(zero3, "gathered", failing)
    with pytest.raises(RuntimeError, match="^gather failed$"), zero3.module_forwards_gathered(net):
        net(torch.ones(2, 3))
    assert not [w for w in recwarn if "always_call" in str(w.message)]


def test_a_model_without_partitioned_parameters_gets_no_hook(recorded):
    net = Net()
    _partition(net, skip=("",))  # every name starts with "": nothing partitioned
    with zero3.module_forwards_gathered(net) as hooked:
        assert hooked is False
        assert all(not m._forward_pre_hooks for m in net.modules())
        net(torch.ones(2, 3))
    assert recorded == []


def test_gathered_takes_only_shards_that_are_not_available(monkeypatch):
    """`gathered` asks DeepSpeed for the partitioned parameters that are not already whole, and for nothing when
    none is (a plain tensor, None, one a hook already fetched)."""
    import sys
    import types

    asked = []

    class Gathered(contextlib.AbstractContextManager):
        def __init__(self, params, modifier_rank):
            asked.append(([p._name for p in params], modifier_rank))

        def __exit__(self, *exc):
            return None

    fake = types.SimpleNamespace(zero=types.SimpleNamespace(GatheredParameters=Gathered))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)

    def param(name, status=None):
        p = torch.nn.Parameter(torch.zeros(1))
        p._name = name
        if status is not None:
            p.ds_id, p.ds_status = 1, types.SimpleNamespace(name=status)
        return p

    with zero3.gathered([param("shard", "NOT_AVAILABLE"), param("whole", "AVAILABLE"), param("plain"), None]):
        pass
    assert asked == [(["shard"], None)]
    with zero3.gathered([param("whole", "AVAILABLE"), param("plain")]):
        pass
    assert len(asked) == 1
