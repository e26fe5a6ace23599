"""8-bit integers: the Python face of ``mixprec::int8`` (``csrc/include/mixprec/int8.h``).

Every op sees a tensor as a ``[rows, cols]`` matrix (``cols`` = its last dimension, ``rows`` = the product of
the others) cut into ``block = (block_rows, block_cols)`` blocks, ``-1`` meaning the whole extent:
``(1, -1)`` per row (a Linear weight's output channels, or tokens), ``(-1, 1)`` per column, ``(1, g)``
groups of ``g`` along each row, ``(-1, -1)`` the whole tensor.

Symmetric INT8: ``step = amax / 127`` per block (fp32, at least the smallest normal float),
``data = round(input * (1 / step))`` saturated to ``[-127, 127]``, and ``input ~= data * scale_inv`` with
``scale_inv = step``: :func:`fake_quantize`'s arithmetic with that step, so QAT simulates exactly these codes. An all-zero block gets
scale 1; a block holding inf or NaN gets ``scale_inv`` NaN, so every product that reads it is NaN and an
overflow still reaches the GradScaler's check instead of vanishing into saturated codes.

Every function runs on CPU and CUDA with the same bits, reads scales on the device (no host
synchronisation), and traces under ``torch.compile``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = ["Quantized", "quantize", "mm", "fake_quantize"]


class Quantized(NamedTuple):
    """What :func:`quantize` returns."""

    data: torch.Tensor
    """int8 codes in [-127, 127], shaped like the input."""
    scale_inv: torch.Tensor
    """float32 ``[ceil(rows / block_rows), ceil(cols / block_cols)]``: each block's dequantization factor."""


def _block(block: tuple[int, int]) -> tuple[int, int]:
    if len(block) != 2:
        raise ValueError(f"block must be (block_rows, block_cols), got {block!r}")
    return int(block[0]), int(block[1])


def quantize(input: torch.Tensor, block: tuple[int, int] = (1, -1), *, rounding: str = "nearest",
             seed: Optional[int] = None, pow2_scales: bool = False) -> Quantized:
    """Symmetric INT8 quantization in one op: each block's amax, its scale and the rounded, saturated codes.

    Args:
        input: fp32, fp16 or bf16.
        block: ``(block_rows, block_cols)``; the default is per row.
        rounding: ``"nearest"`` (half to even) or ``"stochastic"`` (unbiased; seeded Philox draws per element,
            the same bits on CPU and CUDA).
        seed: key of stochastic rounding; ``None`` takes one from the device's default generator.
        pow2_scales: round scales down to powers of two (then ``scale_inv`` is exact).

    Element ``[r, c]`` dequantizes as ``data[r, c] * scale_inv[r // block_rows, c // block_cols]``.
    """
    block_rows, block_cols = _block(block)
    data, scale_inv = torch.ops.mixprec.int8_quantize.default(input, block_rows, block_cols, rounding, seed,
                                                              bool(pow2_scales))
    return Quantized(data, scale_inv)


def mm(a: torch.Tensor, b: torch.Tensor, a_scale_inv: torch.Tensor, b_scale_inv: torch.Tensor,
       out_dtype: torch.dtype = torch.float32, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(a * a_scale_inv) @ (b * b_scale_inv)`` for int8 ``a [m, k]`` and ``b [k, n]`` (any strides: a
    transposed view is free).

    The products are summed exactly in int32 (``k <= 131071``), then dequantized in fp32 as
    ``(float(sum) * a_scale_inv[i]) * b_scale_inv[j]``, plus ``bias`` (``[n]``, taken in ``out_dtype``, added
    in fp32), then rounded once to ``out_dtype`` (fp32, bf16 or fp16). ``a_scale_inv``: one element or ``[m, 1]``;
    ``b_scale_inv``: one element or ``[1, n]``. CUDA: ``torch._int_mm`` (cuBLASLt) and one fused
    dequantization pass; ``k`` and ``n`` must be multiples of 8. CPU: an exact GEMM of the codes (fp32 while
    every sum stays within 2^24, i.e. ``k <= 1024``; float64 beyond).
    Both give the same bits.
    """
    return torch.ops.mixprec.int8_mm.default(a, b, a_scale_inv, b_scale_inv, out_dtype, bias)


def fake_quantize(input: torch.Tensor, scale: torch.Tensor, quant_min: int = -127, quant_max: int = 127,
                  block: tuple[int, int] = (-1, -1), *, grad_factor: float = 1.0) -> torch.Tensor:
    """Fake quantization for quantization-aware training, differentiable.

    ``y = clamp(round(x * (1 / s)), quant_min, quant_max) * s`` per block, rounded half to even: the
    arithmetic of ``torch.fake_quantize_per_channel_affine`` with zero point 0, for fp32, fp16 and bf16
    inputs alike (the output keeps the input's dtype, under autocast too). ``scale`` is a float32
    ``[grid_rows, grid_cols]`` tensor of positive steps (one element for a single block); the blocks must
    divide the matrix view.

    Backward: the gradient passes straight through where the rounded value lies within the range, and is zero
    outside. When ``scale`` requires grad it gets LSQ's gradient (``round(x/s) - x/s`` inside the range,
    ``quant_min`` / ``quant_max`` outside, times the incoming gradient), summed per block and multiplied by
    ``grad_factor`` (LSQ recommends ``1 / sqrt(elements per block * quant_max)``). Unlike torch's, a NaN
    input gives a NaN output.
    """
    block_rows, block_cols = _block(block)
    return torch.ops.mixprec.fake_quantize(input, scale, int(quant_min), int(quant_max), block_rows, block_cols,
                                           float(grad_factor))
