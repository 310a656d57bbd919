"""Review findings on the loss layer and the fused-gradient path, each against an oracle.

1. The fused backward scales the gradients stored in the forward in fp32 and casts once, so a 16-bit
   input gets exactly `(fp32 gradient * grad_output).to(dtype)` (GradScaler's 65536 no longer
   overflows fp16, grad_output 1/3 is no longer bf16(1/3), tiny fp16 gradients no longer flush to 0),
   wherever the GEMMs run in fp32 (the torch backend on a CPU without bf16 units; with them, bf16 inputs'
   gradient GEMMs round dZ to bf16, as the Triton backend's do, and are held to its bound).
2. POVID with a non-negative ignore_index (a pad id): a noisy argmax equal to it is scored like any token.
3. An autocast region changes nothing the primitives, the in-step reference or the recompute path compute.
4. weighting="none": a non-finite corrupted row (metrics only) does not reach dW / db on the fused path.
5. fused_pair_loss rejects non-integer second targets; reference tensors on another device are refused
   with a message that says so.

Oracles: tests/loss_reference.py and tests/methods_reference.py (full fp32 logits, plain autograd), and the
`reference` backend with `grad_mode="recompute"`. Shapes are tiny: Triton runs under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import pytest
import torch
from _device import backend_device
from loss_reference import reference_loss
from methods_reference import dpo_losses, logits_of, povid_scores

from tpo_fast.loss import (
    dpo_loss,
    povid_loss,
    povid_sequence_scores,
    preference_loss_from_sequence_scores,
    reference_sequence_scores,
    tpo_loss,
    tpo_loss_from_logprobs,
)
from tpo_fast.ops import target_logits, token_stats, torch_chunked
from tpo_fast.ops.fused_pairs import StoredGrad, _run, _Spec, fused_pair_loss, take_stored_grads

B, T, D, V = 2, 5, 8, 13
IGNORE = -100
KEYS = ("weight", "bias", "hidden", "corrupted_hidden")


def batch(dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 1.0) -> dict:
    """Policy tensors (leaves in `dtype`, values exactly representable in it), (2B, T) targets with prompts."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape: int, s: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * s * scale).to(dtype).requires_grad_()

    targets = torch.randint(0, V, (2 * B, T), generator=g)
    for i, (a, z) in enumerate([(1, 5), (2, 3), (0, 5), (4, 4)]):  # [start, stop) of each response
        targets[i, :a] = IGNORE
        targets[i, z:] = IGNORE
    return dict(weight=leaf(V, D, s=0.5), bias=leaf(V, s=0.3), hidden=leaf(2 * B, T, D),
                corrupted_hidden=leaf(2 * B, T, D), targets=targets,
                ref_seq_scores=torch.randn(2 * B, generator=g) * 2)


def as_dtype(b: dict, dtype: torch.dtype) -> dict:
    """The same batch with its leaves cast to `dtype` (fresh leaves)."""
    out = dict(b)
    for k in KEYS:
        out[k] = b[k].detach().to(dtype).requires_grad_()
    return out


def tpo_grads(b: dict, grad_output: float, **kw) -> dict[str, torch.Tensor]:
    """Gradients of `tpo_loss` on `b`'s leaves with the given upstream gradient (`grad_outputs`); the batch's
    ref_seq_scores unless `reference_free=True`."""
    ref = {} if kw.get("reference_free") else {"ref_seq_scores": b["ref_seq_scores"]}
    out = tpo_loss(b["weight"], b["hidden"], b["corrupted_hidden"], b["targets"], b["bias"], **ref, **kw)
    grads = torch.autograd.grad(out.loss, [b[k] for k in KEYS], torch.tensor(grad_output))
    return dict(zip(KEYS, grads, strict=True))


# ---------------------------------------------------------------------------------------------------------
# 1. 16-bit gradients: fp32 gradient times grad_output, cast once.

SCALED = [
    (torch.float16, 65536.0, 0.1),  # GradScaler's initial scale: above fp16's max before the fix
    (torch.float16, 32768.0, 3e-7),  # tiny gradients that fp16 flushed to 0 before the loss scale applied
    (torch.bfloat16, 1.0 / 3.0, 0.1),  # loss / gradient_accumulation_steps: was bf16(1/3) = 0.333984
]


