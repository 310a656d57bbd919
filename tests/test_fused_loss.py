"""The fused-gradient path (`grad_mode="fused"`, the default) against plain autograd on materialized logits.

The oracle is the same loss with `grad_mode="recompute", backend="reference"`: it materializes the
logits and differentiates through torch autograd, sharing none of the fused code (chunk planning,
in-place dZ, the Triton kernels). Chunk budgets are shrunk with `kernel_options(chunk_mb=...)` so
that every case runs several chunks. Shapes are tiny: the Triton cases run under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from _device import backend_device

from tpo_fast.loss import DPOLoss, POVIDLoss, TPOLoss, dpo_loss, povid_loss, tpo_loss
from tpo_fast.ops.fused_pairs import NO_SECOND_ORDER, PairChunk, fused_pair_loss, plan_chunks
from tpo_fast.ops.options import kernel_options

B, T, D, V = 3, 6, 16, 37
IGNORE = -100
BACKENDS = ["torch", "triton"]
# chunk_mb giving a budget of `rows` fp32 logits rows of width V
MB_PER_ROW = 4 * V / 2**20


def batch(dtype=torch.float32, device="cpu", seed=0, bias=True, empty=(), lengths=None):
    """Policy tensors: pairs (p, B + p) with prompts and unequal response lengths; `empty` lists
    sequences without any response token."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device).requires_grad_()

    targets = torch.randint(0, V, (2 * B, T), generator=g)
    lengths = lengths or [(1, 6), (2, 4), (0, 5), (3, 6), (1, 3), (2, 5)]  # [start, stop) of each response
    for i, (a, z) in enumerate(lengths):
        targets[i, :a] = IGNORE
        targets[i, z:] = IGNORE
    for i in empty:
        targets[i] = IGNORE
    return dict(
        weight=randn(V, D, scale=0.4), bias=randn(V, scale=0.3) if bias else None,
        hidden=randn(2 * B, T, D), corrupted_hidden=randn(2 * B, T, D), targets=targets.to(device),
        ref_seq_scores=(torch.randn(2 * B, generator=g) * 3).to(device),
    )


def leaves(b, keys=("weight", "bias", "hidden", "corrupted_hidden")):
    return {k: b[k] for k in keys if b.get(k) is not None and b[k].requires_grad}


def grads_of(loss, tensors, upstream=1.0):
    names = list(tensors)
    g = torch.autograd.grad(loss * upstream, [tensors[k] for k in names], allow_unused=True)
    return dict(zip(names, g, strict=True))


def assert_same(actual, expected, tol, name):
    if actual is None or expected is None:
        assert actual is None and (expected is None or not expected.any()), f"{name}: {actual} vs {expected}"
        return
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * scale, f"{name}: max |diff| {err:.3g} > {tol * scale:.3g}"


def run(fn, b, backend, upstream=1.0, chunk_rows=7, **kw):
    """(loss, metrics, grads) of the fused path with a budget of `chunk_rows` rows, and of the oracle."""
    with kernel_options(chunk_mb=chunk_rows * MB_PER_ROW):
        out = fn(b, backend=backend, **kw)
    ref = fn(b, backend="reference", grad_mode="recompute", **kw)
    return out, grads_of(out.loss, leaves(b), upstream), ref, grads_of(ref.loss, leaves(b), upstream)


def call_tpo(b, **kw):
    return tpo_loss(b["weight"], b["hidden"], b["corrupted_hidden"], b["targets"], b["bias"],
                    ref_seq_scores=b["ref_seq_scores"], **kw)


def check(out, g, ref, gr, tol=2e-5):
    assert_same(out.loss, ref.loss, tol, "loss")
    assert set(out.metrics) == set(ref.metrics)
    for k in ref.metrics:
        assert_same(out.metrics[k], ref.metrics[k], tol, k)
    for k in gr:
        assert_same(g[k], gr[k], tol, f"grad {k}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("loss_type", "label_smoothing", "detach_weights", "average_log_prob"),
    [("sigmoid", 0.0, False, False), ("sigmoid", 0.2, True, False), ("hinge", 0.0, False, True),
     ("ipo", 0.0, True, True)],
)
def test_tpo_matches_autograd(backend, loss_type, label_smoothing, detach_weights, average_log_prob):
    b = batch(device=backend_device(backend))
    out, g, ref, gr = run(call_tpo, b, backend, upstream=-2.5, loss_type=loss_type, label_smoothing=label_smoothing,
                          detach_weights=detach_weights, average_log_prob=average_log_prob, beta=0.7)
    check(out, g, ref, gr)
    if detach_weights:
        assert g["corrupted_hidden"] is None
    else:
        assert g["corrupted_hidden"].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_rows", [1, 9, 11, 1000], ids=["pair-over-budget", "one-pair", "two-pairs", "one-chunk"])
def test_chunk_budgets(backend, chunk_rows):
    """Budgets below one pair (every pair alone, over budget), around one and two pairs, and above all."""
    b = batch(device=backend_device(backend), empty=(4,))  # a rejected response with no token at all
    out, g, ref, gr = run(call_tpo, b, backend, chunk_rows=chunk_rows)
    check(out, g, ref, gr)


