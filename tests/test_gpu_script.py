"""scripts/gpu_check.sh, the prepared run for a session that is lent a GPU for a few minutes: its plumbing
(parts, report, packed results) is checked here on CPU, so a broken script does not cost a device session."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(tmp_path: Path, *parts: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["bash", str(SCRIPT), *parts], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=600)


def test_scripts_parse():
    for script in sorted((ROOT / "scripts").glob("*.sh")):
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script.name


def test_long_report_lines_are_cut_by_characters_not_bytes():
    """The reply's report lines are cut to a length by `clip`, in characters: `cut -c` counts bytes and split the
    "·" of a `Not run:` line past 400 bytes, so the whole reply was no longer UTF-8 (a fresh-clone CI failed on it)."""
    (fn,) = [line for line in SCRIPT.read_text(encoding="utf-8").splitlines() if line.startswith("clip()")]
    lines = ["Not run: " + "tpo_fast · x — " * 40, "| short |"]
    got = subprocess.run(["bash", "-c", f"PY={sys.executable}\n{fn}\nclip 400"], input="\n".join(lines).encode(),
                         capture_output=True, check=True)
    assert got.stdout.decode("utf-8") == "".join(line[:400] + "\n" for line in lines)


def test_unknown_part_is_refused(tmp_path):
    got = _run(tmp_path, "benchmark")
    assert got.returncode == 2
    assert ("unknown part 'benchmark': install, bench, zipf, step, step-profile, kernel-tests, profile, search, tune, "
            "tests") in got.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run; on a GPU the script itself is the check")
def test_bench_part_reports_its_tables_and_packs_its_results(tmp_path):
    """The `bench` part on a tiny case: the reply (stdout and report.md) holds the tables, the not-run line and
    the verdicts but not the legend; results.tar.gz holds the JSON, CSV and the full report."""
    got = _run(tmp_path, "bench", "zipf", BENCH_CASES="d32-v256-n32", ZIPF_CASES="d32-v256-n32-zipf")
    assert got.returncode == 0, got.stdout + got.stderr
    report = (tmp_path / "out" / "report.md").read_text()
    assert "bench rc=0" in report and "part: bench" in report and "done" in report
    assert "zipf rc=0" in report and "### tpo · d32-v256-n32-zipf" in report
    assert "### tpo · d32-v256-n32" in report and "| TRL chunked log-prob head |" in report
    assert "Not run: " in report and "tpo_fast [triton] auto — needs CUDA" in report
    assert "| tpo_fast [torch] auto |" in report  # the torch backend's row, on the CPU here
    assert "### Verdict" in report and "How to read" not in report and "What each contender runs" not in report
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"gpu_losses.json", "gpu_losses.csv", "bench.md", "bench.err", "gpu_losses_zipf.json", "zipf.md"} <= names
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.md", "results.tar.gz"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU dry run; on a GPU the script itself is the check")
def test_profile_part_reports_its_table(tmp_path):
    """The `profile` part (bench/profile_loss.py) on a tiny case with the torch backend: its table reaches the
    reply, one row per workload, mode and chunk budget that differs (the torch backend caps 256 and 1024 MiB
    at its 128)."""
    got = _run(tmp_path, "profile", BENCH_CASES="d32-v256-n32", PROFILE_BACKEND="torch", PROFILE_GEMMS="torch")
    assert got.returncode == 0, got.stdout + got.stderr
    report = (tmp_path / "out" / "report.md").read_text()
    assert "profile rc=0" in report
    rows = [line for line in report.splitlines() if line.startswith("| tpo |") or line.startswith("| dpo |")]
    assert [row.split("|")[3].strip() for row in rows] == ["128", "-"] * 2, report


def test_failures_are_logged_as_they_happen(tmp_path, monkeypatch):
    """TPO_FAST_FAILURE_LOG (the kernel-tests part sets it): tests/conftest.py appends each failed test's traceback
    when the failure is reported, so a run cut at its time limit keeps them; passes, unset variables and the
    pytest-xdist workers (whose reports reach the controlling process) write nothing."""
    from types import SimpleNamespace

    import conftest

    log = tmp_path / "failures.log"

    def report(failed, name):
        return SimpleNamespace(failed=failed, nodeid=f"tests/test_x.py::{name}", when="call",
                               longreprtext="E   assert 1 == 2")

    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("TPO_FAST_FAILURE_LOG", raising=False)
    conftest.pytest_runtest_logreport(report(True, "unset"))
    assert not log.exists()
    monkeypatch.setenv("TPO_FAST_FAILURE_LOG", str(log))
    conftest.pytest_runtest_logreport(report(False, "passed"))
    conftest.pytest_runtest_logreport(report(True, "first"))
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    conftest.pytest_runtest_logreport(report(True, "worker"))
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    conftest.pytest_runtest_logreport(report(True, "second"))
    assert log.read_text() == ("==== tests/test_x.py::first (call)\nE   assert 1 == 2\n\n"
                               "==== tests/test_x.py::second (call)\nE   assert 1 == 2\n\n")
