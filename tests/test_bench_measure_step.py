"""bench/_measure_step.py in the test process: the largest-micro-batch search (issue 15's "micro-batch that fits the
budget"), what a step child measures in each phase and how it checks the first step, and its entry point.

The contenders here are scripted: each step advances a fake clock by a known time and leaves a known peak, so
every probe of the search, every figure of a row and every verdict is worked out by hand below.
"""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch
from _bench import bench_modules

LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def mods():
    measure_step, step_workload = bench_modules("_measure_step", "_workloads.step")
    return measure_step, step_workload


class Clock:
    """Starts far from 0, so that a time taken as `now + start` in place of `now - start` shows."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Peak:
    """Stands for `_CpuMemory` (the step's peak) and `_Total` (the total peak): the value the last step left."""

    def __init__(self, reason=None):
        self.value = None
        self.reason = reason
        self.starts = 0

    def start(self) -> None:
        self.starts += 1

    def peak(self):
        return self.value


class Sized:
    """A contender whose step at p pairs takes p seconds and peaks at 100 + 10 p MiB in total; out of memory from
    `oom_at` pairs, another error from `error_at`."""

    def __init__(self, clock, total, oom_at=None, error_at=None, s_per_pair=1.0):
        self.clock, self.total, self.oom_at, self.error_at = clock, total, oom_at, error_at
        self.s_per_pair = s_per_pair
        self.steps = []

    def batch(self, pairs):
        return {"pairs": pairs}

    def train_step(self, batch):
        p = batch["pairs"]
        self.steps.append(p)
        if self.error_at is not None and p >= self.error_at:
            raise RuntimeError("shapes do not match")
        if self.oom_at is not None and p >= self.oom_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.clock.now += self.s_per_pair * p
        self.total.value = 100.0 + 10.0 * p
        return 0.5


def _search(mods, monkeypatch, pairs=2, budget=230.0, cap=64, search_s=1000.0, known=None, **kw):
    measure_step, step_workload = mods
    clock, total = Clock(), Peak()
    monkeypatch.setattr(measure_step, "time", types.SimpleNamespace(monotonic=clock, perf_counter=clock))
    case = dataclasses.replace(step_workload.STEP_CASES["step-tiny"], pairs=pairs, memory_budget_mib=budget,
                               max_pairs=cap, search_s=search_s)
    c = Sized(clock, total, **kw)
    known = {pairs: 100.0 + 10.0 * pairs} if known is None else known
    out = measure_step.largest_micro_batch(c, case, "cpu", Peak(), total, known, step_s=c.s_per_pair * pairs)
    return out, c.steps


def _probe(pairs, fits=None, why=None):
    peak = None if why else 100.0 + 10.0 * pairs
    return {"total_peak_mib": peak, "fits": peak is not None and peak <= 230.0 if fits is None else fits,
            **({"why": why} if why else {})}


def test_search_doubles_then_bisects_to_the_largest_micro_batch_in_the_budget(mods, monkeypatch):
    """2 pairs fit (known), 4 and 8 fit, 16 does not; then 12 (fits), 14 (does not), 13: 230 MiB, the budget
    itself, fits. Exact: 13 fits and 14 does not."""
    out, steps = _search(mods, monkeypatch, s_per_pair=1.25)
    assert steps == [4, 8, 16, 12, 14, 13]
    assert out == {
        "max_micro_batch": 13, "max_micro_batch_exact": True, "max_micro_batch_bound": None,
        "micro_batch_probes": {str(p): _probe(p) for p in (2, 4, 8, 12, 13, 14, 16)},
        # the probes' seconds, 1.25 x (4 + 8 + 16 + 12 + 14 + 13) = 83.75, to a tenth (half to even)
        "memory_budget_mib": 230.0, "search_took_s": 83.8,
    }
    out, _ = _search(mods, monkeypatch, budget=120.0)  # a known peak equal to the budget fits
    assert out["micro_batch_probes"]["2"] == {"total_peak_mib": 120.0, "fits": True}


def test_search_halves_from_a_micro_batch_that_does_not_fit(mods, monkeypatch):
    """8 pairs (known) over a 135 MiB budget: 4 does not fit, 2 does, then 3 (130 MiB) does."""
    out, steps = _search(mods, monkeypatch, pairs=8, budget=135.0)
    assert steps == [4, 2, 3]
    assert (out["max_micro_batch"], out["max_micro_batch_exact"], out["max_micro_batch_bound"]) == (3, True, None)
    assert out["micro_batch_probes"] == {"2": {"total_peak_mib": 120.0, "fits": True},
                                         "3": {"total_peak_mib": 130.0, "fits": True},
                                         "4": {"total_peak_mib": 140.0, "fits": False},
                                         "8": {"total_peak_mib": 180.0, "fits": False}}


def test_search_stops_at_the_cap_and_says_so(mods, monkeypatch):
    out, steps = _search(mods, monkeypatch, budget=1e6, cap=12)  # 4, 8, then min(16, 12)
    assert steps == [4, 8, 12]
    assert (out["max_micro_batch"], out["max_micro_batch_exact"], out["max_micro_batch_bound"]) == \
        (12, False, "cap of 12 pairs")


def test_search_starts_no_probe_predicted_to_end_past_its_time_bound(mods, monkeypatch):
    """A probe of p pairs is predicted to take p seconds (a 2-pair step took 2): 4 (ends at 4 s), 8 (12 s) and 16
    (28 s, the bound itself) start within 28 s; 12 more would end at 40 s, so the search stops with 8 and says why."""
    out, steps = _search(mods, monkeypatch, search_s=28.0)
    assert steps == [4, 8, 16]
    assert (out["max_micro_batch"], out["max_micro_batch_exact"]) == (8, False)
    assert out["max_micro_batch_bound"] == "time bound (28 s) reached before 12 pairs"
    assert out["search_took_s"] == 28.0 and "12" not in out["micro_batch_probes"]


def test_search_counts_out_of_memory_as_not_fitting_and_raises_anything_else(mods, monkeypatch):
    out, steps = _search(mods, monkeypatch, budget=1e6, oom_at=10)
    assert steps == [4, 8, 16, 12, 10, 9]
    assert (out["max_micro_batch"], out["max_micro_batch_exact"]) == (9, True)
    for p in (10, 12, 16):
        assert out["micro_batch_probes"][str(p)] == {"total_peak_mib": None, "fits": False, "why": "out of memory"}
    with pytest.raises(RuntimeError, match="^shapes do not match$"):
        _search(mods, monkeypatch, error_at=8)


@pytest.mark.parametrize("known_peak", [500.0, None], ids=["over", "unknown"])
def test_search_down_to_one_pair_that_does_not_fit(mods, monkeypatch, known_peak):
    """Not even one pair fits (110 MiB over 50): the largest micro-batch is 0, exactly; a known micro-batch without
    a peak (a memory child that could not read one) counts as not fitting."""
    out, steps = _search(mods, monkeypatch, budget=50.0, known={2: known_peak})
    assert steps == [1]
    assert (out["max_micro_batch"], out["max_micro_batch_exact"], out["max_micro_batch_bound"]) == (0, True, None)
    assert out["micro_batch_probes"]["2"] == {"total_peak_mib": known_peak, "fits": False}


class Scripted:
    """A step contender whose steps return `losses` in turn, take `seconds` in turn on the fake clock, leave
    `peaks` (step, total) in turn, and do one in-place 2x3 @ 3x4 `addmm_` each (48 FLOPs)."""

    name, kind, objective, oracle, unshared = "scripted", "ours", "tpo", False, "scripted-unshared"
    workloads = {"step": "a scripted step"}

    def __init__(self, clock, mem, total, losses, seconds, peaks, fail=None, cache_s=None):
        self.clock, self.mem, self.total = clock, mem, total
        self.losses, self.seconds, self.peaks, self.fail = list(losses), list(seconds), list(peaks), fail
        self.calls, self.built = [], None
        if cache_s is not None:
            self.reference_cache_s_per_pair = cache_s

    def build(self, case, data, device):
        if self.fail is not None:
            raise self.fail
        self.clock.now += 2.25  # the set-up's time, to a tenth (half to even): 2.2
        self.built = (case.name, data.seed, device)

    def note(self):
        return "a scripted step; built"

    def trained_params(self):
        return 12  # the numbers its optimizer would step (`cross_check_steps` compares them)

    def label_for(self, workload):
        return f"scripted ({workload})"

    def batch(self, pairs):
        return {"pairs": pairs}

    def train_step(self, batch):
        i = len(self.calls)
        self.calls.append(batch["pairs"])
        torch.zeros(2, 4).addmm_(torch.ones(2, 3), torch.ones(3, 4))  # counted only with the step's own formulas
        self.clock.now += self.seconds[i % len(self.seconds)]
        self.mem.value, self.total.value = self.peaks[i % len(self.peaks)]
        return self.losses[i % len(self.losses)]


class FakeData:
    def __init__(self, case, seed=0):
        self.case, self.seed = case, seed

    def tokens(self, pairs):
        assert pairs == self.case.pairs
        return {"tokens": 1000, "response": 400, "padded": 50, "row_len": 300}


def _measure(mods, monkeypatch, phase, losses=(LN2, 0.5, 0.4, 0.3, 0.2), dtype="fp32", search_s=0.0, reason=None,
             warmup=2, **kw):
    measure_step, step_workload = mods
    clock, mem, total = Clock(), Peak(reason), Peak()
    monkeypatch.setattr(measure_step, "time", types.SimpleNamespace(monotonic=clock, perf_counter=clock))
    monkeypatch.setattr(measure_step, "_CpuMemory", lambda: mem)
    monkeypatch.setattr(measure_step, "_Total", lambda device: setattr(total, "device", device) or total)
    monkeypatch.setattr(measure_step, "StepData", FakeData)
    case = dataclasses.replace(step_workload.STEP_CASES["step-tiny"], dtype=dtype, search_s=search_s, pairs=2,
                               memory_budget_mib=1e6, max_pairs=4)
    c = Scripted(clock, mem, total, losses, seconds=kw.pop("seconds", (0.5, 0.5, 0.25, 0.125, 0.375)),
                 peaks=kw.pop("peaks", [(10.0, 110.0), (11.0, 111.0), (12.0, 140.0), (9.0, 120.0), (13.0, 115.0)]),
                 **kw)
    cfg = {"device": "cpu", "seed": 7, "warmup": warmup, "repeats": 3, **({"phase": phase} if phase else {})}
    return measure_step.measure_step(c, case, cfg), c


def test_time_phase_row(mods, monkeypatch):
    """Two warm-up steps (the first loss is the check, ln 2 exactly), then three timed steps of 0.25, 0.125 and
    0.375 s: median 250 ms, 1000 tokens / 0.25 s = 4000 tokens/s; no memory figures, no search."""
    measure_step, _ = mods
    row, c = _measure(mods, monkeypatch, "time", search_s=100.0)
    assert c.built == ("step-tiny", 7, "cpu") and c.calls == [2] * 5  # and no search in the "time" phase
    assert (c.mem.starts, c.total.device) == (4, "cpu")  # once before the model, then per timed step
    assert row == {
        "status": "ok", "reason": "", "note": "a scripted step; built", "objective": "tpo", "oracle": False,
        "setup_s": 2.2, "trained_params": 12, "tokens": 1000, "response_tokens": 400, "padded_positions": 50,
        "seq_len": 300,
        "check": {"ok": True, "errors": {"first_loss": {"err": 0.0, "tol": 1e-3},
                                         "first_drop": {"err": None, "tol": None, "drop": LN2 - 0.5, "min": 1e-4}}},
        "losses": [LN2, 0.5, 0.4, 0.3, 0.2],
        "full_ms": measure_step._stats([250.0, 125.0, 375.0]), "tokens_per_s": 4000.0,
    }
    assert row["full_ms"]["median"] == 250.0


def test_memory_phase_row_and_its_search(mods, monkeypatch):
    """Two steps only (MEMORY_STEPS), their largest peaks (12 MiB step, 140 MiB total), one more step's FLOPs (48,
    in GFLOP), the reader's note, then the search from the largest total peak (steps of 2 pairs each: 4 fits)."""
    row, c = _measure(mods, monkeypatch, "memory", search_s=100.0, reason="peak RSS not measurable here (test)")
    assert c.calls == [2, 2, 2, 2, 2, 4]  # warm-up x2, the two steps, the counted step, the 4-pair probe (the cap)
    assert row["losses"] == [LN2, 0.5, 0.4, 0.3] and "full_ms" not in row and "tokens_per_s" not in row
    assert (row["full_peak_mib"], row["total_peak_mib"]) == (12.0, 140.0)
    assert row["memory_note"] == "peak RSS not measurable here (test)"
    assert row["step_gflop"] == 48 / 1e9
    assert row["max_micro_batch"] == 4 and row["max_micro_batch_bound"] == "cap of 4 pairs"
    assert row["micro_batch_probes"]["2"] == {"total_peak_mib": 140.0, "fits": True}


def test_all_phase_row_has_both_and_a_missing_step_peak_stays_missing(mods, monkeypatch):
    """No phase given is "all"; one warm-up step when asked for none."""
    peaks = [(10.0, 110.0), (None, 140.0), (9.0, 120.0), (13.0, 115.0)]
    row, c = _measure(mods, monkeypatch, None, peaks=peaks, warmup=0, seconds=(0.5, 0.25, 0.125, 0.375))
    assert c.calls == [2] * 5 and row["losses"] == [LN2, 0.5, 0.4, 0.3]  # 1 warm-up, 3 timed, 1 counted
    assert row["tokens_per_s"] == 4000.0 and row["full_peak_mib"] is None and row["total_peak_mib"] == 140.0
    assert "memory_note" not in row and "max_micro_batch" not in row  # search_s = 0: no search


@pytest.mark.parametrize(("search_s", "probed"), [(0.375, True), (0.3748, False)])
def test_search_predicts_a_probe_from_the_measured_median_step(mods, monkeypatch, search_s, probed):
    """The memory phase's two steps took 0.25 and 0.125 s (median 0.1875 s at 2 pairs), so 4 pairs are predicted to
    take 0.375 s: a bound of 0.375 s lets the probe start, 0.3748 s does not (and a bound under 1 s still searches)."""
    row, c = _measure(mods, monkeypatch, "memory", search_s=search_s)
    assert c.calls[-1] == (4 if probed else 2)
    assert row["max_micro_batch"] == (4 if probed else 2)
    assert row["max_micro_batch_bound"] == ("cap of 4 pairs" if probed else
                                            f"time bound ({search_s:g} s) reached before 4 pairs")


def test_first_loss_check_per_dtype(mods, monkeypatch):
    """The first loss is ln 2 to 1e-3 in fp32 and 1e-2 in 16 bits; a row that misses it is not timed."""
    off = LN2 * 1.005
    row, c = _measure(mods, monkeypatch, "time", losses=(off, 0.5))
    assert c.calls == [2, 2] and row["status"] == "failed check"
    assert row["reason"] == f"wrong result, not timed: first loss {off:.6g}, expected ln 2 = {LN2:.6g}"
    assert row["check"] == {"ok": False, "errors": {"first_loss": {"err": pytest.approx(0.005), "tol": 1e-3}}}
    row, _ = _measure(mods, monkeypatch, "time", losses=(off, 0.5), dtype="bf16")
    assert row["status"] == "ok" and row["check"]["errors"]["first_loss"]["tol"] == 1e-2
    row, _ = _measure(mods, monkeypatch, "time", losses=(float("nan"), 0.5), dtype="bf16")
    assert row["status"] == "failed check" and row["check"]["errors"]["first_loss"]["err"] == math.inf


def test_a_step_that_does_not_lower_the_loss_fails_in_fp32_only(mods, monkeypatch):
    """fp32: the loss after one optimizer step at least 1e-4 below the first; 16 bits leave it to the cross-check."""
    flat = (LN2, LN2 - 9e-5, 0.4, 0.3, 0.2)
    row, _ = _measure(mods, monkeypatch, "time", losses=flat)
    assert row["status"] == "failed check" and row["check"]["ok"] is False
    assert row["reason"] == (f"the loss did not fall after an optimizer step on the same batch ({LN2:.6g} -> "
                             f"{LN2 - 9e-5:.6g}): nothing was trained")
    assert row["check"]["errors"]["first_drop"] == {"err": None, "tol": None, "drop": pytest.approx(9e-5),
                                                    "min": 1e-4}
    row, _ = _measure(mods, monkeypatch, "time", losses=(LN2, LN2 - 1.1e-4, 0.4, 0.3, 0.2))
    assert row["status"] == "ok"
    row, _ = _measure(mods, monkeypatch, "time", losses=flat, dtype="bf16")
    assert row["status"] == "ok" and row["check"]["errors"]["first_drop"]["min"] is None


def test_a_non_finite_loss_in_the_timed_steps_fails_the_row(mods, monkeypatch):
    row, _ = _measure(mods, monkeypatch, "time", losses=(LN2, 0.5, 0.4, float("inf"), 0.2))
    assert row["status"] == "failed check"
    assert row["reason"] == f"non-finite loss during the timed steps: {[LN2, 0.5, 0.4, float('inf'), 0.2]}"


def test_failures_become_rows_and_a_reference_cache_time_is_kept(mods, monkeypatch):
    measure_step, _ = mods
    row, _ = _measure(mods, monkeypatch, "time", fail=RuntimeError("no such model"))
    assert (row["status"], row["reason"]) == ("error", "RuntimeError: no such model") and "traceback" in row
    row, _ = _measure(mods, monkeypatch, "time", fail=torch.OutOfMemoryError("CUDA out of memory. Tried 4 GiB"))
    assert (row["status"], row["reason"]) == ("OOM", "out of memory: CUDA out of memory. Tried 4 GiB")
    row, _ = _measure(mods, monkeypatch, "time", cache_s=0.25)
    assert row["reference_cache_s_per_pair"] == 0.25
    with pytest.raises(ValueError, match=r"^phase must be one of \('all', 'memory', 'time'\), got 'warm'$"):
        _measure(mods, monkeypatch, "warm")


def test_child_entry_point_names_the_row(mods, monkeypatch):
    """`run_step_contender`: the case by name, the job's search bound in place of the case's, the job's thread
    count, and the row named after its contender."""
    measure_step, _ = mods
    threads, seen = [], []
    c = Scripted(Clock(), Peak(), Peak(), (LN2,), (0.1,), [(1.0, 1.0)])
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(measure_step, "step_contenders", lambda: {"scripted": c})
    monkeypatch.setattr(measure_step, "measure_step",
                        lambda con, case, job: seen.append((con, case.name, case.search_s, job)) or {"status": "ok"})
    job = {"case": {"name": "step-tiny"}, "contender": "scripted", "threads": 3, "search_s": 5.0}
    assert measure_step.run_step_contender(job) == [{"status": "ok", "contender": "scripted",
                                                     "label": "scripted (step)", "kind": "ours", "workload": "step",
                                                     "unshared": "scripted-unshared"}]
    assert threads == [3] and seen == [(c, "step-tiny", 5.0, job)]
    seen.clear()
    measure_step.run_step_contender({"case": {"name": "step-tiny"}, "contender": "scripted"})
    assert threads == [3] and seen[0][2] == mods[1].STEP_CASES["step-tiny"].search_s


def _row(contender, objective, losses, oracle=False, **extra):
    return {"workload": "step", "status": "ok", "contender": contender, "label": contender.upper(),
            "objective": objective, "oracle": oracle, "losses": losses, **extra}


def test_cross_check_fails_a_step_that_trains_another_objective(mods):
    """Every contender's first optimizer step starts from the same weights, data and optimizer: its loss drop must
    equal the independent implementation's (official TPO, TRL) within DROP_RTOL, or the row fails its check."""
    measure_step, _ = mods
    ln2 = 0.6931472
    rows = [
        _row("official-tpo", "tpo", [ln2, 0.1067], oracle=True, label="official"),
        _row("ours-tpo", "tpo", [ln2, 0.10670 + 0.0005]),  # 0.085% of the drop apart: the same step
        _row("mutant-tpo", "tpo", [ln2, 0.30]),  # scores other tokens: another drop
        _row("ours-dpo", "dpo", [ln2, 0.4933]),  # no TRL row in this run: noted, not failed
        _row("bf16-tpo", "tpo", [ln2, 0.1067 + 0.05], dtype="bf16"),  # 8.5% apart: within bf16's 15%
    ]
    for r in rows:
        r.setdefault("dtype", "fp32")
        r["check"] = {"ok": True, "errors": {}}
    measure_step.cross_check_steps(rows)
    by = {r["contender"]: r for r in rows}
    assert by["ours-tpo"]["status"] == "ok" and by["ours-tpo"]["check"]["ok"]
    got = by["ours-tpo"]["check"]["errors"]["first_drop_vs_oracle"]
    assert got["oracle"] == "official-tpo" and got["tol"] == 0.02
    assert got["err"] == pytest.approx(0.0005 / (ln2 - 0.1067))
    bad = by["mutant-tpo"]
    assert bad["status"] == "failed check" and not bad["check"]["ok"]
    assert "does not train the same TPO objective" in bad["reason"] and "official's" in bad["reason"]
    assert by["ours-dpo"]["status"] == "ok"
    assert by["ours-dpo"]["check"]["errors"]["first_drop_vs_oracle"]["note"] == "no independent dpo step in this run"
    assert by["bf16-tpo"]["status"] == "ok" and by["official-tpo"]["status"] == "ok"
    # in 16 bits a drop within rounding noise is not judged
    tiny = [_row("official-tpo", "tpo", [ln2, ln2 - 2e-4], oracle=True, dtype="bf16"),
            _row("ours-tpo", "tpo", [ln2, ln2 - 5e-4], dtype="bf16")]
    for r in tiny:
        r["check"] = {"ok": True, "errors": {}}
    measure_step.cross_check_steps(tiny)
    assert tiny[1]["status"] == "ok"
    assert "within bf16 noise" in tiny[1]["check"]["errors"]["first_drop_vs_oracle"]["note"]


def test_cross_check_fails_a_step_that_trains_other_parameters(mods):
    """Every row's optimizer must step as many numbers as the first oracle's (`trained_params`), whatever its loss
    drop: a row that left the vision tower frozen fails its check even with the oracle's drop, and is then not
    judged on its drop; a row without the count, and every row of a run without an oracle, are not judged on it."""
    measure_step, _ = mods
    rows = [
        _row("official-tpo", "tpo", [1.0, 0.5], oracle=True, trained_params=1_234_567),
        _row("trl-dpo", "dpo", [1.0, 0.6], oracle=True, trained_params=1_234_567),
        _row("ours-tpo", "tpo", [1.0, 0.5], trained_params=1_234_567),
        _row("frozen-tower", "tpo", [1.0, 0.5], trained_params=1_000_000),  # the oracle's drop, other parameters
        _row("uncounted", "dpo", [1.0, 0.6]),
    ]
    measure_step.cross_check_steps(rows)
    by = {r["contender"]: r for r in rows}
    assert by["ours-tpo"]["status"] == "ok" and by["ours-tpo"]["check"]["errors"]["trained_params"] == {
        "err": None, "tol": None, "got": 1_234_567, "want": 1_234_567, "oracle": "official-tpo"}
    assert by["trl-dpo"]["status"] == "ok" and by["trl-dpo"]["check"]["ok"]  # the second oracle, checked too
    bad = by["frozen-tower"]
    assert bad["status"] == "failed check" and bad["check"]["ok"] is False
    assert bad["reason"] == ("its optimizer steps 1,000,000 parameters, OFFICIAL-TPO's 1,234,567: it does not train "
                             "the same parameters")
    assert "first_drop_vs_oracle" not in bad["check"]["errors"]
    assert by["uncounted"]["status"] == "ok" and "trained_params" not in by["uncounted"]["check"]["errors"]
    alone = [_row("ours-a", "tpo", [1.0, 0.5], trained_params=1), _row("ours-b", "tpo", [1.0, 0.5], trained_params=2)]
    measure_step.cross_check_steps(alone)
    assert all(r["status"] == "ok" and "trained_params" not in r["check"]["errors"] for r in alone)


def test_cross_check_writes_each_verdict_in_full(mods):
    """Which rows it judges (ok step rows with losses), what it adds to a row without a check, the tolerance of
    each dtype (a row without one is fp32), a row without an oracle and a 16-bit oracle drop within noise (every
    such row noted, not only the first), and a failure's fields."""
    measure_step, _ = mods
    others = [
        {"workload": "tpo", "status": "ok", "objective": "tpo", "losses": [1.0, 0.0]},
        {"workload": "step", "status": "failed check", "objective": "tpo", "losses": [1.0, 0.0], "check": {}},
        {"workload": "step", "status": "ok", "objective": "tpo", "losses": None},
    ]
    rows = [
        *others,
        _row("official", "tpo", [1.0, 0.5], oracle=True, check={"ok": True, "errors": {}}),
        _row("no-check", "tpo", [1.0, 0.495]),  # 1% apart, fp32: within 2%
        _row("no-errors", "tpo", [1.0, 0.485], check={"ok": True}),  # 3% apart, no dtype: fp32, fails
        _row("fp16", "tpo", [1.0, 0.44], dtype="fp16"),  # 12% apart: within 15%
        _row("fp8", "tpo", [1.0, 0.56], dtype="fp8"),  # a dtype without its own tolerance: bf16's 15%
        _row("dpo-a", "dpo", [1.0, 0.9]),
        _row("dpo-b", "dpo", [1.0, 0.8]),
    ]
    before = [dict(r) for r in others]
    measure_step.cross_check_steps(rows)
    assert others == before  # not judged, not touched
    by = {r["contender"]: r for r in rows[3:]}

    def verdict(name):
        return by[name]["check"]["errors"]["first_drop_vs_oracle"]

    assert by["official"]["check"] == {"ok": True, "errors": {}}
    assert by["no-check"]["check"] == {"ok": True, "errors": {"first_drop_vs_oracle": {
        "err": pytest.approx(0.01), "tol": 0.02, "oracle": "official"}}}
    assert by["no-errors"]["check"] == {"ok": False, "errors": {"first_drop_vs_oracle": {
        "err": pytest.approx(0.03), "tol": 0.02, "oracle": "official"}}}
    assert by["no-errors"]["status"] == "failed check" and by["no-errors"]["reason"] == (
        "its first optimizer step lowers the loss by 0.515, OFFICIAL's by 0.5 (3.0% apart, tolerance 2%): it does "
        "not train the same TPO objective")
    assert verdict("fp16") == {"err": pytest.approx(0.12), "tol": 0.15, "oracle": "official"}
    assert verdict("fp8") == {"err": pytest.approx(0.12), "tol": 0.15, "oracle": "official"}
    assert by["fp16"]["status"] == by["fp8"]["status"] == "ok"
    for name in ("dpo-a", "dpo-b"):
        assert by[name]["check"] == {"ok": True, "errors": {"first_drop_vs_oracle": {
            "err": None, "tol": None, "note": "no independent dpo step in this run"}}}


def test_cross_check_leaves_a_16bit_drop_within_noise_unjudged_and_judges_fp32_always(mods):
    """An oracle drop under 1e-3 is within 16-bit rounding noise: its bf16 rows are noted (all of them); fp32 rows
    are judged whatever the drop; a drop of exactly 1e-3 is judged."""
    measure_step, _ = mods
    rows = [_row("official", "tpo", [1.0, 1.0 - 5e-4], oracle=True, dtype="bf16"),
            _row("bf16-a", "tpo", [1.0, 0.9], dtype="bf16"), _row("bf16-b", "tpo", [1.0, 0.9], dtype="bf16"),
            _row("fp32", "tpo", [1.0, 0.9])]
    measure_step.cross_check_steps(rows)
    for r in rows[1:3]:
        assert r["status"] == "ok" and r["check"]["errors"]["first_drop_vs_oracle"] == {
            "err": None, "tol": None, "oracle": "official",
            "note": f"the oracle's first drop {5e-4:.3g} is within bf16 noise"}
    assert rows[3]["status"] == "failed check" and rows[3]["check"]["ok"] is False
    at_floor = [_row("official", "tpo", [1e-3, 0.0], oracle=True, dtype="bf16"),  # a drop of exactly 1e-3
                _row("bf16", "tpo", [1e-3, 0.0], dtype="bf16")]
    measure_step.cross_check_steps(at_floor)
    assert at_floor[1]["check"]["errors"]["first_drop_vs_oracle"]["tol"] == 0.15


def test_step_token_counts_from_the_records_words(mods):
    """The numerator of tokens/s (`StepData.tokens`), from the records' own words: the word-level processor gives
    a prompt of "USER :", (image side / patch)^2 image tokens, the prompt's words and "ASSISTANT :", counted once
    per pair, and each response's words plus EOS; "padded" is the 2B x T positions of the right-padded batch."""
    _, step_workload = mods
    case = dataclasses.replace(step_workload.STEP_CASES["step-tiny"], pairs=3)
    data = step_workload.StepData(case)
    records = data.records[:3]
    prompt = 4 + (case.image_size // case.patch_size) ** 2 + case.prompt_words
    chosen = [len(r["chosen"].split()) + 1 for r in records]
    rejected = [len(r["rejected"].split()) + 1 for r in records]
    assert all(len(r["prompt"].split()) == case.prompt_words for r in records)
    for c, r in zip(chosen, rejected, strict=True):  # unequal lengths within the case's range (plus EOS)
        assert c != r and case.response_min + 1 <= min(c, r) and max(c, r) <= case.response_max + 1
    row_len = prompt + max(chosen + rejected)
    assert data.tokens(3) == {"tokens": 3 * prompt + sum(chosen) + sum(rejected), "padded": 6 * row_len,
                              "response": sum(chosen) + sum(rejected), "row_len": row_len}
