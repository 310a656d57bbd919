"""`tpo_fast.ops.triton_impl` helpers and launchers called directly, at the edges mutation testing found
unguarded (docs/testing.md): tile sizes and their clamps, the dot precision, the TMA descriptor decision, the
logsumexp combine of per-tile partials (infinite rows, argmax ties), empty inputs (the fp32 GEMM helpers they
call are tested in test_gemm.py), the 16-bit row
scatter, the buffers' dtype and device under a float64 default dtype and a `meta` default device, the split
backward's chunk width under a large budget, corrupted rows without their gradient, and every launch's settings
(tiles, warps, stages, dot precision, TMA and interpreter flags; spies stand for the kernels, also as a GPU run
would launch them).

Oracles are independent of the code under test: materialized `h @ W.T + b`, `torch.logsumexp`, `index_add`
in fp64, exact expected tile sizes. Triton runs under its CPU interpreter (conftest.py); shapes are tiny.
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from _spies import CudaLooking

from tpo_fast.ops import gemm, triton_impl
from tpo_fast.ops.options import KernelOptions
from tpo_fast.ops.triton_impl import TileConfig

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU edges (interpreter, default device)")


def _gpu(monkeypatch):
    """The launch decisions a compiled (GPU) run would take, without launching anything."""
    monkeypatch.setattr(triton_impl, "interpreter_enabled", lambda: False)


@pytest.mark.parametrize("x, lo, hi, want", [
    (0, 16, 64, 16), (1, 16, 64, 16), (17, 16, 64, 32), (32, 16, 64, 32), (33, 16, 64, 64), (1000, 16, 64, 64),
    (-5, 1, 8, 1), (3.7, 1, 8, 4),
])
def test_p2_clamps_the_next_power_of_two(x, lo, hi, want):
    assert triton_impl._p2(x, lo, hi) == want


def test_interpreter_tiles():
    assert triton_impl.tile_config(5, 20, 8) == TileConfig(16, 32, 16, 8, 3, 4)
    assert triton_impl.tile_config(100, 1000, 300, torch.float32) == TileConfig(64, 512, 128, 8, 3, 4)


@pytest.mark.parametrize("dtype, want", [
    (torch.bfloat16, TileConfig(128, 256, 64, 8, 3, 8)),
    (torch.float16, TileConfig(128, 256, 64, 8, 3, 8)),
    (torch.float32, TileConfig(64, 64, 32, 4, 3, 8)),
    (torch.float64, TileConfig(64, 64, 32, 4, 3, 8)),  # an untuned dtype gets the fp32 tiles
])
def test_gpu_tiles_by_dtype_and_clamped_to_the_problem(monkeypatch, dtype, want):
    _gpu(monkeypatch)
    opts = KernelOptions()
    assert triton_impl.tile_config(8192, 32000, 4096, dtype, options=opts) == want
    small = triton_impl.tile_config(5, 20, 8, dtype, options=opts)
    assert small == TileConfig(16, 32, 16, want.num_warps, want.num_stages, want.group_n)
    assert triton_impl.tile_config(8192, 32000, 4096, options=opts) == TileConfig(128, 256, 64, 8, 3, 8)  # bf16


def test_gpu_tiles_atomic_and_override(monkeypatch):
    _gpu(monkeypatch)
    tiled = KernelOptions(tiles=(32, 64, 16, 2, 2, 4))
    assert triton_impl.tile_config(8192, 32000, 4096, torch.float32, atomic=True, options=tiled) == \
        TileConfig(64, 128, 64, 8, 3, 8)  # the atomic backward ignores the override
    assert triton_impl.tile_config(8192, 32000, 4096, torch.float32, options=tiled) == TileConfig(32, 64, 16, 2, 2, 4)
    assert triton_impl.tile_config(20, 100, 40, torch.float32, atomic=True, options=KernelOptions()) == \
        TileConfig(32, 128, 64, 8, 3, 8)


def test_interpreter_tiles_large_unless_set(monkeypatch):
    """Under the interpreter the default tiles are large (one Python step per tile); tiles set explicitly hold,
    never wider than the problem, so that tests can put a small vocabulary in several tiles. Not the atomic
    kernel's, which are fixed on a GPU too."""
    monkeypatch.setattr(triton_impl, "interpreter_enabled", lambda: True)
    assert triton_impl.tile_config(100, 2000, 40, options=KernelOptions()) == TileConfig(64, 512, 64, group_n=4)
    small = KernelOptions(tiles=(16, 32, 16, 4, 1, 2))
    assert triton_impl.tile_config(100, 70, 40, options=small) == TileConfig(16, 32, 16, 4, 1, 2)
    assert triton_impl.tile_config(5, 20, 8, options=small) == TileConfig(16, 32, 16, 4, 1, 2)
    assert triton_impl.tile_config(100, 70, 40, atomic=True, options=small) == TileConfig(64, 128, 64, group_n=4)


