"""Compile every Triton kernel of tpo_fast for NVIDIA targets, ahead of time, without a GPU.

Run in a process with TRITON_INTERPRET=0 (under the interpreter `@triton.jit` gives no compilable
function). It catches what the CPU interpreter cannot: type errors of the real compiler, tl.dot
operand rules, shared-memory overflows of the default tiles. Usage: python tests/aot_compile.py 90 80
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tpo_fast.kernels.indexed_dot import indexed_dot_bwd_kernel, indexed_dot_fwd_kernel
from tpo_fast.kernels.logits_logprobs import logits_backward_kernel, logits_forward_kernel
from tpo_fast.kernels.token_stats_bwd import token_stats_bwd_kernel
from tpo_fast.kernels.token_stats_fwd import token_stats_fwd_kernel
from tpo_fast.ops.triton_impl import TileConfig

DTYPES = {"fp32": "ieee", "bf16": "tf32", "fp16": "tf32"}
# H100 / A100 shared memory per block
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def cases(dt: str, prec: str, cfg: TileConfig):
    p = f"*{dt}"
    blocks = {"BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_D": cfg.block_d}
    for flag in (False, True):
        yield token_stats_fwd_kernel, {
            "H": p, "W": p, "B": p, "HC": p, "Y": "*i64", "LSE": "*fp32", "Z": "*fp32", "ZC": "*fp32",
            "ARGMAX": "*i64", "N": "i32", "V": "i32", "D": "i32",
        }, {"HAS_BIAS": flag, "HAS_CORRUPTED": flag, "WANT_ARGMAX": flag, "DOT_PRECISION": prec,
            "INTERPRET": False, **blocks}, cfg.num_warps, cfg.num_stages
        yield token_stats_bwd_kernel, {
            "H": p, "W": p, "B": p, "LSE": "*fp32", "COEF": "*fp32", "GH": "*fp32", "GW": "*fp32", "GB": "*fp32",
            "N": "i32", "V": "i32", "D": "i32", "FILTER_EPS": "fp32",
        }, {"HAS_BIAS": flag, "NEED_H": True, "NEED_W": True, "NEED_B": flag, "FILTER": flag, "DOT_PRECISION": prec,
            "INTERPRET": False, **blocks}, cfg.num_warps, cfg.num_stages
        yield indexed_dot_fwd_kernel, {"H": p, "W": p, "B": p, "Y": "*i64", "Z": "*fp32", "N": "i32", "D": "i32"}, {
            "HAS_BIAS": flag, "BLOCK_N": 64, "BLOCK_D": 64}, 4, 3
        yield indexed_dot_bwd_kernel, {
            "H": p, "HC": p, "W": p, "Y": "*i64", "G": "*fp32", "GC": "*fp32", "GH": "*fp32", "GHC": "*fp32",
            "GW": "*fp32", "GB": "*fp32", "N": "i32", "D": "i32",
        }, {"HAS_SECOND": flag, "ACCUM_H": flag, "NEED_H": True, "NEED_HC": flag, "NEED_W": True, "NEED_B": flag,
            "BLOCK_N": 64, "BLOCK_D": 64}, 4, 3
    yield logits_forward_kernel, {
        "X": p, "stride_x": "i64", "T": "*i64", "LSE": "*fp32", "Z": "*fp32", "V": "i32", "ignore_index": "i64",
    }, {"BLOCK_V": 4096}, 8, 3
    yield logits_backward_kernel, {
        "X": p, "stride_x": "i64", "G": p, "stride_g": "i64", "T": "*i64", "LSE": "*fp32", "CP": "*fp32",
        "CY": "*fp32", "V": "i32", "ignore_index": "i64",
    }, {"BLOCK_V": 4096}, 8, 3


def main(archs: list[int]) -> int:
    cfg = TileConfig(64, 128, 64)  # the GPU defaults of tpo_fast.ops.triton_impl.tile_config
    n = 0
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for dt, prec in DTYPES.items():
            for fn, sig, consts, warps, stages in cases(dt, prec, cfg):
                src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
                k = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
                if k.metadata.shared > SMEM_LIMIT[arch]:
                    raise SystemExit(f"{fn.__name__} sm_{arch} {dt}: {k.metadata.shared} B of shared memory")
                n += 1
    print(f"compiled {n} kernels for sm_{archs}")
    return 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [90]))
