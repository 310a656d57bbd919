"""`tpo_fast.ops.triton_fused` launchers called directly, at the edges mutation testing found unguarded
(docs/testing.md): a chunk of one row and an empty chunk, several vocabulary tiles, the bulk-tensor-copy (TMA)
loads, infinite logits in the gradient, the first chunk's weight-gradient buffers, and the outputs' dtype and
device under a float64 default dtype and a `meta` default device (the buffers must follow the inputs, not
torch's defaults).

Oracles are independent of the launchers: materialized `h @ W.T + b`, `torch.logsumexp`, `torch.softmax`,
`one_hot`, fp64 matrix products. Triton runs under its CPU interpreter here (conftest.py); shapes are tiny.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from tpo_fast.ops import triton_fused
from tpo_fast.ops.options import kernel_options

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU edges (default device, CPU branches)")

D, V = 8, 20  # D * 4 bytes is a multiple of 16: describable by TMA


def _inputs(r: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, D, generator=g), torch.randn(V, D, generator=g), torch.randn(V, generator=g)


def _tiles(t: torch.Tensor, tile_v: int) -> list[torch.Tensor]:
    return list(t.split(tile_v, dim=-1))


def _check_stored(h, w, b, y, y2, st, v=V):
    """exp_tiles_and_lse's outputs against materialized fp64 logits: lse, z[y], z[y2] (0 where y2 < 0), the tile
    maxima and each tile's exp(z - its max) in the weight's dtype."""
    want = h.double() @ w.double().t() + (0 if b is None else b.double())
    r = h.shape[0]
    n_tiles = -(-v // st.tile_v)
    assert st.exp.dtype == w.dtype and st.exp.shape == (r, v)
    assert st.tile_max.shape == (r, n_tiles) and st.tile_max.dtype == torch.float32
    assert st.lse.shape == st.z.shape == (r,) and st.lse.dtype == st.z.dtype == torch.float32
    torch.testing.assert_close(st.lse.double(), want.logsumexp(-1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(st.z.double(), want.gather(1, y[:, None]).squeeze(1), rtol=1e-6, atol=1e-5)
    if y2 is None:
        assert st.z2 is None
    else:
        z2 = torch.where(y2 >= 0, want.gather(1, y2.clamp(min=0)[:, None]).squeeze(1), 0.0)
        torch.testing.assert_close(st.z2.double(), z2, rtol=1e-6, atol=1e-5)
    maxima = torch.stack([t.amax(-1) for t in _tiles(want, st.tile_v)], dim=1)
    torch.testing.assert_close(st.tile_max.double(), maxima, rtol=1e-6, atol=1e-5)
    exp = torch.cat([(t - t.amax(-1, keepdim=True)).exp() for t in _tiles(want, st.tile_v)], dim=1)
    if w.dtype == torch.float32:
        torch.testing.assert_close(st.exp.double(), exp, rtol=1e-5, atol=1e-6)
    else:  # values in [0, 1] rounded once to bf16
        torch.testing.assert_close(st.exp.double(), exp, rtol=2.0**-8, atol=1e-6)


def _targets(r: int, v: int = V, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, v, (r,), generator=g)
    y2 = torch.randint(0, v, (r,), generator=g)
    y2[::2] = -1  # every other row has no second target
    return y, y2


@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("second", [False, True], ids=["y", "y-y2"])
def test_exp_tiles_and_lse_one_row_and_a_few(r, with_bias, second):
    """A chunk of one row runs the kernel too (not the empty-chunk early return)."""
    h, w, b = _inputs(r)
    b = b if with_bias else None
    y, y2 = _targets(r)
    _check_stored(h, w, b, y, y2 if second else None,
                  triton_fused.exp_tiles_and_lse(h, w, b, y, y2 if second else None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_exp_tiles_and_lse_over_several_vocabulary_tiles(dtype):
    """V = 1100: three tiles under the interpreter (512 wide), the last one partial; each target logit comes from
    the one tile that holds it, and every tile keeps its own maximum."""
    v = 1100
    g = torch.Generator().manual_seed(6)
    h, w, b = torch.randn(5, D, generator=g), torch.randn(v, D, generator=g), torch.randn(v, generator=g)
    y = torch.tensor([0, 511, 512, 1099, 700])  # the first and last columns of tiles
    y2 = torch.tensor([1023, -1, 1024, 5, -1])
    st = triton_fused.exp_tiles_and_lse(h.to(dtype), w.to(dtype), b.to(dtype), y, y2)
    assert st.tile_max.shape[1] == 3
    _check_stored(h.to(dtype).float(), w.to(dtype), b.to(dtype).float(), y, y2, st, v=v)


def test_exp_tiles_and_lse_through_tma_descriptors(monkeypatch):
    """TPO_FAST_TMA=1: the interpreter loads through host-side tensor descriptors built from the chunk's tiles."""
    used = []
    real = triton_fused._tma_descriptors
    monkeypatch.setattr(triton_fused, "_tma_descriptors", lambda *a: used.append(real(*a)) or used[-1])
    h, w, b = _inputs(5, seed=1)
    y, _ = _targets(5)
    with kernel_options(tma="1"):
        st = triton_fused.exp_tiles_and_lse(h, w, b, y)
    assert [u[2] for u in used] == [True]
    _check_stored(h, w, b, y, None, st)


