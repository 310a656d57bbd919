"""Kernel behaviour in one frozen dataclass, `KernelOptions`, and the one place that reads its variables.

Three ways to set it, the later winning:

    TPO_FAST_BACKWARD=atomic python train.py          # the environment, read by `KernelOptions.from_env()`
    with kernel_options(backward="atomic"): ...       # a scope (process-wide, see `kernel_options`)
    triton_impl.forward(..., options=KernelOptions(tma="0"))  # explicit, where a launcher takes it

Launchers call `current_options()`: the innermost active scope, else the environment as it is now
(so a variable changed between two launches, as bench/gpu_tune.py does, takes effect). A bad value
raises the first time anything reads the options, naming the variable or field and what it accepts.
A call's backward runs with the options its forward read (the per-token primitive keeps them with its
autograd node; the fused-gradient losses finish their gradient inside the forward): a scope around the
forward alone is enough, as when a trainer calls backward outside the code that computed the loss.

Fields (variable, default): meaning.

- `tiles` (TPO_FAST_TILES, None): GPU tiles of the GEMM-shaped kernels,
  "block_n,block_v,block_d,num_warps,num_stages[,group_n]"; None: the tuned defaults of triton_impl.py
  (under the interpreter: large tiles; set ones hold there too, so a test can split a small V into tiles).
- `tma` (TPO_FAST_TMA, "auto"): bulk tensor copy loads; "auto" (Hopper and newer, 16-byte aligned rows),
  "0" never, "1" also under the interpreter.
- `chunk_mb` (TPO_FAST_CHUNK_MB, None): MiB budget of the split backward's N x chunk gradient buffer and
  of the fused-gradient losses' per-chunk logits buffer (rows x V x 4 B, whole pairs; the triton backend's
  buffer of a 16-bit model holds those rows in half the bytes), from 2**-20 (one byte) to 1e300. None (unset)
  gives each buffer its own default: `SPLIT_CHUNK_MB` (256) for the split backward, `FUSED_CHUNK_MB`
  (1024) for the fused losses on the triton backend; the torch backend's fused losses cap it at 128 MiB off CUDA.
- `allow_tf32` (TPO_FAST_ALLOW_TF32, False): TF32 products for fp32 inputs (about 1e-3 relative error);
  the variable is "1" (on), "0" or "" (off); any other value is an error, never a guess.
- `backward` (TPO_FAST_BACKWARD, "split"): "split" (softmax-gradient chunks + two GEMMs, no atomics)
  or "atomic" (the fused kernel).
- `grad_gemm` (TPO_FAST_GRAD_GEMM, "torch"): the two gradient GEMMs of the fused-gradient losses on the
  triton backend, `dH = dZ W` and `dW += dZ^T H`: "torch" (torch.mm: cuBLAS on a GPU) or "triton"
  (`kernels/matmul.py`, the vocabulary kernels' tiles), to measure one against the other.
- `grad_filter_eps` (TPO_FAST_GRAD_FILTER_EPS, 0.0): > 0 skips vocabulary tiles whose softmax gradient
  is below eps (atomic kernel; the gradient is then inexact, the loss is not).
- `jit` (TPO_FAST_JIT, False): "1" lets `backend="auto"` build the C++ extension once when the
  install has none ("0" or "" off; any other value is an error).
- `ext_cache` (TPO_FAST_EXT_CACHE, None): where that build goes (None: ~/.cache/tpo_fast/ext).
- `varlen` (TPO_FAST_VARLEN, True): the trainer's padding-free packed row attended by one flash-attention
  varlen call per layer on CUDA (16-bit; `tpo_fast.trainer.row_attention`); "0" keeps two SDPA calls per sequence.
  The variable is "1" or "" (on) or "0" (off); any other value is an error.

Install-time switches (TPO_FAST_BUILD_EXT, TPO_FAST_BUILD_CUDA, TPO_FAST_CPU_ISA) belong to setup.py.
`TRITON_INTERPRET` is Triton's own variable; `interpreter_enabled()` is the one place that reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator, Sequence

# The chunk buffers' budgets when `chunk_mb` is unset. The fused losses' is the larger: on an H200 (bf16,
# N=8192, D=4096, V=32000, 2026-12-04) their chunks are bound by the host's per-chunk work, so fewer chunks
# are faster (TPO fwd+bwd 18.5 ms in 256 MiB chunks, 13.0 ms in 1024 MiB: README "On an H200, second run").
SPLIT_CHUNK_MB = 256.0
FUSED_CHUNK_MB = 1024.0

ENV_VARS = {
    "tiles": "TPO_FAST_TILES",
    "tma": "TPO_FAST_TMA",
    "chunk_mb": "TPO_FAST_CHUNK_MB",
    "allow_tf32": "TPO_FAST_ALLOW_TF32",
    "backward": "TPO_FAST_BACKWARD",
    "grad_gemm": "TPO_FAST_GRAD_GEMM",
    "grad_filter_eps": "TPO_FAST_GRAD_FILTER_EPS",
    "jit": "TPO_FAST_JIT",
    "ext_cache": "TPO_FAST_EXT_CACHE",
    "varlen": "TPO_FAST_VARLEN",
}


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET set, and not to "0")."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_installed() -> bool:
    """Whether `import triton` works (once imported, a look-up in sys.modules)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


