#!/usr/bin/env bash
# Builds libmixprec's host code with AddressSanitizer + UndefinedBehaviorSanitizer (CPU only, in
# build/sanitize) and runs the Catch2 suite of the main build (scripts/setup.sh) against it: the suite's
# executable finds libmixprec through its RUNPATH, which LD_LIBRARY_PATH overrides, and the sanitizer
# runtimes are preloaded because the executable itself is not instrumented. The library is what is under
# test; building the suite a second time with the sanitizers would double this step's time. The CUDA
# kernels are checked with compute-sanitizer on a GPU machine instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MIXPREC_VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
export PATH="$VENV/bin:$PATH"
BUILD=${MIXPREC_SANITIZE_DIR:-build/sanitize}
case "$BUILD" in /*) ;; *) BUILD="$PWD/$BUILD" ;; esac
SUITE=${MIXPREC_BUILD_DIR:-build/cmake}/tests/cpp/mixprec_cpp_tests
[ -x "$SUITE" ] || { echo "no Catch2 suite at $SUITE: run scripts/setup.sh first" >&2; exit 1; }
TORCH_PREFIX=$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')
# -O0 and no debug info: the instrumented build is this step's cost (4 minutes of a 2-core CI at -O1 -g1,
# 30% less so), while the suite runs in seconds either way. Reports still name the functions; for file
# and line, rebuild with MIXPREC_SANITIZE_FLAGS="-O1 -g1". (-Wno-psabi: GCC's note on passing AVX2 vectors,
# which it prints where -O0 leaves a helper uninlined.)
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Sanitize -DCMAKE_CXX_FLAGS_SANITIZE="${MIXPREC_SANITIZE_FLAGS:--O0 -Wno-psabi}" \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DMIXPREC_WITH_CUDA=OFF -DMIXPREC_SANITIZE=ON -DMIXPREC_BUILD_TESTS=OFF -DMIXPREC_VERSIONED_SONAME=OFF \
  > "$BUILD.configure.log" 2>&1 \
  || { cat "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" -j "${MAX_JOBS:-2}" --target mixprec
export LD_LIBRARY_PATH="$BUILD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Refuse to report a pass for the uninstrumented library (a linker that wrote DT_RPATH would win over
# LD_LIBRARY_PATH). Both builds name it libmixprec.so (setup.py's MIXPREC_VERSIONED_SONAME=OFF).
loaded=$(ldd "$SUITE" | awk '/libmixprec/ {print $3}')
[ "$loaded" = "$BUILD/libmixprec.so" ] || { echo "the suite loads $loaded, not the sanitized library" >&2; exit 1; }
# Leak checking is off: libtorch's own process-lifetime allocations would be reported as leaks.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
CXX=${CXX:-g++}
if LD_PRELOAD="$($CXX -print-file-name=libasan.so) $($CXX -print-file-name=libubsan.so)" \
     "$SUITE" --reporter compact --success > "$BUILD.log" 2>&1; then
  tail -n 2 "$BUILD.log"
else
  tail -n 80 "$BUILD.log"; echo "the Catch2 suite failed under ASan + UBSan (whole log: $BUILD.log)" >&2; exit 1
fi
