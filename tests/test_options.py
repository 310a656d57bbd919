"""`KernelOptions`: one object for kernel behaviour, read from the environment in one place, set for a scope."""

from __future__ import annotations

import threading

import pytest
import torch

import tpo_fast
from tpo_fast.ops import triton_impl
from tpo_fast.ops.options import ENV_VARS, KernelOptions, current_options, kernel_options

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)


def test_defaults_and_env(monkeypatch):
    assert KernelOptions.from_env() == KernelOptions()
    env = {"TPO_FAST_TILES": "64,128,32,4,3", "TPO_FAST_TMA": "0", "TPO_FAST_CHUNK_MB": "0.5",
           "TPO_FAST_ALLOW_TF32": "1", "TPO_FAST_BACKWARD": "atomic", "TPO_FAST_GRAD_FILTER_EPS": "1e-6",
           "TPO_FAST_GRAD_GEMM": "triton",
           "TPO_FAST_JIT": "1", "TPO_FAST_EXT_CACHE": "/tmp/ext"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert KernelOptions.from_env() == KernelOptions(
        tiles=(64, 128, 32, 4, 3), tma="0", chunk_mb=0.5, allow_tf32=True, backward="atomic", grad_filter_eps=1e-6,
        grad_gemm="triton", jit=True, ext_cache="/tmp/ext",
    )
    assert KernelOptions.from_env().chunk_bytes(256.0) == 2**19  # set: the buffer's default does not apply
    monkeypatch.setenv("TPO_FAST_CHUNK_MB", "")
    assert KernelOptions.from_env().chunk_mb is None and KernelOptions.from_env().chunk_bytes(3.0) == 3 * 2**20
    monkeypatch.setenv("TPO_FAST_BACKWARD", "split")  # read again when the environment changes
    assert current_options().backward == "split"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backward="fused"), "backward must be 'split' or 'atomic', got 'fused'"),
        (dict(tma="yes"), "tma must be 'auto', '0' or '1', got 'yes'"),
        (dict(grad_gemm="cublas"), "grad_gemm must be 'torch' or 'triton', got 'cublas'"),
        (dict(chunk_mb=0), "chunk_mb must be a positive, finite number of MiB, got 0"),
        (dict(grad_filter_eps=-1.0), r"grad_filter_eps must be a finite number >= 0, got -1.0"),
        (dict(tiles=(128, 100, 64, 8, 3)), "tiles must be 'block_n,block_v,block_d,num_warps,num_stages"),
        (dict(allow_tf32=2), "allow_tf32 must be a bool, got 2"),
    ],
    ids=["backward", "tma", "gemm", "chunk", "eps", "tiles", "tf32"],
)
def test_fields_are_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KernelOptions(**kwargs)


def test_tma_takes_booleans_and_options_are_frozen():
    assert KernelOptions(tma=True).tma == "1" and KernelOptions(tma=False).tma == "0"
    with pytest.raises(AttributeError):
        KernelOptions().backward = "atomic"  # type: ignore[misc]


def test_scope_overrides_env_nests_and_reaches_other_threads(monkeypatch):
    monkeypatch.setenv("TPO_FAST_CHUNK_MB", "8")
    with kernel_options(backward="atomic") as outer:
        assert outer == KernelOptions(chunk_mb=8.0, backward="atomic")
        monkeypatch.setenv("TPO_FAST_CHUNK_MB", "not read in a scope")
        with kernel_options(tma="0"):
            assert current_options() == KernelOptions(chunk_mb=8.0, backward="atomic", tma="0")
        seen = []  # autograd runs a CUDA backward on its own threads: the scope is process-wide
        t = threading.Thread(target=lambda: seen.append(current_options()))
        t.start()
        t.join()
        assert seen == [outer]
    with pytest.raises(ValueError, match="TPO_FAST_CHUNK_MB must be a positive, finite number of MiB"):
        current_options()


