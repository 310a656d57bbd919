"""Shared-prefix and padding-free packing of the trunk forwards (tpo_fast/trainer/packing.py), and how a packed
row attends (tpo_fast/trainer/row_attention.py: per-sequence SDPA, the varlen call and its probe).

Index maps, masks and position ids against oracles written out by hand on a tiny batch; then the packed
step against the padded one on a tiny fp32 LLaVA: the same loss, reference scores and parameter
gradients for TPO, DPO and POVID, with LoRA and gradient checkpointing, eager attention, unequal
responses and a single pair; a clear error for an empty response; the fallback on other attention.
"""

import copy
import functools
import inspect
import logging
import os
import sys
import threading
import types

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))

from tiny_setup import tiny_data, tiny_model, tiny_processor  # noqa: E402

from tpo_fast.trainer import packing, row_attention  # noqa: E402
from tpo_fast.trainer.collator import TPOCollator  # noqa: E402
from tpo_fast.trainer.model import StepOptions, policy_loss, sequence_reference_scores  # noqa: E402
from tpo_fast.trainer.packing import (  # noqa: E402
    allowed_attention,
    gather_responses,
    pack_batch,
    packed_attention_mask,
    packing_mode,
    response_window,
    shift_labels,
)
from tpo_fast.trainer.row_attention import SEGMENT_ATTENTION, segment_attention, varlen_layout  # noqa: E402

PAD, X = 0, -100

# Two pairs, T = 6. Pair 0: prompt [1 9 9], chosen [5 6 7], rejected [8 5]; pair 1: prompt [1 9], chosen [4],
# rejected [3 2 2]. Rows: chosen 0, chosen 1, rejected 0, rejected 1.
IDS = [[1, 9, 9, 5, 6, 7], [1, 9, 4, PAD, PAD, PAD], [1, 9, 9, 8, 5, PAD], [1, 9, 3, 2, 2, PAD]]
LABELS = [[X, X, X, 5, 6, 7], [X, X, 4, X, X, X], [X, X, X, 8, 5, X], [X, X, 3, 2, 2, X]]


def _hand_batch():
    ids, labels = torch.tensor(IDS), torch.tensor(LABELS)
    targets = shift_labels(labels)
    return ids, (ids != PAD).long(), targets, response_window(targets)


def _pack(paired=True, padding_free=True, **kw):
    ids, mask, targets, window = _hand_batch()
    return pack_batch(ids, mask, targets != X, window, paired=paired, padding_free=padding_free, **kw)


def _matrix(rows):
    return torch.tensor([[c == "1" for c in r] for r in rows])


# The last token of every row is cut (it predicts nothing). Pair 0 keeps [1 9 9 5 6] and [1 9 9 8]: prefix
# [1 9 9], chosen [5 6] at positions 3 4, rejected [8] at position 3. Pair 1 keeps [1 9] and [1 9 3 2]:
# prefix [1 9], no chosen token of its own (the prefix's last position predicts its one token), rejected [3 2].
SHARED_FREE = dict(
    source=[[0, 1, 2, 3, 4, 15, 6, 7, 20, 21]],
    position_ids=[[0, 1, 2, 3, 4, 3, 0, 1, 2, 3]],
    group=[[0, 0, 0, 0, 0, 0, 1, 1, 1, 1]],
    segment=[[0, 0, 0, 1, 1, 2, 0, 0, 2, 2]],
    allowed=[_matrix([
        "1000000000",
        "1100000000",
        "1110000000",
        "1111000000",
        "1111100000",
        "1110010000",  # the rejected token sees the prefix and itself, not the chosen tokens 3 and 4
        "0000001000",  # pair 1: nothing of pair 0
        "0000001100",
        "0000001110",
        "0000001111",
    ])],
    # targets at (row, t): (0, 2) (0, 3) (0, 4) (1, 1) (2, 2) (2, 3) (3, 1) (3, 2) (3, 3); window t = 1..4
    grid_source=[2, 3, 4, 7, 2, 5, 7, 8, 9],
    grid_target=[1, 2, 3, 4, 9, 10, 12, 13, 14],
)


def test_shared_prefix_padding_free_index_maps_and_mask():
    p = _pack()
    for key in ("source", "position_ids", "group", "segment", "grid_source", "grid_target"):
        assert getattr(p, key).tolist() == SHARED_FREE[key], key
    assert p.grid_shape == (4, 4)
    assert p.tokens == 10
    allowed = allowed_attention(p)
    assert torch.equal(allowed, torch.stack(SHARED_FREE["allowed"]))
    # sdpa takes it as bool (True = attend), eager as an additive float mask
    assert torch.equal(packed_attention_mask(p, torch.float32), allowed[:, None])
    for dtype in (torch.float32, torch.bfloat16):  # in the model's dtype: a float32 mask would upcast bf16 scores
        eager = packed_attention_mask(_pack(implementation="eager"), dtype)
        assert eager.dtype == dtype and torch.equal(eager == 0, allowed[:, None])
        assert float(eager.min()) == torch.finfo(dtype).min
    # SEGMENT_ATTENTION on one row: an empty bool placeholder (its spans say it all); an unknown attention: an error
    placeholder = packed_attention_mask(_pack(implementation=SEGMENT_ATTENTION), torch.float32)
    assert (placeholder.shape, placeholder.dtype) == ((1, 1, 0, 0), torch.bool)
    with pytest.raises(ValueError, match="no packed mask for attention 'paged'; use one of"):
        packed_attention_mask(_pack(implementation="paged"), torch.float32)


def test_shared_prefix_with_padding_rows():
    p = _pack(padding_free=False)
    assert p.source.tolist() == [[0, 1, 2, 3, 4, 15], [6, 7, 20, 21, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 0, 0]]
    assert p.group.tolist() == [[0] * 6, [1, 1, 1, 1, -1, -1]]
    assert p.segment.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 2, 2, 0, 0]]
    assert p.tokens == 10
    allowed = allowed_attention(p)
    assert torch.equal(allowed[0], SHARED_FREE["allowed"][0][:6, :6])
    # padding slots see only themselves (a fully masked row is NaN in SDPA); no real token sees them
    assert torch.equal(allowed[1], _matrix(["100000", "110000", "111000", "111100", "000010", "000001"]))
    assert p.grid_source.tolist() == [2, 3, 4, 7, 2, 5, 7, 8, 9]
    assert p.grid_target.tolist() == SHARED_FREE["grid_target"]


