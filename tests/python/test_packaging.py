"""What the build records and checks: the torch it was compiled against (import and the CMake package refuse
another release, naming both), py.typed, a CUDA build that needs a CUDA torch, and an sdist that holds what a
build from it needs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import mixprec
from mixprec import _torch_mismatch

PACKAGE = Path(mixprec.__file__).parent


def test_the_build_records_its_torch() -> None:
    from mixprec import _build_info

    assert _build_info.TORCH_VERSION == torch.__version__
    assert _build_info.WITH_CUDA == mixprec.built_with_cuda()
    assert _build_info.TORCH_CUDA == torch.version.cuda
    assert (PACKAGE / "py.typed").exists()


def test_mismatch_rule() -> None:
    assert _torch_mismatch("2.14.1+cu130", "13.0", True, "2.14.0+cu130", "13.0") is None  # patch releases: same ABI
    message = _torch_mismatch("2.14.1+cu130", "13.0", True, "2.15.0+cu130", "13.0")
    assert "2.14.1+cu130" in message and "2.15.0+cu130" in message
    message = _torch_mismatch("2.14.1+cu130", "13.0", True, "2.14.1+cpu", None)
    assert "has no CUDA" in message and "2.14.1+cpu" in message
    assert _torch_mismatch("2.14.1+cpu", None, False, "2.14.1+cu130", "13.0") is None  # CPU kernels run anywhere


def test_import_under_another_torch_names_both_versions() -> None:
    """A fresh interpreter whose torch claims another release: importing mixprec raises ImportError naming
    both, before the C++ library is loaded (which would fail with undefined symbols)."""
    code = ("import torch\n"
            "torch.__version__ = '2.99.0+cu999'\n"
            "try:\n"
            "    import mixprec\n"
            "except ImportError as e:\n"
            "    print(e)\n"
            "else:\n"
            "    raise SystemExit('imported under the wrong torch')\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "2.99.0+cu999" in out and torch.__version__ in out and "Rebuild mixprec" in out


def test_cmake_package_refuses_another_torch(tmp_path) -> None:
    """find_package(mixprec) next to a torch of another minor release fails with both versions named."""
    cmake = str(Path(sys.executable).parent / "cmake") if (Path(sys.executable).parent / "cmake").exists() \
        else shutil.which("cmake")
    if cmake is None:
        pytest.skip("no cmake")
    fake = tmp_path / "faketorch" / "share" / "cmake" / "Torch"
    fake.mkdir(parents=True)
    (fake / "TorchConfig.cmake").write_text("set(TORCH_LIBRARIES torch)\n")
    (fake / "TorchConfigVersion.cmake").write_text(
        'set(PACKAGE_VERSION "2.99.0")\n'
        'if(PACKAGE_VERSION VERSION_LESS PACKAGE_FIND_VERSION)\n'
        '  set(PACKAGE_VERSION_COMPATIBLE FALSE)\n'
        'else()\n'
        '  set(PACKAGE_VERSION_COMPATIBLE TRUE)\n'
        'endif()\n')
    project = tmp_path / "project"
    project.mkdir()
    (project / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.22)\nproject(p LANGUAGES CXX)\nfind_package(mixprec REQUIRED)\n")
    result = subprocess.run(
        [cmake, "-S", str(project), "-B", str(tmp_path / "build"),
         f"-DCMAKE_PREFIX_PATH={mixprec.cmake_prefix_path};{tmp_path / 'faketorch' / 'share' / 'cmake'}"],
        capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode != 0
    text = " ".join((result.stdout + result.stderr).split())
    assert f"built against torch {torch.__version__.split('+')[0]}" in text and "found torch 2.99.0" in text, text


def test_the_sdist_holds_every_source_a_build_needs(tmp_path) -> None:
    """pip builds a wheel from the sdist (`python -m build`, `pip install mixprec-*.tar.gz`, PyPI wherever no wheel
    fits): it must hold the CMake project and every tracked C++/CUDA source, header and CMake module, and none
    of the build outputs an editable install leaves in the package directory. Built from a copy of the tracked
    files, so the checkout is not touched."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout: its tracked files are the reference")
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "source"
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, source / name)
    (source / "python" / "mixprec" / "lib").mkdir()  # what an editable build leaves there
    (source / "python" / "mixprec" / "lib" / "libmixprec.so").write_bytes(b"")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")], cwd=source, check=True,
                   capture_output=True)
    with tarfile.open(next((tmp_path / "dist").glob("mixprec-*.tar.gz"))) as sdist:
        shipped = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    needed = {name for name in tracked
              if name.startswith(("csrc/", "cmake/")) or name.endswith("CMakeLists.txt") or name.startswith("python/")}
    assert not sorted(needed - shipped)
    assert not [name for name in shipped if name.endswith((".so", ".o")) or name.startswith("python/mixprec/lib")]
