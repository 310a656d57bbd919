"""bench/_report.py on rows written out by hand, with their derived figures already in place.

Every table line and verdict sentence below is written out from the rows' own numbers, so a column that shows
another field, a ratio in the wrong column or a verdict that names the wrong contender fails here, without a
benchmark run. (`tests/test_bench_derive.py` checks how those figures are derived; `tests/test_bench_smoke.py`
runs the whole runner.)
"""

from __future__ import annotations

import pytest
from _bench import bench_modules
from _bench import timing as _timing

SHAPE = dict(d=64, v=512, n=64, n_seq=4, seq_len=16, valid_frac=0.75)


@pytest.fixture(scope="module")
def report():
    return bench_modules("_report")[0]


def _row(contender, kind, label=None, workload="tpo", case="c1", status="ok", reason="", **extra) -> dict:
    return {"case": case, "workload": workload, "contender": contender, "label": label or contender, "kind": kind,
            "status": status, "reason": reason, **SHAPE, **extra}


def _no_noise(*keys: str) -> dict:
    return {f"{k}_within_noise": False for k in keys}


def _tpo_rows() -> list[dict]:
    return [
        _row("liger", "peer", "Liger", status="n/a", reason="no per-token weights (DPO only)"),
        _row("tpo_fast-cpp", "ours", "tpo_fast [cpp]", status="error", reason="RuntimeError: boom"),
        _row("tpo_fast-torch", "ours", "tpo_fast [torch] auto", full_ms=_timing(24, 25, 26),
             fwd_ms=_timing(12.5, 12.5, 12.5, 1), fwd_peak_mib=100.5, full_peak_mib=250.0, mem_pct_of_naive=25.0,
             full_tflops=1.2345, noise=None,
             memory_note="peak RSS not measurable here (PermissionError: /proc/self/clear_refs)",
             speedup_vs_naive=4.4, speedup_vs_best_peer=2.2, best_peer="trl", pct_of_floor=200.0,
             pct_of_valid_floor=180.0, **_no_noise("speedup_vs_naive", "speedup_vs_best_peer", "pct_of_floor"),
             pct_of_valid_floor_within_noise=True),
        _row("broken", "selftest", "broken (self-test)", status="failed check",
             reason="wrong result, not timed: out rel. err 1.00e+00 > 1.00e-04"),
        _row("floor", "floor", "matmul floor", full_ms=_timing(45, 50, 55), fwd_ms=_timing(9, 10, 11), fwd_peak_mib=1.0,
             full_peak_mib=2.0, full_tflops=8.0, noise=None, speedup_vs_naive=2.2, **_no_noise("speedup_vs_naive")),
        _row("trl", "peer", "TRL head", full_ms=_timing(54, 55, 56), fwd_ms=_timing(27, 27.5, 28), full_peak_mib=800.0,
             mem_pct_of_naive=80.0, noise=None, speedup_vs_naive=2.0, speedup_vs_naive_within_noise=True,
             pct_of_floor=90.909, pct_of_valid_floor=4.5, **_no_noise("pct_of_floor", "pct_of_valid_floor")),
        _row("naive", "baseline", "naive", full_ms=_timing(100, 110, 120), fwd_ms=_timing(45, 50, 55),
             fwd_peak_mib=400.0, full_peak_mib=1000.0, noise=None, speedup_vs_best_peer=0.5, best_peer="trl",
             **_no_noise("speedup_vs_best_peer")),
        _row("tpo_fast-noisy", "ours", "noisy ours", full_ms=_timing(20, 30, 40), fwd_ms=_timing(10, 15, 20),
             noise="too noisy (IQR 67% > 25%)"),
        _row("tpo_fast-triton", "ours", "tpo_fast [triton] auto", status="unavailable", reason="needs CUDA"),
    ]