def test_padding_free_without_shared_prefix():
    p = _pack(paired=False)
    # every row alone, cut after its last position with a target: 5 + 2 + 4 + 4 tokens
    assert p.source.tolist() == [[0, 1, 2, 3, 4, 6, 7, 12, 13, 14, 15, 18, 19, 20, 21]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3]]
    assert p.group.tolist() == [[0] * 5 + [1] * 2 + [2] * 4 + [3] * 4]
    assert p.segment.tolist() == [[0] * 15]
    expected = torch.zeros(15, 15, dtype=torch.bool)
    for start, n in ((0, 5), (5, 2), (7, 4), (11, 4)):
        expected[start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(allowed_attention(p)[0], expected)
    assert p.grid_source.tolist() == [2, 3, 4, 6, 9, 10, 12, 13, 14]


def test_sliding_window_limits_position_distance():
    p = _pack()
    windowed = allowed_attention(p, sliding_window=2)
    pos = p.position_ids[0]
    assert torch.equal(windowed[0], SHARED_FREE["allowed"][0] & ((pos[:, None] - pos[None, :]) < 2))
    assert torch.equal(packed_attention_mask(_pack(sliding_window=2), torch.float32)[:, 0], windowed)


def test_spans_of_padding_free_packings():
    # (start, prefix, first response, second response) per sequence; pair 1's chosen token is its prefix's last
    assert _pack().spans == ((0, 3, 2, 1), (6, 2, 0, 2))
    assert _pack(paired=False).spans == ((0, 5, 0, 0), (5, 2, 0, 0), (7, 4, 0, 0), (11, 4, 0, 0))
    assert _pack(padding_free=False).spans == ()


@pytest.mark.parametrize(("paired", "padding_free"), [(True, True), (True, False), (False, True), (False, False)])
def test_twice_packs_two_stacked_batches_side_by_side(paired, padding_free):
    """`Packing.twice`: the packing of a (R, T) batch applied to two batches stacked into (2R, T), for one trunk call
    over both image branches. Its packed inputs are the two packings' inputs side by side (along the row for one
    padding-free row, as more rows otherwise), neither copy attends to the other, and the response grid is the
    first batch's grid, then the second's."""
    p = _pack(paired=paired, padding_free=padding_free)
    rows, width = _hand_batch()[0].shape
    first, second = torch.randn(rows, width, 3), torch.randn(rows, width, 3)
    both = p.twice(rows * width)
    dim = 1 if padding_free else 0
    got = both.inputs(torch.cat([first, second]))
    one, two = p.inputs(first), p.inputs(second)
    assert torch.equal(got["inputs_embeds"], torch.cat([one["inputs_embeds"], two["inputs_embeds"]], dim))
    assert torch.equal(got["position_ids"], torch.cat([one["position_ids"], two["position_ids"]], dim))
    assert both.tokens == 2 * p.tokens and both.grid_shape == (2 * rows, p.grid_shape[1])
    # the grid of a trunk that returns its input: both batches' grids, in order
    grids = torch.cat([p.responses(one["inputs_embeds"]), p.responses(two["inputs_embeds"])])
    assert torch.equal(both.responses(got["inputs_embeds"]), grids)
    # attention: each copy as alone, nothing across
    allowed, alone = allowed_attention(both), allowed_attention(p)
    if padding_free:
        length = p.source.shape[1]
        assert torch.equal(allowed[:, :length, :length], alone) and torch.equal(allowed[:, length:, length:], alone)
        assert not allowed[:, length:, :length].any() and not allowed[:, :length, length:].any()
        assert both.spans == p.spans + tuple((start + length, *rest) for start, *rest in p.spans)
    else:
        assert torch.equal(allowed, torch.cat([alone, alone]))


def _masked_attention(q, k, v, allowed, scale):
    """Attention written out: softmax over the allowed keys of q.k * scale, key heads repeated per query head."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def _assert_same_attention(out, expected, leaves):
    """`out` equals `expected` (float64), and so do their gradients with respect to `leaves` for one random grad."""
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(expected, leaves, grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("paired", [True, False], ids=["shared-prefix", "rows"])
def test_segment_attention_equals_the_masked_attention(paired):
    p = _pack(paired=paired, implementation=SEGMENT_ATTENTION)
    length = p.source.shape[1]
    torch.manual_seed(0)
    q = torch.randn(1, 4, length, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, length, 8, dtype=torch.float64, requires_grad=True)  # grouped-query: 2 key heads
    v = torch.randn(1, 2, length, 8, dtype=torch.float64, requires_grad=True)
    mask = packed_attention_mask(p, torch.float64)
    assert mask.shape == (1, 1, 0, 0)
    module = torch.nn.Module()
    out, weights = segment_attention(module, q, k, v, mask, scaling=0.3, tpo_fast_spans=p.spans)
    assert weights is None and out.shape == (1, length, 4, 8)
    expected = _masked_attention(q, k, v, allowed_attention(p)[:, None], 0.3)
    _assert_same_attention(out, expected, (q, k, v))


def test_segment_attention_backward_allocates_a_fixed_number_of_row_sized_tensors():
    """The backward of one packed row's attention makes the same few row-sized tensors (the joined q, k, v
    gradients) whatever the number of sequences in the row. Per-sequence slices of the row gave each slice a
    row-sized zero-filled gradient (`slice_backward`) and a row-sized sum: 30 such tensors for 2 sequences, 94 for
    6, work quadratic in the micro-batch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    def row_sized_tensors_in_backward(n_sequences):
        spans, start = [], 0
        for i in range(n_sequences):
            prefix, first, second = 5, 3 + i % 2, 2 - (i == 1) * 2  # sequence 1 has no second response
            spans.append((start, prefix, first, second))
            start += prefix + first + second
        torch.manual_seed(n_sequences)
        q, k, v = (torch.randn(1, 2, start, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
        out, _ = segment_attention(torch.nn.Module(), q, k, v, None, scaling=0.5, tpo_fast_spans=tuple(spans))
        made = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                result = func(*args, **(kwargs or {}))
                outs = result if isinstance(result, (tuple, list)) else [result]
                made.extend(func.__name__ for t in outs if isinstance(t, torch.Tensor) and t.numel() >= q.numel())
                return result

        grad = torch.randn_like(out)
        with Record():
            torch.autograd.grad(out, (q, k, v), grad)
        return made

    two, six = row_sized_tensors_in_backward(2), row_sized_tensors_in_backward(6)
    assert len(two) == len(six) <= 4, (two, six)
    assert "slice_backward.default" not in six


# ----- the one-call varlen attention of a packed row (CUDA), its layout checked on the CPU ----------------


def _oracle_varlen(calls, top_left=False, **expected_extra):
    """A stand-in for `torch.nn.attention.varlen.varlen_attn`, written from its contract: the pieces' queries and keys
    lie after one another (cumulative counts `cu_q`, `cu_k`), each piece attends causally with the mask aligned to
    the bottom right (query i of nq sees keys 0 .. nk - nq + i). Records each call's keyword arguments. `top_left`:
    the mask aligned to the top left instead (query i sees keys 0..i), a wrong call for a piece with more keys than
    queries, right for a square one."""

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append(kw)
        assert kw.pop("window_size", (-1, 0)) == (-1, 0) and kw.pop("is_causal", True) is True
        assert set(kw) == set(expected_extra), kw
        assert cu_q.dtype == cu_k.dtype == torch.int32 and q.dim() == k.dim() == 3 and q.is_contiguous()
        scale = kw.get("scale") or q.shape[-1] ** -0.5
        out = []
        for i in range(len(cu_q) - 1):
            qi, ki, vi = q[cu_q[i] : cu_q[i + 1]], k[cu_k[i] : cu_k[i + 1]], v[cu_k[i] : cu_k[i + 1]]
            nq, nk = len(qi), len(ki)
            assert nq <= max_q and nk <= max_k
            seen = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (0 if top_left else nk - nq)
            scores = torch.einsum("qhd,khd->hqk", qi, ki) * scale
            out.append(torch.einsum("hqk,khd->qhd", scores.masked_fill(~seen, float("-inf")).softmax(-1), vi))
        assert sum(len(o) for o in out) == len(q)
        assert (max_q, max_k) == (max(len(o) for o in out), max(cu_k[1:] - cu_k[:-1]))  # the longest pieces
        return torch.cat(out)

    return varlen


def test_varlen_layout_of_the_hand_packing():
    """Row [1 9 9 5 6 | 8 | 1 9 | 3 2]: pair 0's prefix 0..2, chosen 3..4, rejected 5; pair 1's prefix 6..7, no
    chosen token, rejected 8..9. Pieces: 0..4 over keys 0..4; 5 over 0..2 and 5; 6..7 over 6..7; 8..9 over 6..9."""
    layout = varlen_layout(_pack(implementation=SEGMENT_ATTENTION).spans)
    assert layout.key_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 6, 7, 8, 9]
    assert layout.cu_q.tolist() == [0, 5, 6, 8, 10] and layout.cu_k.tolist() == [0, 5, 9, 11, 15]
    assert (layout.max_q, layout.max_k) == (5, 5) and layout.cu_q.dtype == torch.int32
    # single rows (no second response): one piece each, the keys in place
    rows = varlen_layout(((0, 4, 0, 0), (4, 2, 0, 0)))
    assert rows.key_index.tolist() == list(range(6)) and rows.cu_q.tolist() == rows.cu_k.tolist() == [0, 4, 6]
    with pytest.raises(ValueError, match="^a varlen layout needs at least one span$"):
        varlen_layout(())


VARLEN_APIS = {
    "window_size": (dict(window_size=(-1, 0)), True),  # torch 2.13's signature
    "is_causal": (dict(is_causal=True), False),  # the first one: is_causal, no scale
    "with-lse": (dict(window_size=(-1, 0)), True),  # one that also returns the log-sum-exp
    "enable_gqa": (dict(window_size=(-1, 0)), True),  # torch 2.13's grouped-query form
    "enable_gqa-failed": (dict(window_size=(-1, 0)), True),  # the same, its probe failed: repeated keys
}


def _gqa_varlen(inner, key_heads, tiled=False):
    """A varlen call with torch 2.13's grouped-query form, written from its contract: with `enable_gqa`, k and v
    may have fewer heads, query head h reading key head h // (query heads / key heads); records the key heads.
    `tiled`: query head h reads key head h % (key heads) instead, the wrong grouping."""

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), scale=None, enable_gqa=False):
        key_heads.append((k.shape[1], enable_gqa))
        assert enable_gqa or k.shape[1] == q.shape[1]
        group = q.shape[1] // k.shape[1]
        k, v = (t.repeat(1, group, 1) if tiled else t.repeat_interleave(group, 1) for t in (k, v))
        return inner(q, k, v, cu_q, cu_k, max_q, max_k, window_size=window_size,
                     **({} if scale is None else {"scale": scale}))

    return varlen


