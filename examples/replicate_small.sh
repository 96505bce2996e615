#!/usr/bin/env bash
# The paper's comparison at CPU scale (benchmarks/replicate_small.py): a small model pretrained at
# S0 = 128 on the embedded corpus mixed with passkey documents, then extended 8x (L = 1024, YaRN)
# with the same token budget by full-length fine-tuning, PoSE, EndPrompt (cue fixed / cue random
# / tail fixed) and EndPrompt+PoSE, next to PI only and YaRN only (no training); passkey accuracy
# and perplexity by position at 1x-8x, training tokens/s and peak memory; a markdown table, JSON
# and PNG plots.
#
#   bash examples/replicate_small.sh                 # ~30 minutes on 2 CPU cores
#   bash examples/replicate_small.sh --seeds 1,2     # two extension seeds per method
#   bash examples/replicate_small.sh --quick         # about a minute (smoke)
#   bash examples/replicate_small.sh --resume        # continue an interrupted run
#
# Environment: OUT (output folder, default outputs/replicate_small), PYTHON.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$ROOT/outputs/replicate_small}
for arg in "$@"; do
    if [[ "$arg" == "--quick" ]]; then OUT=${OUT}_quick; fi
done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
cd "$ROOT"
exec "$PYTHON" benchmarks/replicate_small.py --output "$OUT" "$@"
