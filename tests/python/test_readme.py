"""The README's code runs as written: its Python snippets in order, in a fresh process; its C++ quick start
(the CMakeLists.txt and main.cpp blocks) is an example that ctest builds against the installed package and
runs, and this checks that the two are the same text."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_python_snippets_run_in_order(tmp_path) -> None:
    code = "\n".join(blocks("python"))
    assert "mixprec.GradScaler" in code and "mixprec.Policy" in code
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=600)


def test_cpp_quick_start_is_the_example_ctest_builds() -> None:
    """The README's CMakeLists.txt and main.cpp are examples/cpp/quick_start verbatim, which ctest builds
    against the installed package and runs (example_build, example_quick_start in tests/cpp)."""
    cmake_lists, = [b for b in blocks("cmake") if "add_executable" in b]
    main, = [b for b in blocks("cpp") if "int main" in b]
    assert "CMAKE_CXX_STANDARD" not in cmake_lists  # the target itself must carry C++20
    example = README.parent / "examples" / "cpp" / "quick_start"
    assert (example / "CMakeLists.txt").read_text() == cmake_lists
    assert (example / "main.cpp").read_text() == main
    assert "add_subdirectory(quick_start)" in (example.parent / "CMakeLists.txt").read_text()
    assert "quick_start/app" in (README.parent / "tests" / "cpp" / "CMakeLists.txt").read_text()
