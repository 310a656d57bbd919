"""The benchmark runner end to end on a tiny CPU case, and its correctness guard."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import methods_reference
import pytest
import torch
from _bench import BENCH
from _bench import bench_modules as _bench


def _bench_modules():
    return _bench("_contenders", "_measure", "_workloads")


def _report_modules():
    return _bench("_derive", "_measure", "_report")


def _grad_mode_landed() -> bool:
    contenders, _, _ = _bench_modules()
    return contenders.ours.grad_mode_default("tpo") is not None


def test_guard_rejects_a_wrong_contender_and_times_a_right_one():
    contenders, measure, workloads = _bench_modules()
    case = workloads.CASES["cpu-tiny"]
    cfg = {"device": "cpu", "dtype": "fp32", "seed": 0, "warmup": 1, "repeats": 2}
    for c in (contenders.Broken(), contenders.Naive()):
        c.setup("cpu")
    bad = measure.measure_workload(contenders.Broken(), case, "dpo", cfg)
    assert bad["status"] == "failed check", bad
    assert "not timed" in bad["reason"] and "full_ms" not in bad and "fwd_ms" not in bad
    good = measure.measure_workload(contenders.Naive(), case, "tpo", cfg)
    assert good["status"] == "ok", good
    assert good["check"]["ok"] and len(good["full_ms"]["times"]) == 2
    assert set(good["check"]["errors"]) == {"out", "hidden", "corrupted_hidden", "weight"}


def _v4():
    """D=16, V=4, N=32: a vocabulary of 4, where target id 0 is common."""
    return _bench_modules()[2].Case("v4", 16, 4, 32)


def _guard_at_v4(contender, workload: str) -> dict:
    """The guard's row for `contender` on `workload` at a vocabulary of 4, where target id 0 is common (fp32, one
    timed call): a contender whose safe-index clamp moved real 0s (to 1, say) fails it."""
    _, measure, _ = _bench_modules()
    cfg = {"device": "cpu", "dtype": "fp32", "seed": 0, "warmup": 0, "repeats": 1}
    return measure.measure_workload(contender, _v4(), workload, cfg)


@pytest.mark.parametrize("workload", ["primitive", "tpo", "dpo", "povid", "fisao", "logits"])
def test_guard_passes_every_contender_that_runs_here_and_rejects_the_scaled_baseline(workload):
    """Every loss contender that can run on this machine (the baseline, the peers, tpo_fast's backends and paths)
    passes the guard on each workload it runs, and the guard's self-test (the baseline's output times 1.1) fails
    it, at a vocabulary of 4 (`_guard_at_v4`)."""
    contenders, _, workloads = _bench_modules()
    inp = workloads.make_inputs(_v4(), workload, "cpu", torch.float32, 0)
    targets = inp["targets"].flatten()
    assert (targets == 0).sum() >= 4 and (targets == workloads.IGNORE_INDEX).any()
    ran = []
    for name, c in contenders.all_contenders(contenders.TPO_FAST_BACKENDS).items():
        if c.family != "loss" or c.kind in ("floor", "selftest") or workload not in c.workloads:
            continue
        if c.availability("cpu", workload) is not None:
            continue
        c.setup("cpu")
        row = _guard_at_v4(c, workload)
        assert row["status"] == "ok" and row["check"]["ok"], (name, row)
        ran.append(name)
    assert "naive" in ran and "tpo_fast-torch" in ran
    broken = contenders.Broken()
    broken.setup("cpu")
    assert _guard_at_v4(broken, workload)["status"] == "failed check"


@pytest.mark.slow
def test_guard_passes_cut_cross_entropy_on_the_cpu_where_it_is_asked_for():
    """Cut Cross-Entropy's CPU implementation (`--contenders cce` on a CPU: torch.compile, about 20 s to compile)
    passes the guard on every workload it runs, at a vocabulary of 4 (`_guard_at_v4`)."""
    pytest.importorskip("cut_cross_entropy")
    contenders, _, _ = _bench_modules()
    cce = contenders.CCE(allow_cpu=True)  # its availability and set-up: tests/test_bench_contenders.py
    cce.setup("cpu")
    assert sorted(cce.workloads) == ["dpo", "fisao", "primitive", "tpo"]
    for workload in cce.workloads:
        row = _guard_at_v4(cce, workload)
        assert row["status"] == "ok" and row["check"]["ok"], (workload, row)


def test_memory_and_time_phases_measure_only_their_part():
    """A "memory" child measures the peaks and runs the guard but times nothing; a "time" child times but
    measures no peak; an unknown phase is refused before any work."""
    contenders, measure, workloads = _bench_modules()
    case = workloads.CASES["cpu-tiny"]
    c = contenders.Naive()
    c.setup("cpu")
    cfg = {"device": "cpu", "dtype": "fp32", "seed": 0, "warmup": 0, "repeats": 2}
    memory = measure.measure_workload(c, case, "tpo", {**cfg, "phase": "memory"})
    assert memory["status"] == "ok" and memory["check"]["ok"], memory
    assert "full_peak_mib" in memory and "fwd_peak_mib" in memory
    assert "full_ms" not in memory and "fwd_ms" not in memory
    timed = measure.measure_workload(c, case, "tpo", {**cfg, "phase": "time"})
    assert timed["status"] == "ok" and len(timed["full_ms"]["times"]) == 2 and len(timed["fwd_ms"]["times"]) == 2
    assert "full_peak_mib" not in timed and "fwd_peak_mib" not in timed and "check" not in timed
    with pytest.raises(ValueError, match=r"^phase must be one of \('all', 'memory', 'time'\), got 'timing'$"):
        measure.measure_workload(c, case, "tpo", {**cfg, "phase": "timing"})


def _fake_children(run, monkeypatch, memory_status: dict, times: dict):
    """`run._run_child` replaced: memory rows with `memory_status[workload]`, time rows whose fwd+bwd
    times come from `times[contender]` (popped, one list per round); every call is logged."""
    calls = []

    def fake_child(job, timeout, env=None):
        calls.append((job["phase"], job["contender"], list(job["workloads"]), job["repeats"], dict(env or {})))
        if job["phase"] == "memory":
            rows = [{"contender": job["contender"], "workload": w, "status": memory_status[w], "full_peak_mib": 7.0}
                    for w in job["workloads"]]
            return rows, {}, ""
        got = times[job["contender"]].pop(0)
        assert len(got) == job["repeats"]
        median = sorted(got)[len(got) // 2]
        return [{"contender": job["contender"], "workload": w, "status": "ok",
                 "full_ms": {"median": median, "times": got},
                 "full_tflops": 6.0 / median} for w in job["workloads"]], {}, ""

    monkeypatch.setattr(run, "_run_child", fake_child)
    return calls


def _fake_plan(run, device: str, repeats: int, rounds: int) -> dict:
    contenders, _, workloads = _bench_modules()
    names = ["naive", "floor"]
    known = contenders.all_contenders(("torch",))
    return {"device": device, "contenders": {n: known[n] for n in names}, "names": names,
            "workloads": ["tpo", "dpo"], "backends": ("torch",), "dtype": "fp32", "repeats": repeats,
            "rounds": rounds, "warmup": 1, "seed": 0, "threads": None, "search_s": None, "timeout": 60.0}


def test_cpu_rows_take_memory_from_a_pinned_child_and_times_from_default_ones_in_rounds(monkeypatch):
    """On CPU: every contender's memory child (glibc's mmap threshold pinned) first; then the time children
    (the environment as it is) round by round, every contender in turn, only for the rows that passed the
    memory child's guard; the rows merge the memory fields and the times of every round."""
    (run,) = _bench("run")
    _, _, workloads = _bench_modules()
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    times = {"naive": [[10.0, 30.0], [20.0]], "floor": [[1.0, 1.0], [4.0]]}
    calls = _fake_children(run, monkeypatch, {"tpo": "ok", "dpo": "failed check"}, times)
    rows = run._run_case(workloads.CASES["cpu-tiny"], _fake_plan(run, "cpu", 3, 2), {})
    pinned = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    assert calls == [
        ("memory", "naive", ["tpo", "dpo"], 3, pinned), ("memory", "floor", ["tpo", "dpo"], 3, pinned),
        ("time", "naive", ["tpo"], 2, {}), ("time", "floor", ["tpo"], 2, {}),
        ("time", "naive", ["tpo"], 1, {}), ("time", "floor", ["tpo"], 1, {}),
    ]
    by = {(r["contender"], r["workload"]): r for r in rows}
    naive = by[("naive", "tpo")]
    assert naive["full_ms"]["times"] == [10.0, 30.0, 20.0] and naive["full_ms"]["median"] == 20.0
    assert naive["round_medians_ms"] == [30.0, 20.0] and naive["full_peak_mib"] == 7.0
    assert naive["full_tflops"] == pytest.approx(6.0 / 20.0)  # the rate follows the merged median
    assert by[("floor", "tpo")]["full_ms"]["times"] == [1.0, 1.0, 4.0]
    assert by[("naive", "dpo")]["status"] == "failed check" and "full_ms" not in by[("naive", "dpo")]
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ  # the parent's own environment is left as it was
    # A user's own threshold is kept for the memory child; CUDA runs one child per contender that does both.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    calls = _fake_children(run, monkeypatch, {"tpo": "ok", "dpo": "ok"}, {"naive": [[1.0]], "floor": [[1.0]]})
    run._run_case(workloads.CASES["cpu-tiny"], _fake_plan(run, "cpu", 1, 1), {})
    assert [(c[0], c[4]) for c in calls][:2] == [("memory", {"MALLOC_MMAP_THRESHOLD_": "131072"})] * 2
    assert [c[0] for c in calls][2:] == ["time", "time"] and calls[2][4] == {}
    calls = _fake_children(run, monkeypatch, {"tpo": "ok", "dpo": "ok"}, {})
    calls.clear()
    monkeypatch.setattr(run, "_run_child", lambda job, timeout, env=None: (
        calls.append(job["phase"]) or ([{"contender": job["contender"], "workload": w, "status": "ok",
                                         "full_ms": {"median": 1.0}} for w in job["workloads"]], {}, "")))
    run._run_case(workloads.CASES["cpu-tiny"], _fake_plan(run, "cuda", 2, 1), {})
    assert calls == ["all", "all"]


