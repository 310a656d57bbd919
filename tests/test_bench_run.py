"""bench/run.py in-process: the run's plan from the command line (`parse_args`, `_settings`: defaults per device and
workload family, every refusal), the contender names and the tpo_fast backends they need, what each (case,
contender) is given to do (`_job`) and the rows one child's result becomes (`_phase_rows`). The runner tests in
tests/test_bench_smoke.py run the whole script in a child process, which mutation testing cannot see into."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from _bench import BENCH, bench_modules


@pytest.fixture(scope="module")
def mods():
    run, contenders, workloads = bench_modules("run", "_contenders", "_workloads")
    return run, contenders, workloads


def _torch(cuda: bool):
    """torch as `_settings` reads it: only `cuda.is_available()`."""
    return SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: cuda))


def test_the_command_line_defaults(mods):
    run, _, workloads = mods
    a = run.parse_args([])
    assert (a.device, a.cases, a.contenders, a.workloads, a.dtype, a.repeats, a.warmup, a.rounds, a.search_s) == (
        "auto", None, None, ",".join(workloads.DEFAULT_WORKLOADS), None, None, None, None, None)
    assert (a.seed, a.threads, a.out.resolve(), a.stem, a.no_plots, a.timeout, a.deadline_s) == (
        0, None, (BENCH / "results").resolve(), None, False, 3600, None)
    a = run.parse_args(["--device", "cpu", "--dtype", "bf16", "--repeats", "7", "--warmup", "2", "--rounds", "3",
                        "--search-s", "4.5", "--seed", "3", "--threads", "2", "--out", "x", "--stem", "s",
                        "--no-plots", "--timeout", "9", "--deadline-s", "100"])
    assert (a.device, a.dtype, a.repeats, a.warmup, a.rounds, a.search_s, a.seed, a.threads, a.out, a.stem,
            a.no_plots, a.timeout, a.deadline_s) == ("cpu", "bf16", 7, 2, 3, 4.5, 3, 2, Path("x"), "s", True, 9.0,
                                                     100.0)
    for device in ("auto", "cpu", "cuda"):
        assert run.parse_args(["--device", device]).device == device
    for dtype in ("fp32", "bf16", "fp16"):
        assert run.parse_args(["--dtype", dtype]).dtype == dtype
    for bad in (["--device", "tpu"], ["--dtype", "fp64"], ["--repeats", "x"]):
        with pytest.raises(SystemExit):
            run.parse_args(bad)


def _plan(run, argv, cuda=False):
    return run._settings(run.parse_args(argv), _torch(cuda))


def test_the_plan_takes_each_devices_defaults(mods):
    """CPU: the `cpu` loss cases in fp32, 5 timed calls after 1 warm-up; CUDA: the `gpu` grid in bf16, 20 after 3.
    The step workload alone: cpu-step, 3 after 1 / gpu-step, 10 after 2; with loss workloads too, both default case
    lists and the loss workloads' counts. Given options win."""
    run, contenders, workloads = mods
    names = lambda cases: [c.name for c in cases]  # noqa: E731
    cpu = _plan(run, [])
    assert (cpu["device"], cpu["dtype"], cpu["repeats"], cpu["warmup"], cpu["rounds"]) == ("cpu", "fp32", 5, 1, 3)
    assert names(cpu["cases"]) == names(workloads.parse_cases("cpu"))
    assert cpu["workloads"] == list(workloads.DEFAULT_WORKLOADS)
    assert cpu["names"] == list(contenders.DEFAULT) and cpu["backends"] == contenders.TPO_FAST_BACKENDS
    assert set(cpu["names"]) <= set(cpu["contenders"]) and cpu["contenders"]["cce"].allow_cpu is False
    assert (cpu["seed"], cpu["threads"], cpu["timeout"], cpu["search_s"], cpu["deadline"], cpu["deadline_s"]) == (
        0, None, 3600, None, None, None)
    gpu = _plan(run, [], cuda=True)
    assert (gpu["device"], gpu["dtype"], gpu["repeats"], gpu["warmup"], gpu["rounds"]) == ("cuda", "bf16", 20, 3, 1)
    assert names(gpu["cases"]) == names(workloads.parse_cases("gpu"))
    step = _plan(run, ["--workloads", "step"])
    assert (names(step["cases"]), step["repeats"], step["warmup"], step["rounds"]) == (["cpu-step"], 3, 1, 1)
    step = _plan(run, ["--workloads", "step"], cuda=True)
    assert (names(step["cases"]), step["repeats"], step["warmup"], step["dtype"]) == (["llava7b-step"], 10, 2, "bf16")
    both = _plan(run, ["--workloads", " tpo , step ,"])
    assert both["workloads"] == ["tpo", "step"]
    assert names(both["cases"]) == names(workloads.parse_cases("cpu")) + ["cpu-step"]
    assert (both["repeats"], both["warmup"], both["rounds"]) == (5, 1, 3)
    assert _plan(run, ["--repeats", "2"])["rounds"] == 2  # never more rounds than timed calls
    first_step = _plan(run, ["--workloads", "tpo,step", "--cases", "cpu-step,cpu-tiny"])
    assert (first_step["repeats"], first_step["warmup"]) == (5, 1)  # not all step cases: the loss defaults
    given = _plan(run, ["--dtype", "bf16", "--repeats", "4", "--warmup", "2", "--rounds", "2", "--seed", "5",
                        "--threads", "1", "--timeout", "30", "--search-s", "0", "--cases", "cpu-tiny"])
    assert (given["dtype"], given["repeats"], given["warmup"], given["rounds"], given["seed"], given["threads"],
            given["timeout"], given["search_s"], names(given["cases"])) == ("bf16", 4, 2, 2, 5, 1, 30, 0, ["cpu-tiny"])
    before = time.time()
    timed = _plan(run, ["--deadline-s", "100"])
    assert timed["deadline_s"] == 100 and before + 100 <= timed["deadline"] <= time.time() + 100


