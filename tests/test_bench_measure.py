"""bench/_measure.py in the test process: the correctness guard's verdict tensor by tensor and dtype by dtype, what a
child measures and in which order, how a failure becomes a row, and the child's entry points.

The guard is what makes a timing count (a contender whose loss or gradients are off is `failed check`, not timed),
so each case below hands it a result that is right, or wrong in one tensor, and checks the verdict and each error.
"""

from __future__ import annotations

import math
import multiprocessing as mp

import pytest
import torch
from _bench import bench_modules
from torch.utils._python_dispatch import TorchDispatchMode


@pytest.fixture(scope="module")
def mods():
    measure, contenders, workloads = bench_modules("_measure", "_contenders", "_workloads")
    return measure, contenders, workloads


def _inputs(workloads, workload: str, dtype=torch.float32, case: str = "cpu-tiny") -> dict:
    return workloads.make_inputs(workloads.CASES[case], workload, "cpu", dtype, seed=3)


def _hand_in(inp: dict, result: dict) -> torch.Tensor:
    """Put `result`'s gradients where a contender's backward leaves them, return its output."""
    for k, g in result.items():
        if k != "out":
            inp[k].grad = None if g is None else g.to(inp[k].dtype)
    return result["out"]


def test_guard_passes_the_exact_result_and_fails_one_wrong_tensor(mods):
    measure, _, workloads = mods
    inp = _inputs(workloads, "tpo")
    ref = workloads.oracle("tpo", inp)
    assert list(ref) == ["out", "hidden", "corrupted_hidden", "weight"]
    got = measure.check("tpo", inp, _hand_in(inp, ref), "fp32")
    assert got == {"ok": True, "errors": {k: {"err": 0.0, "tol": 1e-4} for k in ref}}

    # The hidden states' gradient off by 3e-4 of its largest magnitude, the tensors after it exact: one wrong tensor
    # fails the whole result, wherever it comes in the order.
    wrong = dict(ref, hidden=ref["hidden"].clone())
    scale = ref["hidden"].abs().max().item()
    wrong["hidden"].view(-1)[5] += 3e-4 * scale
    got = measure.check("tpo", inp, _hand_in(inp, wrong), "fp32")
    assert got["ok"] is False
    assert got["errors"]["hidden"]["err"] == pytest.approx(3e-4, rel=1e-3)
    assert [got["errors"][k]["err"] for k in ("out", "corrupted_hidden", "weight")] == [0.0, 0.0, 0.0]

    # A gradient never written, or one with a NaN, is an infinite error.
    missing = measure.check("tpo", inp, _hand_in(inp, dict(ref, weight=None)), "fp32")
    nan = dict(ref, corrupted_hidden=ref["corrupted_hidden"].clone())
    nan["corrupted_hidden"].view(-1)[0] = float("nan")
    with_nan = measure.check("tpo", inp, _hand_in(inp, nan), "fp32")
    assert missing["ok"] is False and missing["errors"]["weight"]["err"] == math.inf
    assert with_nan["ok"] is False and with_nan["errors"]["corrupted_hidden"]["err"] == math.inf


def test_guard_in_16_bits_allows_twice_plain_pytorchs_own_error(mods):
    """In bf16 each tensor's tolerance is 1e-2 + 2x the error of plain PyTorch computing it in bf16."""
    measure, _, workloads = mods
    inp = _inputs(workloads, "dpo", torch.bfloat16)
    ref = workloads.oracle("dpo", inp)
    plain = workloads.oracle("dpo", inp, round_to=torch.bfloat16)
    got = measure.check("dpo", inp, _hand_in(inp, ref), "bf16")
    for k in ref:
        own = ((plain[k].float() - ref[k]).abs().max() / ref[k].abs().max()).item()
        assert own > 0, k  # plain bf16 is off: the allowance is not zero
        assert got["errors"][k]["tol"] == pytest.approx(1e-2 + 2 * own, rel=1e-6), k
    # The gradients handed in were rounded to bf16 once, far inside that allowance.
    assert got["ok"] is True


