"""Measuring one contender on one case, meant to run in a fresh child process per contender.

For each workload: warm-up, peak memory of one forward and of one forward+backward above the
resident inputs, the correctness guard against the fp32 oracle, and only then the timed runs.

Memory: on CUDA `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus what was
allocated just before the call. On CPU the process's peak RSS (`VmHWM`, reset through
`/proc/self/clear_refs`) minus its RSS just before the call, in a child that the parent starts with a
fixed glibc mmap threshold so freed tensors go back to the OS and the next peak is a real one.
Time: CUDA events on CUDA, `time.perf_counter` on CPU; median and quartiles over the repeats.

Phases (`job["phase"]`): on CUDA one child does it all ("all"). On CPU the pinned mmap threshold,
which makes every allocation of 64 KiB or more a fresh, zero-filled mapping, would also slow the
timed calls, and by how much depends on each contender's allocation pattern (a training step of many
mid-sized activations lost a third of its speed). So the parent runs two children there: "memory"
(pinned threshold: warm-up, peaks, guard) and then, for the rows that passed, "time" (glibc's default
allocator, as users run: warm-up, timed calls).
"""

from __future__ import annotations

import math
import re
import statistics
import time
import traceback

import torch
from _contenders import CCE_NAMES, Contender, all_contenders
from _workloads import GRAD_INPUTS, IGNORE_INDEX, Case, logits_errors, make_inputs, oracle, traffic

PHASES = ("all", "memory", "time")  # what a child measures (module docstring)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Allowed relative error (max |got - ref| / max |ref|) on top of twice what plain PyTorch reaches
# in the same dtype (flash-attn's rule; the per-dtype floor follows CCE's test table).
ATOL = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 2e-3}


class _CpuMemory:
    """Peak RSS above the current RSS, per call, from /proc (Linux)."""

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reason = None
        except OSError as e:
            self.reason = f"peak RSS not measurable here ({e.__class__.__name__}: /proc/self/clear_refs)"

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024

    def start(self) -> None:
        if self.reason is None:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self._base = self._status("VmRSS")

    def peak(self) -> float | None:
        if self.reason is not None:
            return None
        return (self._status("VmHWM") - self._base) / 2**20


class _CudaMemory:
    reason = None

    def start(self) -> None:
        torch.cuda.synchronize()
        self._base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def peak(self) -> float:
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - self._base) / 2**20


def _clear(inp: dict) -> None:
    for v in inp.values():
        if isinstance(v, torch.Tensor) and v.grad is not None:
            v.grad = None


def _timed(fn, device: str) -> float:
    """Milliseconds of one call."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _stats(times: list[float]) -> dict:
    # Inclusive quartiles stay inside the observed range; the default ("exclusive") extrapolates
    # beyond it for a handful of repeats (2 repeats [95, 209] gave p25 = 66.5).
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median": statistics.median(times), "p25": q[0], "p75": q[2], "min": min(times), "times": times}


def _rel_err(got: torch.Tensor | None, ref: torch.Tensor) -> float:
    if got is None:
        return math.inf
    got, ref = got.detach().float().reshape(ref.shape), ref.float()
    scale = ref.abs().max().clamp_min(1e-30)
    err = ((got - ref).abs().max() / scale).item()
    return err if math.isfinite(err) else math.inf


def check(workload: str, inp: dict, out: torch.Tensor, dtype_name: str) -> dict:
    """Compare a contender's output and gradients with the fp32 oracle; {"ok", "errors"}.

    Tolerance per tensor: `2 * err(plain PyTorch in this dtype) + ATOL[dtype]`, relative to the
    reference's largest magnitude.
    """
    got = {"out": out, **{k: inp[k].grad for k in GRAD_INPUTS[workload]}}
    if workload == "logits":  # (N, V) gradients: compared chunk by chunk, never held in fp32
        errors, ok = {}, True
        streamed = logits_errors(inp, got, DTYPES[dtype_name] if dtype_name != "fp32" else None)
        for k, (err, yard) in streamed.items():
            tol = ATOL[dtype_name] + 2 * yard
            errors[k] = {"err": err, "tol": tol}
            ok &= err <= tol
        return {"ok": bool(ok), "errors": errors}
    ref = oracle(workload, inp)
    yard = oracle(workload, inp, round_to=DTYPES[dtype_name]) if dtype_name != "fp32" else None
    errors, ok = {}, True
    for k, r in ref.items():
        err = _rel_err(got[k], r)
        tol = ATOL[dtype_name] + (2 * _rel_err(yard[k], r) if yard is not None else 0.0)
        errors[k] = {"err": err, "tol": tol}
        ok &= err <= tol
    return {"ok": bool(ok), "errors": errors}


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def measure_workload(c: Contender, case: Case, workload: str, cfg: dict) -> dict:
    """One row: memory, guard, then times, for `c` on (case, workload); `cfg["phase"]` picks which (PHASES)."""
    device, dtype_name = cfg["device"], cfg["dtype"]
    phase = cfg.get("phase", "all")
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    row = {"status": "ok", "reason": "", "note": c.workloads.get(workload, "")}
    inp = make_inputs(case, workload, device, DTYPES[dtype_name], cfg["seed"])
    row["valid_frac"] = (inp["targets"] != IGNORE_INDEX).float().mean().item()
    mem = _CudaMemory() if device == "cuda" else _CpuMemory()
    try:
        for _ in range(max(1, cfg["warmup"])):
            c.step(workload, inp, True)
            _clear(inp)
        if phase != "time":
            _memory_and_guard(c, workload, inp, dtype_name, mem, row)
        if phase != "memory" and row["status"] == "ok":
            _times(c, case, workload, inp, cfg, row)
    except Exception as e:  # noqa: BLE001 - a contender failure becomes a row, the run goes on
        row.update(failure(e, device))
    return row


def _memory_and_guard(c: Contender, workload: str, inp: dict, dtype_name: str, mem, row: dict) -> None:
    """Peaks of one forward and one forward+backward, then the guard on the latter's outputs (into `row`)."""
    # 1. Peak memory above the resident inputs: one forward, then one forward+backward.
    mem.start()
    out = c.step(workload, inp, False)
    row["fwd_peak_mib"] = mem.peak()
    del out
    mem.start()
    out = c.step(workload, inp, True)
    row["full_peak_mib"] = mem.peak()
    if mem.reason:
        row["memory_note"] = mem.reason
    # 2. The guard, on the outputs of the fwd+bwd call just measured.
    if c.kind != "floor":
        row["check"] = check(workload, inp, out, dtype_name)
        if not row["check"]["ok"]:
            bad = {
                k: f"{v['err']:.2e} > {v['tol']:.2e}"
                for k, v in row["check"]["errors"].items()
                if not v["err"] <= v["tol"]
            }
            row.update(
                status="failed check",
                reason="wrong result, not timed: "
                + ", ".join(f"{k} rel. err {v}" for k, v in bad.items()),
            )
            return
    del out
    _clear(inp)


