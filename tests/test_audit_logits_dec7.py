"""Audit of `tpo_fast.logits_logprobs` (2026-12-07): inputs on which backends gave silently wrong numbers or
crashed deep inside Triton / pybind11.

Each test's oracle is independent of the code under test: fp64 `torch.log_softmax` / `torch.logsumexp` / `gather`
on the materialized logits, and autograd through them. Backends: "cpp" (the compiled extension, where built),
"triton" (its CPU interpreter, conftest.py) and "torch"; "cuda" too where a CUDA device and the CUDA kernels exist.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from tpo_fast import _ext
from tpo_fast.ops.logits import logits_logprobs
from tpo_fast.ops.options import interpreter_enabled

IGNORE = -100
INF, NAN = float("inf"), float("nan")
HAS_CUDA = torch.cuda.is_available()


def _why_not(name: str) -> str | None:
    if name == "cpp" and not _ext.HAS_CPU_EXT:
        return f"tpo_fast._C is not built ({_ext.IMPORT_ERROR})"
    if name == "cuda" and not (HAS_CUDA and _ext.HAS_CUDA_EXT):
        return "the CUDA kernels need a CUDA device and tpo_fast._C built with CUDA"
    has_triton = importlib.util.find_spec("triton") is not None
    if name == "triton" and not (has_triton and (HAS_CUDA or interpreter_enabled())):
        return "Triton needs a CUDA device or TRITON_INTERPRET=1"
    return None


@pytest.fixture(params=["cpp", "cuda", "triton", "torch"])
def backend(request):
    """(backend, device) of every backend that runs here."""
    why = _why_not(request.param)
    if why:
        pytest.skip(why)
    return request.param, "cpu" if request.param == "cpp" or not HAS_CUDA else "cuda"


def _oracle(x, t, upstream, ignore_index=IGNORE):
    """fp64 (log-prob, target logit, lse) of `x` at `t`, 0 on ignored rows, and d(sum of upstream * outputs)/dx
    (`upstream`: a weight or None for each of the three)."""
    xd = x.detach().cpu().double().requires_grad_()
    t = t.cpu()
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))[..., None]
    outs = (torch.log_softmax(xd, -1).gather(-1, safe)[..., 0], xd.gather(-1, safe)[..., 0], torch.logsumexp(xd, -1))
    outs = tuple(torch.where(valid, o, torch.zeros_like(o)) for o in outs)
    total = sum((o * w.cpu().double()).sum() for o, w in zip(outs, upstream, strict=True) if w is not None)
    (grad,) = torch.autograd.grad(total, xd)
    return tuple(o.detach() for o in outs), grad


def _equal_nan(got, want):
    """Exactly equal, NaN where the oracle has NaN and +-inf where it has +-inf."""
    got = got.detach().cpu().double()
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    assert torch.equal(got[~want.isnan()], want[~want.isnan()]), (got, want)


# Rows whose softmax is undefined: all -inf (target logit -inf too), one +inf, one NaN (finite target logits).
def _nonfinite_rows(device):
    x = torch.randn(4, 9, generator=torch.Generator().manual_seed(3)) * 2
    x[0] = -INF
    x[0, 4] = -INF  # the target of row 0 is -inf too: its target logit is -inf
    x[1, 6] = INF
    x[2, 1] = NAN
    t = torch.tensor([4, 2, 5, 7])
    return x.to(device), t.to(device)


def test_target_logits_only_gradient_is_the_one_hot_on_rows_with_an_undefined_softmax(backend):
    """d target_logit / d logits is the one-hot whatever the rest of the row holds: the visual score's corrupted
    branch (only `corrupted_target_logits` used) on fp16 logits that overflowed to +inf must not turn the whole row's
    gradient into NaN. The compiled kernels (and the reference) skip the softmax term when its coefficient is 0; the
    Triton twin and the torch backend computed 0 * exp(nan) = NaN over the row."""
    name, device = backend
    x, t = _nonfinite_rows(device)
    w = torch.tensor([0.5, -1.5, 2.0, 3.0], device=device)
    for corrupted in (False, True):
        xg = x.clone().requires_grad_()
        if corrupted:
            out = logits_logprobs(x.clone(), t, IGNORE, xg, backend=name)
            z = out.corrupted_target_logits
        else:
            z = logits_logprobs(xg, t, backend=name).target_logits
        (z * w).sum().backward()
        _, want = _oracle(x, t, [None, w, None])
        assert torch.equal(xg.grad.cpu().double(), want)
        assert torch.isfinite(xg.grad).all()


def test_a_row_with_plus_inf_has_lse_inf_and_nan_logprobs_on_every_backend(backend):
    """A +inf logit (fp16 overflow) makes logsumexp +inf and log_softmax NaN over the row (fp64 torch); a NaN with
    it makes both NaN. The cpp, CUDA and Triton kernels returned lse NaN (exp(inf - inf) in the sum), the torch
    backend logprobs -inf (z - lse)."""
    name, device = backend
    x = torch.randn(5, 11, generator=torch.Generator().manual_seed(4))
    x[0, 3] = INF  # target elsewhere
    x[1, 2] = INF  # target is the +inf logit
    x[2, [0, 9]] = INF  # two of them
    x[3, 5], x[3, 8] = INF, NAN  # +inf and NaN: NaN
    x[4, :] = -INF
    x[4, 10] = INF  # +inf among -inf
    t = torch.tensor([1, 2, 4, 0, 7])
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        (lp, z, lse), _ = _oracle(xd, t, [torch.ones(5), None, None])
        assert lse.tolist()[:3] == [INF, INF, INF] and lse[3].isnan() and lse[4] == INF
        assert lp.isnan().all()
        out = logits_logprobs(xd.to(device), t.to(device), backend=name)
        _equal_nan(out.lse, lse)
        _equal_nan(out.logprobs, lp)
        _equal_nan(out.target_logits, z)


@pytest.mark.parametrize("ignore_index", [np.int64(IGNORE), np.int32(3), np.int16(IGNORE)], ids=repr)
def test_numpy_integer_ignore_index(backend, ignore_index):
    """A numpy integer is an int (numbers.Integral, accepted by the input check) but Triton's launcher refused it
    deep inside the interpreter ("cannot convert -100 of type <class 'numpy.int64'> to tensor")."""
    name, device = backend
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([1, int(ignore_index), 3, 0, 6])
    up = [torch.linspace(-1, 1, 5), torch.linspace(0.5, 2, 5), torch.linspace(1, -2, 5)]
    xg = x.to(device).requires_grad_()
    out = logits_logprobs(xg, t.to(device), ignore_index, backend=name)
    sum((o * w.to(device)).sum() for o, w in zip(out[:3], up, strict=True)).backward()
    (lp, z, lse), grad = _oracle(x, t, up, ignore_index=int(ignore_index))
    for got, want in ((out.logprobs, lp), (out.target_logits, z), (out.lse, lse)):
        torch.testing.assert_close(got.detach().cpu().double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xg.grad.cpu().double(), grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1, 10**30])
def test_ignore_index_outside_int64_is_refused_with_a_clear_error(backend, ignore_index):
    """Targets are int64: an ignore_index no int64 equals was refused by pybind11 ("incompatible function
    arguments") or by an OverflowError ("can't convert negative int to unsigned"), depending on the backend."""
    name, device = backend
    with pytest.raises(ValueError, match=rf"\Aignore_index must fit in int64 \(targets are int64\), got "
                                         rf"{ignore_index}\Z"):
        logits_logprobs(torch.randn(3, 5, device=device), torch.tensor([0, 1, 2], device=device), ignore_index,
                        backend=name)


@pytest.mark.parametrize("alias", ["same_tensor", "same_view_twice", "overlapping_views"])
def test_inplace_backward_with_corrupted_logits_in_the_same_memory(backend, alias):
    """inplace_backward=True wrote the clean branch's gradient into the logits buffer, then computed the corrupted
    branch from that buffer when corrupted_logits shared it (e.g. the same tensor passed twice: a zero visual score),
    and returned one buffer as both gradients: here 3.13 off on a gradient of order 1."""
    name, device = backend
    gen = torch.Generator().manual_seed(6)
    leaf = torch.randn(5, 12, generator=gen).to(device).requires_grad_()
    buf = leaf * 1  # a non-leaf buffer, as an lm_head output would be
    if alias == "same_tensor":
        x = xc = buf[:, :9]
    elif alias == "same_view_twice":
        x, xc = buf[:, :9], buf[:, :9]
    else:
        x, xc = buf[:, :9], buf[:, 3:]
    t = torch.tensor([0, 8, IGNORE, 4, 2], device=device)
    up = [torch.randn(5, generator=gen).to(device) for _ in range(5)]
    out = logits_logprobs(x, t, IGNORE, xc, inplace_backward=True, backend=name)
    sum((o * w).sum() for o, w in zip(out, up, strict=True)).backward()
    x0 = leaf.detach()
    want = torch.zeros(5, 12, dtype=torch.float64)
    want[:, :9] += _oracle(x0[:, :9], t, up[:3])[1]
    cols = slice(None, 9) if alias != "overlapping_views" else slice(3, None)
    want[:, cols] += _oracle(x0[:, cols], t, [up[3], up[4], None])[1]
    torch.testing.assert_close(leaf.grad.cpu().double(), want, rtol=1e-5, atol=1e-6)


def test_inplace_backward_into_disjoint_halves_of_one_buffer_stays_in_place(backend):
    """Clean and corrupted logits as the two halves of one (2N, V) lm_head output share a storage but no element:
    both gradients are still written in place."""
    name, device = backend
    gen = torch.Generator().manual_seed(7)
    leaf = torch.randn(8, 6, generator=gen).to(device).requires_grad_()
    buf = leaf * 1
    x, xc = buf[:4], buf[4:]
    t = torch.tensor([0, 5, IGNORE, 3], device=device)
    up = [torch.randn(4, generator=gen).to(device) for _ in range(5)]
    out = logits_logprobs(x, t, IGNORE, xc, inplace_backward=True, backend=name)
    sum((o * w).sum() for o, w in zip(out, up, strict=True)).backward()
    want = torch.cat([_oracle(leaf[:4], t, up[:3])[1], _oracle(leaf[4:], t, [up[3], up[4], None])[1]])
    torch.testing.assert_close(leaf.grad.cpu().double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(buf.detach().cpu().double(), want, rtol=1e-5, atol=1e-6)  # written in place


def test_second_order_gradients_of_the_corrupted_branch():
    """create_graph=True on the torch backend (the one that supports it): the corrupted branch's backward used its
    lse as a constant (saved, but not an output of the autograd node), dropping d lse_c / d corrupted_logits from
    the double backward: this gradient penalty's gradient w.r.t. corrupted_logits was off by 0.088 where it is at most
    0.054 (the clean branch, whose lse is an output, was right)."""
    gen = torch.Generator().manual_seed(8)
    x, xc = torch.randn(5, 13, generator=gen), torch.randn(5, 13, generator=gen)
    t = torch.tensor([3, 0, IGNORE, 12, 7])
    up = [torch.randn(5, generator=gen) for _ in range(5)]

    def penalty_grads(fn, a, c):
        a, c = a.clone().requires_grad_(), c.clone().requires_grad_()
        outs = fn(a, c)
        loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, up, strict=True))
        ga, gc = torch.autograd.grad(loss, (a, c), create_graph=True)
        ((ga.double() ** 2).sum() + (gc.double() ** 3).sum() + (ga.double() * gc.double()).sum()).backward()
        return a.grad, c.grad

    def oracle(a, c):
        valid = t != IGNORE
        safe = torch.where(valid, t, 0)[:, None]

        def branch(v):
            outs = (torch.log_softmax(v, -1).gather(-1, safe)[:, 0], v.gather(-1, safe)[:, 0])
            return [torch.where(valid, o, torch.zeros_like(o)) for o in outs]

        (lp, z), (lp_c, z_c) = branch(a), branch(c)
        return lp, z, torch.where(valid, torch.logsumexp(a, -1), torch.zeros_like(lp)), lp_c, z_c

    got = penalty_grads(lambda a, c: logits_logprobs(a, t, IGNORE, c, backend="torch"), x, xc)
    want = penalty_grads(oracle, x.double(), xc.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)


