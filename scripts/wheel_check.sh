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
# The same Python as the wheel's tag; no pip or setuptools of its own (the build venv's pip installs into
# it), so what it can import is the wheel and the torch below.
"$VENV/bin/python" -m venv --without-pip "$work/venv"
pip_there=("$VENV/bin/pip" --python "$work/venv/bin/python" --disable-pip-version-check)
# torch and its dependencies, and nothing else, come from the build's venv: links to exactly those
# distributions (their code and .dist-info) in one directory that the fresh venv sees through a .pth
# file. Installing the 5 GB torch again took 100 s, most of this step.
site=$("$work/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$VENV/bin/python" - "$work/torch-only" <<'PY' > "$site/torch-only.pth"
import os, sys
from importlib import metadata
from packaging.requirements import Requirement

dest = sys.argv[1]
os.makedirs(dest)
todo, seen, linked = ["torch"], set(), set()
while todo:
    dist = metadata.distribution(todo.pop())
    name = dist.metadata["Name"].lower().replace("_", "-")
    if name in seen:
        continue
    seen.add(name)
    for req in map(Requirement, dist.requires or []):
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            todo.append(req.name)
    for f in dist.files or []:
        top = f.parts[0]
        if top not in linked and not top.startswith("..") and top != "__pycache__":
            linked.add(top)
            os.symlink(os.path.join(dist.locate_file(""), top), os.path.join(dest, top))
print(dest)
PY
# One copy of the library: a wheel stores symlinks (libmixprec.so -> .so.0 -> .so.0.1.0) as full copies.
libs=$("$VENV/bin/python" -c "import sys, zipfile; print(' '.join(n for n in zipfile.ZipFile(sys.argv[1]).namelist() if '/lib/libmixprec' in n))" "$wheel")
[ "$libs" = "mixprec/lib/libmixprec.so" ] || { echo "the wheel holds $libs, not one mixprec/lib/libmixprec.so" >&2; exit 1; }
"${pip_there[@]}" install --quiet --no-deps "$wheel"
"${pip_there[@]}" check  # the wheel's torch requirement, and torch's own, are met
echo "== smoke test"
cd "$work"
WHEEL_VENV="$work/venv" "$work/venv/bin/python" - <<'PY'
import os, torch, mixprec
from mixprec import _build_info

assert _build_info.TORCH_VERSION == torch.__version__, (_build_info.TORCH_VERSION, torch.__version__)
package = os.path.dirname(mixprec.__file__)
assert os.path.realpath(package).startswith(os.path.realpath(os.environ["WHEEL_VENV"])), package  # the wheel, not the source
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
