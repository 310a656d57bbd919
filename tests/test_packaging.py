"""What `pip install tpo-fast` (a built wheel, not this editable checkout) gives a user.

pyproject.toml lists the packages by hand (kernels/ installs as tpo_fast.kernels), so a package added to the
tree but not to that list works here, where the checkout is on the path, and is missing from every wheel. These
tests hold the list to the tree, then build a wheel from a copy of the sources and use it from a folder outside
the repository, in an interpreter that cannot see the checkout (`-S`: no editable-install hook).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _tree_packages() -> dict[str, Path]:
    """Every package of the source tree by its installed name: tpo_fast and its subpackages, kernels/ as
    tpo_fast.kernels."""
    out = {"tpo_fast.kernels": ROOT / "kernels"}
    for init in sorted((ROOT / "tpo_fast").rglob("__init__.py")):
        if "__pycache__" not in init.parts:
            out[".".join(init.parent.relative_to(ROOT).parts)] = init.parent
    return out


def _tree_modules() -> set[str]:
    """The installed path of every tracked Python file of those packages (tpo_fast/kernels/x.py for kernels/x.py)."""
    out = set()
    for name, folder in _tree_packages().items():
        prefix = name.replace(".", "/")
        out |= {f"{prefix}/{p.name}" for p in folder.glob("*.py")}
    return out


def test_the_transformers_floor_is_the_tested_one_in_all_three_places():
    """pyproject's floor, the trainer's runtime check and the compatibility job's default version are one version."""
    from tpo_fast.trainer._versions import MIN_TRANSFORMERS

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"transformers>={MIN_TRANSFORMERS.removesuffix('.0')}" in deps, deps
    script = (ROOT / "scripts" / "test_transformers_compat.sh").read_text()
    assert f'version="${{1:-{MIN_TRANSFORMERS}}}"' in script


@pytest.mark.parametrize("found, ok", [
    ("4.57.1", False), ("5.16.9", False), ("5.17.0.dev0", True), ("5.17", True), ("5.17.0", True), ("5.25.0", True),
    ("6.0.0rc1", True),
])
def test_the_trainer_refuses_an_older_transformers_saying_what_to_install(found, ok):
    from tpo_fast.trainer._versions import require_transformers

    if ok:
        require_transformers(found)
    else:
        with pytest.raises(ImportError, match=rf"^tpo_fast's trainer needs transformers >= 5\.17\.0 \(.*\), found "
                                              rf"{found}; run: pip install -U 'transformers>=5\.17\.0'"):
            require_transformers(found)


def test_pyproject_lists_every_package_of_the_tree():
    st = _setuptools()
    assert sorted(st["packages"]) == sorted(_tree_packages())
    assert st["package-dir"] == {"tpo_fast": "tpo_fast", "tpo_fast.kernels": "kernels"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the checkout gets no build/ or egg-info), without the C++
    extension (its build is `setup.py`'s, tested by the extension's own tests)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("tpo_fast", "kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "TPO_FAST_BUILD_EXT": "0", "PIP_NO_INDEX": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(out)], check=True, env=env, capture_output=True, timeout=600)
    (whl,) = out.glob("tpo_fast-*.whl")
    return whl


def test_the_wheel_holds_every_module_under_tpo_fast_and_no_top_level_kernels(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {n for n in names if n.endswith(".py")}
    assert modules == _tree_modules()
    assert not any(n.startswith("kernels/") for n in names)  # the PyPI package `kernels` keeps its name
    assert "tpo_fast/py.typed" in names  # PEP 561: mypy and pyright use the package's annotations (setuptools >= 69
    # ships a package's py.typed by itself)
    (entry,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "tpo-fast = tpo_fast.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_an_installed_wheel_runs_a_loss_and_the_cli_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=600)
    # README's Python examples that need no file of the checkout (the primitives, the losses), as a user runs them
    blocks = [b.code for b in _readme_python_blocks()
              if b.marker in (None, "slow") and "examples/" not in b.code and "runs/" not in b.code]
    assert len(blocks) >= 2
    script = tmp_path / "user.py"
    script.write_text("import tpo_fast, tpo_fast.kernels.token_stats_fwd as k\n"
                      "print(tpo_fast.__file__)\nprint(k.__file__)\n" + "\n".join(blocks))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]]), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-S", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == str(target / "tpo_fast" / "__init__.py")
    assert lines[1] == str(target / "tpo_fast" / "kernels" / "token_stats_fwd.py")
    cli = subprocess.run([sys.executable, "-S", "-m", "tpo_fast.cli", "demo", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0 and cli.stdout.startswith("usage: tpo-fast demo"), cli.stderr


def _readme_python_blocks():
    from test_docs import parse_blocks  # tests/ is on the path, as for _bench

    return [b for b in parse_blocks(ROOT / "README.md") if b.kind == "python"]
