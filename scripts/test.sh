#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs every test: pytest, then the Catch2 suite and the
# installed-package example through ctest. CUDA tests skip, with the reason, on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${MIXPREC_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"

echo "== pytest"
python -m pytest tests/python -q
echo "== ctest"
ctest --test-dir "${MIXPREC_BUILD_DIR:-build/cmake}" --output-on-failure