def test_loss_table_every_column(report):
    assert report.table(_tpo_rows(), {"dtype": "fp32"}) == [
        "### tpo · c1: D=64, V=512, N=64 rows (4 x 16, 75% valid) · fp32",
        "",
        "| contender | fwd ms | fwd+bwd ms | peak MiB fwd / fwd+bwd | vs naive | vs best peer | "
        "% of floor all / valid rows | TFLOP/s | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        "| naive | 50 ±20% | 110 ±18% | 400.0 / 1000.0 | — | 0.50x | — / — | — | ok |",
        "| TRL head | 27.5 ±4% | 55 ±4% | — / 800.0 (80% of naive) | ≈2.00x | — | 91% / 4.5% | — | ok |",
        "| tpo_fast [cpp] | — | — | — | — | — | — / — | — | error: RuntimeError: boom |",
        "| tpo_fast [torch] auto | 12.5 | 25 ±8% | 100.5 / 250.0 (25% of naive) | 4.40x | 2.20x | 200% / ≈180% "
        "| 1.23 | ok; peak RSS not measurable here (PermissionError: /proc/self/clear_refs) |",
        "| noisy ours | 15 ±67% | 30 ±67% | — | — | — | — / — | — | ok; not compared: too noisy (IQR 67% > 25%) |",
        "| matmul floor | 10 ±20% | 50 ±20% | 1.0 / 2.0 | 2.20x | — | — / — | 8 | ok |",
        "| broken (self-test) | — | — | — | — | — | — / — | — | failed check: wrong result, not timed: out rel. "
        "err 1.00e+00 > 1.00e-04 |",
        "",
        "Not run: Liger — n/a: no per-token weights (DPO only); tpo_fast [triton] auto — needs CUDA.",
        "",
    ]


def test_loss_verdict_names_the_winner_its_margins_and_who_was_left_out(report):
    assert report.verdict(_tpo_rows()) == [
        "- tpo · c1: **tpo_fast [torch] auto** wins at 25 ms, 2.20x faster than the next, TRL head; 4.40x vs naive, "
        "peak memory 25.0% of naive's; 200% of the matmul floor, 180% of the valid-rows floor (within noise). "
        "Not ranked (timing too short or noisy): noisy ours. Not compared: tpo_fast [cpp] (see table)."
    ]


def test_the_other_workloads_tables_and_verdicts(report):
    logits = [
        _row("naive", "baseline", workload="logits", full_ms=_timing(5, 10, 15), fwd_ms=_timing(2, 4, 6),
             noise="too noisy (IQR 100% > 25%)"),
        _row("ours", "ours", "tpo_fast logits", workload="logits", full_ms=_timing(19, 20, 21),
             fwd_ms=_timing(9, 10, 11), fwd_gbs=1.5, full_gbs=3.25, pct_of_floor=45.0, pct_of_floor_within_noise=False,
             noise=None),
        _row("floor", "floor", "memory floor", workload="logits", full_ms=_timing(8.5, 9, 9.5),
             fwd_ms=_timing(4, 4, 4), noise=None),
    ]
    povid = [_row("ours", "ours", "tpo_fast povid", workload="povid", status="error", reason="ValueError: bad")]
    fisao = [{k: v for k, v in _row("ours", "ours", "tpo_fast fisao", workload="fisao", status="OOM",
                                    reason="out of memory: CUDA").items() if k != "valid_frac"}]
    assert report.table(logits, {"dtype": "bf16"}) == [
        "### logits · c1: 2 logits tensors (clean, corrupted) of N=64 x V=512, 75% valid · bf16",
        "",
        "| contender | fwd ms | fwd+bwd ms | peak MiB fwd / fwd+bwd | vs naive | vs best peer | % of memory floor | "
        "GB/s fwd / fwd+bwd | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        "| naive | 4 ±100% | 10 ±100% | — | — | — | — | — | ok; not compared: too noisy (IQR 100% > 25%) |",
        "| tpo_fast logits | 10 ±20% | 20 ±10% | — | — | — | 45% | 1.5 / 3.25 | ok |",
        "| memory floor | 4 ±0% | 9 ±11% | — | — | — | — | — | ok |",
        "",
    ]
    assert report.table(povid, {"dtype": "fp32"})[0] == (
        "### povid · c1: D=64, V=512, N=64 rows (4 x 16, 75% valid), + 32 corrupted chosen rows per model · fp32"
    )
    assert report.table(fisao, {"dtype": "fp32"})[0] == (
        "### fisao · c1: D=64, V=512, N=64 rollout tokens (4 x 16, valid rows unknown) · fp32"
    )
    assert report.table(fisao, {"dtype": "fp32"})[4] == (
        "| tpo_fast fisao | — | — | — | — | — | — / — | — | OOM: out of memory: CUDA |"
    )
    # One group each; a group of one row is enough for a sentence.
    assert report.verdict(logits + povid + fisao) == [
        # the flagged naive measured faster than the one row that passes: no winner is named
        "- logits · c1: no winner: the fastest row that passes the noise rule, tpo_fast logits at 20 ms, is slower "
        "than naive at 10 ms, whose timing is too short or too noisy to compare; use a larger case or more --repeats. "
        "Not ranked (timing too short or noisy): naive.",
        "- povid · c1: no contender produced a checked result. Not compared: tpo_fast povid (see table).",
        "- fisao · c1: no contender produced a checked result. Not compared: tpo_fast fisao (see table).",
    ]