def _times(c: Contender, case: Case, workload: str, inp: dict, cfg: dict, row: dict) -> None:
    """`--repeats` timed forwards, then forwards+backwards, with their TFLOP/s and GB/s (into `row`)."""
    device, dtype_name = cfg["device"], cfg["dtype"]
    for mode, bwd in (("fwd", False), ("full", True)):
        times = []
        for _ in range(cfg["repeats"]):
            times.append(_timed(lambda b=bwd: c.step(workload, inp, b), device))
            _clear(inp)
        row[f"{mode}_ms"] = _stats(times)
        seconds = row[f"{mode}_ms"]["median"] / 1e3
        counted = c.executed_flops(case, workload, mode, inp)
        if counted is not None:
            row[f"{mode}_tflops"] = counted / seconds / 1e12
            if mode == "full":
                row["full_gflop_counted"] = counted / 1e9
        moved = traffic(case, workload, mode, DTYPES[dtype_name].itemsize)
        if moved is not None:
            row[f"{mode}_gbs"] = moved / seconds / 1e9


def failure(e: BaseException, device: str, limit: int = 6) -> dict:
    """The row fields of a contender that raised: status OOM or error, the reason in one line, the traceback."""
    if device == "cuda":
        torch.cuda.empty_cache()
    if _is_oom(e):
        return {"status": "OOM", "reason": f"out of memory: {str(e).splitlines()[0][:160]}"}
    return {
        "status": "error",
        "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__,
        "traceback": traceback.format_exc(limit=limit),
    }


def run_contender(job: dict) -> list[dict]:
    """Child-process entry: every requested workload of one (case, contender). Returns rows."""
    if job["case"].get("step"):
        from _measure_step import run_step_contender

        return run_step_contender(job)
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    case = Case(**job["case"])
    c = all_contenders(tuple(job["backends"]))[job["contender"]]
    if job["contender"] in CCE_NAMES:  # CCE's CPU path runs only when named, which the parent checked
        c.allow_cpu = True
    rows = []
    try:
        c.setup(job["device"])
        setup_error = None
    except Exception as e:  # noqa: BLE001
        setup_error = f"set-up failed: {type(e).__name__}: {e}"
    for w in job["workloads"]:
        if setup_error:
            row = {"status": "error", "reason": setup_error}
        else:
            row = measure_workload(c, case, w, job)
        row.update(contender=c.name, label=c.label_for(w), kind=c.kind, workload=w)
        rows.append(row)
    return rows


def child_main(job: dict, conn) -> None:
    """multiprocessing target: send the rows (or the exception text) back through `conn`."""
    try:
        rows = run_contender(job)
        info = {"device_name": torch.cuda.get_device_name() if job["device"] == "cuda" else None}
        conn.send(("ok", rows, info))
    except BaseException as e:  # noqa: BLE001
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"))
    finally:
        conn.close()
