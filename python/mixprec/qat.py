"""Quantization-aware training that composes with autocast, GradScaler and the master-weight optimizers.

:func:`prepare` swaps a model's ``nn.Linear`` and ``nn.Conv2d`` layers (in place, parameters kept) for QAT
layers whose forward fake-quantizes the weight (INT8 per output channel, or INT4 per group of input
features) and the input activations (INT8, per token for Linear, per tensor for Conv2d), through
:func:`mixprec.int8.fake_quantize`: one fused op that takes fp32, fp16 and bf16 alike (torch's fused
fake-quant observers refuse half tensors, so torch.ao's QAT does not run under autocast), passes gradients
straight through, and optionally learns the weight steps (LSQ). Train as usual: under ``torch.autocast`` or a
:class:`mixprec.Policy`, with :class:`mixprec.GradScaler` and :mod:`mixprec.optim`.

:func:`convert` then replaces each QAT layer with a quantized one whose state dict holds integer weights
plus float32 scales (INT4 packed two per byte). A converted Linear with INT8 weights runs its product as an
INT8 GEMM (:func:`mixprec.int8.mm`) on activations quantized per token; INT4 and Conv2d layers dequantize
their weights and compute in the input's dtype with the same activation quantization as in training. The
quantized codes are exactly those the training forward simulated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import int8

__all__ = ["QATConfig", "QATLinear", "QATConv2d", "QuantizedLinear", "QuantizedConv2d", "prepare", "convert"]

_TINY = torch.finfo(torch.float32).tiny  # a step for all-zero blocks: their codes stay 0, 1 / step is finite


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
    """

    weight_bits: int = 8
    group_size: Optional[int] = None
    activations: bool = True
    learnable_scales: bool = False

    def __post_init__(self) -> None:
        if self.weight_bits not in (4, 8):
            raise ValueError(f"weight_bits must be 8 or 4, got {self.weight_bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be a positive number of input features or None, got {self.group_size}")

    @property
    def qrange(self) -> tuple[int, int]:
        """The weights' code range."""
        return (-127, 127) if self.weight_bits == 8 else (-8, 7)


