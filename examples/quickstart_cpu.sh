#!/usr/bin/env bash
# CPU quickstart, the project's main job, on the embedded default corpus (the Python standard
# library's own source files, present on every machine):
#   1. corpus -> JSONL            tools/prepare_corpus.py
#   2. SentencePiece tokenizer    tools/train_tokenizer.py
#   3. JSONL -> .bin/.idx         tools/preprocess_data.py
#   4. pretrain the tiny preset at S = 256 (contiguous positions, plain RoPE)
#   5. extend it with EndPrompt: PI factor 8, target L = 2048, physical S = 256
#   6. the control: PI x8 and the same budget of ordinary contiguous training at S = 256 (what
#      adapting to the scaling alone gives, without any terminal segment)
#   7. long-context report: the base model, PI only (no training), the control and the
#      EndPrompt model, perplexity by position up to 8x the base context with 95% bootstrap
#      intervals over windows, one table plus PNG plots. Passkey retrieval is not in it: a model
#      this small trained on source code cannot retrieve at any length (all zeros); the
#      small-scale replication (examples/replicate_small.sh) trains for it.
#
#   bash examples/quickstart_cpu.sh            # the full run (minutes on 2 cores)
#   bash examples/quickstart_cpu.sh --smoke    # under a minute: the tests run this
#
# Environment: OUT (output folder, default outputs/quickstart), PYTHON.
set -euo pipefail

MODE=full
if [[ "${1:-}" == "--smoke" ]]; then MODE=smoke; fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$ROOT/outputs/quickstart}
if [[ "$MODE" == smoke ]]; then OUT=${OUT}_smoke; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
cd "$ROOT"
mkdir -p "$OUT"
T0=$(date +%s)

if [[ "$MODE" == smoke ]]; then
    MAX_DOCS=150; VOCAB=1024; PRETRAIN_ITERS=6; EXTEND_ITERS=4; LOG_INTERVAL=2; MAX_DOC_BYTES=40000
    PRETRAIN_WARMUP=2; EXTEND_WARMUP=1
    PPL_WINDOWS=2
else
    MAX_DOCS=1200; VOCAB=4096; PRETRAIN_ITERS=300; EXTEND_ITERS=100; LOG_INTERVAL=25; MAX_DOC_BYTES=200000
    PRETRAIN_WARMUP=10; EXTEND_WARMUP=5
    PPL_WINDOWS=48
fi

echo "== [1/7] embedded corpus -> $OUT/corpus.jsonl"
"$PYTHON" tools/prepare_corpus.py --output "$OUT/corpus.jsonl" --max-docs "$MAX_DOCS" \
    --max-bytes-per-doc "$MAX_DOC_BYTES"

echo "== [2/7] SentencePiece BPE tokenizer (vocab $VOCAB)"
"$PYTHON" tools/train_tokenizer.py --input "$OUT/corpus.jsonl" --vocab-size "$VOCAB" \
    --output-prefix "$OUT/tokenizer"

echo "== [3/7] preprocess -> Megatron indexed dataset"
"$PYTHON" tools/preprocess_data.py --input "$OUT/corpus.jsonl" --output-prefix "$OUT/stdlib" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model" \
    --append-eod --workers 2 --log-interval 500

COMMON_ARGS=(
    --device cpu
    --model-preset tiny
    --seq-length 256
    --micro-batch-size 8
    --global-batch-size 16
    --data-path "$OUT/stdlib_text_document"
    --split 98,2,0
    --data-cache-path "$OUT/cache"
    --tokenizer-type SentencePieceTokenizer
    --tokenizer-model "$OUT/tokenizer.model"
    --log-interval "$LOG_INTERVAL"
    --eval-iters 2
    --adam-beta2 0.95
    --num-workers 1
    --seed 1234
)

echo "== [4/7] pretrain tiny at S = 256 (contiguous positions)"
rm -rf "$OUT/ckpt_base" "$OUT/ckpt_endprompt" "$OUT/ckpt_control"
"$PYTHON" -m megatron_endprompt.train "${COMMON_ARGS[@]}" \
    --max-position-embeddings 256 --position-mode contiguous \
    --train-iters "$PRETRAIN_ITERS" --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters "$PRETRAIN_WARMUP" \
    --lr-decay-style cosine --save "$OUT/ckpt_base" --tensorboard-dir "$OUT/tb/base" \
    | tee "$OUT/pretrain.log"

