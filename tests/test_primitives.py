"""The token primitives (`token_stats`, `token_logprobs`, `target_logits`) against the reference.

Triton runs under TRITON_INTERPRET=1 on CPU (see conftest.py), so shapes stay tiny. fp32 is
compared tightly; bf16 against fp32 truth with a bound relative to what plain bf16 PyTorch
achieves on the same inputs (flash-attention's rule: err <= 2 * pytorch_err + atol).
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._python_dispatch
import torch.utils._pytree

import tpo_fast
from tpo_fast.ops.reference import reference_token_stats

BACKENDS = ["torch", "triton"]
# Triton compiles only for CUDA tensors; on CPU it runs under the interpreter (conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (N, D, V): non-powers of two, D not a multiple of 16, V over one interpreter tile (512),
# N over one row block (64).
SHAPES = [(37, 24, 101), (16, 16, 16), (70, 40, 600)]


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Fill fresh buffers with NaN (ints with a sentinel) so an unwritten output cannot pass."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype in (torch.int64, torch.int32):
            t.fill_(-12345)
        return t

    monkeypatch.setattr(torch, "empty", empty)


def make_inputs(n, d, v, dtype, bias, corrupted, ignore="some", scale=1.0):
    g = torch.Generator().manual_seed(n * 1000 + d * 10 + v)
    h = (torch.randn(n, d, generator=g) * scale).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.5).to(DEVICE, dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.1).to(DEVICE, dtype).requires_grad_() if bias else None
    hc = (torch.randn(n, d, generator=g) * scale).to(DEVICE, dtype).requires_grad_() if corrupted else None
    y = torch.randint(0, v, (n,), generator=g)
    if ignore == "some":
        y[torch.rand(n, generator=g) < 0.3] = -100
    elif ignore == "all":
        y[:] = -100
    return h, w, b, hc, y.to(DEVICE)


def run(backend, h, w, b, hc, y, upstream, argmax=False):
    """Forward, then backward of a random combination of every output; returns outputs and grads."""
    for t in (h, w, b, hc):
        if t is not None:
            t.grad = None
    s = tpo_fast.token_stats(h, w, y, bias=b, corrupted_hidden=hc, backend=backend, return_argmax=argmax)
    total = (s.logprobs * upstream[0] + s.target_logits * upstream[1] + s.lse * upstream[2]).sum()
    if hc is not None:
        total = total + (s.corrupted_target_logits * upstream[3]).sum()
    total.backward()
    outs = {"logprobs": s.logprobs, "target_logits": s.target_logits, "lse": s.lse}
    if hc is not None:
        outs["corrupted_target_logits"] = s.corrupted_target_logits
    named = (("hidden", h), ("weight", w), ("bias", b), ("corrupted", hc))
    grads = {name: t.grad for name, t in named if t is not None}
    return s, outs, grads


def naive_bf16(h, w, b, hc, y, upstream):
    """What a user gets from plain PyTorch in the input dtype (logits materialized in bf16)."""
    for t in (h, w, b, hc):
        if t is not None:
            t.grad = None
    valid = y != -100
    safe = torch.where(valid, y, 0)
    logits = h @ w.t()
    if b is not None:
        logits = logits + b
    lse = torch.logsumexp(logits.float(), -1)
    z = logits.float().gather(1, safe[:, None]).squeeze(1)
    zero = torch.zeros((), device=h.device)
    outs = {
        "logprobs": torch.where(valid, z - lse, zero),
        "target_logits": torch.where(valid, z, zero),
        "lse": torch.where(valid, lse, zero),
    }
    if hc is not None:
        zc = (hc * w[safe]).sum(-1).float() + (b[safe].float() if b is not None else 0)
        outs["corrupted_target_logits"] = torch.where(valid, zc, zero)
    total = sum((outs[k] * upstream[i]).sum() for i, k in enumerate(outs))
    total.backward()
    named = (("hidden", h), ("weight", w), ("bias", b), ("corrupted", hc))
    grads = {name: t.grad for name, t in named if t is not None}
    return outs, grads


def assert_close(name, got, want, atol, rtol):
    got, want = got.float(), want.float()
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    if not bool((err <= bound).all()):
        i = int((err - bound).flatten().argmax())
        raise AssertionError(
            f"{name}: worst element {i}: got {got.flatten()[i].item():.6g}, want {want.flatten()[i].item():.6g} "
            f"(|err| {err.flatten()[i].item():.3g} > {bound.flatten()[i].item():.3g})"
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-D{}-V{}".format(*s))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("ignore", ["none", "some"])
def test_fp32_matches_reference(backend, shape, bias, ignore):
    n, d, v = shape
    h, w, b, hc, y = make_inputs(n, d, v, torch.float32, bias, corrupted=True, ignore=ignore)
    upstream = torch.randn(4, n, device=DEVICE)
    s, outs, grads = run(backend, h, w, b, hc, y, upstream, argmax=True)
    ref_s, ref_outs, ref_grads = run("reference", h, w, b, hc, y, upstream, argmax=True)
    for k in outs:
        assert_close(k, outs[k], ref_outs[k], atol=1e-5, rtol=1e-5)
    for k in grads:
        assert_close(f"grad {k}", grads[k], ref_grads[k], atol=1e-5, rtol=1e-4)
    assert torch.equal(s.argmax, ref_s.argmax)
    assert s.logprobs.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES[::2], ids=lambda s: "N{}-D{}-V{}".format(*s))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_bf16_within_pytorch_error(backend, shape, bias):
    n, d, v = shape
    h, w, b, hc, y = make_inputs(n, d, v, torch.bfloat16, bias, corrupted=True)
    upstream = torch.randn(4, n, device=DEVICE)
    _, outs, grads = run(backend, h, w, b, hc, y, upstream)
    # fp32 truth on the same (bf16-rounded) values
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    b32 = None if b is None else b.detach().float().requires_grad_()
    hc32 = hc.detach().float().requires_grad_()
    _, true_outs, true_grads = run("reference", h32, w32, b32, hc32, y, upstream)
    naive_outs, naive_grads = naive_bf16(h, w, b, hc, y, upstream)
    for k in outs:
        tol = (naive_outs[k] - true_outs[k]).abs().max().item()
        assert_close(k, outs[k], true_outs[k], atol=2 * tol + 1e-3, rtol=0)
    for k in grads:
        tol = (naive_grads[k].float() - true_grads[k]).abs().max().item()
        assert_close(f"grad {k}", grads[k], true_grads[k], atol=2 * tol + 1e-2, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_give_zero_and_zero_grad(backend):
    h, w, b, hc, y = make_inputs(20, 24, 50, torch.float32, bias=True, corrupted=True, ignore="all")
    s, outs, grads = run(backend, h, w, b, hc, y, torch.randn(4, 20, device=DEVICE))
    for k, o in outs.items():
        assert torch.equal(o, torch.zeros(20, device=DEVICE)), k
    for k, g in grads.items():
        assert g is not None and torch.count_nonzero(g) == 0, k


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_get_no_gradient(backend):
    h, w, b, hc, y = make_inputs(30, 24, 50, torch.float32, bias=False, corrupted=True, ignore="some")
    _, _, grads = run(backend, h, w, b, hc, y, torch.randn(4, 30, device=DEVICE))
    ignored = y == -100
    assert ignored.any()
    assert torch.count_nonzero(grads["hidden"][ignored]) == 0
    assert torch.count_nonzero(grads["corrupted"][ignored]) == 0


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_empty_batch(backend):
    h = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(10, 8, device=DEVICE, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long, device=DEVICE)
    lp = tpo_fast.token_logprobs(h, w, y, backend=backend)
    assert lp.shape == (0,) and lp.dtype == torch.float32
    lp.sum().backward()
    assert w.grad is None or torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_gets_no_gradient(backend):
    h, w, b, hc, y = make_inputs(20, 24, 50, torch.float32, bias=True, corrupted=False)
    w.requires_grad_(False)
    b.requires_grad_(False)
    lp = tpo_fast.token_logprobs(h, w, y, bias=b, backend=backend)
    lp.sum().backward()
    assert w.grad is None and b.grad is None
    h2 = h.detach().clone().requires_grad_()
    tpo_fast.token_logprobs(h2, w, y, bias=b, backend="reference").sum().backward()
    assert_close("grad hidden", h.grad, h2.grad, 1e-5, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_gathered_outputs_carry_gradient(backend):
    """A gradient on the target logits alone (no vocabulary sweep needed) is still exact."""
    h, w, b, hc, y = make_inputs(20, 24, 50, torch.float32, bias=True, corrupted=True)
    s = tpo_fast.token_stats(h, w, y, bias=b, corrupted_hidden=hc, backend=backend)
    (s.target_logits.sum() + 2 * s.corrupted_target_logits.sum()).backward()
    got = [t.grad.clone() for t in (h, w, b, hc)]
    for t in (h, w, b, hc):
        t.grad = None
    s = tpo_fast.token_stats(h, w, y, bias=b, corrupted_hidden=hc, backend="reference")
    (s.target_logits.sum() + 2 * s.corrupted_target_logits.sum()).backward()
    for name, g, t in zip(["hidden", "weight", "bias", "corrupted"], got, (h, w, b, hc), strict=True):
        assert_close(f"grad {name}", g, t.grad, 1e-5, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_do_not_overflow(backend):
    h, w, b, hc, y = make_inputs(20, 16, 40, torch.float32, bias=False, corrupted=False, scale=1.0)
    with torch.no_grad():
        h.mul_(1e4 / (h @ w.t()).abs().max())  # logits of magnitude 1e4
    lp, z, lse = tpo_fast.token_logprobs(h, w, y, return_target_logit=True, return_lse=True, backend=backend)
    ref = reference_token_stats(h, w, y)
    assert torch.isfinite(lp).all() and torch.isfinite(lse).all()
    assert z.abs().max() > 1e3
    assert_close("logprobs", lp, ref[0], atol=1e-2, rtol=1e-5)
    assert_close("lse", lse, ref[2], atol=1e-2, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_input_stays_in_its_row(backend):
    h, w, b, hc, y = make_inputs(20, 16, 40, torch.float32, bias=False, corrupted=False, ignore="none")
    with torch.no_grad():
        h[5, 3] = float("nan")
        h[7, 0] = float("inf")
    lp = tpo_fast.token_logprobs(h, w, y, backend=backend)
    bad = torch.zeros(20, dtype=torch.bool, device=DEVICE)
    bad[[5, 7]] = True
    assert not torch.isfinite(lp[bad]).any()
    assert torch.isfinite(lp[~bad]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    h_full = torch.randn(24, 40, dtype=torch.float32, device=DEVICE)
    h = h_full[:, ::2]  # (24, 20), stride 2
    w = torch.randn(20, 33, device=DEVICE).t()  # (33, 20), transposed
    y = torch.randint(0, 33, (48,), device=DEVICE)[::2]
    ref = reference_token_stats(h, w, y)[0]
    assert_close("logprobs", tpo_fast.token_logprobs(h, w, y, backend=backend), ref, 1e-5, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_logits_forward_and_backward(backend):
    h, w, b, _, y = make_inputs(33, 20, 45, torch.float32, bias=True, corrupted=False)
    g = torch.randn(33, device=DEVICE)
    (tpo_fast.target_logits(h, w, y, bias=b, backend=backend) * g).sum().backward()
    got = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    z = tpo_fast.target_logits(h, w, y, bias=b, backend="reference")
    (z * g).sum().backward()
    for name, a, t in zip(["hidden", "weight", "bias"], got, (h, w, b), strict=True):
        assert_close(f"grad {name}", a, t.grad, 1e-5, 1e-5)
    assert torch.equal(z[y == -100], torch.zeros(int((y == -100).sum()), device=DEVICE))


def test_int32_targets_accepted_and_auto_backend_on_cpu():
    h, w, _, _, y = make_inputs(10, 16, 20, torch.float32, bias=False, corrupted=False, ignore="none")
    a = tpo_fast.token_logprobs(h, w, y.int())
    b = tpo_fast.token_logprobs(h, w, y, backend="reference")
    assert_close("logprobs", a, b, 1e-5, 1e-5)
    assert tpo_fast.ops.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        tpo_fast.ops.resolve_backend("triton", torch.device("cpu"))


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(hidden=a["hidden"][None]), ValueError, r"hidden must be 2-D \(N, D\)"),
        (lambda a: a.update(weight=a["weight"][:, :-1]), ValueError, "must share the hidden size D"),
        (lambda a: a.update(targets=a["targets"].float()), TypeError, "targets must be an integer tensor"),
        (lambda a: a.update(targets=a["targets"][:-1]), ValueError, r"targets must be of shape \(N,\) = \(6,\)"),
        (lambda a: a.update(targets=torch.tensor([0, 1, 2, 3, 4, 9])), ValueError, r"targets\[5\] = 9"),
        (lambda a: a.update(targets=torch.tensor([0, 1, -3, 3, 4, 5])), ValueError, r"targets\[2\] = -3"),
        (lambda a: a.update(hidden=a["hidden"].double()), TypeError, "hidden must be float32, float16 or bfloat16"),
        (lambda a: a.update(hidden=a["hidden"].half()), TypeError, "must have the same dtype"),
        (lambda a: a.update(bias=torch.zeros(8)), ValueError, r"bias must be of shape \(V,\) = \(9,\)"),
        (lambda a: a.update(hidden=a["hidden"].tolist()), TypeError, "hidden must be a torch.Tensor"),
        (lambda a: a.update(targets=a["targets"].to("meta")), ValueError, "must be on the same device"),
        (lambda a: a.update(backend="cuda"), ValueError, "backend must be one of"),
    ],
    ids=["rank", "D", "float-targets", "targets-len", "target-too-big", "target-negative", "float64",
         "mixed-dtype", "bias-shape", "not-tensor", "device", "backend"],
)
def test_bad_input_errors(mutate, exc, match):
    args = dict(hidden=torch.randn(6, 8), weight=torch.randn(9, 8), targets=torch.arange(6), bias=None, backend="torch")
    mutate(args)
    with pytest.raises(exc, match=match):
        tpo_fast.token_logprobs(**args)


@pytest.mark.parametrize("ignore_index", [None, 2.5, True], ids=["none", "float", "bool"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("fn", ["token_logprobs", "target_logits", "token_stats"])
def test_ignore_index_must_be_an_int(fn, backend, ignore_index):
    """None compared unequal to every target (and then failed inside the compaction, `'bool' object has no attribute
    'shape'`); a float ignored nothing."""
    with pytest.raises(TypeError, match=rf"^ignore_index must be an int \(default -100\), got {ignore_index!r}$"):
        getattr(tpo_fast, fn)(torch.randn(6, 8), torch.randn(9, 8), torch.arange(6), ignore_index=ignore_index,
                              backend=backend)


def test_corrupted_hidden_shape_error():
    with pytest.raises(ValueError, match="corrupted_hidden must have the shape of hidden"):
        tpo_fast.token_stats(torch.randn(6, 8), torch.randn(9, 8), torch.arange(6), corrupted_hidden=torch.randn(5, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_n_by_v_allocation(backend, monkeypatch):
    """The largest single allocation of a forward+backward stays far below N x V fp32."""
    from torch.profiler import ProfilerActivity, profile

    from tpo_fast.ops import torch_chunked

    monkeypatch.setattr(torch_chunked, "_chunk_rows", lambda v: 16)  # the torch backend: O(chunk x V)
    monkeypatch.setenv("TPO_FAST_CHUNK_MB", "0.05")  # the triton backend: one N x chunk buffer
    n, d, v = 512, 8, 4000  # N x V well above the V x D buffers (weight copies, its gradient)
    h, w, _, hc, y = make_inputs(n, d, v, torch.float32, bias=False, corrupted=True, ignore="none")

    def step():
        s = tpo_fast.token_stats(h, w, y, corrupted_hidden=hc, backend=backend)
        (s.logprobs.sum() + s.corrupted_target_logits.sum()).backward()

    if DEVICE == "cuda":  # peak above what is resident: every buffer the step holds at once
        # once before measuring: a process's first GEMM allocates cuBLAS's workspace (8 to 32 MiB, held for
        # good) through the caching allocator, more than the N x V bound of this step
        step()
        h.grad = w.grad = hc.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        largest = torch.cuda.max_memory_allocated() - base
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest <= n * v * 4 // 4, f"largest allocation {largest} B vs N x V fp32 = {n * v * 4} B"


def _triton_grads(monkeypatch, eps, h, w, b, y, g):
    monkeypatch.setenv("TPO_FAST_GRAD_FILTER_EPS", eps)
    for t in (h, w, b):
        t.grad = None
    (tpo_fast.token_logprobs(h, w, y, bias=b, backend="triton") * g).sum().backward()
    return [t.grad.clone() for t in (h, w, b)]


def test_grad_filter_skips_negligible_tiles_within_its_bound(monkeypatch):
    """Gradient filtering (opt-in): tiles of negligible softmax are dropped, the rest stays exact."""
    from tpo_fast.ops.triton_impl import tile_config

    n, d = 16, 16
    # the filtering kernel's vocabulary tile: 512 under the interpreter, 128 on a GPU (its atomic tiles)
    tile = tile_config(n, 4096, d, torch.float32, atomic=True).block_v
    v = 4 * tile - 48  # 4 vocabulary tiles, the last one partial (2000 under the interpreter)
    assert tile_config(n, v, d, torch.float32, atomic=True).block_v == tile
    h, w, b, _, y = make_inputs(n, d, v, torch.float32, bias=True, corrupted=False, ignore="none")
    live = tile * 300 // 512
    with torch.no_grad():
        b[tile:] -= 40.0  # the softmax lives in the first tile: the other three are below 1e-15
        b[live:tile] -= 40.0  # a tile is skipped when its largest entry is negligible, not its smallest
        y.remainder_(tile)
    g = torch.randn(n, device=DEVICE)
    g[3] = 0.0  # nor when one row's entries are all zero
    exact = _triton_grads(monkeypatch, "", h, w, b, y, g)
    ref = _triton_grads(monkeypatch, "0", h, w, b, y, g)
    for a, e in zip(ref, exact, strict=True):  # "0" is exact too (atomics may reorder sums on a GPU)
        assert_close("eps=0", a, e, atol=1e-6, rtol=1e-5)
    filtered = _triton_grads(monkeypatch, "1e-6", h, w, b, y, g)
    skipped_bound = 1e-6 * v * w.detach().abs().max()  # dropped |dz| < eps per entry
    assert (filtered[0] - exact[0]).abs().max() <= skipped_bound
    assert_close("grad weight", filtered[1], exact[1], atol=float(skipped_bound), rtol=0)
    # the skipped tiles ran no GEMM: their weight rows got (tiny) gradient only without filtering
    assert torch.count_nonzero(exact[1][tile:]) > 0 and torch.count_nonzero(filtered[1][tile:]) == 0
    assert_close("grad weight, kept tile", filtered[1][:tile], exact[1][:tile], atol=1e-6, rtol=1e-5)
    assert_close("grad bias", filtered[2], exact[2], atol=1e-6, rtol=1e-5)  # bias is never filtered


def test_grad_filter_above_every_entry_leaves_the_one_hot_part(monkeypatch):
    h, w, b, _, y = make_inputs(20, 16, 50, torch.float32, bias=False, corrupted=False, ignore="some")
    g = torch.randn(20, device=DEVICE)
    got = _triton_grads(monkeypatch, "10", h, w, torch.zeros(50, device=DEVICE, requires_grad=True), y, g)
    for t in (h, w):
        t.grad = None
    (tpo_fast.target_logits(h, w, y, backend="reference") * g).sum().backward()  # logp minus its lse term
    assert_close("grad hidden", got[0], h.grad, 1e-6, 1e-5)
    assert_close("grad weight", got[1], w.grad, 1e-6, 1e-5)


@pytest.mark.parametrize(
    "mode,chunk_mb,tma",
    [("split", "0.01", "0"), ("split", "", "0"), ("split", "0.01", "1"), ("split", "", "1"), ("atomic", "", "0")],
)
def test_triton_backward_modes_match_reference(monkeypatch, mode, chunk_mb, tma):
    """Both Triton backwards (split: gradient chunks + two GEMMs; atomic: fused) over many chunks, and
    the bulk-tensor-copy (TMA) loads of the GEMM-shaped kernels (forced on: the interpreter runs them too)."""
    monkeypatch.setenv("TPO_FAST_BACKWARD", mode)
    monkeypatch.setenv("TPO_FAST_CHUNK_MB", chunk_mb)  # 10 KB: the vocabulary in several chunks
    monkeypatch.setenv("TPO_FAST_TMA", tma)
    from tpo_fast.ops import triton_impl

    used = []
    real = triton_impl._tma_descriptors

    def spy(*args):
        out = real(*args)
        used.append(out[2])
        return out

    monkeypatch.setattr(triton_impl, "_tma_descriptors", spy)
    n, d, v = 70, 40, 600  # D * 4 bytes is a multiple of 16: describable
    h, w, b, hc, y = make_inputs(n, d, v, torch.float32, bias=True, corrupted=True, ignore="some")
    upstream = torch.randn(4, n, device=DEVICE)
    s, outs, grads = run("triton", h, w, b, hc, y, upstream, argmax=True)
    ref_s, ref_outs, ref_grads = run("reference", h, w, b, hc, y, upstream, argmax=True)
    for k in outs:
        assert_close(k, outs[k], ref_outs[k], atol=1e-5, rtol=1e-5)
    for k in grads:
        assert_close(f"grad {k}", grads[k], ref_grads[k], atol=1e-5, rtol=1e-4)
    assert torch.equal(s.argmax, ref_s.argmax)
    assert used and all(used) == (tma == "1")
    assert len(used) == (2 if mode == "split" else 1)  # forward, and the split backward


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_tiles_and_argmax_ties(backend):
    """A vocabulary half at -inf bias (whole tiles contribute nothing) and argmax ties across tiles."""
    n, d, v = 24, 16, 1100
    h, w, b, _, y = make_inputs(n, d, v, torch.float32, bias=True, corrupted=False, ignore="none")
    with torch.no_grad():
        b[: v // 2] = float("-inf")
        w[v - 1] = w[v // 2 + 3]  # an exact duplicate in a later tile: argmax keeps the first
        b[v - 1] = b[v // 2 + 3]
        w[v // 2 + 3] *= 50.0  # and make it the maximum for many rows
        w[v - 1] *= 50.0
        y.remainder_(v // 2).add_(v // 2)
    upstream = torch.randn(4, n, device=DEVICE)
    s, outs, grads = run(backend, h, w, b, None, y, upstream, argmax=True)
    ref_s, ref_outs, ref_grads = run("reference", h, w, b, None, y, upstream, argmax=True)
    for k in outs:
        assert torch.isfinite(outs[k]).all(), k
        assert_close(k, outs[k], ref_outs[k], atol=1e-4, rtol=1e-5)
    for k in grads:
        assert_close(f"grad {k}", grads[k], ref_grads[k], atol=1e-5, rtol=1e-4)
    assert torch.equal(s.argmax, ref_s.argmax)
    assert (s.argmax == v // 2 + 3).any() and not (s.argmax == v - 1).any()


@pytest.mark.parametrize(
    "var,value,match",
    [
        ("TPO_FAST_BACKWARD", "fused", "TPO_FAST_BACKWARD must be 'split' or 'atomic', got 'fused'"),
        ("TPO_FAST_CHUNK_MB", "-3", "TPO_FAST_CHUNK_MB must be a positive, finite number of MiB, got '-3'"),
        ("TPO_FAST_GRAD_FILTER_EPS", "small", "TPO_FAST_GRAD_FILTER_EPS must be a finite number >= 0, got 'small'"),
        ("TPO_FAST_TMA", "yes", "TPO_FAST_TMA must be 'auto', '0' or '1', got 'yes'"),
        ("TPO_FAST_TILES", "128,128,64,8", "TPO_FAST_TILES must be 'block_n,block_v,block_d,num_warps,num_stages"),
    ],
)
def test_bad_kernel_settings_fail_the_first_launch(monkeypatch, var, value, match):
    """Every option is checked when the options are read (tpo_fast/ops/options.py), before any kernel runs."""
    h, w, _, _, y = make_inputs(8, 16, 20, torch.float32, bias=False, corrupted=False)
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=match):
        tpo_fast.token_logprobs(h, w, y, backend="triton")


@pytest.mark.parametrize("value", ["128,128,64,8", "128,100,64,8,3", "8,128,64,8,3", "128,128,64,6,3", "a,b,c,d,e"])
def test_tile_override_bad_settings(monkeypatch, value):
    from tpo_fast.ops.options import KernelOptions

    monkeypatch.setenv("TPO_FAST_TILES", value)
    with pytest.raises(ValueError, match="TPO_FAST_TILES must be 'block_n,block_v,block_d,num_warps,num_stages"):
        KernelOptions.from_env()


@pytest.mark.parametrize(
    "value,want", [("64,256,32,4,4,16", (64, 256, 32, 4, 4, 16)), ("128,128,64,8,3", (128, 128, 64, 8, 3, 8))]
)
def test_tile_override_is_read(monkeypatch, value, want):
    from tpo_fast.ops.triton_impl import TileConfig, tile_config

    monkeypatch.setenv("TPO_FAST_TILES", value)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU tiles (the interpreter has its own)
    assert tile_config(4096, 32000, 4096, torch.bfloat16) == TileConfig(*want)


class _LargestFp32(torch.utils._python_dispatch.TorchDispatchMode):
    """The most entries of any fp32 tensor an op returns while the mode is on (views and in-place results too)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def test_bf16_weight_gradient_needs_no_fp32_vocabulary_buffer(monkeypatch):
    """The split backward writes dW in the weight's dtype: no V x D fp32 buffer, same values."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("TPO_FAST_CHUNK_MB", "0.01")
    n, d, v = 16, 64, 4000
    h, w, _, hc, y = make_inputs(n, d, v, torch.bfloat16, bias=False, corrupted=True, ignore="none")
    y[1::2] = y[0]  # repeated targets: the corrupted rows' rank-1 part lands on shared weight rows
    upstream = torch.randn(4, n, device=DEVICE)

    # Every tensor any op of the step creates (the autograd engine's backward thread included), on either device:
    # none is fp32 with V x D entries. A CUDA step's peak cannot tell: it holds the bf16 gradient itself (half of
    # V x D fp32) and whatever cuBLAS takes through the caching allocator for its GEMMs, which is no tensor here.
    with _LargestFp32() as created:
        _, _, grads = run("triton", h, w, None, hc, y, upstream)
    assert 0 < created.largest < v * d, f"an fp32 tensor of {created.largest} entries vs V x D = {v * d}"
    if DEVICE == "cpu":
        h.grad = w.grad = hc.grad = None
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _, _, grads = run("triton", h, w, None, hc, y, upstream)
        largest = max(e.cpu_memory_usage for e in prof.events())
        # the bf16 gradient itself is V x D x 2 B; an fp32 buffer would be twice that
        assert largest < v * d * 3, f"largest allocation {largest} B vs V x D fp32 = {v * d * 4} B"
    assert grads["weight"].dtype == torch.bfloat16
    h32, w32, hc32 = (t.detach().float().requires_grad_() for t in (h, w, hc))
    _, _, true = run("reference", h32, w32, None, hc32, y, upstream)
    for k in grads:
        err = (grads[k].float() - true[k]).norm() / true[k].norm()
        assert err < 1e-2, (k, float(err))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tma_loads_compute_what_plain_loads_compute(monkeypatch, dtype):
    """The bulk-tensor-copy loads (TPO_FAST_TMA=1, zero-filled past the edges) and the masked plain
    loads give the same forward and gradients; under the interpreter, bit for bit."""
    monkeypatch.setenv("TPO_FAST_CHUNK_MB", "0.01")
    n, d, v = 70, 48, 600  # no dimension a multiple of the tiles: every edge is exercised
    h, w, b, hc, y = make_inputs(n, d, v, dtype, bias=True, corrupted=True, ignore="some")
    upstream = torch.randn(4, n, device=DEVICE)
    results = []
    for tma in ("0", "1"):
        monkeypatch.setenv("TPO_FAST_TMA", tma)
        s, outs, grads = run("triton", h, w, b, hc, y, upstream, argmax=True)
        results.append(({k: t.clone() for k, t in outs.items()}, {k: t.clone() for k, t in grads.items()}, s.argmax))
    (o0, g0, a0), (o1, g1, a1) = results
    assert torch.equal(a0, a1)
    for k in (*o0, *g0):
        x, ref = (o0 | g0)[k], (o1 | g1)[k]
        if DEVICE == "cpu":
            assert torch.equal(x, ref), k
        else:
            assert_close(k, x, ref, atol=1e-5, rtol=1e-3 if dtype == torch.bfloat16 else 1e-5)


def test_grouped_program_order_covers_a_partial_last_group():
    """More row blocks than one group (and a last, partial group): every (row block, tile) is visited once."""
    n = 300 if DEVICE == "cpu" else 1100  # 5 row blocks of 64 in groups of 4 here; on a GPU 18 in groups of 8
    h, w, b, hc, y = make_inputs(n, 16, 1100, torch.float32, bias=True, corrupted=True, ignore="none")
    upstream = torch.randn(4, n, device=DEVICE)
    s, outs, grads = run("triton", h, w, b, hc, y, upstream, argmax=True)
    ref_s, ref_outs, ref_grads = run("reference", h, w, b, hc, y, upstream, argmax=True)
    for k in outs:
        assert_close(k, outs[k], ref_outs[k], atol=1e-5, rtol=1e-5)
    for k in grads:
        assert_close(f"grad {k}", grads[k], ref_grads[k], atol=1e-5, rtol=1e-4)
    assert torch.equal(s.argmax, ref_s.argmax)
