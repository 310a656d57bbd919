"""bench/_derive.py on rows written out by hand: which timings are compared, and every derived figure.

The figures the README quotes (speed-ups, % of floor, memory vs naive, tokens/s ratios) are computed here, so
each one is checked against its value worked out from the rows' own numbers, not against another run.
"""

from __future__ import annotations

import copy

import pytest
from _bench import bench_modules
from _bench import timing as _timing


@pytest.fixture(scope="module")
def derive():
    return bench_modules("_derive")[0]


def _row(contender: str, kind: str, p25: float, median: float, p75: float, case="c1", workload="tpo", **extra):
    return {
        "case": case,
        "workload": workload,
        "contender": contender,
        "label": contender,
        "kind": kind,
        "status": "ok",
        "full_ms": _timing(p25, median, p75),
        "fwd_ms": _timing(p25 / 2, median / 2, p75 / 2),
        **extra,
    }


def test_every_ratio_of_a_group_from_its_own_rows(derive):
    rows = [
        _row("naive", "baseline", 190.0, 200.0, 210.0, full_peak_mib=1000.0),
        _row("slow-peer", "peer", 118.0, 120.0, 122.0, full_peak_mib=800.0),
        _row("fast-peer", "peer", 98.0, 100.0, 102.0),  # the best peer by median, listed second
        _row("unshared", "ours", 78.0, 80.0, 82.0, full_peak_mib=250.0, step_gflop=40.0),
        _row("shared", "ours", 49.0, 50.0, 51.0, unshared="unshared", full_peak_mib=None),
        _row("floor", "floor", 59.0, 60.0, 61.0),
        _row("floor-valid", "floor", 44.0, 45.0, 46.0),
        # Memory is not timing noise: a noisy row keeps its % of naive's memory, and nothing else.
        _row("noisy", "ours", 50.0, 100.0, 150.0, full_peak_mib=500.0),
    ]
    # Not compared at all: a contender that failed its check (times kept), one never timed.
    failed = {**_row("failed", "ours", 9.0, 10.0, 11.0, full_peak_mib=100.0), "status": "failed check"}
    untimed = {**_row("untimed", "ours", 1.0, 1.0, 1.0), "full_ms": None}
    rows += [failed, untimed]
    before = copy.deepcopy([failed, untimed])
    derive.derive(rows, "cpu")
    assert [failed, untimed] == before
    by = {r["contender"]: r for r in rows}

    assert by["unshared"]["speedup_vs_naive"] == 200 / 80
    assert by["shared"]["speedup_vs_naive"] == 200 / 50
    assert by["slow-peer"]["speedup_vs_naive"] == 200 / 120
    assert by["floor"]["speedup_vs_naive"] == 200 / 60  # the floors are put against naive too
    assert "speedup_vs_naive" not in by["naive"]

    # The best peer is the fastest peer, for ours, for naive and for the other peers; not for itself or the floors.
    for name, median in (("unshared", 80), ("shared", 50), ("naive", 200), ("slow-peer", 120)):
        assert by[name]["speedup_vs_best_peer"] == 100 / median, name
        assert by[name]["best_peer"] == "fast-peer", name
    for name in ("fast-peer", "floor", "floor-valid"):
        assert "speedup_vs_best_peer" not in by[name] and "best_peer" not in by[name], name

    # % of the floors: floor time / row time, for every row but the floors themselves.
    assert by["unshared"]["pct_of_floor"] == 100 * 60 / 80
    assert by["unshared"]["pct_of_valid_floor"] == 100 * 45 / 80
    assert by["naive"]["pct_of_floor"] == 100 * 60 / 200
    assert by["fast-peer"]["pct_of_valid_floor"] == 100 * 45 / 100
    for name in ("floor", "floor-valid"):
        assert "pct_of_floor" not in by[name] and "pct_of_valid_floor" not in by[name], name

    # Shared prefix against its unshared twin, named by the row; only rows that name one get it.
    assert by["shared"]["speedup_vs_unshared"] == 80 / 50
    assert by["shared"]["speedup_vs_unshared_within_noise"] is False
    assert [r["contender"] for r in rows if "speedup_vs_unshared" in r] == ["shared"]

    assert by["unshared"]["step_gflops"] == 40.0 / (80 / 1e3)
    assert [r["contender"] for r in rows if "step_gflops" in r] == ["unshared"]

    assert by["slow-peer"]["mem_pct_of_naive"] == 80.0
    assert by["unshared"]["mem_pct_of_naive"] == 25.0
    assert by["noisy"]["mem_pct_of_naive"] == 50.0
    for name in ("naive", "fast-peer", "shared"):
        assert "mem_pct_of_naive" not in by[name], name

    assert by["noisy"]["noise"] == "too noisy (IQR 100% > 25%)"
    assert not {"speedup_vs_naive", "speedup_vs_best_peer", "pct_of_floor"} & set(by["noisy"])
    for name in ("naive", "slow-peer", "fast-peer", "unshared", "shared", "floor", "floor-valid"):
        assert by[name]["noise"] is None, name


