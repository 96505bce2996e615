#!/usr/bin/env bash
# Llama-3-70B: extend 8K -> 64K with EndPrompt on several nodes of 8 GPUs (torchrun rendezvous).
# Physical sequences stay 8K, so TP 8 x PP 4 fits without context parallelism.
#
# On every node (e.g. from a Slurm script: NNODES=$SLURM_NNODES, NODE_RANK=$SLURM_NODEID,
# RDZV_ENDPOINT=<first node>:29400):
#   NNODES=4 NODE_RANK=0 RDZV_ENDPOINT=node0:29400 DATA_PATH=... TOKENIZER=... LOAD=... SAVE=... \
#       bash examples/llama3_70b_64k.sh
#   DRY_RUN=1 NNODES=4 bash examples/llama3_70b_64k.sh     # validate and print the plan only
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-4}
NODE_RANK=${NODE_RANK:-0}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-localhost:29400}
RDZV_ID=${RDZV_ID:-endprompt-llama3-70b}
DATA_PATH=${DATA_PATH:-/data/corpus_text_document}
TOKENIZER=${TOKENIZER:-/models/llama3-70b}
LOAD=${LOAD:-/checkpoints/llama3-70b-mcore}
SAVE=${SAVE:-/checkpoints/llama3-70b-endprompt-64k}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$SAVE/tensorboard}
DRY_RUN=${DRY_RUN:-0}

DISTRIBUTED_ARGS=(
    --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID"
)
MODEL_ARGS=(
    --model-preset llama3-70b
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
    --lr 1e-5 --min-lr 1e-5 --lr-warmup-samples 1280 --lr-decay-style constant
    --weight-decay 0.0 --clip-grad 1.0 --bf16
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
    --seed 1234
)
PARALLEL_ARGS=(
    --tensor-model-parallel-size 8 --pipeline-model-parallel-size 4
    --num-layers-per-virtual-pipeline-stage 5
    --sequence-parallel --use-distributed-optimizer
)
CHECKPOINT_ARGS=(--load "$LOAD" --finetune --save "$SAVE" --save-interval 100 --keep-last 2)
LOGGING_ARGS=(--log-interval 5 --eval-interval 200 --eval-iters 5 --tensorboard-dir "$TENSORBOARD_DIR")

ARGS=(
    "${MODEL_ARGS[@]}" "${ENDPROMPT_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}"
    "${PARALLEL_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" --device cuda
)

if [[ "$DRY_RUN" == 1 ]]; then
    exec python3 "$ROOT/tools/plan.py" --world-size $((GPUS_PER_NODE * NNODES)) "${ARGS[@]}"
fi
exec torchrun "${DISTRIBUTED_ARGS[@]}" -m megatron_endprompt.train "${ARGS[@]}"
