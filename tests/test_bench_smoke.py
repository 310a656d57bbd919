"""The benchmark runner end to end on a tiny CPU case, and its correctness guard."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        import _contenders
        import _measure
        import _workloads
    finally:
        sys.path.remove(str(BENCH))
    return _contenders, _measure, _workloads


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


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS is read from /proc")
def test_runner_end_to_end(tmp_path):
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
        "naive,tpo_fast-torch,tpo_fast-triton,broken,liger",
        "--out",
        str(tmp_path),
        "--stem",
        "smoke",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| contender | fwd ms | fwd+bwd ms |" in out and "### Verdict" in out, out[:2000]

    rows = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    by = {(r["contender"], r["workload"]): r for r in rows}
    assert len(rows) == 5 * 2  # every contender listed for every workload, runnable or not
    for w in ("tpo", "dpo"):
        assert by[("naive", w)]["status"] == "ok" and by[("naive", w)]["full_ms"]["median"] > 0
        assert by[("tpo_fast-torch", w)]["status"] == "ok"
        assert by[("tpo_fast-torch", w)]["full_peak_mib"] is not None
        broken = by[("broken", w)]
        assert broken["status"] == "failed check" and "full_ms" not in broken
        assert (
            by[("tpo_fast-triton", w)]["status"] == "unavailable"
            and "CUDA" in by[("tpo_fast-triton", w)]["reason"]
        )
    assert by[("liger", "tpo")]["status"] == "n/a"
    assert by[("liger", "dpo")]["status"] == "ok"
    assert "speedup_vs_naive" in by[("tpo_fast-torch", "tpo")]

    with (tmp_path / "smoke.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {"full_ms", "full_peak_mib", "speedup_vs_naive"} <= set(table[0])
    pytest.importorskip("matplotlib")
    assert (tmp_path / "smoke_time.png").stat().st_size > 0 and (
        tmp_path / "smoke_memory.png"
    ).stat().st_size > 0
