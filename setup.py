"""Builds mixprec for Python.

libmixprec (every kernel, CPU and CUDA) is built by CMakeLists.txt, the same build LibTorch users and
the C++ tests get, and installed into the package (lib/, include/, share/cmake/); then the small
native module mixprec._C is built with torch.utils.cpp_extension and linked against it. So each
source is compiled once, whichever door (pip or CMake) is used. The build records the torch it compiled
against (mixprec/_build_info.py) and requires that minor release in the wheel's metadata; importing under
another torch release fails with both versions named.

Needs torch, setuptools, and CMake >= 3.22 (pip's `cmake` package or the system's); uses Ninja when it
is there. With `pip install .` (build isolation) pip brings them; with `--no-build-isolation` they come
from the environment: `pip install setuptools cmake ninja` if it lacks them.

Environment:
  MIXPREC_CPU_ONLY=1           build without CUDA kernels even when nvcc and a CUDA torch are present
  MIXPREC_REQUIRE_CUDA=1       fail instead of warning when torch has CUDA but no CUDA toolkit is found
  MIXPREC_CUDA_ARCHS="8.0;9.0" CUDA architectures (default: 8.0;8.6;8.9;9.0;10.0;12.0+PTX)
  MIXPREC_BUILD_DIR=path       CMake build directory (default: build/cmake), reused between builds
  MIXPREC_BUILD_TESTS=1        also build the Catch2 tests there (run them with ctest --test-dir ...)
  MIXPREC_DEBUG=1              debug build
  MAX_JOBS=N                   parallel compile jobs
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent
MIN_CMAKE = (3, 22)
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0;10.0;12.0+PTX"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "off", "no")


def _cuda_root() -> Path | None:
    """The CUDA toolkit's real root. torch's CUDA_HOME guess comes from the first nvcc on PATH and is
    wrong when that is a wrapper script (e.g. /usr/local/bin/nvcc -> /usr/local)."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda", CUDA_HOME):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists() and (Path(candidate) / "include" / "cuda_runtime.h").exists():
            return Path(candidate)
    return None


def _want_cuda() -> bool:
    if _flag("MIXPREC_CPU_ONLY") or torch.version.cuda is None:
        return False
    if _cuda_root() is None:
        message = (f"torch {torch.__version__} has CUDA {torch.version.cuda}, but no CUDA toolkit (nvcc) was found "
                   "(looked at $CUDA_HOME, $CUDA_PATH, /usr/local/cuda and PATH): mixprec is being built WITHOUT its "
                   "CUDA kernels, and its ops will refuse CUDA tensors. Install the CUDA toolkit or set CUDA_HOME; "
                   "MIXPREC_CPU_ONLY=1 builds CPU-only on purpose, MIXPREC_REQUIRE_CUDA=1 makes this an error.")
        if _flag("MIXPREC_REQUIRE_CUDA"):
            raise RuntimeError(message)
        warnings.warn(message)
        print(f"WARNING: {message}", file=sys.stderr, flush=True)
        return False
    return True


def _version_of(cmake: str) -> tuple[int, ...]:
    out = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"version (\d+)\.(\d+)", out)
    return tuple(int(x) for x in match.groups()) if match else (0,)


def _cmake() -> str:
    """pip's cmake beside this Python first (the isolated build env's, or the venv's), then PATH's."""
    found = []
    for candidate in (Path(sys.executable).parent / "cmake", shutil.which("cmake")):
        if candidate and Path(candidate).exists():
            version = _version_of(str(candidate))
            if version >= MIN_CMAKE:
                return str(candidate)
            found.append(f"{candidate} ({'.'.join(map(str, version))})")
    raise RuntimeError(
        f"mixprec needs CMake >= {'.'.join(map(str, MIN_CMAKE))} to build libmixprec; found "
        f"{', '.join(found) or 'none'}. Install it with `pip install cmake` (or your system's package manager).")


def _generator_args(build_dir: Path) -> list[str]:
    """Ninja where there is one (pip's or the system's); CMake's default generator otherwise. A build
    directory keeps the generator it was first configured with."""
    if (build_dir / "CMakeCache.txt").exists():
        return []
    for candidate in (Path(sys.executable).parent / "ninja", shutil.which("ninja")):
        if candidate and Path(candidate).exists():
            return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={candidate}"]
    return []


def _write_build_info(package_dir: Path, cuda: bool, archs: str) -> None:
    (package_dir / "_build_info.py").write_text(
        '"""Written by setup.py: what this build of mixprec was compiled against."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA = {torch.version.cuda!r}\n"
        f"WITH_CUDA = {cuda!r}\n"
        f"CUDA_ARCHS = {archs if cuda else ''!r}\n")


class BuildWithLibmixprec(BuildExtension):
    """Builds and installs libmixprec with CMake into the package, then the extension modules."""

    def run(self) -> None:
        package_dir = Path(self.get_ext_fullpath("mixprec._C")).resolve().parent
        package_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(os.environ.get("MIXPREC_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        cuda = _want_cuda()
        archs = os.environ.get("MIXPREC_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        cmake = _cmake()
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), *_generator_args(build_dir),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if _flag('MIXPREC_DEBUG') else 'Release'}",
            f"-DMIXPREC_WITH_CUDA={'ON' if cuda else 'OFF'}",
            f"-DMIXPREC_BUILD_TESTS={'ON' if _flag('MIXPREC_BUILD_TESTS') else 'OFF'}",
            f"-DMIXPREC_CUDA_ARCHS={archs}",
            # One libmixprec.so file: a wheel stores each of the versioned symlinks as a full copy.
            "-DMIXPREC_VERSIONED_SONAME=OFF",
        ]
        root = _cuda_root()
        if root is not None:  # torch's own CMake config looks for the toolkit even for a CPU-only libmixprec
            configure.append(f"-DCUDA_TOOLKIT_ROOT_DIR={root}")
        if cuda:
            configure.append(f"-DCMAKE_CUDA_COMPILER={root / 'bin' / 'nvcc'}")
        subprocess.check_call(configure)
        subprocess.check_call([cmake, "--build", str(build_dir), "-j", jobs])
        subprocess.check_call([cmake, "--install", str(build_dir), "--prefix", str(package_dir)])
        _write_build_info(package_dir, cuda, archs)
        for ext in self.extensions:
            ext.library_dirs.append(str(package_dir / "lib"))
        super().run()


def _torch_requirement() -> str:
    """The torch minor release this build is compiled against: the only one its binary works with."""
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return f"torch>={major}.{minor},<{major}.{minor + 1}"


setup(
    install_requires=[_torch_requirement()],
    ext_modules=[
        CppExtension(
            "mixprec._C",
            ["csrc/python/module.cpp"],
            include_dirs=[str(ROOT / "csrc" / "include"), str(ROOT / "csrc")],  # csrc: the custom classes' headers
            libraries=["mixprec"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
            # libmixprec is installed in mixprec/lib next to this module.
            extra_link_args=["-Wl,-rpath,$ORIGIN/lib"],
        )
    ],
    cmdclass={"build_ext": BuildWithLibmixprec},
)
