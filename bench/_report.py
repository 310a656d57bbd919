"""Turning benchmark rows into the Markdown table, the verdict, JSON, CSV and plots.

One row schema for everything (STYLE.md): case fields, workload, contender, status, fwd/full
times (median, quartiles, all repeats), peak MiB, TFLOP/s (GB/s for the memory-bound `logits`
workload), correctness errors, and the derived speed-ups vs naive and vs the best peer, % of the
floor (matmul floor; memory floor for `logits`) and memory as % of naive's.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from _workloads import LOGITS_TENSORS, WORKLOADS, flops

MEMORY_HOW = {True: "torch.cuda.max_memory_allocated", False: "peak RSS of a child process per contender"}
STATUS_ORDER = {"baseline": 0, "peer": 1, "ours": 2, "floor": 3, "selftest": 4}
CSV_FIELDS = [
    "case",
    "model",
    "d",
    "v",
    "n",
    "n_seq",
    "seq_len",
    "valid_frac",
    "workload",
    "contender",
    "label",
    "kind",
    "device",
    "dtype",
    "status",
    "reason",
    "fwd_ms",
    "fwd_ms_p25",
    "fwd_ms_p75",
    "full_ms",
    "full_ms_p25",
    "full_ms_p75",
    "fwd_peak_mib",
    "full_peak_mib",
    "fwd_tflops",
    "full_tflops",
    "full_gflop_counted",
    "fwd_gbs",
    "full_gbs",
    "speedup_vs_naive",
    "speedup_vs_best_peer",
    "best_peer",
    "pct_of_floor",
    "mem_pct_of_naive",
    "max_rel_err",
]


def _ms(row: dict, mode: str) -> float | None:
    s = row.get(f"{mode}_ms")
    return s["median"] if isinstance(s, dict) else None


def derive(rows: list[dict]) -> None:
    """Add speed-ups, % of floor and memory vs naive to every timed row, per (case, workload)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["workload"]), []).append(r)
    for group in groups.values():
        ok = [r for r in group if r["status"] == "ok"]
        by = {r["contender"]: r for r in ok}
        naive, floor = by.get("naive"), by.get("floor")
        peers = [r for r in ok if r["kind"] == "peer" and _ms(r, "full")]
        best = min(peers, key=lambda r: _ms(r, "full"), default=None)
        for r in ok:
            t = _ms(r, "full")
            if t is None:
                continue
            if naive and r is not naive:
                r["speedup_vs_naive"] = _ms(naive, "full") / t
                if naive.get("full_peak_mib") and r.get("full_peak_mib") is not None:
                    r["mem_pct_of_naive"] = 100 * r["full_peak_mib"] / naive["full_peak_mib"]
            if best and r["kind"] in ("ours", "baseline", "peer") and r is not best:
                r["speedup_vs_best_peer"] = _ms(best, "full") / t
                r["best_peer"] = best["contender"]
            if floor and r is not floor:
                r["pct_of_floor"] = 100 * _ms(floor, "full") / t
            counted = flops(_case_of(r), r["workload"], "full", r["kind"] == "floor")
            if counted is not None:
                r["full_gflop_counted"] = counted / 1e9


def _case_of(r: dict):
    from _workloads import Case

    return Case(r["case"], r["d"], r["v"], r["n"], r["model"])


def _fmt_ms(row: dict, mode: str) -> str:
    s = row.get(f"{mode}_ms")
    if not isinstance(s, dict):
        return "—"
    spread = (s["p75"] - s["p25"]) / s["median"] * 100 if s["median"] else 0.0
    return f"{s['median']:.3g} ±{spread:.0f}%" if len(s["times"]) > 1 else f"{s['median']:.3g}"


def _f(x, fmt: str, suffix: str = "") -> str:
    return "—" if x is None else f"{x:{fmt}}{suffix}"


def _status(r: dict) -> str:
    if r["status"] == "ok":
        return "ok" + (f" ({r['memory_note']})" if r.get("memory_note") else "")
    return f"{r['status']}: {r['reason']}"


