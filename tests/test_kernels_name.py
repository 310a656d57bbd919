"""The repository's kernels/ folder (installed as tpo_fast.kernels) never shadows the PyPI package `kernels`,
which transformers 5.25 imports when it is installed, even when the repository root is on sys.path."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_kernels(tmp_path, with_package: bool) -> str:
    site = tmp_path / "site"
    if with_package:  # a stand-in for the PyPI package, after the root on sys.path
        (site / "kernels").mkdir(parents=True)
        (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'the installed package'\n")
    code = ("import kernels, tpo_fast.kernels.token_stats_fwd as k; "
            "print(getattr(kernels, 'CUDAProperties', None), k.__name__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, str(site)])}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_installed_kernels_package_wins_from_the_repository_root(tmp_path):
    assert _import_kernels(tmp_path, True) == "the installed package tpo_fast.kernels.token_stats_fwd"


def _installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(_installed(), reason="the PyPI package `kernels` is installed here (transformers 5.25 needs it)")
def test_without_the_package_kernels_stays_an_empty_module(tmp_path):
    assert _import_kernels(tmp_path, False) == "None tpo_fast.kernels.token_stats_fwd"
