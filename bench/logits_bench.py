"""Standalone benchmark of `tpo_fast.logits_logprobs` (logits input) against the naive path.

Contenders, on one (N, V) logits tensor and N targets (a quarter of them ignored):
  naive               fp32 `log_softmax(logits.float())` + `gather` (as the official TPO code), autograd
  tpo_fast[<backend>] every backend that runs here: cuda / cpp (compiled extension), triton, torch
Modes: `fwd` (log-probs and target logits) and `fwd+bwd` (then the logits gradient from a random upstream
gradient). Bandwidth counts the logits bytes that must move: N*V read in fwd, plus N*V read and N*V
written in bwd. A contender whose output differs from the fp32 reference gets no timing (marked FAIL).

    python bench/logits_bench.py                       # CPU: N=256, V=32000, bf16; GPU: N=8192
    python bench/logits_bench.py --n 8192 --v 32000 --dtype bf16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tpo_fast import _ext  # noqa: E402
from tpo_fast.ops.logits import logits_logprobs  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IGNORE = -100
# HBM peak by device name (bytes/s), for the "% of peak" column; --peak-gbs overrides.
TOL = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 1e-2}
HBM_PEAK = {"H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100-SXM4-80GB": 2.04e12, "A100": 1.56e12}


def naive(logits, targets):
    valid = targets != IGNORE
    safe = torch.where(valid, targets, 0)
    lp = torch.log_softmax(logits.float(), dim=-1).gather(1, safe[:, None]).squeeze(1)
    z = logits.float().gather(1, safe[:, None]).squeeze(1)
    zero = torch.zeros((), device=logits.device)
    return torch.where(valid, lp, zero), torch.where(valid, z, zero)


def contenders(device: str) -> dict[str, object]:
    out = {"naive": naive}
    backends = ["cuda", "triton", "torch"] if device == "cuda" else ["cpp", "torch"]
    for b in backends:
        if b == "cuda" and not _ext.HAS_CUDA_EXT:
            continue
        if b == "cpp" and not _ext.HAS_CPU_EXT:
            continue
        if b == "triton":
            try:
                import triton  # noqa: F401
            except ImportError:
                continue

        def run(logits, targets, b=b):
            r = logits_logprobs(logits, targets, backend=b)
            return r.logprobs, r.target_logits

        out[f"tpo_fast[{b}]"] = run
    return out


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[0], q[2]


def peak_mem_mb(fn, device):
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=None, help="rows (default 8192 on GPU, 256 on CPU)")
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--peak-gbs", type=float, default=None, help="memory bandwidth peak in GB/s for the % column")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--jit", action="store_true", help="build tpo_fast._C via the JIT path if it is not installed")
    a = p.parse_args(argv)
    if a.jit and not _ext.HAS_CPU_EXT:
        _ext.load_jit()
    device = a.device
    n = a.n or (8192 if device == "cuda" else 256)
    repeats = a.repeats or (50 if device == "cuda" else 10)
    dtype = DTYPES[a.dtype]
    torch.manual_seed(0)
    logits = (torch.randn(n, a.v, device=device) * 3).to(dtype)
    targets = torch.randint(0, a.v, (n,), device=device)
    targets[torch.rand(n, device=device) < 0.25] = IGNORE
    g = torch.randn(n, device=device)
    es = logits.element_size()
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    peak = a.peak_gbs * 1e9 if a.peak_gbs else None
    if peak is None and device == "cuda":
        peak = next((v for k, v in HBM_PEAK.items() if k in name), None)

    ref_lp, ref_z = naive(logits, targets)
    x_ref = logits.detach().clone().requires_grad_()
    (naive(x_ref, targets)[0] * g).sum().backward()
    ref_grad = x_ref.grad.float()

    rows = []
    for cname, fn in contenders(device).items():
        x = logits.detach().clone().requires_grad_()
        with torch.no_grad():
            lp, z = fn(logits, targets)
        (fn(x, targets)[0] * g).sum().backward()
        # fwd outputs are fp32 from the same inputs; the gradient is rounded once to the logits dtype
        err = max(
            (lp - ref_lp).abs().max().item(),
            (z - ref_z).abs().max().item(),
            (x.grad.float() - ref_grad).abs().max().item(),
        )
        ok = err <= TOL[a.dtype]

        def fwd(fn=fn):
            with torch.no_grad():
                fn(logits, targets)

        def full(fn=fn):
            xx = logits.detach().requires_grad_()
            (fn(xx, targets)[0] * g).sum().backward()

        for mode, step, nbytes in (("fwd", fwd, n * a.v * es), ("fwd+bwd", full, 3 * n * a.v * es)):
            row = dict(op="logits_logprobs", contender=cname, mode=mode, shape=f"N={n} V={a.v}", dtype=a.dtype,
                       device=name, torch=torch.__version__, threads=torch.get_num_threads(), max_err=err, ok=ok)
            if ok:
                med, q1, q3 = timeit(step, device, repeats)
                row.update(median_ms=med * 1e3, q1_ms=q1 * 1e3, q3_ms=q3 * 1e3, gbs=nbytes / med / 1e9,
                           peak_pct=100 * nbytes / med / peak if peak else None,
                           peak_mem_mb=peak_mem_mb(step, device))
            rows.append(row)

    base = {r["mode"]: r.get("median_ms") for r in rows if r["contender"] == "naive"}
    print(f"# logits_logprobs  N={n} V={a.v} {a.dtype}  on {name} ({device}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'contender':<20} {'mode':<8} {'median ms':>10} {'q1-q3 ms':>17} {'GB/s':>8} {'% peak':>7} "
          f"{'x naive':>8} {'peak MB':>8}  check")
    for r in rows:
        if not r["ok"]:
            print(f"{r['contender']:<20} {r['mode']:<8} {'-':>10} {'-':>17} {'-':>8} {'-':>7} {'-':>8} {'-':>8}  "
                  f"FAIL (max err {r['max_err']:.2e})")
            continue
        speedup = base[r["mode"]] / r["median_ms"] if base.get(r["mode"]) else float("nan")
        pct = f"{r['peak_pct']:.0f}" if r["peak_pct"] is not None else "-"
        mem = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
        print(f"{r['contender']:<20} {r['mode']:<8} {r['median_ms']:>10.2f} "
              f"{r['q1_ms']:>8.2f}-{r['q3_ms']:<8.2f} {r['gbs']:>8.1f} {pct:>7} {speedup:>8.2f} {mem:>8}  ok")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
