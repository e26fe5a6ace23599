"""Linear layers whose weight gradient is formed and accumulated in fp32, by the weight-gradient GEMM itself.

With fp16/bf16 parameters, autograd rounds every micro-batch's weight gradient to 16 bits and adds the
micro-batches up in 16 bits, losing small contributions; casting each one to fp32 and adding it to an fp32
buffer costs extra passes over memory. :class:`Linear` (Megatron-LM's gradient-accumulation fusion,
Transformer Engine's ``fuse_wgrad_accumulation``) keeps the weight's gradient in fp32 instead:

* ``weight.grad_dtype`` is ``torch.float32`` (torch >= 2.10), so ``weight.grad`` is an fp32 tensor even
  for a 16-bit weight. It is an ordinary ``.grad``: ``zero_grad`` (the optimizer's, the model's or a
  framework's) clears it, ``torch.nn.utils.clip_grad_norm_``, both GradScalers and every hook see it, and
  :mod:`mixprec.optim` steps from it.
* The backward computes ``grad_output^T @ input`` with 16-bit operands and fp32 products and sums
  (:func:`mixprec.ops.linear_wgrad`, one cuBLASLt GEMM on CUDA); no 16-bit weight gradient is ever formed.
  When ``weight.grad`` already holds an fp32 gradient (gradient accumulation) in a plain ``.backward()``
  (no ``inputs=``, no ``create_graph``: not ``torch.autograd.grad``) and nothing needs to see the new part
  on its own (no tensor hooks on the weight), the GEMM adds into it in place
  (:func:`mixprec.ops.linear_wgrad_accum_`, ``beta = 1``): the accumulator is read and written once.

Input and bias gradients flow as usual (the bias gradient summed in fp32). A weight that is not a leaf (a
parametrization's output) gets an ordinary gradient in its own dtype.

``torch.optim`` optimizers such as Adam refuse an fp32 gradient on a 16-bit parameter (their moments take
the parameter's dtype): use :mod:`mixprec.optim`, which keeps fp32 master weights.

Distributed training: under FSDP2 (``fully_shard``) FSDP2 owns the gradient dtype: its unsharded
parameters take the layer's fp32 GEMM result in their own dtype, so a converted layer behaves as
``torch.nn.Linear`` there (``MixedPrecisionPolicy(reduce_dtype=torch.float32)`` reduces and accumulates in
fp32). ``DistributedDataParallel`` buckets gradients in the parameters' dtype and cannot carry an fp32
gradient of a 16-bit weight: a forward under DDP raises with what to do instead (fp32 weights are fine).
float64 weights keep float64 gradients (a plain float64 GEMM).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops

__all__ = ["Linear", "linear", "convert"]


def _is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def keep_fp32_grad(weight: Tensor) -> None:
    """Give ``weight`` an fp32 ``.grad`` (``weight.grad_dtype = torch.float32``), converting one it holds.

    Only leaf tensors carry a ``grad_dtype``; FSDP2's sharded parameters (DTensors) keep theirs, since FSDP2
    assigns gradients in its own dtypes; float64 weights keep float64 gradients."""
    if not weight.is_leaf or _is_dtensor(weight) or weight.dtype == torch.float64:
        return
    grad = weight.grad
    if grad is not None and grad.dtype != torch.float32:
        weight.grad = None  # grad_dtype cannot change while a .grad of another dtype is attached
        weight.grad_dtype = torch.float32
        weight.grad = grad.float()
    else:
        # Set even for an fp32 weight: an explicit grad_dtype survives a later model.bfloat16().
        weight.grad_dtype = torch.float32


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _to(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    # autocast's rule for its lower-precision ops: floating tensors other than fp64 take its dtype.
    if t is None or dtype is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


def _check_weight(weight: Tensor) -> None:
    """What a forward must settle about the weight's gradient before autograd sees it."""
    if not weight.is_leaf:
        return
    if weight.dtype == torch.float64 and weight.grad_dtype != torch.float64 and weight.grad is None:
        weight.grad_dtype = None  # converted in fp32, cast to fp64 since: gradients in fp64 again
    ddp = torch.nn.parallel.DistributedDataParallel._active_ddp_module
    if ddp is not None and weight.dtype in (torch.float16, torch.bfloat16) and weight.grad_dtype == torch.float32:
        raise RuntimeError(
            f"mixprec.nn.Linear keeps an fp32 gradient for its {weight.dtype} weight (weight.grad_dtype = "
            f"{weight.grad_dtype}), which DistributedDataParallel cannot reduce: it buckets gradients in the "
            "parameters' dtype. Under DDP keep torch.nn.Linear (16-bit gradients, reduced as usual), or shard the "
            "model with FSDP2 (torch.distributed.fsdp.fully_shard with MixedPrecisionPolicy(reduce_dtype="
            "torch.float32) reduces and accumulates the gradients in fp32)")


# A zero-size leaf per device that every layer's autograd node takes as an extra input, so that its
# AccumulateGrad node is in every graph the layer is in (on the layer's device: the engine runs that node on
# the device's own thread). The engine runs it only in a plain .backward() (no inputs=, not
# torch.autograd.grad), the one kind of backward in which torch itself would add into weight.grad.
_PROBES: dict[torch.device, tuple[Tensor, Any]] = {}


def _probe(device: torch.device) -> Tensor:
    if device not in _PROBES:
        leaf = torch.empty(0, device=device, requires_grad=True)
        _PROBES[device] = (leaf, torch.autograd.graph.get_gradient_edge(leaf).node)
    return _PROBES[device][0]


def _in_plain_backward(device: torch.device) -> bool:
    try:
        return bool(torch._C._will_engine_execute_node(_PROBES[device][1]))
    except RuntimeError:  # torch.autograd.grad() refuses questions about leaves: not a plain backward
        return False