STEP_CASE = dict(case="cpu-step-lora", workload="step", model="llava-h512-l4", d=512, layers=4, v=32000,
                 image_tokens=576, lora=True, n=4, pairs=4, memory_budget_mib=3072, dtype="bf16")


def _step(contender, kind, label, p25=None, median=None, p75=None, **extra) -> dict:
    timing = {"full_ms": _timing(p25, median, p75), "noise": None} if median else {}
    return {"contender": contender, "kind": kind, "label": label, "status": "ok", "reason": "", **STEP_CASE,
            **timing, **extra}


def _step_rows() -> list[dict]:
    counts = dict(tokens=3734, padded_positions=7136, seq_len=892)
    return [
        _step("trl-dpo-liger", "peer", "TRL DPOTrainer + Liger", status="n/a", reason="Liger needs CUDA"),
        _step("ours-tpo-shared-refcache", "ours", "cached", 3150, 3190, 3230, reference_cache_s_per_pair=0.643,
              tokens_per_s=1170.5, step_gflop=0.04812, step_gflops=0.01509, **counts),
        _step("ours-tpo", "ours", "tpo_fast TPO step", status="OOM", reason="out of memory: 1 pair"),
        _step("ours-dpo-shared", "ours", "tpo_fast DPO step, shared prefix", 2490, 2510, 2530, step_gflop=543.0,
              full_peak_mib=472.4, speedup_vs_unshared=1.398, speedup_vs_unshared_within_noise=False, **counts),
        _step("ours-dpo", "ours", "tpo_fast DPO step", 3480, 3510, 3530, tokens_per_s=1063.8, step_gflop=834.0,
              step_gflops=237.6, full_peak_mib=663.0, total_peak_mib=1205.2, max_micro_batch=12,
              max_micro_batch_exact=True, speedup_vs_naive=5.45, speedup_vs_best_peer=4.87,
              round_medians_ms=[3500.0, 3520.0], **_no_noise("speedup_vs_naive", "speedup_vs_best_peer"), **counts),
        _step("official-tpo", "baseline", "official TPO step", 18500, 19137, 19700, tokens_per_s=195.1,
              step_gflop=2830.2, step_gflops=147.9, full_peak_mib=5628.9, total_peak_mib=6103.4, max_micro_batch=0,
              max_micro_batch_exact=True, speedup_vs_best_peer=0.9, round_medians_ms=[19137.0, 19200.0],
              **_no_noise("speedup_vs_best_peer"), **counts),
        _step("trl-dpo", "peer", "TRL DPOTrainer", 16800, 17100, 17400, tokens_per_s=218.4, full_peak_mib=4646.2,
              max_micro_batch=3, max_micro_batch_exact=False, speedup_vs_naive=1.12,
              speedup_vs_naive_within_noise=True, **counts),
        _step("ours-tpo-shared", "ours", "tpo_fast TPO step, shared prefix", 3200, 3300, 3400, **counts),
    ]


def test_step_table_every_column(report):
    assert report.step_table(_step_rows()) == [
        "### step · cpu-step-lora: llava-h512-l4 (text hidden 512, 4 layers, V=32000, 576 image tokens, LoRA), "
        "4 pairs = 3734 tokens (7136 padded positions, rows of 892) · bf16",
        "",
        "| contender | step ms | tokens/s | GFLOP / step · GFLOP/s | peak MiB step / total "
        "| largest micro-batch ≤ 3072 MiB | vs official | vs TRL | vs unshared | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        "| official TPO step | 19137 ±6% | 195 | 2830 · 148 | 5629 / 6103 | none (1 pair is over) | — | 0.90x | — "
        "| ok |",
        "| TRL DPOTrainer | 17100 ±4% | 218 | — | 4646 / — | ≥3 | ≈1.12x | — | — | ok |",
        "| tpo_fast DPO step | 3510 ±1% | 1064 | 834 · 238 | 663 / 1205 | 12 | 5.45x | 4.87x | — | ok |",
        "| tpo_fast DPO step, shared prefix | 2510 ±2% | — | 543 · — | 472 / — | — | — | — | 1.40x | ok |",
        "| tpo_fast TPO step | — | — | — | — / — | — | — | — | — | OOM: out of memory: 1 pair |",
        "| tpo_fast TPO step, shared prefix | 3300 ±6% | — | — | — / — | — | — | — | — | ok |",
        "| cached | 3190 ±3% | 1170 | 0.0481 · 0.0151 | — / — | — | — | — | — | ok |",
        "",
        "Step median of each round (s), in the order run: official TPO step 19.1 / 19.2; tpo_fast DPO step 3.5 / 3.52.",
        "",
        "Not run: TRL DPOTrainer + Liger — n/a: Liger needs CUDA.",
        "",
    ]


