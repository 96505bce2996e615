#!/usr/bin/env bash
# Installs megatron_endprompt (editable) into the active Python, with the given extras.
#
#   bash scripts/setup.sh            # runtime only
#   bash scripts/setup.sh dev        # + tests, linters, plots, Hugging Face reference
#
# torch is installed only when it is missing, and then as the pinned CPU-capable release that this
# project is tested with. An existing torch (an NGC container's CUDA build, say) is never replaced.
set -euo pipefail

EXTRAS=${1:-}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] torch not found: installing torch==${TORCH_VERSION}"
    "$PYTHON" -m pip install --quiet "torch==${TORCH_VERSION}"
else
    echo "[setup] using existing torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
fi

TARGET="$ROOT"
if [[ -n "$EXTRAS" ]]; then
    TARGET="${ROOT}[${EXTRAS}]"
fi
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e "$TARGET"
echo "[setup] megatron_endprompt installed ($("$PYTHON" -c 'import megatron.core; print("megatron-core", megatron.core.__version__)'))"