def test_chunk_plan_holds_whole_pairs():
    # pair rows 9, 6, 0, 12, 3 with a budget of 10 rows: a pair above the budget goes alone
    assert plan_chunks([9, 6, 0, 12, 3], 10) == [(0, 1), (1, 3), (3, 4), (4, 5)]
    assert plan_chunks([2, 2, 2], 100) == [(0, 3)]
    assert plan_chunks([5, 5], 1) == [(0, 1), (1, 2)]
    assert plan_chunks([], 4) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_and_modules(backend):
    b = batch(device=backend_device(backend), bias=False)

    def call(bb, **kw):
        return dpo_loss(bb["weight"], bb["hidden"], bb["targets"], ref_seq_scores=bb["ref_seq_scores"], **kw)

    out, g, ref, gr = run(call, b, backend, upstream=0.3)
    check(out, g, ref, gr)
    with kernel_options(chunk_mb=7 * MB_PER_ROW):
        mod = DPOLoss(backend=backend)(b["weight"], b["hidden"], b["targets"], ref_seq_scores=b["ref_seq_scores"])
        tmod = TPOLoss(backend=backend)(b["weight"], b["hidden"], b["corrupted_hidden"], b["targets"],
                                        ref_seq_scores=b["ref_seq_scores"])
    assert_same(mod.loss, ref.loss, 2e-5, "DPOLoss")
    assert_same(tmod.loss, call_tpo(b, backend="reference").loss, 2e-5, "TPOLoss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_povid_matches_autograd(backend, average_log_prob):
    b = batch(device=backend_device(backend))
    hc = b["corrupted_hidden"][:B]
    ref_scores = torch.randn(3 * B, generator=torch.Generator().manual_seed(3)).to(b["hidden"].device)

    def call(bb, **kw):
        return povid_loss(bb["weight"], bb["hidden"], hc, bb["targets"], bb["bias"], ref_seq_scores=ref_scores,
                          average_log_prob=average_log_prob, loss_type="hinge", noise_weight=0.3, **kw)

    out, g, ref, gr = run(call, b, backend, upstream=1.3)
    check(out, g, ref, gr)
    assert out.metrics["noisy/argmax_match"] == ref.metrics["noisy/argmax_match"]
    with kernel_options(chunk_mb=7 * MB_PER_ROW):
        mod = POVIDLoss(backend=backend, loss_type="hinge", noise_weight=0.3, average_log_prob=average_log_prob)
        assert_same(mod(b["weight"], b["hidden"], hc, b["targets"], b["bias"], ref_seq_scores=ref_scores).loss,
                    ref.loss, 2e-5, "POVIDLoss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_reference_hidden(backend):
    """LoRA's frozen lm_head: no weight or bias gradient; the reference branch runs forward-only."""
    b = batch(device=backend_device(backend))
    b["weight"].requires_grad_(False)
    b["bias"].requires_grad_(False)
    rh = (b["hidden"].detach() + 0.1).requires_grad_()
    rhc = (b["corrupted_hidden"].detach() - 0.1).requires_grad_()

    def call(bb, **kw):
        return tpo_loss(bb["weight"], bb["hidden"], bb["corrupted_hidden"], bb["targets"], bb["bias"],
                        ref_hidden=rh, ref_corrupted_hidden=rhc, **kw)

    out, g, ref, gr = run(call, b, backend)
    check(out, g, ref, gr)
    assert set(g) == {"hidden", "corrupted_hidden"}
    fresh = call(b, backend=backend)
    assert torch.autograd.grad(fresh.loss, [rh, rhc, b["hidden"]], allow_unused=True)[:2] == (None, None)


def test_no_grad_does_no_gradient_work(monkeypatch):
    b = batch()
    calls = []
    from tpo_fast.ops import fused_chunk

    original = fused_chunk.TorchChunk.logit_grad
    monkeypatch.setattr(fused_chunk.TorchChunk, "logit_grad", lambda self, *a: calls.append(1) or original(self, *a))
    with torch.no_grad():
        out = call_tpo(b, backend="torch")
    assert not out.loss.requires_grad and calls == []
    detached = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
    out2 = call_tpo(detached, backend="torch")
    assert not out2.loss.requires_grad and calls == []
    assert out.loss.item() == out2.loss.item() == pytest.approx(call_tpo(b, backend="reference").loss.item(), rel=1e-5)
    call_tpo(b, backend="torch").loss.backward()
    assert calls, "the gradient path must have run when gradients are wanted"


def test_backward_once_and_no_double_backward():
    b = batch()
    out = call_tpo(b, backend="torch")
    with pytest.raises(RuntimeError, match="grad_mode='recompute'"):
        torch.autograd.grad(out.loss, [b["hidden"]], create_graph=True)
    out = call_tpo(b, backend="torch")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()
    assert "double backward" in NO_SECOND_ORDER


def test_gradient_accumulation_sums_micro_batches():
    """Two forwards and backwards into the same leaves give the sum of both gradients."""
    b = batch()
    leaves_ = leaves(b)
    for _ in range(2):
        call_tpo(b, backend="torch").loss.backward()
    ref = grads_of(call_tpo(b, backend="reference", grad_mode="recompute").loss, leaves_, upstream=2.0)
    for k, t in leaves_.items():
        assert_same(t.grad, ref[k], 2e-5, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_within_project_bounds(backend):
    """bf16: error against fp32 math on the same values <= 2x the plain bf16 path's error + one rounding."""
    b = batch(dtype=torch.bfloat16, device=backend_device(backend))
    b32 = {k: (v.detach().float().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in b.items()}
    b32["ref_seq_scores"] = b["ref_seq_scores"]
    with kernel_options(chunk_mb=7 * MB_PER_ROW):
        out = call_tpo(b, backend=backend)
    g = grads_of(out.loss, leaves(b))
    truth = call_tpo(b32, backend="reference", grad_mode="recompute")
    gt = grads_of(truth.loss, leaves(b32))
    plain = call_tpo(b, backend="reference", grad_mode="recompute")  # bf16 matmul, fp32 after
    gp = grads_of(plain.loss, leaves(b))
    for k in gt:
        assert g[k].dtype == torch.bfloat16
        err = (g[k].double() - gt[k].double()).abs().max().item()
        plain_err = (gp[k].double() - gt[k].double()).abs().max().item()
        assert err <= 2 * plain_err + 2.0**-8 * gt[k].abs().max().item(), (k, err, plain_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_does_not_change_the_result(dtype):
    """Under a bf16 autocast region (a trainer with bf16=True) the fused path computes exactly as outside."""
    b = batch(dtype=dtype)
    plain = call_tpo(b, backend="torch")
    g_plain = grads_of(plain.loss, leaves(b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = call_tpo(b, backend="torch")
    g_auto = grads_of(auto.loss, leaves(b))
    assert auto.loss.dtype == torch.float32 and torch.equal(auto.loss, plain.loss)
    for k in g_plain:
        assert g_auto[k].dtype == dtype and torch.equal(g_auto[k], g_plain[k]), k


def test_fused_pair_loss_contract():
    """The ops-level API: the chunk callback sees whole pairs and its gradient reaches every input."""
    b = batch()
    h, hc = b["hidden"].flatten(0, 1), b["corrupted_hidden"].flatten(0, 1)
    seen = []

    def chunk_loss(c: PairChunk):
        seen.append((c.first, c.stop, c.n_pairs, tuple(c.logprobs.shape)))
        return (c.logprobs * (c.target_logits - c.corrupted_target_logits)).sum()

    with kernel_options(chunk_mb=11 * MB_PER_ROW):
        out = fused_pair_loss(h, b["weight"], b["targets"], chunk_loss, bias=b["bias"], corrupted_hidden=hc,
                              backend="torch")
    # pair rows: (5+2, 2+4, 5+2) valid tokens -> a budget of 11 rows gives one chunk per pair
    assert seen == [(0, 1, 3, (2, T)), (1, 2, 3, (2, T)), (2, 3, 3, (2, T))]
    valid = b["targets"] != IGNORE
    logits = h @ b["weight"].t() + b["bias"]
    y = b["targets"].reshape(-1).clamp(min=0)
    z = logits.gather(1, y[:, None]).squeeze(1)
    zc = (hc * b["weight"][y]).sum(-1) + b["bias"][y]
    logp = z - logits.logsumexp(-1)
    ref = torch.where(valid.reshape(-1), logp * (z - zc), 0.0).sum()
    ins = leaves(b)
    g, gr = grads_of(out.loss, ins, 0.5), grads_of(ref, ins, 0.5)
    for k in ins:
        assert_same(g[k], gr[k], 2e-5, k)
    assert torch.equal(out.logprobs != 0, valid)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_targets_only_where_given(backend):
    """Rows whose second target is ignored hold a constant 0: a loss summing every grid cell must give
    them no softmax gradient (POVID's rejected rows, and any chosen token without a noisy target)."""
    b = batch(device=backend_device(backend), bias=False)
    h = b["hidden"].flatten(0, 1)
    g = torch.Generator().manual_seed(5)
    second = torch.randint(0, V, (2 * B, T), generator=g)
    second[torch.rand(2 * B, T, generator=g) < 0.4] = IGNORE
    second = second.to(h.device)
    with kernel_options(chunk_mb=9 * MB_PER_ROW):
        out = fused_pair_loss(h, b["weight"], b["targets"], lambda c: (c.second_logprobs * 0.7 + c.logprobs).sum(),
                              second_targets=second, backend=backend)
    valid = (b["targets"] != IGNORE).reshape(-1)
    ls = torch.log_softmax(h @ b["weight"].t(), -1)
    lp = ls.gather(1, b["targets"].reshape(-1).clamp(min=0)[:, None]).squeeze(1)
    lp2 = ls.gather(1, second.reshape(-1).clamp(min=0)[:, None]).squeeze(1)
    has2 = valid & (second.reshape(-1) != IGNORE)
    ref = torch.where(valid, lp, 0.0).sum() + 0.7 * torch.where(has2, lp2, 0.0).sum()
    ins = leaves(b)
    assert_same(out.loss, ref, 1e-5, "loss")
    g1, g2 = grads_of(out.loss, ins), grads_of(ref, ins)
    for k in ins:
        assert_same(g1[k], g2[k], 2e-5, k)


def test_bad_arguments_say_what_to_fix():
    b = batch()
    with pytest.raises(ValueError, match="grad_mode must be one of"):
        call_tpo(b, grad_mode="fast")
    with pytest.raises(ValueError, match="grad_mode must be one of"):
        TPOLoss(grad_mode="fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        TPOLoss(backend="bogus")
    with pytest.raises(ValueError, match="reference backend has no fused"):
        fused_pair_loss(b["hidden"].flatten(0, 1), b["weight"], b["targets"], lambda c: c.logprobs.sum(),
                        backend="reference")
    with pytest.raises(ValueError, match="second_targets must have the shape"):
        fused_pair_loss(b["hidden"].flatten(0, 1), b["weight"], b["targets"], lambda c: c.logprobs.sum(),
                        second_targets=b["targets"][:, 1:])
    with pytest.raises(ValueError, match=r"targets must be a 2-D \(2B, T\)"):
        fused_pair_loss(b["hidden"].flatten(0, 1), b["weight"], b["targets"][:5], lambda c: c.logprobs.sum())


def _planned_budgets(monkeypatch, backend: str, chunk_mb: float | None, grad: bool = True) -> list[int]:
    """The rows-per-chunk budgets the fused TPO loss plans on `backend` with `chunk_mb` set (None: unset)."""
    from tpo_fast.ops import fused_pairs

    seen = []
    original = fused_pairs.plan_chunks
    monkeypatch.setattr(fused_pairs, "plan_chunks", lambda rows, budget: seen.append(budget) or original(rows, budget))
    monkeypatch.delenv("TPO_FAST_CHUNK_MB", raising=False)
    scope = contextlib.nullcontext() if chunk_mb is None else kernel_options(chunk_mb=chunk_mb)
    with torch.set_grad_enabled(grad), scope:
        # the backend's own device: on a CUDA machine (no interpreter) backend="triton" refuses CPU tensors
        call_tpo(batch(device=backend_device(backend)), backend=backend)
    return seen


@pytest.mark.parametrize(("chunk_mb", "expected_mb"), [(None, 128), (64, 64), (1024, 128)])
def test_torch_backend_caps_its_chunk_at_128_mib(monkeypatch, chunk_mb, expected_mb):
    """The torch backend's logits chunk is min(chunk_mb, 128 MiB), like its recomputing backward's."""
    assert _planned_budgets(monkeypatch, "torch", chunk_mb) == [expected_mb * 2**20 // (4 * V)]


@pytest.mark.parametrize(("chunk_mb", "expected_mb"), [(None, 1024), (64, 64), (2048, 2048)])
def test_triton_backend_chunk_default_is_1024_mib_and_chunk_mb_overrides_it(monkeypatch, chunk_mb, expected_mb):
    """On the triton backend the fused losses' logits chunk is `chunk_mb` when set, else 1024 MiB (fewer, larger
    chunks: the split backward's own buffer keeps its 256 MiB default)."""
    from tpo_fast.ops import triton_impl

    # without gradient: the plan is all this looks at, and no gradient work runs under the interpreter
    assert _planned_budgets(monkeypatch, "triton", chunk_mb, grad=False) == [expected_mb * 2**20 // (4 * V)]
    if chunk_mb is None:
        assert triton_impl.chunk_bytes() == 256 * 2**20


def call_dpo(b, **kw):
    return dpo_loss(b["weight"], b["hidden"], b["targets"], b["bias"], ref_seq_scores=b["ref_seq_scores"], **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["tpo", "dpo"])
def test_every_response_ignored_gives_zero_gradients(backend, loss):
    """No row to backpropagate: the loss is the reference's and every gradient is an exact zero tensor
    (the weight gradient is written by the first chunk's GEMM, so here it must still exist)."""
    b = batch(device=backend_device(backend), empty=range(2 * B))
    if loss == "dpo":
        del b["corrupted_hidden"]
    out, g, ref, gr = run(call_tpo if loss == "tpo" else call_dpo, b, backend)
    assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-6)
    for k in leaves(b):
        assert g[k] is not None and g[k].shape == b[k].shape and not g[k].any(), k


class _SyncProneOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that make the host wait for a CUDA device: a value read back (`.item()`, `bool()`),
    an output sized by the data (`nonzero`, `masked_select`, boolean-mask indexing), `unique`."""

    READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim", "equal",
             "is_nonzero", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.READS:
            self.seen.append(name)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        ):
            self.seen.append(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["tpo", "dpo", "povid"])
def test_chunks_never_wait_for_the_device(monkeypatch, backend, loss, dtype):
    """On CUDA every read-back stalls the host until the GPU drains, and the chunk loop's launches stop
    overlapping the GPU's work (the first H200 run: 38 syncs per fused TPO call, host-bound). The chunk
    loop (`_run`) reads back once, the plan's rows per sequence (`tolist`, which no dispatch mode sees);
    the chunks never, so the whole call reads back as often with six chunks as with one."""
    from tpo_fast.ops import fused_pairs

    inner = []
    original = fused_pairs._run

    def watched(*args):
        with _SyncProneOps() as mode:
            result = original(*args)
        inner.append(mode.seen)
        return result

    monkeypatch.setattr(fused_pairs, "_run", watched)
    b = batch(dtype=dtype, device=backend_device(backend))  # bf16 triton: dW's 16-bit row scatter too
    hc = b["corrupted_hidden"][:B]
    calls = {
        "tpo": call_tpo,
        "dpo": call_dpo,
        "povid": lambda bb, **kw: povid_loss(bb["weight"], bb["hidden"], hc, bb["targets"], bb["bias"],
                                             ref_seq_scores=torch.zeros(3 * B, device=hc.device), **kw),
    }
    whole = {}
    for rows in (1000, 9):  # one chunk; six (one pair each)
        with kernel_options(chunk_mb=rows * MB_PER_ROW), _SyncProneOps() as forward:
            out = calls[loss](b, backend=backend, grad_mode="fused")
        with _SyncProneOps() as backward:
            out.loss.backward()
        whole[rows] = (forward.seen, backward.seen)
    assert inner == [[], []]
    assert whole[9] == whole[1000]
    assert whole[9][1] == []


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the ops dispatched while the mode is on, in order."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_only_scales_the_stored_gradients(backend):
    """A fused loss's backward is one in-place scaling of each stored fp32 gradient by grad_output: no zero-filled
    gradient for each of the seven (2B, T) grids the Function also returns (autograd materializes those unless
    told not to: one fill kernel each on a GPU), no copy. TPO with a model reference and its corrupted branch,
    so that every grid exists."""
    b = batch(device=backend_device(backend))
    ref = {k: torch.randn_like(b[k]).detach() for k in ("hidden", "corrupted_hidden", "weight")}
    out = tpo_loss(b["weight"], b["hidden"], b["corrupted_hidden"], b["targets"], b["bias"], ref_hidden=ref["hidden"],
                   ref_corrupted_hidden=ref["corrupted_hidden"], ref_weight=ref["weight"], backend=backend,
                   grad_mode="fused")
    upstream = torch.tensor(0.5, device=out.loss.device)
    with _Ops() as ops:
        out.loss.backward(upstream)
    written = [name for name in ops.names if name not in ("detach", "view", "alias")]  # views write nothing
    assert written == ["mul_"] * 4, ops.names  # weight, bias, hidden, corrupted hidden
    assert all(b[k].grad is not None for k in ("weight", "bias", "hidden", "corrupted_hidden"))


def test_a_loss_whose_value_is_unused_sends_no_gradient():
    """With grads not materialized, a backward that reaches the Function without a gradient for its loss (only
    through its non-differentiable outputs: never, with autograd as it is) must hand back no gradient at all."""
    from tpo_fast.ops.fused_pairs import _FusedPairLossFunction

    class Ctx:
        grads = ["stored"]

    assert _FusedPairLossFunction.backward(Ctx, None) == (None,) * 5
    assert Ctx.grads is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's own detector of synchronizing calls")
@pytest.mark.parametrize("loss", ["tpo", "dpo", "povid"])
def test_chunk_loop_never_synchronizes_on_cuda(monkeypatch, loss):
    """The GPU counterpart of test_chunks_never_wait_for_the_device, which a dispatch mode cannot fully see
    (device-to-host copies, `tolist`): from the plan's one read-back to the end of the chunk loop,
    `torch.cuda.set_sync_debug_mode("error")` turns any synchronizing CUDA call into an error. bf16 on the
    triton backend, every input trainable (the weight's 16-bit row scatter included), six chunks."""
    from tpo_fast.ops import fused_pairs

    b = batch(dtype=torch.bfloat16, device="cuda")
    hc = b["corrupted_hidden"][:B]
    calls = {
        "tpo": call_tpo,
        "dpo": call_dpo,
        "povid": lambda bb, **kw: povid_loss(bb["weight"], bb["hidden"], hc, bb["targets"], bb["bias"],
                                             ref_seq_scores=torch.zeros(3 * B, device="cuda"), **kw),
    }
    with kernel_options(chunk_mb=9 * MB_PER_ROW):
        calls[loss](b, backend="triton", grad_mode="fused").loss.backward()  # compiles every kernel first
    plan_init, run = fused_pairs._Plan.__init__, fused_pairs._run

    def init(self, *args):
        plan_init(self, *args)
        torch.cuda.set_sync_debug_mode("error")

    def watched(*args):
        try:
            return run(*args)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(fused_pairs._Plan, "__init__", init)
    monkeypatch.setattr(fused_pairs, "_run", watched)
    with kernel_options(chunk_mb=9 * MB_PER_ROW):
        out = calls[loss](b, backend="triton", grad_mode="fused")
    assert torch.cuda.get_sync_debug_mode() == 0
    out.loss.backward()


def _reference_model(b, seed=5):
    """A reference with its own lm_head (weight and bias) and hidden states near the policy's, no gradient."""
    g = torch.Generator().manual_seed(seed)
    dev = b["hidden"].device

    def near(t, scale):
        return (t.detach().float() + scale * torch.randn(t.shape, generator=g).to(dev)).to(t.dtype)

    return dict(ref_hidden=near(b["hidden"], 0.2), ref_corrupted_hidden=near(b["corrupted_hidden"], 0.2),
                ref_weight=near(b["weight"], 0.05), ref_bias=near(b["bias"], 0.05))


def _call_with_model_reference(loss, ref):
    def call(bb, **kw):
        if loss == "tpo":
            return tpo_loss(bb["weight"], bb["hidden"], bb["corrupted_hidden"], bb["targets"], bb["bias"], **ref, **kw)
        if loss == "povid":  # corrupted rows: the chosen sequences only
            n = bb["targets"].shape[0] // 2
            povid_ref = {**ref, "ref_corrupted_hidden": ref["ref_corrupted_hidden"][:n]}
            return povid_loss(bb["weight"], bb["hidden"], bb["corrupted_hidden"][:n], bb["targets"], bb["bias"],
                              **povid_ref, **kw)
        dpo_ref = {k: v for k, v in ref.items() if k != "ref_corrupted_hidden"}
        return dpo_loss(bb["weight"], bb["hidden"], bb["targets"], bb["bias"], **dpo_ref, **kw)

    return call


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["tpo", "dpo"])
def test_model_reference_with_its_own_head_in_the_fused_pass(backend, loss):
    """A model reference (ref_hidden, ref_weight, ref_bias) is scored by the fused pass itself, chunk by chunk
    on the policy's rows (`PairBranch`): loss, metrics (the rewards hold the reference's scores) and
    gradients equal plain autograd's over materialized logits, over three chunks."""
    b = batch(device=backend_device(backend), seed=3)
    out, g, ref, gr = run(_call_with_model_reference(loss, _reference_model(b)), b, backend, upstream=0.7)
    check(out, g, ref, gr)
    with_grad = {k for k, v in g.items() if v is not None}
    assert with_grad == {"weight", "bias", "hidden"} | ({"corrupted_hidden"} if loss == "tpo" else set())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_branch_grids_are_its_token_stats(backend, dtype):
    """`fused_pair_loss(reference=PairBranch(...))` returns the reference's per-token grids: exactly what
    `token_stats` gives on the same backend (the same forward), 0 at ignored positions, over six chunks."""
    import tpo_fast
    from tpo_fast.ops.fused_pairs import PairBranch

    b = batch(dtype=dtype, device=backend_device(backend), seed=4)
    r = _reference_model(b)
    rh, rhc = r["ref_hidden"].flatten(0, 1), r["ref_corrupted_hidden"].flatten(0, 1)
    branch = PairBranch(rh, r["ref_weight"], r["ref_bias"], rhc)
    flat = b["targets"].flatten()
    def chunk_loss(c):
        assert not any(g.requires_grad for g in (c.ref_logprobs, c.ref_target_logits, c.ref_corrupted_target_logits))
        return c.logprobs.sum()

    with kernel_options(chunk_mb=2 * MB_PER_ROW):
        out = fused_pair_loss(b["hidden"].flatten(0, 1), b["weight"], b["targets"], chunk_loss,
                              b["bias"], b["corrupted_hidden"].flatten(0, 1), backend=backend, reference=branch)
    want = tpo_fast.token_stats(rh, r["ref_weight"], flat, r["ref_bias"], rhc, backend=backend)
    shape = b["targets"].shape
    pairs = ((out.ref_logprobs, want.logprobs), (out.ref_target_logits, want.target_logits),
             (out.ref_corrupted_target_logits, want.corrupted_target_logits))
    for got, exp in pairs:
        if backend == "torch":
            # Same code, but the fused pass multiplies one pair's rows at a time and token_stats all 20 at once:
            # a CPU BLAS (MKL, or oneDNN in the bf16 mode on an AMX CPU) picks its kernel, and so its order of
            # summation, by the row count, so a row need not come out bit for bit the same (a 1-row product
            # differs by 1 ulp on this project's CPU; the GPU machine's CPU differed on these bf16 inputs).
            # 1e-5 is about 20 fp32 ulps of these values (all below 8); a wrong row or weight is off by O(1).
            torch.testing.assert_close(got, exp.view(shape), rtol=0, atol=1e-5)
        else:
            assert torch.equal(got, exp.view(shape))
    assert not out.ref_logprobs[b["targets"] == IGNORE].any()


class _ReadBacks(_SyncProneOps):
    """`_SyncProneOps` plus `Tensor.tolist`, a read-back no dispatch mode sees."""

    def __enter__(self):
        original = self._tolist = torch.Tensor.tolist
        seen = self.seen

        def tolist(t):
            seen.append("tolist")
            return original(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss, grad_mode", [("tpo", "fused"), ("dpo", "fused"), ("povid", "fused"),
                                             ("povid", "recompute")])
def test_a_loss_with_a_model_reference_reads_the_device_back_once(backend, loss, grad_mode):
    """On CUDA a read-back waits for the GPU to drain; the launches after it no longer overlap the GPU's
    work. A fused loss with a model reference reads back once, before any vocabulary kernel: the plan's
    rows per sequence, with the count of out-of-range targets in the same read (the second H200 profile:
    4 per call, one of them waiting for the reference's whole sweep). Its backward reads back never.
    POVID too (it read back five times: its argmax sweep, the pass's plan, the reference's three primitive
    calls), its recomputing path as well; the numbers are checked against autograd elsewhere, and here against
    the per-call read-backs' own."""
    b = batch(device=backend_device(backend), seed=6)
    call = _call_with_model_reference(loss, _reference_model(b))
    with _ReadBacks() as forward:
        out = call(b, backend=backend, grad_mode=grad_mode)
    with _ReadBacks() as backward:
        out.loss.backward()
    assert forward.seen == ["tolist"]
    assert backward.seen == []
    if loss == "povid":  # the same loss as with each primitive call's own read-back
        from tpo_fast.loss import povid as povid_module

        own = povid_module._read_rows
        try:
            povid_module._read_rows = lambda *args: None  # every call reads back for itself, as before
            want = call(b, backend=backend, grad_mode="recompute")
        finally:
            povid_module._read_rows = own
        assert_same(out.loss, want.loss, 2e-5, "povid loss")
        for k in ("rewards/chosen", "rewards_noisy/margins", "noisy/argmax_match"):
            assert_same(out.metrics[k], want.metrics[k], 2e-5, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_stats_reads_the_device_back_once(backend):
    """The per-token primitive (a reference's or POVID's pass) reads back once: the count of target-carrying
    rows and of out-of-range targets together (it was two: the range check, then `nonzero`)."""
    import tpo_fast

    b = batch(device=backend_device(backend), seed=7)
    flat = b["targets"].flatten()
    with _ReadBacks() as mode:
        stats = tpo_fast.token_stats(b["hidden"].flatten(0, 1), b["weight"], flat, b["bias"],
                                     b["corrupted_hidden"].flatten(0, 1), backend=backend)
    assert mode.seen == ["tolist"]
    want = tpo_fast.token_stats(b["hidden"].flatten(0, 1), b["weight"], flat, b["bias"],
                                b["corrupted_hidden"].flatten(0, 1), backend="reference")
    for got, exp in zip(stats[:4], want[:4], strict=True):
        assert_same(got, exp, 2e-5, "token_stats")


@pytest.mark.parametrize("backend", BACKENDS)
def test_primitives_given_their_rows_read_nothing_back(backend):
    """`valid_rows` (the caller's one read-back, shared by several calls): token_stats and target_logits read
    nothing back and give what they give with their own read-back; a bad `valid_rows` is refused by name."""
    import tpo_fast
    from tpo_fast.ops.token_logprobs import valid_row_index

    b = batch(device=backend_device(backend), seed=7)
    h, w, flat = b["hidden"].flatten(0, 1), b["weight"], b["targets"].flatten()
    valid = flat != -100
    rows = valid_row_index(valid, int(valid.sum()))
    with _ReadBacks() as mode:
        got = tpo_fast.token_stats(h, w, flat, b["bias"], b["corrupted_hidden"].flatten(0, 1), return_argmax=True,
                                   backend=backend, valid_rows=rows)
        got_z = tpo_fast.target_logits(h, w, flat, b["bias"], backend=backend, valid_rows=rows)
    assert mode.seen == []
    want = tpo_fast.token_stats(h, w, flat, b["bias"], b["corrupted_hidden"].flatten(0, 1), return_argmax=True,
                                backend=backend)
    for name, g, e in zip(("logprobs", "z", "lse", "zc", "argmax"), got, want, strict=True):
        assert torch.equal(g, e), name  # the same kernels on the same rows
    assert torch.equal(got_z, tpo_fast.target_logits(h, w, flat, b["bias"], backend=backend))
    for bad, err, match in ((rows.int(), TypeError, "valid_rows must be a 1-D int64 tensor of row indices, got "
                             rf"int32 of shape \({rows.numel()},\)"),
                            (rows[None], TypeError, "valid_rows must be a 1-D"),
                            (torch.arange(h.shape[0] + 1, device=h.device), ValueError,
                             rf"valid_rows holds {h.shape[0] + 1} indices for {h.shape[0]} rows")):
        with pytest.raises(err, match=match):
            tpo_fast.token_stats(h, w, flat, backend=backend, valid_rows=bad)
        with pytest.raises(err, match=match):
            tpo_fast.target_logits(h, w, flat, backend=backend, valid_rows=bad)
    # what is checked on the device without a read-back (on the CPU an error now; on CUDA a device-side assert)
    ignored = int((~valid).nonzero()[0])
    wrong = {
        "an ignored row listed": torch.cat([rows[1:], rows.new_tensor([ignored])]).sort().values,
        "a row left out": rows[1:],
        "descending": rows.flip(0),
        "a row twice": torch.cat([rows[:1], rows[:-1]]),
        "past the last row": torch.cat([rows[:-1], rows.new_tensor([h.shape[0]])]),
    }
    for bad in wrong.values():
        for call in (tpo_fast.token_stats, tpo_fast.target_logits):
            with pytest.raises(RuntimeError, match=r"valid_rows must be the ascending indices of exactly the rows "
                                                   r"whose target is not ignore_index, each target in \[0, V\)"):
                call(h, w, flat, backend=backend, valid_rows=bad)
    flat_out = flat.clone()
    flat_out[rows[0]] = w.shape[0]  # a listed row's target out of range
    with pytest.raises(RuntimeError, match="valid_rows must be the ascending indices"):
        tpo_fast.token_stats(h, w, flat_out, backend=backend, valid_rows=rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fused_pass_given_its_rows_per_sequence_reads_nothing_back(backend):
    """`rows_per_sequence` (the caller's read-back, POVID's): the pass plans from it, reads nothing back, and gives
    the loss and gradients of the pass that reads its own; counts that cannot be the sequences' are refused."""
    b = batch(device=backend_device(backend), seed=4)
    h, w = b["hidden"].flatten(0, 1), b["weight"]
    per_seq = (b["targets"] != -100).sum(1).tolist()

    def run_pass(**kw):
        leaf_h, leaf_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        with kernel_options(chunk_mb=9 * MB_PER_ROW), _ReadBacks() as mode:  # several chunks
            out = fused_pair_loss(leaf_h, leaf_w, b["targets"], lambda c: (c.logprobs * c.target_logits).sum(),
                                  backend=backend, **kw)
        out.loss.backward()
        return out.loss, leaf_h.grad, leaf_w.grad, mode.seen

    *got, seen = run_pass(rows_per_sequence=per_seq)
    *want, seen_own = run_pass()
    assert seen == [] and seen_own == ["tolist"]
    for g, e in zip(got, want, strict=True):
        assert torch.equal(g, e)
    t = b["targets"].shape[1]
    for bad in (per_seq[:-1], per_seq[:-1] + [t + 1], per_seq[:-1] + [-1]):
        with pytest.raises(ValueError, match=rf"rows_per_sequence must hold {len(per_seq)} counts in \[0, {t}\]"):
            fused_pair_loss(h, w, b["targets"], lambda c: c.logprobs.sum(), backend=backend, rows_per_sequence=bad)
    with pytest.raises(TypeError):  # a count that is not an int
        fused_pair_loss(h, w, b["targets"], lambda c: c.logprobs.sum(), backend=backend,
                        rows_per_sequence=per_seq[:-1] + [2.5])


@pytest.mark.parametrize("where", ["targets", "reference"])
def test_out_of_range_targets_raise_before_any_vocabulary_work(monkeypatch, where):
    """The range check rides on the plan's read-back: a target >= V still raises, naming it, and no core
    (policy or reference) has computed anything."""
    from tpo_fast.ops import fused_chunk

    b = batch(seed=8)
    bad = b["targets"].clone()
    bad[1, 4] = V + 2
    b["targets"] = bad
    ran = []
    monkeypatch.setattr(fused_chunk.TorchChunk, "stats", lambda *a: ran.append("stats"))
    monkeypatch.setattr(fused_chunk.TorchChunk, "forward_stats", lambda *a: ran.append("forward_stats"))
    call = _call_with_model_reference("tpo", _reference_model(b)) if where == "reference" else call_tpo
    with pytest.raises(ValueError, match=rf"^targets must lie in \[0, V\) = \[0, {V}\) or equal ignore_index=-100; "
                                         rf"targets\[{T + 4}\] = {V + 2}$"):
        call(b, backend="torch")
    assert ran == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["tpo", "dpo"])
def test_model_reference_when_every_response_is_ignored(backend, loss):
    """No target-carrying row: the reference's sweep runs on zero rows, its grids stay 0, the loss is ln 2 (both
    scores 0) as the oracle's, and every gradient is an exact zero tensor."""
    b = batch(device=backend_device(backend), empty=range(2 * B))
    out, g, ref, gr = run(_call_with_model_reference(loss, _reference_model(b)), b, backend)
    check(out, g, ref, gr)
    assert out.loss.item() == pytest.approx(0.6931471805599453, abs=1e-6)
    for k in ("weight", "bias", "hidden") + (("corrupted_hidden",) if loss == "tpo" else ()):
        assert g[k] is not None and g[k].shape == b[k].shape and not g[k].any(), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's own detector of synchronizing calls")
@pytest.mark.parametrize("loss", ["tpo", "dpo", "povid"])
def test_a_loss_with_a_model_reference_synchronizes_once_on_cuda(loss):
    """The GPU counterpart of test_a_loss_with_a_model_reference_reads_the_device_back_once, which a dispatch mode
    cannot fully see: under `torch.cuda.set_sync_debug_mode("warn")` every synchronizing CUDA call warns, and a
    whole fused call (bf16, triton, a model reference, every input trainable, six chunks) warns once."""
    import warnings

    b = batch(dtype=torch.bfloat16, device="cuda", seed=9)
    call = _call_with_model_reference(loss, _reference_model(b))

    def syncs_of(step):
        # where each warning was raised (file:line of the Python frame that made the call), so that a failure
        # names the synchronizing call instead of only counting it
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return result, [f"{w.filename}:{w.lineno}" for w in seen if "synchroniz" in str(w.message).lower()]

    with kernel_options(chunk_mb=9 * MB_PER_ROW):
        call(b, backend="triton", grad_mode="fused").loss.backward()  # compiles every kernel first
        torch.cuda.synchronize()
        out, forward = syncs_of(lambda: call(b, backend="triton", grad_mode="fused"))
        _, backward = syncs_of(out.loss.backward)
    assert len(forward) == 1 and backward == [], (forward, backward)  # the plan's one read-back only


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_fields_without_a_branch_are_none(backend):
    """`FusedPairOutput` has None, not an empty tensor, for every branch the call did not have: no corrupted rows,
    no second targets, no reference; with a reference but no corrupted reference rows, its corrupted grid."""
    from tpo_fast.ops.fused_pairs import PairBranch

    b = batch(device=backend_device(backend), seed=10)
    h, w = b["hidden"].flatten(0, 1), b["weight"]
    out = fused_pair_loss(h, w, b["targets"], lambda c: c.logprobs.sum(), backend=backend)
    assert out.corrupted_target_logits is None and out.second_logprobs is None
    assert out.ref_logprobs is None and out.ref_target_logits is None and out.ref_corrupted_target_logits is None
    out = fused_pair_loss(h, w, b["targets"], lambda c: c.logprobs.sum(), backend=backend,
                          reference=PairBranch(h.detach() + 0.1, w.detach()))
    assert out.ref_logprobs.shape == out.ref_target_logits.shape == b["targets"].shape
    assert out.ref_corrupted_target_logits is None


@pytest.mark.parametrize("budget_rows", [1000, 9])
def test_a_chunk_of_every_pair_reads_the_batch_grids_in_place(budget_rows):
    """One chunk holding every pair sees the batch's grids themselves (no copy); several chunks see copies of
    their rows."""
    b = batch(seed=11)
    storages = []

    def chunk_loss(c):
        storages.append(c.logprobs.untyped_storage().data_ptr())
        return c.logprobs.sum()

    with kernel_options(chunk_mb=budget_rows * MB_PER_ROW):
        out = fused_pair_loss(b["hidden"].flatten(0, 1), b["weight"], b["targets"], chunk_loss, backend="torch")
    same = [ptr == out.logprobs.untyped_storage().data_ptr() for ptr in storages]
    if budget_rows == 1000:
        assert same == [True]
    else:
        assert len(same) > 1 and not any(same)


@pytest.mark.parametrize("loss", ["tpo", "povid"])
def test_fused_loss_over_several_vocabulary_tiles(loss):
    """The whole fused-gradient loss on the triton backend at V = 1100 (three forward tiles under the interpreter,
    eighteen 64-column fp32 tiles on a GPU, each with its own shift in dZ): loss and every gradient equal plain
    autograd over materialized fp32 logits (the reference backend, on the CPU). POVID adds the second targets,
    gathered from their own tiles."""
    v, n_seq, t, d = 1100, 4, 3, 8
    g = torch.Generator().manual_seed(8)
    w = (torch.randn(v, d, generator=g) * 0.5).requires_grad_()
    h = torch.randn(n_seq, t, d, generator=g).requires_grad_()
    # POVID's corrupted rows are the chosen sequences' only, and only pick the noisy argmax (no gradient)
    hc = h.detach()[: n_seq if loss == "tpo" else n_seq // 2] + 0.3 * torch.randn(n_seq, t, d, generator=g)[:1]
    hc.requires_grad_(loss == "tpo")
    y = torch.randint(0, v, (n_seq, t), generator=g)
    y[0, 0], y[1, 1], y[2, 2] = 511, 512, 1099  # tile edges
    y[3, 0] = -100
    ref = torch.randn(n_seq if loss == "tpo" else 3 * n_seq // 2, generator=g)
    n_grads = 3 if loss == "tpo" else 2  # POVID: weight and hidden only

    def grads(backend):
        dev = backend_device(backend)
        xs = [x.detach().to(dev).requires_grad_(x.requires_grad) for x in (w, h, hc)]
        fn = tpo_loss if loss == "tpo" else povid_loss
        out = fn(*xs, y.to(dev), ref_seq_scores=ref.to(dev), backend=backend)
        out.loss.backward()
        return out.loss.detach().cpu(), [x.grad.cpu() for x in xs[:n_grads]]

    got, want = grads("triton"), grads("reference")
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for a, e in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)



class _Allocated(torch.utils._python_dispatch.TorchDispatchMode):
    """The most entries of any tensor a factory op (empty, zeros, full) returns, per dtype, while the mode is on.
    Factories only: the interpreter hands a bf16 kernel argument to numpy as an fp32 copy, which is no buffer of
    the library's."""

    FACTORIES = ("empty", "empty_strided", "new_empty", "new_empty_strided", "zeros", "new_zeros", "full", "new_full")

    def __init__(self):
        super().__init__()
        self.largest: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in self.FACTORIES:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.largest[t.dtype] = max(self.largest.get(t.dtype, 0), t.numel())
        return out


def test_a_bf16_chunk_keeps_its_logits_in_bf16():
    """The Triton path's chunk buffer follows the weight's dtype: for a bf16 model the R x V buffer (then dZ) is
    bf16, and no fp32 tensor of R x V entries exists (the fp32 logits buffer it replaced was twice the bytes)."""
    v, n_seq, t, d = 1100, 4, 3, 8
    g = torch.Generator().manual_seed(9)
    dev = backend_device("triton")
    w = (torch.randn(v, d, generator=g) * 0.5).bfloat16().to(dev).requires_grad_()
    h = torch.randn(n_seq, t, d, generator=g).bfloat16().to(dev).requires_grad_()
    hc = (h.detach().float().cpu() + 0.3 * torch.randn(n_seq, t, d, generator=g)).bfloat16().to(dev).requires_grad_()
    y = torch.randint(0, v, (n_seq, t), generator=g).to(dev)
    rows = n_seq * t
    with _Allocated() as created:
        tpo_loss(w, h, hc, y, ref_seq_scores=torch.zeros(n_seq, device=dev), backend="triton").loss.backward()
    assert created.largest[torch.bfloat16] >= rows * v  # the chunk's buffer
    assert created.largest[torch.float32] < rows * v // 2, created.largest
