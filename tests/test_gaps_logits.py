"""`tpo_fast.ops.logits` (the logits-input op) at the edges mutation testing found unguarded (docs/testing.md):
backend resolution on every device kind and extension state (fake `torch.device("cuda")` objects and patched
extension flags, so the CUDA branches run here too), the announcement log, the JIT build under `TPO_FAST_JIT`,
the Triton launch settings, the torch backend's row chunks, the rows handed to the kernels (strided and transposed
logits, one row, one column), which buffers a backward may write, upstream gradients on `lse` only or on one
branch only, the "reference" backend through the public function, the outputs' dtype and device under a float64
default dtype and a `meta` default device, and every input check's whole message.

Oracles are independent of the code under test: fp64 `torch.log_softmax` / `torch.logsumexp` / `gather` on the
materialized logits and autograd through them, exact messages and log records. Backends "cpp" (the compiled
extension, where built), "triton" (its CPU interpreter, conftest.py) and "torch"; shapes are tiny.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import sys

import pytest
import torch

from tpo_fast import _ext
from tpo_fast.ops import logits as logits_mod
from tpo_fast.ops.logits import LogitsLogprobs, logits_logprobs, resolve_logits_backend
from tpo_fast.ops.options import interpreter_enabled, kernel_options

IGNORE = -100
CPU, CUDA, META = torch.device("cpu"), torch.device("cuda"), torch.device("meta")
HAS_TRITON = importlib.util.find_spec("triton") is not None
AUTO = "tpo_fast.logits_logprobs: backend='auto' uses "
INFO, WARNING = logging.INFO, logging.WARNING


def _runnable(name: str) -> str | None:
    """Why backend `name` cannot run on CPU tensors here, or None."""
    if name == "cpp" and not _ext.HAS_CPU_EXT:
        return f"tpo_fast._C is not built ({_ext.IMPORT_ERROR})"
    if name == "triton" and not (HAS_TRITON and interpreter_enabled()):
        return "the Triton backend runs on CPU tensors only under TRITON_INTERPRET=1"
    return None


@pytest.fixture(params=["cpp", "triton", "torch"])
def backend(request):
    why = _runnable(request.param)
    if why:
        pytest.skip(why)
    return request.param


def _exact(error, message):
    """pytest.raises for `error` whose message is `message`, whole."""
    return pytest.raises(error, match=rf"\A{re.escape(message)}\Z")


def _records(caplog):
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "tpo_fast"]


def _logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) * 3


def _targets(shape, v, seed=0, ignored=(1,)):
    t = torch.randint(0, v, shape, generator=torch.Generator().manual_seed(seed + 100))
    t.view(-1)[list(ignored)] = IGNORE
    return t


def _oracle(x, t, upstream=None, ignore_index=IGNORE):
    """fp64 (log-prob, target logit, lse) of `x` at `t` along the last dim, 0 on ignored rows; with `upstream`
    (a weight tensor or None for each of the three) also d(sum of weight * output)/dx."""
    xd = x.detach().double().requires_grad_()
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))[..., None]
    outs = (torch.log_softmax(xd, -1).gather(-1, safe)[..., 0], xd.gather(-1, safe)[..., 0], torch.logsumexp(xd, -1))
    outs = tuple(torch.where(valid, o, torch.zeros_like(o)) for o in outs)
    grad = None
    if upstream is not None:
        total = sum((o * w.double()).sum() for o, w in zip(outs, upstream, strict=True) if w is not None)
        grad = torch.autograd.grad(total, xd)[0]
    return tuple(o.detach() for o in outs), grad


def _close(got, want, atol=1e-5):
    torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=atol)


def _assert_outputs(out: LogitsLogprobs, x, t, xc=None, ignore_index=IGNORE):
    """Every field against the oracle: fp32, on the CPU, of the targets' shape; target logits exact."""
    (lp, z, lse), _ = _oracle(x, t, ignore_index=ignore_index)
    fields = [(out.logprobs, lp), (out.target_logits, z), (out.lse, lse)]
    if xc is None:
        assert out.corrupted_logprobs is None and out.corrupted_target_logits is None
    else:
        (lp_c, z_c, _), _ = _oracle(xc, t, ignore_index=ignore_index)
        fields += [(out.corrupted_logprobs, lp_c), (out.corrupted_target_logits, z_c)]
    for got, want in fields:
        assert got.dtype == torch.float32 and got.device == CPU and got.shape == t.shape
        _close(got, want)
    assert torch.equal(out.target_logits.detach(), z.float())  # a gathered fp32 logit, not recomputed