def test_the_defaults_time_the_fused_path_once(mods):
    """The plain tpo_fast contender runs the losses' default ("auto": the fused path), so the default list leaves out
    `-fused`, the same code under another name; named, it runs, and 'tpo_fast' still lists it."""
    run, contenders, _ = mods
    assert "tpo_fast-torch" in contenders.DEFAULT and "tpo_fast-torch-recompute" in contenders.DEFAULT
    assert not [n for n in contenders.DEFAULT if n.endswith("-fused")]
    assert "tpo_fast-torch-fused" in _plan(run, ["--contenders", "naive,tpo_fast-torch-fused"])["names"]
    assert "tpo_fast-triton-fused" in run._contender_names("tpo_fast")


def test_cce_runs_on_a_cpu_only_when_named(mods):
    run, _, _ = mods
    assert _plan(run, ["--contenders", "naive,cce"])["contenders"]["cce"].allow_cpu is True
    assert _plan(run, ["--contenders", "naive"])["contenders"]["cce"].allow_cpu is False
    assert _plan(run, ["--contenders", "all"])["contenders"]["cce"].allow_cpu is False
    named = _plan(run, ["--contenders", "naive,cce-exact"])["contenders"]
    assert (named["cce-exact"].allow_cpu, named["cce"].allow_cpu) == (True, False)
    # the names as `_contender_names` reads them: blanks around a name do not hide it
    assert _plan(run, ["--contenders", "naive, cce"])["contenders"]["cce"].allow_cpu is True
    assert _plan(run, ["--contenders", " cce ,naive"])["contenders"]["cce"].allow_cpu is True


@pytest.mark.parametrize(("argv", "cuda", "message"), [
    (["--device", "cuda"], False, "--device cuda was asked for but torch sees no CUDA device"),
    (["--workloads", "tpo,nope,bad"], False, "unknown workload(s) nope, bad; choose from "),
    (["--cases", "d3-v4"], False, None),  # the case parser's own message
    (["--workloads", "step", "--cases", "cpu-tiny"], False,
     "no case runs these workloads: the step cases ({steps}) run only --workloads step, the other cases only the "
     "other workloads"),
    (["--repeats", "0"], False, "--repeats must be >= 1"),
    (["--warmup", "0"], False, "--warmup must be >= 1: the first, untimed call is also the one whose result is "
                               "checked"),
    *(([flag, value], False, f"{flag} must be a finite number of seconds > 0, got {value}")
      for flag in ("--deadline-s", "--timeout") for value in ("0", "-5", "-2.5", "nan", "inf")),
    (["--threads", "0"], False, "--threads must be >= 1, got 0"),
    (["--threads", "-2"], False, "--threads must be >= 1, got -2"),
    (["--seed", "-1"], False, "--seed must be an int in [0, 2**32 - 1], got -1"),
    (["--seed", str(2**32)], False, f"--seed must be an int in [0, 2**32 - 1], got {2**32}"),
    *((["--search-s", value], False, f"--search-s must be a finite number of seconds >= 0 (0: no search), got {value}")
      for value in ("-1", "nan", "inf")),
    (["--rounds", "0"], False, "--rounds must be between 1 and --repeats (5), got 0"),
    (["--rounds", "6"], False, "--rounds must be between 1 and --repeats (5), got 6"),
    (["--rounds", "2"], True, "--rounds is for CPU runs, where the timed calls have their own child; on CUDA one "
                              "child per contender measures memory and time (leave --rounds at 1)"),
    (["--contenders", "naive,nobody"], False, "unknown contender(s) nobody; choose from "),
    (["--stem", "/tmp/x"], False, "--stem is a file name without a folder, got '/tmp/x'; --out picks the folder"),
    (["--stem", "sub/x"], False, "--stem is a file name without a folder, got 'sub/x'; --out picks the folder"),
    (["--stem", ""], False, "--stem is a file name without a folder, got ''; --out picks the folder"),
    (["--stem", ".."], False, "--stem is a file name without a folder, got '..'; --out picks the folder"),
])
def test_the_plan_refuses_what_it_cannot_run_and_says_why(mods, argv, cuda, message):
    run, _, workloads = mods
    with pytest.raises(SystemExit) as e:
        _plan(run, argv, cuda)
    if message is None:
        with pytest.raises(ValueError) as parsed:
            workloads.parse_cases("d3-v4")
        message = str(parsed.value)
    message = message.replace("{steps}", ", ".join(workloads.STEP_CASES))
    if message.endswith("choose from "):
        assert str(e.value.code).startswith(message)
        if "workload" in message:
            assert str(e.value.code) == message + ", ".join(workloads.WORKLOADS)
    else:
        assert str(e.value.code) == message
    assert _plan(run, ["--rounds", "5"])["rounds"] == 5 and _plan(run, ["--warmup", "1"])["warmup"] == 1
    assert _plan(run, ["--timeout", "0.5"])["timeout"] == 0.5 and _plan(run, ["--threads", "1"])["threads"] == 1
    _plan(run, ["--stem", "cpu_run.v2"])  # a plain name with dots passes