class _Clock:
    """A stand-in for `run.time`: `time()` reads `now`, which the fake children advance."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now


def test_deadline_gives_each_child_what_is_left_and_lists_the_rest_as_not_run(monkeypatch):
    """--deadline-s: a child's timeout is min(--timeout, time left); a child killed at the deadline and the
    contenders never reached are `not run` rows (named in the not-run line, not failures), the others keep
    their results."""
    (run, report) = _bench("run", "_report")
    _, _, workloads = _bench_modules()
    clock = _Clock()
    monkeypatch.setattr(run, "time", clock)
    timeouts = []

    def fake_child(job, timeout, env=None):
        timeouts.append(timeout)
        clock.now += 50.0
        if len(timeouts) == 2:
            return None, {}, f"killed after {timeout:.0f} s"
        return [{"contender": job["contender"], "workload": w, "status": "ok", "full_ms": {"median": 1.0}}
                for w in job["workloads"]], {}, ""

    monkeypatch.setattr(run, "_run_child", fake_child)
    plan = _fake_plan(run, "cuda", 2, 1)
    known = plan["contenders"] | _bench_modules()[0].all_contenders(("torch",))
    plan.update(names=["naive", "floor", "trl", "floor-valid"], contenders=known, workloads=["tpo"],
                timeout=100.0, deadline=120.0, deadline_s=120.0)
    rows = run._run_case(workloads.CASES["cpu-tiny"], plan, {})
    assert timeouts == [100.0, 70.0, 20.0]  # the fourth contender's child never started
    status = {r["contender"]: (r["status"], r.get("reason", "")) for r in rows}
    assert status["naive"][0] == status["trl"][0] == "ok"
    assert status["floor"] == ("not run", "the run's deadline (--deadline-s 120) came while it ran")
    assert status["floor-valid"] == ("not run", "the run's deadline (--deadline-s 120) came before it started")
    line = report.not_run_line(rows)
    assert "came while it ran" in line and "came before it started" in line
    # On CPU, rows measured by their memory child but never timed before the deadline are `not run` too.
    clock.now = 0.0
    calls = _fake_children(run, monkeypatch, {"tpo": "ok", "dpo": "ok"}, {"naive": [[1.0]], "floor": [[1.0]]})
    plan = {**_fake_plan(run, "cpu", 1, 1), "deadline": -1.0, "deadline_s": 5.0}
    rows = run._run_case(workloads.CASES["cpu-tiny"], plan, {})
    assert calls == [] and {r["status"] for r in rows} == {"not run"}
    plan["deadline"] = 10.0
    calls = _fake_children(run, monkeypatch, {"tpo": "ok", "dpo": "ok"}, {"naive": [[1.0]], "floor": [[1.0]]})
    monkeypatch.setattr(run, "_run_child", lambda job, timeout, env=None, f=run._run_child: (
        setattr(clock, "now", clock.now + 6.0), f(job, timeout, env))[1])
    rows = run._run_case(workloads.CASES["cpu-tiny"], plan, {})
    assert [c[0] for c in calls] == ["memory", "memory"]  # the clock passed 10 s before any time child
    assert {(r["status"], r["reason"]) for r in rows} == {
        ("not run", "the run's deadline (--deadline-s 5) came before its timed calls")}


def test_step_flop_count_includes_cpu_attention_and_in_place_addmm():
    """torch's FlopCounterMode has no formula for the CPU flash attention kernels nor for `addmm_`; the step
    workload's count adds them: attention forward 4·B·H·Lq·Lk·d, backward 10·B·H·Lq·Lk·d (two and five
    matmuls of 2·B·H·Lq·Lk·d); `acc.addmm_(a, b)` 2·m·k·n, the fused loss's dW accumulation."""
    (measure_step,) = _bench("_measure_step")
    from torch.utils.flop_counter import FlopCounterMode

    def counted(fn) -> int:
        with FlopCounterMode(display=False, custom_mapping=measure_step._missing_flop_formulas()) as counter:
            fn()
        return counter.get_total_flops()

    q = torch.randn(2, 4, 24, 16, requires_grad=True)
    kv = torch.randn(2, 4, 40, 16, requires_grad=True)
    out = []
    assert counted(lambda: out.append(torch.nn.functional.scaled_dot_product_attention(q, kv, kv))) == \
        4 * 2 * 4 * 24 * 40 * 16
    assert counted(lambda: out[0].sum().backward()) == 10 * 2 * 4 * 24 * 40 * 16
    acc, a, b = torch.zeros(6, 5), torch.randn(6, 3), torch.randn(3, 5)
    assert counted(lambda: acc.addmm_(a, b)) == 2 * 6 * 3 * 5 == counted(lambda: torch.addmm(acc, a, b))
    # The fused TPO loss's whole gradient, chunk after chunk: 6NDV over the valid rows, whatever the chunking.
    from tpo_fast.loss import dpo_loss
    from tpo_fast.ops.options import kernel_options

    n_valid, d, v = 2 * 2 * 7, 8, 64
    w = torch.randn(v, d, requires_grad=True)
    h = torch.randn(4, 7, d, requires_grad=True)
    y = torch.randint(0, v, (4, 7))
    for chunk_rows in (7, 1000):  # two chunks (one pair each, over the budget), then one
        with kernel_options(chunk_mb=chunk_rows * 4 * v / 2**20):
            assert counted(lambda: dpo_loss(w, h, y, ref_seq_scores=torch.zeros(4)).loss.backward()) == \
                6 * n_valid * d * v


def test_step_check_fails_a_contender_that_does_not_train():
    """The first loss is ln 2 for any scoring (policy = reference), so the step check also requires the loss to fall
    after one optimizer step: a step without backward and optimizer step used to pass and be timed."""
    (measure_step, step_contenders, step_workload, workloads) = _bench(
        "_measure_step", "_contenders.step", "_workloads.step", "_workloads")
    import dataclasses

    class NoTraining(step_contenders.OfficialTPOStep):
        def train_step(self, batch):
            with torch.no_grad():
                chosen, rejected = self._scores(self.policy, batch)
                ref_chosen, ref_rejected = self._scores(self.reference, batch)
            margin = (chosen - rejected) - (ref_chosen - ref_rejected)
            return float(-torch.nn.functional.logsigmoid(workloads.BETA * margin).mean())

    case = dataclasses.replace(step_workload.STEP_CASES["step-tiny"], search_s=0)
    cfg = {"device": "cpu", "phase": "time", "seed": 0, "warmup": 1, "repeats": 2}
    row = measure_step.measure_step(NoTraining(), case, cfg)
    assert row["status"] == "failed check" and "nothing was trained" in row["reason"], row
    assert row["check"]["ok"] is False and row["check"]["errors"]["first_drop"]["drop"] == 0


@pytest.mark.parametrize("name", ["official-tpo", "ours-tpo", "trl-dpo"])
def test_step_contenders_run_their_lora_matmuls_under_bf16_autocast(name):
    """A bf16 LoRA case: peft keeps the adapters in fp32, and `Trainer.train()` runs the step under the mixed-
    precision autocast (accelerate's `prepare`), as the official code runs under `torch.autocast`. The bench calls
    `training_step` itself, and once skipped that preparation: the trainers' LoRA matmuls ran in fp32 (on the
    H200 the tpo_fast TPO step took 2.2 s against the official structure's 1.7 s)."""
    if name == "trl-dpo":
        pytest.importorskip("trl")
    import dataclasses

    (step_contenders, step_workload) = _bench("_contenders.step", "_workloads.step")
    case = dataclasses.replace(step_workload.STEP_CASES["step-tiny"], dtype="bf16", lora=True, lora_rank=4,
                               search_s=0)
    data = step_workload.StepData(case)
    contender = step_contenders.step_contenders()[name]
    contender.build(case, data, "cpu")
    model = contender.policy if name == "official-tpo" else contender.trainer.model
    seen = []
    adapters = [m for n, m in model.named_modules() if n.endswith("lora_A.default")]
    assert adapters and all(m.weight.dtype == torch.float32 for m in adapters)  # what peft gives a bf16 model
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype)))
             for m in adapters]
    try:
        contender.train_step(contender.batch(case.pairs))
    finally:
        for h in hooks:
            h.remove()
    assert seen and set(seen) == {(True, torch.bfloat16)}, set(seen)
    # what its optimizer steps, which `cross_check_steps` compares across contenders: the adapters' numbers, all
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert lora > 0 and contender.trained_params() == lora