# Backend resolution: fake CUDA devices and patched extension flags; no tensor is allocated.


@pytest.fixture
def builds(monkeypatch):
    """A fresh announcement set and JIT state, TPO_FAST_JIT unset; load_jit records its calls and fails."""
    calls = []

    def no_build(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(logits_mod, "_announced", set())
    monkeypatch.setattr(logits_mod, "_jit_tried", False)
    monkeypatch.delenv("TPO_FAST_JIT", raising=False)
    monkeypatch.delenv("TPO_FAST_EXT_CACHE", raising=False)
    monkeypatch.setattr(_ext, "load_jit", no_build)
    return calls


def _ext_flags(monkeypatch, cpu: bool, cuda: bool):
    monkeypatch.setattr(_ext, "HAS_CPU_EXT", cpu)
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", cuda)
    monkeypatch.setattr(_ext, "IMPORT_ERROR", None if cpu else "No module named 'tpo_fast._C'")


CUDA_NEEDS = (
    "backend='cuda' needs tpo_fast._C built with CUDA (a CUDA torch and nvcc at install time, or "
    "tpo_fast._ext.load_jit(with_cuda=True)); it is "
)


@pytest.mark.parametrize("name, device, cpu_ext, cuda_ext, interpret, error, message", [
    ("fast", CPU, True, False, "1", ValueError,
     "backend must be one of ('auto', 'cuda', 'cpp', 'triton', 'torch', 'reference'), got 'fast'"),
    ("cpp", CUDA, True, True, "1", ValueError,
     "backend='cpp' runs on CPU tensors, got cuda; use 'cuda' or 'triton' on GPU"),
    ("cpp", CPU, False, False, "1", RuntimeError,
     "backend='cpp' needs the compiled extension tpo_fast._C, which is not built (No module named 'tpo_fast._C'); "
     "run `pip install --no-build-isolation -e .` with a C++ compiler present, or call tpo_fast._ext.load_jit()"),
    ("cuda", CPU, True, True, "1", ValueError,
     "backend='cuda' needs CUDA tensors, got cpu; use 'cpp' or 'torch' on CPU"),
    ("cuda", CUDA, True, False, "1", RuntimeError, CUDA_NEEDS + "built for CPU only"),
    ("cuda", CUDA, False, False, "1", RuntimeError, CUDA_NEEDS + "not built"),
    ("triton", CPU, True, False, "0", ValueError,
     "backend='triton' needs CUDA tensors (got cpu) or TRITON_INTERPRET=1 for the CPU interpreter; "
     "use backend='cpp' or 'torch' on CPU"),
    ("triton", META, True, False, "", ValueError,
     "backend='triton' needs CUDA tensors (got meta) or TRITON_INTERPRET=1 for the CPU interpreter; "
     "use backend='cpp' or 'torch' on CPU"),
], ids=["unknown", "cpp-on-cuda", "cpp-not-built", "cuda-on-cpu", "cuda-cpu-only-ext", "cuda-no-ext",
        "triton-cpu-compiled", "triton-meta-compiled"])
def test_refused_backends(builds, monkeypatch, name, device, cpu_ext, cuda_ext, interpret, error, message):
    _ext_flags(monkeypatch, cpu_ext, cuda_ext)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with _exact(error, message):
        resolve_logits_backend(name, device)


@pytest.mark.parametrize("name, device, cpu_ext, cuda_ext, interpret", [
    ("cpp", CPU, True, False, "0"),
    ("cuda", CUDA, True, True, "0"),
    ("triton", CUDA, False, False, "0"),  # compiled Triton on a GPU needs no extension
    ("triton", CPU, False, False, "1"),  # the interpreter runs CPU tensors
    ("torch", META, False, False, "0"),
    ("reference", CUDA, False, False, "0"),
])
def test_explicit_backends_pass_through_silently(builds, monkeypatch, caplog, name, device, cpu_ext, cuda_ext,
                                                 interpret):
    _ext_flags(monkeypatch, cpu_ext, cuda_ext)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with caplog.at_level(logging.DEBUG, logger="tpo_fast"):
        assert resolve_logits_backend(name, device) == name
    assert _records(caplog) == [] and builds == []


@pytest.mark.parametrize("device, cpu_ext, cuda_ext, triton, chosen, level, reason", [
    (CUDA, True, True, True, "cuda", INFO, ""),
    (CUDA, True, False, True, "triton", WARNING, " (tpo_fast._C has no CUDA kernels; falling back to the Triton twin)"),
    (CUDA, False, False, True, "triton", WARNING, " (tpo_fast._C is not built; falling back to the Triton twin)"),
    (CUDA, True, False, False, "torch", WARNING,
     " (tpo_fast._C has no CUDA kernels and Triton is not installed; falling back to PyTorch)"),
    (CUDA, False, False, False, "torch", WARNING,
     " (tpo_fast._C is not built and Triton is not installed; falling back to PyTorch)"),
    (CPU, True, False, True, "cpp", INFO, ""),
    (CPU, False, False, True, "torch", WARNING, " (tpo_fast._C is not built; falling back to PyTorch)"),
    (META, True, False, True, "torch", INFO, ""),  # neither CPU nor CUDA: torch, and nothing to regret
    (META, False, False, True, "torch", INFO, ""),
], ids=["cuda-ext", "cuda-cpu-ext-triton", "cuda-no-ext-triton", "cuda-cpu-ext-no-triton", "cuda-nothing",
        "cpu-ext", "cpu-no-ext", "meta-ext", "meta-no-ext"])
def test_auto_choice_and_its_log_record(builds, monkeypatch, caplog, device, cpu_ext, cuda_ext, triton, chosen,
                                        level, reason):
    _ext_flags(monkeypatch, cpu_ext, cuda_ext)
    if not triton:
        monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    elif not HAS_TRITON:
        pytest.skip("Triton is not installed")
    with caplog.at_level(logging.DEBUG, logger="tpo_fast"):
        assert resolve_logits_backend("auto", device) == chosen
    assert _records(caplog) == [(level, f"{AUTO}{chosen!r} on {device.type}{reason}")]
    assert builds == []


def test_auto_announces_once_per_device_type_and_choice(builds, monkeypatch, caplog):
    _ext_flags(monkeypatch, True, False)
    with caplog.at_level(logging.DEBUG, logger="tpo_fast"):
        for _ in range(2):
            assert resolve_logits_backend("auto", CPU) == "cpp"
            assert resolve_logits_backend("auto", META) == "torch"
        _ext_flags(monkeypatch, False, False)
        for _ in range(2):
            assert resolve_logits_backend("auto", CPU) == "torch"
    assert _records(caplog) == [
        (INFO, f"{AUTO}'cpp' on cpu"),
        (INFO, f"{AUTO}'torch' on meta"),
        (WARNING, f"{AUTO}'torch' on cpu (tpo_fast._C is not built; falling back to PyTorch)"),
    ]


# TPO_FAST_JIT: `auto` builds a missing extension once, into KernelOptions.ext_cache.


def test_jit_builds_the_missing_extension_once_into_the_cache_and_uses_it(builds, monkeypatch, caplog):
    _ext_flags(monkeypatch, False, False)

    def build(**kwargs):
        builds.append(kwargs)
        monkeypatch.setattr(_ext, "HAS_CPU_EXT", True)
        return "module"

    monkeypatch.setattr(_ext, "load_jit", build)
    with kernel_options(jit=True, ext_cache="/tmp/tpo-fast-test-ext"), caplog.at_level(logging.DEBUG, "tpo_fast"):
        assert resolve_logits_backend("auto", CPU) == "cpp"
        assert resolve_logits_backend("auto", CPU) == "cpp"
    assert builds == [{"cache_root": "/tmp/tpo-fast-test-ext"}]
    assert _records(caplog) == [(INFO, f"{AUTO}'cpp' on cpu")]


def test_a_failed_jit_build_warns_once_and_is_not_retried(builds, monkeypatch, caplog):
    _ext_flags(monkeypatch, False, False)
    with kernel_options(jit=True), caplog.at_level(logging.DEBUG, "tpo_fast"):
        for _ in range(3):
            assert resolve_logits_backend("auto", CPU) == "torch"
    assert builds == [{"cache_root": None}]
    assert _records(caplog) == [
        (WARNING, "tpo_fast: TPO_FAST_JIT=1 but building tpo_fast._C failed (no C++ compiler found)"),
        (WARNING, f"{AUTO}'torch' on cpu (tpo_fast._C is not built; falling back to PyTorch)"),
    ]


@pytest.mark.parametrize("jit, cpu_ext", [(False, False), (True, True)], ids=["jit-off", "ext-present"])
def test_no_jit_build_unless_asked_for_and_missing(builds, monkeypatch, jit, cpu_ext):
    _ext_flags(monkeypatch, cpu_ext, False)
    with kernel_options(jit=jit):
        assert resolve_logits_backend("auto", CPU) == ("cpp" if cpu_ext else "torch")
    assert builds == []


# Triton launch settings and the torch backend's chunks.


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("interpret, v, block", [
    ("1", 1, 1), ("1", 5, 8), ("1", 10000, 16384), ("1", 40000, 16384), ("0", 5, 8), ("0", 10000, 4096),
    ("", 4096, 4096),
])
def test_triton_vocabulary_tile(monkeypatch, interpret, v, block):
    """The interpreter pays per tile: its cap is 16384; compiled kernels cap at 4096."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert logits_mod._triton_block_v(v) == block


class _LaunchSpy:
    """Stands for a Triton kernel: `kernel[grid](*args, **kwargs)` records (grid, kwargs) and runs nothing."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, kwargs))


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("n, v, block, warps", [(3, 1024, 1024, 4), (3, 1025, 2048, 8), (2, 2048, 2048, 8)])
def test_triton_launch_settings(monkeypatch, n, v, block, warps):
    """One program per row, the row's vocabulary tile, 8 warps from 2048-wide tiles up and 4 below (a GPU tuning the
    interpreter ignores, pinned here by a spy); no launch for no rows."""
    kernels = pytest.importorskip("tpo_fast.kernels.logits_logprobs")
    fwd, bwd = _LaunchSpy(), _LaunchSpy()
    monkeypatch.setattr(kernels, "logits_forward_kernel", fwd)
    monkeypatch.setattr(kernels, "logits_backward_kernel", bwd)
    for rows in (n, 0):
        x, t, f = torch.zeros(rows, v), torch.zeros(rows, dtype=torch.long), torch.zeros(rows)
        lse, z = logits_mod._TritonImpl.forward(x, t, IGNORE)
        assert lse.dtype == z.dtype == torch.float32 and lse.shape == z.shape == (rows,)
        g = logits_mod._TritonImpl.backward(x, t, f, f, f, IGNORE, False)
        assert g is not x and g.shape == x.shape and g.dtype == x.dtype
    assert fwd.launches == [((n,), {"BLOCK_V": block, "num_warps": warps})]
    # the backward's 16-bit store rounds as a GPU does under the interpreter too (kernels/_cast.py)
    assert bwd.launches == [((n,), {"BLOCK_V": block, "INTERPRET": interpreter_enabled(), "num_warps": warps})]


def test_torch_chunks_hold_as_many_rows_as_fit(monkeypatch):
    monkeypatch.setattr(logits_mod, "_TORCH_CHUNK_ELEMS", 4)
    chunks = logits_mod._TorchImpl._chunks
    assert list(chunks(5, 4)) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert list(chunks(5, 2)) == [(0, 2), (2, 4), (4, 5)]
    assert list(chunks(5, 1)) == [(0, 4), (4, 5)]
    assert list(chunks(3, 9)) == [(0, 1), (1, 2), (2, 3)]  # a row wider than the budget: one row per chunk
    assert list(chunks(0, 3)) == []


def test_torch_backend_across_chunks(monkeypatch):
    monkeypatch.setattr(logits_mod, "_TORCH_CHUNK_ELEMS", 8)  # two rows of 4 per chunk
    x, t = _logits(5, 4, seed=1).requires_grad_(), _targets((5,), 4, ignored=(2,))
    out = logits_logprobs(x, t, backend="torch")
    _assert_outputs(out, x, t)
    up = [torch.linspace(-1, 1, 5), torch.linspace(2, 0, 5), torch.linspace(0.5, -0.5, 5)]
    (out.logprobs * up[0] + out.target_logits * up[1] + out.lse * up[2]).sum().backward()
    _close(x.grad, _oracle(x, t, up)[1], atol=1e-6)


# Outputs and buffers: dtype and device follow the inputs, not torch's defaults.


@pytest.mark.parametrize("name", ["cpp", "triton", "torch", "reference"])
def test_fp32_outputs_under_a_float64_default(default_float64, name):
    if _runnable(name):
        pytest.skip(_runnable(name))
    x, xc, t = _logits(4, 7), _logits(4, 7, seed=1), _targets((4,), 7)
    _assert_outputs(logits_logprobs(x, t, IGNORE, xc, backend=name), x, t, xc)
    _assert_outputs(logits_logprobs(x, t, backend=name), x, t)


@pytest.mark.parametrize("name", ["cpp", "triton", "torch", "reference"])
def test_outputs_on_the_inputs_device_under_a_meta_default(name):
    if _runnable(name):
        pytest.skip(_runnable(name))
    x, xc, t = _logits(4, 7), _logits(4, 7, seed=1), _targets((4,), 7)
    with torch.device("meta"):  # a default device other than the inputs' (torch.set_default_device("cuda"))
        both = logits_logprobs(x, t, IGNORE, xc, backend=name)
        clean = logits_logprobs(x, t, backend=name)
    _assert_outputs(both, x, t, xc)
    _assert_outputs(clean, x, t)


# Which buffers a backward writes, and which gradients it returns.


def _upstream(shape, k, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(k)]


def test_backward_leaves_the_logits_alone_by_default(backend):
    leaf, leaf_c = _logits(5, 9).requires_grad_(), _logits(5, 9, seed=1).requires_grad_()
    x, xc = leaf * 1, leaf_c * 1  # non-leaf buffers, as an lm_head output would be
    t = _targets((5,), 9)
    out = logits_logprobs(x, t, IGNORE, xc, backend=backend)
    up = _upstream(t.shape, 5)
    sum((o * w).sum() for o, w in zip(out, up, strict=True)).backward()
    assert torch.equal(x.detach(), leaf.detach()) and torch.equal(xc.detach(), leaf_c.detach())
    _close(leaf.grad, _oracle(leaf, t, up[:3])[1], atol=1e-6)
    _close(leaf_c.grad, _oracle(leaf_c, t, [up[3], up[4], None])[1], atol=1e-6)


def test_gradient_through_lse_only(backend):
    x, t = _logits(5, 9).requires_grad_(), _targets((5,), 9)
    w = torch.linspace(-2, 2, 5)
    (logits_logprobs(x, t, backend=backend).lse * w).sum().backward()
    _close(x.grad, _oracle(x, t, [None, None, w])[1], atol=1e-6)


def test_no_gradient_for_a_branch_no_output_of_which_is_used(backend):
    x, xc = _logits(5, 9).requires_grad_(), _logits(5, 9, seed=1).requires_grad_()
    t = _targets((5,), 9)
    out = logits_logprobs(x, t, IGNORE, xc, backend=backend)
    w = torch.linspace(1, 2, 5)
    (out.logprobs * w + out.target_logits).sum().backward()
    assert xc.grad is None  # not a zero tensor: the corrupted branch was skipped
    _close(x.grad, _oracle(x, t, [w, torch.ones(5), None])[1], atol=1e-6)


@pytest.mark.parametrize("frozen", ["logits", "corrupted_logits"])
def test_inplace_backward_leaves_a_frozen_buffer_alone(backend, frozen):
    """inplace_backward writes gradients only into the buffers that need one."""
    a, b = _logits(5, 9), _logits(5, 9, seed=1)
    leaf = (b if frozen == "logits" else a).clone().requires_grad_()
    live = leaf * 1
    x, xc = (a.clone(), live) if frozen == "logits" else (live, b.clone())
    t = _targets((5,), 9)
    out = logits_logprobs(x, t, IGNORE, xc, inplace_backward=True, backend=backend)
    up = _upstream(t.shape, 5)
    sum((o * w).sum() for o, w in zip(out, up, strict=True)).backward()
    if frozen == "logits":
        assert torch.equal(x, a)
        _close(leaf.grad, _oracle(b, t, [up[3], up[4], None])[1], atol=1e-6)
    else:
        assert torch.equal(xc, b)
        _close(leaf.grad, _oracle(a, t, up[:3])[1], atol=1e-6)


# The rows handed to the kernels: unit column stride and non-overlapping rows, copied only when needed.


ROWS = {
    "transposed": lambda leaf: leaf.t(),  # (2, 5) with strides (1, 2)
    "every_other_column": lambda leaf: leaf[:, ::2],  # (4, 5) with strides (10, 2)
    "one_row_every_other_column": lambda leaf: leaf[:, ::2],  # (1, 5) with strides (10, 2)
    "one_column_transposed": lambda leaf: leaf.t(),  # (4, 1) with strides (1, 4)
    "one_row": lambda leaf: leaf[:, 1:6],  # (1, 5) with strides (7, 1)
}
LEAVES = {"transposed": (5, 2), "every_other_column": (4, 10), "one_row_every_other_column": (1, 10),
          "one_column_transposed": (1, 4), "one_row": (1, 7)}


@pytest.mark.parametrize("kind", list(ROWS))
def test_strided_and_transposed_logits(backend, kind):
    leaf = _logits(*LEAVES[kind], seed=2).requires_grad_()
    x = ROWS[kind](leaf)
    n, v = x.shape
    t = torch.arange(n) % v
    out = logits_logprobs(x, t, backend=backend)
    _assert_outputs(out, x, t)
    up = _upstream((n,), 3)
    (gx,) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out[:3], up, strict=True)), x)
    _close(gx, _oracle(x, t, up)[1], atol=1e-6)