def _adds_in_place(weight: Tensor, create_graph: bool, device: torch.device) -> bool:
    """Whether the backward may add into ``weight.grad`` itself instead of returning a new gradient: a plain
    ``.backward()`` that accumulates into ``.grad`` anyway, an fp32 accumulator there, and nothing (a tensor
    hook, a double backward) that needs the new part on its own."""
    grad = weight.grad
    return (not create_graph and grad is not None and grad.dtype == torch.float32 and grad.is_contiguous()
            and grad.shape == weight.shape and grad.device == weight.device and not grad.is_sparse
            and not _is_dtensor(grad) and not weight._backward_hooks and _in_plain_backward(device))


def _after_backward_wait_for(stream: "torch.cuda.Stream") -> None:
    """Autograd makes the caller's stream wait for the gradients it hands over; a gradient added in place is
    not handed over, so make the caller's stream (current when backward's final callbacks run) wait too."""
    def wait() -> None:
        torch.cuda.current_stream(stream.device).wait_stream(stream)

    torch.autograd.Variable._execution_engine.queue_callback(wait)


class _LinearFp32Grad(torch.autograd.Function):
    """y = x W^T + b whose backward forms dL/dW in fp32 (adding into an fp32 ``W.grad`` where it can)."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, weight: Tensor, bias: Optional[Tensor], probe: Tensor) -> Tensor:
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
        # The Parameter itself, to reach its .grad (a leaf: no reference cycle through the graph).
        ctx.weight = weight if weight.is_leaf else None
        ctx.has_bias = bias is not None
        ctx.probe_device = probe.device
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:
        # once_differentiable runs the body without grad mode: note create_graph before it does.
        ctx.create_graph = torch.is_grad_enabled()
        return _LinearFp32Grad._backward(ctx, grad_output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def _backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], ...]:
        x, w = ctx.saved_tensors
        if grad_output.dtype != x.dtype:
            grad_output = grad_output.to(x.dtype)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.matmul(w)
        if ctx.needs_input_grad[1]:
            weight = ctx.weight
            if x.dtype == torch.float64:  # the GEMM op is for fp32 and narrower; fp64 stays fp64
                grad_weight = grad_output.reshape(-1, grad_output.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]))
            elif weight is not None and _adds_in_place(weight, ctx.create_graph, ctx.probe_device):
                ops.linear_wgrad_accum_(weight.grad, grad_output, x)  # AccumulateGrad then has nothing to add
                if x.is_cuda:
                    _after_backward_wait_for(torch.cuda.current_stream(x.device))
            else:
                # Autograd casts it to the weight's grad_dtype: fp32 for converted weights (a no-op), the
                # weight's own dtype otherwise (a computed weight, FSDP2's unsharded parameter).
                grad_weight = ops.linear_wgrad(grad_output, x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            # fp32 (fp64 for fp64) sum over the batch, rounded once to the bias's dtype by autograd.
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(
                0, dtype=torch.promote_types(grad_output.dtype, torch.float32))
        return grad_input, grad_weight, grad_bias, None


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``torch.nn.functional.linear`` whose weight gradient is formed in fp32 (see the module docstring).

    The gradient reaches ``weight.grad`` in ``weight.grad_dtype``: set it to ``torch.float32`` (as
    :class:`Linear` does) to keep it in fp32."""
    _check_weight(weight)
    return _LinearFp32Grad.apply(input, weight, bias, _probe(weight.device))


def _restore_fp32_grad(module: torch.nn.Module, incompatible_keys: Any = None) -> None:
    if isinstance(module.weight, Tensor):
        keep_fp32_grad(module.weight)


class Linear(torch.nn.Linear):
    """Drop-in ``torch.nn.Linear`` whose weight gradient is fp32 (``weight.grad_dtype = torch.float32``),
    formed and accumulated by the weight-gradient GEMM.

    Same constructor, parameters and state dict as ``torch.nn.Linear``; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _adopt(self)

    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Copies and unpickled modules get new Parameter objects, without the grad_dtype.
        super().__setstate__(state)
        keep_fp32_grad(self.weight)


def _adopt(module: Linear) -> None:
    keep_fp32_grad(module.weight)
    # load_state_dict(assign=True) puts new Parameters in place: give them the fp32 gradient too.
    module.register_load_state_dict_post_hook(_restore_fp32_grad)


def convert(module: torch.nn.Module) -> torch.nn.Module:
    """Turn every ``torch.nn.Linear`` in ``module`` (itself included) into a :class:`Linear`, in place.

    Parameters, hooks, devices and state-dict keys stay as they were (the layers' class is swapped, no
    tensor is copied), so an optimizer built before the call keeps working; each weight's ``.grad`` becomes
    fp32 from then on. Subclasses of ``torch.nn.Linear`` with their own ``forward`` are left alone. A model
    wrapped in ``DistributedDataParallel`` with 16-bit Linear weights is refused (see the module docstring).
    Returns ``module``."""
    if isinstance(module, torch.nn.parallel.DistributedDataParallel) and any(
            type(m) is torch.nn.Linear and m.weight.dtype in (torch.float16, torch.bfloat16) for m in module.modules()):
        raise RuntimeError(
            "mixprec.nn.convert: DistributedDataParallel cannot reduce the fp32 weight gradients of 16-bit "
            "mixprec.nn.Linear weights (it buckets gradients in the parameters' dtype); keep torch.nn.Linear under "
            "DDP, or shard with FSDP2 (fully_shard with MixedPrecisionPolicy(reduce_dtype=torch.float32))")
    for m in module.modules():
        if type(m) is torch.nn.Linear:
            m.__class__ = Linear
            _adopt(m)  # type: ignore[arg-type]
    return module
