"""Compile every Triton kernel of tpo_fast for NVIDIA targets, ahead of time, without a GPU.

Run in a process with TRITON_INTERPRET=0 (under the interpreter `@triton.jit` gives no compilable
function). It catches what the CPU interpreter cannot: type errors of the real compiler, tl.dot
operand rules, shared-memory overflows of the default tiles. Usage: python tests/aot_compile.py 90 80;
`--regs` also prints each kernel's registers and spills as ptxas reports them (a spill, or registers that
cost occupancy, shows without a GPU): TRITON_INTERPRET=0 python tests/aot_compile.py 90 --regs
"""

from __future__ import annotations

import os
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tpo_fast.kernels.indexed_dot import indexed_dot_bwd_kernel, indexed_dot_fwd_kernel
from tpo_fast.kernels.logits_logprobs import logits_backward_kernel, logits_forward_kernel
from tpo_fast.kernels.matmul import matmul_kernel
from tpo_fast.kernels.scale import scale_kernel
from tpo_fast.kernels.scatter_rows import scatter_rows_kernel
from tpo_fast.kernels.softmax_grad import softmax_grad_kernel
from tpo_fast.kernels.softmax_grad_inplace import softmax_grad_inplace_kernel
from tpo_fast.kernels.token_stats_bwd import token_stats_bwd_kernel
from tpo_fast.kernels.token_stats_fwd import lse_combine_kernel, token_lse_partial_kernel
from tpo_fast.ops.triton_fused import softmax_grad_launch
from tpo_fast.ops.triton_impl import _GPU_ATOMIC_TILES, _GPU_TILES, TileConfig

