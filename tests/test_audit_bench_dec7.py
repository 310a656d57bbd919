"""Audit of bench/ (2026-12-07): the figures a sceptical reader of the tables relies on, each against a value
worked out by hand from the rows' own numbers or against an oracle written here from docs/math.md.

No timed assertion: rows are written out by hand, and the guard is run on inputs from the benchmark's own draw.
"""

from __future__ import annotations

import math
import struct
from types import SimpleNamespace

import pytest
import torch
from _bench import bench_modules
from _bench import timing as _timing


@pytest.fixture(scope="module")
def derive():
    return bench_modules("_derive")[0]


def _row(contender: str, kind: str, p25: float, median: float, p75: float, **extra) -> dict:
    return {"case": "c1", "workload": "tpo", "contender": contender, "label": contender, "kind": kind,
            "status": "ok", "full_ms": _timing(p25, median, p75), **extra}


def test_no_best_peer_ratio_against_a_slower_peer_when_the_fastest_peer_is_flagged(derive):
    """The fastest checked peer (100 ms) is too noisy to compare: "vs best peer" must not fall back to the slower
    peer (150 ms), which would credit ours (50 ms) with 3.00x over the best peer where the best peer measured 2x."""
    rows = [
        _row("naive", "baseline", 190.0, 200.0, 210.0),
        _row("fast-peer", "peer", 50.0, 100.0, 150.0),  # IQR 100%: flagged
        _row("slow-peer", "peer", 148.0, 150.0, 152.0),
        _row("ours", "ours", 49.0, 50.0, 51.0),
    ]
    derive.derive(rows, "cpu")
    by = {r["contender"]: r for r in rows}
    assert by["fast-peer"]["noise"] == "too noisy (IQR 100% > 25%)"
    for name in ("naive", "slow-peer", "ours"):
        assert "speedup_vs_best_peer" not in by[name] and "best_peer" not in by[name], name
    assert by["ours"]["speedup_vs_naive"] == 200 / 50  # the other ratios are untouched

    # The same rows with the fastest peer's timing clean: every row is put against it, the slower peer included.
    rows = [
        _row("naive", "baseline", 190.0, 200.0, 210.0),
        _row("fast-peer", "peer", 98.0, 100.0, 102.0),
        _row("slow-peer", "peer", 148.0, 150.0, 152.0),
        _row("ours", "ours", 49.0, 50.0, 51.0),
    ]
    derive.derive(rows, "cpu")
    by = {r["contender"]: r for r in rows}
    assert by["ours"]["speedup_vs_best_peer"] == 100 / 50 and by["ours"]["best_peer"] == "fast-peer"
    assert by["slow-peer"]["speedup_vs_best_peer"] == 100 / 150
    assert by["naive"]["speedup_vs_best_peer"] == 100 / 200
    assert "speedup_vs_best_peer" not in by["fast-peer"]


def test_a_failed_peer_is_no_best_peer_even_when_faster(derive):
    """Only checked peers count: a faster peer that failed its check leaves the best peer to the checked one."""
    rows = [
        {**_row("wrong-peer", "peer", 9.0, 10.0, 11.0), "status": "failed check"},
        _row("peer", "peer", 98.0, 100.0, 102.0),
        _row("ours", "ours", 49.0, 50.0, 51.0),
    ]
    derive.derive(rows, "cpu")
    assert rows[2]["speedup_vs_best_peer"] == 100 / 50 and rows[2]["best_peer"] == "peer"


def _tpo_loss_by_hand(inp: dict, variant: str) -> torch.Tensor:
    """docs/math.md's TPO loss from materialized fp32 logits, written here; `variant` leaves one thing out."""
    y = inp["targets"]
    mask = (y != -100).float()
    safe = y.clamp(min=0)[..., None]
    w = inp["weight"]

    def branch(h, w_, hc, w_c):
        logits = (h @ w_.t()).float()
        z = logits.gather(-1, safe).squeeze(-1)
        zc = (hc @ w_c.t()).float().gather(-1, safe).squeeze(-1)
        return z - torch.logsumexp(logits, -1), z - zc

    w_c = w.detach() if variant == "corrupted weight gradient dropped" else w
    logp, visual = branch(inp["hidden"], w, inp["corrupted_hidden"], w_c)
    with torch.no_grad():
        rw = inp["ref_weight"]
        ref_logp, ref_visual = branch(inp["ref_hidden"], rw, inp["ref_corrupted_hidden"], rw)
    if variant == "reference weights dropped":
        ref_visual = None
    b = y.shape[0] // 2

    def score(lp, v):
        if v is None:
            return (lp * mask).sum(-1)
        sig = torch.sigmoid(v)
        c = torch.cat([0.5 + sig[:b], 1.5 - sig[b:]])
        return ((lp + torch.log(c)) * mask).sum(-1)

    s, r = score(logp, visual), score(ref_logp, ref_visual)
    margin = (s[:b] - s[b:]) - (r[:b] - r[b:])
    return -torch.nn.functional.logsigmoid(0.1 * margin).mean()


