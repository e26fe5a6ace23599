"""Linear layers whose weight gradient is accumulated in fp32, in the weight-gradient GEMM itself.

With fp16/bf16 parameters, autograd rounds every micro-batch's weight gradient to 16 bits and adds the
micro-batches up in 16 bits, losing small contributions; casting each one to fp32 and adding it to an
fp32 buffer costs an extra pass over memory. :class:`Linear` (Megatron-LM's gradient-accumulation
fusion, Transformer Engine's ``fuse_wgrad_accumulation``) instead computes
``weight.main_grad += grad_output^T @ input`` with :func:`mixprec.ops.linear_wgrad_accum_`: 16-bit operands,
fp32 products and sums, straight into an fp32 buffer (one cuBLASLt GEMM with ``beta = 1`` on CUDA).

``weight.main_grad`` takes the place of ``weight.grad``, which stays ``None``: it is created (zeros,
fp32) at the first backward, keeps accumulating over micro-batches, and is zeroed by the ``zero_grad``
of :mod:`mixprec.optim` optimizers (or :func:`zero_main_grad`). Each backward also sets
``weight.grad_added_to_main_grad`` (Megatron's name), so a weight that took no gradient since the last
``zero_grad`` is skipped by the step, as torch skips a ``None`` gradient. :mod:`mixprec.optim` optimizers
and :class:`mixprec.GradScaler` read ``main_grad`` where a parameter has one; a ``.grad`` that the same
weight received through another path (a tied embedding) is added into ``main_grad`` first. An optimizer
that only reads ``.grad`` (``torch.optim.*``), and ``torch.amp.GradScaler``'s ``unscale_``, do not see
``main_grad``: use mixprec's. A weight that is not a leaf (a parametrization's output) gets an ordinary
gradient. Input and bias gradients flow through autograd as usual.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops

__all__ = ["Linear", "linear", "convert", "main_grad", "zero_main_grad", "step_grad"]


def main_grad(weight: Tensor) -> Tensor:
    """The fp32 gradient accumulator of ``weight`` (``weight.main_grad``), created as zeros when missing."""
    buffer: Optional[Tensor] = getattr(weight, "main_grad", None)
    if buffer is None:
        buffer = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        weight.main_grad = buffer  # type: ignore[attr-defined]
    return buffer


def zero_main_grad(params: Union[torch.nn.Module, Iterable[Tensor]]) -> None:
    """Zero the ``main_grad`` buffers of a module's parameters (or of the given tensors), in place.

    For optimizers other than :mod:`mixprec.optim`'s, whose ``zero_grad`` does this already."""
    tensors = params.parameters() if isinstance(params, torch.nn.Module) else params
    buffers = []
    for p in tensors:
        buffer = getattr(p, "main_grad", None)
        if buffer is not None:
            buffers.append(buffer)
            p.grad_added_to_main_grad = False  # type: ignore[attr-defined]
    if buffers:
        torch._foreach_zero_(buffers)


def step_grad(p: Tensor) -> Optional[Tensor]:
    """The gradient an optimizer step should read for ``p``: its ``main_grad`` when a backward has added
    to it since the last zero (any ``.grad`` from another use of the same weight is folded in first and
    cleared), else ``p.grad``."""
    buffer: Optional[Tensor] = getattr(p, "main_grad", None)
    if buffer is None:
        return p.grad
    if p.grad is not None:  # the same weight used elsewhere too (e.g. tied to an embedding)
        buffer.add_(p.grad)
        p.grad = None
        p.grad_added_to_main_grad = True  # type: ignore[attr-defined]
    return buffer if getattr(p, "grad_added_to_main_grad", False) else None


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _to(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    # autocast's rule for its lower-precision ops: floating tensors other than fp64 take its dtype.
    if t is None or dtype is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


class _LinearMainGrad(torch.autograd.Function):
    """y = x W^T + b whose backward adds dL/dW into ``W.main_grad`` (fp32) and returns no weight grad."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:  # type: ignore[override]
        # Autocast would cast inside F.linear and hide the 16-bit operands from backward; cast here
        # instead (the same rule), keep the 16-bit input for the wgrad GEMM, and run with autocast off.
        dtype = _autocast_dtype(input.device.type)
        x, w, b = _to(input, dtype), _to(weight, dtype), _to(bias, dtype)
        if dtype is None:
            output = F.linear(x, w, b)
        else:
            with torch.autocast(input.device.type, enabled=False):
                output = F.linear(x, w, b)
        ctx.save_for_backward(x, w)
        ctx.weight = weight  # the Parameter itself: main_grad hangs on it (a leaf, so no reference cycle)
        ctx.has_bias = bias is not None
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        if grad_output.dtype != x.dtype:
            grad_output = grad_output.to(x.dtype)
        grad_input = grad_bias = None
        grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.matmul(w)
        if ctx.needs_input_grad[1]:
            weight = ctx.weight
            if weight.is_leaf:
                ops.linear_wgrad_accum_(main_grad(weight), grad_output, x)
                weight.grad_added_to_main_grad = True
            else:  # a computed weight (parametrization): its gradient must flow on through autograd
                grad_weight = grad_output.reshape(-1, grad_output.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            # fp32 sum over the batch, rounded once to the bias's dtype by autograd.
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0, dtype=torch.float32)
        return grad_input, grad_weight, grad_bias


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``torch.nn.functional.linear`` whose weight gradient is accumulated into ``weight.main_grad`` (fp32)."""
    return _LinearMainGrad.apply(input, weight, bias)


class Linear(torch.nn.Linear):
    """Drop-in ``torch.nn.Linear`` whose weight gradient goes to ``weight.main_grad`` (fp32), not ``weight.grad``.

    Same constructor, parameters and state dict as ``torch.nn.Linear``; see the module docstring for
    how ``main_grad`` is created, zeroed and consumed."""

    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias)


def convert(module: torch.nn.Module) -> torch.nn.Module:
    """Turn every ``torch.nn.Linear`` in ``module`` (itself included) into a :class:`Linear`, in place.

    Parameters, hooks, devices and state-dict keys stay as they were (the layers' class is swapped, no
    tensor is copied), so an optimizer built before the call keeps working. Subclasses of
    ``torch.nn.Linear`` with their own ``forward`` are left alone. Returns ``module``."""
    for m in module.modules():
        if type(m) is torch.nn.Linear:
            m.__class__ = Linear
    return module