def test_step_verdict_puts_like_against_like(report):
    amortized = "0.643 s per pair, paid once per data set: 2.57 s per step of 4 pairs over one epoch"
    assert report.verdict(_step_rows()) == [
        "- step · cpu-step-lora: tpo_fast DPO step 4.87x the tokens/s of TRL DPOTrainer; "
        "tpo_fast DPO step, shared prefix 6.81x the tokens/s of TRL DPOTrainer; "
        "tpo_fast TPO step, shared prefix 5.80x the tokens/s of official TPO step; "
        f"cached 6.00x the tokens/s of official TPO step (3.32x counting the cache's scoring in a one-epoch run, "
        f"{amortized}); "
        "tpo_fast DPO step, shared prefix 1.40x the tokens/s of tpo_fast DPO step; "
        "cached 1.03x the tokens/s of tpo_fast TPO step, shared prefix (within noise) (0.57x counting the cache's "
        f"scoring in a one-epoch run, {amortized}). Not compared: tpo_fast TPO step (see table)."
    ]
    alone = [r for r in _step_rows() if r["contender"] in ("official-tpo", "ours-tpo")]
    assert report.verdict(alone) == [
        "- step · cpu-step-lora: no like-for-like pair of rows passed the noise rule. "
        "Not compared: tpo_fast TPO step (see table)."
    ]


def _meta(rounds: int, device: str = "cpu") -> dict:
    return {"device": device, "device_name": "NVIDIA H200" if device == "cuda" else "x86_64", "dtype": "bf16",
            "versions": {"torch": "2.13.0"}, "threads": 2, "repeats": 5, "warmup": 1, "seed": 7, "rounds": rounds}


def test_whole_report_in_order(report):
    tpo = _tpo_rows()
    other_case = [dict(r, case="c0") for r in _tpo_rows()[5:7]]  # TRL head and naive, in a case listed after c1
    dpo = [dict(r, workload="dpo") for r in _tpo_rows()[2:3]]
    rows = _step_rows() + dpo + tpo + other_case
    text = report.markdown(rows, _meta(rounds=3))
    lines = text.split("\n")
    assert lines[:4] == [
        "## tpo_fast benchmark — x86_64 (cpu), bf16 (step cases: bf16)",
        "",
        "torch 2.13.0, 2 CPU threads, repeats 5 after 1 warm-up, in 3 rounds (each round times every contender in "
        "turn in a fresh child, its own warm-up first; the median is over all rounds), seed 7.",
        "",
    ]
    legend = report.legend("cpu", step=True)
    assert lines[4:4 + len(legend)] == legend
    headings = [line.split(":")[0] for line in lines if line.startswith("### ")]
    assert headings == ["### How to read the tables", "### tpo · c1", "### tpo · c0", "### dpo · c1",
                        "### step · cpu-step-lora", "### Verdict (fwd+bwd)", "### What each contender runs"]
    body = lines[4 + len(legend):]
    assert body[:len(report.table(tpo, {"dtype": "bf16"}))] == report.table(tpo, {"dtype": "bf16"})
    assert text.endswith("\n".join(report.footnotes(rows)))
    start = lines.index("### Verdict (fwd+bwd)")
    assert lines[start + 2:start + 2 + 4] == report.verdict(rows) and lines[start + 6] == ""
    assert [line[:22] for line in report.verdict(rows)] == [
        "- step · cpu-step-lora", "- dpo · c1: **tpo_fast", "- tpo · c1: **tpo_fast", "- tpo · c0: **TRL head"
    ]
    one_round = report.markdown(tpo, _meta(rounds=1, device="cuda")).split("\n")
    assert one_round[0] == "## tpo_fast benchmark — NVIDIA H200 (cuda), bf16"
    assert one_round[2] == "torch 2.13.0, 2 CPU threads, repeats 5 after 1 warm-up, seed 7."
    assert "step** tables" not in "\n".join(one_round)  # no step rows: no step legend
    assert "- **Noise rule**: a row whose fwd+bwd (step) timing has fewer than 3 repeats, a median under 1 ms (CUDA) " \
        "or an interquartile range above 25% of its median" in "\n".join(one_round)
    assert "(torch.cuda.max_memory_allocated); in brackets as % of naive's." in "\n".join(one_round)