def test_guard_on_logits_streams_the_same_measure(mods):
    measure, _, workloads = mods
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        inp = _inputs(workloads, "logits", dtype)
        ref = workloads.oracle("logits", inp)
        assert list(ref) == ["out", "logits", "corrupted_logits"]
        got = measure.check("logits", inp, _hand_in(inp, ref), name)
        assert got["ok"] is True, got
        for k in ("logits", "corrupted_logits"):
            own = ((ref[k].to(dtype).float() - ref[k]).abs().max() / ref[k].abs().max()).item()
            want = measure.ATOL[name] + 2 * own
            assert got["errors"][k]["tol"] == pytest.approx(want, rel=1e-6), (name, k)
            assert (own > 0) == (name == "bf16")
        wrong = dict(ref, logits=ref["logits"].clone())
        wrong["logits"].view(-1)[7] += 0.05 * ref["logits"].abs().max()
        bad = measure.check("logits", inp, _hand_in(inp, wrong), name)
        assert bad["ok"] is False and bad["errors"]["logits"]["err"] == pytest.approx(0.05, rel=2e-2)
        assert bad["errors"]["corrupted_logits"]["err"] <= bad["errors"]["corrupted_logits"]["tol"]


def test_relative_error_and_timing_summary(mods):
    measure, _, _ = mods
    ref = torch.tensor([1e-3, -5e-4])
    assert measure._rel_err(torch.tensor([1e-3 + 1e-5, -5e-4]), ref) == pytest.approx(1e-2, rel=1e-4)
    assert measure._rel_err(None, ref) == math.inf
    assert measure._rel_err(torch.zeros(2), torch.zeros(2)) == 0.0
    # Inclusive quartiles stay inside what was measured (two repeats included).
    assert measure._stats([95.0, 209.0]) == {"median": 152.0, "p25": 123.5, "p75": 180.5, "min": 95.0,
                                             "times": [95.0, 209.0]}
    assert measure._stats([7.0]) == {"median": 7.0, "p25": 7.0, "p75": 7.0, "min": 7.0, "times": [7.0]}
    assert measure._stats([4.0, 1.0, 3.0, 2.0, 5.0]) == {"median": 3.0, "p25": 2.0, "p75": 4.0, "min": 1.0,
                                                         "times": [4.0, 1.0, 3.0, 2.0, 5.0]}


class _Recording:
    """Wraps a contender: each `step` call's backward flag is recorded; optionally raises at call `fail_at`."""

    def __init__(self, inner, fail_at: int | None = None, error: BaseException | None = None):
        self.inner, self.calls, self.fail_at, self.error = inner, [], fail_at, error
        self.kind, self.workloads, self.dtypes = inner.kind, inner.workloads, set()

    def step(self, workload, inp, backward):
        self.calls.append(backward)
        self.dtypes.add(inp["hidden" if "hidden" in inp else "logits"].dtype)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise self.error
        return self.inner.step(workload, inp, backward)

    def executed_flops(self, case, workload, mode, inp):
        return {"fwd": 1e12, "full": 2e12}[mode]