@pytest.mark.parametrize("variant", ["none", "corrupted weight gradient dropped", "reference weights dropped"])
def test_tpo_guard_rejects_a_contender_that_leaves_out_a_gradient_or_the_reference_weights(variant):
    """The guard compares the weight gradient whole: one that misses the corrupted branch's part (on these inputs a
    quarter of its largest entry) cannot pass, nor a loss that weights the policy's tokens but not the reference's."""
    measure, workloads = bench_modules("_measure", "_workloads")
    inp = workloads.make_inputs(workloads.Case("t", 64, 512, 256), "tpo", "cpu", torch.float32, 0)
    out = _tpo_loss_by_hand(inp, variant)
    out.backward()
    got = measure.check("tpo", inp, out, "fp32")
    errors = {k: v["err"] for k, v in got["errors"].items()}
    if variant == "none":
        assert got["ok"] and max(errors.values()) < 1e-5, errors
    else:
        assert not got["ok"], errors
        failed = {k for k, v in got["errors"].items() if not v["err"] <= v["tol"]}
        assert failed == ({"weight"} if variant == "corrupted weight gradient dropped" else set(errors)), errors
        assert min(errors[k] for k in failed) > 100 * measure.ATOL["fp32"] and math.isfinite(max(errors.values()))


@pytest.mark.parametrize(("case", "d", "v", "n"), [("d0-v512-n64", 0, 512, 64), ("d64-v0-n64", 64, 0, 64),
                                                  ("llava7b-n0", 4096, 32000, 0), ("d64-v512-n3", 64, 512, 3)])
def test_a_case_without_rows_columns_or_vocabulary_is_refused_with_its_shape(case, d, v, n):
    """D=0 or V=0 passed the parser, and every contender then crashed in its child on the input draw ("random_
    expects 'from' to be less than 'to'", "float division by zero"); N < 4 stopped the parser on a ZeroDivisionError
    (rows of min(512, N // 4) = 0 positions)."""
    (workloads,) = bench_modules("_workloads")
    with pytest.raises(ValueError) as e:
        workloads.parse_cases(case)
    assert str(e.value).startswith(f"case {case}: D={d} and V={v} must be at least 1 and N={n} at least 8")


@pytest.mark.parametrize(("argv", "message"), [
    (["--contenders", ","], "--contenders ',' names no contender; choose from naive, "),
    (["--cases", ",,"], "--cases ',,' names no case"),
    (["--workloads", " , "], "--workloads names no workload; choose from primitive, "),
])
def test_an_empty_list_on_the_command_line_is_refused(argv, message):
    """`--contenders ,` ran nothing and wrote empty tables, JSON and CSV; `--cases ,,` and `--workloads ,` said that
    no case runs these workloads."""
    (run,) = bench_modules("run")
    with pytest.raises(SystemExit) as e:
        run._settings(run.parse_args(argv), SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: False)))
    assert str(e.value.code).startswith(message)


def test_a_zipf_case_gets_its_own_plot_panel_not_a_line_joined_with_its_uniform_twin(tmp_path):
    """`--cases gpu-target,gpu-target-zipf`: both cases have model llava7b, D, V and N alike; their rows went into one
    panel, each contender's two times plotted as one line at one N. One panel per target law: two panels, so the
    time plot is two panels of 5 inches at 110 dpi wide."""
    pytest.importorskip("matplotlib")
    output, workloads = bench_modules("_output", "_workloads")
    rows = []
    for case in workloads.parse_cases("d64-v512-n64,d64-v512-n64-zipf"):
        for contender, ms in (("naive", 10.0), ("ours", 5.0)):
            rows.append({**case.as_dict(), "case": case.name, "workload": "tpo", "contender": contender,
                         "label": contender, "kind": "ours", "status": "ok", "full_ms": _timing(ms, ms, ms),
                         "full_peak_mib": ms})
    meta = {"device_name": "cpu", "dtype": "fp32"}
    paths = output.plot(rows, meta, tmp_path, "p")
    assert [p.name for p in paths] == ["p_time.png", "p_memory.png"]
    for path in paths:
        width, height = struct.unpack(">II", path.read_bytes()[16:24])  # the PNG header's IHDR
        assert (width, height) == (2 * 5 * 110, 4 * 110), path.name