def test_scope_and_explicit_options_drive_the_triton_launches(monkeypatch):
    """`kernel_options(backward="atomic")` around forward and backward: the split backward never runs;
    explicit `options=` to the launcher wins over the scope."""
    monkeypatch.setenv("TPO_FAST_BACKWARD", "bogus")  # would fail if the launch read the environment

    def no_split(*args, **kwargs):
        raise AssertionError("the split backward ran inside kernel_options(backward='atomic')")

    monkeypatch.setattr(triton_impl, "_split_backward", no_split)
    h = torch.randn(8, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(20, 16, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 20, (8,), device=DEVICE)
    with kernel_options(KernelOptions(), backward="atomic"):
        tpo_fast.token_logprobs(h, w, y, backend="triton").sum().backward()
        want = tpo_fast.token_logprobs(h.detach(), w.detach(), y, backend="reference")
        lse, z, _, _ = triton_impl.forward(h.detach(), w.detach(), None, None, y, False, options=KernelOptions(tma="1"))
    torch.testing.assert_close(z - lse, want, atol=1e-5, rtol=1e-5)
    assert h.grad is not None and torch.isfinite(w.grad).all()


def test_a_backward_runs_with_the_options_of_its_forward(monkeypatch):
    """A loss computed under a scope, backward called after the scope ended (as a trainer calls it, outside the
    user's loss code): the backward still runs as the forward's options say. The other way round, a scope
    around backward alone does not change a backward whose forward ran without it."""
    split_calls = []
    original = triton_impl._split_backward
    monkeypatch.setattr(triton_impl, "_split_backward", lambda *a, **k: split_calls.append(1) or original(*a, **k))
    h = torch.randn(8, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(20, 16, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 20, (8,), device=DEVICE)
    want = torch.autograd.grad(tpo_fast.token_logprobs(h, w, y, backend="reference").sum(), (h, w))

    with kernel_options(backward="atomic"):
        loss = tpo_fast.token_logprobs(h, w, y, backend="triton").sum()
    loss.backward()
    assert split_calls == []  # the atomic kernel, as the forward's scope said
    torch.testing.assert_close((h.grad, w.grad), want, atol=1e-5, rtol=1e-5)

    h.grad = w.grad = None
    loss = tpo_fast.token_logprobs(h, w, y, backend="triton").sum()
    with kernel_options(backward="atomic"):
        loss.backward()
    assert split_calls == [1]  # the forward ran with the default, the split backward
    torch.testing.assert_close((h.grad, w.grad), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value, enabled", [(None, False), ("", False), ("0", False), ("1", True)])
def test_interpreter_flag(monkeypatch, value, enabled):
    """TRITON_INTERPRET unset, empty or "0" means compiled kernels; anything else the CPU interpreter."""
    from tpo_fast.ops.options import interpreter_enabled

    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreter_enabled() is enabled


@pytest.mark.parametrize("tiles, ok", [
    ((16, 16, 16, 1, 1), True),  # the smallest blocks, one warp, one stage
    ((16, 16, 16, 4, 0), False),  # zero stages
    ((8, 16, 16, 4, 2), False),  # a block under 16
    ((16, 16, 16, 4, 2, 0), False),  # a zero group
])
def test_tile_bounds(tiles, ok):
    if ok:
        assert KernelOptions(tiles=tiles).tiles == tiles
        assert KernelOptions(tiles=",".join(map(str, tiles))).tiles == tiles
    else:
        with pytest.raises(ValueError, match="blocks \\(>= 16\\) and warps powers of two"):
            KernelOptions(tiles=tiles)


@pytest.mark.parametrize("value, jit", [("1", True), ("0", False), ("", False)])
def test_jit_is_on_only_for_one(monkeypatch, value, jit):
    """TPO_FAST_JIT builds the extension only for "1"."""
    monkeypatch.setenv("TPO_FAST_JIT", value)
    assert KernelOptions.from_env().jit is jit


@pytest.mark.parametrize("variable", ["TPO_FAST_JIT", "TPO_FAST_ALLOW_TF32"])
@pytest.mark.parametrize("value", ["yes", "true", "false", "off", " 1"])
def test_flag_variables_refuse_other_spellings(monkeypatch, variable, value):
    """A stray "yes" must not start a compiler, nor "false" switch TF32 on: any value but "1", "0", "" is an error
    naming the variable."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=f"{variable} must be '1' \\(on\\), '0' or '' \\(off\\), got {value!r}"):
        KernelOptions.from_env()


@pytest.mark.parametrize("variable, value", [
    ("TPO_FAST_CHUNK_MB", "inf"), ("TPO_FAST_CHUNK_MB", "nan"), ("TPO_FAST_GRAD_FILTER_EPS", "inf"),
    ("TPO_FAST_GRAD_FILTER_EPS", "-inf"),
])
def test_number_variables_must_be_finite(monkeypatch, variable, value):
    """An infinite chunk budget used to pass the check and crash the backward with an OverflowError; an infinite
    filter eps silently zeroed every softmax gradient."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=f"{variable} must be a (positive, )?finite number"):
        KernelOptions.from_env()


def test_ext_cache_from_env_and_as_a_path(monkeypatch, tmp_path):
    monkeypatch.setenv("TPO_FAST_EXT_CACHE", str(tmp_path / "env"))
    assert KernelOptions.from_env().ext_cache == str(tmp_path / "env")
    opts = KernelOptions(ext_cache=tmp_path / "given")  # a Path is stored as its string
    assert opts.ext_cache == str(tmp_path / "given") and isinstance(opts.ext_cache, str)
    assert KernelOptions(ext_cache=None).ext_cache is None
