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
gradient of a 16-bit weight: under DDP such a weight's gradient goes back to its own dtype at the first
forward (with a warning), so the layer behaves as ``torch.nn.Linear`` there; fp32 weights keep fp32
gradients, reduced by DDP as usual.
float64 weights keep float64 gradients (a plain float64 GEMM; also a layer cast with ``.double()`` after a
backward). torch.func transforms (``grad``, ``vmap``, ``jvp``) and forward-mode AD return gradients instead of
accumulating them: there the layer computes as ``torch.nn.Linear`` does, as it does for complex weights or
inputs, the meta device and nested inputs. Added in place, a second micro-batch's fp32 weight gradient is
rounded once (the GEMM with beta = 1) where torch rounds the product and then the sum: fp32 layers agree with
``torch.nn.Linear`` to an ulp from the second backward on, not bit for bit. ``FlopCounterMode`` counts the
weight-gradient and 8-bit GEMM ops as the ``mm`` they replace.

Modules that read a Linear's ``weight`` instead of calling it bypass every layer here, as they bypass any
``torch.nn.Linear`` subclass: ``nn.MultiheadAttention`` (its ``out_proj``), and the fused inference path
``nn.TransformerEncoderLayer`` takes in evaluation without gradients, which computes with the weights in their
own precision, so an FP8 or INT8 model evaluated that way is not the model that trained
(``torch.backends.mha.set_fastpath_enabled(False)`` evaluates the 8-bit layers).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar, Union

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import fp8

__all__ = ["Linear", "linear", "convert", "Float8Linear", "float8_linear", "fp8_default_filter", "Int8Gemms",
           "Int8Linear", "int8_linear", "int8_default_filter", "reduce_amax_"]


def keep_fp32_grad(weight: Tensor) -> None:
    """Give ``weight`` an fp32 ``.grad`` (``weight.grad_dtype = torch.float32``), converting one it holds.

    Only leaf tensors carry a ``grad_dtype``; FSDP2's sharded parameters (DTensors) keep theirs, since FSDP2
    assigns gradients in its own dtypes; float64 weights keep float64 gradients. (C++'s
    ``mixprec::nn::keep_fp32_grad``.)"""
    torch.ops.mixprec.keep_fp32_grad_(weight)


def _install_dcp_grad_dtype_shim() -> None:
    """torch.distributed.checkpoint's state-dict helpers (``get_state_dict``, ``set_optimizer_state_dict``, ...)
    give an optimizer without state one by assigning ``torch.zeros_like(param)`` as every parameter's gradient
    and stepping with lr 0; a parameter whose ``grad_dtype`` is not its dtype (the fp32 gradients of converted
    16-bit weights) refuses that assignment. The wrapper lifts those ``grad_dtype``s for the call (torch's
    helper clears the gradients it set) and puts them back, so torch's resume recipe runs on converted models."""
    try:
        from torch.distributed.checkpoint import state_dict as dcp_state_dict
    except Exception:  # torch without distributed support: nothing to adapt
        return
    init = getattr(dcp_state_dict, "_init_optim_state", None)
    if init is None or getattr(init, "_mixprec_shim", False):
        return

    def _init_optim_state(optim: torch.optim.Optimizer) -> None:
        lifted = [p for group in optim.param_groups for p in group["params"]
                  if isinstance(p, Tensor) and p.is_leaf and p.grad is None
                  and getattr(p, "grad_dtype", p.dtype) not in (None, p.dtype)]
        kept = [p.grad_dtype for p in lifted]
        for p in lifted:
            p.grad_dtype = None
        try:
            init(optim)
        finally:
            for p, dtype in zip(lifted, kept):
                if p.grad is not None and p.grad.dtype != dtype:
                    p.grad = None
                p.grad_dtype = dtype

    _init_optim_state._mixprec_shim = True  # type: ignore[attr-defined]
    _init_optim_state.__wrapped__ = init  # type: ignore[attr-defined]
    dcp_state_dict._init_optim_state = _init_optim_state


_install_dcp_grad_dtype_shim()


def _check_ddp_buffers(layer: torch.nn.Module, history: Tensor) -> None:
    """Under a DistributedDataParallel that broadcasts this delayed-scaling layer's state (a DDP wrapping a
    module other than the one :func:`convert` marked), warn once per DDP: every rank would scale by rank 0's
    amaxes (see ``_ddp_keeps_fp8_state``)."""
    ddp = torch.nn.parallel.DistributedDataParallel._active_ddp_module
    seen = layer.__dict__.get("_ddp_seen")
    # A weak reference, not id(ddp): a new DDP can get the id of one that was freed (and then went unchecked).
    if ddp is None or not getattr(ddp, "broadcast_buffers", False) or (seen is not None and seen() is ddp):
        return
    layer.__dict__["_ddp_seen"] = weakref.ref(ddp)
    if any(b is history for b in getattr(ddp, "modules_buffers", ())):
        warnings.warn(
            "mixprec.nn.Float8Linear: DistributedDataParallel broadcasts this layer's delayed-scaling state from "
            "rank 0 at every forward, before the layer reduces or uses each rank's own amaxes: every rank would "
            "scale by rank 0's data. Wrap the module mixprec.nn.convert converted (it lists the FP8 buffers in "
            "_ddp_params_and_buffers_to_ignore), or pass broadcast_buffers=False", stacklevel=3)


