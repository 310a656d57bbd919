"""Where a pair loss's time goes: wall time against GPU kernel time, kernel launches and host syncs, per
`grad_mode`, chunk budget and gradient GEMM. The question it answers: is a path bound by its kernels or
by the host that launches them (the fused-gradient losses' first H200 run: 11.3 ms of kernels in 21 ms)?

    python bench/profile_loss.py                                      # CUDA: the gpu-target case, bf16
    python bench/profile_loss.py --case d64-v512-n64 --backend torch --dtype fp32 --chunk-mb 0.05,256

Each row: the losses as `python bench/run.py` calls them (same inputs, `_contenders.ours.TpoFast`), timed
fwd+bwd (`--repeats`, median, synchronized; and the host's share, until the backward returns), then one
more call under torch.profiler: the device's kernel time (the sum of its device events, kernels, copies and
fills, each once), the kernel launches and the host synchronizations it recorded, and how many device events
took under 20 us and how long they took in all (the most that fusing a call's small operators could save).
On the CPU the device columns are empty and `aten ops` counts the operators dispatched: the host work a GPU
run would launch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _contenders.ours import TpoFast  # noqa: E402
from _workloads import make_inputs, parse_cases  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
SYNCS = ("cudaStreamSynchronize", "cudaEventSynchronize")  # what a read-back (.item(), nonzero) waits in
PROFILER_OWN = "Activity Buffer Request"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _call(contender: TpoFast, workload: str, inp: dict) -> None:
    for k in ("hidden", "corrupted_hidden", "weight"):
        if k in inp:
            inp[k].grad = None
    contender.run(workload, inp).backward()


def device_events(events) -> list:
    """The device's own events (kernels, copies, fills), each once. CPU-side rows that merely show kernels again
    ("Activity Buffer Request", an op's "self CUDA") and user ranges are not device events."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.name != PROFILER_OWN
            and not getattr(e, "is_user_annotation", False)]


def kernel_totals(on_device: list) -> list[tuple[float, int, str]]:
    """(total ms, calls, name) per device event name, largest total first."""
    by_name: dict[str, list[float]] = {}
    for e in on_device:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us() / 1e3)
    return sorted(((sum(t), len(t), name) for name, t in by_name.items()), reverse=True)


SMALL_US = 20.0  # a device event shorter than this is a "small kernel": launch-bound, whatever it does


def small_kernels(on_device: list, below_us: float = SMALL_US) -> tuple[int, float]:
    """(count, total ms) of the device events shorter than `below_us`: what fusing the many small operators of a
    call (its per-token loss math, its index bookkeeping) could save at most."""
    short = [e.time_range.elapsed_us() for e in on_device if e.time_range.elapsed_us() < below_us]
    return len(short), sum(short) / 1e3