def test_the_out_folder_is_checked_before_anything_runs(mods, tmp_path):
    """A file where the folder (or a folder above it) should be was a FileExistsError once the whole run was over."""
    run, _, _ = mods
    afile = tmp_path / "afile"
    afile.write_text("")
    for out in (afile, afile / "sub" / "deeper"):
        with pytest.raises(SystemExit) as e:
            _plan(run, ["--out", str(out)])
        assert e.value.code == f"--out is the folder for the results, but {afile} is not a folder"
    assert not (afile.parent / "new").exists()
    for out in (tmp_path, tmp_path / "new" / "sub", Path("relative-not-made")):  # a folder, or one to make
        assert _plan(run, ["--out", str(out)])["device"] == "cpu"
    assert not (tmp_path / "new").exists() and not Path("relative-not-made").exists()  # the check makes nothing
    # a file the run writes at the end that is a folder there (each of them, default or given stem)
    for stem, argv in (("results_cpu_fp32", []), ("mine", ["--stem", "mine"]),
                       ("results_cpu_step", ["--workloads", "step"])):
        for suffix in run.OUT_SUFFIXES:
            (tmp_path / f"{stem}{suffix}").mkdir()
            with pytest.raises(SystemExit) as e:
                _plan(run, ["--out", str(tmp_path), *argv])
            assert e.value.code == (f"{tmp_path / (stem + suffix)} is a folder, where the run writes a file; remove "
                                    "it, or pass another --stem or --out")
            (tmp_path / f"{stem}{suffix}").rmdir()
        assert _plan(run, ["--out", str(tmp_path), *argv])["stem"] == stem


def test_workloads_and_cases_run_once_each_in_the_order_first_named(mods):
    """`--workloads dpo,dpo` printed every table twice; `--cases cpu-tiny,cpu-tiny` two rows of each contender in
    one table, one compared with the other."""
    run, _, _ = mods
    plan = _plan(run, ["--workloads", "dpo, tpo,dpo,,tpo", "--cases", "cpu-tiny,d64-v128-n32, cpu-tiny,d64-v128-n32"])
    assert plan["workloads"] == ["dpo", "tpo"]
    assert [c.name for c in plan["cases"]] == ["cpu-tiny", "d64-v128-n32"]
    assert run._items(" b,a,, b ,c,a") == ["b", "a", "c"] and run._items("") == []


def test_contender_names_expand_in_order_without_repeats(mods):
    """'tpo_fast' is every tpo_fast contender of every backend, 'all' the defaults; names keep the order asked, once
    each; blanks are skipped; an unknown name is refused with the known ones listed."""
    run, contenders, _ = mods
    every = [n for n in contenders.all_contenders(contenders.TPO_FAST_BACKENDS) if n.startswith("tpo_fast-")]
    assert run._contender_names(" naive , ,tpo_fast,naive") == ["naive", *every]
    assert run._contender_names("all,broken") == [*contenders.DEFAULT, "broken"]
    assert run._contender_names("floor-valid, trl") == ["floor-valid", "trl"]
    known = contenders.all_contenders(contenders.TPO_FAST_BACKENDS)
    with pytest.raises(SystemExit) as e:
        run._contender_names("naive,ghost,tpo_fast-x,spook,tpo_fast-torch-x")  # a backend tpo_fast lacks, too
    assert e.value.code == (f"unknown contender(s) ghost, tpo_fast-x, spook, tpo_fast-torch-x; choose from "
                            f"{', '.join(known)} or 'tpo_fast'")
    # a backend of tpo_fast's outside the defaults gets its contenders when named
    assert run._contender_names("tpo_fast-reference-fused,naive") == ["tpo_fast-reference-fused", "naive"]