def test_a_child_measures_in_order_and_times_what_it_says(mods, monkeypatch):
    measure, contenders, workloads = mods
    case = workloads.CASES["cpu-tiny"]
    c = _Recording(contenders.Naive())
    ticks = iter([100.0, 300.0, 200.0, 400.0, 600.0, 500.0])
    monkeypatch.setattr(measure, "_timed", lambda fn, device: (fn(), next(ticks))[1])
    row = measure.measure_workload(c, case, "tpo", {"device": "cpu", "dtype": "fp32", "seed": 3, "warmup": 2,
                                                    "repeats": 3})
    # 2 warm-ups with backward, one forward and one forward+backward for the peaks, 3 timed forwards, 3 fwd+bwd.
    assert c.calls == [True, True, False, True, False, False, False, True, True, True]
    assert row["status"] == "ok" and row["check"]["ok"] and row["note"] == contenders.Naive().workloads["tpo"]
    targets = _inputs(workloads, "tpo")["targets"]
    assert row["valid_frac"] == pytest.approx((targets != -100).sum().item() / targets.numel(), abs=1e-7)
    assert row["fwd_ms"]["median"] == 200.0 and row["full_ms"]["median"] == 500.0
    assert row["fwd_tflops"] == pytest.approx(1e12 / 0.2 / 1e12) and row["full_tflops"] == pytest.approx(4.0)
    assert row["full_gflop_counted"] == 2000.0 and "fwd_gflop_counted" not in row
    assert isinstance(row["fwd_peak_mib"], float) and isinstance(row["full_peak_mib"], float)
    assert "memory_note" not in row and "fwd_gbs" not in row  # tpo moves no logits tensor: no GB/s

    assert c.dtypes == {torch.float32}
    monkeypatch.setattr(measure, "_timed", lambda fn, device: (fn(), 250.0)[1])
    c = _Recording(contenders.Naive())
    logits = measure.measure_workload(c, case, "logits",
                                      {"device": "cpu", "dtype": "bf16", "seed": 3, "warmup": 0, "repeats": 1})
    assert logits["status"] == "ok", logits
    assert c.calls == [True, False, True, False, True] and c.dtypes == {torch.bfloat16}  # one warm-up at least
    for mode in ("fwd", "full"):
        assert logits[f"{mode}_gbs"] == pytest.approx(workloads.traffic(case, "logits", mode, 2) / 0.25 / 1e9)


def _hide_proc(monkeypatch, measure) -> None:
    """Every file `_measure` opens refused, as /proc/self/clear_refs is where it is not writable."""

    def no_proc(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(measure, "open", no_proc, raising=False)


def test_a_cpu_call_is_timed_in_milliseconds(mods, monkeypatch):
    measure, _, _ = mods
    clock = iter([10.0, 10.25])
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock))
    calls = []
    assert measure._timed(lambda: calls.append(1), "cpu") == 250.0 and calls == [1]


def test_floors_are_measured_but_not_checked(mods, monkeypatch):
    measure, contenders, workloads = mods
    floor = contenders.all_contenders(("torch",))["floor"]
    cfg = {"device": "cpu", "dtype": "fp32", "seed": 3, "warmup": 0, "repeats": 1}
    row = measure.measure_workload(floor, workloads.CASES["cpu-tiny"], "tpo", cfg)
    assert row["status"] == "ok" and "check" not in row and row["full_ms"]["median"] > 0

    _hide_proc(monkeypatch, measure)
    blind = measure.measure_workload(contenders.Naive(), workloads.CASES["cpu-tiny"], "tpo", cfg)
    assert blind["memory_note"] == "peak RSS not measurable here (PermissionError: /proc/self/clear_refs)"
    assert blind["status"] == "ok" and blind["fwd_peak_mib"] is None and blind["full_peak_mib"] is None


