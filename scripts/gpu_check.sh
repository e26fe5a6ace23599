#!/usr/bin/env bash
# One full check on a GPU machine (a lent H100/H200): build from source against the torch that is
# installed there (no internet, no venv), run the whole pytest suite (CUDA tests included), the
# benchmarks and compute-sanitizer over the CUDA kernels, and write the logs and a summary table into
# OUTDIR (six files: summary.md, build.log, debug.log, pytest.log, benchmarks.log, sanitizer.log).
# Every step is time-boxed so the whole check ends inside one device call (about 8 minutes).
# Usage: bash scripts/gpu_check.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_check.sh OUTDIR}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1
export PATH="$PATH:/usr/local/cuda/bin"
# Only the architecture of the card in the machine: halves the CUDA compile time of the check.
export MIXPREC_CUDA_ARCHS=${MIXPREC_CUDA_ARCHS:-$($PY -c "import torch;print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "8.0;9.0")}
summary="$OUT/summary.md"
{
  echo "# mixprec GPU check, $(date -u +%Y-%m-%d)"
  echo
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/- GPU: /'
  $PY -c "import torch;print('- torch', torch.__version__, '| CUDA', torch.version.cuda)"
  # The device tool copies the working tree; the .git it carries may be older than the tree.
  echo "- source: the working tree (git HEAD there says $(git rev-parse --short HEAD 2>/dev/null || echo unknown)), archs $MIXPREC_CUDA_ARCHS"
  echo "- $(g++ --version | head -n 1); LDFLAGS='${LDFLAGS:-}' CXXFLAGS='${CXXFLAGS:-}'"
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
} > "$summary"

step() {  # step NAME LOG SECONDS COMMAND...   (appends to LOG)
  local name=$1 log=$2 limit=$3; shift 3
  local t0=$(date +%s)
  echo "===== $name: $*" >> "$OUT/$log"
  timeout "$limit" "$@" >> "$OUT/$log" 2>&1
  local rc=$?
  local result="ok"
  [ $rc -eq 124 ] && result="TIMED OUT after ${limit}s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && result="FAILED (rc $rc)"
  echo "| $name | $result | $(( $(date +%s) - t0 )) |" >> "$summary"
  return $rc
}

xdist=""
$PY -c "import xdist" 2>/dev/null && xdist="-n 12 --max-worker-restart=1000"
if step build build.log 240 env MIXPREC_BUILD_DIR=build/gpu $PY -m pip install --no-build-isolation --no-deps -e .; then
  # A C++ error must reach Python as a RuntimeError in a fresh process; where it crashes instead, take a
  # native backtrace of the crash with cuda-gdb (the machine has no gdb) into debug.log.
  errors='import torch, mixprec
for f in (lambda: mixprec.ops.cast(torch.arange(3), torch.float16),
          lambda: mixprec.ops.update_scale_(torch.ones(1), torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), torch.zeros(1), -2.0, 0.5, 10),
          lambda: mixprec.GradScaler("cpu", hysteresis=0)):
    try:
        f()
        raise SystemExit("no error raised")
    except RuntimeError as e:
        print("ok:", str(e).splitlines()[0])'
  readelf -d build/gpu/libmixprec.so | grep NEEDED >> "$OUT/debug.log" 2>&1
  if ! step "C++ errors reach Python" debug.log 60 $PY -X faulthandler -c "$errors"; then
    { gcc --version | head -n 1; ldd build/gpu/libmixprec.so* 2>/dev/null | head -n 40; } >> "$OUT/debug.log" 2>&1
    step "backtrace of the crash" debug.log 150 cuda-gdb -batch -ex run -ex bt -ex "info sharedlibrary" --args $PY -c "$errors"
  fi
  step pytest pytest.log 240 env OMP_NUM_THREADS=2 $PY -m pytest tests/python -q -ra $xdist -p no:cacheprovider
  { echo; echo "pytest: $(grep -E '[0-9]+ (passed|failed)' "$OUT/pytest.log" | tail -n 1)";
    grep -E '^(FAILED|ERROR) ' "$OUT/pytest.log" | head -n 40; } >> "$summary"
  for b in wgrad adam unscale cast fp8 int8 overhead e2e monitor; do
    [ -f benchmarks/bench_$b.py ] || continue
    args="--device cuda"; [ $b = adam ] && args="$args --size 1b"; [ $b = monitor ] && args="$args --size small"
    step "bench_$b" benchmarks.log 120 $PY benchmarks/bench_$b.py $args
  done
  # Host cost with the caches cold, as after a forward and backward pass (warm figures understate it).
  step "bench_overhead --cold" benchmarks.log 90 $PY benchmarks/bench_overhead.py --device cuda --cold --repeats 50
  # cuBLASLt's block-scale modes are opt-in until checked on a GPU: the FP8 benchmark again with them on (the
  # pytest run above checked them against float64 in test_cuda_block_scaled_gemms_in_cublaslt).
  step "bench_fp8 with MIXPREC_FP8_BLOCK_CUBLASLT=1" benchmarks.log 120 env MIXPREC_FP8_BLOCK_CUBLASLT=1 \
    $PY benchmarks/bench_fp8.py --device cuda
  # Issue 13's end-to-end goal: a GPT-2-medium-size step with FP8 Linears against the same in bf16.
  step "bench_e2e gpt2-medium FP8" benchmarks.log 90 $PY benchmarks/bench_e2e.py --device cuda --size gpt2-medium \
    --steps 10 --variants mixprec-bf16,mixprec-bf16-fp8
  # The CUDA kernels under compute-sanitizer: memory errors, then shared-memory races.
  sel="cuda and not properties"
  # MIXPREC_SANITIZERS picks the tools (a short lease can run memcheck alone).
  for tool in ${MIXPREC_SANITIZERS:-memcheck racecheck}; do
    step "compute-sanitizer $tool" sanitizer.log 120 compute-sanitizer --tool $tool --error-exitcode 9 \
      $PY -m pytest -q -x -p no:cacheprovider -k "$sel" tests/python/test_unscale_and_check.py \
      tests/python/test_cast.py tests/python/test_adam.py tests/python/test_fp8.py tests/python/test_int8.py tests/python/test_monitor.py $(ls tests/python/test_wgrad.py 2>/dev/null)
  done
  grep -E "ERROR SUMMARY|========= (Invalid|Race|Error)" "$OUT/sanitizer.log" | sort | uniq -c | head -n 20 >> "$summary"
else
  tail -n 60 "$OUT/build.log" >> "$summary"
fi
{ echo; echo '## benchmarks'; echo '```'; cat "$OUT/benchmarks.log" 2>/dev/null; echo '```'; } >> "$summary"
cat "$summary"
