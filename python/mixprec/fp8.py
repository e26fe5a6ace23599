"""FP8 quantization and scaling: the Python face of ``mixprec::fp8`` (``csrc/include/mixprec/fp8.h``).

Conventions (Transformer Engine's): ``data = fp8(x * scale)`` and ``x ~= data.float() * scale_inv`` with
``scale_inv = 1 / scale``. A scale maps an amax (``max |x|``) onto the format's largest finite value
(448 for ``torch.float8_e4m3fn``, 57344 for ``torch.float8_e5m2``), divided by ``2**margin`` and, with
``pow2_scales``, rounded down to a power of two (then ``scale_inv`` is exact).

Rounding is ``"nearest"`` (round-to-nearest-even, bit-identical to ``Tensor.to(dtype)``) or
``"stochastic"`` (unbiased; seeded Philox draws per element, the same bits on CPU and CUDA). With
``saturate`` (the default) a value beyond the largest finite one, inf included, becomes +-that value (as
CUDA's SATFINITE conversion and torch 2.14's ``Tensor.to(torch.float8_e4m3fn)`` do); without it, an
overflow becomes NaN in E4M3 (which has no inf) and +-inf in E5M2 (as ``Tensor.to(torch.float8_e5m2)``
does). NaN stays NaN.

Every function runs on CPU and CUDA, reads scales on the device (no host synchronisation), and traces
under ``torch.compile``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

__all__ = [
    "FORMATS",
    "max_finite",
    "Quantized",
    "BlockQuantized",
    "quantize",
    "quantize_blockwise",
    "dequantize",
    "update_scales_",
    "gemm",
    "gemm_accum_",
    "Recipe",
    "SCALINGS",
]

#: The scaling granularities a :class:`Recipe` names (``mixprec::fp8::Scaling``).
SCALINGS = ("delayed", "current", "rowwise", "blockwise")

_FORMATS = {"hybrid": (torch.float8_e4m3fn, torch.float8_e5m2), "e4m3": (torch.float8_e4m3fn, torch.float8_e4m3fn)}


@dataclass(frozen=True)
class Recipe:
    """How :class:`mixprec.nn.Float8Linear` quantizes (``mixprec::fp8::Recipe`` in C++, which checks it).

    Attributes:
        scaling: ``"delayed"`` (per tensor, from the max of the last ``amax_history_len`` amaxes: one pass
            over the data; Transformer Engine's default), ``"current"`` (per tensor, from this tensor's amax),
            ``"rowwise"`` (per row of every GEMM operand), ``"blockwise"`` (1x128 activations and gradients,
            128x128 weights: DeepSeek-V3).
        format: ``"hybrid"`` (E4M3 input and weight, E5M2 output gradient) or ``"e4m3"`` (E4M3 everywhere).
        amax_history_len: delayed scaling's window.
        amax_compute_algo: ``"max"`` or ``"most_recent"`` (delayed scaling).
        margin: scales are divided by ``2**margin`` (0 to 32).
        pow2_scales: round scales down to powers of two (exact dequantization).
        fast_accum: CUDA's faster FP8 accumulation for the forward GEMM (backward GEMMs never use it).
    """

    scaling: str = "delayed"
    format: str = "hybrid"
    amax_history_len: int = 16
    amax_compute_algo: str = "max"
    margin: int = 0
    pow2_scales: bool = False
    fast_accum: bool = True

    def __post_init__(self) -> None:
        if self.format not in _FORMATS:  # the format name is Python's; its two dtypes go to the C++ checks
            raise ValueError(f"format must be 'hybrid' or 'e4m3', got {self.format!r}")
        # mixprec::fp8::check_recipe: scaling, history length, amax_compute_algo and margin, checked once in C++.
        torch.ops.mixprec.fp8_check_recipe(str(self.scaling), self.forward_dtype, self.backward_dtype,
                                           int(self.amax_history_len), str(self.amax_compute_algo), int(self.margin))

    @property
    def forward_dtype(self) -> torch.dtype:
        """The FP8 dtype of the input and the weight."""
        return _FORMATS[self.format][0]

    @property
    def backward_dtype(self) -> torch.dtype:
        """The FP8 dtype of the output gradient."""
        return _FORMATS[self.format][1]

#: The FP8 dtypes mixprec quantizes to.
FORMATS = (torch.float8_e4m3fn, torch.float8_e5m2)

_MAX_FINITE = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def max_finite(dtype: torch.dtype) -> float:
    """The largest finite value of an FP8 ``dtype`` (448 for E4M3, 57344 for E5M2)."""
    if dtype not in _MAX_FINITE:
        raise ValueError(f"dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")
    return _MAX_FINITE[dtype]


class Quantized(NamedTuple):
    """What :func:`quantize` returns."""

    data: torch.Tensor
    """``fp8(input * scale)``, shaped like the input."""
    data_t: Optional[torch.Tensor]
    """With ``transpose``: the same codes as a contiguous ``[cols, rows]`` matrix; else ``None``."""
    amax: torch.Tensor
    """``max |input|`` (0-dim float32, NaN if the input holds a NaN): what delayed scaling records."""


class BlockQuantized(NamedTuple):
    """What :func:`quantize_blockwise` returns."""

    data: torch.Tensor
    """The FP8 codes, shaped like the input."""
    scale_inv: torch.Tensor
    """float32 ``[ceil(rows / block_rows), ceil(cols / block_cols)]``: each block's dequantization factor."""