def test_an_unknown_tpo_fast_backend_is_refused_by_the_plan(mods):
    """It ran as a contender of no workload: every row `n/a`, an empty table and exit status 0."""
    run, contenders, _ = mods
    with pytest.raises(SystemExit) as e:
        _plan(run, ["--contenders", "naive,tpo_fast-bogus"])
    known = contenders.all_contenders(contenders.TPO_FAST_BACKENDS)
    assert e.value.code == f"unknown contender(s) tpo_fast-bogus; choose from {', '.join(known)} or 'tpo_fast'"


def test_backends_are_the_defaults_and_those_named(mods):
    run, contenders, _ = mods
    defaults = contenders.TPO_FAST_BACKENDS
    assert run._backends(["naive", "trl"]) == defaults
    assert run._backends(["tpo_fast-cpp", "tpo_fast-reference-fused-tgemm", "tpo_fast-auto-recompute",
                          "tpo_fast-x-fused", "tpo_fast-cpp"]) == tuple(dict.fromkeys((*defaults, "cpp", "reference",
                                                                                        "auto")))


def _loss_plan(known: dict, **changes) -> dict:
    """A plan as `_settings` returns it, on the CPU over the torch backend, with `changes`."""
    plan = {"device": "cpu", "contenders": known, "names": ["naive"], "workloads": ["tpo", "dpo"],
            "backends": ("torch",), "dtype": "fp32", "repeats": 3, "rounds": 1, "warmup": 1, "seed": 0,
            "threads": None, "search_s": None, "timeout": 60.0}
    return {**plan, **changes}


def test_a_job_lists_the_workloads_a_contender_runs_and_rows_for_the_others(mods, monkeypatch):
    """Per (case, contender): nothing for a contender or a workload of the other family (loss / step); an `n/a` row
    for a workload it does not offer (its reason, or "not offered"); an `unavailable` row where it cannot run here
    (its reason and note); a child job with the plan's settings for the rest."""
    run, contenders, workloads = mods
    known = contenders.all_contenders(("torch",))
    plan = _loss_plan(known, workloads=["tpo", "dpo", "primitive", "step"], seed=4, threads=2, search_s=7.0)
    loss = workloads.CASES["cpu-tiny"]
    step = workloads.STEP_CASES["step-tiny"]
    assert run._job(loss, "ours-tpo", {**plan, "contenders": {"ours-tpo": object.__new__(type(
        "S", (), {"family": "step"}))}}) == ([], None)
    rows, job = run._job(loss, "liger", plan)
    liger = known["liger"]
    assert rows == [{"contender": "liger", "label": liger.label_for("tpo"), "kind": "peer", "workload": "tpo",
                     "status": "n/a", "reason": liger.not_applicable["tpo"]},
                    {"contender": "liger", "label": liger.label_for("primitive"), "kind": "peer",
                     "workload": "primitive", "status": "n/a", "reason": liger.not_applicable["primitive"]}]
    assert job == {"backends": ("torch",), "device": "cpu", "dtype": "fp32", "repeats": 3, "warmup": 1, "seed": 4,
                   "threads": 2, "search_s": 7.0, "contender": "liger", "workloads": ["dpo"],
                   "case": {"name": loss.name, "d": loss.d, "v": loss.v, "n": loss.n, "model": loss.model,
                            "targets": loss.targets}}
    monkeypatch.setattr(liger, "not_applicable", {})
    assert [r["reason"] for r in run._job(loss, "liger", plan)[0]] == ["not offered", "not offered"]
    monkeypatch.setattr(liger, "availability", lambda device, w: f"no {w} on {device}")
    rows, job = run._job(loss, "liger", plan)
    assert job is None and rows[1] == {"contender": "liger", "label": liger.label_for("dpo"), "kind": "peer",
                                        "workload": "dpo", "status": "unavailable", "reason": "no dpo on cpu",
                                        "note": liger.workloads["dpo"]}
    rows, job = run._job(step, "ours-tpo", plan)
    assert rows == [] and job["workloads"] == ["step"] and job["case"] == step.job()
    assert run._job(step, "naive", plan) == ([], None)  # a loss contender on a step case
    rows, job = run._job(workloads.STEP_CASES["llava7b-step"], "ours-tpo", plan)
    assert job is None and [(r["status"], r["reason"]) for r in rows] == [
        ("unavailable", "needs CUDA (llava-1.5-7b shapes in bf16)")]


