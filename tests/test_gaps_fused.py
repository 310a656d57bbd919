"""`fused_pair_loss` edges that mutation testing found unguarded (docs/testing.md): chunk planning at its
boundaries, a second target equal to token 0, a frozen hidden state with a trainable weight, no input
requiring grad with grad mode on, which backend's core runs, and the input errors with their messages.

The oracle materializes the logits (`h @ W.T + b`), takes `log_softmax` and `gather`, builds the (2B, T)
grids itself and differentiates the same per-pair loss with autograd: it shares no code with the fused path.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from _device import backend_device, moved

from tpo_fast.ops import fused_chunk
from tpo_fast.ops.fused_pairs import PairChunk, fused_pair_loss, plan_chunks

B, T, D, V = 3, 5, 8, 23
IGNORE = -100


def pair_loss(logp, z, zc, logp2, mask):
    """A per-pair loss that uses every grid: softplus of the chosen-minus-rejected score, summed over pairs."""
    s = logp + 0.3 * z * mask
    if zc is not None:
        s = s + 0.2 * zc * mask
    if logp2 is not None:
        s = s + 0.5 * logp2
    s = s.sum(-1)
    p = s.shape[0] // 2
    return F.softplus(s[:p] - s[p:]).sum()


def chunk_loss(c: PairChunk) -> torch.Tensor:
    return pair_loss(c.logprobs, c.target_logits, c.corrupted_target_logits, c.second_logprobs, c.mask)


def oracle(h, w, b, hc, y, y2=None):
    """The loss from materialized logits, and its grids; differentiable by autograd."""
    logits = h.reshape(-1, D).float() @ w.float().t() + (0 if b is None else b.float())
    flat = y.reshape(-1)
    mask = (flat != IGNORE)
    safe = flat.clamp(min=0)
    logp = logits.log_softmax(-1).gather(1, safe[:, None]).squeeze(1) * mask
    z = logits.gather(1, safe[:, None]).squeeze(1) * mask
    zc = None
    if hc is not None:
        zc = ((hc.reshape(-1, D).float() * w.float()[safe]).sum(-1) + (0 if b is None else b.float()[safe])) * mask
        zc = zc.view(y.shape)
    logp2 = None
    if y2 is not None:
        f2 = y2.reshape(-1)
        logp2 = logits.log_softmax(-1).gather(1, f2.clamp(min=0)[:, None]).squeeze(1) * (f2 != IGNORE)
        logp2 = logp2.view(y.shape)
    m = mask.view(y.shape).float()
    return pair_loss(logp.view(y.shape), z.view(y.shape), zc, logp2, m)


def inputs(seed=0, bias=True, grad=("h", "w", "b", "hc")):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (2 * B, T), generator=g)
    for i, (a, e) in enumerate([(0, 4), (1, 5), (2, 3), (0, 2), (1, 4), (0, 5)]):
        y[i, :a] = IGNORE
        y[i, e:] = IGNORE
    t = dict(h=torch.randn(2 * B * T, D, generator=g), w=torch.randn(V, D, generator=g) * 0.5,
             b=torch.randn(V, generator=g) * 0.3 if bias else None, hc=torch.randn(2 * B * T, D, generator=g))
    for k, v in t.items():
        if v is not None and k in grad:
            v.requires_grad_()
    return t, y


def check(t, y, y2=None, backend="torch", chunk_bytes=None):
    out = fused_pair_loss(t["h"], t["w"], y, chunk_loss, t["b"], t["hc"], y2, backend=backend,
                          chunk_bytes=chunk_bytes)
    want = oracle(t["h"], t["w"], t["b"], t["hc"], y, y2)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-5)
    wanted = {k: v for k, v in t.items() if v is not None and v.requires_grad}
    if wanted:
        got = torch.autograd.grad(out.loss, list(wanted.values()))
        exp = torch.autograd.grad(want, list(wanted.values()))
        for name, a, e in zip(wanted, got, exp, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=name)
    return out


def test_plan_chunks_at_the_budget_boundary():
    assert plan_chunks([3, 2, 4, 1], 5) == [(0, 2), (2, 4)]  # 3 + 2 = 5 fits exactly; 4 + 1 as well
    assert plan_chunks([2, 2, 2], 5) == [(0, 2), (2, 3)]  # the running count, not the last pair alone
    assert plan_chunks([6, 1], 5) == [(0, 1), (1, 2)]  # a pair over the budget goes alone
    assert plan_chunks([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert plan_chunks([4], 1) == [(0, 1)]


@pytest.mark.parametrize("chunk_bytes", [None, 1, 4 * V * 9])
def test_second_target_token_zero_is_scored(chunk_bytes):
    """A second target equal to token id 0 (POVID's noisy argmax can be token 0) is a target, not an ignore."""
    t, y = inputs(1)
    y2 = torch.full_like(y, IGNORE)
    valid = y != IGNORE
    y2[valid] = 0
    y2[0, 1] = 7
    out = check(t, y, y2, chunk_bytes=chunk_bytes)
    assert (out.second_logprobs[y2 == 0] != 0).all()  # log p(token 0) is never exactly 0 here


@pytest.mark.parametrize("corrupted", [True, False])
def test_frozen_hidden_states_with_a_trainable_weight(corrupted):
    """Only the weight needs grad (no bias): the clean and corrupted branches still add their dW."""
    t, y = inputs(2, bias=False, grad=("w",))
    if not corrupted:
        t["hc"] = None
    check(t, y, chunk_bytes=4 * V * 8)


def test_no_gradient_work_when_no_input_requires_grad(monkeypatch):
    """Grad mode on but nothing requires grad (bias None, so a None input is among them): no gradient GEMM,
    no gradient gather, a loss without graph."""
    calls = []
    for name in ("backprop", "gather_backward", "logit_grad"):
        original = getattr(fused_chunk.TorchChunk, name)
        monkeypatch.setattr(fused_chunk.TorchChunk, name,
                            lambda self, *a, _o=original, _n=name, **k: calls.append(_n) or _o(self, *a, **k))
    t, y = inputs(3, bias=False, grad=())
    out = check(t, y, chunk_bytes=4 * V * 8)
    assert calls == [] and not out.loss.requires_grad


def test_the_triton_backend_runs_the_triton_core(monkeypatch):
    """backend='triton' reaches the Triton chunk core (both cores give the same numbers, so count calls)."""
    pytest.importorskip("triton")
    seen = []
    original = fused_chunk.TritonChunk.stats
    monkeypatch.setattr(fused_chunk.TritonChunk, "stats", lambda self, *a: seen.append(1) or original(self, *a))
    t, y = inputs(4)
    dev = backend_device("triton")
    t = dict(zip(t, moved(dev, *t.values()), strict=True))
    check(t, y.to(dev), backend="triton", chunk_bytes=4 * V * 9)
    assert len(seen) >= 2  # more than one chunk, each through the Triton core


def test_input_errors_name_what_to_fix():
    t, y = inputs(5)
    args = (t["h"], t["w"])
    with pytest.raises(ValueError, match=r"2-D \(2B, T\) tensor .* got list"):
        fused_pair_loss(*args, y.tolist(), chunk_loss)
    with pytest.raises(ValueError, match=r"got torch.Size\(\[3, 5\]\)"):
        fused_pair_loss(t["h"][: 3 * T], t["w"], y[:3], chunk_loss)
    with pytest.raises(ValueError, match=r"got torch.Size\(\[0, 5\]\)"):
        fused_pair_loss(t["h"][:0], t["w"], y[:0], chunk_loss)
    with pytest.raises(ValueError, match="bias"):
        fused_pair_loss(*args, y, chunk_loss, torch.zeros(V + 1))
    with pytest.raises(ValueError, match="corrupted"):
        fused_pair_loss(*args, y, chunk_loss, None, t["hc"][:-1])
    bad = y.clone()
    bad[0, 0] = V
    with pytest.raises(ValueError, match=r"ignore_index=-1; targets\[0\] = 23"):
        fused_pair_loss(*args, torch.where(bad == IGNORE, -1, bad), chunk_loss, ignore_index=-1)
    with pytest.raises(ValueError, match=r"^second_targets must lie in .*ignore_index=-100; second_targets\[1\] = 23"):
        y2 = torch.full_like(y, IGNORE)
        y2[0, 1] = V
        fused_pair_loss(*args, y, chunk_loss, second_targets=y2)
    with pytest.raises(ValueError, match="the reference backend has no fused-gradient path; use grad_mode='recompute'"):
        fused_pair_loss(*args, y, chunk_loss, backend="reference")
    for bad_budget in (0, 0.5, float("nan"), float("inf"), "1024", True):  # NaN, inf crashed in int(); str, bool ran
        with pytest.raises(ValueError, match=re.escape(f"chunk_bytes must be a positive number of bytes, got "
                                                       f"{bad_budget!r}; pass an int >= 1")):
            fused_pair_loss(*args, y, chunk_loss, chunk_bytes=bad_budget)
    check(t, y, chunk_bytes=1)  # one byte: every pair alone, still exact


def test_a_second_backward_says_how_to_recompute():
    t, y = inputs(6)
    out = fused_pair_loss(t["h"], t["w"], y, chunk_loss, t["b"], t["hc"])
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice through a fused-gradient loss, whose stored gradients "
                       "are used once; recompute the loss for each backward, or pass grad_mode='recompute'"):
        out.loss.backward()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rows_whose_logits_differ_by_hundreds(backend):
    """Each row's logsumexp is taken around its own maximum: a row with logits near +300 and one near -300 in the
    same chunk both stay finite and exact (a shared maximum underflows the second; none overflows the first)."""
    if backend == "triton":
        pytest.importorskip("triton")
    t, y = inputs(7)
    with torch.no_grad():
        h = t["h"].view(2 * B, T, D)
        h[0] *= 60.0  # chosen sequence 0: logits of a few hundred
        h[B] *= -60.0  # its rejected sequence: logits of minus a few hundred
    dev = backend_device(backend)
    t = dict(zip(t, moved(dev, *t.values()), strict=True))
    out = check(t, y.to(dev), backend=backend)
    assert torch.isfinite(out.logprobs).all() and out.logprobs.abs().max() > 50


