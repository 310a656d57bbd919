#!/usr/bin/env bash
# The model-level tests (every one compares our LLaVA trunk + fused loss with the model's own
# full-logits forward) against an older transformers than the one `make test` resolves. The trunk
# re-implements part of LlavaModel.forward, so a transformers release that changes it must fail here,
# not silently (5.17 once ignored an argument we passed and left the image tokens unmerged).
# Usage: bash scripts/test_transformers_compat.sh [VERSION] (default 5.17.0: what the GPU image has).
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-5.17.0}"
py="${VENV:-.venv}/bin/python"
site="$(mktemp -d)/site"
# transformers 5.17 wants huggingface_hub < 2 (and httpx); both go beside it, ahead of the venv's.
"$py" -m pip install -q --no-deps --target "$site" "transformers==$version" "huggingface_hub>=1.5,<2"
"$py" -m pip install -q --target "$site" httpx
PYTHONPATH="$site" "$py" -c "import transformers; print('transformers', transformers.__version__)"
PYTHONPATH="$site" "$py" -m pytest -q -p no:cacheprovider tests/test_trainer.py tests/test_trainer_extra.py \
    tests/test_trainer_povid.py tests/test_povid.py tests/test_fisao.py tests/test_csr.py
