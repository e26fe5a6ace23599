"""Typed Python wrappers over ``torch.ops.mixprec``; the same ops C++ reaches through ``mixprec::ops``."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _C

__all__ = [
    "unscale_and_check_",
    "unscale_and_check_sumsq_",
    "grad_stats",
    "GRAD_STATS_COLUMNS",
    "record_overflow_",
    "update_scale_",
    "cast",
    "cast_",
    "split_bf16_remainder",
    "merge_bf16_remainder",
    "adam_step_",
    "linear_wgrad_accum_",
    "linear_wgrad",
]

#: The master-weight modes ``adam_step_`` accepts.
MASTER_MODES = ("none", "fp32", "remainder")

#: The rounding modes ``cast`` and ``cast_`` accept.
ROUNDING_MODES = ("nearest", "stochastic")


def _eager(*lists: Sequence[torch.Tensor]) -> bool:
    """Whether a list op may take ``mixprec._C``'s direct binding: plain eager calls with lists of plain tensors.
    torch.compile traces torch.ops (a pybind function would break the graph), and ``__torch_function__``
    (tensor subclasses, function modes) is honoured only on the torch.ops path."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    return all(type(lst) in (list, tuple) and not torch.overrides.has_torch_function(lst) for lst in lists)


def unscale_and_check_(grads: Sequence[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor,
                       amax: Optional[torch.Tensor] = None) -> None:
    """Multiply every gradient in place by ``inv_scale`` and raise ``found_inf`` on any inf/NaN.

    Args:
        grads: gradients, fp32/fp16/bf16/fp64 mixed freely, all on one device; any strides.
        found_inf: one-element float32 tensor on that device; set to 1.0 when any element of any
            gradient is non-finite, never cleared (one flag can collect several calls).
        inv_scale: one-element float32 tensor on that device, usually ``1 / scale``.
        amax: optional contiguous float32 vector with one entry per gradient on that device, holding
            non-negative values (zeros to start). In the same pass entry ``i`` becomes the larger of itself
            and ``max |grads[i]|`` as read (before the multiplication), ordered NaN > inf > finite, so it
            names the gradients that overflowed. Like ``found_inf`` it only grows.

    Math is fp32 (fp64 for fp64 gradients); the whole list is one kernel launch on CUDA.
    """
    torch.ops.mixprec.unscale_and_check_.default(list(grads), found_inf, inv_scale, amax)


def unscale_and_check_sumsq_(
    grads: Sequence[torch.Tensor], found_inf: torch.Tensor, inv_scale: torch.Tensor,
    amax: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`unscale_and_check_`, returning also the sum of squares of the unscaled gradients.

    The result is a 0-dim float32 tensor on the gradients' device (no host synchronisation); its
    square root is the global gradient norm used for clipping, computed in the same pass. Squares are
    taken of the fp32 products before they are rounded to each gradient's dtype. ``amax`` is as in
    :func:`unscale_and_check_`.
    """
    return torch.ops.mixprec.unscale_and_check_sumsq_.default(list(grads), found_inf, inv_scale, amax)


#: The columns of a :func:`grad_stats` row before the exponent histogram.
GRAD_STATS_COLUMNS = ("numel", "zero", "flush_to_zero", "subnormal", "overflow", "nonfinite", "sumsq", "amax")


def grad_stats(grads: Sequence[torch.Tensor], scale: torch.Tensor, min_exponent: int = -40,
               num_bins: int = 64) -> torch.Tensor:
    """Statistics of the gradients' values from one pass (one launch on CUDA), with no host sync.

    Returns a float64 tensor ``[len(grads), 8 + num_bins]`` on ``scale``'s device, one row per gradient
    with the columns :data:`GRAD_STATS_COLUMNS`: element count; exact zeros; non-zero elements whose
    product with ``scale`` a cast to fp16 rounds to zero (``|g * scale| <= 2^-25``); those it rounds to a
    subnormal; finite elements it rounds to inf (``|g * scale| >= 65520``); inf/NaN elements; the sum of ``g^2`` (the squared norm; inf/NaN propagate); ``max |g|`` over finite elements.
    Then a histogram of ``floor(log2 |g|)`` over finite non-zero elements, bin ``k`` holding exponent
    ``min_exponent + k`` (the end bins also take what lies beyond them).

    Args:
        grads: true (unscaled) gradients, fp32/fp16/bf16/fp64 mixed, all on one device, any strides.
        scale: one-element float32 tensor on that device: the loss scale fp16 is judged at.
        min_exponent: the exponent of the first histogram bin, in [-1100, 1100].
        num_bins: the number of histogram bins, in [1, 4096].
    """
    return torch.ops.mixprec.grad_stats.default(list(grads), scale, int(min_exponent), int(num_bins))


def record_overflow_(record: torch.Tensor, amax: torch.Tensor, found_inf: torch.Tensor, scale: torch.Tensor,
                     step: int, checked: int, count: Optional[torch.Tensor] = None) -> None:
    """GradScaler's overflow bookkeeping for one step, on the device (no host sync).

    When ``found_inf`` is non-zero, ``record`` (float64, ``3 + len(amax)``) becomes ``[step, scale,
    checked, *amax]``; ``amax`` (float32, filled by :func:`unscale_and_check_`) is zeroed either way, for
    the next step; ``count`` (int64, one element) counts overflowing steps.
    """
    torch.ops.mixprec.record_overflow_.default(record, amax, found_inf, scale, int(step), int(checked), count)


def update_scale_(
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
    """Advance the dynamic loss-scale state machine in place, on the tensors' device.

    ``scale`` is a one-element float32 tensor, ``growth_tracker`` and ``hysteresis_tracker`` one-element
    int32 tensors (start the latter at ``hysteresis``), ``found_inf`` the flag from
    :func:`unscale_and_check_`. On overflow: the growth counter resets, one unit of the hysteresis budget
    is spent, and once it is gone ``scale *= backoff_factor`` (not below ``min_scale``). After
    ``growth_interval`` clean steps: ``scale *= growth_factor`` (not above ``max_scale``, skipped if not
    finite) and the budget refills. ``consecutive_hysteresis=True`` refills it on every clean step.
    With the defaults this is bit-identical to ``torch._amp_update_scale_`` while the growth tracker is below
    ``growth_interval`` (always, from a fresh start); a tracker at or past it (loaded, or a smaller interval
    set since) grows at the next clean step, where torch's ``==`` would never grow again.
    """
    torch.ops.mixprec.update_scale_.default(
        scale,
        growth_tracker,
        hysteresis_tracker,
        found_inf,
        float(growth_factor),
        float(backoff_factor),
        int(growth_interval),
        int(hysteresis),
        float(min_scale),
        None if max_scale is None else float(max_scale),
        bool(consecutive_hysteresis),
    )


def cast(
    src: torch.Tensor,
    dtype: torch.dtype,
    rounding: str = "nearest",
    saturate: bool = False,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """Convert ``src`` (fp32, fp16 or bf16) to ``dtype`` (fp32, fp16 or bf16).

    Args:
        rounding: ``"nearest"`` is IEEE round-to-nearest-even, bit-identical to ``src.to(dtype)``
            (NaN stays NaN). ``"stochastic"`` rounds up in magnitude with probability equal to the
            dropped fraction of an ulp, so ``E[cast(x)] == x``; the draws come from Philox keyed by
            ``seed`` and each element's position in memory (same seed and tensor, layout included, same
            bits, on CPU and CUDA alike; a transposed view of the same values draws in another order).
        saturate: finite values beyond the target's largest finite value become that value
            (e.g. +-65504 for fp16) instead of +-inf; inf and NaN pass through.
        seed: key for stochastic rounding; ``None`` takes one from torch's default generator of the
            device, so ``torch.manual_seed`` governs it.

    Widening to fp32 is exact. The result has ``src``'s layout.
    """
    return torch.ops.mixprec.cast.default(src, dtype, rounding, bool(saturate), seed)


def cast_(
    dst: Sequence[torch.Tensor],
    src: Sequence[torch.Tensor],
    rounding: str = "nearest",
    saturate: bool = False,
    seed: Optional[int] = None,
) -> None:
    """In place ``dst[i].copy_(cast(src[i], dst[i].dtype, ...))`` for the whole list in one launch.

    Pairs must have equal shapes; any strides. The pairs are cast in parallel, so no two ``dst`` may
    overlap, and a ``src`` may overlap no ``dst`` but its own pair's, and that one only in full (a cast in
    place); otherwise a RuntimeError names both, with nothing written. Stochastic draws are numbered across
    the list, so no two elements share a draw. Typical use: refresh bf16 model parameters from fp32 master
    weights.
    """
    if _eager(dst, src):
        _C.cast_(dst, src, rounding, bool(saturate), seed)  # the same op, without torch.ops' boxing
    else:
        torch.ops.mixprec.cast_.default(list(dst), list(src), rounding, bool(saturate), seed)


def split_bf16_remainder(src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split fp32 ``src`` into ``(bf16, int16 remainder)`` that :func:`merge_bf16_remainder` rebuilds
    exactly: 4 bytes per value instead of 6 for a bf16 parameter plus an fp32 master copy.

    The bf16 part is the fp32's high half rounded to nearest with ties away from zero (the top bit of
    the low half decides), not ties-to-even. Finite values with magnitude at or above the largest bf16
    plus half an ulp give +-inf there and still merge back exactly; NaN gives the canonical bf16 NaN
    and merges back to a NaN whose payload is not kept.
    """
    bf16, remainder = torch.ops.mixprec.split_bf16_remainder.default(src)
    return bf16, remainder


