"""Measuring one contender of the `step` workload, in its own child process (like `_measure.py`).

Order: build (model, reference, optimizer, the contender's own trainer), the warm-up steps (the first
one's loss is the check: policy = reference, so every contender must report ln 2; its gradients' norms per
trained tensor, `first_grad_norms`, go to `cross_check_steps`), the timed steps
with the peak memory of each, then the largest micro-batch that fits the case's memory budget.
On CPU the parent splits this over two children, as `_measure.py` says: "memory" (pinned mmap
threshold: build, warm-up, two steps for their peaks, the micro-batch search) and "time" (glibc's
default allocator: build, warm-up, the timed steps).

Memory, per step, measured the way `_measure.py` does: on CUDA `max_memory_allocated` after
`reset_peak_memory_stats`; on CPU the peak RSS (`VmHWM`, reset through `/proc/self/clear_refs`) with
glibc's mmap threshold pinned by the parent. Two numbers: `full_peak_mib`, the step's peak above what
is resident before it (activations, logits, gradients), and `total_peak_mib`, the peak above the
process before the model was built (CPU: after the imports of every contender's libraries, `import_libraries`)
or above zero (CUDA): weights, reference, optimizer state and the step. The budget applies to the total.

Work: on CPU the memory child counts one more step's FLOPs (`counted_gflop`), so a step-time ratio can
be read against the work ratio of the same two rows.

Largest micro-batch: steps of `pairs` pairs, doubling from the case's micro-batch while they fit (or
halving while they do not), then bisecting between the largest that fit and the smallest that did
not; a step over the budget or out of memory does not fit. Bounded by `case.max_pairs` and by
`case.search_s` seconds (a probe predicted to end past the bound is not started); the row says which
bound, if any, cut the search short.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from _contenders.step import StepContender, expected_first_loss, step_contenders
from _measure import PHASES, _CpuMemory, _CudaMemory, _is_oom, _stats, failure
from _workloads.step import STEP_CASES, StepCase, StepData

CHECK_RTOL = 1e-3  # the first loss against ln 2 (fp32); bf16 rounding of the sequence scores: 1e-2
CHECK_RTOL_BF16 = 1e-2
# The first optimizer step (same data, weights, optimizer and learning rate for every contender) lowers the loss by
# the same drop for every correct implementation of an objective: in fp32 it must be a real drop, and it must
# equal the independent implementation's (official TPO, TRL's DPO) within these relative tolerances.
MIN_FIRST_DROP = 1e-4  # fp32: the loss after one step at least this far below the first
DROP_RTOL = {"fp32": 0.02, "bf16": 0.15, "fp16": 0.15}
# 16-bit: an oracle drop below this is within the losses' rounding noise; such a row is noted, not judged.
MIN_DROP_16BIT = 1e-3


class _Total:
    """Peak memory above a fixed base (the process before the model), next to the per-step `_CpuMemory`."""

    def __init__(self, device: str):
        self.device = device
        self.base = _CpuMemory._status("VmRSS") if device == "cpu" else 0

    def peak(self) -> float | None:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**20
        return (_CpuMemory._status("VmHWM") - self.base) / 2**20


class FirstGradients:
    """The L2 norm of each trained tensor's gradient (float64; 0 for a tensor without one) at the first optimizer step
    taken after it is made, by name (`StepContender.named_trained_parameters`): read by a global step pre-hook, when
    every gradient of that step is complete and none has been applied, whichever optimizer wrapper the contender
    steps through. `norms` stays None for a contender that names no parameters, or until that step."""

    def __init__(self, c: StepContender):
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        self.norms: dict[str, float] | None = None
        named = getattr(c, "named_trained_parameters", lambda: None)()
        self._named = named
        self._handle = register_optimizer_step_pre_hook(self._hook) if named else None

    def _hook(self, optimizer, args, kwargs) -> None:
        if self.norms is None:
            # accumulated in float64 without a float64 copy of the gradient
            f64 = torch.float64
            self.norms = {n: 0.0 if p.grad is None else float(torch.linalg.vector_norm(p.grad.detach(), dtype=f64))
                          for n, p in self._named}
        self.remove()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def grad_norms_error(got: dict[str, float], want: dict[str, float]) -> tuple[float, str]:
    """(error, the tensor it is largest for) of one step's per-tensor gradient norms against the oracle's: per tensor
    |got - want| / max(want, 1e-3 x the oracle's largest norm), so that a tensor whose gradient is nearly zero is
    judged against the gradient's scale, not its own; inf for tensors that are not the same."""
    if set(got) != set(want):
        return math.inf, ", ".join(sorted(set(got) ^ set(want))[:3])
    floor = 1e-3 * max((abs(w) for w in want.values()), default=0.0)
    errs = {n: abs(got[n] - w) / max(abs(w), floor) if max(abs(w), floor) > 0 else abs(got[n]) for n, w in want.items()}
    worst = max(errs, key=errs.get, default="")
    return (errs[worst] if worst else 0.0), worst


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _missing_flop_formulas():
    """FlopCounterMode formulas for operators torch's counter has none for: the CPU flash attention kernels
    (it counts the CUDA ones; the same count here, no discount for a causal mask) and the in-place `addmm_`
    (2·m·k·n, as for `addmm`), which accumulates the fused losses' lm_head weight gradient chunk by chunk."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    def addmm_(acc, a, b, *args, out_shape=None, **kwargs) -> int:
        return 2 * a[0] * a[1] * b[1]

    ops = torch.ops.aten
    return {ops._scaled_dot_product_flash_attention_for_cpu: forward,
            ops._scaled_dot_product_flash_attention_for_cpu_backward: backward,
            ops.addmm_: addmm_}


def counted_gflop(c: StepContender, batch) -> float:
    """GFLOP of one more step as `torch.utils.flop_counter` counts its aten operators (matmuls, attention,
    convolutions; elementwise work is not counted). Only meaningful where every kernel is an aten operator:
    on CUDA the Triton and custom kernels are invisible to it, so the step workload counts on CPU only."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_missing_flop_formulas()) as counter:
        c.train_step(batch)
    return counter.get_total_flops() / 1e9


def _one_step(c: StepContender, batch, device: str, mem, total: _Total) -> tuple[float, float, float | None, float]:
    """(ms, loss, step peak MiB, total peak MiB) of one timed step."""
    mem.start()
    _sync(device)
    t0 = time.perf_counter()
    loss = c.train_step(batch)
    _sync(device)
    ms = (time.perf_counter() - t0) * 1e3
    return ms, loss, mem.peak(), total.peak()


def largest_micro_batch(c: StepContender, case: StepCase, device: str, mem, total: _Total, known: dict,
                        step_s: float) -> dict:
    """The largest micro-batch (pairs) whose step's total peak fits `case.memory_budget_mib`.

    `known`: {pairs: total peak MiB} already measured; `step_s`: seconds of a step at `case.pairs`,
    to predict a probe's time (linear in the pairs).
    """
    budget, cap = case.memory_budget_mib, case.max_pairs
    probes = {p: {"total_peak_mib": v, "fits": v is not None and v <= budget} for p, v in known.items()}
    start = time.monotonic()
    bound = None

    def probe(pairs: int) -> bool | None:
        nonlocal bound
        if pairs in probes:
            return probes[pairs]["fits"]
        predicted = step_s * pairs / case.pairs
        if time.monotonic() - start + predicted > case.search_s:
            bound = f"time bound ({case.search_s:g} s) reached before {pairs} pairs"
            return None
        peak, why = None, ""
        try:
            batch = c.batch(pairs)
            _, _, _, peak = _one_step(c, batch, device, mem, total)
            del batch
        except Exception as e:  # noqa: BLE001 - out of memory is an answer; anything else is reported
            if not _is_oom(e):
                raise
            why = "out of memory"
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        fits = peak is not None and peak <= budget
        probes[pairs] = {"total_peak_mib": peak, "fits": fits, **({"why": why} if why else {})}
        return fits

    lo, hi = 0, None  # largest that fits, smallest that does not
    pairs = case.pairs
    while True:
        fits = probe(pairs)
        if fits is None:
            break
        if fits:
            lo = pairs
            if pairs >= cap:
                bound = bound or f"cap of {cap} pairs"
                break
            if hi is not None:
                break
            pairs = min(2 * pairs, cap)
        else:
            hi = pairs
            if pairs == 1 or lo:
                break
            pairs = max(1, pairs // 2)
    while bound is None and hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        fits = probe(mid)
        if fits is None:
            break
        lo, hi = (mid, hi) if fits else (lo, mid)
    exact = bound is None and (hi is not None and hi - lo == 1 or hi == 1)
    return {
        "max_micro_batch": lo,
        "max_micro_batch_exact": exact,
        "max_micro_batch_bound": None if exact else bound,
        "micro_batch_probes": {str(k): v for k, v in sorted(probes.items())},
        "memory_budget_mib": budget,
        "search_took_s": round(time.monotonic() - start, 1),
    }


MEMORY_STEPS = 2  # steps whose peaks a "memory" child takes (the max): a step's peak is deterministic


def measure_step(c: StepContender, case: StepCase, cfg: dict) -> dict:
    """One row of the step workload for contender `c` on `case`; `cfg["phase"]` picks which part (PHASES)."""
    device = cfg["device"]
    phase = cfg.get("phase", "all")
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    row = {"status": "ok", "reason": "", "note": c.workloads["step"], "objective": c.objective, "oracle": c.oracle}
    mem = _CudaMemory() if device == "cuda" else _CpuMemory()
    if device == "cpu":
        mem.start()  # for `total`: VmHWM reset to the RSS before the model
    total = _Total(device)
    try:
        t0 = time.perf_counter()
        data = StepData(case, cfg["seed"])
        c.build(case, data, device)
        row["note"] = c.note()
        row["setup_s"] = round(time.perf_counter() - t0, 1)
        if (trained := c.trained_params()) is not None:
            row["trained_params"] = trained
        if getattr(c, "reference_cache_s_per_pair", None) is not None:
            row["reference_cache_s_per_pair"] = c.reference_cache_s_per_pair
        counts = data.tokens(case.pairs)
        row.update(tokens=counts["tokens"], response_tokens=counts["response"], padded_positions=counts["padded"],
                   seq_len=counts["row_len"])
        batch = c.batch(case.pairs)
        first = FirstGradients(c)  # the first step's gradients, for `cross_check_steps`
        try:
            losses = [c.train_step(batch) for _ in range(max(1, cfg["warmup"]))]
        finally:
            first.remove()
        if first.norms is not None:
            row["first_grad_norms"] = first.norms
        # 1. The check: policy = reference at the first step, so every loss is ln 2.
        rtol = CHECK_RTOL_BF16 if case.dtype != "fp32" else CHECK_RTOL
        want = expected_first_loss()
        err = abs(losses[0] - want) / want
        row["check"] = {"ok": bool(math.isfinite(losses[0]) and err <= rtol),
                        "errors": {"first_loss": {"err": err if math.isfinite(err) else math.inf, "tol": rtol}}}
        if not row["check"]["ok"]:
            row.update(status="failed check",
                       reason=f"wrong result, not timed: first loss {losses[0]:.6g}, expected ln 2 = {want:.6g}")
            return row
        # 2. Timed steps ("time", "all"), or steps for their peaks only ("memory"); each with its peak memory.
        steps = cfg["repeats"] if phase != "memory" else min(MEMORY_STEPS, cfg["repeats"])
        times, peaks, totals = [], [], []
        for _ in range(steps):
            ms, loss, peak, tot = _one_step(c, batch, device, mem, total)
            times.append(ms)
            peaks.append(peak)
            totals.append(tot)
            losses.append(loss)
        if not all(math.isfinite(x) for x in losses):
            row.update(status="failed check", reason=f"non-finite loss during the timed steps: {losses}")
            return row
        row["losses"] = losses
        drop = losses[0] - losses[1]
        # not a relative error: "err" None, the drop and its floor beside it (fp32 only; bf16 relies on the cross-check)
        row["check"]["errors"]["first_drop"] = {"err": None, "tol": None, "drop": drop,
                                                "min": MIN_FIRST_DROP if case.dtype == "fp32" else None}
        if case.dtype == "fp32" and not drop >= MIN_FIRST_DROP:
            row.update(status="failed check", reason=f"the loss did not fall after an optimizer step on the same batch "
                                                     f"({losses[0]:.6g} -> {losses[1]:.6g}): nothing was trained")
            row["check"]["ok"] = False
            return row
        if phase != "memory":
            row["full_ms"] = _stats(times)
            row["tokens_per_s"] = row["tokens"] / (row["full_ms"]["median"] / 1e3)
        if phase != "time":
            row["full_peak_mib"] = None if None in peaks else max(peaks)
            row["total_peak_mib"] = max(totals)
            if mem.reason:
                row["memory_note"] = mem.reason
            if device == "cpu":
                row["step_gflop"] = counted_gflop(c, batch)
        del batch
        # 3. The largest micro-batch in the budget.
        if phase != "time" and case.search_s > 0:
            row.update(largest_micro_batch(c, case, device, mem, total, {case.pairs: row["total_peak_mib"]},
                                           _stats(times)["median"] / 1e3))
    except Exception as e:  # noqa: BLE001 - a contender failure becomes a row, the run goes on
        row.update(failure(e, device, limit=8))
    return row


def cross_check_steps(rows: list[dict]) -> None:
    """Check each step row's first-step loss drop against its objective's independent implementation, in place.

    Every contender starts from the same weights, data, optimizer and learning rate, so the loss after the first
    optimizer step is the same for every correct implementation of an objective (to rounding): a row whose drop
    differs from the oracle row's (official TPO for TPO, TRL's DPOTrainer for DPO) by more than `DROP_RTOL` becomes
    `failed check`. This catches what the first loss (ln 2 for any scoring, with policy = reference) cannot: the
    wrong tokens scored, the wrong loss, a gradient lost. Rows without an oracle in the run are noted, not failed.

    The drop is blind to the gradients' sizes (AdamW's first update is their sign), so each row's first-step gradient
    norms, per trained tensor, must also be the oracle's within the same tolerance (`_check_first_grads`).

    And every row must train as many parameters as the oracles (`trained_params`, what its optimizer steps; the
    oracles of both objectives train the same ones): a row that trains other parameters fails its check, whatever
    its loss drop (a frozen vision tower moves the first drop by little).
    """
    steps = [r for r in rows if r.get("workload") == "step" and r.get("status") == "ok" and r.get("losses")]
    _check_trained_params(steps)
    steps = [r for r in steps if r["status"] == "ok"]
    for objective in {r.get("objective") for r in steps}:
        mine = [r for r in steps if r.get("objective") == objective]
        oracle = next((r for r in mine if r.get("oracle")), None)
        for r in mine:
            if r is oracle:
                continue
            errors = r.setdefault("check", {"ok": True, "errors": {}}).setdefault("errors", {})
            if oracle is None:
                errors["first_drop_vs_oracle"] = {"err": None, "tol": None,
                                                  "note": f"no independent {objective} step in this run"}
                continue
            _check_first_drop(r, oracle, errors, objective)
            _check_first_grads(r, oracle, errors, objective)


def _check_first_drop(r: dict, oracle: dict, errors: dict, objective: str) -> None:
    """Fail `r`, in place, when its first loss drop is not the oracle's (a 16-bit oracle drop within noise: noted)."""
    want = oracle["losses"][0] - oracle["losses"][1]
    got = r["losses"][0] - r["losses"][1]
    dtype = r.get("dtype", "fp32")
    if dtype != "fp32" and not abs(want) >= MIN_DROP_16BIT:
        errors["first_drop_vs_oracle"] = {"err": None, "tol": None, "oracle": oracle["contender"],
                                          "note": f"the oracle's first drop {want:.3g} is within {dtype} noise"}
        return
    tol = DROP_RTOL.get(dtype, DROP_RTOL["bf16"])
    err = abs(got - want) / max(abs(want), 1e-12)
    errors["first_drop_vs_oracle"] = {"err": err, "tol": tol, "oracle": oracle["contender"]}
    if not err <= tol:
        r["check"]["ok"] = False
        r.update(status="failed check",
                 reason=f"its first optimizer step lowers the loss by {got:.6g}, {oracle['label']}'s by "
                        f"{want:.6g} ({err:.1%} apart, tolerance {tol:.0%}): it does not train the same "
                        f"{objective.upper()} objective")


def _check_first_grads(r: dict, oracle: dict, errors: dict, objective: str) -> None:
    """Fail `r`, in place, when its first step's per-tensor gradient norms (`first_grad_norms`) are not the oracle's
    within `DROP_RTOL`; rows without them (either side) are not judged. The loss drop cannot see a gradient's scale:
    AdamW's first update is the sign of each gradient element (m / sqrt(v) = g / |g|), so a step whose gradients have
    the right signs and wrong sizes (halved, one tensor's ten times too large) lowers the loss exactly as much."""
    got, want = r.get("first_grad_norms"), oracle.get("first_grad_norms")
    if got is None or want is None:
        return
    dtype = r.get("dtype", "fp32")
    tol = DROP_RTOL.get(dtype, DROP_RTOL["bf16"])
    err, worst = grad_norms_error(got, want)
    errors["first_grads_vs_oracle"] = {"err": err, "tol": tol, "oracle": oracle["contender"], "worst": worst}
    if not err <= tol:
        r["check"]["ok"] = False
        if r["status"] == "ok":  # a failed drop's reason stays the row's reason
            which = (f"tensor {worst}: gradient norm {got[worst]:.6g}, {oracle['label']}'s {want[worst]:.6g}"
                     if worst in got and worst in want else f"other tensors ({worst})")
            r.update(status="failed check",
                     reason=f"its first step's gradients are not {oracle['label']}'s ({which}, {err:.1%} apart, "
                            f"tolerance {tol:.0%}): it does not train the same {objective.upper()} objective")


def _check_trained_params(steps: list[dict]) -> None:
    """Fail, in place, each step row whose optimizer steps another number of parameters than the first oracle's."""
    oracle = next((r for r in steps if r.get("oracle") and r.get("trained_params") is not None), None)
    if oracle is None:
        return
    want = oracle["trained_params"]
    for r in steps:
        got = r.get("trained_params")
        if r is oracle or got is None:
            continue
        errors = r.setdefault("check", {"ok": True, "errors": {}}).setdefault("errors", {})
        errors["trained_params"] = {"err": None, "tol": None, "got": got, "want": want, "oracle": oracle["contender"]}
        if got != want:
            r["check"]["ok"] = False
            r.update(status="failed check",
                     reason=f"its optimizer steps {got:,} parameters, {oracle['label']}'s {want:,}: it does not "
                            f"train the same parameters")


# What any step contender imports (most of them lazily, at their first use): the Hugging Face LLaVA modules, the
# Trainer, tpo_fast's trainer, peft, TRL's DPOTrainer and its `datasets`, DeepSpeed (which accelerate loads when a
# Trainer is built, where installed) and Liger (TRL's `use_liger_kernel` trial). Some 290 MiB on a CPU.
STEP_LIBRARIES = (
    "transformers.models.llava.modeling_llava", "transformers.models.llama.modeling_llama",
    "transformers.models.clip.modeling_clip", "transformers.trainer", "tpo_fast.trainer.trainer",
    "tpo_fast.trainer.config", "peft", "datasets", "trl.trainer.dpo_trainer", "deepspeed",
    "liger_kernel.transformers",
)


def import_libraries() -> list[str]:
    """Import every library of `STEP_LIBRARIES` that is installed, for every contender alike, before `measure_step`
    takes the memory base (`_Total`): the total peak then holds what the contender's build and step allocate
    (weights, reference, optimizer state, the step), not the import of the modules it happens to load first (on a
    CPU these were most of step-tiny's 308 to 351 MiB totals, 43 MiB more for TRL's than for the official
    structure's). Returns the ones that are not installed."""
    import importlib

    missing = []
    for name in STEP_LIBRARIES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - not installed, or not importable here: its contender says so itself
            missing.append(name)
    return missing


def run_step_contender(job: dict) -> list[dict]:
    """Child-process entry for a step case: the one row of (case, contender)."""
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    case = STEP_CASES[job["case"]["name"]]
    if job.get("search_s") is not None:
        case = dataclasses.replace(case, search_s=job["search_s"])
    c = step_contenders()[job["contender"]]
    import_libraries()
    row = measure_step(c, case, job)
    row.update(contender=c.name, label=c.label_for("step"), kind=c.kind, workload="step",
               unshared=getattr(c, "unshared", None))
    return [row]
