"""The in-place ops outside the optimizer and the casts behave as torch's in-place ops towards autograd:
every tensor the schema marks as written has its version counter advanced once per call (under inference
mode too), nothing else does, and under grad mode the op refuses, before writing anything, a written tensor
that requires grad (cast_, unscale_and_check_ and adam_step_ are covered in test_cast.py / test_adam.py)."""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from conftest import DEVICES

import mixprec  # noqa: F401  (registers the ops)


def _record_overflow(device: str) -> tuple[Callable[..., None], list[Any]]:
    kw = dict(device=device)
    return torch.ops.mixprec.record_overflow_.default, [
        torch.zeros(5, dtype=torch.float64, **kw), torch.tensor([1.0, 2.0], **kw), torch.ones(1, **kw),
        torch.full((1,), 8.0, **kw), 3, 2, torch.zeros((), dtype=torch.int64, **kw)]


def _update_scale(device: str) -> tuple[Callable[..., None], list[Any]]:
    kw = dict(device=device)
    return torch.ops.mixprec.update_scale_.default, [
        torch.full((1,), 1024.0, **kw), torch.zeros(1, dtype=torch.int32, **kw),
        torch.ones(1, dtype=torch.int32, **kw), torch.ones(1, **kw), 2.0, 0.5, 10, 1, 0.0, None, False]


def _fp8_update_scales(device: str) -> tuple[Callable[..., None], list[Any]]:
    kw = dict(device=device)
    return torch.ops.mixprec.fp8_update_scales_.default, [
        torch.tensor([[3.0, 1.0], [5.0, 2.0]], **kw), torch.ones(2, **kw), torch.ones(2, **kw),
        torch.float8_e4m3fn, "max", 0, False]


def _fp8_gemm_accum(device: str) -> tuple[Callable[..., None], list[Any]]:
    kw = dict(device=device)
    a = torch.randn(16, 32, **kw).to(torch.float8_e4m3fn)
    b = torch.randn(16, 32, **kw).to(torch.float8_e4m3fn)
    return torch.ops.mixprec.fp8_gemm_accum_.default, [
        torch.zeros(16, 16, **kw), a, b, torch.ones((), **kw), torch.ones((), **kw)]


def _linear_wgrad_accum(device: str) -> tuple[Callable[..., None], list[Any]]:
    kw = dict(device=device)
    return torch.ops.mixprec.linear_wgrad_accum_.default, [
        torch.zeros(4, 3, **kw), torch.randn(5, 4, **kw), torch.randn(5, 3, **kw)]


CASES = {
    "record_overflow_": _record_overflow,
    "update_scale_": _update_scale,
    "fp8_update_scales_": _fp8_update_scales,
    "fp8_gemm_accum_": _fp8_gemm_accum,
    "linear_wgrad_accum_": _linear_wgrad_accum,
}


def _written(op: Any) -> list[bool]:
    return [a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments]


def _versions(args: list[Any]) -> list[int | None]:
    return [a._version if isinstance(a, torch.Tensor) else None for a in args]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_written_tensors_advance_their_versions_once(device: str, name: str) -> None:
    op, args = CASES[name](device)
    written = _written(op)
    assert any(written)
    for mode in (torch.enable_grad, torch.inference_mode):
        before = _versions(args)
        with mode():
            op(*args)
        expected = [v + 1 if w and v is not None else v for v, w in zip(before, written)]
        assert _versions(args) == expected, mode


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_written_tensor_that_requires_grad_is_refused_with_nothing_written(device: str, name: str) -> None:
    op, args = CASES[name](device)
    first = _written(op).index(True)
    arg_name = op._schema.arguments[first].name
    assert args[first].is_floating_point()  # every first written tensor here can require grad
    args[first] = args[first].clone().requires_grad_()
    snapshot = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(RuntimeError, match=rf"mixprec::{name}: {arg_name}\[0\] requires grad.*torch.no_grad"):
        op(*args)
    for a, s in zip(args, snapshot):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a.detach(), s)
    with torch.no_grad():
        op(*args)  # allowed without grad mode, as torch's in-place ops on leaves
