"""The Markdown report: header, the legend, one table per (case, workload) with one line for the
contenders that did not run, the verdict, and what each contender runs.

Ratios and verdicts only come from rows that pass the noise rule (`_derive`); a ratio whose two
interquartile ranges overlap is printed with a leading `≈` (within noise).
"""

from __future__ import annotations

from _derive import MAX_SPREAD_PCT, MIN_MEDIAN_MS, MIN_REPEATS, median, spread_pct, timing, within_noise
from _workloads import LOGITS_TENSORS, WORKLOADS

MEMORY_HOW = {
    True: "torch.cuda.max_memory_allocated",
    False: "peak RSS of a child process per contender with glibc's mmap threshold pinned; the times come from a "
    "second child under the default allocator",
}
STATUS_ORDER = {"baseline": 0, "peer": 1, "ours": 2, "floor": 3, "selftest": 4}
NOT_RUN = ("n/a", "unavailable", "not run")
RANKED = ("baseline", "peer", "ours")


def run_dtype(rows: list[dict], meta: dict) -> str:
    """The dtype(s) of a run: the loss workloads' (--dtype, `meta["dtype"]`), and each step case's own."""
    steps = sorted({r["dtype"] for r in rows if r["workload"] == "step" and r.get("dtype")})
    if not steps:
        return meta["dtype"]
    if all(r["workload"] == "step" for r in rows):
        return ", ".join(steps)
    return f"{meta['dtype']} (step cases: {', '.join(steps)})"


def markdown(rows: list[dict], meta: dict) -> str:
    """The whole report."""
    out = [
        f"## tpo_fast benchmark — {meta['device_name']} ({meta['device']}), {run_dtype(rows, meta)}",
        "",
        f"torch {meta['versions'].get('torch')}, {meta['threads']} CPU threads, repeats {meta['repeats']} "
        f"after {meta['warmup']} warm-up{_rounds(meta)}, seed {meta['seed']}.",
        "",
    ]
    out += legend(meta["device"], step=any(r["workload"] == "step" for r in rows))
    for workload in WORKLOADS:
        for case in dict.fromkeys(r["case"] for r in rows):
            group = [r for r in rows if r["case"] == case and r["workload"] == workload]
            if group:
                out += step_table(group) if workload == "step" else table(group, meta)
    out += ["### Verdict (fwd+bwd)", ""] + verdict(rows) + [""]
    out += footnotes(rows)
    return "\n".join(out)


def _rounds(meta: dict) -> str:
    rounds = meta.get("rounds", 1)
    if rounds <= 1:
        return ""
    return (f", in {rounds} rounds (each round times every contender in turn in a fresh child, its own warm-up "
            "first; the median is over all rounds)")


def legend(device: str, step: bool = False) -> list[str]:
    """What the columns mean, before the tables (and the step tables' columns when `step`)."""
    short = " (CUDA)" if device == "cuda" else " (CPU)"
    return _loss_legend(device, short) + (_step_legend(device) if step else []) + [
        "- **Noise rule**: a row whose fwd+bwd (step) timing has fewer than "
        f"{MIN_REPEATS} repeats, a median under {MIN_MEDIAN_MS[device]:g} ms{short} or an interquartile range "
        f"above {MAX_SPREAD_PCT:.0f}% of its median is marked `not compared` in its status: it gets no ratio, "
        "no % of floor and no place in the verdict.",
        "- **≈** before a ratio: within noise, the two rows' interquartile ranges overlap.",
        "- **status**: `ok`; `failed check` (wrong loss or gradient against the fp32 oracle: not timed); "
        "`error`, `crashed`, `OOM`. Contenders that cannot run here are named in one line under each table, "
        "with the reason.",
        "",
    ]


