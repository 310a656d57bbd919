"""The Triton kernels at their edges: what the kernel mutation runs (scripts/kernel_mutants.py, docs/testing.md)
found that no test held them to. Each test compares the triton backend (the interpreter on CPU, compiled on a GPU)
with the reference backend on the same inputs, or with the value the inputs determine.

- Reads stay inside the inputs: every input is a view in the middle of a larger buffer of NaN, so a load past an
  edge (a row past N, a column past D, a tile past V) that a mask should have stopped turns a result into NaN.
- Row partials stay in their row: rows whose logits lie a thousand apart, over three vocabulary tiles (the
  logsumexp combine loads four partials per row; a fourth read from the next row would shift it).
- Logits far below zero (a logsumexp of -1000) and a +inf bias (a logsumexp of +inf, as torch.logsumexp).
- Non-finite values stay in their row: a NaN hidden row's gradient (a gradient tile's columns past D must not
  spill into the next row) and an infinite row of the 16-bit scatter (padding lanes must not read it).
- The gather kernels over two hidden blocks and two row blocks (D 200, N 70: the interpreter's tiles are 128
  and 64 wide).
"""

from __future__ import annotations

import pytest
import torch
from test_primitives import make_inputs, run

import tpo_fast
from tpo_fast.ops import triton_impl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter's numpy warns of inf and NaN in lanes the masks then drop
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def fenced(t: torch.Tensor, pad: int = 40) -> torch.Tensor:
    """`t`'s values in a contiguous view at offset `pad` of a buffer `pad` elements longer on each side, filled
    with NaN (integers: -1, an id before the weight's first row); a leaf that requires grad when `t` does."""
    fill = float("nan") if t.dtype.is_floating_point else -1
    buf = torch.full((t.numel() + 2 * pad,), fill, dtype=t.dtype, device=t.device)
    view = buf[pad : pad + t.numel()].view(t.shape)
    view.copy_(t.detach())
    return view.requires_grad_(t.requires_grad)


def _inputs(n, d, v):
    """test_primitives' inputs with a bias and a corrupted branch, no ignored row (its seed follows the shape)."""
    return make_inputs(n, d, v, torch.float32, bias=True, corrupted=True, ignore="none")


def _stats_and_grads(backend, h, w, b, hc, y):
    """Every output of `token_stats` and the gradients of a weighted sum of them (test_primitives' `run`)."""
    k = torch.arange(1, h.shape[0] + 1, device=h.device, dtype=torch.float32) / h.shape[0]
    s, outs, grads = run(backend, h, w, b, hc, y, torch.stack([k, 1 - k, torch.full_like(k, 0.5), k]), argmax=True)
    return outs | {"argmax": s.argmax} | {f"grad {name}": g for name, g in grads.items()}


def _assert_close(got: dict, want: dict, atol=1e-5, rtol=1e-5) -> None:
    for name in want:
        torch.testing.assert_close(got[name].float(), want[name].float(), atol=atol, rtol=rtol, msg=f"{name}".__add__)


@pytest.mark.parametrize(
    "mode,chunk_mb,tma,d",
    [("split", "", "0", 40), ("split", "0.01", "0", 40), ("split", "0.01", "1", 40), ("atomic", "", "0", 40),
     ("split", "", "0", 200)],
    ids=["split", "split-chunked", "split-tma", "atomic", "split-D200"],
)
def test_token_stats_read_nothing_outside_their_inputs(monkeypatch, mode, chunk_mb, tma, d):
    """No dimension a multiple of a tile (N 70 over two row blocks, D 40, V 600 over two tiles; D 200 over two
    blocks of the gather kernels, 128 wide under the interpreter); no ignored row, so the hidden states reach the
    kernels as they are (a compaction would copy them out of the fence)."""
    monkeypatch.setenv("TPO_FAST_BACKWARD", mode)
    monkeypatch.setenv("TPO_FAST_CHUNK_MB", chunk_mb)
    monkeypatch.setenv("TPO_FAST_TMA", tma)
    h, w, b, hc, y = _inputs(70, d, 600)
    want = _stats_and_grads("reference", h, w, b, hc, y)
    got = _stats_and_grads("triton", *(fenced(t) for t in (h, w, b, hc)), fenced(y))
    _assert_close(got, want, rtol=1e-4)


