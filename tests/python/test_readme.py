"""The README's code runs as written: its Python snippets in order, in a fresh process, and its C++ quick
start (the CMakeLists.txt and main.cpp blocks, verbatim) configured against the installed package, built
and run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mixprec

README = Path(__file__).resolve().parents[2] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL)


def cmake() -> str:
    local = Path(sys.executable).parent / "cmake"
    found = str(local) if local.exists() else shutil.which("cmake")
    if found is None:
        pytest.skip("no cmake to build the C++ quick start with")
    return found


def test_python_snippets_run_in_order(tmp_path) -> None:
    code = "\n".join(blocks("python"))
    assert "mixprec.GradScaler" in code and "mixprec.Policy" in code
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=600)


def test_cpp_quick_start_builds_and_runs_as_written(tmp_path) -> None:
    cmake_lists, = [b for b in blocks("cmake") if "add_executable" in b]
    main, = [b for b in blocks("cpp") if "int main" in b]
    assert "CMAKE_CXX_STANDARD" not in cmake_lists  # the target itself must carry C++20
    (tmp_path / "CMakeLists.txt").write_text(cmake_lists)
    (tmp_path / "main.cpp").write_text(main)
    prefix = f"{mixprec.cmake_prefix_path};{torch.utils.cmake_prefix_path}"
    env = dict(os.environ, PATH=f"{os.environ.get('PATH', '')}:/usr/local/cuda/bin")
    build = tmp_path / "build"
    subprocess.run([cmake(), "-S", str(tmp_path), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}",
                    "-DCMAKE_BUILD_TYPE=Release"], check=True, env=env, timeout=600)
    subprocess.run([cmake(), "--build", str(build), "-j", os.environ.get("MAX_JOBS", "2")], check=True, env=env,
                   timeout=900)
    subprocess.run([str(build / "app")], check=True, cwd=tmp_path, timeout=300)
    assert (tmp_path / "opt.pt").stat().st_size > 0
