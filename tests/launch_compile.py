"""Compile every Triton launch the launchers make, for an H100/H200 (sm_90), on a machine without a GPU.

`aot_compile.py` compiles each kernel from a signature written by hand. This script checks the launchers
themselves: it drives `tpo_fast.ops.triton_impl`, `triton_fused` and `logits` with tensors on the "meta"
device (shapes and dtypes, no storage) and replaces `JITFunction.run` with a version that compiles the
launch's exact specialization (argument types, the constants, which integer arguments are 1 or divisible by
16, the tile sizes and warps the launcher picked) instead of running it. A launcher that passes an argument
the kernel does not take, a dtype its `tl.dot` refuses, a block below 16, or tiles over the shared memory of
an sm_90 block fails here, before a GPU ever sees it.

Shapes: the benchmark's (N=8192, D=4096, V=32000), a row count that picks the small tiles, odd sizes that
disable the bulk tensor copies (TMA), and a one-row case; bf16, fp16, fp32; the split, atomic and
gradient-filter backwards; the fused losses' Triton gradient GEMMs, 16-bit gradient scaling and row scatter; TF32; bias
and corrupted rows; TMA on where the rows allow it, and off.

Run with TRITON_INTERPRET=0: python tests/launch_compile.py. Prints "compiled K launches, F failed" and
exits 1 on a failure. It uses Triton's JIT internals (the argument binder and `_pack_args`); where a Triton
release changes them it exits 3 with a message (the test then skips; aot_compile.py still runs).
"""

from __future__ import annotations

import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one sm_90 block may use
SHAPES = [(8192, 4096, 32000), (17, 4096, 32000), (48, 24, 33), (1, 64, 1000)]

if not hasattr(jit, "create_function_from_signature") or not hasattr(jit.JITFunction, "_pack_args"):
    print("this Triton's JIT internals differ from what launch_compile.py drives (3.6 to 3.9)")
    sys.exit(3)

BACKEND = make_backend(TARGET)
compiled: dict[tuple, str | None] = {}  # launch key -> None (compiled) or the error
launches: list[tuple[str, tuple]] = []


def _compile_only(self, *args, grid, warmup, **kwargs):
    """`JITFunction.run` without a device: bind the arguments as a launch would, compile, do not run."""
    binder = jit.create_function_from_signature(self.signature, self.params, BACKEND)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(BACKEND, kwargs, bound, specialization, options)
    key = (self.fn.__name__, repr(signature), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
           options.num_warps, options.num_stages)
    if key not in compiled:
        try:
            kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=TARGET,
                                    options=options.__dict__)
            smem = kernel.metadata.shared
            compiled[key] = None if smem <= SMEM_LIMIT else f"{smem} B of shared memory (limit {SMEM_LIMIT})"
        except Exception as e:  # noqa: BLE001 - every failure is reported with its launch
            compiled[key] = "".join(traceback.format_exception_only(type(e), e))[-1500:]
    launches.append((self.fn.__name__, key))


jit.JITFunction.run = _compile_only

from tpo_fast.ops import logits as logits_mod  # noqa: E402
from tpo_fast.ops import triton_fused, triton_impl  # noqa: E402
from tpo_fast.ops.options import KernelOptions  # noqa: E402

_real_descriptors = triton_impl._tma_descriptors


def _descriptors(tma: bool):
    """`_tma_descriptors` as on an sm_90 GPU (meta tensors are not CUDA tensors), or with TMA off."""
    def pick(hidden, weight, cfg, options=None):
        if not tma:
            return hidden, weight, False
        from triton.tools.tensor_descriptor import TensorDescriptor

        d = hidden.shape[1]
        if not all(t.stride(1) == 1 and t.stride(0) == d and (d * t.element_size()) % 16 == 0
                   for t in (hidden, weight)):
            return hidden, weight, False
        return (TensorDescriptor.from_tensor(hidden, [cfg.block_n, cfg.block_d]),
                TensorDescriptor.from_tensor(weight, [cfg.block_v, cfg.block_d]), True)
    return pick


