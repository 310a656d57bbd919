"""Peak memory of the torch backend's chunk loops (`torch_chunked.forward` and `backward`): a chunk's fp32
logits buffer is gone before the next chunk's GEMM allocates its own.

The peak of the per-token primitive on the torch backend is one chunk's fp32 logits (rows x V; overwritten
in place by exp(z - lse) and then by dS in the backward) on top of the outputs and gradient buffers. The
loop variables `logits` / `ds` kept the previous chunk's buffer alive while the next chunk's GEMM made its
own (two chunk x V buffers at the peak, the same pattern as issue 14 in `fused_pairs._run`), and the last
chunk's buffer lived on through the rank-1 terms after the loop (the corrupted gather, the one-hot terms
and their (N, D) temporaries). `torch_chunked._logits` and `gather_logits` are wrapped to take weak
references to each chunk's buffer and to check, before any new allocation, that the earlier ones are
dead; a torch-function mode, on inside `forward` and `backward`, checks the same at the rank-1 ops after the
loops.
Deterministic: reference counts, no timing, no RSS.
"""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode

import tpo_fast
from tpo_fast.ops import torch_chunked

N, D, V = 17, 8, 29
IGNORE = -100
IGNORED = (0, 8, 16)  # 14 rows carry a target
ROWS = 4  # rows per chunk: chunks of 4, 4, 4 and 2 rows
CHUNKS = 4


class _Watch:
    """Weak references to every chunk's logits buffer, and the points where they were checked."""

    def __init__(self) -> None:
        self.logits: list[StorageWeakRef] = []
        self.checked: list[str] = []

    def alive(self) -> list[str]:
        return [f"chunk {i} logits" for i, r in enumerate(self.logits) if not r.expired()]


class _RankOneOps(TorchFunctionMode):
    """Checks at the rank-1 ops (gathers by target, index_add_ by target, the einsum dot products) that no
    chunk's logits buffer is alive: they run after the chunk loops."""

    def __init__(self, watch: _Watch) -> None:
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        gather = func is torch.Tensor.__getitem__ and isinstance(args[1], torch.Tensor)
        if gather or func in (torch.Tensor.index_add_, torch.einsum):
            alive = self.watch.alive()
            assert not alive, f"{alive} alive at {func.__name__} (a rank-1 term after the chunk loop)"
            self.watch.checked.append("rank-1")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def watch(monkeypatch):
    w = _Watch()
    monkeypatch.setattr(torch_chunked, "_chunk_rows", lambda v: ROWS)
    logits, gather_logits = torch_chunked._logits, torch_chunked.gather_logits

    def spy_logits(*args, **kwargs):
        alive = w.alive()
        assert not alive, f"{alive} alive when chunk {len(w.logits)} allocates its logits"
        w.checked.append("logits")
        out = logits(*args, **kwargs)
        w.logits.append(StorageWeakRef(out.untyped_storage()))
        return out

    def spy_gather_logits(hidden, weight, bias, targets):
        alive = w.alive()
        assert not alive, f"{alive} alive at the corrupted gather"
        w.checked.append("gather")
        return gather_logits(hidden, weight, bias, targets)

    def in_mode(fn):  # the mode on inside the backend's entry points (autograd's engine does not carry it)
        def run(*args):
            with _RankOneOps(w):
                return fn(*args)

        return run

    monkeypatch.setattr(torch_chunked, "_logits", spy_logits)
    monkeypatch.setattr(torch_chunked, "gather_logits", spy_gather_logits)
    monkeypatch.setattr(torch_chunked, "forward", in_mode(torch_chunked.forward))
    monkeypatch.setattr(torch_chunked, "backward", in_mode(torch_chunked.backward))
    return w


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * 0.4).requires_grad_()
    bias = (torch.randn(V, generator=g) * 0.1).requires_grad_()
    corrupted = torch.randn(N, D, generator=g).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[list(IGNORED)] = IGNORE
    return hidden, weight, bias, corrupted, targets


def _stats(grad: bool):
    hidden, weight, bias, corrupted, targets = _inputs()
    with torch.set_grad_enabled(grad):
        s = tpo_fast.token_stats(hidden, weight, targets, bias=bias, corrupted_hidden=corrupted,
                                 ignore_index=IGNORE, return_argmax=True, backend="torch")
        if grad:  # an upstream gradient on every output: the softmax sweep and every one-hot term
            loss = s.logprobs.sum() + 0.3 * s.target_logits.sum() + 0.2 * s.lse.sum()
            (loss - 0.5 * s.corrupted_target_logits.sum()).backward()
    return s, (hidden, weight, bias, corrupted)


def test_no_chunk_outlives_itself_with_gradients(watch):
    """Forward and recompute backward: a chunk's logits / dS buffer is gone before the next chunk's GEMM
    and before the rank-1 terms after the loop."""
    _, leaves = _stats(grad=True)
    assert all(t.grad is not None for t in leaves)
    assert len(watch.logits) == 2 * CHUNKS
    sweeps = [c for c in watch.checked if c != "rank-1"]
    assert sweeps == ["logits"] * CHUNKS + ["gather"] + ["logits"] * CHUNKS
    last = len(watch.checked) - 1 - watch.checked[::-1].index("logits")
    assert "rank-1" in watch.checked[last + 1:], "the backward's one-hot terms were not checked"
    assert not watch.alive(), "a chunk's buffer outlived the step"


def test_no_chunk_outlives_itself_without_gradients(watch):
    s, _ = _stats(grad=False)
    assert not s.logprobs.requires_grad
    assert [c for c in watch.checked if c != "rank-1"] == ["logits"] * CHUNKS + ["gather"]
    assert not watch.alive()
