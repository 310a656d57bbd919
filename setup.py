"""Builds the optional compiled extension `tpo_fast._C`; all other metadata lives in pyproject.toml.

The extension (csrc/) holds the logits-input kernels of `tpo_fast.logits_logprobs`: the CPU part is
built wherever torch and a C++ compiler are present, the CUDA part only with a CUDA build of torch
and nvcc (CUDA_HOME). Without them, or when the build fails, the install goes on without `_C`:
`tpo_fast._ext.load_jit()` can build it later, and the Triton and PyTorch backends need nothing.

Environment: TPO_FAST_BUILD_EXT=0 skips the extension, TPO_FAST_BUILD_CUDA=0 skips its CUDA part,
MAX_JOBS bounds ninja's parallel jobs, TORCH_CUDA_ARCH_LIST picks the GPU architectures.
Needs `pip install --no-build-isolation` so that it builds against the torch already installed.
"""

import os
import shutil
import sys
import sysconfig

from setuptools import setup

CSRC = "csrc"
# -fno-trapping-math lets g++ if-convert (vectorise) the exp loops; -g0 overrides the interpreter's -g
CXX_FLAGS = ["-O3", "-fno-trapping-math", "-g0"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]


def _log(msg: str) -> None:
    print(f"tpo_fast setup: {msg}", file=sys.stderr)


def _have_cxx() -> bool:
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    return shutil.which(cxx.split()[0]) is not None or shutil.which("c++") is not None


def _extension_build():
    if os.environ.get("TPO_FAST_BUILD_EXT", "1") == "0":
        _log("TPO_FAST_BUILD_EXT=0: skipping the C++/CUDA extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # noqa: BLE001 - any torch import failure means: no extension
        _log(f"torch is not importable ({e}); building without the C++ extension")
        return [], {}
    if not _have_cxx():
        _log("no C++ compiler found; building without the C++ extension (Triton/PyTorch backends remain)")
        return [], {}
    # torch looks for ninja on PATH; a non-activated venv keeps it next to the interpreter.
    bindir = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and os.path.exists(os.path.join(bindir, "ninja")):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")

    sources = [f"{CSRC}/bindings.cpp", f"{CSRC}/logits_logprobs_cpu.cpp"]
    with_cuda = (
        os.environ.get("TPO_FAST_BUILD_CUDA", "1") != "0"
        and torch.version.cuda is not None
        and CUDA_HOME is not None
    )
    if with_cuda:
        ext = CUDAExtension(
            "tpo_fast._C",
            sources + [f"{CSRC}/logits_logprobs_cuda.cu"],
            define_macros=[("TPO_FAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        )
    else:
        ext = CppExtension("tpo_fast._C", sources, extra_compile_args={"cxx": CXX_FLAGS})
    _log(f"building tpo_fast._C ({'CPU + CUDA' if with_cuda else 'CPU only'})")

    class OptionalBuildExtension(BuildExtension):
        """A failed extension build warns and leaves the pure-Python package installable."""

        def build_extensions(self):
            self._failed = []
            super().build_extensions()
            # Later steps (in-place copy, editable-wheel outputs) must not look for what failed.
            self.extensions = [e for e in self.extensions if e not in self._failed]

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as e:  # noqa: BLE001
                self._failed.append(extension)
                _log(f"building {extension.name} failed ({type(e).__name__}: {e}); installing without it")

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
