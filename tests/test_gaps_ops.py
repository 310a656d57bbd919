"""The Triton split backward's 16-bit path over several vocabulary chunks (issue 17).

`_split_backward` accumulates the hidden gradient chunk by chunk in fp32 (`gemm.addmm_f32_`); for fp16 and bf16
inputs on a GPU that is cuBLAS's 16-bit x 16-bit -> fp32 product, a branch no CPU run reaches. This test
shrinks the chunk budget so that the vocabulary spans several chunks, runs on CUDA when there is one
(compiled kernels; the interpreter on CPU), and holds the gradients to fp32 truth within a bound relative
to what plain PyTorch achieves in the same dtype (err <= 2 * pytorch_err + atol). scripts/gpu_check.sh runs it.
"""

from __future__ import annotations

import re

import pytest
import torch

import tpo_fast
from tpo_fast.ops import gemm, triton_impl

ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
# Both backends on CUDA when there is one (the torch backend's buffers must follow its inputs' device too),
# else on the CPU (Triton under its interpreter, see conftest.py).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _worst(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_split_backward_accumulates_16bit_chunks(monkeypatch, dtype):
    monkeypatch.setenv("TPO_FAST_BACKWARD", "split")
    monkeypatch.setenv("TPO_FAST_CHUNK_MB", "0.01")  # 10 KiB: a few hundred vocabulary columns per chunk
    calls = []
    real = gemm.addmm_f32_
    monkeypatch.setattr(gemm, "addmm_f32_", lambda acc, a, b: calls.append(a.dtype) or real(acc, a, b))

    device = DEVICE
    g = torch.Generator().manual_seed(7)
    n, d, v = 24, 32, 1500  # V not a multiple of any tile
    h32 = torch.randn(n, d, generator=g) * 2
    w32 = torch.randn(v, d, generator=g) / d**0.5
    b32 = torch.randn(v, generator=g) * 0.1
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -100
    upstream = torch.randn(n, generator=g)
    h, w, b = (t.to(device, dtype).requires_grad_() for t in (h32, w32, b32))
    (tpo_fast.token_logprobs(h, w, y.to(device), bias=b, backend="triton") * upstream.to(device)).sum().backward()
    assert len(calls) >= 2 and set(calls) == {dtype}, calls  # the gradient spans 3 or more chunks

    # fp32 truth on the same (rounded) inputs, and plain PyTorch in the input dtype.
    exact = [t.detach().cpu().float().requires_grad_() for t in (h, w, b)]
    valid = y != -100
    logits = exact[0] @ exact[1].t() + exact[2]
    (logits.log_softmax(-1).gather(-1, y.clamp(min=0)[:, None]).squeeze(-1) * valid * upstream).sum().backward()
    naive = [t.detach().cpu().to(dtype).requires_grad_() for t in (h, w, b)]
    logits16 = naive[0] @ naive[1].t() + naive[2]
    (logits16.log_softmax(-1).gather(-1, y.clamp(min=0)[:, None]).squeeze(-1) * valid * upstream.to(dtype)).sum() \
        .backward()
    for name, t, e, p in zip(("hidden", "weight", "bias"), (h, w, b), exact, naive, strict=True):
        assert t.grad.dtype == dtype
        err, bound = _worst(t.grad.cpu(), e.grad), 2 * _worst(p.grad, e.grad) + ATOL[dtype]
        assert err <= bound, f"grad {name}: worst error {err:.3g} > {bound:.3g}"


# Which inputs take gradient and which outputs get an upstream gradient: every branch of the backwards
# (a frozen head, a frozen trunk, a corrupted branch with or without its own upstream gradient).
GRAD_CASES = {
    "all": dict(grads="hwbc", upstream="pzlc"),
    "weight-only": dict(grads="w", upstream="p"),
    "hidden-only": dict(grads="h", upstream="pz"),
    "bias-only": dict(grads="b", upstream="p"),
    "corrupted-upstream-only": dict(grads="hwbc", upstream="c"),
    "corrupted-without-upstream": dict(grads="hwbc", upstream="p"),
    "lse-upstream-only": dict(grads="hwb", upstream="l"),
}


@pytest.fixture
def several_chunks(monkeypatch):
    """Every chunked loop in several chunks: 4 rows per torch chunk, a few vocabulary tiles per Triton chunk."""
    from tpo_fast.ops import torch_chunked

    monkeypatch.setattr(torch_chunked, "_chunk_rows", lambda v: 4)
    monkeypatch.setenv("TPO_FAST_CHUNK_MB", "0.01")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(GRAD_CASES), ids=list(GRAD_CASES))