def _steps(m: Tensor, block: tuple[int, int], qmax: int) -> Tensor:
    """Each block's step amax / qmax (float32, ``[grid_rows, grid_cols]``) of a 2-D ``m``, without gradient."""
    rows, cols = m.shape
    br = rows if block[0] == -1 else block[0]
    bc = cols if block[1] == -1 else block[1]
    amax = m.detach().abs().reshape(rows // br, br, cols // bc, bc).amax(dim=(1, 3))
    return (amax.float() / qmax).clamp_min(_TINY)


def _fake_quantize_input(x: Tensor, per_token: bool) -> Tensor:
    """INT8 fake quantization of an activation: per token (rows of the [..., features] view) or per tensor."""
    if x.numel() == 0:
        return x
    rows = x.reshape(-1, x.shape[-1]) if x.dim() > 0 else x.reshape(1, 1)
    block = (1, -1) if per_token else (-1, -1)
    out = int8.fake_quantize(rows, _steps(rows, block, 127), -127, 127, block)
    return out.reshape(x.shape)


class _QATWeight:
    """The weight side shared by QATLinear and QATConv2d (the weight viewed as [out, everything else])."""

    weight: Tensor
    qat_config: QATConfig

    def _weight_block(self) -> tuple[int, int]:
        g = self.qat_config.group_size
        return (1, -1) if g is None else (1, g)

    def _init_qat(self, config: QATConfig) -> None:
        w2 = self.weight.detach().reshape(self.weight.shape[0], -1)
        if config.group_size is not None:
            if not isinstance(self, nn.Linear):
                raise ValueError("QATConfig.group_size applies to Linear layers only")
            if w2.shape[1] % config.group_size != 0:
                raise ValueError(f"group_size {config.group_size} must divide in_features {w2.shape[1]}")
        self.qat_config = config
        if config.learnable_scales:
            step = _steps(w2, self._weight_block(), config.qrange[1])
            self.weight_step = nn.Parameter(step.to(self.weight.device))  # type: ignore[misc]

    def _fake_weight(self) -> Tensor:
        qmin, qmax = self.qat_config.qrange
        w2 = self.weight.reshape(self.weight.shape[0], -1)
        block = self._weight_block()
        if self.qat_config.learnable_scales:
            step = self.weight_step.float()  # type: ignore[attr-defined]
            per_block = w2.numel() // step.numel()
            out = int8.fake_quantize(w2, step, qmin, qmax, block, grad_factor=(per_block * qmax) ** -0.5)
        else:
            out = int8.fake_quantize(w2, _steps(w2, block, qmax), qmin, qmax, block)
        return out.reshape(self.weight.shape)


class QATLinear(nn.Linear, _QATWeight):
    """An ``nn.Linear`` trained with fake-quantized weights and inputs (see the module docstring)."""

    @classmethod
    def from_linear(cls, layer: nn.Linear, config: QATConfig) -> "QATLinear":
        layer.__class__ = cls
        layer._init_qat(config)  # type: ignore[attr-defined]
        return layer  # type: ignore[return-value]

    def forward(self, input: Tensor) -> Tensor:
        x = _fake_quantize_input(input, per_token=True) if self.qat_config.activations else input
        return F.linear(x, self._fake_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qat={self.qat_config}"


class QATConv2d(nn.Conv2d, _QATWeight):
    """An ``nn.Conv2d`` trained with fake-quantized weights (per output channel) and inputs (per tensor)."""

    @classmethod
    def from_conv(cls, layer: nn.Conv2d, config: QATConfig) -> "QATConv2d":
        layer.__class__ = cls
        layer._init_qat(config)  # type: ignore[attr-defined]
        return layer  # type: ignore[return-value]

    def forward(self, input: Tensor) -> Tensor:
        x = _fake_quantize_input(input, per_token=False) if self.qat_config.activations else input
        return self._conv_forward(x, self._fake_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qat={self.qat_config}"


def _pack_int4(codes: Tensor) -> Tensor:
    """[rows, cols] codes in [-8, 7] (cols even) -> uint8 [rows, cols / 2]: element 2j in the low nibble."""
    u = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def _unpack_int4(packed: Tensor) -> Tensor:
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    codes = torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)
    return torch.where(codes > 7, codes - 16, codes)


class _QuantizedWeight(nn.Module):
    """Integer weight codes (int8, or INT4 packed in uint8) and float32 steps, as buffers of the state dict."""

    weight_codes: Tensor
    weight_scale: Tensor

    def _set_weight(self, layer: nn.Module, config: QATConfig) -> None:
        w = layer.weight.detach()  # type: ignore[union-attr]
        qmin, qmax = config.qrange
        w2 = w.reshape(w.shape[0], -1).float()
        block = layer._weight_block()  # type: ignore[operator]
        step = layer.weight_step.detach().float() if config.learnable_scales else _steps(w2, block, qmax)  # type: ignore[union-attr]
        # The codes the training forward simulated: fake_quantize's output is code * step exactly.
        codes = torch.round(int8.fake_quantize(w2, step, qmin, qmax, block) / step.repeat_interleave(
            w2.shape[1] // step.shape[1], dim=1)).to(torch.int8)
        self.weight_shape = tuple(w.shape)
        self.weight_bits = config.weight_bits
        self.group_size = config.group_size
        self.activations = config.activations
        packed = _pack_int4(codes) if config.weight_bits == 4 and w2.shape[1] % 2 == 0 else codes
        self.register_buffer("weight_codes", packed)
        self.register_buffer("weight_scale", step.contiguous())

    def codes(self) -> Tensor:
        """The weight's integer codes as int8 ``[out, in * ...]``."""
        c = self.weight_codes
        return _unpack_int4(c) if c.dtype == torch.uint8 else c

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        """codes * step in fp32, as ``dtype``, in the layer's weight shape."""
        c = self.codes().float()
        step = self.weight_scale.repeat_interleave(c.shape[1] // self.weight_scale.shape[1], dim=1)
        return (c * step).to(dtype).reshape(self.weight_shape)


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class QuantizedLinear(_QuantizedWeight):
    """A converted :class:`QATLinear`: integer weights and scales; INT8 weights with INT8 activations run the
    product as an INT8 GEMM (:func:`mixprec.int8.mm`)."""

    def __init__(self, layer: QATLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._set_weight(layer, layer.qat_config)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def forward(self, input: Tensor) -> Tensor:
        dtype = _compute_dtype(input)
        x = input.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        if self.weight_bits == 8 and self.group_size is None and self.activations and dtype != torch.float64:
            rows = x.reshape(-1, self.in_features)
            q = int8.quantize(rows, (1, -1))
            out = int8.mm(q.data, self.weight_codes.t(), q.scale_inv, self.weight_scale.reshape(1, -1), dtype, bias)
            return out.reshape(*x.shape[:-1], self.out_features)
        if self.activations:
            x = _fake_quantize_input(x, per_token=True)
        return F.linear(x, self.dequantized_weight(dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight_bits={self.weight_bits}, "
                f"group_size={self.group_size}, activations={self.activations}")


class QuantizedConv2d(_QuantizedWeight):
    """A converted :class:`QATConv2d`: integer weights and scales; the convolution runs on the dequantized
    weight with the input quantized per tensor, as in training."""

    def __init__(self, layer: QATConv2d) -> None:
        super().__init__()
        self._set_weight(layer, layer.qat_config)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups
        if layer.padding_mode != "zeros":
            raise ValueError(f"mixprec.qat.convert: Conv2d padding_mode {layer.padding_mode!r} is not supported")

    def forward(self, input: Tensor) -> Tensor:
        dtype = _compute_dtype(input)
        x = input.to(dtype)
        if self.activations:
            x = _fake_quantize_input(x, per_token=False)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.conv2d(x, self.dequantized_weight(dtype), bias, self.stride, self.padding, self.dilation, self.groups)


def prepare(model: nn.Module, config: Optional[QATConfig] = None, *,
            filter: Optional[Callable[[str, nn.Module], bool]] = None) -> nn.Module:
    """Swap every ``nn.Linear`` and ``nn.Conv2d`` that ``filter(name, layer)`` accepts (default: all) for its
    QAT layer, in place: the same parameters (an optimizer built before keeps working), hooks and state-dict
    keys, plus ``weight_step`` with ``learnable_scales``. Returns ``model``."""
    config = config or QATConfig()
    for name, m in list(model.named_modules()):
        if filter is not None and not filter(name, m):
            continue
        if type(m) is nn.Linear:
            QATLinear.from_linear(m, config)
        elif type(m) is nn.Conv2d:
            QATConv2d.from_conv(m, config)
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replace every QAT layer of ``model`` by its quantized layer (integer weight codes plus float32 scales
    in the state dict), in place, and return ``model`` (a QAT layer passed as ``model`` itself is returned
    converted)."""
    def swap(m: nn.Module) -> Optional[nn.Module]:
        if isinstance(m, QATLinear):
            return QuantizedLinear(m)
        if isinstance(m, QATConv2d):
            return QuantizedConv2d(m)
        return None

    root = swap(model)
    if root is not None:
        return root
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            new = swap(child)
            if new is not None:
                setattr(parent, child_name, new)
    return model

