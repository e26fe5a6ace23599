#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the main job: python -m mixprec.demo (fp32 vs mixed
# precision on a byte-level transformer; table in the terminal, plot in demo_out/loss.png).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${MIXPREC_VENV:-.venv}
"$VENV/bin/python" -m mixprec.demo "$@"