def measure(contender: TpoFast, workload: str, inp: dict, device: str, repeats: int) -> dict:
    """{'wall_ms', 'host_ms', 'kernel_ms', 'launches', 'syncs', 'aten_ops', 'kernels'} of one contender on one
    workload; 'kernels': (total ms, calls, name) per device event name, largest first (CUDA only).

    host_ms: from the call to the return of its backward, before the final synchronize: on a GPU, close to
    wall_ms means the host (launches, read-backs) bounds the call; well below it, the kernels do."""
    _call(contender, workload, inp)  # warm-up: compilation, cuBLAS's workspace, the allocator's pools
    times, host = [], []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        _call(contender, workload, inp)
        host.append(1e3 * (time.perf_counter() - t0))  # until the last launch returns (or a read-back waited)
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        _call(contender, workload, inp)
        _sync(device)
    events = prof.events()
    on_device = device_events(events)
    out = {
        "wall_ms": statistics.median(times),
        "host_ms": statistics.median(host),
        "aten_ops": sum(1 for e in events if e.name.startswith("aten::")),
        "kernel_ms": None,
        "launches": None,
        "syncs": None,
        "small": None,
        "kernels": [],
    }
    if device == "cuda":
        out["kernel_ms"] = sum(e.time_range.elapsed_us() for e in on_device) / 1e3
        out["kernels"] = kernel_totals(on_device)
        out["small"] = small_kernels(on_device)
        out["launches"] = sum(1 for e in events if e.name in LAUNCHES)
        out["syncs"] = sum(1 for e in events if e.name in SYNCS)  # not the measurement's cudaDeviceSynchronize
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--case", default="gpu-target", help="one loss case of bench/run.py (default: gpu-target)")
    p.add_argument("--workloads", default="tpo,dpo", help="pair losses to profile (default: tpo,dpo)")
    p.add_argument("--backend", default="triton", help="tpo_fast backend (default: triton)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="input dtype (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--modes", default="fused,recompute", help="grad_mode values (default: fused,recompute)")
    p.add_argument("--chunk-mb", default="256,1024",
                   help="TPO_FAST_CHUNK_MB values for the fused rows (default: 256,1024)")
    p.add_argument("--grad-gemm", default="torch",
                   help="KernelOptions.grad_gemm values for the fused rows, comma list of torch, triton "
                        "(default: torch)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per row (default: 10)")
    p.add_argument("--top-kernels", type=int, default=8,
                   help="after the table, each row's largest kernels by device time (CUDA; default: 8, 0: none)")
    args = p.parse_args(argv)
    from tpo_fast.ops.fused_pairs import chunk_cap_bytes, uses_fused_gradient
    from tpo_fast.ops.options import kernel_options

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    cases = parse_cases(args.case)
    if len(cases) != 1:
        p.error(f"--case names {len(cases)} cases; give one")
    case = cases[0]
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"## {args.backend} backend on {name}, case {case.name}, {str(dtype).replace('torch.', '')}\n")
    gemms = list(dict.fromkeys(filter(None, args.grad_gemm.split(","))))
    if args.backend != "triton" and gemms != ["torch"]:
        p.error("--grad-gemm picks the triton backend's gradient GEMMs; other backends have one choice: torch")
    tops = []  # (row label, kernels) for the tables after the main one
    print("| workload | grad_mode | chunk MiB | gradient GEMMs | wall ms | host ms | kernel ms | launches | syncs "
          f"| aten ops | kernels under {SMALL_US:g} us: n, ms |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for workload in filter(None, args.workloads.split(",")):
        inp = make_inputs(case, workload, device, dtype)
        for mode in filter(None, args.modes.split(",")):
            # the path that runs: "fused" falls back to recompute where it is not exact (fp16 on triton)
            fused = uses_fused_gradient(mode, args.backend, torch.device(device), dtype)
            if mode == "fused" and not fused:
                print(f"| {workload} | fused: runs recompute here ({args.backend}, {dtype}) | | | | | | | | | |")
                continue
            chunks = ["-"]
            if fused:  # the torch backend caps its buffer on a CPU: list the budgets that differ
                cap_bytes = chunk_cap_bytes(args.backend, device == "cuda")
                cap = float("inf") if cap_bytes is None else cap_bytes / 2**20  # MiB as given: no byte rounding
                chunks = list(dict.fromkeys(f"{min(float(c), cap):g}" for c in args.chunk_mb.split(",")))
            for chunk_mb in chunks:
                for gemm in (gemms if fused else ["-"]):
                    contender = TpoFast(args.backend, mode, grad_gemm=None if gemm == "-" else gemm)
                    contender.setup(device)
                    opts = {} if chunk_mb == "-" else {"chunk_mb": float(chunk_mb)}
                    with kernel_options(**opts):
                        r = measure(contender, workload, inp, device, args.repeats)

                    def cell(v, fmt="{:.2f}"):
                        return "" if v is None else fmt.format(v)

                    print(f"| {workload} | {mode} | {chunk_mb} | {gemm} | {r['wall_ms']:.2f} | {r['host_ms']:.2f} "
                          f"| {cell(r['kernel_ms'])} "
                          f"| {cell(r['launches'], '{}')} | {cell(r['syncs'], '{}')} | {r['aten_ops']} "
                          f"| {'' if r['small'] is None else '{}, {:.2f}'.format(*r['small'])} |", flush=True)
                    if r["kernels"] and args.top_kernels > 0:
                        tops.append((f"{workload} {mode} {chunk_mb} MiB {gemm}", r["kernels"][:args.top_kernels]))
    for label, kernels in tops:
        print(f"\n### largest kernels: {label}\n\n| kernel | calls | ms |\n|---|---:|---:|")
        for ms, calls, name in kernels:
            print(f"| {name[:90]} | {calls} | {ms:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