class _Products(TorchDispatchMode):
    """The (M, K, N) of every matrix product run inside, and the other ops' names."""

    def __init__(self):
        super().__init__()
        self.products, self.ops = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "dot", "mv"):
            assert name == "mm", f"a product the floor does not count: {func}"
            (m, k), n = args[0].shape, args[1].shape[1]
            self.products.append((m, k, n))
        else:
            self.ops.append((name, tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out


# The floor's lm_head GEMMs per workload, from its documented rule (docs/bench.md: 2NDV per clean forward,
# +4NDV for the branch with gradient): the forward-only branches' hidden states, then the trained branch's.
# POVID's corrupted branches are the B chosen sequences, scored over the vocabulary for their argmax.
_FLOOR_BRANCHES = {
    "primitive": ([], "hidden"),
    "fisao": ([], "hidden"),
    "tpo": (["ref_hidden"], "hidden"),  # the corrupted branches are gathers: O(N D), not in the floor
    "dpo": (["ref_hidden"], "hidden"),
    "povid": (["corrupted_hidden", "ref_hidden", "ref_corrupted_hidden"], "hidden"),
}


@pytest.mark.parametrize("workload", sorted(_FLOOR_BRANCHES))
def test_the_floors_run_the_documented_gemms_and_are_credited_with_their_flops(mods, workload):
    """Each floor runs exactly the bare GEMMs its rule names, on all rows (`floor`) or on the rows with a target
    (`floor-valid`: the first rows of the flat targets, POVID's corrupted branches the chosen sequences'), with the
    two gradient GEMMs of the trained branch in fwd+bwd; the FLOPs each is credited with are those GEMMs' 2MKN;
    its output is the trained branch's logits."""
    _, contenders, workloads = mods
    case = workloads.CASES["cpu-tiny"]
    inp = _inputs(workloads, workload)
    d, v = case.d, case.v
    flat = inp["targets"].flatten()
    known = contenders.all_contenders(("torch",))
    for name, valid_only in (("floor", False), ("floor-valid", True)):
        floor = known[name]

        def rows(key, valid_only=valid_only):
            n = inp[key].numel() // d
            return int((flat[:n] != workloads.IGNORE_INDEX).sum()) if valid_only else n

        others, trained = _FLOOR_BRANCHES[workload]
        fwd = sorted([(rows(k), d, v) for k in others] + [(rows(trained), d, v)])
        full = sorted(fwd + [(rows(trained), v, d), (v, rows(trained), d)])
        assert rows(trained) < case.n or not valid_only  # the case has ignored rows
        for mode, backward, expected in (("fwd", False, fwd), ("full", True, full)):
            with _Products() as rec:
                out = floor.step(workload, inp, backward)
            assert sorted(rec.products) == expected, (name, mode)
            assert floor.executed_flops(case, workload, mode, inp) == sum(2 * m * k * n for m, k, n in expected)
        h = inp[trained].detach().reshape(-1, d)
        if valid_only:
            h = h[flat[:h.shape[0]] != workloads.IGNORE_INDEX]
        torch.testing.assert_close(out, h @ inp["weight"].detach().t(), rtol=0, atol=0)
        with _Products() as rec:  # `run` is the forward (Contender's interface)
            torch.testing.assert_close(floor.run(workload, inp), out, rtol=0, atol=0)
        assert sorted(rec.products) == fwd


def test_the_memory_floor_reads_each_logits_tensor_once_and_writes_one_gradient_each(mods):
    """`logits`: a row sum of the clean and the corrupted (N, V) logits (the output: the clean one's), and in
    fwd+bwd one (N, V) zero tensor each, no product; the valid-rows floor does not apply to it."""
    _, contenders, workloads = mods
    inp = _inputs(workloads, "logits")
    floor = contenders.all_contenders(("torch",))["floor"]
    nv = tuple(inp["logits"].shape)
    for backward in (False, True):
        with _Products() as rec:
            out = floor.step("logits", inp, backward)
        assert rec.products == []
        work = [op for op in rec.ops if op[0] != "detach"]
        assert work == [("sum", nv[:1])] * 2 + [("zeros_like", nv)] * (2 if backward else 0), rec.ops
        torch.testing.assert_close(out, inp["logits"].sum(-1), rtol=0, atol=0)
        torch.testing.assert_close(floor.run("logits", inp), out, rtol=0, atol=0)
    assert floor.executed_flops(workloads.CASES["cpu-tiny"], "logits", "full", inp) is None
    valid = contenders.all_contenders(("torch",))["floor-valid"]
    assert "logits" not in valid.workloads and "no valid-rows variant" in valid.not_applicable["logits"]


def test_a_loss_contender_is_credited_with_the_exact_kernels_flops(mods):
    """TFLOP/s credits every non-floor contender with the exact O(N)-memory kernel's work, whatever it runs:
    2NDV per clean forward, 8NDV per clean branch with gradient (forward, recomputed logits, dH, dW), NDV for
    POVID's argmax sweep over the N/2 corrupted chosen rows; `logits` is memory-bound (no FLOPs)."""
    _, contenders, workloads = mods
    case = workloads.CASES["cpu-tiny"]
    ndv = case.n * case.d * case.v
    expected = {  # (fwd, fwd+bwd) in units of NDV
        "primitive": (2, 8), "fisao": (2, 8), "tpo": (2 + 2, 8 + 2), "dpo": (2 + 2, 8 + 2),
        "povid": (2 + 1 + 2 + 1, 8 + 1 + 2 + 1),
    }
    for c in (contenders.Naive(), contenders.TRLChunked(), contenders.TpoFast("torch")):
        for workload, (fwd, full) in expected.items():
            inp = _inputs(workloads, workload)
            assert c.executed_flops(case, workload, "fwd", inp) == fwd * ndv, (c.name, workload)
            assert c.executed_flops(case, workload, "full", inp) == full * ndv, (c.name, workload)
        assert c.executed_flops(case, "logits", "full", _inputs(workloads, "logits")) is None


def test_every_contender_reports_under_the_name_it_is_chosen_by(mods):
    """A row carries `contender.name`, and the ratios look their yardsticks up by it ("naive", "floor",
    "floor-valid"): each name must be the `--contenders` key that selects it."""
    _, contenders, _ = mods
    known = contenders.all_contenders(contenders.TPO_FAST_BACKENDS)
    assert {"naive", "floor", "floor-valid", "trl", "liger", "cce", "broken"} <= set(known)
    assert [c.name for c in known.values()] == list(known)


def test_a_failing_contender_becomes_a_row(mods):
    measure, contenders, workloads = mods
    case = workloads.CASES["cpu-tiny"]
    cfg = {"device": "cpu", "dtype": "fp32", "seed": 3, "warmup": 1, "repeats": 2}
    error = measure.measure_workload(_Recording(contenders.Naive(), 3, RuntimeError("boom\nsecond line")), case,
                                     "tpo", cfg)
    assert error["status"] == "error" and error["reason"] == "RuntimeError: boom"
    assert "RuntimeError: boom" in error["traceback"] and "full_ms" not in error
    oom = measure.measure_workload(_Recording(contenders.Naive(), 1, torch.OutOfMemoryError("CUDA out of memory. "
                                                                                              "Tried 2 GiB")),
                                   case, "tpo", cfg)
    assert oom == {**{k: oom[k] for k in ("note", "valid_frac")}, "status": "OOM",
                   "reason": "out of memory: CUDA out of memory. Tried 2 GiB"}
    assert measure.failure(RuntimeError("DefaultCPUAllocator: can't allocate: Out Of Memory"), "cpu")["status"] == "OOM"
    bare = measure.failure(ValueError(), "cpu")
    assert bare["status"] == "error" and bare["reason"] == "ValueError"
    long = measure.failure(RuntimeError("x" * 300), "cpu")
    assert long["reason"] == "RuntimeError: " + "x" * 200
    long_oom = measure.failure(torch.OutOfMemoryError("y" * 300), "cpu")
    assert long_oom["reason"] == "out of memory: " + "y" * 160

    def deep(n):
        if n == 0:
            raise KeyError("deep")
        deep(n - 1)

    try:
        deep(12)
    except KeyError as e:
        row = measure.failure(e, "cpu")
    # The outermost six of the 14 frames: this test's and five of deep's (the last two folded into one line).
    assert row["traceback"].count("\n  File ") == 4 and "[Previous line repeated 2 more times]" in row["traceback"]

    # The guard's reason names each failing tensor with its error and tolerance.
    broken = measure.measure_workload(contenders.Broken(), case, "tpo", cfg)
    assert broken["status"] == "failed check" and not broken["check"]["ok"]
    bad = {k: v for k, v in broken["check"]["errors"].items() if not v["err"] <= v["tol"]}
    assert broken["reason"] == "wrong result, not timed: " + ", ".join(
        f"{k} rel. err {v['err']:.2e} > {v['tol']:.2e}" for k, v in bad.items())


def _received(conn):
    assert conn.poll(1), "the child entry sent nothing"  # it ran in this process: sent by now, or never
    return conn.recv()


def test_the_child_entry_points(mods, monkeypatch):
    measure, contenders, workloads = mods
    case = workloads.CASES["cpu-tiny"]
    job = {"case": {k: getattr(case, k) for k in ("name", "d", "v", "n", "model", "targets")},
           "backends": ["torch"], "contender": "naive",
           "workloads": ["tpo", "dpo"], "device": "cpu", "dtype": "fp32", "seed": 3, "warmup": 0, "repeats": 1,
           "threads": None}
    rows = measure.run_contender(job)
    assert [(r["contender"], r["workload"], r["kind"], r["status"]) for r in rows] == [
        ("naive", "tpo", "baseline", "ok"), ("naive", "dpo", "baseline", "ok")]
    assert rows[0]["label"] == "naive (official TPO code)" and rows[0]["check"]["ok"]

    # The job's thread count is set in the child (recorded here: a real change of the test process's thread pool
    # can hang a forked mutation-testing child).
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    measure.run_contender(dict(job, threads=3, workloads=["dpo"]))
    measure.run_contender(dict(job, threads=None, workloads=["dpo"]))
    assert threads == [3]

    seen = []

    def no_setup(self, device):
        seen.append((self.name, device, getattr(self, "allow_cpu", None)))
        raise ImportError("no liger here")

    monkeypatch.setattr(contenders.Naive, "setup", no_setup)
    assert measure.run_contender(dict(job, workloads=["tpo", "logits"])) == [
        {"status": "error", "reason": "set-up failed: ImportError: no liger here", "contender": "naive",
         "label": label, "kind": "baseline", "workload": w}
        for w, label in (("tpo", "naive (official TPO code)"), ("logits", "naive (fp32 log_softmax + gather)"))]
    # Cut Cross-Entropy is timed on the CPU too (its own check refuses it there otherwise).
    monkeypatch.setattr(contenders.CCE, "setup", no_setup)
    assert measure.run_contender(dict(job, contender="cce"))[0]["status"] == "error"
    assert seen == [("naive", "cpu", None), ("cce", "cpu", True)]
    # A step case goes to the step workload's own entry.
    step_jobs = []
    (measure_step,) = bench_modules("_measure_step")
    monkeypatch.setattr(measure_step, "run_step_contender", lambda job: step_jobs.append(job) or ["step row"])
    step_job = dict(job, case={"name": "cpu-step-tiny", "step": True})
    assert measure.run_contender(step_job) == ["step row"] and step_jobs == [step_job]
    monkeypatch.undo()

    parent, child = mp.Pipe()
    measure.child_main(dict(job, workloads=["dpo"]), child)
    status, sent, info = _received(parent)
    assert status == "ok" and [r["workload"] for r in sent] == ["dpo"] and info == {"device_name": None}
    parent, child = mp.Pipe()
    measure.child_main(dict(job, contender="no-such-contender"), child)
    status, text = _received(parent)
    assert status == "error" and text.startswith("KeyError: 'no-such-contender'\n")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="peak RSS is read from /proc")
def test_cpu_peak_memory_is_what_a_call_touched_above_the_rss_before_it(mods, monkeypatch):
    measure, _, _ = mods
    mem = measure._CpuMemory()
    assert mem.reason is None
    mem.start()
    # 64 MiB, written, then freed: above glibc's largest mmap threshold (32 MiB), so always fresh pages.
    x = torch.ones(64 * 2**20 // 4)
    del x
    assert 63.5 <= mem.peak() <= 72  # the allocator's own pages may come on top, not many
    mem.start()
    assert 0 <= mem.peak() < 8  # a fresh start forgets the earlier peak

    _hide_proc(monkeypatch, measure)
    blind = measure._CpuMemory()
    assert blind.reason == "peak RSS not measurable here (PermissionError: /proc/self/clear_refs)"
    blind.start()  # no file is touched
    assert blind.peak() is None
