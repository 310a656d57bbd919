"""Peak memory of the fused-gradient chunk loop (`fused_pairs._run`): what a chunk allocates is gone before
the next chunk allocates its own.

The peak of the fused path is one chunk's fp32 logits buffer (rows x V, overwritten by dZ) on top of the
gradient buffers. A chunk's buffer or row copies that outlive it coexist with the next chunk's logits
(issue 14: a loop variable kept the previous dZ alive through the next GEMM, +100 MiB at D=1024,
V=32000, N=2048 on the torch backend). The core's methods are wrapped to take weak references to the
storages each chunk creates; at the start of every core call the ones that must be dead are checked.
Deterministic: reference counts, no timing, no RSS.
"""

from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from tpo_fast.ops import fused_chunk
from tpo_fast.ops.fused_pairs import fused_pair_loss

B, T, D, V = 3, 5, 8, 29
IGNORE = -100


def _ref(t: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(t.untyped_storage())


class _Watch:
    """Weak references to the storages of the current and of earlier chunks, by kind."""

    def __init__(self) -> None:
        self.logits: list[tuple[int, StorageWeakRef]] = []  # (chunk, the core's logits / dZ buffer)
        self.rows: list[tuple[int, str, StorageWeakRef]] = []  # (chunk, name, a per-chunk row tensor)
        self.chunk = 0
        self.checked: list[str] = []

    def alive(self, earlier_only: bool) -> list[str]:
        last = self.chunk - 1 if earlier_only else self.chunk
        found = [f"chunk {c} logits" for c, r in self.logits if c <= last and not r.expired()]
        return found + [f"chunk {c} {name}" for c, name, r in self.rows if c < self.chunk and not r.expired()]


@pytest.fixture
def watch(monkeypatch):
    w = _Watch()
    core = fused_chunk.TorchChunk
    stats, gather, backprop, gather_backward = core.stats, core.gather, core.backprop, core.gather_backward

    def spy_gather(self, hc, y):
        w.chunk += 1  # the corrupted gather opens a chunk (it runs before the chunk's logits exist)
        assert not w.alive(earlier_only=False), f"alive at the corrupted gather of chunk {w.chunk}"
        w.checked.append("gather")
        w.rows.append((w.chunk, "hc", _ref(hc)))
        return gather(self, hc, y)

    def spy_stats(self, h, y, y2):
        assert not w.alive(earlier_only=True), f"alive when chunk {w.chunk} allocates its logits"
        w.checked.append("stats")
        out = stats(self, h, y, y2)
        w.logits.append((w.chunk, _ref(self._buf)))
        w.rows.append((w.chunk, "h", _ref(h)))
        return out

    def spy_backprop(self, dz, h, need_h, rows_out=None):
        out = backprop(self, dz, h, need_h, rows_out)
        if out is not None:
            w.rows.append((w.chunk, "dH rows", _ref(out)))
        return out

    def spy_gather_backward(self, hc, y, g, need_hc, rows_out=None):
        assert not w.alive(earlier_only=False), f"alive at the corrupted gather backward of chunk {w.chunk}"
        w.checked.append("gather_backward")
        out = gather_backward(self, hc, y, g, need_hc, rows_out)
        if out is not None:
            w.rows.append((w.chunk, "dH~ rows", _ref(out)))
        return out

    monkeypatch.setattr(core, "gather", spy_gather)
    monkeypatch.setattr(core, "stats", spy_stats)
    monkeypatch.setattr(core, "backprop", spy_backprop)
    monkeypatch.setattr(core, "gather_backward", spy_gather_backward)
    return w


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B * T, D, generator=g).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * 0.4).requires_grad_()
    bias = (torch.randn(V, generator=g) * 0.1).requires_grad_()
    corrupted = torch.randn(2 * B * T, D, generator=g).requires_grad_()
    targets = torch.randint(0, V, (2 * B, T), generator=g)
    targets[:, 0] = IGNORE
    second = torch.randint(0, V, (2 * B, T), generator=g)
    second[:, ::2] = IGNORE
    return hidden, weight, bias, corrupted, targets, second


def _chunk_loss(c):
    s = c.logprobs.sum(1) + 0.1 * (c.target_logits - c.corrupted_target_logits).sum(1) + 0.3 * c.second_logprobs.sum(1)
    p = c.stop - c.first
    return torch.nn.functional.logsigmoid(s[:p] - s[p:]).neg().sum() / c.n_pairs


def _run(grad: bool):
    hidden, weight, bias, corrupted, targets, second = _inputs()
    # a budget of 2 rows: every pair is a chunk of its own
    with torch.set_grad_enabled(grad):
        out = fused_pair_loss(hidden, weight, targets, _chunk_loss, bias=bias, corrupted_hidden=corrupted,
                              second_targets=second, backend="torch", chunk_bytes=2 * 4 * V)
    if grad:
        out.loss.backward()
    return out, (hidden, weight, bias, corrupted)


def test_no_chunk_outlives_itself_with_gradients(watch):
    """With every gradient wanted: a chunk's logits / dZ buffer and its hidden-row copies and dH rows are
    gone before the next chunk gathers or allocates its logits, and the logits buffer is gone before the
    corrupted branch's gather backward makes its (rows, D) temporaries."""
    _, leaves = _run(grad=True)
    assert all(t.grad is not None for t in leaves)
    assert watch.chunk == B and watch.checked == ["gather", "stats", "gather_backward"] * B
    assert {name for _, name, _ in watch.rows} == {"hc", "h", "dH rows", "dH~ rows"}
    assert not watch.alive(earlier_only=False), "the last chunk's tensors outlived the loss call"


def test_no_chunk_outlives_itself_without_gradients(watch):
    out, _ = _run(grad=False)
    assert not out.loss.requires_grad
    assert watch.chunk == B and watch.checked == ["gather", "stats"] * B
    assert not watch.alive(earlier_only=False)