def test_auto_grad_mode_is_fused_on_the_cpu_and_on_cuda():
    """The losses' default, "auto", takes the path measured faster (H200, 2026-12-04, second run: fused TPO 13.0
    vs 14.6 ms recomputing; CPU 2.27 vs 2.87 s), except fp16 on the triton backend; "fused" and "recompute" stay
    as asked."""
    import inspect

    from tpo_fast.loss import dpo_loss, povid_loss, tpo_loss
    from tpo_fast.ops.fused_pairs import uses_fused_gradient

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert uses_fused_gradient("auto", "torch", cpu, torch.float32)
    assert uses_fused_gradient("auto", "torch", cuda, torch.bfloat16)
    assert uses_fused_gradient("auto", "triton", cuda, torch.bfloat16)
    assert not uses_fused_gradient("auto", "triton", cuda, torch.float16)
    assert uses_fused_gradient("fused", "torch", cuda, torch.bfloat16)
    assert not uses_fused_gradient("recompute", "torch", cpu, torch.float32)
    for fn in (tpo_loss, dpo_loss, povid_loss):
        assert inspect.signature(fn).parameters["grad_mode"].default == "auto"


@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (6, 33)])
def test_valid_row_index_lists_the_true_entries_in_order(shape):
    """The sync-free index of the chunk plan equals `nonzero` on any mask (none, all, random)."""
    from tpo_fast.ops.token_logprobs import valid_row_index

    g = torch.Generator().manual_seed(shape[1])
    for valid in (torch.zeros(shape, dtype=torch.bool), torch.ones(shape, dtype=torch.bool),
                  torch.rand(shape, generator=g) < 0.4):
        expected = valid.reshape(-1).nonzero().squeeze(1).tolist()
        assert valid_row_index(valid, len(expected)).tolist() == expected


