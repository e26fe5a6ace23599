#!/usr/bin/env bash
# Builds libmixprec's host code and the Catch2 suite with AddressSanitizer + UndefinedBehaviorSanitizer
# (CPU only, in build/sanitize) and runs the suite. The CUDA kernels are checked with compute-sanitizer
# on a GPU machine instead. Expects the environment of scripts/setup.sh (.venv with torch and cmake).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MIXPREC_VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
export PATH="$VENV/bin:$PATH"
BUILD=${MIXPREC_SANITIZE_DIR:-build/sanitize}
TORCH_PREFIX=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
# -O1 -g1: ASan's recommended optimisation, and line tables only (what its reports need): full debug
# info for torch's templates would double the build time.
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Sanitize -DCMAKE_CXX_FLAGS_SANITIZE="-O1 -g1" \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DMIXPREC_WITH_CUDA=OFF -DMIXPREC_SANITIZE=ON -DMIXPREC_BUILD_TESTS=ON > "$BUILD.configure.log" 2>&1 \
  || { cat "$BUILD.configure.log"; exit 1; }
# Leak checking is off: libtorch's own process-lifetime allocations would be reported as leaks.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
cmake --build "$BUILD" -j "${MAX_JOBS:-2}" --target mixprec_cpp_tests
"$BUILD/tests/cpp/mixprec_cpp_tests" --reporter compact --success 2>&1 | tail -n 3