@pytest.mark.parametrize("api", list(VARLEN_APIS))
def test_segment_attention_through_varlen_equals_the_masked_attention(monkeypatch, api):
    """The packed row through one varlen call (the stand-in above, on the CPU) equals the attention under the packed
    mask, forward and gradients, with grouped-query key heads; the call is made once in forward and once more in
    backward (the checkpoint's rerun), with the scale where the API takes one. A call with the grouped-query form
    gets the 2 key heads as they are, unless its probe failed: then the keys repeated to the 4 query heads."""
    causal, takes_scale = VARLEN_APIS[api]
    calls, key_heads, probed = [], [], []
    oracle = _oracle_varlen(calls, **({"scale": 0.3} if takes_scale else {}))
    if api == "with-lse":
        plain = oracle

        def oracle(*args, **kwargs):
            return plain(*args, **kwargs), torch.zeros(1)

    if api.startswith("enable_gqa"):
        oracle = _gqa_varlen(oracle, key_heads)
        failed = api.endswith("failed")
        monkeypatch.setattr(row_attention, "varlen_failure",
                            lambda *args, **kw: probed.append((args, kw)) or ("a probe failed" if failed else None))
    asked = []  # what varlen_usable is asked: the layer's dropout and scale
    monkeypatch.setattr(row_attention, "varlen_api", lambda: (oracle, causal, takes_scale))
    monkeypatch.setattr(row_attention, "varlen_usable", lambda query, dropout, scaling: asked.append(
        (dropout, scaling)) or True)
    p = _pack(implementation=SEGMENT_ATTENTION)
    length = p.source.shape[1]
    torch.manual_seed(0)
    q = torch.randn(1, 4, length, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, length, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    scale = 0.3 if takes_scale else 8**-0.5
    out, _ = segment_attention(torch.nn.Module(), q, k, v, None, scaling=scale, tpo_fast_spans=p.spans,
                               tpo_fast_varlen=varlen_layout(p.spans))
    assert len(calls) == 1 and out.shape == (1, length, 4, 8) and asked == [(0.0, scale)]
    expected = _masked_attention(q, k, v, allowed_attention(p)[:, None], scale)
    _assert_same_attention(out, expected, (q, k, v))
    assert len(calls) == 2
    if api.startswith("enable_gqa"):
        assert key_heads == [(4, False)] * 2 if api.endswith("failed") else key_heads == [(2, True)] * 2
        assert probed and all(a == (torch.float64, 8, q.device) and kw == {"gqa": True} for a, kw in probed)
    else:
        assert key_heads == probed == []


def test_varlen_is_only_used_where_it_can_run(monkeypatch):
    """The layout is built on CUDA only, and only when TPO_FAST_VARLEN is not 0; a layer runs the varlen call only in
    fp16/bf16 with flash attention's head sizes and no dropout: on the CPU never, whatever is passed."""
    from tpo_fast.ops.options import ENV_VARS, kernel_options
    from tpo_fast.trainer.row_attention import varlen_usable, varlen_wanted

    VARLEN_ENV = ENV_VARS["varlen"]

    assert not varlen_wanted(torch.device("cpu"))
    assert "tpo_fast_varlen" not in _pack(implementation=SEGMENT_ATTENTION).inputs(torch.randn(4, 6, 3))
    for value in ("0", "1", ""):
        monkeypatch.setenv(VARLEN_ENV, value)
        assert not varlen_wanted(torch.device("cpu"))
    monkeypatch.setenv(VARLEN_ENV, "yes")
    with pytest.raises(ValueError, match="^TPO_FAST_VARLEN must be '1' or '0', got 'yes'$"):
        varlen_wanted(torch.device("cuda"))
    monkeypatch.delenv(VARLEN_ENV)
    # the switch itself, as varlen_wanted reads it (the CUDA and torch conditions aside)
    monkeypatch.setattr(row_attention, "varlen_api", lambda: ("a varlen call", {}, True))
    cuda = types.SimpleNamespace(type="cuda")
    assert varlen_wanted(cuda)
    with kernel_options(varlen=False):
        assert not varlen_wanted(cuda)
    monkeypatch.setenv(VARLEN_ENV, "0")
    assert not varlen_wanted(cuda)
    monkeypatch.setenv(VARLEN_ENV, "1")
    assert varlen_wanted(cuda)
    monkeypatch.setattr(row_attention, "varlen_api", lambda: None)  # a torch without torch.nn.attention.varlen
    assert not varlen_wanted(cuda)
    monkeypatch.delenv(VARLEN_ENV)
    monkeypatch.undo()
    q = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    assert not varlen_usable(q, 0.0, None)
    # a layout passed to the CPU attention is ignored: the SDPA path runs, and gives the masked attention
    monkeypatch.setattr(row_attention, "varlen_api", lambda: pytest.fail("the varlen call ran on the CPU"))
    p = _pack(implementation=SEGMENT_ATTENTION)
    q, k, v = (torch.randn(1, 2, 10, 8, dtype=torch.float64) for _ in range(3))
    out, _ = segment_attention(torch.nn.Module(), q, k, v, None, scaling=0.5, tpo_fast_spans=p.spans,
                               tpo_fast_varlen=varlen_layout(p.spans))
    torch.testing.assert_close(out, _masked_attention(q, k, v, allowed_attention(p)[:, None], 0.5))


@pytest.mark.parametrize("gqa", [False, True], ids=["repeated_keys", "enable_gqa"])
def test_packed_step_through_varlen_equals_padded_step(setup, monkeypatch, gqa):
    """The whole packed TPO step with the varlen layout built by `Packing.inputs` and handed by the model to every
    layer's attention (the stand-in call on the CPU): the padded step's loss, reference scores and gradients. The
    tiny model's 4 query heads share 2 key heads: repeated before the call, or passed as they are to its
    grouped-query form."""
    calls, key_heads = [], []
    call = _oracle_varlen(calls, scale=None)
    if gqa:
        call = _gqa_varlen(call, key_heads)
        monkeypatch.setattr(row_attention, "varlen_failure", lambda *args, **kwargs: None)
    monkeypatch.setattr(row_attention, "varlen_api", lambda: (call, {"window_size": (-1, 0)}, True))
    monkeypatch.setattr(row_attention, "varlen_usable", lambda query, dropout, scaling: True)
    monkeypatch.setattr(packing, "varlen_wanted", lambda device: True)
    ds, proc = setup
    batch = _uneven_batch(ds, proc)
    model, ref = _policy_and_reference(proc)
    _, seen = _assert_same_step(model, ref, batch, dict(), reference="model", objective="tpo")
    layers = model.config.text_config.num_hidden_layers
    # per layer: the reference's call (no gradient), the policy's forward and its checkpointed rerun
    assert len(calls) == 3 * layers and len(seen) == 1, (len(calls), seen)
    assert {kw["scale"] for kw in calls} == {model.config.text_config.head_dim**-0.5}
    assert key_heads == ([(2, True)] * 3 * layers if gqa else [])


class _Passthrough(torch.autograd.Function):
    """x unchanged; its backward either missing (raises, as on a build without one) or wrong (doubled)."""

    @staticmethod
    def forward(ctx, x, backward):
        ctx.backward_kind = backward
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.backward_kind == "missing":
            raise RuntimeError("varlen backward is not implemented on this build")
        return 2 * grad, None


def _raising_varlen(q, *args, **kw):
    raise NotImplementedError("no kernel for this device")


def _raising_silently(*args, **kw):
    raise RuntimeError()


@pytest.mark.parametrize("case", ["contract", "with_lse", "top_left", "no_backward", "raises", "raises_silently",
                                  "wrong_query_grad", "wrong_shape", "no_varlen", "gqa_contract", "gqa_tiled"])
def test_varlen_probe_decides_once_whether_the_call_serves(monkeypatch, caplog, case):
    """`varlen_failure` runs one tiny call, forward and backward, against plain causal attention, once per process and
    (dtype, head size, device, grouped-query form): a call written from the contract passes; a top-left causal mask,
    a call without backward, a call that raises and a grouped-query call that groups the heads otherwise are
    reported (a warning, once), so that the rows go to SDPA, or to the plain call on repeated keys, instead."""
    calls = []
    oracle = _oracle_varlen(calls)
    stand_ins = {
        "contract": oracle,
        "top_left": _oracle_varlen(calls, top_left=True),
        "no_backward": lambda *a, **kw: calls.append(kw) or _Passthrough.apply(oracle(*a, **kw), "missing"),
        "raises": lambda *a, **kw: calls.append(kw) or _raising_varlen(*a, **kw),
        "with_lse": lambda *a, **kw: (oracle(*a, **kw), torch.zeros(1)),
        "raises_silently": lambda *a, **kw: calls.append(kw) or _raising_silently(*a, **kw),
        "wrong_query_grad": lambda q, *a, **kw: oracle(_Passthrough.apply(q, "doubled"), *a, **kw),
        "wrong_shape": lambda *a, **kw: oracle(*a, **kw).flatten(1),
        "gqa_contract": _gqa_varlen(oracle, []),
        "gqa_tiled": _gqa_varlen(oracle, [], tiled=True),
    }
    gqa = case.startswith("gqa")
    expected = {
        "contract": None,
        "top_left": "its output differs from plain causal attention (bottom-right aligned for a piece with more keys "
                    "than queries) by ",
        "no_backward": "the call raised RuntimeError: varlen backward is not implemented on this build",
        "raises": "the call raised NotImplementedError: no kernel for this device",
        "with_lse": None,
        "raises_silently": "the call raised RuntimeError: ",
        "wrong_query_grad": "its query gradient differs from plain causal attention (bottom-right aligned for a piece "
                            "with more keys than queries) by ",
        "wrong_shape": "its output has the shape (8, 32), not (8, 4, 8)",
        "no_varlen": "this torch has no torch.nn.attention.varlen",
        "gqa_contract": None,
        "gqa_tiled": "its output differs from plain causal attention (bottom-right aligned for a piece with more keys "
                     "than queries, query head h reading key head h // (query heads / key heads)) by ",
    }[case]
    api = None if case == "no_varlen" else (stand_ins[case], {"window_size": (-1, 0)}, True)
    monkeypatch.setattr(row_attention, "varlen_api", lambda: api)
    row_attention.varlen_failure.cache_clear()
    packed = []
    try:
        # outside the caller's saved-tensor hooks (a checkpointed layer's): the probe records nothing there
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t), \
                caplog.at_level(logging.WARNING, logger="tpo_fast"):
            why = row_attention.varlen_failure(torch.bfloat16, 8, torch.device("cpu"), gqa=gqa)
            again = row_attention.varlen_failure(torch.bfloat16, 8, torch.device("cpu"), gqa=gqa)
    finally:
        row_attention.varlen_failure.cache_clear()
    assert packed == []
    # cached: one probe (no_backward calls the oracle too; a torch without the call makes none)
    assert len(calls) == {"no_backward": 2, "no_varlen": 0}.get(case, 1)
    assert again == why
    warnings = [r.getMessage() for r in caplog.records if "is not used for" in r.getMessage()]
    if expected is None:
        assert why is None and warnings == []
    elif gqa:
        assert why.startswith(expected) and why[len(expected):].replace(".", "").isdigit(), why
        assert warnings == ["tpo_fast: the grouped-query form (enable_gqa) of the varlen attention call is not used "
                            f"for bfloat16, head size 8, on cpu: {why}; keys and values are repeated to every query "
                            "head instead (TPO_FAST_VARLEN=0 skips this check)"]
    else:
        # a measured difference ends the message ("... by 2.34"); every other verdict is exact
        assert why.startswith(expected) and why[len(expected):].replace(".", "").isdigit() if expected.endswith("by ") \
            else why == expected, why
        assert warnings == [f"tpo_fast: the varlen attention call is not used for bfloat16, head size 8, on cpu: "
                            f"{why}; packed rows are attended with two SDPA calls per pair instead (TPO_FAST_VARLEN=0 "
                            "skips this check)"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention's varlen kernel runs on CUDA")
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_attention_on_cuda_equals_the_sdpa_path(monkeypatch, dtype, kv_heads):
    """On CUDA, the packed row's one varlen call (torch's flash-attention kernel) against the two SDPA calls per
    sequence, in the dtype both run in: forward and the q, k, v gradients within 16-bit rounding, against the fp32
    masked attention as the judge; the varlen call is the one that ran. With grouped-query key heads too (the
    call's `enable_gqa` form where this torch has it, else repeated keys)."""
    from tpo_fast.ops.options import ENV_VARS
    from tpo_fast.trainer.row_attention import varlen_api, varlen_usable

    VARLEN_ENV = ENV_VARS["varlen"]
    if varlen_api() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    spans, start = [], 0
    for prefix, first, second in [(120, 37, 64), (97, 0, 55), (130, 70, 1), (64, 9, 0)]:
        spans.append((start, prefix, first, second))
        start += prefix + first + second
    spans = tuple(spans)
    torch.manual_seed(0)
    q = torch.randn(1, 4, start, 64, device="cuda")
    k, v = (torch.randn(1, kv_heads, start, 64, device="cuda") for _ in range(2))
    assert varlen_usable(q.to(dtype), 0.0, 0.125) and not varlen_usable(q, 0.0, 0.125)  # fp32: SDPA
    allowed = torch.zeros(start, start, dtype=torch.bool, device="cuda")
    for s0, prefix, first, second in spans:
        allowed[s0 : s0 + prefix + first, s0 : s0 + prefix + first] = torch.ones(
            prefix + first, prefix + first, dtype=torch.bool, device="cuda").tril()
        tail = slice(s0 + prefix + first, s0 + prefix + first + second)
        allowed[tail, s0 : s0 + prefix] = True
        allowed[tail, tail] = torch.ones(second, second, dtype=torch.bool, device="cuda").tril()
    grad = torch.randn(1, start, 4, 64, device="cuda")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    judge = _masked_attention(*leaves, allowed[None, None], 0.125)
    judge_grads = torch.autograd.grad(judge, leaves, grad)

    def run(varlen):
        if varlen:
            monkeypatch.delenv(VARLEN_ENV, raising=False)
        else:
            monkeypatch.setenv(VARLEN_ENV, "0")
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        layout = row_attention.varlen_layout(spans, "cuda") if packing.varlen_wanted(q.device) else None
        assert (layout is not None) == varlen
        out, _ = segment_attention(torch.nn.Module(), *leaves, None, scaling=0.125, tpo_fast_spans=spans,
                                   tpo_fast_varlen=layout)
        return out, torch.autograd.grad(out, leaves, grad.to(dtype))

    api = row_attention.varlen_api()
    used = []

    @functools.wraps(api[0])  # the same signature, so that its grouped-query form is seen
    def counted(*args, **kwargs):
        used.append((args[0].shape[0], kwargs.get("enable_gqa", False)))  # (query rows, grouped-query form)
        return api[0](*args, **kwargs)

    monkeypatch.setattr(row_attention, "varlen_api", lambda: (counted, *api[1:]))
    out, grads = run(varlen=True)
    row_calls = [gqa for rows, gqa in used if rows == start]  # not the probes' tiny calls
    assert row_calls, "the varlen call did not run"
    # grouped-query keys go to a call that takes them as they are (its probe passed, or this test fails here)
    assert set(row_calls) == {kv_heads < 4 and "enable_gqa" in inspect.signature(api[0]).parameters}
    used.clear()
    sdpa_out, sdpa_grads = run(varlen=False)
    assert not used
    for got, sdpa, want in zip((out, *grads), (sdpa_out, *sdpa_grads), (judge, *judge_grads), strict=True):
        # the varlen call within twice the SDPA path's own error against the fp32 judge, plus a rounding floor
        err, sdpa_err = (float((t.float() - want).abs().max()) for t in (got, sdpa))
        assert err <= 2 * sdpa_err + 4 * torch.finfo(dtype).eps * float(want.abs().max()), (err, sdpa_err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention's varlen kernel runs on CUDA")
def test_varlen_is_not_used_where_the_probe_failed(monkeypatch):
    """A layer that could take the varlen call does not when the probe of its dtype and head size failed."""
    from tpo_fast.trainer.row_attention import varlen_api, varlen_usable

    if varlen_api() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    q = torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.bfloat16)
    assert varlen_usable(q, 0.0, None)
    monkeypatch.setattr(row_attention, "varlen_failure", lambda dtype, head, device: "its output differs")
    assert not varlen_usable(q, 0.0, None)


def test_second_response_bias_on_cuda_is_the_cpu_mask():
    """On CUDA the second response attends through `causal_lower_right` (no mask tensor), elsewhere through the
    boolean mask: both are 'query i sees the prefix and its own keys 0..i'."""
    from torch.nn.attention.bias import causal_lower_right

    for prefix, second in [(3, 1), (3, 4), (0, 5), (7, 2)]:
        expected = torch.zeros(second, prefix + second, dtype=torch.bool)
        for i in range(second):
            expected[i, : prefix + i + 1] = True
        assert torch.equal(causal_lower_right(second, prefix + second)._materialize(torch.device("cpu")), expected)
        assert torch.equal(torch.ones(second, prefix + second, dtype=torch.bool).tril(prefix), expected)


def test_segment_attention_without_spans_is_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    allowed = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    allowed[1, :, :, 0] = False
    allowed[1, :, 0, 0] = True
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = segment_attention(module, q, k, v, allowed, scaling=0.3)  # not the default scale (head size 4: 0.5)
    torch.testing.assert_close(out, _masked_attention(q, k, v, allowed, 0.3), rtol=1e-5, atol=1e-6)
    # without a mask: the module's causality, unless the call's keyword arguments (passed on) say otherwise
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    full = torch.ones(5, 5, dtype=torch.bool)
    for is_causal, kwargs, mask in [(True, {}, causal), (False, {}, full), (True, {"is_causal": False}, full)]:
        module.is_causal = is_causal
        out, _ = segment_attention(module, q, k, v, None, scaling=0.3, **kwargs)
        torch.testing.assert_close(out, _masked_attention(q, k, v, mask, 0.3), rtol=1e-5, atol=1e-6)
    # the dropout reaches SDPA (p = 1 drops every weight: an exact zero)
    assert not segment_attention(module, q, k, v, allowed, dropout=1.0, scaling=0.3)[0].any()


def test_segment_attention_applies_the_attention_dropout():
    """A packed row's pieces (first and second responses) get the layer's attention dropout: with p = 1 every
    attention weight is dropped, so the output is exactly zero, where without dropout it is not."""
    p = _pack(implementation=SEGMENT_ATTENTION)
    torch.manual_seed(0)
    q = torch.randn(1, 2, 10, 4)
    module = torch.nn.Module()
    assert segment_attention(module, q, q, q, None, scaling=0.3, tpo_fast_spans=p.spans)[0].abs().min() > 0
    out, _ = segment_attention(module, q, q, q, None, dropout=1.0, scaling=0.3, tpo_fast_spans=p.spans)
    assert not out.any()


def test_segment_attention_errors():
    p = _pack(implementation=SEGMENT_ATTENTION)
    q = torch.randn(1, 2, 10, 4)
    module = torch.nn.Module()
    placeholder = packed_attention_mask(p, torch.float32)
    with pytest.raises(RuntimeError, match=r"^a padding-free packed row reached the attention \(Module\) without "
                       r"its spans: the model's decoder layers \(or this transformers version\) do not pass the "
                       "model's keyword arguments on to the attention; set padding_free=False$"):
        segment_attention(module, q, q, q, placeholder)
    with pytest.raises(ValueError, match="^the spans cover 9 of the row's 10 tokens$"):
        segment_attention(module, q, q, q, placeholder, tpo_fast_spans=((0, 3, 2, 1), (6, 2, 0, 1)))
    with pytest.raises(ValueError, match="^the spans must tile the row in order: a span starts at 7, not at 6$"):
        segment_attention(module, q, q, q, placeholder, tpo_fast_spans=((0, 3, 2, 1), (7, 2, 0, 1)))
    with pytest.raises(ValueError, match="^segment attention runs on one packed row, got a batch of 3$"):
        segment_attention(module, q.repeat(3, 1, 1, 1), q, q, placeholder, tpo_fast_spans=p.spans)
    with pytest.raises(ValueError, match="^tpo_fast_sdpa attends whole sequences; a sliding window needs the dense "
                       r"mask \(implementation 'sdpa'\)$"):
        packed_attention_mask(_pack(implementation=SEGMENT_ATTENTION, sliding_window=2), torch.float32)
    # one row per sequence: the dense mask, as for sdpa
    rows = _pack(padding_free=False, implementation=SEGMENT_ATTENTION)
    assert torch.equal(packed_attention_mask(rows, torch.float32), allowed_attention(rows)[:, None])
    embeds = torch.randn(4, 6, 3)
    assert "tpo_fast_spans" not in rows.inputs(embeds)
    assert _pack(implementation=SEGMENT_ATTENTION).inputs(embeds)["tpo_fast_spans"] == ((0, 3, 2, 1), (6, 2, 0, 2))


def test_flex_attention_block_mask_is_the_dense_mask():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    for window in (None, 2):
        p = _pack(implementation="flex_attention", sliding_window=window)
        block = packed_attention_mask(p, torch.float32)
        assert isinstance(block, flex.BlockMask)
        dense = flex.create_mask(block.mask_mod, 1, 1, 10, 10, device="cpu")
        assert torch.equal(dense[:, 0], allowed_attention(p, window)), window


def test_gather_responses_puts_each_target_position_in_its_grid_cell():
    ids, mask, targets, window = _hand_batch()
    p = _pack()
    # a token's "hidden state" encodes (pair, position, token): what it must be wherever the grid reads it
    pair = torch.arange(4)[:, None] % 2
    value = (pair * 10000 + torch.arange(6) * 100 + ids).float()
    grid = gather_responses(value.flatten()[p.source][..., None].expand(-1, -1, 3), p)
    assert torch.equal(grid[..., 0], torch.where(targets != X, value, 0.0)[:, window])
    # its backward sums the two rows' gradients into the shared prefix position
    h = torch.zeros(1, 10, 1, requires_grad=True)
    gather_responses(h, p).sum().backward()
    assert h.grad[0, :, 0].tolist() == [0, 0, 2, 1, 1, 1, 0, 2, 1, 1]


def test_empty_response_is_a_clear_error():
    ids, mask, targets, window = _hand_batch()
    has_target = targets != X
    has_target[3] = False
    with pytest.raises(ValueError, match="pair 1's rejected response is empty"):
        pack_batch(ids, mask, has_target, window, paired=True, padding_free=True)
    # rows 0, 1 are the chosen ones of pairs 0, 1, rows 2, 3 their rejected ones; unpaired, a row is named by index
    for row, paired, name in [(1, True, "pair 1's chosen"), (2, True, "pair 0's rejected"), (2, False, "row 2's")]:
        has_target = targets != X
        has_target[row] = False
        with pytest.raises(ValueError, match=f"{name} response is empty"):
            pack_batch(ids, mask, has_target, window, paired=paired, padding_free=True)


def test_left_padding_is_refused():
    ids, mask, targets, window = _hand_batch()
    mask[1] = torch.tensor([0, 1, 1, 1, 0, 0])
    with pytest.raises(ValueError, match="right-padded"):
        pack_batch(ids, mask, targets != X, window, paired=True, padding_free=True)


def test_inconsistent_batches_are_clear_errors():
    """Each other input error of pack_batch and response_window, with the message that says what is wrong."""
    ids, mask, targets, window = _hand_batch()
    has_target = targets != X
    assert window == slice(1, 5)
    # Row 1 is [1 9 4] and 3 padding slots; a label on its first padding slot (column 3) is the shifted target
    # of position 2, its last real token; one further in, of position 3.
    for column in (2, 3):
        on_padding = has_target.clone()
        on_padding[1, column] = True
        with pytest.raises(ValueError, match=r"labels on padding positions \(attention_mask 0\)"):
            pack_batch(ids, mask, on_padding, window, paired=True, padding_free=True)
    # Targets sit in columns 1 to 4: a window that leaves out either end is refused, the exact one is not.
    for narrow in (slice(2, 5), slice(1, 4)):
        with pytest.raises(ValueError, match=r"targets outside the response window slice\(%d, %d, None\)"
                           % (narrow.start, narrow.stop)):
            pack_batch(ids, mask, has_target, narrow, paired=False, padding_free=True)
    assert pack_batch(ids, mask, has_target, window, paired=False, padding_free=True).grid_shape == (4, 4)
    with pytest.raises(ValueError, match=r"an even count\), got 3 rows"):
        pack_batch(ids[:3], mask[:3], has_target[:3], window, paired=True, padding_free=True)
    with pytest.raises(ValueError, match=r"no response tokens \(every label is ignore_index\)"):
        response_window(torch.full((2, 4), X))
    assert response_window(torch.tensor([[X, X, 7, X]])) == slice(2, 3)  # a single target
    assert response_window(torch.tensor([[7, X, X, X], [X, X, X, 3]])) == slice(0, 4)  # both ends
    with pytest.raises(ValueError, match=r"no response tokens"):
        response_window(torch.empty((2, 0), dtype=torch.long))  # no columns at all


def test_a_packing_reads_its_inputs_back_once_and_writes_its_maps_in_one_copy(monkeypatch):
    """On CUDA every device-to-host copy, and every host-to-device copy from pageable memory, waits for the device
    to drain: pack_batch made three and six. Now one `.cpu()` for its inputs, and its six maps are views of one
    buffer (one copy, pinned and non-blocking on CUDA). The maps' values are the hand-checked tests' above."""
    calls = []
    original = torch.Tensor.cpu

    def counted(t, *args, **kwargs):
        calls.append(tuple(t.shape))
        return original(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counted)
    p = _pack(paired=True, padding_free=True)
    assert len(calls) == 1
    maps = [p.source, p.position_ids, p.group, p.segment, p.grid_source, p.grid_target]
    assert len({m.untyped_storage().data_ptr() for m in maps}) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's own detector of synchronizing calls")
def test_planning_a_packed_batch_waits_for_the_device_twice_on_cuda():
    """response_window's one read-back and pack_batch's one copy of its inputs: every other step of the plan runs on
    the host, and its maps go to the device without a wait."""
    import warnings

    ids, mask, targets, _ = (t.cuda() if isinstance(t, torch.Tensor) else t for t in _hand_batch())
    response_window(targets)
    pack_batch(ids, mask, targets != X, slice(1, 5), paired=True, padding_free=True)  # warm: CUDA context, pinning
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            window = response_window(targets)
            pack_batch(ids, mask, targets != X, window, paired=True, padding_free=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [f"{w.filename}:{w.lineno}" for w in seen if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 2, syncs


def _fake_llava(implementation, **config):
    """A stand-in LLaVA whose language model has this attention implementation and these config fields."""
    lm = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation=implementation, **config),
                               forward=lambda inputs_embeds=None, attention_mask=None, position_ids=None: None)
    return types.SimpleNamespace(model=types.SimpleNamespace(language_model=lm))


def test_unsupported_attention_falls_back_once(caplog, monkeypatch):
    monkeypatch.setattr(packing, "_WARNED", set())  # whatever an earlier test of this process logged
    fake = _fake_llava

    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        assert packing_mode(fake("paged|sdpa"), True, True) is None
        assert packing_mode(fake("paged|sdpa"), True, False) is None
    assert [r.message for r in caplog.records if "padded rows" in r.message] == [
        "shared_prefix / padding_free are off, the step runs on padded rows: its attention implementation "
        "'paged|sdpa' takes no 4D attention mask (load the model with attn_implementation='sdpa', 'eager' "
        "or 'flex_attention')"
    ]
    assert packing_mode(fake("sdpa"), False, False) is None
    mode = packing_mode(fake("sdpa"), True, False)
    assert (mode.shared_prefix, mode.padding_free, mode.implementation, mode.sliding_window) == (
        True, False, "sdpa", None)
    # padding_free=None: one row only where the attention skips the masked blocks: flex_attention, and sdpa
    # (full attention), which is switched to the per-sequence segment attention
    model = fake("sdpa")
    mode = packing_mode(model, True, None)
    assert (mode.padding_free, mode.implementation) == (True, SEGMENT_ATTENTION)
    assert model.model.language_model.config._attn_implementation == SEGMENT_ATTENTION
    mode = packing_mode(model, False, None)  # an already switched model
    assert (mode.shared_prefix, mode.padding_free, mode.implementation) == (False, True, SEGMENT_ATTENTION)
    windowed = fake("sdpa", sliding_window=64)
    assert packing_mode(windowed, True, None).padding_free is False
    assert packing_mode(windowed, True, True).implementation == "sdpa"  # dense mask: windows need it
    assert windowed.model.language_model.config._attn_implementation == "sdpa"
    assert packing_mode(fake("eager"), False, None) is None
    assert packing_mode(fake("eager"), True, None).padding_free is False
    assert packing_mode(fake("flex_attention"), True, None).padding_free is True
    assert packing_mode(fake("flex_attention"), False, None).padding_free is True
    assert packing_mode(fake("sdpa"), False, True).padding_free is True
    assert packing_mode(fake("eager", sliding_window=4096), True, True).sliding_window == 4096
    assert packing_mode(fake("sdpa", sliding_window=64, use_sliding_window=False), True, True).sliding_window is None
    mixed = fake("sdpa", sliding_window=64, layer_types=["full_attention", "sliding_attention"])
    assert packing_mode(mixed, True, True) is None
    # per-layer kinds (Qwen2, Gemma): all full attention needs no window whatever `sliding_window` says; all sliding
    # applies it; an unknown kind cannot be packed
    full = fake("sdpa", sliding_window=64, layer_types=["full_attention"] * 2)
    assert (packing_mode(full, True, None).padding_free, packing_mode(full, True, True).sliding_window) == (True, None)
    assert packing_mode(fake("sdpa", sliding_window=64, layer_types=["sliding_attention"] * 2), True, True
                        ).sliding_window == 64
    assert packing_mode(fake("sdpa", layer_types=["chunked_attention"] * 2), True, True) is None
    # a window keeps an eager model eager (only a switched model falls back from SEGMENT_ATTENTION to sdpa)
    assert packing_mode(fake("eager", sliding_window=64), True, True).implementation == "eager"
    # why a model cannot pack, in the warning's words
    assert packing.packing_support(types.SimpleNamespace()) == ("the model has no `.model.language_model`", "", None)
    assert packing_mode(fake(None), True, True).implementation == "eager"  # no implementation named: eager
    lm = fake("sdpa").model.language_model
    lm.forward = lambda inputs_embeds=None, attention_mask=None: None
    assert packing.packing_support(types.SimpleNamespace(model=types.SimpleNamespace(language_model=lm)))[0] == (
        "SimpleNamespace.forward takes no position_ids")
    assert packing.packing_support(mixed)[0] == (
        "its layers mix attention kinds (full and sliding window), which one 4D mask cannot describe")


@pytest.mark.parametrize("flash", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_models_are_switched_to_segment_attention(caplog, monkeypatch, flash):
    """flash-attn takes no 4D mask: a packed step runs its language model on SEGMENT_ATTENTION instead (the
    trainer's own default attention on CUDA with flash-attn installed must not silently lose the packing)."""
    monkeypatch.setattr(packing, "_WARNED", set())  # whatever an earlier test of this process logged
    fake = functools.partial(_fake_llava, flash)

    unpacked = fake()
    assert packing_mode(unpacked, False, False) is None
    assert unpacked.model.language_model.config._attn_implementation == flash  # kept where nothing is packed
    with caplog.at_level(logging.WARNING, logger="tpo_fast"):
        for shared_prefix, padding_free, expected in [(True, None, True), (True, False, False), (False, None, True)]:
            model = fake()
            mode = packing_mode(model, shared_prefix, padding_free)
            assert (mode.shared_prefix, mode.padding_free, mode.implementation) == (
                shared_prefix, expected, SEGMENT_ATTENTION)
            assert model.model.language_model.config._attn_implementation == SEGMENT_ATTENTION
        for padding_free, expected in [(None, False), (True, True)]:
            windowed = fake(sliding_window=64)
            # a window: sdpa's dense mask, at the switch and at every later call (the trainer calls it at
            # init and at each step, when the config already names SEGMENT_ATTENTION)
            for _ in range(2):
                mode = packing_mode(windowed, True, padding_free)
                assert (mode.padding_free, mode.implementation, mode.sliding_window) == (expected, "sdpa", 64)
                assert windowed.model.language_model.config._attn_implementation == SEGMENT_ATTENTION
    switched = [r.message for r in caplog.records if "switched" in r.message]
    assert switched == [f"the language model's attention {flash!r} takes no 4D mask: switched to "
                        f"'{SEGMENT_ATTENTION}' (SDPA, flash kernels on CUDA) for packed batches (shared_prefix / "
                        f"padding_free); set both off to keep {flash!r}"]


# ----- the packed step against the padded one on a tiny LLaVA -------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_data(str(tmp_path_factory.mktemp("data")), num_images=16), tiny_processor()


def _uneven_batch(ds, proc, n=3):
    """Pairs with responses of unequal lengths, prompts of unequal lengths and a pair whose responses
    start alike."""
    items = [ds[i] for i in range(n)]
    edits = [
        dict(chosen="there is a yellow square on the left . the square is yellow .", rejected="a blue circle ."),
        dict(chosen="a red circle .", rejected=items[-1]["rejected"] + " there is a blue square on the top ."),
    ]
    items = [dict(item, **edit) for item, edit in zip(items, edits, strict=False)] + items[len(edits) :]
    return TPOCollator(proc)(items)


def _lora(model, checkpointing):
    from peft import LoraConfig, get_peft_model

    if checkpointing:  # transformers 5 renamed it
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=0.0,
                        init_lora_weights=False)
    return get_peft_model(model, config).train()


def _run(model, ref, batch, opts):
    """(loss, reference scores, {parameter: gradient}) of one step; counts the trunk's tokens."""
    seen = []
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    handle = lm.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append((*kw["inputs_embeds"].shape[:2], kw.get("tpo_fast_spans"))), with_kwargs=True)
    if opts.reference == "adapter":
        ref_scores = None
        with model.disable_adapter():
            adapter_ref = sequence_reference_scores(lm, batch, opts)
    else:
        ref_scores = adapter_ref = sequence_reference_scores(ref, batch, opts)
    out = policy_loss(model, batch, opts, ref_scores)
    out["loss"].backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, adapter_ref, grads, seen