def test_chunked_backends_over_several_chunks(several_chunks, backend, case):
    """Outputs and gradients over several chunks match the reference, for every subset of inputs taking gradient."""
    grads, upstream = GRAD_CASES[case]["grads"], GRAD_CASES[case]["upstream"]
    device = DEVICE
    g = torch.Generator().manual_seed(3)
    n, d, v = 37, 24, 600
    base = dict(h=torch.randn(n, d, generator=g), w=torch.randn(v, d, generator=g) / d**0.5,
                b=torch.randn(v, generator=g) * 0.1, c=torch.randn(n, d, generator=g))
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = -100
    up = {k: torch.randn(n, generator=g) for k in "pzlc"}

    def run(name):
        dev = device if name != "reference" else "cpu"
        t = {k: x.clone().to(dev).requires_grad_(k in grads) for k, x in base.items()}  # fresh leaves per run
        s = tpo_fast.token_stats(t["h"], t["w"], y.to(t["h"].device), bias=t["b"], corrupted_hidden=t["c"],
                                 backend=name)
        outs = dict(p=s.logprobs, z=s.target_logits, l=s.lse, c=s.corrupted_target_logits)
        sum(((outs[k] * up[k].to(outs[k].device)).sum() for k in upstream), torch.zeros((), device=outs["p"].device)) \
            .backward()
        return outs, {k: (None if x.grad is None else x.grad.cpu()) for k, x in t.items()}, s

    outs, got, s = run(backend)
    ref_outs, want, _ = run("reference")
    assert s.argmax is None
    for k in outs:
        torch.testing.assert_close(outs[k].detach().cpu(), ref_outs[k].detach(), rtol=1e-5, atol=1e-5, msg=k)
    for k in base:
        if k not in grads or want[k] is None:
            assert got[k] is None or not got[k].any(), f"grad of {k}: expected none"
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=f"grad of {k}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_argmax_and_absent_corrupted_branch_over_several_chunks(several_chunks, backend):
    device = DEVICE
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(21, 16, generator=g).to(device), torch.randn(300, 16, generator=g).to(device)
    y = torch.randint(0, 300, (21,), generator=g).to(device)
    y[3] = -100
    s = tpo_fast.token_stats(h, w, y, backend=backend, return_argmax=True)
    assert s.corrupted_target_logits is None
    assert s.argmax.dtype == torch.int64
    want = (h @ w.t()).argmax(-1)
    want[3] = -1
    assert torch.equal(s.argmax, want)