def test_a_childs_result_becomes_one_row_per_workload(mods, monkeypatch):
    """`_phase_rows`: the child's rows by workload; a child that gave nothing is `crashed` for each workload with the
    first line of its error (prefixed by its phase, but for a child that does everything); the child runs with its
    phase's environment and the plan's timeout, or what is left before the deadline, and a child killed at the
    deadline, or one the deadline came before, is `not run`; the device's name is kept from a CUDA child."""
    run, contenders, _ = mods
    naive = contenders.all_contenders(("torch",))["naive"]
    plan = {"contenders": {"naive": naive}, "timeout": 50.0, "deadline": None, "deadline_s": None}
    job = {"contender": "naive", "workloads": ["tpo", "dpo"], "device": "cpu"}
    calls, answers = [], []

    def child(job_, timeout, env=None):
        calls.append((job_["phase"], timeout, env))
        return answers.pop(0)

    monkeypatch.setattr(run, "_run_child", child)
    answers.append(([{"workload": "tpo", "status": "ok"}, {"workload": "dpo", "status": "ok"}],
                    {"device_name": "GPU X"}, ""))
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    pinned = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # the memory child's glibc setting; the time child's: none
    meta = {}
    assert run._phase_rows(job, "memory", plan, "c", meta) == {"tpo": {"workload": "tpo", "status": "ok"},
                                                               "dpo": {"workload": "dpo", "status": "ok"}}
    assert calls == [("memory", 50.0, pinned)] and meta == {}  # a CPU child: no device name
    answers.append(([], {"device_name": "GPU X"}, ""))
    run._phase_rows({**job, "device": "cuda"}, "all", plan, "c", meta)
    assert meta == {"device_name": "GPU X"} and calls[-1] == ("all", 50.0, pinned)

    def crashed(phase, reason):
        return {w: {"contender": "naive", "label": naive.label_for(w), "kind": "baseline", "workload": w,
                    "status": phase, "reason": reason, "note": naive.workloads[w]} for w in ("tpo", "dpo")}

    answers.append((None, {}, "Traceback: boom\nmore"))
    assert run._phase_rows(job, "time", plan, "c", {}) == crashed("crashed", "time child: Traceback: boom")
    assert calls[-1] == ("time", 50.0, {})
    answers.append((None, {}, ""))
    assert run._phase_rows(job, "all", plan, "c", {}) == crashed("crashed", "no result")
    late = {**plan, "deadline": time.time() + 20.0, "deadline_s": 20.0}
    answers.append((None, {}, "killed after 20 s"))
    assert run._phase_rows(job, "time", late, "c", {}) == crashed(
        "not run", "the run's deadline (--deadline-s 20) came while it ran")
    assert 19.0 < calls[-1][1] <= 20.0  # what was left, not the plan's 50 s
    answers.append((None, {}, "killed after 50 s"))  # killed by its own timeout, the deadline further away
    far = {**plan, "deadline": time.time() + 500.0, "deadline_s": 500.0}
    assert run._phase_rows(job, "time", far, "c", {}) == crashed("crashed", "time child: killed after 50 s")
    assert calls[-1][1] == 50.0
    n = len(calls)
    past = {**plan, "deadline": time.time() - 1.0, "deadline_s": 7.0}
    assert run._phase_rows(job, "time", past, "c", {}) == crashed(
        "not run", "the run's deadline (--deadline-s 7) came before it started")
    assert len(calls) == n and run._past_deadline(past) and not run._past_deadline(far)
    assert not run._past_deadline(plan)


def test_versions_name_every_package_the_same_way_installed_or_not(mods, monkeypatch):
    """The JSON's versions: one key per package, "_" for "-" whether it is installed or not (a missing package was
    once written under its pip name, "cut-cross-entropy", and an installed one as "cut_cross_entropy")."""
    import importlib.metadata
    import platform

    run, _, _ = mods

    def version(pkg):
        if pkg in ("cut-cross-entropy", "trl"):
            raise importlib.metadata.PackageNotFoundError(pkg)
        return f"v-{pkg}"

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert run._versions() == {
        "python": platform.python_version(), "torch": "v-torch", "triton": "v-triton", "tpo_fast": "v-tpo-fast",
        "liger_kernel": "v-liger-kernel", "cut_cross_entropy": None, "trl": None, "transformers": "v-transformers",
        "peft": "v-peft"}