TRITON_MISSING = "backend='triton' needs the triton package, which is not installed; run: pip install triton (Linux)"


# Each check takes the raw value (a string from the environment, or what the caller passed) and the
# name to blame (the variable or the field), and returns the field's value.


def _tiles(raw: str | Sequence[int] | None, name: str) -> tuple[int, ...] | None:
    if raw is None or raw == "":
        return None
    try:
        vals = tuple(int(x) for x in (raw.split(",") if isinstance(raw, str) else raw))
        ints = isinstance(raw, str) or all(isinstance(x, int) for x in raw)
    except (TypeError, ValueError):
        vals, ints = (), False
    powers_of_two = not any(x & (x - 1) for x in vals[:4])
    if ints and len(vals) in (5, 6) and min(vals) > 0 and min(vals[:3]) >= 16 and powers_of_two:
        return vals
    raise ValueError(
        f"{name} must be 'block_n,block_v,block_d,num_warps,num_stages[,group_n]': positive integers,"
        f" blocks (>= 16) and warps powers of two, got {raw!r}"
    )


def _choice(raw: str | bool | None, name: str, choices: tuple[str, ...]) -> str:
    """One of `choices` (the first is the default, also for "" and None); True/False mean "1"/"0" where allowed."""
    value = raw
    if isinstance(raw, bool) and "1" in choices:
        value = "1" if raw else "0"
    elif raw is None or raw == "":
        value = choices[0]
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be {', '.join(map(repr, choices[:-1]))} or {choices[-1]!r}, got {raw!r}")
    return value


def _number(raw: str | float, name: str, default: float, positive: bool, what: str) -> float:
    try:
        value = float(raw) if raw != "" else default
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or not (value > 0 if positive else value >= 0) or isinstance(raw, bool):
        raise ValueError(f"{name} must be {what}, got {raw!r}")
    return value


# The chunk budgets `chunk_mb` may set, in MiB: from one byte (a smaller budget is 0 bytes as an int, which the fused
# losses refuse as "chunk_bytes ... got 0", an argument the caller never passed) to a byte count that stays finite
# (`KernelOptions.chunk_bytes` of 1e308 MiB overflowed: "cannot convert float infinity to integer").
CHUNK_MB_RANGE = (2.0**-20, 1e300)


def _chunk_mb(raw: str | float | None, name: str) -> float | None:
    """None (unset or "": each buffer's own default), else a positive, finite number of MiB in `CHUNK_MB_RANGE`."""
    if raw is None or raw == "":
        return None
    value = _number(raw, name, 0.0, True, "a positive, finite number of MiB")
    low, high = CHUNK_MB_RANGE
    if not low <= value <= high:
        raise ValueError(f"{name} must be a positive, finite number of MiB, got {raw!r}: a budget from one byte"
                         f" (2**-20 MiB) to {high:g} MiB")
    return value


def _flag(raw: str | bool, name: str) -> bool:
    """A bool field; from the environment "1" is True, "0" or "" False, and anything else an error (a stray
    "false" or "yes" must neither switch TF32 on nor start a compiler)."""
    if isinstance(raw, bool):
        return raw
    if raw in ("", "0", "1"):
        return raw == "1"
    if isinstance(raw, str):
        raise ValueError(f"{name} must be '1' (on), '0' or '' (off), got {raw!r}")
    raise ValueError(f"{name} must be a bool, got {raw!r}")