def test_row_partials_stay_in_their_row():
    """Odd rows' logits about a thousand times the even rows': a tile partial of row r + 1 read into row r's
    logsumexp would shift it so far that row r's sum underflows (-inf), or a NaN row would spread."""
    h, w, b, hc, y = _inputs(9, 16, 1100)
    with torch.no_grad():
        h[1::2] *= 1000.0
    want = _stats_and_grads("reference", h, w, b, hc, y)
    got = _stats_and_grads("triton", h, w, b, hc, y)
    assert bool(got["lse"][1::2].min() > 100.0)  # the large rows are large
    _assert_close(got, want, atol=1e-3)
    with torch.no_grad():
        h[4, 0] = float("nan")
    lse = tpo_fast.token_logprobs(h, w, y, bias=b, return_lse=True, backend="triton")[1]
    assert lse.isnan().tolist() == [i == 4 for i in range(9)]


def test_logits_far_below_zero():
    """A bias of -1000 on every entry: the logsumexp is -1000 plus that of the rest, never log(0) = -inf."""
    h, w, b, hc, y = _inputs(20, 16, 1100)
    with torch.no_grad():
        b -= 1000.0
    want = _stats_and_grads("reference", h, w, b, hc, y)
    got = _stats_and_grads("triton", h, w, b, hc, y)
    assert bool((got["lse"] < -990).all())
    _assert_close(got, want, atol=1e-3)


def test_a_plus_inf_bias_gives_a_plus_inf_logsumexp():
    """As torch.logsumexp: one +inf logit makes the logsumexp +inf (not NaN), a finite target's log-prob -inf,
    and the +inf target's NaN (inf - inf)."""
    h, w, b, _, y = _inputs(6, 16, 1100)
    with torch.no_grad():
        b[700] = float("inf")
    y[0] = 700
    lp, z, lse = tpo_fast.token_logprobs(h, w, y, bias=b, return_target_logit=True, return_lse=True,
                                         backend="triton")
    assert lse.tolist() == [float("inf")] * 6
    assert lp[0].isnan() and lp[1:].tolist() == [float("-inf")] * 5
    assert z[0] == float("inf") and bool(z[1:].isfinite().all())


def test_an_infinite_row_scatters_into_its_own_target_only():
    """`gw[y[i]] += g[i] * x[i]` in 16 bits (`kernels/scatter_rows.py`): an inf in x's first row reaches the
    first row's target and no other (lanes past a run of equal targets read nothing, not 0 * inf)."""
    g = torch.Generator().manual_seed(4)
    gw = torch.randn(30, 24, generator=g).bfloat16().to(DEVICE)
    targets = torch.tensor([5, 9, 9, 2, 5, 11, 9], device=DEVICE)
    coef = torch.randn(7, generator=g).to(DEVICE)
    x = torch.randn(7, 24, generator=g).bfloat16().to(DEVICE)
    x[0, 3] = float("inf")
    want = gw.double().index_add(0, targets, coef.double()[:, None] * x.double())
    triton_impl._scatter_rows_(gw, targets, coef, x)
    finite = gw.isfinite().all(dim=1)
    assert (~finite).nonzero().flatten().tolist() == [5] and gw[5, 3].isinf()
    torch.testing.assert_close(gw[finite].double(), want[finite], atol=0, rtol=2.0**-7)


@pytest.mark.parametrize("mode", ["split", "atomic"])
def test_a_nan_row_keeps_its_gradient_to_itself(monkeypatch, mode):
    """A NaN in one row of the hidden states: that row's log-prob and hidden gradient are NaN, every other row's
    are those of the same inputs without it (a gradient tile's columns past D must not spill into the next row)."""
    monkeypatch.setenv("TPO_FAST_BACKWARD", mode)
    h, w, b, hc, y = _inputs(20, 40, 300)
    want = _stats_and_grads("reference", h, w, b, hc, y)
    with torch.no_grad():
        h[6, 11] = float("nan")
    got = _stats_and_grads("triton", h, w, b, hc, y)
    rows = [i for i in range(20) if i != 6]
    assert got["logprobs"][6].isnan() and bool(got["grad hidden"][6].isnan().all())
    for name in ("logprobs", "lse", "grad hidden", "grad corrupted"):
        torch.testing.assert_close(got[name][rows], want[name][rows], atol=1e-5, rtol=1e-4, msg=f"{name}".__add__)