def quantize(
    input: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype = torch.float8_e4m3fn,
    *,
    rounding: str = "nearest",
    saturate: bool = True,
    seed: Optional[int] = None,
    transpose: bool = False,
) -> Quantized:
    """Quantize ``input`` with a given per-tensor ``scale`` (delayed scaling), in one pass.

    Args:
        input: fp32, fp16 or bf16, seen as a ``[rows, cols]`` matrix (``cols`` = last dimension).
        scale: one-element float32 tensor on ``input``'s device, read there (no host sync).
        dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        rounding: ``"nearest"`` or ``"stochastic"``.
        saturate: overflows (inf included) become the largest finite value instead of NaN (E4M3) / inf (E5M2).
        seed: key of stochastic rounding; ``None`` takes one from the device's default generator.
        transpose: also return the ``[cols, rows]`` transposed copy that Hopper's FP8 GEMM wants for
            the weight-gradient and input-gradient products.

    Returns:
        :class:`Quantized`: ``data``, ``data_t`` (or ``None``) and the input's ``amax``.
    """
    data, data_t, amax = torch.ops.mixprec.fp8_quantize.default(
        input, scale, dtype, rounding, bool(saturate), seed, bool(transpose)
    )
    return Quantized(data, data_t if transpose else None, amax)


def quantize_blockwise(
    input: torch.Tensor,
    dtype: torch.dtype = torch.float8_e4m3fn,
    block: tuple[int, int] = (-1, -1),
    *,
    margin: int = 0,
    pow2_scales: bool = False,
    rounding: str = "nearest",
    saturate: bool = True,
    seed: Optional[int] = None,
) -> BlockQuantized:
    """Current scaling at any granularity: each ``block`` of the ``[rows, cols]`` matrix gets the scale of its
    own amax (an amax of 0, inf or NaN gives scale 1).

    ``block = (block_rows, block_cols)``, -1 meaning the whole extent: ``(-1, -1)`` per tensor, ``(1, -1)``
    per row, ``(1, 128)`` and ``(128, 128)`` DeepSeek-V3's activation and weight blocks. Element ``[r, c]``
    dequantizes as ``data[r, c].float() * scale_inv[r // block_rows, c // block_cols]``.

    ``saturate`` matters only for a block holding inf or NaN (scaled by 1): a finite block's scale maps its
    amax onto the largest finite value, so none of its values overflows, with either rounding (stochastic
    rounding does not carry the largest one a step beyond it).
    """
    if len(block) != 2:
        raise ValueError(f"block must be (block_rows, block_cols), got {block!r}")
    data, scale_inv = torch.ops.mixprec.fp8_quantize_blockwise.default(
        input, dtype, int(block[0]), int(block[1]), int(margin), bool(pow2_scales), rounding, bool(saturate), seed
    )
    return BlockQuantized(data, scale_inv)