def _assert_same_step(model, ref, batch, packed, padded=None, **kw):
    """`padded`: the (model, reference) of the padded step, when not `model` and `ref` themselves."""
    padded_opts = StepOptions(backend="torch", shared_prefix=False, padding_free=False, **kw)
    packed_opts = StepOptions(backend="torch", **{**kw, **packed})
    padded_model, padded_ref = padded or (model, ref)
    out0, ref0, grads0, seen0 = _run(copy.deepcopy(padded_model), padded_ref, batch, padded_opts)
    out1, ref1, grads1, seen1 = _run(copy.deepcopy(model), ref, batch, packed_opts)
    torch.testing.assert_close(ref1, ref0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out1["loss"], out0["loss"], rtol=1e-5, atol=1e-6)
    for key, value in out0["metrics"].items():
        torch.testing.assert_close(out1["metrics"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert out1["tokens"] == out0["tokens"]
    assert set(grads1) == set(grads0) and grads0
    scale = max(float(g.abs().max()) for g in grads0.values())
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-4, atol=1e-6 * scale, msg=name)
    return seen0, seen1


def _policy_and_reference(proc, **kw):
    model = tiny_model(proc, **kw)
    with torch.no_grad():  # move the policy away from the reference
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, tiny_model(proc, seed=1, **kw)


CASES = {
    "tpo": dict(objective="tpo"),
    "tpo-detach": dict(objective="tpo", detach_weights=True),
    "dpo": dict(objective="dpo"),
    "povid": dict(objective="povid"),
}


# The policy's trunk calls in a step and the image branches each call runs: TPO's clean and corrupted
# branches share one call when both carry gradient (the default) or neither does (a reference); a detached
# corrupted branch, and POVID's corrupted chosen rows, run on their own.
BRANCHES_PER_CALL = {"tpo": [2], "tpo-detach": [1, 1], "dpo": [1], "povid": [1, 1]}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("packed", [dict(), dict(padding_free=False), dict(shared_prefix=False, padding_free=True)],
                         ids=["shared-prefix+padding-free", "shared-prefix", "padding-free"])
def test_packed_step_equals_padded_step(setup, case, packed):
    ds, proc = setup
    batch = _uneven_batch(ds, proc)
    model, ref = _policy_and_reference(proc)
    seen0, seen1 = _assert_same_step(model, ref, batch, packed, reference="model", **CASES[case])
    rows, width = batch["input_ids"].shape
    branches = BRANCHES_PER_CALL[case]
    assert len(seen0) == len(seen1) == len(branches), (seen0, seen1)
    povid_rows = [rows, rows // 2]  # clean (all rows), corrupted (chosen rows)
    padded_rows = povid_rows if case == "povid" else [b * rows for b in branches]
    assert [s[:2] for s in seen0] == [(n, width) for n in padded_rows]
    if packed.get("padding_free", True):  # the default on sdpa: one row, attended sequence by sequence
        assert all(n == 1 and spans for n, _, spans in seen1)
        if packed.get("shared_prefix", True) and case != "povid":  # one sequence per pair and branch
            assert [len(spans) for _, _, spans in seen1] == [b * rows // 2 for b in branches]
    else:  # one row per pair and branch, the dense mask
        assert [n for n, _, _ in seen1] == [b * rows // 2 for b in branches] and not any(s for _, _, s in seen1)
    if packed.get("shared_prefix", True):
        # per branch, fewer trunk tokens than the padded batch's real tokens (each prompt runs once)
        tokens = [n * length // b for (n, length, _), b in zip(seen1, branches, strict=True)]
        assert min(tokens) < int(batch["attention_mask"].sum()), seen1


@pytest.mark.parametrize("objective", ["tpo", "dpo", "povid"])
def test_packed_step_with_lora_and_gradient_checkpointing(setup, objective):
    ds, proc = setup
    batch = _uneven_batch(ds, proc)
    model = _lora(tiny_model(proc), checkpointing=True)
    assert model.get_base_model().model.language_model.gradient_checkpointing  # the flag kept its old name
    seen0, seen1 = _assert_same_step(model, None, batch, dict(padding_free=True), reference="adapter",
                                     objective=objective)
    # `_run`'s adapter-disabled reference scores, policy_loss's own, then the policy's: TPO's two image branches
    # share one trunk call in each
    rows, width = batch["input_ids"].shape
    expected = {"tpo": [2 * rows] * 3, "dpo": [rows] * 3, "povid": [rows, rows // 2] * 3}
    assert [s[:2] for s in seen0] == [(n, width) for n in expected[objective]]
    assert len(seen1) == len(seen0) and all(n == 1 for n, _, _ in seen1)


def test_packed_step_with_eager_attention(setup):
    ds, proc = setup
    batch = _uneven_batch(ds, proc)
    model, ref = _policy_and_reference(proc, attn_implementation="eager")
    for packed in (dict(), dict(padding_free=True)):
        _assert_same_step(model, ref, batch, packed, reference="model", objective="tpo")


def _windowed_llava(proc, seed: int, window: int):
    """`tiny_model` with a Mistral language model whose attention sees only the last `window` positions."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    base = tiny_model(proc, seed=seed).config
    t = base.text_config
    text = MistralConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                         num_key_value_heads=t.num_key_value_heads, max_position_embeddings=512,
                         pad_token_id=t.pad_token_id, tie_word_embeddings=False, sliding_window=window)
    config = LlavaConfig(vision_config=base.vision_config, text_config=text, image_token_id=base.image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


def test_packed_step_with_a_sliding_window(setup):
    """A Mistral-style window of 8 positions, well inside the pairs' 16 image tokens and prompt: the packed mask
    applies it by position, as the model's own mask does on the padded rows, for the shared prefix (one row per
    pair) and for one padding-free row (then the dense mask: SEGMENT_ATTENTION attends whole sequences)."""
    ds, proc = setup
    batch = _uneven_batch(ds, proc)
    model, ref = _windowed_llava(proc, 0, 8), _windowed_llava(proc, 1, 8)
    modes = [(packing_mode(model, True, padding_free), padding_free) for padding_free in (None, True)]
    assert [(m.padding_free, m.implementation, m.sliding_window) for m, _ in modes] == [
        (False, "sdpa", 8), (True, "sdpa", 8)]
    for _, padding_free in modes:
        _assert_same_step(model, ref, batch, dict(padding_free=padding_free), reference="model", objective="tpo")


def test_default_attention_is_sdpa_for_a_packed_step(monkeypatch):
    from tpo_fast.trainer.trainer import default_attn_implementation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert default_attn_implementation() == "flash_attention_2"
    assert default_attn_implementation(packed=True) == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed: import fails
    assert default_attn_implementation() == "sdpa"


def test_packed_step_on_a_flash_attention_model(setup):
    """A model loaded with flash_attention_2 (faked here: flash-attn needs CUDA) trains packed, with the padded
    sdpa step's loss and gradients, its language models switched to the segment attention."""
    ds, proc = setup
    batch = _uneven_batch(ds, proc)
    model, ref = _policy_and_reference(proc)

    def as_flash(m):
        m = copy.deepcopy(m)
        m.model.language_model.config._attn_implementation = "flash_attention_2"
        return m

    flash_model, flash_ref = as_flash(model), as_flash(ref)
    _, seen = _assert_same_step(flash_model, flash_ref, batch, dict(), reference="model", objective="tpo",
                                padded=(model, ref))
    assert all(n == 1 and spans for n, _, spans in seen)
    assert flash_ref.model.language_model.config._attn_implementation == SEGMENT_ATTENTION


def test_a_switched_model_runs_its_own_forwards_as_before(setup):
    """After a packed step switched an sdpa language model to SEGMENT_ATTENTION, its ordinary forwards (evaluation,
    generation: a 2D padding mask, no spans) build their masks and attend as sdpa did."""
    _, proc = setup
    model = tiny_model(proc).eval()
    lm = model.model.language_model
    ids = torch.randint(5, len(proc.tokenizer), (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        before = lm(input_ids=ids, attention_mask=mask).last_hidden_state
        assert packing_mode(model, True, None).implementation == SEGMENT_ATTENTION
        assert lm.config._attn_implementation == SEGMENT_ATTENTION
        after = lm(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    torch.testing.assert_close(after[1, :4], before[1, :4], rtol=0, atol=0)


def test_packed_step_with_a_single_pair(setup):
    ds, proc = setup
    batch = _uneven_batch(ds, proc, n=1)
    assert batch["input_ids"].shape[0] == 2
    model, ref = _policy_and_reference(proc)
    _, seen = _assert_same_step(model, ref, batch, dict(padding_free=True), reference="model", objective="tpo")
    assert seen[-1][0] == 1


def test_packed_step_refuses_an_empty_response(setup):
    ds, proc = setup
    batch = _uneven_batch(ds, proc)
    batch["labels"][4] = -100  # pair 1's rejected response
    model, ref = _policy_and_reference(proc)
    opts = StepOptions(backend="torch", reference="none", objective="dpo")
    with pytest.raises(ValueError, match="pair 1's rejected response is empty"):
        policy_loss(model, batch, opts)


def test_config_options(tmp_path):
    from tpo_fast.trainer.config import TPOConfig

    args = TPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert args.shared_prefix is True and args.padding_free is None
    with pytest.raises(ValueError, match="shared_prefix must be True or False"):
        TPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, shared_prefix="yes")
    with pytest.raises(ValueError, match="padding_free must be None, True or False"):
        TPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, padding_free=1)




# FlexAttention on CPU: no backward ("FlexAttention does not support backward on CPU"), and without gradient
# torch 2.13's inductor emits a CPU kernel that does not compile (CppCompileError in the flex template).
NO_CPU_FLEX = "FlexAttention trains on CUDA only (no CPU backward; the CPU forward kernel fails to compile)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CPU_FLEX)
def test_packed_step_with_flex_attention(setup):
    """FlexAttention (block-sparse, padding-free by default): the reference scores and the training step
    through its BlockMask equal the padded rows', with one packed row per branch."""
    _check_cuda_packed_step(setup, "flex_attention")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA SDPA kernels (the CPU run is the tests above)")
def test_packed_step_with_segment_attention_on_cuda(setup):
    """SDPA's CUDA kernels behind the segment attention (causal flash for prefix + first response, the
    bottom-right causal flash for the second, through CausalBias): the packed step equals the padded one there too."""
    _check_cuda_packed_step(setup, "sdpa")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention's varlen kernel runs on CUDA")
def test_packed_bf16_step_on_cuda_runs_the_varlen_call(setup, monkeypatch):
    """On CUDA in bf16 the packed step's attention is the varlen call, once per layer and trunk call (the reference's,
    the policy's forward and its checkpointed rerun), handed through the model's keyword arguments; the step gives
    the SDPA path's reference scores, loss and gradients within bf16 rounding (grouped-query heads, head size 16)."""
    from tpo_fast.ops.options import ENV_VARS

    api = row_attention.varlen_api()
    if api is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    calls, probing = [], threading.local()

    @functools.wraps(api[0])  # the same signature, so that its grouped-query form is seen
    def counted(*args, **kwargs):
        # The layers' calls, not the probes' (each probe runs in a thread of its own). Not "the test's thread": on
        # CUDA autograd runs the backward, and with it the checkpoint's rerun of the attention, on its device thread.
        if not getattr(probing, "on", False):
            calls.append(1)
        return api[0](*args, **kwargs)

    def probe(*args, **kwargs):
        probing.on = True
        try:
            return real_probe(*args, **kwargs)
        finally:
            probing.on = False

    real_probe = row_attention._probe_varlen
    monkeypatch.setattr(row_attention, "_probe_varlen", probe)
    monkeypatch.setattr(row_attention, "varlen_api", lambda: (counted, *api[1:]))
    ds, proc = setup
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _uneven_batch(ds, proc).items()}
    model, ref = _policy_and_reference(proc)
    model, ref = model.cuda().to(torch.bfloat16), ref.cuda().to(torch.bfloat16)
    opts = StepOptions(backend="torch", objective="tpo", reference="model")

    def step(varlen):
        monkeypatch.setenv(ENV_VARS["varlen"], "1" if varlen else "0")
        policy = copy.deepcopy(model)
        ref_scores = sequence_reference_scores(ref, batch, opts)
        out = policy_loss(policy, batch, opts, ref_scores)
        out["loss"].backward()
        grads = {n: p.grad.float() for n, p in policy.named_parameters() if p.grad is not None}
        return ref_scores.float(), out["loss"].float(), grads

    ref1, loss1, grads1 = step(varlen=True)
    text = model.config.text_config
    assert len(calls) == 3 * text.num_hidden_layers, (  # with the probe's verdict (cached) where the call was not used
        len(calls), row_attention.varlen_failure(torch.bfloat16, text.head_dim, batch["input_ids"].device))
    calls.clear()
    ref0, loss0, grads0 = step(varlen=False)
    assert not calls
    torch.testing.assert_close(ref1, ref0, rtol=2e-2, atol=2e-2 * float(ref0.abs().max()))
    torch.testing.assert_close(loss1, loss0, rtol=2e-2, atol=2e-2)
    assert set(grads1) == set(grads0) and grads0
    scale = max(float(g.abs().max()) for g in grads0.values())
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=5e-2, atol=5e-2 * scale, msg=name)


def _check_cuda_packed_step(setup, implementation):
    ds, proc = setup
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in _uneven_batch(ds, proc).items()}
    model, ref = _policy_and_reference(proc, attn_implementation=implementation)
    model, ref = model.cuda(), ref.cuda()
    for objective in ("tpo", "dpo", "povid"):
        padded = sequence_reference_scores(ref, batch, StepOptions(
            backend="torch", objective=objective, shared_prefix=False, padding_free=False))
        packed = sequence_reference_scores(ref, batch, StepOptions(backend="torch", objective=objective))
        torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-4, msg=objective)
    _, seen = _assert_same_step(model, ref, batch, dict(), reference="model", objective="tpo")
    assert seen and all(n == 1 for n, _, _ in seen)


@pytest.mark.parametrize("varlen", [False, True], ids=["sdpa", "varlen"])
def test_segment_attention_keeps_only_the_rows_q_k_v_for_backward(monkeypatch, varlen):
    """Autograd keeps, for one packed row's attention, only the row's q, k and v, as for one plain SDPA call: the
    row's attention is checkpointed, so what its per-sequence pieces make (each piece's output besides their
    joined copy, the second response's copy of the prefix's keys and values, prefix + second keys long, and
    grouped-query attention's repeated keys and values) is rebuilt in backward, not kept. Gradients are those of
    the masked attention either way."""
    spans, start = [], 0
    for prefix, first, second in [(7, 3, 2), (6, 2, 0), (11, 1, 5)]:  # tails of 9 and 16 keys: no other length
        spans.append((start, prefix, first, second))
        start += prefix + first + second
    torch.manual_seed(3)
    q = torch.randn(1, 4, start, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, start, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))  # 2 key heads
    kept = []

    def pack(t):
        kept.append(t)
        return t

    layout = None
    if varlen:  # the one-call layout (the CPU stand-in for the varlen kernel): its gathered keys are not kept either
        call = _oracle_varlen([], scale=0.5)
        monkeypatch.setattr(row_attention, "varlen_api", lambda: (call, {"window_size": (-1, 0)}, True))
        monkeypatch.setattr(row_attention, "varlen_usable", lambda query, dropout, scaling: True)
        layout = varlen_layout(tuple(spans))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = segment_attention(torch.nn.Module(), q, k, v, None, scaling=0.5, tpo_fast_spans=tuple(spans),
                                   tpo_fast_varlen=layout)
    tails = {prefix + second for _, prefix, _, second in spans if second}
    assert not [t.shape for t in kept if t.dim() == 4 and t.shape[2] in tails], "a copy of the tail keys is kept"
    # Tensors that hold no memory are not activations: torch's non-reentrant checkpoint up to 2.11 saved its inputs
    # through an autograd Function (`_NoopSaveInputs`) together with a zero-element dummy, which the hooks see too.
    kept = [t for t in kept if t.untyped_storage().nbytes()]
    row = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    assert {t.untyped_storage().data_ptr() for t in kept} == row, [t.shape for t in kept]
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    allowed = torch.zeros(start, start, dtype=torch.bool)
    for s0, prefix, first, second in spans:
        head = torch.ones(prefix + first, prefix + first, dtype=torch.bool).tril()
        allowed[s0 : s0 + prefix + first, s0 : s0 + prefix + first] = head
        tail = slice(s0 + prefix + first, s0 + prefix + first + second)
        allowed[tail, s0 : s0 + prefix] = True
        allowed[tail, tail] = torch.ones(second, second, dtype=torch.bool).tril()
    want = torch.autograd.grad(_masked_attention(q, k, v, allowed[None, None], 0.5), (q, k, v), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