def test_inplace_backward_into_a_row_strided_buffer(backend):
    """Rows with unit column stride and a row stride above V are used in place: the gradient lands in the
    caller's buffer (no copy), and nothing outside the slice is touched."""
    leaf = _logits(6, 50).requires_grad_()
    buf = leaf * 1
    x = buf[:, 5:45]
    before = x.detach().clone()
    t = _targets((6,), 40)
    out = logits_logprobs(x, t, inplace_backward=True, backend=backend)
    up = _upstream((6,), 3)
    sum((o * w).sum() for o, w in zip(out[:3], up, strict=True)).backward()
    _, want = _oracle(before, t, up)
    _close(leaf.grad[:, 5:45], want, atol=1e-6)
    _close(buf[:, 5:45], want, atol=1e-6)  # the buffer now holds the gradient
    assert torch.equal(buf[:, :5].detach(), leaf[:, :5].detach())
    assert torch.equal(buf[:, 45:].detach(), leaf[:, 45:].detach())


# The "reference" backend through the public function.


def test_reference_backend_through_logits_logprobs():
    x, xc = _logits(2, 4, 6).requires_grad_(), _logits(2, 4, 6, seed=1).requires_grad_()
    t = _targets((2, 4), 6, ignored=(1, 6))
    out = logits_logprobs(x, t, IGNORE, xc, backend="reference")
    _assert_outputs(out, x, t, xc)
    up = _upstream((2, 4), 5)
    sum((o * w).sum() for o, w in zip(out, up, strict=True)).backward()
    _close(x.grad, _oracle(x, t, up[:3])[1], atol=1e-6)
    _close(xc.grad, _oracle(xc, t, [up[3], up[4], None])[1], atol=1e-6)
    labels = torch.tensor([[3, 0, 7, 5], [7, 2, 4, 1]])  # ignore_index 7; labels[:, 0] is never predicted
    shifted = logits_logprobs(x, labels, 7, xc, backend="reference", shift=True)
    _assert_outputs(shifted, x[:, :-1], labels[:, 1:], xc[:, :-1], ignore_index=7)