def test_the_header_names_the_loss_dtype_and_each_step_cases_own(report):
    """A step case runs in its own dtype, whatever --dtype says (that one is the loss workloads')."""
    meta = {"dtype": "fp32"}
    loss, step = _tpo_rows()[:2], _step_rows()[:2]
    fp16 = [dict(step[0], dtype="fp16")]
    assert report.run_dtype(loss, meta) == "fp32"
    assert report.run_dtype(step, meta) == "bf16"
    assert report.run_dtype(fp16 + step, meta) == "bf16, fp16"
    assert report.run_dtype(step + loss + fp16, meta) == "fp32 (step cases: bf16, fp16)"
    unknown = [{k: v for k, v in step[0].items() if k != "dtype"}]  # a step row of an older file, without one
    assert report.run_dtype(unknown + fp16, meta) == "fp16" and report.run_dtype(unknown, meta) == "fp32"
    assert report.markdown(step, _meta(rounds=1) | meta).startswith("## tpo_fast benchmark — x86_64 (cpu), bf16\n")


def test_footnotes_say_each_contender_once_or_per_workload(report):
    rows = [
        {"label": "naive", "workload": "tpo", "note": "fp32 logits"},
        {"label": "naive", "workload": "dpo", "note": "fp32 logits"},
        {"label": "ours", "workload": "tpo", "note": "fused, TPO weights"},
        {"label": "ours", "workload": "dpo", "note": "fused"},
        {"label": "ours", "workload": "fisao", "note": "fused"},
        {"label": "floor", "workload": "tpo", "note": ""},
    ]
    lines = report.footnotes(rows)
    assert lines[:6] == [
        "### What each contender runs",
        "",
        "- naive: fp32 logits",
        "- ours · tpo: fused, TPO weights",
        "- ours · dpo: fused",
        "- ours · fisao: fused",
    ]
    assert lines[6] == "" and lines[7].startswith("Every contender gets the same random inputs (same seed)")
    assert lines[-1] == "" and len(lines) == 9


def test_formatting_edges(report):
    assert [report.number(x) for x in (0.012345, 4.567, 999.4, 1000.0, 19137.4)] == ["0.0123", "4.57", "999", "1000",
                                                                                    "19137"]
    two = _row("two", "ours", full_ms=_timing(10, 11, 12, repeats=2), fwd_ms=_timing(5, 5, 5, repeats=1), fwd_gbs=None,
               full_gbs=1234.5, pct_of_floor=4.5, pct_of_floor_within_noise=True, noise="too few repeats (2 < 3)",
               memory_note="peak RSS not measurable here")
    assert report.table([two], {"dtype": "fp32"})[4] == (
        "| two | 5 | 11 ±18% | — | — | — | ≈4.5% / — | — | ok; peak RSS not measurable here; not compared: too few "
        "repeats (2 < 3) |"
    )
    logits = dict(two, workload="logits")
    assert report.table([logits], {"dtype": "fp32"})[4].split(" | ")[6:8] == ["≈4.5%", "— / 1234"]
    failed = [_row("a", "ours", "A", status="error", reason="x"), _row("b", "ours", "B", status="crashed", reason="y")]
    assert report.verdict(failed) == ["- tpo · c1: no contender produced a checked result. Not compared: A, B "
                                      "(see table)."]
    no_rounds = {k: v for k, v in _meta(rounds=1).items() if k != "rounds"}
    lines = report.markdown(_tpo_rows(), no_rounds).split("\n")
    assert lines[2] == "torch 2.13.0, 2 CPU threads, repeats 5 after 1 warm-up, seed 7."
    two_rounds = report.markdown(_tpo_rows(), _meta(rounds=2)).split("\n")[2]
    assert two_rounds.endswith("warm-up, in 2 rounds (each round times every contender in turn in a fresh child, its "
                               "own warm-up first; the median is over all rounds), seed 7.")
    verdict = lines.index("### Verdict (fwd+bwd)")
    assert lines[verdict + 1] == "" and lines[verdict + 3] == ""


def test_step_table_of_one_row_without_counts(report):
    row = {k: v for k, v in _step("ours-dpo", "ours", "tpo_fast DPO step", 900, 1000, 1100).items()
           if k not in ("lora", "dtype")}
    row["round_medians_ms"] = [1000.0, 3500.0]
    lines = report.step_table([row])
    assert lines[0] == ("### step · cpu-step-lora: llava-h512-l4 (text hidden 512, 4 layers, V=32000, 576 image tokens)"
                        ", 4 pairs = tokens unknown · ")
    assert lines[4] == "| tpo_fast DPO step | 1000 ±20% | — | — | — / — | — | — | — | — | ok |"
    assert lines[6] == "Step median of each round (s), in the order run: tpo_fast DPO step 1 / 3.5."


