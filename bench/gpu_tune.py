"""Tuning sweep of the fused token primitive on a GPU (issue 7): ceilings, accuracy, tiles, backwards.

    python bench/gpu_tune.py --out DIR                 # N=8192, D=4096, V=32000, bf16 (about 2 minutes)
    python bench/gpu_tune.py --tma 0,1 --no-atomic     # tiles x TMA loads on/off, exact backward only
    python bench/gpu_tune.py --n 64 --d 32 --v 300     # a smoke run (on CPU under TRITON_INTERPRET=1)

What it measures, in one process, on the same inputs:
1. the two ceilings: a bf16 8192^3 cuBLAS product (TFLOP/s) and a device copy (GB/s);
2. the floors of the primitive: cuBLAS `H @ W.T` (2NDV), the three GEMMs of forward + backward
   without recompute (6NDV), and the four with it (8NDV);
3. accuracy of `token_logprobs` forward + backward against fp32 math on the same bf16 values, for
   the exact backward (split and atomic) and gradient filtering, on random (flat softmax) and on
   peaked inputs (target probability about 0.8, as a trained model gives), next to plain bf16 PyTorch;
4. forward and forward + backward median time and peak memory for each tile configuration
   (TPO_FAST_TILES) and backward (TPO_FAST_BACKWARD, TPO_FAST_GRAD_FILTER_EPS).
Prints Markdown tables and writes `tune.json` under --out. The primitive counts 8NDV FLOP.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _env import env  # noqa: E402 - bench/ is this script's folder

import tpo_fast  # noqa: E402

DENSE_BF16_PEAK = 989e12  # H100/H200 SXM datasheet, dense bf16
SWEEP = [
    "128,256,64,8,4,8",
    "128,256,64,8,3,8",
    "128,128,64,8,4,8",
    "256,128,64,8,3,8",
]


def timed(fn, device: str, grad_to_none=None) -> float:
    """Median milliseconds."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=50, rep=400, grad_to_none=grad_to_none, return_mode="median"))
    times = []
    for _ in range(3):
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def peak_mib(fn, device: str) -> float:
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def reference(h, w, y, g, rows: int = 2048):
    """fp32 logp and gradients of sum(g * logp) on the same (rounded) values, chunked."""
    h32, w32 = h.float(), w.float()
    logp = torch.empty(h.shape[0], device=h.device)
    gh = torch.empty_like(h32)
    gw = torch.zeros_like(w32)
    for s in range(0, h.shape[0], rows):
        e = min(s + rows, h.shape[0])
        z = h32[s:e] @ w32.t()
        lse = torch.logsumexp(z, 1)
        logp[s:e] = z.gather(1, y[s:e, None]).squeeze(1) - lse
        dz = torch.softmax(z, 1).mul_(-g[s:e, None])
        dz[torch.arange(e - s, device=h.device), y[s:e]] += g[s:e]
        gh[s:e] = dz @ w32
        gw += dz.t() @ h32[s:e]
        del z, dz
    return logp, gh, gw


def naive(h, w, y, g):
    """Plain PyTorch in the input dtype (logits materialized), for its error."""
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    logp = torch.log_softmax((h @ w.t()).float(), -1).gather(1, y[:, None]).squeeze(1)
    logp.backward(g)
    return logp.detach(), h.grad, w.grad


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def ours(h, w, y, g):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    logp = tpo_fast.token_logprobs(h, w, y, backend="triton")
    logp.backward(g)
    return logp.detach(), h.grad, w.grad


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--v", type=int, default=32000)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--configs", default=";".join(SWEEP), help="';'-separated TPO_FAST_TILES values")
    p.add_argument("--tma", default="auto", help="comma list of TPO_FAST_TMA values to cross with --configs")
    p.add_argument("--no-atomic", action="store_true", help="skip the atomic and gradient-filtering variants")
    p.add_argument("--filter-eps", type=float, default=2.0**-12)
    p.add_argument("--out", default="bench/results")
    return p.parse_args()