@pytest.fixture
def no_bf16_units(monkeypatch):
    """The torch backend's GEMMs in fp32 on every host (a CPU with bf16 units runs bf16 inputs' GEMMs on them)."""
    monkeypatch.setattr(torch_chunked, "cpu_has_bf16_units", lambda: False)


@pytest.mark.parametrize(("dtype", "grad_output", "beta"), SCALED, ids=["fp16-65536", "fp16-tiny", "bf16-third"])
def test_fused_16bit_gradients_equal_the_fp32_ones_scaled_then_cast(no_bf16_units, dtype, grad_output, beta):
    """The torch backend computes the fp32 gradient of a 16-bit input from the same fp32 values as for its
    fp32 copy; the 16-bit result must be that fp32 gradient times grad_output, rounded once: bit for bit."""
    b16 = batch(dtype)
    b32 = as_dtype(b16, torch.float32)
    g16 = tpo_grads(b16, grad_output, beta=beta, backend="torch")
    g32 = tpo_grads(b32, grad_output, beta=beta, backend="torch")
    for k in KEYS:
        assert g16[k].dtype == dtype
        assert torch.isfinite(g16[k]).all(), k
        assert torch.equal(g16[k], g32[k].to(dtype)), f"{k}: {(g16[k].float() - g32[k]).abs().max().item():.3g}"


@pytest.mark.parametrize(("backend", "units", "dtype", "grad_output", "beta"), [
    *[("torch", False, *case) for case in SCALED],
    ("torch", True, *SCALED[2]),  # bf16 on a CPU with bf16 units: bf16 gradient GEMMs
    ("triton", False, *SCALED[0]),
    ("triton", False, *SCALED[1]),  # fp16 on triton: the losses take the recomputing path (`uses_fused_gradient`)
    ("triton", False, *SCALED[2]),
], ids=["torch-fp16-65536", "torch-fp16-tiny", "torch-bf16-third", "torch-bf16-third-bf16-units", "triton-fp16-65536",
        "triton-fp16-tiny", "triton-bf16-third"])
def test_fused_16bit_gradients_against_the_fp32_oracle(monkeypatch, backend, units, dtype, grad_output, beta):
    """Against the full-logits oracle (tests/loss_reference.py) on the fp32 copy of the 16-bit inputs:
    `(oracle gradient * grad_output).to(dtype)`, within one rounding of the dtype (the torch backend's fp32
    GEMMs) or of the 16-bit dZ that the Triton backend, and the torch backend's bf16 GEMMs on a CPU with bf16
    units, feed their GEMMs (a relative 2^-7 of the largest element)."""
    monkeypatch.setattr(torch_chunked, "cpu_has_bf16_units", lambda: units)
    b16 = batch(dtype)
    b16 = {k: (v.to(backend_device(backend)) if isinstance(v, torch.Tensor) else v) for k, v in b16.items()}
    for k in KEYS:
        b16[k] = b16[k].detach().requires_grad_()
    b32 = as_dtype(b16, torch.float32)
    g16 = tpo_grads(b16, grad_output, beta=beta, backend=backend, reference_free=True)
    oracle, _ = reference_loss(b32["weight"], b32["hidden"], b32["corrupted_hidden"], b32["targets"], b32["bias"],
                               beta=beta, reference_free=True)
    g32 = torch.autograd.grad(oracle, [b32[k] for k in KEYS], torch.tensor(grad_output))
    eps = torch.finfo(dtype).eps
    for k, ref in zip(KEYS, g32, strict=True):
        expected = ref.to(dtype).float()  # the fp32 oracle's gradient at grad_output, cast once
        got = g16[k].float()
        assert torch.isfinite(got).all(), k
        if backend == "torch" and not units:
            tol = eps * expected.abs() + 2 * torch.finfo(dtype).smallest_normal * eps
            assert ((got - expected).abs() <= tol).all(), f"{k}: {(got - expected).abs().max().item():.3g}"
        else:
            err = (got - expected).abs().max().item()
            assert err <= 2**-7 * expected.abs().max().item(), f"{k}: {err:.3g}"


