#!/usr/bin/env bash
# Mutation testing of one module with mutmut 3, in a copy of the tree (the working tree is never touched):
#
#   make mutants MODULE=tpo_fast/ops/torch_chunked.py            # the module's default tests (below)
#   make mutants MODULE=tpo_fast/loss TESTS="tests/test_loss.py"  # a folder, other tests
#   make mutants MODULE=bench/_derive.py                           # the benchmark's own modules too
#   make mutants MODULE=kernels/scale.py                           # a Triton kernel: scripts/kernel_mutants.py
#
# The tracked and untracked-not-ignored files are copied to $MUTANTS_DIR/<module> (default /tmp/tpo_fast_mutants),
# mutmut instruments the module there (mutants/ inside the copy), runs each mutant against the tests that reach
# the mutated function, and the summary (killed / survived / timeout ... and the kill rate) is printed and
# written to summary.txt in the copy; `cd <copy> && mutmut show <name>` shows one mutant's diff.
# JOBS (default 2) bounds the parallel mutant runs; PYTEST_MARK selects tests (default "not slow"); PYTEST_ARGS
# adds pytest options; FUNCTIONS="f g" mutates only those functions (or methods) of MODULE.
# Not part of CI: one module takes minutes on 2 cores. docs/testing.md lists the known equivalent survivors.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-.venv/bin/python}"
case "$PY" in /*) ;; */*) PY="$ROOT/$PY" ;; esac  # relative to the repository root (the Makefile's .venv/bin/python)
MODULE="${MODULE:-${1:-}}"
MODULE="${MODULE%/}"
[ -n "$MODULE" ] || { echo "usage: make mutants MODULE=tpo_fast/<path>|kernels/<path>|bench/<path> [TESTS=\"tests/test_x.py ...\"]" >&2; exit 2; }
[ -e "$ROOT/$MODULE" ] || { echo "MODULE=$MODULE: no such file or folder under $ROOT" >&2; exit 2; }
case "$MODULE" in
    tpo_fast/*|bench/*) ;;
    kernels|kernels/*)  # mutmut cannot mutate a @triton.jit function: scripts/kernel_mutants.py mutates the source
        ARGS=()
        [ "$MODULE" = kernels ] || ARGS+=("$MODULE")
        [ -z "${TESTS:-}" ] || ARGS+=(--tests $TESTS)
        exec "$PY" "$ROOT/scripts/kernel_mutants.py" "${ARGS[@]}" --jobs "${JOBS:-2}" --python "$PY" ;;
    *) echo "MODULE must lie in tpo_fast/, kernels/ or bench/ (got $MODULE)" >&2; exit 2 ;;
esac
"$PY" -c "import mutmut" 2>/dev/null || { echo "mutmut is not installed: pip install -e '.[dev]'" >&2; exit 2; }

if [ -z "${TESTS:-}" ]; then
    case "$MODULE" in
        tpo_fast/ops/torch_chunked.py)
            TESTS="tests/test_primitives.py tests/test_gaps_ops.py tests/test_bf16_gemms.py tests/test_torch_backend_cuda.py" ;;
        tpo_fast/ops/gemm.py)
            TESTS="tests/test_gemm.py tests/test_torch_backend_cuda.py tests/test_gaps_triton_impl.py tests/test_gaps_ops.py" ;;
        tpo_fast/ops/token_logprobs.py|tpo_fast/ops/reference.py|tpo_fast/ops/_validate.py)
            TESTS="tests/test_primitives.py tests/test_gaps_ops.py" ;;
        tpo_fast/ops/logits.py) TESTS="tests/test_logits_logprobs.py tests/test_gaps_logits.py" ;;
        tpo_fast/ops/triton_impl.py)  # the Triton launches under the interpreter: about 25 s for these files
            TESTS="tests/test_primitives.py tests/test_gaps_ops.py tests/test_options.py tests/test_gaps_triton_impl.py" ;;
        tpo_fast/ops/triton_fused.py)
            TESTS="tests/test_primitives.py tests/test_fused_loss.py tests/test_gaps_ops.py tests/test_gaps_fused.py tests/test_gaps_triton_fused.py" ;;
        tpo_fast/ops*) TESTS="tests/test_primitives.py tests/test_fused_loss.py tests/test_gaps_ops.py tests/test_gaps_fused.py tests/test_bf16_gemms.py" ;;
        tpo_fast/loss*) TESTS="tests/test_loss.py tests/test_loss_options.py tests/test_fused_loss.py tests/test_povid.py tests/test_fisao.py tests/test_gaps_tpo_loss.py tests/test_gaps_pairs_loss.py tests/test_gaps_povid_loss.py tests/test_gaps_modules.py tests/test_gaps_fisao_loss.py" ;;
        tpo_fast/trainer/model.py)
            TESTS="tests/test_trainer.py tests/test_gaps_trainer.py tests/test_trainer_povid.py tests/test_trainer_loss_path.py" ;;
        tpo_fast/trainer/packing.py|tpo_fast/trainer/row_attention.py) TESTS="tests/test_packing.py" ;;
        tpo_fast/trainer/reference_cache.py) TESTS="tests/test_reference_cache.py tests/test_gaps_trainer.py tests/test_trainer_review.py" ;;
        tpo_fast/trainer/adapters.py) TESTS="tests/test_adapters.py" ;;
        tpo_fast/trainer/config.py) TESTS="tests/test_config.py tests/test_defects.py tests/test_trainer_extra.py" ;;
        tpo_fast/trainer/collator.py) TESTS="tests/test_data_preferences.py tests/test_tokenization.py tests/test_packing.py tests/test_trainer_loss_path.py tests/test_defects.py tests/test_gaps_trainer.py" ;;
        tpo_fast/trainer/data.py) TESTS="tests/test_data_preferences.py tests/test_defects.py tests/test_gaps_trainer.py tests/test_trainer_review.py tests/test_trainer.py tests/test_povid.py tests/test_csr.py tests/test_eval.py" ;;
        tpo_fast/trainer/activations.py) TESTS="tests/test_activations.py" ;;
        tpo_fast/trainer/synthetic.py) TESTS="tests/test_synthetic.py" ;;
        tpo_fast/trainer/demo.py) TESTS="tests/test_demo.py" ;;
        tpo_fast/trainer/tiny.py) TESTS="tests/test_tiny.py" ;;
        tpo_fast/trainer/corruption.py) TESTS="tests/test_corruption.py tests/test_data_preferences.py tests/test_trainer_review.py" ;;
        tpo_fast/trainer/trainer.py)
            TESTS="tests/test_trainer_init.py tests/test_trainer.py tests/test_gaps_trainer.py tests/test_trainer_review.py tests/test_trainer_extra.py tests/test_trainer_loss_path.py tests/test_trainer_povid.py" ;;
        tpo_fast/trainer*) TESTS="tests/test_trainer.py tests/test_gaps_trainer.py tests/test_data_preferences.py" ;;
        tpo_fast/methods/hallucination*) TESTS="tests/test_eval.py tests/test_tokenization.py" ;;
        tpo_fast/methods/fisao.py) TESTS="tests/test_fisao.py tests/test_gaps_methods.py" ;;
        tpo_fast/methods/csr.py) TESTS="tests/test_csr.py tests/test_gaps_methods.py" ;;
        tpo_fast/methods/povid.py) TESTS="tests/test_povid.py tests/test_trainer_povid.py" ;;
        tpo_fast/cli*) TESTS="tests/test_cli.py tests/test_cli_flags.py tests/test_eval.py" ;;
        bench/*) TESTS="tests/test_bench_smoke.py tests/test_bench_derive.py tests/test_bench_report.py tests/test_bench_measure.py tests/test_bench_measure_step.py tests/test_bench_contenders.py tests/test_bench_step_contenders.py tests/test_bench_run.py" ;;
        tpo_fast/methods*) TESTS="tests/test_csr.py tests/test_gaps_methods.py tests/test_fisao.py tests/test_povid.py" ;;
        *) echo "no default tests for $MODULE: pass TESTS=\"tests/...\"" >&2; exit 2 ;;
    esac
fi

SLUG="$(echo "$MODULE" | tr '/.' '__')"
WORK="${MUTANTS_DIR:-/tmp/tpo_fast_mutants}/$SLUG"
rm -rf "$WORK"
mkdir -p "$WORK"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} sh -c '[ -e "{}" ] && echo "{}"' \
    | tar -cf - -T - && ls tpo_fast/_C*.so 2>/dev/null | tar -cf - -T - 2>/dev/null || true) | tar -xif - -C "$WORK"
# tpo_fast.kernels installs from kernels/; in the copy it sits inside the package so the mutants import it from there.
cp -r "$WORK/kernels" "$WORK/tpo_fast/kernels"
SOURCE=tpo_fast
ONLY="$MODULE"
[ -d "$WORK/$MODULE" ] && ONLY="$MODULE/*"
if [ "${MODULE%%/*}" = bench ]; then
    # bench/ is a folder of scripts whose modules import one another by bare name (`import _derive`), and mutmut
    # names a mutant by its module's dotted path below the source folder, less a leading "src.". So bench/ becomes
    # src/ in the copy (its mutants then carry the bare names the imports use), and bench/ a link to it, in the
    # copy and in mutmut's mutants/ folder, for the tests and scripts that run bench/<file>.py by path.
    mv "$WORK/bench" "$WORK/src"
    ln -s src "$WORK/bench"
    mkdir -p "$WORK/mutants"
    ln -s src "$WORK/mutants/bench"
    SOURCE=src
    ONLY="src/${ONLY#bench/}"
fi
{
    echo "[mutmut]"
    echo "source_paths = $SOURCE"
    echo "only_mutate = $ONLY"
    echo "pytest_add_cli_args_test_selection ="
    for t in $TESTS; do echo "    $t"; done
    echo "pytest_add_cli_args ="
    echo "    -p"
    echo "    no:cacheprovider"
    echo "    -m"
    echo "    ${PYTEST_MARK:-not slow}"
    for a in ${PYTEST_ARGS:-}; do echo "    $a"; done
    echo "also_copy ="  # what tests read besides the package and tests/ (the command reference and its writer)
    echo "    scripts"
    echo "    docs"
    echo "timeout_multiplier = 5.0"
    echo "timeout_constant = 20.0"
} > "$WORK/setup.cfg"

cd "$WORK"
echo "mutants of $MODULE in $WORK against: $TESTS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
set +e
NAMES=()
for f in ${FUNCTIONS:-}; do NAMES+=("*.x_${f}__mutmut_*" "*ǁ${f}__mutmut_*"); done
nice -n 10 "$PY" -m mutmut run --max-children "${JOBS:-2}" "${NAMES[@]}" > run.log 2>&1
RC=$?
set -e
tail -5 run.log | tr '\r' '\n' | tail -3
"$PY" -m mutmut results --all true > results.txt 2>&1 || true
"$PY" - "$MODULE" "$(( $(date +%s) - T0 ))" <<'EOF' | tee summary.txt
import collections, re, sys
counts = collections.Counter()
survivors = []
for line in open("results.txt"):
    m = re.match(r"\s*(\S+): (.+)$", line)
    if not m:
        continue
    counts[m.group(2).strip()] += 1
    if m.group(2).strip() == "survived":
        survivors.append(m.group(1))
total = sum(counts.values())
killed = counts["killed"] + counts["timeout"] + counts.get("caught by type check", 0)
tested = total - counts["no tests"] - counts["skipped"] - counts["not checked"]
rate = 100.0 * killed / tested if tested else 0.0
print(f"{sys.argv[1]}: {total} mutants, {dict(counts)}; killed {killed} of {tested} with tests = {rate:.1f}% "
      f"({sys.argv[2]} s)")
for name in survivors:
    print(f"survived: {name}")
EOF
exit $RC
