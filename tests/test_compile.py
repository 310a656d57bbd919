"""The losses and primitives inside `torch.compile`: each call of a primitive is a graph break that runs the
kernels eagerly (`tpo_fast/ops/_compile.py`), so a compiled function gives the eager numbers, a new mask does not
recompile it, and the Triton backend is never traced (Dynamo fails on its launchers)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from tests._device import backend_device
from tpo_fast import logits_logprobs, target_logits, token_stats
from tpo_fast.loss import dpo_loss, povid_loss, token_pg_loss, tpo_loss

B, T, D, V = 2, 6, 16, 40  # 2B sequences of T tokens


def _batch(seed: int, device: torch.device, n_prompt: int) -> dict:
    """Inputs of one step; `n_prompt` leading positions carry no target, so each seed has its own valid count."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, grad=False):
        t = torch.randn(*shape, generator=g).to(device)
        return t.requires_grad_() if grad else t

    targets = torch.randint(0, V, (2 * B, T), generator=g)
    targets[:, :n_prompt] = -100
    targets[0, -1] = -100  # a hole at the end of one response
    return dict(
        weight=randn(V, D, grad=True), bias=randn(V, grad=True), hidden=randn(2 * B, T, D, grad=True),
        corrupted=randn(2 * B, T, D, grad=True), ref_hidden=randn(2 * B, T, D), ref_corrupted=randn(2 * B, T, D),
        targets=targets.to(device), logits=randn(2 * B, T, V, grad=True), advantages=randn(2 * B, T),
    )


def _tpo(x, backend, grad_mode):
    return tpo_loss(x["weight"], x["hidden"], x["corrupted"], x["targets"], x["bias"], ref_hidden=x["ref_hidden"],
                    ref_corrupted_hidden=x["ref_corrupted"], beta=0.5, backend=backend, grad_mode=grad_mode).loss


def _dpo(x, backend, grad_mode):
    return dpo_loss(x["weight"], x["hidden"], x["targets"], x["bias"], ref_hidden=x["ref_hidden"], beta=0.5,
                    backend=backend, grad_mode=grad_mode).loss


def _povid(x, backend, grad_mode):
    # POVID's corrupted rows are the B chosen sequences only
    return povid_loss(x["weight"], x["hidden"], x["corrupted"][:B], x["targets"], x["bias"], ref_hidden=x["ref_hidden"],
                      ref_corrupted_hidden=x["ref_corrupted"][:B], beta=0.5, backend=backend,
                      grad_mode=grad_mode).loss


def _pg(x, backend, grad_mode):
    return token_pg_loss(x["weight"], x["hidden"], x["targets"], x["bias"], advantages=x["advantages"],
                         old_logprobs=-x["advantages"].abs() - 3.0, ref_logprobs=x["advantages"] * 0.5 - 3.0,
                         backend=backend).loss


def _stats(x, backend, grad_mode):
    s = token_stats(x["hidden"].reshape(-1, D), x["weight"], x["targets"].reshape(-1), x["bias"],
                    corrupted_hidden=x["corrupted"].reshape(-1, D), backend=backend)
    zc = target_logits(x["corrupted"].reshape(-1, D), x["weight"], x["targets"].reshape(-1), backend=backend)
    return (s.logprobs * 2 + s.target_logits - s.corrupted_target_logits).sum() + zc.square().sum()


def _from_logits(x, backend, grad_mode):
    out = logits_logprobs(x["logits"], x["targets"], shift=True, backend=backend)
    return out.logprobs.exp().sum() + out.logprobs.sum()


LOSSES = {"tpo": _tpo, "dpo": _dpo, "povid": _povid, "token_pg": _pg, "token_stats": _stats, "logits": _from_logits}
LEAVES = ("weight", "bias", "hidden", "corrupted", "logits")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name, grad_mode", [
    ("tpo", "fused"), ("tpo", "recompute"), ("dpo", "fused"), ("povid", "fused"), ("povid", "recompute"),
    ("token_pg", None), ("token_stats", None), ("logits", None),
])
def test_a_compiled_step_gives_the_eager_numbers_and_compiles_once(backend, name, grad_mode):
    device = backend_device(backend)
    fn = LOSSES[name]

    def step(x):
        return fn(x, backend, grad_mode) * 3.0  # compiled ops on both sides of the graph break

    torch._dynamo.reset()  # each case's own cache (the step's code object is shared by every case)
    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter)
    frames = []
    for seed, n_prompt in ((0, 1), (1, 3), (2, 4)):  # three valid-row counts
        x = _batch(seed, device, n_prompt)
        leaves = [x[k] for k in LEAVES]
        want = step(x)
        want_grads = torch.autograd.grad(want, leaves, allow_unused=True)
        got = compiled(x)
        got_grads = torch.autograd.grad(got, leaves, allow_unused=True)
        assert torch.equal(got, want), (seed, got, want)
        for k, g, w in zip(LEAVES, got_grads, want_grads, strict=True):
            assert (g is None) == (w is None), k
            assert g is None or torch.equal(g, w), (seed, k, (g - w).abs().max())
        frames.append(counter.frame_count)
    assert frames[0] >= 1, "nothing was compiled: the test would not see a traced primitive"
    assert frames[1:] == frames[:1] * 2, f"a new mask recompiled the step: frames after each call {frames}"


def test_importing_the_losses_does_not_import_dynamo():
    code = "import sys, tpo_fast, tpo_fast.loss, tpo_fast.ops.logits; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