def test_dot_precision():
    assert triton_impl._dot_precision(torch.float32, KernelOptions()) == "ieee"
    assert triton_impl._dot_precision(torch.float32, KernelOptions(allow_tf32=True)) == "tf32"
    assert triton_impl._dot_precision(torch.bfloat16, KernelOptions()) == "tf32"
    assert triton_impl._dot_precision(torch.float32) == "ieee"  # current_options(): TF32 off by default


def test_chunk_bytes():
    assert triton_impl.chunk_bytes(KernelOptions(chunk_mb=0.5)) == 2**19
    assert triton_impl.chunk_bytes() == 256 * 2**20


def test_tma_descriptor_decision(monkeypatch):
    cfg = TileConfig(16, 32, 16)
    h, w = torch.randn(5, 8), torch.randn(20, 8)  # 8 fp32 = 32 bytes per row: describable
    on = KernelOptions(tma="1")
    hd, wd, used = triton_impl._tma_descriptors(h, w, cfg, on)
    assert used is True
    assert list(hd.block_shape) == [16, 16] and list(wd.block_shape) == [32, 16]
    assert list(hd.shape) == [5, 8] and list(wd.shape) == [20, 8]
    for opts in (KernelOptions(tma="0"), KernelOptions(tma="auto")):  # auto: not under the interpreter
        assert triton_impl._tma_descriptors(h, w, cfg, opts) == (h, w, False)
    # each condition of "describable" alone: a column stride, a row stride, a misaligned start, a row of 12 bytes
    wide = torch.randn(5, 16)
    for hh, ww in [(h.t().contiguous().t(), w), (wide[:, :8], w), (torch.randn(41)[1:].view(5, 8), w),
                   (torch.randn(5, 3), torch.randn(20, 3)), (h, w.t().contiguous().t())]:
        got = triton_impl._tma_descriptors(hh, ww, cfg, on)
        assert got[0] is hh and got[1] is ww and got[2] is False
    _gpu(monkeypatch)  # compiled: CPU tensors have no copy engine
    assert triton_impl._tma_descriptors(h, w, cfg, on) == (h, w, False)
    assert triton_impl._tma_descriptors(h, w, cfg, KernelOptions(tma="0")) == (h, w, False)


def test_combine_lse_partials_infinite_rows_and_ties():
    inf = float("inf")
    m = torch.tensor([[1.0, 3.0], [-inf, -inf], [2.0, inf], [5.0, 5.0]])
    s = torch.tensor([[2.0, 1.5], [0.0, 0.0], [1.0, 1.0], [1.0, 3.0]])
    arg = torch.tensor([[4, 9], [0, 7], [1, 11], [2, 6]], dtype=torch.int32)
    lse, am = triton_impl.combine_lse_partials(m, s, arg)
    want0 = torch.tensor([1.0, 3.0], dtype=torch.float64).exp() @ torch.tensor([2.0, 1.5], dtype=torch.float64)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse[0].double(), want0.log(), rtol=1e-6, atol=1e-6)
    assert lse[1] == -inf and lse[2] == inf
    want3 = torch.tensor(4.0, dtype=torch.float64).log() + 5.0
    torch.testing.assert_close(lse[3].double(), want3, rtol=1e-6, atol=1e-6)
    assert am.dtype == torch.int64 and am.tolist() == [9, 0, 11, 2]  # a tie: the first tile's index
    assert triton_impl.combine_lse_partials(m, s, None)[1] is None



@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy, NaN rows
def test_combine_lse_partials_over_many_tiles_and_a_nan_row():
    """`lse_combine_kernel`: 300 tiles (three column blocks of 128, the last partial), 37 rows (three row blocks,
    the last partial); a NaN tile max gives a NaN row and leaves the others alone. Oracle: fp64 logsumexp of
    `M_s + log S_s`."""
    g = torch.Generator().manual_seed(3)
    m = torch.randn(37, 300, generator=g) * 4
    s = torch.rand(37, 300, generator=g) * 5 + 0.5
    m[5, 123] = float("nan")
    lse, _ = triton_impl.combine_lse_partials(m, s, None)
    want = (m.double() + s.double().log()).logsumexp(1)
    assert torch.isnan(lse[5]) and not torch.isnan(lse[torch.arange(37) != 5]).any()
    keep = torch.arange(37) != 5
    torch.testing.assert_close(lse[keep].double(), want[keep], rtol=1e-6, atol=1e-6)