def merge_bf16_remainder(bf16: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """Rebuild the fp32 tensor from :func:`split_bf16_remainder`'s parts (exact for every non-NaN value)."""
    return torch.ops.mixprec.merge_bf16_remainder.default(bf16, remainder)


def adam_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    masters: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    *,
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
    """One fused Adam/AdamW step over whole lists (one pass over memory, all math in fp32).

    Row i is ``params[i]``, ``grads[i]``, ``exp_avgs[i]``, ``exp_avg_sqs[i]``, ``masters[i]`` (empty list
    for ``master_mode="none"``) and ``steps[i]`` (a one-element float32 tensor on the device that advances
    only on applied steps). ``master_mode``: ``"none"`` updates params from their own values (16-bit
    params are rounded with ``rounding``; ``"stochastic"`` keeps small updates alive), ``"fp32"`` keeps fp32
    masters whose rounding is written to the params, ``"remainder"`` keeps bf16 params plus int16
    remainders (exact fp32 at 4 bytes per value). Moments are fp32 or bf16 and keep their own dtype.

    On-device inputs (one-element float32 tensors): ``lr_tensor`` replaces ``lr``; grads are divided by
    ``grad_scale`` and multiplied by ``clip_coef`` inside the step; when ``found_inf`` is non-zero nothing
    at all is written, step counts included. With a ``grad_scale`` the gradients themselves are written
    back divided by it (not clipped), as torch's fused optimizers leave them. No host synchronisation on
    CUDA.

    AMSGrad: ``max_exp_avg_sqs`` (one per row, the moments' dtype) holds the running maximum of
    ``exp_avg_sqs``; the step updates it in place and divides by its root instead, as
    ``torch.optim.Adam(amsgrad=True)``.
    """
    torch.ops.mixprec.adam_step_.default(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(masters), list(steps),
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), bool(decoupled_weight_decay),
        bool(maximize), master_mode, rounding, seed, lr_tensor, grad_scale, found_inf, clip_coef,
        None if max_exp_avg_sqs is None else list(max_exp_avg_sqs),
    )


