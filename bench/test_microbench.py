"""pytest-benchmark micro-benchmarks of the primitive and the TPO loss: `pytest bench --benchmark-only`.

One small shape per device (CPU: D=256, V=4096, N=512; CUDA: LLaVA-1.5-7B's lm_head at N=8192,
bf16), each tpo_fast backend that can run there, and the naive fp32-logits baseline for scale.
`python bench/run.py` is the full comparison with peers, memory and the correctness guard.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _contenders import Naive, TpoFast  # noqa: E402
from _workloads import CASES, make_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASE = CASES["llava7b-n8192"] if DEVICE == "cuda" else CASES["cpu-small"]
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
BACKENDS = ["triton", "torch"] if DEVICE == "cuda" else ["torch"]


def _contender(name: str):
    c = Naive() if name == "naive" else TpoFast(name)
    reason = c.availability(DEVICE)
    if reason:
        pytest.skip(f"{c.label}: {reason}")
    c.setup(DEVICE)
    return c


def _bench(benchmark, c, workload: str, backward: bool) -> None:
    inp = make_inputs(CASE, workload, DEVICE, DTYPE)

    def call():
        for v in inp.values():
            if isinstance(v, torch.Tensor):
                v.grad = None
        c.step(workload, inp, backward)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    call()  # warm-up (Triton compilation) outside the rounds
    benchmark.extra_info.update(case=CASE.name, dtype=str(DTYPE), workload=workload, backward=backward)
    benchmark.pedantic(call, rounds=5 if DEVICE == "cpu" else 20, warmup_rounds=1)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", BACKENDS + ["naive"])
def test_primitive(benchmark, name, backward):
    """token_logprobs (per-token log-probs of one branch) vs naive log_softmax + gather."""
    _bench(benchmark, _contender(name), "primitive", backward)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", BACKENDS + ["naive"])
def test_tpo_loss(benchmark, name, backward):
    """tpo_loss (policy clean + corrupted with gradient, reference without) vs naive fp32 logits."""
    _bench(benchmark, _contender(name), "tpo", backward)
