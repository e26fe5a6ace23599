"""Fake (meta) kernels for mixprec's ops, so FakeTensor, torch.compile and opcheck can trace them.

Every op in ``csrc/ops/registration.cpp`` has its fake kernel here: it checks nothing the real
kernels check (they run on real data later) and only describes outputs.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import torch


def _refuse_meta_mix(name: str, args: Sequence[Any]) -> None:
    """These kernels also run as the ops' Meta kernels: real meta tensors mixed with tensors that hold data
    (a meta scale with CPU operands) would get outputs of uninitialised memory. The real kernels' device checks
    refuse the mix; so does this. (FakeTensors report their fake device, not meta.)"""
    devices = set()
    for a in args:
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, torch.Tensor):
                devices.add(t.device.type)
    if "meta" in devices and len(devices) > 1:
        others = sorted(devices - {"meta"})
        raise RuntimeError(f"{name}: every tensor must be on one device, got meta tensors with {', '.join(others)} "
                           "ones (a meta tensor holds no data to compute with)")


def _fake(name: str) -> Callable[[Callable[..., Any]], Any]:
    """torch.library.register_fake for `name`, with the device rule of _refuse_meta_mix."""
    def register(fn: Callable[..., Any]) -> Any:
        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            _refuse_meta_mix(name, (*args, *kwargs.values()))
            return fn(*args, **kwargs)

        return torch.library.register_fake(name)(checked)

    return register


@_fake("mixprec::unscale_and_check_")
def _unscale_and_check_fake(grads: Sequence[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor,
                            amax: Optional[torch.Tensor] = None) -> None:
    return None


@_fake("mixprec::unscale_and_check_sumsq_")
def _unscale_and_check_sumsq_fake(
    grads: Sequence[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor,
    amax: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return found_inf.new_empty((), dtype=torch.float32)


@_fake("mixprec::grad_stats")
def _grad_stats_fake(grads: Sequence[torch.Tensor], scale: torch.Tensor, min_exponent: int = -40,
                     num_bins: int = 64) -> torch.Tensor:
    return scale.new_empty((len(grads), 8 + num_bins), dtype=torch.float64)


@_fake("mixprec::record_overflow_")
def _record_overflow_fake(record: torch.Tensor, amax: torch.Tensor, found_inf: torch.Tensor, scale: torch.Tensor,
                          step: int, checked: int, count: Optional[torch.Tensor] = None) -> None:
    return None


@_fake("mixprec::update_scale_")
def _update_scale_fake(
    scale: torch.Tensor,
    growth_tracker: torch.Tensor,
    hysteresis_tracker: torch.Tensor,
    found_inf: torch.Tensor,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
    hysteresis: int = 1,
    min_scale: float = 0.0,
    max_scale: Optional[float] = None,
    consecutive_hysteresis: bool = False,
) -> None:
    return None


@_fake("mixprec::cast")
def _cast_fake(
    src: torch.Tensor, dtype: torch.dtype, rounding: str = "nearest", saturate: bool = False, seed: Optional[int] = None
) -> torch.Tensor:
    return torch.empty_like(src, dtype=dtype, memory_format=torch.preserve_format)


@_fake("mixprec::cast_")
def _cast__fake(
    dst: Sequence[torch.Tensor],
    src: Sequence[torch.Tensor],
    rounding: str = "nearest",
    saturate: bool = False,
    seed: Optional[int] = None,
) -> None:
    return None


@_fake("mixprec::split_bf16_remainder")
def _split_bf16_remainder_fake(src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        src.new_empty(src.shape, dtype=torch.bfloat16),
        src.new_empty(src.shape, dtype=torch.int16),
    )


@_fake("mixprec::merge_bf16_remainder")
def _merge_bf16_remainder_fake(bf16: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    return bf16.new_empty(bf16.shape, dtype=torch.float32)


@_fake("mixprec::adam_step_")
def _adam_step_fake(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    masters: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool = True,
    maximize: bool = False,
    master_mode: str = "none",
    rounding: str = "nearest",
    seed: Optional[int] = None,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    clip_coef: Optional[torch.Tensor] = None,
    max_exp_avg_sqs: Optional[Sequence[torch.Tensor]] = None,
) -> None:
    return None


@_fake("mixprec::linear_wgrad_accum_")
def _linear_wgrad_accum_fake(main_grad: torch.Tensor, grad_output: torch.Tensor, input: torch.Tensor) -> None:
    return None


@_fake("mixprec::linear_wgrad")
def _linear_wgrad_fake(grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    return grad_output.new_empty((grad_output.shape[-1], input.shape[-1]), dtype=torch.float32)


def _fp8_matrix(input: torch.Tensor) -> tuple[int, int]:
    """The [rows, cols] matrix the FP8 ops see: cols is the last dimension (a 0-dim tensor is [1, 1])."""
    if input.dim() == 0:
        return 1, 1
    rows = 1
    for size in input.shape[:-1]:
        rows *= size
    return rows, input.shape[-1]


@_fake("mixprec::fp8_quantize")
def _fp8_quantize_fake(
    input: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    rounding: str = "nearest",
    saturate: bool = True,
    seed: Optional[int] = None,
    transpose: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = _fp8_matrix(input)
    return (
        input.new_empty(input.shape, dtype=dtype),
        input.new_empty((cols, rows) if transpose else (0,), dtype=dtype),
        input.new_empty((), dtype=torch.float32),
    )


@_fake("mixprec::fp8_quantize_blockwise")
def _fp8_quantize_blockwise_fake(
    input: torch.Tensor,
    dtype: torch.dtype,
    block_rows: int,
    block_cols: int,
    margin: int = 0,
    pow2_scales: bool = False,
    rounding: str = "nearest",
    saturate: bool = True,
    seed: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = _fp8_matrix(input)
    grid_rows = 1 if block_rows == -1 else -(-rows // block_rows)
    grid_cols = 1 if block_cols == -1 else -(-cols // block_cols)
    return input.new_empty(input.shape, dtype=dtype), input.new_empty((grid_rows, grid_cols), dtype=torch.float32)


@_fake("mixprec::fp8_update_scales_")
def _fp8_update_scales_fake(
    amax_history: torch.Tensor,
    scale: torch.Tensor,
    scale_inv: torch.Tensor,
    dtype: torch.dtype,
    algo: str = "max",
    margin: int = 0,
    pow2_scales: bool = False,
    turn: Optional[torch.Tensor] = None,
    side: int = 0,
    take_turn: bool = True,
) -> None:
    return None


@_fake("mixprec::fp8_reduce_amax_")
def _fp8_reduce_amax_fake(forward_amax_history: torch.Tensor, backward_amax_history: torch.Tensor,
                          group_name: str) -> None:
    return None


@_fake("mixprec::fp8_gemm")
def _fp8_gemm_fake(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale_inv: torch.Tensor,
    b_scale_inv: torch.Tensor,
    out_dtype: torch.dtype,
    bias: Optional[torch.Tensor] = None,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


@_fake("mixprec::fp8_dequantize")
def _fp8_dequantize_fake(data: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    return data.new_empty(data.shape, dtype=torch.float32)


@_fake("mixprec::fp8_gemm_accum_")
def _fp8_gemm_accum_fake(
    out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, a_scale_inv: torch.Tensor, b_scale_inv: torch.Tensor
) -> None:
    return None


def _grid(rows: int, cols: int, block_rows: int, block_cols: int) -> tuple[int, int]:
    """The blocks of block_rows x block_cols (-1: the whole extent) over a [rows, cols] matrix."""
    return (1 if block_rows == -1 else -(-rows // block_rows), 1 if block_cols == -1 else -(-cols // block_cols))


@_fake("mixprec::int8_quantize")
def _int8_quantize_fake(input: torch.Tensor, block_rows: int, block_cols: int, rounding: str = "nearest",
                        seed: Optional[int] = None, pow2_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = _fp8_matrix(input)
    return (input.new_empty(input.shape, dtype=torch.int8),
            input.new_empty(_grid(rows, cols, block_rows, block_cols), dtype=torch.float32))


@_fake("mixprec::int8_mm")
def _int8_mm_fake(a: torch.Tensor, b: torch.Tensor, a_scale_inv: torch.Tensor, b_scale_inv: torch.Tensor,
                  out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


@_fake("mixprec::fake_quantize_forward")
def _fake_quantize_forward_fake(input: torch.Tensor, scale: torch.Tensor, quant_min: int, quant_max: int,
                                block_rows: int = -1, block_cols: int = -1) -> torch.Tensor:
    return input.new_empty(input.shape)


@_fake("mixprec::fake_quantize_backward")
def _fake_quantize_backward_fake(grad: torch.Tensor, input: torch.Tensor, scale: torch.Tensor, quant_min: int,
                                 quant_max: int, block_rows: int, block_cols: int,
                                 scale_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = _fp8_matrix(input)
    return input.new_empty(input.shape), input.new_empty((rows, cols) if scale_grad else (0,), dtype=torch.float32)


# ---- FLOP counts (torch.utils.flop_counter.FlopCounterMode): the GEMM ops count as torch's mm ------------------
# Without them a converted model's backward, whose weight gradient is one of these ops, reports a third fewer
# FLOPs than the torch.nn.Linear model it replaces (MFU measurements under-report).


def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import register_flop_formula

    def gemm(m: int, n: int, k: int) -> int:
        return 2 * m * n * k

    @register_flop_formula(torch.ops.mixprec.linear_wgrad)
    def _linear_wgrad_flop(grad_output_shape, input_shape, *args, **kwargs) -> int:
        # grad_output [..., out] and input [..., in] over the same leading dimensions.
        tokens = 1
        for d in grad_output_shape[:-1]:
            tokens *= d
        return gemm(grad_output_shape[-1], input_shape[-1], tokens)

    @register_flop_formula(torch.ops.mixprec.linear_wgrad_accum_)
    def _linear_wgrad_accum_flop(main_grad_shape, grad_output_shape, input_shape, *args, **kwargs) -> int:
        return _linear_wgrad_flop(grad_output_shape, input_shape)

    @register_flop_formula(torch.ops.mixprec.fp8_gemm)
    def _fp8_gemm_flop(a_shape, b_shape, *args, **kwargs) -> int:
        return gemm(a_shape[0], b_shape[0], a_shape[1])  # a [m, k], b [n, k]

    @register_flop_formula(torch.ops.mixprec.fp8_gemm_accum_)
    def _fp8_gemm_accum_flop(out_shape_, a_shape, b_shape, *args, **kwargs) -> int:
        return _fp8_gemm_flop(a_shape, b_shape)

    @register_flop_formula(torch.ops.mixprec.int8_mm)
    def _int8_mm_flop(a_shape, b_shape, *args, **kwargs) -> int:
        return gemm(a_shape[0], b_shape[1], a_shape[1])  # a [m, k], b [k, n]


_register_flop_formulas()