def _step_legend(device: str) -> list[str]:
    memory = MEMORY_HOW[device == "cuda"]
    return [
        "- **step** tables (whole training steps): **step ms** = forward, backward and optimizer step, median "
        "± IQR %; **tokens/s** = the pairs' tokens (per pair the prompt with its image tokens once, plus "
        "chosen and rejected, no padding; the same count for every contender) / step time; **peak MiB** = "
        f"the step's peak above what is resident before it / the total peak ({memory}) with weights, "
        "reference and optimizer state; **GFLOP / step** = one step's work as `torch.utils.flop_counter` counts "
        "it (matmuls and attention, not elementwise work; CPU only: on CUDA the Triton kernels are invisible "
        "to it), and **GFLOP/s** that work / the step time: a speed-up above the GFLOP ratio of two rows "
        "comes from running faster, not from doing less; "
        "**largest micro-batch** = the most pairs whose step's total peak fits "
        "the budget (doubling then bisecting; `≥` when the time bound or the cap stopped the search); **vs "
        "official**, **vs TRL**, **vs unshared** = that row's step time / this row's (= the tokens/s ratio). "
        "The check: at the first step the policy is its own reference, so every loss must be ln 2; in fp32 the "
        "first optimizer step must lower it; and that first drop must equal the drop of the same objective's "
        "independent step (official TPO, TRL's DPO) within 2% (fp32) or 15% (bf16).",
    ]


def _loss_legend(device: str, short: str) -> list[str]:
    return [
        "### How to read the tables",
        "",
        "- **fwd ms, fwd+bwd ms**: median of the timed calls ± the interquartile range as % of the median.",
        "- **peak MiB**: memory above the resident inputs during one call "
        f"({MEMORY_HOW[device == 'cuda']}); in brackets as % of naive's.",
        "- **vs naive**, **vs best peer**: the fwd+bwd median of naive (of the fastest checked of Liger, TRL and "
        "CCE) divided by this row's; above 1x this row is faster.",
        "- **% of floor**: the floor's fwd+bwd median / this row's, against the bare lm_head GEMMs over all N "
        "rows, then over the valid (non-ignored) rows only. Contenders that skip padded rows can pass 100% of "
        "the all-rows floor. `logits`: the memory floor (one read of each logits tensor, one gradient write).",
        "- **TFLOP/s** credits every contender with an exact O(N)-memory kernel's work on all N rows: 2·N·D·V "
        "per clean forward, 8·N·D·V per clean branch with gradient (forward, recomputed logits, two gradient "
        "GEMMs): tpo and dpo fwd+bwd 10·N·D·V, povid 12·N·D·V (N·D·V of it per model for the argmax over the N/2 "
        "corrupted chosen rows), primitive and fisao 8·N·D·V. A fused-gradient path that skips the recompute "
        "is credited the same work. Floors are credited with what they execute. **GB/s** (`logits`): the "
        "bytes the memory floor moves, for every contender alike.",
    ]