def _inputs(n, d, v, device, dtype):
    """(h, w, y, g, h_peak): random hidden states, weight, targets, upstream gradient, and peaked hidden states."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(n, d, generator=gen).to(device, dtype)
    w = (torch.randn(v, d, generator=gen) / math.sqrt(d)).to(device, dtype)
    y = torch.randint(0, v, (n,), generator=gen).to(device)
    g = torch.randn(n, generator=gen).to(device)
    # peaked: each row points at its target's weight row (target probability ~0.8 at V=32000)
    # (|W[y]| ~ 1, so the target logit is ~log(4V) and the others ~N(0, 0.1))
    h_peak = (w[y].float() * math.log(4 * v) + 0.3 * torch.randn(n, d, generator=gen).to(device)).to(dtype)
    return h, w, y, g, h_peak


def _ceilings(out: dict, device: str) -> None:
    """1. A bf16 8192^3 cuBLAS product and a 1 GiB device copy (CUDA only)."""
    if device != "cuda":
        return
    m = 8192
    x1 = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    x2 = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    t = timed(lambda: x1 @ x2, device)
    out["ceiling_tflops"] = 2 * m**3 / t / 1e9
    buf = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(buf)
    t = timed(lambda: dst.copy_(buf), device)
    out["ceiling_copy_gbs"] = 2 * buf.numel() / t / 1e6
    print(f"ceilings: {out['ceiling_tflops']:.0f} TFLOP/s bf16 GEMM, {out['ceiling_copy_gbs']:.0f} GB/s copy",
          flush=True)


def _floors(out: dict, h, w, device: str) -> None:
    """2. The cuBLAS GEMMs of the primitive, in the input dtype."""
    grad_logits = torch.randn(h.shape[0], w.shape[0], device=device, dtype=h.dtype)
    t_fwd = timed(lambda: h @ w.t(), device)
    t_dh = timed(lambda gl=grad_logits: gl @ w, device)
    t_dw = timed(lambda gl=grad_logits: gl.t() @ h, device)
    del grad_logits
    out["floor_ms"] = {"fwd_2ndv": t_fwd, "dh": t_dh, "dw": t_dw, "6ndv": t_fwd + t_dh + t_dw,
                       "8ndv": 2 * t_fwd + t_dh + t_dw}
    print(f"floors (cuBLAS): H@W.T {t_fwd:.2f} ms, dZ@W {t_dh:.2f}, dZ.T@H {t_dw:.2f}; "
          f"6NDV {t_fwd + t_dh + t_dw:.2f} ms, 8NDV {2 * t_fwd + t_dh + t_dw:.2f} ms", flush=True)


def _accuracy(out: dict, a, h, h_peak, w, y, g):
    """3. Relative errors vs fp32 math on random and peaked inputs; returns the fp32 reference on random."""
    acc = {}
    ref_random = None
    for name, hh in (("random", h), ("peaked", h_peak)):
        ref = reference(hh, w, y, g)
        if name == "random":
            ref_random = ref
        nv = naive(hh, w, y, g)
        row = {"naive": [rel(a_, b_) for a_, b_ in zip(nv, ref, strict=True)]}
        del nv
        with env(TPO_FAST_BACKWARD="split", TPO_FAST_GRAD_FILTER_EPS=None):
            row["split"] = [rel(a_, b_) for a_, b_ in zip(ours(hh, w, y, g), ref, strict=True)]
        with env(TPO_FAST_BACKWARD="atomic", TPO_FAST_GRAD_FILTER_EPS=None):
            row["atomic"] = [rel(a_, b_) for a_, b_ in zip(ours(hh, w, y, g), ref, strict=True)]
        with env(TPO_FAST_GRAD_FILTER_EPS=str(a.filter_eps)):
            row["filter"] = [rel(a_, b_) for a_, b_ in zip(ours(hh, w, y, g), ref, strict=True)]
        with torch.no_grad():
            row["p_target_mean"] = float(ref[0].exp().mean())
        acc[name] = row
    out["accuracy"] = acc
    print("\n## relative error vs fp32 math (logp, grad hidden, grad weight)\n")
    print("| inputs | mean p(target) | plain bf16 PyTorch | split | atomic | filter eps |")
    print("|---|---|---|---|---|---|")
    for name, row in acc.items():
        cells = [" / ".join(f"{x:.1e}" for x in row[k]) for k in ("naive", "split", "atomic", "filter")]
        print(f"| {name} | {row['p_target_mean']:.3f} | " + " | ".join(cells) + " |", flush=True)
    return ref_random


def _variants(a, hg, hpg) -> list:
    """(label, environment, hidden states) of every timed variant."""
    eps = str(a.filter_eps)
    variants = [(f"split tma={t} tiles {c}", dict(TPO_FAST_TILES=c, TPO_FAST_BACKWARD="split", TPO_FAST_TMA=t), hg)
                for c in a.configs.split(";") if c for t in a.tma.split(",")]
    variants += [] if a.no_atomic else [
        ("atomic (default tiles)", dict(TPO_FAST_TILES=None, TPO_FAST_BACKWARD="atomic"), hg),
        (f"filter eps={a.filter_eps:.1e}, random", dict(TPO_FAST_TILES=None, TPO_FAST_GRAD_FILTER_EPS=eps), hg),
        (f"filter eps={a.filter_eps:.1e}, peaked", dict(TPO_FAST_TILES=None, TPO_FAST_GRAD_FILTER_EPS=eps), hpg),
        ("split (default tiles), peaked", dict(TPO_FAST_TILES=None), hpg),
    ]
    return variants


def _timings(out: dict, a, h, w, y, g, h_peak, ref_random, device: str) -> list:
    """4. Forward and forward + backward per variant, each checked first where it sees the random inputs."""
    flop8 = 8.0 * a.n * a.d * a.v
    hg = h.detach().clone().requires_grad_()
    wg = w.detach().clone().requires_grad_()
    hpg = h_peak.detach().clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            tpo_fast.token_logprobs(hg, wg, y, backend="triton")

    def fwd_bwd(hidden=hg):
        tpo_fast.token_logprobs(hidden, wg, y, backend="triton").backward(g)

    rows = []
    for label, kv, hidden in _variants(a, hg, hpg):
        try:
            with env(**kv):
                fwd()  # compile
                errors = None
                if hidden is hg:  # every variant computes the same function: check it before timing
                    errors = [rel(a_, b_) for a_, b_ in zip(ours(h, w, y, g), ref_random, strict=True)]
                fwd_bwd(hidden)
                tf = timed(fwd, device)
                tb = timed(lambda hidden=hidden: fwd_bwd(hidden), device, grad_to_none=[hidden, wg])
                hidden.grad = wg.grad = None
                mem = peak_mib(lambda hidden=hidden: fwd_bwd(hidden), device)
                hidden.grad = wg.grad = None
            r = {"variant": label, "rel_err_logp_gh_gw": errors, "fwd_ms": tf, "fwd_bwd_ms": tb, "peak_mib": mem,
                 "tflops_8ndv": flop8 / tb / 1e9, "pct_peak": 100 * flop8 / (tb / 1e3) / DENSE_BF16_PEAK,
                 "vs_6ndv_floor": tb / out["floor_ms"]["6ndv"], "fwd_tflops": flop8 / 4 / tf / 1e9}
        except Exception as e:  # a config that does not compile or fit is reported, not fatal
            r = {"variant": label, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def _report_timings(out: dict, rows: list, a) -> None:
    print(f"\n## token_logprobs, N={a.n} D={a.d} V={a.v} {a.dtype}, {out['device']} (median ms; 8NDV FLOP)\n")
    print("| variant | fwd ms | fwd TFLOP/s | fwd+bwd ms | TFLOP/s | % of 989 | x 6NDV floor | peak MiB | rel. err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['error']} ||||||||")
            continue
        err = " / ".join(f"{x:.1e}" for x in r["rel_err_logp_gh_gw"]) if r["rel_err_logp_gh_gw"] else "-"
        print(f"| {r['variant']} | {r['fwd_ms']:.2f} | {r['fwd_tflops']:.0f} | {r['fwd_bwd_ms']:.2f} | "
              f"{r['tflops_8ndv']:.0f} | {r['pct_peak']:.0f}% | {r['vs_6ndv_floor']:.2f} | {r['peak_mib']:.0f} | "
              f"{err} |")
    best = min((r for r in rows if "error" not in r and r["variant"].startswith("split tma=")),
               key=lambda r: r["fwd_bwd_ms"], default=None)
    if best:
        out["best_split_tiles"] = best["variant"].split()[-1]
        out["best_split_tma"] = best["variant"].split()[1].split("=")[1]
        print(f"\nbest split: TPO_FAST_TMA={out['best_split_tma']} TPO_FAST_TILES={out['best_split_tiles']}")


def main() -> int:
    a = _args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    out: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "n": a.n, "d": a.d,
                 "v": a.v, "dtype": a.dtype, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"# gpu_tune: {out['device']}, N={a.n} D={a.d} V={a.v} {a.dtype}, torch {out['torch']}", flush=True)
    h, w, y, g, h_peak = _inputs(a.n, a.d, a.v, device, dtype)
    _ceilings(out, device)
    _floors(out, h, w, device)
    ref_random = _accuracy(out, a, h, h_peak, w, y, g)
    out["timings"] = _timings(out, a, h, w, y, g, h_peak, ref_random, device)
    _report_timings(out, out["timings"], a)
    from tpo_fast.ops import gemm

    out["mm_out_dtype"] = gemm._MM_OUT_DTYPE
    out["addmm_out_dtype"] = gemm._ADDMM_OUT_DTYPE  # None: no timed path summed into an fp32 accumulator
    print(f"cuBLAS 16-bit x 16-bit -> fp32 products (torch.mm out_dtype): {out['mm_out_dtype']}; "
          f"into an fp32 sum (torch.addmm out_dtype): {out['addmm_out_dtype']}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "tune.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
