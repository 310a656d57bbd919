"""Where a training step's time goes: torch.profiler over steps of the `step` workload's contenders.

    python bench/profile_step.py --case step-toy --contenders trl-dpo,ours-dpo
    python bench/profile_step.py --case cpu-step --contenders trl-dpo,ours-dpo,official-tpo --steps 1
    python bench/profile_step.py --case step-toy --contenders trl-dpo --trl-compact   # TRL's head on valid rows
    python bench/profile_step.py --case llava7b-step --contenders ours-tpo-shared,trl-dpo   # on a GPU

Each contender is built as `python bench/run.py --workloads step` builds it (same model, pairs and
options; TRL's options are tried the same way), warmed up with one step, then `--steps` steps run
under `torch.profiler`. Printed per contender: the step time, the operators by self time, and the
time by module (the `record_function` ranges this script puts around the vision tower, the decoder
layers, the lm_head and the loss). On CUDA (`--device cuda`, the default where there is one) the times
are the GPU's: kernels by self device time, the ranges' device time, and the kernel launches per step.
docs/bench.md ("Where TRL's time goes") quotes the CPU tables.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _contenders.step import step_contenders  # noqa: E402
from _workloads.step import STEP_CASES, StepData  # noqa: E402
from profile_loss import LAUNCHES, SYNCS  # noqa: E402

# Module classes whose forward (and backward, through autograd's record of it) gets its own range.
RANGES = {"CLIPVisionModel": "vision tower", "LlavaMultiModalProjector": "projector",
          "LlamaDecoderLayer": "decoder layers"}
HEAD = "lm_head module (full logits)"
TRL_HEAD = "TRL chunked log-prob head"


def _label(module) -> str | None:
    name = type(module).__name__
    if name == "Linear" and getattr(module, "out_features", 0) >= 32000:
        return HEAD
    return RANGES.get(name)


@contextlib.contextmanager
def module_ranges(model: torch.nn.Module):
    """A `record_function` range around the forward of each module class in RANGES (outermost only)."""
    handles = []
    for module in model.modules():
        label = _label(module)
        if label is None:
            continue

        def pre(mod, args, label=label):
            mod._bench_range = torch.autograd.profiler.record_function(label)
            mod._bench_range.__enter__()

        def post(mod, args, out):
            mod._bench_range.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def trl_head_range():
    """A range around TRL's chunked log-prob head (it uses the lm_head weight, not the module)."""
    try:
        from trl.trainer import utils
    except ImportError:
        yield
        return
    fn = utils._ChunkedLogProbFunction
    original = fn.apply

    def apply(*args, **kwargs):
        with torch.autograd.profiler.record_function(TRL_HEAD):
            return original(*args, **kwargs)

    fn.apply = apply
    try:
        yield
    finally:
        fn.apply = original


def models_of(c) -> list[torch.nn.Module]:
    trainer = getattr(c, "trainer", None)
    if trainer is not None:
        out = [trainer.model]
        if getattr(trainer, "ref_model", None) is not None:
            out.append(trainer.ref_model)
        return out
    return [m for m in (getattr(c, "policy", None), getattr(c, "reference", None)) if m is not None]


def profile(name: str, case, steps: int, rows: int, device: str = "cpu") -> None:
    c = step_contenders()[name]
    data = StepData(case)
    c.build(case, data, device)
    batch = c.batch(case.pairs)
    c.train_step(batch)
    cuda = device == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for m in models_of(c):
            stack.enter_context(module_ranges(m))
        stack.enter_context(trl_head_range())
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                with torch.autograd.profiler.record_function("step"):
                    c.train_step(batch)
            if cuda:
                torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    # On CUDA the device's times: an operator's self device time is its kernels' time.
    self_time = "self_device_time_total" if cuda else "self_cpu_time_total"
    range_time = "device_time_total" if cuda else "cpu_time_total"
    total = sum(getattr(e, self_time) for e in events) / steps / 1e3
    what = "kernel time" if cuda else "operator self time"
    print(f"\n## {c.label} · {case.name} ({device}): {wall * 1e3:.0f} ms per profiled step ({total:.0f} ms of {what})"
          f"; {c.note()}\n")
    if cuda:
        # the loss profiler's runtime-call names: its syncs are read-backs' waits, not this script's own
        # cudaDeviceSynchronize
        launches = sum(e.count for e in events if e.key in LAUNCHES)
        syncs = sum(e.count for e in events if e.key in SYNCS)
        print(f"Kernel launches per step: {launches // steps}; host synchronizations per step: {syncs // steps}\n")
    print("Time inside each range (forward ranges; their backward runs outside them, see the operators):")
    for e in sorted(events, key=lambda e: -getattr(e, range_time)):
        if e.key in {*RANGES.values(), HEAD, TRL_HEAD}:
            print(f"  {e.key:<32} {getattr(e, range_time) / steps / 1e3:9.1f} ms  ({e.count // steps} calls per step)")
    print()
    print(events.table(sort_by=self_time, row_limit=rows, max_name_column_width=60))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="step-toy", choices=sorted(STEP_CASES))
    p.add_argument("--contenders", default="trl-dpo,ours-dpo")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=15, help="operators listed per contender")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the steps run (default: cuda where there is one, else cpu)")
    p.add_argument("--trl-compact", action="store_true",
                   help="TRL's head scores only the valid (response) positions on CPU too, as it does on CUDA/XPU "
                   "(a patch of trl.trainer.utils._use_triton, which only decides that compaction there): how much "
                   "of TRL's CPU time is the lm_head over image, prompt and padding positions")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.trl_compact:
        from trl.trainer import utils

        utils._use_triton = lambda device: True
    case = STEP_CASES[a.case]
    for name in a.contenders.split(","):
        profile(name.strip(), case, a.steps, a.rows, a.device)


if __name__ == "__main__":
    main()
