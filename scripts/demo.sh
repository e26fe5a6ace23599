#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${MIXPREC_VENV:-.venv}
"$VENV/bin/python" examples/python/loss_scaling.py "$@"