def _check_ddp(weight: Tensor) -> None:
    """Under DistributedDataParallel, which buckets gradients in the parameters' dtype (an fp32 gradient of a
    16-bit weight cannot go there), the weight's gradient goes back to the weight's own dtype, as
    torch.nn.Linear's is: the fp32 GEMM result is rounded once by autograd and DDP reduces it as usual."""
    ddp = torch.nn.parallel.DistributedDataParallel._active_ddp_module
    if (ddp is not None and weight.is_leaf and weight.dtype in (torch.float16, torch.bfloat16)
            and weight.grad_dtype == torch.float32):
        warnings.warn(
            f"mixprec.nn: under DistributedDataParallel the gradient of a {weight.dtype} Linear weight is kept in "
            f"{weight.dtype}, as torch.nn.Linear's (DDP buckets gradients in the parameters' dtype): the fp32 "
            "weight-gradient GEMM result is rounded once, and accumulation across micro-batches is in "
            f"{weight.dtype}. For fp32 gradient reduction and accumulation shard with FSDP2 (fully_shard with "
            "MixedPrecisionPolicy(reduce_dtype=torch.float32)), or keep fp32 weights under DDP",
            stacklevel=3)
        own_dtype_grad(weight)


def own_dtype_grad(weight: Tensor) -> None:
    """Undo :func:`keep_fp32_grad`: ``weight``'s gradient in its own dtype again (``grad_dtype`` its dtype), a
    ``.grad`` already there converted, as torch.nn.Linear's is."""
    torch.ops.mixprec.own_dtype_grad_(weight)  # mixprec::nn::own_dtype_grad


def explain_transform_failure(what: str, error: BaseException, tensors: Sequence[Optional[Tensor]]) -> None:
    """Raises a RuntimeError naming `what` in place of `error` when a torch.func transform or forward-mode AD is
    what `error` came from (torch's own message names neither the layer nor a way out); returns otherwise."""
    text = str(error)
    # "jvp is not implemented for the c++ API of custom Function": forward-mode AD (torch.autograd.forward_ad).
    if (("functorch" in text or "Batching rule" in text or "forward AD" in text or "jvp is not implemented" in text)
            and _functional_transform(*tensors)):
        raise RuntimeError(
            f"{what} cannot run under torch.func transforms (grad, vjp, jacrev, jvp, vmap) or forward-mode AD: the "
            "8-bit and QAT layers' autograd functions are C++'s. Compute such gradients (per-sample ones, for "
            "example) on the model before converting it, or with torch.autograd.grad") from error


def _functional_transform(*tensors: Optional[Tensor]) -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, ...) is active, or forward-mode AD reaches these tensors:
    neither can run a C++ autograd Function, and neither accumulates into ``.grad``, which is what the fp32
    weight-gradient GEMM is for."""
    if torch._C._are_functorch_transforms_active():
        return True
    if getattr(_forward_ad, "_current_level", -1) >= 0:  # a dual level is open: look for tangents
        return any(t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    return False


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``torch.nn.functional.linear`` whose weight gradient is formed in fp32 (see the module docstring).

    The gradient reaches ``weight.grad`` in ``weight.grad_dtype``: set it to ``torch.float32`` (as
    :class:`Linear` does) to keep it in fp32. One implementation with C++'s ``mixprec::nn::linear``: this
    calls it (the op ``mixprec::linear``). Under torch.func transforms and forward-mode AD, which return
    gradients instead of accumulating them, it is ``torch.nn.functional.linear`` (gradients in the weight's
    dtype, as torch gives them)."""
    if _functional_transform(input, weight, bias):
        return torch.nn.functional.linear(input, weight, bias)
    _check_ddp(weight)
    return torch.ops.mixprec.linear(input, weight, bias)


def _refuse_torchscript(module: torch.nn.Module) -> torch.nn.Module:
    """``__prepare_scriptable__`` of mixprec's layers (torch.jit.script calls it on every submodule first): a clear
    error instead of TorchScript's internal ones about annotations and try blocks."""
    raise RuntimeError(
        f"{type(module).__module__}.{type(module).__qualname__}: torch.jit.script cannot compile mixprec's layers "
        "(torch deprecates TorchScript; their forward calls C++ autograd functions through Python). Use "
        "torch.compile or torch.export, or torch.jit.trace, which record the ops instead")


def _restore_fp32_grad(module: torch.nn.Module, incompatible_keys: Any = None) -> None:
    if isinstance(module.weight, Tensor):
        keep_fp32_grad(module.weight)


class _Fp32WeightGrad(torch.nn.Module):
    """What keeps a layer's weight gradient fp32 when its Parameter object is replaced: copies and unpickled
    modules, and ``Module._apply`` where it makes new Parameters (``to_empty`` from the meta device, or any
    conversion under ``torch.__future__.set_swap_module_params_on_conversion(True)``)."""

    weight: Tensor
    __prepare_scriptable__ = _refuse_torchscript

    def register_parameter(self, name: str, param: Optional[torch.nn.Parameter]) -> None:
        super().register_parameter(name, param)
        # A new Parameter assigned as the weight (weight tying, a resized or re-initialised layer, as Hugging
        # Face's tie_weights assigns them) keeps the fp32 gradient. Here and not in
        # __setattr__: FSDP2 installs its unsharded parameters straight into _parameters unless __setattr__ is
        # overridden, and those keep the dtype FSDP2 gives their gradients.
        if name == "weight" and param is not None:
            keep_fp32_grad(param)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "_Fp32WeightGrad":
        # Module._apply casts .grad with the weight: the fp32 accumulator of a 16-bit weight would be rounded
        # to the weight's dtype (an fp16 one overflowing to inf) by any cast, a no-op `.bfloat16()` of a bf16
        # model included. The accumulator keeps its values; only the device moves with the weight.
        weight = self.weight if isinstance(self.weight, Tensor) else None
        grad = weight.grad if weight is not None else None
        # detach(): its own TensorImpl on the same memory (Module._apply rebinds the grad's `.data` in place).
        kept = (grad.detach() if grad is not None and grad.dtype == torch.float32 and weight.grad_dtype == torch.float32
                else None)
        super()._apply(fn, recurse)
        weight = self.weight if isinstance(self.weight, Tensor) else None
        if (kept is not None and weight is not None and weight.grad is not None and weight.is_leaf
                and weight.dtype in (torch.float16, torch.bfloat16, torch.float32) and weight.grad.shape == kept.shape):
            weight.grad.data = kept.to(weight.grad.device)  # the same grad object, as Module._apply keeps it
        _restore_fp32_grad(self)
        if (weight is not None and weight.is_leaf and weight.dtype == torch.float64
                and weight.grad_dtype == torch.float32):
            own_dtype_grad(weight)  # `.double()`: float64 gradients, as torch.nn.Linear's (a .grad there included)
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        keep_fp32_grad(self.weight)