def test_the_json_keeps_every_row_whole_and_the_csv_flattens_each_to_its_fields(tmp_path):
    """`write_json_csv`: the JSON holds the metadata and the rows as they are (all repeats); each CSV line is one
    row, its timings flattened to median and quartiles, the run's device and dtype on every line, the largest
    numeric error of the guard's check, an empty cell where a row has no such figure, extra fields left out."""
    import csv
    import json

    (output,) = bench_modules("_output")
    meta = {"device": "cpu", "dtype": "fp32", "device_name": "a CPU", "cases": ["c1"]}
    timed = _row("tpo_fast-torch", "ours", full_ms={"median": 25.0, "p25": 24.0, "p75": 26.5, "times": [24, 25, 26.5]},
                 fwd_ms={"median": 9.0, "p25": 8.5, "p75": 9.5, "times": [9]}, full_peak_mib=12.5,
                 check={"ok": True, "errors": {"out": {"err": 1e-7, "tol": 1e-5}, "hidden": {"err": 3e-6},
                                               "weight": {"err": None}, "corrupted_hidden": {}}},
                 speedup_vs_naive=4.0, speedup_vs_naive_within_noise=False, traceback="not a CSV field")
    failed = _row("trl", "peer", "TRL", status="error", reason="RuntimeError: boom", full_ms=None)
    step = _row("ours-tpo", "ours", workload="step", tokens=3734, tokens_per_s=3239.0, max_micro_batch=8,
                max_micro_batch_exact=True, memory_budget_mib=81920, dtype="bf16")  # its case's own dtype
    paths = output.write_json_csv([timed, failed, step], meta, tmp_path / "new" / "dir", "run")
    assert paths == [tmp_path / "new" / "dir" / "run.json", tmp_path / "new" / "dir" / "run.csv"]
    assert json.loads(paths[0].read_text()) == {"meta": meta, "rows": [timed, failed, step]}
    with paths[1].open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == output.CSV_FIELDS
        lines = list(reader)
    assert len(lines) == 3
    first = {k: v for k, v in lines[0].items() if v != ""}
    assert first == {
        "case": "c1", "workload": "tpo", "contender": "tpo_fast-torch", "label": "tpo_fast-torch", "kind": "ours",
        "status": "ok", "d": "64", "v": "512", "n": "64", "n_seq": "4", "seq_len": "16", "valid_frac": "0.75",
        "device": "cpu", "dtype": "fp32", "fwd_ms": "9.0", "fwd_ms_p25": "8.5", "fwd_ms_p75": "9.5",
        "full_ms": "25.0", "full_ms_p25": "24.0", "full_ms_p75": "26.5", "full_peak_mib": "12.5",
        "speedup_vs_naive": "4.0", "speedup_vs_naive_within_noise": "False", "max_rel_err": "3e-06",
    }
    assert {k: v for k, v in lines[1].items() if v != ""} == {
        "case": "c1", "workload": "tpo", "contender": "trl", "label": "TRL", "kind": "peer", "status": "error",
        "reason": "RuntimeError: boom", "d": "64", "v": "512", "n": "64", "n_seq": "4", "seq_len": "16",
        "valid_frac": "0.75", "device": "cpu", "dtype": "fp32"}
    assert {k: lines[2][k] for k in ("workload", "tokens", "tokens_per_s", "max_micro_batch",
                                     "max_micro_batch_exact", "memory_budget_mib", "full_ms", "max_rel_err",
                                     "dtype")} == {
        "workload": "step", "tokens": "3734", "tokens_per_s": "3239.0", "max_micro_batch": "8",
        "max_micro_batch_exact": "True", "memory_budget_mib": "81920", "full_ms": "", "max_rel_err": "",
        "dtype": "bf16"}


def test_the_files_take_any_value_as_text_and_a_check_without_numbers(tmp_path):
    """A value JSON has no type for (a path, a dtype) is written as its text, not a crash after the run; a check
    whose errors hold no number leaves max_rel_err empty."""
    import csv
    import json
    from pathlib import Path

    (output,) = bench_modules("_output")
    meta = {"device": "cpu", "dtype": "fp32", "out": Path("/x/y")}
    row = _row("ours", "ours", check={"ok": False, "errors": {"out": {"err": None}, "hidden": {}}}, where=Path("/z"))
    jpath, cpath = output.write_json_csv([row], meta, tmp_path, "r")
    data = json.loads(jpath.read_text())
    assert (data["meta"]["out"], data["rows"][0]["where"]) == ("/x/y", "/z")
    assert jpath.read_text().startswith('{\n "meta": {\n  "device": "cpu",')  # indented by one: diffs stay readable
    with cpath.open(newline="") as f:
        (line,) = csv.DictReader(f)
    assert line["max_rel_err"] == "" and line["contender"] == "ours"


