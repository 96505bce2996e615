#!/usr/bin/env bash
# The GPU checks, as one prepared script for a machine with ONE CUDA GPU (run from anywhere):
#   bash scripts/gpu_checks.sh [OUTDIR]          # default outputs/gpu_checks
#   bash scripts/gpu_checks.sh --print-train-argv [OUTDIR]   # list the training runs, run nothing
# Steps (each under `timeout`; a failed step is recorded and the next one runs):
#   1. setup: dev extras; Transformer Engine only when TE=1 and it is not importable
#   2. tests/gpu (TE spec bf16/FP8, fused vs unfused RoPE, local vs TE logits)
#   3. bench_rope on the GPU with the local and the TE spec
#   4. short CUDA-path training runs (megatron-core DDP, optimizer, schedules) of the tiny model on
#      a byte-level corpus: TE fused RoPE on a batch-shared layout, unfused on per-sample layouts,
#      FP8 delayed and tensorwise, full and selective recompute, and the distributed optimizer
#      saved at 10, resumed to 20 and compared with a straight 20-iteration run
#   5. bench_mfu (8B-shaped layers, S = 8192): bf16, then bf16 + FP8 side by side
# The whole run stays under BUDGET_S seconds (default 450, i.e. 7.5 minutes): every step's timeout
# is capped by what is left, and steps past the budget are skipped. Writes OUTDIR/gpu_checks.log
# (everything), OUTDIR/steps/<step>.log and OUTDIR/results.txt (every RESULT line, by step), and
# ends with a pass/fail summary; the exit status is 1 when a step failed.
#
# One GPU only: TP/PP/CP = 2 and --sequence-parallel (needs TP > 1) are multi-rank and are not run
# here (NCCL cannot put two ranks on one GPU); tests/emulated covers their logic on CPU.
set -uo pipefail # no -e: a failing step must not stop the others