def linear_wgrad_accum_(main_grad: torch.Tensor, grad_output: torch.Tensor, input: torch.Tensor) -> None:
    """Accumulate a linear layer's weight gradient in fp32: ``main_grad += grad_output^T @ input``.

    Args:
        main_grad: contiguous float32 ``[out_features, in_features]`` accumulator, updated in place.
        grad_output: ``[..., out_features]``, float32/float16/bfloat16.
        input: ``[..., in_features]``, same dtype and leading (batch) shape as ``grad_output``.

    Products and sums are fp32 (fp32 operands get a true fp32 GEMM, no TF32), so no 16-bit gradient is
    ever formed. On CUDA it is one cuBLASLt GEMM with ``beta = 1`` on the current stream; inputs whose
    rows are not contiguous and evenly spaced are copied to a contiguous layout first.
    """
    torch.ops.mixprec.linear_wgrad_accum_.default(main_grad, grad_output, input)


def linear_wgrad(grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight gradient as a fresh fp32 tensor: ``grad_output^T @ input``.

    The same GEMM as :func:`linear_wgrad_accum_` (16-bit or fp32 operands, fp32 products and sums, no 16-bit
    gradient ever formed) writing a new ``[out_features, in_features]`` float32 tensor (``beta = 0`` on CUDA)
    instead of adding into one. An empty batch gives zeros.
    """
    return torch.ops.mixprec.linear_wgrad.default(grad_output, input)