D, V = 8, 20


def _inputs(n: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h, w, b = torch.randn(n, D, generator=g), torch.randn(V, D, generator=g), torch.randn(V, generator=g)
    y = torch.randint(0, V, (n,), generator=g)
    return h.to(dtype), w.to(dtype), b.to(dtype), y


@pytest.mark.parametrize("argmax, second", [(True, True), (False, False)], ids=["all", "none"])
def test_forward_and_gathers_of_no_rows(argmax, second):
    h, w, b, y = _inputs(0)
    lse, z, zc, am = triton_impl.forward(h, w, b, h if second else None, y, argmax)
    for t in (lse, z) + ((zc,) if second else ()):
        assert t.shape == (0,) and t.dtype == torch.float32
    assert (zc is None) is not second
    assert am is None if not argmax else (am.shape == (0,) and am.dtype == torch.int64)
    z0 = triton_impl.gather_logits(h, w, b, y)
    assert z0.shape == (0,) and z0.dtype == torch.float32
    gh, gw, gb = triton_impl.gather_backward(h, w, y, torch.zeros(0), (True, True, True))
    assert gh.shape == (0, D) and gh.dtype == torch.float32
    assert torch.equal(gw, torch.zeros(V, D)) and torch.equal(gb, torch.zeros(V))


@pytest.mark.parametrize("mode", ["split", "atomic"])
def test_backward_of_no_rows(mode):
    h, w, b, y = _inputs(0)
    e = torch.zeros(0)
    gh, gw, gb, ghc = triton_impl.backward(h, w, b, h, y, e, e, e, e, (True, True, True, True),
                                           KernelOptions(backward=mode))
    assert gh.shape == (0, D) and ghc.shape == (0, D) and gh.dtype == ghc.dtype == torch.float32
    assert torch.equal(gw, torch.zeros(V, D)) and torch.equal(gb, torch.zeros(V))


def test_gather_logits_and_backward_one_row_and_repeats():
    h, w, b, _ = _inputs(4, seed=1)
    y = torch.tensor([5, 5, 0, V - 1])
    g = torch.tensor([0.5, -2.0, 1.5, 3.0])
    want_z = (h.double() * w.double()[y]).sum(-1) + b.double()[y]
    torch.testing.assert_close(triton_impl.gather_logits(h, w, b, y).double(), want_z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(triton_impl.gather_logits(h[:1], w, None, y[:1]).double(),
                               (h.double()[0] * w.double()[5]).sum()[None], rtol=1e-6, atol=1e-6)
    gh, gw, gb = triton_impl.gather_backward(h, w, y, g, (True, True, True))
    torch.testing.assert_close(gh.double(), g.double()[:, None] * w.double()[y], rtol=1e-6, atol=1e-6)
    want_gw = torch.zeros(V, D, dtype=torch.float64).index_add_(0, y, g.double()[:, None] * h.double())
    torch.testing.assert_close(gw.double(), want_gw, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb.double(), torch.zeros(V, dtype=torch.float64).index_add_(0, y, g.double()))
    assert triton_impl.gather_backward(h, w, y, g, (False, False, False)) == (None, None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scatter_rows_sums_repeats_before_one_rounding(dtype):
    """Two contributions of 2**-8 to a row of 1.0: bf16 rounds 1 + 2**-8 back to 1 if added one at a time."""
    gw = torch.ones(V, D, dtype=dtype)
    targets = torch.tensor([3, 3, 7])
    g = torch.tensor([2.0**-8, 2.0**-8, -0.5])
    x = torch.ones(3, D, dtype=dtype)
    triton_impl._scatter_rows_(gw, targets, g, x)
    want = torch.ones(V, D)
    want[3] += 2.0**-7
    want[7] -= 0.5
    assert gw.dtype == dtype and torch.equal(gw.float(), want)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("r", "v"), [(1, 5), (9, 3), (64, 20), (300, 1000)])
def test_scatter_rows_of_unsorted_repeated_targets(dtype, r, v):
    """The sync-free 16-bit scatter (distinct targets in fixed slots, no `torch.unique`): each touched row gets
    its fp32 sum once rounded, every other row stays bit for bit; targets unsorted, repeated, one distinct."""
    g = torch.Generator().manual_seed(r * v)
    gw = torch.randn(v, 6, generator=g).to(dtype)
    targets = torch.randint(0, v, (r,), generator=g)
    coef, x = torch.randn(r, generator=g), torch.randn(r, 6, generator=g).to(dtype)
    summed = gw.float().index_add(0, targets, coef[:, None] * x.float())
    touched = torch.zeros(v, dtype=torch.bool)
    touched[targets] = True
    want = torch.where(touched[:, None], summed.to(dtype), gw)
    triton_impl._scatter_rows_(gw, targets, coef, x)
    assert torch.equal(gw, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_scatter_rows_of_a_long_run_over_two_column_blocks(dtype):
    """`scatter_rows_kernel`: a frequent token (201 of 260 rows: one program sums its whole run, 4 rows a step, the
    last step partial), a token of 5 rows (one row past a step) and D = 1100 (two column blocks of 1024, the
    second partial). Oracle: the fp64 sum, added to the old row and rounded once; the
    kernel sums in fp32, so a touched row may round to the neighbour of the exact result (at most one unit in
    the last place); untouched rows stay bit for bit."""
    g = torch.Generator().manual_seed(11)
    v, d = 40, 1100
    gw = torch.randn(v, d, generator=g).to(dtype)
    targets = torch.randint(0, v, (260,), generator=g)
    targets = torch.where(targets == 17, 18, targets).where(targets != 29, 30)  # 17 and 29 only as set below
    spots = torch.randperm(260, generator=g)
    targets[spots[:201]], targets[spots[201:206]] = 17, 29
    coef, x = torch.randn(260, generator=g), torch.randn(260, d, generator=g).to(dtype)
    want = gw.double().index_add(0, targets, coef.double()[:, None] * x.double())
    touched = torch.zeros(v, dtype=torch.bool)
    touched[targets] = True
    before = gw.clone()
    triton_impl._scatter_rows_(gw, targets, coef, x)
    assert torch.equal(gw[~touched], before[~touched])
    step = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)  # one unit in the last place
    err = (gw.double() - want).abs() / want.abs().clamp(min=1.0)
    assert err[touched].max() <= step, "a touched row is off by more than one 16-bit rounding"


@pytest.mark.parametrize("d", [1, 6])
def test_scatter_rows_of_column_strided_rows_and_a_single_column(d):
    """`x` whose columns are not adjacent (a transposed view: the kernel reads rows at unit column stride, so the
    launcher makes them so) and a one-column gradient; oracle as in the test above."""
    g = torch.Generator().manual_seed(d)
    gw = torch.randn(9, d, generator=g).bfloat16()
    targets = torch.tensor([4, 1, 4, 8, 4])
    coef = torch.randn(5, generator=g)
    x = torch.randn(d, 5, generator=g).bfloat16().t()  # (5, d), strides (1, 5)
    summed = gw.float().index_add(0, targets, coef[:, None] * x.float())
    touched = torch.zeros(9, dtype=torch.bool)
    touched[targets] = True
    want = torch.where(touched[:, None], summed.bfloat16(), gw)
    triton_impl._scatter_rows_(gw, targets, coef, x)
    assert torch.equal(gw, want)


def _grad_args(n, seed=5):
    h, w, b, y = _inputs(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    lse = (h.double() @ w.double().t() + b.double()).logsumexp(-1).float()
    coef_p, coef_y, g_zc = (torch.randn(n, generator=g) for _ in range(3))
    return h, w, b, y, lse, coef_p, coef_y, g_zc


def _grad_oracle(h, w, b, y, lse, coef_p, coef_y, g_zc, hc):
    """dZ = coef_p * softmax + coef_y * onehot(y); the corrupted rows' rank-1 part g_zc * onehot(y); fp64."""
    z = h.double() @ w.double().t() + b.double()
    onehot = torch.nn.functional.one_hot(y, V).double()
    dz = coef_p.double()[:, None] * (z - lse.double()[:, None]).exp() + coef_y.double()[:, None] * onehot
    dzc = g_zc.double()[:, None] * onehot
    return dz @ w.double(), dz.t() @ h.double() + dzc.t() @ hc.double(), dz.sum(0) + dzc.sum(0), dzc @ w.double()


@pytest.mark.parametrize("mode", ["split", "atomic"])
@pytest.mark.parametrize("n", [1, 3])
def test_backward_one_row_and_a_few(mode, n):
    h, w, b, y, lse, coef_p, coef_y, g_zc = _grad_args(n)
    hc = h.flip(1)
    got = triton_impl.backward(h, w, b, hc, y, lse, coef_p, coef_y, g_zc, (True, True, True, True),
                               KernelOptions(backward=mode))
    for name, gt, want in zip(("h", "w", "b", "hc"), got, _grad_oracle(h, w, b, y, lse, coef_p, coef_y, g_zc, hc),
                              strict=True):
        assert gt.dtype == torch.float32, name
        torch.testing.assert_close(gt.double(), want, rtol=1e-5, atol=1e-5, msg=name)
    gh, gw, gb = triton_impl.gather_backward(h, w, y, g_zc, (True, True, True))
    torch.testing.assert_close(gh.double(), g_zc.double()[:, None] * w.double()[y], rtol=1e-6, atol=1e-6)
    lse_f, z, zc, am = triton_impl.forward(h, w, b, hc, y, True)
    full = h.double() @ w.double().t() + b.double()
    torch.testing.assert_close(lse_f.double(), full.logsumexp(-1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(z.double(), full.gather(1, y[:, None]).squeeze(1), rtol=1e-6, atol=1e-5)
    assert am.tolist() == full.argmax(-1).tolist()


@pytest.mark.parametrize("mode", ["split", "atomic"])
def test_backward_returns_only_the_gradients_asked_for(mode):
    h, w, b, y, lse, coef_p, coef_y, g_zc = _grad_args(3)
    opts = KernelOptions(backward=mode)
    assert triton_impl.backward(h, w, b, h, y, lse, coef_p, coef_y, g_zc, (False,) * 4, opts) == (None,) * 4
    gh, gw, gb, ghc = triton_impl.backward(h, w, b, h, y, lse, coef_p, coef_y, g_zc, (False, True, False, False), opts)
    assert gh is None and gb is None and ghc is None and gw.shape == (V, D)
    gh, gw, gb, ghc = triton_impl.backward(h, w, b, h, y, lse, coef_p, coef_y, g_zc, (True, False, False, False), opts)
    assert gw is None and gb is None and ghc is None and gh.shape == (3, D)


def test_explicit_options_reach_every_launch_decision(monkeypatch):
    """`options=` (not the environment or the scope) picks the tiles, the dot precision, the TMA loads and the
    chunk budget, each for the input's dtype; the atomic backward asks for its own tiles."""
    from _spies import record_calls

    calls: list = []
    record_calls(monkeypatch, triton_impl, ["tile_config", "_dot_precision", "_tma_descriptors", "chunk_bytes"], calls)
    h, w, b, y, lse, coef_p, coef_y, g_zc = _grad_args(3)
    split = KernelOptions(tma="1", allow_tf32=True, chunk_mb=0.5)
    triton_impl.forward(h, w, b, None, y, False, options=split)
    triton_impl.backward(h, w, b, None, y, lse, coef_p, coef_y, None, (True, True, True, False), split)
    atomic = KernelOptions(backward="atomic", allow_tf32=True)
    triton_impl.backward(h, w, b, None, y, lse, coef_p, coef_y, None, (True, True, True, False), atomic)
    seen = [(name, args.get("options"), args.get("dtype"), args.get("atomic")) for name, args in calls]
    f32 = torch.float32
    assert seen == [
        ("tile_config", split, f32, False), ("_tma_descriptors", split, None, None),
        ("_dot_precision", split, f32, None),
        ("tile_config", split, f32, False), ("chunk_bytes", split, None, None), ("_tma_descriptors", split, None, None),
        ("_dot_precision", split, f32, None),
        ("tile_config", atomic, f32, True), ("_dot_precision", atomic, f32, None),
    ]
    assert [args["cfg"] for name, args in calls if name == "_tma_descriptors"] == [TileConfig(16, 32, 16, 8, 3, 4)] * 2


def test_split_chunks_of_the_budget(monkeypatch):
    """A budget under one vocabulary tile of rows is rounded up to one tile: the whole (one-tile) vocabulary in a
    single chunk, so nothing is accumulated across chunks."""
    from _spies import record_calls

    calls: list = []
    record_calls(monkeypatch, gemm, ["addmm_f32_"], calls)
    n, v = 3, 200  # block_v 256 under the interpreter: one tile
    g = torch.Generator().manual_seed(9)
    h, w, b = torch.randn(n, D, generator=g), torch.randn(v, D, generator=g), torch.randn(v, generator=g)
    y = torch.tensor([0, 150, 199])
    lse = (h.double() @ w.double().t() + b.double()).logsumexp(-1).float()
    coef_p, coef_y = -torch.ones(n), torch.ones(n)
    opts = KernelOptions(chunk_mb=n * 4 * 16 / 2**20)  # 16 columns' worth: rounded up to one tile
    gh, gw, gb, _ = triton_impl.backward(h, w, b, None, y, lse, coef_p, coef_y, None, (True, True, True, False), opts)
    assert calls == []  # one chunk: no accumulation
    z = h.double() @ w.double().t() + b.double()
    dz = -(z - lse.double()[:, None]).exp() + torch.nn.functional.one_hot(y, v).double()
    torch.testing.assert_close(gh.double(), dz @ w.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), dz.t() @ h.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb.double(), dz.sum(0), rtol=1e-5, atol=1e-5)
    # 600 columns are two 512-column tiles; a budget of 1.5 tiles of rows gives chunks of one tile (an integer width)
    w2, b2 = torch.randn(600, D, generator=g), torch.randn(600, generator=g)
    lse2 = (h.double() @ w2.double().t() + b2.double()).logsumexp(-1).float()
    opts2 = KernelOptions(chunk_mb=n * 4 * 768 / 2**20)
    gh2, gw2, _, _ = triton_impl.backward(h, w2, b2, None, y, lse2, coef_p, coef_y, None, (True, True, False, False),
                                          opts2)
    assert len(calls) == 1  # two chunks: the second one accumulates
    dz2 = -(h.double() @ w2.double().t() + b2.double() - lse2.double()[:, None]).exp() + \
        torch.nn.functional.one_hot(y, 600).double()
    torch.testing.assert_close(gh2.double(), dz2 @ w2.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw2.double(), dz2.t() @ h.double(), rtol=1e-5, atol=1e-5)


def _all_launches(h, w, b, y, lse, coef_p, coef_y, g_zc):
    outs = list(triton_impl.forward(h, w, b, h, y, True))
    outs += list(triton_impl.forward(h[:0], w, b, h[:0], y[:0], True))
    outs += [triton_impl.gather_logits(h, w, b, y)]
    outs += list(triton_impl.gather_backward(h, w, y, g_zc, (True, True, True)))
    for mode in ("split", "atomic"):
        opts = KernelOptions(backward=mode)
        outs += list(triton_impl.backward(h, w, b, h, y, lse, coef_p, coef_y, g_zc, (True,) * 4, opts))
        outs += list(triton_impl.backward(h, w, b, None, y, lse, coef_p, None, None, (True,) * 4, opts))
        outs += list(triton_impl.backward(h, w, None, h, y, lse, None, None, g_zc, (True,) * 4, opts))
    return [o for o in outs if o is not None]


def test_buffers_fp32_under_float64_default(default_float64):
    outs = _all_launches(*(t if t.dtype == torch.int64 else t.float() for t in _grad_args(3)))
    assert len(outs) == 34
    assert [o.dtype for o in outs] == [torch.float32] * 3 + [torch.int64] + [torch.float32] * 3 + [torch.int64] + \
        [torch.float32] * 26


def test_buffers_on_the_inputs_device_under_meta_default():
    args = _grad_args(3)
    with torch.device("meta"):
        outs = _all_launches(*args)
    assert len(outs) == 34 and {o.device.type for o in outs} == {"cpu"}


class _LaunchSpy:
    """Stands for a Triton kernel: `kernel[grid](*args, **kwargs)` records (grid, kwargs) and runs nothing."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, kwargs))


_KERNELS = ("token_lse_partial_kernel", "softmax_grad_kernel", "token_stats_bwd_kernel", "indexed_dot_fwd_kernel",
            "indexed_dot_bwd_kernel")


def _tiles(bn, bv, bd, warps, stages, group=None):
    t = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=warps, num_stages=stages)
    return t if group is None else {**t, "GROUP_N": group}


@pytest.mark.parametrize("compiled", [False, True], ids=["interpreter", "gpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_launch_settings_reach_the_kernels(monkeypatch, compiled, dtype):
    """Every launch's tiles, warps, stages, dot precision, TMA and interpreter flags, under the interpreter and as a
    GPU run would take them (the interpreter ignores warps and stages; spies stand for the kernels, nothing runs).
    n, v, d = 100, 300, 200: every tile is clamped by the problem in one dimension and by its cap in another."""
    if compiled:
        _gpu(monkeypatch)
    spies = {name: _LaunchSpy() for name in _KERNELS}
    for name, spy in spies.items():
        monkeypatch.setattr(triton_impl, name, spy)
    n, v, d = 100, 300, 200
    h, w, b, y = torch.zeros(n, d, dtype=dtype), torch.zeros(v, d, dtype=dtype), torch.zeros(v, dtype=dtype), \
        torch.zeros(n, dtype=torch.long)
    f = torch.zeros(n)
    tma = KernelOptions(tma="1")  # describable rows: TMA loads under the interpreter, none for CPU tensors on a GPU run
    triton_impl.forward(h, w, b, h, y, True, options=tma)
    triton_impl.backward(h, w, b, h, y, f, f, f, f, (True,) * 4, tma)
    triton_impl.backward(h, w, b, h, y, f, f, f, f, (True,) * 4, KernelOptions(backward="atomic"))
    triton_impl.gather_backward(h, w, y, f, (True, True, True))
    prec = "ieee" if dtype == torch.float32 else "tf32"
    flags = dict(DOT_PRECISION=prec, INTERPRET=not compiled)
    if not compiled:
        gemm = atomic = _tiles(64, 512, 128, 8, 3, 4)
        indexed = dict(BLOCK_N=64, BLOCK_D=128, num_warps=4)
    else:
        gemm = _tiles(64, 64, 32, 4, 3, 8) if dtype == torch.float32 else _tiles(128, 256, 64, 8, 3, 8)
        atomic = _tiles(64, 128, 64, 8, 3)
        indexed = dict(BLOCK_N=4, BLOCK_D=256, num_warps=4)  # many programs for a memory-bound gather
    atomic = {k: val for k, val in atomic.items() if k != "GROUP_N"}
    rows = -(-n // indexed["BLOCK_N"])
    tiles = -(-n // gemm["BLOCK_N"]) * -(-v // gemm["BLOCK_V"])
    (grid, sweep), = spies["token_lse_partial_kernel"].launches
    # the target logits come from the sweep itself (into a fresh fp32 vector of n), not from a gather
    assert sweep.pop("Y") is y and sweep.pop("GATHER") == 1
    zy = sweep.pop("ZY")
    assert zy.shape == (n,) and zy.dtype == torch.float32
    assert (grid, sweep) == ((tiles,), dict(HAS_BIAS=True, WANT_ARGMAX=True, **flags, USE_TMA=not compiled, **gemm))
    split = dtype != torch.float32  # a 16-bit dW that also takes the corrupted rows: target entries kept apart
    assert spies["softmax_grad_kernel"].launches == [
        ((tiles,), dict(HAS_BIAS=True, HAS_ONEHOT=True, NEED_B=True, SPLIT_TARGET=split, **flags,
                        USE_TMA=not compiled, **gemm))]
    assert spies["token_stats_bwd_kernel"].launches == [
        ((2, -(-v // atomic["BLOCK_V"])), dict(HAS_BIAS=True, NEED_H=True, NEED_W=True, NEED_B=True, FILTER=False,
                                               **flags, **atomic))]
    # the corrupted rows' gather; 16-bit: the split backward's target logits too (given none, it gathers them)
    assert spies["indexed_dot_fwd_kernel"].launches == [((rows,), dict(HAS_BIAS=True, **indexed))] * (1 + split)
    # (16-bit: the split backward's rank-1 part of dH and dH~ first), the atomic backward's one-hot part, the gather's
    assert spies["indexed_dot_bwd_kernel"].launches == [
        ((rows,), dict(HAS_SECOND=True, ACCUM_H=True, NEED_H=True, NEED_HC=True, NEED_W=False, NEED_B=False,
                       **indexed)),
    ] * split + [
        ((rows,), dict(HAS_SECOND=True, ACCUM_H=True, NEED_H=True, NEED_HC=True, NEED_W=True, NEED_B=True,
                       **indexed)),
        ((rows,), dict(HAS_SECOND=False, ACCUM_H=False, NEED_H=True, NEED_HC=False, NEED_W=True, NEED_B=True,
                       **indexed)),
    ]


def test_forward_without_argmax_returns_none():
    h, w, b, y = _inputs(3)
    lse, z, zc, am = triton_impl.forward(h, w, b, None, y, False)
    assert am is None and zc is None
    full = h.double() @ w.double().t() + b.double()
    torch.testing.assert_close(lse.double(), full.logsumexp(-1), rtol=1e-6, atol=1e-5)


def test_split_budget_of_many_tiles_is_one_whole_chunk():
    """A budget far wider than the vocabulary: one chunk of whole tiles (an integer width: the chunk loop steps by
    it) covering the 9 tiles of a 4100-column vocabulary, not a chunk of budget / tile columns."""
    n, v = 1, 4100
    g = torch.Generator().manual_seed(11)
    h, w = torch.randn(n, D, generator=g), torch.randn(v, D, generator=g)
    y = torch.tensor([v - 1])
    z = h.double() @ w.double().t()
    lse = z.logsumexp(-1).float()
    gh, gw, gb, ghc = triton_impl.backward(h, w, None, None, y, lse, -torch.ones(n), torch.ones(n), None,
                                           (True, True, False, False), KernelOptions(chunk_mb=1024.0))
    dz = -(z - lse.double()[:, None]).exp() + torch.nn.functional.one_hot(y, v).double()
    torch.testing.assert_close(gh.double(), dz @ w.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), dz.t() @ h.double(), rtol=1e-5, atol=1e-5)
    assert gb is None and ghc is None


@pytest.mark.parametrize("mode", ["split", "atomic"])
def test_corrupted_rows_without_their_gradient_add_nothing(mode):
    """corrupted_hidden given but g_zc None: the corrupted rows contribute to no gradient, and get none."""
    h, w, b, y, lse, coef_p, coef_y, _ = _grad_args(3)
    hc = h.flip(1)
    gh, gw, gb, ghc = triton_impl.backward(h, w, b, hc, y, lse, coef_p, coef_y, None, (True, True, True, True),
                                           KernelOptions(backward=mode))
    want = _grad_oracle(h, w, b, y, lse, coef_p, coef_y, torch.zeros(3), hc)
    for name, got, exp in zip(("h", "w", "b"), (gh, gw, gb), want[:3], strict=True):
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-5, msg=name)
    assert ghc is None


def test_device_guard_enters_the_tensors_cuda_device(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda dev: entered.append(dev) or "guard")
    t = torch.zeros(2).as_subclass(CudaLooking)
    assert triton_impl._device_guard(t) == "guard" and entered == [t.device]
    assert isinstance(triton_impl._device_guard(torch.zeros(2)), type(contextlib.nullcontext()))
    assert entered == [t.device]


@pytest.mark.parametrize("capability, used", [((9, 0), True), ((10, 0), True), ((8, 9), False)])
def test_tma_on_a_gpu_from_hopper_on(monkeypatch, capability, used):
    """A compiled run with `tma=auto` or `1` loads through TMA on compute capability 9 and up (the major version),
    never with `tma=0`; the capability asked for is the input's device's."""
    _gpu(monkeypatch)
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev: asked.append(dev) or capability)
    cfg = TileConfig(16, 32, 16)
    h, w = torch.randn(5, 8).as_subclass(CudaLooking), torch.randn(20, 8)
    for tma in ("auto", "1"):
        got = triton_impl._tma_descriptors(h, w, cfg, KernelOptions(tma=tma))
        assert got[2] is used
        if not used:
            assert got[0] is h and got[1] is w
    assert asked == [h.device] * 2
    assert triton_impl._tma_descriptors(h, w, cfg, KernelOptions(tma="0")) == (h, w, False)
    assert asked == [h.device] * 2  # tma=0 asks nothing


def test_gpu_tiles_never_under_16(monkeypatch):
    _gpu(monkeypatch)
    assert triton_impl.tile_config(3, 10, 5, torch.float32, options=KernelOptions()) == TileConfig(16, 16, 16, 4, 3, 8)


def test_tma_without_host_descriptors_falls_back(monkeypatch):
    """A Triton without `triton.tools.tensor_descriptor`: plain loads, and the launch is told so."""
    monkeypatch.setitem(sys.modules, "triton.tools.tensor_descriptor", None)
    h, w = torch.randn(5, 8), torch.randn(20, 8)
    assert triton_impl._tma_descriptors(h, w, TileConfig(16, 32, 16), KernelOptions(tma="1")) == (h, w, False)
