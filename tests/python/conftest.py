"""Shared test helpers: the devices every kernel test runs on, and float64 references."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

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


def accumulate_cycle(layer: torch.nn.Module, xs: list[torch.Tensor], gs: list[torch.Tensor], cached: bool) -> list:
    """One gradient-accumulation cycle through a layer with a weight cache (``is_first_microbatch`` True on the
    first micro-batch, False after, when `cached`): the outputs, the input gradients and the weight's
    gradient, as one flat list."""
    layer.zero_grad()
    outs, input_grads = [], []
    for i, (x, g) in enumerate(zip(xs, gs)):
        x = x.clone().requires_grad_()
        out = layer(x, is_first_microbatch=(i == 0)) if cached else layer(x)
        out.backward(g)
        outs.append(out.detach())
        input_grads.append(x.grad)
    return outs + input_grads + [layer.weight.grad.clone()]


def run_with_cpu_capability(capability: str | None, script: str, inputs: Any, tmp_path: Path) -> Any:
    """Run `script` in a fresh Python with ATEN_CPU_CAPABILITY=capability (None: the CPU's best).

    The script sees `inputs` as the variable INPUTS and must assign its answer to RESULT. Inputs travel
    through a file because torch's own random generators give different numbers per capability. The run
    reports the capability it had: "default" must give DEFAULT, and the CPU's best must be more than
    DEFAULT (else the test is skipped: comparing DEFAULT with itself would prove nothing)."""
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
        + "\ntorch.save({'result': RESULT, 'capability': torch.backends.cpu.get_cpu_capability()}, sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", wrapper, str(tmp_path / f"in_{tag}.pt"), str(tmp_path / f"out_{tag}.pt")],
                   check=True, env=env)
    out = torch.load(tmp_path / f"out_{tag}.pt")
    if capability == "default":
        assert out["capability"] == "DEFAULT", out["capability"]
    elif capability is None and out["capability"] == "DEFAULT":
        pytest.skip("this CPU has no vector capability beyond DEFAULT (no AVX2): nothing to compare DEFAULT with")
    return out["result"]


def assert_pairs_agree_across_cpu_capabilities(script: str, inputs: Any, tmp_path: Path, count: int) -> None:
    """`script`'s RESULT, a list of `count` (codes, float tensor) pairs, is the same in the DEFAULT build and in
    the CPU's best: the codes bit for bit, the floats value for value (NaN where the other has NaN)."""
    a = run_with_cpu_capability("default", script, inputs, tmp_path)
    b = run_with_cpu_capability(None, script, inputs, tmp_path)
    assert len(a) == len(b) == count
    for (data_a, aux_a), (data_b, aux_b) in zip(a, b):
        assert torch.equal(data_a, data_b)
        torch.testing.assert_close(aux_a, aux_b, rtol=0, atol=0, equal_nan=True)


def on_device(t: torch.Tensor, device: str) -> torch.Tensor:
    """`t` on `device` with the same sizes, strides and storage offset (so misalignment carries over)."""
    if device == "cpu":
        return t
    storage = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype, device=device)
    out = storage.as_strided(t.shape, t.stride(), t.storage_offset())
    out.copy_(t)
    return out


# A gloo process that ran autograd with collectives (DDP, FSDP2, the amax all-reduce) can abort in torch's
# teardown after its last line ("terminate called without an active exception": plain torch DDP on gloo, no
# mixprec, 5 of 20 runs with torch 2.14.1 on this machine; mixprec's amax script 1 of 20). The multi-rank test
# scripts end with this, once their checks have passed and their output is written.
EXIT_NOW = textwrap.dedent(
    """
    def exit_now():
        import os, sys
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    """
)


# The 2-rank FSDP2 scripts' model (prepended to a script, like EXIT_NOW): a seeded MLP whose Linear layers are each
# sharded, then the root.
SHARDED_MLP = textwrap.dedent(
    """
    def sharded_mlp(d_in, d_hidden, d_out):
        import torch
        from torch.distributed.fsdp import fully_shard
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(d_in, d_hidden), torch.nn.ReLU(), torch.nn.Linear(d_hidden, d_out))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model
    """
)


class ExactBiasCase(NamedTuple):
    """A GEMM whose every product and sum is exact in fp32 (integer codes up to 16, power-of-two scales) and
    whose bias sits on a 2^-6 grid, so product + bias is exact in fp32 too: float64 gives the one correctly
    rounded result of `out_dtype`, and rounding the product before adding the bias (twice) misses it."""

    a: torch.Tensor  # [m, k] codes as float32
    b: torch.Tensor  # [n, k] codes as float32
    sa: torch.Tensor  # [m, 1] (row-wise) or [1]
    sb: torch.Tensor  # [n, 1] (row-wise) or [1]
    bias: torch.Tensor  # [n] float32
    exact: torch.Tensor  # [m, n] float64: (a * sa) @ (b * sb)^T

    def want(self, out_dtype: torch.dtype) -> torch.Tensor:
        return (self.exact + self.bias.to(out_dtype).double()).to(out_dtype)

    def rounded_twice(self, out_dtype: torch.dtype) -> torch.Tensor:
        return self.exact.to(out_dtype) + self.bias.to(out_dtype)


def exact_bias_case(seed: int, rowwise: bool, m: int = 32, k: int = 256, n: int = 48) -> ExactBiasCase:
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-16, 17, (m, k), generator=g).float()
    b = torch.randint(-16, 17, (n, k), generator=g).float()
    sa = 2.0 ** torch.randint(-2, 1, (m, 1) if rowwise else (1,), generator=g).float()
    sb = 2.0 ** torch.randint(-2, 1, (n, 1) if rowwise else (1,), generator=g).float()
    bias = torch.randint(-4096, 4097, (n,), generator=g).float() / 64
    exact = (a.double() * sa.double()) @ (b.double() * sb.double()).t()
    return ExactBiasCase(a, b, sa, sb, bias, exact)


def rename_legacy_keys(state_dict, prefix, *args) -> None:
    """A load pre-hook as a model's own code registers one for a legacy checkpoint: "w_weight" / "w_bias" become
    "weight" / "bias"."""
    for name in ("weight", "bias"):
        if prefix + "w_" + name in state_dict:
            state_dict[prefix + name] = state_dict.pop(prefix + "w_" + name)