def test_groups_are_a_case_and_a_workload(derive):
    """Each (case, workload) has its own naive, peers and floors: no ratio crosses into another group."""
    rows = [
        _row("naive", "baseline", 90.0, 100.0, 110.0, full_peak_mib=400.0),
        _row("ours", "ours", 24.0, 25.0, 26.0, full_peak_mib=100.0),
        _row("naive", "baseline", 390.0, 400.0, 410.0, case="c2", full_peak_mib=800.0),
        _row("peer", "peer", 190.0, 200.0, 210.0, case="c2"),
        _row("ours", "ours", 49.0, 50.0, 51.0, case="c2", full_peak_mib=100.0),
        _row("naive", "baseline", 290.0, 300.0, 310.0, workload="dpo"),
        _row("floor", "floor", 9.0, 10.0, 11.0, workload="dpo"),
        _row("ours", "ours", 19.0, 20.0, 21.0, workload="dpo"),
    ]
    derive.derive(rows, "cpu")
    naive_c1, ours_c1, _, c2_peer, c2, _, _, dpo = rows
    assert ours_c1["speedup_vs_naive"] == 100 / 25 and ours_c1["mem_pct_of_naive"] == 25.0
    assert "speedup_vs_best_peer" not in ours_c1 and "pct_of_floor" not in ours_c1 and "best_peer" not in naive_c1
    assert c2["speedup_vs_naive"] == 400 / 50 and c2["mem_pct_of_naive"] == 12.5
    assert c2["speedup_vs_best_peer"] == 200 / 50 and c2["best_peer"] == "peer"
    assert c2_peer["speedup_vs_naive"] == 2.0 and "pct_of_floor" not in c2
    assert dpo["speedup_vs_naive"] == 300 / 20 and dpo["pct_of_floor"] == 100 * 10 / 20
    assert "mem_pct_of_naive" not in dpo  # that group's naive has no peak memory


def test_noise_rule_at_its_edges(derive):
    rows = [
        _row("at-min", "ours", 5.0, 5.0, 5.0),  # exactly the CPU's 5 ms: compared
        _row("below", "ours", 4.0, 4.5, 5.0),
        {**_row("everything", "ours", 1.0, 2.0, 3.0), "full_ms": {**_timing(1.0, 2.0, 3.0), "times": [1.0, 3.0]}},
    ]
    derive.derive(rows, "cpu")
    assert rows[0]["noise"] is None
    assert rows[1]["noise"] == "too short (4.5 ms < 5 ms)"
    assert rows[2]["noise"] == "too few repeats (2 < 3); too short (2 ms < 5 ms); too noisy (IQR 100% > 25%)"
    other = [_row("mps", "ours", 3.0, 3.0, 3.0), _row("cuda", "ours", 3.0, 3.0, 3.0)]
    derive.derive(other[:1], "mps")  # a device without a threshold of its own takes the CPU's
    derive.derive(other[1:], "cuda")
    assert other[0]["noise"] == "too short (3 ms < 5 ms)" and other[1]["noise"] is None


def test_within_noise_counts_touching_quartiles_as_overlap(derive):
    a = _row("a", "ours", 90.0, 95.0, 100.0)
    b = _row("b", "ours", 100.0, 105.0, 110.0)
    c = _row("c", "ours", 100.5, 105.0, 110.0)
    assert derive.within_noise(a, b) and derive.within_noise(b, a)
    assert not derive.within_noise(a, c) and not derive.within_noise(c, a)


def test_timing_helpers(derive):
    row = _row("r", "ours", 8.0, 10.0, 12.0)
    assert derive.median(row) == 10.0 and derive.median(row, "fwd") == 5.0
    assert derive.timing(row, "fwd") == _timing(4.0, 5.0, 6.0)
    assert derive.median({"full_ms": None}) is None and derive.timing({"full_ms": "n/a"}) is None
    assert derive.spread_pct(_timing(8.0, 10.0, 12.0)) == 40.0
    assert derive.spread_pct(_timing(0.0, 0.0, 1.0)) == 0.0  # a zero median: no spread, not a division by zero
