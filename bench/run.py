"""tpo_fast benchmark: every contender on the same inputs, one run, one table, a plain verdict.

    python bench/run.py                          # CPU: small cases, ~2 minutes; GPU: the full grid
    python bench/run.py --cases gpu-target --workloads tpo --repeats 50
    python bench/run.py --cases d1024-v32000-n2048 --contenders naive,trl,tpo_fast-torch
    python bench/run.py --workloads logits --cases gpu-target    # the logits-input op: GB/s, memory floor
    python bench/run.py --workloads povid,fisao                  # POVID stage 2 and FiSAO's token PG loss
    python bench/run.py --workloads step --repeats 5             # whole training steps: official TPO, TRL, ours
    python bench/run.py --workloads step --repeats 6 --rounds 3  # the same, the contenders timed in turn

Each (case, contender) runs in a fresh child process (multiprocessing spawn), so peak memory is
that contender's alone. Writes the Markdown table to stdout and `<stem>.json`, `<stem>.csv`,
`<stem>_time.png`, `<stem>_memory.png` under --out. See docs/bench.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _measure  # noqa: E402
from _contenders import CCE_NAMES, DEFAULT, TPO_FAST_BACKENDS, all_contenders  # noqa: E402
from _contenders.ours import hidden_backends, logits_backends  # noqa: E402
from _derive import derive  # noqa: E402
from _env import env as child_env  # noqa: E402
from _measure_step import cross_check_steps  # noqa: E402
from _output import plot, write_json_csv  # noqa: E402
from _report import markdown, number  # noqa: E402
from _workloads import DEFAULT_WORKLOADS, PRESETS, STEP_CASES, STEP_PRESETS, WORKLOADS, family, parse_cases  # noqa: E402

DEFAULTS = {  # per device: cases, dtype, repeats, warm-up
    "cpu": ("cpu", "fp32", 5, 1),
    "cuda": ("gpu", "bf16", 20, 3),
}
STEP_DEFAULTS = {"cpu": ("cpu-step", 3, 1), "cuda": ("gpu-step", 10, 2)}  # step case preset, repeats, warm-up
PACKAGES = ("torch", "triton", "tpo-fast", "liger-kernel", "cut-cross-entropy", "trl", "transformers", "peft")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="default: cuda when available, else cpu",
    )
    p.add_argument(
        "--cases",
        default=None,
        help=f"comma list of case names, presets ({', '.join(PRESETS)}), '<model>-n<N>' "
        "(models llava7b, llava13b, qwen2vl7b) or 'd<D>-v<V>-n<N>', each with an optional '-zipf' suffix (targets "
        "drawn by a text-like Zipf law, where frequent tokens repeat, instead of uniformly); default: 'cpu' on CPU "
        "(D=256, V=4096, N=512; 'cpu-sweep' adds N=256 and 1024), 'gpu' on CUDA "
        f"(3 models x N in 2048/8192/32768). Step cases ({', '.join(STEP_CASES)}; presets "
        f"{', '.join(STEP_PRESETS)}) run the step workload only; default with --workloads step: cpu-step on "
        "CPU, gpu-step (LLaVA-1.5-7B shapes, bf16, LoRA) on CUDA",
    )
    p.add_argument(
        "--contenders",
        default=None,
        help="comma list of naive, liger, trl, cce, tpo_fast-<backend> (or 'tpo_fast' for all; 'cpp' is "
        "the compiled extension, logits workload only), "
        "floor, and 'broken' (a deliberately wrong contender that tests the guard); for the step workload "
        "official-tpo, trl-dpo, ours-dpo, ours-dpo-shared, ours-tpo, ours-tpo-shared, ours-tpo-shared-refcache, "
        "ours-tpo-shared-sdpa (CUDA); "
        "default: all but 'broken'",
    )
    p.add_argument(
        "--workloads",
        default=",".join(DEFAULT_WORKLOADS),
        help=f"comma list of {', '.join(WORKLOADS)} (default: all but step); 'logits' is the logits-input op "
        "tpo_fast.logits_logprobs on materialized (N, V) logits, 'povid' and 'fisao' the methods' losses, "
        "'step' one whole training step of a LLaVA-shaped model (official TPO structure, TRL, ours)",
    )
    p.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="default: fp32 on CPU, bf16 on CUDA"
    )
    p.add_argument(
        "--repeats", type=int, default=None,
        help="timed calls per mode (default: 5 on CPU, 20 on CUDA; step workload: 3 on CPU, 10 on CUDA)",
    )
    p.add_argument(
        "--warmup", type=int, default=None,
        help="untimed calls first (default: 1 on CPU, 3 on CUDA; step workload: 1 on CPU, 2 on CUDA)",
    )
    p.add_argument(
        "--rounds", type=int, default=None,
        help="CPU: spread the --repeats timed calls over this many rounds, each round timing every contender "
        "once more in its own child, so that a drift of the host's speed during the run reaches every "
        "contender alike (default on CPU: 3, at most --repeats; step-only runs and CUDA: 1, each contender's "
        "calls in one go)",
    )
    p.add_argument(
        "--search-s", type=float, default=None,
        help="step workload: seconds per contender for the largest-micro-batch search (default: the case's; "
        "0 skips the search)",
    )
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the inputs (step cases: pairs and model weights), the same for every contender")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads in each child (default: torch's)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="folder for JSON, CSV and PNG (default: bench/results)",
    )
    p.add_argument("--stem", default=None, help="file name stem, no folder (default: results_<device>_<dtype>; "
                   "--workloads step alone: results_<device>_step)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--timeout", type=float, default=3600, help="seconds per (case, contender) child before it is killed"
    )
    p.add_argument(
        "--deadline-s", type=float, default=None,
        help="seconds for the whole run: a child gets at most what is left, contenders not reached by then "
        "are listed as not run, and the tables, JSON and CSV are still written (default: no deadline)",
    )
    return p.parse_args(argv)


def _items(spec: str) -> list[str]:
    """The items of a comma list: blanks around each and empty ones dropped, each once, in the order first given."""
    return list(dict.fromkeys(filter(None, (s.strip() for s in spec.split(",")))))


def _contender_names(spec: str) -> list[str]:
    """CLI names in the order asked; 'tpo_fast' stands for every tpo_fast contender, 'all' for the defaults."""
    names = []
    for item in _items(spec):
        if item == "tpo_fast":
            names += [n for n in all_contenders(TPO_FAST_BACKENDS) if n.startswith("tpo_fast-")]
        elif item == "all":
            names += list(DEFAULT)
        else:
            names.append(item)
    known = all_contenders(_backends(names))
    if not names:
        raise SystemExit(f"--contenders {spec!r} names no contender; choose from {', '.join(known)} or 'tpo_fast'")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(
            f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(known)} or 'tpo_fast'"
        )
    return list(dict.fromkeys(names))


def _backends(names: list[str]) -> tuple[str, ...]:
    """tpo_fast backends to build contenders for: the defaults and any of tpo_fast's backends named as
    `tpo_fast-<backend>[-recompute|-fused|-fused-tgemm]` (a name of no backend gets no contender: it is unknown)."""
    real, named = {*hidden_backends(), *logits_backends()}, []
    for n in names:
        if n.startswith("tpo_fast-"):
            n = n.removeprefix("tpo_fast-")
            for suffix in ("-fused-tgemm", "-recompute", "-fused"):
                n = n.removesuffix(suffix)
            if n in real:
                named.append(n)
    return tuple(dict.fromkeys((*TPO_FAST_BACKENDS, *named)))


def _versions() -> dict:
    """{"python": its version, and per package of PACKAGES (named with "_" for "-"): its version, None if absent}."""
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            version = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            version = None
        out[pkg.replace("-", "_")] = version
    return out


def _cpu_name() -> str:
    """The CPU's model name and core count, and its bf16 units where it has them (on either, the `torch`
    backend runs its GEMMs with bf16 inputs on them, so they change a bf16 table): ", AMX-BF16" or ", AVX512-BF16"."""
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name is None:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    units = ", AMX-BF16" if "amx_bf16" in flags else ", AVX512-BF16" if "avx512_bf16" in flags else ""
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} cores{units}"


# glibc reads it when a process starts: a child spawned with it returns every freed tensor of 64 KiB
# or more to the OS at once, so each call's peak RSS starts from the resident inputs only.
PINNED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _child_env(phase: str) -> dict[str, str]:
    """Environment changes for a child of `phase`: the memory child pins glibc's mmap threshold (unless the
    user set one); the time child runs with the allocator the user's environment gives (glibc's default)."""
    if phase == "time":
        return {}
    return {k: os.environ.get(k, v) for k, v in PINNED_MMAP.items()}


def _poll(conn, timeout: float) -> bool:
    """`conn.poll(timeout)` for any timeout: one call takes at most about 2.1e6 s (its milliseconds overflow a C int),
    so a longer wait is polled a day at a time."""
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if conn.poll(max(0.0, min(left, 86400.0))):
            return True
        if left <= 86400.0:
            return False


def _run_child(job: dict, timeout: float, env: dict[str, str] | None = None
               ) -> tuple[list[dict] | None, dict, str]:
    """Run one (case, contender) in a spawned child with `env` added to this environment; returns
    (rows or None, info, error text)."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_measure.child_main, args=(job, send), daemon=True)
    with child_env(**(env or {})):  # the child is spawned with it; this process keeps its own
        proc.start()
    send.close()
    msg, closed = None, False
    if _poll(recv, timeout):
        try:
            msg = recv.recv()
        except EOFError:  # the child closed its end without a result: it is exiting, or has died
            closed = True
    proc.join(10 if msg is not None or closed else 0)  # a child that answered or closed the pipe is reaped
    if proc.is_alive():
        proc.kill()
        proc.join()
        if msg is None:
            return None, {}, ("child process closed its pipe without a result and did not exit" if closed
                              else f"killed after {timeout:.0f} s")
    if msg is None:
        code = proc.exitcode
        why = " (killed: out of host memory?)" if code == -9 else ""
        return None, {}, f"child process died with exit code {code}{why}"
    if msg[0] != "ok":
        return None, {}, msg[1]
    return msg[1], msg[2], ""