def test_torch_backend_with_a_vocabulary_above_the_row_budget():
    """V above 32 Mi / 1024: the torch backend's chunk is smaller than its default 1024 rows."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(6, 4, generator=g, requires_grad=True)
    w = torch.randn(40_000, 4, generator=g, requires_grad=True)
    y = torch.randint(0, 40_000, (6,), generator=g)
    got = tpo_fast.token_logprobs(h, w, y, backend="torch")
    want = torch.log_softmax(h.detach() @ w.detach().t(), -1).gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("frozen", ["weight", "hidden", "bias"])
def test_target_logits_gradients_with_a_frozen_input(backend, frozen):
    """The rank-1 gather backward builds only the gradients asked for; the others stay None."""
    device = DEVICE
    g = torch.Generator().manual_seed(6)
    base = dict(hidden=torch.randn(13, 8, generator=g), weight=torch.randn(50, 8, generator=g),
                bias=torch.randn(50, generator=g))
    y = torch.randint(0, 50, (13,), generator=g)
    y[2] = -100
    up = torch.randn(13, generator=g)
    results = {}
    for name in (backend, "reference"):
        dev = device if name != "reference" else "cpu"
        t = {k: x.clone().to(dev).requires_grad_(k != frozen) for k, x in base.items()}
        out = tpo_fast.target_logits(t["hidden"], t["weight"], y.to(dev), bias=t["bias"], backend=name)
        (out * up.to(dev)).sum().backward()
        results[name] = (out.detach().cpu(), {k: None if x.grad is None else x.grad.cpu() for k, x in t.items()})
    (out, grads), (want_out, want) = results[backend], results["reference"]
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    assert grads[frozen] is None
    for k in base:
        if k != frozen:
            torch.testing.assert_close(grads[k], want[k], rtol=1e-5, atol=1e-5, msg=k)


def test_backend_resolution_without_the_interpreter(monkeypatch):
    """"auto" is Triton on CUDA and torch elsewhere; an explicit "triton" needs CUDA tensors (or the interpreter)."""
    from tpo_fast.ops.token_logprobs import resolve_backend

    monkeypatch.setattr(triton_impl, "interpreter_enabled", lambda: False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # device objects need no GPU
    assert resolve_backend("auto", cpu) == "torch" and resolve_backend("auto", cuda) == "triton"
    assert resolve_backend("torch", cpu) == "torch" and resolve_backend("torch", cuda) == "torch"
    assert resolve_backend("triton", cuda) == "triton"
    message = ("backend='triton' needs CUDA tensors (got cpu) or TRITON_INTERPRET=1 for the CPU interpreter; "
               "use backend='torch' on CPU")
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_backend("triton", cpu)


def test_backend_triton_without_the_triton_package(monkeypatch):
    """Without Triton installed, "triton" is refused by name on any device (it failed at the first kernel launch,
    inside the import), and "auto" on CUDA falls back to torch."""
    import sys

    from tpo_fast.ops.token_logprobs import resolve_backend

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    message = ("backend='triton' needs the triton package, which is not installed; run: pip install triton (Linux), "
               "or use backend='torch'")
    for device in ("cuda", "cpu"):
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            resolve_backend("triton", torch.device(device))
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    # the logits-input op's resolver, the same rule (its fallback on CUDA without the extension: torch)
    from tpo_fast.ops.logits import resolve_logits_backend

    message = ("backend='triton' needs the triton package, which is not installed; run: pip install triton (Linux), "
               "or use backend='cpp' or 'torch'")
    for device in ("cuda", "cpu"):
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            resolve_logits_backend("triton", torch.device(device))


def test_default_backend_and_custom_ignore_index():
    g = torch.Generator().manual_seed(8)
    h, w, b = torch.randn(9, 6, generator=g), torch.randn(30, 6, generator=g), torch.randn(30, generator=g)
    y = torch.randint(0, 30, (9,), generator=g)
    y[[1, 4]] = -1  # ignore_index=-1: -100 is not special here
    full = h @ w.t() + b
    want_logp = torch.where(y >= 0, full.log_softmax(-1).gather(-1, y.clamp(min=0)[:, None]).squeeze(-1), 0.0)
    want_z = torch.where(y >= 0, full.gather(-1, y.clamp(min=0)[:, None]).squeeze(-1), 0.0)
    for backend in ({}, {"backend": "torch"}, {"backend": "reference"}):  # {}: the default, "auto"
        logp, z = tpo_fast.token_logprobs(h, w, y, bias=b, ignore_index=-1, return_target_logit=True, **backend)
        torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(z, want_z, rtol=1e-5, atol=1e-5)
        zt = tpo_fast.target_logits(h, w, y, bias=b, ignore_index=-1, **backend)
        torch.testing.assert_close(zt, want_z, rtol=1e-5, atol=1e-5)
        lse = tpo_fast.token_logprobs(h, w, y, bias=b, ignore_index=-1, return_lse=True, **backend)[1]
        torch.testing.assert_close(lse[y >= 0], full.logsumexp(-1)[y >= 0], rtol=1e-5, atol=1e-5)
        hc = h.flip(0)
        stats = tpo_fast.token_stats(h, w, y, b, hc, -1, **backend)
        torch.testing.assert_close(stats.logprobs, want_logp, rtol=1e-5, atol=1e-5)
        want_zc = torch.where(y >= 0, (hc @ w.t() + b).gather(-1, y.clamp(min=0)[:, None]).squeeze(-1), 0.0)
        torch.testing.assert_close(stats.corrupted_target_logits, want_zc, rtol=1e-5, atol=1e-5)
        assert stats.argmax is None  # not asked for
    with pytest.raises(ValueError, match="bias"):
        tpo_fast.target_logits(h, w, y, bias=torch.zeros(29), ignore_index=-1)


@pytest.mark.parametrize("fn", ["token_logprobs", "target_logits"])
def test_double_backward_only_through_the_reference(fn):
    """Hand-written backwards refuse create_graph=True, naming the way out; "reference" supports it."""
    g = torch.Generator().manual_seed(9)
    h = torch.randn(5, 4, generator=g, requires_grad=True)
    w = torch.randn(11, 4, generator=g, requires_grad=True)
    y = torch.randint(0, 11, (5,), generator=g)
    f = getattr(tpo_fast, fn)
    name = "token_stats (token_logprobs, the losses)" if fn == "token_logprobs" else "target_logits"
    out = f(h, w, y, backend="torch")
    with pytest.raises(RuntimeError, match=re.escape(
            f"tpo_fast.{name}: second-order gradients (backward or autograd.grad with create_graph=True) are not "
            "supported by the 'torch' backend, whose backward is written by hand. Pass backend='reference' "
            "(plain autograd over materialized N x V logits, so O(N V) memory), which supports double backward.")):
        torch.autograd.grad(out.square().sum(), h, create_graph=True)
    (gh,) = torch.autograd.grad(f(h, w, y, backend="reference").square().sum(), h, create_graph=True)
    (ggw,) = torch.autograd.grad(gh.square().sum(), w)
    assert ggw.abs().sum() > 0


def _validate_cases():
    """(call, exception, whole message) for every input error of ops/_validate.py, through the public primitive."""
    import re

    h, w, y = torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)

    def call(**kw):
        args = dict(hidden=h, weight=w, targets=y, bias=None, corrupted_hidden=None)
        args.update(kw)
        return lambda: tpo_fast.token_stats(args["hidden"], args["weight"], args["targets"], args["bias"],
                                            args["corrupted_hidden"], backend="torch")

    meta = torch.zeros(5, device="meta")
    cases = [
        (call(hidden=[1.0]), TypeError, "hidden must be a torch.Tensor, got list"),
        (call(weight=w.double()), TypeError,
         "weight must be float32, float16 or bfloat16, got float64 of shape (5, 4)"),
        (call(hidden=h[0]), ValueError,
         "hidden must be 2-D (N, D), got float32 of shape (4,); flatten (B, T, D) with .flatten(0, 1)"),
        (call(weight=w[0]), ValueError, "weight must be 2-D (V, D), got float32 of shape (4,)"),
        (call(weight=w[:, :3]), ValueError, "hidden and weight must share the hidden size D: hidden is float32 of "
         "shape (3, 4), weight is float32 of shape (5, 3)"),
        (call(weight=w[:0]), ValueError, "weight must have at least one vocabulary row, got float32 of shape (0, 4)"),
        (call(weight=w.half()), TypeError, "hidden and weight must have the same dtype, got hidden float32 of shape "
         "(3, 4) and weight float16 of shape (5, 4); cast one of them (e.g. hidden.to(weight.dtype))"),
        (call(targets=[0, 1, 2]), TypeError, "targets must be a torch.Tensor, got list"),
        (call(targets=y.bool()), TypeError, "targets must be an integer tensor (int64) of shape (N,), got bool of "
         "shape (3,)"),
        (call(targets=y[:2]), ValueError, "targets must be of shape (N,) = (3,) to match hidden (3, 4), got int64 of "
         "shape (2,)"),
        (call(bias="b"), TypeError, "bias must be a torch.Tensor, got str"),
        (call(bias=torch.zeros(4)), ValueError, "bias must be of shape (V,) = (5,), got float32 of shape (4,)"),
        (call(corrupted_hidden=torch.zeros(3, 4, dtype=torch.int32)), TypeError,
         "corrupted_hidden must be float32, float16 or bfloat16, got int32 of shape (3, 4)"),
        (call(corrupted_hidden=h[:2]), ValueError,
         "corrupted_hidden must have the shape of hidden (3, 4), got float32 of shape (2, 4)"),
        (call(corrupted_hidden=h.half()), TypeError,
         "corrupted_hidden must have the dtype of hidden (torch.float32), got float16 of shape (3, 4)"),
        (call(bias=meta), ValueError, "all inputs must be on the same device, got hidden on cpu, weight on cpu, "
         "targets on cpu, bias on meta"),
        (call(corrupted_hidden=torch.zeros(3, 4, device="meta")), ValueError, "all inputs must be on the same "
         "device, got hidden on cpu, weight on cpu, targets on cpu, corrupted_hidden on meta"),
        (call(hidden=h.to("meta"), weight=w.to("meta"), targets=y.to("meta")), ValueError,
         "the inputs are on the meta device, which holds shapes but no values; materialize them (e.g. "
         "model.to_empty(device=...), then load the weights) before computing log-probs or a loss"),
    ]
    return [pytest.param(f, e, "^" + re.escape(m) + "$", id=m[:40]) for f, e, m in cases]


@pytest.mark.parametrize("fn, exc, pattern", _validate_cases())
def test_input_errors_have_their_whole_message(fn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn()


def test_a_one_word_vocabulary_is_valid():
    """V = 1 is a valid head (log-prob 0 for every target), unlike V = 0."""
    h, w = torch.randn(3, 4), torch.randn(1, 4)
    logp = tpo_fast.token_logprobs(h, w, torch.zeros(3, dtype=torch.long), backend="torch")
    torch.testing.assert_close(logp, torch.zeros(3))


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("fn", ["token_stats", "target_logits"])
def test_an_out_of_range_target_is_named_whole(backend, fn):
    """The range check rides on the compaction's one read-back (the reference backend, which compacts nothing, checks
    on its own): the whole message names V, the ignore value and the first bad target, whichever the backend."""
    from tpo_fast.ops import target_logits, token_stats

    dev = DEVICE if backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(6, 4, generator=g).to(dev), torch.randn(5, 4, generator=g).to(dev)
    y = torch.tensor([0, -7, -1, 7, -7, 2], device=dev)
    call = token_stats if fn == "token_stats" else target_logits
    want = "targets must lie in [0, V) = [0, 5) or equal ignore_index=-7; targets[2] = -1"
    with pytest.raises(ValueError, match="^" + re.escape(want) + "$"):
        call(h, w, y, ignore_index=-7, backend=backend)
