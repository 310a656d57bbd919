"""Which timings can carry a comparison, and the ratios derived from the ones that can.

The noise rule, on a row's fwd+bwd timing (the one every ratio and the verdict use):
  - at least MIN_REPEATS timed calls (fewer give no spread to judge by);
  - a median of at least MIN_MEDIAN_MS[device]: below it, per-call overhead (Python dispatch, kernel
    launches) and timer resolution are a large share of what is measured, not the work;
  - an interquartile range of at most MAX_SPREAD_PCT % of the median.
A row that fails any of these is flagged (`row["noise"]` says which and by how much). It keeps its
times and memory, but gets no speed-up, no % of floor and no place in the verdict; the same holds
for a ratio against a flagged naive, peer or floor. The best peer is the fastest checked peer: when its
timing is flagged, no row gets a ratio against the best peer (not one against a slower peer in its place).

A ratio between two rows that pass is *within noise* when their interquartile ranges overlap: the
faster median is then not a reliable win (`<ratio>_within_noise`).
"""

from __future__ import annotations

MIN_REPEATS = 3
MIN_MEDIAN_MS = {"cpu": 5.0, "cuda": 1.0}
MAX_SPREAD_PCT = 25.0
RATIOS = ("speedup_vs_naive", "speedup_vs_best_peer", "pct_of_floor", "pct_of_valid_floor", "speedup_vs_unshared")


def timing(row: dict, mode: str = "full") -> dict | None:
    s = row.get(f"{mode}_ms")
    return s if isinstance(s, dict) else None


def median(row: dict, mode: str = "full") -> float | None:
    s = timing(row, mode)
    return s["median"] if s else None


def spread_pct(s: dict) -> float:
    """Interquartile range as % of the median."""
    return (s["p75"] - s["p25"]) / s["median"] * 100 if s["median"] else 0.0


def noise_flag(row: dict, device: str) -> str | None:
    """Why the row's fwd+bwd timing cannot be compared (every failed test, "; "-joined), or None."""
    s = timing(row)
    if s is None:
        return None
    why = []
    if len(s["times"]) < MIN_REPEATS:
        why.append(f"too few repeats ({len(s['times'])} < {MIN_REPEATS})")
    floor_ms = MIN_MEDIAN_MS.get(device, MIN_MEDIAN_MS["cpu"])
    if s["median"] < floor_ms:
        why.append(f"too short ({s['median']:.3g} ms < {floor_ms:g} ms)")
    if (spread := spread_pct(s)) > MAX_SPREAD_PCT:
        why.append(f"too noisy (IQR {spread:.3g}% > {MAX_SPREAD_PCT:g}%)")
    return "; ".join(why) or None


def within_noise(a: dict, b: dict) -> bool:
    """True when the fwd+bwd interquartile ranges of rows a and b overlap."""
    sa, sb = timing(a), timing(b)
    return sa["p25"] <= sb["p75"] and sb["p25"] <= sa["p75"]


def derive(rows: list[dict], device: str) -> None:
    """Flag every timed row by the noise rule, then add, per (case, workload), the speed-ups vs naive
    and vs the best peer, % of the all-rows and valid-rows floors (each only between rows that pass the
    rule, with whether it is within noise), and memory as % of naive's (memory is not timing noise).

    "naive" is the row of kind "baseline" (the `naive` contender; in the step workload the official TPO
    step). A step row with an `unshared` contender (shared prefix) also gets its speed-up over that one."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["workload"]), []).append(r)
    for group in groups.values():
        ok = [r for r in group if r["status"] == "ok" and median(r)]
        for r in ok:
            r["noise"] = noise_flag(r, device)
            if r.get("step_gflop") is not None:
                r["step_gflops"] = r["step_gflop"] / (median(r) / 1e3)
        _memory_vs_naive(ok)
        fair = [r for r in ok if not r["noise"]]
        by = {r["contender"]: r for r in fair}
        naive = next((r for r in fair if r["kind"] == "baseline"), None)
        best = _best_peer(ok)
        for r in fair:
            _ratio(r, naive, "speedup_vs_naive")
            if r.get("unshared"):
                _ratio(r, by.get(r["unshared"]), "speedup_vs_unshared")
            if r["kind"] in ("ours", "baseline", "peer") and _ratio(r, best, "speedup_vs_best_peer"):
                r["best_peer"] = best["contender"]
            if r["kind"] != "floor":  # the floors are the yardsticks, not measured against each other
                _ratio(r, by.get("floor"), "pct_of_floor", 100)
                _ratio(r, by.get("floor-valid"), "pct_of_valid_floor", 100)


def _best_peer(ok: list[dict]) -> dict | None:
    """The fastest checked peer by fwd+bwd median, or None when there is none or its timing is flagged: a ratio
    against the next-fastest peer instead would credit a row with beating a peer that a faster one stands behind."""
    best = min((r for r in ok if r["kind"] == "peer"), key=median, default=None)
    return None if best is None or best["noise"] else best


def _ratio(r: dict, ref: dict | None, key: str, scale: float = 1.0) -> bool:
    """r[key] = scale * ref time / r time, with r[key + '_within_noise']; False when there is no ref."""
    if ref is None or ref is r:
        return False
    r[key] = scale * median(ref) / median(r)
    r[f"{key}_within_noise"] = within_noise(r, ref)
    return True


def _memory_vs_naive(ok: list[dict]) -> None:
    naive = next((r for r in ok if r["kind"] == "baseline"), None)
    if not naive or not naive.get("full_peak_mib"):
        return
    for r in ok:
        if r is not naive and r.get("full_peak_mib") is not None:
            r["mem_pct_of_naive"] = 100 * r["full_peak_mib"] / naive["full_peak_mib"]
