"""tpo_fast.logits_logprobs (logits-input path) against its naive fp32 reference.

Backends on CPU: "cpp" (the compiled extension: the installed tpo_fast._C, else a JIT build into the
cache; skipped only without a C++ compiler), "triton" (the twin under TRITON_INTERPRET=1, tiny shapes),
"torch". The CUDA kernel's tests run only where a CUDA device is present and skip with the reason here.
Where the CUDA kernels can be built (a CUDA device, a CUDA build of torch and nvcc), a failed build is a
failure, not a skip: a broken kernel must not pass as "skipped" on a GPU machine.
"""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

import tpo_fast
from tpo_fast import _ext
from tpo_fast.ops import logits as logits_mod
from tpo_fast.ops.logits import LogitsLogprobs, logits_logprobs, reference_logits_logprobs

IGNORE = -100
HAS_CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "CUDA kernel tests need a CUDA device; torch.cuda.is_available() is False on this machine"
# Forward statistics are computed in fp32 from the same low-precision values as the reference, so one
# tolerance serves every dtype; gradients are rounded once to the logits dtype.
FWD_TOL = dict(atol=2e-5, rtol=2e-5)
GRAD_ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def cuda_build_unavailable() -> str | None:
    """Why the CUDA kernels cannot be built here (no device, a CPU-only torch, no nvcc), or None if they can."""
    if not HAS_CUDA:
        return NO_CUDA_REASON
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or CUDA_HOME is None:
        return "the CUDA kernels need nvcc and a CUDA build of torch (CUDA_HOME not found)"
    return None


def load_ext():
    """The compiled extension: installed, else built once via the JIT path (MAX_JOBS bounds the build).

    Skips only where no build can work (no C++ compiler); a CPU-only extension is kept where the CUDA kernels
    cannot be built. A build that should work and fails raises.
    """
    if _ext.HAS_CPU_EXT and (_ext.HAS_CUDA_EXT or cuda_build_unavailable() is not None):
        return _ext.get()
    if not _ext.compiler_available():
        pytest.skip(f"tpo_fast._C is not installed ({_ext.IMPORT_ERROR}) and no C++ compiler exists to build it")
    if _ext.HAS_CPU_EXT:  # installed without CUDA kernels on a machine that can build them
        return _ext.load_jit(with_cuda=True)
    return _ext.load_jit()


def require_cuda_ext() -> None:
    """Skip where the CUDA kernels cannot be built; fail where they can but the extension lacks them."""
    why = cuda_build_unavailable()
    if why is not None:
        pytest.skip(why)
    assert _ext.HAS_CUDA_EXT, "tpo_fast._C has no CUDA kernels although CUDA, torch's CUDA and nvcc are present"


@pytest.fixture(scope="session")
def ext():
    return load_ext()


