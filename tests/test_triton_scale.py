"""`triton_fused.scale_` (`kernels/scale.py`): the fused-gradient losses' backward scaling of a stored 16-bit
gradient by the fp32 `grad_output`, one kernel on CUDA where PyTorch takes three per slice.

Oracle: the same product taken by PyTorch in fp64 and rounded once into the dtype (`.to(dtype)`, round to
nearest even; the interpreter's own truncating cast is corrected by `kernels/_cast.py`)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from tpo_fast.kernels._cast import round_to
from tpo_fast.ops import fused_pairs, triton_fused
from tpo_fast.ops.options import interpreter_enabled

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's numpy, fp16 inf
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n", [0, 1, 1023, 1025, 3000])
@pytest.mark.parametrize("factor", [1 / 3, 65536.0, -2.0**-20, 2.0, 1.0])
def test_scale_is_the_fp32_product_rounded_once(dtype, n, factor):
    """1/3 is not a bf16 value, 65536 (GradScaler's scale) overflows fp16 products to inf as the exact product
    does, 2 is exact; sizes around the interpreter's 1024-element block, and none."""
    g = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype).to(DEVICE)
    want = (g.double() * factor).to(dtype)
    s = torch.tensor(factor, dtype=torch.float32, device=DEVICE)
    got = triton_fused.scale_(g, s)
    assert got is g and torch.equal(g, want)


@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_scale_of_a_slice_leaves_its_neighbours_alone(factor):
    """A gradient slice inside a larger buffer, its length not a multiple of the block: the values just past
    its end (and before its start) are not scaled, whatever the factor."""
    buf = torch.arange(1, 2051, dtype=torch.float32).bfloat16().to(DEVICE)
    before = buf.clone()
    got = triton_fused.scale_(buf[3:1028], torch.tensor(factor, device=DEVICE))
    want = before.clone()
    want[3:1028] = (before[3:1028].double() * factor).bfloat16()
    assert got.data_ptr() == buf[3:].data_ptr() and torch.equal(buf, want)


def test_scale_by_exactly_one_writes_nothing():
    """A factor of exactly 1 reads and writes nothing: a signalling NaN keeps its payload bit for bit, which a
    read and a rounded write back would quieten (bf16 0x7F81 -> 0x7FC1), at the first element and elsewhere."""
    bits = torch.full((3000,), 0x3F80, dtype=torch.int16)  # 1.0
    bits[[0, 1, 1024, 2999]] = 0x7F81
    g = bits.view(torch.bfloat16).to(DEVICE, copy=True)
    triton_fused.scale_(g, torch.tensor(1.0, device=DEVICE))
    assert torch.equal(g.cpu().view(torch.int16), bits)
    triton_fused.scale_(g, torch.tensor(2.0, device=DEVICE))  # any other factor does read and write
    assert int(g.cpu().view(torch.int16)[0]) != 0x7F81 and bool(g[0].isnan()) and float(g[2]) == 2.0


def test_scale_refuses_what_it_cannot_scale_in_place():
    with pytest.raises(ValueError, match=r"scale_ takes a contiguous 16-bit tensor, got torch.float32"):
        triton_fused.scale_(torch.ones(4), torch.tensor(2.0))
    with pytest.raises(ValueError, match=r"contiguous=False"):
        triton_fused.scale_(torch.ones(4, 4, dtype=torch.bfloat16).t(), torch.tensor(2.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel path of the losses' backward is CUDA's")
def test_stored_16bit_gradients_scale_with_the_kernel_on_cuda(monkeypatch):
    """A stored 16-bit dW of the triton backend is scaled by `scale_` on CUDA: one kernel for the V x D tensor;
    other backends' gradients never need Triton there."""
    calls = []
    original = triton_fused.scale_
    monkeypatch.setattr(triton_fused, "scale_", lambda g, s: calls.append(g.shape) or original(g, s))
    g = torch.randn(300, 64, device="cuda").bfloat16()
    want = (g.double() * 0.3).bfloat16()
    out = fused_pairs.StoredGrad(g, torch.bfloat16, triton_kernel=True).scaled(torch.tensor(0.3, device="cuda"))
    assert calls == [torch.Size([300, 64])] and torch.equal(out, want)
    other = torch.randn(300, 64, device="cuda").bfloat16()  # another backend's 16-bit gradient: no Triton
    fused_pairs.StoredGrad(other, torch.bfloat16).scaled(torch.tensor(0.3, device="cuda"))
    assert len(calls) == 1


@triton.jit
def _store_rounded(X, Y, N, INTERPRET: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(Y + offs, round_to(tl.load(X + offs, mask=mask), Y.dtype.element_ty, INTERPRET), mask=mask)


def test_round_to_bf16_matches_torch_bit_for_bit():
    """`kernels/_cast.py::round_to` on random fp32 bit patterns and the edges: ties to even, carries into the
    exponent and to inf, subnormals, -0, inf, NaN with a payload only in the low bits (stays NaN)."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (20000,), generator=g).to(torch.int32)
    edges = torch.tensor([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x00018000, 0x00020000, 0x806D9E98, 0x7F800001,
                          0x7F800000, -0x80000000, 0], dtype=torch.int64).to(torch.int32)
    x = torch.cat([bits, edges]).view(torch.float32).to(DEVICE)
    y = torch.empty(x.numel(), dtype=torch.bfloat16, device=DEVICE)
    _store_rounded[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), INTERPRET=interpreter_enabled(), BLOCK=1024)
    want = x.bfloat16()
    same = (y.view(torch.int16) == want.view(torch.int16)) | (y.isnan() & want.isnan())
    assert bool(same.all()), x[~same][:5]