def _path(raw: str | os.PathLike | None, name: str) -> str | None:
    """None, or a folder given as a str or a path object (`pathlib.Path`), as its str: a number or bytes would
    only fail later, inside the extension's build."""
    path = os.fspath(raw) if isinstance(raw, str | os.PathLike) else raw
    if path is None or isinstance(path, str):
        return path
    raise TypeError(f"{name} must be a folder (a str or a pathlib.Path) or None, got {type(raw).__name__} {raw!r}")


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """How the Triton kernels and the compiled extension behave; fields and variables in the module docstring.

    Values are checked at construction: `KernelOptions(backward="fused")` raises
    "backward must be 'split' or 'atomic', got 'fused'". `tma` also takes True/False for "1"/"0".
    """

    tiles: tuple[int, ...] | None = None
    tma: str = "auto"
    chunk_mb: float | None = None
    allow_tf32: bool = False
    backward: str = "split"
    grad_gemm: str = "torch"
    grad_filter_eps: float = 0.0
    jit: bool = False
    ext_cache: str | None = None
    varlen: bool = True

    def __post_init__(self) -> None:
        for name, value in _checked(lambda field: getattr(self, field), lambda field: field).items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_env(cls) -> KernelOptions:
        """The options the TPO_FAST_* variables give (unset or empty: the default), checked with the
        variable's name in the message: "TPO_FAST_CHUNK_MB must be a positive, finite number of MiB, got '-3'"."""
        key = tuple(os.environ.get(var, "") for var in ENV_VARS.values())
        cached = _ENV_CACHE.get(key)
        if cached is None:
            raw = dict(zip(ENV_VARS, key, strict=True))
            values = _checked(raw.__getitem__, ENV_VARS.__getitem__, from_env=True)
            _ENV_CACHE.clear()  # the environment rarely changes; one entry is enough
            cached = _ENV_CACHE[key] = cls(**values)
        return cached

    def chunk_bytes(self, default_mb: float) -> int:
        """A chunk buffer's budget in bytes: `chunk_mb` when set, else the buffer's `default_mb`."""
        return int((default_mb if self.chunk_mb is None else self.chunk_mb) * 2**20)


def _checked(get, name_of, from_env: bool = False) -> dict:
    """Every field's value, checked; `get(field)` the raw value, `name_of(field)` whom a message blames."""
    ext_cache = get("ext_cache")
    return {
        "tiles": _tiles(get("tiles"), name_of("tiles")),
        "tma": _choice(get("tma"), name_of("tma"), ("auto", "0", "1")),
        "chunk_mb": _chunk_mb(get("chunk_mb"), name_of("chunk_mb")),
        "allow_tf32": _flag(get("allow_tf32"), name_of("allow_tf32")),
        "backward": _choice(get("backward"), name_of("backward"), ("split", "atomic")),
        "grad_gemm": _choice(get("grad_gemm"), name_of("grad_gemm"), ("torch", "triton")),
        "grad_filter_eps": _number(get("grad_filter_eps"), name_of("grad_filter_eps"), 0.0, False,
                                   "a finite number >= 0"),
        "jit": _flag(get("jit"), name_of("jit")),
        "ext_cache": (ext_cache or None) if from_env else _path(ext_cache, name_of("ext_cache")),
        "varlen": _choice(get("varlen"), name_of("varlen"), ("1", "0")) == "1",
    }


_ENV_CACHE: dict[tuple[str, ...], KernelOptions] = {}
# Active scopes, innermost last. Process-wide, not per thread: a scope around a forward must reach launches on
# other threads too (autograd's device threads, for code that reads the options in backward).
_SCOPES: list[tuple[object, KernelOptions]] = []


def current_options() -> KernelOptions:
    """The options a launch uses now: the innermost `kernel_options` scope, else `KernelOptions.from_env()`."""
    return _SCOPES[-1][1] if _SCOPES else KernelOptions.from_env()


@contextlib.contextmanager
def kernel_options(options: KernelOptions | None = None, **overrides) -> Iterator[KernelOptions]:
    """Use `options` (default: the current ones) with `overrides` applied, until the block ends.

        with kernel_options(backward="atomic", grad_filter_eps=1e-6):
            loss = tpo_loss(...); loss.backward()

    The scope covers every thread of the process (autograd's included) and ignores the environment
    while it is active; nested scopes start from the enclosing one. A call's backward uses the options
    its forward ran with, so the scope may end before `loss.backward()`.
    """
    if options is not None and not isinstance(options, KernelOptions):
        raise TypeError(f"kernel_options takes a KernelOptions (or None) and fields as keywords, e.g. "
                        f"kernel_options(backward='atomic'); got options={options!r}")
    opts = dataclasses.replace(options or current_options(), **overrides)
    token = object()
    _SCOPES.append((token, opts))
    try:
        yield opts
    finally:
        _SCOPES[:] = [s for s in _SCOPES if s[0] is not token]