def table(group: list[dict], meta: dict) -> list[str]:
    """One (case, workload) table and its `Not run` line."""
    c, workload = group[0], group[0]["workload"]
    memory_bound = workload == "logits"
    shown = sorted(
        (r for r in group if r["status"] not in NOT_RUN),
        key=lambda r: (STATUS_ORDER.get(r["kind"], 9), r["contender"] != "naive"),
    )
    floor = "% of memory floor" if memory_bound else "% of floor all / valid rows"
    out = [
        f"### {workload} · {c['case']}: {_shape(workload, c)} · {meta['dtype']}",
        "",
        f"| contender | fwd ms | fwd+bwd ms | peak MiB fwd / fwd+bwd | vs naive | vs best peer | {floor} "
        f"| {'GB/s fwd / fwd+bwd' if memory_bound else 'TFLOP/s'} | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in shown:
        out.append(
            f"| {r['label']} | {_fmt_ms(r, 'fwd')} | {_fmt_ms(r, 'full')} | {_peak(r)} "
            f"| {_ratio(r, 'speedup_vs_naive')} | {_ratio(r, 'speedup_vs_best_peer')} "
            f"| {_floors(r, memory_bound)} | {_rate(r, memory_bound)} | {_status(r)} |"
        )
    return _with_not_run(out, group)


def step_table(group: list[dict]) -> list[str]:
    """One step-workload table (case x contenders) and its `Not run` line."""
    c = group[0]
    shown = sorted((r for r in group if r["status"] not in NOT_RUN),
                   key=lambda r: (STATUS_ORDER.get(r["kind"], 9), r["contender"]))
    tokens = next((r for r in group if r.get("tokens")), None)
    data = (f"{tokens['tokens']} tokens ({tokens['padded_positions']} padded positions, rows of "
            f"{tokens['seq_len']})" if tokens else "tokens unknown")
    budget = f"{c['memory_budget_mib']:g}"
    out = [
        f"### step · {c['case']}: {c['model']} (text hidden {c['d']}, {c['layers']} layers, V={c['v']}, "
        f"{c['image_tokens']} image tokens{', LoRA' if c.get('lora') else ''}), {c['n']} pairs = {data} · "
        f"{c.get('dtype', '')}",
        "",
        f"| contender | step ms | tokens/s | GFLOP / step · GFLOP/s | peak MiB step / total "
        f"| largest micro-batch ≤ {budget} MiB | vs official | vs TRL | vs unshared | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in shown:
        work = (f"{_gflop(r['step_gflop'])} · {_gflop(r.get('step_gflops'))}" if r.get("step_gflop") is not None
                else "—")
        out.append(
            f"| {r['label']} | {_fmt_ms(r, 'full')} | {_f(r.get('tokens_per_s'), '.0f')} | {work} "
            f"| {_f(r.get('full_peak_mib'), '.0f')} / {_f(r.get('total_peak_mib'), '.0f')} | {_micro_batch(r)} "
            f"| {_ratio(r, 'speedup_vs_naive')} | {_ratio(r, 'speedup_vs_best_peer')} "
            f"| {_ratio(r, 'speedup_vs_unshared')} | {_status(r)} |"
        )
    rounds = [r for r in shown if len(r.get("round_medians_ms", [])) > 1]
    if rounds:
        out += ["", "Step median of each round (s), in the order run: " + "; ".join(
            f"{r['label']} {' / '.join(f'{ms / 1e3:.3g}' for ms in r['round_medians_ms'])}" for r in rounds) + "."]
    return _with_not_run(out, group)


def _gflop(x: float | None) -> str:
    """A step's GFLOP or GFLOP/s: whole numbers from 100 up, else three significant digits (a toy model's step
    does well under one GFLOP, which a whole number showed as 0)."""
    return "—" if x is None else f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _micro_batch(r: dict) -> str:
    if r.get("max_micro_batch") is None:
        return "—"
    if r["max_micro_batch"] == 0:
        return "none (1 pair is over)"
    return f"{'' if r.get('max_micro_batch_exact') else '≥'}{r['max_micro_batch']}"


def _with_not_run(out: list[str], group: list[dict]) -> list[str]:
    """A table's lines, then its `Not run` line if any, then a blank line."""
    if line := not_run_line(group):
        out += ["", line]
    return out + [""]


def not_run_line(group: list[dict]) -> str | None:
    """One line naming every contender that did not run, grouped by reason; None when all ran."""
    by_reason: dict[str, list[str]] = {}
    for r in group:
        if r["status"] in NOT_RUN:
            reason = f"n/a: {r['reason']}" if r["status"] == "n/a" else r["reason"]
            by_reason.setdefault(reason, []).append(r["label"])
    if not by_reason:
        return None
    return "Not run: " + "; ".join(f"{', '.join(labels)} — {why}" for why, labels in by_reason.items()) + "."


def _fmt_ms(row: dict, mode: str) -> str:
    s = timing(row, mode)
    if s is None:
        return "—"
    return f"{number(s['median'])} ±{spread_pct(s):.0f}%" if len(s["times"]) > 1 else number(s["median"])


def number(x: float) -> str:
    """Three significant digits, never an exponent: 0.0123, 4.56, 789, 19137 (not 1.91e+04)."""
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _f(x, fmt: str, suffix: str = "") -> str:
    return "—" if x is None else f"{x:{fmt}}{suffix}"


def _peak(r: dict) -> str:
    if r.get("full_peak_mib") is None:
        return "—"
    peak = f"{_f(r.get('fwd_peak_mib'), '.1f')} / {r['full_peak_mib']:.1f}"
    if r.get("mem_pct_of_naive") is not None:
        peak += f" ({r['mem_pct_of_naive']:.0f}% of naive)"
    return peak


def _approx(r: dict, key: str) -> str:
    return "≈" if r.get(f"{key}_within_noise") else ""


def _ratio(r: dict, key: str) -> str:
    x = r.get(key)
    return "—" if x is None else f"{_approx(r, key)}{x:.2f}x"


def _pct(r: dict, key: str) -> str:
    x = r.get(key)
    return "—" if x is None else f"{_approx(r, key)}{x:.0f}%" if x >= 10 else f"{_approx(r, key)}{x:.2g}%"


def _floors(r: dict, memory_bound: bool) -> str:
    if memory_bound:
        return _pct(r, "pct_of_floor")
    return f"{_pct(r, 'pct_of_floor')} / {_pct(r, 'pct_of_valid_floor')}"


def _status(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {r['reason']}"
    notes = [r["memory_note"]] if r.get("memory_note") else []
    if r.get("noise"):
        notes.append(f"not compared: {r['noise']}")
    return "ok" + (f"; {'; '.join(notes)}" if notes else "")


def _shape(workload: str, c: dict) -> str:
    """The table heading's shape, in the terms of the workload's inputs."""
    valid = f"{100 * c['valid_frac']:.0f}% valid" if c.get("valid_frac") is not None else "valid rows unknown"
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
    return f"{'—' if r.get('fwd_gbs') is None else number(r['fwd_gbs'])} / {number(r['full_gbs'])}"


def verdict(rows: list[dict]) -> list[str]:
    """One plain sentence per (case, workload): who wins fwd+bwd and by how much, from the rows that
    pass the noise rule only."""
    keys = list(dict.fromkeys((r["case"], r["workload"]) for r in rows))
    return [_verdict_line([r for r in rows if (r["case"], r["workload"]) == k]) for k in keys]


def _verdict_line(group: list[dict]) -> str:
    """The verdict of one (case, workload). A winner is named only when no row kept out of the ranking by the noise
    rule has a lower median than it."""
    head = f"- {group[0]['workload']} · {group[0]['case']}: "
    timed = [r for r in group if r["status"] == "ok" and r["kind"] in RANKED and median(r)]
    fair = [r for r in timed if not r.get("noise")]
    flagged = [r for r in timed if r.get("noise")]
    failed = [r["label"] for r in group if r["status"] not in ("ok", *NOT_RUN) and r["kind"] != "selftest"]
    tail = ""
    if flagged:
        tail += f". Not ranked (timing too short or noisy): {', '.join(r['label'] for r in flagged)}"
    if failed:
        tail += f". Not compared: {', '.join(failed)} (see table)"
    if not timed:
        return head + "no contender produced a checked result" + tail + "."
    if not fair:
        why = "no verdict: every timing is too short or too noisy to compare; use a larger case or more --repeats"
        return head + why + tail + "."
    if group[0]["workload"] == "step":
        return head + _step_verdict(fair) + tail + "."
    best = min(fair, key=median)
    if faster := [r for r in flagged if median(r) < median(best)]:
        return head + _no_winner(best, faster) + tail + "."
    return head + _winner(fair) + tail + "."


def _no_winner(best: dict, faster: list[dict]) -> str:
    """The verdict when rows the noise rule keeps out of the ranking have a lower median than the fastest row it
    ranks: calling that row the winner would hide that something measured faster."""
    which = ", ".join(f"{r['label']} at {number(median(r))} ms" for r in sorted(faster, key=median))
    whose = "whose timing is" if len(faster) == 1 else "whose timings are"
    return (f"no winner: the fastest row that passes the noise rule, {best['label']} at {number(median(best))} ms, is "
            f"slower than {which}, {whose} too short or too noisy to compare; use a larger case or more --repeats")


# The step workload's comparisons: like with like (DPO vs DPO, TPO vs TPO, shared vs unshared).
STEP_PAIRS = (("ours-dpo", "trl-dpo"), ("ours-dpo-shared", "trl-dpo"), ("ours-tpo", "official-tpo"),
              ("ours-tpo-shared", "official-tpo"), ("ours-tpo-shared-refcache", "official-tpo"),
              ("ours-dpo-shared", "ours-dpo"), ("ours-tpo-shared", "ours-tpo"),
              ("ours-tpo-shared-refcache", "ours-tpo-shared"))


def amortized_ratio(cached: dict, other: dict) -> float:
    """`other`'s step time / the cached-reference row's step time plus its share of the cache's scoring in a one-epoch
    run: the data set is scored once and each pair trained on once, so each step carries `pairs x s per pair` of
    scoring (over E epochs, or reruns on the same cache, that share falls to 1/E of it)."""
    share_ms = cached["reference_cache_s_per_pair"] * cached["pairs"] * 1e3
    return median(other) / (median(cached) + share_ms)


def amortized_note(cached: dict) -> str:
    per_pair, pairs = cached["reference_cache_s_per_pair"], cached["pairs"]
    return (f"{per_pair:.3g} s per pair, paid once per data set: {per_pair * pairs:.3g} s per step of {pairs} pairs "
            f"over one epoch")


def _step_verdict(fair: list[dict]) -> str:
    """Each like-for-like pair of step rows that pass the noise rule: tokens/s ratio, within noise or not."""
    by = {r["contender"]: r for r in fair}
    parts = []
    for a, b in STEP_PAIRS:
        if a in by and b in by:
            ra, rb = by[a], by[b]
            ratio = median(rb) / median(ra)
            noise = " (within noise)" if within_noise(ra, rb) else ""
            text = f"{ra['label']} {ratio:.2f}x the tokens/s of {rb['label']}{noise}"
            if ra.get("reference_cache_s_per_pair") and not rb.get("reference_cache_s_per_pair"):
                text += f" ({amortized_ratio(ra, rb):.2f}x counting the cache's scoring in a one-epoch run, " \
                        f"{amortized_note(ra)})"
            parts.append(text)
    return "; ".join(parts) if parts else "no like-for-like pair of rows passed the noise rule"


def _winner(fair: list[dict]) -> str:
    win = min(fair, key=median)
    runner = min((r for r in fair if r is not win), key=median, default=None)
    if runner and within_noise(win, runner):
        text = (
            f"**{win['label']}** ({number(median(win))} ms) and {runner['label']} ({number(median(runner))} ms) tie "
            "within noise (their interquartile ranges overlap)"
        )
    else:
        text = f"**{win['label']}** wins at {number(median(win))} ms"
        if runner:
            text += f", {median(runner) / median(win):.2f}x faster than the next, {runner['label']}"
    if win.get("speedup_vs_naive") is not None:
        text += f"; {win['speedup_vs_naive']:.2f}x vs naive" + (
            " (within noise)" if win["speedup_vs_naive_within_noise"] else ""
        )
        if win.get("mem_pct_of_naive") is not None:
            text += f", peak memory {win['mem_pct_of_naive']:.1f}% of naive's"
    floors = {"pct_of_floor": "memory floor" if win["workload"] == "logits" else "matmul floor"}
    floors["pct_of_valid_floor"] = "valid-rows floor"
    of_floors = [
        f"{win[k]:.0f}% of the {name}" + (" (within noise)" if win[f"{k}_within_noise"] else "")
        for k, name in floors.items()
        if win.get(k) is not None
    ]
    if of_floors:
        text += "; " + ", ".join(of_floors)
    if win.get("full_gbs") is not None:
        text += f" ({number(win['full_gbs'])} GB/s)"
    return text


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
        "Every contender gets the same random inputs (same seed) in the same dtype; its loss (or log-probs) "
        "and every gradient are checked against an fp32 oracle before it is timed (tolerance: 2x the error "
        "of plain PyTorch in that dtype plus a per-dtype floor). Liger computes its gradients inside forward, "
        "and so does tpo_fast's fused grad_mode: their fwd time includes the gradient.",
        "",
    ]
    return out