def test_torch_core_statistics_of_infinite_logit_rows():
    """A row with a +inf logit has logsumexp +inf (as torch.logsumexp), a row of all -inf logits -inf: the shift
    by the row max must not turn them into NaN (inf - inf), and a finite row is untouched."""
    g = torch.Generator().manual_seed(0)
    w, h = torch.randn(3, 4, generator=g), torch.randn(2, 4, generator=g)
    y = torch.tensor([1, 2])
    inf = float("inf")
    for bias, want in ((torch.tensor([inf, 0.0, 0.0]), inf), (torch.full((3,), -inf), -inf)):
        core = fused_chunk.TorchChunk(w, bias, need_w=False, need_b=False)
        lse, z, _ = core.stats(h, y, None)
        assert lse.tolist() == [want, want]
        assert (h @ w.t() + bias).logsumexp(-1).tolist() == [want, want]
    core = fused_chunk.TorchChunk(w, None, need_w=False, need_b=False)
    torch.testing.assert_close(core.stats(h, y, None)[0], (h @ w.t()).logsumexp(-1))


def test_reference_branch_errors_name_what_to_fix():
    """`fused_pair_loss(reference=...)`: a reference of the wrong kind, rows, vocabulary or dtypes is refused
    before any work, with a message naming the reference."""
    from tpo_fast.ops.fused_pairs import PairBranch

    t, y = inputs(5)
    args = (t["h"], t["w"], y, chunk_loss)
    with pytest.raises(TypeError, match=r"^reference must be a tpo_fast.ops.fused_pairs.PairBranch, got tuple$"):
        fused_pair_loss(*args, reference=(t["h"], t["w"]))
    with pytest.raises(ValueError, match=r"^the reference's hidden must have the policy's shape \(30, 8\), got "
                                         r"\(29, 8\)$"):
        fused_pair_loss(*args, reference=PairBranch(t["h"][:-1], t["w"]))
    with pytest.raises(ValueError, match=r"^the reference's weight must have the policy's vocabulary size 23, got "
                                         r"\(22, 8\)$"):
        fused_pair_loss(*args, reference=PairBranch(t["h"], t["w"][:-1]))
    with pytest.raises(TypeError, match=r"^the reference's inputs: hidden and weight must have the same dtype, "
                                        r"got hidden bfloat16"):
        fused_pair_loss(*args, reference=PairBranch(t["h"].bfloat16(), t["w"]))
    with pytest.raises(ValueError, match=r"^the reference's inputs: corrupted_hidden must have the shape"):
        fused_pair_loss(*args, reference=PairBranch(t["h"], t["w"], None, t["h"][:-1]))
    with pytest.raises(ValueError, match=r"^the reference's inputs: bias must be of shape \(V,\) = \(23,\)"):
        fused_pair_loss(*args, reference=PairBranch(t["h"], t["w"], torch.zeros(22)))
    with pytest.raises(ValueError, match=r"^the reference's inputs: all inputs must be on the same device, got hidden "
                                         r"on meta, weight on cpu, targets on cpu$"):
        fused_pair_loss(*args, reference=PairBranch(t["h"].to("meta"), t["w"]))
    # a caller's names replace the prefix: each error names the argument its user passed
    names = {"hidden": "ref_h", "weight": "ref_w", "bias": "ref_b", "corrupted_hidden": "ref_hc"}
    with pytest.raises(ValueError, match=r"^ref_h must have the policy's shape \(30, 8\), got \(29, 8\)$"):
        fused_pair_loss(*args, reference=PairBranch(t["h"][:-1], t["w"], names=names))
    with pytest.raises(ValueError, match=r"^ref_w must have the policy's vocabulary size 23, got \(22, 8\)$"):
        fused_pair_loss(*args, reference=PairBranch(t["h"], t["w"][:-1], names=names))
    with pytest.raises(ValueError, match=r"^ref_b must be of shape \(V,\) = \(23,\)"):
        fused_pair_loss(*args, reference=PairBranch(t["h"], t["w"], torch.zeros(22), names=names))


