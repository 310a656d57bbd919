#!/usr/bin/env bash
# Creates (or reuses) a virtual environment and installs tpo_fast with its dev, bench and train extras.
# On a machine without CUDA it pins torch==2.13.0 (the CPU build); an unpinned torch would pull a
# multi-GB CUDA build. A torch already present in the environment is kept.
set -euo pipefail
venv="${1:-.venv}"
cd "$(dirname "$0")/.."
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
py="$venv/bin/python"
# Skip the install (and the C++ extension build) when nothing it depends on changed since the last one.
stamp="$venv/.tpo_fast_setup"
fingerprint=$(cat pyproject.toml setup.py scripts/setup.sh csrc/* 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$fingerprint" ] && "$py" -c "import tpo_fast" 2>/dev/null; then
    exit 0
fi
"$py" -m pip install -q --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install -q "torch==2.13.0"
fi
# --no-build-isolation: the optional C++ extension builds against the torch installed above,
# not against a fresh (CUDA) torch pulled into an isolated build environment.
"$py" -m pip install -q setuptools wheel ninja pybind11
"$py" -m pip install -q --no-build-isolation -e ".[dev,bench,train]"
echo "$fingerprint" > "$stamp"