def _triton_ok() -> bool:
    import os

    return importlib.util.find_spec("triton") is not None and (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.fixture(params=["cpp", "cpp_base", "cuda", "triton", "torch"])
def backend(request):
    """(backend name, device) for every backend that can run here; cpp_base forces the portable CPU path."""
    name = request.param
    if name in ("cpp", "cpp_base"):
        request.getfixturevalue("ext")
        if name == "cpp_base":
            _ext.set_cpu_isa("base")
            request.addfinalizer(lambda: _ext.set_cpu_isa("auto"))
        return "cpp", "cpu"
    if name == "cuda":
        if not HAS_CUDA:
            pytest.skip(NO_CUDA_REASON)
        request.getfixturevalue("ext")
        require_cuda_ext()
        return name, "cuda"
    if name == "triton":
        if not _triton_ok():
            pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1")
        return name, "cuda" if HAS_CUDA else "cpu"
    return name, "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def small_triton_tiles(monkeypatch):
    # Several vocabulary tiles per row even at interpreter-sized V.
    monkeypatch.setattr(logits_mod, "_TRITON_MAX_BLOCK_V", 64)
    monkeypatch.setattr(logits_mod, "_TRITON_INTERPRET_MAX_BLOCK_V", 64)


def _vocab(name: str) -> int:
    # Above the C++ kernel's 2048-logit block for the compiled backends; tiny for the interpreter.
    return 4099 if name in ("cpp", "cuda") else 203


def _inputs(n, v, dtype, device, ignore_frac=0.25, scale=3.0):
    x = (torch.randn(n, v) * scale).to(dtype).to(device)
    t = torch.randint(0, v, (n,))
    t[torch.rand(n) < ignore_frac] = IGNORE
    return x, t.to(device)


def _grads(out: LogitsLogprobs, seed: int = 1):
    """Random upstream gradients on every output (None fields skipped) and their scalar."""
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for o in out:
        if o is not None:
            total = total + (o * torch.randn(o.shape, generator=gen).to(o.device)).sum()
    return total


def _run(fn, x, t, xc=None, **kw):
    x = x.clone().requires_grad_()
    xc = None if xc is None else xc.clone().requires_grad_()
    out = fn(x, t, IGNORE, xc, **kw)
    _grads(out).backward()
    return out, x.grad, None if xc is None else xc.grad


def _ref(x, t, xc=None):
    return _run(lambda a, b, c, d: reference_logits_logprobs(a, b, c, d), x, t, xc)


def _assert_close(actual, expected, what, **tol):
    torch.testing.assert_close(
        actual.float().cpu(), expected.float().cpu(), msg=lambda m: f"{what}: {m}", equal_nan=True, **tol
    )


def _check(out, gx, gxc, ref, dtype):
    ref_out, ref_gx, ref_gxc = ref
    # log-probs are differences of values as large as lse: fp32 rounding of lse (1e4 -> 1e-3) is the floor
    lse_scale = 1 + ref_out.lse.detach().abs().max().item() if ref_out.lse.numel() else 1
    for name in LogitsLogprobs._fields:
        a, e = getattr(out, name), getattr(ref_out, name)
        assert (a is None) == (e is None), name
        if a is not None:
            assert a.dtype == torch.float32, name
            scaled = "logprobs" in name
            _assert_close(a, e, name, atol=FWD_TOL["atol"] * (lse_scale if scaled else 1), rtol=FWD_TOL["rtol"])
    atol = GRAD_ATOL[dtype]
    assert gx.dtype == dtype
    _assert_close(gx, ref_gx, "grad logits", atol=atol, rtol=1e-2)
    if ref_gxc is not None:
        _assert_close(gxc, ref_gxc, "grad corrupted_logits", atol=atol, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("corrupted", [False, True], ids=["clean", "with_corrupted"])
def test_matches_reference(backend, dtype, corrupted, small_triton_tiles):
    name, device = backend
    v = _vocab(name)
    x, t = _inputs(7, v, dtype, device)
    xc = _inputs(7, v, dtype, device)[0] if corrupted else None
    got = _run(logits_logprobs, x, t, xc, backend=name)
    _check(*got, _ref(x, t, xc), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ignored_rows_are_zero_without_gradient(backend, dtype):
    name, device = backend
    x, t = _inputs(6, 37, dtype, device, ignore_frac=0.0)
    t[1] = IGNORE
    t[4] = IGNORE
    out, gx, _ = _run(logits_logprobs, x, t, backend=name)
    for o in (out.logprobs, out.target_logits, out.lse):
        assert torch.all(o[t == IGNORE] == 0)
    assert torch.all(gx[t == IGNORE] == 0)
    _check(out, gx, None, _ref(x, t), dtype)


def test_fully_masked_and_empty(backend):
    name, device = backend
    x, t = _inputs(5, 33, torch.float32, device)
    t[:] = IGNORE
    out, gx, _ = _run(logits_logprobs, x, t, backend=name)
    assert torch.all(out.logprobs == 0) and torch.all(gx == 0)
    x0 = torch.randn(0, 33, device=device, requires_grad=True)
    out0 = logits_logprobs(x0, torch.zeros(0, dtype=torch.long, device=device), backend=name)
    assert out0.logprobs.shape == (0,)
    out0.logprobs.sum().backward()
    assert x0.grad.shape == (0, 33)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_huge_and_masked_logits(backend, dtype, small_triton_tiles):
    name, device = backend
    v = _vocab(name)
    x, t = _inputs(6, v, dtype, device, ignore_frac=0.0)
    x = x.cpu()
    x[0, 5] = 1e4  # planted huge logits, positive and negative
    x[1, :] -= 1e4
    x[2, t[2]] = -1e4
    mask = torch.rand(6, v) < 0.5  # masked vocabulary
    mask[:, t.cpu()] = False
    x[3:5][mask[3:5]] = float("-inf")
    x[5, : min(v - 1, 3000)] = float("-inf")  # the row's first blocks are -inf entirely
    t[5] = v - 1
    x = x.to(device)
    got = _run(logits_logprobs, x, t, backend=name)
    assert torch.isfinite(got[0].logprobs).all()
    assert torch.isfinite(got[1].float()).all()
    _check(*got, _ref(x, t), dtype)


def test_nan_stays_in_its_row(backend):
    name, device = backend
    x, t = _inputs(4, 41, torch.float32, device, ignore_frac=0.0)
    x[2, 7] = float("nan")
    out = logits_logprobs(x, t, backend=name)
    assert torch.isnan(out.logprobs[2]) and torch.isnan(out.lse[2])
    keep = torch.tensor([0, 1, 3], device=device)
    ref = reference_logits_logprobs(x, t, IGNORE)
    _assert_close(out.logprobs[keep], ref.logprobs[keep], "logprobs", **FWD_TOL)


def test_nan_in_an_ignored_row_gets_zero_gradient_on_every_backend(backend):
    """An ignored row holding NaN or inf gets an exactly zero gradient and zero outputs, on the reference too (its
    log_softmax backward used to give 0 * NaN = NaN over the whole ignored row)."""
    name, device = backend
    x, t = _inputs(4, 41, torch.float32, device, ignore_frac=0.0)
    t[3] = IGNORE
    x[3, 5], x[3, 9] = float("nan"), float("inf")
    for fn in (lambda a, b: logits_logprobs(a, b, backend=name), lambda a, b: reference_logits_logprobs(a, b, IGNORE)):
        xg = x.clone().requires_grad_()
        out = fn(xg, t)
        assert out.logprobs[3].item() == 0 and out.target_logits[3].item() == 0 and out.lse[3].item() == 0
        (out.logprobs.sum() + out.target_logits.sum() + out.lse.sum()).backward()
        assert torch.equal(xg.grad[3], torch.zeros_like(xg.grad[3]))
        assert torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "inplace"])
def test_second_order_gradients(backend, inplace):
    """create_graph=True: the torch backend's backward is differentiable torch and matches the reference's
    gradient-penalty gradient; the hand-written backends (and any in-place backward) refuse instead of silently
    dropping the second-order terms."""
    name, device = backend
    x, t = _inputs(5, 23, torch.float32, device, ignore_frac=0.2)

    def penalized(fn):
        xg = x.clone().requires_grad_()
        out = fn(xg)
        loss = _grads(out)
        (g,) = torch.autograd.grad(loss, xg, create_graph=True)
        (loss + (g**2).sum()).backward()
        return xg.grad

    expected = penalized(lambda a: reference_logits_logprobs(a, t, IGNORE))
    run = lambda a: logits_logprobs(a.clone() if inplace else a, t, backend=name, inplace_backward=inplace)  # noqa: E731
    if name == "torch" and not inplace:
        _assert_close(penalized(run), expected, "penalized grad", atol=1e-5, rtol=1e-5)
    else:
        with pytest.raises(RuntimeError, match="second-order gradients \\(create_graph=True\\) are not supported"):
            penalized(run)


def test_target_logits_only_gradient(backend):
    # Only the gathered logit carries gradient: the softmax term vanishes (and the compiled kernels skip it).
    name, device = backend
    x, t = _inputs(5, 50, torch.float32, device)
    x.requires_grad_()
    g = torch.randn(5, device=device)
    (logits_logprobs(x, t, backend=name).target_logits * g).sum().backward()
    want = torch.zeros(5, 50, device=device)
    valid = t != IGNORE
    want[valid.nonzero().squeeze(1), t[valid]] = g[valid]
    assert torch.equal(x.grad, want)


def test_no_gradient_for_frozen_inputs(backend):
    name, device = backend
    x, t = _inputs(4, 30, torch.float32, device)
    xc = _inputs(4, 30, torch.float32, device)[0]
    x.requires_grad_()
    out = logits_logprobs(x, t, corrupted_logits=xc, backend=name)
    (out.logprobs.sum() + out.corrupted_target_logits.sum()).backward()
    assert x.grad is not None and xc.grad is None
    with torch.no_grad():
        frozen = logits_logprobs(x, t, backend=name)
    assert not frozen.logprobs.requires_grad


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_shift(backend, dtype):
    name, device = backend
    b, steps, v = 2, 5, 29
    x = torch.randn(b, steps, v).to(dtype).to(device)
    labels = torch.randint(0, v, (b, steps), device=device)
    labels[0, :2] = IGNORE  # prompt
    labels[1, -1] = IGNORE  # padding
    out, gx, _ = _run(logits_logprobs, x, labels, backend=name, shift=True)
    assert out.logprobs.shape == (b, steps - 1)
    x2 = x[:, :-1].reshape(-1, v)
    ref_out, ref_g2, _ = _ref(x2, labels[:, 1:].reshape(-1))
    _assert_close(out.logprobs.reshape(-1), ref_out.logprobs, "logprobs", **FWD_TOL)
    _assert_close(out.target_logits.reshape(-1), ref_out.target_logits, "target_logits", **FWD_TOL)
    assert torch.all(gx[:, -1] == 0)
    _assert_close(gx[:, :-1].reshape(-1, v), ref_g2, "grad logits", atol=GRAD_ATOL[dtype], rtol=1e-2)


@pytest.mark.parametrize("steps", [0, 1])
def test_shift_of_sequences_without_a_prediction(backend, steps):
    """(B, T, V) logits with T = 0 or 1 predict nothing after the shift: (B, 0) outputs on every backend (the
    shifted targets had one row more than the logits at T = 0, which the reference and C++ backends refused with
    errors about the targets the user had not passed)."""
    name, device = backend
    x = torch.randn(2, steps, 7, device=device, requires_grad=True)
    out = logits_logprobs(x, torch.zeros(2, steps, dtype=torch.long, device=device), shift=True, backend=name)
    assert [tuple(o.shape) for o in out[:3]] == [(2, 0)] * 3
    (out.logprobs.sum() + out.lse.sum()).backward()
    assert x.grad.shape == (2, steps, 7) and torch.all(x.grad == 0)


def test_three_dim_without_shift(backend):
    name, device = backend
    x = torch.randn(2, 3, 17, device=device)
    t = torch.randint(0, 17, (2, 3), device=device)
    out = logits_logprobs(x, t, backend=name)
    ref = reference_logits_logprobs(x.reshape(-1, 17), t.reshape(-1))
    assert out.logprobs.shape == (2, 3)
    _assert_close(out.logprobs.reshape(-1), ref.logprobs, "logprobs", **FWD_TOL)


def test_strided_rows(backend):
    # A column slice keeps unit column stride: rows are read in place, no copy.
    name, device = backend
    base = torch.randn(6, 50, device=device)
    x = base[:, 5:45]
    t = torch.randint(0, 40, (6,), device=device)
    got = _run(logits_logprobs, x, t, backend=name)
    _check(*got, _ref(x.contiguous(), t), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inplace_backward(backend, dtype):
    name, device = backend
    x, t = _inputs(6, 45, dtype, device)
    xc = _inputs(6, 45, dtype, device)[0]
    ref = _run(logits_logprobs, x, t, xc, backend=name)
    leaf = x.clone().requires_grad_()
    leaf_c = xc.clone().requires_grad_()
    logits, corrupted = leaf * 1, leaf_c * 1  # non-leaf buffers, as an lm_head output would be
    out = logits_logprobs(logits, t, IGNORE, corrupted, inplace_backward=True, backend=name)
    _grads(out).backward()
    assert torch.equal(leaf.grad, ref[1]) and torch.equal(leaf_c.grad, ref[2])
    assert torch.equal(logits.detach(), ref[1])  # the buffer now holds the gradient
    assert logits._version > 0


def test_auto_uses_the_extension_and_says_so(ext, caplog, monkeypatch):
    monkeypatch.setattr(logits_mod, "_announced", set())
    with caplog.at_level(logging.INFO, logger="tpo_fast"):
        assert logits_mod.resolve_logits_backend("auto", torch.device("cpu")) == "cpp"
    assert "'cpp'" in caplog.text


def test_auto_falls_back_without_the_extension(caplog, monkeypatch):
    monkeypatch.setattr(_ext, "HAS_CPU_EXT", False)
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", False)
    monkeypatch.setattr(logits_mod, "_announced", set())
    monkeypatch.delenv("TPO_FAST_JIT", raising=False)
    with caplog.at_level(logging.INFO, logger="tpo_fast"):
        assert logits_mod.resolve_logits_backend("auto", torch.device("cpu")) == "torch"
    assert "falling back to PyTorch" in caplog.text
    with pytest.raises(RuntimeError, match="not built"):
        logits_mod.resolve_logits_backend("cpp", torch.device("cpu"))
    if importlib.util.find_spec("triton") is not None:
        assert logits_mod.resolve_logits_backend("auto", torch.device("cuda")) == "triton"


def test_public_export():
    assert tpo_fast.logits_logprobs is logits_logprobs
    assert "logits_logprobs" in tpo_fast.__all__


@pytest.mark.parametrize(
    "case, kwargs, error, match",
    [
        ("1d_logits", dict(logits=torch.randn(8), targets=torch.zeros(8, dtype=torch.long)), ValueError,
         r"logits must be \(N, V\) or \(B, T, V\), got float32 of shape \(8,\)"),
        ("int_logits", dict(logits=torch.zeros(4, 5, dtype=torch.long)), TypeError,
         "logits must be float32, float16 or bfloat16"),
        ("fp64_logits", dict(logits=torch.randn(4, 5, dtype=torch.float64)), TypeError, "got float64"),
        ("float_targets", dict(targets=torch.zeros(4)), TypeError, "targets must be an integer tensor"),
        ("targets_shape", dict(targets=torch.zeros(4, 2, dtype=torch.long)), ValueError,
         r"targets must be of shape \(N,\) = \(4,\) to match logits \(4, 5\), got int64 of shape \(4, 2\)"),
        ("target_too_big", dict(targets=torch.tensor([0, 5, 1, 2])), ValueError,
         r"targets must lie in \[0, V\) = \[0, 5\) .*targets\[1\] = 5"),
        ("target_negative", dict(targets=torch.tensor([0, 1, -3, 2])), ValueError, r"targets\[2\] = -3"),
        ("corrupted_shape", dict(corrupted_logits=torch.randn(4, 6)), ValueError,
         "corrupted_logits must have the shape of logits"),
        ("corrupted_dtype", dict(corrupted_logits=torch.randn(4, 5).half()), TypeError,
         "corrupted_logits must have the dtype of logits"),
        ("devices", dict(targets=torch.zeros(4, dtype=torch.long, device="meta")), ValueError,
         "all inputs must be on the same device"),
        ("shift_2d", dict(shift=True), ValueError, r"shift=True needs \(B, T, V\) logits"),
        ("empty_vocab", dict(logits=torch.randn(4, 0)), ValueError, "at least one vocabulary column"),
        ("unknown_backend", dict(backend="cuda_graphs"), ValueError, "backend must be one of"),
        ("ignore_index_none", dict(ignore_index=None), TypeError,
         r"^ignore_index must be an int \(default -100\), got None$"),
        ("ignore_index_float", dict(ignore_index=2.5), TypeError,
         r"^ignore_index must be an int \(default -100\), got 2.5$"),
        ("cuda_backend_on_cpu", dict(backend="cuda"), ValueError, "backend='cuda' needs CUDA tensors"),
    ],
)
def test_bad_input(case, kwargs, error, match):
    args = dict(logits=torch.randn(4, 5), targets=torch.tensor([0, 1, 2, IGNORE]))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        logits_logprobs(**args)


def test_shift_target_out_of_range_names_the_label():
    labels = torch.tensor([[99, 1, 2], [0, 7, IGNORE]])  # labels[:, 0] is never predicted
    with pytest.raises(ValueError, match=r"targets\[1, 1\] = 7"):
        logits_logprobs(torch.randn(2, 3, 5), labels, shift=True)


def test_extension_checks_its_inputs(ext):
    """Direct callers get each input error back as a message, not a C++ exception (which crashed the process
    in a CUDA build on a GPU machine), and tpo_fast._ext raises it as a RuntimeError."""
    x, t, stat = torch.randn(3, 5), torch.zeros(3, dtype=torch.long), torch.zeros(3)
    assert ext.try_logits_forward(x, t.int(), IGNORE) == ("targets must be int64 of shape (N,) = (3,)", None, None)
    assert ext.try_logits_forward(x[None], t, IGNORE) == ("logits must be 2-D (N, V), got 3-D", None, None)
    assert ext.try_logits_backward(x, t, torch.zeros(2), stat, stat, IGNORE, False) == (
        "lse must be a contiguous float32 tensor of shape (N,) = (3,)", None)
    assert ext.try_set_cpu_isa("base") == "" and ext.cpu_isa() == "base"
    try:  # a refused name changes nothing
        assert ext.try_set_cpu_isa("sse") == "isa must be 'auto', 'base' or 'avx2', got sse"
        assert ext.cpu_isa() == "base"
    finally:
        assert ext.try_set_cpu_isa("auto") == ""
    error, lse, z = ext.try_logits_forward(x, t, IGNORE)
    assert error == "" and torch.equal(z, x[:, 0]) and torch.allclose(lse, x.logsumexp(1))
    with pytest.raises(RuntimeError, match=r"^targets must be int64 of shape \(N,\) = \(3,\)$"):
        _ext.logits_forward(x, t.int(), IGNORE)
    with pytest.raises(RuntimeError, match=r"^lse must be a contiguous float32 tensor"):
        _ext.logits_backward(x, t, torch.zeros(2), stat, stat, IGNORE, False)
    with pytest.raises(RuntimeError, match=r"^isa must be 'auto', 'base' or 'avx2', got sse$"):
        _ext.set_cpu_isa("sse")
    assert _ext.get().cpu_isa() in ("avx2", "base")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n, v", [(64, 32000), (33, 50257), (16, 7)], ids=["llama", "odd_vocab", "tiny_vocab"])
def test_cuda_kernel_at_model_shapes(ext, dtype, n, v):
    require_cuda_ext()
    x, t = _inputs(n, v, dtype, "cuda")
    xc = _inputs(n, v, dtype, "cuda")[0]
    _check(*_run(logits_logprobs, x, t, xc, backend="cuda"), _ref(x, t, xc), dtype)
    # Misaligned rows (odd row stride) take the scalar head/tail paths.
    base = _inputs(n, v + 3, dtype, "cuda")[0]
    xs = base[:, 1 : v + 1]
    _check(*_run(logits_logprobs, xs, t, backend="cuda"), _ref(xs.contiguous(), t), dtype)


@pytest.mark.parametrize(
    "has_cuda, cuda_home, expect",
    [(False, None, "cpu-extension"), (True, None, "skip"), (True, "/usr/local/cuda", "raise")],
    ids=["no-cuda", "cuda-without-nvcc", "cuda-with-nvcc"],
)
def test_failed_cuda_build_is_a_failure_only_where_it_can_work(monkeypatch, has_cuda, cuda_home, expect):
    """An installed CPU-only extension: where CUDA and nvcc exist the CUDA build is attempted and its failure
    raises; without nvcc the CPU extension is used and the CUDA tests skip; without CUDA nothing is built."""
    import sys

    import torch.utils.cpp_extension as cpp_extension

    this = sys.modules[__name__]
    monkeypatch.setattr(this, "HAS_CUDA", has_cuda)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cuda_home)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(_ext, "HAS_CPU_EXT", True)
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", False)
    monkeypatch.setattr(_ext, "get", lambda: "cpu-extension")

    def broken_build(with_cuda=None):
        raise RuntimeError("nvcc: error")

    monkeypatch.setattr(_ext, "load_jit", broken_build)
    if expect == "raise":
        try:
            load_ext()
        except pytest.skip.Exception as e:  # what a skip would hide on a GPU machine
            pytest.fail(f"a CUDA build that should work failed and was skipped: {e.msg}")
        except RuntimeError as e:
            assert "nvcc: error" in str(e)
        else:
            pytest.fail("the failed CUDA build raised nothing")
        with pytest.raises(AssertionError, match="no CUDA kernels"):
            require_cuda_ext()
        return
    assert load_ext() == "cpu-extension"
    with pytest.raises(pytest.skip.Exception):
        require_cuda_ext()


def test_triton_launches_run_under_the_tensors_device_guard(monkeypatch):
    """Triton launches on the current CUDA device, not the tensor's: the logits kernels, forward and backward, run
    inside `_device_guard(logits)` as the hidden-state launchers do (logits on cuda:1 while cuda:0 is current)."""
    if not _triton_ok():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    import contextlib

    from tpo_fast.ops import triton_impl

    entered = []

    @contextlib.contextmanager
    def guard(t):
        entered.append(t)
        yield

    monkeypatch.setattr(triton_impl, "_device_guard", guard)
    x, t = _inputs(4, 37, torch.float32, "cuda" if HAS_CUDA else "cpu")
    x.requires_grad_()
    logits_logprobs(x, t, backend="triton").logprobs.sum().backward()
    assert len(entered) == 2 and all(e.shape == x.shape for e in entered)


def test_extension_wrappers_say_what_to_fix_without_a_usable_module(monkeypatch):
    """No extension, or one built from older sources (no try_* entry points): each wrapper says what to do."""
    from types import SimpleNamespace

    x, t = torch.randn(3, 5), torch.zeros(3, dtype=torch.long)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "IMPORT_ERROR", "No module named 'tpo_fast._C'")
    with pytest.raises(RuntimeError, match=r"^tpo_fast\._C is not available \(No module named 'tpo_fast\._C'\); "
                                           r"build it with load_jit\(\) or use backend='triton' or 'torch'$"):
        _ext.logits_forward(x, t, IGNORE)
    monkeypatch.setattr(_ext, "_module", SimpleNamespace(__file__="/old/_C.so", logits_forward=None))
    for call, entry in ((lambda: _ext.logits_forward(x, t, IGNORE), "try_logits_forward"),
                        (lambda: _ext.logits_backward(x, t, t.float(), t.float(), t.float(), IGNORE, False),
                         "try_logits_backward"),
                        (lambda: _ext.set_cpu_isa("base"), "try_set_cpu_isa")):
        with pytest.raises(RuntimeError, match=rf"^tpo_fast\._C at /old/_C\.so predates its sources \(it has no "
                                               rf"{entry}\); rebuild it: pip install --no-build-isolation -e \."):
            call()