@contextlib.contextmanager
def _load_pre_hooks_first(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                          args: tuple[Any, ...]) -> Iterator[None]:
    """For a layer whose ``_load_from_state_dict`` decides from the checkpoint's keys (restart a scaling state or
    learnable steps the checkpoint lacks): torch runs the module's load pre-hooks at the start of its own
    ``_load_from_state_dict``, after an override's code, and a hook may rename keys (a legacy checkpoint's). So
    they run here first, on the dict torch copied, the decision then sees what torch loads, and torch's loading
    inside runs without them (each hook runs once)."""
    hooks = module._load_state_dict_pre_hooks
    for hook in list(hooks.values()):
        hook(state_dict, prefix, *args)
    module._load_state_dict_pre_hooks = OrderedDict()
    try:
        yield
    finally:
        module._load_state_dict_pre_hooks = hooks


class _KeepsQuantizedWeight(_Fp32WeightGrad):
    """What Float8Linear and Int8Linear share: the weight quantized once and kept across gradient-accumulation
    micro-batches (``is_first_microbatch``), in the attribute ``_CACHE``. It is stale whenever the weight changes:
    a move or cast (``_apply``, and ``Policy.apply``'s ``_dtype_changed``), ``reset_parameters`` and a loaded
    checkpoint drop it, and copies and pickles leave it out."""

    _CACHE = ""

    def _drop_weight_cache(self) -> None:
        """The weight changed (moved, cast, re-initialised or loaded): a kept quantization of it is stale."""
        setattr(self, self._CACHE, [])

    def _dtype_changed(self) -> None:  # what Policy.apply calls after casting the layer's parameters
        self._drop_weight_cache()

    def reset_parameters(self) -> None:
        super().reset_parameters()  # type: ignore[misc]
        self._drop_weight_cache()

    def _load_from_state_dict(self, *args: Any) -> None:
        super()._load_from_state_dict(*args)  # type: ignore[misc]
        self._drop_weight_cache()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "_KeepsQuantizedWeight":
        self._drop_weight_cache()
        super()._apply(fn, recurse)
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop(self._CACHE, None)  # derived from the weight
        return state