def markdown(rows: list[dict], meta: dict) -> str:
    """The whole report: a header, one table per (case, workload), the verdict and footnotes."""
    out = [
        f"## tpo_fast benchmark — {meta['device_name']} ({meta['device']}), {meta['dtype']}",
        "",
        f"torch {meta['versions'].get('torch')}, {meta['threads']} CPU threads, repeats {meta['repeats']} "
        f"after {meta['warmup']} warm-up, seed {meta['seed']}. Times are medians ± the interquartile range "
        "as % of the median; peak MiB is memory above the resident inputs during one call "
        f"({MEMORY_HOW[meta['device'] == 'cuda']}).",
        "",
    ]
    cases: dict[str, dict] = {}
    for r in rows:
        cases.setdefault(r["case"], r)
    for workload in WORKLOADS:
        for case, c in cases.items():
            group = [r for r in rows if r["case"] == case and r["workload"] == workload]
            if not group:
                continue
            group.sort(key=lambda r: (STATUS_ORDER.get(r["kind"], 9), r["contender"] != "naive"))
            memory_bound = workload == "logits"
            out += [
                f"### {workload} · {case}: {_shape(workload, c)} · {meta['dtype']}",
                "",
                "| contender | fwd ms | fwd+bwd ms | peak MiB fwd / fwd+bwd | vs naive | vs best peer "
                f"| % of floor | {'GB/s fwd / fwd+bwd' if memory_bound else 'TFLOP/s'} | status |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---|",
            ]
            for r in group:
                peak = "—"
                if r.get("full_peak_mib") is not None:
                    peak = f"{_f(r.get('fwd_peak_mib'), '.1f')} / {r['full_peak_mib']:.1f}"
                    if r.get("mem_pct_of_naive") is not None:
                        peak += f" ({r['mem_pct_of_naive']:.0f}% of naive)"
                out.append(
                    f"| {r['label']} | {_fmt_ms(r, 'fwd')} | {_fmt_ms(r, 'full')} | {peak} "
                    f"| {_f(r.get('speedup_vs_naive'), '.2f', 'x')} "
                    f"| {_f(r.get('speedup_vs_best_peer'), '.2f', 'x')} "
                    f"| {_f(r.get('pct_of_floor'), '.0f', '%')} | {_rate(r, memory_bound)} "
                    f"| {_status(r)} |"
                )
            out.append("")
    out += ["### Verdict (fwd+bwd)", ""] + verdict(rows) + [""]
    out += footnotes(rows)
    return "\n".join(out)


def _shape(workload: str, c: dict) -> str:
    """The table heading's shape, in the terms of the workload's inputs."""
    valid = f"{100 * c['valid_frac']:.0f}% valid"
    if workload == "logits":
        return f"{LOGITS_TENSORS} logits tensors (clean, corrupted) of N={c['n']} x V={c['v']}, {valid}"
    rows = f"D={c['d']}, V={c['v']}, N={c['n']} rows ({c['n_seq']} x {c['seq_len']}, {valid})"
    if workload == "povid":
        return rows + f", + {c['n'] // 2} corrupted chosen rows per model"
    if workload == "fisao":
        return rows.replace("rows (", "rollout tokens (")
    return rows


def _rate(r: dict, memory_bound: bool) -> str:
    if not memory_bound:
        return _f(r.get("full_tflops"), ".3g")
    if r.get("full_gbs") is None:
        return "—"
    return f"{_f(r.get('fwd_gbs'), '.3g')} / {r['full_gbs']:.3g}"


def verdict(rows: list[dict]) -> list[str]:
    """One plain sentence per (case, workload): who wins fwd+bwd and by how much."""
    lines = []
    keys = []
    for r in rows:
        if (r["case"], r["workload"]) not in keys:
            keys.append((r["case"], r["workload"]))
    for case, workload in keys:
        ok = [
            r
            for r in rows
            if r["case"] == case
            and r["workload"] == workload
            and r["status"] == "ok"
            and r["kind"] in ("baseline", "peer", "ours")
            and _ms(r, "full")
        ]
        if not ok:
            lines.append(f"- {workload} · {case}: no contender produced a checked result.")
            continue
        win = min(ok, key=lambda r: _ms(r, "full"))
        rest = [r for r in ok if r is not win]
        runner = min(rest, key=lambda r: _ms(r, "full"), default=None)
        text = f"- {workload} · {case}: **{win['label']}** wins at {_ms(win, 'full'):.3g} ms"
        if runner:
            text += f", {_ms(runner, 'full') / _ms(win, 'full'):.2f}x faster than the next, {runner['label']}"
        naive = next((r for r in ok if r["contender"] == "naive"), None)
        if naive and win is not naive:
            text += f"; {_ms(naive, 'full') / _ms(win, 'full'):.2f}x vs naive"
            if win.get("mem_pct_of_naive") is not None:
                text += f", peak memory {win['mem_pct_of_naive']:.1f}% of naive's"
        if win.get("pct_of_floor") is not None:
            floor = "memory floor" if workload == "logits" else "matmul floor"
            text += f"; {win['pct_of_floor']:.0f}% of the {floor}"
        if win.get("full_gbs") is not None:
            text += f" ({win['full_gbs']:.3g} GB/s)"
        skipped = [
            r["label"]
            for r in rows
            if r["case"] == case
            and r["workload"] == workload
            and r["status"] not in ("ok", "n/a")
            and r["kind"] != "selftest"
        ]
        if skipped:
            text += f". Not compared: {', '.join(skipped)} (see table)"
        lines.append(text + ".")
    return lines


