"""Quantization-aware training that composes with autocast, GradScaler and the master-weight optimizers.

:func:`prepare` swaps a model's ``nn.Linear`` and ``nn.Conv2d`` layers (in place, parameters kept) for QAT
layers whose forward fake-quantizes the weight (INT8 per output channel, or INT4 per group of input
features) and the input activations (INT8, per token for Linear, per tensor for Conv2d), through
:func:`mixprec.int8.fake_quantize`: one fused op that takes fp32, fp16 and bf16 alike (torch's fused
fake-quant observers refuse half tensors, so torch.ao's QAT does not run under autocast), passes gradients
straight through, and optionally learns the weight steps (LSQ). Train as usual: under ``torch.autocast`` or a
:class:`mixprec.Policy`, with :class:`mixprec.GradScaler` and :mod:`mixprec.optim`.

:func:`convert` then replaces each QAT layer with a quantized one whose state dict holds integer weights
plus float32 scales (INT4 packed two per byte when a row's code count is even, else one int8 code per byte;
the bias a buffer). A converted Linear with INT8 per-channel
weights and INT8 activations runs its product as an INT8 GEMM (:func:`mixprec.int8.mm`) on activations
quantized per token (on CUDA where both feature counts are multiples of 8); other layers (INT4, groups,
``activations=False``, Conv2d) dequantize their weights and compute in the autocast or input dtype with the
same activation quantization as in training. The quantized codes are exactly those the training forward
simulated. With ``fold_batchnorm``, each Conv2d followed by a BatchNorm2d is trained on its folded weight and
converted into one integer convolution with the folded bias.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from . import nn as _mnn
from .nn import apply_keeping_fp32

__all__ = ["QATConfig", "QATLinear", "QATConv2d", "QuantizedLinear", "QuantizedConv2d", "prepare", "convert"]


@dataclass(frozen=True)
class QATConfig:
    """What :func:`prepare` quantizes.

    Attributes:
        weight_bits: 8 (codes in [-127, 127]) or 4 ([-8, 7]).
        group_size: ``None`` for one step per output channel; else groups of this many input features
            (Linear only; it must divide ``in_features``), the usual layout of INT4 weights.
        activations: fake-quantize the layers' inputs to INT8 (per token for Linear, per tensor for Conv2d),
            dynamically from their own amax.
        learnable_scales: the weight steps become parameters (``weight_step``), initialised from the weights'
            amax and trained with LSQ's gradient; otherwise each forward takes them from the weights' amax.
        learnable_activation_scales: with ``activations``, the input step becomes a parameter too
            (``input_step``, one per tensor, LSQ's gradient) instead of each batch's amax / 127. It starts at 0
            (not set): the layer's first forward sets it to that batch's amax / 127. Under data parallelism,
            run that forward on the same calibration batch on every rank, before wrapping the model.
            :func:`convert` keeps it as a static activation scale (``input_scale``). LSQ's gradient scale for it
            depends on the number of elements, so ``torch.compile`` with dynamic shapes compiles per batch size
            while it trains (every other layer and config keeps one graph for all sizes).
        fold_batchnorm: a ``Conv2d`` directly followed by a ``BatchNorm2d`` in an ``nn.Sequential`` is folded
            with it (Jacob et al., 2018): the QAT layer quantizes the folded weight
            ``W * gamma / sqrt(running_var + eps)``, the one the converted layer will hold, and takes the
            BatchNorm as its child ``bn`` (its place becomes ``nn.Identity``; its parameters keep their tensors,
            now named ``<conv>.bn.*``), so training still normalizes with batch statistics. :func:`convert`
            folds it away into the integer convolution.
    """

    weight_bits: int = 8
    group_size: Optional[int] = None
    activations: bool = True
    learnable_scales: bool = False
    learnable_activation_scales: bool = False
    fold_batchnorm: bool = False

    def __post_init__(self) -> None:
        for name, value in (("weight_bits", self.weight_bits), ("group_size", self.group_size)):
            if (value is None and name == "group_size") or (  # whole numbers (NumPy's too), not bools
                    isinstance(value, numbers.Integral) and not isinstance(value, bool)):
                continue
            raise ValueError(f"{name} must be an int{' or None' if name == 'group_size' else ''}, got {value!r}")
        # The C++ layers' checks (mixprec::qat::check_config), run when the config is built.
        group_size = None if self.group_size is None else int(self.group_size)
        torch.ops.mixprec.qat_check_config(int(self.weight_bits), group_size, bool(self.activations),
                                           bool(self.learnable_activation_scales))

    @property
    def qrange(self) -> tuple[int, int]:
        """The weights' code range."""
        return (-127, 127) if self.weight_bits == 8 else (-8, 7)


def _fake_quantize_input(x: Tensor, per_token: bool) -> Tensor:
    """INT8 fake quantization of an activation: per token (rows of the [..., features] view) or per tensor, from
    its own amax (``mixprec::qat::fake_quantize_input``)."""
    return torch.ops.mixprec.qat_fake_quantize_input(x, per_token)


def _fold(conv: nn.Module, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """The folded weight and bias of `conv` and the BatchNorm after it (``mixprec::qat::fold_batchnorm``)."""
    return torch.ops.mixprec.qat_fold_batchnorm(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                                bn.running_var, bn.eps)


@torch.compiler.disable
def _init_input_step(step: Tensor, x: Tensor) -> bool:
    """``mixprec::qat::init_input_step``: sets a learnable input step that is still 0 from the batch's amax and
    says whether the step is set. It reads values back: eager forwards only (a compiled graph of a cold layer
    seeds the step with ``qat_seed_input_step_`` instead)."""
    return torch.ops.mixprec.qat_init_input_step_(step, x)


def _refuse_a_lost_input_step(layer: nn.Module) -> None:
    """The first forward sets a learnable input step still 0 in place. Under FSDP2 the step the forward sees is
    the unsharded copy, a slice of FSDP2's all-gather buffer (its storage outlives it: larger than the step),
    and resharding discards what is written there: the sharded step stays 0 and trains from there, silently.
    Such a step is refused by name while it is 0 (one read, at the first forward only); a step set before
    sharding (a calibration forward, or a loaded one) reaches it through the all-gather and runs."""
    step = layer.input_step  # type: ignore[attr-defined]
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return  # no FSDP2 without a process group (a step loaded from a larger buffer keeps what is written)
    if step.untyped_storage().nbytes() <= step.numel() * step.element_size() or not _mnn._can_read(step):
        return
    if not bool(step.detach().eq(0).all()):
        return
    raise RuntimeError(f"mixprec.qat.{type(layer).__name__}: the learnable input step is not set, and this forward "
                       "sees a copy of it inside a larger buffer (FSDP2's unsharded parameter), where the value the "
                       "first forward sets would be discarded at resharding. Run one forward on a batch (calibration) "
                       "before fully_shard, or load the steps from a checkpoint")


def _check(layer: nn.Module, config: QATConfig, bn: Optional[nn.BatchNorm2d] = None) -> Tensor:
    """What makes `layer` (and the BatchNorm to fold into it) unfit for `config` raises here, before anything is
    changed; returns the steps of its (folded) weight's amax (the start of learnable steps)."""
    weight = layer.weight
    if isinstance(layer, nn.Conv2d):
        torch.ops.mixprec.qat_check_conv2d(  # mixprec::qat::check_conv2d, as the C++ QATConv2d checks
            layer.out_channels, not isinstance(layer.padding, str), layer.padding_mode == "zeros", config.group_size,
            None if bn is None else bn.num_features, bn is not None and bn.running_var is not None,
            None if bn is None else bn.weight)
        if bn is not None:
            with torch.no_grad():
                weight = _fold(layer, bn)[0]
    return torch.ops.mixprec.qat_weight_steps(weight, config.weight_bits, config.group_size)


def _own_dtype_grad_of(weight: Tensor) -> None:
    """A QAT layer's weight gradient in the weight's dtype (the rule of the C++ layers too), whatever an earlier
    layer pinned (mixprec.nn.Linear's fp32 gradient) and through casts."""
    if weight.is_leaf and weight.grad_dtype is not None and weight.grad_dtype != weight.dtype:
        _mnn.own_dtype_grad(weight)


class _QATWeight:
    """The weight side shared by QATLinear and QATConv2d (the weight viewed as [out, everything else])."""

    weight: Tensor
    qat_config: QATConfig
    # Float32 whatever the model's dtype (Module._apply here, Policy.apply reads the names too).
    _FP32_NAMES = ("weight_step", "input_step")
    __prepare_scriptable__ = _mnn._refuse_torchscript

    def _keeping_steps_fp32(self, apply: Callable[[], Any]) -> Any:
        # The learnable steps stay float32 through .half() / .bfloat16() / .to(dtype), as the converted layer's
        # scales do: rounded to 16 bits they would train, and convert, other steps.
        apply_keeping_fp32(self, self._FP32_NAMES, apply)  # type: ignore[arg-type]
        self._dtype_changed()
        return self

    def _dtype_changed(self) -> None:
        """After a cast (its own, or Policy.apply's): the weight gradient in the weight's new dtype."""
        _own_dtype_grad_of(self.weight)

    @classmethod
    def _swap(cls, layer: nn.Module, config: QATConfig, step: Tensor) -> nn.Module:
        # A layer mixprec.nn.convert made Linear kept an fp32 gradient for its 16-bit weight; the fake-quantized
        # weight's gradient is formed in the weight's dtype, so a QAT layer has torch's gradient dtype (and works
        # under DDP, which buckets gradients in the parameters' dtype).
        for key, hook in list(layer._load_state_dict_post_hooks.items()):
            if hook is _mnn._restore_fp32_grad:
                del layer._load_state_dict_post_hooks[key]
        _own_dtype_grad_of(layer.weight)
        layer.__class__ = cls
        layer.qat_config = config  # type: ignore[assignment]
        if config.learnable_scales:
            layer.weight_step = nn.Parameter(step)
        if config.learnable_activation_scales:
            layer.input_step = nn.Parameter(torch.zeros(1, device=step.device, dtype=torch.float32))  # as C++
            layer._input_step_checked = False  # type: ignore[assignment]
        if config.learnable_scales or config.learnable_activation_scales:
            layer.register_load_state_dict_post_hook(cls._restart_steps)  # a function of the class: it pickles
        return layer

    def _input_step_restorer(self) -> Optional[Callable[[], None]]:
        """Before a forward that may set the learnable input step (the first eager one): a function that puts
        the step back as the forward found it, called when the forward raises. The step is set from the batch
        before the GEMM or convolution can refuse that batch (a wrong shape or dtype), and a step set from a
        refused batch would never be set again (mixprec::qat's C++ layers keep it alike). None otherwise."""
        step = self._parameters.get("input_step")  # type: ignore[attr-defined]
        cold = step is not None and not self._input_step_checked  # type: ignore[has-type]
        if not cold or step.is_meta or torch.compiler.is_compiling():
            return None
        before = step.detach().clone()

        def restore() -> None:
            with torch.no_grad():
                step.copy_(before)
            self._input_step_checked = False

        return restore

    def _forward_or_restore(self, forward: Callable[[Tensor], Tensor], input: Tensor, what: str) -> Tensor:
        """``forward(input)``; when it raises, the input step as it was (see _input_step_restorer) and torch.func's
        failures explained by name."""
        restore = self._input_step_restorer()
        try:
            return forward(input)
        except BaseException as error:
            if restore is not None:
                try:
                    restore()
                except Exception:  # noqa: S110 - the forward's error (a sticky CUDA one, say) is the one to see
                    pass
            if isinstance(error, (RuntimeError, NotImplementedError)):
                _mnn.explain_transform_failure(what, error, (input, self.weight))
            raise

    def _fake_input(self, input: Tensor, per_token: bool) -> Tensor:
        """The input as training quantizes it: dynamic per token / per tensor, or with the learned step (set by
        the first forward that reaches it)."""
        config = self.qat_config
        if not config.activations:
            return input
        if not config.learnable_activation_scales:
            return _fake_quantize_input(input, per_token)
        if not self._input_step_checked:  # type: ignore[has-type]
            if torch.compiler.is_compiling():
                # A layer still cold when traced: the start without a host read (a graph break fullgraph=True
                # refuses), in every call of this graph; it is a no-op once the step is set, but reads the
                # input once more. An eager forward first (or a loaded step) traces without it.
                torch.ops.mixprec.qat_seed_input_step_(self.input_step, input)  # type: ignore[attr-defined]
            else:
                _refuse_a_lost_input_step(self)
                self._input_step_checked = _init_input_step(self.input_step, input)  # type: ignore[attr-defined]
        return torch.ops.mixprec.qat_fake_quantize_input(input, False, self.input_step)  # type: ignore[attr-defined]

    def _load_qat_state(self, load: Callable[..., None], state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        with _mnn._load_pre_hooks_first(self, state_dict, prefix, args):  # type: ignore[arg-type]
            self._load_qat_steps(load, state_dict, prefix, *args)

    def _load_qat_steps(self, load: Callable[..., None], state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """``_load_from_state_dict`` (``load``: the module's own) for a QAT layer. A checkpoint of the plain layer
        (pretrained weights loaded after :func:`prepare`) holds none of the learnable steps: they restart as
        prepare starts them, from the loaded weight and at 0 for the input step (set by the next forward), as
        :class:`mixprec.nn.Float8Linear` restarts its scaling state for a ``torch.nn.Linear`` checkpoint; a
        checkpoint with part of the steps reports the rest missing (strict) or loads piecewise. (torch copied
        ``state_dict``.)"""
        steps = [name for name in ("weight_step", "input_step") if self._parameters.get(name) is not None]
        # mixprec::qat's rule, as the C++ layers load archives (1: restart; part of the steps loads as torch loads
        # it: strict reports the rest missing, strict=False takes pieces).
        restart = torch.ops.mixprec.qat_steps_plan([prefix + n in state_dict for n in steps],
                                                   prefix + "weight" in state_dict) == 1
        if restart:
            for name in steps:
                state_dict[prefix + name] = getattr(self, name)
        load(state_dict, prefix, *args)
        # The steps restart in _restart_steps, once the layer's children are loaded too (a folded layer's
        # BatchNorm: its statistics are part of the weight the steps start from).
        self._steps_restart = restart
        # A loaded input step is read again at the next forward (and set there if it is 0).
        if self.qat_config.learnable_activation_scales:
            self._input_step_checked = False

    def _start_steps(self) -> None:
        """The learnable steps where :func:`prepare` starts them: the weight step from the (folded) weight's amax
        (``_check``'s steps), the input step at 0 (set by the next forward). In place, so that an optimizer built
        before keeps its tensors; as new parameters on the weight's device where the steps are elsewhere (a model
        prepared on the meta device, then loaded with ``assign=True``: its steps hold no values to keep)."""
        params = self._parameters  # type: ignore[attr-defined]
        with torch.no_grad():
            for name in ("weight_step", "input_step"):
                step = params.get(name)
                if step is None:
                    continue
                if name == "weight_step":
                    start = _check(self, self.qat_config, self._modules.get("bn"))  # type: ignore[arg-type,attr-defined]
                    if step.device == start.device:
                        step.copy_(start)  # a DTensor step from a DTensor weight: the same placements
                        continue
                elif step.device == self.weight.device:
                    step.zero_()  # in place on any placement (FSDP2 shards it; a copy_ of a plain tensor is refused)
                    continue
                else:
                    start = torch.zeros(1, device=self.weight.device, dtype=torch.float32)
                params[name] = nn.Parameter(start.to(step.dtype), requires_grad=step.requires_grad)
        if params.get("input_step") is not None:
            self._input_step_checked = False

    def _steps_after_reset(self) -> None:
        """``reset_parameters`` after torch's: the learnable steps start again from the new weight, as
        :func:`prepare` starts them (after ``to_empty`` from the meta device they hold whatever memory they were
        given). A folded layer resets its BatchNorm first: its statistics are part of the weight the steps start
        from."""
        bn = self._modules.get("bn")  # type: ignore[attr-defined]
        if bn is not None:
            bn.reset_parameters()
        if "qat_config" in self.__dict__:  # prepared (the class is set before the config)
            self._start_steps()

    def _restart_steps(self, incompatible_keys: Any = None) -> None:
        """A load_state_dict post-hook (it runs after the children's loads): the restart _load_qat_state decided."""
        if self.__dict__.pop("_steps_restart", False):
            self._start_steps()
        # A loaded input step that is set needs no check at the next forward (one read here, at load time): a
        # resumed model then runs under torch.compile(fullgraph=True) at once, without the eager first forward.
        step = self._parameters.get("input_step")
        if step is not None and not step.is_meta:
            self._input_step_checked = bool(step.detach().ne(0).all())

    def _fake_weight(self) -> Tensor:
        return self._fake_weight_of(self.weight)

    def _fake_weight_of(self, weight: Tensor) -> Tensor:
        """`weight` (the layer's, or a folded one) fake-quantized with the layer's steps and config."""
        step = self.weight_step if self.qat_config.learnable_scales else None  # type: ignore[attr-defined]
        return torch.ops.mixprec.qat_fake_quantize_weight(weight, step, self.qat_config.weight_bits,
                                                          self.qat_config.group_size)


class QATLinear(nn.Linear, _QATWeight):
    """An ``nn.Linear`` trained with fake-quantized weights and inputs (see the module docstring)."""

    def _load_from_state_dict(self, *args: Any) -> None:
        self._load_qat_state(super()._load_from_state_dict, *args)

    @classmethod
    def from_linear(cls, layer: nn.Linear, config: QATConfig) -> "QATLinear":
        """Turn ``layer`` into a :class:`QATLinear` in place (its parameters kept) and return it, as
        :func:`prepare` does for each Linear it accepts."""
        return cls._swap(layer, config, _check(layer, config))  # type: ignore[return-value]

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "QATLinear":
        return self._keeping_steps_fp32(lambda: super(QATLinear, self)._apply(fn, recurse))

    def reset_parameters(self) -> None:
        """As ``torch.nn.Linear.reset_parameters``, and the learnable steps started again from the new weight."""
        super().reset_parameters()
        self._steps_after_reset()

    def forward(self, input: Tensor) -> Tensor:
        return self._forward_or_restore(
            lambda x: F.linear(self._fake_input(x, per_token=True), self._fake_weight(), self.bias), input,
            "mixprec.qat.QATLinear")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qat={self.qat_config}"


class QATConv2d(nn.Conv2d, _QATWeight):
    """An ``nn.Conv2d`` trained with fake-quantized weights (per output channel) and inputs (per tensor)."""

    def _load_from_state_dict(self, *args: Any) -> None:
        self._load_qat_state(super()._load_from_state_dict, *args)

    @classmethod
    def from_conv(cls, layer: nn.Conv2d, config: QATConfig) -> "QATConv2d":
        """Turn ``layer`` (zero padding given as sizes) into a :class:`QATConv2d` in place and return it, as
        :func:`prepare` does for each Conv2d it accepts (folding a BatchNorm is :func:`prepare`'s)."""
        return cls._swap(layer, config, _check(layer, config))  # type: ignore[return-value]

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "QATConv2d":
        return self._keeping_steps_fp32(lambda: super(QATConv2d, self)._apply(fn, recurse))

    def reset_parameters(self) -> None:
        """As ``torch.nn.Conv2d.reset_parameters`` (a folded layer's BatchNorm too), and the learnable steps started
        again from the new weight."""
        super().reset_parameters()
        self._steps_after_reset()

    def forward(self, input: Tensor) -> Tensor:
        return self._forward_or_restore(self._forward, input, "mixprec.qat.QATConv2d")

    def _forward(self, input: Tensor) -> Tensor:
        x = self._fake_input(input, per_token=False)
        bn = self._modules.get("bn")
        if bn is None:
            return self._conv_forward(x, self._fake_weight(), self.bias)
        # Folded (mixprec::qat::folded_conv2d): the folded weight quantized, the output back at the convolution's
        # scale for the BatchNorm, which normalizes it as before.
        step = self.weight_step if self.qat_config.learnable_scales else None
        y = torch.ops.mixprec.qat_folded_conv2d(x, self.weight, self.bias, step, self.qat_config.weight_bits,
                                                bn.weight, bn.running_var, bn.eps, list(self.stride),
                                                list(self.padding), list(self.dilation), self.groups)
        return bn(y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qat={self.qat_config}"


class _QuantizedWeight(nn.Module):
    """Integer weight codes (int8, or INT4 packed two per byte in uint8 when each row holds an even number of
    codes, else int8) and float32 steps, as buffers of the
    state dict (``mixprec::qat::quantize_weight``), and with learned input steps the static ``input_scale``."""

    weight_codes: Tensor
    weight_scale: Tensor
    input_scale: Optional[Tensor]
    __prepare_scriptable__ = _mnn._refuse_torchscript

    def _set_weight(self, layer: nn.Module, config: QATConfig, weight: Optional[Tensor] = None) -> None:
        input_scale = None
        if config.learnable_activation_scales:
            # A step never set converts to 0, as torch.ao converts without calibration, so that a model rebuilt as
            # prepare -> convert loads a converted checkpoint; the first forward refuses to run with it
            # (_check_input_scale).
            input_scale = layer.input_step.detach().abs().clone()
        step = layer.weight_step if config.learnable_scales else None
        weight = layer.weight if weight is None else weight
        codes, scale = torch.ops.mixprec.qat_quantize_weight(weight, step, config.weight_bits, config.group_size)
        self.weight_shape = tuple(layer.weight.shape)  # type: ignore[union-attr]
        self.weight_bits = config.weight_bits
        self.group_size = config.group_size
        self.activations = config.activations
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("input_scale", input_scale)
        self._note_input_scale()

    # Float32 whatever the model's dtype (Module._apply here, Policy.apply reads the names too).
    _FP32_NAMES = ("weight_scale", "input_scale")

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "_QuantizedWeight":
        # The scales keep float32 through .half() / .to(dtype): rounded, they would not give the codes' values.
        apply_keeping_fp32(self, self._FP32_NAMES, lambda: super(_QuantizedWeight, self)._apply(fn, recurse))
        return self

    def _note_input_scale(self) -> None:
        """Whether the static input scale is set (``mixprec::qat``'s rule, op ``qat_input_scale_set``: no entry 0, a
        step never learned before convert), read once where the scale is made or loaded and kept as a Python bool:
        forward refuses a 0 scale from it, so torch.compile and torch.export refuse it too (the bool is a constant
        to them). None where it cannot be read then (a meta model): the first eager forward reads it."""
        s = self.input_scale
        if s is None:
            self._input_scale_set: Optional[bool] = True
        else:
            self._input_scale_set = bool(torch.ops.mixprec.qat_input_scale_set(s)) if _mnn._can_read(s) else None

    def _check_input_scale(self) -> None:
        """A learned input scale of 0 is refused by name, as the C++ layers refuse it."""
        if self.__dict__.get("_input_scale_set") is None and self.input_scale is not None:
            if not _mnn._can_read(self.input_scale):
                return
            self._note_input_scale()
        if self.__dict__.get("_input_scale_set") is False:
            raise ValueError(f"mixprec.qat.{type(self).__name__}: input_scale is 0: the QAT layer's input_step was "
                             "never set before convert; run at least one training forward before convert, or load a "
                             "converted checkpoint into this layer")

    def _load_from_state_dict(self, *args: Any) -> None:
        super()._load_from_state_dict(*args)
        self._note_input_scale()  # the loaded scale (one read per layer, at load time)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        """codes * step in fp32, as ``dtype``, in the layer's weight shape."""
        w = torch.ops.mixprec.qat_dequantize_weight(self.weight_codes, self.weight_scale)
        return w.to(dtype).reshape(self.weight_shape)


class QuantizedLinear(_QuantizedWeight):
    """A converted :class:`QATLinear`: integer weights and scales; INT8 weights with INT8 activations run the
    product as an INT8 GEMM (:func:`mixprec.int8.mm`)."""

    def __init__(self, layer: QATLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._set_weight(layer, layer.qat_config)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_scale()
        return torch.ops.mixprec.qat_quantized_linear(input, self.weight_codes, self.weight_scale, self.bias,
                                                      self.weight_bits, self.group_size, self.activations,
                                                      self.input_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight_bits={self.weight_bits}, "
                f"group_size={self.group_size}, activations={self.activations}")


class QuantizedConv2d(_QuantizedWeight):
    """A converted :class:`QATConv2d`: integer weights and scales; the convolution runs on the dequantized
    weight with the input quantized per tensor, as in training. A folded one holds the folded weight's codes
    and the folded bias (its BatchNorm is gone)."""

    def __init__(self, layer: QATConv2d) -> None:
        super().__init__()
        bn = layer._modules.get("bn")
        if bn is None:
            self._set_weight(layer, layer.qat_config)
            bias = None if layer.bias is None else layer.bias.detach().clone()
        else:
            with torch.no_grad():
                weight, bias = _fold(layer, bn)
            self._set_weight(layer, layer.qat_config, weight)
        self.register_buffer("bias", bias)
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups

    def extra_repr(self) -> str:
        out_channels, in_per_group, *kernel = self.weight_shape
        return (f"{in_per_group * self.groups}, {out_channels}, kernel_size={tuple(kernel)}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"weight_bits={self.weight_bits}, activations={self.activations}")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_scale()
        return torch.ops.mixprec.qat_quantized_conv2d(
            input, self.weight_codes, self.weight_scale, list(self.weight_shape), self.bias, list(self.stride),
            list(self.padding), list(self.dilation), self.groups, self.activations, self.input_scale)


_M = TypeVar("_M", bound=nn.Module)


def prepare(model: _M, config: Optional[QATConfig] = None, *,
            filter: Optional[Callable[[str, nn.Module], bool]] = None) -> _M:
    """Swap every ``nn.Linear`` (also one :func:`mixprec.nn.convert` made a :class:`mixprec.nn.Linear`; an FP8 or
    INT8 layer is an error naming it) and ``nn.Conv2d`` that ``filter(name, layer)`` accepts (default: all) for its
    QAT layer, in place: the same parameters, hooks and state-dict keys, plus ``weight_step`` with
    ``learnable_scales`` (new parameters: build the optimizer after ``prepare`` then). With ``fold_batchnorm``,
    a Conv2d followed by a BatchNorm2d in an ``nn.Sequential`` takes it as its child ``bn`` and the BatchNorm's
    place becomes ``nn.Identity`` (the same tensors, named ``<conv>.bn.*``). Every layer is checked before any is
    swapped, so an error leaves the model as it was. Returns ``model``."""
    config = config or QATConfig()
    folds: dict[int, tuple[nn.Sequential, str, nn.BatchNorm2d]] = {}  # id(conv) -> where its BatchNorm is
    if config.fold_batchnorm:
        for parent in model.modules():
            if isinstance(parent, nn.Sequential):
                entries = list(parent._modules.items())
                for (_, a), (bn_name, b) in zip(entries, entries[1:]):
                    if type(a) is nn.Conv2d and type(b) is nn.BatchNorm2d:
                        folds[id(a)] = (parent, bn_name, b)
    todo = []
    conv1d: list[str] = []
    for name, m in model.named_modules():
        if filter is not None and not filter(name, m):
            continue
        # Layers mixprec.nn.convert made Linear are torch.nn.Linear's with fp32 weight gradients: they take QAT
        # too. An 8-bit layer already quantizes its GEMMs another way: refused by name, not skipped silently.
        if type(m) in (_mnn.Float8Linear, _mnn.Int8Linear):
            raise ValueError(f"mixprec.qat.prepare: layer {name or '(the model itself)'!r} ({type(m).__name__}) "
                             "already runs its GEMMs in 8 bits; prepare QAT on the model before mixprec.nn.convert, "
                             "or leave the layer out with filter=")
        # Prepared already: the same config changes nothing; another one (4 bits asked of an 8-bit layer, or
        # folding asked after a plain prepare) is refused rather than silently not done.
        if isinstance(m, (QATLinear, QATConv2d)) and m.qat_config != config:
            raise ValueError(f"mixprec.qat.prepare: layer {name or '(the model itself)'!r} is prepared already with "
                             f"{m.qat_config}, not {config}; prepare a model that is not prepared yet, or leave the "
                             "layer out with filter=")
        if (parametrize.is_parametrized(m) and isinstance(m, (nn.Linear, nn.Conv2d))
                and not isinstance(m, (QATLinear, QATConv2d))):
            # A parametrized layer is a class torch made for it: not quantized, so say so.
            warnings.warn(f"mixprec.qat.prepare: layer {name or '(the model itself)'!r} is parametrized "
                          f"({type(m).__name__}) and stays in float; prepare before adding the parametrization, "
                          "or leave the layer out with filter= to silence this", stacklevel=2)
        if type(m) in (nn.Linear, _mnn.Linear, nn.Conv2d):
            fold = folds.get(id(m))
            todo.append((m, _check(m, config, fold[2] if fold else None), fold))
        elif type(m).__name__ == "Conv1D":
            conv1d.append(name)
    if conv1d:
        # Hugging Face's GPT-2 projections are Conv1D (a transposed Linear), not nn.Linear: say they stay in float,
        # as mixprec.nn.convert does, rather than train a model whose projections QAT never sees.
        warnings.warn(f"mixprec.qat.prepare: {len(conv1d)} Conv1D layer(s) (e.g. {conv1d[0]!r}; Hugging Face's GPT-2 "
                      "projections) are not nn.Linear and stay in float; leave them out with filter= to silence this",
                      stacklevel=2)
    for m, step, fold in todo:
        (QATConv2d if type(m) is nn.Conv2d else QATLinear)._swap(m, config, step)
        if fold is not None:
            parent, bn_name, bn = fold
            m.bn = bn
            setattr(parent, bn_name, nn.Identity())
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replace every QAT layer of ``model`` by its quantized layer (integer weight codes plus float32 scales
    in the state dict), in place, and return ``model`` (a QAT layer passed as ``model`` itself is returned
    converted). Every replacement is built before any is put in place."""
    def swap(m: nn.Module) -> Optional[nn.Module]:
        if isinstance(m, QATLinear):
            new: nn.Module = QuantizedLinear(m)
        elif isinstance(m, QATConv2d):
            new = QuantizedConv2d(m)
        else:
            return None
        # The layer's forward hooks (a feature extractor's, a profiler's) carry over, as torch.ao's convert
        # keeps them (with their kwargs / always-call flags). Not those that compute the weight before each
        # forward (spectral_norm, the old weight_norm, pruning): the codes hold the weight they computed, and
        # the quantized layer has none of their tensors.
        computes_weight = (SpectralNorm, WeightNorm, BasePruningMethod)
        dropped = {k for k, h in m._forward_pre_hooks.items() if isinstance(h, computes_weight)}
        for name in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                     "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            if hasattr(m, name):
                getattr(new, name).update({k: v for k, v in getattr(m, name).items() if k not in dropped})
        return new

    root = swap(model)
    if root is not None:
        return root
    todo = []
    made: dict[int, nn.Module] = {}  # a layer used in several places (or parents) becomes one quantized layer
    for parent in model.modules():
        for child_name, child in parent._modules.items():  # every slot: named_children() skips repeated modules
            if child is None:
                continue
            if id(child) not in made:
                new = swap(child)
                if new is None:
                    continue
                made[id(child)] = new
            todo.append((parent, child_name, made[id(child)]))
    if not todo:  # silently returning the model as it was hides a missing prepare()
        warnings.warn("mixprec.qat.convert: the model has no QAT layer to convert (call mixprec.qat.prepare and "
                      "train first)", stacklevel=2)
    for parent, child_name, new in todo:
        setattr(parent, child_name, new)
    return model