class Linear(_Fp32WeightGrad, torch.nn.Linear):
    """Drop-in ``torch.nn.Linear`` whose weight gradient is fp32 (``weight.grad_dtype = torch.float32``),
    formed and accumulated by the weight-gradient GEMM.

    Same constructor, parameters and state dict as ``torch.nn.Linear``; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        # torch.nn.Linear's signature, spelled out: torch.nn.utils.skip_init reads it for a `device` argument.
        super().__init__(in_features, out_features, bias, device, dtype)
        _adopt(self)

    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias)


def _adopt(module: Linear) -> None:
    keep_fp32_grad(module.weight)
    # load_state_dict(assign=True) puts new Parameters in place: give them the fp32 gradient too (once, also
    # when a converted layer is converted again).
    if _restore_fp32_grad not in module._load_state_dict_post_hooks.values():
        module.register_load_state_dict_post_hook(_restore_fp32_grad)


_FP8_BUFFERS = ("fp8_forward_amax_history", "fp8_forward_scale", "fp8_forward_scale_inv",
                "fp8_backward_amax_history", "fp8_backward_scale", "fp8_backward_scale_inv", "fp8_turn")
# mixprec::fp8::StateLoad, the result of fp8_state_load_plan.
_SKIP_STATE, _LOAD_STATE, _INITIAL_TURN, _RESTART_STATE, _PARTIAL_STATE = range(5)


def float8_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor], state: Sequence[Tensor],
                  recipe: fp8.Recipe, weight_cache: Optional[list[Tensor]] = None, *,
                  update_state: bool = True) -> Tensor:
    """``torch.nn.functional.linear`` through FP8 GEMMs (C++'s ``mixprec::nn::float8_linear``, the op
    ``mixprec::float8_linear``).

    The input and weight are quantized to ``recipe.forward_dtype``, the output gradient to
    ``recipe.backward_dtype``, each scaled as the recipe says; the output, input-gradient and
    weight-gradient products are :func:`mixprec.fp8.gemm` calls with fp32 accumulation. The weight
    gradient is fp32 and, as in :func:`linear`, is added into an fp32 ``weight.grad`` in place (beta = 1)
    in a plain backward. ``state`` holds the seven delayed-scaling tensors (:class:`Float8Linear`'s buffers,
    ``mixprec::fp8::ScalingState``), updated in place; other recipes ignore it. The seventh, the turn, makes
    the forward's scales move only at the first forward after a backward and the backward's at the first
    backward after a forward (amaxes recorded in between combine by max); a state of the first six alone
    moves them on every training pass. On CUDA every GEMM dimension (tokens, in and out features) must be a
    multiple of 16.

    ``weight_cache`` keeps the quantized weight across gradient-accumulation micro-batches: an empty list
    is filled by the call (the op ``mixprec::float8_linear_cached`` returns the tensors), a filled one is
    used instead of ``weight``, which is then not read (delayed scaling still records the cached amax).
    Emptying it after each optimizer step is the caller's part.

    ``update_state=False`` (:class:`Float8Linear` in eval mode) reads delayed scaling's state (the forward's,
    and the backward's when gradients are taken through it) without updating the scales or recording
    amaxes, as BatchNorm's eval mode reads its running statistics. A forward
    inside a backward (activation checkpointing's recomputation) reads it so too: it quantizes as the
    original forward did and records nothing twice."""
    _check_ddp(weight)
    if len(state) not in (6, 7):
        raise ValueError(f"state must be the 6 or 7 scaling tensors of mixprec::fp8::ScalingState, got {len(state)}")
    args = (input, weight, bias, *state[:6], recipe.scaling, recipe.forward_dtype, recipe.backward_dtype,
            recipe.amax_compute_algo, int(recipe.margin), bool(recipe.pow2_scales), bool(recipe.fast_accum))
    return _with_cache(torch.ops.mixprec.float8_linear, torch.ops.mixprec.float8_linear_cached, args, weight_cache,
                       update_state=bool(update_state), turn=state[6] if len(state) == 7 else None)


def _with_cache(op: Any, cached_op: Any, args: tuple, weight_cache: Optional[list[Tensor]], **kwargs: Any) -> Tensor:
    """`op(*args, **kwargs)` without a cache; with one, `cached_op(*args, weight_cache, **kwargs)`, which fills an
    empty cache (the list takes the tensors it returns) or uses a filled one (and returns none: no output
    aliases an input)."""
    try:
        if weight_cache is None:
            return op(*args, **kwargs)
        out, filled = cached_op(*args, weight_cache, **kwargs)
    except (RuntimeError, NotImplementedError) as error:
        explain_transform_failure(f"mixprec.nn.{op._qualified_op_name.split('::')[-1]}", error, args[:3])
        raise
    if not weight_cache:
        weight_cache[:] = filled
    return out


class Float8Linear(_KeepsQuantizedWeight, torch.nn.Linear):
    """A ``torch.nn.Linear`` whose three GEMMs run in FP8 (:func:`float8_linear`).

    Same constructor, parameters and initialisation as ``torch.nn.Linear`` plus ``recipe``; the weight
    keeps its dtype and gets an fp32 gradient as in :class:`Linear`. Delayed scaling's state lives in
    buffers (``fp8_forward_amax_history`` ``[history, 2]``, ``fp8_forward_scale``/``_scale_inv`` ``[2]``,
    ``fp8_backward_*`` likewise for the output gradient, and ``fp8_turn``, which keeps the scales of each
    side to one update per forward-backward cycle), so ``state_dict()`` holds it as plain tensors and
    resuming is exact; the other recipes keep no state, and their state dict is ``torch.nn.Linear``'s. The
    forward quantizes with ``fp8_forward_scale`` and dequantizes with its reciprocal, so buffers averaged or
    edited from outside (``torch.optim.swa_utils.AveragedModel(..., use_buffers=True)`` for an EMA) stay a
    consistent pair. :meth:`from_linear` converts an existing layer in place.

    ``amax_group`` (a ``torch.distributed`` process group, default ``None``): with delayed scaling, the
    amaxes the previous step recorded are reduced with MAX over this group before they set the scales, so
    every rank scales alike (Transformer Engine's ``reduce_amax``). Without it each rank scales by its own
    data, which is correct but not identical across data-parallel ranks. One all-reduce of three floats
    per layer and step, asynchronous on NCCL, in training forwards with gradients enabled (every rank must
    run them, as under DDP). The backward's amax is reduced by the next forward, before the next backward
    updates from it (each side updates once per forward-backward cycle, see ``fp8_turn``). Other
    recipes scale each tensor from itself and ignore it. A deep copy shares the group with the original, as
    C++'s ``clone()`` does (a copy trained beside it keeps reducing); a pickle leaves it unset (a process
    group belongs to its process; set it again after loading). Under ``DistributedDataParallel``, whose
    default ``broadcast_buffers=True`` would overwrite each rank's amaxes with rank 0's at every forward,
    :func:`convert` lists the FP8 buffers in the model's ``_ddp_params_and_buffers_to_ignore`` (wrap that
    model); a layer whose state DDP broadcasts anyway warns."""

    amax_group: Optional[Any] = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None,
                 dtype: Optional[torch.dtype] = None, *, recipe: Optional[fp8.Recipe] = None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        _adopt(self)
        self._set_recipe(recipe or fp8.Recipe())

    def _set_recipe(self, recipe: fp8.Recipe, real_on_meta: bool = False) -> None:
        self.recipe = recipe
        like = self.weight
        if real_on_meta and like.is_meta:
            # Converted from a layer built with meta weights and real buffers (Accelerate's init_empty_weights):
            # the state is real too, on the CPU. Loaders that fill such a model from a checkpoint
            # (load_checkpoint_and_dispatch) cannot fill what no checkpoint holds, and dispatching moves it.
            like = torch.empty(0, device="cpu")
        # The state's shapes and initial values are C++'s (mixprec::fp8::make_scaling_state).
        state = torch.ops.mixprec.fp8_scaling_state(recipe.scaling, int(recipe.amax_history_len), like)
        # Only delayed scaling has state to save; the other recipes' (empty) buffers stay out of the state dict,
        # which is then torch.nn.Linear's, as torchao's dynamically scaled Float8Linear saves it.
        persistent = recipe.scaling == "delayed"
        for name, tensor in zip(_FP8_BUFFERS, state):
            self.register_buffer(name, tensor, persistent=persistent)

    def reset_parameters(self) -> None:
        """As ``torch.nn.Linear.reset_parameters``, and the scaling state back to its initial values, in its
        buffers, as BatchNorm's resets its running statistics: after ``to_empty`` from the meta device
        (deferred initialisation) the buffers hold whatever memory they were given."""
        super().reset_parameters()  # drops the weight cache: quantized from the old weight
        if "recipe" in self.__dict__:  # torch.nn.Linear.__init__ calls this before the state exists
            fresh = torch.ops.mixprec.fp8_scaling_state(self.recipe.scaling, int(self.recipe.amax_history_len),
                                                        getattr(self, _FP8_BUFFERS[0]))  # where the state is
            with torch.no_grad():
                for name, tensor in zip(_FP8_BUFFERS, fresh):
                    getattr(self, name).copy_(tensor)
            self._fp8_eval_checked = False

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, recipe: Optional[fp8.Recipe] = None) -> "Float8Linear":
        """Turn ``linear`` into a :class:`Float8Linear` in place (same parameters, hooks and state-dict keys,
        plus the scaling buffers) and return it."""
        linear.__class__ = cls
        _adopt(linear)  # type: ignore[arg-type]
        linear._set_recipe(recipe or fp8.Recipe(), real_on_meta=True)  # type: ignore[attr-defined]
        return linear  # type: ignore[return-value]

    def forward(self, input: Tensor, is_first_microbatch: Optional[bool] = None) -> Tensor:
        """``is_first_microbatch`` (Transformer Engine's argument): ``None``, the weight is quantized on every
        call; ``True``, it is quantized and kept; ``False``, the kept one is used. Pass ``True`` on the first
        micro-batch after each optimizer step and ``False`` on the others of a gradient-accumulation cycle."""
        state = [getattr(self, name) for name in _FP8_BUFFERS]
        if self.recipe.scaling == "delayed" and self.training:
            _check_ddp_buffers(self, state[0])
        elif self.recipe.scaling == "delayed" and not self.__dict__.get("_fp8_eval_checked") and _can_read(state[0]):
            # An evaluation reads the state without updating it: one that never recorded an amax (a fresh layer,
            # or one loaded from a checkpoint without it) scales by 1. One host read, at the first eval forward
            # that can make it (not while tracing or capturing).
            self._fp8_eval_checked = True
            if not bool(state[0].any()):
                warnings.warn(
                    "mixprec.nn.Float8Linear: evaluated with delayed scaling that has never recorded an amax (a "
                    "fresh layer, or one loaded from a checkpoint without its scaling state): it quantizes with "
                    "scale 1, so values beyond the format's largest saturate. Train a step first, load the "
                    "scaling state, or evaluate with current scaling", stacklevel=2)
        # Not in a recomputation inside backward (activation checkpointing): it reads the state without updating
        # it, and its collective would pair with whatever another rank reduces next. (A traced forward keeps the
        # reduction: the graph task is an eager notion, and Dynamo cannot trace asking for it.)
        if self.training and torch.is_grad_enabled() and self.amax_group is not None and (
                torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1):
            self.reduce_amax_()
        # In eval mode the scaling state is read, not updated (as BatchNorm's running statistics).
        cache = None if is_first_microbatch is None else _microbatch_cache(self, is_first_microbatch)
        return float8_linear(input, self.weight, self.bias, state, self.recipe, cache, update_state=self.training)

    def reduce_amax_(self) -> None:
        """MAX-reduces over ``amax_group`` the amaxes this rank recorded since the last training forward, now
        (the next training forward does it too; MAX again changes nothing): every rank of the group then holds
        the same scaling state, so a checkpoint one rank saves (or a ``torch.distributed.checkpoint`` one, which
        stores one copy) resumes every rank exactly. A collective: call it on every rank, before saving. Nothing
        to do without ``amax_group`` or delayed scaling. (C++: ``mixprec::fp8::reduce_amax(layer->state,
        *layer->amax_group)``.)"""
        if self.amax_group is None or self.recipe.scaling != "delayed":
            return
        import torch.distributed as dist

        # mixprec::fp8::reduce_amax, on the c10d group behind the Python one (a rank outside the group has
        # nothing to reduce, as dist.all_reduce does nothing there).
        if self.amax_group is not dist.GroupMember.NON_GROUP_MEMBER:
            torch.ops.mixprec.fp8_reduce_amax_(self.fp8_forward_amax_history, self.fp8_backward_amax_history,
                                               self.amax_group.group_name)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scaling={self.recipe.scaling}, format={self.recipe.format}"

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        with _load_pre_hooks_first(self, state_dict, prefix, args):
            self._load_fp8_state(state_dict, prefix, *args)

    def _load_fp8_state(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # mixprec::fp8::plan_state_load decides, as for the C++ layer: a torch.nn.Linear checkpoint (pretrained
        # weights loaded after convert) has no scaling state, and the layer starts from the initial state, as
        # BatchNorm fills in num_batches_tracked for checkpoints without one. Part of a state loads as torch loads
        # it: strict reports the rest missing, strict=False takes pieces (loaders that go shard by shard). (torch
        # copied the dict.)
        keys = [prefix + name for name in _FP8_BUFFERS]
        numels = [-1 if key not in state_dict else
                  state_dict[key].numel() if isinstance(state_dict[key], Tensor) else 1 for key in keys]
        plan = torch.ops.mixprec.fp8_state_load_plan(self.recipe.scaling, numels, prefix + "weight" in state_dict)
        if plan == _SKIP_STATE and self.recipe.scaling != "delayed":
            # No state to load: a delayed-scaling checkpoint's, or one saved when every recipe kept its (empty)
            # buffers in the state dict, loads as torch.nn.Linear's. (A delayed layer's skip, a checkpoint of other
            # tensors, loads as torch loads it: what it lacks is reported under strict=True.)
            for key in keys:
                state_dict.pop(key, None)
        elif plan == _RESTART_STATE:
            # The initial state: what the layer recorded belonged to its old weights, and after to_empty
            # (deferred initialisation) its buffers hold uninitialised memory. Made where the buffers are, or,
            # for a meta-device layer (load_state_dict(assign=True) puts it in place as it is), where the
            # checkpoint's weight lies.
            like = getattr(self, _FP8_BUFFERS[0])
            if like.is_meta or self.weight.is_meta:
                weight = state_dict[prefix + "weight"]
                like = weight.to_local() if hasattr(weight, "to_local") else weight  # a DTensor's shard
            fresh = torch.ops.mixprec.fp8_scaling_state("delayed", int(self.recipe.amax_history_len), like)
            for key, tensor in zip(keys, fresh):
                state_dict[key] = tensor
            self._fp8_eval_checked = False  # an evaluation of the fresh state warns again
        elif plan == _INITIAL_TURN:
            # An older checkpoint (fp8_turn came after the other six), saved between steps: the initial turn (the
            # backward updated last), made where the checkpoint's state lies (load_state_dict with assign=True
            # puts it in place as it is).
            state_dict[keys[-1]] = torch.ops.mixprec.fp8_scaling_state(
                "delayed", int(self.recipe.amax_history_len), state_dict[keys[0]])[6]
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "Float8Linear":
        # .to(dtype), .half(), .bfloat16() cast floating buffers too; the scaling state must stay fp32 (its
        # values exact), so it follows device moves only.
        was_meta = self.weight.is_meta or getattr(self, _FP8_BUFFERS[0]).is_meta
        apply_keeping_fp32(self, _FP8_BUFFERS, lambda: super(Float8Linear, self)._apply(fn, recurse))
        like = getattr(self, _FP8_BUFFERS[0])
        if was_meta and not self.weight.is_meta and not like.is_meta and self.recipe.scaling == "delayed":
            # Off the meta device (to_empty: deferred initialisation) every tensor holds uninitialised memory, the
            # state too (real or meta before), and an init that sets only the parameters (torchtitan's
            # init_weights) leaves it so: NaN from the first step. The scaling state depends on no weight, so it
            # starts here, as a fresh layer's.
            fresh = torch.ops.mixprec.fp8_scaling_state("delayed", int(self.recipe.amax_history_len), like)
            with torch.no_grad():
                for name, tensor in zip(_FP8_BUFFERS, fresh):
                    getattr(self, name).copy_(tensor)
            self._fp8_eval_checked = False
        return self

    _CACHE = "_fp8_weight_cache"

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("amax_group", None)  # a process group belongs to its process (and does not pickle)
        state.pop("_ddp_seen", None)  # which DDP was checked: this process's
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> "Float8Linear":
        # As pickling copies (without the group and the weight cache), then the copy joins the same group: the
        # memo maps the group to itself, so every layer of a deep-copied model shares it.
        group = self.__dict__.get("amax_group")
        twin = type(self).__new__(type(self))
        memo[id(self)] = twin
        twin.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        if group is not None:
            twin.amax_group = group
        return twin


def _can_read(t: Tensor) -> bool:
    """Whether reading `t` on the host is possible and harmless now: not while torch.compile traces or a CUDA
    graph captures, and not for meta tensors or FakeTensors (memory estimators, dry runs)."""
    if torch.compiler.is_compiling() or t.is_meta or torch._subclasses.fake_tensor.is_fake(t):
        return False
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:  # real tensors in a fake mode
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def apply_keeping_fp32(module: torch.nn.Module, names: Sequence[str], apply: Callable[[], Any]) -> None:
    """Runs `apply` (the module's ``Module._apply``) and puts back the float32 buffers or parameters `names` that
    it cast to another dtype, moved to the new device only: scales, steps and scaling state must keep their
    exact values through ``.half()``, ``.bfloat16()`` and ``.to(dtype)``. (A parameter keeps its object: its
    data is restored, as ``Module._apply`` itself sets it.)"""
    buffers = {name: module._buffers[name] for name in names if module._buffers.get(name) is not None}
    # .data: aliases of the memory as it is now (Module._apply rebinds the parameter's and its gradient's).
    params = {name: (p.data, None if p.grad is None else p.grad.data)
              for name in names if (p := module._parameters.get(name)) is not None}
    apply()
    for name, tensor in buffers.items():
        after = module._buffers[name]
        if after is not None and after.dtype != torch.float32:
            module._buffers[name] = tensor.to(after.device)
    for name, (data, grad) in params.items():
        after = module._parameters[name]
        if after is not None and after.dtype != torch.float32:
            with torch.no_grad():
                after.data = data.to(after.device)
                if grad is not None:  # _apply cast it too: back in the parameter's own dtype
                    after.grad = grad.to(after.device)


def _microbatch_cache(layer: _KeepsQuantizedWeight, is_first_microbatch: bool) -> list[Tensor]:
    """The weight cache a layer's forward passes for ``is_first_microbatch``: a new empty list to fill on the
    first micro-batch, the filled one after it. A forward inside a backward (activation checkpointing's
    recomputation) of the first micro-batch reuses the filled one: it holds the weight the original forward
    quantized, and torch's non-reentrant checkpoint stops a recomputation early, before a new list is filled."""
    attr = layer._CACHE
    if is_first_microbatch and not (getattr(layer, attr, None) and torch._C._current_graph_task_id() != -1):
        setattr(layer, attr, [])
    elif not getattr(layer, attr, None):
        raise RuntimeError(f"{type(layer).__name__}: is_first_microbatch=False reuses the weight quantized by an "
                           "earlier call with is_first_microbatch=True, and there was none")
    return getattr(layer, attr)


def reduce_amax_(model: torch.nn.Module) -> None:
    """:meth:`Float8Linear.reduce_amax_` for every Float8Linear of ``model``: before saving a checkpoint of a model
    converted with ``amax_group`` (on every rank), so that resuming from one rank's copy is exact."""
    for module in model.modules():
        if isinstance(module, Float8Linear):
            module.reduce_amax_()


def _is_lora_adapter(name: str) -> bool:
    """peft's LoRA adapters (lora_A / lora_B) stay as they are: rank-r GEMMs that 8 bits cannot speed up, and a
    zero-initialised lora_B would start delayed scaling at scale 1. Their frozen base layers convert."""
    return any(part in ("lora_A", "lora_B") for part in name.split("."))


def _edge_filter(model: torch.nn.Module, multiple: int) -> Callable[[str, torch.nn.Linear], bool]:
    # The layers convert() considers, whether or not an earlier call converted them, so that the edges stay
    # the same layers however often convert runs. The last Linear in module order is the output layer (an LM's
    # head, a classifier). The first is the input layer only where no embedding or convolution comes before
    # it: in a transformer that is block 0's first projection, an ordinary layer whose siblings (k_proj,
    # v_proj) read the same input, so it is converted with them.
    kinds = (torch.nn.Linear, Linear, Float8Linear, Int8Linear)
    inputs = (torch.nn.Embedding, torch.nn.EmbeddingBag, torch.nn.modules.conv._ConvNd)
    names, first_is_input = [], True
    for name, m in model.named_modules():
        if type(m) in kinds and not _is_lora_adapter(name):  # an adapted head's base layer is the output layer
            names.append(name)
        elif not names and isinstance(m, inputs):
            first_is_input = False
    edges = set(names[-1:]) | (set(names[:1]) if first_is_input else set())

    def take(name: str, layer: torch.nn.Linear) -> bool:
        if _is_lora_adapter(name):
            return False
        return name not in edges and layer.in_features % multiple == 0 and layer.out_features % multiple == 0

    return take


def fp8_default_filter(model: torch.nn.Module) -> Callable[[str, torch.nn.Linear], bool]:
    """The layers :func:`convert` puts in FP8 unless told otherwise: every ``torch.nn.Linear`` (or layer
    converted from one) but the model's input and output layers (which the anchors keep in higher precision)
    and peft's LoRA adapters (``lora_A`` / ``lora_B``; their base layers convert), and only where both feature
    counts are multiples of 16 (what FP8 GEMMs need on CUDA). The output layer is the last Linear in module
    order (an LM head, a classifier); the input layer is the first, unless an embedding or a convolution comes
    before it (a transformer's first projection reads features, not the input)."""
    return _edge_filter(model, 16)


def int8_default_filter(model: torch.nn.Module) -> Callable[[str, torch.nn.Linear], bool]:
    """The layers :func:`convert` puts in INT8 unless told otherwise: every ``torch.nn.Linear`` but the model's
    input and output layers and peft's LoRA adapters (as :func:`fp8_default_filter` finds them), where both
    feature counts are multiples of 8 (what INT8 GEMMs need on CUDA)."""
    return _edge_filter(model, 8)


@dataclass(frozen=True)
class Int8Gemms:
    """Which of an :class:`Int8Linear`'s GEMMs run in INT8 (``mixprec::nn::Int8Gemms``); the others run in the
    input's dtype, the weight gradient with fp32 products and sums as in :class:`Linear`. The default is
    SwitchBack's: INT8 output and input gradient, the weight gradient in 16 bits (its sum over all tokens is
    where INT8 loses most)."""

    forward: bool = True
    input_grad: bool = True
    weight_grad: bool = False


def int8_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                gemms: Int8Gemms = Int8Gemms(), weight_cache: Optional[list[Tensor]] = None) -> Tensor:
    """``torch.nn.functional.linear`` with INT8 GEMMs (C++'s ``mixprec::nn::int8_linear``, the op
    ``mixprec::int8_linear``).

    Each INT8 GEMM quantizes its operands row-wise along the summed dimension (per token and per output
    channel for the output; per token and per input channel for the input gradient), from their own amax,
    sums in int32 and dequantizes in fp32 (:func:`mixprec.int8.mm`). The weight gradient is fp32 and, as in
    :func:`linear`, is added into an fp32 ``weight.grad`` in place in a plain backward. Under autocast the
    operands take the autocast dtype first. On CUDA the feature counts must be multiples of 8 (an INT8
    weight gradient also needs a token count that is one; other batches take the 16-bit GEMM for it).

    ``weight_cache`` keeps the quantized weight across gradient-accumulation micro-batches, as in
    :func:`float8_linear`: an empty list is filled by the call (the op ``mixprec::int8_linear_cached``
    returns the tensors), a filled one is used instead of quantizing ``weight`` again, which is then read
    only by the GEMMs that are not INT8. Emptying it after each optimizer step is the caller's part."""
    _check_ddp(weight)
    args = (input, weight, bias, bool(gemms.forward), bool(gemms.input_grad), bool(gemms.weight_grad))
    return _with_cache(torch.ops.mixprec.int8_linear, torch.ops.mixprec.int8_linear_cached, args, weight_cache)


class Int8Linear(_KeepsQuantizedWeight, torch.nn.Linear):
    """A ``torch.nn.Linear`` whose GEMMs run in INT8 (:func:`int8_linear`): same constructor, parameters,
    initialisation and state dict, plus ``gemms``; the weight keeps its dtype and gets an fp32 gradient as in
    :class:`Linear`. :meth:`from_linear` converts an existing layer in place."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None,
                 dtype: Optional[torch.dtype] = None, *, gemms: Optional[Int8Gemms] = None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        _adopt(self)
        self.gemms = gemms or Int8Gemms()

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, gemms: Optional[Int8Gemms] = None) -> "Int8Linear":
        """Turn ``linear`` into an :class:`Int8Linear` in place (same parameters, hooks and state-dict keys)
        and return it."""
        linear.__class__ = cls
        _adopt(linear)  # type: ignore[arg-type]
        linear.gemms = gemms or Int8Gemms()  # type: ignore[attr-defined]
        return linear  # type: ignore[return-value]

    def forward(self, input: Tensor, is_first_microbatch: Optional[bool] = None) -> Tensor:
        """``is_first_microbatch`` as in :meth:`Float8Linear.forward`: ``None``, the weight is quantized on
        every call; ``True``, it is quantized and kept; ``False``, the kept one is used."""
        if is_first_microbatch is None:
            return int8_linear(input, self.weight, self.bias, self.gemms)
        return int8_linear(input, self.weight, self.bias, self.gemms,
                           _microbatch_cache(self, is_first_microbatch))

    def extra_repr(self) -> str:
        g = self.gemms
        return (f"{super().extra_repr()}, int8_forward={g.forward}, int8_input_grad={g.input_grad}, "
                f"int8_weight_grad={g.weight_grad}")

    _CACHE = "_int8_weight_cache"


_M = TypeVar("_M", bound=torch.nn.Module)


def convert(module: _M, *, fp8: Optional["fp8.Recipe"] = None,
            int8: Union[Int8Gemms, bool, None] = None,
            filter: Optional[Callable[[str, torch.nn.Linear], bool]] = None,
            amax_group: Optional[Any] = None) -> _M:
    """Turn every ``torch.nn.Linear`` in ``module`` (itself included) into a :class:`Linear`, in place; with
    ``fp8=recipe``, the layers ``filter(name, layer)`` accepts become :class:`Float8Linear` instead (default
    filter: :func:`fp8_default_filter`); with ``int8=Int8Gemms(...)`` (or ``True`` for the default GEMMs),
    they become :class:`Int8Linear` (default filter: :func:`int8_default_filter`).

    Parameters, hooks, devices and state-dict keys stay as they were (the layers' class is swapped, no
    tensor is copied; FP8 layers gain their scaling buffers), so an optimizer built before the call keeps
    working; each weight's ``.grad`` becomes fp32 from then on. Subclasses of ``torch.nn.Linear`` are left
    alone (their forward, or the module using their weight, may be their own: MultiheadAttention's
    ``out_proj``). Layers an earlier call made :class:`Linear` are converted like ``torch.nn.Linear`` ones;
    converting again what is already converted the same way changes nothing, and a layer already converted
    another way (an FP8 layer with another recipe, an INT8 layer asked to become FP8,
    ...) is an error naming it, raised before anything changes, since converting it would discard its
    scaling state. Under ``DistributedDataParallel`` 16-bit weights get gradients in their own dtype again
    (see the module docstring). ``amax_group`` becomes each FP8 layer's :attr:`Float8Linear.amax_group`.
    A layer replaced whole later is ``torch.nn.Linear`` again (Hugging Face's ``resize_token_embeddings``
    builds a new head for an untied model): call ``convert`` again after such a change.
    Returns ``module``."""
    gemms = Int8Gemms() if int8 is True else (int8 or None)
    if fp8 is not None and gemms is not None:
        raise ValueError("mixprec.nn.convert: pass fp8= or int8=, not both")
    if gemms is not None and not isinstance(gemms, Int8Gemms):
        raise TypeError(f"mixprec.nn.convert: int8 must be an Int8Gemms or True, got {int8!r}")
    take = None
    if fp8 is not None:
        take = filter or fp8_default_filter(module)
    elif gemms is not None:
        take = filter or int8_default_filter(module)
    wanted = "Linear" if take is None else ("Float8Linear" if fp8 is not None else "Int8Linear")
    plan = []
    for name, m in module.named_modules():  # decide (and refuse) first: a refusal leaves the model as it was
        kind = type(m)
        if kind is Float8Linear or kind is Int8Linear:
            if take is None or not take(name, m):
                continue  # asked for nothing 8-bit here: it stays as it is
            same = m.recipe == fp8 if kind is Float8Linear else m.gemms == gemms
            if kind.__name__ != wanted or not same:
                held = f"recipe {m.recipe}" if kind is Float8Linear else f"GEMMs {m.gemms}"
                asked = fp8 if fp8 is not None else gemms
                raise ValueError(
                    f"mixprec.nn.convert: layer {name or '(the module itself)'!r} is already a {kind.__name__} "
                    f"({held}) and cannot be converted to {wanted} with {asked}: that would discard what it holds; "
                    "convert a model built afresh, or leave this layer out with filter=")
        elif kind is torch.nn.Linear or kind is Linear:
            plan.append((name, m, take is not None and take(name, m)))
    if take is not None and not any(eight_bit for _, _, eight_bit in plan) and not any(
            type(m) in (Float8Linear, Int8Linear) for m in module.modules()):
        # Silently converting nothing hides a model whose projections are not torch.nn.Linear.
        warnings.warn(
            f"mixprec.nn.convert: no layer became {wanted}: of the model's {len(plan)} torch.nn.Linear layer(s) the "
            "filter took none (the default one leaves out the input and output layers, and those whose feature counts "
            "are not multiples of 16 for FP8 or 8 for INT8); layers of other classes, such as the Conv1D "
            "projections of Hugging Face's GPT-2, are not converted", stacklevel=2)
    for name, m, eight_bit in plan:
        if eight_bit and fp8 is not None:
            Float8Linear.from_linear(m, fp8).amax_group = amax_group
        elif eight_bit:
            Int8Linear.from_linear(m, gemms)
        elif type(m) is torch.nn.Linear:
            m.__class__ = Linear
            _adopt(m)  # type: ignore[arg-type]
    _ddp_keeps_fp8_state(module)
    return module


def _ddp_keeps_fp8_state(module: torch.nn.Module) -> None:
    """DistributedDataParallel broadcasts rank 0's buffers at every forward (``broadcast_buffers=True``, its
    default). Delayed scaling's state holds each rank's own amaxes of the last step until the next forward
    reduces them (``amax_group``) or uses them: broadcast first, every rank would scale by rank 0's data. The
    FP8 buffers are listed in ``module._ddp_params_and_buffers_to_ignore``, which DDP reads when it wraps
    ``module`` (its documented way to leave buffers alone); names listed there before are kept."""
    names = [f"{prefix}.{b}" if prefix else b for prefix, m in module.named_modules()
             if isinstance(m, Float8Linear) and m.recipe.scaling == "delayed" for b in _FP8_BUFFERS]
    if names:
        known = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
        module._ddp_params_and_buffers_to_ignore = known + [n for n in names if n not in known]
