#!/usr/bin/env bash
# The prepared device run for a session that has a GPU (issue 7): one command that builds the CUDA
# extension, runs the test suite with compiled Triton kernels (no interpreter), then the GPU
# benchmark's target case. Logs and results go to $OUT (the device tool's folder) or /tmp/tpo_fast_gpu.
#
#   run: bash scripts/gpu_check.sh            (timeout_s ~540; carry .whl for the peers, see below)
#
# Peers missing on the device image travel as wheels in .whl/ (see the device tool's README):
# liger-kernel, cut-cross-entropy, trl (and what they need that the image lacks).
set -uo pipefail
OUT="${OUT:-/tmp/tpo_fast_gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# Editable install without dependencies: builds tpo_fast._C with its CUDA part against the local torch.
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || tail -20 "$OUT/build.log"
timeout 300 python3 -m pytest tests -q -x -m "not slow" -p no:cacheprovider > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; tail -25 "$OUT/tests.log"
timeout 200 python3 bench/run.py --cases gpu-target --workloads primitive,tpo,dpo,logits --repeats 20 \
    --out "$OUT" --stem h100 --no-plots > "$OUT/bench.md" 2> "$OUT/bench.err"
echo "bench rc=$?"; cat "$OUT/bench.md"