PRINT_ONLY=0
if [[ "${1:-}" == "--print-train-argv" ]]; then
    PRINT_ONLY=1
    shift
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/outputs/gpu_checks}
[[ "$OUT" == /* ]] || OUT="$PWD/$OUT" # relative to where the script is started
cd "$ROOT" || exit 1
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-450}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-120}
DATA="$OUT/data"
STEPS="$OUT/steps"
START=$SECONDS
ORDER=()
PASSED=()
FAILED=()
SKIPPED=()
export PYTHONUNBUFFERED=1

# run_step NAME TIMEOUT_S CMD...: CMD under timeout (capped by the budget left), output also to
# $STEPS/NAME.log; records the step as passed, failed (with its status) or skipped.
run_step() {
    local name=$1 limit=$2
    shift 2
    ((PRINT_ONLY)) && return 0
    local left=$((BUDGET_S - (SECONDS - START)))
    if ((left < 20)); then
        echo "== SKIP $name: the ${BUDGET_S}s budget is spent"
        SKIPPED+=("$name (budget)")
        return 1
    fi
    ((limit > left)) && limit=$left
    echo
    echo "== $name (timeout ${limit}s, $((SECONDS - START))s elapsed)"
    ORDER+=("$name")
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$STEPS/$name.log"
    rc=${PIPESTATUS[0]}
    if ((rc == 0)); then
        PASSED+=("$name")
    elif ((rc == 124 || rc == 137)); then
        FAILED+=("$name (timed out after ${limit}s)")
    else
        FAILED+=("$name (exit $rc)")
    fi
    echo "== $name: exit $rc in $((SECONDS - t0))s"
    return "$rc"
}

skip() { # skip NAME WHY
    ((PRINT_ONLY)) && return 0
    echo "== SKIP $1: $2"
    SKIPPED+=("$1 ($2)")
}

importable() { timeout 60 "$PYTHON" -c "import $1" >/dev/null 2>&1; }

# Common flags of every training run (megatron_endprompt.train --help lists them). The defaults
# are Megatron-LM's (--adam-beta2 0.999, --eval-iters 100, ...): these runs keep 0.95 and, unless
# a run gives --eval-iters, no validation (train_run adds --eval-iters 0).
# shellcheck disable=SC2054 # "98,2,0" is one value (--split), not three array elements
TRAIN=(
    -m megatron_endprompt.train --device cuda --model-preset tiny --tokenizer-type ByteTokenizer
    --data-path "$DATA/stdlib_text_document" --data-cache-path "$DATA/cache" --split 98,2,0
    --seq-length 256 --max-position-embeddings 2048 --target-length 2048
    --rope-scaling-type linear --rope-scaling-factor 8
    --micro-batch-size 4 --global-batch-size 16 --lr 1e-3 --lr-decay-style cosine
    --adam-beta2 0.95 --log-interval 5 --bf16 --num-workers 1 --no-exit-signal-handler
)
# Every row of a micro-batch gets [0 .. a-1, L-t .. L-1]: one [s, 1, 1, d] table, TE's fused RoPE.
SHARED=(--position-mode endprompt --endprompt-terminal tail --endprompt-tail-length 32)
# A random layout per sample: a [s, b, 1, d] table, the unfused RoPE path.
PER_SAMPLE=(--position-mode endprompt_pose --endprompt-terminal tail --endprompt-tail-length 32)

train_run() { # train_run NAME FLAGS...: one training run (or its argv with --print-train-argv)
    local name=$1
    shift
    local valid=(--eval-iters 0) # the parser refuses a flag given twice
    [[ " $* " == *" --eval-iters "* ]] && valid=()
    if ((PRINT_ONLY)); then
        printf 'TRAIN_ARGV %s' "$name"
        printf ' %q' "${TRAIN[@]}" "${valid[@]}" "$@"
        echo
        return 0
    fi
    run_step "train_$name" "$TRAIN_TIMEOUT" "$PYTHON" "${TRAIN[@]}" "${valid[@]}" "$@"
}

training_runs() { # IMPL and FP8_OK are set by the environment step
    local impl=(--transformer-impl "$IMPL") short=(--train-iters 10)
    if [[ "$IMPL" == te ]]; then
        train_run te_fused_rope_bf16 "${impl[@]}" "${SHARED[@]}" "${short[@]}" --eval-iters 2
    else
        skip train_te_fused_rope_bf16 "needs Transformer Engine"
    fi
    train_run "${IMPL}_unfused_per_sample_bf16" "${impl[@]}" "${PER_SAMPLE[@]}" "${short[@]}"
    if ((FP8_OK)); then
        for recipe in delayed tensorwise; do
            train_run "fp8_$recipe" "${impl[@]}" "${SHARED[@]}" "${short[@]}" \
                --fp8-format hybrid --fp8-recipe "$recipe"
        done
    else
        skip train_fp8 "needs Transformer Engine and compute capability >= 8.9"
    fi
    train_run recompute_full "${impl[@]}" "${SHARED[@]}" "${short[@]}" \
        --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
    train_run recompute_selective "${impl[@]}" "${PER_SAMPLE[@]}" "${short[@]}" \
        --recompute-granularity selective
    # Resume must reproduce the straight run: deterministic kernels for these three.
    export NVTE_ALLOW_NONDETERMINISTIC_ALGO=0 CUBLAS_WORKSPACE_CONFIG=:4096:8
    local dist=("${impl[@]}" "${SHARED[@]}" --use-distributed-optimizer --train-iters 20)
    run_step clean_checkpoints 30 rm -rf "$OUT/ckpt_resume" "$OUT/ckpt_straight"
    train_run distopt_save_at_10 "${dist[@]}" --save "$OUT/ckpt_resume" --exit-interval 10
    train_run distopt_resume_to_20 "${dist[@]}" --save "$OUT/ckpt_resume" --load "$OUT/ckpt_resume"
    train_run distopt_straight_20 "${dist[@]}" --save "$OUT/ckpt_straight"
    unset NVTE_ALLOW_NONDETERMINISTIC_ALGO CUBLAS_WORKSPACE_CONFIG
    run_step compare_resume 30 "$PYTHON" - "$STEPS/train_distopt_resume_to_20.log" \
        "$STEPS/train_distopt_straight_20.log" <<'PY'
"""Iteration-20 loss of the resumed and the straight run; FAIL above 1e-6 relative."""
import json, re, sys

def losses(path):
    """(console loss at iteration 20, full-precision TRAIN_SUMMARY final_loss) of one run."""
    text = open(path, encoding="utf-8", errors="replace").read()
    it20 = [float(m[2]) for m in re.finditer(r"iter\s+(\d+)/\d+ \| loss (\S+)", text)
            if int(m[1]) == 20]
    summary = [json.loads(line.split(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("TRAIN_SUMMARY ")]
    full = summary[-1]["final_loss"] if summary and summary[-1]["iterations"] == 20 else None
    return (it20[-1] if it20 else None), full

(resumed, resumed_full), (straight, straight_full) = losses(sys.argv[1]), losses(sys.argv[2])
print(f"iteration 20 loss (console):       resumed {resumed} straight {straight}")
print(f"iteration 20 loss (TRAIN_SUMMARY): resumed {resumed_full!r} straight {straight_full!r}")
pair = (resumed_full, straight_full) if None not in (resumed_full, straight_full) else None
a, b = pair or (resumed, straight)  # the console rounds to 6 digits: prefer the summary
if a is None or b is None:
    sys.exit("FAIL resume vs straight: an iteration-20 loss is missing")
rel = abs(a - b) / max(abs(b), 1e-12)
verdict = "PASS" if rel <= 1e-6 else "FAIL"
print(f"RESULT resume_vs_straight_iter20_loss_rel_diff {rel:.3e}")
print(f"{verdict} resume vs straight at iteration 20: relative difference {rel:.3e} (limit 1e-6)")
sys.exit(0 if verdict == "PASS" else 1)
PY
}

if ((PRINT_ONLY)); then
    IMPL=te FP8_OK=1
    training_runs
    exit 0
fi

mkdir -p "$OUT" "$STEPS" "$DATA"
exec > >(tee "$OUT/gpu_checks.log") 2>&1
echo "gpu_checks: output in $OUT, budget ${BUDGET_S}s"

run_step setup 240 bash scripts/setup.sh dev
if [[ "${TE:-0}" == 1 ]] && ! importable transformer_engine; then
    run_step install_te "${TE_INSTALL_TIMEOUT:-300}" "$PYTHON" -m pip install --quiet \
        --no-build-isolation "transformer-engine[pytorch]>=2.9,<2.12"
fi
run_step environment 60 "$PYTHON" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
try:
    import transformer_engine
    te = getattr(transformer_engine, "__version__", "(version unknown)")
except Exception as err:  # not installed, or built against another torch / CUDA
    te = f"not importable: {type(err).__name__}: {err}"
print("transformer_engine", te)
PY
IMPL=local
FP8_OK=0
if importable transformer_engine.pytorch; then
    IMPL=te
    FP8_CHECK="import sys, torch; sys.exit(torch.cuda.get_device_capability() < (8, 9))"
    timeout 60 "$PYTHON" -c "$FP8_CHECK" && FP8_OK=1
fi
echo "layer spec for training: $IMPL; FP8: $FP8_OK"

run_step tests_gpu 180 "$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu -rs

run_step bench_rope_local 120 "$PYTHON" benchmarks/bench_rope.py --device cuda --impl local
if [[ "$IMPL" == te ]]; then
    run_step bench_rope_te 120 "$PYTHON" benchmarks/bench_rope.py --device cuda --impl te
else
    skip bench_rope_te "needs Transformer Engine"
fi

run_step prepare_corpus 60 "$PYTHON" tools/prepare_corpus.py --output "$DATA/corpus.jsonl" \
    --max-docs 200
run_step preprocess_data 90 "$PYTHON" tools/preprocess_data.py --input "$DATA/corpus.jsonl" \
    --output-prefix "$DATA/stdlib" --tokenizer-type ByteTokenizer --append-eod --no-progress
training_runs

run_step bench_mfu_bf16 150 "$PYTHON" benchmarks/bench_mfu.py --device cuda --precisions bf16
if ((FP8_OK)); then
    run_step bench_mfu_fp8 180 "$PYTHON" benchmarks/bench_mfu.py --device cuda \
        --precisions bf16,fp8_delayed,fp8_tensorwise
else
    skip bench_mfu_fp8 "needs Transformer Engine and compute capability >= 8.9"
fi

for name in "${ORDER[@]}"; do # step order; "# step" lines head each step's RESULT lines
    if grep -q '^RESULT ' "$STEPS/$name.log"; then
        echo "# $name"
        grep '^RESULT ' "$STEPS/$name.log"
    fi
done >"$OUT/results.txt"
echo
echo "== summary after $((SECONDS - START))s: ${#PASSED[@]} passed, ${#FAILED[@]} failed," \
    "${#SKIPPED[@]} skipped; RESULT lines in $OUT/results.txt"
for s in "${PASSED[@]}"; do echo "PASS $s"; done
for s in "${FAILED[@]}"; do echo "FAIL $s"; done
for s in "${SKIPPED[@]}"; do echo "SKIP $s"; done
cat "$OUT/results.txt"
((${#FAILED[@]} == 0))
