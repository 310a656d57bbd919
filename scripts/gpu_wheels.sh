#!/usr/bin/env bash
# Wheels the device machine lacks (it has torch, triton, transformers, peft, accelerate, pandas, pyarrow, but no
# network): the benchmark's peers and TRL's own needs, for Python 3.12 on x86-64. Run here, before the device
# calls; they land in .whl/ (git-ignored), which each call names in `carry`. Versions: the ones CI tests against.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}"
ls .whl
du -sh .whl
