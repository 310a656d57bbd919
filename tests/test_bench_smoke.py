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


def test_streamed_logits_check_matches_the_full_oracle():
    """The guard compares (N, V) logits gradients chunk by chunk; same errors as the full fp32 oracle."""
    contenders, measure, w = _bench_modules()
    inp = w.make_inputs(w.Case("t", 16, 96, 64), "logits", "cpu", torch.bfloat16)
    out = contenders.Naive().run("logits", inp)
    (out * inp["grad_logprobs"]).sum().backward()
    got = {"out": out, "logits": inp["logits"].grad, "corrupted_logits": inp["corrupted_logits"].grad}
    streamed = w.logits_errors(inp, got, torch.bfloat16, chunk=7)
    ref, yard = w.oracle("logits", inp), w.oracle("logits", inp, round_to=torch.bfloat16)
    for k, r in ref.items():
        assert streamed[k][0] == pytest.approx(measure._rel_err(got[k], r), rel=1e-5, abs=1e-9)
        assert streamed[k][1] == pytest.approx(measure._rel_err(yard[k], r), rel=1e-5, abs=1e-9)


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
    assert "### tpo · cpu-tiny" in out and "### dpo · cpu-tiny" in out and "### logits" not in out

    with (tmp_path / "smoke.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {"full_ms", "full_peak_mib", "speedup_vs_naive"} <= set(table[0])
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
        "naive,tpo_fast-torch,tpo_fast-cpp,tpo_fast-cuda,floor",
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
        assert f"### {w} · cpu-tiny" in out and f"- {w} · cpu-tiny: **" in out, out[:3000]
    assert "GB/s fwd / fwd+bwd" in out and "of the memory floor" in out

    rows = json.loads((tmp_path / "added.json").read_text())["rows"]
    by = {(r["contender"], r["workload"]): r for r in rows}
    assert len(rows) == 5 * 3
    for w in ("logits", "povid", "fisao"):
        for name in ("naive", "tpo_fast-torch", "floor"):
            assert by[(name, w)]["status"] == "ok", by[(name, w)]
            assert by[(name, w)]["full_ms"]["median"] > 0
        assert by[("naive", w)]["check"]["ok"] and by[("tpo_fast-torch", w)]["check"]["ok"]
        assert "speedup_vs_naive" in by[("tpo_fast-torch", w)] and "pct_of_floor" in by[("tpo_fast-torch", w)]
    logits = by[("tpo_fast-torch", "logits")]
    assert logits["full_gbs"] > 0 and logits["fwd_gbs"] > 0 and "full_tflops" not in logits
    assert by[("floor", "logits")]["label"] == "memory floor"
    assert by[("tpo_fast-torch", "povid")]["full_tflops"] > 0
    assert by[("tpo_fast-cpp", "povid")]["status"] == by[("tpo_fast-cpp", "fisao")]["status"] == "n/a"
    from tpo_fast import _ext

    assert by[("tpo_fast-cpp", "logits")]["status"] == ("ok" if _ext.HAS_CPU_EXT else "unavailable")
    assert by[("tpo_fast-cuda", "logits")]["status"] == "unavailable"
    with (tmp_path / "added.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {"fwd_gbs", "full_gbs"} <= set(table[0])


def test_gpu_tune_sweep_runs_and_checks_every_variant(tmp_path):
    """bench/gpu_tune.py end to end on a tiny shape (CPU: Triton under the interpreter)."""
    import os

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