echo "== [5/7] extend to L = 2048 with EndPrompt (PI x8, physical S = 256)"
"$PYTHON" -m megatron_endprompt.train "${COMMON_ARGS[@]}" \
    --max-position-embeddings 2048 --target-length 2048 \
    --rope-scaling-type linear --rope-scaling-factor 8 \
    --position-mode endprompt --endprompt-terminal cue --endprompt-placement fixed \
    --load "$OUT/ckpt_base" --finetune \
    --train-iters "$EXTEND_ITERS" --lr 5e-4 --lr-warmup-iters "$EXTEND_WARMUP" --lr-decay-style constant \
    --save "$OUT/ckpt_endprompt" --tensorboard-dir "$OUT/tb/endprompt" \
    | tee "$OUT/extend.log"

echo "== [6/7] the control: PI x8 + the same budget of contiguous training at S = 256"
"$PYTHON" -m megatron_endprompt.train "${COMMON_ARGS[@]}" \
    --max-position-embeddings 2048 --target-length 2048 \
    --rope-scaling-type linear --rope-scaling-factor 8 --position-mode contiguous \
    --load "$OUT/ckpt_base" --finetune \
    --train-iters "$EXTEND_ITERS" --lr 5e-4 --lr-warmup-iters "$EXTEND_WARMUP" --lr-decay-style constant \
    --save "$OUT/ckpt_control" --tensorboard-dir "$OUT/tb/control" \
    | tee "$OUT/control.log"

echo "== [7/7] long-context report: perplexity by position up to 8x the base context"
rm -rf "$OUT/eval"
EVAL_ARGS=(
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model"
    --tasks perplexity --ppl-data "$OUT/stdlib_text_document" --ppl-from-end
    --ppl-length 2048 --ppl-max-windows "$PPL_WINDOWS" --ppl-batch-size 4 --seed 0 --device cpu
    --no-progress
)
"$PYTHON" tools/evaluate.py --load "$OUT/ckpt_base" --max-position-embeddings 2048 \
    "${EVAL_ARGS[@]}" --output "$OUT/eval/base" --name "base (S=256)" > "$OUT/eval_base.log"
"$PYTHON" tools/evaluate.py --load "$OUT/ckpt_base" --max-position-embeddings 2048 \
    --rope-scaling-type linear --rope-scaling-factor 8 \
    "${EVAL_ARGS[@]}" --output "$OUT/eval/pi_only" --name "PI x8, no training" > "$OUT/eval_pi.log"
"$PYTHON" tools/evaluate.py --load "$OUT/ckpt_control" \
    "${EVAL_ARGS[@]}" --output "$OUT/eval/control" --name "PI x8 + contiguous S=256 (control)" \
    > "$OUT/eval_control.log"
"$PYTHON" tools/evaluate.py --load "$OUT/ckpt_endprompt" \
    "${EVAL_ARGS[@]}" --output "$OUT/eval/endprompt" --name "EndPrompt, PI x8" > "$OUT/eval_ep.log"
"$PYTHON" tools/evaluate.py compare "$OUT/eval/base" "$OUT/eval/pi_only" "$OUT/eval/control" \
    "$OUT/eval/endprompt" --output "$OUT/eval/compare"
echo "Passkey retrieval is not in this report: the tiny model cannot learn it from source code;"
echo "  bash examples/replicate_small.sh trains and ranks it (benchmarks/replicate_small.py)."

summary() { grep '^TRAIN_SUMMARY' "$1" | sed 's/^TRAIN_SUMMARY //'; }
echo
echo "== quickstart done in $(( $(date +%s) - T0 ))s"
echo "pretrain (S=256, contiguous):   $(summary "$OUT/pretrain.log")"
echo "EndPrompt extension (L=2048):   $(summary "$OUT/extend.log")"
echo "control (PI x8, contiguous):    $(summary "$OUT/control.log")"
echo "long-context report: $OUT/eval/compare (compare.md, compare_perplexity.png;"
echo "  per model: report.md, perplexity_by_position.png)"
echo "checkpoints: $OUT/ckpt_base  $OUT/ckpt_endprompt  $OUT/ckpt_control"
echo "TensorBoard: tensorboard --logdir $OUT/tb   (loss curves also as $OUT/tb/*/loss_curve.png)"
