"""mixprec: the machinery of mixed-precision training as one PyTorch extension.

Importing the package loads ``libmixprec`` (through the native module ``mixprec._C``), which registers
the ops under ``torch.ops.mixprec``; :mod:`mixprec.ops` holds typed Python wrappers for them.
"""

from __future__ import annotations

import os as _os
import warnings as _warnings
from typing import Optional as _Optional

import torch as _torch  # noqa: F401  (libtorch must be loaded before libmixprec)


def _torch_mismatch(built: str, built_cuda: _Optional[str], with_cuda: bool, running: str,
                    running_cuda: _Optional[str]) -> _Optional[str]:
    """Why a libmixprec built against torch `built` cannot load under torch `running` (None if it can).

    Its C++ ABI ties it to one torch minor release (patch releases keep the ABI), and CUDA kernels to a CUDA
    build of torch."""
    def minor(version: str) -> tuple[str, ...]:
        return tuple(version.split("+")[0].split(".")[:2])

    fix = ("Rebuild mixprec for the installed torch (pip install --no-build-isolation --force-reinstall --no-deps "
           f"<mixprec source or sdist>) or install torch {built}.")
    if minor(built) != minor(running):
        return f"mixprec was built against torch {built}, but torch {running} is installed. {fix}"
    if with_cuda and running_cuda is None:
        return (f"mixprec was built with CUDA kernels against torch {built} (CUDA {built_cuda}), but the installed "
                f"torch {running} has no CUDA. {fix}")
    return None


try:
    from . import _build_info
except ImportError:  # a source tree that was never built: importing _C below says so
    _build_info = None  # type: ignore[assignment]
if _build_info is not None:
    _why = _torch_mismatch(_build_info.TORCH_VERSION, _build_info.TORCH_CUDA, _build_info.WITH_CUDA,
                           _torch.__version__, _torch.version.cuda)
    if _why is not None:
        raise ImportError(_why)

from . import _C
from . import _flops  # noqa: F401  (FLOP formulas of the GEMM ops)
from . import ops
from . import fp8
from . import int8
from . import qat
from . import optim
from . import nn
from .grad_scaler import GradScaler, OverflowReport
from .monitor import Monitor
from .policy import Policy, autocast
from . import diagnostics

__version__: str = _C.version()

#: Prefix to hand to CMake so LibTorch programs can ``find_package(mixprec)`` against this install.
cmake_prefix_path: str = _os.path.join(_os.path.dirname(__file__), "share", "cmake")


def built_with_cuda() -> bool:
    """Whether the loaded libmixprec contains the CUDA kernels."""
    return bool(_C.built_with_cuda())


if not built_with_cuda() and _torch.version.cuda is not None and _torch.cuda.is_available():
    _warnings.warn("mixprec was built without its CUDA kernels (no CUDA toolkit at build time), but a GPU is "
                   "available: mixprec's ops will refuse CUDA tensors. Rebuild with the CUDA toolkit installed.")


__all__ = ["GradScaler", "OverflowReport", "Monitor", "Policy", "autocast", "diagnostics", "fp8", "int8", "nn", "ops", "optim", "qat", "built_with_cuda", "cmake_prefix_path", "__version__"]