def drive(n: int, d: int, v: int, dtype: torch.dtype, bias: bool, corrupted: bool, opts: KernelOptions) -> None:
    meta = dict(device="meta")
    h, w = torch.empty(n, d, dtype=dtype, **meta), torch.empty(v, d, dtype=dtype, **meta)
    b = torch.empty(v, dtype=dtype, **meta) if bias else None
    hc = torch.empty(n, d, dtype=dtype, **meta) if corrupted else None
    y = torch.empty(n, dtype=torch.int64, **meta)

    def f32():
        return torch.empty(n, dtype=torch.float32, **meta)

    for want_argmax in (True, False):
        triton_impl.forward(h, w, b, hc, y, want_argmax=want_argmax, options=opts)
    for coef_y in (None, f32()):
        triton_impl.backward(h, w, b, hc, y, f32(), f32(), coef_y, f32() if corrupted else None,
                             (True, True, bias, corrupted), options=opts)
    triton_impl.gather_logits(h, w, b, y)
    triton_impl.gather_backward(h, w, y, f32(), (True, True, bias))
    triton_fused.softmax_grad_inplace(triton_fused.exp_tiles_and_lse(h, w, b, y, y), f32(), y, f32(), y, f32())
    # the target entries kept in fp32 (a 16-bit dW that also takes the corrupted rows)
    triton_fused.softmax_grad_inplace(triton_fused.exp_tiles_and_lse(h, w, b, y), f32(), y, f32(), None, None, True)
    dz = triton_fused.softmax_grad_inplace(triton_fused.exp_tiles_and_lse(h, w, b, y), f32(), y, f32(), None, None)
    if opts.grad_gemm == "triton":  # the two gradient GEMMs on the in-place dZ
        triton_fused.triton_mm(dz, w, torch.empty(n, d, dtype=torch.float32, **meta))
        for accumulate in (False, True):
            triton_fused.triton_mm(dz.t(), h, torch.empty(v, d, dtype=dtype, **meta), accumulate=accumulate)
    if dtype != torch.float32:  # the backward's scaling of the stored 16-bit dW, the corrupted rows' dW scatter
        triton_fused.scale_(torch.empty(v, d, dtype=dtype, **meta), torch.empty((), **meta))
        triton_fused.scatter_dw(torch.empty(v, d, dtype=dtype, **meta), y, f32(), h, w)
        triton_fused.scatter_dw(torch.empty(v, d, dtype=dtype, **meta), y, f32(), h, w, (f32(), h))
    x = torch.empty(n, v, dtype=dtype, **meta)
    lse2, _ = logits_mod._TritonImpl.forward(x, y, -100)
    logits_mod._TritonImpl.backward(x, y, lse2, f32(), f32(), -100, True)


def main() -> int:
    host_errors = []
    for tma in (True, False):
        triton_impl._tma_descriptors = triton_fused._tma_descriptors = _descriptors(tma)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            options = [KernelOptions(grad_gemm="triton"), KernelOptions(backward="atomic"),
                       KernelOptions(grad_filter_eps=1e-6)]
            if dtype == torch.float32:
                options.append(KernelOptions(allow_tf32=True))
            for n, d, v in SHAPES:
                for opts in options:
                    for bias, corrupted in ((False, False), (True, True)):
                        try:
                            drive(n, d, v, dtype, bias, corrupted, opts)
                        except Exception as e:  # noqa: BLE001 - a launcher that fails on the host
                            host_errors.append(f"{n}x{d}x{v} {dtype} {opts} bias={bias}: {type(e).__name__}: {e}")
    triton_impl._tma_descriptors = triton_fused._tma_descriptors = _real_descriptors
    failed = {k: e for k, e in compiled.items() if e is not None}
    kernels = sorted({name for name, _ in launches})
    print(f"compiled {len(compiled)} launches of {len(kernels)} kernels ({', '.join(kernels)}), "
          f"{len(failed)} failed, {len(host_errors)} host errors")
    for key, err in failed.items():
        print("FAILED", key[0], key[1][:300], key[2][:300], f"warps={key[4]} stages={key[5]}\n", err)
    for err in host_errors[:20]:
        print("HOST ERROR", err)
    return 1 if failed or host_errors else 0


if __name__ == "__main__":
    sys.exit(main())
