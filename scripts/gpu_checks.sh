#!/usr/bin/env bash
# The GPU checks, as one prepared script for a machine with CUDA (run from the repository root):
#   1. install (dev extras; Transformer Engine only if it is already importable or TE=1)
#   2. tests/gpu (TE spec bf16/FP8, fused vs unfused RoPE, local vs TE logits)
#   3. bench_rope on the GPU with the local and the TE spec
#   4. a short training run on the CUDA path (megatron-core DDP, optimizer, schedules, bf16,
#      dist_checkpointing save + resume) on a byte-level copy of the embedded corpus
# Everything it prints also goes to ${OUT:-outputs/gpu_checks}/gpu_checks.log.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$ROOT/outputs/gpu_checks}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_checks.log") 2>&1

step() { echo; echo "== $*"; }

step "setup"
bash scripts/setup.sh dev
if [[ "${TE:-0}" == 1 ]] && ! "$PYTHON" -c "import transformer_engine" 2>/dev/null; then
    timeout 900 "$PYTHON" -m pip install --quiet "transformer-engine[pytorch]" || echo "TE install failed"
fi
"$PYTHON" - <<'PY'
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
print("transformer_engine", importlib.util.find_spec("transformer_engine") is not None)
PY

step "tests/gpu"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu -rs

step "bench_rope (cuda, local spec)"
"$PYTHON" benchmarks/bench_rope.py --device cuda --impl local
if "$PYTHON" -c "import transformer_engine" 2>/dev/null; then
    step "bench_rope (cuda, TE spec)"
    "$PYTHON" benchmarks/bench_rope.py --device cuda --impl te
fi

step "CUDA training path: 20 iterations, save at 10, resume to 20"
DATA="$OUT/data"
mkdir -p "$DATA"
"$PYTHON" tools/prepare_corpus.py --output "$DATA/corpus.jsonl" --max-docs 200
"$PYTHON" tools/preprocess_data.py --input "$DATA/corpus.jsonl" --output-prefix "$DATA/stdlib" \
    --tokenizer-type ByteTokenizer --append-eod --no-progress
TRAIN=(
    -m megatron_endprompt.train --device cuda --model-preset tiny --tokenizer-type ByteTokenizer
    --data-path "$DATA/stdlib_text_document" --data-cache-path "$DATA/cache" --split 98,2,0
    --seq-length 256 --max-position-embeddings 2048 --target-length 2048
    --rope-scaling-type linear --rope-scaling-factor 8 --position-mode endprompt
    --micro-batch-size 4 --global-batch-size 16 --lr 1e-3 --lr-decay-style cosine
    --lr-decay-iters 20 --log-interval 5 --eval-iters 2 --bf16 --train-iters 20
)
rm -rf "$OUT/ckpt"
"$PYTHON" "${TRAIN[@]}" --save "$OUT/ckpt" --exit-interval 10
"$PYTHON" "${TRAIN[@]}" --save "$OUT/ckpt" --load "$OUT/ckpt"
"$PYTHON" "${TRAIN[@]}" --save "$OUT/ckpt_straight"
echo "compare the iteration-15/20 losses of the resumed and the straight run above"