def footnotes(rows: list[dict]) -> list[str]:
    out = ["### What each contender runs", ""]
    notes: dict[str, dict[str, str]] = {}
    for r in rows:
        if r.get("note"):
            notes.setdefault(r["label"], {}).setdefault(r["workload"], r["note"])
    for label, by_workload in notes.items():
        if len(set(by_workload.values())) == 1:
            out.append(f"- {label}: {next(iter(by_workload.values()))}")
        else:
            out += [f"- {label} · {w}: {n}" for w, n in by_workload.items()]
    out += [
        "",
        "Notes: every contender gets the same random inputs (same seed) in the same dtype; its loss (or "
        "log-probs) and every gradient are checked against an fp32 oracle before it is timed "
        "(tolerance: 2x the error of plain PyTorch in that dtype plus a per-dtype floor); a contender that "
        "fails is listed with its error and not timed. `vs best peer` compares with the fastest checked "
        "of Liger, TRL and CCE. The matmul floor runs the bare lm_head GEMMs over all N rows (2·N·D·V per "
        "clean forward, 6·N·D·V for the branch with gradient; the reference branch forward only); contenders "
        "that skip padded rows can beat it. TFLOP/s credits every contender with an exact O(N)-memory "
        "kernel's work on all N rows: 2·N·D·V per clean forward, 8·N·D·V per clean branch with gradient "
        "(forward, recomputed logits, two gradient GEMMs); tpo and dpo fwd+bwd = 10·N·D·V; the floor is "
        "credited with what it executes. povid counts 6·N·D·V fwd and 12·N·D·V fwd+bwd (the argmax sweep over "
        "the N/2 corrupted chosen rows is N·D·V per model), fisao 2·N·D·V and 8·N·D·V (rollout and reference "
        "log-probs are inputs). Liger computes its gradients inside forward, so its fwd time includes them.",
        "",
        "The logits workload is memory-bound, so its floor is the memory roofline, not matmuls: the memory "
        "floor reads each of the two (N, V) logits tensors once (a row sum) and, in fwd+bwd, writes one (N, V) "
        "gradient per tensor. GB/s = those bytes (fwd: 2·N·V·bytes per element read; fwd+bwd: + 2·N·V "
        "written) / time, for every contender alike; contenders that skip ignored rows can pass 100% of "
        "the floor.",
        "",
    ]
    return out


def write_json_csv(rows: list[dict], meta: dict, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, cpath = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    jpath.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    with cpath.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            flat = dict(r, device=meta["device"], dtype=meta["dtype"])
            for mode in ("fwd", "full"):
                s = r.get(f"{mode}_ms")
                flat[f"{mode}_ms"] = s["median"] if isinstance(s, dict) else None
                flat[f"{mode}_ms_p25"] = s["p25"] if isinstance(s, dict) else None
                flat[f"{mode}_ms_p75"] = s["p75"] if isinstance(s, dict) else None
            if r.get("check"):
                flat["max_rel_err"] = max(v["err"] for v in r["check"]["errors"].values())
            w.writerow(flat)
    return [jpath, cpath]


def plot(rows: list[dict], meta: dict, out_dir: Path, stem: str) -> list[Path]:
    """PNG plots of fwd+bwd time and peak memory vs N, per contender, one panel per (workload, D x V)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["workload"], r["model"], r["d"], r["v"]) for r in rows})
    colors = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(r["contender"] for r in rows))}
    paths = []
    for metric, ylabel, fname in (
        ("full_ms", "fwd+bwd time (ms)", "time"),
        ("full_peak_mib", "peak memory above inputs (MiB)", "memory"),
    ):
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (workload, model, d, v) in zip(axes[0], panels, strict=True):
            sel = [
                r for r in rows if (r["workload"], r["model"]) == (workload, model) and r["status"] == "ok"
            ]
            for name in dict.fromkeys(r["contender"] for r in sel):
                pts = sorted((r["n"], _metric(r, metric), r["label"]) for r in sel if r["contender"] == name)
                pts = [p for p in pts if p[1] is not None and p[1] > 0]
                if pts:
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        marker="o",
                        label=pts[0][2],
                        color=colors[name],
                    )
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="N rows per clean branch",
                ylabel=ylabel,
                title=f"{workload} · {model} (D={d}, V={v})",
            )
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{meta['device_name']} · {meta['dtype']}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{stem}_{fname}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _metric(r: dict, metric: str) -> float | None:
    if metric == "full_ms":
        return _ms(r, "full")
    return r.get(metric)