DTYPES = {"fp32": "ieee", "bf16": "tf32", "fp16": "tf32"}
TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# H100 / A100 shared memory per block
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def cases(dt: str, prec: str, cfg: TileConfig, atomic: TileConfig):
    p = f"*{dt}"
    gemm = {"BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_D": cfg.block_d, "GROUP_N": cfg.group_n}
    blocks = {"BLOCK_N": atomic.block_n, "BLOCK_V": atomic.block_v, "BLOCK_D": atomic.block_d}
    dz_rows, dz_warps = softmax_grad_launch(cfg.block_v)
    tma = {"H_DESC": f"tensordesc<{dt}[{cfg.block_n}, {cfg.block_d}]>",
           "W_DESC": f"tensordesc<{dt}[{cfg.block_v}, {cfg.block_d}]>"}

    def sweep(descs):  # token_lse_partial_kernel's signature; descs: TMA descriptors, or plain pointers
        return {"H": p, "W": p, "B": p, **descs, "M_PART": "*fp32", "S_PART": "*fp32", "ARG_PART": "*i32",
                "N": "i32", "V": "i32", "D": "i32", "S": "i32", "P_OUT": p, "Y": "*i64", "ZY": "*fp32", "Y2": "*i64",
                "ZY2": "*fp32"}

    def grad_tile(descs):  # softmax_grad_kernel's
        return {"H": p, "W": p, "B": p, "LSE": "*fp32", "COEF": "*fp32", "Y": "*i64", "COEF_Y": "*fp32", **descs,
                "DZ": p, "GB_PART": "*fp32", "N": "i32", "V": "i32", "D": "i32", "V0": "i32", "VC": "i32",
                "stride_dz": "i32"}

    # the GEMM-shaped kernels as the default paths launch them on Hopper (TMA loads, no bias): the forward sweep
    # of the per-token primitive (target gathered, nothing stored) and of the fused losses (exponentials stored
    # too), and the recompute path's gradient tile (the one-hot term)
    for store in (False, True):
        yield token_lse_partial_kernel, sweep(tma), {
            "HAS_BIAS": False, "WANT_ARGMAX": False, "DOT_PRECISION": prec, "INTERPRET": False, "USE_TMA": True,
            **gemm, "STORE_EXP": store, "GATHER": 1}, cfg.num_warps, cfg.num_stages
    for split in (False, True):  # split: a 16-bit dW that also takes the corrupted rows (target entries apart)
        yield softmax_grad_kernel, grad_tile(tma), {
            "HAS_BIAS": False, "HAS_ONEHOT": True, "NEED_B": False, "SPLIT_TARGET": split, "DOT_PRECISION": prec,
            "INTERPRET": False, "USE_TMA": True, **gemm}, cfg.num_warps, cfg.num_stages
    for flag in (False, True):
        # USE_TMA follows the flag: plain loads, and bulk tensor copies through descriptors (sm_90+)
        descs = tma if flag else {"H_DESC": p, "W_DESC": p}
        yield token_lse_partial_kernel, sweep(descs), {
            "HAS_BIAS": flag, "WANT_ARGMAX": flag, "DOT_PRECISION": prec, "INTERPRET": False, "USE_TMA": flag,
            **gemm, "STORE_EXP": flag, "GATHER": 2 if flag else 0}, cfg.num_warps, cfg.num_stages
        # the fused-gradient losses' dZ, written over the forward's per-tile exponentials in the input dtype
        # (SPLIT_TARGET: a 16-bit dW that also takes the corrupted rows gets the target entries apart, in fp32)
        yield softmax_grad_inplace_kernel, {
            "P": p, "M_PART": "*fp32", "LSE": "*fp32", "COEF_P": "*fp32", "Y": "*i64", "COEF_Y": "*fp32",
            "Y2": "*i64", "COEF_Y2": "*fp32", "R": "i32", "V": "i32", "S": "i32",
        }, {"HAS_Y2": flag, "SPLIT_TARGET": flag, "BLOCK_N": dz_rows, "TILE_V": cfg.block_v, "INTERPRET": False}, \
            dz_warps, 3
        # the fused-gradient losses' Triton gradient GEMMs (grad_gemm="triton"): fp32 dH, dW in the input dtype
        yield matmul_kernel, {
            "A": p, "B": p, "C": "*fp32" if flag else p, "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32",
            "stride_ak": "i32", "stride_bk": "i32", "stride_bn": "i32", "stride_cm": "i32", "stride_cn": "i32",
        }, {"ACCUMULATE": not flag, "DOT_PRECISION": prec, "INTERPRET": False, "BLOCK_M": cfg.block_n,
            "BLOCK_N": cfg.block_v, "BLOCK_K": cfg.block_d, "GROUP_M": cfg.group_n}, cfg.num_warps, cfg.num_stages
        yield softmax_grad_kernel, grad_tile(descs), {
            "HAS_BIAS": flag, "HAS_ONEHOT": not flag, "NEED_B": flag, "SPLIT_TARGET": flag, "DOT_PRECISION": prec,
            "INTERPRET": False, "USE_TMA": flag, **gemm}, cfg.num_warps, cfg.num_stages
        yield token_stats_bwd_kernel, {
            "H": p, "W": p, "B": p, "LSE": "*fp32", "COEF": "*fp32", "Y": "*i64", "GH": "*fp32", "GW": "*fp32",
            "GB": "*fp32", "TGT": "*fp32", "N": "i32", "V": "i32", "D": "i32", "FILTER_EPS": "fp32",
        }, {"HAS_BIAS": flag, "NEED_H": True, "NEED_W": True, "NEED_B": flag, "FILTER": flag, "DOT_PRECISION": prec,
            "INTERPRET": False, **blocks}, atomic.num_warps, atomic.num_stages
        yield indexed_dot_fwd_kernel, {"H": p, "W": p, "B": p, "Y": "*i64", "Z": "*fp32", "N": "i32", "D": "i32"}, {
            "HAS_BIAS": flag, "BLOCK_N": 64, "BLOCK_D": 64}, 4, 3
        yield indexed_dot_bwd_kernel, {
            "H": p, "HC": p, "W": p, "Y": "*i64", "G": "*fp32", "GC": "*fp32", "GH": "*fp32", "GHC": "*fp32",
            "GW": "*fp32", "GB": "*fp32", "N": "i32", "D": "i32",
        }, {"HAS_SECOND": flag, "ACCUM_H": flag, "NEED_H": True, "NEED_HC": flag, "NEED_W": True, "NEED_B": flag,
            "BLOCK_N": 64, "BLOCK_D": 64}, 4, 3
    if dt != "fp32":  # the backward's scaling of a stored 16-bit weight gradient
        yield scale_kernel, {"G": p, "S": "*fp32", "N": "i32"}, {"INTERPRET": False, "BLOCK": 4096}, 8, 3
        for two in (False, True):  # the corrupted rows alone, or with the clean rows' target terms
            yield scatter_rows_kernel, {
                "GW": p, "IDS": "*i64", "ORDER": "*i64", "FIRST": "*i64", "STOP": "*i64", "G": "*fp32", "X": p,
                "X2": p, "N1": "i32", "D": "i32", "stride_gw": "i32", "stride_x": "i32", "stride_x2": "i32",
            }, {"HAS_X2": two, "INTERPRET": False, "BLOCK_R": 4, "BLOCK_D": 1024}, 4, 3
    if dt == "fp32":  # the logsumexp from the forward's fp32 tile partials, whatever the inputs' dtype
        yield lse_combine_kernel, {"M_PART": "*fp32", "S_PART": "*fp32", "LSE": "*fp32", "N": "i32", "S": "i32"}, {
            "BLOCK_N": 16, "BLOCK_S": 128}, 4, 3
    yield logits_forward_kernel, {
        "X": p, "stride_x": "i64", "T": "*i64", "LSE": "*fp32", "Z": "*fp32", "V": "i32", "ignore_index": "i64",
    }, {"BLOCK_V": 4096}, 8, 3
    yield logits_backward_kernel, {
        "X": p, "stride_x": "i64", "G": p, "stride_g": "i64", "T": "*i64", "LSE": "*fp32", "CP": "*fp32",
        "CY": "*fp32", "V": "i32", "ignore_index": "i64",
    }, {"BLOCK_V": 4096, "INTERPRET": False}, 8, 3


