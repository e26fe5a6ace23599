"""Shared test helpers: the devices every kernel test runs on, and float64 references."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

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


def run_with_cpu_capability(capability: str | None, script: str, inputs: Any, tmp_path: Path) -> Any:
    """Run `script` in a fresh Python with ATEN_CPU_CAPABILITY=capability (None: the CPU's best).

    The script sees `inputs` as the variable INPUTS and must assign its answer to RESULT. Inputs travel
    through a file because torch's own random generators give different numbers per capability."""
    tag = capability or "native"
    torch.save(inputs, tmp_path / f"in_{tag}.pt")
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    wrapper = (
        "import sys, torch, mixprec\n"
        "INPUTS = torch.load(sys.argv[1])\n"
        + textwrap.dedent(script)
        + "\ntorch.save(RESULT, sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", wrapper, str(tmp_path / f"in_{tag}.pt"), str(tmp_path / f"out_{tag}.pt")],
                   check=True, env=env)
    return torch.load(tmp_path / f"out_{tag}.pt")
