"""torch.compile with dynamic shapes: mixprec's layers trace with a symbolic token count, as torch.nn.Linear
does, so that batches of varying size (sequence packing, the last batch of an epoch, variable-length text) reuse
one compiled graph instead of recompiling per size (and failing with fullgraph=True once the recompile limit
is reached). The compiled runs equal eager ones bit for bit (aot_eager runs the same kernels)."""

from __future__ import annotations

import copy
from typing import Callable, Iterator

import pytest
import torch
from torch import nn

import mixprec
from mixprec import fp8, qat

from conftest import DEVICES


@pytest.fixture(autouse=True)
def _room_to_recompile() -> Iterator[None]:
    """A layer that recompiles shows its count instead of hitting Dynamo's recompile limit (this module only)."""
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


def _swap(kind: str) -> Callable[[nn.Module], nn.Module]:
    def make(model: nn.Module) -> nn.Module:
        everything = lambda name, layer: True  # noqa: E731
        if kind == "torch":
            return model
        if kind == "linear":
            return mixprec.nn.convert(model)
        if kind == "int8":
            return mixprec.nn.convert(model, int8=True, filter=everything)
        if kind == "int8-all-gemms":
            return mixprec.nn.convert(model, int8=mixprec.nn.Int8Gemms(weight_grad=True), filter=everything)
        if kind.startswith("qat"):
            return qat.prepare(model, qat.QATConfig(learnable_scales=kind == "qat-learnable"))
        return mixprec.nn.convert(model, fp8=fp8.Recipe(scaling=kind), filter=everything)
    return make


KINDS = ["torch", "linear", "int8", "int8-all-gemms", "qat", "qat-learnable", "delayed", "current", "rowwise",
         "blockwise"]


# Token counts: rows (2 x tokens) that CUDA's FP8 and INT8 GEMMs take (multiples of 16), none equal to a
# feature count (dynamic shapes would give them one symbol).
TOKENS = (8, 24, 40, 56)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_one_graph_serves_every_batch_size(kind: str, device: str) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _swap(kind)(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16)).to(device))
    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    for tokens in TOKENS:
        x = torch.randn(2, tokens, 32, device=device)
        got, want = compiled(x), eager(x)
        assert torch.equal(got, want), tokens
        got.square().sum().backward()
        want.square().sum().backward()
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for 4 token counts"
    for (name, a), b in zip(model.named_parameters(), eager.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(model.named_buffers(), eager.buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("learned_input_steps", [False, True])
def test_converted_qat_layers_serve_every_batch_size(learned_input_steps: bool, device: str) -> None:
    """Inference with converted QAT layers (INT8 GEMM on per-token or static-step activations) compiles once."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = qat.QATConfig(learnable_activation_scales=learned_input_steps)
    model = qat.prepare(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16)).to(device), config)
    model(torch.randn(4, 32, device=device))  # sets learnable input steps
    model = qat.convert(model).eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for tokens in TOKENS:
            x = torch.randn(2, tokens, 32, device=device)
            assert torch.equal(compiled(x), model(x)), tokens
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for 4 token counts"


@pytest.mark.parametrize("kind", ["linear", "int8", "current", "blockwise"])
def test_torch_export_with_a_dynamic_batch_dimension(kind: str) -> None:
    """torch.export with the batch as a Dim: refused (a constraint violation) by a layer that specializes it."""
    from torch.export import Dim, export

    torch.manual_seed(0)
    model = _swap(kind)(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))).eval()
    program = export(model, (torch.randn(4, 32),), dynamic_shapes=({0: Dim("batch")},))
    for tokens in (3, 9):
        x = torch.randn(tokens, 32)
        assert torch.equal(program.module()(x), model(x))
