#!/usr/bin/env bash
# Packaging as users install: builds a wheel with `pip wheel` (reusing the CMake build directory of
# scripts/setup.sh, so nothing is compiled twice), installs it into a fresh virtual environment that holds
# only torch, and runs a smoke test there from outside the source tree: a converted bf16 model trained with
# mixprec.GradScaler and mixprec.optim.AdamW, the recorded torch version, py.typed, the CMake prefix.
# Expects the environment of scripts/setup.sh. MIXPREC_WHEEL_DIR keeps the wheel (default: a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MIXPREC_VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
if [ -d /usr/local/cuda/bin ]; then export PATH="$PATH:/usr/local/cuda/bin"; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
wheels=${MIXPREC_WHEEL_DIR:-$work/wheels}
# The settings setup.sh configured the build directory with, so the wheel's build finds it up to date.
build_dir=${MIXPREC_BUILD_DIR:-build/cmake}
if [ -z "${MIXPREC_CUDA_ARCHS:-}" ] && [ -f "$build_dir/CMakeCache.txt" ]; then
  MIXPREC_CUDA_ARCHS=$(sed -n 's/^MIXPREC_CUDA_ARCHS:[A-Z]*=//p' "$build_dir/CMakeCache.txt")
fi
export MAX_JOBS=${MAX_JOBS:-2} MIXPREC_BUILD_TESTS=1 MIXPREC_CUDA_ARCHS=${MIXPREC_CUDA_ARCHS:-8.0;9.0}
echo "== pip wheel"
"$VENV/bin/pip" wheel --quiet --disable-pip-version-check --no-build-isolation --no-deps -w "$wheels" .
wheel=$(ls "$wheels"/mixprec-*.whl)
echo "== a fresh venv with only torch, then the wheel ($(basename "$wheel"))"
torch_pin=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
"$VENV/bin/python" -m venv "$work/venv"  # the same Python as the wheel's tag
"$work/venv/bin/pip" install --quiet --disable-pip-version-check "torch==$torch_pin"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "$wheel"
echo "== smoke test"
cd "$work"
"$work/venv/bin/python" - <<'PY'
import os, torch, mixprec
from mixprec import _build_info

assert _build_info.TORCH_VERSION == torch.__version__, (_build_info.TORCH_VERSION, torch.__version__)
package = os.path.dirname(mixprec.__file__)
assert os.path.exists(os.path.join(package, "py.typed"))
assert os.path.exists(os.path.join(mixprec.cmake_prefix_path, "mixprec", "mixprecConfig.cmake"))
torch.manual_seed(0)
model = mixprec.nn.convert(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1)))
model = model.bfloat16()
opt = mixprec.optim.AdamW(model.parameters(), lr=1e-2)
scaler = mixprec.GradScaler("cpu", init_scale=1024.0)
x = torch.randn(64, 16)
y = x.sum(1, keepdim=True)
losses = []
for _ in range(60):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x.bfloat16()).float(), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    losses.append(loss.item())
assert model[0].weight.dtype == torch.bfloat16 and opt.state[model[0].weight]["master"].dtype == torch.float32
assert losses[-1] < 0.2 * losses[0], losses[::10]
print(f"wheel OK: mixprec {mixprec.__version__} for torch {_build_info.TORCH_VERSION}, CUDA kernels "
      f"{mixprec.built_with_cuda()}, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
PY