def test_sdpa_step_contender_turns_the_varlen_call_off(monkeypatch):
    """`ours-tpo-shared-sdpa`, the A/B of the one-call varlen attention: off CUDA it is the same step as
    `ours-tpo-shared` and is not run; built, it sets TPO_FAST_VARLEN=0 in its own process, so its trainer's packed
    rows are attended with SDPA (its note says so); it is compared with the unshared step like its twin."""
    import dataclasses

    from tpo_fast.ops.options import ENV_VARS

    VARLEN_ENV = ENV_VARS["varlen"]

    (step_contenders, step_workload) = _bench("_contenders.step", "_workloads.step")
    contender = step_contenders.step_contenders()["ours-tpo-shared-sdpa"]
    assert contender.availability("cpu", "step") == (
        "the same step as ours-tpo-shared off CUDA (the varlen call runs on CUDA only)")
    assert contender.unshared == "ours-tpo" and f"{VARLEN_ENV}=0" in contender.note()
    monkeypatch.delenv(VARLEN_ENV, raising=False)
    case = dataclasses.replace(step_workload.STEP_CASES["step-tiny"], search_s=0)
    monkeypatch.setenv(VARLEN_ENV, "1")  # restored after the test
    contender.build(case, step_workload.StepData(case), "cpu")
    assert os.environ[VARLEN_ENV] == "0"
    assert step_contenders.step_contenders()["ours-tpo-shared"].availability("cpu", "step") is None


def test_cached_reference_verdict_counts_the_cache_scoring():
    """The cached-reference step moves the reference's scoring out of the timed step; its verdict against a step
    that pays for its reference also gives the ratio with that scoring spread over one pass over the data."""
    (report,) = _bench("_report")

    def timed(ms):
        return {"median": ms, "p25": ms * 0.99, "p75": ms * 1.01, "times": [ms] * 3}

    official = {"contender": "official-tpo", "label": "official", "full_ms": timed(18800.0)}
    cached = {"contender": "ours-tpo-shared-refcache", "label": "cached", "full_ms": timed(4110.0), "pairs": 4,
              "reference_cache_s_per_pair": 0.41}
    text = report._step_verdict([official, cached])
    assert report.amortized_ratio(cached, official) == pytest.approx(18800.0 / (4110.0 + 0.41 * 4 * 1e3))
    assert ("cached 4.57x the tokens/s of official (3.27x counting the cache's scoring in a one-epoch run, 0.41 s "
            "per pair, paid once per data set: 1.64 s per step of 4 pairs over one epoch)") in text


def test_rounds_split_the_repeats_and_are_checked():
    (run,) = _bench("run")
    assert run.round_repeats(5, 2) == [3, 2] and run.round_repeats(6, 3) == [2, 2, 2] and run.round_repeats(1, 1) == [1]
    import torch as _torch

    with pytest.raises(SystemExit, match=r"^--rounds must be between 1 and --repeats \(2\), got 3$"):
        run._settings(run.parse_args(["--device", "cpu", "--repeats", "2", "--rounds", "3"]), _torch)
    assert run._settings(run.parse_args(["--device", "cpu", "--repeats", "4", "--rounds", "2"]), _torch)["rounds"] == 2
    with pytest.raises(SystemExit, match=r"^--deadline-s must be a finite number of seconds > 0, got 0$"):
        run._settings(run.parse_args(["--device", "cpu", "--deadline-s", "0"]), _torch)
    plan = run._settings(run.parse_args(["--device", "cpu", "--deadline-s", "30"]), _torch)
    assert plan["deadline_s"] == 30.0 and 0 < plan["deadline"] - run.time.time() <= 30.0


