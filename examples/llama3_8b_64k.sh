#!/usr/bin/env bash
# Llama-3-8B: extend 8K -> 64K with EndPrompt on one node of 8 GPUs (the paper's setting:
# ~1B tokens of 8K sequences, PI x8, lr 2e-5 constant after 20 warmup steps, bf16).
#
#   DATA_PATH=/data/corpus_text_document TOKENIZER=/models/llama3-8b \
#   LOAD=/ckpt/llama3-8b-mcore SAVE=/ckpt/llama3-8b-64k bash examples/llama3_8b_64k.sh
#   DRY_RUN=1 bash examples/llama3_8b_64k.sh      # validate and print the plan, launch nothing
#
# LOAD is a Megatron checkpoint converted from Hugging Face with tools/convert_checkpoint.py.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
DATA_PATH=${DATA_PATH:-/data/corpus_text_document}
TOKENIZER=${TOKENIZER:-/models/llama3-8b}
LOAD=${LOAD:-/checkpoints/llama3-8b-mcore}
SAVE=${SAVE:-/checkpoints/llama3-8b-endprompt-64k}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$SAVE/tensorboard}
DRY_RUN=${DRY_RUN:-0}

DISTRIBUTED_ARGS=(
    --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
)
MODEL_ARGS=(
    --model-preset llama3-8b
    --seq-length 8192
    --max-position-embeddings 65536
    --rope-scaling-type linear --rope-scaling-factor 8
    --transformer-impl te
)
ENDPROMPT_ARGS=(
    --position-mode endprompt --target-length 65536
    --endprompt-terminal tail --endprompt-tail-length 20 --endprompt-placement fixed
)
DATA_ARGS=(
    --data-path "$DATA_PATH" --split 99,1,0
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER"
)
TRAINING_ARGS=(
    --micro-batch-size 1 --global-batch-size 64 --train-samples 122070
    --lr 2e-5 --min-lr 2e-5 --lr-warmup-samples 1280 --lr-decay-style constant
    --weight-decay 0.0 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95
    --bf16 --recompute-granularity selective --seed 1234
)
PARALLEL_ARGS=(
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1
    --sequence-parallel --use-distributed-optimizer
)
CHECKPOINT_ARGS=(--load "$LOAD" --finetune --save "$SAVE" --save-interval 200 --keep-last 3)
LOGGING_ARGS=(--log-interval 10 --eval-interval 200 --eval-iters 10 --tensorboard-dir "$TENSORBOARD_DIR")

ARGS=(
    "${MODEL_ARGS[@]}" "${ENDPROMPT_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}"
    "${PARALLEL_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" --device cuda
)

if [[ "$DRY_RUN" == 1 ]]; then
    exec python3 "$ROOT/tools/plan.py" --world-size $((GPUS_PER_NODE * NNODES)) "${ARGS[@]}"
fi
exec torchrun "${DISTRIBUTED_ARGS[@]}" -m megatron_endprompt.train "${ARGS[@]}"
