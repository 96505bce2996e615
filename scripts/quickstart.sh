#!/usr/bin/env bash
# Sets up the runtime environment and runs the CPU quickstart (examples/quickstart_cpu.sh).
#   bash scripts/quickstart.sh [--smoke]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
bash examples/quickstart_cpu.sh "$@"
