#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs every test: pytest, then the Catch2 suite and the
# installed-package examples through ctest, then the Catch2 suite again against libmixprec built with
# AddressSanitizer and UndefinedBehaviorSanitizer (scripts/sanitize.sh; MIXPREC_SKIP_SANITIZE=1 skips it), then the wheel
# installed into a fresh venv (scripts/wheel_check.sh; MIXPREC_SKIP_WHEEL=1 skips it). CUDA tests skip,
# with the reason, on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
phase() { echo "== $1 (at $(( $(date +%s) - t0 )) s)"; }
bash scripts/setup.sh
VENV=${MIXPREC_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"

phase pytest
python -m pytest tests/python -q
phase ctest
ctest --test-dir "${MIXPREC_BUILD_DIR:-build/cmake}" --output-on-failure -j "${MAX_JOBS:-2}"
if [ "${MIXPREC_SKIP_SANITIZE:-0}" = "0" ]; then
  phase "Catch2 suite under ASan + UBSan"
  bash scripts/sanitize.sh
fi
if [ "${MIXPREC_SKIP_WHEEL:-0}" = "0" ]; then
  phase "the wheel in a fresh venv"
  bash scripts/wheel_check.sh
fi
phase done