def test_main_writes_the_tables_and_files_of_a_run(mods, monkeypatch, tmp_path, capsys):
    """`main` in-process with the children faked: the plan's cases and contenders measured (memory child, then the
    timed rounds), the Markdown table on stdout, the JSON and CSV under --out with the run's metadata (device, the
    CPU's name, dtype, counts, seed, torch's threads when not given, versions, date, command, platform, wall
    time), and the files it wrote named on stderr."""
    import json
    import platform
    import sys

    import torch

    run, _, _ = mods
    (measure,) = bench_modules("_measure")
    calls = []

    def child(job, timeout, env=None):
        calls.append((job["phase"], job["contender"], job["repeats"]))
        rows = []
        for w in job["workloads"]:
            row = {"contender": job["contender"], "label": job["contender"].upper(), "kind": "baseline"
                   if job["contender"] == "naive" else "floor", "workload": w, "status": "ok", "note": "n",
                   "valid_frac": 0.5}
            if job["phase"] == "memory":
                row.update(full_peak_mib=10.0, fwd_peak_mib=5.0)
            else:
                ms = 19137.0 if job["contender"] == "naive" else 1.0
                row.update(full_ms=measure._stats([ms] * job["repeats"]), full_tflops=1.0 / ms)
            rows.append(row)
        return rows, {}, ""

    monkeypatch.setattr(run, "_run_child", child)
    monkeypatch.setattr(sys, "argv", ["bench/run.py", "--the", "command"])
    argv = ["--device", "cpu", "--cases", "cpu-tiny", "--workloads", "tpo", "--contenders", "naive,floor",
            "--repeats", "3", "--rounds", "2", "--seed", "7", "--out", str(tmp_path), "--stem", "s", "--no-plots"]
    assert run.main(argv) == 0
    assert calls == [("memory", "naive", 3), ("memory", "floor", 3), ("time", "naive", 2), ("time", "floor", 2),
                     ("time", "naive", 1), ("time", "floor", 1)]
    out, err = capsys.readouterr()
    assert out.startswith(f"## tpo_fast benchmark — {run._cpu_name()} (cpu), fp32\n")
    assert "| NAIVE" in out and "| FLOOR" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.json"]
    data = json.loads((tmp_path / "s.json").read_text())
    meta = data["meta"]
    assert {k: meta[k] for k in ("device", "device_name", "dtype", "repeats", "rounds", "warmup", "seed", "threads",
                                 "command", "platform")} == {
        "device": "cpu", "device_name": run._cpu_name(), "dtype": "fp32", "repeats": 3, "rounds": 2, "warmup": 1,
        "seed": 7, "threads": torch.get_num_threads(), "command": "bench/run.py --the command",
        "platform": platform.platform()}
    assert meta["versions"] == run._versions() and meta["wall_s"] >= 0
    assert len(meta["date"]) == 19 and meta["date"][10] == "T"  # ISO, to the second
    assert [(r["contender"], r["status"], r["full_ms"]["median"]) for r in data["rows"]] == [
        ("naive", "ok", 19137.0), ("floor", "ok", 1.0)]
    progress = err.splitlines()  # each row's time as the tables write it: no exponent (not 1.91e+04)
    assert "[cpu-tiny] naive tpo: fwd+bwd 19137 ms" in progress and "[cpu-tiny] floor tpo: fwd+bwd 1 ms" in progress
    assert err.rstrip().splitlines()[-1] == (f"wrote {tmp_path / 's.json'}, {tmp_path / 's.csv'} in {meta['wall_s']} s")
    run.main([*argv[2:-1], "--threads", "2"])  # the device found (a CPU here); plots on: written, or skipped
    out, err = capsys.readouterr()
    meta = json.loads((tmp_path / "s.json").read_text())["meta"]
    assert (meta["threads"], meta["device"]) == (2, "cpu")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots skipped: pip install matplotlib" in err
    else:
        pngs = [tmp_path / "s_time.png", tmp_path / "s_memory.png"]
        assert all(p.exists() for p in pngs)
        wrote = err.rstrip().splitlines()[-1]
        assert wrote.startswith(f"wrote {tmp_path / 's.json'}, {tmp_path / 's.csv'}, ") and all(
            str(p) in wrote for p in pngs)
    unnamed = [a for a in argv if a not in ("--stem", "s")]
    run.main(unnamed)
    assert {"results_cpu_fp32.json", "results_cpu_fp32.csv"} <= {p.name for p in tmp_path.iterdir()}
    # a step run has its own default name (it keeps the loss run's files) and its case's dtype in the header
    monkeypatch.setattr(run, "_run_case", lambda case, plan, meta: [
        {"contender": "ours-dpo", "label": "ours", "kind": "ours", "workload": "step", "status": "n/a", "reason": "r",
         **case.as_dict(), "case": case.name}])
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    capsys.readouterr()
    run.main(["--device", "cpu", "--workloads", "step", "--cases", "cpu-step-lora", "--contenders", "ours-dpo",
              "--out", str(tmp_path), "--no-plots"])
    out, _ = capsys.readouterr()
    assert out.startswith(f"## tpo_fast benchmark — {run._cpu_name()} (cpu), bf16\n")
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert sorted(set(after) - set(before)) == ["results_cpu_step.csv", "results_cpu_step.json"]
    assert all(after[name] == t for name, t in before.items())  # the loss run's files untouched