def aligned(sig: dict[str, str]) -> dict:
    """What a launch specializes on for aligned tensors and D % 16 == 0 (16-byte divisibility): it enables
    vector loads and the cp.async software pipeline, so shared memory is checked as it will be used."""
    names = list(sig)
    return {(names.index(k),): [["tt.divisibility", 16]] for k, t in sig.items() if t.startswith("*") or k in (
        "D", "stride_dz", "stride_x", "stride_x2", "stride_g")}


def resource_usage(kernel, arch: int) -> str:
    """ptxas's report for one compiled kernel (registers, spill bytes), from the PTX Triton generated, with the
    ptxas Triton itself uses for `arch`."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([get_ptxas(arch).path, "-v", "--gpu-name", gpu, f.name, "-o", os.devnull],
                             capture_output=True, text=True)
    text = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None:
        return "ptxas: " + " ".join(text.split())[:200]
    return f"{regs.group(1)} registers" + (f", spills {spills.group(1)}/{spills.group(2)} B" if spills else "")


def main(archs: list[int], regs: bool = False) -> int:
    """Compile every case for each arch; with `regs`, print each one's registers and spills (ptxas -v)."""
    n = 0
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for dt, prec in DTYPES.items():
            # the GPU defaults of tpo_fast.ops.triton_impl.tile_config
            for fn, sig, consts, warps, stages in cases(dt, prec, _GPU_TILES[TORCH_DTYPE[dt]], _GPU_ATOMIC_TILES):
                src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts,
                                attrs=aligned(sig))
                k = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
                if k.metadata.shared > SMEM_LIMIT[arch]:
                    raise SystemExit(f"{fn.__name__} sm_{arch} {dt}: {k.metadata.shared} B of shared memory")
                if regs:
                    flags = ",".join(f"{c}={v}" for c, v in consts.items()
                                     if v is True or c == "GATHER" and v)
                    print(f"sm_{arch} {dt} {fn.__name__} [{flags}] warps={warps}: {resource_usage(k, arch)}, "
                          f"{k.metadata.shared} B shared")
                n += 1
    print(f"compiled {n} kernels for sm_{archs}")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main([int(a) for a in args if a != "--regs"] or [90], regs="--regs" in args))