def dequantize(data: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """``data`` (a 2-D float8_e4m3fn / float8_e5m2 matrix) times ``scale_inv`` as float32: the exact value of
    each code times its scale, one fp32 rounding, NaN and inf codes kept. ``scale_inv`` takes the layouts
    :func:`gemm` takes (one element, ``[rows, 1]``, ``[rows, ceil(k / 128)]``, ``[ceil(rows / 128),
    ceil(k / 128)]``), as :func:`quantize` / :func:`quantize_blockwise` return them. This is the operand the
    CPU's GEMM emulation multiplies; on the CPU it is one vectorised pass."""
    return torch.ops.mixprec.fp8_dequantize.default(data, scale_inv)


def update_scales_(
    amax_history: torch.Tensor,
    scale: torch.Tensor,
    scale_inv: torch.Tensor,
    dtype: torch.dtype = torch.float8_e4m3fn,
    *,
    algo: str = "max",
    margin: int = 0,
    pow2_scales: bool = False,
    turn: Optional[torch.Tensor] = None,
    side: int = 0,
    take_turn: bool = True,
) -> None:
    """Delayed scaling's update, in place and on the device.

    ``amax_history`` is a float32 ``[history, n]`` matrix: row 0 holds this step's amax of each of ``n``
    tensors, rows 1.. the steps before (newest first). ``scale[j]`` becomes the scale of the column's max
    (``algo="max"``) or of row 0 (``"most_recent"``), ``scale_inv[j] = 1 / scale[j]``; an amax of 0, inf or
    NaN keeps the previous scale. Then the window moves down one row and row 0 is zeroed.

    ``turn`` (a one-element float32 tensor on the same device, shared by a layer's forward and backward
    updates) with ``side`` (0 for the forward's scales, 1 for the backward's): the update runs only if
    ``turn != side``, and ``turn`` becomes ``side``, read and written on the device. So each side's scales
    move once per forward-backward cycle, however often that side runs within it (:class:`mixprec.nn.Float8Linear`'s
    ``fp8_turn``). ``take_turn=False`` (a forward that builds no backward: a frozen layer, ``no_grad``,
    reentrant checkpointing's first pass) is gated alike, but a due update sets ``turn`` to 2 (both sides
    due) instead of ``side``: such passes keep updating on their own, and a backward that follows updates too.
    """
    torch.ops.mixprec.fp8_update_scales_.default(
        amax_history, scale, scale_inv, dtype, algo, int(margin), bool(pow2_scales), turn, int(side), bool(take_turn)
    )


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale_inv: torch.Tensor,
    b_scale_inv: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    bias: Optional[torch.Tensor] = None,
    *,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """Scaled FP8 GEMM: ``(a * a_scale_inv) @ (b * b_scale_inv).T`` (the layout of ``F.linear(a, b)``).

    Args:
        a, b: ``[m, k]`` and ``[n, k]`` float8_e4m3fn / float8_e5m2 matrices.
        a_scale_inv, b_scale_inv: float32; one element (per tensor), ``[rows, 1]`` (per row),
            ``[rows, ceil(k / 128)]`` (1x128 blocks) or ``[ceil(rows / 128), ceil(k / 128)]`` (128x128
            blocks), as :func:`quantize` / :func:`quantize_blockwise` produce them.
        out_dtype: float32, bfloat16 or float16.
        bias: ``[n]``; taken in ``out_dtype`` and added to the fp32 product before its one rounding to
            ``out_dtype`` (as ``torch._scaled_mm`` and cuBLASLt's bias epilogue do).
        use_fast_accum: CUDA's faster, less exact FP8 accumulation (forward GEMMs only).

    CUDA: per-tensor scales on sm_89+ and row scales on sm_90+ run one cuBLASLt FP8 GEMM with fp32
    accumulation; other cases the emulation. Every dimension must be a multiple of 16 there. CPU: the exact
    emulation (dequantize, fp32 GEMM with fp32 accumulation), the reference of every other path; while torch's
    fp32 matmul precision is reduced (``set_float32_matmul_precision("medium")``, mkldnn's ``"bf16"``), it
    sums in float64 and rounds once to fp32 instead of taking bf16 or TF32 products.
    """
    return torch.ops.mixprec.fp8_gemm.default(a, b, a_scale_inv, b_scale_inv, out_dtype, bias, bool(use_fast_accum))


def gemm_accum_(
    out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, a_scale_inv: torch.Tensor, b_scale_inv: torch.Tensor
) -> None:
    """``out += (a * a_scale_inv) @ (b * b_scale_inv).T`` into a contiguous fp32 ``[m, n]`` accumulator (one
    cuBLASLt GEMM with beta = 1 on CUDA): an FP8 weight gradient accumulated straight into an fp32 main_grad."""
    torch.ops.mixprec.fp8_gemm_accum_.default(out, a, b, a_scale_inv, b_scale_inv)