def _drawn(monkeypatch) -> list:
    """The figures `_output`'s plots draw, kept open (their `plt.close` records them instead) for the test to read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    return figures


def _png_size(path) -> tuple[int, int]:
    import struct

    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _lines(ax) -> list[tuple]:
    return [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()), line.get_color(), line.get_marker())
            for line in ax.get_lines()]


def test_the_loss_plots_draw_each_contenders_checked_rows_by_n_one_panel_per_workload_and_head(
        tmp_path, monkeypatch):
    """`plot`: per metric one figure, one log-log panel per (workload, model, D, V) in sorted order, one line per
    contender that has a checked (`ok`) row with a positive figure there, its points sorted by N, labelled by its
    first point's label, in the contender's colour across panels; the PNGs 5 x 4 inches a panel at 110 dpi."""
    pytest.importorskip("matplotlib")
    (output,) = bench_modules("_output")
    figures = _drawn(monkeypatch)
    small, big = dict(SHAPE, model="m1"), dict(SHAPE, model="m1", n=256)
    rows = [
        dict(_row("ours", "ours", "ours at 256", workload="tpo", full_ms=_timing(9, 10, 11), full_peak_mib=30.0),
             **big),
        dict(_row("naive", "baseline", workload="tpo", full_ms=_timing(3, 4, 5), full_peak_mib=None), **small),
        dict(_row("ours", "ours", "ours", workload="tpo", full_ms=_timing(1, 2, 3), full_peak_mib=7.0), **small),
        dict(_row("naive", "baseline", workload="tpo", status="error", full_ms=_timing(1, 1, 1)), **big),
        dict(_row("ours", "ours", "ours", workload="dpo", full_ms=_timing(4, 5, 6), full_peak_mib=0.0), **small),
        dict(_row("trl", "peer", "TRL", workload="dpo", full_ms=_timing(0, 0, 0), full_peak_mib=0.5), **small),
        dict(_row("ours-step", "ours", workload="step", case="s1"), tokens_per_s=1.0),  # to the step plot
    ]
    meta = {"device_name": "a CPU", "dtype": "fp32"}
    stepped = []
    monkeypatch.setattr(output, "plot_step", lambda r, m, o, s: stepped.append((r, m, o, s)) or [o / f"{s}_step.png"])
    paths = output.plot(rows, meta, tmp_path, "run")
    assert stepped == [(rows[-1:], meta, tmp_path, "run")]
    assert paths == [tmp_path / "run_step.png", tmp_path / "run_time.png", tmp_path / "run_memory.png"]
    assert len(figures) == 2
    time_fig, memory_fig = figures
    for fig, path in ((time_fig, paths[1]), (memory_fig, paths[2])):
        assert fig.get_size_inches().tolist() == [10.0, 4.0] and fig.get_suptitle() == "a CPU · fp32"
        assert _png_size(path) == (1100, 440)
        assert [ax.get_title() for ax in fig.axes] == ["dpo · m1 (D=64, V=512)", "tpo · m1 (D=64, V=512)"]
        for ax in fig.axes:
            assert (ax.get_xscale(), ax.get_yscale(), ax.get_xlabel()) == ("log", "log", "N rows per clean branch")
            assert all(g.get_visible() for g in ax.xaxis.get_gridlines() + ax.yaxis.get_gridlines())
            legend = ax.get_legend()
            assert [t.get_text() for t in legend.get_texts()] == [label for label, *_ in _lines(ax)]
            assert {t.get_fontsize() for t in legend.get_texts()} == {7.0}
    # colours follow the contenders' first appearance in all the rows: ours C0, naive C1, trl C2
    dpo, tpo = time_fig.axes
    assert dpo.get_ylabel() == "fwd+bwd time (ms)"
    assert _lines(dpo) == [("ours", [64], [5], "C0", "o")]  # TRL's median of 0 is not drawn on a log axis
    assert _lines(tpo) == [("ours", [64, 256], [2, 10], "C0", "o"), ("naive", [64], [4], "C1", "o")]
    dpo, tpo = memory_fig.axes
    assert dpo.get_ylabel() == "peak memory above inputs (MiB)"
    assert _lines(dpo) == [("TRL", [64], [0.5], "C2", "o")]  # below 1 and above 0: drawn
    assert _lines(tpo) == [("ours", [64, 256], [7.0, 30.0], "C0", "o")]  # naive's peak unknown
    assert output.plot(rows[-1:], meta, tmp_path, "only") == [tmp_path / "only_step.png"]  # step rows alone
    assert len(figures) == 2 and len(stepped) == 2
    assert output.plot(rows[1:3], meta, tmp_path, "loss") == [tmp_path / "loss_time.png", tmp_path / "loss_memory.png"]
    assert len(stepped) == 2  # no step rows: no step plot


def test_the_step_plot_draws_a_bar_per_contender_that_ran_per_case_and_figure(tmp_path, monkeypatch):
    """`plot_step`: one row of three panels per step case (tokens/s, total peak, largest micro-batch), one bar per
    `ok` row in their order, hatched when the noise rule set it aside, `≥` on a micro-batch the search bounded
    from below, the budget in that panel's title; 15 x 4 inches a case, 110 dpi."""
    pytest.importorskip("matplotlib")
    (output,) = bench_modules("_output")
    figures = _drawn(monkeypatch)
    rows = [
        _step("official-tpo", "baseline", "official TPO step", tokens_per_s=200.0, total_peak_mib=6000.0,
              max_micro_batch=2, max_micro_batch_exact=True),
        _step("trl-dpo", "peer", "TRL DPOTrainer", status="OOM"),
        _step("ours-dpo-shared", "ours", "tpo_fast DPO step, shared prefix", tokens_per_s=2500.0,
              total_peak_mib=1000.0, max_micro_batch=16, max_micro_batch_exact=False, noise="too noisy"),
        dict(_step("ours-tpo", "ours", "tpo_fast TPO step", tokens_per_s=900.0, total_peak_mib=None,
                   max_micro_batch=None), case="cpu-step", memory_budget_mib=None),
    ]
    meta = {"device_name": "a CPU"}
    assert output.plot_step(rows, meta, tmp_path, "run") == [tmp_path / "run_step.png"]
    (fig,) = figures
    assert fig.get_size_inches().tolist() == [15.0, 8.0] and fig.get_suptitle() == "step · a CPU"
    assert _png_size(tmp_path / "run_step.png") == (1650, 880)
    lora, plain = fig.axes[:3], fig.axes[3:]
    assert [(ax.get_title(), ax.get_ylabel()) for ax in lora] == [
        ("cpu-step-lora · tokens / s", "tokens / s"), ("cpu-step-lora · total peak MiB", "total peak MiB"),
        ("cpu-step-lora · largest micro-batch (pairs), ≤ 3072 MiB", "largest micro-batch (pairs)")]
    assert [ax.get_title() for ax in plain] == [
        "cpu-step · tokens / s", "cpu-step · total peak MiB", "cpu-step · largest micro-batch (pairs)"]
    for ax, heights in zip(lora, ([200.0, 2500.0], [6000.0, 1000.0], [2, 16]), strict=True):
        bars = ax.patches
        assert [b.get_height() for b in bars] == heights
        assert [b.get_x() + b.get_width() / 2 for b in bars] == [0, 1]
        assert [b.get_facecolor() for b in bars] == [matplotlib_rgba("C0"), matplotlib_rgba("C1")]
        assert [b.get_hatch() for b in bars] == [None, "//"]
        ticks = ax.get_xticklabels()
        assert [t.get_text() for t in ticks] == ["official TPO", "tpo_fast DPO\nshared prefix"]
        assert {(t.get_fontsize(), t.get_rotation(), t.get_horizontalalignment()) for t in ticks} == {
            (7.0, 30.0, "right")}
        assert all(g.get_visible() for g in ax.yaxis.get_gridlines())
        assert not any(g.get_visible() for g in ax.xaxis.get_gridlines())
    assert [t.get_text() for t in lora[0].texts + lora[1].texts] == []
    (mark,) = lora[2].texts  # only the bounded search's bar
    assert (mark.get_text(), mark.xy, mark.get_ha(), mark.get_va()) == ("≥", (1.0, 16), "center", "bottom")
    assert [[b.get_height() for b in ax.patches] for ax in plain] == [[900.0], [0], [0]]  # unknown: a bar of 0
    assert [list(ax.texts) for ax in plain] == [[], [], []]


def matplotlib_rgba(color: str) -> tuple:
    from matplotlib.colors import to_rgba

    return to_rgba(color)