def _settings(args: argparse.Namespace, torch) -> dict:
    """The run's plan from the command line and the device's defaults; SystemExit on a bad option."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no CUDA device")
    d_cases, d_dtype, d_repeats, d_warmup = DEFAULTS[device]
    workloads = _items(args.workloads)
    if not workloads:
        raise SystemExit(f"--workloads names no workload; choose from {', '.join(WORKLOADS)}")
    if bad := [w for w in workloads if w not in WORKLOADS]:
        raise SystemExit(f"unknown workload(s) {', '.join(bad)}; choose from {', '.join(WORKLOADS)}")
    step_case, step_repeats, step_warmup = STEP_DEFAULTS[device]
    default_cases = [c for c, fam in ((d_cases, "loss"), (step_case, "step")) if fam in map(family, workloads)]
    try:
        cases = parse_cases(args.cases or ",".join(default_cases))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not cases:
        raise SystemExit(f"--cases {args.cases!r} names no case")
    cases = list({c.name: c for c in cases}.values())  # each once, where first named (a name is one shape)
    if not [c for c in cases if family(c) in map(family, workloads)]:
        raise SystemExit(
            f"no case runs these workloads: the step cases ({', '.join(STEP_CASES)}) run only --workloads step, "
            "the other cases only the other workloads"
        )
    steps_only = family(cases[0]) == "step" and all(family(c) == "step" for c in cases)
    if steps_only:  # the step defaults, each on its own
        d_repeats, d_warmup = step_repeats, step_warmup
    names = _contender_names(args.contenders or ",".join(DEFAULT))
    backends = _backends(names)
    contenders = all_contenders(backends)
    # CCE's CPU path (torch_compile) runs only when asked for by name, not as part of the defaults.
    for name in CCE_NAMES:
        contenders[name].allow_cpu = name in _items(args.contenders or "")
    repeats = args.repeats if args.repeats is not None else d_repeats
    if repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if args.warmup is not None and args.warmup < 1:
        raise SystemExit("--warmup must be >= 1: the first, untimed call is also the one whose result is checked")
    for flag, seconds in (("--timeout", args.timeout), ("--deadline-s", args.deadline_s)):
        if seconds is not None and not 0 < seconds < math.inf:  # nan too
            raise SystemExit(f"{flag} must be a finite number of seconds > 0, got {seconds:g}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    if not 0 <= args.seed < 2**32:  # the step workload's seed reaches NumPy's (transformers' set_seed)
        raise SystemExit(f"--seed must be an int in [0, 2**32 - 1], got {args.seed}")
    if args.search_s is not None and not 0 <= args.search_s < math.inf:  # nan too
        raise SystemExit(f"--search-s must be a finite number of seconds >= 0 (0: no search), got {args.search_s:g}")
    rounds = args.rounds
    if rounds is None:
        # On a CPU the loss workloads' calls take milliseconds, and the host's speed drifts between children: in
        # one go, two contenders running the same code (tpo_fast [torch] auto and fused) came out 1.14-1.19x
        # apart (2026-12-06, default case); in 5 rounds within 5%. A step child builds its model per round.
        rounds = 1 if device == "cuda" or steps_only else min(3, repeats)
    if rounds < 1 or rounds > repeats:
        raise SystemExit(f"--rounds must be between 1 and --repeats ({repeats}), got {rounds}")
    if args.stem is not None and (os.path.basename(args.stem) != args.stem or args.stem in ("", ".", "..")):
        raise SystemExit(f"--stem is a file name without a folder, got {args.stem!r}; --out picks the folder")
    # a run of step cases only has its own default name: it does not overwrite the loss run's files
    stem = args.stem or (f"results_{device}_step" if all(family(w) == "step" for w in workloads)
                         else f"results_{device}_{args.dtype or d_dtype}")
    if why := _out_problem(args.out, stem):
        raise SystemExit(why)
    if rounds > 1 and device == "cuda":
        raise SystemExit("--rounds is for CPU runs, where the timed calls have their own child; on CUDA one "
                         "child per contender measures memory and time (leave --rounds at 1)")
    return {
        "device": device,
        "cases": cases,
        "workloads": workloads,
        "names": names,
        "backends": backends,
        "contenders": contenders,
        "dtype": args.dtype or d_dtype,
        "repeats": repeats,
        "rounds": rounds,
        "warmup": args.warmup if args.warmup is not None else d_warmup,
        "seed": args.seed,
        "threads": args.threads,
        "timeout": args.timeout,
        "search_s": args.search_s,
        "deadline": None if args.deadline_s is None else time.time() + args.deadline_s,
        "deadline_s": args.deadline_s,
        "stem": stem,
    }


OUT_SUFFIXES = (".json", ".csv", "_time.png", "_memory.png", "_step.png")  # the files a run writes, after its stem


def _out_problem(out: Path, stem: str) -> str | None:
    """Why the run's files (`<stem>.json`, ...) cannot be written under the folder `out` (made if missing), or None;
    checked before anything runs, so that a long run does not end on it."""
    there = out
    while not there.exists() and there.parent != there:  # the nearest part of the path that exists
        there = there.parent
    if not there.is_dir():
        return f"--out is the folder for the results, but {there} is not a folder"
    if not os.access(there, os.W_OK | os.X_OK):
        return f"--out is the folder for the results, but {there} is not writable"
    for path in (out / f"{stem}{suffix}" for suffix in OUT_SUFFIXES):
        if path.is_dir():
            return f"{path} is a folder, where the run writes a file; remove it, or pass another --stem or --out"
        if path.exists() and not os.access(path, os.W_OK):
            return f"{path} cannot be overwritten (not writable); pass another --stem or --out"
    return None


def _job(case, name: str, plan: dict) -> tuple[list[dict], dict | None]:
    """(rows the parent fills: `n/a` / `unavailable`, the child job for the rest or None) of one (case, contender).

    Only the workloads of the case's family (step or loss) are listed, and only for contenders of that family.
    """
    c, device = plan["contenders"][name], plan["device"]
    rows, todo = [], []
    if c.family != family(case):
        return rows, None
    for w in plan["workloads"]:
        if family(w) != family(case):
            continue
        base = {"contender": name, "label": c.label_for(w), "kind": c.kind, "workload": w}
        if w not in c.workloads:
            rows.append({**base, "status": "n/a", "reason": c.not_applicable.get(w, "not offered")})
        elif reason := c.availability(device, w) or (c.family == "step" and c.case_availability(case, device)):
            rows.append({**base, "status": "unavailable", "reason": reason, "note": c.workloads[w]})
            print(f"[{case.name}] {name} {w}: cannot run here: {reason}", file=sys.stderr)
        else:
            todo.append(w)
    if not todo:
        return rows, None
    job = {k: plan[k] for k in ("backends", "device", "dtype", "repeats", "warmup", "seed", "threads", "search_s")}
    job.update(contender=name, workloads=todo)
    if family(case) == "step":
        job["case"] = case.job()
    else:
        job["case"] = {"name": case.name, "d": case.d, "v": case.v, "n": case.n, "model": case.model,
                       "targets": case.targets}
    return rows, job


def _phase_rows(job: dict, phase: str, plan: dict, case_name: str, meta: dict) -> dict[str, dict]:
    """{workload: row} of one child of `phase` (`_measure.py`'s phases) over `job["workloads"]`."""
    name = job["contender"]
    c = plan["contenders"][name]

    def rows(status: str, why: str) -> list[dict]:
        return [{"contender": name, "label": c.label_for(w), "kind": c.kind, "workload": w, "status": status,
                 "reason": why, "note": c.workloads[w]} for w in job["workloads"]]

    timeout, cut = plan["timeout"], False
    if plan.get("deadline") is not None:
        left = plan["deadline"] - time.time()
        if left <= 0:
            return {r["workload"]: r for r in rows("not run", _deadline_reason(plan, "before it started"))}
        timeout, cut = min(timeout, left), left < timeout
    got, info, err = _run_child({**job, "phase": phase}, timeout, _child_env(phase))
    if got is None and cut and err.startswith("killed after"):
        got = rows("not run", _deadline_reason(plan, "while it ran"))
    if got is None:
        why = err.splitlines()[0] if err else "no result"
        if phase != "all":
            why = f"{phase} child: {why}"
        got = rows("crashed", why)
        print(f"[{case_name}] {name} ({phase}): {err}", file=sys.stderr)
    if info.get("device_name") and job["device"] == "cuda":
        meta["device_name"] = info["device_name"]
    return {r["workload"]: r for r in got}


def _deadline_reason(plan: dict, when: str) -> str:
    return f"the run's deadline (--deadline-s {plan['deadline_s']:g}) came {when}"


def _past_deadline(plan: dict) -> bool:
    return plan.get("deadline") is not None and time.time() >= plan["deadline"]


def round_repeats(repeats: int, rounds: int) -> list[int]:
    """The timed calls of each round: `repeats` spread over `rounds`, the first rounds taking the remainder."""
    return [repeats // rounds + (k < repeats % rounds) for k in range(rounds)]


RATES = {"fwd": ("fwd_tflops", "fwd_gbs"), "full": ("full_tflops", "full_gbs", "tokens_per_s")}


def merge_round(row: dict, timed: dict) -> None:
    """Fold one time child's row into `row`: times appended (stats over all rounds so far), each rate
    (work / median time) rescaled to the merged median, the round's step (fwd+bwd) median recorded."""
    if timed["status"] != "ok":
        row.update(timed)
        return
    rates = {k: timed.pop(k) for ks in RATES.values() for k in ks if k in timed}
    modes = {m: timed.pop(f"{m}_ms") for m in RATES if f"{m}_ms" in timed}
    row.update(timed)
    for mode, got in modes.items():
        old = row.get(f"{mode}_ms")
        merged = _measure._stats((old["times"] if old else []) + got["times"])
        row[f"{mode}_ms"] = merged
        for k in RATES[mode]:
            if k in rates:
                row[k] = rates[k] * got["median"] / merged["median"]
    if "full" in modes:
        row.setdefault("round_medians_ms", []).append(modes["full"]["median"])


def _run_case(case, plan: dict, meta: dict) -> list[dict]:
    """Every row of one case. On CUDA each contender's one child measures everything. On CPU each contender's
    memory child runs first, then the time children in `plan["rounds"]` rounds, each round visiting every
    contender in turn, so that a drift of the host's speed during the run reaches every contender alike."""
    rows, jobs = [], []
    for name in plan["names"]:
        fixed, job = _job(case, name, plan)
        rows += fixed
        if job is not None:
            jobs.append(job)
    cpu = plan["device"] != "cuda"
    took = {job["contender"]: 0.0 for job in jobs}  # seconds in each contender's children
    measured: dict[str, dict[str, dict]] = {}
    for job in jobs:
        t = time.time()
        measured[job["contender"]] = _phase_rows(job, "memory" if cpu else "all", plan, case.name, meta)
        took[job["contender"]] += time.time() - t
    for repeats in round_repeats(plan["repeats"], plan["rounds"]) if cpu else []:
        for job in jobs:
            mine = measured[job["contender"]]
            ws = [w for w in job["workloads"] if mine[w]["status"] == "ok"]
            if not ws or _past_deadline(plan):
                continue
            t = time.time()
            got = _phase_rows({**job, "workloads": ws, "repeats": repeats}, "time", plan, case.name, meta)
            for w in ws:
                merge_round(mine[w], got[w])
            took[job["contender"]] += time.time() - t
    for job in jobs:
        name = job["contender"]
        for w in job["workloads"]:
            r = measured[name][w]
            if r["status"] == "ok" and "full_ms" not in r:  # measured, but the deadline came before any timing
                r.update(status="not run", reason=_deadline_reason(plan, "before its timed calls"))
            what = "step" if r["workload"] == "step" else "fwd+bwd"
            tag = r["status"] if r["status"] != "ok" else f"{what} {number(r['full_ms']['median'])} ms"
            print(f"[{case.name}] {name} {w}: {tag}", file=sys.stderr)
            rows.append(r)
        print(f"[{case.name}] {name}: {took[name]:.1f} s", file=sys.stderr)
    valid = {r["workload"]: r["valid_frac"] for r in rows if r.get("valid_frac") is not None}
    for r in rows:
        r.update(case.as_dict(), case=case.name, valid_frac=valid.get(r["workload"]))
    cross_check_steps(rows)
    for r in rows:
        if r.get("workload") == "step" and r["status"] == "failed check" and "full_ms" in r:
            print(f"[{case.name}] {r['contender']} step: failed check after timing: {r['reason']}", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    plan = _settings(args, torch)
    device, dtype = plan["device"], plan["dtype"]
    meta = {
        "device": device,
        "device_name": _cpu_name() if device == "cpu" else "cuda",
        "dtype": dtype,
        "repeats": plan["repeats"],
        "rounds": plan["rounds"],
        "warmup": plan["warmup"],
        "seed": args.seed,
        "threads": args.threads or torch.get_num_threads(),
        "versions": _versions(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "platform": platform.platform(),
    }
    t_start = time.time()
    rows = [r for case in plan["cases"] for r in _run_case(case, plan, meta)]
    meta["wall_s"] = round(time.time() - t_start, 1)
    derive(rows, device)
    print(markdown(rows, meta))
    stem = plan["stem"]
    paths = write_json_csv(rows, meta, args.out, stem)
    if not args.no_plots:
        try:
            paths += plot(rows, meta, args.out, stem)
        except ImportError:
            print("plots skipped: pip install matplotlib", file=sys.stderr)
    print(f"wrote {', '.join(str(p) for p in paths)} in {meta['wall_s']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