def test_fp16_on_triton_takes_the_recomputing_path(monkeypatch, caplog):
    """The Triton fused path feeds its GEMMs a 16-bit dZ formed at grad_output = 1, so fp16 loses the small
    gradients a loss scale exists to keep: `grad_mode="fused"` runs the recomputing path there (logged once), and
    everywhere else (torch backend, bf16, fp32) the fused one; the reference backend never fuses."""
    import logging

    from tpo_fast.ops import fused_pairs

    monkeypatch.setattr(fused_pairs, "_ANNOUNCED", set())
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="tpo_fast"):
        assert not fused_pairs.uses_fused_gradient("fused", "triton", cpu, torch.float16)
        assert not fused_pairs.uses_fused_gradient("fused", "triton", cpu, torch.float16)
    assert [r.message for r in caplog.records].count(
        "tpo_fast: fp16 on the triton backend computes the loss's gradient in backward (grad_mode='recompute'): "
        "the fused path's 16-bit dZ would be rounded before the loss scale") == 1
    assert fused_pairs.uses_fused_gradient("fused", "triton", cpu, torch.bfloat16)
    assert fused_pairs.uses_fused_gradient("fused", "triton", cpu, torch.float32)
    assert fused_pairs.uses_fused_gradient("fused", "torch", cpu, torch.float16)
    assert not fused_pairs.uses_fused_gradient("fused", "reference", cpu, torch.float32)
    assert not fused_pairs.uses_fused_gradient("recompute", "torch", cpu, torch.float32)
    # and the losses follow it: no fused pair loss runs for fp16 on triton
    calls = []
    real = fused_pairs.fused_pair_loss
    monkeypatch.setattr("tpo_fast.loss.tpo.fused_pair_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    tpo_grads(batch(torch.float16), 1.0, backend="triton")
    assert calls == []
    tpo_grads(batch(torch.bfloat16), 1.0, backend="triton")
    assert calls == [1]


@pytest.mark.parametrize(("dtype", "grad_output"), [(torch.float16, 65536.0), (torch.bfloat16, 1.0 / 3.0)])
def test_plain_stored_gradients_are_scaled_in_fp32(dtype, grad_output):
    """`take_stored_grads` on plain 16-bit tensors (the trainer's ZeRO-3 path stores those): the product is
    taken in fp32 and rounded once, never with grad_output rounded to the dtype or overflowing it."""

    class Ctx:
        grads = None

    g = (torch.randn(2, 32, generator=torch.Generator().manual_seed(1)) * 0.25).to(dtype)
    expected = (g.float() * grad_output).to(dtype)
    ctx = Ctx()
    ctx.grads = [g.clone(), None, StoredGrad(g.float(), dtype, torch.tensor([3, 0]), 5)]
    with torch.no_grad():  # as autograd runs a backward without create_graph
        plain, none, rows = take_stored_grads(ctx, torch.tensor(grad_output))
    assert none is None and ctx.grads is None
    assert torch.equal(plain, expected)
    assert rows.shape == (5, 32) and rows.dtype == dtype
    assert torch.equal(rows[3], expected[0]) and torch.equal(rows[0], expected[1]) and not rows[[1, 2, 4]].any()


def test_stored_activation_gradients_are_fp32_target_rows_only():
    """The memory choice: dH and dH~ of 16-bit inputs are kept as fp32 rows of the target-carrying tokens
    only (R x D), dW and db of the torch backend as the fp32 accumulators; all cast once in backward."""
    b = batch(torch.bfloat16)
    h, hc = b["hidden"].detach().flatten(0, 1), b["corrupted_hidden"].detach().flatten(0, 1)
    spec = _Spec(b["targets"], None, lambda c: c.logprobs.sum(), IGNORE, IGNORE, "torch", 1 << 20)
    _, _, (gh, gw, gb, ghc) = _run(spec, h, b["weight"].detach(), b["bias"].detach(), hc, (True, True, True, True))
    n_valid = int((b["targets"] != IGNORE).sum())
    assert gh.value.shape == ghc.value.shape == (n_valid, D) and gh.value.dtype == torch.float32
    valid_rows = (b["targets"] != IGNORE).flatten().nonzero().flatten().tolist()
    assert gh.rows is ghc.rows and sorted(gh.rows.tolist()) == valid_rows
    assert gw.value.dtype == gb.value.dtype == torch.float32 and gw.dtype == torch.bfloat16



@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_16bit_row_gradients_are_written_where_they_are_stored(monkeypatch, backend):
    """dH and dH~ of each chunk land in their slice of the stored fp32 rows straight from the GEMM and the
    gather's product: no chunk-sized temporary and no copy (R x D x 4 bytes each, per chunk). Three chunks."""
    from tpo_fast.ops import fused_chunk

    b = batch(torch.bfloat16)
    h, hc = b["hidden"].detach().flatten(0, 1), b["corrupted_hidden"].detach().flatten(0, 1)
    core = fused_chunk.TritonChunk if backend == "triton" else fused_chunk.TorchChunk
    written = []
    for name in ("backprop", "gather_backward"):
        original = getattr(core, name)

        def spy(self, *args, _original=original, _name=name):
            out = _original(self, *args)
            written.append((_name, out.data_ptr(), out.shape[0]))
            return out

        monkeypatch.setattr(core, name, spy)
    spec = _Spec(b["targets"], None, lambda c: c.logprobs.sum() + c.corrupted_target_logits.sum(), IGNORE, IGNORE,
                 backend, 5 * 4 * V)
    _, _, (gh, _, _, ghc) = _run(spec, h, b["weight"].detach(), b["bias"].detach(), hc, (True, True, True, True))
    row_bytes = gh.value.stride(0) * 4
    for name, g in (("backprop", gh.value), ("gather_backward", ghc.value)):
        starts = [(ptr - g.data_ptr()) // row_bytes for n, ptr, _ in written if n == name]
        sizes = [rows for n, _, rows in written if n == name]
        assert len(starts) >= 2 and starts == [sum(sizes[:i]) for i in range(len(sizes))], (name, starts, sizes)


# ---------------------------------------------------------------------------------------------------------
# 2. POVID with ignore_index >= 0: the noisy argmax may be that token id.

PAD = 0


def povid_batch() -> dict:
    """ignore_index 0 (a pad id): token 0 dominates the corrupted logits of 3 chosen response tokens."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(V, D, generator=g) * 0.3
    w[0] = 0.0
    w[0, 0] = 4.0
    bias = torch.randn(V, generator=g) * 0.1
    h = torch.randn(2 * B, T, D, generator=g)
    hc = torch.randn(B, T, D, generator=g) * 0.3
    hc[0, 1, 0] = hc[0, 2, 0] = hc[1, 3, 0] = 3.0
    y = torch.randint(1, V, (2 * B, T), generator=g)
    y[:, 0] = PAD
    y[1, 4] = PAD
    y[3, 3:] = PAD
    return dict(w=w.requires_grad_(), bias=bias.requires_grad_(), h=h.requires_grad_(), hc=hc, y=y)


@pytest.mark.parametrize(("grad_mode", "backend"),
                         [("fused", "torch"), ("fused", "triton"), ("recompute", "torch"),
                          ("recompute", "reference")])
def test_povid_noisy_argmax_equal_to_a_nonnegative_ignore_index(grad_mode, backend):
    b = povid_batch()
    am = logits_of(b["hc"], b["w"], b["bias"]).argmax(-1)
    chosen_valid = b["y"][:B] != PAD
    assert int(((am == PAD) & chosen_valid).sum()) >= 2  # the case under test does occur
    s_w, s_l, s_n = povid_scores(b["h"], b["hc"], b["y"], b["w"], b["bias"], ignore_index=PAD)
    noisy, _, _ = dpo_losses(s_w, s_n, 0, 0, 0.1)
    halluc, _, _ = dpo_losses(s_w, s_l, 0, 0, 0.1)
    want = (0.5 * noisy + 0.5 * halluc).mean()
    ins = [b["w"], b["bias"], b["h"]]
    out = povid_loss(b["w"], b["h"], b["hc"], b["y"], b["bias"], reference_free=True, ignore_index=PAD,
                     backend=backend, grad_mode=grad_mode)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["logps/noisy"], s_n.detach().mean(), rtol=1e-5, atol=1e-5)
    match = ((am == b["y"][:B]) & chosen_valid).sum() / chosen_valid.sum()
    torch.testing.assert_close(out.metrics["noisy/argmax_match"], match.float())
    for got, exp, name in zip(torch.autograd.grad(out.loss, ins), torch.autograd.grad(want, ins), "wbh", strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=2e-6, msg=name)


def test_povid_sequence_scores_and_argmax_grid_with_ignore_index_zero():
    b = povid_batch()
    scores, extras = povid_sequence_scores(b["w"], b["h"], b["hc"], b["y"], b["bias"], ignore_index=PAD,
                                           backend="torch")
    torch.testing.assert_close(scores, torch.cat(povid_scores(b["h"], b["hc"], b["y"], b["w"], b["bias"],
                                                              ignore_index=PAD)), rtol=1e-5, atol=1e-5)
    am = logits_of(b["hc"], b["w"], b["bias"]).argmax(-1)
    assert torch.equal(extras["argmax"], am.masked_fill(b["y"][:B] == PAD, -1))


def test_fused_pair_loss_second_ignore_index():
    """A second target equal to a non-negative ignore_index is scored when `second_ignore_index` says
    another value marks the rows without one."""
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(2 * 3, D, generator=g), torch.randn(V, D, generator=g)
    y = torch.tensor([[1, 0, 2], [3, 4, 0]])
    y2 = torch.tensor([[0, 5, -1], [-1, -1, -1]])
    out = fused_pair_loss(h, w, y, lambda c: c.second_logprobs.sum(), second_targets=y2, ignore_index=0,
                          second_ignore_index=-1, backend="torch")
    ls = torch.log_softmax(h @ w.t(), -1)
    want = torch.zeros(2, 3)
    want[0, 0] = ls[0, 0]  # (0, 1): its target is ignored; (0, 2) and the rejected row: no second target
    torch.testing.assert_close(out.second_logprobs, want)
    torch.testing.assert_close(out.loss, ls[0, 0])


# ---------------------------------------------------------------------------------------------------------
# 3. Autocast regions change nothing.

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


def _stats_and_grads(backend: str, inside: bool):
    b = batch(seed=5)
    ins = [b["hidden"], b["weight"], b["bias"], b["corrupted_hidden"]]
    flat = [b["hidden"].flatten(0, 1), b["weight"], b["targets"].flatten()]
    with torch.autocast(**AUTOCAST, enabled=inside):
        st = token_stats(*flat, bias=b["bias"], corrupted_hidden=b["corrupted_hidden"].flatten(0, 1),
                         return_argmax=True, backend=backend)
        z = target_logits(*flat, bias=b["bias"], backend=backend)
    s = st.target_logits - st.corrupted_target_logits
    loss = (st.logprobs * 0.7).sum() + st.lse.sum() * 0.1 + s.sum() + z.sum()
    # the hand-written backwards run under the caller's region too; the reference backend's plain autograd
    # follows autocast in backward like any PyTorch graph, so its backward runs outside
    with torch.autocast(**AUTOCAST, enabled=inside and backend != "reference"):
        grads = torch.autograd.grad(loss, ins)
    return [*st, z], grads


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_primitives_ignore_autocast(backend):
    plain, g_plain = _stats_and_grads(backend, inside=False)
    auto, g_auto = _stats_and_grads(backend, inside=True)
    for a, p in zip(auto, plain, strict=True):
        assert a.dtype == p.dtype and torch.equal(a, p)
    for a, p in zip(g_auto, g_plain, strict=True):
        assert torch.equal(a, p)


def test_in_step_reference_and_recompute_ignore_autocast():
    b = batch(seed=6)
    w, h, hc, y = b["weight"], b["hidden"], b["corrupted_hidden"], b["targets"]
    rh, rhc = h.detach() * 0.8, hc.detach() * 1.1

    def losses():
        out = [reference_sequence_scores(w, rh, rhc, y, backend="torch"),
               reference_sequence_scores(w, rh, rhc, y, backend="reference")]
        for gm in ("fused", "recompute"):
            out.append(tpo_loss(w, h, hc, y, ref_hidden=rh, ref_corrupted_hidden=rhc, backend="torch",
                                grad_mode=gm).loss)
            out.append(povid_loss(w, h, hc[:B], y, ref_hidden=rh, ref_corrupted_hidden=rhc[:B], backend="torch",
                                  grad_mode=gm).loss)
        return out

    plain = losses()
    with torch.autocast(**AUTOCAST):
        auto = losses()
    for i, (a, p) in enumerate(zip(auto, plain, strict=True)):
        assert torch.equal(a, p), f"case {i}: {a} vs {p}"


# ---------------------------------------------------------------------------------------------------------
# 4. weighting="none": the corrupted branch only feeds metrics.


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nonfinite_corrupted_row_does_not_reach_gradients_without_weighting(backend):
    b = batch(seed=7)
    with torch.no_grad():
        b["corrupted_hidden"][0, 2, 0] = float("inf")  # a response token (targets[0, 2] is valid)
    assert b["targets"][0, 2] != IGNORE
    ins = [b["weight"], b["bias"], b["hidden"]]

    def grads(**kw):
        out = tpo_loss(b["weight"], b["hidden"], b["corrupted_hidden"], b["targets"], b["bias"],
                       ref_seq_scores=b["ref_seq_scores"], weighting="none", **kw)
        return torch.autograd.grad(out.loss, ins)

    got, want = grads(backend=backend), grads(backend="reference", grad_mode="recompute")
    for g, r, name in zip(got, want, ("weight", "bias", "hidden"), strict=True):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, r, rtol=1e-4, atol=2e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------
# 5. Argument checks.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_second_targets_must_be_integer(dtype):
    h, w = torch.randn(2, 4), torch.randn(7, 4)
    y = torch.tensor([[1], [2]])
    with pytest.raises(TypeError, match=r"second_targets must be an integer tensor \(int64\) of shape \(2B, T\) = "
                                        r"\(2, 1\), got (float32|bool) of shape \(2, 1\)"):
        fused_pair_loss(h, w, y, lambda c: c.second_logprobs.sum(), second_targets=y.to(dtype), backend="torch")


def test_precomputed_reference_on_another_device_is_refused():
    """Inputs on the CPU, reference tensors on `meta` (any other device): a ValueError naming both."""
    b = batch(seed=8)
    msg = "ref_seq_scores is on meta but the loss inputs are on cpu; move it there first"
    meta2 = torch.zeros(2 * B, device="meta")
    for gm in ("fused", "recompute"):
        with pytest.raises(ValueError, match=msg):
            tpo_loss(b["weight"], b["hidden"], b["corrupted_hidden"], b["targets"], ref_seq_scores=meta2, grad_mode=gm)
        with pytest.raises(ValueError, match=msg):
            dpo_loss(b["weight"], b["hidden"], b["targets"], ref_seq_scores=meta2, grad_mode=gm)
        with pytest.raises(ValueError, match=msg):
            povid_loss(b["weight"], b["hidden"], b["corrupted_hidden"][:B], b["targets"],
                       ref_seq_scores=torch.zeros(3 * B, device="meta"), grad_mode=gm)
    with pytest.raises(ValueError, match=msg):
        preference_loss_from_sequence_scores(torch.zeros(2 * B), meta2)
    with pytest.raises(ValueError, match="ref_logprobs is on meta but the loss inputs are on cpu"):
        tpo_loss_from_logprobs(torch.zeros(2 * B, T), None, torch.ones(2 * B, T, dtype=torch.bool),
                               torch.zeros(2 * B, T, device="meta"), weighting="none")


# ---------------------------------------------------------------------------------------------------------
# 6. The public API's edges (a second review).


def test_pair_losses_refuses_an_unknown_loss_type_and_a_nonpositive_beta():
    """`pair_losses` is exported: a typo in loss_type used to run IPO silently, beta=0 a bare ZeroDivisionError."""
    from tpo_fast.loss import pair_losses

    p, r = torch.tensor([1.0, 2.0, 0.5, 0.1]), torch.zeros(4)
    with pytest.raises(ValueError, match="loss_type must be 'sigmoid', 'hinge' or 'ipo', got 'hinged'"):
        pair_losses(p, r, 0.3, "hinged")
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        pair_losses(p, r, 0.0, "ipo")
    x = torch.tensor([0.5, 1.9])  # chosen minus rejected margins
    torch.testing.assert_close(pair_losses(p, r, 0.3, "ipo"), (x - 1 / 0.6) ** 2)
    torch.testing.assert_close(pair_losses(p, r, 0.3, "hinge"), torch.relu(1 - 0.3 * x))


def test_token_pg_loss_edges():
    """kl_coef=0 makes the KL a metric only (an infinite k3 used to give 0 * inf = NaN); the clip and KL options
    take any real scalar like the other losses' options; seq_mean averages over the sequences that have tokens."""
    from tpo_fast.loss import token_pg_loss

    g = torch.Generator().manual_seed(0)
    w, h = torch.randn(11, 6, generator=g), torch.randn(3, 4, 6, generator=g, requires_grad=True)
    y = torch.randint(0, 11, (3, 4), generator=g)
    adv = torch.randn(3, 4, generator=g)
    ref = torch.zeros(3, 4)
    ref[0, 2] = 200.0  # ref - logp far above 88: k3 = exp(...) is inf
    out = token_pg_loss(w, h, y, advantages=adv, ref_logprobs=ref, kl_coef=0, backend="torch")
    plain = token_pg_loss(w, h, y, advantages=adv, kl_coef=0.0, backend="torch")
    assert torch.isfinite(out.loss) and out.loss.item() == plain.loss.item()
    import numpy as np

    a = token_pg_loss(w, h, y, advantages=adv, ref_logprobs=torch.zeros(3, 4), clip_eps=np.float32(0.25),
                      kl_coef=torch.tensor(0.05), backend="torch").loss
    b = token_pg_loss(w, h, y, advantages=adv, ref_logprobs=torch.zeros(3, 4), clip_eps=0.25, kl_coef=0.05,
                      backend="torch").loss
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    with pytest.raises(TypeError, match="kl_coef must be a real number"):
        token_pg_loss(w, h, y, advantages=adv, kl_coef=True, backend="torch")
    with pytest.raises(TypeError, match="advantages must be a torch.Tensor, got NoneType"):
        token_pg_loss(w, h, y, advantages=None, kl_coef=0.0, backend="torch")
    # an empty third sequence does not dilute seq_mean: the mean of the other two sequences' token means
    y_empty = y.clone()
    y_empty[2] = -100
    two = token_pg_loss(w, h[:2], y[:2], advantages=adv[:2], kl_coef=0.0, aggregation="seq_mean", backend="torch")
    three = token_pg_loss(w, h, y_empty, advantages=adv, kl_coef=0.0, aggregation="seq_mean", backend="torch")
    assert three.loss.item() == pytest.approx(two.loss.item(), rel=1e-6)


def test_losses_name_an_argument_of_the_wrong_type():
    b = batch()
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got list"):
        tpo_loss(b["weight"].tolist(), b["hidden"], b["corrupted_hidden"], b["targets"], reference_free=True)
    with pytest.raises(TypeError, match="ref_weight must be a torch.Tensor, got list"):
        dpo_loss(b["weight"], b["hidden"], b["targets"], ref_hidden=b["hidden"], ref_weight=[1.0])
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got list"):
        povid_loss([1.0], b["hidden"], b["corrupted_hidden"], b["targets"], reference_free=True)


def test_module_repr_shows_every_option():
    from tpo_fast.loss import DPOLoss, TPOLoss

    text = repr(TPOLoss(label_smoothing=0.1, reference_free=True, average_log_prob=True, ignore_index=0))
    assert "label_smoothing=0.1, reference_free=True, average_log_prob=True, ignore_index=0" in text
    text = repr(DPOLoss(label_smoothing=0.2, ignore_index=-1))
    assert "label_smoothing=0.2" in text and "ignore_index=-1" in text
