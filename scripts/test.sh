#!/usr/bin/env bash
# Sets up the dev environment and runs the test suite (CPU; GPU tests skip without CUDA).
#   bash scripts/test.sh [extra pytest args]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh dev
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pytest -q -p no:cacheprovider "$@" tests
