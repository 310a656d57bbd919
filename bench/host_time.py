"""Host time of a training step: what the CPU spends issuing each step contender's work, measured on a CPU.

    python bench/host_time.py                                   # llava7b-host: the 7B step's structure, toy widths
    python bench/host_time.py --cuda-path --contenders ours-tpo-shared,ours-dpo-shared

A GPU step cannot take less time than the host needs to issue it: Python, the dispatcher, module hooks, one
launch per operator. The `llava7b-host` step case has the LLaVA-1.5-7B case's structure (32 text layers with LoRA
on their 7 linear layers, 24 vision layers, 4 pairs, bf16 autocast) at toy widths, so each contender issues the
operators of its 7B step on tensors whose arithmetic takes next to nothing: its CPU step time is its host time.
Printed per contender: the median step time and the operators dispatched per step (about the kernel launches of
its GPU step).

On a CPU the trainer's packed row is attended by the SDPA path; on CUDA by one flash-attention varlen call per
layer (docs/trainer.md). `--cuda-path` measures the CUDA path's host work here: the varlen layout is built and
the keys gathered as on CUDA, and the varlen kernel itself, which only runs on CUDA, is replaced by a one-operator
stand-in (the query times one). Its numbers are host time only; its outputs are not attention (the loss is not
checked).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _contenders.step import step_contenders, varlen_module  # noqa: E402
from _workloads.step import STEP_CASES, StepData  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

DEFAULT_CONTENDERS = "official-tpo,trl-dpo,ours-dpo-shared,ours-tpo-shared,ours-tpo-shared-refcache"


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def use_cuda_path_standin() -> None:
    """Route the trainer's packed rows through the varlen path on the CPU, with a one-operator stand-in kernel."""
    from tpo_fast.trainer import packing

    row_attention = varlen_module() or packing  # packing.py held the varlen call before trainer/row_attention.py

    def standin(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        return q * 1.0

    row_attention.varlen_api = lambda: (standin, {"window_size": (-1, 0)}, True)
    row_attention.varlen_usable = lambda query, dropout, scaling: True
    packing.varlen_wanted = lambda device: True  # where Packing.inputs looks it up


def host_time(name: str, case, data: StepData, steps: int) -> tuple[float, int]:
    """(median step seconds, operators per step) of one contender on `case`, after two warm-up steps."""
    c = step_contenders()[name]
    c.build(case, data, "cpu")
    batch = c.batch(case.pairs)
    for _ in range(2):
        c.train_step(batch)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        c.train_step(batch)
        times.append(time.perf_counter() - t0)
    with _Count() as count:
        c.train_step(batch)
    return statistics.median(times), count.ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="llava7b-host", choices=sorted(STEP_CASES))
    p.add_argument("--contenders", default=DEFAULT_CONTENDERS)
    p.add_argument("--steps", type=int, default=5, help="timed steps per contender (the median is printed)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: the host's one issuing thread)")
    p.add_argument("--cuda-path", action="store_true", help="the trainer's CUDA attention path, with a stand-in kernel")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.cuda_path:
        use_cuda_path_standin()
    case = STEP_CASES[a.case]
    data = StepData(case)
    path = "CUDA path (varlen stand-in)" if a.cuda_path else "CPU path"
    print(f"## Host time per step · {case.name} ({case.layers} text layers, {case.vision_layers} vision layers, "
          f"{case.pairs} pairs, {case.dtype}{', LoRA' if case.lora else ''}) · {path}, {a.threads} thread(s)\n")
    print("| contender | host ms per step | operators per step |")
    print("|---|---:|---:|")
    for name in a.contenders.split(","):
        seconds, ops = host_time(name.strip(), case, data, a.steps)
        print(f"| {name.strip()} | {seconds * 1e3:.0f} | {ops} |", flush=True)


if __name__ == "__main__":
    main()
