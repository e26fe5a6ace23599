#!/usr/bin/env bash
# One full check on a GPU machine (the lent H100): build from source against the torch that is
# installed there (no internet, no venv), run the CUDA tests and the benchmarks, and write the logs
# and a summary table into OUTDIR. Usage: bash scripts/gpu_check.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_check.sh OUTDIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export PATH="$PATH:/usr/local/cuda/bin"
summary="$OUT/summary.md"
{
  echo "# mixprec GPU check, $(date -u +%Y-%m-%d)"
  echo
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/- GPU: /'
  $PY -c "import torch;print('- torch', torch.__version__, '| CUDA', torch.version.cuda)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
} > "$summary"

step() {  # step NAME LOG COMMAND...
  local name=$1 log=$2; shift 2
  local t0=$(date +%s)
  "$@" > "$OUT/$log" 2>&1
  local rc=$?
  local result="ok"
  [ $rc -ne 0 ] && result="FAILED (rc $rc)"
  [ "$name" = "pytest" ] && result="$result: $(grep -E '(passed|failed)' "$OUT/$log" | tail -n 1)"
  echo "| $name | $result | $(( $(date +%s) - t0 )) |" >> "$summary"
  return $rc
}

if step build build.log env MIXPREC_BUILD_DIR=build/gpu $PY -m pip install --no-build-isolation --no-deps -e .; then
  step pytest pytest.log $PY -m pytest tests/python -q -x -p no:cacheprovider
  step bench_unscale bench_unscale.log $PY benchmarks/bench_unscale.py --device cuda
  step bench_cast bench_cast.log $PY benchmarks/bench_cast.py --device cuda
  step bench_adam bench_adam.log $PY benchmarks/bench_adam.py --device cuda --size 1b
  # The CUDA kernels under compute-sanitizer (memory errors, then shared-memory races).
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool" sanitizer_$tool.log compute-sanitizer --tool $tool --error-exitcode 9 \
      $PY -m pytest -q -x -p no:cacheprovider -k cuda tests/python/test_unscale_and_check.py tests/python/test_cast.py \
      tests/python/test_adam.py
  done
fi
for f in "$OUT"/bench_*.log; do
  [ -f "$f" ] && { echo; echo "## $(basename "$f" .log)"; echo '```'; cat "$f"; echo '```'; } >> "$summary"
done
cat "$summary"
