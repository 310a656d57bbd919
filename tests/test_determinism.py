"""`torch.use_deterministic_algorithms(True)`: the Triton kernels that add with atomics either leave those sums to a
deterministic path or refuse as PyTorch's own operations do (a RuntimeError; with `warn_only=True` a warning)."""

from __future__ import annotations

import pytest
import torch
from _device import backend_device

import tpo_fast
from tpo_fast.loss import tpo_loss
from tpo_fast.ops import triton_impl
from tpo_fast.ops.options import kernel_options

DEV = backend_device("triton")


@pytest.fixture
def deterministic(monkeypatch):
    """Deterministic algorithms on for the test (warn_only as the test asks), off afterwards whatever happens. On
    CUDA the mode also wants cuBLAS's deterministic workspace setting, or PyTorch refuses every GEMM."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()

    def enable(warn_only: bool = False) -> None:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=warn_only)

    yield enable
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _inputs(n=24, d=16, v=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(DEV).requires_grad_()
    w = torch.randn(v, d, generator=g).to(DEV).requires_grad_()
    b = torch.randn(v, generator=g).to(DEV).requires_grad_()
    y = torch.randint(0, 4, (n,), generator=g).to(DEV)  # four targets for 24 rows: every weight row is shared
    return h, w, b, y


class _Launches:
    """Records the NEED_W / NEED_B flags of every launch of the gathered logits' backward kernel."""

    def __init__(self, kernel):
        self.kernel, self.flags = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.flags.append((kwargs["NEED_W"], kwargs["NEED_B"]))
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_gathered_logits_add_their_shared_rows_without_atomics(deterministic, monkeypatch):
    """`target_logits`' weight and bias gradients, whose rows several tokens share, come from `index_add_` (the
    kernel computes only the hidden states' gradient), and equal the atomic kernel's sums."""
    launches = _Launches(triton_impl.indexed_dot_bwd_kernel)
    monkeypatch.setattr(triton_impl, "indexed_dot_bwd_kernel", launches)
    h, w, b, y = _inputs()
    upstream = torch.randn(h.shape[0], device=DEV)
    atomic = torch.autograd.grad((tpo_fast.target_logits(h, w, y, b, backend="triton") * upstream).sum(), (h, w, b))
    assert launches.flags == [(True, True)]
    deterministic()
    got = torch.autograd.grad((tpo_fast.target_logits(h, w, y, b, backend="triton") * upstream).sum(), (h, w, b))
    assert launches.flags[1:] == [(False, False)]
    want = torch.autograd.grad((tpo_fast.target_logits(h, w, y, b, backend="reference") * upstream).sum(), (h, w, b))
    for a, e, f in zip(got, want, atomic, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, f, rtol=1e-5, atol=1e-5)


def test_the_atomic_backward_is_refused(deterministic):
    """backward='atomic' and gradient filtering have no deterministic form: the error says what to use instead."""
    h, w, b, y = _inputs()
    deterministic()
    for options in (dict(backward="atomic"), dict(grad_filter_eps=1e-6)):
        with kernel_options(**options):
            loss = tpo_fast.token_logprobs(h, w, y, bias=b, backend="triton").sum()
        with pytest.raises(RuntimeError, match=r"^tpo_fast: the atomic backward \(backward='(atomic|split)', "
                                               r"grad_filter_eps=.*torch.use_deterministic_algorithms\(True\) is set; "
                                               r"use backward='split' \(the default\) with grad_filter_eps=0"):
            loss.backward()


def test_warn_only_warns_and_runs(deterministic):
    h, w, b, y = _inputs()
    deterministic(warn_only=True)
    with kernel_options(backward="atomic"):
        loss = tpo_fast.token_logprobs(h, w, y, bias=b, backend="triton").sum()
    with pytest.warns(UserWarning, match="atomic backward"):
        got = torch.autograd.grad(loss, (h, w, b))
    want = torch.autograd.grad(tpo_fast.token_logprobs(h, w, y, bias=b, backend="reference").sum(), (h, w, b))
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_the_default_paths_run_unchanged(deterministic):
    """The split backward and the fused-gradient losses add nothing with atomics of their own: no error, the same
    gradients as without the mode."""
    h, w, b, y = _inputs()
    hc = (h.detach() + 0.1).requires_grad_()
    targets = y.view(4, 6)

    def grads():
        stats = tpo_fast.token_stats(h, w, y, bias=b, corrupted_hidden=hc, backend="triton")
        out = tpo_loss(w, h, hc, targets, b, reference_free=True, backend="triton")
        return torch.autograd.grad((stats.logprobs + stats.corrupted_target_logits).sum() + out.loss, (h, w, b, hc))

    before = grads()
    deterministic()
    for a, e in zip(grads(), before, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