# Input checks: every message whole.


def _call(**kwargs):
    args = dict(logits=torch.randn(4, 5), targets=torch.tensor([0, 1, 2, IGNORE]))
    args.update(kwargs)
    return logits_logprobs(**args)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(logits=torch.randn(8), targets=torch.zeros(8, dtype=torch.long)), ValueError,
     "logits must be (N, V) or (B, T, V), got float32 of shape (8,)"),
    (dict(logits=torch.randn(2, 3, 0), targets=torch.zeros(2, 3, dtype=torch.long)), ValueError,
     "logits must have at least one vocabulary column, got float32 of shape (2, 3, 0)"),
    (dict(shift=True), ValueError,
     "shift=True needs (B, T, V) logits with (B, T) labels, got logits float32 of shape (4, 5); "
     "for (N, V) logits pass already-shifted targets and shift=False"),
    (dict(targets=[0, 1, 2, 3]), TypeError, "targets must be a torch.Tensor, got list"),
    (dict(targets=torch.zeros(4, dtype=torch.bool)), TypeError,
     "targets must be an integer tensor (int64) of shape (N,) = (4,), got bool of shape (4,)"),
    (dict(logits=torch.randn(2, 3, 5), targets=torch.zeros(2, 3)), TypeError,
     "targets must be an integer tensor (int64) of shape (B, T) = (2, 3), got float32 of shape (2, 3)"),
    (dict(logits=torch.randn(2, 3, 5), targets=torch.zeros(2, 2, dtype=torch.long)), ValueError,
     "targets must be of shape (B, T) = (2, 3) to match logits (2, 3, 5), got int64 of shape (2, 2)"),
    (dict(targets=torch.zeros(4, dtype=torch.long, device="meta")), ValueError,
     "all inputs must be on the same device, got logits on cpu, targets on meta"),
    (dict(logits=torch.randn(4, 5, device="meta"), targets=torch.zeros(4, dtype=torch.long, device="meta")),
     ValueError, "the inputs are on the meta device, which holds shapes but no values; materialize them (e.g. "
     "model.to_empty(device=...), then load the weights) before computing log-probs or a loss"),
    (dict(corrupted_logits=torch.randn(4, 5, device="meta")), ValueError,
     "all inputs must be on the same device, got logits on cpu, targets on cpu, corrupted_logits on meta"),
    (dict(corrupted_logits=torch.zeros(4, 5, dtype=torch.long)), TypeError,
     "corrupted_logits must be float32, float16 or bfloat16, got int64 of shape (4, 5)"),
    (dict(corrupted_logits=[[0.0] * 5] * 4), TypeError, "corrupted_logits must be a torch.Tensor, got list"),
    (dict(corrupted_logits=torch.randn(4, 6)), ValueError,
     "corrupted_logits must have the shape of logits (4, 5), got float32 of shape (4, 6)"),
    (dict(corrupted_logits=torch.randn(4, 5).half()), TypeError,
     "corrupted_logits must have the dtype of logits (torch.float32), got float16 of shape (4, 5)"),
    (dict(targets=torch.tensor([0, 5, 1, 2])), ValueError,
     "targets must lie in [0, V) = [0, 5) or equal ignore_index=-100; targets[1] = 5"),
    (dict(targets=torch.tensor([0, 1, -1, 2]), ignore_index=-2), ValueError,
     "targets must lie in [0, V) = [0, 5) or equal ignore_index=-2; targets[2] = -1"),
    (dict(logits=torch.randn(2, 4, 5), targets=torch.tensor([[9, 0, 1, 2], [0, 1, 2, 7]]), shift=True), ValueError,
     "targets must lie in [0, V) = [0, 5) or equal ignore_index=-100; targets[1, 3] = 7"),
], ids=["1d-logits", "3d-no-vocab", "shift-2d", "list-targets", "bool-targets", "float-targets-3d",
        "targets-shape-3d", "targets-device", "all-meta", "corrupted-device", "int-corrupted", "list-corrupted",
        "corrupted-shape", "corrupted-dtype", "target-too-big", "target-below-zero", "shift-label-named"])
def test_input_errors(kwargs, error, message):
    with _exact(error, message):
        _call(**kwargs)


def test_no_time_steps_is_not_an_empty_vocabulary(backend):
    x, t = torch.randn(2, 0, 5), torch.zeros(2, 0, dtype=torch.long)
    out = logits_logprobs(x, t, backend=backend)
    assert out.logprobs.shape == out.target_logits.shape == out.lse.shape == (2, 0)
