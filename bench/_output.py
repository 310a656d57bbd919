"""The run's files: JSON (metadata and every row with all repeats), CSV (the same rows, flat) and PNG plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from _derive import RATIOS, median

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
    "noise",
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
    *(f for k in RATIOS for f in (k, f"{k}_within_noise")),
    "best_peer",
    "mem_pct_of_naive",
    "max_rel_err",
    # the step workload
    "tokens",
    "tokens_per_s",
    "step_gflop",
    "step_gflops",
    "total_peak_mib",
    "max_micro_batch",
    "max_micro_batch_exact",
    "memory_budget_mib",
]


def write_json_csv(rows: list[dict], meta: dict, out_dir: Path, stem: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, cpath = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    jpath.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    with cpath.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            flat = dict(r, device=meta["device"], dtype=r.get("dtype") or meta["dtype"])  # a step case has its own
            for mode in ("fwd", "full"):
                s = r.get(f"{mode}_ms")
                flat[f"{mode}_ms"] = s["median"] if isinstance(s, dict) else None
                flat[f"{mode}_ms_p25"] = s["p25"] if isinstance(s, dict) else None
                flat[f"{mode}_ms_p75"] = s["p75"] if isinstance(s, dict) else None
            if r.get("check"):
                errs = [v["err"] for v in r["check"]["errors"].values() if isinstance(v.get("err"), (int, float))]
                flat["max_rel_err"] = max(errs, default=None)
            w.writerow(flat)
    return [jpath, cpath]


def plot(rows: list[dict], meta: dict, out_dir: Path, stem: str) -> list[Path]:
    """PNG plots of fwd+bwd time and peak memory vs N, per contender, one panel per (workload, D x V);
    and `<stem>_step.png` for the step workload (see `plot_step`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = [r for r in rows if r["workload"] == "step"]
    rows = [r for r in rows if r["workload"] != "step"]
    paths = plot_step(step, meta, out_dir, stem) if step else []
    if not rows:
        return paths
    panels = sorted({_panel(r) for r in rows})
    colors = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(r["contender"] for r in rows))}
    for metric, ylabel, fname in (
        ("full_ms", "fwd+bwd time (ms)", "time"),
        ("full_peak_mib", "peak memory above inputs (MiB)", "memory"),
    ):
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (workload, model, d, v, targets) in zip(axes[0], panels, strict=True):
            sel = [r for r in rows if _panel(r) == (workload, model, d, v, targets) and r["status"] == "ok"]
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
                title=f"{workload} · {model} (D={d}, V={v})" + (f", {targets} targets" if targets != "uniform" else ""),
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


def _panel(r: dict) -> tuple:
    """The plot panel of a loss row: workload, lm_head shape and target law (a "-zipf" case has its uniform twin's
    model, D, V and N, so without the law the two cases' points would join in one line)."""
    return r["workload"], r["model"], r["d"], r["v"], r.get("targets", "uniform")


def _metric(r: dict, metric: str) -> float | None:
    if metric == "full_ms":
        return median(r)
    return r.get(metric)


def plot_step(rows: list[dict], meta: dict, out_dir: Path, stem: str) -> list[Path]:
    """`<stem>_step.png`: per step case, bars of tokens/s, total peak memory and the largest micro-batch
    in the budget, one bar per contender that ran (hatched: not compared by the noise rule)."""
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    metrics = (("tokens_per_s", "tokens / s"), ("total_peak_mib", "total peak MiB"),
               ("max_micro_batch", "largest micro-batch (pairs)"))
    fig, axes = plt.subplots(len(cases), 3, figsize=(15, 4 * len(cases)), squeeze=False)
    for ax_row, case in zip(axes, cases, strict=True):
        sel = [r for r in rows if r["case"] == case and r["status"] == "ok"]
        labels = [r["label"].replace(" step", "").replace(", ", "\n") for r in sel]
        for ax, (key, ylabel) in zip(ax_row, metrics, strict=True):
            values = [r.get(key) or 0 for r in sel]
            bars = ax.bar(range(len(sel)), values, color=[f"C{i % 10}" for i in range(len(sel))])
            for bar, r in zip(bars, sel, strict=True):
                if r.get("noise"):
                    bar.set_hatch("//")
                if key == "max_micro_batch" and r.get(key) is not None and not r.get("max_micro_batch_exact"):
                    ax.annotate("≥", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
            ax.set_xticks(range(len(sel)), labels, fontsize=7, rotation=30, ha="right")
            budget = next((r["memory_budget_mib"] for r in sel if r.get("memory_budget_mib")), None)
            title = f"{ylabel}, ≤ {budget:g} MiB" if key == "max_micro_batch" and budget else ylabel
            ax.set(ylabel=ylabel, title=f"{case} · {title}")
            ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"step · {meta['device_name']}", fontsize=9)
    fig.tight_layout()
    path = out_dir / f"{stem}_step.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