def test_a_loss_checks_its_model_reference_once_on_the_fused_path(monkeypatch):
    """`tpo_loss` with `ref_hidden` on the fused path hands the reference's names to the fused pass, which checks
    the branch; the loss layer does not check it a second time (each check is host work on every step)."""
    import tpo_fast.loss.tpo as tpo_mod
    import tpo_fast.ops.fused_pairs as fp
    from tpo_fast.loss import tpo_loss

    t, y = inputs(5)
    seen = []
    real = fp.check_primitive_inputs

    def counting(hidden, *a, **k):
        seen.append(hidden.data_ptr())
        return real(hidden, *a, **k)

    monkeypatch.setattr(fp, "check_primitive_inputs", counting)
    monkeypatch.setattr(tpo_mod, "check_primitive_inputs", counting)
    ref_h, ref_hc = t["h"] + 1, t["hc"] - 1
    tpo_loss(t["w"], t["h"], t["hc"], y, t["b"], ref_hidden=ref_h, ref_corrupted_hidden=ref_hc, grad_mode="fused",
             backend="torch")
    assert sorted(seen) == sorted([t["h"].data_ptr(), ref_h.data_ptr()])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_corrupted_branch_the_loss_ignores_gets_exact_zero_gradients_in_bf16(backend):
    """16-bit inputs: the stored dH / dH~ rows are allocated without a zero fill, each chunk writing its slice;
    a chunk whose loss never reads the corrupted grid writes zeros there itself. Freed NaN buffers of the same
    size come first, so that a slice left unwritten shows (the allocator hands such memory back)."""
    t, y = inputs(seed=21)
    dev = backend_device(backend)
    h, w, hc = (x.detach().bfloat16().to(dev).requires_grad_() for x in (t["h"], t["w"], t["hc"]))
    y = y.to(dev)
    rows = int((y != IGNORE).sum())
    for _ in range(4):
        junk = torch.full((rows, D), float("nan"), device=dev)
        del junk
    out = fused_pair_loss(h, w, y, lambda c: c.logprobs.sum(), corrupted_hidden=hc, backend=backend,
                          chunk_bytes=5 * 4 * V)  # several chunks

    out.loss.backward()
    assert hc.grad is not None and hc.grad.dtype == torch.bfloat16
    assert bool((hc.grad == 0).all())
    assert bool(h.grad.isfinite().all()) and bool((h.grad != 0).any())
