#!/usr/bin/env bash
# The paper's comparison at CPU scale (benchmarks/replicate_small.py): small models pretrained at
# S0 = 128 on the embedded corpus mixed with passkey documents (three base seeds; a base below the
# S0 bar is reported, not extended), then extended 8x
# (L = 1024, YaRN) with the same token budget by full-length fine-tuning (positive control),
# short contiguous training under the same scaling (control), PoSE (paper and reference chunk
# samplers), EndPrompt (cue fixed / random, tail fixed / random) and EndPrompt+PoSE, next to PI
# only and YaRN only (no training), 3 extension seeds; the bars (base at S0, full length at L)
# checked first; passkey accuracy with intervals and perplexity by position at 1x-8x, training
# tokens/s and peak memory; a markdown table, JSON and PNG plots.
#
#   bash examples/replicate_small.sh                 # 90+ minutes on 2 CPU cores
#   bash examples/replicate_small.sh --seeds 1,2     # two extension seeds per method
#   bash examples/replicate_small.sh --quick         # a few minutes (smoke)
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