def test_extension_refuses_a_single_row_with_a_column_stride():
    """The extension's own input check (it guards direct callers) waived the unit column stride for one row, whose
    kernels then read V consecutive elements: [[0, 2, 4, 6, 8]] (every other column of arange(10)) gave lse 4.45 for
    8.145 and target logit 3 for 6. The public op copies such rows first; a direct caller now gets the error."""
    if not _ext.HAS_CPU_EXT:
        pytest.skip(f"tpo_fast._C is not built ({_ext.IMPORT_ERROR})")
    x = torch.arange(10.0).reshape(1, 10)[:, ::2]
    t, stat = torch.tensor([3]), torch.zeros(1)
    message = r"\Alogits must be contiguous in the last dim, got stride 2\Z"
    with pytest.raises(RuntimeError, match=message):
        _ext.logits_forward(x, t, IGNORE)
    with pytest.raises(RuntimeError, match=message):
        _ext.logits_backward(x, t, stat, stat, stat, IGNORE, False)
    # a single column has no column step: any stride reads the right element
    col = torch.arange(12.0).reshape(3, 4)[:, 1:2].t().contiguous().t()  # (3, 1) with strides (1, 3)
    lse, z = _ext.logits_forward(col, torch.zeros(3, dtype=torch.long), IGNORE)
    assert torch.equal(lse, torch.tensor([1.0, 5.0, 9.0])) and torch.equal(z, lse)