def test_empty_chunk():
    h, w, b = _inputs(0)
    y = torch.zeros(0, dtype=torch.long)
    st = triton_fused.exp_tiles_and_lse(h, w.bfloat16(), b.bfloat16(), y, y)
    assert st.exp.shape == (0, V) and st.exp.dtype == torch.bfloat16
    assert st.lse.shape == st.z.shape == st.z2.shape == (0,) and st.lse.dtype == torch.float32
    dz = triton_fused.softmax_grad_inplace(st, st.lse, y, st.lse, None, None)
    assert dz.shape == (0, V) and dz.dtype == torch.bfloat16


def _dz_oracle(z, coef_p, y, coef_y, y2=None, coef_y2=None):
    z = z.double()
    v = z.shape[1]
    dz = coef_p.double()[:, None] * torch.softmax(z, -1) + coef_y.double()[:, None] * F.one_hot(y, v)
    if y2 is not None:
        dz = dz + coef_y2.double()[:, None] * F.one_hot(y2, v)
    return dz


def _stored_by_hand(z: torch.Tensor, tile_v: int, dtype: torch.dtype) -> triton_fused.StoredChunk:
    """What the forward keeps, made here from given logits (independent of its kernel)."""
    maxima = torch.stack([t.amax(-1) for t in _tiles(z, tile_v)], dim=1)
    shifts = maxima.masked_fill(maxima == float("-inf"), 0.0)
    exp = torch.cat([(t - s[:, None]).exp() for t, s in zip(_tiles(z, tile_v), shifts.unbind(1), strict=True)], 1)
    r = z.shape[0]
    return triton_fused.StoredChunk(exp.to(dtype), maxima.float(), tile_v, z.double().logsumexp(-1).float(),
                                    torch.zeros(r), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("r, second", [(1, False), (1, True), (3, True)], ids=["one-row", "one-row-y2", "rows-y2"])
@pytest.mark.parametrize("tile_v", [16, 32], ids=["three-tiles", "two-tiles"])
def test_softmax_grad_inplace(dtype, r, second, tile_v):
    """dZ over the stored per-tile exponentials, in place and in their dtype; V = 37 is 3 tiles of 16 (the last one
    partial) or 2 of 32, each with its own shift."""
    g = torch.Generator().manual_seed(2)
    v = 37
    z = torch.randn(r, v, generator=g) * 3
    z[:, 16:32] -= 30.0  # a tile far below the others: its shift differs from the row max by ~30
    coef_p, coef_y, coef_y2 = (torch.randn(r, generator=g) for _ in range(3))
    y = torch.randint(0, v, (r,), generator=g)
    y2 = (y + 1 + torch.randint(0, v - 1, (r,), generator=g)) % v if second else None
    st = _stored_by_hand(z, tile_v, dtype)
    dz = triton_fused.softmax_grad_inplace(st, coef_p, y, coef_y, y2, coef_y2 if second else None)
    assert dz.dtype == dtype and dz.shape == (r, v)
    assert dz.data_ptr() == st.exp.data_ptr()  # in place: no second buffer
    want = _dz_oracle(z, coef_p, y, coef_y, y2, coef_y2 if second else None)
    if dtype == torch.float32:
        torch.testing.assert_close(dz.double(), want, rtol=1e-5, atol=1e-6)
    else:  # the stored exponentials and the fp32 dZ each rounded once to bf16
        torch.testing.assert_close(dz.double(), want, rtol=2**-7, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
def test_softmax_grad_inplace_at_infinite_logits():
    """A +inf logit: the logsumexp is +inf, its own entry's gradient NaN (exp(inf - inf)) and every other entry's
    coef_p * 0, in its tile and the others (no tile-wide NaN). A tile of -inf logits in a finite row: zeros."""
    inf = float("inf")
    z = torch.randn(2, 37, generator=torch.Generator().manual_seed(3))
    z[0, 20] = inf
    z[1, 16:32] = -inf
    st = _stored_by_hand(z, 16, torch.float32)
    coef_p, coef_y = torch.tensor([0.5, -1.5]), torch.tensor([2.0, 3.0])
    y = torch.tensor([3, 35])
    dz = triton_fused.softmax_grad_inplace(st, coef_p, y, coef_y, None, None)
    assert dz[0, 20].isnan() and bool(dz[0].isnan().sum() == 1)
    others = torch.ones(37, dtype=torch.bool)
    others[20] = False
    assert dz[0, 3] == 2.0 and bool((dz[0, others & (torch.arange(37) != 3)] == 0).all())
    assert bool((dz[1, 16:32] == 0).all())
    torch.testing.assert_close(dz[1].double(), _dz_oracle(z[1:], coef_p[1:], y[1:], coef_y[1:])[0], rtol=1e-5,
                               atol=1e-6)


def test_mm_f32_shape_and_no_resize():
    g = torch.Generator().manual_seed(3)
    dz, w = torch.randn(3, V, generator=g), torch.randn(V, D, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an `out=` of the wrong shape is resized with a warning
        out = triton_fused.mm_f32(dz, w)
    assert out.shape == (3, D) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), dz.double() @ w.double(), rtol=1e-6, atol=1e-5)


def _dw_inputs(dtype):
    g = torch.Generator().manual_seed(4)
    dz, h, w = torch.randn(3, V, generator=g), torch.randn(3, D, generator=g), torch.randn(V, D, generator=g)
    return dz.to(dtype), h.to(dtype), w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_accumulate_dw_first_chunk_then_next(dtype):
    """The first chunk allocates dW in the weight's dtype; the next one adds to it (one rounding per chunk)."""
    dz, h, w = _dw_inputs(dtype)
    gw = triton_fused.accumulate_dw(None, dz, h, w)
    first = (dz.double().t() @ h.double()).float().to(dtype)
    assert gw.dtype == dtype and gw.shape == (V, D)
    torch.testing.assert_close(gw, first, rtol=0 if dtype != torch.float32 else 1e-6, atol=1e-6)
    again = triton_fused.accumulate_dw(gw, dz, h, w)
    assert again.data_ptr() == gw.data_ptr()
    want = (first.double() + dz.double().t() @ h.double()).float().to(dtype)
    torch.testing.assert_close(again, want, rtol=0 if dtype != torch.float32 else 1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scatter_dw_without_a_buffer(dtype):
    """The corrupted rows' rank-1 dW when no chunk has allocated dW yet (repeated targets sum in fp32)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(V, D, generator=g).to(dtype)
    hc = torch.randn(4, D, generator=g).to(dtype)
    gz = torch.randn(4, generator=g)
    y = torch.tensor([3, 7, 3, 19])
    gw = triton_fused.scatter_dw(None, y, gz, hc, w)
    want = torch.zeros(V, D, dtype=torch.float64).index_add_(0, y, gz.double()[:, None] * hc.double())
    assert gw.dtype == dtype and gw.shape == (V, D)
    torch.testing.assert_close(gw, want.float().to(dtype), rtol=0 if dtype != torch.float32 else 1e-6, atol=1e-6)


def test_buffers_fp32_under_float64_default(default_float64):
    h, w, b = (t.float() for t in _inputs(3))
    y, y2 = _targets(3)
    _check_stored(h, w, b, y, y2, triton_fused.exp_tiles_and_lse(h, w, b, y, y2))
    st0 = triton_fused.exp_tiles_and_lse(h[:0], w, b, y[:0], y2[:0])
    assert st0.lse.dtype == st0.z.dtype == st0.z2.dtype == st0.tile_max.dtype == torch.float32
    assert triton_fused.mm_f32(torch.randn(3, V).float(), w).dtype == torch.float32
    dz, hh, wb = _dw_inputs(torch.bfloat16)
    assert triton_fused.accumulate_dw(None, dz, hh, wb).dtype == torch.bfloat16
    assert triton_fused.scatter_dw(None, torch.tensor([1]), torch.ones(1).float(), hh[:1], wb).dtype == torch.bfloat16


def test_buffers_on_the_inputs_device_under_meta_default():
    h, w, b = _inputs(3)
    dz, hh, wb = _dw_inputs(torch.float32)
    y, gz = torch.tensor([1, 2]), torch.ones(2)
    ty, ty2 = _targets(3)
    with torch.device("meta"):
        st = triton_fused.exp_tiles_and_lse(h, w, b, ty, ty2)
        st0 = triton_fused.exp_tiles_and_lse(h[:0], w, b, ty[:0], ty2[:0])
        mm = triton_fused.mm_f32(dz, wb)
        gw = triton_fused.accumulate_dw(None, dz, hh, wb)
        gs = triton_fused.scatter_dw(None, y, gz, hh[:2], wb)
    stored = [t for c in (st, st0) for t in c if isinstance(t, torch.Tensor)]
    assert {t.device.type for t in (*stored, mm, gw, gs)} == {"cpu"}
    _check_stored(h, w, b, ty, ty2, st)
    torch.testing.assert_close(gs.double(), torch.zeros(V, D, dtype=torch.float64).index_add_(
        0, y, gz.double()[:, None] * hh[:2].double()).float().double(), rtol=1e-6, atol=1e-6)