def test_every_contender_of_a_case_is_run_and_its_rows_kept(mods, monkeypatch):
    """`_run_case` on a CPU: the rows the parent writes (n/a) for every contender, not only the last one's; a
    contender whose every workload failed its memory child's check is not timed, and the next one still is; each
    row carries the case and the workload's fraction of valid rows (taken from the measured rows, so n/a rows get
    it too)."""
    run, contenders, workloads = mods
    known = contenders.all_contenders(("torch",))
    case = workloads.CASES["cpu-tiny"]
    plan = _loss_plan(known, names=["liger", "trl", "naive"], repeats=2)
    monkeypatch.setattr(known["trl"], "not_applicable", {"dpo": "pretend"})
    monkeypatch.setattr(known["trl"], "workloads", {"tpo": "its note"})
    calls = []

    def child(job, timeout, env=None):
        calls.append((job["phase"], job["contender"], list(job["workloads"])))
        status = "failed check" if job["contender"] == "liger" else "ok"
        rows = []
        for w in job["workloads"]:
            row = {"contender": job["contender"], "workload": w, "status": status, "valid_frac": 0.25}
            if job["phase"] == "time":
                row.update(full_ms={"median": 1.0, "times": [1.0] * job["repeats"]})
            rows.append(row)
        return rows, {}, ""

    monkeypatch.setattr(run, "_run_child", child)
    rows = run._run_case(case, plan, {})
    assert calls == [("memory", "liger", ["dpo"]), ("memory", "trl", ["tpo"]), ("memory", "naive", ["tpo", "dpo"]),
                     ("time", "trl", ["tpo"]), ("time", "naive", ["tpo", "dpo"])]
    assert [(r["contender"], r["workload"], r["status"]) for r in rows] == [
        ("liger", "tpo", "n/a"), ("trl", "dpo", "n/a"), ("liger", "dpo", "failed check"), ("trl", "tpo", "ok"),
        ("naive", "tpo", "ok"), ("naive", "dpo", "ok")]
    assert {(r["case"], r["valid_frac"], r["d"], r["n"]) for r in rows} == {(case.name, 0.25, case.d, case.n)}


def test_a_child_killed_by_its_own_timeout_without_a_deadline_crashed(mods, monkeypatch):
    run, contenders, _ = mods
    naive = contenders.all_contenders(("torch",))["naive"]
    plan = {"contenders": {"naive": naive}, "timeout": 50.0}
    monkeypatch.setattr(run, "_run_child", lambda job, timeout, env=None: (None, {}, "killed after 50 s"))
    rows = run._phase_rows({"contender": "naive", "workloads": ["tpo"], "device": "cpu"}, "all", plan, "c", {})
    assert (rows["tpo"]["status"], rows["tpo"]["reason"]) == ("crashed", "killed after 50 s")


def test_a_step_case_needing_cuda_runs_on_cuda(mods):
    run, contenders, workloads = mods
    plan = _loss_plan(contenders.all_contenders(("torch",)), device="cuda", workloads=["step"], dtype="bf16")
    rows, job = run._job(workloads.STEP_CASES["llava7b-step"], "ours-tpo", plan)
    assert rows == [] and job["workloads"] == ["step"] and job["device"] == "cuda"


def test_the_plans_smallest_valid_settings_and_names_after_all(mods):
    run, contenders, _ = mods
    assert _plan(run, ["--repeats", "1"])["repeats"] == 1
    assert _plan(run, ["--deadline-s", "0.5"])["deadline_s"] == 0.5
    assert run._contender_names("broken,all") == ["broken", *contenders.DEFAULT]


def test_a_failed_timed_round_replaces_the_rows_status(mods):
    run, _, _ = mods
    row = {"contender": "x", "workload": "tpo", "status": "ok", "full_peak_mib": 3.0}
    run.merge_round(row, {"contender": "x", "workload": "tpo", "status": "crashed", "reason": "time child: boom"})
    assert row == {"contender": "x", "workload": "tpo", "status": "crashed", "reason": "time child: boom",
                   "full_peak_mib": 3.0}


def test_the_cpu_is_named_from_proc_cpuinfo_or_the_platform(mods, monkeypatch):
    import io
    import platform

    run, _, _ = mods
    text = "processor\t: 0\nvendor_id\t: V\nmodel name\t: Fancy CPU: rev 2 @ 3GHz\nmodel name\t: later\n"
    monkeypatch.setattr(run, "open", lambda path: io.StringIO(text) if path == "/proc/cpuinfo" else None,
                        raising=False)
    assert run._cpu_name() == f"Fancy CPU: rev 2 @ 3GHz, {os.cpu_count()} cores"

    def missing(path):
        raise OSError(path)

    monkeypatch.setattr(run, "open", missing, raising=False)
    monkeypatch.setattr(platform, "processor", lambda: "proc")
    assert run._cpu_name() == f"proc, {os.cpu_count()} cores"
    monkeypatch.setattr(platform, "processor", lambda: "")
    monkeypatch.setattr(platform, "machine", lambda: "mach")
    assert run._cpu_name() == f"mach, {os.cpu_count()} cores"
    monkeypatch.setattr(run, "open", lambda path: io.StringIO("processor\t: 0\n"), raising=False)
    assert run._cpu_name() == f"mach, {os.cpu_count()} cores"


