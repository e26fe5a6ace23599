"""mixprec: the machinery of mixed-precision training as one PyTorch extension.

Importing the package loads ``libmixprec`` (through the native module ``mixprec._C``), which registers
the ops under ``torch.ops.mixprec``; :mod:`mixprec.ops` holds typed Python wrappers for them.
"""

from __future__ import annotations

import os as _os

import torch as _torch  # noqa: F401  (libtorch must be loaded before libmixprec)

from . import _C
from . import _meta  # noqa: F401  (fake kernels for torch.compile / opcheck)
from . import ops
from . import optim
from . import nn
from .grad_scaler import GradScaler
from .policy import Policy, autocast
from . import diagnostics

__version__: str = _C.version()

#: Prefix to hand to CMake so LibTorch programs can ``find_package(mixprec)`` against this install.
cmake_prefix_path: str = _os.path.join(_os.path.dirname(__file__), "share", "cmake")


def built_with_cuda() -> bool:
    """Whether the loaded libmixprec contains the CUDA kernels."""
    return bool(_C.built_with_cuda())


__all__ = ["GradScaler", "Policy", "autocast", "diagnostics", "nn", "ops", "optim", "built_with_cuda", "cmake_prefix_path", "__version__"]
