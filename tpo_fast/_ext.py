"""The optional compiled extension `tpo_fast._C` (csrc/), found without compiling anything at import.

`setup.py` builds it on install where a C++ compiler exists (with CUDA kernels when torch has CUDA
and nvcc is present). `load_jit()` builds the same sources with `torch.utils.cpp_extension.load`
into a cache directory, for editable installs and test machines where the install built nothing.

    from tpo_fast import _ext
    _ext.HAS_CPU_EXT, _ext.HAS_CUDA_EXT   # flags, updated by load_jit()
    _ext.load_jit()                       # builds once (minutes), then loads from the cache
    lse, z = _ext.logits_forward(logits, targets, ignore_index)   # the kernels; errors as RuntimeError

The module's entry points return their error message instead of raising (`try_logits_forward` gives
(error, lse, z)): no C++ exception crosses into pybind11, which crashed a CUDA build of the extension on a
GPU machine (csrc/bindings.cpp). `logits_forward`, `logits_backward` and `set_cpu_isa` here raise it.

This module sits below `tpo_fast.ops` and reads no settings itself: the build folder comes as an
argument (`backend="auto"` with TPO_FAST_JIT=1 passes `KernelOptions.ext_cache`, TPO_FAST_EXT_CACHE).
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger("tpo_fast")

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CXX_FLAGS = ["-O3", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]

_module: ModuleType | None
try:
    # import_module, not `from tpo_fast import _C`: tpo_fast is still half-imported here, and the latter
    # words a missing extension as "partially initialized module ... (most likely due to a circular import)"
    _module = importlib.import_module("tpo_fast._C")
except ImportError as e:
    _module = None
    IMPORT_ERROR: str | None = str(e)
else:
    IMPORT_ERROR = None


def _flags(mod: ModuleType | None) -> tuple[bool, bool]:
    return mod is not None, bool(mod is not None and mod.has_cuda())


HAS_CPU_EXT, HAS_CUDA_EXT = _flags(_module)


def get() -> ModuleType | None:
    """The loaded extension module (installed or JIT-built), or None."""
    return _module


def _entry(name: str):
    if _module is None:
        raise RuntimeError(f"tpo_fast._C is not available ({IMPORT_ERROR}); build it with load_jit() or use "
                           "backend='triton' or 'torch'")
    fn = getattr(_module, name, None)
    if fn is None:
        raise RuntimeError(f"tpo_fast._C at {_module.__file__} predates its sources (it has no {name}); rebuild it: "
                           "pip install --no-build-isolation -e . (or delete it and call load_jit())")
    return fn


def _raise(error: str) -> None:
    if error:
        raise RuntimeError(error)


def logits_forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, target_logit), fp32 (N,), of (N, V) `logits` and int64 (N,) `targets`; 0 at ignored rows."""
    error, lse, z = _entry("try_logits_forward")(logits, targets, ignore_index)
    _raise(error)
    return lse, z


def logits_backward(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, coef_p: torch.Tensor, coef_y: torch.Tensor,
    ignore_index: int, inplace: bool,
) -> torch.Tensor:
    """coef_p * softmax(logits) + coef_y * onehot(targets) per row (0 on ignored rows), in the logits' dtype;
    written into `logits` itself with `inplace=True`."""
    error, grad = _entry("try_logits_backward")(logits, targets, lse, coef_p, coef_y, ignore_index, inplace)
    _raise(error)
    return grad


def set_cpu_isa(isa: str) -> None:
    """Forces the CPU kernels' code path: 'base' (portable), 'avx2', or 'auto' (detected)."""
    _raise(_entry("try_set_cpu_isa")(isa))


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """Where `load_jit` builds: `root` (default ~/.cache/tpo_fast/ext) / torch-<version>."""
    root = root or Path.home() / ".cache" / "tpo_fast" / "ext"
    tag = torch.__version__.replace("+", "_")
    return Path(root) / f"torch-{tag}"


def compiler_available() -> bool:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx.split()[0]) is not None


def load_jit(
    with_cuda: bool | None = None, verbose: bool = False, cache_root: str | os.PathLike | None = None
) -> ModuleType:
    """Build (first call: minutes; MAX_JOBS bounds the parallel jobs) and load the extension.

    with_cuda: compile the CUDA kernels too; default when torch has CUDA and nvcc (CUDA_HOME) is found.
    cache_root: the build folder's root (see `cache_dir`); `tpo_fast.ops.options.current_options().ext_cache`
    is what TPO_FAST_EXT_CACHE sets.
    Returns the module and updates `HAS_CPU_EXT` / `HAS_CUDA_EXT`. Raises RuntimeError without a compiler.
    """
    global _module, HAS_CPU_EXT, HAS_CUDA_EXT
    if _module is not None and (with_cuda is None or bool(_module.has_cuda()) == with_cuda):
        return _module
    if not compiler_available():
        raise RuntimeError("no C++ compiler found (set CXX or install g++); tpo_fast._C cannot be built")
    from torch.utils.cpp_extension import CUDA_HOME, load

    if with_cuda is None:
        with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    sources = [CSRC / "bindings.cpp", CSRC / "logits_logprobs_cpu.cpp"]
    name = "tpo_fast_C_cpu"
    extra = {}
    if with_cuda:
        sources.append(CSRC / "logits_logprobs_cuda.cu")
        name = "tpo_fast_C_cuda"
        extra = {"extra_cuda_cflags": NVCC_FLAGS + ["-DTPO_FAST_WITH_CUDA"]}
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise RuntimeError(f"tpo_fast C++ sources not found ({', '.join(missing)}); load_jit needs a source checkout")
    build_dir = cache_dir(cache_root) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    logger.info("tpo_fast: building %s in %s (JIT, first call only)", name, build_dir)
    _module = load(
        name=name,
        sources=[str(s) for s in sources],
        extra_cflags=CXX_FLAGS + (["-DTPO_FAST_WITH_CUDA"] if with_cuda else []),
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        verbose=verbose,
        **extra,
    )
    HAS_CPU_EXT, HAS_CUDA_EXT = _flags(_module)
    return _module
