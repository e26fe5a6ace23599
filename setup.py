"""Builds mixprec for Python.

libmixprec (every kernel, CPU and CUDA) is built by CMakeLists.txt, the same build LibTorch users and
the C++ tests get, and installed into the package (lib/, include/, share/cmake/); then the small
native module mixprec._C is built with torch.utils.cpp_extension and linked against it. So each
source is compiled once, whichever door (pip or CMake) is used.

Environment:
  MIXPREC_CPU_ONLY=1           build without CUDA kernels even when nvcc and a CUDA torch are present
  MIXPREC_CUDA_ARCHS="8.0;9.0" CUDA architectures (default: 8.0;9.0)
  MIXPREC_BUILD_DIR=path       CMake build directory (default: build/cmake), reused between builds
  MIXPREC_BUILD_TESTS=1        also build the Catch2 tests there (run them with ctest --test-dir ...)
  MIXPREC_DEBUG=1              debug build
  MAX_JOBS=N                   parallel compile jobs
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent


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
    return not _flag("MIXPREC_CPU_ONLY") and torch.version.cuda is not None and _cuda_root() is not None


def _cmake() -> str:
    # CUDA_STANDARD 20 with nvcc needs CMake >= 3.26: prefer the one pip installed beside this Python.
    local = Path(sys.executable).parent / "cmake"
    return str(local) if local.exists() else (shutil.which("cmake") or "cmake")


class BuildWithLibmixprec(BuildExtension):
    """Builds and installs libmixprec with CMake into the package, then the extension modules."""

    def run(self) -> None:
        package_dir = Path(self.get_ext_fullpath("mixprec._C")).resolve().parent
        build_dir = Path(os.environ.get("MIXPREC_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        cuda = _want_cuda()
        configure = [
            _cmake(), "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if _flag('MIXPREC_DEBUG') else 'Release'}",
            f"-DMIXPREC_WITH_CUDA={'ON' if cuda else 'OFF'}",
            f"-DMIXPREC_BUILD_TESTS={'ON' if _flag('MIXPREC_BUILD_TESTS') else 'OFF'}",
            f"-DMIXPREC_CUDA_ARCHS={os.environ.get('MIXPREC_CUDA_ARCHS', '8.0;9.0')}",
        ]
        root = _cuda_root()
        if root is not None:  # torch's own CMake config looks for the toolkit even for a CPU-only libmixprec
            configure.append(f"-DCUDA_TOOLKIT_ROOT_DIR={root}")
        if cuda:
            configure.append(f"-DCMAKE_CUDA_COMPILER={root / 'bin' / 'nvcc'}")
        subprocess.check_call(configure)
        subprocess.check_call([_cmake(), "--build", str(build_dir), "-j", jobs])
        subprocess.check_call([_cmake(), "--install", str(build_dir), "--prefix", str(package_dir)])
        for ext in self.extensions:
            ext.library_dirs.append(str(package_dir / "lib"))
        super().run()


setup(
    ext_modules=[
        CppExtension(
            "mixprec._C",
            ["csrc/python/module.cpp"],
            include_dirs=[str(ROOT / "csrc" / "include")],
            libraries=["mixprec"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
            # libmixprec is installed in mixprec/lib next to this module.
            extra_link_args=["-Wl,-rpath,$ORIGIN/lib"],
        )
    ],
    cmdclass={"build_ext": BuildWithLibmixprec},
)
