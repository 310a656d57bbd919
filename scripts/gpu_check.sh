#!/usr/bin/env bash
# The prepared device run for a session that has a GPU (issue 7), one command:
#   1. editable install (no extension), then the C++/CUDA extension built in the background;
#   2. bench/gpu_tune.py at N=8192, D=4096, V=32000 bf16: ceilings, floors, accuracy, tiles x TMA sweep;
#   3. the test suite with compiled Triton kernels and the CUDA extension (no interpreter); the checks that only
#      a GPU run reaches (the CUDA extension's kernel, the split backward's 16-bit multi-chunk accumulation)
#      are counted after it: skipped there means untested, a failed CUDA build fails;
#   4. bench/run.py --cases gpu-target (TPO, DPO, POVID, primitive) with the best tiles of step 2: the fused-gradient
#      losses (default) against their recompute path, the peers and both matmul floors (all rows, valid rows).
# Logs and results go to $OUT (the device tool's folder, 8 files) or /tmp/tpo_fast_gpu.
#
#   run: bash scripts/gpu_check.sh   (timeout_s 560; carry .whl: liger-kernel, cut-cross-entropy, trl, dill,
#        datasets, multiprocess). Last runs and what they found: bench/TUNING.md.
#   GPU_TUNE_ARGS="--tma 0,1 --no-atomic" picks the sweep (default: bench/gpu_tune.py's own).
set -uo pipefail
OUT="${OUT:-/tmp/tpo_fast_gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" TRITON_DEFAULT_FP_FUSION=1
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/build.log"
TPO_FAST_BUILD_EXT=0 python3 -m pip install -q --no-build-isolation --no-deps -e . >> "$OUT/build.log" 2>&1 \
    || { tail -20 "$OUT/build.log"; exit 1; }
(MAX_JOBS=6 python3 setup.py build_ext --inplace >> "$OUT/build.log" 2>&1; echo "ext build rc=$?" >> "$OUT/build.log") &
BUILD=$!
stamp "installed; tuning"
# shellcheck disable=SC2086
timeout 140 python3 bench/gpu_tune.py --out "$OUT" ${GPU_TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.md" | grep -v '^{'
read -r BEST_TILES BEST_TMA < <(python3 -c "import json; j = json.load(open('$OUT/tune.json'));
print(j.get('best_split_tiles', '-'), j.get('best_split_tma', 'auto'))" 2>/dev/null || echo "- auto")
[ "$BEST_TILES" = "-" ] && BEST_TILES=""
wait $BUILD; tail -1 "$OUT/build.log"
stamp "tests"
timeout 250 python3 -m pytest tests -n 14 -v -rfE --tb=short -p no:cacheprovider --timeout 240 \
    --ignore=tests/test_trainer_dist.py --ignore=tests/test_kernels_compile.py > "$OUT/tests.log" 2>&1
echo "tests rc=$?"; grep -E "(FAILED|ERROR) tests" "$OUT/tests.log" | sed 's/^\[gw[0-9]*\] \[ *[0-9]*%\] //' | sort -u | head -40
tail -2 "$OUT/tests.log"
echo "fused-gradient losses on the GPU (PASSED/SKIPPED/FAILED): $(grep -E "test_fused_loss.py::" "$OUT/tests.log" \
    | grep -oE "PASSED|SKIPPED|FAILED|ERROR" | sort | uniq -c | tr '\n' ' ')"
echo "CUDA-only checks (PASSED/SKIPPED/FAILED): $(grep -E "test_gaps_ops.py::|test_cuda_kernel_at_model_shapes|test_packed_step_with_flex_attention|test_packed_step_with_segment_attention_on_cuda|test_logits_logprobs.py::.*\[cuda" "$OUT/tests.log" \
    | grep -oE "PASSED|SKIPPED|FAILED|ERROR" | sort | uniq -c | tr '\n' ' ')"
stamp "bench/run.py with TPO_FAST_TILES=$BEST_TILES TPO_FAST_TMA=$BEST_TMA"
TPO_FAST_TILES="$BEST_TILES" TPO_FAST_TMA="$BEST_TMA" timeout 150 python3 bench/run.py --cases gpu-target \
    --workloads tpo,dpo,povid,primitive --contenders naive,liger,cce,trl,tpo_fast-triton,tpo_fast-triton-recompute,floor,floor-valid \
    --repeats 10 --warmup 2 --timeout 60 \
    --out "$OUT" --stem gpu --no-plots > "$OUT/bench.md" 2> "$OUT/bench.err"
echo "bench rc=$?"; grep -E "^\| (naive|Liger|Cut|TRL|tpo_fast|matmul)|^### |^- " "$OUT/bench.md"
stamp "done"
