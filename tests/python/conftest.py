"""Shared test helpers: the devices every kernel test runs on, and float64 references."""

from __future__ import annotations

import pytest
import torch

import mixprec  # noqa: F401  (registers torch.ops.mixprec)

HAS_CUDA = torch.cuda.is_available()
CUDA_SKIP_REASON = (
    "no CUDA device on this machine: the CUDA kernels are compiled"
    + (" into libmixprec" if mixprec.built_with_cuda() else " only when libmixprec is built with CUDA")
    + " but can only run on a GPU"
)
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)

#: Parametrize over this to run a test on the CPU and, where there is one, the GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