@pytest.mark.parametrize(("flags", "units"), [
    ("fpu avx512f avx512_bf16 amx_bf16 amx_tile", ", AMX-BF16"),
    ("fpu avx512f avx512_bf16", ", AVX512-BF16"),
    ("fpu avx2 fma", ""),
])
def test_the_cpu_name_says_which_bf16_units_it_has(mods, monkeypatch, flags, units):
    import io

    run, _, _ = mods
    # the first processor's lines count; a later processor's flags are not read
    text = (f"processor\t: 0\nmodel name\t: Fancy CPU\nflags\t\t: {flags}\n"
            "processor\t: 1\nmodel name\t: Fancy CPU\nflags\t\t: amx_bf16\n")
    monkeypatch.setattr(run, "open", lambda path: io.StringIO(text), raising=False)
    assert run._cpu_name() == f"Fancy CPU, {os.cpu_count()} cores{units}"


# Stand-ins for bench/_measure.child_main, run in a real spawned child (importable there by this module's name).
def _child_answers(job, send):
    send.send(("ok", [{"workload": w} for w in job["workloads"]], {"env": os.environ.get("TPO_BENCH_TEST_ENV")}))


def _child_fails(job, send):
    send.send(("error", "set-up failed: it broke"))


def _child_exits(job, send):
    os._exit(3)


def _child_is_killed(job, send):
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def _child_hangs(job, send):
    import time as t

    t.sleep(60)


def test_a_child_process_answers_fails_dies_or_is_killed(mods, monkeypatch):
    """`_run_child` in a real spawned process: its rows and info, with the environment it was given (and not this
    process's); its error; its exit code, named as a likely out-of-memory kill for SIGKILL; killed at the timeout."""
    run, _, _ = mods
    monkeypatch.delenv("TPO_BENCH_TEST_ENV", raising=False)

    def with_child(fn):
        monkeypatch.setattr(run, "_measure", SimpleNamespace(child_main=fn))

    with_child(_child_answers)
    job = {"workloads": ["tpo", "dpo"]}
    assert run._run_child(job, 60.0, {"TPO_BENCH_TEST_ENV": "given"}) == (
        [{"workload": "tpo"}, {"workload": "dpo"}], {"env": "given"}, "")
    # a --timeout past what one Connection.poll takes (about 2.1e6 s overflowed inside it)
    assert run._run_child(job, 1e9, {"TPO_BENCH_TEST_ENV": "given"})[0] == [{"workload": "tpo"}, {"workload": "dpo"}]
    assert "TPO_BENCH_TEST_ENV" not in os.environ
    with_child(_child_fails)
    assert run._run_child(job, 60.0) == (None, {}, "set-up failed: it broke")
    with_child(_child_exits)
    assert run._run_child(job, 60.0) == (None, {}, "child process died with exit code 3")
    with_child(_child_is_killed)
    assert run._run_child(job, 60.0) == (None, {}, "child process died with exit code -9 (killed: out of host "
                                                   "memory?)")
    with_child(_child_hangs)
    t0 = time.time()
    assert run._run_child(job, 2.0) == (None, {}, "killed after 2 s")
    assert time.time() - t0 < 30


def test_the_child_environment_is_set_unset_and_restored_even_on_an_error(monkeypatch):
    """`_env.env`: a value sets a variable, None unsets it, and on leaving (by an exception too) each is as before:
    the old value back, a new one gone, an unset one set again."""
    (envmod,) = bench_modules("_env")
    monkeypatch.setenv("TPO_BENCH_A", "old")
    monkeypatch.delenv("TPO_BENCH_B", raising=False)
    monkeypatch.setenv("TPO_BENCH_C", "kept")
    with pytest.raises(RuntimeError, match="inside"):
        with envmod.env(TPO_BENCH_A="new", TPO_BENCH_B="b", TPO_BENCH_C=None):
            assert (os.environ["TPO_BENCH_A"], os.environ["TPO_BENCH_B"]) == ("new", "b")
            assert "TPO_BENCH_C" not in os.environ
            raise RuntimeError("inside")
    assert (os.environ["TPO_BENCH_A"], os.environ["TPO_BENCH_C"]) == ("old", "kept")
    assert "TPO_BENCH_B" not in os.environ
    with envmod.env(TPO_BENCH_B=None):  # unsetting what is not set
        assert "TPO_BENCH_B" not in os.environ
    assert "TPO_BENCH_B" not in os.environ
