#!/usr/bin/env bash
# Prepares a fresh machine and builds everything: a virtual environment (.venv) with torch and the
# build/test tools, Catch2 from Debian, then libmixprec (CPU + CUDA kernels when nvcc is there), the
# Python package (editable) and the Catch2 tests, all from one CMake build in build/cmake.
# Safe to re-run: finished steps are skipped or incremental.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${MIXPREC_VENV:-.venv}
export MAX_JOBS=${MAX_JOBS:-2}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "== installing Python requirements"
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r requirements-dev.txt

if [ ! -f /usr/include/catch2/catch.hpp ]; then
  echo "== installing Catch2 (Debian)"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq catch2 >/dev/null
fi

# nvcc lives in /usr/local/cuda/bin on these machines; torch finds it there, CMake through PATH.
if [ -d /usr/local/cuda/bin ]; then export PATH="$PATH:/usr/local/cuda/bin"; fi
# The package's default is every architecture from sm_80 to sm_120 plus PTX (what `pip install .` builds);
# this development build compiles what can run here, the GPU's own architecture, or sm_80 and sm_90 where
# there is no GPU. MIXPREC_CUDA_ARCHS overrides either.
if [ -z "${MIXPREC_CUDA_ARCHS:-}" ]; then
  MIXPREC_CUDA_ARCHS=$("$VENV/bin/python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" \
                       2>/dev/null || echo "8.0;9.0")
fi
export MIXPREC_CUDA_ARCHS

echo "== building libmixprec, mixprec._C and the C++ tests (MAX_JOBS=$MAX_JOBS, CUDA archs $MIXPREC_CUDA_ARCHS)"
MIXPREC_BUILD_TESTS=1 "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-build-isolation -e .
"$VENV/bin/python" -c "import mixprec; print('mixprec', mixprec.__version__, '| CUDA kernels built:', mixprec.built_with_cuda())"