def test_a_child_gets_its_environment_and_the_parent_keeps_its_own(monkeypatch):
    """`_run_child(env=...)` hands the variables to the spawned child only (glibc reads them at its start)."""
    (run,) = _bench("run")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    seen = {}

    class FakeProcess:
        def __init__(self, target, args, daemon):
            self.conn = args[1]

        def start(self):
            seen["env"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")
            self.conn.send(("ok", [], {}))

        def join(self, timeout=None):
            pass

        def is_alive(self):
            return False

    class FakeContext:
        Pipe = staticmethod(__import__("multiprocessing").Pipe)
        Process = FakeProcess

    monkeypatch.setattr(run.mp, "get_context", lambda method: FakeContext())
    assert run._run_child({}, 5.0, {"MALLOC_MMAP_THRESHOLD_": "65536"}) == ([], {}, "")
    assert seen["env"] == "65536" and "MALLOC_MMAP_THRESHOLD_" not in os.environ
    assert run._run_child({}, 5.0, {}) == ([], {}, "") and seen["env"] is None


@pytest.mark.parametrize("workload", ["logits", "povid", "fisao"])
def test_guard_on_the_added_workloads(workload):
    """The naive (official-style) contender passes the oracle's check on logits, povid and fisao, in fp32
    and bf16, and the deliberately wrong one is rejected."""
    contenders, measure, workloads = _bench_modules()
    case = workloads.CASES["cpu-tiny"]
    for dtype in ("fp32", "bf16"):
        cfg = {"device": "cpu", "dtype": dtype, "seed": 0, "warmup": 0, "repeats": 1}
        good = measure.measure_workload(contenders.Naive(), case, workload, cfg)
        assert good["status"] == "ok", good
        assert set(good["check"]["errors"]) == {"out", *workloads.GRAD_INPUTS[workload]}
    bad = measure.measure_workload(contenders.Broken(), case, workload, cfg)
    assert bad["status"] == "failed check" and "full_ms" not in bad, bad


def test_fisao_guard_rejects_a_loss_without_its_kl_term():
    """The reference log-probs are drawn a log-prob apart from the policy's, so FiSAO's KL term is well above the
    bf16 tolerance: a contender that drops it (the reference set to its own log-probs, k3 = 0) fails the check in
    fp32 and in bf16 (with the reference 0.2 apart it passed in bf16)."""
    contenders, measure, workloads = _bench_modules()
    naive_mod = sys.modules["_contenders.naive"]

    class NoKL(contenders.Naive):
        def run(self, workload, inp):
            logp, _ = contenders.Naive._logp_and_z(inp["hidden"], inp["weight"], inp["targets"])
            return naive_mod.fisao_from_logp(logp, {**inp, "ref_logprobs": logp.detach()})

    case = workloads.CASES["cpu-small"]
    for dtype in ("fp32", "bf16"):
        cfg = {"device": "cpu", "dtype": dtype, "seed": 0, "warmup": 1, "repeats": 1}
        bad = measure.measure_workload(NoKL("no-kl"), case, "fisao", cfg)
        assert bad["status"] == "failed check", (dtype, bad["check"])


@pytest.mark.parametrize("upstream", [1.0, 1e-3])
def test_streamed_logits_check_matches_the_full_oracle(upstream):
    """The guard compares (N, V) logits gradients chunk by chunk; same errors as the full fp32 oracle, whose own
    chunking changes nothing, also where the gradients are all far below 1 (a small upstream gradient); a missing
    or NaN gradient is an infinite error."""
    contenders, measure, w = _bench_modules()
    inp = w.make_inputs(w.Case("t", 16, 96, 64), "logits", "cpu", torch.bfloat16)
    inp["grad_logprobs"] = inp["grad_logprobs"] * upstream
    out = contenders.Naive().run("logits", inp)
    (out * inp["grad_logprobs"]).sum().backward()
    got = {"out": out, "logits": inp["logits"].grad, "corrupted_logits": inp["corrupted_logits"].grad}
    streamed = w.logits_errors(inp, got, torch.bfloat16, chunk=7)
    ref, yard = w.oracle("logits", inp), w.oracle("logits", inp, round_to=torch.bfloat16)
    for k, r in w.oracle("logits", inp, chunk=7).items():
        assert torch.equal(r, ref[k]), k
    assert float(ref["logits"].abs().max()) < (1.0 if upstream < 1 else float("inf"))
    for k, r in ref.items():
        assert streamed[k][0] == pytest.approx(measure._rel_err(got[k], r), rel=1e-5, abs=1e-9)
        assert streamed[k][1] == pytest.approx(measure._rel_err(yard[k], r), rel=1e-5, abs=1e-9)
    nan = got["corrupted_logits"].clone()
    nan[3, 5] = float("nan")
    broken = w.logits_errors(inp, {**got, "logits": None, "corrupted_logits": nan}, None, chunk=7)
    assert broken["logits"] == (math.inf, 0.0) and broken["corrupted_logits"] == (math.inf, 0.0)


def test_oracle_matches_materialized_autograd():
    _, _, w = _bench_modules()
    case = w.Case("t", 16, 64, 32)
    inp = w.make_inputs(case, "tpo", "cpu", torch.float32)
    ref = w.oracle("tpo", inp, chunk=5)
    y = inp["targets"]

    def stats(h, wt):
        logits = h.float() @ wt.float().t()
        safe = y.clamp(min=0)[..., None]
        return torch.log_softmax(logits, -1).gather(-1, safe)[..., 0], logits.gather(-1, safe)[..., 0]

    logp, z = stats(inp["hidden"], inp["weight"])
    _, zc = stats(inp["corrupted_hidden"], inp["weight"])
    with torch.no_grad():
        rl, rz = stats(inp["ref_hidden"], inp["ref_weight"])
        _, rzc = stats(inp["ref_corrupted_hidden"], inp["ref_weight"])
    loss = w.preference_loss(logp, rl, y != w.IGNORE_INDEX, z - zc, rz - rzc)
    loss.backward()
    torch.testing.assert_close(ref["out"], loss.detach())
    for k in ("hidden", "corrupted_hidden", "weight"):
        torch.testing.assert_close(ref[k], inp[k].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("workload", ["povid", "fisao", "dpo"])
def test_oracles_match_the_methods_references_on_materialized_logits(workload):
    """The guard's POVID, FiSAO and DPO oracles (two passes, logits rebuilt chunk by chunk, three rows a chunk here)
    against tests/methods_reference.py, written apart from bench/ from the methods' papers, on full logits."""
    _, _, w = _bench_modules()
    inp = w.make_inputs(w.Case("t", 8, 64, 32), workload, "cpu", torch.float32, seed=5)  # D < the valid rows
    ref = w.oracle(workload, inp, chunk=3)
    y = inp["targets"]
    if workload == "povid":
        loss, _ = methods_reference.povid_loss_reference(
            inp["hidden"], inp["corrupted_hidden"], y, inp["weight"], None,
            inp["ref_hidden"], inp["ref_corrupted_hidden"], inp["ref_weight"], None, beta=0.1, noise_weight=0.5)
    elif workload == "fisao":
        loss = methods_reference.pg_loss_reference(inp["hidden"], y, inp["weight"], None, inp["old_logprobs"],
                                                   inp["ref_logprobs"], inp["advantages"], clip_eps=0.2, kl_coef=0.05)
    else:
        def scores(h, wt):
            mask = y != w.IGNORE_INDEX
            return methods_reference.masked_gather(methods_reference.logits_of(h, wt, None).log_softmax(-1), y,
                                                   mask).sum(-1)

        s = scores(inp["hidden"], inp["weight"])
        with torch.no_grad():
            r = scores(inp["ref_hidden"], inp["ref_weight"])
        b = y.shape[0] // 2
        loss, _, _ = methods_reference.dpo_losses(s[:b], s[b:], r[:b], r[b:], 0.1)
        loss = loss.mean()
    loss.backward()
    torch.testing.assert_close(ref["out"], loss.detach(), rtol=1e-5, atol=1e-6)
    for k in ("hidden", "weight"):
        torch.testing.assert_close(ref[k], inp[k].grad, rtol=1e-4, atol=1e-6)


def test_tpo_inputs_are_correlated_perturbations_of_the_clean_branch():
    """bench/_workloads/preference.py's promise (docs: "close to the policy's", "correlated perturbations"): the
    reference's hidden states are the policy's plus N(0, 0.1^2), its weight the policy's plus N(0, 0.01 / D); the
    corrupted image's hidden states the clean ones plus N(0, 0.5^2), the reference's corrupted ones those plus
    N(0, 0.1^2) again; every perturbation drawn per element (no row or sequence repeats another's)."""
    _, _, w = _bench_modules()
    case = w.CASES["cpu-small"]
    inp = w.make_inputs(case, "tpo", "cpu", torch.float32, seed=0)
    h = inp["hidden"].detach()
    for delta, std in ((inp["ref_hidden"] - h, 0.1), (inp["corrupted_hidden"].detach() - h, 0.5),
                       (inp["ref_corrupted_hidden"] - inp["corrupted_hidden"].detach(), 0.1),
                       (inp["ref_weight"] - inp["weight"].detach(), 0.1 / case.d**0.5)):
        assert abs(delta.mean().item()) < 0.02 * std and abs(delta.std().item() / std - 1) < 0.02, std
        flat = delta.reshape(-1, delta.shape[-1])
        for other in (flat[1], flat[case.seq_len]):  # the next row; the same row of the next sequence
            assert (flat[0] - other).abs().max() > std


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_povid_inputs_give_the_corrupted_branch_a_clear_argmax_half_of_it_the_chosen_token(dtype):
    """bench/_workloads/povid.py's promise: the corrupted hidden states are lifted along W[a] so that logit a
    leads by a clear margin (bf16 rounding of a logit near 20, 0.125, cannot flip the argmax), by at most the lift
    (ARGMAX_LIFT = 20), and a is the chosen token at about half the positions, another token at the rest; the
    reference's corrupted branch leads as clearly."""
    _, _, w = _bench_modules()
    case = w.CASES["cpu-small"]
    inp = w.make_inputs(case, "povid", "cpu", dtype, seed=0)
    b = case.n_seq // 2
    weight = inp["weight"].detach().float()
    for key, wt in (("corrupted_hidden", weight), ("ref_corrupted_hidden", inp["ref_weight"].float())):
        logits = inp[key].detach().float().reshape(-1, case.d) @ wt.t()
        top = logits.topk(2, -1).values
        margin = top[:, 0] - top[:, 1]
        assert margin.min() > 1.0 and margin.max() < 20.0, (key, margin.min(), margin.max())
        if key == "corrupted_hidden":
            argmax = logits.argmax(-1)
    chosen = inp["targets"][:b].reshape(-1)
    valid = chosen != w.IGNORE_INDEX
    same = (argmax[valid] == chosen[valid]).float().mean().item()
    assert 0.4 < same < 0.6, same


def test_fisao_inputs_put_half_the_rollout_log_probs_inside_the_clip_range_and_half_far_outside():
    """bench/_workloads/fisao.py's promise: each valid token's rollout log-prob is its current one (of the rounded
    inputs) shifted by +-0.05 (inside the 0.2 clip range) or +-0.6 (outside it), each about half the tokens and
    both signs; the reference is about a log-prob away (its k3 KL well above the check's tolerance); advantages
    of both signs; every per-token input 0 on ignored rows."""
    _, _, w = _bench_modules()
    case = w.CASES["cpu-small"]
    inp = w.make_inputs(case, "fisao", "cpu", torch.float32, seed=0)
    y = inp["targets"]
    valid = y != w.IGNORE_INDEX
    h = inp["hidden"].detach().reshape(-1, case.d)
    current = torch.log_softmax(h @ inp["weight"].detach().t(), -1).gather(1, y.clamp(min=0).reshape(-1, 1))
    shift = (inp["old_logprobs"] - current.view(y.shape))[valid]
    small, large = (shift.abs() - 0.05).abs() < 1e-4, (shift.abs() - 0.6).abs() < 1e-4
    assert bool((small | large).all())
    assert 0.4 < small.float().mean() < 0.6 and 0.4 < (shift > 0).float().mean() < 0.6
    for part in (small, large):
        assert (shift[part] > 0).any() and (shift[part] < 0).any()
    gap = inp["ref_logprobs"][valid] - current.view(y.shape)[valid]
    assert 0.6 < gap.abs().mean() < 1.0  # |N(0, 1)| has mean 0.80
    adv = inp["advantages"][valid]
    assert (adv > 0).any() and (adv < 0).any()
    for key in ("advantages", "old_logprobs", "ref_logprobs"):
        assert bool((inp[key][~valid] == 0).all()), key


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS is read from /proc")
def test_runner_end_to_end(tmp_path):
    names = "naive,tpo_fast-torch,tpo_fast-torch-recompute,tpo_fast-triton,broken,liger,floor,floor-valid"
    cmd = [
        sys.executable,
        str(BENCH / "run.py"),
        "--device",
        "cpu",
        "--cases",
        "cpu-tiny",
        "--repeats",
        "1",
        "--workloads",
        "tpo,dpo",
        "--contenders",
        names,
        "--out",
        str(tmp_path),
        "--stem",
        "smoke",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| contender | fwd ms | fwd+bwd ms |" in out and "### Verdict" in out, out[:2000]
    assert "| % of floor all / valid rows |" in out
    assert out.index("### How to read the tables") < out.index("### tpo · cpu-tiny") < out.index("### Verdict")

    rows = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    by = {(r["contender"], r["workload"]): r for r in rows}
    assert len(rows) == 8 * 2  # every contender listed for every workload, runnable or not
    fused = _grad_mode_landed()
    for w in ("tpo", "dpo"):
        assert by[("naive", w)]["status"] == "ok" and by[("naive", w)]["full_ms"]["median"] > 0
        ours = by[("tpo_fast-torch", w)]
        assert ours["status"] == "ok" and ours["full_peak_mib"] is not None
        assert ours["label"] == ("tpo_fast [torch] auto" if fused else "tpo_fast [torch]")
        recompute = by[("tpo_fast-torch-recompute", w)]
        assert recompute["status"] == ("ok" if fused else "unavailable"), recompute
        if fused:
            assert recompute["check"]["ok"] and "grad_mode='recompute'" in recompute["note"]
        broken = by[("broken", w)]
        assert broken["status"] == "failed check" and "full_ms" not in broken
        triton = by[("tpo_fast-triton", w)]
        assert triton["status"] == "unavailable" and triton["reason"].startswith("needs CUDA")
        for name in ("floor", "floor-valid"):
            assert by[(name, w)]["status"] == "ok" and by[(name, w)]["full_tflops"] > 0
        # One repeat: every timing is flagged, so no ratio, no % of floor and no verdict.
        assert ours["noise"].startswith("too few repeats (1 < 3)")
        assert "speedup_vs_naive" not in ours and "pct_of_floor" not in ours and "pct_of_valid_floor" not in ours
        assert f"- {w} · cpu-tiny: no verdict: every timing is too short or too noisy to compare" in out
    valid = by[("floor-valid", "tpo")]["full_gflop_counted"] / by[("floor", "tpo")]["full_gflop_counted"]
    assert valid == pytest.approx(by[("floor", "tpo")]["valid_frac"])  # tpo: every GEMM over the same rows
    assert by[("liger", "tpo")]["status"] == "n/a"
    assert by[("liger", "dpo")]["status"] == "ok"
    triton_label = "tpo_fast [triton] auto" if fused else "tpo_fast [triton]"
    assert (
        f"Not run: {triton_label} — needs CUDA (the CPU Triton interpreter is far too slow to time); "
        "Liger LigerFusedLinearDPOLoss — n/a: no per-token weights (DPO only)."
    ) in out
    assert "| tpo_fast [triton]" not in out and "| Liger" in out  # not-run contenders get no table row
    assert "### tpo · cpu-tiny" in out and "### dpo · cpu-tiny" in out and "### logits" not in out

    with (tmp_path / "smoke.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert {"full_ms", "full_peak_mib", "speedup_vs_naive", "noise", "pct_of_valid_floor"} <= set(table[0])
    pytest.importorskip("matplotlib")
    assert (tmp_path / "smoke_time.png").stat().st_size > 0 and (
        tmp_path / "smoke_memory.png"
    ).stat().st_size > 0


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS is read from /proc")
def test_runner_added_workloads(tmp_path):
    """logits, povid and fisao through the one runner: same guard, row schema, tables and verdict."""
    cmd = [
        sys.executable,
        str(BENCH / "run.py"),
        "--device",
        "cpu",
        "--cases",
        "cpu-tiny",
        "--repeats",
        "1",
        "--workloads",
        "logits,povid,fisao",
        "--contenders",
        "naive,tpo_fast-torch,tpo_fast-cpp,tpo_fast-cuda,floor,floor-valid",
        "--out",
        str(tmp_path),
        "--stem",
        "added",
        "--no-plots",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for w in ("logits", "povid", "fisao"):
        assert f"### {w} · cpu-tiny" in out and f"- {w} · cpu-tiny: no verdict" in out, out[:3000]
    assert "GB/s fwd / fwd+bwd" in out and "| % of memory floor |" in out

    rows = json.loads((tmp_path / "added.json").read_text())["rows"]
    by = {(r["contender"], r["workload"]): r for r in rows}
    assert len(rows) == 6 * 3
    for w in ("logits", "povid", "fisao"):
        for name in ("naive", "tpo_fast-torch", "floor"):
            assert by[(name, w)]["status"] == "ok", by[(name, w)]
            assert by[(name, w)]["full_ms"]["median"] > 0
        assert by[("naive", w)]["check"]["ok"] and by[("tpo_fast-torch", w)]["check"]["ok"]
        assert by[("tpo_fast-torch", w)]["noise"].startswith("too few repeats")
    assert by[("floor-valid", "logits")]["status"] == "n/a"
    assert by[("floor-valid", "povid")]["status"] == by[("floor-valid", "fisao")]["status"] == "ok"
    not_run = "Not run: tpo_fast [cpp], tpo_fast [cuda] — n/a: not a backend of this workload (povid_loss backends: "
    assert not_run in out
    logits = by[("tpo_fast-torch", "logits")]
    assert logits["full_gbs"] > 0 and logits["fwd_gbs"] > 0 and "full_tflops" not in logits
    assert by[("floor", "logits")]["label"] == "memory floor"
    assert by[("tpo_fast-torch", "povid")]["full_tflops"] > 0
    assert by[("tpo_fast-cpp", "povid")]["status"] == by[("tpo_fast-cpp", "fisao")]["status"] == "n/a"
    from tpo_fast import _ext

    assert by[("tpo_fast-cpp", "logits")]["status"] == ("ok" if _ext.HAS_CPU_EXT else "unavailable")
    assert by[("tpo_fast-cuda", "logits")]["status"] == "unavailable"
    assert by[("tpo_fast-cuda", "povid")]["status"] == "n/a"  # not a backend of it, not "not built"
    with (tmp_path / "added.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {"fwd_gbs", "full_gbs"} <= set(table[0])


def test_gpu_tune_sweep_runs_and_checks_every_variant(tmp_path):
    """bench/gpu_tune.py end to end on a tiny shape (CPU: Triton under the interpreter)."""
    env = dict(os.environ, TRITON_INTERPRET="1") if not torch.cuda.is_available() else dict(os.environ)
    cmd = [sys.executable, str(BENCH / "gpu_tune.py"), "--n", "48", "--d", "32", "--v", "300",
           "--configs", "64,128,32,4,3", "--tma", "0,1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "tune.json").read_text())
    assert set(out["accuracy"]) == {"random", "peaked"}
    for row in out["accuracy"].values():
        for method in ("split", "atomic", "filter"):
            assert row[method][0] < 1e-4, row  # logp in fp32 statistics
            assert max(row[method][1:]) < 2 * max(row["naive"][1:]) + 1e-3, row  # grads: bf16 rounding
    labels = [r["variant"] for r in out["timings"]]
    assert labels[:2] == ["split tma=0 tiles 64,128,32,4,3", "split tma=1 tiles 64,128,32,4,3"]
    for r in out["timings"]:
        assert "error" not in r, r
        assert r["fwd_bwd_ms"] > 0
        if r["rel_err_logp_gh_gw"] is not None:
            assert max(r["rel_err_logp_gh_gw"]) < 1e-2, r
    assert out["best_split_tiles"] == "64,128,32,4,3" and out["best_split_tma"] in ("0", "1")
    if not torch.cuda.is_available():  # the CPU has no mixed-dtype cuBLAS call to try
        assert out["mm_out_dtype"] is None and out["addmm_out_dtype"] is None


def _timed_row(contender: str, kind: str, times: list[float], **extra) -> dict:
    """A synthetic ok row of the tpo workload with the given fwd+bwd times (ms)."""
    _, measure, _ = _report_modules()
    return {
        "case": "cpu-tiny",
        "workload": "tpo",
        "contender": contender,
        "label": contender,
        "kind": kind,
        "status": "ok",
        **dict(d=64, v=512, n=64, n_seq=4, seq_len=16, valid_frac=0.875),
        "full_ms": measure._stats(times),
        "fwd_ms": measure._stats(times),
        **extra,
    }


def test_noise_rule_flags_short_noisy_and_few_repeat_timings():
    derive, _, report = _report_modules()
    rows = [
        _timed_row("naive", "baseline", [100.0, 110.0, 120.0]),
        _timed_row("short", "ours", [1.0, 1.1, 1.2]),
        _timed_row("noisy", "peer", [10.0, 20.0, 30.0]),
        _timed_row("two", "ours", [50.0, 52.0]),
        _timed_row("floor", "floor", [0.5, 0.6, 0.7, 0.8]),
        _timed_row("good", "ours", [50.0, 51.0, 52.0]),
    ]
    derive.derive(rows, "cpu")
    by = {r["contender"]: r for r in rows}
    assert by["short"]["noise"] == "too short (1.1 ms < 5 ms)"
    assert by["noisy"]["noise"] == "too noisy (IQR 50% > 25%)"
    assert by["two"]["noise"] == "too few repeats (2 < 3)"
    assert by["floor"]["noise"] == "too short (0.65 ms < 5 ms)"
    assert by["naive"]["noise"] is None and by["good"]["noise"] is None
    for name in ("short", "noisy", "two", "floor"):
        assert not {"speedup_vs_naive", "speedup_vs_best_peer", "pct_of_floor"} & set(by[name]), by[name]
    # A flagged floor gives nobody a % of floor; a flagged peer is no best peer.
    assert "pct_of_floor" not in by["good"] and "speedup_vs_best_peer" not in by["good"]
    assert by["good"]["speedup_vs_naive"] == pytest.approx(110 / 51)
    edge = [_timed_row("at", "ours", [80.0, 100.0, 130.0]), _timed_row("above", "ours", [80.0, 100.0, 131.0])]
    derive.derive(edge, "cpu")
    assert edge[0]["noise"] is None and edge[1]["noise"] == "too noisy (IQR 25.5% > 25%)"  # 25% passes
    gpu = [_timed_row("gpu", "ours", [1.5, 1.5, 1.5])]
    derive.derive(gpu, "cuda")
    assert gpu[0]["noise"] is None  # the CUDA threshold is 1 ms
    table = report.table(rows, {"dtype": "fp32"})
    short = "| short | 1.1 ±9% | 1.1 ±9% | — | — | — | — / — | — | ok; not compared: too short (1.1 ms < 5 ms) |"
    assert short in table
    assert report.verdict(rows) == [
        "- tpo · cpu-tiny: no winner: the fastest row that passes the noise rule, good at 51 ms, is slower than "
        "short at 1.1 ms, noisy at 20 ms, whose timings are too short or too noisy to compare; use a larger case or "
        "more --repeats. Not ranked (timing too short or noisy): short, noisy, two."
    ]
    # Without the flagged rows that measured faster, the fastest row that passes is the winner.
    slower = [r for r in rows if r["contender"] not in ("short", "noisy")]
    assert report.verdict(slower) == [
        "- tpo · cpu-tiny: **good** wins at 51 ms, 2.16x faster than the next, naive; 2.16x vs naive. "
        "Not ranked (timing too short or noisy): two."
    ]
    flagged = [r for r in rows if r["noise"] or r["kind"] == "floor"]
    assert report.verdict(flagged) == [
        "- tpo · cpu-tiny: no verdict: every timing is too short or too noisy to compare; use a larger case "
        "or more --repeats. Not ranked (timing too short or noisy): short, noisy, two."
    ]


def test_ratios_say_when_they_are_within_noise():
    derive, _, report = _report_modules()
    rows = [
        _timed_row("naive", "baseline", [100.0, 110.0, 120.0]),  # IQR [105, 115]
        _timed_row("peer", "peer", [98.0, 104.0, 110.0]),  # IQR [101, 107]: overlaps naive's
        _timed_row("ours", "ours", [50.0, 51.0, 52.0]),
        _timed_row("floor", "floor", [40.0, 41.0, 42.0]),
        _timed_row("floor-valid", "floor", [30.0, 30.5, 31.0]),
    ]
    derive.derive(rows, "cpu")
    by = {r["contender"]: r for r in rows}
    assert by["peer"]["speedup_vs_naive_within_noise"] is True
    assert by["ours"]["speedup_vs_naive_within_noise"] is False
    assert by["ours"]["pct_of_floor"] == pytest.approx(100 * 41 / 51)
    assert by["ours"]["pct_of_valid_floor"] == pytest.approx(100 * 30.5 / 51)
    assert "pct_of_floor" not in by["floor-valid"] and "pct_of_valid_floor" not in by["floor"]
    table = report.table(rows, {"dtype": "fp32"})
    assert "| peer | 104 ±6% | 104 ±6% | — | ≈1.06x | — | 39% / 29% | — | ok |" in table
    assert "| ours | 51 ±2% | 51 ±2% | — | 2.16x | 2.04x | 80% / 60% | — | ok |" in table
    assert report.verdict(rows) == [
        "- tpo · cpu-tiny: **ours** wins at 51 ms, 2.04x faster than the next, peer; 2.16x vs naive; "
        "80% of the matmul floor, 60% of the valid-rows floor."
    ]
    tie = [_timed_row("naive", "baseline", [100.0, 110.0, 120.0]), _timed_row("peer", "peer", [98.0, 104.0, 110.0])]
    derive.derive(tie, "cpu")
    assert report.verdict(tie) == [
        "- tpo · cpu-tiny: **peer** (104 ms) and naive (110 ms) tie within noise (their interquartile ranges "
        "overlap); 1.06x vs naive (within noise)."
    ]


def test_contenders_that_did_not_run_share_one_line_with_their_reasons():
    _, _, report = _report_modules()
    other = "not a backend of this workload"
    group = [
        {"label": label, "status": status, "reason": reason}
        for label, status, reason in [
            ("naive", "ok", ""),
            ("Liger", "n/a", "no per-token weights (DPO only)"),
            ("tpo_fast [triton] fused", "unavailable", "needs CUDA"),
            ("tpo_fast [cpp]", "n/a", other),
            ("tpo_fast [cuda]", "n/a", other),
            ("tpo_fast [triton] recompute", "unavailable", "needs CUDA"),
        ]
    ]
    assert report.not_run_line(group) == (
        "Not run: Liger — n/a: no per-token weights (DPO only); "
        "tpo_fast [triton] fused, tpo_fast [triton] recompute — needs CUDA; "
        "tpo_fast [cpp], tpo_fast [cuda] — n/a: not a backend of this workload."
    )
    assert report.not_run_line(group[:1]) is None


def test_missing_extension_is_reported_as_not_built(monkeypatch):
    """tpo_fast imports its extension while the package is initializing, so a missing `_C` reads as
    "partially initialized module 'tpo_fast' (most likely due to a circular import)"; bench says what it is."""
    import importlib.util

    from tpo_fast import _ext

    contenders, _, _ = _bench_modules()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(_ext, "HAS_CPU_EXT", False)
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", False)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tpo_fast._C" else find_spec(name, *a)
    )
    build = "pip install --no-build-isolation -e . (or python -c 'from tpo_fast import _ext; _ext.load_jit()')"
    assert contenders.TpoFast("cpp").availability("cpu", "logits") == (
        f"not built: tpo_fast._C is missing; run `{build}` to build"
    )
    assert contenders.TpoFast("cuda").availability("cpu", "logits") == "needs CUDA"


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS is read from /proc")
def test_runner_step_workload(tmp_path):
    """`--workloads step` on the tiny step case: one row per contender with step time, tokens/s, peak memory
    and the largest micro-batch; the 7B case is listed as not run on CPU; TRL's note says which options it
    used and why the others were not."""
    pytest.importorskip("trl")
    cmd = [sys.executable, str(BENCH / "run.py"), "--device", "cpu", "--cases", "step-tiny,llava7b-step",
           "--workloads", "step", "--repeats", "2", "--rounds", "2", "--search-s", "30",
           "--contenders", "official-tpo,trl-dpo,ours-tpo,ours-tpo-shared,ours-tpo-shared-refcache",
           "--out", str(tmp_path), "--stem", "step"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    head = ("| contender | step ms | tokens/s | GFLOP / step · GFLOP/s | peak MiB step / total "
            "| largest micro-batch ≤ 512 MiB |")
    assert head in out, out[:3000]
    assert "### step · step-tiny" in out and "- step · step-tiny: no verdict" in out  # two repeats: not compared
    assert "in 2 rounds" in out and "Step median of each round (s), in the order run: official TPO step" in out
    assert ("Not run: official TPO step (8 forwards, fp32 logits), TRL DPOTrainer, tpo_fast TPO step, tpo_fast TPO "
            "step, shared prefix, tpo_fast TPO step, shared prefix, cached reference — needs CUDA (llava-1.5-7b "
            "shapes in bf16).") in out

    rows = json.loads((tmp_path / "step.json").read_text())["rows"]
    by = {(r["case"], r["contender"]): r for r in rows}
    assert len(rows) == 2 * 5 and {r["workload"] for r in rows} == {"step"}
    from tpo_fast.trainer.config import TPOConfig

    shared_landed = "shared_prefix" in TPOConfig.__dataclass_fields__
    for name in ("official-tpo", "trl-dpo", "ours-tpo", "ours-tpo-shared", "ours-tpo-shared-refcache"):
        assert by[("llava7b-step", name)]["status"] == "unavailable"
        r = by[("step-tiny", name)]
        if name == "ours-tpo-shared" and not shared_landed:
            assert r["status"] == "unavailable" and "no shared_prefix option" in r["reason"], r
            continue
        assert r["status"] == "ok", r
        assert r["check"]["ok"] and r["losses"][0] == pytest.approx(0.6931472, rel=1e-3)  # policy = reference
        assert r["check"]["errors"]["first_drop"]["drop"] > 1e-4  # one optimizer step lowers the loss
        if name != "official-tpo" and name != "trl-dpo":  # checked against the independent TPO step's first drop
            assert r["check"]["errors"]["first_drop_vs_oracle"]["oracle"] == "official-tpo"
            assert r["check"]["errors"]["first_drop_vs_oracle"]["err"] < 0.02
        assert 0 < r["tokens"] < r["padded_positions"]  # prompt once per pair, no padding
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / (r["full_ms"]["median"] / 1e3))
        assert r["step_gflop"] > 0
        assert r["step_gflops"] == pytest.approx(r["step_gflop"] / (r["full_ms"]["median"] / 1e3))
        assert r["total_peak_mib"] > 0 and r["full_peak_mib"] is not None
        assert r["max_micro_batch"] >= 0 and str(r["n"]) in r["micro_batch_probes"]
        assert r["noise"].startswith("too few repeats (2 < 3)") and "speedup_vs_naive" not in r
        assert len(r["full_ms"]["times"]) == 2 and len(r["round_medians_ms"]) == 2  # one step in each round
    # the work counted: the official structure's eight forwards with full logits do more than our TPO step
    assert by[("step-tiny", "official-tpo")]["step_gflop"] > by[("step-tiny", "ours-tpo")]["step_gflop"]
    assert by[("step-tiny", "ours-tpo")]["step_gflop"] > by[("step-tiny", "ours-tpo-shared")]["step_gflop"]
    tokens = {by[("step-tiny", n)]["tokens"] for n in ("official-tpo", "trl-dpo", "ours-tpo")}
    assert len(tokens) == 1  # the same pairs, the same count, for every contender
    trained = {by[("step-tiny", n)]["trained_params"] for n in ("official-tpo", "trl-dpo", "ours-tpo")}
    assert len(trained) == 1 and trained.pop() > 0  # as many numbers trained by every contender
    trl = by[("step-tiny", "trl-dpo")]["note"]
    assert "options used:" in trl and "not used: padding_free" in trl and "not used: precompute_ref_log_probs" in trl
    if not torch.cuda.is_available():
        assert "not used: use_liger_kernel" in trl
    assert by[("step-tiny", "ours-tpo-shared")].get("unshared") == "ours-tpo"
    cached = by[("step-tiny", "ours-tpo-shared-refcache")]  # the reference scored once, before the timed steps
    assert cached["reference_cache_s_per_pair"] > 0 and "reference cache:" in cached["note"]
    assert "precompute_reference=True" in cached["note"]
    # the step's trunk layout is named: on this SDPA model, one padding-free row attended sequence by sequence
    for name in ("ours-tpo", "ours-tpo-shared"):
        assert "trunk rows: one padding-free row per micro-batch, attention tpo_fast_sdpa" in by[("step-tiny", name)][
            "note"]
    with (tmp_path / "step.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {"tokens_per_s", "total_peak_mib", "max_micro_batch"} <= set(table[0])
    assert any(float(t["tokens_per_s"] or 0) > 0 for t in table)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "step_step.png").stat().st_size > 0


def test_step_batches_move_every_tensor_to_the_device():
    """The official step's batch holds its rows per side in nested dicts: they stayed on the CPU and the
    contender failed on the first CUDA run ("index is on cpu"). The meta device stands in for CUDA."""
    (step,) = _bench("_contenders.step")
    rows = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3)}
    moved = step._to({"chosen": rows, "rejected": dict(rows), "pixel_values": torch.zeros(1), "n": 3}, "meta")
    assert moved["n"] == 3 and moved["pixel_values"].is_meta
    assert all(t.is_meta for side in ("chosen", "rejected") for t in moved[side].values())


def test_triton_gemm_contender_runs_the_fused_path_with_triton_gemms(monkeypatch):
    """`tpo_fast-triton-fused-tgemm` times the fused path with its two gradient GEMMs by Triton: named on the
    command line it is built (its backend parsed out of the name), its note says what it runs, and its run
    reaches `triton_mm` (driven here in-process under the interpreter, tiny) with the same loss as cuBLAS's."""
    from tpo_fast.ops import triton_fused

    contenders, _, w = _bench_modules()
    (run,) = _bench("run")
    assert run._backends(["tpo_fast-triton-fused-tgemm", "tpo_fast-torch-recompute"]) == run._backends([])
    c = contenders.all_contenders(("triton",))["tpo_fast-triton-fused-tgemm"]
    assert c.label == "tpo_fast [triton] fused, triton gradient GEMMs"
    assert "grad_gemm='triton'" in c.workloads["tpo"] and "grad_mode='fused'" in c.workloads["tpo"]
    assert c.availability("cpu", "tpo") == "needs CUDA (the CPU Triton interpreter is far too slow to time)"
    calls = []
    original = triton_fused.triton_mm
    monkeypatch.setattr(triton_fused, "triton_mm", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    inp = w.make_inputs(w.Case("t", 8, 40, 24), "tpo", "cpu", torch.float32)
    c.setup("cpu")
    loss = c.run("tpo", inp)
    assert len(calls) >= 2
    plain = contenders.all_contenders(("triton",))["tpo_fast-triton-fused"]
    assert plain.label == "tpo_fast [triton] fused" and "grad_gemm='torch'" in plain.workloads["tpo"]
    plain.setup("cpu")
    n = len(calls)
    monkeypatch.setenv("TPO_FAST_GRAD_GEMM", "triton")  # the plain one is pinned: it stays the cuBLAS baseline
    torch.testing.assert_close(plain.run("tpo", inp), loss, rtol=1e-5, atol=1e-6)
    assert len(calls) == n


def test_profile_loss_script_runs_where_it_is_documented_to():
    """bench/profile_loss.py, the docstring's CPU command at a tiny case: one row per (workload, mode, chunk
    budget), the fused rows with more chunks dispatching more operators (the host work a GPU would launch); the
    triton backend's GEMM choice refused on another backend."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "profile_loss.py"), "--case", "d64-v512-n64", "--backend", "torch",
         "--dtype", "fp32", "--chunk-mb", "0.05,256", "--repeats", "2"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| tpo") or
            line.startswith("| dpo")]
    assert [(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows] == [
        (w, m, c) for w in ("tpo", "dpo") for m, c in (("fused", "0.05"), ("fused", "128"), ("recompute", "-"))
    ]  # 256 MiB is the torch backend's cap, 128
    ops = {(r[0].strip(), r[2].strip()): int(r[9]) for r in rows}
    assert ops[("tpo", "0.05")] > ops[("tpo", "128")] and ops[("dpo", "0.05")] > ops[("dpo", "128")]
    assert all(float(r[4]) >= float(r[5]) > 0 and not r[6].strip() for r in rows)  # wall >= host; no device columns
    bad = subprocess.run(
        [sys.executable, str(BENCH / "profile_loss.py"), "--case", "d64-v512-n64", "--backend", "torch",
         "--grad-gemm", "triton"], capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "other backends have one choice: torch" in bad.stderr


def test_profile_loss_counts_each_device_event_once():
    """The kernel time and the largest-kernels table of bench/profile_loss.py: device events only (not the CPU
    rows that show the same kernels again, nor the profiler's "Activity Buffer Request" or user ranges),
    summed per name, largest first. Fake events: the CPU machine has no CUDA profile."""
    from types import SimpleNamespace

    (profile_loss,) = _bench("profile_loss")
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, us, device=cuda, annotation=False):
        return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                               time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [event("gemm", 500.0), event("scale", 40.0), event("gemm", 300.0), event("aten::mm", 800.0, cpu),
              event("Activity Buffer Request", 900.0), event("my range", 1000.0, annotation=True)]
    on_device = profile_loss.device_events(events)
    assert [e.name for e in on_device] == ["gemm", "scale", "gemm"]
    assert profile_loss.kernel_totals(on_device) == [(0.8, 2, "gemm"), (0.04, 1, "scale")]
    # under 20 us: the two short ones only (15 + 5 us), whatever their names
    short = on_device + profile_loss.device_events([event("where", 15.0), event("index_copy", 5.0),
                                                    event("tiny", 3.0, cpu)])
    assert profile_loss.small_kernels(short) == (2, 0.02)


def test_profile_step_prints_the_step_time_the_ranges_and_the_operators():
    """bench/profile_step.py on the tiny step case, on the CPU (on CUDA the same tables hold device times, and
    a line counts kernel launches and host synchronizations)."""
    cmd = [sys.executable, str(BENCH / "profile_step.py"), "--case", "step-tiny", "--contenders", "ours-tpo-shared",
           "--steps", "1", "--rows", "12", "--device", "cpu"]
    got = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert got.returncode == 0, got.stderr[-3000:]
    out = got.stdout
    assert "## tpo_fast TPO step, shared prefix · step-tiny (cpu): " in out and " ms per profiled step (" in out
    assert "of operator self time)" in out and "Kernel launches" not in out
    ranges = out.split("Time inside each range", 1)[1]
    # 2 layers x 2 trunk calls (the reference copy, the policy), each over both image branches
    assert "decoder layers" in ranges and "(4 calls per step)" in ranges
    # the operators by self time: the matmuls among the first 12 (at 5 rows they were 4th, about 6% of the step,
    # and a loaded host let another operator or range pass them)
    assert "Self CPU" in ranges and "aten::mm" in ranges


def test_host_time_counts_the_operators_of_each_path():
    """bench/host_time.py on the tiny step case: one row per contender with its step time and operators per step.
    With --cuda-path the packed row goes through the varlen layout and the stand-in kernel: one attention operator
    per layer and trunk call instead of two SDPA calls per sequence, so fewer operators than the CPU path."""
    def run(*extra):
        cmd = [sys.executable, str(BENCH / "host_time.py"), "--case", "step-tiny", "--contenders", "ours-tpo-shared",
               "--steps", "1", *extra]
        got = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert got.returncode == 0, got.stderr[-3000:]
        rows = [line for line in got.stdout.splitlines() if line.startswith("| ours-tpo-shared |")]
        assert len(rows) == 1, got.stdout
        _, name, ms, ops, _ = rows[0].split("|")
        assert float(ms) > 0
        return got.stdout, int(ops)

    out, cpu_ops = run()
    assert "## Host time per step · step-tiny (2 text layers, 1 vision layers, 2 pairs, fp32) · CPU path" in out
    out, cuda_ops = run("--cuda-path")
    assert "CUDA path (varlen stand-in)" in out
    assert 0 < cuda_ops < cpu_ops, (cuda_ops, cpu_ops)


def test_zipf_cases_draw_repeated_targets_the_same_for_every_contender():
    """A "-zipf" case (any case name, preset or shape with the suffix) draws its targets by the Zipf-Mandelbrot
    law: at V = 32000 the most frequent token takes about 1 / 3.7 / sum_k 1 / (k + 2.7) = 2.9% of the targets
    (a uniform draw: about 1 / V), the same targets on every draw of the seed, and the contenders pass the
    oracle's check on them."""
    contenders, measure, workloads = _bench_modules()
    cases = workloads.parse_cases("d64-v32000-n2048-zipf,gpu-target-zipf,cpu-tiny")
    assert [(c.name, c.targets) for c in cases] == [
        ("d64-v32000-n2048-zipf", "zipf"), ("llava7b-n8192-zipf", "zipf"), ("cpu-tiny", "uniform")]
    assert (cases[1].d, cases[1].v, cases[1].n) == (4096, 32000, 8192)
    share = (1 / 3.7) / sum(1 / (k + 2.7) for k in range(1, 32001))
    assert 0.028 < share < 0.030

    def valid_targets(case):
        y = workloads.make_inputs(case, "tpo", "cpu", torch.float32)["targets"]
        return y[y != workloads.IGNORE_INDEX]

    zipf = valid_targets(cases[0])
    assert torch.equal(zipf, valid_targets(cases[0]))
    top = int(torch.bincount(zipf).max())
    # Binomial(n, share): mean 43 at n = 1500, sd 6.5; a uniform draw's largest count over 32000 ids is 1 to 3.
    assert abs(top - share * zipf.numel()) < 5 * (share * zipf.numel()) ** 0.5, (top, zipf.numel())
    uniform = valid_targets(workloads.parse_cases("d64-v32000-n2048")[0])
    assert int(torch.bincount(uniform).max()) <= 4

    tiny = workloads.parse_cases("cpu-tiny-zipf")[0]
    cfg = {"device": "cpu", "dtype": "fp32", "seed": 0, "warmup": 0, "repeats": 1}
    for c in (contenders.Naive(), contenders.TpoFast("torch")):
        c.setup("cpu")
        for workload in ("tpo", "dpo"):
            row = measure.measure_workload(c, tiny, workload, cfg)
            assert row["status"] == "ok", row


def test_a_cases_list_mixes_loss_and_step_cases_in_its_order_and_each_belongs_to_its_family():
    """`--cases` takes loss cases, step cases and both kinds of preset in one comma list (spaces and empty items
    ignored), in the order given; `family` puts the step workload and step cases in "step", the rest in "loss";
    an unknown name's error lists the loss choices and the step cases."""
    _, _, workloads = _bench_modules()
    step_cases = workloads.STEP_CASES
    got = workloads.parse_cases(" cpu-tiny, cpu-step,,gpu-step , d16-v32-n64,llava7b-step-2p")
    assert [c.name for c in got] == ["cpu-tiny", "cpu-step", "llava7b-step", "d16-v32-n64", "llava7b-step-2p"]
    assert got[1] is step_cases["cpu-step"] and got[2] is step_cases["llava7b-step"]
    assert [workloads.family(c) for c in got] == ["loss", "step", "step", "loss", "step"]
    assert [workloads.family(w) for w in ("step", "tpo", "logits")] == ["step", "loss", "loss"]
    with pytest.raises(ValueError) as e:
        workloads.parse_cases("cpu-tiny,nope")
    assert str(e.value).startswith("unknown case 'nope': use a name (cpu-tiny, ")
    assert str(e.value).endswith(f"; step cases: {', '.join(step_cases)}") and "llava7b-step-2p" in str(e.value)


def test_loss_cases_by_name_preset_model_shape_and_custom_shape():
    """bench/_workloads/cases.py: a model's shape at any N (`<model>-n<N>`, D and V from the model), a custom
    `d<D>-v<V>-n<N>`, presets expanded in place, the `-zipf` suffix on each; rows per sequence min(512, N / 4),
    an even number of sequences, N >= 8, else an error naming the case; `as_dict` adds the derived sizes; the
    logits workload's bytes (two (N, V) tensors read once, and once more written in fwd+bwd)."""
    _, _, workloads = _bench_modules()
    (cases,) = _bench("_workloads.cases")
    parse = cases.parse_cases
    got = parse("llava13b-n4096,d24-v100-n48,cpu-sweep,qwen2vl7b-n2048-zipf,d16-v32-n64-zipf")
    assert [(c.name, c.d, c.v, c.n, c.model, c.targets) for c in got] == [
        ("llava13b-n4096", 5120, 32000, 4096, "llava13b", "uniform"),
        ("d24-v100-n48", 24, 100, 48, "d24-v100", "uniform"),
        ("cpu-n256", 256, 4096, 256, "cpu-small", "uniform"),
        ("cpu-small", 256, 4096, 512, "cpu-small", "uniform"),
        ("cpu-n1024", 256, 4096, 1024, "cpu-small", "uniform"),
        ("qwen2vl7b-n2048-zipf", 3584, 152064, 2048, "qwen2vl7b", "zipf"),
        ("d16-v32-n64-zipf", 16, 32, 64, "d16-v32", "zipf"),
    ]
    assert [(c.seq_len, c.n_seq) for c in got[:2]] == [(512, 8), (12, 4)]
    assert got[1].as_dict() == {"name": "d24-v100-n48", "d": 24, "v": 100, "n": 48, "model": "d24-v100",
                                "targets": "uniform", "seq_len": 12, "n_seq": 4}
    with pytest.raises(ValueError, match=r"^unknown model 'llava70b' in case 'llava70b-n1024'; models: llava7b, "
                                         r"llava13b, qwen2vl7b$"):
        parse("llava70b-n1024")
    with pytest.raises(ValueError, match=r"^unknown case 'nope': use a name \(cpu-tiny, .*\), a preset \(cpu, "
                                         r"cpu-sweep, gpu, gpu-target, gpu-sweep\), '<model>-n<N>' or "
                                         r"'d<D>-v<V>-n<N>', each with an optional '-zipf' suffix$"):
        parse("cpu-tiny,nope")
    for bad in ("d8-v8-n4", "d8-v8-n2560", "d8-v8-n2052"):  # N < 8; 5 sequences of 512; 2052 not in rows of 512
        with pytest.raises(ValueError, match=rf"^case {bad}: N=\d+ must split into an even number of rows of \d+$"):
            parse(bad)
    assert [c.n for c in parse("d8-v8-n8,d8-v8-n2048")] == [8, 2048]  # the smallest case; four rows of 512
    case = got[1]
    assert workloads.traffic(case, "logits", "fwd", 2) == 2 * 48 * 100 * 2
    assert workloads.traffic(case, "logits", "full", 4) == 2 * (2 * 48 * 100 * 4)
    assert workloads.traffic(case, "tpo", "full", 2) is None and workloads.flops(case, "logits", "full") is None


def test_the_two_pair_7b_step_case_is_the_7b_case_at_two_pairs():
    """`llava7b-step-2p` (an 80 GB card, where the official structure's 4-pair step does not fit) differs from
    `llava7b-step` in its name and its micro-batch only."""
    import dataclasses

    (step,) = _bench("_workloads.step")
    four, two = step.STEP_CASES["llava7b-step"], step.STEP_CASES["llava7b-step-2p"]
    assert (two.pairs, four.pairs) == (2, 4) and two.needs_cuda
    assert dataclasses.replace(two, name=four.name, pairs=four.pairs) == four
